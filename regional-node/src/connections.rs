//! Client connections, over plain TCP or TLS (NODE_TLS_CERT): how many are open, how long one may take to send a request
//! head, and how one ends after an answer the client was not reading yet.
//!
//! - At most `NODE_HTTP_MAX_CONNECTIONS` connections are served at once; further ones
//!   wait in the kernel's listen backlog until a slot frees.
//! - A connection that has not sent a complete request head within the header timeout
//!   (from when it opened, or from the first byte of a later request) is closed: a
//!   slowloris client cannot keep a slot. A keep-alive connection with nothing sent
//!   since its last answer is closed after the longer idle timeout, which must exceed
//!   the idle timeout of the clients' pools (the gateway's is 60 s): a server that
//!   closes a connection a client is just reusing turns that request into an error the
//!   client cannot safely retry.
//! - Lingering close, as nginx does it: when hyper ends a connection because a request
//!   body was left unread (a 413 for a body over the limit, a 408), the node shuts down
//!   its sending side and reads and discards what the client still sends, bounded in
//!   time and bytes, before closing. Closing at once would make the kernel answer the
//!   client's next bytes with a reset, which destroys the answer before the client has
//!   read it.

use crate::metrics::Metrics;
use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Notify, Semaphore};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt as _;

/// While lingering, a pause this long in the client's sending ends it.
const LINGER_PAUSE: Duration = Duration::from_secs(5);
/// Lingering ends after this long whatever the client does.
const LINGER_TIME: Duration = Duration::from_secs(30);
/// ... or after this many bytes read and discarded (a 32 MiB upload fits).
const LINGER_BYTES: u64 = 64 * 1024 * 1024;

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_connections: usize,
    pub header_timeout: Duration,
    pub idle_timeout: Duration,
}

/// Serves `router` on `listener` until `stop` turns true, then stops accepting, lets
/// each connection finish its request in flight, and returns when all have closed.
pub async fn serve(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    router: Router,
    limits: Limits,
    metrics: Metrics,
    mut stop: watch::Receiver<bool>,
) {
    for reason in ["header_timeout", "idle_timeout", "lingered"] {
        metrics.http_connections_closed.with_label_values(&[reason]);
    }
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => slot.expect("the semaphore is never closed"),
            _ = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause rather than spin.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        let router = router.clone();
        let stop = stop.clone();
        let metrics = metrics.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            metrics.http_connections.inc();
            let closed = match tls {
                None => serve_connection(Plain(stream), peer, router, limits, stop).await,
                // The handshake runs here, on the connection's own task and within the
                // header timeout, so a silent client holds up no one else's accept.
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_timeout, acceptor.accept(stream)).await
                    {
                        Ok(Ok(tls)) => {
                            serve_connection(Tls(Box::new(tls)), peer, router, limits, stop).await
                        }
                        // A refused client certificate lands here: say so, with the
                        // peer, so an operator can tell a misconfigured gateway.
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "TLS handshake refused");
                            None
                        }
                        Err(_) => Some("header_timeout"),
                    }
                }
            };
            if let Some(reason) = closed {
                metrics
                    .http_connections_closed
                    .with_label_values(&[reason])
                    .inc();
            }
            metrics.http_connections.dec();
            drop(slot);
        });
    }
    // Every connection gives its slot back when it ends.
    let _ = slots
        .acquire_many(limits.max_connections as u32)
        .await
        .map(|all| all.forget());
}

/// Serves one connection to its end; returns why the node closed it, when it did.
async fn serve_connection<S: Stream>(
    stream: S,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) -> Option<&'static str> {
    let activity = Arc::new(Activity::default());
    activity.idle_since.store(now_ms(), Ordering::Release);
    let requests = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` would add: admin checks loopback.
        req.extensions_mut().insert(ConnectInfo(peer));
        let in_flight = requests.begin();
        let answer = router.clone().oneshot(req);
        // Boxed: hyper's `poll_without_shutdown` wants an `Unpin` connection.
        Box::pin(async move {
            let answer = answer.await;
            drop(in_flight);
            answer
        })
    });
    let io = Watched {
        inner: stream,
        activity: activity.clone(),
    };
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .serve_connection(TokioIo::new(io), service);
    let mut stopping = false;
    let done = loop {
        tokio::select! {
            done = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break done,
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                std::pin::Pin::new(&mut conn).graceful_shutdown();
            }
            why = activity.expired(&limits) => {
                // Nothing in flight: dropping the connection closes it.
                tracing::debug!(%peer, why, "connection closed");
                return Some(why);
            }
        }
    };
    match done {
        Ok(()) => {
            let parts = conn.into_parts();
            let tcp = parts.io.into_inner().inner.close_send().await;
            linger(tcp).await.then_some("lingered")
        }
        // A malformed request, a client that vanished: just close.
        Err(e) => {
            tracing::debug!(%peer, error = %e, "connection ended");
            None
        }
    }
}

/// Milliseconds on one monotonic clock.
fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// What a connection's reads, its requests and its timer share.
#[derive(Default)]
struct Activity {
    /// Requests whose head has arrived and whose answer is not out yet.
    in_flight: AtomicU32,
    /// At least one request head arrived: quiet time from then on is idle time.
    served: AtomicBool,
    /// Bytes arrived while nothing was in flight: a request head has begun.
    begun: AtomicBool,
    /// When the connection opened or its last answer went out, or (while `begun`)
    /// when the head began; in [`now_ms`].
    idle_since: AtomicU64,
    wake: Notify,
}

/// Held while a request is in flight.
struct InFlight(Arc<Activity>);

impl Activity {
    fn begin(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.served.store(true, Ordering::Release);
        self.begun.store(false, Ordering::Release);
        self.wake.notify_one();
        InFlight(self.clone())
    }

    fn read_some(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0 && !self.begun.swap(true, Ordering::AcqRel) {
            self.idle_since.store(now_ms(), Ordering::Release);
            self.wake.notify_one();
        }
    }

    /// Completes when the connection should be closed, with why.
    async fn expired(&self, limits: &Limits) -> &'static str {
        loop {
            let waiting = if self.in_flight.load(Ordering::Acquire) > 0 {
                None
            } else if self.begun.load(Ordering::Acquire) || !self.served.load(Ordering::Acquire) {
                Some(("header_timeout", limits.header_timeout))
            } else {
                Some(("idle_timeout", limits.idle_timeout))
            };
            let Some((why, limit)) = waiting else {
                self.wake.notified().await;
                continue;
            };
            let since = self.idle_since.load(Ordering::Acquire);
            let elapsed = Duration::from_millis(now_ms().saturating_sub(since));
            if elapsed >= limit {
                return why;
            }
            tokio::select! {
                _ = tokio::time::sleep(limit - elapsed) => {}
                _ = self.wake.notified() => {}
            }
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let a = &self.0;
        a.idle_since.store(now_ms(), Ordering::Release);
        a.in_flight.fetch_sub(1, Ordering::AcqRel);
        a.wake.notify_one();
    }
}

/// A client's stream: plain TCP, or TLS on it.
trait Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// Ends the sending side (for TLS with its close_notify) and hands back the TCP
    /// stream to linger on.
    fn close_send(self) -> impl std::future::Future<Output = TcpStream> + Send;
}

struct Plain(TcpStream);
struct Tls(Box<TlsStream<TcpStream>>);

impl Stream for Plain {
    async fn close_send(mut self) -> TcpStream {
        let _ = self.0.shutdown().await;
        self.0
    }
}

impl Stream for Tls {
    async fn close_send(mut self) -> TcpStream {
        let _ = self.0.shutdown().await;
        self.0.into_inner().0
    }
}

macro_rules! delegate_io {
    ($t:ty) => {
        impl AsyncRead for $t {
            fn poll_read(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &mut ReadBuf<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_read(cx, buf)
            }
        }
        impl AsyncWrite for $t {
            fn poll_write(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                buf: &[u8],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.0).poll_write(cx, buf)
            }
            fn poll_flush(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_flush(cx)
            }
            fn poll_shutdown(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
            ) -> Poll<std::io::Result<()>> {
                Pin::new(&mut self.0).poll_shutdown(cx)
            }
            fn poll_write_vectored(
                mut self: Pin<&mut Self>,
                cx: &mut Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> Poll<std::io::Result<usize>> {
                Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
            }
            fn is_write_vectored(&self) -> bool {
                self.0.is_write_vectored()
            }
        }
    };
}
delegate_io!(Plain);
delegate_io!(Tls);

/// The client's stream, telling [`Activity`] when bytes arrive.
struct Watched<S> {
    inner: S,
    activity: Arc<Activity>,
}

impl<S: AsyncRead + Unpin> AsyncRead for Watched<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.read_some();
        }
        polled
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Watched<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Reads until the client closes too (its sending side already closed), within the bounds above. A client
/// that had finished sending sees the end at once, so this costs nothing then. True when
/// the client was still sending (an answer went out before its body was read).
async fn linger(mut stream: TcpStream) -> bool {
    let until = tokio::time::Instant::now() + LINGER_TIME;
    let mut left = LINGER_BYTES;
    let mut discarded = false;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let pause = LINGER_PAUSE.min(until.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(pause, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {
                discarded = true;
                left = left.saturating_sub(n as u64);
            }
            _ => break,
        }
    }
    discarded
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not `Send`).
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

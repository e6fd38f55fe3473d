//! The public listener: accepts TCP (and TLS) connections, serves HTTP/1.1 and HTTP/2
//! on each, dispatches to the gateway's own endpoints or the proxy, and drains
//! connections gracefully on shutdown.
//!
//! Connection caps, idle and header timeouts and the lingering close are in
//! [`connections`](crate::connections).
//!
//! Thread per core, as nginx's workers: each worker thread runs its own single-threaded
//! runtime with its own `SO_REUSEPORT` listener and its own upstream pool, so a request
//! never hops between threads (work stealing and cross-thread wake-ups showed in
//! profiles). Routing state, metrics and the failover controller are shared. A worker
//! busier than another hands new connections over ([`workers`](crate::workers)).

use crate::config::ConnectionLimits;
use crate::connections::{linger, Admission, ClientStream, ConnState, Registry};
use crate::error::GatewayError;
use crate::proxy::{Body, UpstreamClient};
use crate::upstream::Upstream;
use crate::workers::{Seat, Worker};
use crate::{admin, proxy, Shared};
use hyper::body::{Body as _, Incoming};
use hyper::http::{Request, Response, Version};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

/// A TLS handshake never needs long; a client that stalls in it is let go sooner than
/// one slow to send its request head.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The first worker's listener. `SO_REUSEPORT` would let it share a port with another
/// process of the same user without complaint, so first make sure nobody listens
/// there: a plain bind fails if anyone does.
pub fn bind_first(addr: SocketAddr) -> std::io::Result<TcpListener> {
    if addr.port() != 0 {
        drop(std::net::TcpListener::bind(addr)?);
    }
    bind_shared(addr)
}

/// A listener on `addr` that other workers can bind too (`SO_REUSEPORT`).
pub fn bind_shared(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.set_nodelay(true)?;
    socket.bind(addr)?;
    socket.listen(1024)
}

/// Serves until `shutdown` completes, then waits up to the grace period for open
/// connections to finish their requests.
pub async fn serve(
    listener: TcpListener,
    mut worker: Worker,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let client = Arc::new(Upstream::new(
        shared.config.connect_timeout,
        &shared.config.regions,
        shared.node_tls.as_ref(),
    ));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself when the request head does not fit its buffer. Its
    // header read timeout is off: the connection's idle watcher enforces the same limit
    // (see [`crate::connections`]) without a timer per request.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(shared.config.max_header_bytes.max(8192) + 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    // Stopped only after the last connection is drained: its requests need the sweeps.
    let sweeps = tokio::spawn(client.slow.clone().run_sweeps());
    let registry = Arc::new(Registry::default());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer, seat) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => match worker.place(stream, peer) {
                    Some((stream, seat)) => (stream, peer, seat),
                    None => continue,
                },
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            (stream, peer, seat) = worker.handed_over() => (stream, peer, seat),
            // Reap finished connection tasks as they end.
            Some(_) = connections.join_next(), if !connections.is_empty() => continue,
            _ = &mut shutdown => break,
        };
        let Some(admission) = shared.connections.admit(&registry, peer.ip()) else {
            tracing::debug!(%peer, "connection refused: over the connection caps");
            continue;
        };
        let _ = stream.set_nodelay(true);
        connections.spawn(connection(
            Connection {
                shared: shared.clone(),
                client: client.clone(),
                builder: builder.clone(),
                tls: tls.clone(),
                stop: stop_rx.clone(),
                peer,
            },
            stream,
            admission,
            seat,
        ));
    }
    drop(listener);
    drop(worker);
    let _ = stop_tx.send(true);
    let grace = shared.config.shutdown_grace;
    tracing::info!(
        connections = connections.len(),
        "shutting down; draining connections"
    );
    let drained = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drained).await.is_err() {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing"
        );
        connections.abort_all();
    }
    sweeps.abort();
}

/// What a connection's task needs besides its stream.
struct Connection {
    shared: Arc<Shared>,
    client: UpstreamClient,
    builder: Arc<auto::Builder<TokioExecutor>>,
    tls: Option<TlsAcceptor>,
    stop: watch::Receiver<bool>,
    peer: SocketAddr,
}

/// Serves one client connection: TLS, HTTP/1.1 or HTTP/2, closes it when idle, when
/// room is needed or at shutdown, and lingers when an answer left before the body.
async fn connection(c: Connection, stream: TcpStream, admission: Admission, _seat: Seat) {
    let Connection {
        shared,
        client,
        builder,
        tls,
        mut stop,
        peer,
    } = c;
    let limits = shared.connections.limits();
    let state = admission.state.clone();
    let (stream, given_back) = ClientStream::new(stream, state.clone());
    let service = {
        let ctx = Arc::new(PerConnection {
            shared: shared.clone(),
            client,
            state: state.clone(),
            peer,
            is_tls: tls.is_some(),
        });
        service_fn(move |req: Request<Incoming>| {
            let ctx = ctx.clone();
            async move {
                let _in_flight = ctx.state.begin(req.version() == Version::HTTP_2);
                // HTTP/1 only: an HTTP/2 stream is reset on its own, the connection goes on.
                let unread_body = req.version() <= Version::HTTP_11 && !req.body().is_end_stream();
                let resp = dispatch(&ctx.shared, &ctx.client, req, ctx.peer, ctx.is_tls).await;
                if unread_body
                    && (resp.status().is_client_error() || resp.status().is_server_error())
                {
                    ctx.state.linger_on_close();
                }
                Ok::<_, Infallible>(resp)
            }
        })
    };
    let driver = Driver {
        builder: &builder,
        state: &state,
        limits,
        shared: &shared,
    };
    let result = match tls {
        None => driver.run(TokioIo::new(stream), service, &mut stop).await,
        Some(acceptor) => {
            let handshake = tokio::time::timeout(
                limits.header_read_timeout.min(TLS_HANDSHAKE_TIMEOUT),
                acceptor.accept(stream),
            );
            let stream = tokio::select! {
                r = handshake => match r {
                    Ok(Ok(s)) => s,
                    Ok(Err(e)) => {
                        tracing::debug!(%peer, error = %e, "TLS handshake failed");
                        return;
                    }
                    Err(_) => {
                        tracing::debug!(%peer, "TLS handshake timed out");
                        return;
                    }
                },
                _ = state.idle_expired(limits) => return,
            };
            driver.run(TokioIo::new(stream), service, &mut stop).await
        }
    };
    if let Err(e) = result {
        tracing::debug!(%peer, error = %e, "connection ended with an error");
    }
    if let Ok(stream) = given_back.await {
        linger(stream, limits, &shared.metrics).await;
    }
    drop(admission);
}

/// What each request of a connection is handed: one pointer to clone per request, which
/// only this connection's thread touches (cloning `Arc<Shared>` for every request had
/// all workers update one shared count).
struct PerConnection {
    shared: Arc<Shared>,
    client: UpstreamClient,
    state: Arc<ConnState>,
    peer: SocketAddr,
    is_tls: bool,
}

/// Runs one HTTP connection (plain or TLS alike).
struct Driver<'a> {
    builder: &'a auto::Builder<TokioExecutor>,
    state: &'a ConnState,
    limits: &'a ConnectionLimits,
    shared: &'a Shared,
}

impl Driver<'_> {
    /// Runs the connection until it ends; closes it gracefully when it has been idle
    /// too long, when it is chosen to make room, or when the gateway stops.
    async fn run<I, S>(
        &self,
        io: I,
        service: S,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
        S: hyper::service::Service<
                Request<Incoming>,
                Response = Response<Body>,
                Error = Infallible,
            > + Send
            + 'static,
        S::Future: Send + 'static,
    {
        let (state, limits, shared) = (self.state, self.limits, self.shared);
        let conn = self.builder.serve_connection(io, service);
        tokio::pin!(conn);
        let mut closing: Option<tokio::time::Instant> = None;
        // The watchers are looked at only when they were woken, not each time the
        // connection's task runs for its requests (select! polls every branch).
        let mut idle = OnWake::new(state.idle_expired(limits));
        let mut stopped = OnWake::new(async move {
            let _ = stop.wait_for(|s| *s).await;
        });
        loop {
            let far = tokio::time::Instant::now() + Duration::from_secs(3600);
            tokio::select! {
                result = conn.as_mut() => return result,
                reason = &mut idle, if closing.is_none() => {
                    shared.metrics.connections_closed.with_label_values(&[reason.label()]).inc();
                    if state.never_served() {
                        // A header timeout, or evicted before any request: nothing to
                        // finish, and hyper's graceful shutdown would wait for the head's
                        // last bytes (an evicted slowloris stayed up to the request deadline).
                        return Ok(());
                    }
                    conn.as_mut().graceful_shutdown();
                    // A response still being written gets the request deadline to finish.
                    closing = Some(tokio::time::Instant::now() + shared.config.request_timeout);
                }
                _ = &mut stopped, if closing.is_none() => {
                    conn.as_mut().graceful_shutdown();
                    closing = Some(far);
                }
                _ = tokio::time::sleep_until(closing.unwrap_or(far)), if closing.is_some() => {
                    return Ok(());
                }
            }
        }
    }
}

/// A future polled only after its own waker fired (and on the first poll): a watcher
/// that sits in a `select!` next to a busy future then costs an atomic swap per poll of
/// the task instead of a poll of its own.
struct OnWake<'a, T> {
    inner: Pin<Box<dyn Future<Output = T> + Send + 'a>>,
    flag: Arc<WakeFlag>,
    waker: Waker,
}

struct WakeFlag {
    woken: AtomicBool,
    /// The task's waker, passed the wake-up on.
    task: Mutex<Option<Waker>>,
}

impl Wake for WakeFlag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        if let Some(w) = self.task.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            w.wake_by_ref();
        }
    }
}

impl<'a, T> OnWake<'a, T> {
    fn new(inner: impl Future<Output = T> + Send + 'a) -> Self {
        let flag = Arc::new(WakeFlag {
            woken: AtomicBool::new(true),
            task: Mutex::new(None),
        });
        OnWake {
            inner: Box::pin(inner),
            waker: Waker::from(flag.clone()),
            flag,
        }
    }
}

impl<T> Future for OnWake<'_, T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        {
            let mut task = self.flag.task.lock().unwrap_or_else(|e| e.into_inner());
            if !task.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                *task = Some(cx.waker().clone());
            }
        }
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let this = &mut *self;
        this.inner
            .as_mut()
            .poll(&mut Context::from_waker(&this.waker))
    }
}

async fn dispatch(
    shared: &Shared,
    client: &UpstreamClient,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<Body> {
    let path = req.uri().path();
    if path == "/metrics" || path == "/openapi.json" || path.starts_with("/gateway/") {
        admin::handle(shared, req, peer).await
    } else if path == "/admin" || path.starts_with("/admin/") {
        // The nodes' admin API is never reachable through the public endpoint.
        GatewayError::NotFound.to_response()
    } else {
        proxy::forward(shared, client, req, peer, tls).await
    }
}

//! Connections to the regions: HTTP/1.1 with keep-alive, pooled per worker thread (each
//! worker's runtime has its own [`Upstream`], so a request and its upstream connection
//! stay on one thread).
//!
//! Why not hyper-util's pooled client: in callgrind it was a sixth of the gateway's
//! instructions per proxied request, mostly bookkeeping: a pool keyed by scheme and
//! authority hashed with SipHash at checkout and again at check-in, a connect future
//! built and raced against every checkout, and a task spawned for most requests to put
//! the connection back. Here a region's idle connections are a stack found by the
//! region's index, and a connection goes back when its answer's body has been read to
//! the end (see [`PooledBody`]).
//!
//! A region given as `https://` gets TLS on each new connection (pinned CA, client
//! certificate: [`crate::tls::node_client`]); a pooled connection is the same
//! `SendRequest` either way, so reuse costs nothing more, and plain regions take no
//! TLS path at all.

use crate::config::RegionConfig;
use crate::proxy::{Body, BoxError};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Frame, Incoming, SizeHint};
use hyper::client::conn::http1;
use hyper::http::{header, HeaderValue, Request, Response};
use hyper_util::rt::TokioIo;
use internal_tls::ServerName;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsConnector;

/// An idle connection unused this long is closed rather than reused (the node may have
/// closed it already; it costs a file descriptor on both sides).
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle connections kept per region and worker; more are closed when they come back.
const MAX_IDLE: usize = 1024;

/// Why a request did not get an answer from the region.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made: nothing was sent.
    #[error("connect to {authority}: {source}")]
    Connect {
        authority: String,
        source: std::io::Error,
    },
    /// The exchange failed on an established connection.
    #[error("upstream exchange")]
    Http(#[source] hyper::Error),
}

impl UpstreamError {
    /// Nothing reached the region, so the request may be sent anywhere again.
    pub fn is_connect(&self) -> bool {
        matches!(self, UpstreamError::Connect { .. })
    }
}

/// One worker's connections to every region.
pub struct Upstream {
    connect_timeout: Duration,
    /// By region index: the TLS client and the name the node's certificate must
    /// carry, for `https://` regions.
    tls: Vec<Option<(TlsConnector, ServerName<'static>)>>,
    /// Idle connections by region index, the most recently used last.
    idle: Mutex<Vec<Vec<Idle>>>,
}

struct Idle {
    sender: http1::SendRequest<Body>,
    since: Instant,
}

/// Where a request goes.
pub struct Target<'a> {
    /// The region's index in the routing table.
    pub index: usize,
    /// `host:port`.
    pub authority: &'a str,
    /// `authority` as a `Host` value, for a request that came without one (HTTP/2).
    pub host: &'a HeaderValue,
}

impl Upstream {
    /// `tls` is required for `https://` regions (the configuration ensures it).
    pub fn new(
        connect_timeout: Duration,
        regions: &[RegionConfig],
        tls: Option<&Arc<ClientConfig>>,
    ) -> Upstream {
        let tls = regions
            .iter()
            .map(|r| {
                let connector = TlsConnector::from(tls.filter(|_| r.tls)?.clone());
                let name = internal_tls::server_name(r.authority.host())
                    .expect("checked when the configuration was loaded");
                Some((connector, name))
            })
            .collect();
        Upstream {
            connect_timeout,
            tls,
            idle: Mutex::new((0..regions.len()).map(|_| Vec::new()).collect()),
        }
    }

    /// Sends `req` (origin-form URI) to the region and gives its answer, whose body
    /// brings the connection back to the pool once read to the end.
    pub async fn send(
        self: &Arc<Self>,
        to: Target<'_>,
        mut req: Request<Body>,
    ) -> Result<Response<Body>, UpstreamError> {
        if !req.headers().contains_key(header::HOST) {
            req.headers_mut().insert(header::HOST, to.host.clone());
        }
        // A pooled connection may have been closed by the region since its last use
        // without the gateway noticing yet; then the request, not sent, goes on a new one.
        let mut pooled = true;
        loop {
            let mut sender = match pooled.then(|| self.checkout(to.index)).flatten() {
                Some(s) => s,
                None => {
                    pooled = false;
                    self.connect(to.index, to.authority).await?
                }
            };
            if pooled && !sender.is_ready() && sender.ready().await.is_err() {
                continue;
            }
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let pool = Some((self.clone(), to.index, sender));
                    return Ok(resp.map(|inner| {
                        PooledBody {
                            inner,
                            finished: false,
                            pool,
                        }
                        .boxed()
                    }));
                }
                Err(mut e) => match e.take_message() {
                    Some(unsent) if pooled => req = unsent,
                    _ => return Err(UpstreamError::Http(e.into_error())),
                },
            }
        }
    }

    /// The most recently used idle connection to the region still open, if any.
    fn checkout(&self, region: usize) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let stack = idle.get_mut(region)?;
        while let Some(c) = stack.pop() {
            if !c.sender.is_closed() && c.since.elapsed() < IDLE_TIMEOUT {
                return Some(c.sender);
            }
        }
        None
    }

    fn checkin(&self, region: usize, sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(stack) = idle.get_mut(region) {
            if stack.len() < MAX_IDLE {
                stack.push(Idle {
                    sender,
                    since: Instant::now(),
                });
            }
        }
    }

    async fn connect(
        &self,
        region: usize,
        authority: &str,
    ) -> Result<http1::SendRequest<Body>, UpstreamError> {
        let failed = |source| UpstreamError::Connect {
            authority: authority.to_string(),
            source,
        };
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(authority)).await {
                Ok(Ok(s)) => s,
                Ok(Err(e)) => return Err(failed(e)),
                Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
            };
        let _ = stream.set_nodelay(true);
        let Some(Some((connector, name))) = self.tls.get(region) else {
            return Self::handshake(stream).await;
        };
        // The TLS handshake is part of connecting: a node whose certificate is not
        // trusted (or that refuses ours) was sent nothing, so the request may go to
        // another region.
        let tls = match tokio::time::timeout(
            self.connect_timeout,
            connector.connect(name.clone(), stream),
        )
        .await
        {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => return Err(failed(std::io::ErrorKind::TimedOut.into())),
        };
        Self::handshake(tls).await
    }

    async fn handshake<S>(stream: S) -> Result<http1::SendRequest<Body>, UpstreamError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static,
    {
        let (sender, conn) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(UpstreamError::Http)?;
        // The connection's own task, on this worker's runtime; it ends when the
        // connection closes or its last sender is dropped.
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(sender)
    }
}

/// A region's answer body that gives its connection back to the pool when dropped
/// after being read to the end (an answer dropped before that closes its connection,
/// as the rest of it would still be on the way).
struct PooledBody {
    inner: Incoming,
    finished: bool,
    pool: Option<(Arc<Upstream>, usize, http1::SendRequest<Body>)>,
}

impl hyper::body::Body for PooledBody {
    type Data = hyper::body::Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => self.finished = true,
            Poll::Ready(Some(Err(_))) => self.pool = None,
            _ => {}
        }
        polled.map_err(BoxError::from)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if !(self.finished || self.inner.is_end_stream()) {
            return;
        }
        let Some((pool, region, mut sender)) = self.pool.take() else {
            return;
        };
        if sender.is_ready() {
            pool.checkin(region, sender);
        } else if let (false, Ok(runtime)) =
            (sender.is_closed(), tokio::runtime::Handle::try_current())
        {
            // The connection's task has not yet seen the end of this answer (it runs
            // next): hand the connection back once it is ready for another request.
            runtime.spawn(async move {
                if sender.ready().await.is_ok() {
                    pool.checkin(region, sender);
                }
            });
        }
    }
}

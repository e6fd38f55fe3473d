//! The public listener: accepts TCP (and TLS) connections, serves HTTP/1.1 and HTTP/2
//! on each, dispatches to the gateway's own endpoints or the proxy, and drains
//! connections gracefully on shutdown.
//!
//! Thread per core, as nginx's workers: each worker thread runs its own single-threaded
//! runtime with its own `SO_REUSEPORT` listener and its own upstream pool, so a request
//! never hops between threads (work stealing and cross-thread wake-ups showed in
//! profiles). Routing state, metrics and the failover controller are shared.

use crate::error::GatewayError;
use crate::proxy::{upstream_client, Body, UpstreamClient};
use crate::{admin, proxy, Shared};
use hyper::body::Incoming;
use hyper::http::{Request, Response};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);

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
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
    shutdown: impl Future<Output = ()>,
) {
    let client = Arc::new(upstream_client(shared.config.connect_timeout));
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // hyper answers 431 itself when the request head does not fit its buffer.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_buf_size(shared.config.max_header_bytes.max(8192) + 1024);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(shared.config.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            },
            _ = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let client = client.clone();
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let is_tls = tls.is_some();
            let service = service_fn(move |req| {
                let shared = shared.clone();
                let client = client.clone();
                async move { Ok::<_, Infallible>(dispatch(&shared, &client, req, peer, is_tls).await) }
            });
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    let stream =
                        match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream))
                            .await
                        {
                            Ok(Ok(s)) => s,
                            Ok(Err(e)) => {
                                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(%peer, "TLS handshake timed out");
                                return;
                            }
                        };
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    let grace = shared.config.shutdown_grace;
    tracing::info!(
        connections = graceful.count(),
        "shutting down; draining connections"
    );
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            ?grace,
            "connections still open after the grace period; closing"
        );
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
    if path == "/metrics" || path.starts_with("/gateway/") {
        admin::handle(shared, req, peer).await
    } else if path == "/admin" || path.starts_with("/admin/") {
        // The nodes' admin API is never reachable through the public endpoint.
        GatewayError::NotFound.to_response()
    } else {
        proxy::forward(shared, client, req, peer, tls).await
    }
}

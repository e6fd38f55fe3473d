//! Client connections: how many are open, how long one may take to send a request
//! head, and how one ends after an answer the client was not reading yet.
//!
//! - At most `NODE_HTTP_MAX_CONNECTIONS` connections are served at once; further ones
//!   wait in the kernel's listen backlog until a slot frees.
//! - A connection that has not sent a complete request head within the header timeout
//!   (after it opened, or after its last answer) is closed: a slowloris client, or an
//!   idle one, cannot keep a slot (hyper's `header_read_timeout`).
//! - Lingering close, as nginx does it: when hyper ends a connection because a request
//!   body was left unread (a 413 for a body over the limit, a 408), the node shuts down
//!   its sending side and reads and discards what the client still sends, bounded in
//!   time and bytes, before closing. Closing at once would make the kernel answer the
//!   client's next bytes with a reset, which destroys the answer before the client has
//!   read it.

use axum::extract::ConnectInfo;
use axum::Router;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
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
}

/// Serves `router` on `listener` until `stop` turns true, then stops accepting, lets
/// each connection finish its request in flight, and returns when all have closed.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
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
        tokio::spawn(async move {
            serve_connection(stream, peer, router, limits, stop).await;
            drop(slot);
        });
    }
    // Every connection gives its slot back when it ends.
    let _ = slots
        .acquire_many(limits.max_connections as u32)
        .await
        .map(|all| all.forget());
}

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    router: Router,
    limits: Limits,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        // What `into_make_service_with_connect_info` would add: admin checks loopback.
        req.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(req)
    });
    let mut conn = http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        .serve_connection(TokioIo::new(stream), service);
    let mut stopping = false;
    let done = loop {
        tokio::select! {
            done = std::future::poll_fn(|cx| conn.poll_without_shutdown(cx)) => break done,
            _ = stopped(&mut stop), if !stopping => {
                stopping = true;
                std::pin::Pin::new(&mut conn).graceful_shutdown();
            }
        }
    };
    match done {
        Ok(()) => {
            let parts = conn.into_parts();
            linger(parts.io.into_inner()).await;
        }
        // A header timeout, a malformed request, a client that vanished: just close.
        Err(e) => tracing::debug!(%peer, error = %e, "connection ended"),
    }
}

/// Half-closes and reads until the client closes too, within the bounds above. A client
/// that had finished sending sees the end at once, so this costs nothing then.
async fn linger(mut stream: TcpStream) {
    if stream.shutdown().await.is_err() {
        return;
    }
    let until = tokio::time::Instant::now() + LINGER_TIME;
    let mut left = LINGER_BYTES;
    let mut buf = vec![0u8; 64 * 1024];
    while left > 0 {
        let pause = LINGER_PAUSE.min(until.saturating_duration_since(tokio::time::Instant::now()));
        match tokio::time::timeout(pause, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => left = left.saturating_sub(n as u64),
            _ => return,
        }
    }
}

/// Completes once `stop` turns true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    // The guard `wait_for` returns must not live across an await (it is not `Send`).
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

//! The HTTP/1.1 listener behind the test receivers ([`crate::otlp`],
//! [`crate::webhook_receiver`]): a free loopback port, every connection served by one
//! handler over the receiver's shared state, stopped when dropped.

use std::future::Future;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// A running listener; its accept loop is aborted on drop.
pub struct Listener {
    port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Listener {
    /// Binds `127.0.0.1:0` (panics naming `what` when it cannot) and answers every
    /// request with `handle(request, state)`.
    pub async fn start<S, H, Fut>(what: &str, state: Arc<S>, handle: H) -> Listener
    where
        S: Send + Sync + 'static,
        H: Fn(Request<Incoming>, Arc<S>) -> Fut + Copy + Send + Sync + 'static,
        Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap_or_else(|e| panic!("bind the {what}: {e}"));
        let port = listener.local_addr().expect("local address").port();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let state = state.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { Ok::<_, std::convert::Infallible>(handle(req, state).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Listener { port, task }
    }

    pub fn port(&self) -> u16 {
        self.port
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.task.abort();
    }
}

//! Builds the application (listener, connections, shared state) and runs its tasks
//! until the shutdown future resolves.
//!
//! Tasks: the role gate, stream discovery, the copier, the group sync, the lag gauges
//! and the HTTP server. Each copying task waits on the gate, so a role change stops all
//! of them within one poll interval.

use crate::config::Config;
use crate::link::{Link, Side};
use crate::status::Shared;
use crate::{groups, http, lag, replication, roles};
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("invalid Redis URL: {0}")]
    Url(#[from] redis::RedisError),
    #[error("Redis client: {0}")]
    Redis(String),
}

impl BuildError {
    /// A taken listen address may free up; a Redis URL that does not parse will not.
    pub fn failure(&self) -> telemetry::exit::StartFailure {
        match self {
            BuildError::Listen { .. } => telemetry::exit::StartFailure::Unavailable,
            BuildError::Url(_) | BuildError::Redis(_) => {
                telemetry::exit::StartFailure::BadConfiguration
            }
        }
    }
}

pub struct Application {
    listener: TcpListener,
    shared: Arc<Shared>,
    shutdown_tx: watch::Sender<bool>,
}

impl Application {
    /// Binds the HTTP listener. Nothing connects to Redis yet: a peer that is down at
    /// start is normal and is retried by the tasks.
    pub async fn build(config: Config) -> Result<Application, BuildError> {
        let addr = config.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| BuildError::Listen { addr, source })?;
        // Fail on bad URLs before anything runs.
        for url in [&config.local_redis_url, &config.peer_redis_url] {
            internal_tls::redis_client(url, config.redis_ca()).map_err(BuildError::Redis)?;
        }
        let (shutdown_tx, shutdown_rx) = watch::channel(false);
        let shared = Arc::new(Shared::new(config, shutdown_rx));
        Ok(Application {
            listener,
            shared,
            shutdown_tx,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    pub fn shared(&self) -> Arc<Shared> {
        self.shared.clone()
    }

    /// Runs until `shutdown` resolves, then stops every task.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let c = &self.shared.config;
        let link = |side, url: &str| -> std::io::Result<Arc<Link>> {
            Link::new(
                side,
                url,
                c.redis_ca(),
                c.connect_timeout(),
                c.response_timeout(),
            )
            .map(Arc::new)
            .map_err(|e| std::io::Error::other(e.to_string()))
        };
        // Separate connections per task: the copier's blocking XREAD must not delay the
        // gate's role reads, and a slow group sync must not delay the copier.
        let local = link(Side::Local, &c.local_redis_url)?;
        let peer = link(Side::Peer, &c.peer_redis_url)?;
        let copier_local = link(Side::Local, &c.local_redis_url)?;
        let groups_local = link(Side::Local, &c.local_redis_url)?;
        let groups_peer = link(Side::Peer, &c.peer_redis_url)?;
        let lag_local = link(Side::Local, &c.local_redis_url)?;
        let lag_peer = link(Side::Peer, &c.peer_redis_url)?;
        tracing::info!(
            local = %c.local_region, peer = %c.peer_region, listen = %self.listener.local_addr()?,
            "replicator started"
        );

        let s = &self.shared;
        let tasks = vec![
            tokio::spawn(roles::run(s.clone(), local, peer.clone())),
            tokio::spawn(replication::discover(s.clone(), peer)),
            tokio::spawn(replication::run(s.clone(), copier_local)),
            tokio::spawn(groups::run(s.clone(), groups_local, groups_peer)),
            tokio::spawn(lag::run(s.clone(), lag_local, lag_peer)),
        ];
        let mut stop = self.shared.shutdown_signal();
        let server = axum::serve(self.listener, http::router(self.shared.clone()))
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            });
        let server = tokio::spawn(async move { server.await });

        shutdown.await;
        tracing::info!("shutting down");
        let _ = self.shutdown_tx.send(true);
        for t in tasks {
            let _ = t.await;
        }
        let _ = server.await;
        tracing::info!("stopped");
        Ok(())
    }
}

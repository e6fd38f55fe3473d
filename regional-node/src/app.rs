//! Wiring: builds the node from its configuration and runs it until told to stop.

use crate::api::{self, AppState};
use crate::bus::{self, BusConfig};
use crate::config::{Config, Durability};
use crate::connections;
use crate::durability::{self, Standby};
use crate::metrics::Metrics;
use crate::projector;
use crate::roles::Roles;
use crate::sagas;
use crate::store::{Store, StoreError};
use crate::workflow::Workflow;
use eventlog::Role;
use orders_model::pii::KeyRing;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Longest wait for the peer region's Redis.
const PEER_TIMEOUT: Duration = Duration::from_millis(200);

pub struct Application {
    listener: TcpListener,
    /// Set: the listener speaks HTTPS only (NODE_TLS_CERT/KEY).
    tls: Option<internal_tls::TlsAcceptor>,
    state: AppState,
    config: Arc<Config>,
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {0}: {1}")]
    Listen(SocketAddr, std::io::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Tls(#[from] internal_tls::TlsError),
}

impl StartError {
    /// A taken listen address may free up; a Redis URL that does not parse will not.
    pub fn failure(&self) -> telemetry::exit::StartFailure {
        match self {
            StartError::Listen(..) => telemetry::exit::StartFailure::Unavailable,
            StartError::Store(_) | StartError::Tls(_) => {
                telemetry::exit::StartFailure::BadConfiguration
            }
        }
    }
}

impl Application {
    /// Binds the listener (port 0 picks a free one, see [`Application::port`]).
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let tls = config.tls_server()?;
        let listener = TcpListener::bind(config.listen)
            .await
            .map_err(|e| StartError::Listen(config.listen, e))?;
        let store = Store::connect(&config.redis_url, config.redis_ca(), config.redis_timeout())?;
        // The peer is read for fencing and rejoin decisions, which must not wait long
        // on a region that may be dead or hung: a short timeout.
        let peer = config
            .peer_redis_url
            .as_deref()
            .map(|url| Store::connect(url, config.redis_ca(), PEER_TIMEOUT))
            .transpose()?;
        let roles = Roles::new(store.clone(), peer.clone());
        let consumer = format!(
            "{}-{}-{}",
            config.region,
            std::process::id(),
            &uuid::Uuid::new_v4().simple().to_string()[..6]
        );
        let pii = config.pii_keys.clone().unwrap_or_else(|| {
            tracing::warn!(
                "NODE_PII_KEYS is not set: payment tokens and shipping addresses are sealed with the public development key, which keeps nothing secret; set the same key ring in both regions"
            );
            KeyRing::development()
        });
        tracing::info!(kids = ?pii.kids().collect::<Vec<_>>(), "personal data key ring");
        let metrics = Metrics::new();
        let wf = Workflow {
            pii: Arc::new(pii),
            store,
            roles,
            projection: projector::ProjectionHealth::new(metrics.projection_halted.clone()),
            metrics,
            region: config.region.to_string(),
            consumer,
        };
        let config = Arc::new(config);
        // `replicated` durability asks the standby whether it holds an order's event on a
        // connection of its own: the short-timeout one above is the role watcher's, and a
        // slow answer on a loaded machine is not a missing entry.
        let standby_reads = match (&config.durability, &config.peer_redis_url) {
            (Durability::Replicated, Some(url)) => Some(Store::connect(
                url,
                config.redis_ca(),
                durability::peer_timeout(PEER_TIMEOUT),
            )?),
            _ => None,
        };
        let standby = Arc::new(Standby::new(
            wf.metrics.durability_degraded.clone(),
            standby_reads,
        ));
        let state = AppState {
            wf,
            config: config.clone(),
            peer,
            jobs: Arc::default(),
            standby,
        };
        Ok(Application {
            listener,
            tls,
            state,
            config,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Serves until `shutdown` resolves, then stops reading new entries, lets the
    /// in-flight handlers finish (up to the grace period) and returns.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Application {
            listener,
            tls,
            state,
            config,
        } = self;
        let wf = state.wf.clone();
        let (stop_tx, stop_rx) = watch::channel(false);

        seed_role(&wf.roles, config.role, config.region.as_str()).await;
        let mut background = tokio::task::JoinSet::new();
        background.spawn(wf.roles.clone().watch(stop_rx.clone()));
        background.spawn(refresh_gauges(wf.clone(), stop_rx.clone()));
        let blocking = Store::connect(
            &config.redis_url,
            config.redis_ca(),
            config.redis_timeout() + Duration::from_millis(600),
        )
        .expect("the URL was accepted above");
        background.spawn(projector::run_standby(
            wf.store.clone(),
            blocking,
            wf.roles.clone(),
            wf.projection.clone(),
            stop_rx.clone(),
        ));
        let bus_config = BusConfig {
            consumer: wf.consumer.clone(),
            workers: config.handler_concurrency,
            retry_base: Duration::from_millis(config.retry_base_ms),
            reclaim_idle: Duration::from_millis(config.reclaim_idle_ms),
            redis_url: config.redis_url.clone(),
            redis_ca: config.redis_ca.clone(),
            redis_timeout: config.redis_timeout(),
        };
        if config.durability == Durability::Replicated {
            if let Some(url) = &config.peer_redis_url {
                let peer = Store::connect(
                    url,
                    config.redis_ca(),
                    durability::peer_timeout(PEER_TIMEOUT),
                )
                .expect("the URL was accepted above");
                background.spawn(durability::watch_standby(
                    state.standby.clone(),
                    wf.store.clone(),
                    peer,
                    wf.roles.clone(),
                    stop_rx.clone(),
                ));
            }
        }
        let mut handlers = bus::start(wf.clone(), bus_config, stop_rx.clone());
        // The webhook deliveries' blocking reads get their own connection too.
        let webhook_reads = Store::connect(
            &config.redis_url,
            config.redis_ca(),
            config.redis_timeout() + Duration::from_millis(crate::webhooks::BLOCK_MS),
        )
        .expect("the URL was accepted above");
        background.spawn(crate::webhooks::run(
            wf.clone(),
            config.webhook_settings(),
            webhook_reads,
            stop_rx.clone(),
        ));
        if let Some(timeout) = config.saga_timeout() {
            background.spawn(sagas::run(wf.clone(), timeout, stop_rx.clone()));
        }

        tracing::info!(
            region = %config.region, listen = %listener.local_addr()?, consumer = %wf.consumer,
            durability = ?config.durability, https = tls.is_some(),
            client_certificates = config.tls_client_ca.is_some(), "regional node started"
        );
        let app = api::router(state);
        let limits = connections::Limits {
            max_connections: config.http_max_connections,
            header_timeout: Duration::from_millis(config.http_header_timeout_ms),
            idle_timeout: Duration::from_millis(config.http_idle_timeout_ms),
        };
        let (http_stop_tx, http_stop_rx) = watch::channel(false);
        let server = tokio::spawn(connections::serve(
            listener,
            tls,
            app,
            limits,
            wf.metrics.clone(),
            http_stop_rx,
        ));

        shutdown.await;
        tracing::info!("shutting down: no new entries are read; finishing in-flight work");
        let _ = stop_tx.send(true);
        let _ = http_stop_tx.send(true);
        let grace = Duration::from_millis(config.shutdown_grace_ms);
        let drained = tokio::time::timeout(grace, async {
            while handlers.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            tracing::warn!(?grace, "in-flight handlers did not finish in time; their entries stay pending for another node");
            handlers.abort_all();
        }
        let _ = tokio::time::timeout(grace, server).await;
        background.abort_all();
        tracing::info!("stopped");
        Ok(())
    }
}

/// Seeds the role from configuration, retrying while Redis is not there yet.
async fn seed_role(roles: &Roles, role: Role, region: &str) {
    for attempt in 0u64.. {
        match roles.seed(role, region).await {
            Ok(()) => {
                roles.refresh().await;
                return;
            }
            Err(e) => {
                if attempt % 20 == 0 {
                    tracing::warn!(error = %e, "cannot reach Redis to read the role yet; retrying");
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
        if attempt > 8 {
            // Keep starting: readiness reports 503 until the watcher reads a role, and
            // the seed is retried in the background.
            let roles = roles.clone();
            let region = region.to_string();
            tokio::spawn(async move {
                while roles.seed(role, &region).await.is_err() {
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            });
            return;
        }
    }
}

async fn refresh_gauges(wf: Workflow, mut stop: watch::Receiver<bool>) {
    // Every series exists from the start, so dashboards and alerts see zeros, not gaps.
    for group in bus::Group::ALL {
        wf.metrics
            .consumer_lag
            .with_label_values(&[group.name()])
            .set(0.0);
        wf.metrics
            .dead_letters
            .with_label_values(&[group.name()])
            .set(0.0);
    }
    for status in orders_model::Status::ALL {
        wf.metrics
            .orders
            .with_label_values(&[status.as_str()])
            .set(0.0);
    }
    loop {
        let role = wf.roles.current();
        for r in [Role::Active, Role::Standby] {
            wf.metrics
                .role
                .with_label_values(&[r.as_str()])
                .set(if role.known && role.role == r {
                    1.0
                } else {
                    0.0
                });
        }
        wf.metrics.epoch.set(role.epoch as i64);
        wf.metrics.fenced.set(i64::from(role.known && role.fenced));
        let ok = bus::refresh_gauges(&wf).await.is_ok();
        wf.metrics.redis_up.set(if ok { 1.0 } else { 0.0 });
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Resolves on SIGTERM or Ctrl-C.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}

//! The Tandem gateway: the one endpoint clients use. It health-checks the regions,
//! routes requests to them, retries when that is safe, and decides which region is
//! active (DESIGN.md section 5).
//!
//! # Layout
//! - [`config`]: typed configuration (defaults, TOML file, `GATEWAY_*` variables).
//! - [`server`]: the listener, TLS handshakes, HTTP/1.1 and HTTP/2, graceful shutdown.
//! - [`connections`]: connection caps, idle and slow-header timeouts, lingering close.
//! - [`proxy`]: forwarding a request: header hygiene, retries, the request's deadline.
//! - [`upstream`]: each worker's pooled HTTP/1.1 connections to the regions.
//! - [`slow_attempts`]: each worker's watch over upstream attempts slow to answer.
//! - [`workers`]: spreading client connections evenly over the worker threads.
//! - [`routing`]: the region table; which region gets a read or a write.
//! - [`health`]: active probes with rise/fall thresholds.
//! - [`failover`]: epochs, leases, promotion after the lease lapses, planned switchover.
//! - [`election`]: with several gateways, which one controls failover, and the epoch
//!   counter, both in etcd.
//! - [`etcd`]: the small etcd v3 client (JSON gateway) that election uses.
//! - [`node_api`]: the regional node's health and admin endpoints as the gateway calls them.
//! - [`auth`]: the OAuth2 resource server: bearer JWTs checked, the caller's `sub` and scopes.
//! - [`jwks`]: the signing keys tokens are checked against, loaded, cached and rotated.
//! - [`access`]: the scope each route needs; customers reach only their own orders.
//! - [`limits`]: per-client rate limit, header and body sizes, the retry budget.
//! - [`admin`]: `/gateway/*` endpoints, `/metrics` and `/openapi.json`.
//! - [`openapi`]: the OpenAPI document: the node's public paths plus the gateway's own.
//! - [`metrics`]: Prometheus metrics and route templates.
//! - [`tls`]: rustls server configuration from PEM files.
//! - [`error`]: the gateway's own error answers and their stable codes.

#![forbid(unsafe_code)]

pub mod access;
pub mod admin;
pub mod auth;
pub mod body;
pub mod config;
pub mod connections;
pub mod election;
pub mod error;
pub mod etcd;
pub mod failover;
pub mod health;
pub mod jwks;
pub mod limits;
pub mod metrics;
pub mod node_api;
pub mod openapi;
pub mod proxy;
pub mod routing;
pub mod server;
pub mod slow_attempts;
pub mod tls;
pub mod upstream;
pub mod workers;

use auth::Authenticator;
use config::Config;
use election::Election;
use failover::{Authority, Controller, EpochStore};
use limits::RateLimiter;
use limits::RetryBudget;
use metrics::Metrics;
use node_api::NodeApi;
use routing::Routing;
use std::future::Future;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

/// What every request handler and background task shares.
pub struct Shared {
    pub config: Arc<Config>,
    pub routing: Arc<Routing>,
    pub controller: Arc<Controller>,
    pub metrics: Arc<Metrics>,
    /// Shared by all workers: retries are budgeted against all requests in flight.
    pub retry_budget: RetryBudget,
    pub limiter: RateLimiter,
    pub node_api: NodeApi,
    /// The TLS client for `https://` regions (GATEWAY_NODE_CA), shared by every
    /// worker's pool.
    pub node_tls: Option<Arc<tokio_rustls::rustls::ClientConfig>>,
    /// `None`: auth is off (no JWKS configured) and every public route is open.
    pub auth: Option<Authenticator>,
    /// The connection caps, across all workers.
    pub connections: Arc<connections::Connections>,
    /// With etcd: the election this gateway takes part in.
    pub election: Option<Arc<Election>>,
}

/// Why the gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("GATEWAY_STATE_DIR: {0}")]
    State(std::io::Error),
    #[error(transparent)]
    Jwks(#[from] jwks::JwksError),
    #[error("GATEWAY_ETCD_ENDPOINTS: {0}")]
    Etcd(etcd::EtcdError),
}

impl StartError {
    /// A taken listen address may free up; everything else is the configuration.
    pub fn failure(&self) -> telemetry::exit::StartFailure {
        match self {
            StartError::Bind { .. } => telemetry::exit::StartFailure::Unavailable,
            _ => telemetry::exit::StartFailure::BadConfiguration,
        }
    }
}

/// A bound, not yet running gateway.
pub struct Application {
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<TlsAcceptor>,
}

impl Application {
    /// Binds the listener and loads TLS and the persisted epoch; nothing runs yet.
    pub async fn build(config: Config) -> Result<Application, StartError> {
        let config = Arc::new(config);
        let tls = match &config.tls {
            Some((cert, key)) => Some(tls::acceptor(cert, key)?),
            None => None,
        };
        let election = match &config.etcd {
            Some(etcd) => Some(Arc::new(
                Election::new(&config.id, config.lease_margin, etcd).map_err(StartError::Etcd)?,
            )),
            None => None,
        };
        let authority = match &election {
            Some(e) => Authority::Etcd(e.clone()),
            None => Authority::Local(
                EpochStore::open(config.state_dir.as_deref()).map_err(StartError::State)?,
            ),
        };
        let listener = server::bind_first(config.listen).map_err(|source| StartError::Bind {
            addr: config.listen,
            source,
        })?;
        let ids: Vec<String> = config.regions.iter().map(|r| r.id.clone()).collect();
        let metrics = Arc::new(Metrics::new(&ids));
        // Every refusal reason shows as 0 from the start, so a dashboard's rate() has a
        // series before the first refusal. Here, not in `metrics`, which auth records into.
        for failure in auth::Failure::ALL {
            metrics.auth_failures.with_label_values(&[failure.reason()]);
        }
        let routing = Arc::new(Routing::new(&config, metrics.clone()));
        let node_tls = match &config.node_tls {
            Some(t) => {
                if !config.regions.iter().any(|r| r.tls) {
                    tracing::warn!(
                        "GATEWAY_NODE_CA is set but no region is given as https://: the nodes are reached in plain text"
                    );
                }
                Some(tls::node_client(t)?)
            }
            None => None,
        };
        let node_api = NodeApi::new(
            config.node_token.clone(),
            config.connect_timeout,
            &config.id,
            node_tls.as_ref(),
        );
        let auth = match &config.auth {
            Some(cfg) => {
                let ring = jwks::KeyRing::load(cfg, metrics.clone()).await?;
                Some(Authenticator::new(Arc::new(ring)))
            }
            None => {
                tracing::warn!(
                    "auth is off (GATEWAY_AUTH_JWKS unset): every public route is open to anyone; \
                     set GATEWAY_AUTH_JWKS, GATEWAY_AUTH_ISSUER and GATEWAY_AUTH_AUDIENCE in production"
                );
                None
            }
        };
        let controller = Arc::new(Controller::new(
            config.clone(),
            routing.clone(),
            node_api.clone(),
            authority,
            metrics.clone(),
        ));
        let connections = Arc::new(connections::Connections::new(
            config.connections.clone(),
            metrics.clone(),
        ));
        let shared = Arc::new(Shared {
            retry_budget: RetryBudget::new(
                config.retry_budget_percent,
                config.retry_min_concurrent,
            ),
            limiter: RateLimiter::new(config.rate_limit_per_sec, config.rate_limit_burst),
            config,
            routing,
            controller,
            metrics,
            node_api,
            node_tls,
            auth,
            connections,
            election,
        });
        Ok(Application {
            listener,
            shared,
            tls,
        })
    }

    /// The port actually bound (useful with port 0).
    pub fn port(&self) -> u16 {
        self.listener.local_addr().map(|a| a.port()).unwrap_or(0)
    }

    /// Starts the probers and the failover controller, then serves until `shutdown`:
    /// this runtime is worker 0; `config.workers - 1` more threads each run their own.
    pub async fn run_until_stopped(self, shutdown: impl Future<Output = ()> + Send + 'static) {
        let shared = self.shared;
        let mut tasks = Vec::new();
        for i in 0..shared.routing.regions().len() {
            tasks.push(tokio::spawn(health::probe_loop(shared.clone(), i)));
        }
        if let Some(election) = &shared.election {
            tasks.push(tokio::spawn(election.clone().run()));
        }
        tasks.push(tokio::spawn(shared.controller.clone().run()));
        if let Some(auth) = &shared.auth {
            tasks.push(tokio::spawn(auth.key_ring().clone().run()));
        }
        let addr = self.listener.local_addr().unwrap_or(shared.config.listen);
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let mut threads = Vec::new();
        // On a work-stealing runtime (GATEWAY_BENCH_RUNTIME) its own threads are the
        // workers: one listener, connections spread by the runtime.
        let own_threads = tokio::runtime::Handle::current().runtime_flavor()
            == tokio::runtime::RuntimeFlavor::CurrentThread;
        let extra_workers = if own_threads {
            shared.config.workers
        } else {
            1
        };
        let mut workers = workers::Workers::ends(extra_workers, &shared.metrics).into_iter();
        let first = workers.next().expect("one worker at least");
        for (n, worker) in (1..extra_workers).zip(workers) {
            let listener = match server::bind_shared(addr).and_then(|l| l.into_std()) {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot add worker {n}; serving with fewer");
                    break;
                }
            };
            let (shared, tls, mut stop) = (shared.clone(), self.tls.clone(), stop_rx.clone());
            let thread = std::thread::Builder::new()
                .name(format!("gateway-worker-{n}"))
                .spawn(move || {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("worker runtime");
                    rt.block_on(async move {
                        let listener = TcpListener::from_std(listener).expect("worker listener");
                        let stopped = async move {
                            let _ = stop.wait_for(|s| *s).await;
                        };
                        server::serve(listener, worker, shared, tls, stopped).await;
                    });
                });
            match thread {
                Ok(t) => threads.push(t),
                Err(e) => tracing::warn!(error = %e, "cannot start worker {n}"),
            }
        }
        tracing::info!(
            listen = %addr,
            tls = self.tls.is_some(),
            regions = shared.config.regions.len(),
            workers = if own_threads { threads.len() + 1 } else { shared.config.workers },
            work_stealing = !own_threads,
            id = %shared.config.id,
            etcd = shared.config.etcd.is_some(),
            "gateway listening"
        );
        let controller = shared.controller.clone();
        let stopper = tokio::spawn(async move {
            shutdown.await;
            // Hand failover control over first (with etcd), while requests are served.
            controller.resign().await;
            let _ = stop_tx.send(true);
        });
        let mut stop = stop_rx;
        let stopped = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        server::serve(self.listener, first, shared.clone(), self.tls, stopped).await;
        let _ = stopper.await;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
        tracing::info!("gateway stopped");
        for t in tasks {
            t.abort();
        }
    }
}

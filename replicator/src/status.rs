//! What the tasks share: the role gate, the discovered streams, how far each stream has
//! been copied, reachability of both Redis servers, and the shutdown signal.

use crate::config::Config;
use crate::gate::Gate;
use crate::link::{LinkError, Side};
use crate::metrics::Metrics;
use eventlog::envelope::StreamId;
use eventlog::RoleRecord;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;
use tokio::sync::watch;

pub struct Shared {
    pub config: Config,
    pub metrics: Metrics,
    /// Decided by the gate task every poll interval; every copying task obeys it.
    pub gate: watch::Sender<Gate>,
    /// Streams found on the peer (sorted, without the quarantine stream).
    pub streams: watch::Sender<Vec<String>>,
    /// The local top id of each stream as last written by the copier. The group task
    /// waits on it so it only ever sets positions to ids that exist locally.
    pub copied: watch::Sender<BTreeMap<String, StreamId>>,
    pub health: Mutex<Health>,
    /// Held by the copier while it writes a batch and by a rejoin while it rewrites the
    /// local streams, so the two never interleave.
    pub write_lock: tokio::sync::Mutex<()>,
    /// The copier's TLS client for `rediss://` URLs (REPLICATOR_REDIS_CA).
    pub redis_tls: Option<internal_tls::TlsConnector>,
    shutdown: watch::Receiver<bool>,
}

#[derive(Debug, Clone, Default)]
pub struct Health {
    pub local_error: Option<String>,
    pub peer_error: Option<String>,
    /// `None` until the first successful read; the node may not have set one yet.
    pub local_role: Option<RoleRecord>,
    pub peer_role: Option<RoleRecord>,
    /// Why the gate is idle, or the last rejoin problem.
    pub reason: Option<String>,
    pub checked: bool,
}

impl Shared {
    pub fn new(config: Config, shutdown: watch::Receiver<bool>) -> Shared {
        let redis_tls = config
            .redis_tls()
            .expect("REPLICATOR_REDIS_CA was checked when the configuration was loaded");
        Shared {
            redis_tls,
            config,
            metrics: Metrics::new(),
            gate: watch::Sender::new(Gate::Idle {
                reason: "starting".into(),
            }),
            streams: watch::Sender::new(Vec::new()),
            copied: watch::Sender::new(BTreeMap::new()),
            health: Mutex::new(Health::default()),
            write_lock: tokio::sync::Mutex::new(()),
            shutdown,
        }
    }

    pub fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn is_shutting_down(&self) -> bool {
        *self.shutdown.borrow()
    }

    /// Sleeps for `d` or until shutdown; returns false on shutdown.
    pub async fn sleep(&self, d: Duration) -> bool {
        let mut rx = self.shutdown.clone();
        if *rx.borrow() {
            return false;
        }
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = rx.wait_for(|s| *s) => false,
        }
    }

    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.clone()
    }

    /// Records a successful command to one side.
    pub fn reached(&self, side: Side) {
        self.metrics
            .redis_up
            .with_label_values(&[side.as_str()])
            .set(1);
        if side == Side::Peer {
            self.metrics.peer_up.set(1);
        }
        let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
        match side {
            Side::Local => h.local_error = None,
            Side::Peer => h.peer_error = None,
        }
    }

    /// Records a failure; connection problems mark the side as down for readiness.
    pub fn failed(&self, task: &str, err: &LinkError) {
        let side = match err {
            LinkError::Unreachable { side, .. }
            | LinkError::Command { side, .. }
            | LinkError::Server { side, .. }
            | LinkError::Reply { side, .. } => *side,
            LinkError::Other(_) => "local",
        };
        self.metrics
            .redis_errors
            .with_label_values(&[side, task])
            .inc();
        if err.is_unreachable() {
            self.metrics.redis_up.with_label_values(&[side]).set(0);
            if side == "peer" {
                self.metrics.peer_up.set(0);
            }
            let mut h = self.health.lock().unwrap_or_else(|e| e.into_inner());
            let msg = Some(err.to_string());
            if side == "peer" {
                h.peer_error = msg;
            } else {
                h.local_error = msg;
            }
        }
    }
}

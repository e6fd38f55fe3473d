//! `replicated` durability (DESIGN.md 4): an order is acknowledged only once the
//! standby's Redis holds its first event, so a failover loses no acknowledged order.
//!
//! The standby is watched by one task, not per request: it follows the standby's top
//! entry id (a blocking read wakes it as replicated entries land) and every waiting
//! request is woken from that one view. When the standby is known to be unreachable, or
//! a wait ran out, the node is *degraded*: from then on requests do not wait at all
//! (`NODE_REPLICATED_FALLBACK`: acknowledge locally and say so, or refuse at once) until
//! the standby is back and has caught up with what this region held when it returned.
//! A region whose standby died in the failover that made it active so keeps taking
//! orders at full speed instead of waiting out a timeout on every one of them.

use crate::roles::Roles;
use crate::store::Store;
use eventlog::envelope::StreamId;
use eventlog::keys;
use serde::Deserialize;
use std::time::Duration;
use tokio::sync::watch;

/// What `replicated` durability does while the standby is known to be unreachable or
/// behind (`NODE_REPLICATED_FALLBACK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fallback {
    /// Acknowledge after the local write, with `Tandem-Durability: local`.
    Async,
    /// Answer 503 `replication_unavailable` at once; nothing is written.
    Refuse,
}

/// How long the standby's blocking read waits for new entries before looking again.
const BLOCK: Duration = Duration::from_millis(100);

/// The standby as this node sees it.
pub struct Standby {
    /// The highest entry id of the event stream the standby holds, as last read.
    top: watch::Sender<StreamId>,
    /// True while the standby is known to be unreachable or behind.
    degraded: watch::Sender<bool>,
    gauge: prometheus::IntGauge,
    /// The standby's Redis, asked for single entries ([`Standby::holds`]).
    reads: Option<Store>,
}

/// How a wait for the standby ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// The standby holds the entry.
    Held,
    /// The standby cannot confirm it (known down, or the wait ran out).
    Degraded,
}

impl Standby {
    pub fn new(gauge: prometheus::IntGauge, reads: Option<Store>) -> Standby {
        Standby {
            top: watch::Sender::new(StreamId::ZERO),
            degraded: watch::Sender::new(false),
            gauge,
            reads,
        }
    }

    /// Whether the standby's stream holds entry `id` now. Its top reaching past `id` is
    /// not proof: a peer promoted meanwhile appends its own, higher ids (chaos seed 7001,
    /// replicated: orders acknowledged as replicated by an old active that were then
    /// only in its quarantine).
    pub async fn holds(&self, id: StreamId) -> Confirmation {
        let Some(peer) = &self.reads else {
            return Confirmation::Degraded;
        };
        let id = id.to_string();
        let held: Result<Vec<(String, redis::Value)>, _> = peer
            .query(redis::cmd("XRANGE").arg(keys::EVENTS).arg(&id).arg(&id))
            .await;
        match held {
            Ok(entries) if !entries.is_empty() => Confirmation::Held,
            Ok(_) => Confirmation::Degraded,
            Err(e) => {
                tracing::debug!(error = %e, "asking the standby for an entry failed");
                Confirmation::Degraded
            }
        }
    }

    pub fn is_degraded(&self) -> bool {
        *self.degraded.borrow()
    }

    /// Waits until the standby holds entry `id`, for at most `limit`. A wait that runs
    /// out marks the standby degraded, so the next request does not wait again.
    pub async fn confirm(&self, id: StreamId, limit: Duration) -> Confirmation {
        if self.is_degraded() {
            return Confirmation::Degraded;
        }
        let mut top = self.top.subscribe();
        let mut degraded = self.degraded.subscribe();
        let wait = async {
            tokio::select! {
                _ = top.wait_for(|t| *t >= id) => Confirmation::Held,
                _ = degraded.wait_for(|d| *d) => Confirmation::Degraded,
            }
        };
        match tokio::time::timeout(limit, wait).await {
            Ok(c) => c,
            Err(_) => {
                self.set_degraded(
                    true,
                    &format!("the standby did not confirm an order within {limit:?}"),
                );
                Confirmation::Degraded
            }
        }
    }

    fn set_degraded(&self, on: bool, why: &str) {
        let changed = self
            .degraded
            .send_if_modified(|d| std::mem::replace(d, on) != on);
        self.gauge.set(i64::from(on));
        if changed {
            if on {
                tracing::warn!(
                    reason = why,
                    "replicated durability degraded: orders are not waiting for the standby"
                );
            } else {
                tracing::info!("the standby is back and caught up: replicated durability restored");
            }
        }
    }
}

/// Follows the standby while this region is active, until `stop`.
pub async fn watch_standby(
    standby: std::sync::Arc<Standby>,
    local: Store,
    peer: Store,
    roles: Roles,
    mut stop: watch::Receiver<bool>,
) {
    let mut role_rx = roles.subscribe();
    // While degraded: the local top when the standby was seen again; reaching it means
    // the standby has caught up.
    let mut target: Option<StreamId> = None;
    while !*stop.borrow() {
        if !roles.current().writable() {
            // Only an active region acknowledges orders.
            tokio::select! {
                _ = role_rx.changed() => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        // The role watcher reads the peer every 50 ms: a peer it cannot reach is down
        // for us too, with no wait of our own.
        if roles.peer_reachable() == Some(false) {
            standby.set_degraded(true, "the standby's Redis is unreachable");
            target = None;
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                _ = stop.changed() => {}
            }
            continue;
        }
        let from = *standby.top.borrow();
        let step = tokio::select! {
            r = next_top(&peer, from) => r,
            _ = stop.changed() => break,
        };
        match step {
            Ok(top) => {
                standby.top.send_if_modified(|t| {
                    let newer = top > *t;
                    if newer {
                        *t = top;
                    }
                    newer
                });
                if standby.is_degraded() {
                    match target {
                        None => target = local_top(&local).await.ok(),
                        Some(t) if top >= t => {
                            standby.set_degraded(false, "");
                            target = None;
                        }
                        Some(_) => {}
                    }
                }
            }
            Err(e) => {
                // A failed or slow read alone is not an outage (the reachability above
                // decides that; a waiter that runs out of time marks it too).
                tracing::debug!(error = %e, "reading the standby's top failed; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(50)) => {}
                    _ = stop.changed() => {}
                }
            }
        }
    }
}

/// Waits (up to [`BLOCK`]) for an entry after `from` on the standby, then reads its
/// current top.
async fn next_top(peer: &Store, from: StreamId) -> Result<StreamId, crate::store::StoreError> {
    let _: redis::Value = peer
        .query(
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(1)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(keys::EVENTS)
                .arg(from.to_string()),
        )
        .await?;
    local_top(peer).await
}

async fn local_top(store: &Store) -> Result<StreamId, crate::store::StoreError> {
    let last = store.last_id(keys::EVENTS).await?;
    Ok(StreamId::parse(&last).unwrap_or(StreamId::ZERO))
}

/// The blocking connection's timeout: the block plus a generous answer time (hangs are
/// detected by the role watcher's short reads, not here).
pub fn peer_timeout(base: Duration) -> Duration {
    base.max(Duration::from_secs(1)) + BLOCK
}

//! The role gate (DESIGN.md 3, "loop prevention is by role"): read `tandem:role` on both
//! sides and decide whether to copy, to rejoin, or to stay idle.
//!
//! Only the active region's log flows, and only into a standby that has not moved past
//! the peer's epoch. Roles themselves are never copied: each region's role is set by the
//! gateway through its own node (and by a rejoin, see [`crate::quarantine`]).

use crate::link::{Link, LinkError};
use crate::status::Shared;
use crate::{epochs, quarantine, reply};
use eventlog::roles::fields;
use eventlog::{keys, Epoch, Role, RoleRecord};
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Gate {
    /// The peer is active and the local region is its standby: copy.
    Copy {
        peer_epoch: Epoch,
    },
    /// The peer is active at a higher epoch than the local region: set aside what the
    /// local region wrote past that epoch's start, then become its standby.
    Rejoin {
        peer_epoch: Epoch,
    },
    Idle {
        reason: String,
    },
}

impl Gate {
    pub fn is_copy(&self) -> bool {
        matches!(self, Gate::Copy { .. })
    }

    pub fn name(&self) -> &'static str {
        match self {
            Gate::Copy { .. } => "copying",
            Gate::Rejoin { .. } => "rejoining",
            Gate::Idle { .. } => "idle",
        }
    }
}

/// The decision itself, free of I/O.
pub fn decide(local: Option<RoleRecord>, peer: Option<RoleRecord>) -> Gate {
    let idle = |reason: &str| Gate::Idle {
        reason: reason.to_string(),
    };
    let Some(peer) = peer else {
        return idle("peer region has no role record yet");
    };
    let Some(local) = local else {
        return idle("local region has no role record yet");
    };
    if peer.role != Role::Active {
        return idle("peer region is not active");
    }
    if peer.epoch > local.epoch {
        // Whatever the local role says, a higher epoch on an active peer wins: the local
        // region was left behind by a failover and must rejoin as its standby.
        return Gate::Rejoin {
            peer_epoch: peer.epoch,
        };
    }
    if local.role == Role::Active {
        return idle("local region is active (both active at the same epoch: not copying)");
    }
    if local.epoch > peer.epoch {
        return idle("local epoch is ahead of the peer's: the peer is stale");
    }
    Gate::Copy {
        peer_epoch: peer.epoch,
    }
}

/// A promotion of the local region that has recorded its intent (DESIGN.md 4) but not
/// yet taken effect overrides the decision: the node is about to record the new
/// epoch's start offsets, and a batch copied after that would sit past them although
/// the new epoch did not write it. An intent that the peer's epoch has reached or
/// passed lost to another promotion and is ignored.
pub fn hold_for_promotion(
    gate: Gate,
    local: Option<RoleRecord>,
    peer: Option<RoleRecord>,
    intent: Option<Epoch>,
) -> Gate {
    let (Some(intent), Some(local)) = (intent, local) else {
        return gate;
    };
    let peer_epoch = peer.map(|p| p.epoch).unwrap_or_default();
    if intent > local.epoch && intent > peer_epoch && !matches!(gate, Gate::Idle { .. }) {
        return Gate::Idle {
            reason: format!("local promotion to epoch {intent} in progress"),
        };
    }
    gate
}

/// The epoch of a promotion intent recorded in the local region, if any.
pub async fn read_intent(link: &Link) -> Result<Option<Epoch>, LinkError> {
    let v = link
        .query(redis::cmd("HGET").arg(keys::PROMOTION_INTENT).arg("epoch"))
        .await?;
    Ok(reply::int(&v).map(|e| Epoch(e.max(0) as u64)))
}

/// Reads the role hash; `None` when the region has no role yet.
pub async fn read_role(link: &Link) -> Result<Option<RoleRecord>, LinkError> {
    let mut cmd = redis::cmd("HMGET");
    cmd.arg(keys::ROLE)
        .arg(fields::ROLE)
        .arg(fields::EPOCH)
        .arg(fields::PAUSED);
    let v = link.query(&cmd).await?;
    let values: Vec<Option<String>> = reply::array(&v)
        .ok_or(LinkError::Reply {
            side: link.side().as_str(),
            what: "HMGET tandem:role",
        })?
        .iter()
        .map(|x| {
            if *x == redis::Value::Nil {
                None
            } else {
                reply::string(x)
            }
        })
        .collect();
    RoleRecord::from_hmget(&values)
        .map_err(|e| LinkError::Other(format!("{} role record: {e}", link.side().as_str())))
}

/// The gate task: every poll interval, read both roles, publish the decision, copy the
/// epoch history while copying, and run a rejoin when one is due.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>, peer: Arc<Link>) {
    let interval = Duration::from_millis(shared.config.poll_interval_ms);
    let mut backoff = crate::link::Backoff::new(shared.config.max_backoff());
    while !shared.is_shutting_down() {
        let (l, p, intent) = tokio::join!(read_role(&local), read_role(&peer), read_intent(&local));
        // Any read that fails leaves the gate idle: in particular an unreadable promotion
        // intent must not let copying go ahead, since a batch copied after a promotion
        // recorded its start offsets would sit past them although the new epoch never
        // wrote it.
        shared.metrics.peer_up.set(i64::from(p.is_ok()));
        let mut delay = interval;
        let gate = match (&l, &p, &intent) {
            (Ok(l), Ok(p), Ok(intent)) => {
                shared.reached(local.side());
                shared.reached(peer.side());
                backoff.reset();
                let mut h = shared.health.lock().unwrap_or_else(|e| e.into_inner());
                h.local_role = *l;
                h.peer_role = *p;
                h.checked = true;
                drop(h);
                for (side, r) in [("local", l), ("peer", p)] {
                    if let Some(r) = r {
                        shared
                            .metrics
                            .epoch
                            .with_label_values(&[side])
                            .set(r.epoch.0 as i64);
                    }
                }
                hold_for_promotion(decide(*l, *p), *l, *p, *intent)
            }
            _ => {
                let mut reasons = Vec::new();
                for (what, r) in [
                    ("local role", l.as_ref().err()),
                    ("peer role", p.as_ref().err()),
                    ("local promotion intent", intent.as_ref().err()),
                ] {
                    if let Some(e) = r {
                        shared.failed("gate", e);
                        reasons.push(format!("cannot read the {what}: {e}"));
                    }
                }
                if l.is_ok() && intent.is_ok() {
                    shared.reached(local.side());
                }
                if p.is_ok() {
                    shared.reached(peer.side());
                }
                delay = backoff
                    .fail()
                    .max(interval)
                    .min(shared.config.max_backoff());
                Gate::Idle {
                    reason: reasons.join("; "),
                }
            }
        };
        publish(&shared, gate.clone());
        match gate {
            Gate::Rejoin { peer_epoch } => {
                // Hold the write lock: no copier batch may land while the tail is moved.
                let _guard = shared.write_lock.lock().await;
                let result = quarantine::rejoin(&shared, &local, &peer, peer_epoch).await;
                // The local streams may have been cut back: forget what the copier had
                // reported, so the group task waits for the next session's positions
                // instead of trusting tops that no longer exist.
                shared.copied.send_modify(|c| c.clear());
                match result {
                    Ok(moved) => {
                        tracing::info!(
                            peer_epoch = peer_epoch.0,
                            quarantined = moved,
                            "rejoined as standby of the peer"
                        );
                        set_reason(&shared, None);
                        continue;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "rejoin failed; will retry");
                        set_reason(&shared, Some(format!("rejoin: {e}")));
                        delay = backoff.fail().max(interval);
                    }
                }
            }
            Gate::Copy { .. } => {
                if let Err(e) = epochs::copy(&local, &peer).await {
                    shared.failed("epochs", &e);
                    tracing::warn!(error = %e, "copying the epoch history failed");
                }
            }
            Gate::Idle { .. } => {}
        }
        if !shared.sleep(delay).await {
            break;
        }
    }
}

fn set_reason(shared: &Shared, reason: Option<String>) {
    shared
        .health
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .reason = reason;
}

fn publish(shared: &Shared, gate: Gate) {
    shared.metrics.set_state(gate.name());
    {
        let mut h = shared.health.lock().unwrap_or_else(|e| e.into_inner());
        match &gate {
            Gate::Idle { reason } => h.reason = Some(reason.clone()),
            Gate::Copy { .. } => h.reason = None,
            Gate::Rejoin { .. } => {}
        }
    }
    shared.gate.send_if_modified(|g| {
        if *g != gate {
            if g.name() != gate.name() {
                tracing::info!(from = g.name(), to = gate.name(), gate = ?gate, "role gate changed");
            } else {
                tracing::debug!(gate = ?gate, "role gate reason changed");
            }
            *g = gate;
            true
        } else {
            false
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(role: Role, epoch: u64) -> Option<RoleRecord> {
        Some(RoleRecord {
            role,
            epoch: Epoch(epoch),
            paused: false,
        })
    }

    #[test]
    fn copies_from_an_active_peer_into_a_standby() {
        assert_eq!(
            decide(rec(Role::Standby, 1), rec(Role::Active, 1)),
            Gate::Copy {
                peer_epoch: Epoch(1)
            }
        );
    }

    #[test]
    fn idles_when_roles_forbid() {
        assert!(matches!(
            decide(rec(Role::Active, 1), rec(Role::Active, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 1), rec(Role::Standby, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Active, 2), rec(Role::Standby, 1)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 3), rec(Role::Active, 2)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(None, rec(Role::Active, 2)),
            Gate::Idle { .. }
        ));
        assert!(matches!(
            decide(rec(Role::Standby, 1), None),
            Gate::Idle { .. }
        ));
    }

    #[test]
    fn a_local_promotion_in_progress_holds_copying() {
        let (l, p) = (rec(Role::Standby, 1), rec(Role::Active, 1));
        let held = hold_for_promotion(decide(l, p), l, p, Some(Epoch(2)));
        assert!(matches!(held, Gate::Idle { .. }));
        // An intent the peer's epoch has passed lost; an old one is done.
        let p3 = rec(Role::Active, 3);
        assert_eq!(
            hold_for_promotion(decide(l, p3), l, p3, Some(Epoch(2))),
            Gate::Rejoin {
                peer_epoch: Epoch(3)
            }
        );
        let l2 = rec(Role::Standby, 2);
        let p2 = rec(Role::Active, 2);
        assert_eq!(
            hold_for_promotion(decide(l2, p2), l2, p2, Some(Epoch(2))),
            Gate::Copy {
                peer_epoch: Epoch(2)
            }
        );
    }

    #[test]
    fn a_higher_active_epoch_means_rejoin() {
        assert_eq!(
            decide(rec(Role::Active, 1), rec(Role::Active, 2)),
            Gate::Rejoin {
                peer_epoch: Epoch(2)
            }
        );
        assert_eq!(
            decide(rec(Role::Standby, 1), rec(Role::Active, 2)),
            Gate::Rejoin {
                peer_epoch: Epoch(2)
            }
        );
    }
}

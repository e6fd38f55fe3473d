//! The role task: every poll interval it reads `tandem:role` on both sides and the local
//! promotion intent, publishes the [`Gate`] decision every copying task obeys, copies
//! the epoch history while copying, and runs a [`rejoin`] when one is due.

use crate::gate::{decide, follow_demoted, hold_for_promotion, peer_maybe_demoted, Gate};
use crate::link::{retry_policy, Link, LinkError};
use crate::status::Shared;
use crate::{epochs, rejoin, reply};
use eventlog::{keys, Epoch, RoleRecord};
use std::sync::Arc;
use std::time::Duration;

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
    cmd.arg(keys::ROLE).arg(&RoleRecord::FIELDS[..]);
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
    let max_backoff = shared.config.max_backoff();
    let mut backoff = retry_policy(max_backoff);
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
                backoff = retry_policy(max_backoff);
                {
                    let mut h = shared.health.lock().unwrap_or_else(|e| e.into_inner());
                    h.local_role = *l;
                    h.peer_role = *p;
                    h.checked = true;
                }
                for (side, r) in [("local", l), ("peer", p)] {
                    if let Some(r) = r {
                        shared
                            .metrics
                            .epoch
                            .with_label_values(&[side])
                            .set(r.epoch.0 as i64);
                    }
                }
                let mut gate = decide(*l, *p);
                if peer_maybe_demoted(*l, *p) {
                    match epochs::last_epoch(&peer).await {
                        Ok(last) => gate = follow_demoted(gate, *l, *p, last),
                        Err(e) => shared.failed("gate", &e),
                    }
                }
                hold_for_promotion(gate, *l, *p, *intent)
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
                    .next()
                    .unwrap_or(max_backoff)
                    .max(interval)
                    .min(max_backoff);
                Gate::Idle {
                    reason: reasons.join("; "),
                }
            }
        };
        publish(&shared, gate.clone());
        shared.metrics.gate_checks.inc();
        match gate {
            Gate::Rejoin { peer_epoch } => {
                // Hold the write lock: no copier batch may land while the tail is moved.
                let _guard = shared.write_lock.lock().await;
                // The epoch the local region wrote its own events in: the one it was
                // demoted from, if the gateway demoted it.
                let local_epoch = l
                    .as_ref()
                    .ok()
                    .copied()
                    .flatten()
                    .map(|r| r.demoted_from.unwrap_or(r.epoch));
                let began_at = l.as_ref().ok().copied().flatten();
                let result =
                    rejoin::run(&shared, &local, &peer, local_epoch, began_at, peer_epoch).await;
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
                        delay = backoff.next().unwrap_or(max_backoff).max(interval);
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

//! Replication lag per stream, in entries and in seconds.
//!
//! Seconds: the age of the oldest entry not yet copied, read from its id (the id's
//! millisecond part is the peer's clock when it was written), 0 when caught up.
//! Entries: the peer's entries-added minus the local one's. Both count every entry
//! ever added; a rejoin takes the removed tail back out of the local count, so the
//! difference is what remains to copy.

use crate::gate::Gate;
use crate::link::{Link, LinkError};
use crate::replication::local_top;
use crate::reply;
use crate::status::Shared;
use eventlog::entry::Entry;
use eventlog::envelope::StreamId;
use eventlog::{keys, Role};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

async fn entries_added(link: &Link, stream: &str) -> Result<i64, LinkError> {
    match link
        .query(redis::cmd("XINFO").arg("STREAM").arg(stream))
        .await
    {
        Ok(v) => Ok(reply::field(&reply::pairs(&v), "entries-added")
            .and_then(reply::int)
            .unwrap_or(0)),
        Err(LinkError::Command { source, .. }) if crate::replication::is_no_such_key(&source) => {
            Ok(0)
        }
        Err(e) => Err(e),
    }
}

/// How far one stream is behind, as measured.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Lag {
    pub events: i64,
    pub seconds: f64,
    /// The last moment (Unix ms) at which the local copy is known to have held every
    /// entry of the peer: now when caught up, else the id time of the oldest entry not
    /// yet copied. While the peer cannot be read, the lag in seconds is counted from it.
    pub complete_at_ms: u64,
}

/// Measures one stream's lag.
pub async fn measure(local: &Link, peer: &Link, stream: &str) -> Result<Lag, LinkError> {
    let top = local_top(local, stream).await?;
    let v = peer
        .query(
            redis::cmd("XRANGE")
                .arg(stream)
                .arg(format!("({top}"))
                .arg("+")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    let next = Entry::from_range(v);
    let now_ms = eventlog::time::now_ms();
    let Some(oldest) = next.first().and_then(|e| StreamId::parse(&e.id)) else {
        return Ok(Lag {
            events: 0,
            seconds: 0.0,
            complete_at_ms: now_ms,
        });
    };
    let (theirs, ours) =
        tokio::try_join!(entries_added(peer, stream), entries_added(local, stream))?;
    let age_ms = now_ms.saturating_sub(oldest.ms);
    Ok(Lag {
        events: (theirs - ours).max(1),
        seconds: age_ms as f64 / 1000.0,
        complete_at_ms: oldest.ms.min(now_ms),
    })
}

/// The lag task: refreshes the gauges while copying, and keeps them honest while the
/// peer cannot be read: the lag in seconds then grows from the last moment the copy was
/// known complete, instead of freezing at its last (often zero) value, so a dashboard
/// shows the standby falling behind during the very outage an operator is drilling.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>, peer: Arc<Link>) {
    let interval = Duration::from_millis(shared.config.lag_interval_ms);
    let started_ms = eventlog::time::now_ms();
    let mut complete_at: BTreeMap<String, u64> = BTreeMap::new();
    loop {
        let streams = shared.streams.borrow().clone();
        // peer_up is set by the gate's reads; before its first round nothing is known.
        let gate_ran =
            !matches!(&*shared.gate.borrow(), Gate::Idle { reason } if reason == "starting");
        let peer_down = gate_ran && shared.metrics.peer_up.get() == 0;
        let local_role = shared.health().local_role;
        let following = local_role.is_none_or(|r| r.role == Role::Standby);
        if shared.gate.borrow().is_copy() && !peer_down {
            for s in &streams {
                match measure(&local, &peer, s).await {
                    Ok(lag) => {
                        complete_at.insert(s.clone(), lag.complete_at_ms);
                        set(&shared, s, lag.events, lag.seconds);
                    }
                    Err(e) => {
                        shared.failed("lag", &e);
                        break;
                    }
                }
            }
        } else if peer_down && following {
            // The standby cannot see its active peer: whatever the peer wrote since the
            // copy was last known complete is missing here, and that window grows.
            let now_ms = eventlog::time::now_ms();
            for s in streams.iter().map(String::as_str).chain(ALWAYS) {
                let since = *complete_at.get(s).unwrap_or(&started_ms);
                let seconds = now_ms.saturating_sub(since) as f64 / 1000.0;
                shared
                    .metrics
                    .lag_seconds
                    .with_label_values(&[s])
                    .set(seconds);
            }
        } else if !following {
            // The local region is active: nothing flows into it, nothing is behind.
            for s in streams.iter().map(String::as_str).chain(ALWAYS) {
                complete_at.remove(s);
                set(&shared, s, 0, 0.0);
            }
        }
        if !shared.sleep(interval).await {
            return;
        }
    }
}

/// Streams whose gauges exist from the start (see `metrics`), even before discovery.
const ALWAYS: [&str; 2] = [keys::EVENTS, keys::DLQ];

fn set(shared: &Shared, stream: &str, events: i64, seconds: f64) {
    shared
        .metrics
        .lag_events
        .with_label_values(&[stream])
        .set(events);
    shared
        .metrics
        .lag_seconds
        .with_label_values(&[stream])
        .set(seconds);
}

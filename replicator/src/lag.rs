//! Replication lag per stream, in entries and in seconds.
//!
//! Seconds: the age of the oldest entry not yet copied, read from its id (the id's
//! millisecond part is the peer's clock when it was written), 0 when caught up.
//! Entries: the peer's entries-added minus the local one's. Both count every entry
//! ever added; a rejoin takes the removed tail back out of the local count, so the
//! difference is what remains to copy.

use crate::link::{Link, LinkError};
use crate::replication::local_top;
use crate::reply;
use crate::status::Shared;
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

/// `(entries, seconds)` behind for one stream.
pub async fn measure(local: &Link, peer: &Link, stream: &str) -> Result<(i64, f64), LinkError> {
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
    let next = reply::entries(v).map_err(|e| LinkError::Other(format!("peer XRANGE: {e}")))?;
    let Some(oldest) = next.first() else {
        return Ok((0, 0.0));
    };
    let (theirs, ours) =
        tokio::try_join!(entries_added(peer, stream), entries_added(local, stream))?;
    let age_ms = eventlog::time::now_ms().saturating_sub(oldest.id.ms);
    Ok(((theirs - ours).max(1), age_ms as f64 / 1000.0))
}

/// The lag task: refreshes the gauges while copying.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>, peer: Arc<Link>) {
    let interval = Duration::from_millis(shared.config.lag_interval_ms);
    loop {
        if shared.gate.borrow().is_copy() {
            let streams = shared.streams.borrow().clone();
            for s in &streams {
                match measure(&local, &peer, s).await {
                    Ok((events, seconds)) => {
                        shared
                            .metrics
                            .lag_events
                            .with_label_values(&[s])
                            .set(events);
                        shared
                            .metrics
                            .lag_seconds
                            .with_label_values(&[s])
                            .set(seconds);
                    }
                    Err(e) => {
                        shared.failed("lag", &e);
                        break;
                    }
                }
            }
        }
        if !shared.sleep(interval).await {
            return;
        }
    }
}

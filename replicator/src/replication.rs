//! Streams: discovery on the peer, and the copier that moves entries into the local
//! Redis with their original ids.
//!
//! Why ids are copied verbatim: ids only grow within a stream, so `XADD key <id>` keeps
//! the local stream a prefix of the peer's. That makes the local stream's last id the
//! resume point (nothing else to keep consistent with it), makes a retried batch
//! harmless (Redis refuses an id at or below the top: the entry is already there), and
//! lets consumer-group positions be copied as they are, with no offset translation.
//!
//! The copier is a reader and a writer joined by a small channel, so reading batch n+1
//! from the peer overlaps writing batch n locally. Any error ends the session; the next
//! session starts again from what the local streams actually hold.

use crate::link::{Backoff, Link, LinkError};
use crate::reply::{self, Entry};
use crate::status::Shared;
use eventlog::envelope::StreamId;
use eventlog::keys;
use redis::Value;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Streams are found by type and prefix, so a stream the node adds later (another
/// partition, another dead-letter stream) is copied without a restart.
pub async fn scan_streams(link: &Link) -> Result<Vec<String>, LinkError> {
    let mut cursor = "0".to_string();
    let mut found = Vec::new();
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(&cursor)
            .arg("MATCH")
            .arg(format!("{}*", keys::PREFIX))
            .arg("COUNT")
            .arg(1000)
            .arg("TYPE")
            .arg("stream");
        let v = link.query(&cmd).await?;
        let parts = reply::array(&v).ok_or(LinkError::Reply {
            side: link.side().as_str(),
            what: "SCAN",
        })?;
        let (Some(next), Some(names)) = (
            parts.first().and_then(reply::string),
            parts.get(1).and_then(reply::array),
        ) else {
            return Err(LinkError::Reply {
                side: link.side().as_str(),
                what: "SCAN",
            });
        };
        found.extend(
            names
                .iter()
                .filter_map(reply::string)
                .filter(|n| replicated(n)),
        );
        if next == "0" {
            break;
        }
        cursor = next;
    }
    found.sort();
    found.dedup();
    Ok(found)
}

/// The quarantine stream is region-local: it holds what this region wrote and the
/// other never had, so copying it would defeat its purpose.
pub fn replicated(stream: &str) -> bool {
    stream.starts_with(keys::PREFIX) && stream != keys::QUARANTINE
}

/// The discovery task: rescans the peer while copying, at once when copying starts.
pub async fn discover(shared: Arc<Shared>, peer: Arc<Link>) {
    let mut gate = shared.gate.subscribe();
    let interval = Duration::from_millis(shared.config.discovery_interval_ms);
    while !shared.is_shutting_down() {
        if gate.borrow_and_update().is_copy() {
            match scan_streams(&peer).await {
                Ok(found) => {
                    shared.metrics.streams.set(found.len() as i64);
                    shared.streams.send_if_modified(|s| {
                        if *s != found {
                            tracing::info!(streams = ?found, "streams on the peer");
                            *s = found;
                            true
                        } else {
                            false
                        }
                    });
                }
                Err(e) => shared.failed("discovery", &e),
            }
        }
        let mut stop = shared.shutdown_signal();
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = gate.changed() => {}
            _ = stop.wait_for(|s| *s) => break,
        }
    }
}

/// The last id the local stream has generated (0-0 when it does not exist): every
/// entry at or below it is either copied or can no longer be added.
pub async fn local_top(local: &Link, stream: &str) -> Result<StreamId, LinkError> {
    match local
        .query(redis::cmd("XINFO").arg("STREAM").arg(stream))
        .await
    {
        Ok(v) => {
            let pairs = reply::pairs(&v);
            reply::field(&pairs, "last-generated-id")
                .and_then(reply::stream_id)
                .ok_or(LinkError::Reply {
                    side: "local",
                    what: "XINFO STREAM last-generated-id",
                })
        }
        Err(LinkError::Command { source, .. }) if is_no_such_key(&source) => Ok(StreamId::ZERO),
        Err(e) => Err(e),
    }
}

pub fn is_no_such_key(e: &redis::RedisError) -> bool {
    e.to_string().contains("no such key")
}

/// A batch as read from the peer: entries per stream, in id order.
type Batch = Vec<(String, Vec<Entry>)>;

/// The copier task: one session after another while the gate allows copying.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>, peer: Arc<Link>) {
    let mut backoff = Backoff::new(shared.config.max_backoff());
    let mut gate = shared.gate.subscribe();
    let mut stop = shared.shutdown_signal();
    loop {
        tokio::select! {
            r = gate.wait_for(|g| g.is_copy()) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        match session(&shared, &local, &peer).await {
            Ok(()) => backoff.reset(),
            Err(e) => {
                shared.failed("copy", &e);
                let delay = backoff.fail();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "copy session ended");
                if !shared.sleep(delay).await {
                    return;
                }
            }
        }
    }
}

async fn session(shared: &Shared, local: &Link, peer: &Link) -> Result<(), LinkError> {
    let (tx, rx) = mpsc::channel::<Batch>(2);
    tokio::try_join!(
        read_loop(shared, local, peer, tx),
        write_loop(shared, local, rx)
    )?;
    Ok(())
}

async fn read_loop(
    shared: &Shared,
    local: &Link,
    peer: &Link,
    tx: mpsc::Sender<Batch>,
) -> Result<(), LinkError> {
    let mut cursors: BTreeMap<String, StreamId> = BTreeMap::new();
    let mut streams_rx = shared.streams.subscribe();
    let mut gate = shared.gate.subscribe();
    let mut stop = shared.shutdown_signal();
    let block = Duration::from_millis(shared.config.block_ms);
    loop {
        if shared.is_shutting_down() || !gate.borrow_and_update().is_copy() {
            return Ok(());
        }
        let streams = streams_rx.borrow_and_update().clone();
        for s in &streams {
            if !cursors.contains_key(s) {
                // The target is the checkpoint: resume after what the local stream holds.
                let top = local_top(local, s).await?;
                shared.reached(local.side());
                cursors.insert(s.clone(), top);
                shared.copied.send_modify(|m| {
                    m.insert(s.clone(), top);
                });
            }
        }
        if cursors.is_empty() {
            tokio::select! {
                _ = tokio::time::sleep(block) => {}
                _ = streams_rx.changed() => {}
                _ = gate.changed() => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            continue;
        }
        let mut cmd = redis::cmd("XREAD");
        cmd.arg("COUNT")
            .arg(shared.config.batch_size)
            .arg("BLOCK")
            .arg(shared.config.block_ms)
            .arg("STREAMS");
        for s in cursors.keys() {
            cmd.arg(s);
        }
        for id in cursors.values() {
            cmd.arg(id.to_string());
        }
        let v = tokio::select! {
            v = peer.query(&cmd) => v?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        shared.reached(peer.side());
        let batch: Batch = reply::xread(v)
            .map_err(|e| LinkError::Other(format!("peer XREAD: {e}")))?
            .into_iter()
            .filter(|(s, e)| !e.is_empty() && cursors.contains_key(s))
            .collect();
        if batch.is_empty() {
            continue;
        }
        for (s, entries) in &batch {
            if let Some(last) = entries.last() {
                cursors.insert(s.clone(), last.id);
            }
        }
        if tx.send(batch).await.is_err() {
            // The writer stopped (gate changed); its result decides the session.
            return Ok(());
        }
    }
}

async fn write_loop(
    shared: &Shared,
    local: &Link,
    mut rx: mpsc::Receiver<Batch>,
) -> Result<(), LinkError> {
    while let Some(batch) = rx.recv().await {
        let _guard = shared.write_lock.lock().await;
        if !shared.gate.borrow().is_copy() {
            // A rejoin or a role change happened after this batch was read: drop it,
            // the next session re-reads from what the local streams hold.
            return Ok(());
        }
        write_batch(shared, local, &batch).await?;
    }
    Ok(())
}

/// Writes one batch as a single pipeline: an XADD per entry with its original id, then
/// the per-stream checkpoint. A crash in the middle leaves a prefix, which is exactly
/// what the next session resumes after.
pub async fn write_batch(shared: &Shared, local: &Link, batch: &Batch) -> Result<(), LinkError> {
    let started = Instant::now();
    let mut pipe = redis::pipe();
    for (stream, entries) in batch {
        for e in entries {
            let cmd = pipe.cmd("XADD").arg(stream).arg(e.id.to_string());
            for f in &e.fields {
                cmd.arg(&f[..]);
            }
        }
        if let Some(last) = entries.last() {
            pipe.cmd("HSET")
                .arg(keys::REPLICATION_CHECKPOINT)
                .arg(stream)
                .arg(last.id.to_string());
        }
    }
    let replies = local.pipeline(&pipe).await?;
    shared.reached(local.side());
    let mut replies = replies.into_iter();
    let now_ms = eventlog::time::now_ms();
    let mut total = 0usize;
    for (stream, entries) in batch {
        let (mut copied, mut dups) = (0u64, 0u64);
        for _ in entries {
            match replies.next() {
                Some(Value::ServerError(err)) => {
                    let text = err.details().unwrap_or_default();
                    if text.contains("equal or smaller") {
                        // Already there: a retried batch or an overlapping session.
                        dups += 1;
                    } else {
                        return Err(LinkError::Command {
                            side: "local",
                            source: err.into(),
                        });
                    }
                }
                Some(_) => copied += 1,
                None => {
                    return Err(LinkError::Reply {
                        side: "local",
                        what: "pipelined XADD",
                    })
                }
            }
        }
        if let Some(Value::ServerError(err)) = replies.next() {
            return Err(LinkError::Command {
                side: "local",
                source: err.into(),
            });
        }
        total += entries.len();
        let m = &shared.metrics;
        m.events_copied.with_label_values(&[stream]).inc_by(copied);
        if dups > 0 {
            m.duplicates.with_label_values(&[stream]).inc_by(dups);
            tracing::debug!(stream, dups, "entries already copied were skipped");
        }
        if let Some(last) = entries.last() {
            m.last_copy_apply
                .with_label_values(&[stream])
                .observe(now_ms.saturating_sub(last.id.ms) as f64 / 1000.0);
            shared.copied.send_modify(|c| {
                c.insert(stream.clone(), last.id);
            });
        }
    }
    shared.metrics.batch_entries.observe(total as f64);
    shared
        .metrics
        .batch_duration
        .observe(started.elapsed().as_secs_f64());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quarantine_is_never_replicated() {
        assert!(replicated(keys::EVENTS));
        assert!(replicated(keys::DLQ));
        assert!(!replicated(keys::QUARANTINE));
        assert!(!replicated("other:stream"));
    }
}

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

use crate::gate::Gate;
use crate::link::{retry_policy, Link, LinkError, Side};
use crate::reply;
use crate::status::Shared;
use crate::wire::{self, AddOutcome, Endpoint, RawConn, StreamPart};
use eventlog::envelope::StreamId;
use eventlog::keys;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

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

/// A batch as read from the peer, already encoded as copy-script arguments.
struct Batch {
    packed: Vec<u8>,
    /// How many arguments `packed` holds.
    args: usize,
    parts: Vec<StreamPart>,
}

/// The copy of one batch, in one script. KEYS: role, promotion intent, checkpoint
/// hash. ARGV: k, then k (stream, last id) checkpoint pairs, then per entry: stream, id,
/// field count, fields. Returns one outcome per entry (1 added, 0 already there, or
/// the error), or the error `FENCED` and writes nothing when the local region is
/// active or being promoted (an intent above the role's epoch; an intent at or below it
/// lost to another promotion, and the gate ignores it too).
///
/// The gate stops copying when it sees a promotion intent, but it reads the roles on
/// a timer, and a batch may be in flight when the intent is written. A batch that
/// landed after the promotion's last step would sit past the new epoch's start
/// offsets, unprojected (the projection stops once active), and the new active's
/// handlers would redo the work of its orders from stale state. Checking in the same
/// script that appends closes that window: either the batch lands before the intent
/// (and the promotion's catch-up applies it) or not at all.
const COPY: &str = r"
local role = redis.call('HMGET', KEYS[1], 'role', 'epoch')
if role[1] == 'active' then
  return redis.error_reply('FENCED this region is active')
end
local intent = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if intent > tonumber(role[2] or '0') then
  return redis.error_reply('FENCED a promotion of this region is in progress')
end
local k = tonumber(ARGV[1])
local out = {}
local i, n = 2 + 2 * k, #ARGV
while i <= n do
  local stream, id, nf = ARGV[i], ARGV[i + 1], tonumber(ARGV[i + 2])
  local r = redis.pcall('XADD', stream, id, unpack(ARGV, i + 3, i + 2 + nf))
  if type(r) == 'table' and r.err then
    if string.find(r.err, 'equal or smaller', 1, true) then out[#out + 1] = 0 else out[#out + 1] = r.err end
  else
    out[#out + 1] = 1
  end
  i = i + 3 + nf
end
for j = 0, k - 1 do
  redis.call('HSET', KEYS[3], ARGV[2 + 2 * j], ARGV[3 + 2 * j])
end
return out
";

/// The SHA1 of [`COPY`], loaded into the local Redis at the start of each session.
fn copy_sha() -> &'static str {
    static SHA: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    SHA.get_or_init(|| redis::Script::new(COPY).get_hash().to_string())
}

/// The copier task: one session after another while the gate allows copying.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>) {
    let max_backoff = shared.config.max_backoff();
    let mut backoff = retry_policy(max_backoff);
    let mut gate = shared.gate.subscribe();
    let mut stop = shared.shutdown_signal();
    loop {
        tokio::select! {
            r = gate.wait_for(|g| g.is_copy()) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        match session(&shared, &local).await {
            Ok(()) => backoff = retry_policy(max_backoff),
            Err(e) => {
                shared.failed("copy", &e);
                let delay = backoff.next().unwrap_or(max_backoff);
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "copy session ended");
                if !shared.sleep(delay).await {
                    return;
                }
            }
        }
    }
}

async fn raw(shared: &Shared, side: Side) -> Result<RawConn, LinkError> {
    let c = &shared.config;
    let url = match side {
        Side::Local => &c.local_redis_url,
        Side::Peer => &c.peer_redis_url,
    };
    let ep = Endpoint::parse(url).map_err(LinkError::Other)?;
    RawConn::connect(
        side,
        &ep,
        shared.redis_tls.as_ref(),
        c.connect_timeout(),
        c.response_timeout(),
    )
    .await
}

async fn session(shared: &Arc<Shared>, local: &Arc<Link>) -> Result<(), LinkError> {
    // A session belongs to one gate decision: both halves stop at any change of it.
    let mut gate = shared.gate.subscribe();
    if !gate.borrow_and_update().is_copy() {
        return Ok(());
    }
    // Connections live for one session: after any error they are dropped, since a
    // half-read reply leaves a connection out of step.
    let peer_conn = raw(shared, Side::Peer).await?;
    let mut local_conn = raw(shared, Side::Local).await?;
    // Loaded once per session: a restarted Redis forgets scripts, and also drops the
    // connection, which ends the session.
    let mut load = Vec::new();
    wire::encode(&mut load, &[b"SCRIPT", b"LOAD", COPY.as_bytes()]);
    let loaded = local_conn.request(&load, 1, Duration::ZERO).await?;
    if let Some(err) = wire::first_error(&loaded) {
        return Err(LinkError::Server {
            side: "local",
            message: format!("SCRIPT LOAD: {err}"),
        });
    }
    let (tx, rx) = mpsc::channel::<Batch>(2);
    // The reader is its own task so that reading from the peer and writing locally
    // overlap and run on different cores.
    let reader = {
        let (shared, local) = (shared.clone(), local.clone());
        let gate = gate.clone();
        tokio::spawn(async move { read_loop(&shared, &local, peer_conn, gate, tx).await })
    };
    let written = write_loop(shared, local_conn, gate, rx).await;
    reader.abort();
    let read = match reader.await {
        Ok(r) => r,
        Err(e) if e.is_cancelled() => Ok(()),
        Err(e) => Err(LinkError::Other(format!("copy reader panicked: {e}"))),
    };
    written.and(read)
}

async fn read_loop(
    shared: &Shared,
    local: &Link,
    mut peer: RawConn,
    gate: watch::Receiver<Gate>,
    tx: mpsc::Sender<Batch>,
) -> Result<(), LinkError> {
    let mut cursors: BTreeMap<String, StreamId> = BTreeMap::new();
    let mut streams_rx = shared.streams.subscribe();
    let mut stop = shared.shutdown_signal();
    let block = Duration::from_millis(shared.config.block_ms);
    let (count, block_ms) = (
        shared.config.batch_size.to_string(),
        shared.config.block_ms.to_string(),
    );
    loop {
        // Any gate change ends the session, even one that comes back to copying (after
        // a rejoin the local streams were rewritten, so the cursors are stale).
        if shared.is_shutting_down() || gate.has_changed().unwrap_or(true) {
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
            // A clone, so that waiting does not mark the change as seen for the check above.
            let mut gate_changed = gate.clone();
            tokio::select! {
                _ = tokio::time::sleep(block) => {}
                _ = streams_rx.changed() => {}
                _ = gate_changed.changed() => {}
                _ = stop.wait_for(|s| *s) => return Ok(()),
            }
            continue;
        }
        let ids: Vec<String> = cursors.values().map(|id| id.to_string()).collect();
        let mut args: Vec<&[u8]> = vec![
            b"XREAD",
            b"COUNT",
            count.as_bytes(),
            b"BLOCK",
            block_ms.as_bytes(),
            b"STREAMS",
        ];
        args.extend(cursors.keys().map(|k| k.as_bytes()));
        args.extend(ids.iter().map(|i| i.as_bytes()));
        let mut cmd = Vec::new();
        wire::encode(&mut cmd, &args);
        let frame = tokio::select! {
            f = peer.request(&cmd, 1, block) => f?,
            _ = stop.wait_for(|s| *s) => return Ok(()),
        };
        shared.reached(Side::Peer);
        let mut packed = Vec::with_capacity(frame.len() + frame.len() / 8);
        let (parts, args) =
            wire::xread_to_entries(&frame, &mut packed).map_err(|message| LinkError::Server {
                side: "peer",
                message: format!("XREAD: {message}"),
            })?;
        if parts.is_empty() {
            continue;
        }
        for p in &parts {
            cursors.insert(p.stream.clone(), p.last);
        }
        if tx
            .send(Batch {
                packed,
                args,
                parts,
            })
            .await
            .is_err()
        {
            // The writer stopped (gate changed); its result decides the session.
            return Ok(());
        }
    }
}

struct Sent {
    parts: Vec<StreamPart>,
    entries: usize,
    started: Instant,
}

async fn write_loop(
    shared: &Shared,
    mut local: RawConn,
    gate: watch::Receiver<Gate>,
    mut rx: mpsc::Receiver<Batch>,
) -> Result<(), LinkError> {
    // Batches written but not yet acknowledged by the local Redis (`write_depth`). More
    // than one in flight keeps the next batch queued in the local Redis while the
    // replies to the previous one travel back.
    let mut in_flight: VecDeque<Sent> = VecDeque::new();
    // Held while anything is in flight: a rejoin takes it to rewrite the local streams,
    // so it never runs while a batch may still land.
    let mut guard = None;
    loop {
        let next = if in_flight.is_empty() {
            guard = None;
            match rx.recv().await {
                Some(b) => Some(b),
                None => return Ok(()),
            }
        } else if in_flight.len() < shared.config.write_depth {
            rx.try_recv().ok()
        } else {
            None
        };
        match next {
            Some(batch) => {
                if guard.is_none() {
                    guard = Some(shared.write_lock.lock().await);
                }
                if gate.has_changed().unwrap_or(true) {
                    // The gate changed (a rejoin, a role change) after this batch was
                    // read: drop it (the next session re-reads from what the local
                    // streams hold),
                    // but let what is already sent land before the lock is released.
                    while let Some(sent) = in_flight.pop_front() {
                        complete_batch(shared, &mut local, sent).await?;
                    }
                    return Ok(());
                }
                in_flight.push_back(send_batch(&mut local, batch).await?);
            }
            None => {
                let sent = in_flight.pop_front().expect("something is in flight");
                complete_batch(shared, &mut local, sent).await?;
            }
        }
    }
}

/// Sends one batch as one copy-script call ([`COPY`]): the entries with their original
/// ids, then the per-stream checkpoint, or nothing at all if the local region is active
/// or being promoted.
async fn send_batch(local: &mut RawConn, batch: Batch) -> Result<Sent, LinkError> {
    let started = Instant::now();
    let Batch {
        packed,
        args,
        parts,
    } = batch;
    let entries: usize = parts.iter().map(|p| p.entries).sum();
    let cmd = wire::copy_command(
        copy_sha(),
        [
            keys::ROLE,
            keys::PROMOTION_INTENT,
            keys::REPLICATION_CHECKPOINT,
        ],
        &parts,
        &packed,
        args,
    );
    local.send(&cmd).await?;
    Ok(Sent {
        parts,
        entries,
        started,
    })
}

/// Reads and judges the reply to one sent batch.
async fn complete_batch(shared: &Shared, local: &mut RawConn, sent: Sent) -> Result<(), LinkError> {
    let Sent {
        parts,
        entries,
        started,
    } = sent;
    let reply = local.read(1, Duration::ZERO).await?;
    shared.reached(Side::Local);
    let outcomes = wire::copy_outcomes(&reply, entries)
        .map_err(|e| LinkError::Other(format!("local copy reply: {e}")))?
        .map_err(|message| LinkError::Server {
            side: "local",
            message: if message.starts_with("FENCED") {
                format!("{message}: the batch was not written (the gate stops copying)")
            } else {
                format!("copy script: {message}")
            },
        })?;
    let now_ms = eventlog::time::now_ms();
    let mut outcomes = outcomes.into_iter();
    for p in &parts {
        let (mut copied, mut dups) = (0u64, 0u64);
        for o in outcomes.by_ref().take(p.entries) {
            match o {
                AddOutcome::Added => copied += 1,
                // Already there: a retried batch or an overlapping session.
                AddOutcome::AlreadyThere => dups += 1,
                AddOutcome::Failed(message) => {
                    return Err(LinkError::Server {
                        side: "local",
                        message: format!("XADD {}: {message}", p.stream),
                    })
                }
            }
        }
        let m = &shared.metrics;
        m.events_copied
            .with_label_values(&[&p.stream])
            .inc_by(copied);
        if dups > 0 {
            m.duplicates.with_label_values(&[&p.stream]).inc_by(dups);
            tracing::debug!(stream = %p.stream, dups, "entries already copied were skipped");
        }
        m.last_copy_apply
            .with_label_values(&[&p.stream])
            .observe(now_ms.saturating_sub(p.last.ms) as f64 / 1000.0);
        shared.copied.send_modify(|c| {
            c.insert(p.stream.clone(), p.last);
        });
    }
    shared.metrics.batch_entries.observe(entries as f64);
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

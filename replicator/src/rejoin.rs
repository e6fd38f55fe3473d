//! Rejoin of a region that was left behind by a failover (DESIGN.md 4, "Failback"): the
//! Redis side. Which entries move aside is decided in [`crate::quarantine`].
//!
//! When the peer is active at a higher epoch, everything the local region holds past
//! that epoch's start offsets was written after the peer took over. Entries the peer
//! also holds (same id, same fields) were copied to it late and come back by the normal
//! copy; entries it does not hold never reached the new active. Those are moved to the
//! region-local stream `tandem:quarantine` with their origin (stream, original id,
//! epoch) and reported, never silently dropped. Then each stream's last id is set back
//! to its last remaining entry (at or before the start offset), so the peer's newer
//! entries, whose ids may be lower than the removed tail, can be copied; and the local
//! role becomes `standby` at the peer's epoch.
//!
//! Crash safety: each batch is one Lua script (copy to quarantine, delete, count), so a
//! crash leaves whole batches done or not done; a moved entry is no longer past the
//! start, so a redo skips it. The last step (reset ids, set the role) is one script
//! too, and it refuses to run while anything past a start offset remains.

use crate::epochs;
use crate::link::{Link, LinkError};
use crate::quarantine::{self, Fate};
use crate::replication::{replicated, scan_streams};
use crate::reply;
use crate::status::Shared;
use eventlog::entry::Entry;
use eventlog::envelope::{StreamId, FIELD_TYPE};
use eventlog::{keys, Epoch, RoleRecord};
use redis::{Script, Value};
use std::collections::BTreeSet;
use std::sync::OnceLock;

/// Entries examined per batch (one peer pipeline and one script each).
const BATCH: usize = 500;

/// Refuses (error `TANDEM_ROLE_CHANGED`) when the local region was promoted, or a
/// promotion of it began, after the rejoin was decided on (its role active, or its
/// intent, at an epoch above the one the rejoin began at). Other changes go on: the node
/// itself steps down to standby at its epoch when it sees the peer ahead, which is what
/// the rejoin is for (refusing then, a first version of this check left the tail half
/// moved while the copy resumed: chaos seed 9802, replicated). The gate
/// decides from role records read a moment earlier, and a rejoin takes a while: the
/// gateway may promote this region in between (its peer hung, say). Without the check
/// the rejoin moved the new active's first writes to the quarantine and set it back to
/// standby at the old peer's epoch (compose_stack, pause fault: region b promoted at
/// epoch 4, then demoted to standby at 3 by its own replicator, 273 events quarantined).
/// Expects `role_key`, `intent_key`, `want_role`, `want_epoch` to be defined.
const ROLE_UNCHANGED: &str = r#"
local current = redis.call('HMGET', role_key, 'role', 'epoch')
if current[1] == 'active' and (tonumber(current[2]) or 0) > (tonumber(want_epoch) or 0) then
  return redis.error_reply('TANDEM_ROLE_CHANGED the local region was promoted to epoch ' .. tostring(current[2]) .. ' after the rejoin began at ' .. want_role .. '@' .. want_epoch)
end
local intent = tonumber(redis.call('HGET', intent_key, 'epoch') or '0') or 0
if intent > (tonumber(want_epoch) or 0) then
  return redis.error_reply('TANDEM_ROLE_CHANGED a promotion of the local region to epoch ' .. intent .. ' has begun')
end
"#;

/// KEYS: stream, quarantine stream, checkpoint hash, role, promotion intent. ARGV: epoch
/// of the moved entries, checkpoint field counting deletions, the local role and epoch
/// the rejoin began at (see [`ROLE_UNCHANGED`]), then (id, flag) pairs: `q` quarantine
/// and delete, `d` delete only (the peer holds the same entry; the copy brings it back).
const MOVE: &str = r#"
local role_key, intent_key, want_role, want_epoch = KEYS[4], KEYS[5], ARGV[3], ARGV[4]
-- ROLE_UNCHANGED
local moved, deleted = 0, 0
for i = 5, #ARGV, 2 do
  local id, flag = ARGV[i], ARGV[i + 1]
  local e = redis.call('XRANGE', KEYS[1], id, id)
  if #e == 1 then
    if flag == 'q' then
      local f = e[1][2]
      table.insert(f, 'stream'); table.insert(f, KEYS[1])
      table.insert(f, 'originalId'); table.insert(f, id)
      table.insert(f, 'epoch'); table.insert(f, ARGV[1])
      redis.call('XADD', KEYS[2], '*', unpack(f))
      moved = moved + 1
    end
    redis.call('XDEL', KEYS[1], id)
    deleted = deleted + 1
  end
end
if deleted > 0 then redis.call('HINCRBY', KEYS[3], ARGV[2], deleted) end
return {moved, deleted}
"#;

/// KEYS: the n streams, then the role hash, the checkpoint hash and the promotion intent.
/// ARGV: the new epoch, n, then per stream (start offset, deletion counter field), then
/// the local role and epoch the rejoin began at (see [`ROLE_UNCHANGED`]).
const FINISH: &str = r#"
local nn = tonumber(ARGV[2])
local role_key, intent_key = KEYS[nn + 1], KEYS[nn + 3]
local want_role, want_epoch = ARGV[3 + 2 * nn], ARGV[4 + 2 * nn]
-- ROLE_UNCHANGED
local function parse(id)
  local dash = string.find(id, '-', 1, true)
  return tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1))
end
local function gt(a, b)
  local am, as = parse(a)
  local bm, bs = parse(b)
  return am > bm or (am == bm and as > bs)
end
local n = tonumber(ARGV[2])
local role, checkpoint = KEYS[n + 1], KEYS[n + 2]
for i = 1, n do
  local key, start, counter = KEYS[i], ARGV[1 + 2 * i], ARGV[2 + 2 * i]
  if redis.call('EXISTS', key) == 1 then
    local top = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
    if #top == 1 and gt(top[1][1], start) then
      return redis.error_reply('RETRY entries past the start offset remain in ' .. key)
    end
    local info = redis.call('XINFO', 'STREAM', key)
    local added, len, last
    for j = 1, #info, 2 do
      if info[j] == 'entries-added' then added = info[j + 1]
      elseif info[j] == 'length' then len = info[j + 1]
      elseif info[j] == 'last-generated-id' then last = info[j + 1] end
    end
    local newid = '0-0'
    if #top == 1 then newid = top[1][1] end
    if gt(last, newid) then
      -- Entries-added counts the removed tail too; take it back out so that group lag
      -- (entries-added minus entries-read) stays comparable with the peer's.
      local ea = added - tonumber(redis.call('HGET', checkpoint, counter) or '0')
      if ea < len then ea = len end
      redis.call('XSETID', key, newid, 'ENTRIESADDED', ea)
    end
  end
  redis.call('HDEL', checkpoint, counter)
end
redis.call('HSET', role, 'role', 'standby', 'epoch', ARGV[1])
redis.call('HDEL', role, 'demoted_from')
return 'OK'
"#;

fn scripts() -> &'static (Script, Script) {
    static S: OnceLock<(Script, Script)> = OnceLock::new();
    S.get_or_init(|| {
        let guarded = |src: &str| src.replacen("-- ROLE_UNCHANGED\n", ROLE_UNCHANGED, 1);
        (Script::new(&guarded(MOVE)), Script::new(&guarded(FINISH)))
    })
}

/// Runs a rejoin to the peer's epoch; `local_epoch` is the epoch the local role record
/// names (the epoch the entries moved aside were written in), `began_at` the local role
/// record the rejoin was decided on: every step refuses once it has changed. Returns
/// how many entries were quarantined.
pub async fn run(
    shared: &Shared,
    local: &Link,
    peer: &Link,
    local_epoch: Option<Epoch>,
    began_at: Option<RoleRecord>,
    peer_epoch: Epoch,
) -> Result<u64, LinkError> {
    let (want_role, want_epoch) = match began_at {
        Some(r) => (r.role.as_str().to_string(), r.epoch.0.to_string()),
        None => (String::new(), String::new()),
    };
    let record = match epochs::peer_record(peer, peer_epoch.0).await? {
        Some(r) => r,
        None => {
            // Without the record every local entry is compared with the peer's stream:
            // slower, but nothing the peer lacks can slip through.
            tracing::warn!(
                peer_epoch = peer_epoch.0,
                "the peer has no tandem:epochs record for its epoch; comparing whole streams"
            );
            epochs::EpochRecord::default()
        }
    };
    let old_epoch = local_epoch.unwrap_or_default();
    let mut streams: BTreeSet<String> = scan_streams(local).await?.into_iter().collect();
    streams.extend(
        record
            .start_offsets
            .keys()
            .filter(|s| replicated(s))
            .cloned(),
    );
    let (move_script, finish_script) = scripts();

    let mut quarantined = 0u64;
    let mut finish_args: Vec<Vec<u8>> = vec![
        peer_epoch.0.to_string().into_bytes(),
        streams.len().to_string().into_bytes(),
    ];
    for stream in &streams {
        // A stream the new epoch's record does not name did not exist when it began.
        let mut start = record
            .start_offsets
            .get(stream)
            .and_then(|s| StreamId::parse(s))
            .unwrap_or(StreamId::ZERO);
        let counter = format!("rejoin:{}:{stream}:deleted", peer_epoch.0);
        // What stays, what goes and where: see `quarantine`.
        let mut diverged = false;
        loop {
            let v = local
                .query(
                    redis::cmd("XRANGE")
                        .arg(stream)
                        .arg(format!("({start}"))
                        .arg("+")
                        .arg("COUNT")
                        .arg(BATCH),
                )
                .await?;
            let tail = Entry::from_range(v);
            if tail.is_empty() {
                break;
            }
            let held = held_by_peer(peer, stream, &tail).await?;
            let mut args: Vec<Vec<u8>> = vec![
                old_epoch.0.to_string().into_bytes(),
                counter.clone().into_bytes(),
                want_role.clone().into_bytes(),
                want_epoch.clone().into_bytes(),
            ];
            for (e, fate) in tail.iter().zip(quarantine::fates(&held, &mut diverged)) {
                if fate == Fate::Keep {
                    start = StreamId::parse(&e.id).ok_or(LinkError::Reply {
                        side: "local",
                        what: "XRANGE entry id",
                    })?;
                    continue;
                }
                if fate == Fate::Quarantine {
                    tracing::warn!(
                        stream = %stream,
                        id = %e.id,
                        event_type = e.field_str(FIELD_TYPE).unwrap_or_default(),
                        old_epoch = old_epoch.0,
                        new_epoch = peer_epoch.0,
                        "quarantining an entry the active peer never received"
                    );
                }
                args.push(e.id.to_string().into_bytes());
                args.push(fate.flag().to_vec());
            }
            if args.len() == 4 {
                continue;
            }
            let v = local
                .script(
                    move_script,
                    &[
                        stream,
                        keys::QUARANTINE,
                        keys::REPLICATION_CHECKPOINT,
                        keys::ROLE,
                        keys::PROMOTION_INTENT,
                    ],
                    &args,
                )
                .await?;
            let moved = reply::array(&v)
                .and_then(|a| a.first())
                .and_then(reply::int)
                .unwrap_or(0) as u64;
            shared.metrics.quarantined.inc_by(moved);
            quarantined += moved;
        }
        // Before the role changes (and with it the gate): no group sync and no
        // promotion can find the groups ahead of what the peer did.
        let redo_from = if stream == keys::EVENTS {
            earliest_cause(local, stream, old_epoch, start).await?
        } else {
            None
        };
        crate::groups::align_after_rejoin(local, peer, stream, start, redo_from).await?;
        finish_args.push(start.to_string().into_bytes());
        finish_args.push(counter.into_bytes());
    }

    let mut finish_keys: Vec<&str> = streams.iter().map(String::as_str).collect();
    finish_keys.push(keys::ROLE);
    finish_keys.push(keys::REPLICATION_CHECKPOINT);
    finish_keys.push(keys::PROMOTION_INTENT);
    finish_args.push(want_role.into_bytes());
    finish_args.push(want_epoch.into_bytes());
    local
        .script(finish_script, &finish_keys, &finish_args)
        .await?;
    epochs::copy(local, peer).await?;
    tracing::info!(
        quarantined,
        old_epoch = old_epoch.0,
        new_epoch = peer_epoch.0,
        "local region is now standby at the peer's epoch"
    );
    Ok(quarantined)
}

/// The earliest entry of `stream`, at or before `kept`, that caused an event this
/// region quarantined from `old_epoch` (through the event's `causationId` and the event
/// index). Read from the quarantine stream, not from this run's batches, so a rejoin
/// redone after a crash finds the same answer. A cause the index does not name (a
/// request id: the event answered an HTTP command) needs no redelivery.
async fn earliest_cause(
    local: &Link,
    stream: &str,
    old_epoch: Epoch,
    kept: StreamId,
) -> Result<Option<StreamId>, LinkError> {
    let epoch = old_epoch.0.to_string();
    let mut causes = BTreeSet::new();
    let mut from = "-".to_string();
    loop {
        let v = local
            .query(
                redis::cmd("XRANGE")
                    .arg(keys::QUARANTINE)
                    .arg(&from)
                    .arg("+")
                    .arg("COUNT")
                    .arg(BATCH),
            )
            .await?;
        let page = Entry::from_range(v);
        let Some(last) = page.last() else { break };
        from = format!("({}", last.id);
        for q in &page {
            if q.field_str("stream") != Some(stream) || q.field_str("epoch") != Some(&epoch) {
                continue;
            }
            match q.envelope() {
                Ok(env) => {
                    causes.insert(env.causation_id);
                }
                Err(e) => {
                    tracing::warn!(id = %q.id, error = %e, "quarantined entry without a readable envelope: its cause is not delivered again");
                }
            }
        }
        if page.len() < BATCH {
            break;
        }
    }
    let causes: Vec<String> = causes.into_iter().collect();
    let mut earliest: Option<StreamId> = None;
    for chunk in causes.chunks(BATCH) {
        let v = local
            .query(redis::cmd("HMGET").arg(keys::EVENT_INDEX).arg(chunk))
            .await?;
        let ids = reply::array(&v).unwrap_or_default();
        for id in ids.iter().filter_map(reply::stream_id) {
            if id <= kept && earliest.is_none_or(|e| id < e) {
                earliest = Some(id);
            }
        }
    }
    Ok(earliest)
}

/// For each local entry: does the peer hold an entry with the same id and the same
/// fields? Ids alone are not enough: both regions may have generated the same id.
async fn held_by_peer(peer: &Link, stream: &str, tail: &[Entry]) -> Result<Vec<bool>, LinkError> {
    let mut pipe = crate::link::pipeline();
    for e in tail {
        pipe.cmd("XRANGE").arg(stream).arg(&e.id).arg(&e.id);
    }
    let replies = peer.pipeline(&pipe).await?;
    tail.iter()
        .zip(replies)
        .map(|(e, r)| {
            if let Value::ServerError(err) = r {
                return Err(LinkError::Command {
                    side: "peer",
                    source: err.into(),
                });
            }
            let theirs = Entry::from_range(r);
            Ok(theirs
                .first()
                .is_some_and(|t| t.id == e.id && t.fields == e.fields))
        })
        .collect()
}

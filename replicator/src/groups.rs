//! Consumer groups, copied as positions (DESIGN.md 3): existence, last-delivered id,
//! entries-read, and the pending entries list with each entry's consumer.
//!
//! Ids are the same on both sides, so a position is copied as it is. A position or a
//! pending id is only written once the copier has written the entry it refers to:
//! a standby must never hold a group that points past its own stream, or a takeover
//! would skip the entries in between.
//!
//! Each round compares cheap summaries (XINFO GROUPS, the XPENDING summary) and only
//! walks the full pending lists when a summary differs, plus once a second to catch a
//! change that leaves the summaries equal.

use crate::link::{retry_policy, Link, LinkError};
use crate::reply;
use crate::status::Shared;
use eventlog::envelope::StreamId;
use eventlog::keys;
use redis::{Script, Value};
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

/// One group as XINFO GROUPS reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupInfo {
    pub name: String,
    pub last_delivered: StreamId,
    /// `None` when Redis does not know it (reported as nil).
    pub entries_read: Option<i64>,
}

/// One pending entry: id, owner, times delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    pub id: StreamId,
    pub consumer: String,
    pub deliveries: i64,
}

/// What must change locally for one group to equal the peer's.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct PelPlan {
    /// `(consumer, deliveries)` -> ids to claim for that consumer.
    pub claim: BTreeMap<(String, i64), Vec<StreamId>>,
    pub ack: Vec<StreamId>,
}

impl PelPlan {
    pub fn is_empty(&self) -> bool {
        self.claim.is_empty() && self.ack.is_empty()
    }
}

/// Compares the pending lists. Ids not yet copied (above `top`) are not claimed: XCLAIM
/// cannot create a pending entry for an entry the stream does not hold. Every id pending
/// locally but not on the peer is acknowledged: the peer acknowledged it (or the entry
/// was set aside on rejoin), and a pending entry never comes back once acknowledged.
pub fn plan_pel(peer: &[Pending], local: &[Pending], top: StreamId) -> PelPlan {
    let ours: HashMap<StreamId, &Pending> = local.iter().map(|p| (p.id, p)).collect();
    let theirs: HashMap<StreamId, &Pending> = peer.iter().map(|p| (p.id, p)).collect();
    let mut plan = PelPlan::default();
    for p in peer {
        if p.id > top {
            continue;
        }
        let same = ours
            .get(&p.id)
            .is_some_and(|l| l.consumer == p.consumer && l.deliveries == p.deliveries);
        if !same {
            plan.claim
                .entry((p.consumer.clone(), p.deliveries))
                .or_default()
                .push(p.id);
        }
    }
    plan.ack = local
        .iter()
        .filter(|l| !theirs.contains_key(&l.id))
        .map(|l| l.id)
        .collect();
    plan
}

/// Where a local group's position goes on rejoin: back to the lowest of its own, the
/// peer's (when the peer has the group), the last entry the rejoin kept, and just before
/// `redo_from` (the earliest kept entry whose outcome was quarantined, see
/// [`align_after_rejoin`]). `None` when it stays.
pub fn rejoin_position(
    local: &GroupInfo,
    peer: Option<&GroupInfo>,
    kept: StreamId,
    redo_from: Option<StreamId>,
) -> Option<StreamId> {
    let mut to = local.last_delivered.min(kept);
    if let Some(p) = peer {
        to = to.min(p.last_delivered);
    }
    if let Some(r) = redo_from {
        to = to.min(just_before(r));
    }
    (to < local.last_delivered).then_some(to)
}

/// The highest id below `id`: a group positioned there delivers `id` next.
fn just_before(id: StreamId) -> StreamId {
    match (id.ms, id.seq) {
        (0, 0) => StreamId::ZERO,
        (ms, 0) => StreamId {
            ms: ms - 1,
            seq: u64::MAX,
        },
        (ms, seq) => StreamId { ms, seq: seq - 1 },
    }
}

/// On rejoin, after the divergent tail was set aside: the local groups must not claim
/// more work done than what the region still holds the outcome of.
///
/// A handler here may have acknowledged an entry (and moved the position past it) in the
/// same step that appended events which were just quarantined. Left as it is, that entry
/// would never be handled again if this region were promoted before the next group sync
/// (the order stays where it was, forever). Neither the last kept entry nor the peer's
/// position is a bound for that: the entry is kept, and the peer may have handled it too,
/// with an outcome not copied here yet (chaos seed 6007: an order stuck PAID). So
/// `redo_from`, the earliest kept entry that caused a quarantined event, is delivered
/// again: every position goes back before it (handlers are idempotent; a redelivery of
/// what was done costs a lookup). See [`rejoin_position`] for the other bounds.
///
/// Every entry the peer still has pending, up to `kept`, is pending here again under the
/// peer's consumer. Nothing is acknowledged here: that waits for the copy, as in the
/// normal sync. Returns how many groups changed.
pub async fn align_after_rejoin(
    local: &Link,
    peer: &Link,
    stream: &str,
    kept: StreamId,
    redo_from: Option<StreamId>,
) -> Result<usize, LinkError> {
    let theirs = groups(peer, stream).await?;
    let ours = groups(local, stream).await?;
    let mut changed = 0;
    for l in &ours {
        let p = theirs.iter().find(|p| p.name == l.name);
        let position = rejoin_position(l, p, kept, redo_from);
        let claim = match p {
            Some(_) => {
                let (peer_pel, local_pel) = tokio::try_join!(
                    pending(peer, stream, &l.name),
                    pending(local, stream, &l.name)
                )?;
                plan_pel(&peer_pel, &local_pel, kept).claim
            }
            None => BTreeMap::new(),
        };
        if position.is_none() && claim.is_empty() {
            continue;
        }
        let mut pipe = crate::link::pipeline();
        pipe.atomic();
        if let Some(to) = position {
            pipe.cmd("XGROUP")
                .arg("SETID")
                .arg(stream)
                .arg(&l.name)
                .arg(to.to_string());
        }
        for cmd in claim_commands(stream, &l.name, &claim) {
            pipe.add_command(redis::cmd(&cmd[0]).arg(&cmd[1..]).clone());
        }
        for r in local.pipeline(&pipe).await? {
            if let Value::ServerError(e) = r {
                return Err(LinkError::Command {
                    side: "local",
                    source: e.into(),
                });
            }
        }
        let claimed: usize = claim.values().map(Vec::len).sum();
        tracing::info!(
            stream,
            group = %l.name,
            from = %l.last_delivered,
            to = ?position.map(|p| p.to_string()),
            pending_again = claimed,
            redo_from = ?redo_from.map(|r| r.to_string()),
            "rejoin: consumer group set back to the active peer's progress"
        );
        changed += 1;
    }
    Ok(changed)
}

/// The XCLAIM commands that make `claim`'s entries pending under their consumers with
/// their delivery counts. FORCE creates the pending entry even though the entry was
/// never delivered here; JUSTID with RETRYCOUNT keeps the peer's delivery count.
fn claim_commands(
    stream: &str,
    group: &str,
    claim: &BTreeMap<(String, i64), Vec<StreamId>>,
) -> Vec<Vec<String>> {
    let mut cmds = Vec::new();
    for ((consumer, deliveries), ids) in claim {
        for chunk in ids.chunks(1000) {
            let mut cmd = vec![
                "XCLAIM".to_string(),
                stream.to_string(),
                group.to_string(),
                consumer.clone(),
                "0".to_string(),
            ];
            cmd.extend(chunk.iter().map(ToString::to_string));
            cmd.extend(
                ["RETRYCOUNT", &deliveries.to_string(), "FORCE", "JUSTID"].map(String::from),
            );
            cmds.push(cmd);
        }
    }
    cmds
}

async fn groups(link: &Link, stream: &str) -> Result<Vec<GroupInfo>, LinkError> {
    let v = match link
        .query(redis::cmd("XINFO").arg("GROUPS").arg(stream))
        .await
    {
        Ok(v) => v,
        Err(LinkError::Command { source, .. }) if crate::replication::is_no_such_key(&source) => {
            return Ok(Vec::new())
        }
        Err(e) => return Err(e),
    };
    let items = reply::array(&v).ok_or(LinkError::Reply {
        side: link.side().as_str(),
        what: "XINFO GROUPS",
    })?;
    let mut out = Vec::new();
    for g in items {
        let p = reply::pairs(g);
        let (Some(name), Some(last)) = (
            reply::field(&p, "name").and_then(reply::string),
            reply::field(&p, "last-delivered-id").and_then(reply::stream_id),
        ) else {
            return Err(LinkError::Reply {
                side: link.side().as_str(),
                what: "XINFO GROUPS entry",
            });
        };
        let entries_read = reply::field(&p, "entries-read").and_then(reply::int);
        out.push(GroupInfo {
            name,
            last_delivered: last,
            entries_read,
        });
    }
    Ok(out)
}

const PEL_PAGE: usize = 10_000;

async fn pending(link: &Link, stream: &str, group: &str) -> Result<Vec<Pending>, LinkError> {
    let mut out = Vec::new();
    let mut start = "-".to_string();
    loop {
        let v = link
            .query(
                redis::cmd("XPENDING")
                    .arg(stream)
                    .arg(group)
                    .arg(&start)
                    .arg("+")
                    .arg(PEL_PAGE),
            )
            .await?;
        let items = reply::array(&v).ok_or(LinkError::Reply {
            side: link.side().as_str(),
            what: "XPENDING",
        })?;
        for it in items {
            let f = reply::array(it).unwrap_or_default();
            let (Some(id), Some(consumer), Some(deliveries)) = (
                f.first().and_then(reply::stream_id),
                f.get(1).and_then(reply::string),
                f.get(3).and_then(reply::int),
            ) else {
                return Err(LinkError::Reply {
                    side: link.side().as_str(),
                    what: "XPENDING entry",
                });
            };
            out.push(Pending {
                id,
                consumer,
                deliveries,
            });
        }
        match out.last() {
            Some(last) if items.len() == PEL_PAGE => start = format!("({}", last.id),
            _ => return Ok(out),
        }
    }
}

/// The XPENDING summary (count, min, max, per-consumer counts) of each group, raw.
async fn summaries(link: &Link, stream: &str, names: &[&str]) -> Result<Vec<Value>, LinkError> {
    if names.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = crate::link::pipeline();
    for g in names {
        pipe.cmd("XPENDING").arg(stream).arg(*g);
    }
    link.pipeline(&pipe).await
}

/// The group task.
pub async fn run(shared: Arc<Shared>, local: Arc<Link>, peer: Arc<Link>) {
    let interval = Duration::from_millis(shared.config.group_interval_ms);
    let max_backoff = shared.config.max_backoff();
    let mut backoff = retry_policy(max_backoff);
    let mut gate = shared.gate.subscribe();
    let mut stop = shared.shutdown_signal();
    let mut last_full: Option<Instant> = None;
    loop {
        tokio::select! {
            r = gate.wait_for(|g| g.is_copy()) => if r.is_err() { return },
            _ = stop.wait_for(|s| *s) => return,
        }
        let full = last_full.is_none_or(|t| t.elapsed() >= Duration::from_secs(1));
        let started = Instant::now();
        let streams = shared.streams.borrow().clone();
        let mut failed = false;
        for s in &streams {
            if let Err(e) = sync_stream(&shared, &local, &peer, s, full).await {
                shared.failed("groups", &e);
                if !e.is_unreachable() {
                    tracing::warn!(stream = %s, error = %e, "consumer group sync failed");
                }
                failed = true;
                break;
            }
        }
        shared
            .metrics
            .group_sync_duration
            .observe(started.elapsed().as_secs_f64());
        let delay = if failed {
            backoff.next().unwrap_or(max_backoff)
        } else {
            backoff = retry_policy(max_backoff);
            if full {
                last_full = Some(Instant::now());
            }
            interval
        };
        if !shared.sleep(delay).await {
            return;
        }
    }
}

/// Waits (up to `wait`) until the copier has written every peer entry up to `id` into
/// `stream`; returns the local top, or `None` when that has not happened yet.
async fn copied_up_to(
    shared: &Shared,
    peer: &Link,
    stream: &str,
    id: StreamId,
    wait_for: Duration,
) -> Result<Option<StreamId>, LinkError> {
    let mut rx = shared.copied.subscribe();
    let reached = async {
        let m = rx
            .wait_for(|m| m.get(stream).is_some_and(|top| *top >= id))
            .await
            .ok()?;
        m.get(stream).copied()
    };
    if let Ok(Some(top)) = tokio::time::timeout(wait_for, reached).await {
        return Ok(Some(top));
    }
    let Some(top) = shared.copied.borrow().get(stream).copied() else {
        return Ok(None);
    };
    // The position may point at an entry the peer no longer holds (deleted after it was
    // delivered): then nothing between the copied top and the position is missing.
    let v = peer
        .query(
            redis::cmd("XRANGE")
                .arg(stream)
                .arg(format!("({top}"))
                .arg(id.to_string())
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    Ok(reply::array(&v)
        .is_some_and(|a| a.is_empty())
        .then_some(top))
}

/// The id of the last entry of `stream` on `link` (`None` when it holds none).
async fn stream_top(link: &Link, stream: &str) -> Result<Option<StreamId>, LinkError> {
    let v = link
        .query(
            redis::cmd("XREVRANGE")
                .arg(stream)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1),
        )
        .await?;
    Ok(reply::array(&v)
        .and_then(|a| a.first().and_then(reply::array))
        .and_then(|e| e.first().and_then(reply::stream_id)))
}

/// How long a round waits for the copier to reach the peer's top before it gives up
/// (and tries again next round).
const COPY_WAIT: Duration = Duration::from_millis(300);

async fn sync_stream(
    shared: &Shared,
    local: &Link,
    peer: &Link,
    stream: &str,
    full: bool,
) -> Result<(), LinkError> {
    // 1. Everything read from the peer first: its groups, and the pending lists that may
    //    need syncing.
    let theirs = groups(peer, stream).await?;
    shared.reached(peer.side());
    let ours = groups(local, stream).await?;
    let ours_by_name: HashMap<&str, &GroupInfo> =
        ours.iter().map(|g| (g.name.as_str(), g)).collect();
    let names: Vec<&str> = theirs.iter().map(|g| g.name.as_str()).collect();
    let local_names: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| ours_by_name.contains_key(n))
        .collect();
    let (peer_sum, local_sum) = tokio::try_join!(
        summaries(peer, stream, &names),
        summaries(local, stream, &local_names)
    )?;
    let local_sum: HashMap<&str, &Value> =
        local_names.iter().copied().zip(local_sum.iter()).collect();
    let mut peer_pels: HashMap<&str, Vec<Pending>> = HashMap::new();
    for (i, g) in theirs.iter().enumerate() {
        let moved = ours_by_name.get(g.name.as_str()).is_none_or(|l| {
            l.last_delivered != g.last_delivered || l.entries_read != g.entries_read
        });
        let same_summary = local_sum
            .get(g.name.as_str())
            .is_some_and(|l| Some(*l) == peer_sum.get(i));
        if moved || full || !same_summary {
            peer_pels.insert(g.name.as_str(), pending(peer, stream, &g.name).await?);
        }
    }

    // 2. The peer's stream top, read after all of that: a handler acknowledges an entry
    //    (or moves a position) in the same atomic step that appends its events, so
    //    every event behind what was read above is at or below this top.
    // 3. Nothing is applied until the local stream holds the peer's up to that top. An
    //    acknowledgement or a position applied earlier would, after a takeover, mark an
    //    entry handled whose resulting events the standby never received.
    let top = match stream_top(peer, stream).await? {
        None => StreamId::default(),
        Some(peer_top) => match copied_up_to(shared, peer, stream, peer_top, COPY_WAIT).await? {
            Some(top) => top,
            None => {
                tracing::debug!(stream, %peer_top, "copy not at the peer's top yet; group positions wait");
                return Ok(());
            }
        },
    };

    // 4. Each group's position and pending entries in one transaction, so a round cut
    //    short (the peer or our Redis gone) never leaves a position without its
    //    pending entries.
    let mut synced = serde_json::Map::new();
    let mut any_change = false;
    for g in &theirs {
        synced.insert(
            g.name.clone(),
            serde_json::json!({"lastDeliveredId": g.last_delivered.to_string(), "entriesRead": g.entries_read}),
        );
        let mut position = None;
        match ours_by_name.get(g.name.as_str()) {
            None => {
                let mut cmd = vec![
                    "XGROUP".to_string(),
                    "CREATE".to_string(),
                    stream.to_string(),
                    g.name.clone(),
                    g.last_delivered.to_string(),
                    "MKSTREAM".to_string(),
                ];
                if let Some(n) = g.entries_read {
                    cmd.extend(["ENTRIESREAD".to_string(), n.to_string()]);
                }
                position = Some(cmd);
            }
            Some(l) if l.last_delivered != g.last_delivered || l.entries_read != g.entries_read => {
                let mut cmd = vec![
                    "XGROUP".to_string(),
                    "SETID".to_string(),
                    stream.to_string(),
                    g.name.clone(),
                    g.last_delivered.to_string(),
                ];
                if let Some(n) = g.entries_read {
                    cmd.extend(["ENTRIESREAD".to_string(), n.to_string()]);
                }
                position = Some(cmd);
            }
            Some(_) => {}
        }
        let plan = match peer_pels.get(g.name.as_str()) {
            Some(p) => {
                let l = if ours_by_name.contains_key(g.name.as_str()) {
                    pending(local, stream, &g.name).await?
                } else {
                    Vec::new()
                };
                plan_pel(p, &l, top)
            }
            None => PelPlan::default(),
        };
        if position.is_none() && plan.is_empty() {
            continue;
        }
        if !apply(shared, local, stream, &g.name, position, &plan).await? {
            // The local region took over: whatever else this round read is stale.
            return Ok(());
        }
        if !ours_by_name.contains_key(g.name.as_str()) {
            tracing::info!(stream, group = %g.name, last_delivered = %g.last_delivered, "created consumer group");
        }
        shared.metrics.group_syncs.inc();
        any_change = true;
    }

    // A group the peer no longer has was destroyed there.
    for l in &ours {
        if !names.contains(&l.name.as_str()) {
            let destroy = ["XGROUP", "DESTROY", stream, &l.name].map(String::from);
            if !guarded(local, &[destroy.to_vec()]).await? {
                return Ok(());
            }
            tracing::info!(stream, group = %l.name, "destroyed consumer group the peer no longer has");
            shared.metrics.group_syncs.inc();
            any_change = true;
        }
    }
    if any_change {
        // For operators: the group positions this region last took from the peer.
        local
            .query(
                redis::cmd("HSET")
                    .arg(keys::REPLICATION_CHECKPOINT)
                    .arg(format!("groups:{stream}"))
                    .arg(serde_json::Value::Object(synced).to_string()),
            )
            .await?;
    }
    shared.reached(local.side());
    Ok(())
}

/// KEYS: role, promotion intent. ARGV[1]: a JSON array of commands (each an array of
/// strings). Runs them only while the local region is neither active nor being promoted,
/// and returns `{'applied'}` or `{'fenced', why}`. The round read the peer's groups
/// hundreds of milliseconds earlier (it waits for the copier): without this check a
/// round that straddles a local promotion would hand the new active region pending
/// entries owned by the peer's consumers, or move a position its handlers already
/// passed. A promotion records its intent before anything else, so a write that runs
/// before the intent is there is taken over by the promotion like any other.
/// `pcall` runs every command even after one failed, as MULTI/EXEC would; the first
/// error is returned.
static GUARDED: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local role = redis.call('HMGET', KEYS[1], 'role', 'epoch')
if role[1] == 'active' then return {'fenced', 'local region is active'} end
local intent = tonumber(redis.call('HGET', KEYS[2], 'epoch') or '0')
if intent > tonumber(role[2] or '0') then return {'fenced', 'promotion in progress'} end
local first_error = nil
for _, cmd in ipairs(cjson.decode(ARGV[1])) do
  local r = redis.pcall(unpack(cmd))
  if type(r) == 'table' and r.err and not first_error then first_error = r.err end
end
if first_error then return redis.error_reply(first_error) end
return {'applied'}
",
    )
});

/// Runs `cmds` on the local Redis through [`GUARDED`]; `Ok(false)` when the local
/// region is active or being promoted (nothing was written).
async fn guarded(local: &Link, cmds: &[Vec<String>]) -> Result<bool, LinkError> {
    let arg = serde_json::to_vec(cmds).expect("strings serialize");
    let v = local
        .script(&GUARDED, &[keys::ROLE, keys::PROMOTION_INTENT], &[arg])
        .await?;
    let reply = reply::array(&v).unwrap_or_default();
    match reply.first().and_then(reply::string).as_deref() {
        Some("applied") => Ok(true),
        _ => {
            let why = reply.get(1).and_then(reply::string).unwrap_or_default();
            tracing::info!(reason = %why, "consumer group sync skipped: the local region took over");
            Ok(false)
        }
    }
}

/// Writes a group's new position (create or SETID) and its pending-list changes in one
/// script, fenced by the local role ([`GUARDED`]). `Ok(false)` when fenced.
async fn apply(
    shared: &Shared,
    local: &Link,
    stream: &str,
    group: &str,
    position: Option<Vec<String>>,
    plan: &PelPlan,
) -> Result<bool, LinkError> {
    let mut cmds: Vec<Vec<String>> = Vec::new();
    cmds.extend(position);
    for ids in plan.ack.chunks(1000) {
        let mut cmd = vec!["XACK".to_string(), stream.to_string(), group.to_string()];
        cmd.extend(ids.iter().map(ToString::to_string));
        cmds.push(cmd);
    }
    cmds.extend(claim_commands(stream, group, &plan.claim));
    if !guarded(local, &cmds).await? {
        return Ok(false);
    }
    let claimed: usize = plan.claim.values().map(Vec::len).sum();
    shared
        .metrics
        .pending_entries_synced
        .with_label_values(&["ack"])
        .inc_by(plan.ack.len() as u64);
    shared
        .metrics
        .pending_entries_synced
        .with_label_values(&["claim"])
        .inc_by(claimed as u64);
    tracing::debug!(
        stream,
        group,
        acked = plan.ack.len(),
        claimed,
        "pending entries synced"
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(ms: u64, consumer: &str, deliveries: i64) -> Pending {
        Pending {
            id: StreamId { ms, seq: 0 },
            consumer: consumer.into(),
            deliveries,
        }
    }

    #[test]
    fn plan_claims_missing_and_moved_and_acks_gone() {
        let peer = vec![p(1, "c1", 1), p(2, "c2", 1), p(3, "c1", 2), p(9, "c1", 1)];
        let local = vec![p(1, "c1", 1), p(2, "c1", 1), p(4, "c1", 1)];
        let plan = plan_pel(&peer, &local, StreamId { ms: 5, seq: 0 });
        assert_eq!(plan.ack, vec![StreamId { ms: 4, seq: 0 }]);
        assert_eq!(
            plan.claim.get(&("c2".into(), 1)),
            Some(&vec![StreamId { ms: 2, seq: 0 }])
        );
        assert_eq!(
            plan.claim.get(&("c1".into(), 2)),
            Some(&vec![StreamId { ms: 3, seq: 0 }])
        );
        // id 9 is not copied yet
        assert_eq!(plan.claim.len(), 2);
    }

    #[test]
    fn rejoin_sets_a_position_back_to_the_lowest_of_ours_theirs_and_what_was_kept() {
        let g = |ms: u64| GroupInfo {
            name: "orders".into(),
            last_delivered: StreamId { ms, seq: 0 },
            entries_read: None,
        };
        let kept = StreamId { ms: 50, seq: 0 };
        // Ahead of what was kept (the tail is gone): back to the kept top.
        assert_eq!(
            rejoin_position(&g(80), Some(&g(90)), kept, None),
            Some(kept)
        );
        // Ahead of the peer within the kept prefix: back to the peer's.
        assert_eq!(
            rejoin_position(&g(40), Some(&g(30)), kept, None),
            Some(StreamId { ms: 30, seq: 0 })
        );
        // At or behind both: stays.
        assert_eq!(rejoin_position(&g(30), Some(&g(40)), kept, None), None);
        assert_eq!(rejoin_position(&g(30), None, kept, None), None);
    }

    #[test]
    fn rejoin_delivers_again_a_kept_entry_whose_outcome_was_quarantined() {
        let g = |ms: u64| GroupInfo {
            name: "shipments".into(),
            last_delivered: StreamId { ms, seq: 0 },
            entries_read: None,
        };
        let kept = StreamId { ms: 50, seq: 0 };
        // Both regions handled entry 40 (ours and the peer's positions are past it), but
        // what this region appended for it was quarantined: 40 is delivered again.
        let cause = StreamId { ms: 40, seq: 0 };
        assert_eq!(
            rejoin_position(&g(45), Some(&g(48)), kept, Some(cause)),
            Some(StreamId {
                ms: 39,
                seq: u64::MAX
            })
        );
        assert_eq!(
            rejoin_position(
                &g(45),
                Some(&g(48)),
                kept,
                Some(StreamId { ms: 40, seq: 3 })
            ),
            Some(StreamId { ms: 40, seq: 2 })
        );
        // A group not past the cause yet stays where it is.
        assert_eq!(
            rejoin_position(&g(30), Some(&g(48)), kept, Some(cause)),
            None
        );
        assert_eq!(just_before(StreamId::ZERO), StreamId::ZERO);
    }

    #[test]
    fn equal_lists_need_nothing() {
        let l = vec![p(1, "c1", 1)];
        assert!(plan_pel(&l, &l, StreamId { ms: 1, seq: 0 }).is_empty());
    }
}

//! Promotion of this region to active at a new epoch (DESIGN.md section 4).
//!
//! The order of the steps is the protocol:
//! 1. refuse an epoch not above the stored one, and refuse while the projection is
//!    halted (the state would not be the log's);
//! 2. record the intent in this region's Redis, so an old active that keeps itself
//!    alive by confirming through our Redis sees a higher epoch coming and fences, and
//!    so the local replicator stops copying;
//! 3. apply every replicated event (the read models are then exact);
//! 4. take over the pending entries of every consumer group (copied from the peer)
//!    so in-flight orders resume exactly where the old active stopped;
//! 5. make sure the peer has not moved past us meanwhile;
//! 6. in one atomic script: check the intent still stands and the projection has
//!    reached the end of the stream, record where each stream stands (the epoch's start
//!    offsets, which tell a returning region which of its events the new active never
//!    received), store the new role and drop the intent. Handlers start.
//!
//! A promotion never becomes active on an incomplete projection: if events keep
//! arriving or applying them is slow, step 6 refuses and step 3 runs again, within the
//! promotion's time limit; past it the promotion fails, clears its intent, and the
//! region stays standby for the gateway to try again.
//!
//! A promotion runs as its own task (see `jobs`): a caller that goes away does not
//! stop it halfway. If the node dies halfway, the intent expires by itself.

use crate::bus::{ensure_group, Group};
use crate::projector::{self, Halt, ProjectError};
use crate::store::{Store, StoreError};
use crate::workflow::Workflow;
use eventlog::{keys, Role};
use redis::Script;
use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

/// Long enough for an old active polling our Redis to see the intent and fence: its
/// view of us is at most `roles::VOUCH_TTL` (100 ms) old when it opens its write window
/// in its Redis, and the window ends that much after the script reaches Redis. The
/// margin above 100 ms is for that script's trip, which a loaded machine stretches (a
/// chaos campaign at load 17 saw an old active commit 24 ms into the new epoch with a
/// 50 ms margin and the reading timed from its reply).
const INTENT_GRACE: Duration = Duration::from_millis(250);
/// The intent outlives the promotion's time limit by this much; after that it lapses.
const INTENT_MARGIN: Duration = Duration::from_secs(5);
/// How long past its limit a promotion may wait on a Redis that does not answer.
const BACKSTOP: Duration = Duration::from_secs(2);
/// How long to wait before the last step again while a rebuild holds the region.
const REBUILD_WAIT: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PromotionError {
    #[error("epoch {requested} is stale: the region is at epoch {stored}")]
    StaleEpoch { requested: u64, stored: u64 },
    #[error("the standby's projection is halted, so its state is not the log's: {0}")]
    ProjectionHalted(Halt),
    #[error("the peer region is at (or being promoted to) epoch {peer}, not below {requested}: another promotion won")]
    Superseded { requested: u64, peer: u64 },
    #[error("the promotion's intent lapsed before it took effect")]
    IntentLapsed,
    #[error("the projection did not reach the end of the event stream within {0:?}")]
    TimedOut(Duration),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<ProjectError> for PromotionError {
    fn from(e: ProjectError) -> Self {
        match e {
            ProjectError::Store(e) => PromotionError::Store(e),
            ProjectError::Halted(h) => PromotionError::ProjectionHalted(h),
        }
    }
}

/// Promotes this region to active at `epoch`, or fails and leaves it as it was (no
/// intent behind), within `limit`. `not_after` is the caller's bound (wall clock) of the
/// write window the promotion opens by itself: a gateway sharing control through etcd
/// sends the end of its control, so no window it opens outlives it (see `Roles::promoted`).
pub async fn promote(
    wf: &Workflow,
    epoch: u64,
    limit: Duration,
    not_after: Option<SystemTime>,
) -> Result<(), PromotionError> {
    // The limit itself is enforced by the last step's script against Redis' clock, so
    // the outcome is Redis' word: a promotion cut short here while its last script is
    // in flight could otherwise take effect after being reported failed. This timeout is
    // only the backstop for a Redis that stopped answering.
    let result =
        match tokio::time::timeout(limit + BACKSTOP, promote_steps(wf, epoch, limit, not_after))
            .await
        {
            Ok(r) => r,
            Err(_) => Err(PromotionError::TimedOut(limit)),
        };
    if let Err(e) = &result {
        tracing::warn!(epoch, error = %e, "promotion failed; the region stays as it was");
        // An aborted promotion must not leave its intent behind: the replicator holds
        // copying while an intent above both regions' epochs stands.
        let cleared: Result<i64, _> = wf
            .store
            .query(
                redis::cmd("EVAL")
                    .arg("if redis.call('HGET', KEYS[1], 'epoch') == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")
                    .arg(1)
                    .arg(keys::PROMOTION_INTENT)
                    .arg(epoch),
            )
            .await;
        if let Err(e) = cleared {
            tracing::warn!(error = %e, epoch, "could not clear the intent of an aborted promotion; it expires by itself");
        }
    }
    result
}

async fn promote_steps(
    wf: &Workflow,
    epoch: u64,
    limit: Duration,
    not_after: Option<SystemTime>,
) -> Result<(), PromotionError> {
    let stored = wf.store.role().await?;
    if let Some(r) = stored {
        if r.role == Role::Active && r.epoch.0 == epoch {
            return Ok(());
        }
        if epoch <= r.epoch.0 {
            return Err(PromotionError::StaleEpoch {
                requested: epoch,
                stored: r.epoch.0,
            });
        }
    }
    if let Some(halt) = wf.projection.halted() {
        return Err(PromotionError::ProjectionHalted(halt));
    }
    let now = eventlog::time::rfc3339_ms(eventlog::time::now_ms());
    let mut intent = INTENT.prepare_invoke();
    intent
        .key(keys::PROMOTION_INTENT)
        .arg(epoch)
        .arg(&wf.region)
        .arg(&now)
        .arg((limit + INTENT_MARGIN).as_millis() as u64)
        .arg(limit.as_millis() as u64);
    let higher: u64 = wf.store.invoke(&intent).await?;
    if higher > 0 {
        return Err(PromotionError::StaleEpoch {
            requested: epoch,
            stored: higher,
        });
    }
    if stored.is_some_and(|r| r.role == Role::Standby) {
        tokio::time::sleep(INTENT_GRACE).await;
    }

    for group in Group::ALL {
        ensure_group(&wf.store, group).await?;
    }
    loop {
        catch_up(&wf.store).await?;
        take_over_all(wf).await?;
        // A peer demoted at this epoch (a planned switchover) is fine; a peer active at
        // it or above, or promoting itself to it, means another promotion won.
        if let Some(peer) = wf.roles.peer_status().await {
            let active = if peer.role == Some(Role::Active) {
                peer.epoch
            } else {
                0
            };
            let theirs = active.max(peer.intent_epoch);
            if theirs >= epoch {
                return Err(PromotionError::Superseded {
                    requested: epoch,
                    peer: theirs,
                });
            }
        }
        let mut take = PROMOTE.prepare_invoke();
        take.key(keys::ROLE)
            .key(keys::PROMOTION_INTENT)
            .key(keys::EPOCHS)
            .key(keys::EVENTS)
            .key(keys::DLQ)
            .key(keys::PROJECTION_CURSOR)
            .arg(epoch)
            .arg(&wf.region)
            .arg(&now)
            .arg(crate::roles::PROMOTION_GRACE.as_millis() as u64)
            .arg(not_after.map_or(0, crate::roles::unix_ms));
        let reply: Vec<String> = wf.store.invoke(&take).await?;
        match reply.first().map(String::as_str) {
            Some("ok") => break,
            // Replicated events arrived after the catch-up (a batch in flight when the
            // intent was written): apply them too, then try again.
            Some("behind") => continue,
            // A rebuild is replacing the derived state: handlers must not start on it.
            Some("rebuilding") => tokio::time::sleep(REBUILD_WAIT).await,
            Some("expired") => return Err(PromotionError::TimedOut(limit)),
            Some("intent_lapsed") => return Err(PromotionError::IntentLapsed),
            _ => {
                return Err(PromotionError::StaleEpoch {
                    requested: epoch,
                    stored: reply.get(1).and_then(|s| s.parse().ok()).unwrap_or(0),
                })
            }
        }
    }
    wf.roles.promoted(epoch, not_after).await;
    // Entries a late group sync handed to the old active's consumers: ours now.
    take_over_all(wf).await?;
    tracing::info!(epoch, "promoted to active");
    Ok(())
}

/// Applies replicated events until the derived state reflects the whole stream as it
/// is now. A halted projection fails the promotion.
async fn catch_up(store: &Store) -> Result<(), ProjectError> {
    loop {
        let last = store.last_id(keys::EVENTS).await?;
        let cursor = store
            .get(keys::PROJECTION_CURSOR)
            .await?
            .unwrap_or_else(|| "0-0".into());
        if cursor == last {
            return Ok(());
        }
        projector::project_batch(store, store).await?;
    }
}

async fn take_over_all(wf: &Workflow) -> Result<(), StoreError> {
    for group in Group::ALL {
        let taken = take_over_pending(&wf.store, group, &wf.consumer).await?;
        if taken > 0 {
            tracing::info!(
                group = group.name(),
                entries = taken,
                "took over in-flight entries at promotion"
            );
        }
    }
    Ok(())
}

/// Moves every pending entry of the group to this node's consumer, which reads its
/// own pending entries first when it starts (XREADGROUP from id 0).
async fn take_over_pending(
    store: &Store,
    group: Group,
    consumer: &str,
) -> Result<usize, StoreError> {
    let mut start = "0-0".to_string();
    let mut taken = 0;
    loop {
        let reply: redis::streams::StreamAutoClaimReply = store
            .query(
                redis::cmd("XAUTOCLAIM")
                    .arg(keys::EVENTS)
                    .arg(group.name())
                    .arg(consumer)
                    .arg(0)
                    .arg(&start)
                    .arg("COUNT")
                    .arg(1000)
                    .arg("JUSTID"),
            )
            .await?;
        taken += reply.claimed.len();
        if reply.next_stream_id == "0-0" {
            return Ok(taken);
        }
        start = reply.next_stream_id;
    }
}

/// KEYS: intent. ARGV: epoch, region, at, ttl ms, limit ms. Records the intent unless a
/// higher one stands (then returns its epoch; 0 when recorded), with the promotion's
/// deadline by Redis' clock (now + limit), which the last step checks.
static INTENT: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local cur = tonumber(redis.call('HGET', KEYS[1], 'epoch') or '0')
if cur > tonumber(ARGV[1]) then return cur end
local t = redis.call('TIME')
local deadline = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) + tonumber(ARGV[5])
redis.call('HSET', KEYS[1], 'epoch', ARGV[1], 'region', ARGV[2], 'at', ARGV[3], 'deadline', deadline)
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 0
"#,
    )
});

/// KEYS: role, intent, epochs, events, dlq, projection cursor. ARGV: epoch, region, at,
/// grace ms, bound (unix ms, 0 for none). The promotion's last step, atomic: the intent
/// must still stand and its deadline not have passed, no rebuild may be running, the
/// epoch must be allowed and the projection must have reached the stream's end; then the
/// epoch's start offsets are recorded, the role stored with a write window of `grace`
/// (until the gateway's first lease) that ends by `bound` at the latest (already closed
/// when `bound` has passed), and the intent dropped.
static PROMOTE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r#"
local intent = redis.call('HMGET', KEYS[2], 'epoch', 'deadline')
if intent[1] ~= ARGV[1] then return {'intent_lapsed'} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now > tonumber(intent[2] or '0') then return {'expired'} end
if tonumber(redis.call('HGET', KEYS[1], 'paused') or '0') > now then return {'rebuilding'} end
local cur = redis.call('HMGET', KEYS[1], 'role', 'epoch')
local stored = tonumber(cur[2] or '0')
local want = tonumber(ARGV[1])
if not (want > stored or (want == stored and cur[1] == 'active')) then
  return {'stale', tostring(stored)}
end
local function top(key)
  local last = redis.call('XREVRANGE', key, '+', '-', 'COUNT', 1)
  if #last == 0 then return '0-0' end
  return last[1][1]
end
local events = top(KEYS[4])
local cursor = redis.call('GET', KEYS[6]) or '0-0'
if cursor ~= events then return {'behind', cursor, events} end
local record = '{"at":"' .. ARGV[3] .. '","region":"' .. ARGV[2] .. '","startOffsets":{"'
  .. KEYS[5] .. '":"' .. top(KEYS[5]) .. '","' .. KEYS[4] .. '":"' .. events .. '"}}'
redis.call('HSET', KEYS[3], ARGV[1], record)
local window_end = now + tonumber(ARGV[4])
local bound = tonumber(ARGV[5])
if bound > 0 and bound < window_end then window_end = bound end
redis.call('HSET', KEYS[1], 'role', 'active', 'epoch', ARGV[1], 'write_until', window_end)
redis.call('HDEL', KEYS[1], 'demoted_from')
redis.call('DEL', KEYS[2])
return {'ok'}
"#,
    )
});

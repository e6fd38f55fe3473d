//! Promotion of this region to active at a new epoch (DESIGN.md section 4).
//!
//! The order of the steps is the protocol:
//! 1. refuse an epoch not above the stored one;
//! 2. record the intent in this region's Redis, so an old active that keeps itself
//!    alive by confirming through our Redis sees a higher epoch coming and fences;
//! 3. finish applying every replicated event (the read models are then exact);
//! 4. record where each stream stood: the epoch's start offsets, which tell a
//!    returning region which of its events the new active never received;
//! 5. take over the pending entries of every consumer group (copied from the peer)
//!    so in-flight orders resume exactly where the old active stopped;
//! 6. store the new role; handlers start.

use crate::bus::{ensure_group, Group};
use crate::projector;
use crate::roles::RoleError;
use crate::store::{Store, StoreError};
use crate::workflow::Workflow;
use eventlog::{keys, Role};
use serde_json::json;
use std::time::{Duration, Instant};

/// Long enough for an old active polling our Redis to see the intent and fence: its
/// view of us is at most `roles::VOUCH_TTL` (100 ms) old when it writes.
const INTENT_GRACE: Duration = Duration::from_millis(150);
const CATCH_UP_LIMIT: Duration = Duration::from_secs(10);

pub async fn promote(wf: &Workflow, epoch: u64) -> Result<(), RoleError> {
    let result = promote_steps(wf, epoch).await;
    if result.is_err() {
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
            tracing::warn!(error = %e, epoch, "could not clear the intent of an aborted promotion");
        }
    }
    result
}

async fn promote_steps(wf: &Workflow, epoch: u64) -> Result<(), RoleError> {
    let stored = wf.store.role().await?;
    if let Some(r) = stored {
        if r.role == Role::Active && r.epoch.0 == epoch {
            return Ok(());
        }
        if epoch <= r.epoch.0 {
            return Err(RoleError::StaleEpoch {
                requested: epoch,
                stored: r.epoch.0,
            });
        }
    }
    let now = eventlog::time::rfc3339_ms(eventlog::time::now_ms());
    let _: i64 = wf
        .store
        .query(
            redis::cmd("HSET")
                .arg(keys::PROMOTION_INTENT)
                .arg("epoch")
                .arg(epoch)
                .arg("region")
                .arg(&wf.region)
                .arg("at")
                .arg(&now),
        )
        .await?;
    let was_standby = stored.is_some_and(|r| r.role == Role::Standby);
    if was_standby {
        tokio::time::sleep(INTENT_GRACE).await;
        catch_up(&wf.store).await?;
    }

    let mut offsets = serde_json::Map::new();
    for stream in [keys::EVENTS, keys::DLQ] {
        offsets.insert(stream.to_string(), json!(wf.store.last_id(stream).await?));
    }
    let record = json!({ "region": wf.region, "startOffsets": offsets, "at": now });
    let _: i64 = wf
        .store
        .query(
            redis::cmd("HSET")
                .arg(keys::EPOCHS)
                .arg(epoch)
                .arg(record.to_string()),
        )
        .await?;

    for group in Group::ALL {
        ensure_group(&wf.store, group).await?;
        let taken = take_over_pending(&wf.store, group, &wf.consumer).await?;
        if taken > 0 {
            tracing::info!(
                group = group.name(),
                entries = taken,
                "took over in-flight entries at promotion"
            );
        }
    }
    wf.roles.transition(Role::Active, epoch).await?;
    tracing::info!(epoch, "promoted to active");
    Ok(())
}

/// Applies replicated events until the derived state reflects the whole stream.
async fn catch_up(store: &Store) -> Result<(), StoreError> {
    let started = Instant::now();
    loop {
        let last = store.last_id(keys::EVENTS).await?;
        let cursor = store
            .get(keys::PROJECTION_CURSOR)
            .await?
            .unwrap_or_else(|| "0-0".into());
        if cursor == last || last == "0-0" {
            return Ok(());
        }
        if started.elapsed() > CATCH_UP_LIMIT {
            tracing::warn!(%cursor, %last, "projection did not catch up in time; promoting anyway, the handlers will finish it");
            return Ok(());
        }
        projector::project_batch(store, store).await?;
    }
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

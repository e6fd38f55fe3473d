//! Derived state from the event log: the standby's projector (applies replicated
//! events as they arrive, so its read models stay warm) and the rebuild from scratch.

use crate::events::DomainEvent;
use crate::projections::{apply, keys_for, MemState};
use crate::roles::Roles;
use crate::store::{Entry, Store, StoreError, Tx};
use eventlog::{keys, roles::fields, Role};
use std::time::Duration;
use tokio::sync::watch;

const BATCH: usize = 256;

/// While the region is standby, applies every new entry of the event stream to the
/// derived state, once (the cursor is compared and moved in the same script).
pub async fn run_standby(
    store: Store,
    blocking: Store,
    roles: Roles,
    mut stop: watch::Receiver<bool>,
) {
    let mut role_rx = roles.subscribe();
    let mut failures = 0u32;
    while !*stop.borrow() {
        let role = roles.current();
        if !role.known || role.role == Role::Active || role.paused {
            tokio::select! {
                _ = role_rx.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let step = tokio::select! {
            r = project_batch(&store, &blocking) => r,
            _ = stop.changed() => break,
        };
        match step {
            Ok(_) => failures = 0,
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(error = %e, "standby projection failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(10)))).await;
            }
        }
    }
}

/// Applies the next batch after the cursor; returns how many entries were applied.
pub async fn project_batch(store: &Store, blocking: &Store) -> Result<usize, StoreError> {
    let mut pipe = redis::pipe();
    pipe.cmd("GET").arg(keys::PROJECTION_CURSOR);
    pipe.cmd("GET").arg(keys::PROJECTION_QUARANTINE_SEEN);
    pipe.cmd("XREVRANGE")
        .arg(keys::QUARANTINE)
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1);
    let (cursor, seen, last_quarantined): (Option<String>, Option<String>, redis::Value) =
        store.query_pipe(&pipe).await?;
    let last_quarantined = Entry::from_range(last_quarantined).pop().map(|e| e.id);
    // Entries leave the event stream only through a quarantine (this region's divergent
    // tail, on rejoin), and the derived state may still reflect them, even have had
    // newer entries applied on top. So a quarantine we have not seen, or a cursor
    // pointing at an entry that is gone, means: rebuild from what the stream holds now.
    let cursor_gone = match cursor.as_deref().filter(|c| *c != "0-0") {
        Some(c) => store.xrange(keys::EVENTS, c, c, 1).await?.is_empty(),
        None => false,
    };
    if cursor_gone || last_quarantined != seen {
        tracing::warn!(
            ?cursor,
            ?last_quarantined,
            "events were quarantined; rebuilding derived state"
        );
        let report = rebuild(store).await?;
        if let Some(q) = &last_quarantined {
            let _: () = store
                .query(
                    redis::cmd("SET")
                        .arg(keys::PROJECTION_QUARANTINE_SEEN)
                        .arg(q),
                )
                .await?;
        }
        return Ok(report.events);
    }
    let reply: redis::Value = blocking
        .query(
            redis::cmd("XREAD")
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(500)
                .arg("STREAMS")
                .arg(keys::EVENTS)
                .arg(cursor.as_deref().unwrap_or("0-0")),
        )
        .await?;
    let entries = Entry::from_read(reply);
    let mut cursor = cursor;
    let mut applied = 0;
    for entry in entries {
        let env = match entry.envelope() {
            Ok(env) => env,
            Err(e) => {
                tracing::error!(entry = %entry.id, error = %e, "unreadable entry in the event stream; skipping it");
                let _: () = store
                    .query(
                        redis::cmd("SET")
                            .arg(keys::PROJECTION_CURSOR)
                            .arg(&entry.id),
                    )
                    .await?;
                cursor = Some(entry.id);
                continue;
            }
        };
        let mut tx = Tx::fresh();
        match DomainEvent::from_envelope(&env) {
            Ok(event) => {
                tx.load(store, keys_for(&event)).await?;
                if let Err(e) = apply(&mut tx, &env, &event) {
                    tracing::error!(entry = %entry.id, error = %e, "cannot apply a replicated event; skipping it");
                    tx = Tx::new();
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "skipping an event type this version does not know")
            }
        }
        if !store
            .apply_entry(&tx, &entry.id, &env, cursor.as_deref())
            .await?
        {
            // Another projector moved the cursor: start again from where it is now.
            return Ok(applied);
        }
        cursor = Some(entry.id);
        applied += 1;
    }
    Ok(applied)
}

/// Rebuilds all derived state from the event stream, byte for byte what the live
/// commits produced. Writes are paused meanwhile (commits wait); each key is replaced
/// atomically, so reads see the old value or the new one.
pub async fn rebuild(store: &Store) -> Result<RebuildReport, StoreError> {
    let _: i64 = store
        .query(
            redis::cmd("HSET")
                .arg(keys::ROLE)
                .arg(fields::PAUSED)
                .arg("1"),
        )
        .await?;
    let result = rebuild_paused(store).await;
    // Unpause even when the rebuild failed: a half-written state is no worse than a
    // stuck region, and a second rebuild repairs it.
    let unpaused: Result<i64, _> = store
        .query(redis::cmd("HDEL").arg(keys::ROLE).arg(fields::PAUSED))
        .await;
    let report = result?;
    unpaused?;
    Ok(report)
}

/// Every derived key that exists now.
async fn scan_derived(store: &Store) -> Result<std::collections::BTreeSet<String>, StoreError> {
    let mut found = std::collections::BTreeSet::new();
    for pattern in keys::DERIVED_PATTERNS {
        let mut cursor = 0u64;
        loop {
            let (next, keys): (u64, Vec<String>) = store
                .query(
                    redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(*pattern)
                        .arg("COUNT")
                        .arg(1000),
                )
                .await?;
            found.extend(keys);
            cursor = next;
            if cursor == 0 {
                break;
            }
        }
    }
    Ok(found)
}

/// Queues the atomic replacement of a hash (`HSET`) or list (`RPUSH`) `key` by `args`:
/// built under a temporary name, then renamed over the key.
fn replace(cmds: &mut Vec<redis::Cmd>, build: &str, key: &str, args: Vec<String>) {
    let tmp = format!("{}rebuild-tmp", keys::PREFIX);
    cmds.push(redis::cmd("DEL").arg(&tmp).clone());
    // In slices, so no single command carries a whole event index.
    for slice in args.chunks(2000) {
        cmds.push(redis::cmd(build).arg(&tmp).arg(slice).clone());
    }
    cmds.push(redis::cmd("RENAME").arg(&tmp).arg(key).clone());
}

#[derive(Debug, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    pub events: usize,
    pub keys: usize,
}

async fn rebuild_paused(store: &Store) -> Result<RebuildReport, StoreError> {
    let mut state = MemState::default();
    let mut start = "-".to_string();
    let mut events = 0;
    loop {
        let batch = store.xrange(keys::EVENTS, &start, "+", 5000).await?;
        let Some(last) = batch.last() else { break };
        start = format!("({}", last.id);
        for entry in &batch {
            match entry.envelope() {
                Ok(env) => state.apply_entry(&entry.id, &env)?,
                Err(e) => {
                    tracing::error!(entry = %entry.id, error = %e, "unreadable entry skipped by rebuild")
                }
            }
            events += 1;
        }
    }

    // Every key is replaced in one atomic command (SET, or RENAME of a hash or list
    // built under a temporary name), never deleted first: a reader during the rebuild
    // sees the old value or the new one, not a gap (a product must not turn "unknown"
    // meanwhile). Keys the new state no longer has are deleted last.
    let mut stale = scan_derived(store).await?;
    let mut cmds: Vec<redis::Cmd> = Vec::new();
    for (key, value) in &state.values {
        stale.remove(key);
        cmds.push(redis::cmd("SET").arg(key).arg(value).clone());
    }
    for (key, counters) in &state.counters {
        stale.remove(key);
        let fields = counters
            .iter()
            .flat_map(|(f, n)| [f.clone(), n.to_string()]);
        replace(&mut cmds, "HSET", key, fields.collect());
    }
    if !state.event_index.is_empty() {
        stale.remove(keys::EVENT_INDEX);
        let fields = state
            .event_index
            .iter()
            .flat_map(|(e, id)| [e.clone(), id.clone()]);
        replace(&mut cmds, "HSET", keys::EVENT_INDEX, fields.collect());
    }
    for (aggregate, ids) in &state.aggregates {
        let key = keys::aggregate(aggregate);
        stale.remove(&key);
        replace(&mut cmds, "RPUSH", &key, ids.clone());
    }
    if let Some(cursor) = &state.cursor {
        stale.remove(keys::PROJECTION_CURSOR);
        cmds.push(
            redis::cmd("SET")
                .arg(keys::PROJECTION_CURSOR)
                .arg(cursor)
                .clone(),
        );
    }
    for key in &stale {
        cmds.push(redis::cmd("UNLINK").arg(key).clone());
    }
    let written = state.values.len() + state.counters.len() + state.aggregates.len() + 1;
    for chunk in cmds.chunks(999) {
        let mut pipe = redis::pipe();
        for cmd in chunk {
            pipe.add_command(cmd.clone()).ignore();
        }
        let _: () = store.query_pipe(&pipe).await?;
    }
    Ok(RebuildReport {
        events,
        keys: written,
    })
}

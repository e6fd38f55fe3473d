//! Derived state from the event log: the standby's projector (applies replicated
//! events as they arrive, so its read models stay warm) and the rebuild from scratch.

use crate::roles::Roles;
use crate::store::{Entry, Store, StoreError, Tx};
use eventlog::{keys, roles::fields, Envelope, Role};
use orders_model::apply::{apply, keys_for, MemState};
use orders_model::DomainEvent;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::watch;

const BATCH: usize = 256;
/// How long a rebuild's pause holds without being extended: a node that dies in the
/// middle of a rebuild leaves the region paused for at most this long.
const PAUSE_LEASE: Duration = Duration::from_secs(5);
/// How often a running rebuild extends its pause.
const PAUSE_RENEW: Duration = Duration::from_secs(1);
/// How often a halted projection tries its entry again (a restart with a newer version,
/// or an operator's repair, lets it pass).
const HALT_RETRY: Duration = Duration::from_secs(2);

/// An entry the projection cannot apply. Skipping it would let the standby's state
/// silently diverge from the active's, so projection stops there until it can go on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("projection halted at entry {entry}: {reason}")]
pub struct Halt {
    /// Stream entry id in `tandem:events`.
    pub entry: String,
    pub reason: String,
}

impl Halt {
    fn at(entry: &Entry, reason: impl std::fmt::Display) -> Halt {
        Halt {
            entry: entry.id.clone(),
            reason: reason.to_string(),
        }
    }
}

/// The envelope of an entry to apply: one that cannot be read halts the projection.
fn envelope(entry: &Entry) -> Result<Envelope, Halt> {
    entry
        .envelope()
        .map_err(|e| Halt::at(entry, format!("unreadable envelope: {e}")))
}

#[derive(Debug, thiserror::Error)]
pub enum ProjectError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Halted(#[from] Halt),
}

/// Why a rebuild did not happen.
#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error(transparent)]
    Project(#[from] ProjectError),
    /// Another rebuild (on this node or another node of the region) holds the pause.
    #[error("another rebuild of this region is running; try again when it has finished")]
    Running,
}

impl From<StoreError> for RebuildError {
    fn from(e: StoreError) -> Self {
        RebuildError::Project(ProjectError::Store(e))
    }
}

/// Whether this node's projection is halted, shared with readiness, promotion and the
/// `tandem_node_projection_halted` gauge.
#[derive(Clone)]
pub struct ProjectionHealth {
    halt: Arc<Mutex<Option<Halt>>>,
    gauge: prometheus::IntGauge,
}

impl ProjectionHealth {
    pub fn new(gauge: prometheus::IntGauge) -> ProjectionHealth {
        ProjectionHealth {
            halt: Arc::default(),
            gauge,
        }
    }

    pub fn halted(&self) -> Option<Halt> {
        self.halt.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Records the outcome of a projection step; logs only changes.
    fn record(&self, now: Option<Halt>) {
        let mut halt = self.halt.lock().unwrap_or_else(|e| e.into_inner());
        if *halt != now {
            match &now {
                Some(h) => tracing::error!(entry = %h.entry, reason = %h.reason,
                    "standby projection halted: this region's state stops following the log \
                     until the entry can be applied (readiness and promotion refuse meanwhile)"),
                None => tracing::info!("standby projection resumed"),
            }
        }
        self.gauge.set(i64::from(now.is_some()));
        *halt = now;
    }
}

/// While the region is standby, applies every new entry of the event stream to the
/// derived state, once (the cursor is compared and moved in the same script).
pub async fn run_standby(
    store: Store,
    blocking: Store,
    roles: Roles,
    health: ProjectionHealth,
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
            Ok(_) => {
                failures = 0;
                health.record(None);
            }
            Err(ProjectError::Halted(halt)) => {
                health.record(Some(halt));
                tokio::select! {
                    _ = tokio::time::sleep(HALT_RETRY) => {}
                    _ = stop.changed() => {}
                }
            }
            Err(ProjectError::Store(e)) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(error = %e, "standby projection failed; retrying");
                }
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures.min(10)))).await;
            }
        }
    }
}

/// Applies the next batch after the cursor; returns how many entries were applied. An
/// entry that cannot be applied stops the batch there ([`Halt`]); the cursor stays
/// before it.
pub async fn project_batch(store: &Store, blocking: &Store) -> Result<usize, ProjectError> {
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
        let report = match rebuild(store).await {
            Ok(report) => report,
            // Another rebuild holds the region: come back once it is done (it does not
            // mark the quarantine seen, so this one still runs after it).
            Err(RebuildError::Running) => {
                tokio::time::sleep(Duration::from_millis(100)).await;
                return Ok(0);
            }
            Err(RebuildError::Project(e)) => return Err(e),
        };
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
    // Decode the batch up to the first entry that cannot be applied.
    let mut decoded = Vec::with_capacity(entries.len());
    let mut halt = None;
    for entry in &entries {
        match decode(entry) {
            Ok((env, event)) => decoded.push((entry.id.as_str(), env, event)),
            Err(h) => {
                halt = Some(h);
                break;
            }
        }
    }
    // The whole batch in one read and one write: every key it touches is read at once,
    // the entries are applied in memory in order (a later one sees what an earlier one
    // wrote: the transaction's writes come first), and one script writes the result and
    // moves the cursor, if it still stands where it was read. One round trip per entry
    // left a loaded standby behind its active, and a promotion waits for the standby.
    let load = |upto: usize| {
        let decoded = &decoded;
        async move {
            let mut tx = Tx::fresh();
            tx.load(
                store,
                decoded[..upto].iter().flat_map(|(_, _, e)| keys_for(e)),
            )
            .await?;
            Ok::<_, StoreError>(tx)
        }
    };
    let mut tx = load(decoded.len()).await?;
    let mut applied = 0;
    for (id, env, event) in &decoded {
        if let Err(e) = apply(&mut tx, env, event) {
            halt = Some(Halt {
                entry: id.to_string(),
                reason: format!("cannot apply: {e}"),
            });
            // Apply only what comes before it (the failed one may have half-written).
            tx = load(applied).await?;
            for (_, env, event) in &decoded[..applied] {
                apply(&mut tx, env, event).expect("applied once already");
            }
            break;
        }
        applied += 1;
    }
    if applied > 0 {
        let done: Vec<(&str, &str, &str)> = decoded[..applied]
            .iter()
            .map(|(id, env, _)| (*id, env.event_id.as_str(), env.aggregate_id.as_str()))
            .collect();
        if !store.apply_batch(&tx, &done, cursor.as_deref()).await? {
            // Another projector moved the cursor: start again from where it is now.
            return Ok(0);
        }
    }
    match halt {
        Some(h) => Err(h.into()),
        None => Ok(applied),
    }
}

/// An entry as the projection needs it, or why it cannot be applied.
fn decode(entry: &Entry) -> Result<(Envelope, DomainEvent), Halt> {
    let env = envelope(entry)?;
    let event = DomainEvent::from_envelope(&env).map_err(|e| {
        Halt::at(
            entry,
            format!("{e} (an event type or payload this version does not know: upgrade this node)"),
        )
    })?;
    Ok((env, event))
}

/// Rebuilds all derived state from the event stream, byte for byte what the live
/// commits produced. Writes are paused meanwhile (commits wait); each key is replaced
/// atomically, so reads see the old value or the new one. The pause is a deadline this
/// rebuild keeps extending, so it ends by itself if the node dies halfway.
///
/// Rebuilds take turns: the pause is taken only when no other rebuild holds it (one
/// rebuild's end must not end another's pause), and a promotion does not complete while
/// a pause stands.
pub async fn rebuild(store: &Store) -> Result<RebuildReport, RebuildError> {
    let owner = uuid::Uuid::new_v4().to_string();
    if !pause(store, &owner, PauseStep::Take).await? {
        return Err(RebuildError::Running);
    }
    let result = {
        let work = rebuild_paused(store);
        tokio::pin!(work);
        loop {
            tokio::select! {
                r = &mut work => break r,
                _ = tokio::time::sleep(PAUSE_RENEW) => {
                    match pause(store, &owner, PauseStep::Renew).await {
                        Ok(true) => {}
                        // Commits may resume before the rebuild ends: each key is still
                        // replaced atomically, and a second rebuild repairs any mix.
                        Ok(false) => tracing::warn!("the rebuild's pause lapsed before it finished"),
                        Err(e) => tracing::warn!(error = %e, "could not extend the rebuild's pause"),
                    }
                }
            }
        }
    };
    // Unpause even when the rebuild failed: a half-written state is no worse than a
    // stuck region, and a second rebuild repairs it.
    let unpaused = pause(store, &owner, PauseStep::Release).await;
    let report = result?;
    unpaused?;
    Ok(report)
}

#[derive(Clone, Copy)]
enum PauseStep {
    Take,
    Renew,
    Release,
}

/// Takes, extends or releases the rebuild's pause of commits (see
/// [`eventlog::RoleRecord`]) on behalf of `owner`; false when another owner holds it
/// (or, for a renewal, when ours lapsed). Deadlines are by Redis' clock, which the
/// commit script compares them with.
async fn pause(store: &Store, owner: &str, step: PauseStep) -> Result<bool, StoreError> {
    let mut inv = PAUSE.prepare_invoke();
    inv.key(keys::ROLE)
        .arg(owner)
        .arg(match step {
            PauseStep::Take => "take",
            PauseStep::Renew => "renew",
            PauseStep::Release => "release",
        })
        .arg(PAUSE_LEASE.as_millis() as u64);
    let done: i64 = store.invoke(&inv).await?;
    Ok(done == 1)
}

/// KEYS: role. ARGV: owner, step (take, renew, release), lease ms.
static PAUSE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(&format!(
        r#"
local cur = redis.call('HMGET', KEYS[1], '{paused}', '{by}')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local held = tonumber(cur[1] or '0') > now
local ours = cur[2] == ARGV[1]
if ARGV[2] == 'release' then
  if ours or not held then redis.call('HDEL', KEYS[1], '{paused}', '{by}') end
  return 1
end
if ARGV[2] == 'take' and held and not ours then return 0 end
if ARGV[2] == 'renew' and not ours then return 0 end
redis.call('HSET', KEYS[1], '{paused}', now + tonumber(ARGV[3]), '{by}', ARGV[1])
return 1
"#,
        paused = fields::PAUSED,
        by = fields::PAUSED_BY
    ))
});

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
    for slice in args.chunks(500) {
        cmds.push(redis::cmd(build).arg(&tmp).arg(slice).clone());
    }
    cmds.push(redis::cmd("RENAME").arg(&tmp).arg(key).clone());
}

#[derive(Debug, Clone, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RebuildReport {
    pub events: usize,
    pub keys: usize,
}

/// Runs one step of a rebuild, again after a timeout or a lost connection: every step
/// writes whole values, so repeating one is harmless, and a rebuild that gives up on a
/// busy Redis leaves the read models half rebuilt until someone asks again.
async fn patiently<T, F, Fut>(step: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    use backon::{ExponentialBuilder, Retryable as _};
    step.retry(
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(100))
            .with_max_delay(Duration::from_secs(1))
            .with_max_times(8),
    )
    .when(|e| matches!(e, StoreError::Unavailable(_)))
    .sleep(tokio::time::sleep)
    .notify(|e, after| tracing::warn!(error = %e, ?after, "rebuild step failed; trying it again"))
    .await
}

async fn rebuild_paused(store: &Store) -> Result<RebuildReport, ProjectError> {
    let mut state = MemState::default();
    let mut start = "-".to_string();
    let mut events = 0;
    loop {
        // Modest calls: each must answer within the store's timeout on a busy Redis.
        let batch = patiently(|| store.xrange(keys::EVENTS, &start, "+", 1000)).await?;
        let Some(last) = batch.last() else { break };
        start = format!("({}", last.id);
        for entry in &batch {
            // Like the standby's projection, a rebuild never skips an entry: the state
            // it writes would silently differ from what the log says.
            let env = envelope(entry)?;
            state
                .apply_entry(&entry.id, &env)
                .map_err(|e| Halt::at(entry, e))?;
            events += 1;
        }
    }

    // Every key is replaced in one atomic command (SET, or RENAME of a hash or list
    // built under a temporary name), never deleted first: a reader during the rebuild
    // sees the old value or the new one, not a gap (a product must not turn "unknown"
    // meanwhile). Keys the new state no longer has are deleted last.
    let mut stale = patiently(|| scan_derived(store)).await?;
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
    for chunk in cmds.chunks(200) {
        let mut pipe = redis::pipe();
        for cmd in chunk {
            pipe.add_command(cmd.clone()).ignore();
        }
        let _: () = patiently(|| store.query_pipe(&pipe)).await?;
    }
    Ok(RebuildReport {
        events,
        keys: written,
    })
}

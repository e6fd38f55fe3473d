//! The consumer groups that choreograph the workflow over the region's event stream.
//!
//! Each module is one consumer group on `tandem:events`; each node process is one
//! consumer in every group, so several nodes share the work. Per group, a reader takes
//! batches (XREADGROUP) and hands each entry to one of N workers chosen by aggregate
//! id, so one order's events are handled in order while different orders proceed in
//! parallel. A handled entry is acknowledged in the same atomic step as the events it
//! caused (see `store`), so a crash leaves it pending and a redelivery finds the effect
//! already there. Failures are retried three times with jittered exponential backoff,
//! then parked in the dead-letter stream. Entries left pending by a dead consumer are
//! taken over with XAUTOCLAIM once idle for `reclaim_idle_ms`.

use crate::store::Tx;
use crate::store::{CommitOutcome, Entry, Store, StoreError};
use crate::workflow::{Decision, Delivery, Reads, Retry, Workflow, WorkflowError};
use crate::{inventory, orders, payments, shipments};
use backon::{BackoffBuilder as _, ExponentialBuilder};
use eventlog::{keys, Envelope};
use orders_model::events::{Cause, DeadLetterReplayed, DomainEvent, EventType};
use orders_model::State;
use redis::Value;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tracing::Instrument as _;

/// Most dead-letter entries counted for the gauge.
const DLQ_SCAN: usize = 10_000;

/// Tries per entry before it is dead-lettered.
pub const MAX_ATTEMPTS: u32 = 3;
const BATCH: usize = 128;
const BLOCK_MS: u64 = 500;
/// Pauses between failed reads of the event stream: 100 ms doubling up to a second.
const READ_RETRY: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(1))
    .without_max_times();

/// The consumer groups: one per module of the workflow, named after it. Which event
/// types a group reads is derived from the order's state machine
/// ([`orders_model::Module::reacts_to`]); it acknowledges the rest unread.
pub use orders_model::Module as Group;

/// Hands a delivered event to its group's module.
pub async fn handle(
    group: Group,
    wf: &Workflow,
    d: &Delivery<'_>,
) -> Result<Option<Tx>, WorkflowError> {
    match group {
        Group::Inventory => inventory::on_event(wf, d).await,
        Group::Payments => payments::on_event(wf, d).await,
        Group::Shipments => shipments::on_event(wf, d).await,
        Group::Orders => orders::on_event(wf, d).await,
    }
}

/// Settings of the consumer groups.
#[derive(Debug, Clone)]
pub struct BusConfig {
    pub consumer: String,
    pub workers: usize,
    pub retry_base: Duration,
    pub reclaim_idle: Duration,
    pub redis_url: String,
    /// NODE_REDIS_CA, for a `rediss://` URL.
    pub redis_ca: Option<std::path::PathBuf>,
    pub redis_timeout: Duration,
}

/// Creates the group at the stream's start unless it exists (it may have been copied
/// from the peer region, with its position: that one is kept).
pub async fn ensure_group(store: &Store, group: Group) -> Result<(), StoreError> {
    let created: Result<String, StoreError> = store
        .query(
            redis::cmd("XGROUP")
                .arg("CREATE")
                .arg(keys::EVENTS)
                .arg(group.name())
                .arg("0")
                .arg("MKSTREAM"),
        )
        .await;
    match created {
        Ok(_) => Ok(()),
        Err(StoreError::Redis(msg)) if msg.contains("BUSYGROUP") => Ok(()),
        Err(e) => Err(e),
    }
}

/// Starts every group's reader and workers; they stop when `stop` turns true, after
/// finishing the entries already handed to workers.
pub fn start(wf: Workflow, cfg: BusConfig, stop: watch::Receiver<bool>) -> JoinSet<()> {
    let mut tasks = JoinSet::new();
    for group in Group::ALL {
        let mut senders = Vec::new();
        for _ in 0..cfg.workers {
            let (tx, rx) = mpsc::channel::<(Entry, Option<Envelope>)>(BATCH);
            senders.push(tx);
            tasks.spawn(worker(wf.clone(), cfg.clone(), group, rx, stop.clone()));
        }
        tasks.spawn(reader(
            wf.clone(),
            cfg.clone(),
            group,
            senders,
            stop.clone(),
        ));
    }
    tasks
}

async fn reader(
    wf: Workflow,
    cfg: BusConfig,
    group: Group,
    workers: Vec<mpsc::Sender<(Entry, Option<Envelope>)>>,
    mut stop: watch::Receiver<bool>,
) {
    // Blocking reads get their own connection: a blocked XREADGROUP would hold up
    // every other command multiplexed on the shared one.
    let blocking = match Store::connect(
        &cfg.redis_url,
        cfg.redis_ca
            .as_deref()
            .map(|p| internal_tls::PemFile::new("NODE_REDIS_CA", p)),
        cfg.redis_timeout + Duration::from_millis(BLOCK_MS),
    ) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(group = group.name(), error = %e, "cannot create the reader's Redis connection");
            return;
        }
    };
    let mut roles = wf.roles.subscribe();
    let mut group_ready = false;
    // After (re)starting to read, this consumer's own pending entries come first:
    // those it held before a restart, or took over at a promotion.
    let mut backlog: Option<String> = Some("0".into());
    let mut last_reclaim = Instant::now();
    let mut failures = 0u32;
    let mut read_backoff = READ_RETRY.build();
    while !*stop.borrow() {
        if !wf.roles.current().writable() {
            group_ready = false;
            backlog = Some("0".into());
            tokio::select! {
                _ = roles.changed() => {}
                _ = stop.changed() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            continue;
        }
        let step = async {
            if !group_ready {
                ensure_group(&wf.store, group).await?;
                group_ready = true;
            }
            let mut entries = Vec::new();
            if last_reclaim.elapsed() >= cfg.reclaim_idle / 2 {
                last_reclaim = Instant::now();
                entries.extend(reclaim(&wf.store, group, &cfg).await?);
            }
            if let Some(after) = &backlog {
                // Paged by id: pending entries stay pending until handled, so reading
                // from "0" again would hand them out twice.
                let own = read_group(&blocking, group, &cfg.consumer, after).await?;
                backlog = own.last().map(|e| e.id.clone());
                entries.extend(own);
            } else {
                entries.extend(read_group(&blocking, group, &cfg.consumer, ">").await?);
            }
            Ok::<_, StoreError>(entries)
        };
        let entries = tokio::select! {
            r = step => r,
            _ = stop.changed() => break,
        };
        match entries {
            Ok(entries) => {
                if failures > 0 {
                    failures = 0;
                    read_backoff = READ_RETRY.build();
                }
                dispatch(&wf, group, entries, &workers).await;
            }
            Err(e) => {
                failures += 1;
                if failures == 1 || failures.is_multiple_of(50) {
                    tracing::warn!(group = group.name(), error = %e, failures, "reading the event stream failed; retrying");
                }
                if matches!(&e, StoreError::Redis(m) if m.contains("NOGROUP")) {
                    group_ready = false;
                }
                tokio::time::sleep(read_backoff.next().unwrap_or(Duration::from_secs(1))).await;
            }
        }
    }
}

/// XREADGROUP from `from`: `>` for new entries, `0` for this consumer's pending ones.
async fn read_group(
    blocking: &Store,
    group: Group,
    consumer: &str,
    from: &str,
) -> Result<Vec<Entry>, StoreError> {
    let reply: Value = blocking
        .query(
            redis::cmd("XREADGROUP")
                .arg("GROUP")
                .arg(group.name())
                .arg(consumer)
                .arg("COUNT")
                .arg(BATCH)
                .arg("BLOCK")
                .arg(BLOCK_MS)
                .arg("STREAMS")
                .arg(keys::EVENTS)
                .arg(from),
        )
        .await?;
    Ok(Entry::from_read(reply))
}

/// Takes over entries a consumer has held for longer than `reclaim_idle`.
async fn reclaim(store: &Store, group: Group, cfg: &BusConfig) -> Result<Vec<Entry>, StoreError> {
    let reply: Value = store
        .query(
            redis::cmd("XAUTOCLAIM")
                .arg(keys::EVENTS)
                .arg(group.name())
                .arg(&cfg.consumer)
                .arg(cfg.reclaim_idle.as_millis() as u64)
                .arg("0-0")
                .arg("COUNT")
                .arg(BATCH),
        )
        .await?;
    let (_, claimed) = Entry::from_autoclaim(reply);
    if !claimed.is_empty() {
        tracing::info!(
            group = group.name(),
            count = claimed.len(),
            "reclaimed entries of an idle consumer"
        );
    }
    Ok(claimed)
}

async fn dispatch(
    wf: &Workflow,
    group: Group,
    entries: Vec<Entry>,
    workers: &[mpsc::Sender<(Entry, Option<Envelope>)>],
) {
    let mut skipped = Vec::new();
    for entry in entries {
        // A deleted entry (quarantined) can still be pending: nothing to handle.
        if entry.fields.is_empty() {
            skipped.push(entry.id);
            continue;
        }
        // An entry without a type is handed on, and parked as unreadable there.
        let wanted = entry
            .field_str(eventlog::envelope::FIELD_TYPE)
            .is_none_or(|t| t.parse::<EventType>().is_ok_and(|ty| group.reacts_to(ty)));
        if !wanted {
            skipped.push(entry.id);
            continue;
        }
        // Route by aggregate so one order's events are handled in order. The parsed
        // envelope travels with the entry, so it is parsed once.
        let env = entry.envelope().ok();
        let aggregate = env
            .as_ref()
            .map(|e| e.aggregate_id.as_str())
            .unwrap_or_default();
        let mut h = std::collections::hash_map::DefaultHasher::new();
        aggregate.hash(&mut h);
        let idx = (h.finish() as usize) % workers.len();
        if workers[idx].send((entry, env)).await.is_err() {
            return;
        }
    }
    if !skipped.is_empty() {
        // Not acknowledged on failure: the entries are redelivered and skipped again.
        let acked: Result<i64, _> = wf
            .store
            .query(
                redis::cmd("XACK")
                    .arg(keys::EVENTS)
                    .arg(group.name())
                    .arg(&skipped),
            )
            .await;
        if let Err(e) = acked {
            tracing::debug!(group = group.name(), error = %e, "could not acknowledge skipped entries");
        }
    }
}

async fn worker(
    wf: Workflow,
    cfg: BusConfig,
    group: Group,
    mut rx: mpsc::Receiver<(Entry, Option<Envelope>)>,
    stop: watch::Receiver<bool>,
) {
    while let Some((entry, env)) = rx.recv().await {
        handle_entry(&wf, &cfg, group, entry, env, &stop).await;
    }
}

async fn handle_entry(
    wf: &Workflow,
    cfg: &BusConfig,
    group: Group,
    entry: Entry,
    env: Option<Envelope>,
    stop: &watch::Receiver<bool>,
) {
    let started = Instant::now();
    let m = &wf.metrics;
    let env = match env {
        Some(env) => Ok(env),
        None => entry.envelope(),
    };
    let parsed = env.map_err(|e| e.to_string()).and_then(|env| {
        DomainEvent::from_envelope(&env)
            .map(|ev| (env, ev))
            .map_err(|e| e.to_string())
    });
    let (mut env, event) = match parsed {
        Ok(p) => p,
        Err(reason) => {
            let ty = entry
                .field_str(eventlog::envelope::FIELD_TYPE)
                .unwrap_or("unknown")
                .to_string();
            park(wf, group, &entry, &ty, None, &reason, 0, stop).await;
            return;
        }
    };
    let span = step_span(wf, group, &entry, &mut env);
    let ty = env.event_type.as_str();
    let mut attempt = 1;
    let outcome = async { loop {
        let delivery = Delivery {
            env: &env,
            event: &event,
            attempt,
            ack: Some((group.name(), &entry.id)),
        };
        let result = handle(group, wf, &delivery).await;
        let err = match result {
            Ok(Some(_)) => break "ok",
            Ok(None) => match wf
                .store
                .query::<i64>(
                    redis::cmd("XACK")
                        .arg(keys::EVENTS)
                        .arg(group.name())
                        .arg(&entry.id),
                )
                .await
            {
                Ok(_) => break "skipped",
                Err(e) => WorkflowError::Store(e),
            },
            Err(e) => e,
        };
        match err.retry() {
            Retry::Backoff if attempt < MAX_ATTEMPTS => {
                m.events_handled
                    .with_label_values(&[group.name(), ty, "retried"])
                    .inc();
                tracing::info!(group = group.name(), event_type = ty, order = %env.aggregate_id, attempt, error = %err, "handler failed; will retry");
                tokio::time::sleep(backoff(cfg.retry_base, attempt)).await;
                attempt += 1;
            }
            Retry::Backoff | Retry::Never => {
                park(
                    wf,
                    group,
                    &entry,
                    ty,
                    Some(&env),
                    &err.to_string(),
                    attempt,
                    stop,
                )
                .await;
                break "dead_lettered";
            }
            Retry::Wait => {
                if *stop.borrow() {
                    break "abandoned";
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Retry::Abandon => break "abandoned",
        }
    }}
    .instrument(span.clone())
    .await;
    span.record("tandem.outcome", outcome);
    span.record("tandem.attempts", attempt);
    if outcome == "dead_lettered" {
        span.record("otel.status_code", "ERROR");
    }
    m.events_handled
        .with_label_values(&[group.name(), ty, outcome])
        .inc();
    m.handler_duration
        .with_label_values(&[group.name()])
        .observe(started.elapsed().as_secs_f64());
}

/// The span of one handler step (disabled, and free, unless spans are exported): the
/// child of the span that appended the event, as named by its stored `traceparent`
/// (also when that span ran in the other region). The events the step appends store
/// the step's own `traceparent`, so an order's saga is one chain of spans.
fn step_span(wf: &Workflow, group: Group, entry: &Entry, env: &mut Envelope) -> tracing::Span {
    let span = tracing::info_span!(
        target: telemetry::trace::SPANS,
        "handle",
        otel.name = %format_args!("{} {}", group.name(), env.event_type),
        otel.kind = "consumer",
        otel.status_code = tracing::field::Empty,
        messaging.consumer.group.name = group.name(),
        messaging.message.id = %entry.id,
        tandem.event_type = %env.event_type,
        tandem.order = %env.aggregate_id,
        tandem.region = %wf.region,
        tandem.outcome = tracing::field::Empty,
        tandem.attempts = tracing::field::Empty,
    );
    if !span.is_disabled() {
        telemetry::trace::continue_from(&span, env.traceparent.as_deref());
        if let Some(own) = telemetry::trace::traceparent(&span) {
            env.traceparent = Some(own);
        }
    }
    span
}

/// The pause after failed attempt `attempt` of a step: `base` on average after the
/// first, doubling, with a third of jitter either way so that retries of many entries
/// do not align.
fn backoff(base: Duration, attempt: u32) -> Duration {
    ExponentialBuilder::new()
        .with_min_delay(base.mul_f64(2.0 / 3.0))
        .without_max_delay()
        .without_max_times()
        .with_jitter()
        .build()
        .nth(attempt.saturating_sub(1) as usize)
        .unwrap_or(base)
}

/// Moves an entry to the dead-letter stream and acknowledges it, atomically.
#[allow(clippy::too_many_arguments)]
async fn park(
    wf: &Workflow,
    group: Group,
    entry: &Entry,
    event_type: &str,
    env: Option<&Envelope>,
    reason: &str,
    attempts: u32,
    stop: &watch::Receiver<bool>,
) {
    tracing::warn!(group = group.name(), entry = %entry.id, event_type, reason, attempts, "dead-lettering entry");
    let event = entry
        .field_str(eventlog::envelope::FIELD_EVENT)
        .unwrap_or("")
        .to_string();
    let attempts = attempts.to_string();
    let at = eventlog::time::rfc3339_ms(eventlog::time::now_ms());
    let fields = [
        ("group", group.name()),
        ("entryId", entry.id.as_str()),
        ("eventId", env.map(|e| e.event_id.as_str()).unwrap_or("")),
        ("eventType", event_type),
        ("error", reason),
        ("attempts", attempts.as_str()),
        ("at", at.as_str()),
        ("event", event.as_str()),
    ];
    loop {
        let epoch = wf.roles.current().epoch;
        match wf.store.park(epoch, group.name(), &entry.id, &fields).await {
            Ok(CommitOutcome::Committed) => return,
            Ok(CommitOutcome::Paused) => tokio::time::sleep(Duration::from_millis(20)).await,
            Ok(outcome) => {
                // No longer the writable active region: the entry stays pending, and
                // whichever region is active handles (or parks) it.
                tracing::warn!(?outcome, entry = %entry.id, "not dead-lettering: this region may no longer write");
                return;
            }
            Err(e) if *stop.borrow() => {
                tracing::warn!(error = %e, "could not dead-letter during shutdown; the entry stays pending");
                return;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not dead-letter yet; retrying");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("dead-letter entry {0} not found")]
    NotFound(String),
    #[error("dead-letter entry {0} cannot be replayed: {1}")]
    Unreadable(String, String),
    #[error("replay failed: {0}")]
    Failed(WorkflowError),
}

impl ReplayError {
    /// A failure of the region (Redis away, not active), not of the entry: trying the
    /// next entry would fail the same way.
    pub fn is_systemic(&self) -> bool {
        matches!(
            self,
            ReplayError::Failed(WorkflowError::Store(_) | WorkflowError::NotActive { .. })
        )
    }
}

/// A dead-letter entry that was replayed and left the dead-letter list.
#[derive(Debug, Clone)]
pub struct Replayed {
    pub dlq_id: String,
    pub group: Group,
    pub event_id: String,
    /// `handled` or `nothing_to_do` (see [`DeadLetterReplayed`]).
    pub outcome: &'static str,
}

/// Runs a parked entry's handler once more; on success the entry leaves the DLQ.
pub async fn replay(wf: &Workflow, dlq_id: &str) -> Result<Replayed, ReplayError> {
    let entries = wf
        .store
        .xrange(keys::DLQ, dlq_id, dlq_id, 1)
        .await
        .map_err(|e| ReplayError::Failed(e.into()))?;
    let entry = entries
        .into_iter()
        .next()
        .ok_or_else(|| ReplayError::NotFound(dlq_id.to_string()))?;
    let unreadable = |why: String| ReplayError::Unreadable(dlq_id.to_string(), why);
    let group = entry
        .field_str("group")
        .and_then(Group::parse)
        .ok_or_else(|| unreadable("unknown group".into()))?;
    let json = entry
        .field("event")
        .ok_or_else(|| unreadable("no event".into()))?;
    let env: Envelope = serde_json::from_slice(json).map_err(|e| unreadable(e.to_string()))?;
    let event = DomainEvent::from_envelope(&env).map_err(|e| unreadable(e.to_string()))?;
    let attempts = entry
        .field_str("attempts")
        .and_then(|a| a.parse::<u32>().ok())
        .unwrap_or(0);
    let not_found = || ReplayError::NotFound(dlq_id.to_string());
    let marker = keys::dlq_replayed(dlq_id);
    let done: Option<String> = wf
        .store
        .get(&marker)
        .await
        .map_err(|e| ReplayError::Failed(e.into()))?;
    if done.is_some() {
        return Err(not_found());
    }
    let delivery = Delivery {
        env: &env,
        event: &event,
        attempt: attempts + 1,
        ack: None,
    };
    let outcome = handle(group, wf, &delivery)
        .await
        .map_err(ReplayError::Failed)?;
    let outcome = if outcome.is_some() {
        "handled"
    } else {
        "nothing_to_do"
    };
    // The entry leaves the dead-letter list by an event, not by a deletion: the
    // replicator copies appends only, so a deletion here would not reach the other
    // region, and the entry would come back after a failover. Only one replay commits the
    // mark (compare-and-set on it): concurrent replays of one entry all run the
    // (idempotent) handler, but exactly one of them takes the entry out.
    let marked = wf
        .execute(
            Reads::keys(vec![marker.clone()]),
            &Cause::event(&env),
            None,
            |tx| {
                if tx.get(&marker)?.is_some() {
                    return Err(WorkflowError::NotFound(format!(
                        "dead-letter entry {dlq_id}"
                    )));
                }
                Ok(Decision::Emit {
                    last_sequence: 0,
                    events: vec![DomainEvent::DeadLetterReplayed(DeadLetterReplayed {
                        dlq_id: dlq_id.to_string(),
                        group: group.name().to_string(),
                        event_id: env.event_id.clone(),
                        outcome: outcome.to_string(),
                    })],
                })
            },
        )
        .await;
    match marked {
        Ok(_) => {}
        Err(WorkflowError::NotFound(_)) => return Err(not_found()),
        Err(e) => return Err(ReplayError::Failed(e)),
    }
    wf.metrics
        .events_handled
        .with_label_values(&[group.name(), &env.event_type, "replayed"])
        .inc();
    Ok(Replayed {
        dlq_id: dlq_id.to_string(),
        group,
        event_id: env.event_id,
        outcome,
    })
}

/// The dead-letter entries among `entries` that have not been replayed.
pub async fn unreplayed(store: &Store, entries: Vec<Entry>) -> Result<Vec<Entry>, StoreError> {
    if entries.is_empty() {
        return Ok(entries);
    }
    let mut live = Vec::with_capacity(entries.len());
    for chunk in entries.chunks(1000) {
        let markers: Vec<String> = chunk.iter().map(|e| keys::dlq_replayed(&e.id)).collect();
        let done: Vec<Option<String>> = store.query(redis::cmd("MGET").arg(&markers)).await?;
        live.extend(
            chunk
                .iter()
                .zip(done)
                .filter(|(_, d)| d.is_none())
                .map(|(e, _)| e.clone()),
        );
    }
    Ok(live)
}

/// Refreshes the gauges that are read from Redis: lag, dead letters, orders by status.
pub async fn refresh_gauges(wf: &Workflow) -> Result<(), StoreError> {
    let m = &wf.metrics;
    let groups: Result<Vec<HashMap<String, Value>>, StoreError> = wf
        .store
        .query(redis::cmd("XINFO").arg("GROUPS").arg(keys::EVENTS))
        .await;
    if let Ok(groups) = groups {
        for g in groups {
            let name = g
                .get("name")
                .and_then(|v| redis::from_redis_value_ref::<String>(v).ok())
                .unwrap_or_default();
            // The workflow's groups only: the saga timeout's cursor group trails the
            // stream by the timeout on purpose, and is no backlog.
            if Group::parse(&name).is_none() {
                continue;
            }
            let num = |k: &str| {
                g.get(k)
                    .and_then(|v| redis::from_redis_value_ref::<i64>(v).ok())
                    .unwrap_or(0)
            };
            m.consumer_lag
                .with_label_values(&[&name])
                .set((num("lag") + num("pending")) as f64);
        }
    }
    // Counted from the dead-letter stream itself, which the replicator copies, so the
    // standby (and a newly promoted region) reports the same numbers. A DLQ is meant to
    // stay small; past DLQ_SCAN entries the gauge stops counting.
    let mut parked: HashMap<&str, f64> = HashMap::new();
    let entries = wf.store.xrange(keys::DLQ, "-", "+", DLQ_SCAN).await?;
    let entries = unreplayed(&wf.store, entries).await?;
    for entry in &entries {
        if let Some(group) = entry.field_str("group").and_then(Group::parse) {
            *parked.entry(group.name()).or_default() += 1.0;
        }
    }
    for group in Group::ALL {
        m.dead_letters
            .with_label_values(&[group.name()])
            .set(*parked.get(group.name()).unwrap_or(&0.0));
    }
    let quarantined: i64 = wf
        .store
        .query(redis::cmd("XLEN").arg(keys::QUARANTINE))
        .await?;
    m.quarantined_events.set(quarantined);
    let counts: HashMap<String, i64> = wf
        .store
        .query(redis::cmd("HGETALL").arg(keys::ORDER_COUNTS))
        .await?;
    for status in orders_model::Status::ALL {
        m.orders
            .with_label_values(&[status.as_str()])
            .set(*counts.get(status.as_str()).unwrap_or(&0) as f64);
    }
    Ok(())
}

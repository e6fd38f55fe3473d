//! The decide -> apply -> commit loop every write goes through, commands and event
//! handlers alike, and the errors it can end in.
//!
//! A decision is a pure function of the state it read ([`Tx`]). If the commit finds
//! any of that state changed, the decision is taken again on fresh state, so two
//! nodes (or two workers) can never both act on the same order step.
//!
//! A consumer group decides through [`Workflow::react`]: the order's state machine
//! (`orders_model::flow`) says which step, if any, the group takes; the group's module
//! only says how.

use crate::metrics::Metrics;
use crate::roles::Roles;
use crate::store::{CommitOutcome, Store, StoreError, Tx};
use eventlog::{keys, Envelope};
use orders_model::apply::{self, apply, keys_for, ApplyError};
use orders_model::events::{Cause, DomainEvent, Writer};
use orders_model::product::{Availability, Sku};
use orders_model::{Input, Next, Order, Step};
use std::time::Duration;

/// What a decision asks for.
pub enum Decision {
    /// Append these events to an aggregate whose last sequence is `last_sequence`.
    Emit {
        last_sequence: u64,
        events: Vec<DomainEvent>,
    },
    /// Nothing to do (the effect already happened, or the event is not for us).
    Nothing,
    /// Read these keys too, then decide again.
    Load(Vec<String>),
}

/// Errors of the workflow. Whether one may be retried is decided here, once.
#[derive(Debug, thiserror::Error)]
pub enum WorkflowError {
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("products unavailable")]
    ProductsUnavailable(Vec<Availability>),
    #[error("unknown sku: {}", .0.iter().map(Sku::as_str).collect::<Vec<_>>().join(", "))]
    UnknownSku(Vec<Sku>),
    #[error("{0}")]
    Validation(String),
    #[error("this Idempotency-Key was used with another request body")]
    IdempotencyKeyReused,
    /// The Idempotency-Key was used first by a concurrent request: answer from it.
    #[error("idempotency key already used")]
    IdempotencyKeyTaken,
    #[error("this region is not active (role {role}, epoch {epoch})")]
    NotActive { role: String, epoch: String },
    #[error("payment provider: {0}")]
    Provider(String),
    /// Personal data that does not open: the ring lacks the key it was sealed with (add
    /// it, then replay the dead letter) or the value was altered.
    #[error("personal data: {0}")]
    Sealed(String),
    #[error("gave up after {0} write conflicts")]
    Contended(u32),
    #[error("derived state is being rebuilt")]
    Rebuilding,
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Apply(#[from] ApplyError),
}

/// How a failed handler attempt is retried (Pingora's `RetryType`, for our failures).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// A transient failure of the step itself: counts as one of the 3 tries.
    Backoff,
    /// Redis is away or state is being rebuilt: wait without spending a try; nothing
    /// was written.
    Wait,
    /// Not our turn to write (standby or fenced): leave the entry pending.
    Abandon,
    /// Will fail the same way every time: straight to the dead-letter stream.
    Never,
}

impl WorkflowError {
    pub fn retry(&self) -> Retry {
        match self {
            WorkflowError::Provider(_) | WorkflowError::Contended(_) => Retry::Backoff,
            WorkflowError::Store(StoreError::Unavailable(_)) | WorkflowError::Rebuilding => {
                Retry::Wait
            }
            WorkflowError::NotActive { .. } => Retry::Abandon,
            _ => Retry::Never,
        }
    }
}

/// What a decision reads before it decides.
#[derive(Debug, Default)]
pub struct Reads {
    /// Read and compared at commit.
    pub keys: Vec<String>,
    /// Read for information only, never compared (the availability pre-check), and
    /// always from Redis.
    pub peek: Vec<String>,
    /// A key named by an id just generated here: known to be absent, so not read.
    pub new_key: Option<String>,
}

impl Reads {
    pub fn keys(keys: Vec<String>) -> Reads {
        Reads {
            keys,
            ..Reads::default()
        }
    }
}

/// The shared pieces every command and handler writes with.
#[derive(Clone)]
pub struct Workflow {
    pub store: Store,
    pub roles: Roles,
    pub metrics: Metrics,
    pub region: String,
    /// This process's consumer name in every group.
    pub consumer: String,
    /// Whether the standby's projection is halted (readiness and promotion refuse then).
    pub projection: crate::projector::ProjectionHealth,
    /// Seals personal data into new orders and opens it for the payment provider and
    /// for callers allowed to see it (`NODE_PII_KEYS`).
    pub pii: std::sync::Arc<orders_model::pii::KeyRing>,
}

/// Conflicts are not failures, but a hot key must not spin forever.
const MAX_CONFLICTS: u32 = 200;
/// A commit waits out a rebuild for at most 5 s (250 x 20 ms), then gives up.
const PAUSED_WAIT: Duration = Duration::from_millis(20);
const MAX_PAUSED_WAITS: u32 = 250;

impl Workflow {
    /// Runs `decide` on what `reads` names until its events are committed, and returns
    /// the transaction (the state after the events), or `None` when there was nothing
    /// to do. `ack` names the consumed entry (group, id) to acknowledge in the same
    /// atomic step.
    pub async fn execute<F>(
        &self,
        reads: Reads,
        cause: &Cause,
        ack: Option<(&str, &str)>,
        mut decide: F,
    ) -> Result<Option<Tx>, WorkflowError>
    where
        F: FnMut(&Tx) -> Result<Decision, WorkflowError>,
    {
        let mut conflicts = 0;
        let mut paused_waits = 0;
        let mut fresh = false;
        loop {
            let role = self.roles.current();
            if !self.roles.may_write() {
                return Err(WorkflowError::NotActive {
                    role: role.describe(),
                    epoch: role.epoch.to_string(),
                });
            }
            let mut tx = if fresh { Tx::fresh() } else { Tx::new() };
            tx.load(&self.store, reads.keys.iter().cloned()).await?;
            tx.peek(&self.store, reads.peek.iter().cloned()).await?;
            if let Some(key) = &reads.new_key {
                tx.assume_absent(key.clone());
            }
            let decision = loop {
                match decide(&tx) {
                    Ok(Decision::Load(more)) => tx.load(&self.store, more).await?,
                    other => break other,
                }
            };
            let (last_sequence, events) = match decision {
                Ok(Decision::Emit {
                    last_sequence,
                    events,
                }) => (last_sequence, events),
                // Doing nothing, or refusing, may come from a stale cached value (another
                // node moved the order on): only fresh state may decide that.
                _ if tx.used_cache() => {
                    tx.evict_cached(&self.store);
                    fresh = true;
                    continue;
                }
                Ok(_) => return Ok(None),
                Err(e) => return Err(e),
            };
            let writer = Writer {
                region: self.region.clone(),
                epoch: role.epoch,
            };
            let events = envelopes(events, last_sequence, cause, &writer);
            tx.load(&self.store, events.iter().flat_map(|(_, e)| keys_for(e)))
                .await?;
            for (env, event) in &events {
                apply(&mut tx, env, event)?;
            }
            if !self.roles.may_write() {
                // The lease lapsed while deciding: do not write on it.
                return Err(WorkflowError::NotActive {
                    role: "fenced".into(),
                    epoch: role.epoch.to_string(),
                });
            }
            match self.store.commit(&tx, &events, role.epoch, ack).await? {
                CommitOutcome::Committed => {
                    for (env, _) in &events {
                        self.metrics
                            .events_appended
                            .with_label_values(&[env.event_type.as_str()])
                            .inc();
                    }
                    return Ok(Some(tx));
                }
                CommitOutcome::Conflict(key) => {
                    conflicts += 1;
                    tracing::debug!(%key, conflicts, "write conflict, deciding again");
                    if conflicts >= MAX_CONFLICTS {
                        return Err(WorkflowError::Contended(conflicts));
                    }
                    if conflicts > 3 {
                        tokio::time::sleep(Duration::from_micros(
                            200 * u64::from(conflicts.min(20)),
                        ))
                        .await;
                    }
                }
                CommitOutcome::NotActive { role, epoch } => {
                    // Our view of the role may be stale (promoted a moment ago): look
                    // again once; the script stays the authority either way.
                    let before = self.roles.current();
                    let now = self.roles.refresh().await;
                    if now.writable() && now.epoch != before.epoch {
                        continue;
                    }
                    return Err(WorkflowError::NotActive { role, epoch });
                }
                CommitOutcome::Fenced => {
                    // Our lease or the peer's word ran out before the commit reached
                    // Redis (a pause, a slow link): a higher epoch may have begun.
                    return Err(WorkflowError::NotActive {
                        role: "fenced".into(),
                        epoch: role.epoch.to_string(),
                    });
                }
                CommitOutcome::Paused => {
                    paused_waits += 1;
                    if paused_waits > MAX_PAUSED_WAITS {
                        return Err(WorkflowError::Rebuilding);
                    }
                    tokio::time::sleep(PAUSED_WAIT).await;
                }
            }
        }
    }

    /// A client's command on one aggregate, whose key `decide` reads: it emits or fails.
    /// Returns the state after its events.
    pub async fn command<F>(
        &self,
        key: String,
        cause: &Cause,
        decide: F,
    ) -> Result<Tx, WorkflowError>
    where
        F: FnMut(&Tx) -> Result<Decision, WorkflowError>,
    {
        let done = self
            .execute(Reads::keys(vec![key]), cause, None, decide)
            .await?;
        Ok(done.expect("a command emits or fails"))
    }

    /// A consumer group's turn on a delivered event of an order: loads the order, asks
    /// its state machine what follows the event, and when that gives the group a step
    /// that is due (`step_of` picks the group's kind of step), lets `take` decide the
    /// event that records it. The event is committed together with the entry's
    /// acknowledgement. `new_key` names a key the step may create.
    pub async fn react<S, F>(
        &self,
        d: &Delivery<'_>,
        new_key: Option<String>,
        step_of: fn(Step) -> Option<S>,
        mut take: F,
    ) -> Result<Option<Tx>, WorkflowError>
    where
        F: FnMut(&Tx, &Order, S) -> Result<Reaction, WorkflowError>,
    {
        let Some(order_id) = d.event.order_id() else {
            return Ok(None);
        };
        let input = Input::Event(d.event.event_type());
        let reads = Reads {
            keys: vec![keys::order(order_id.as_str())],
            new_key,
            ..Reads::default()
        };
        self.execute(reads, &Cause::event(d.env), d.ack, |tx| {
            let Some(order) = apply::order(tx, order_id)? else {
                return Ok(Decision::Nothing);
            };
            let Next::Steps(steps) = order.next(input) else {
                return Ok(Decision::Nothing);
            };
            let due = steps.iter().filter(|s| s.is_due(&order));
            let Some(step) = due.copied().find_map(step_of) else {
                return Ok(Decision::Nothing);
            };
            Ok(match take(tx, &order, step)? {
                Reaction::Next(next) => Decision::Emit {
                    last_sequence: order.version,
                    events: vec![next],
                },
                Reaction::Nothing => Decision::Nothing,
                Reaction::Load(keys) => Decision::Load(keys),
            })
        })
        .await
    }
}

/// One delivery of an event to a consumer group: what its handler decides on.
pub struct Delivery<'a> {
    pub env: &'a Envelope,
    pub event: &'a DomainEvent,
    /// Counts from 1 for each delivery of the step (a payment retried after a provider
    /// timeout is attempt 2).
    pub attempt: u32,
    /// The stream entry to acknowledge with the commit (group, entry id); `None` when
    /// an operator replays a dead letter.
    pub ack: Option<(&'a str, &'a str)>,
}

/// What a module makes of the step the state machine gave it.
pub enum Reaction {
    /// Record this event of the order.
    Next(DomainEvent),
    /// Nothing to record.
    Nothing,
    /// Read these keys too, then decide again.
    Load(Vec<String>),
}

/// Keys among `wanted` that the transaction has not read yet.
pub fn missing_keys(tx: &Tx, wanted: Vec<String>) -> Option<Vec<String>> {
    use orders_model::State;
    let missing: Vec<String> = wanted.into_iter().filter(|k| tx.get(k).is_err()).collect();
    (!missing.is_empty()).then_some(missing)
}

/// Puts events for one aggregate whose last sequence is `last_sequence` in their
/// envelopes, with new event ids and the time now.
fn envelopes(
    events: Vec<DomainEvent>,
    last_sequence: u64,
    cause: &Cause,
    writer: &Writer,
) -> Vec<(Envelope, DomainEvent)> {
    let now = eventlog::time::rfc3339_ms(eventlog::time::now_ms());
    events
        .into_iter()
        .enumerate()
        .map(|(i, event)| {
            let sequence = last_sequence + 1 + i as u64;
            let id = uuid::Uuid::new_v4().to_string();
            (
                event.envelope(sequence, cause, writer, id, now.clone()),
                event,
            )
        })
        .collect()
}

//! The checker: pure functions from the clients' history and both regions' final
//! snapshots to violations of the seven invariants (issue 7, DESIGN.md section 8).
//!
//! It reads nothing but its input, so each invariant is unit-tested on hand-made
//! histories and snapshots, including one that shows it can fail. A false positive is a
//! bug here: every rule below is stated so that it holds in every correct run, and the
//! examples it gives name the order, event and entry ids to look up.
//!
//! The state machine and the fold come from `orders-model`, the node's own model, so
//! the checker's idea of an order or a stock level is the node's.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use eventlog::{keys, Envelope};
use orders_model::order::{InventoryHold, PaymentState};
use orders_model::{DomainEvent, MemState, Order, Product, Status};

use super::history::{AckDurability, Fate, History};
use super::snapshot::{RegionSnapshot, StoredEvent};
use super::Durability;
use crate::redis_state::Dumped;

/// Examples kept per invariant (the count is always exact).
const EXAMPLES: usize = 8;

/// The invariants, numbered as in issue 7.
pub const INVARIANTS: [(u8, &str); 7] = [
    (
        1,
        "acknowledged writes exist (or are quarantined and reported, async)",
    ),
    (2, "no order charged twice"),
    (3, "stock conserved per SKU"),
    (4, "no order left non-terminal"),
    (5, "both regions converge (streams and derived state)"),
    (6, "per-aggregate sequences 1, 2, 3... without gap"),
    (7, "no write at an epoch after a higher epoch began"),
];

/// What the checker judges.
#[derive(Debug, Clone, Copy)]
pub struct CheckInput<'a> {
    pub durability: Durability,
    pub history: &'a History,
    /// The stock each SKU was given at the start.
    pub initial_stock: &'a BTreeMap<String, i64>,
    pub a: &'a RegionSnapshot,
    pub b: &'a RegionSnapshot,
    /// `Some(what was still missing)` when the regions did not settle before the
    /// snapshots were read: then the rules that judge a resting state (1, 3, 4, the
    /// stream and state comparison of 5, the role records of 7) are not applied, since
    /// a copy or a failover still under way would look like a violation, and 5 counts
    /// the failure to converge itself.
    pub unsettled: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvariantResult {
    pub number: u8,
    pub name: &'static str,
    /// How many violations.
    pub count: usize,
    /// False when the rule could not be applied (the regions did not settle).
    pub judged: bool,
    /// The first few, readable.
    pub examples: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Verdict {
    pub invariants: Vec<InvariantResult>,
    /// The region judged active (the one whose role record says so).
    pub active: Option<String>,
    /// Acknowledged orders and how many of them only locally.
    pub acked_orders: usize,
    pub acked_local: usize,
    pub acked_cancels: usize,
    /// Acknowledged writes found only in a quarantine (async: reported, not lost).
    pub quarantined_orders: Vec<String>,
    pub quarantined_cancels: Vec<String>,
    /// Observations that are not violations.
    pub notes: Vec<String>,
}

impl Verdict {
    pub fn violations(&self) -> usize {
        self.invariants.iter().map(|i| i.count).sum()
    }
}

/// Collects the violations of one invariant.
#[derive(Default)]
struct Findings {
    count: usize,
    examples: Vec<String>,
}

impl Findings {
    fn add(&mut self, what: String) {
        self.count += 1;
        if self.examples.len() < EXAMPLES {
            self.examples.push(what);
        }
    }
}

/// Judges a campaign.
pub fn check(input: &CheckInput) -> Verdict {
    let mut verdict = Verdict::default();
    let active = pick_active(input.a, input.b);
    verdict.active = active.map(|r| r.region.clone());
    let settled = input.unsettled.is_none();
    let results: [(u8, Option<Findings>); 7] = if let Some(missing) = input.unsettled {
        verdict.acked_orders = input.history.acked_orders().count();
        verdict.acked_cancels = input
            .history
            .cancels
            .iter()
            .filter(|c| matches!(c.fate, Fate::Acked { .. }))
            .count();
        let mut converge = Findings::default();
        converge.add(format!(
            "the regions did not settle after the final heal (still: {missing})"
        ));
        [
            (1, None),
            (2, Some(no_double_charge(input, &mut verdict))),
            (3, None),
            (4, None),
            (5, Some(converge)),
            (6, Some(sequences_without_gap(input))),
            (7, Some(no_write_after_a_higher_epoch(input, settled))),
        ]
    } else {
        [
            (
                1,
                Some(acknowledged_writes_exist(input, active, &mut verdict)),
            ),
            (2, Some(no_double_charge(input, &mut verdict))),
            (3, Some(stock_conserved(input, active))),
            (4, Some(nothing_left_in_flight(active))),
            (5, Some(regions_converge(input))),
            (6, Some(sequences_without_gap(input))),
            (7, Some(no_write_after_a_higher_epoch(input, settled))),
        ]
    };
    for ((number, findings), (_, name)) in results.into_iter().zip(INVARIANTS) {
        let judged = findings.is_some();
        let findings = findings.unwrap_or_default();
        verdict.invariants.push(InvariantResult {
            number,
            name,
            count: findings.count,
            judged,
            examples: findings.examples,
        });
    }
    verdict
}

/// The region whose role record says active; with none or two, the one at the higher
/// epoch (invariant 7 reports the odd role records).
fn pick_active<'a>(a: &'a RegionSnapshot, b: &'a RegionSnapshot) -> Option<&'a RegionSnapshot> {
    match (a.is_active(), b.is_active()) {
        (true, false) => Some(a),
        (false, true) => Some(b),
        _ if a.role.is_none() && b.role.is_none() => None,
        _ => Some(if b.epoch > a.epoch { b } else { a }),
    }
}

fn envs(events: &[StoredEvent]) -> impl Iterator<Item = (&StoredEvent, &Envelope)> {
    events
        .iter()
        .filter_map(|e| e.env.as_ref().map(|env| (e, env)))
}

fn cancel_reason(env: &Envelope) -> Option<&str> {
    env.payload.get("reason").and_then(|r| r.as_str())
}

// --- (1) -------------------------------------------------------------------------------

/// Every acknowledged order has its `OrderPlaced` in the active region's stream, and
/// every acknowledged cancellation its `OrderCancelled` (found by the request's unique
/// reason). An acknowledgement given after the local write only (`async`, a
/// `Tandem-Durability: local` fallback, every cancellation) may instead sit in either
/// region's quarantine: that is reported, not lost. A `replicated` acknowledgement must
/// be in the active stream.
fn acknowledged_writes_exist(
    input: &CheckInput,
    active: Option<&RegionSnapshot>,
    verdict: &mut Verdict,
) -> Findings {
    let mut f = Findings::default();
    let Some(active) = active else {
        f.add("no region holds a role record: nothing to judge against".into());
        return f;
    };
    let mut placed: HashMap<&str, &Envelope> = HashMap::new();
    let mut cancelled: HashSet<&str> = HashSet::new();
    for (_, env) in envs(&active.events) {
        match env.event_type.as_str() {
            "OrderPlaced" => {
                placed.insert(env.aggregate_id.as_str(), env);
            }
            "OrderCancelled" => {
                if let Some(r) = cancel_reason(env) {
                    cancelled.insert(r);
                }
            }
            _ => {}
        }
    }
    let mut q_placed: HashSet<&str> = HashSet::new();
    let mut q_cancelled: HashSet<&str> = HashSet::new();
    for q in input.a.quarantine.iter().chain(&input.b.quarantine) {
        let Some(env) = &q.env else { continue };
        match env.event_type.as_str() {
            "OrderPlaced" => {
                q_placed.insert(env.aggregate_id.as_str());
            }
            "OrderCancelled" => {
                if let Some(r) = cancel_reason(env) {
                    q_cancelled.insert(r);
                }
            }
            _ => {}
        }
    }

    for o in &input.history.orders {
        match &o.fate {
            Fate::Acked {
                at_ms,
                region,
                durability,
            } => {
                verdict.acked_orders += 1;
                if *durability == AckDurability::Local {
                    verdict.acked_local += 1;
                }
                let id = o.order_id.as_deref().unwrap_or("");
                let region = region.as_deref().unwrap_or("?");
                if let Some(env) = placed.get(id) {
                    let key = env.payload.get("idempotencyKey").and_then(|k| k.as_str());
                    if key != Some(o.key.as_str()) {
                        f.add(format!(
                            "order {id} (acked for key {}) is in the active stream under key {key:?}",
                            o.key
                        ));
                    }
                } else if q_placed.contains(id) {
                    if *durability == AckDurability::Local {
                        verdict.quarantined_orders.push(id.to_string());
                    } else {
                        f.add(format!(
                            "order {id} (key {}) was acknowledged as replicated by region {region} at {at_ms} ms but is only in a quarantine",
                            o.key
                        ));
                    }
                } else {
                    f.add(format!(
                        "order {id} (key {}) was acknowledged by region {region} at {at_ms} ms ({}) and is in neither region {}'s stream nor any quarantine: lost",
                        o.key,
                        match durability {
                            AckDurability::Local => "local ack",
                            AckDurability::Replicated => "replicated ack",
                        },
                        active.region
                    ));
                }
            }
            Fate::Refused { code, .. } => {
                // A refusal wrote nothing, or (async) what it raced with was lost and
                // replaced: noted for the reader, judged by the other invariants.
                let present = placed.values().any(|env| {
                    env.payload.get("idempotencyKey").and_then(|k| k.as_str())
                        == Some(o.key.as_str())
                });
                if present {
                    verdict.notes.push(format!(
                        "order key {} was refused ({code}) yet an order with that key is in region {}'s stream",
                        o.key, active.region
                    ));
                }
            }
            Fate::Unresolved => {}
        }
    }

    for c in &input.history.cancels {
        let Fate::Acked {
            at_ms,
            region,
            durability,
        } = &c.fate
        else {
            continue;
        };
        verdict.acked_cancels += 1;
        let region = region.as_deref().unwrap_or("?");
        if cancelled.contains(c.reason.as_str()) {
            continue;
        }
        if q_cancelled.contains(c.reason.as_str()) && *durability == AckDurability::Local {
            verdict.quarantined_cancels.push(c.order_id.clone());
        } else {
            f.add(format!(
                "cancellation of order {} ({}) was acknowledged by region {region} at {at_ms} ms and its OrderCancelled is in neither region {}'s stream nor any quarantine: lost",
                c.order_id, c.reason, active.region
            ));
        }
    }
    f
}

// --- (2) -------------------------------------------------------------------------------

/// A charge is money the provider took, and the provider knows a charge by its payment
/// id (derived from the order: the node calls the provider with it as the idempotency
/// key, regional-node `payments::payment_id`). So an order is charged twice when
/// - one region's stream holds two `PaymentProcessed` for it (the workflow charged it
///   twice in one history), or
/// - its charges, over both streams and both quarantines, carry two payment ids;
///
/// and refunded wrongly when one stream holds more refunds than charges, or two.
/// The same payment id charged by both regions (async durability: the old active's
/// charge was not copied before it died, the new active charged again) is one charge
/// at the provider: a note, not a violation.
fn no_double_charge(input: &CheckInput, verdict: &mut Verdict) -> Findings {
    #[derive(Default)]
    struct Money<'a> {
        /// region -> charge event ids in its stream
        charges: BTreeMap<&'a str, Vec<&'a str>>,
        refunds: BTreeMap<&'a str, Vec<&'a str>>,
        payment_ids: BTreeSet<&'a str>,
        charge_events: BTreeSet<&'a str>,
    }
    fn payment_id(env: &Envelope) -> Option<&str> {
        env.payload.get("paymentId").and_then(|p| p.as_str())
    }
    let mut f = Findings::default();
    let mut money: BTreeMap<&str, Money> = BTreeMap::new();
    for r in [&input.a, &input.b] {
        for (_, env) in envs(&r.events) {
            let m = money.entry(env.aggregate_id.as_str()).or_default();
            match env.event_type.as_str() {
                "PaymentProcessed" => {
                    m.charges
                        .entry(r.region.as_str())
                        .or_default()
                        .push(env.event_id.as_str());
                    m.charge_events.insert(env.event_id.as_str());
                    m.payment_ids.extend(payment_id(env));
                }
                "PaymentRefunded" => m
                    .refunds
                    .entry(r.region.as_str())
                    .or_default()
                    .push(env.event_id.as_str()),
                _ => {}
            }
        }
        for q in &r.quarantine {
            if let Some(env) = q
                .env
                .as_ref()
                .filter(|e| e.event_type == "PaymentProcessed")
            {
                let m = money.entry(env.aggregate_id.as_str()).or_default();
                m.charge_events.insert(env.event_id.as_str());
                m.payment_ids.extend(payment_id(env));
            }
        }
    }
    for (order, m) in &money {
        let mut wrong = Vec::new();
        for (region, ids) in &m.charges {
            if ids.len() > 1 {
                wrong.push(format!(
                    "charged {} times in region {region}'s stream (PaymentProcessed {ids:?})",
                    ids.len()
                ));
            }
        }
        if m.payment_ids.len() > 1 {
            wrong.push(format!(
                "charged under {} payment ids {:?}",
                m.payment_ids.len(),
                m.payment_ids
            ));
        }
        for (region, ids) in &m.refunds {
            let charges = m.charges.get(region).map_or(0, Vec::len);
            if ids.len() > 1 || ids.len() > charges {
                wrong.push(format!(
                    "refunded {} times for {charges} charges in region {region}'s stream (PaymentRefunded {ids:?})",
                    ids.len()
                ));
            }
        }
        if !wrong.is_empty() {
            f.add(format!("order {order} {}", wrong.join("; ")));
        } else if m.charge_events.len() > 1 {
            verdict.notes.push(format!(
                "order {order} was charged by {} events {:?} under one payment id: one charge at the provider (its idempotency key)",
                m.charge_events.len(),
                m.charge_events
            ));
        }
    }
    f
}

// --- (3) -------------------------------------------------------------------------------

/// Per SKU, in the active region: on hand = the stock it was given minus what shipped;
/// reserved = the quantities of orders whose reservation is neither released nor
/// shipped; reservations never exceed what is on hand, at any point of the stream. Per
/// order the inventory events follow the model: one reservation (or one failure), then
/// at most one release or shipment of it.
fn stock_conserved(input: &CheckInput, active: Option<&RegionSnapshot>) -> Findings {
    let mut f = Findings::default();
    let Some(active) = active else { return f };
    #[derive(Clone, Copy, PartialEq, Debug)]
    enum Hold {
        Reserved,
        Failed,
        Released,
        Shipped,
    }
    let mut on_hand: BTreeMap<String, i64> = BTreeMap::new();
    let mut first_stock: BTreeMap<String, i64> = BTreeMap::new();
    let mut reserved: BTreeMap<String, i64> = BTreeMap::new();
    let mut holds: HashMap<String, (Hold, Vec<(String, i64)>)> = HashMap::new();
    for (stored, env) in envs(&active.events) {
        let Ok(event) = DomainEvent::from_envelope(env) else {
            continue; // invariant 5 reports unreadable events
        };
        let order = env.aggregate_id.clone();
        let before = holds.get(&order).map(|(h, _)| *h);
        let mut bad = |what: &str| {
            f.add(format!(
                "order {order}: {what} (entry {}, {}) after {before:?}",
                stored.id, env.event_type
            ))
        };
        match &event {
            DomainEvent::ProductUpserted(p) => {
                let sku = p.sku.as_str().to_string();
                first_stock.entry(sku.clone()).or_insert(p.stock);
                on_hand.insert(sku, p.stock);
            }
            DomainEvent::InventoryReserved(e) => {
                if before.is_some() {
                    bad("reserved again");
                }
                let items: Vec<(String, i64)> = e
                    .items
                    .iter()
                    .map(|i| (i.sku.as_str().to_string(), i.quantity.get()))
                    .collect();
                for (sku, q) in &items {
                    let r = reserved.entry(sku.clone()).or_default();
                    *r += q;
                    let have = on_hand.get(sku).copied().unwrap_or(0);
                    if *r > have {
                        f.add(format!(
                            "SKU {sku} oversold at entry {} (order {order}): {r} reserved, {have} on hand",
                            stored.id
                        ));
                    }
                }
                holds.insert(order, (Hold::Reserved, items));
            }
            DomainEvent::InventoryReservationFailed(_) => {
                if before.is_some() {
                    bad("reservation failed after another inventory step");
                }
                holds.insert(order, (Hold::Failed, Vec::new()));
            }
            DomainEvent::InventoryReleased(_) | DomainEvent::OrderShipped(_) => {
                let shipped = matches!(event, DomainEvent::OrderShipped(_));
                if before != Some(Hold::Reserved) {
                    bad(if shipped {
                        "shipped without a reservation"
                    } else {
                        "released without a reservation"
                    });
                    continue;
                }
                let (_, items) = holds.get(&order).cloned().expect("reserved above");
                for (sku, q) in &items {
                    *reserved.entry(sku.clone()).or_default() -= q;
                    if shipped {
                        *on_hand.entry(sku.clone()).or_default() -= q;
                    }
                }
                let hold = if shipped {
                    Hold::Shipped
                } else {
                    Hold::Released
                };
                holds.insert(order, (hold, items));
            }
            _ => {}
        }
    }
    for (sku, initial) in input.initial_stock {
        match first_stock.get(sku) {
            Some(s) if s == initial => {}
            other => f.add(format!(
                "SKU {sku} was given stock {initial} but region {}'s stream starts it at {other:?}",
                active.region
            )),
        }
    }
    for (sku, expected_on_hand) in &on_hand {
        let expected_reserved = reserved.get(sku).copied().unwrap_or(0);
        let key = keys::product(sku);
        let stored: Option<Product> = match active.derived.get(&key) {
            Some(Dumped::String(b)) => serde_json::from_slice(b).ok(),
            _ => None,
        };
        let Some(p) = stored else {
            f.add(format!(
                "SKU {sku}: no readable {key} in region {}",
                active.region
            ));
            continue;
        };
        if p.stock != *expected_on_hand || p.reserved != expected_reserved {
            f.add(format!(
                "SKU {sku} in region {}: stock {} reserved {}, but the events give stock {expected_on_hand} (initial {} - shipped) reserved {expected_reserved}",
                active.region,
                p.stock,
                p.reserved,
                first_stock.get(sku).copied().unwrap_or(0)
            ));
        }
        if p.reserved < 0 || p.reserved > p.stock {
            f.add(format!(
                "SKU {sku} in region {}: reserved {} of stock {}",
                active.region, p.reserved, p.stock
            ));
        }
    }
    f
}

// --- (4) -------------------------------------------------------------------------------

/// After the settle, no order in the active region is still on its way (PENDING,
/// CONFIRMED, PAID) and none owes a compensation: a cancelled, rejected or failed order
/// holds no reservation, and a cancelled one holds no unrefunded charge. SHIPPED is a
/// resting state (it waits for the carrier, not for the system).
fn nothing_left_in_flight(active: Option<&RegionSnapshot>) -> Findings {
    let mut f = Findings::default();
    let Some(active) = active else { return f };
    for (key, value) in active.derived.range("tandem:order:".to_string()..) {
        if !key.starts_with("tandem:order:") {
            break;
        }
        let Dumped::String(bytes) = value else {
            continue;
        };
        let Ok(order) = serde_json::from_slice::<Order>(bytes) else {
            f.add(format!("{key} in region {} is not an order", active.region));
            continue;
        };
        let id = order.order_id.as_str();
        match order.status {
            Status::Pending | Status::Confirmed | Status::Paid => f.add(format!(
                "order {id} is still {} in region {} (version {})",
                order.status, active.region, order.version
            )),
            Status::Cancelled | Status::Rejected | Status::PaymentFailed => {
                if order.inventory == Some(InventoryHold::Reserved) {
                    f.add(format!(
                        "order {id} is {} but still holds its reservation in region {}",
                        order.status, active.region
                    ));
                }
                if order.status == Status::Cancelled
                    && order.payment == Some(PaymentState::Processed)
                {
                    f.add(format!(
                        "order {id} is CANCELLED but its charge was not refunded in region {}",
                        active.region
                    ));
                }
            }
            Status::Shipped | Status::Delivered => {}
        }
    }
    f
}

// --- (5) -------------------------------------------------------------------------------

/// Both regions hold the same event and dead-letter streams (ids and bytes), and each
/// region's derived state is exactly the fold of its stream with the model's `apply`:
/// together, the same derived state in both.
fn regions_converge(input: &CheckInput) -> Findings {
    let mut f = Findings::default();
    let (a, b) = (input.a, input.b);
    if a.events.len() != b.events.len() {
        f.add(format!(
            "event streams differ in length: a {} entries, b {}",
            a.events.len(),
            b.events.len()
        ));
    }
    let ids_a: BTreeMap<&str, &StoredEvent> = a.events.iter().map(|e| (e.id.as_str(), e)).collect();
    let ids_b: BTreeMap<&str, &StoredEvent> = b.events.iter().map(|e| (e.id.as_str(), e)).collect();
    for (id, ea) in &ids_a {
        match ids_b.get(id) {
            None => f.add(format!(
                "entry {id} ({}) is only in region a's stream",
                ea.event_type
            )),
            Some(eb) if eb.raw != ea.raw || eb.event_type != ea.event_type => f.add(format!(
                "entry {id} differs between the regions: a {} / b {}",
                ea.event_type, eb.event_type
            )),
            Some(_) => {}
        }
    }
    for (id, eb) in &ids_b {
        if !ids_a.contains_key(id) {
            f.add(format!(
                "entry {id} ({}) is only in region b's stream",
                eb.event_type
            ));
        }
    }
    if a.dlq != b.dlq {
        f.add(format!(
            "dead-letter streams differ: a {} entries, b {}",
            a.dlq.len(),
            b.dlq.len()
        ));
    }
    for region in [a, b] {
        fold_matches(region, &mut f);
    }
    f
}

/// The region's derived state equals the fold of its stream.
fn fold_matches(region: &RegionSnapshot, f: &mut Findings) {
    let mut state = MemState::default();
    for e in &region.events {
        let Some(env) = &e.env else {
            f.add(format!(
                "region {}: entry {} is not a readable event",
                region.region, e.id
            ));
            return;
        };
        if let Err(err) = state.apply_entry(&e.id, env) {
            f.add(format!(
                "region {}: entry {} ({}) cannot be applied: {err}",
                region.region, e.id, e.event_type
            ));
            return;
        }
    }
    let r = &region.region;
    let mut expected: BTreeMap<String, Dumped> = BTreeMap::new();
    for (k, v) in &state.values {
        expected.insert(k.clone(), Dumped::String(v.clone().into_bytes()));
    }
    for (k, counters) in &state.counters {
        let fields = counters
            .iter()
            .filter(|(_, n)| **n != 0)
            .map(|(f, n)| (f.clone(), n.to_string().into_bytes()))
            .collect();
        expected.insert(k.clone(), Dumped::Hash(fields));
    }
    if !state.event_index.is_empty() {
        let fields = state
            .event_index
            .iter()
            .map(|(e, id)| (e.clone(), id.clone().into_bytes()))
            .collect();
        expected.insert(keys::EVENT_INDEX.to_string(), Dumped::Hash(fields));
    }
    for (agg, ids) in &state.aggregates {
        expected.insert(
            keys::aggregate(agg),
            Dumped::List(ids.iter().map(|i| i.clone().into_bytes()).collect()),
        );
    }
    let mut actual: BTreeMap<String, Dumped> = region
        .derived
        .iter()
        .filter(|(k, _)| k.as_str() != keys::PROJECTION_CURSOR)
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A counter at 0 and a missing one count the same.
    if let Some(Dumped::Hash(h)) = actual.get_mut(keys::ORDER_COUNTS) {
        h.retain(|_, v| v.as_slice() != b"0");
    }
    let keys: BTreeSet<&String> = expected.keys().chain(actual.keys()).collect();
    for k in keys {
        match (expected.get(k), actual.get(k)) {
            (Some(x), Some(y)) if x == y => {}
            (Some(_), Some(_)) => f.add(format!(
                "region {r}: {k} differs from the fold of its stream"
            )),
            (Some(_), None) => f.add(format!(
                "region {r}: {k} is missing (the fold of its stream has it)"
            )),
            (None, Some(_)) => f.add(format!(
                "region {r}: {k} exists but the fold of its stream has no such key"
            )),
            (None, None) => {}
        }
    }
    let last = region.events.last().map(|e| e.id.as_bytes().to_vec());
    let cursor = match region.derived.get(keys::PROJECTION_CURSOR) {
        Some(Dumped::String(c)) => Some(c.clone()),
        _ => None,
    };
    if region.role.as_deref() == Some("standby") && cursor != last {
        f.add(format!(
            "region {r} (standby): projection cursor {:?} is not its last entry {:?}",
            cursor.map(|c| String::from_utf8_lossy(&c).into_owned()),
            last.map(|c| String::from_utf8_lossy(&c).into_owned())
        ));
    }
}

// --- (6) -------------------------------------------------------------------------------

/// In each region's stream, every aggregate's events carry sequence 1, 2, 3, ... in
/// stream order.
fn sequences_without_gap(input: &CheckInput) -> Findings {
    let mut f = Findings::default();
    for region in [input.a, input.b] {
        let mut last: HashMap<&str, u64> = HashMap::new();
        for (stored, env) in envs(&region.events) {
            let prev = last.get(env.aggregate_id.as_str()).copied().unwrap_or(0);
            if env.sequence != prev + 1 {
                f.add(format!(
                    "region {}: {} {} has sequence {} after {prev} (entry {})",
                    region.region, env.aggregate_type, env.aggregate_id, env.sequence, stored.id
                ));
            }
            last.insert(env.aggregate_id.as_str(), env.sequence.max(prev));
        }
    }
    f
}

// --- (7) -------------------------------------------------------------------------------

/// One active region after the settle, the standby at no higher epoch; no event was
/// committed at an epoch after an event of a higher epoch had been committed (the entry
/// id is Redis's clock at commit, kept by the copy and by the quarantine, and both
/// regions share the machine's clock; ties are not judged).
///
/// The first commit of a higher epoch is an upper bound of that epoch's start, so the
/// rule never blames a write that happened before the new epoch began. (The epochs'
/// start offsets bound the start from below, which could blame a write the old active
/// made before the promotion and the copy had not carried yet: legitimate in `async`,
/// and what the quarantine of invariant 1 accounts for.)
fn no_write_after_a_higher_epoch(input: &CheckInput, settled: bool) -> Findings {
    let mut f = Findings::default();
    let (a, b) = (input.a, input.b);
    // Role records mid-failover (the old active not yet demoted, the new one not yet
    // promoted) are judged only at rest.
    let roles = if settled {
        (a.is_active(), b.is_active())
    } else {
        (true, false)
    };
    match roles {
        (true, true) => f.add(format!(
            "both regions are active after the settle (a at epoch {}, b at epoch {})",
            a.epoch, b.epoch
        )),
        (false, false) => f.add(format!(
            "no region is active after the settle (a {:?}@{}, b {:?}@{})",
            a.role, a.epoch, b.role, b.epoch
        )),
        (true, false) if settled && b.epoch > a.epoch => f.add(format!(
            "standby b is at epoch {} above active a's {}",
            b.epoch, a.epoch
        )),
        (false, true) if a.epoch > b.epoch => f.add(format!(
            "standby a is at epoch {} above active b's {}",
            a.epoch, b.epoch
        )),
        _ => {}
    }

    // Acknowledged writes, to tell them apart in the examples.
    let acked_orders: HashSet<&str> = input
        .history
        .acked_orders()
        .filter_map(|o| o.order_id.as_deref())
        .collect();
    let acked_cancels: HashSet<&str> = input
        .history
        .cancels
        .iter()
        .filter(|c| matches!(c.fate, Fate::Acked { .. }))
        .map(|c| c.reason.as_str())
        .collect();

    // Every commit once: (epoch, commit ms, writer, event id, type, where, acked).
    struct Commit<'a> {
        epoch: u64,
        ms: u64,
        env: &'a Envelope,
        place: String,
    }
    let mut commits: Vec<Commit> = Vec::new();
    let mut seen: HashSet<&str> = HashSet::new();
    for region in [a, b] {
        for (stored, env) in envs(&region.events) {
            if seen.insert(env.event_id.as_str()) {
                commits.push(Commit {
                    epoch: env.epoch,
                    ms: stored.ms(),
                    env,
                    place: format!("entry {}", stored.id),
                });
            }
        }
    }
    for region in [a, b] {
        for q in &region.quarantine {
            let Some(env) = &q.env else { continue };
            if q.stream == keys::EVENTS && seen.insert(env.event_id.as_str()) {
                commits.push(Commit {
                    epoch: env.epoch,
                    ms: q.original_ms(),
                    env,
                    place: format!(
                        "entry {} (quarantined in region {})",
                        q.original_id, region.region
                    ),
                });
            }
        }
    }
    // For each epoch, the earliest commit of any higher epoch.
    let mut first_of: BTreeMap<u64, (u64, &Commit)> = BTreeMap::new();
    for c in &commits {
        let e = first_of.entry(c.epoch).or_insert((c.ms, c));
        if c.ms < e.0 {
            *e = (c.ms, c);
        }
    }
    let mut above: BTreeMap<u64, (u64, &Commit)> = BTreeMap::new();
    let mut best: Option<(u64, &Commit)> = None;
    for (&epoch, &(ms, c)) in first_of.iter().rev() {
        if let Some(b) = best {
            above.insert(epoch, b);
        }
        if best.is_none_or(|(bms, _)| ms < bms) {
            best = Some((ms, c));
        }
    }
    for c in &commits {
        let Some(&(ms, first)) = above.get(&c.epoch) else {
            continue;
        };
        if c.ms > ms {
            let acked = match c.env.event_type.as_str() {
                "OrderPlaced" => acked_orders.contains(c.env.aggregate_id.as_str()),
                "OrderCancelled" => cancel_reason(c.env).is_some_and(|r| acked_cancels.contains(r)),
                _ => false,
            };
            f.add(format!(
                "region {} committed {} {} of {} at epoch {} at {} ms ({}){}, {} ms after epoch {} had begun ({} by region {} at {} ms)",
                c.env.region,
                c.env.event_type,
                c.env.event_id,
                c.env.aggregate_id,
                c.epoch,
                c.ms,
                c.place,
                if acked { ", acknowledged to a client" } else { "" },
                c.ms - ms,
                first.epoch,
                first.place,
                first.env.region,
                ms
            ));
        }
    }

    f
}

#[cfg(test)]
mod tests;

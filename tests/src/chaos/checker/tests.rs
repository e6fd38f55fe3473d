//! The checker on hand-made histories and snapshots: a correct run passes, and each
//! invariant fails on the damage it exists to find.

use super::*;
use crate::chaos::history::{Attempt, CancelWrite, OrderWrite, Outcome};
use crate::chaos::snapshot::Quarantined;
use orders_model::events::*;
use orders_model::order::{LineItem, OrderId, ShipmentId};
use orders_model::product::{Currency, ItemQuantity, Quantity, Sku};
use orders_model::{Cause, Writer};

const SKU: &str = "W-1";

/// Builds a stream the way the node would: per-aggregate sequences, ids from a clock.
struct World {
    events: Vec<StoredEvent>,
    ms: u64,
    seqs: HashMap<String, u64>,
    region: String,
    epoch: u64,
    n: u64,
    /// Event ids are `<tag>-<n>`: distinct per world.
    tag: &'static str,
}

impl World {
    fn new() -> World {
        World {
            events: Vec::new(),
            ms: 1_000,
            seqs: HashMap::new(),
            region: "a".into(),
            epoch: 1,
            n: 0,
            tag: "ev",
        }
    }

    fn push(&mut self, event: DomainEvent) -> StoredEvent {
        let agg = event.aggregate_id().to_string();
        let seq = self.seqs.entry(agg).or_default();
        *seq += 1;
        self.n += 1;
        let writer = Writer {
            region: self.region.clone(),
            epoch: self.epoch,
        };
        let env = event.envelope(
            *seq,
            &Cause::request("r", None),
            &writer,
            format!("{}-{}", self.tag, self.n),
            "t".into(),
        );
        self.ms += 10;
        let stored = StoredEvent::new(
            &format!("{}-0", self.ms),
            &env.event_type,
            &serde_json::to_string(&env).unwrap(),
        );
        self.events.push(stored.clone());
        stored
    }

    /// A region holding this stream and the fold of it, as a settled region does.
    fn region(&self, id: &str, role: &str) -> RegionSnapshot {
        let mut state = MemState::default();
        for e in &self.events {
            state.apply_entry(&e.id, e.env.as_ref().unwrap()).unwrap();
        }
        let mut derived = BTreeMap::new();
        for (k, v) in &state.values {
            derived.insert(k.clone(), Dumped::String(v.clone().into_bytes()));
        }
        for (k, c) in &state.counters {
            derived.insert(
                k.clone(),
                Dumped::Hash(
                    c.iter()
                        .map(|(f, n)| (f.clone(), n.to_string().into_bytes()))
                        .collect(),
                ),
            );
        }
        derived.insert(
            keys::EVENT_INDEX.into(),
            Dumped::Hash(
                state
                    .event_index
                    .iter()
                    .map(|(e, i)| (e.clone(), i.clone().into_bytes()))
                    .collect(),
            ),
        );
        for (agg, ids) in &state.aggregates {
            derived.insert(
                keys::aggregate(agg),
                Dumped::List(ids.iter().map(|i| i.clone().into_bytes()).collect()),
            );
        }
        if let Some(c) = &state.cursor {
            derived.insert(
                keys::PROJECTION_CURSOR.into(),
                Dumped::String(c.clone().into_bytes()),
            );
        }
        RegionSnapshot {
            region: id.into(),
            role: Some(role.into()),
            epoch: self.epoch,
            events: self.events.clone(),
            derived,
            ..RegionSnapshot::empty(id)
        }
    }
}

fn oid(s: &str) -> OrderId {
    OrderId::parse(s).unwrap()
}

fn items(q: i64) -> Vec<ItemQuantity> {
    vec![ItemQuantity {
        sku: Sku::parse(SKU).unwrap(),
        quantity: Quantity::parse(q).unwrap(),
    }]
}

fn placed(id: &str, key: &str, q: i64) -> DomainEvent {
    DomainEvent::OrderPlaced(OrderPlaced {
        order_id: oid(id),
        customer_id: "c".into(),
        items: vec![LineItem {
            sku: Sku::parse(SKU).unwrap(),
            quantity: Quantity::parse(q).unwrap(),
            unit_price: 100,
        }],
        amount: 100 * q,
        currency: Currency::usd(),
        shipping_address: orders_model::pii::Sealed::from_stored("x"),
        payment_token: orders_model::pii::Sealed::from_stored("tok_ok"),
        idempotency_key: Some(orders_model::order::IdempotencyKey::parse(key).unwrap()),
        request_hash: Some("h".into()),
    })
}

fn charged(id: &str, pay: &str) -> DomainEvent {
    DomainEvent::PaymentProcessed(PaymentProcessed {
        order_id: oid(id),
        payment_id: pay.into(),
        amount: 100,
        currency: Currency::usd(),
    })
}

/// Product W-1 with 10 in stock; order o1 (key k1) shipped; order o2 (key k2)
/// cancelled after its reservation, released.
fn good_world() -> World {
    good_world_tagged("ev")
}

/// [`good_world`] with event ids `<tag>-<n>`: another region's history of the same run.
fn good_world_tagged(tag: &'static str) -> World {
    let mut w = World::new();
    w.tag = tag;
    w.push(DomainEvent::ProductUpserted(ProductUpserted {
        sku: Sku::parse(SKU).unwrap(),
        name: "W".into(),
        price: 100,
        currency: Currency::usd(),
        stock: 10,
    }));
    w.push(placed("o1", "k1", 2));
    w.push(DomainEvent::InventoryReserved(InventoryChange {
        order_id: oid("o1"),
        items: items(2),
        reason: None,
    }));
    w.push(DomainEvent::OrderConfirmed(OrderConfirmed {
        order_id: oid("o1"),
        amount: None,
    }));
    w.push(charged("o1", "p1"));
    w.push(DomainEvent::OrderPaid(OrderPaid {
        order_id: oid("o1"),
        payment_id: "p1".into(),
    }));
    w.push(DomainEvent::ShipmentCreated(ShipmentCreated {
        order_id: oid("o1"),
        shipment_id: ShipmentId::parse("s1").unwrap(),
        tracking_number: "TRK1".into(),
        carrier: "UPS".into(),
    }));
    w.push(DomainEvent::OrderShipped(OrderShipped {
        order_id: oid("o1"),
        shipment_id: ShipmentId::parse("s1").unwrap(),
        tracking_number: "TRK1".into(),
        carrier: "UPS".into(),
        items: items(2),
    }));
    w.push(placed("o2", "k2", 3));
    w.push(DomainEvent::InventoryReserved(InventoryChange {
        order_id: oid("o2"),
        items: items(3),
        reason: None,
    }));
    w.push(DomainEvent::OrderCancelled(OrderCancelled {
        order_id: oid("o2"),
        reason: Some("cancel-2".into()),
        previous_status: Status::Pending,
    }));
    w.push(DomainEvent::InventoryReleased(InventoryChange {
        order_id: oid("o2"),
        items: items(3),
        reason: Some("order_cancelled".into()),
    }));
    w
}

fn ack(local: bool) -> Fate {
    Fate::Acked {
        at_ms: 5,
        region: Some("a".into()),
        durability: if local {
            AckDurability::Local
        } else {
            AckDurability::Replicated
        },
    }
}

fn order(key: &str, id: &str, fate: Fate) -> OrderWrite {
    OrderWrite {
        key: key.into(),
        items: vec![(SKU.into(), 1)],
        payment_token: "tok_ok".into(),
        order_id: Some(id.into()),
        attempts: vec![Attempt {
            sent_ms: 1,
            done_ms: 5,
            outcome: Outcome::Transport("timeout".into()),
        }],
        fate,
    }
}

fn good_history(local: bool) -> History {
    History {
        orders: vec![order("k1", "o1", ack(local)), order("k2", "o2", ack(local))],
        cancels: vec![CancelWrite {
            order_id: "o2".into(),
            reason: "cancel-2".into(),
            attempts: vec![],
            fate: ack(true),
        }],
        reads: BTreeMap::new(),
    }
}

fn stock() -> BTreeMap<String, i64> {
    [(SKU.to_string(), 10)].into()
}

fn judge(
    durability: Durability,
    history: &History,
    a: &RegionSnapshot,
    b: &RegionSnapshot,
) -> Verdict {
    check(&CheckInput {
        durability,
        history,
        initial_stock: &stock(),
        a,
        b,
        unsettled: None,
    })
}

fn count(v: &Verdict, number: u8) -> usize {
    v.invariants[usize::from(number) - 1].count
}

/// Only `number` is violated (and at least once).
fn only(v: &Verdict, number: u8) {
    for i in &v.invariants {
        if i.number == number {
            assert!(i.count > 0, "invariant {number} not violated: {v:#?}");
        } else {
            assert_eq!(
                i.count, 0,
                "invariant {} violated too: {:#?}",
                i.number, i.examples
            );
        }
    }
}

#[test]
fn a_correct_run_has_no_violation() {
    let w = good_world();
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    for d in [Durability::Async, Durability::Replicated] {
        let v = judge(d, &good_history(false), &a, &b);
        assert_eq!(v.violations(), 0, "{v:#?}");
        assert_eq!(v.active.as_deref(), Some("a"));
        assert_eq!((v.acked_orders, v.acked_cancels), (2, 1));
    }
}

#[test]
fn invariant_1_an_acknowledged_order_missing_everywhere_is_lost() {
    let w = good_world();
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let mut h = good_history(true);
    h.orders.push(order("k3", "o3", ack(true)));
    let v = judge(Durability::Async, &h, &a, &b);
    only(&v, 1);
    assert!(v.invariants[0].examples[0].contains("o3"), "{v:#?}");
}

#[test]
fn invariant_1_a_quarantined_local_ack_is_reported_but_a_replicated_one_is_lost() {
    let mut w = good_world();
    // o3 was placed by b at epoch 1 and quarantined when b rejoined.
    let mut other = World::new();
    other.tag = "other";
    other.ms = 5_000;
    other.region = "b".into();
    let q = other.push(placed("o3", "k3", 1));
    let (a, mut b) = (w.region("a", "active"), w.region("b", "standby"));
    b.quarantine.push(Quarantined {
        id: "9-0".into(),
        stream: keys::EVENTS.into(),
        original_id: q.id.clone(),
        env: q.env.clone(),
    });
    let mut h = good_history(true);
    h.orders.push(order("k3", "o3", ack(true)));
    let v = judge(Durability::Async, &h, &a, &b);
    assert_eq!(v.violations(), 0, "{v:#?}");
    assert_eq!(v.quarantined_orders, vec!["o3".to_string()]);

    h.orders.last_mut().unwrap().fate = ack(false);
    let v = judge(Durability::Replicated, &h, &a, &b);
    only(&v, 1);
    // A cancellation is acknowledged after the local write only: quarantined, reported.
    let c = w.push(DomainEvent::OrderCancelled(OrderCancelled {
        order_id: oid("o1"),
        reason: Some("cancel-1".into()),
        previous_status: Status::Shipped,
    }));
    let (a, mut b) = (
        good_world().region("a", "active"),
        good_world().region("b", "standby"),
    );
    b.quarantine.push(Quarantined {
        id: "10-0".into(),
        stream: keys::EVENTS.into(),
        original_id: c.id.clone(),
        env: c.env.clone(),
    });
    let mut h = good_history(false);
    h.cancels.push(CancelWrite {
        order_id: "o1".into(),
        reason: "cancel-1".into(),
        attempts: vec![],
        fate: ack(true),
    });
    let v = judge(Durability::Replicated, &h, &a, &b);
    assert_eq!(v.violations(), 0, "{v:#?}");
    assert_eq!(v.quarantined_cancels, vec!["o1".to_string()]);
}

#[test]
fn invariant_1_a_lost_cancellation_is_a_violation() {
    let w = good_world();
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let mut h = good_history(true);
    h.cancels.push(CancelWrite {
        order_id: "o1".into(),
        reason: "cancel-never-written".into(),
        attempts: vec![],
        fate: ack(true),
    });
    only(&judge(Durability::Async, &h, &a, &b), 1);
}

#[test]
fn invariant_2_a_second_charge_is_a_violation() {
    let mut w = good_world();
    w.push(charged("o1", "p2"));
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    assert!(count(&v, 2) >= 1, "{v:#?}");
    assert!(v.invariants[1].examples[0].contains("o1 charged 2 times"));
}

#[test]
fn invariant_2_one_payment_id_charged_by_both_regions_is_one_charge() {
    // a charged o1 as p1 and died before the copy; b charged it again as p1: the
    // provider took the money once (the payment id is its idempotency key).
    let w = good_world();
    let a = w.region("a", "standby");
    let b = good_world_tagged("ev-b").region("b", "active");
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    assert_eq!(count(&v, 2), 0, "{v:#?}");
    assert!(
        v.notes.iter().any(|n| n.contains("under one payment id")),
        "{v:#?}"
    );
}

#[test]
fn invariant_2_counts_a_charge_held_by_only_one_region() {
    let w = good_world();
    let (a, _) = (w.region("a", "active"), ());
    let mut w2 = good_world();
    w2.push(charged("o1", "p9"));
    let b = w2.region("b", "standby");
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    assert_eq!(count(&v, 2), 1, "{v:#?}");
}

#[test]
fn invariant_3_stored_stock_that_the_events_do_not_give_is_a_violation() {
    let w = good_world();
    let (mut a, mut b) = (w.region("a", "active"), w.region("b", "standby"));
    for r in [&mut a, &mut b] {
        let key = keys::product(SKU);
        let Some(Dumped::String(bytes)) = r.derived.get(&key) else {
            panic!("no product")
        };
        let mut p: Product = serde_json::from_slice(bytes).unwrap();
        p.stock += 1;
        r.derived
            .insert(key, Dumped::String(serde_json::to_vec(&p).unwrap()));
    }
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    assert!(count(&v, 3) >= 1, "{v:#?}");
}

#[test]
fn invariant_3_reserving_more_than_is_on_hand_is_a_violation() {
    let mut w = good_world();
    w.push(placed("o4", "k4", 9));
    w.push(DomainEvent::InventoryReserved(InventoryChange {
        order_id: oid("o4"),
        items: items(9),
        reason: None,
    }));
    w.push(DomainEvent::InventoryReleased(InventoryChange {
        order_id: oid("o4"),
        items: items(9),
        reason: None,
    }));
    w.push(DomainEvent::InventoryReleased(InventoryChange {
        order_id: oid("o4"),
        items: items(9),
        reason: None,
    }));
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    let ex = v.invariants[2].examples.join("\n");
    assert!(ex.contains("oversold"), "{ex}");
    assert!(ex.contains("released without a reservation"), "{ex}");
}

#[test]
fn invariant_4_an_order_left_pending_is_a_violation() {
    let mut w = good_world();
    w.push(placed("o5", "k5", 1));
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    only(&v, 4);
    assert!(v.invariants[3].examples[0].contains("o5 is still PENDING"));
}

#[test]
fn invariant_4_a_cancelled_order_still_holding_stock_is_a_violation() {
    let mut w = good_world();
    w.push(placed("o6", "k6", 1));
    w.push(DomainEvent::InventoryReserved(InventoryChange {
        order_id: oid("o6"),
        items: items(1),
        reason: None,
    }));
    w.push(DomainEvent::OrderCancelled(OrderCancelled {
        order_id: oid("o6"),
        reason: None,
        previous_status: Status::Pending,
    }));
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    only(&v, 4);
}

#[test]
fn invariant_5_a_missing_entry_or_a_stale_derived_key_is_a_violation() {
    let mut w = good_world();
    let a_world = good_world();
    w.events.pop();
    let (a, b) = (a_world.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    only(&v, 5);
    assert!(v.invariants[4]
        .examples
        .iter()
        .any(|e| e.contains("only in region a")));

    // Same streams, but b's derived order is not what its stream folds to.
    let (a, mut b) = (
        a_world.region("a", "active"),
        a_world.region("b", "standby"),
    );
    b.derived
        .insert(keys::order("o1"), Dumped::String(b"{}".to_vec()));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    assert!(count(&v, 5) >= 1, "{v:#?}");
    assert!(v.invariants[4].examples[0].contains("tandem:order:o1 differs"));
}

#[test]
fn invariant_5_a_standby_that_has_not_projected_everything_is_a_violation() {
    let w = good_world();
    let (a, mut b) = (w.region("a", "active"), w.region("b", "standby"));
    b.derived.insert(
        keys::PROJECTION_CURSOR.into(),
        Dumped::String(w.events[3].id.clone().into_bytes()),
    );
    only(&judge(Durability::Async, &good_history(true), &a, &b), 5);
}

#[test]
fn invariant_6_a_sequence_gap_is_a_violation() {
    let mut w = good_world();
    // o1's next event skips a number.
    *w.seqs.get_mut("o1").unwrap() += 1;
    w.push(DomainEvent::ShipmentDispatched(ShipmentDispatched {
        order_id: oid("o1"),
        shipment_id: ShipmentId::parse("s1").unwrap(),
        dispatched_at: None,
    }));
    let (a, b) = (w.region("a", "active"), w.region("b", "standby"));
    let v = judge(Durability::Async, &good_history(true), &a, &b);
    only(&v, 6);
    assert_eq!(count(&v, 6), 2, "once per region: {v:#?}");
}

#[test]
fn invariant_7_a_write_at_an_old_epoch_after_a_new_one_began_is_a_violation() {
    let mut w = good_world();
    // Region b begins epoch 2 and commits; then region a still commits at epoch 1.
    w.region = "b".into();
    w.epoch = 2;
    w.push(DomainEvent::ShipmentDispatched(ShipmentDispatched {
        order_id: oid("o1"),
        shipment_id: ShipmentId::parse("s1").unwrap(),
        dispatched_at: None,
    }));
    let mut stale = World::new();
    stale.tag = "stale";
    stale.ms = w.ms + 50;
    let late = stale.push(placed("o7", "k7", 1));
    let (mut a, b) = (w.region("a", "standby"), w.region("b", "active"));
    a.quarantine.push(Quarantined {
        id: "1-0".into(),
        stream: keys::EVENTS.into(),
        original_id: late.id.clone(),
        env: late.env.clone(),
    });
    let mut h = good_history(true);
    h.orders.push(order("k7", "o7", ack(true)));
    let v = judge(Durability::Async, &h, &a, &b);
    only(&v, 7);
    assert!(
        v.invariants[6].examples[0].contains("acknowledged to a client"),
        "{v:#?}"
    );

    // The same write committed before epoch 2's first commit is legitimate (async).
    let mut early = World::new();
    early.tag = "early";
    early.ms = 1_005;
    let e = early.push(placed("o7", "k7", 1));
    a.quarantine[0].original_id = e.id.clone();
    a.quarantine[0].env = e.env.clone();
    let v = judge(Durability::Async, &h, &a, &b);
    assert_eq!(v.violations(), 0, "{v:#?}");
}

#[test]
fn invariant_7_two_active_regions_are_a_violation() {
    let w = good_world();
    let (a, b) = (w.region("a", "active"), w.region("b", "active"));
    only(&judge(Durability::Async, &good_history(true), &a, &b), 7);
}

#[test]
fn without_a_settle_only_the_history_rules_are_judged_and_convergence_fails() {
    let mut w = good_world();
    let a = w.region("a", "active");
    w.push(placed("o8", "k8", 1));
    // b is ahead and mid-failover (both active): at rest this would break 1, 4, 5, 7.
    let b = w.region("b", "active");
    let mut h = good_history(true);
    h.orders.push(order("k9", "o9", ack(true)));
    let v = check(&CheckInput {
        durability: Durability::Async,
        history: &h,
        initial_stock: &stock(),
        a: &a,
        b: &b,
        unsettled: Some("event streams differ"),
    });
    let judged: Vec<u8> = v
        .invariants
        .iter()
        .filter(|i| i.judged)
        .map(|i| i.number)
        .collect();
    assert_eq!(judged, vec![2, 5, 6, 7]);
    assert_eq!(v.violations(), 1, "{v:#?}");
    assert!(v.invariants[4].examples[0].contains("did not settle"));
    assert_eq!(v.acked_orders, 3);
}

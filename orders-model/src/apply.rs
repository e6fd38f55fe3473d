//! The one pure `apply(state, event)` that derives all state from events.
//!
//! It runs in three places and must give the same bytes in each: at command time in
//! the active region (the new state is written with the event in one atomic step), on
//! replicated events in the standby, and in `POST /admin/rebuild`. It therefore reads
//! nothing but the event and the keys the event names ([`keys_for`]), and never the
//! clock or randomness. It folds what the log holds: whether an event was allowed is
//! decided before it is written ([`crate::flow`]), not here.

use crate::events::DomainEvent;
use crate::order::{
    HistoryEntry, IdempotencyRecord, InventoryHold, Order, OrderId, PaymentState, ShipmentState,
    Status,
};
use crate::product::{ItemQuantity, Product, Sku};
use crate::webhooks::{Webhook, Webhooks};
use eventlog::{keys, Envelope};
use serde::{de::DeserializeOwned, Serialize};
use std::collections::{BTreeMap, HashMap};

/// Derived state as string keys and values, plus commutative counters.
pub trait State {
    /// The current value of a key. A key the caller did not load is a bug, reported as
    /// [`ApplyError::NotLoaded`] rather than read as absent.
    fn get(&self, key: &str) -> Result<Option<&str>, ApplyError>;
    fn put(&mut self, key: &str, value: String);
    /// Counters are added to, never compared, so concurrent commits need not conflict.
    fn incr(&mut self, key: &str, field: &str, delta: i64);
}

#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("key {0} was not loaded before apply")]
    NotLoaded(String),
    #[error("stored value of {key} is not valid: {source}")]
    Corrupt {
        key: String,
        source: serde_json::Error,
    },
    #[error("{0}")]
    UnknownEvent(String),
    #[error("event {event_type} refers to order {order_id}, which does not exist")]
    MissingOrder {
        event_type: &'static str,
        order_id: String,
    },
}

pub fn get_json<T: DeserializeOwned>(
    state: &impl State,
    key: &str,
) -> Result<Option<T>, ApplyError> {
    match state.get(key)? {
        None => Ok(None),
        Some(raw) => serde_json::from_str(raw)
            .map(Some)
            .map_err(|source| ApplyError::Corrupt {
                key: key.to_string(),
                source,
            }),
    }
}

fn put_json<T: Serialize>(state: &mut impl State, key: &str, value: &T) {
    state.put(
        key,
        serde_json::to_string(value).expect("state always serialises"),
    );
}

/// The order stored under its key, if any.
pub fn order(state: &impl State, id: &OrderId) -> Result<Option<Order>, ApplyError> {
    get_json(state, &keys::order(id.as_str()))
}

/// The product stored under its key, if any.
pub fn product(state: &impl State, sku: &Sku) -> Result<Option<Product>, ApplyError> {
    get_json(state, &keys::product(sku.as_str()))
}

/// Every key `apply` reads or writes for this event (counters excluded).
pub fn keys_for(event: &DomainEvent) -> Vec<String> {
    use DomainEvent::*;
    let mut keys = Vec::new();
    match event {
        ProductUpserted(p) => return vec![keys::product(p.sku.as_str())],
        DeadLetterReplayed(e) => return vec![keys::dlq_replayed(&e.dlq_id)],
        WebhookSubscribed(_) | WebhookDeleted(_) => return vec![keys::WEBHOOKS.to_string()],
        _ => {}
    }
    keys.push(keys::order(event.aggregate_id()));
    match event {
        OrderPlaced(e) => {
            if let Some(k) = &e.idempotency_key {
                keys.push(keys::idempotency(k.as_str()));
            }
        }
        InventoryReserved(e) | InventoryReleased(e) => {
            keys.extend(e.items.iter().map(|i| keys::product(i.sku.as_str())));
        }
        OrderShipped(e) => keys.extend(e.items.iter().map(|i| keys::product(i.sku.as_str()))),
        ShipmentCreated(e) => keys.push(keys::shipment(e.shipment_id.as_str())),
        _ => {}
    }
    keys.sort();
    keys.dedup();
    keys
}

/// Applies one event. Idempotence is the caller's business (commits are guarded by
/// compare-and-set, projections by a cursor); apply itself just folds.
pub fn apply(
    state: &mut impl State,
    env: &Envelope,
    event: &DomainEvent,
) -> Result<(), ApplyError> {
    use DomainEvent::*;
    if let ProductUpserted(p) = event {
        let key = keys::product(p.sku.as_str());
        let reserved = get_json::<Product>(state, &key)?
            .map(|old| old.reserved)
            .unwrap_or(0);
        let product = Product {
            sku: p.sku.clone(),
            name: p.name.clone(),
            price: p.price,
            currency: p.currency.clone(),
            stock: p.stock,
            reserved,
            version: env.sequence,
        };
        put_json(state, &key, &product);
        return Ok(());
    }
    if let DeadLetterReplayed(e) = event {
        let done = serde_json::json!({
            "eventId": env.event_id,
            "outcome": e.outcome,
            "at": env.occurred_at,
        });
        put_json(state, &keys::dlq_replayed(&e.dlq_id), &done);
        return Ok(());
    }
    if let WebhookSubscribed(_) | WebhookDeleted(_) = event {
        let mut hooks = get_json::<Webhooks>(state, keys::WEBHOOKS)?.unwrap_or_default();
        match event {
            WebhookSubscribed(e) => {
                hooks.insert(
                    e.webhook_id.clone(),
                    Webhook {
                        id: e.webhook_id.clone(),
                        url: e.url.clone(),
                        events: e.events.clone(),
                        secret: e.secret.clone(),
                        created_at: env.occurred_at.clone(),
                        version: env.sequence,
                    },
                );
            }
            WebhookDeleted(e) => {
                hooks.remove(&e.webhook_id);
            }
            _ => unreachable!("matched above"),
        }
        put_json(state, keys::WEBHOOKS, &hooks);
        return Ok(());
    }

    let order_key = keys::order(event.aggregate_id());
    let mut order = match event {
        OrderPlaced(e) => {
            if let Some(k) = &e.idempotency_key {
                // The first answer, kept with the body's fingerprint for retries.
                let first = IdempotencyRecord {
                    amount: e.amount,
                    currency: e.currency.clone(),
                    order_id: e.order_id.clone(),
                    region: env.region.clone(),
                    request_hash: e.request_hash.clone(),
                    status: Status::Pending,
                };
                put_json(state, &keys::idempotency(k.as_str()), &first);
            }
            placed(e, env)
        }
        _ => get_json::<Order>(state, &order_key)?.ok_or_else(|| ApplyError::MissingOrder {
            event_type: event.event_type().as_str(),
            order_id: event.aggregate_id().to_string(),
        })?,
    };
    let before = if matches!(event, OrderPlaced(_)) {
        None
    } else {
        Some(order.status)
    };

    // The order's own events set its status; the other modules' set their part.
    if let Some(status) = Status::set_by(event.event_type()) {
        order.status = status;
    }
    match event {
        InventoryReserved(e) => {
            order.inventory = Some(InventoryHold::Reserved);
            adjust_products(state, &e.items, 0, 1)?;
        }
        InventoryReservationFailed(_) => order.inventory = Some(InventoryHold::Failed),
        InventoryReleased(e) => {
            order.inventory = Some(InventoryHold::Released);
            adjust_products(state, &e.items, 0, -1)?;
        }
        PaymentProcessed(e) => {
            order.payment = Some(PaymentState::Processed);
            order.payment_id = Some(e.payment_id.clone());
        }
        PaymentFailed(e) => {
            order.payment = Some(PaymentState::Failed);
            order.payment_id = Some(e.payment_id.clone());
        }
        PaymentRefunded(_) => order.payment = Some(PaymentState::Refunded),
        ShipmentCreated(e) => {
            order.shipment = Some(ShipmentState::Created);
            order.shipment_id = Some(e.shipment_id.clone());
            order.tracking_number = Some(e.tracking_number.clone());
            order.carrier = Some(e.carrier.clone());
            state.put(
                &keys::shipment(e.shipment_id.as_str()),
                e.order_id.as_str().to_string(),
            );
        }
        OrderShipped(e) => {
            order.inventory = Some(InventoryHold::Shipped);
            adjust_products(state, &e.items, -1, -1)?;
        }
        ShipmentDispatched(_) => order.shipment = Some(ShipmentState::Dispatched),
        ShipmentDelivered(_) => order.shipment = Some(ShipmentState::Delivered),
        OrderPlaced(_)
        | OrderConfirmed(_)
        | OrderRejected(_)
        | OrderPaid(_)
        | OrderPaymentFailed(_)
        | OrderDelivered(_)
        | OrderCancelled(_) => {}
        ProductUpserted(_) | DeadLetterReplayed(_) | WebhookSubscribed(_) | WebhookDeleted(_) => {
            unreachable!("applied above")
        }
    }

    order.version = env.sequence;
    order.updated_at = env.occurred_at.clone();
    if before != Some(order.status) {
        order.history.push(HistoryEntry {
            status: order.status,
            at: env.occurred_at.clone(),
            event_id: env.event_id.clone(),
        });
        if let Some(old) = before {
            state.incr(keys::ORDER_COUNTS, old.as_str(), -1);
        }
        state.incr(keys::ORDER_COUNTS, order.status.as_str(), 1);
    }
    put_json(state, &order_key, &order);
    Ok(())
}

/// The order as its OrderPlaced event creates it.
fn placed(e: &crate::events::OrderPlaced, env: &Envelope) -> Order {
    Order {
        order_id: e.order_id.clone(),
        customer_id: e.customer_id.clone(),
        status: Status::Pending,
        items: e.items.clone(),
        amount: e.amount,
        currency: e.currency.clone(),
        shipping_address: e.shipping_address.clone(),
        payment_token: e.payment_token.clone(),
        payment_id: None,
        shipment_id: None,
        tracking_number: None,
        carrier: None,
        inventory: None,
        payment: None,
        shipment: None,
        region: env.region.clone(),
        version: env.sequence,
        created_at: env.occurred_at.clone(),
        updated_at: env.occurred_at.clone(),
        // `apply` records every status change, the first one included.
        history: Vec::new(),
    }
}

/// Moves quantities: `stock_sign` and `reserved_sign` say which way each count goes.
fn adjust_products(
    state: &mut impl State,
    items: &[ItemQuantity],
    stock_sign: i64,
    reserved_sign: i64,
) -> Result<(), ApplyError> {
    for item in items {
        let key = keys::product(item.sku.as_str());
        // A product is only ever created by ProductUpserted; an inventory event for an
        // unknown one can only come from a corrupted log, so it is skipped, not invented.
        if let Some(mut p) = get_json::<Product>(state, &key)? {
            p.stock += stock_sign * item.quantity.get();
            p.reserved += reserved_sign * item.quantity.get();
            put_json(state, &key, &p);
        }
    }
    Ok(())
}

/// The whole derived state in memory: what a rebuild computes before writing it.
#[derive(Debug, Default)]
pub struct MemState {
    pub values: BTreeMap<String, String>,
    pub counters: BTreeMap<String, BTreeMap<String, i64>>,
    /// eventId -> stream entry id (the event index).
    pub event_index: HashMap<String, String>,
    /// aggregate id -> its stream entry ids, oldest first.
    pub aggregates: HashMap<String, Vec<String>>,
    pub cursor: Option<String>,
}

impl State for MemState {
    fn get(&self, key: &str) -> Result<Option<&str>, ApplyError> {
        Ok(self.values.get(key).map(String::as_str))
    }
    fn put(&mut self, key: &str, value: String) {
        self.values.insert(key.to_string(), value);
    }
    fn incr(&mut self, key: &str, field: &str, delta: i64) {
        *self
            .counters
            .entry(key.to_string())
            .or_default()
            .entry(field.to_string())
            .or_default() += delta;
    }
}

impl MemState {
    /// Folds one stream entry, indexing it the way the commit script does.
    pub fn apply_entry(&mut self, id: &str, env: &Envelope) -> Result<(), ApplyError> {
        self.event_index
            .insert(env.event_id.clone(), id.to_string());
        self.aggregates
            .entry(env.aggregate_id.clone())
            .or_default()
            .push(id.to_string());
        self.cursor = Some(id.to_string());
        let event =
            DomainEvent::from_envelope(env).map_err(|e| ApplyError::UnknownEvent(e.to_string()))?;
        apply(self, env, &event)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use crate::order::{LineItem, OrderId, ShipmentId};
    use crate::product::{Currency, Quantity};

    fn env_for(event: &DomainEvent, seq: u64) -> Envelope {
        let cause = Cause::request("r", None);
        let writer = Writer {
            region: "a".into(),
            epoch: 1,
        };
        event.envelope(seq, &cause, &writer, format!("e-{seq}"), "t".into())
    }

    #[test]
    fn reservation_and_shipping_move_stock() {
        let mut s = MemState::default();
        let w = Sku::parse("W").unwrap();
        let o = OrderId::parse("o").unwrap();
        let up = DomainEvent::ProductUpserted(ProductUpserted {
            sku: w.clone(),
            name: "Widget".into(),
            price: 1000,
            currency: Currency::usd(),
            stock: 10,
        });
        apply(&mut s, &env_for(&up, 1), &up).unwrap();
        let three = Quantity::parse(3).unwrap();
        let placed = DomainEvent::OrderPlaced(OrderPlaced {
            order_id: o.clone(),
            customer_id: "c".into(),
            items: vec![LineItem {
                sku: w.clone(),
                quantity: three,
                unit_price: 1000,
            }],
            amount: 3000,
            currency: Currency::usd(),
            shipping_address: crate::pii::Sealed::from_stored("x"),
            payment_token: crate::pii::Sealed::from_stored("tok_ok"),
            idempotency_key: None,
            request_hash: None,
        });
        apply(&mut s, &env_for(&placed, 1), &placed).unwrap();
        let items = vec![ItemQuantity {
            sku: w.clone(),
            quantity: three,
        }];
        let reserved = DomainEvent::InventoryReserved(InventoryChange {
            order_id: o.clone(),
            items: items.clone(),
            reason: None,
        });
        apply(&mut s, &env_for(&reserved, 2), &reserved).unwrap();
        let p = product(&s, &w).unwrap().unwrap();
        assert_eq!((p.stock, p.reserved), (10, 3));
        let shipped = DomainEvent::OrderShipped(OrderShipped {
            order_id: o.clone(),
            shipment_id: ShipmentId::parse("s").unwrap(),
            tracking_number: "TRK1".into(),
            carrier: "UPS".into(),
            items,
        });
        apply(&mut s, &env_for(&shipped, 3), &shipped).unwrap();
        let p = product(&s, &w).unwrap().unwrap();
        assert_eq!((p.stock, p.reserved), (7, 0));
        let order = order(&s, &o).unwrap().unwrap();
        assert_eq!(order.status, Status::Shipped);
        assert_eq!(order.version, 3);
        assert_eq!(s.counters[keys::ORDER_COUNTS]["SHIPPED"], 1);
        assert_eq!(s.counters[keys::ORDER_COUNTS]["PENDING"], 0);
    }

    #[test]
    fn an_event_for_an_unknown_order_is_an_error() {
        let mut s = MemState::default();
        let confirmed = DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id: OrderId::parse("nope").unwrap(),
            amount: None,
        });
        let err = apply(&mut s, &env_for(&confirmed, 2), &confirmed).unwrap_err();
        assert!(matches!(err, ApplyError::MissingOrder { .. }), "{err}");
    }

    #[test]
    fn webhooks_are_derived_from_their_events() {
        use crate::integration::IntegrationEventType;
        use crate::pii::Sealed;
        use crate::webhooks::{WebhookId, WebhookUrl};
        let mut s = MemState::default();
        let id = WebhookId::parse("wh_1").unwrap();
        let subscribed = DomainEvent::WebhookSubscribed(WebhookSubscribed {
            webhook_id: id.clone(),
            url: WebhookUrl::parse("http://localhost/h").unwrap(),
            events: vec![IntegrationEventType::OrderStatusUpdated],
            secret: Sealed::from_stored("sealed"),
        });
        assert_eq!(keys_for(&subscribed), [keys::WEBHOOKS]);
        apply(&mut s, &env_for(&subscribed, 1), &subscribed).unwrap();
        let hooks: Webhooks = get_json(&s, keys::WEBHOOKS).unwrap().unwrap();
        assert_eq!(hooks[&id].url.as_str(), "http://localhost/h");
        assert_eq!(hooks[&id].version, 1);
        let deleted = DomainEvent::WebhookDeleted(WebhookDeleted {
            webhook_id: id.clone(),
        });
        apply(&mut s, &env_for(&deleted, 2), &deleted).unwrap();
        let hooks: Webhooks = get_json(&s, keys::WEBHOOKS).unwrap().unwrap();
        assert!(hooks.is_empty());
    }
}

//! Orders: the order aggregate, its state machine, the place and cancel commands,
//! and the `orders` consumer group that moves an order along as the other modules
//! report back.

use crate::events::*;
use crate::inventory::{self, Sku};
use crate::projections::get_json;
use crate::store::Tx;
use crate::workflow::{Decision, Reads, Workflow, WorkflowError};
use eventlog::{keys, Envelope};
use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Status {
    Pending,
    Confirmed,
    Paid,
    Shipped,
    Delivered,
    Rejected,
    PaymentFailed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 8] = [
        Status::Pending,
        Status::Confirmed,
        Status::Paid,
        Status::Shipped,
        Status::Delivered,
        Status::Rejected,
        Status::PaymentFailed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "PENDING",
            Status::Confirmed => "CONFIRMED",
            Status::Paid => "PAID",
            Status::Shipped => "SHIPPED",
            Status::Delivered => "DELIVERED",
            Status::Rejected => "REJECTED",
            Status::PaymentFailed => "PAYMENT_FAILED",
            Status::Cancelled => "CANCELLED",
        }
    }
}

/// Where the order's stock stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryHold {
    Reserved,
    Failed,
    Released,
    Shipped,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum PaymentState {
    Processed,
    Failed,
    Refunded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ShipmentState {
    Created,
    Dispatched,
    Delivered,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub status: Status,
    pub at: String,
    pub event_id: String,
}

/// The order as derived from its events. Stored as JSON under `tandem:order:{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: String,
    pub customer_id: String,
    pub status: Status,
    pub items: Vec<LineItem>,
    pub amount: i64,
    pub currency: String,
    pub shipping_address: String,
    pub payment_token: String,
    pub payment_id: Option<String>,
    pub shipment_id: Option<String>,
    pub tracking_number: Option<String>,
    pub carrier: Option<String>,
    pub inventory: Option<InventoryHold>,
    pub payment: Option<PaymentState>,
    pub shipment: Option<ShipmentState>,
    /// Region that accepted the order.
    pub region: String,
    /// Sequence of the last event applied: the aggregate's version.
    pub version: u64,
    pub created_at: String,
    pub updated_at: String,
    pub history: Vec<HistoryEntry>,
}

impl Order {
    pub fn placed(e: &OrderPlaced, env: &Envelope) -> Order {
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

    /// The public JSON of `GET /orders/{id}` (the payment token stays inside).
    pub fn view(&self) -> Value {
        serde_json::json!({
            "orderId": self.order_id,
            "customerId": self.customer_id,
            "status": self.status,
            "items": self.items,
            "amount": self.amount,
            "currency": self.currency,
            "shippingAddress": self.shipping_address,
            "paymentId": self.payment_id,
            "paymentStatus": self.payment,
            "shipmentId": self.shipment_id,
            "shipmentStatus": self.shipment,
            "trackingNumber": self.tracking_number,
            "carrier": self.carrier,
            "region": self.region,
            "version": self.version,
            "createdAt": self.created_at,
            "updatedAt": self.updated_at,
            "history": self.history,
        })
    }

    pub fn item_quantities(&self) -> Vec<ItemQuantity> {
        self.items
            .iter()
            .map(|i| ItemQuantity {
                sku: i.sku.clone(),
                quantity: i.quantity,
            })
            .collect()
    }

    pub fn product_keys(&self) -> Vec<String> {
        self.items.iter().map(|i| keys::product(&i.sku)).collect()
    }
}

pub fn load_order(tx: &Tx, order_id: &str) -> Result<Option<Order>, WorkflowError> {
    Ok(get_json::<Order>(tx, &keys::order(order_id))?)
}

/// A validated `POST /orders` body.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub customer_id: String,
    pub items: Vec<(Sku, i64)>,
    pub shipping_address: String,
    pub payment_token: String,
}

pub const MAX_ITEMS: usize = 100;
pub const MAX_QUANTITY: i64 = 10_000;

impl PlaceOrder {
    /// Parses the raw JSON, collecting every bad field, so the client can fix them all.
    pub fn parse(body: &Value) -> Result<PlaceOrder, (String, Vec<String>)> {
        let mut bad = Vec::new();
        let Some(obj) = body.as_object() else {
            return Err(("the body must be a JSON object".into(), vec![]));
        };
        let text = |name: &str, max: usize, bad: &mut Vec<String>| -> String {
            match obj.get(name).and_then(Value::as_str) {
                Some(s) if !s.trim().is_empty() && s.len() <= max => s.to_string(),
                _ => {
                    bad.push(name.to_string());
                    String::new()
                }
            }
        };
        let customer_id = text("customerId", 128, &mut bad);
        let shipping_address = text("shippingAddress", 1000, &mut bad);
        let payment_token = match obj.get("paymentToken") {
            None | Some(Value::Null) => "tok_ok".to_string(),
            Some(_) => text("paymentToken", 64, &mut bad),
        };
        let mut items = Vec::new();
        match obj.get("items").and_then(Value::as_array) {
            Some(list) if !list.is_empty() && list.len() <= MAX_ITEMS => {
                for (i, item) in list.iter().enumerate() {
                    let sku = item
                        .get("sku")
                        .and_then(Value::as_str)
                        .and_then(|s| Sku::parse(s).ok());
                    let qty = item
                        .get("quantity")
                        .and_then(Value::as_i64)
                        .filter(|q| (1..=MAX_QUANTITY).contains(q));
                    if sku.is_none() {
                        bad.push(format!("items[{i}].sku"));
                    }
                    if qty.is_none() {
                        bad.push(format!("items[{i}].quantity"));
                    }
                    if let (Some(sku), Some(qty)) = (sku, qty) {
                        items.push((sku, qty));
                    }
                }
            }
            _ => bad.push("items".into()),
        }
        if !bad.is_empty() {
            let msg = format!(
                "invalid fields: {} (items: 1-{MAX_ITEMS} entries, quantity 1-{MAX_QUANTITY})",
                bad.join(", ")
            );
            return Err((msg, bad));
        }
        Ok(PlaceOrder {
            customer_id,
            items,
            shipping_address,
            payment_token,
        })
    }

    /// Fingerprint of the request: the same Idempotency-Key with another body is refused.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::json!({
            "customerId": self.customer_id,
            "items": self.items.iter().map(|(s, q)| (s.as_str(), q)).collect::<Vec<_>>(),
            "shippingAddress": self.shipping_address,
            "paymentToken": self.payment_token,
        });
        format!("{:016x}", fnv1a(canonical.to_string().as_bytes()))
    }
}

/// FNV-1a: stable across builds and regions, unlike the std hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf29ce484222325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100000001b3)
    })
}

/// The answer to a new order (201), also stored with its Idempotency-Key so that a
/// retry, in either region, gets the same answer.
pub fn placed_answer(order_id: &str, amount: i64, currency: &str, region: &str) -> Value {
    serde_json::json!({
        "orderId": order_id,
        "status": Status::Pending,
        "amount": amount,
        "currency": currency,
        "region": region,
    })
}

/// The answer to a place-order: the new order, or the first answer for its key.
pub enum Placed {
    New(Value),
    Replayed(Value),
}

/// `POST /orders`: checks availability first (no order, no event when short), then
/// appends OrderPlaced with the order and its idempotency record in one step.
pub async fn place(
    wf: &Workflow,
    cmd: &PlaceOrder,
    idempotency_key: Option<&str>,
    cause: &Cause,
) -> Result<Placed, WorkflowError> {
    let hash = cmd.fingerprint();
    if let Some(key) = idempotency_key {
        if let Some(first) = idempotent_answer(wf, key, &hash).await? {
            return Ok(Placed::Replayed(first));
        }
    }
    let order_id = uuid::Uuid::new_v4().to_string();
    let product_keys: Vec<String> = cmd
        .items
        .iter()
        .map(|(s, _)| keys::product(s.as_str()))
        .collect();
    let mut keys = Vec::new();
    if let Some(key) = idempotency_key {
        keys.push(keys::idempotency(key));
    }
    let region = wf.region.clone();
    let order_key = keys::order(&order_id);
    let result = wf
        .execute(
            Reads {
                keys,
                peek: product_keys,
                new_key: Some(order_key),
            },
            cause,
            None,
            |tx| {
                if let Some(key) = idempotency_key {
                    if tx_has(tx, &keys::idempotency(key))? {
                        return Err(WorkflowError::IdempotencyKeyTaken);
                    }
                }
                let products = inventory::products_for(tx, cmd.items.iter().map(|(s, _)| s))?;
                let availability = inventory::availability(&products, &cmd.items);
                if availability.iter().any(|a| !a.is_available) {
                    return Err(WorkflowError::ProductsUnavailable(availability));
                }
                let currency = products[0].currency.clone();
                if products.iter().any(|p| p.currency != currency) {
                    return Err(WorkflowError::Validation(
                        "all items must be priced in one currency".into(),
                    ));
                }
                let items: Vec<LineItem> = cmd
                    .items
                    .iter()
                    .zip(&products)
                    .map(|((sku, qty), p)| LineItem {
                        sku: sku.as_str().to_string(),
                        quantity: *qty,
                        unit_price: p.price,
                    })
                    .collect();
                let amount = items.iter().map(|i| i.quantity * i.unit_price).sum();
                Ok(Decision::Emit {
                    last_sequence: 0,
                    events: vec![DomainEvent::OrderPlaced(OrderPlaced {
                        order_id: order_id.clone(),
                        customer_id: cmd.customer_id.clone(),
                        items,
                        amount,
                        currency,
                        shipping_address: cmd.shipping_address.clone(),
                        payment_token: cmd.payment_token.clone(),
                        idempotency_key: idempotency_key.map(str::to_string),
                        request_hash: idempotency_key.map(|_| hash.clone()),
                    })],
                })
            },
        )
        .await;
    match result {
        Ok(Some(tx)) => {
            let order = load_order(&tx, &order_id)?.expect("the order was just placed");
            Ok(Placed::New(placed_answer(
                &order_id,
                order.amount,
                &order.currency,
                &region,
            )))
        }
        Ok(None) => unreachable!("placing an order always emits"),
        // A concurrent request with the same key won the race: answer as it did.
        Err(WorkflowError::IdempotencyKeyTaken) => {
            let key = idempotency_key.expect("only raised with a key");
            idempotent_answer(wf, key, &hash)
                .await?
                .map(Placed::Replayed)
                .ok_or(WorkflowError::IdempotencyKeyTaken)
        }
        Err(e) => Err(e),
    }
}

fn tx_has(tx: &Tx, key: &str) -> Result<bool, WorkflowError> {
    use crate::projections::State;
    Ok(tx.get(key)?.is_some())
}

/// The first answer stored for an Idempotency-Key, if the key was used with this body.
pub async fn idempotent_answer(
    wf: &Workflow,
    key: &str,
    hash: &str,
) -> Result<Option<Value>, WorkflowError> {
    let Some(raw) = wf.store.get(&keys::idempotency(key)).await? else {
        return Ok(None);
    };
    let key = keys::idempotency(key);
    let mut first: Value = serde_json::from_str(&raw)
        .map_err(|source| crate::projections::ApplyError::Corrupt { key, source })?;
    if first.get("requestHash").and_then(Value::as_str) != Some(hash) {
        return Err(WorkflowError::IdempotencyKeyReused);
    }
    if let Some(obj) = first.as_object_mut() {
        obj.remove("requestHash");
    }
    Ok(Some(first))
}

/// `POST /orders/{id}/cancel`: allowed from PENDING, CONFIRMED and PAID, as long as no
/// shipment exists yet; the inventory and payments groups release and refund.
pub async fn cancel(
    wf: &Workflow,
    order_id: &str,
    reason: Option<String>,
    cause: &Cause,
) -> Result<Order, WorkflowError> {
    let done = wf
        .execute(
            Reads::keys(vec![keys::order(order_id)]),
            cause,
            None,
            |tx| {
                let order = load_order(tx, order_id)?
                    .ok_or_else(|| WorkflowError::NotFound(format!("order {order_id}")))?;
                let cancellable = matches!(
                    order.status,
                    Status::Pending | Status::Confirmed | Status::Paid
                );
                if !cancellable || order.shipment.is_some() {
                    return Err(WorkflowError::InvalidState(format!(
                        "order {order_id} is {} and can no longer be cancelled",
                        order.status.as_str()
                    )));
                }
                Ok(Decision::Emit {
                    last_sequence: order.version,
                    events: vec![DomainEvent::OrderCancelled(OrderCancelled {
                        order_id: order_id.to_string(),
                        reason: reason.clone(),
                        previous_status: order.status.as_str().to_string(),
                    })],
                })
            },
        )
        .await?
        .expect("a cancel always emits");
    Ok(load_order(&done, order_id)?.expect("the order exists"))
}

/// What a consumer group does about an event of an order.
pub enum Reaction {
    /// Append this event to the order.
    Next(DomainEvent),
    /// Nothing (already done: a redelivery; or overtaken, e.g. by a cancellation).
    Nothing,
    /// Read these keys too, then react again.
    Load(Vec<String>),
}

/// Runs a consumer group's reaction to `event` on the order it belongs to: loads the
/// order, lets `react` decide on it, and commits the next event (acknowledging the
/// entry in the same step). `new_key` names a key the reaction may create.
pub async fn react<F>(
    wf: &Workflow,
    env: &Envelope,
    event: &DomainEvent,
    ack: Option<(&str, &str)>,
    new_key: Option<String>,
    mut react: F,
) -> Result<Option<Tx>, WorkflowError>
where
    F: FnMut(&Tx, &Order) -> Result<Reaction, WorkflowError>,
{
    let order_id = event.aggregate_id();
    let reads = Reads {
        keys: vec![keys::order(order_id)],
        new_key,
        ..Reads::default()
    };
    wf.execute(reads, &Cause::event(env), ack, |tx| {
        let Some(order) = load_order(tx, order_id)? else {
            return Ok(Decision::Nothing);
        };
        Ok(match react(tx, &order)? {
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

/// The `orders` group: turns the other modules' outcomes into order status changes.
pub async fn on_event(
    wf: &Workflow,
    env: &Envelope,
    event: &DomainEvent,
    ack: Option<(&str, &str)>,
) -> Result<Option<Tx>, WorkflowError> {
    react(wf, env, event, ack, None, |tx, order| {
        let order_id = order.order_id.clone();
        Ok(Reaction::Next(match (order.status, event) {
            (Status::Pending, DomainEvent::InventoryReserved(_)) => {
                DomainEvent::OrderConfirmed(OrderRef { order_id })
            }
            (Status::Pending, DomainEvent::InventoryReservationFailed(e)) => {
                DomainEvent::OrderRejected(OrderReason {
                    order_id,
                    reason: e.reason.clone(),
                })
            }
            (Status::Confirmed, DomainEvent::PaymentProcessed(e)) => {
                DomainEvent::OrderPaid(OrderPaid {
                    order_id,
                    payment_id: e.payment_id.clone(),
                })
            }
            (Status::Confirmed, DomainEvent::PaymentFailed(e)) => {
                DomainEvent::OrderPaymentFailed(OrderReason {
                    order_id,
                    reason: e.reason.clone(),
                })
            }
            (Status::Paid, DomainEvent::ShipmentCreated(e)) => {
                // Shipping moves the goods out of stock: the products are touched too.
                if let Some(missing) = missing_keys(tx, order.product_keys()) {
                    return Ok(Reaction::Load(missing));
                }
                DomainEvent::OrderShipped(OrderShipped {
                    order_id,
                    shipment_id: e.shipment_id.clone(),
                    tracking_number: e.tracking_number.clone(),
                    carrier: e.carrier.clone(),
                    items: order.item_quantities(),
                })
            }
            (Status::Shipped, DomainEvent::ShipmentDelivered(_)) => {
                DomainEvent::OrderDelivered(OrderRef { order_id })
            }
            _ => return Ok(Reaction::Nothing),
        }))
    })
    .await
}

/// Keys among `wanted` that the transaction has not read yet.
pub fn missing_keys(tx: &Tx, wanted: Vec<String>) -> Option<Vec<String>> {
    use crate::projections::State;
    let missing: Vec<String> = wanted.into_iter().filter(|k| tx.get(k).is_err()).collect();
    (!missing.is_empty()).then_some(missing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn place_order_validation_names_every_bad_field() {
        let body = serde_json::json!({
            "customerId": "", "shippingAddress": "x",
            "items": [{"sku": "W", "quantity": 0}, {"sku": "bad sku!", "quantity": 2}]
        });
        let (_, fields) = PlaceOrder::parse(&body).unwrap_err();
        assert_eq!(
            fields,
            vec!["customerId", "items[0].quantity", "items[1].sku"]
        );
    }

    #[test]
    fn too_many_items_is_refused() {
        let items: Vec<Value> = (0..101)
            .map(|_| serde_json::json!({"sku": "W", "quantity": 1}))
            .collect();
        let body = serde_json::json!({"customerId": "c", "shippingAddress": "x", "items": items});
        assert_eq!(PlaceOrder::parse(&body).unwrap_err().1, vec!["items"]);
    }

    #[test]
    fn fingerprint_depends_on_the_body() {
        let a = PlaceOrder::parse(&serde_json::json!({"customerId":"c","shippingAddress":"x","items":[{"sku":"W","quantity":1}]})).unwrap();
        let b = PlaceOrder::parse(&serde_json::json!({"customerId":"c","shippingAddress":"x","items":[{"sku":"W","quantity":2}]})).unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(a.fingerprint(), a.clone().fingerprint());
    }
}

//! The domain events of the order workflow (DESIGN.md section 2) and how they sit in
//! the canonical [`Envelope`].
//!
//! Every workflow event of one order (orders, inventory, payments, shipments) belongs to
//! the order's aggregate: it carries the order id as `aggregateId` and the next number
//! of the order's `sequence`, so one order's saga is totally ordered, also across a
//! failover. `aggregateType` names the module that emitted it. Products are their own
//! aggregate (`ProductUpserted`).
//!
//! Events are self-describing: each carries every id and item it affects, so the
//! projection can apply it without reading anything but the keys it names.

use crate::order::{IdempotencyKey, LineItem, OrderId, ShipmentId, Status};
use crate::pii::Sealed;
use crate::product::{Currency, ItemQuantity, Sku};
use crate::webhooks::{IntegrationEventType, WebhookId, WebhookUrl};
use eventlog::{Envelope, ENVELOPE_VERSION};
use serde::{Deserialize, Serialize};

/// An event as the workflow decides and applies it. [`EventType`] names its kind (the
/// envelope's `eventType`, the serde tag), generated from this enum's variants.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, strum::EnumDiscriminants)]
#[serde(tag = "eventType", content = "payload")]
#[strum_discriminants(
    name(EventType),
    derive(Hash, strum::IntoStaticStr, strum::EnumString, strum::VariantArray)
)]
pub enum DomainEvent {
    ProductUpserted(ProductUpserted),
    OrderPlaced(OrderPlaced),
    InventoryReserved(InventoryChange),
    InventoryReservationFailed(InventoryReservationFailed),
    OrderConfirmed(OrderConfirmed),
    OrderRejected(OrderReason),
    PaymentProcessed(PaymentProcessed),
    PaymentFailed(PaymentFailed),
    OrderPaid(OrderPaid),
    OrderPaymentFailed(OrderReason),
    ShipmentCreated(ShipmentCreated),
    OrderShipped(OrderShipped),
    ShipmentDispatched(ShipmentDispatched),
    ShipmentDelivered(ShipmentDelivered),
    OrderDelivered(OrderDelivered),
    OrderCancelled(OrderCancelled),
    InventoryReleased(InventoryChange),
    PaymentRefunded(PaymentProcessed),
    DeadLetterReplayed(DeadLetterReplayed),
    WebhookSubscribed(WebhookSubscribed),
    WebhookDeleted(WebhookDeleted),
}

impl EventType {
    /// The name in the envelope's `eventType` and the stream entry's `type` field.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ProductUpserted {
    pub sku: Sku,
    pub name: String,
    pub price: i64,
    pub currency: Currency,
    pub stock: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPlaced {
    pub order_id: OrderId,
    pub customer_id: String,
    pub items: Vec<LineItem>,
    pub amount: i64,
    pub currency: Currency,
    /// Sealed ([`crate::pii`]): events are kept for ever and copied everywhere.
    pub shipping_address: Sealed,
    pub payment_token: Sealed,
    /// Stored with the order so a retried POST finds its first answer, in either region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<IdempotencyKey>,
    /// Fingerprint of the request body that used the key: same key, other body -> 409.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_hash: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryChange {
    pub order_id: OrderId,
    pub items: Vec<ItemQuantity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A line the stock could not cover when it was to be reserved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Shortage {
    pub sku: Sku,
    /// 0 for a product no longer in the catalogue.
    pub requested: i64,
    pub available: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct InventoryReservationFailed {
    pub order_id: OrderId,
    pub reason: String,
    pub items: Vec<Shortage>,
}

/// The order's stock is reserved and it waits for payment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderConfirmed {
    pub order_id: OrderId,
    /// The amount the payment step is to charge (seed 004's catalog). Absent in events
    /// written before it was added (the change is additive, `version` unchanged).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub amount: Option<i64>,
}

/// The carrier picked the shipment up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentDispatched {
    pub order_id: OrderId,
    pub shipment_id: ShipmentId,
    /// RFC 3339, when the dispatch was recorded. Absent in older events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dispatched_at: Option<String>,
}

/// The carrier delivered the shipment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentDelivered {
    pub order_id: OrderId,
    pub shipment_id: ShipmentId,
    /// RFC 3339: the carrier's time when it gave one, else when the delivery was
    /// recorded. Absent in older events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_location: Option<String>,
}

/// The order is delivered. It repeats the delivery's details from `ShipmentDelivered`
/// so that the integration event of the status change derives from this one event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderDelivered {
    pub order_id: OrderId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_location: Option<String>,
}

/// A webhook subscription was created (`POST /api/v1/webhooks`). Subscriptions are
/// events so that the replicator copies them and a rebuild restores them. Its own
/// aggregate (the webhook id).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookSubscribed {
    pub webhook_id: WebhookId,
    pub url: WebhookUrl,
    pub events: Vec<IntegrationEventType>,
    /// The signing secret (`whsec_...`), sealed like personal data: events are kept for
    /// ever and copied everywhere.
    pub secret: Sealed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WebhookDeleted {
    pub webhook_id: WebhookId,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderReason {
    pub order_id: OrderId,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentProcessed {
    pub order_id: OrderId,
    pub payment_id: String,
    pub amount: i64,
    pub currency: Currency,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PaymentFailed {
    pub order_id: OrderId,
    pub payment_id: String,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderPaid {
    pub order_id: OrderId,
    pub payment_id: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ShipmentCreated {
    pub order_id: OrderId,
    pub shipment_id: ShipmentId,
    pub tracking_number: String,
    pub carrier: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderShipped {
    pub order_id: OrderId,
    pub shipment_id: ShipmentId,
    pub tracking_number: String,
    pub carrier: String,
    /// Shipping moves these quantities out of stock and out of the reservation.
    pub items: Vec<ItemQuantity>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OrderCancelled {
    pub order_id: OrderId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub previous_status: Status,
}

/// An operator replayed a dead-letter entry and it left the dead-letter list. Its own
/// aggregate (the dead-letter entry id, one event), so a replay never touches an order's
/// sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DeadLetterReplayed {
    /// Entry id in `tandem:dlq`.
    pub dlq_id: String,
    pub group: String,
    /// The event the entry held.
    pub event_id: String,
    /// `handled` (the handler acted) or `nothing_to_do` (the effect was already there,
    /// or overtaken, e.g. by a cancellation).
    pub outcome: String,
}

#[derive(Debug, thiserror::Error)]
#[error("event {event_id} ({event_type}) has an unreadable payload: {source}")]
pub struct UnknownEvent {
    pub event_id: String,
    pub event_type: String,
    #[source]
    pub source: serde_json::Error,
}

impl DomainEvent {
    pub fn event_type(&self) -> EventType {
        self.into()
    }

    /// The module that emits the event; it is the envelope's `aggregateType`.
    pub fn aggregate_type(&self) -> &'static str {
        use DomainEvent::*;
        match self {
            ProductUpserted(_) => "product",
            InventoryReserved(_) | InventoryReservationFailed(_) | InventoryReleased(_) => {
                "inventory"
            }
            PaymentProcessed(_) | PaymentFailed(_) | PaymentRefunded(_) => "payment",
            ShipmentCreated(_) | ShipmentDispatched(_) | ShipmentDelivered(_) => "shipment",
            DeadLetterReplayed(_) => "deadletter",
            WebhookSubscribed(_) | WebhookDeleted(_) => "webhook",
            _ => "order",
        }
    }

    /// The order the event belongs to; `None` for products and dead letters.
    pub fn order_id(&self) -> Option<&OrderId> {
        use DomainEvent::*;
        Some(match self {
            ProductUpserted(_)
            | DeadLetterReplayed(_)
            | WebhookSubscribed(_)
            | WebhookDeleted(_) => return None,
            OrderPlaced(e) => &e.order_id,
            InventoryReserved(e) | InventoryReleased(e) => &e.order_id,
            InventoryReservationFailed(e) => &e.order_id,
            OrderConfirmed(e) => &e.order_id,
            OrderDelivered(e) => &e.order_id,
            OrderRejected(e) | OrderPaymentFailed(e) => &e.order_id,
            PaymentProcessed(e) | PaymentRefunded(e) => &e.order_id,
            PaymentFailed(e) => &e.order_id,
            OrderPaid(e) => &e.order_id,
            ShipmentCreated(e) => &e.order_id,
            OrderShipped(e) => &e.order_id,
            ShipmentDispatched(e) => &e.order_id,
            ShipmentDelivered(e) => &e.order_id,
            OrderCancelled(e) => &e.order_id,
        })
    }

    /// The aggregate the event belongs to: the sku for products, the entry id for dead
    /// letters, else the order id.
    pub fn aggregate_id(&self) -> &str {
        match self {
            DomainEvent::ProductUpserted(p) => p.sku.as_str(),
            DomainEvent::DeadLetterReplayed(e) => &e.dlq_id,
            DomainEvent::WebhookSubscribed(e) => e.webhook_id.as_str(),
            DomainEvent::WebhookDeleted(e) => e.webhook_id.as_str(),
            other => other.order_id().map(OrderId::as_str).unwrap_or_default(),
        }
    }

    /// Reads the payload of an envelope. Unknown event types are an error the caller
    /// decides about (a projection halts; schema changes are additive).
    pub fn from_envelope(env: &Envelope) -> Result<DomainEvent, UnknownEvent> {
        let tagged = serde_json::json!({ "eventType": env.event_type, "payload": env.payload });
        serde_json::from_value(tagged).map_err(|source| UnknownEvent {
            event_id: env.event_id.clone(),
            event_type: env.event_type.clone(),
            source,
        })
    }

    fn payload(&self) -> serde_json::Value {
        let mut tagged = serde_json::to_value(self).expect("events always serialise");
        tagged
            .get_mut("payload")
            .map(serde_json::Value::take)
            .unwrap_or_default()
    }

    /// The event in its envelope, as number `sequence` of its aggregate. The id and the
    /// time are the caller's: the model reads no clock and draws no random numbers.
    pub fn envelope(
        &self,
        sequence: u64,
        cause: &Cause,
        writer: &Writer,
        event_id: String,
        occurred_at: String,
    ) -> Envelope {
        Envelope {
            event_id,
            event_type: self.event_type().as_str().to_string(),
            aggregate_id: self.aggregate_id().to_string(),
            aggregate_type: self.aggregate_type().to_string(),
            sequence,
            occurred_at,
            version: ENVELOPE_VERSION,
            correlation_id: cause.correlation_id.clone(),
            causation_id: cause.causation_id.clone(),
            region: writer.region.clone(),
            epoch: writer.epoch,
            traceparent: cause.traceparent.clone(),
            payload: self.payload(),
        }
    }
}

/// Where an event came from: the request or the event that caused it.
#[derive(Debug, Clone)]
pub struct Cause {
    pub correlation_id: String,
    pub causation_id: String,
    pub traceparent: Option<String>,
}

impl Cause {
    /// A command from an HTTP request: the request id correlates the whole saga.
    pub fn request(request_id: &str, traceparent: Option<String>) -> Cause {
        Cause {
            correlation_id: request_id.to_string(),
            causation_id: request_id.to_string(),
            traceparent,
        }
    }

    /// A reaction to an event: same correlation, caused by that event.
    pub fn event(env: &Envelope) -> Cause {
        Cause {
            correlation_id: env.correlation_id.clone(),
            causation_id: env.event_id.clone(),
            traceparent: env.traceparent.clone(),
        }
    }
}

/// Who writes: stamped into every envelope so a failover can tell epochs apart.
#[derive(Debug, Clone)]
pub struct Writer {
    pub region: String,
    pub epoch: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use strum::VariantArray;

    fn order_id() -> OrderId {
        OrderId::parse("o-1").unwrap()
    }

    #[test]
    fn payload_round_trips_through_the_envelope() {
        let ev = DomainEvent::OrderConfirmed(OrderConfirmed {
            order_id: order_id(),
            amount: Some(1999),
        });
        let cause = Cause::request("r-1", None);
        let writer = Writer {
            region: "a".into(),
            epoch: 2,
        };
        let env = ev.envelope(2, &cause, &writer, "e-1".into(), "t".into());
        assert_eq!(env.sequence, 2);
        assert_eq!(env.event_type, "OrderConfirmed");
        assert_eq!(env.aggregate_id, "o-1");
        assert_eq!(
            env.payload,
            serde_json::json!({"orderId": "o-1", "amount": 1999})
        );
        // Events written before `amount` was added still read.
        let old = Envelope {
            payload: serde_json::json!({"orderId": "o-1"}),
            ..env.clone()
        };
        assert_eq!(
            DomainEvent::from_envelope(&old).unwrap(),
            DomainEvent::OrderConfirmed(OrderConfirmed {
                order_id: order_id(),
                amount: None
            })
        );
        assert_eq!(DomainEvent::from_envelope(&env).unwrap(), ev);
        let unknown = Envelope {
            event_type: "OrderTeleported".into(),
            ..env.clone()
        };
        assert!(DomainEvent::from_envelope(&unknown).is_err());
        // A payload with a value no order may hold is unreadable too.
        let bad = Envelope {
            payload: serde_json::json!({"orderId": "o:1"}),
            ..env
        };
        assert!(DomainEvent::from_envelope(&bad).is_err());
    }

    #[test]
    fn event_type_names_are_the_serde_tags() {
        // Every type's name parses back, and is the tag serde writes for the variant.
        for ty in EventType::VARIANTS {
            assert_eq!(ty.as_str().parse::<EventType>().unwrap(), *ty);
        }
        let ev = DomainEvent::OrderDelivered(OrderDelivered {
            order_id: order_id(),
            delivered_at: None,
            delivery_location: None,
        });
        let tagged = serde_json::to_value(&ev).unwrap();
        assert_eq!(tagged["eventType"], ev.event_type().as_str());
        assert!("OrderTeleported".parse::<EventType>().is_err());
    }
}

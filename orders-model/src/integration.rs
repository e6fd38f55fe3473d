//! Integration events (seed 002, API.md "Integration events and webhooks"): what other
//! systems hear of an order, in the seed's snake_case shape.
//!
//! They are not stored: [`derive`] makes each from one domain event, as a pure
//! function of that event and its envelope. Both regions hold the same event stream,
//! so both derive the same integration events with the same ids, in the same order: a
//! failover neither loses one nor invents one, and a redelivery carries the id of the
//! first delivery (Standard Webhooks' `webhook-id`, the receiver's dedup key).

use crate::events::DomainEvent;
// The subscription vocabulary lives with the subscriptions, which the events name: so
// the events need not import this module, which is derived from them.
use crate::order::Status;
pub use crate::webhooks::IntegrationEventType;
use eventlog::Envelope;
use serde::{Deserialize, Serialize};

/// `source` of every integration event. It names the service, not the region: the
/// same event derived in either region is the same event.
pub const SOURCE: &str = "tandem.orders";

/// An integration event as published (and as a webhook's body).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntegrationEvent {
    pub event_id: String,
    pub event_type: IntegrationEventType,
    /// When the status changed: the domain event's `occurredAt`.
    pub timestamp: String,
    pub source: String,
    pub data: StatusUpdated,
}

/// `data` of `order.status_updated`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusUpdated {
    pub order_id: String,
    pub previous_status: Status,
    pub current_status: Status,
    /// SHIPPED only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_number: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub carrier: Option<String>,
    /// DELIVERED only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivered_at: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub delivery_location: Option<String>,
}

/// The integration event id of the domain event `domain_event_id`: fixed by it, so every
/// derivation (either region, any redelivery) gives the same one.
pub fn event_id(domain_event_id: &str) -> String {
    format!("{EVENT_ID_PREFIX}{domain_event_id}")
}

/// What every integration event id starts with; the rest is the domain event's id.
pub const EVENT_ID_PREFIX: &str = "evt_";

/// The one status the state machine moves an order from into `status`; `None` for
/// PENDING (the first) and CANCELLED (reached from several; its event records which).
fn reached_from(status: Status) -> Option<Status> {
    use Status::*;
    match status {
        Confirmed | Rejected => Some(Pending),
        Paid | PaymentFailed => Some(Confirmed),
        Shipped => Some(Paid),
        Delivered => Some(Shipped),
        Pending | Cancelled => None,
    }
}

/// The integration event a domain event publishes, if any: every status change after
/// the order was placed. The previous status is fixed by the event (the state machine
/// reaches each status from one other only) except for a cancellation, which records
/// it.
pub fn derive(env: &Envelope, event: &DomainEvent) -> Option<IntegrationEvent> {
    use DomainEvent as D;
    use Status::*;
    let data = |current: Status| StatusUpdated {
        order_id: env.aggregate_id.clone(),
        previous_status: reached_from(current).unwrap_or(Pending),
        current_status: current,
        tracking_number: None,
        carrier: None,
        delivered_at: None,
        delivery_location: None,
    };
    let data = match event {
        D::OrderConfirmed(_) => data(Confirmed),
        D::OrderRejected(_) => data(Rejected),
        D::OrderPaid(_) => data(Paid),
        D::OrderPaymentFailed(_) => data(PaymentFailed),
        D::OrderShipped(e) => StatusUpdated {
            tracking_number: Some(e.tracking_number.clone()),
            carrier: Some(e.carrier.clone()),
            ..data(Shipped)
        },
        D::OrderDelivered(e) => StatusUpdated {
            // Events written before the details were recorded: the time it was recorded.
            delivered_at: Some(
                e.delivered_at
                    .clone()
                    .unwrap_or_else(|| env.occurred_at.clone()),
            ),
            delivery_location: e.delivery_location.clone(),
            ..data(Delivered)
        },
        D::OrderCancelled(e) => StatusUpdated {
            previous_status: e.previous_status,
            ..data(Cancelled)
        },
        D::OrderPlaced(_)
        | D::ProductUpserted(_)
        | D::InventoryReserved(_)
        | D::InventoryReservationFailed(_)
        | D::PaymentProcessed(_)
        | D::PaymentFailed(_)
        | D::ShipmentCreated(_)
        | D::ShipmentDispatched(_)
        | D::ShipmentDelivered(_)
        | D::InventoryReleased(_)
        | D::PaymentRefunded(_)
        | D::DeadLetterReplayed(_)
        | D::WebhookSubscribed(_)
        | D::WebhookDeleted(_) => return None,
    };
    Some(IntegrationEvent {
        event_id: event_id(&env.event_id),
        event_type: IntegrationEventType::OrderStatusUpdated,
        timestamp: env.occurred_at.clone(),
        source: SOURCE.to_string(),
        data,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::*;
    use crate::flow::{next, Input, Next, Step};
    use crate::order::{OrderId, ShipmentId};
    use crate::{Cause, EventType, Writer};
    use strum::VariantArray;

    fn env(event: &DomainEvent, id: &str) -> Envelope {
        let writer = Writer {
            region: "a".into(),
            epoch: 1,
        };
        event.envelope(
            3,
            &Cause::request("r", None),
            &writer,
            id.into(),
            "2026-11-30T10:00:00.000Z".into(),
        )
    }

    fn oid() -> OrderId {
        OrderId::parse("o-1").unwrap()
    }

    #[test]
    fn a_shipped_order_publishes_its_tracking_number_and_carrier() {
        let ev = DomainEvent::OrderShipped(OrderShipped {
            order_id: oid(),
            shipment_id: ShipmentId::parse("s-1").unwrap(),
            tracking_number: "TRK1".into(),
            carrier: "DHL".into(),
            items: vec![],
        });
        let out = derive(&env(&ev, "e-9"), &ev).unwrap();
        assert_eq!(
            serde_json::to_value(&out).unwrap(),
            serde_json::json!({
                "event_id": "evt_e-9",
                "event_type": "order.status_updated",
                "timestamp": "2026-11-30T10:00:00.000Z",
                "source": SOURCE,
                "data": {
                    "order_id": "o-1",
                    "previous_status": "PAID",
                    "current_status": "SHIPPED",
                    "tracking_number": "TRK1",
                    "carrier": "DHL"
                }
            })
        );
    }

    #[test]
    fn a_delivered_order_publishes_when_and_where() {
        let ev = DomainEvent::OrderDelivered(OrderDelivered {
            order_id: oid(),
            delivered_at: Some("2026-11-29T08:00:00Z".into()),
            delivery_location: Some("front door".into()),
        });
        let out = derive(&env(&ev, "e-1"), &ev).unwrap();
        assert_eq!(out.data.previous_status, Status::Shipped);
        assert_eq!(
            out.data.delivered_at.as_deref(),
            Some("2026-11-29T08:00:00Z")
        );
        assert_eq!(out.data.delivery_location.as_deref(), Some("front door"));
        // An older event without the details: delivered when it was recorded.
        let old = DomainEvent::OrderDelivered(OrderDelivered {
            order_id: oid(),
            delivered_at: None,
            delivery_location: None,
        });
        let out = derive(&env(&old, "e-2"), &old).unwrap();
        assert_eq!(
            out.data.delivered_at.as_deref(),
            Some("2026-11-30T10:00:00.000Z")
        );
        assert_eq!(
            serde_json::to_value(&out.data)
                .unwrap()
                .get("delivery_location"),
            None
        );
    }

    #[test]
    fn the_same_domain_event_always_gives_the_same_integration_event() {
        let ev = DomainEvent::OrderCancelled(OrderCancelled {
            order_id: oid(),
            reason: None,
            previous_status: Status::Paid,
        });
        let e = env(&ev, "e-5");
        assert_eq!(derive(&e, &ev), derive(&e.clone(), &ev));
        // The writing region does not show: a failover derives the same event.
        let other = Envelope {
            region: "b".into(),
            epoch: 7,
            ..e.clone()
        };
        assert_eq!(derive(&e, &ev), derive(&other, &ev));
        let out = derive(&e, &ev).unwrap();
        assert_eq!(out.event_id, "evt_e-5");
        assert_eq!(
            (out.data.previous_status, out.data.current_status),
            (Status::Paid, Status::Cancelled)
        );
    }

    #[test]
    fn the_previous_status_is_the_one_the_state_machine_moves_from() {
        // For every status but the first and CANCELLED, the state machine's only way in
        // is from the status `derive` names as previous.
        let shipments = [None, Some(crate::order::ShipmentState::Created)];
        for current in Status::ALL {
            if matches!(current, Status::Pending | Status::Cancelled) {
                assert_eq!(reached_from(current), None);
                continue;
            }
            let from: Vec<Status> = Status::ALL
                .into_iter()
                .filter(|&s| {
                    EventType::VARIANTS.iter().any(|&e| {
                        shipments.iter().any(|&sh| {
                            matches!(next(s, sh, Input::Event(e)),
                                Next::Steps(st) if st.contains(&Step::Orders(current)))
                        })
                    })
                })
                .collect();
            assert_eq!(from, [reached_from(current).unwrap()], "{current}");
        }
    }
}

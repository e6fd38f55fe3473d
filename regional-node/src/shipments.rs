//! Shipments: the `shipments` consumer group that creates a shipment for every paid
//! order, and the dispatch and deliver commands of the carrier.

use crate::store::Tx;
use crate::workflow::{Decision, Delivery, Reaction, Workflow, WorkflowError};
use eventlog::keys;
use orders_model::apply::{self, ApplyError};
use orders_model::events::*;
use orders_model::flow::ShipmentStep;
use orders_model::{Input, Module, Order, OrderId, ShipmentId, Step};

const CARRIERS: [&str; 3] = ["UPS", "DHL", "FedEx"];

/// The `shipments` group.
pub async fn on_event(wf: &Workflow, d: &Delivery<'_>) -> Result<Option<Tx>, WorkflowError> {
    // Chosen once per delivery, outside the decision, so a retried decision after a
    // conflict proposes the same shipment.
    let shipment_id =
        ShipmentId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID is a shipment id");
    let tracking = format!("TRK{:010}", rand::random::<u32>());
    let new_key = Some(keys::shipment(shipment_id.as_str()));
    wf.react(d, new_key, Step::shipments, |_, order, step| {
        Ok(match step {
            ShipmentStep::Create => {
                let carrier = CARRIERS[order
                    .order_id
                    .as_str()
                    .bytes()
                    .map(usize::from)
                    .sum::<usize>()
                    % CARRIERS.len()];
                Reaction::Next(DomainEvent::ShipmentCreated(ShipmentCreated {
                    order_id: order.order_id.clone(),
                    shipment_id: shipment_id.clone(),
                    tracking_number: tracking.clone(),
                    carrier: carrier.into(),
                }))
            }
            // The carrier's steps come from its commands (`advance`), not from events.
            ShipmentStep::Dispatch | ShipmentStep::Deliver => Reaction::Nothing,
        })
    })
    .await
}

/// Which carrier step a command takes.
#[derive(Debug, Clone)]
pub enum CarrierStep {
    Dispatch,
    Deliver(DeliveryDetails),
}

/// What the carrier may say about a delivery (`POST /shipments/{id}/deliver`'s
/// optional body), already validated.
#[derive(Debug, Clone, Default)]
pub struct DeliveryDetails {
    /// RFC 3339; when absent, the time the delivery is recorded.
    pub delivered_at: Option<String>,
    pub delivery_location: Option<String>,
}

/// `POST /shipments/{id}/dispatch` and `/deliver`: allowed where the order's state
/// machine allows them.
pub async fn advance(
    wf: &Workflow,
    shipment_id: &ShipmentId,
    step: CarrierStep,
    cause: &Cause,
) -> Result<Order, WorkflowError> {
    let not_found = || WorkflowError::NotFound(format!("shipment {}", shipment_id.as_str()));
    let key = keys::shipment(shipment_id.as_str());
    let raw = wf.store.get(&key).await?.ok_or_else(not_found)?;
    let order_id = OrderId::parse(&raw).ok_or_else(|| ApplyError::Corrupt {
        key,
        source: serde::de::Error::custom(format!("{raw:?} is not an order id")),
    })?;
    let (input, verb) = match step {
        CarrierStep::Dispatch => (Input::Dispatch, "dispatch"),
        CarrierStep::Deliver(_) => (Input::Deliver, "deliver"),
    };
    // Read once, outside the decision, so a decision taken again after a conflict
    // records the same time.
    let now = eventlog::time::rfc3339_ms(eventlog::time::now_ms());
    let done = wf
        .command(keys::order(order_id.as_str()), cause, |tx| {
            let order = apply::order(tx, &order_id)?.ok_or_else(not_found)?;
            let next = order.next(input).step_of(Module::Shipments);
            let event = match (next.and_then(Step::shipments), &step) {
                (Some(ShipmentStep::Dispatch), _) => {
                    DomainEvent::ShipmentDispatched(ShipmentDispatched {
                        order_id: order_id.clone(),
                        shipment_id: shipment_id.clone(),
                        dispatched_at: Some(now.clone()),
                    })
                }
                (Some(ShipmentStep::Deliver), CarrierStep::Deliver(details)) => {
                    DomainEvent::ShipmentDelivered(ShipmentDelivered {
                        order_id: order_id.clone(),
                        shipment_id: shipment_id.clone(),
                        delivered_at: Some(details.delivered_at.clone().unwrap_or(now.clone())),
                        delivery_location: details.delivery_location.clone(),
                    })
                }
                _ => {
                    return Err(WorkflowError::InvalidState(format!(
                        "shipment {} is {} (order {}): cannot {verb}",
                        shipment_id.as_str(),
                        order.shipment.map(|s| s.as_str()).unwrap_or("unknown"),
                        order.status,
                    )))
                }
            };
            Ok(Decision::Emit {
                last_sequence: order.version,
                events: vec![event],
            })
        })
        .await?;
    Ok(apply::order(&done, &order_id)?.expect("the order exists"))
}

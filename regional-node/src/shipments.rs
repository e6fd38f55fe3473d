//! Shipments: the `shipments` consumer group that creates a shipment for every paid
//! order, and the dispatch and deliver commands of the carrier.

use crate::events::*;
use crate::orders::{load_order, react, Order, Reaction, ShipmentState, Status};
use crate::store::Tx;
use crate::workflow::{Decision, Reads, Workflow, WorkflowError};
use eventlog::{keys, Envelope};
use serde_json::Value;

const CARRIERS: [&str; 3] = ["UPS", "DHL", "FedEx"];

/// The shipment part of an order, as `POST /shipments/{id}/...` answers it.
pub fn view(order: &Order) -> Value {
    serde_json::json!({
        "shipmentId": order.shipment_id,
        "orderId": order.order_id,
        "status": order.shipment,
        "trackingNumber": order.tracking_number,
        "carrier": order.carrier,
        "orderStatus": order.status,
    })
}

/// The `shipments` group.
pub async fn on_event(
    wf: &Workflow,
    env: &Envelope,
    event: &DomainEvent,
    ack: Option<(&str, &str)>,
) -> Result<Option<Tx>, WorkflowError> {
    // Chosen once per delivery, outside the decision, so a retried decision after a
    // conflict proposes the same shipment.
    let shipment_id = uuid::Uuid::new_v4().to_string();
    let tracking = format!("TRK{:010}", rand::random::<u32>());
    let new_key = Some(keys::shipment(&shipment_id));
    react(wf, env, event, ack, new_key, |_, order| {
        let paid = matches!(event, DomainEvent::OrderPaid(_)) && order.status == Status::Paid;
        if !paid || order.shipment.is_some() {
            return Ok(Reaction::Nothing);
        }
        let carrier =
            CARRIERS[order.order_id.bytes().map(usize::from).sum::<usize>() % CARRIERS.len()];
        Ok(Reaction::Next(DomainEvent::ShipmentCreated(
            ShipmentCreated {
                order_id: order.order_id.clone(),
                shipment_id: shipment_id.clone(),
                tracking_number: tracking.clone(),
                carrier: carrier.into(),
            },
        )))
    })
    .await
}

/// Which carrier step a command takes.
#[derive(Debug, Clone, Copy)]
pub enum Step {
    Dispatch,
    Deliver,
}

/// `POST /shipments/{id}/dispatch` and `/deliver`.
pub async fn advance(
    wf: &Workflow,
    shipment_id: &str,
    step: Step,
    cause: &Cause,
) -> Result<Order, WorkflowError> {
    let not_found = || WorkflowError::NotFound(format!("shipment {shipment_id}"));
    let order_id = wf
        .store
        .get(&keys::shipment(shipment_id))
        .await?
        .ok_or_else(not_found)?;
    let done = wf
        .execute(
            Reads::keys(vec![keys::order(&order_id)]),
            cause,
            None,
            |tx| {
                let order = load_order(tx, &order_id)?.ok_or_else(not_found)?;
                let shipment = ShipmentRef {
                    order_id: order_id.clone(),
                    shipment_id: shipment_id.to_string(),
                };
                let event = match (step, order.shipment, order.status) {
                    (Step::Dispatch, Some(ShipmentState::Created), Status::Shipped) => {
                        DomainEvent::ShipmentDispatched(shipment)
                    }
                    (Step::Deliver, Some(ShipmentState::Dispatched), Status::Shipped) => {
                        DomainEvent::ShipmentDelivered(shipment)
                    }
                    (_, state, status) => {
                        return Err(WorkflowError::InvalidState(format!(
                            "shipment {shipment_id} is {} (order {}): cannot {}",
                            state
                                .map(|s| format!("{s:?}").to_uppercase())
                                .unwrap_or_else(|| "unknown".into()),
                            status.as_str(),
                            if matches!(step, Step::Dispatch) {
                                "dispatch"
                            } else {
                                "deliver"
                            }
                        )))
                    }
                };
                Ok(Decision::Emit {
                    last_sequence: order.version,
                    events: vec![event],
                })
            },
        )
        .await?
        .expect("a shipment step always emits");
    Ok(load_order(&done, &order_id)?.expect("the order exists"))
}

//! Orders: the place and cancel commands, and the `orders` consumer group that moves
//! an order along as the other modules report back. The order itself, its statuses and
//! its state machine are the model's (`orders_model::order`, `orders_model::flow`).

use crate::inventory;
use crate::store::Tx;
use crate::workflow::{missing_keys, Decision, Delivery, Reaction, Reads, Workflow, WorkflowError};
use eventlog::keys;
use orders_model::apply::{self, State};
use orders_model::events::*;
use orders_model::flow::SAGA_TIMEOUT_REASON;
use orders_model::order::{IdempotencyKey, IdempotencyRecord, LineItem, PlaceOrder, PlacedOrder};
use orders_model::pii::Field;
use orders_model::{Input, Module, Next, Order, OrderId, Status, Step};

/// The answer to a place-order: the new order, or the first answer for its key.
pub enum Placed {
    New(PlacedOrder),
    Replayed(PlacedOrder),
}

/// `POST /orders`: checks availability first (no order, no event when short), then
/// appends OrderPlaced with the order and its idempotency record in one step.
pub async fn place(
    wf: &Workflow,
    cmd: &PlaceOrder,
    idempotency_key: Option<&IdempotencyKey>,
    cause: &Cause,
) -> Result<Placed, WorkflowError> {
    let hash = cmd.fingerprint();
    if let Some(key) = idempotency_key {
        if let Some(first) = idempotent_answer(wf, key, &hash).await? {
            return Ok(Placed::Replayed(first));
        }
    }
    let order_id =
        OrderId::parse(&uuid::Uuid::new_v4().to_string()).expect("a UUID is an order id");
    let product_keys: Vec<String> = cmd
        .items
        .iter()
        .map(|i| keys::product(i.sku.as_str()))
        .collect();
    let idempotency = idempotency_key.map(|k| keys::idempotency(k.as_str()));
    // Sealed once, outside the decision (which may run again): nothing personal is
    // ever written in plain text, and each seal takes a fresh random nonce.
    let shipping_address = wf.pii.seal(
        Field::ShippingAddress,
        order_id.as_str(),
        cmd.shipping_address.as_str(),
        rand::random(),
    );
    let payment_token = wf.pii.seal(
        Field::PaymentToken,
        order_id.as_str(),
        cmd.payment_token.as_str(),
        rand::random(),
    );
    let result = wf
        .execute(
            Reads {
                keys: idempotency.iter().cloned().collect(),
                peek: product_keys,
                new_key: Some(keys::order(order_id.as_str())),
            },
            cause,
            None,
            |tx| {
                if let Some(key) = &idempotency {
                    if tx.get(key)?.is_some() {
                        return Err(WorkflowError::IdempotencyKeyTaken);
                    }
                }
                let products = inventory::products_for(tx, cmd.items.iter().map(|i| &i.sku))?;
                let availability = orders_model::product::availability(&products, &cmd.items);
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
                    .map(|(item, p)| LineItem {
                        sku: item.sku.clone(),
                        quantity: item.quantity,
                        unit_price: p.price,
                    })
                    .collect();
                let amount = items.iter().map(|i| i.quantity.get() * i.unit_price).sum();
                Ok(Decision::Emit {
                    last_sequence: 0,
                    events: vec![DomainEvent::OrderPlaced(OrderPlaced {
                        order_id: order_id.clone(),
                        customer_id: cmd.customer_id.to_string(),
                        items,
                        amount,
                        currency,
                        shipping_address: shipping_address.clone(),
                        payment_token: payment_token.clone(),
                        idempotency_key: idempotency_key.cloned(),
                        request_hash: idempotency_key.map(|_| hash.clone()),
                    })],
                })
            },
        )
        .await;
    match result {
        Ok(Some(tx)) => {
            let order = apply::order(&tx, &order_id)?.expect("the order was just placed");
            Ok(Placed::New(PlacedOrder {
                order_id,
                status: order.status,
                amount: order.amount,
                currency: order.currency,
                region: wf.region.clone(),
            }))
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

/// The first answer stored for an Idempotency-Key, if the key was used with this body.
pub async fn idempotent_answer(
    wf: &Workflow,
    key: &IdempotencyKey,
    hash: &str,
) -> Result<Option<PlacedOrder>, WorkflowError> {
    let key = keys::idempotency(key.as_str());
    let Some(first) = wf.store.get_json::<IdempotencyRecord>(&key).await? else {
        return Ok(None);
    };
    if first.request_hash.as_deref() != Some(hash) {
        return Err(WorkflowError::IdempotencyKeyReused);
    }
    Ok(Some(first.answer()))
}

/// `GET /orders/{id}`.
pub async fn find(wf: &Workflow, order_id: &OrderId) -> Result<Order, WorkflowError> {
    let order = wf.store.get_json(&keys::order(order_id.as_str())).await?;
    order.ok_or_else(|| WorkflowError::NotFound(format!("order {order_id}")))
}

/// `POST /orders/{id}/cancel`: allowed where the state machine allows it (PENDING,
/// CONFIRMED and PAID, as long as no shipment exists yet); the inventory and payments
/// groups release and refund.
pub async fn cancel(
    wf: &Workflow,
    order_id: &OrderId,
    reason: Option<String>,
    cause: &Cause,
) -> Result<Order, WorkflowError> {
    let done = wf
        .command(keys::order(order_id.as_str()), cause, |tx| {
            let order = apply::order(tx, order_id)?
                .ok_or_else(|| WorkflowError::NotFound(format!("order {order_id}")))?;
            if order.next(Input::Cancel) == Next::Refused {
                return Err(WorkflowError::InvalidState(format!(
                    "order {order_id} is {} and can no longer be cancelled",
                    order.status
                )));
            }
            Ok(Decision::Emit {
                last_sequence: order.version,
                events: vec![DomainEvent::OrderCancelled(OrderCancelled {
                    order_id: order_id.clone(),
                    reason: reason.clone(),
                    previous_status: order.status,
                })],
            })
        })
        .await?;
    Ok(apply::order(&done, order_id)?.expect("the order exists"))
}

/// The saga timeout of one order (seed 003, `NODE_SAGA_TIMEOUT_MS`; the deadline
/// watch is [`crate::sagas`]): an order the state machine still finds unpaid is
/// cancelled with reason `saga_timeout`, and the inventory and payments groups
/// compensate as for any cancellation. Returns whether this call cancelled it; an
/// order paid, ended or already timed out is left alone, so repeating it is harmless.
pub async fn time_out(
    wf: &Workflow,
    order_id: &OrderId,
    cause: &Cause,
) -> Result<bool, WorkflowError> {
    let done = wf
        .execute(
            Reads::keys(vec![keys::order(order_id.as_str())]),
            cause,
            None,
            |tx| {
                let Some(order) = apply::order(tx, order_id)? else {
                    return Ok(Decision::Nothing);
                };
                if order.next(Input::SagaTimeout).step_of(Module::Orders)
                    != Some(Step::Orders(Status::Cancelled))
                {
                    return Ok(Decision::Nothing);
                }
                Ok(Decision::Emit {
                    last_sequence: order.version,
                    events: vec![DomainEvent::OrderCancelled(OrderCancelled {
                        order_id: order_id.clone(),
                        reason: Some(SAGA_TIMEOUT_REASON.into()),
                        previous_status: order.status,
                    })],
                })
            },
        )
        .await?;
    Ok(done.is_some())
}

/// The `orders` group: records the status the state machine moves the order to, with
/// the data of the event that moved it.
pub async fn on_event(wf: &Workflow, d: &Delivery<'_>) -> Result<Option<Tx>, WorkflowError> {
    wf.react(d, None, Step::orders, |tx, order, status| {
        let order_id = order.order_id.clone();
        Ok(Reaction::Next(match (status, d.event) {
            (Status::Confirmed, _) => DomainEvent::OrderConfirmed(OrderConfirmed {
                order_id,
                amount: Some(order.amount),
            }),
            (Status::Rejected, DomainEvent::InventoryReservationFailed(e)) => {
                DomainEvent::OrderRejected(OrderReason {
                    order_id,
                    reason: e.reason.clone(),
                })
            }
            (Status::Paid, DomainEvent::PaymentProcessed(e)) => DomainEvent::OrderPaid(OrderPaid {
                order_id,
                payment_id: e.payment_id.clone(),
            }),
            (Status::PaymentFailed, DomainEvent::PaymentFailed(e)) => {
                DomainEvent::OrderPaymentFailed(OrderReason {
                    order_id,
                    reason: e.reason.clone(),
                })
            }
            (Status::Shipped, DomainEvent::ShipmentCreated(e)) => {
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
            (Status::Delivered, DomainEvent::ShipmentDelivered(e)) => {
                DomainEvent::OrderDelivered(OrderDelivered {
                    order_id,
                    delivered_at: e.delivered_at.clone(),
                    delivery_location: e.delivery_location.clone(),
                })
            }
            // The state machine gives each status together with the event whose data
            // it records; placing and cancelling are commands, not this group's steps.
            _ => return Ok(Reaction::Nothing),
        }))
    })
    .await
}

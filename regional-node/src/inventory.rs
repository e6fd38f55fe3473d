//! Inventory: the product upsert and the availability check, and the `inventory`
//! consumer group that reserves stock for placed orders and releases it again. The
//! product and the availability rule are the model's (`orders_model::product`).

use crate::store::Tx;
use crate::workflow::{missing_keys, Decision, Delivery, Reaction, Workflow, WorkflowError};
use eventlog::keys;
use orders_model::apply;
use orders_model::events::*;
use orders_model::flow::InventoryStep;
use orders_model::product::{availability, Availability, ItemQuantity, UpsertProduct};
use orders_model::{Order, Product, Sku, Step};

/// Loads the products of these skus from the transaction; unknown ones are an error.
pub fn products_for<'a>(
    tx: &Tx,
    skus: impl Iterator<Item = &'a Sku>,
) -> Result<Vec<Product>, WorkflowError> {
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for sku in skus {
        match apply::product(tx, sku)? {
            Some(p) => found.push(p),
            None => unknown.push(sku.clone()),
        }
    }
    if unknown.is_empty() {
        Ok(found)
    } else {
        Err(WorkflowError::UnknownSku(unknown))
    }
}

/// `POST /api/v1/products/check-availability`: answered from Redis as it is now (no
/// cached values, which another node may have outdated).
pub async fn check_availability(
    wf: &Workflow,
    items: &[ItemQuantity],
) -> Result<Vec<Availability>, WorkflowError> {
    let mut tx = Tx::fresh();
    tx.peek(
        &wf.store,
        items.iter().map(|i| keys::product(i.sku.as_str())),
    )
    .await?;
    let products = products_for(&tx, items.iter().map(|i| &i.sku))?;
    Ok(availability(&products, items))
}

/// `GET /api/v1/products/{sku}`.
pub async fn find(wf: &Workflow, sku: &Sku) -> Result<Product, WorkflowError> {
    let product = wf.store.get_json(&keys::product(sku.as_str())).await?;
    product.ok_or_else(|| WorkflowError::NotFound(format!("product {sku}")))
}

/// `PUT /api/v1/products/{sku}`: a ProductUpserted event. Returns the product and
/// whether it is new.
pub async fn upsert(
    wf: &Workflow,
    sku: &Sku,
    cmd: &UpsertProduct,
    cause: &Cause,
) -> Result<(Product, bool), WorkflowError> {
    let mut created = false;
    let done = wf
        .command(keys::product(sku.as_str()), cause, |tx| {
            let old = apply::product(tx, sku)?;
            if let Some(p) = &old {
                if cmd.stock.get() < p.reserved {
                    return Err(WorkflowError::InvalidState(format!(
                        "stock {} is below the {} units reserved for open orders",
                        cmd.stock.get(),
                        p.reserved
                    )));
                }
            }
            created = old.is_none();
            Ok(Decision::Emit {
                last_sequence: old.map(|p| p.version).unwrap_or(0),
                events: vec![DomainEvent::ProductUpserted(ProductUpserted {
                    sku: sku.clone(),
                    name: cmd.name.to_string(),
                    price: cmd.price.get(),
                    currency: cmd.currency.clone(),
                    stock: cmd.stock.get(),
                })],
            })
        })
        .await?;
    let product = apply::product(&done, sku)?.expect("just written");
    Ok((product, created))
}

/// The `inventory` group: reserves stock for placed orders, releases it when an order
/// is cancelled or its payment fails.
pub async fn on_event(wf: &Workflow, d: &Delivery<'_>) -> Result<Option<Tx>, WorkflowError> {
    wf.react(d, None, Step::inventory, |tx, order, step| {
        let order_id = order.order_id.clone();
        Ok(Reaction::Next(match step {
            InventoryStep::Reserve => {
                if let Some(missing) = missing_keys(tx, order.product_keys()) {
                    return Ok(Reaction::Load(missing));
                }
                let shortages = shortages(tx, order)?;
                if shortages.is_empty() {
                    DomainEvent::InventoryReserved(InventoryChange {
                        order_id,
                        items: order.item_quantities(),
                        reason: None,
                    })
                } else {
                    DomainEvent::InventoryReservationFailed(InventoryReservationFailed {
                        order_id,
                        reason: "insufficient_stock".into(),
                        items: shortages,
                    })
                }
            }
            InventoryStep::Release(reason) => DomainEvent::InventoryReleased(InventoryChange {
                order_id,
                items: order.item_quantities(),
                reason: Some(reason.as_str().into()),
            }),
        }))
    })
    .await
}

/// The order's lines that the stock cannot cover now (a product deleted from the
/// catalogue since the order was placed counts as zero available).
fn shortages(tx: &Tx, order: &Order) -> Result<Vec<Shortage>, WorkflowError> {
    let items = order.item_quantities();
    match products_for(tx, items.iter().map(|i| &i.sku)) {
        Ok(products) => Ok(availability(&products, &items)
            .into_iter()
            .filter(|a| !a.is_available)
            .map(|a| Shortage {
                sku: a.product_id,
                requested: a.requested,
                available: a.available,
            })
            .collect()),
        Err(WorkflowError::UnknownSku(skus)) => Ok(skus
            .into_iter()
            .map(|sku| Shortage {
                sku,
                requested: 0,
                available: 0,
            })
            .collect()),
        Err(e) => Err(e),
    }
}

//! Inventory: products and their stock, the availability check, and the `inventory`
//! consumer group that reserves stock for placed orders and releases it again.

use crate::events::*;
use crate::orders::{missing_keys, react, InventoryHold, Order, Reaction, Status};
use crate::projections::get_json;
use crate::store::Tx;
use crate::workflow::{Decision, Reads, Workflow, WorkflowError};
use eventlog::{keys, Envelope};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;

/// A product id: 1-64 of letters, digits, `-`, `_`, `.`; it becomes part of a Redis key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Sku(String);

impl Sku {
    pub fn parse(s: &str) -> Result<Sku, String> {
        let ok = !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if ok {
            Ok(Sku(s.to_string()))
        } else {
            Err(format!("invalid sku {s:?}: use 1-64 of [A-Za-z0-9._-]"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product as derived from its events. Stored as JSON under `tandem:product:{sku}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub sku: String,
    pub name: String,
    /// Minor units (cents).
    pub price: i64,
    pub currency: String,
    /// On hand.
    pub stock: i64,
    /// Held for orders that have not shipped yet.
    pub reserved: i64,
    pub version: u64,
}

impl Product {
    pub fn available(&self) -> i64 {
        (self.stock - self.reserved).max(0)
    }

    pub fn view(&self) -> Value {
        serde_json::json!({
            "sku": self.sku,
            "name": self.name,
            "price": self.price,
            "currency": self.currency,
            "stock": self.stock,
            "reserved": self.reserved,
            "available": self.available(),
            "version": self.version,
        })
    }
}

/// One line of the seed's availability answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Availability {
    pub product_id: String,
    pub requested: i64,
    pub available: i64,
    pub is_available: bool,
}

/// Loads the products of these skus from the transaction; unknown ones are an error.
pub fn products_for<'a>(
    tx: &Tx,
    skus: impl Iterator<Item = &'a Sku>,
) -> Result<Vec<Product>, WorkflowError> {
    let mut found = Vec::new();
    let mut unknown = Vec::new();
    for sku in skus {
        match get_json::<Product>(tx, &keys::product(sku.as_str()))? {
            Some(p) => found.push(p),
            None => unknown.push(sku.as_str().to_string()),
        }
    }
    if unknown.is_empty() {
        Ok(found)
    } else {
        Err(WorkflowError::UnknownSku(unknown))
    }
}

/// Availability per requested line; the same sku on several lines counts together.
pub fn availability(products: &[Product], items: &[(Sku, i64)]) -> Vec<Availability> {
    let mut wanted: BTreeMap<&str, i64> = BTreeMap::new();
    for (sku, qty) in items {
        *wanted.entry(sku.as_str()).or_default() += qty;
    }
    items
        .iter()
        .zip(products)
        .map(|((sku, qty), p)| Availability {
            product_id: sku.as_str().to_string(),
            requested: *qty,
            available: p.available(),
            is_available: wanted[sku.as_str()] <= p.available(),
        })
        .collect()
}

/// A validated `PUT /api/v1/products/{sku}` body.
#[derive(Debug, Clone)]
pub struct UpsertProduct {
    pub name: String,
    pub price: i64,
    pub currency: String,
    pub stock: i64,
}

impl UpsertProduct {
    pub fn parse(body: &Value) -> Result<UpsertProduct, (String, Vec<String>)> {
        let mut bad = Vec::new();
        let name = body
            .get("name")
            .and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty() && s.len() <= 200);
        let price = body
            .get("price")
            .and_then(Value::as_i64)
            .filter(|p| (0..=1_000_000_000).contains(p));
        let currency = match body.get("currency") {
            None | Some(Value::Null) => Some("USD"),
            Some(v) => v
                .as_str()
                .filter(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())),
        };
        let stock = body
            .get("stock")
            .and_then(Value::as_i64)
            .filter(|s| (0..=1_000_000_000).contains(s));
        for (field, ok) in [
            ("name", name.is_some()),
            ("price", price.is_some()),
            ("currency", currency.is_some()),
            ("stock", stock.is_some()),
        ] {
            if !ok {
                bad.push(field.to_string());
            }
        }
        match (name, price, currency, stock) {
            (Some(name), Some(price), Some(currency), Some(stock)) => Ok(UpsertProduct {
                name: name.to_string(),
                price,
                currency: currency.to_string(),
                stock,
            }),
            _ => Err((
                format!(
                    "invalid fields: {} (name: text; price, stock: whole numbers >= 0; currency: ISO code)",
                    bad.join(", ")
                ),
                bad,
            )),
        }
    }
}

/// `PUT /api/v1/products/{sku}`: a ProductUpserted event. Returns the product and
/// whether it is new.
pub async fn upsert(
    wf: &Workflow,
    sku: &Sku,
    cmd: &UpsertProduct,
    cause: &Cause,
) -> Result<(Product, bool), WorkflowError> {
    let key = keys::product(sku.as_str());
    let mut created = false;
    let done = wf
        .execute(Reads::keys(vec![key.clone()]), cause, None, |tx| {
            let old = get_json::<Product>(tx, &key)?;
            if let Some(p) = &old {
                if cmd.stock < p.reserved {
                    return Err(WorkflowError::InvalidState(format!(
                        "stock {} is below the {} units reserved for open orders",
                        cmd.stock, p.reserved
                    )));
                }
            }
            created = old.is_none();
            Ok(Decision::Emit {
                last_sequence: old.map(|p| p.version).unwrap_or(0),
                events: vec![DomainEvent::ProductUpserted(ProductUpserted {
                    sku: sku.as_str().to_string(),
                    name: cmd.name.clone(),
                    price: cmd.price,
                    currency: cmd.currency.clone(),
                    stock: cmd.stock,
                })],
            })
        })
        .await?
        .expect("an upsert always emits");
    let product = get_json::<Product>(&done, &key)?.expect("just written");
    Ok((product, created))
}

/// The `inventory` group: reserves stock for placed orders, releases it when an order
/// is cancelled or its payment fails.
pub async fn on_event(
    wf: &Workflow,
    env: &Envelope,
    event: &DomainEvent,
    ack: Option<(&str, &str)>,
) -> Result<Option<Tx>, WorkflowError> {
    react(wf, env, event, ack, None, |tx, order| {
        if let Some(missing) = missing_keys(tx, order.product_keys()) {
            return Ok(Reaction::Load(missing));
        }
        let order_id = order.order_id.clone();
        Ok(Reaction::Next(match event {
            DomainEvent::OrderPlaced(_)
                if order.status == Status::Pending && order.inventory.is_none() =>
            {
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
            DomainEvent::OrderCancelled(_) | DomainEvent::OrderPaymentFailed(_)
                if order.inventory == Some(InventoryHold::Reserved) =>
            {
                let reason = match event {
                    DomainEvent::OrderCancelled(_) => "order_cancelled",
                    _ => "payment_failed",
                };
                DomainEvent::InventoryReleased(InventoryChange {
                    order_id,
                    items: order.item_quantities(),
                    reason: Some(reason.into()),
                })
            }
            _ => return Ok(Reaction::Nothing),
        }))
    })
    .await
}

/// The order's lines that the stock cannot cover now (a product deleted from the
/// catalogue since the order was placed counts as zero available).
fn shortages(tx: &Tx, order: &Order) -> Result<Vec<Shortage>, WorkflowError> {
    let items: Vec<(Sku, i64)> = order
        .items
        .iter()
        .map(|i| Sku::parse(&i.sku).map(|s| (s, i.quantity)))
        .collect::<Result<_, _>>()
        .map_err(WorkflowError::Validation)?;
    match products_for(tx, items.iter().map(|(s, _)| s)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skus_are_validated() {
        assert!(Sku::parse("WIDGET-001").is_ok());
        assert!(Sku::parse("").is_err());
        assert!(Sku::parse("a b").is_err());
        assert!(Sku::parse("x:y").is_err());
    }

    #[test]
    fn repeated_skus_count_together() {
        let p = Product {
            sku: "W".into(),
            name: "W".into(),
            price: 1,
            currency: "USD".into(),
            stock: 5,
            reserved: 1,
            version: 1,
        };
        let w = Sku::parse("W").unwrap();
        let a = availability(&[p.clone(), p], &[(w.clone(), 3), (w, 2)]);
        assert!(a.iter().all(|x| !x.is_available));
        assert_eq!(a[0].available, 4);
    }
}

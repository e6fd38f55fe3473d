//! Orders: their ids, statuses and lines, the order as derived from its events, and
//! the place-order command with its idempotency record.

use crate::pii::Sealed;
use crate::product::{Currency, ItemQuantity, Sku};
use crate::text::{CustomerId, PaymentToken, ShippingAddress};
use eventlog::keys;
use serde::{Deserialize, Serialize};
use std::fmt;

/// Ids are UUIDs this code generates; what a client sends in a path is checked
/// against the same rule before it becomes part of a Redis key.
fn valid_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// An order id: 1-64 of letters, digits and `-` (in practice a UUID).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct OrderId(String);

/// A shipment id, of the same shape as an order id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct ShipmentId(String);

impl OrderId {
    pub fn parse(s: &str) -> Option<OrderId> {
        valid_id(s).then(|| OrderId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl ShipmentId {
    pub fn parse(s: &str) -> Option<ShipmentId> {
        valid_id(s).then(|| ShipmentId(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for OrderId {
    type Error = String;
    fn try_from(s: String) -> Result<OrderId, String> {
        if valid_id(&s) {
            Ok(OrderId(s))
        } else {
            Err(format!("invalid order id {s:?}"))
        }
    }
}

impl TryFrom<String> for ShipmentId {
    type Error = String;
    fn try_from(s: String) -> Result<ShipmentId, String> {
        if valid_id(&s) {
            Ok(ShipmentId(s))
        } else {
            Err(format!("invalid shipment id {s:?}"))
        }
    }
}

impl fmt::Display for OrderId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Display for ShipmentId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An `Idempotency-Key` header: 1-255 visible ASCII characters; part of a Redis key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(s: &str) -> Option<IdempotencyKey> {
        let ok = !s.is_empty() && s.len() <= 255 && s.bytes().all(|b| b.is_ascii_graphic());
        ok.then(|| IdempotencyKey(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for IdempotencyKey {
    type Error = String;
    fn try_from(s: String) -> Result<IdempotencyKey, String> {
        IdempotencyKey::parse(&s).ok_or_else(|| format!("invalid idempotency key {s:?}"))
    }
}

/// Where an order stands (DESIGN.md section 2); [`crate::flow`] says how it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
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

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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

impl ShipmentState {
    pub fn as_str(self) -> &'static str {
        match self {
            ShipmentState::Created => "CREATED",
            ShipmentState::Dispatched => "DISPATCHED",
            ShipmentState::Delivered => "DELIVERED",
        }
    }
}

/// One line of an order, priced when it was placed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LineItem {
    pub sku: Sku,
    pub quantity: crate::product::Quantity,
    pub unit_price: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct HistoryEntry {
    pub status: Status,
    pub at: String,
    pub event_id: String,
}

/// The order as derived from its events. Stored as JSON under `tandem:order:{id}`; the
/// field order is the stored bytes' (a rebuild must reproduce them exactly).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Order {
    pub order_id: OrderId,
    pub customer_id: String,
    pub status: Status,
    pub items: Vec<LineItem>,
    pub amount: i64,
    pub currency: Currency,
    /// Sealed as in the OrderPlaced event (copied, so a rebuild reproduces the bytes).
    pub shipping_address: Sealed,
    pub payment_token: Sealed,
    pub payment_id: Option<String>,
    pub shipment_id: Option<ShipmentId>,
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
        self.items
            .iter()
            .map(|i| keys::product(i.sku.as_str()))
            .collect()
    }
}

/// Most lines one order may have.
pub const MAX_ITEMS: usize = 100;

/// A `POST /orders`: who orders what, where it goes, and how it is paid.
#[derive(Debug, Clone)]
pub struct PlaceOrder {
    pub customer_id: CustomerId,
    pub items: Vec<ItemQuantity>,
    pub shipping_address: ShippingAddress,
    pub payment_token: PaymentToken,
}

impl PlaceOrder {
    /// Fingerprint of the request: the same Idempotency-Key with another body is
    /// refused. Stored with the key, so it must not change between versions.
    pub fn fingerprint(&self) -> String {
        let canonical = serde_json::json!({
            "customerId": self.customer_id.as_str(),
            "items": self.items.iter().map(|i| (i.sku.as_str(), i.quantity.get())).collect::<Vec<_>>(),
            "shippingAddress": self.shipping_address.as_str(),
            "paymentToken": self.payment_token.as_str(),
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

/// The answer to a new order (201).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PlacedOrder {
    pub order_id: OrderId,
    pub status: Status,
    pub amount: i64,
    pub currency: Currency,
    /// The region that accepted the order.
    pub region: String,
}

/// What `tandem:idem:{key}` holds: the first answer for the key and the fingerprint of
/// the body that got it, so that a retry, in either region, gets the same answer. The
/// fields are in the stored bytes' order (alphabetical: it was first written as a JSON
/// map).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IdempotencyRecord {
    pub amount: i64,
    pub currency: Currency,
    pub order_id: OrderId,
    pub region: String,
    pub request_hash: Option<String>,
    pub status: Status,
}

impl IdempotencyRecord {
    pub fn answer(self) -> PlacedOrder {
        PlacedOrder {
            order_id: self.order_id,
            status: self.status,
            amount: self.amount,
            currency: self.currency,
            region: self.region,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::product::Quantity;

    fn place(quantity: i64) -> PlaceOrder {
        PlaceOrder {
            customer_id: CustomerId::parse("c").unwrap(),
            items: vec![ItemQuantity {
                sku: Sku::parse("W").unwrap(),
                quantity: Quantity::parse(quantity).unwrap(),
            }],
            shipping_address: ShippingAddress::parse("x").unwrap(),
            payment_token: PaymentToken::parse("tok_ok").unwrap(),
        }
    }

    #[test]
    fn fingerprint_depends_on_the_body_and_not_on_the_version() {
        assert_ne!(place(1).fingerprint(), place(2).fingerprint());
        // Stored with idempotency keys: a change would refuse every retry across an
        // upgrade. This value is what the first version computed for this body.
        assert_eq!(place(1).fingerprint(), "d42b38815f9ceacb");
    }

    #[test]
    fn ids_are_checked_before_they_become_keys() {
        assert!(OrderId::parse("0b9f6c1e-6a4e-4d49-9f0f-5a8b7c3d2e1f").is_some());
        assert!(OrderId::parse("a:b").is_none());
        assert!(OrderId::parse("").is_none());
        assert!(ShipmentId::parse(&"a".repeat(65)).is_none());
        assert!(IdempotencyKey::parse("key 1").is_none());
        assert!(IdempotencyKey::parse("key-1").is_some());
    }

    #[test]
    fn the_idempotency_record_keeps_its_bytes() {
        let record = IdempotencyRecord {
            amount: 3000,
            currency: Currency::usd(),
            order_id: OrderId::parse("o-1").unwrap(),
            region: "a".into(),
            request_hash: Some("h".into()),
            status: Status::Pending,
        };
        assert_eq!(
            serde_json::to_string(&record).unwrap(),
            r#"{"amount":3000,"currency":"USD","orderId":"o-1","region":"a","requestHash":"h","status":"PENDING"}"#
        );
    }
}

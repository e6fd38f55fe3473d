//! Products: SKUs, prices and stock, the product as derived from its events, and the
//! availability check that runs before an order is placed and again when stock is
//! reserved.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A product id: 1-64 of letters, digits, `-`, `_`, `.`; it becomes part of a Redis key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
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

impl TryFrom<String> for Sku {
    type Error = String;
    fn try_from(s: String) -> Result<Sku, String> {
        Sku::parse(&s).map(|_| Sku(s))
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How many units of a product one line of an order moves: 1 to [`Quantity::MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64")]
pub struct Quantity(i64);

impl Quantity {
    pub const MAX: i64 = 10_000;

    pub fn parse(n: i64) -> Option<Quantity> {
        (1..=Quantity::MAX).contains(&n).then_some(Quantity(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

impl TryFrom<i64> for Quantity {
    type Error = String;
    fn try_from(n: i64) -> Result<Quantity, String> {
        Quantity::parse(n).ok_or_else(|| format!("quantity {n} is not 1-{}", Quantity::MAX))
    }
}

/// An ISO 4217 code: three capital letters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String")]
pub struct Currency(String);

impl Currency {
    /// What a product is priced in when its upsert names no currency.
    pub fn usd() -> Currency {
        Currency("USD".into())
    }

    pub fn parse(s: &str) -> Option<Currency> {
        (s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase())).then(|| Currency(s.into()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = String;
    fn try_from(s: String) -> Result<Currency, String> {
        Currency::parse(&s).ok_or_else(|| format!("invalid currency {s:?}"))
    }
}

/// Prices and stock levels a client sets: whole numbers from 0 to a billion.
const MAX_AMOUNT: i64 = 1_000_000_000;

/// A price in minor units (cents).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Price(i64);

impl Price {
    pub fn parse(n: i64) -> Option<Price> {
        (0..=MAX_AMOUNT).contains(&n).then_some(Price(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// Units on hand, as a restock sets them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StockLevel(i64);

impl StockLevel {
    pub fn parse(n: i64) -> Option<StockLevel> {
        (0..=MAX_AMOUNT).contains(&n).then_some(StockLevel(n))
    }

    pub fn get(self) -> i64 {
        self.0
    }
}

/// So many units of one product: a line of an order, of an availability check, or of
/// an inventory event.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ItemQuantity {
    pub sku: Sku,
    pub quantity: Quantity,
}

/// A product as derived from its events. Stored as JSON under `tandem:product:{sku}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Product {
    pub sku: Sku,
    pub name: String,
    /// Minor units (cents).
    pub price: i64,
    pub currency: Currency,
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
}

/// A `PUT /api/v1/products/{sku}`: the product's catalogue entry and stock level.
#[derive(Debug, Clone)]
pub struct UpsertProduct {
    pub name: crate::text::ProductName,
    pub price: Price,
    pub currency: Currency,
    pub stock: StockLevel,
}

/// One line of the seed's availability answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Availability {
    pub product_id: Sku,
    pub requested: i64,
    pub available: i64,
    pub is_available: bool,
}

/// Availability per requested line (`products[i]` is the product of `items[i]`); the
/// same SKU on several lines counts together.
pub fn availability(products: &[Product], items: &[ItemQuantity]) -> Vec<Availability> {
    let mut wanted: BTreeMap<&Sku, i64> = BTreeMap::new();
    for item in items {
        *wanted.entry(&item.sku).or_default() += item.quantity.get();
    }
    items
        .iter()
        .zip(products)
        .map(|(item, p)| Availability {
            product_id: item.sku.clone(),
            requested: item.quantity.get(),
            available: p.available(),
            is_available: wanted[&item.sku] <= p.available(),
        })
        .collect()
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
        // Also when read back from an event or a stored value.
        assert!(serde_json::from_str::<Sku>(r#""x:y""#).is_err());
        assert_eq!(
            serde_json::to_string(&Sku::parse("W").unwrap()).unwrap(),
            r#""W""#
        );
    }

    #[test]
    fn quantities_and_amounts_have_bounds() {
        assert_eq!(Quantity::parse(1).map(Quantity::get), Some(1));
        assert!(Quantity::parse(0).is_none());
        assert!(Quantity::parse(10_001).is_none());
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(Price::parse(0).is_some() && Price::parse(-1).is_none());
        assert!(StockLevel::parse(1_000_000_001).is_none());
        assert!(Currency::parse("usd").is_none() && Currency::parse("EUR").is_some());
    }

    #[test]
    fn repeated_skus_count_together() {
        let w = Sku::parse("W").unwrap();
        let p = Product {
            sku: w.clone(),
            name: "W".into(),
            price: 1,
            currency: Currency::usd(),
            stock: 5,
            reserved: 1,
            version: 1,
        };
        let line = |n| ItemQuantity {
            sku: w.clone(),
            quantity: Quantity::parse(n).unwrap(),
        };
        let a = availability(&[p.clone(), p], &[line(3), line(2)]);
        assert!(a.iter().all(|x| !x.is_available));
        assert_eq!(a[0].available, 4);
    }
}

//! Request bodies and parameters, parsed into the model's commands and types. Raw
//! JSON stops here: every bad field is collected and named, so the client can fix them
//! all at once (400 `validation_failed`), and nothing reaches the workflow unparsed.

use super::ApiError;
use axum::http::HeaderMap;
use orders_model::order::{IdempotencyKey, PlaceOrder, MAX_ITEMS};
use orders_model::product::{ItemQuantity, Price, StockLevel, UpsertProduct};
use orders_model::text::{BoundedText, PaymentToken, ProductName};
use orders_model::{Currency, OrderId, Quantity, ShipmentId, Sku};
use serde_json::{Map, Value};

/// The fields of a request that were missing or invalid, in the order they were found.
#[derive(Default)]
struct BadFields(Vec<String>);

impl BadFields {
    fn check<T>(&mut self, field: &str, value: Option<T>) -> Option<T> {
        if value.is_none() {
            self.0.push(field.to_string());
        }
        value
    }

    /// 400 `validation_failed` naming the fields, with `rules` after the list.
    fn into_error(self, rules: &str) -> ApiError {
        let message = format!("invalid fields: {}{rules}", self.0.join(", "));
        ApiError::validation(message, self.0)
    }
}

/// A text field of at most `MAX` bytes that must not be blank.
fn text<const MAX: usize>(obj: &Map<String, Value>, name: &str) -> Option<BoundedText<MAX>> {
    obj.get(name)
        .and_then(Value::as_str)
        .and_then(BoundedText::parse)
}

/// A whole-number field, parsed by `parse`.
fn whole<T>(body: &Value, name: &str, parse: fn(i64) -> Option<T>) -> Option<T> {
    body.get(name).and_then(Value::as_i64).and_then(parse)
}

/// Order lines (`items[i].<sku_field>`, `items[i].quantity`): 1 to [`MAX_ITEMS`] of them.
fn items(body: &Value, sku_field: &str, bad: &mut BadFields) -> Vec<ItemQuantity> {
    let mut items = Vec::new();
    match body.get("items").and_then(Value::as_array) {
        Some(list) if !list.is_empty() && list.len() <= MAX_ITEMS => {
            for (i, item) in list.iter().enumerate() {
                let sku = item
                    .get(sku_field)
                    .and_then(Value::as_str)
                    .and_then(|s| Sku::parse(s).ok());
                let sku = bad.check(&format!("items[{i}].{sku_field}"), sku);
                let quantity = whole(item, "quantity", Quantity::parse);
                let quantity = bad.check(&format!("items[{i}].quantity"), quantity);
                if let (Some(sku), Some(quantity)) = (sku, quantity) {
                    items.push(ItemQuantity { sku, quantity });
                }
            }
        }
        _ => bad.0.push("items".into()),
    }
    items
}

/// `POST /orders`.
pub fn place_order(body: &Value) -> Result<PlaceOrder, ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::validation(
            "the body must be a JSON object",
            Vec::new(),
        ));
    };
    let mut bad = BadFields::default();
    let customer_id = bad.check("customerId", text(obj, "customerId"));
    let shipping_address = bad.check("shippingAddress", text(obj, "shippingAddress"));
    let payment_token = match obj.get("paymentToken") {
        None | Some(Value::Null) => PaymentToken::parse("tok_ok"),
        Some(_) => bad.check("paymentToken", text(obj, "paymentToken")),
    };
    let items = items(body, "sku", &mut bad);
    match (customer_id, shipping_address, payment_token) {
        (Some(customer_id), Some(shipping_address), Some(payment_token)) if bad.0.is_empty() => {
            Ok(PlaceOrder {
                customer_id,
                items,
                shipping_address,
                payment_token,
            })
        }
        _ => Err(bad.into_error(&format!(
            " (items: 1-{MAX_ITEMS} entries, quantity 1-{})",
            Quantity::MAX
        ))),
    }
}

/// `POST /api/v1/products/check-availability`, the seed's shape:
/// `{"items":[{"product_id","quantity"}]}`.
pub fn availability_check(body: &Value) -> Result<Vec<ItemQuantity>, ApiError> {
    let mut bad = BadFields::default();
    let items = items(body, "product_id", &mut bad);
    if bad.0.is_empty() {
        Ok(items)
    } else {
        Err(bad.into_error(""))
    }
}

/// `PUT /api/v1/products/{sku}`.
pub fn upsert_product(body: &Value) -> Result<UpsertProduct, ApiError> {
    let mut bad = BadFields::default();
    let name = body.get("name").and_then(Value::as_str);
    let name = bad.check("name", name.and_then(ProductName::parse));
    let price = bad.check("price", whole(body, "price", Price::parse));
    let currency = match body.get("currency") {
        None | Some(Value::Null) => Some(Currency::usd()),
        Some(v) => v.as_str().and_then(Currency::parse),
    };
    let currency = bad.check("currency", currency);
    let stock = bad.check("stock", whole(body, "stock", StockLevel::parse));
    match (name, price, currency, stock) {
        (Some(name), Some(price), Some(currency), Some(stock)) => Ok(UpsertProduct {
            name,
            price,
            currency,
            stock,
        }),
        _ => {
            Err(bad
                .into_error(" (name: text; price, stock: whole numbers >= 0; currency: ISO code)"))
        }
    }
}

/// The optional `{"reason"}` of `POST /orders/{id}/cancel`.
pub fn cancel_reason(body: Option<&Value>) -> Result<Option<String>, ApiError> {
    match body.map(|b| b.get("reason")) {
        None | Some(None) | Some(Some(Value::Null)) => Ok(None),
        Some(Some(Value::String(r))) if r.len() <= 500 => Ok(Some(r.clone())),
        Some(Some(_)) => Err(ApiError::validation(
            "reason must be text of at most 500 characters",
            vec!["reason".into()],
        )),
    }
}

/// The `Idempotency-Key` header, if sent.
pub fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw.to_str().ok().and_then(IdempotencyKey::parse);
    key.map(Some).ok_or_else(|| {
        ApiError::validation(
            "Idempotency-Key must be 1-255 visible ASCII characters",
            vec!["Idempotency-Key".into()],
        )
    })
}

/// An order id from a path: one that cannot exist is simply not found.
pub fn order_id(id: &str) -> Result<OrderId, ApiError> {
    OrderId::parse(id).ok_or_else(|| ApiError::not_found(format!("order {id}")))
}

pub fn shipment_id(id: &str) -> Result<ShipmentId, ApiError> {
    ShipmentId::parse(id).ok_or_else(|| ApiError::not_found(format!("shipment {id}")))
}

/// A SKU from the path of a write: a bad one is the client's mistake to fix.
pub fn sku(sku: &str) -> Result<Sku, ApiError> {
    Sku::parse(sku).map_err(|msg| ApiError::validation(msg, vec!["sku".into()]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(e: ApiError) -> Vec<String> {
        e.fields
    }

    #[test]
    fn place_order_validation_names_every_bad_field() {
        let body = json!({
            "customerId": "", "shippingAddress": "x",
            "items": [{"sku": "W", "quantity": 0}, {"sku": "bad sku!", "quantity": 2}]
        });
        let err = place_order(&body).unwrap_err();
        assert_eq!(
            err.message,
            "invalid fields: customerId, items[0].quantity, items[1].sku (items: 1-100 entries, quantity 1-10000)"
        );
        assert_eq!(
            fields(err),
            vec!["customerId", "items[0].quantity", "items[1].sku"]
        );
    }

    #[test]
    fn too_many_items_is_refused() {
        let items: Vec<Value> = (0..101)
            .map(|_| json!({"sku": "W", "quantity": 1}))
            .collect();
        let body = json!({"customerId": "c", "shippingAddress": "x", "items": items});
        assert_eq!(fields(place_order(&body).unwrap_err()), vec!["items"]);
    }

    #[test]
    fn a_missing_payment_token_is_the_approving_one() {
        let body = json!({"customerId": "c", "shippingAddress": "x", "items": [{"sku": "W", "quantity": 1}]});
        assert_eq!(place_order(&body).unwrap().payment_token.as_str(), "tok_ok");
        let body = json!({"items": [{"sku": "W", "quantity": 1}], "paymentToken": 5});
        assert_eq!(
            fields(place_order(&body).unwrap_err()),
            vec!["customerId", "shippingAddress", "paymentToken"]
        );
    }

    #[test]
    fn product_validation_names_every_bad_field() {
        let err =
            upsert_product(&json!({"name": " ", "price": -1, "currency": "usd"})).unwrap_err();
        assert_eq!(
            err.message,
            "invalid fields: name, price, currency, stock (name: text; price, stock: whole numbers >= 0; currency: ISO code)"
        );
        let ok = upsert_product(&json!({"name": "W", "price": 0, "stock": 3})).unwrap();
        assert_eq!(ok.currency.as_str(), "USD");
    }

    #[test]
    fn availability_lines_use_the_seed_field_names() {
        let err = availability_check(&json!({"items": [{"sku": "W", "quantity": 1}]})).unwrap_err();
        assert_eq!(err.message, "invalid fields: items[0].product_id");
    }
}

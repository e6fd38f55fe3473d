//! Request bodies and parameters, parsed into the model's commands and types. Raw
//! JSON stops here: every bad field is collected and named, so the client can fix them
//! all at once (400 `validation_failed`), and nothing reaches the workflow unparsed.

use super::ApiError;
use crate::shipments::DeliveryDetails;
use axum::http::HeaderMap;
use orders_model::integration::IntegrationEventType;
use orders_model::order::{IdempotencyKey, PlaceOrder, MAX_ITEMS};
use orders_model::product::{ItemQuantity, Price, StockLevel, UpsertProduct};
use orders_model::text::{BoundedText, PaymentToken, ProductName};
use orders_model::webhooks::{WebhookId, WebhookUrl, MAX_URL_LEN};
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
    if body.is_some_and(|b| !b.is_object()) {
        return Err(ApiError::validation(
            "the body must be a JSON object (or empty)",
            Vec::new(),
        ));
    }
    match body.map(|b| b.get("reason")) {
        None | Some(None) | Some(Some(Value::Null)) => Ok(None),
        Some(Some(Value::String(r))) if r.len() <= 500 => Ok(Some(r.clone())),
        Some(Some(_)) => Err(ApiError::validation(
            "reason must be text of at most 500 characters",
            vec!["reason".into()],
        )),
    }
}

/// Longest `deliveryLocation`.
pub const MAX_DELIVERY_LOCATION: usize = 500;

/// The optional `{"deliveredAt","deliveryLocation"}` of `POST /shipments/{id}/deliver`:
/// `deliveredAt` an RFC 3339 date-time, `deliveryLocation` non-blank text of at most
/// [`MAX_DELIVERY_LOCATION`] bytes; both may be left out (or null), and so may the body.
pub fn delivery_details(body: Option<&Value>) -> Result<DeliveryDetails, ApiError> {
    let Some(body) = body else {
        return Ok(DeliveryDetails::default());
    };
    let Some(obj) = body.as_object() else {
        return Err(ApiError::validation(
            "the body must be a JSON object",
            Vec::new(),
        ));
    };
    let mut bad = BadFields::default();
    let delivered_at = match obj.get("deliveredAt") {
        None | Some(Value::Null) => None,
        Some(v) => bad.check(
            "deliveredAt",
            v.as_str().filter(|s| rfc3339(s)).map(str::to_string),
        ),
    };
    let delivery_location = match obj.get("deliveryLocation") {
        None | Some(Value::Null) => None,
        Some(_) => bad
            .check(
                "deliveryLocation",
                text::<MAX_DELIVERY_LOCATION>(obj, "deliveryLocation"),
            )
            .map(|t| t.as_str().to_string()),
    };
    if !bad.0.is_empty() {
        return Err(bad.into_error(&format!(
            " (deliveredAt: RFC 3339 date-time, e.g. 2026-11-30T10:00:00Z; deliveryLocation: text of 1-{MAX_DELIVERY_LOCATION} bytes)"
        )));
    }
    Ok(DeliveryDetails {
        delivered_at,
        delivery_location,
    })
}

/// Whether `s` is an RFC 3339 date-time (`YYYY-MM-DDTHH:MM:SS[.frac](Z|+HH:MM|-HH:MM)`)
/// naming a real day.
pub fn rfc3339(s: &str) -> bool {
    let b = s.as_bytes();
    let digits = |from: usize, n: usize| -> Option<u32> {
        let part = b.get(from..from + n)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |acc, d| acc * 10 + u32::from(d - b'0')))
    };
    let sep = |at: usize, chars: &[u8]| b.get(at).is_some_and(|c| chars.contains(c));
    if s.len() > 64 || !sep(4, b"-") || !sep(7, b"-") || !sep(10, b"Tt") {
        return false;
    }
    if !sep(13, b":") || !sep(16, b":") {
        return false;
    }
    let (Some(year), Some(month), Some(day), Some(h), Some(m), Some(sec)) = (
        digits(0, 4),
        digits(5, 2),
        digits(8, 2),
        digits(11, 2),
        digits(14, 2),
        digits(17, 2),
    ) else {
        return false;
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return false,
    };
    if day == 0 || day > days || h > 23 || m > 59 || sec > 60 {
        return false;
    }
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return false;
        }
        rest = &frac[n..];
    }
    match rest.as_bytes() {
        [b'Z' | b'z'] => true,
        [b'+' | b'-', h1, h2, b':', m1, m2] => {
            [h1, h2, m1, m2].iter().all(|d| d.is_ascii_digit())
                && (h1 - b'0') * 10 + (h2 - b'0') <= 23
                && (m1 - b'0') * 10 + (m2 - b'0') <= 59
        }
        _ => false,
    }
}

/// Most event types one webhook may name.
const MAX_WEBHOOK_EVENTS: usize = 16;

/// `POST /api/v1/webhooks`: `{"url","events":[...]}`, the url `http(s)://` with a host
/// and at most 2048 bytes, the events 1-16 known integration event types.
pub fn webhook(body: &Value) -> Result<(WebhookUrl, Vec<IntegrationEventType>), ApiError> {
    let Some(obj) = body.as_object() else {
        return Err(ApiError::validation(
            "the body must be a JSON object",
            Vec::new(),
        ));
    };
    let mut bad = BadFields::default();
    let url = obj
        .get("url")
        .and_then(Value::as_str)
        // The model's check, then a full URL parser's: both must accept it.
        .filter(|u| reqwest::Url::parse(u).is_ok_and(|p| p.host_str().is_some()))
        .and_then(WebhookUrl::parse);
    let url = bad.check("url", url);
    let mut events = Vec::new();
    match obj.get("events").and_then(Value::as_array) {
        Some(list) if !list.is_empty() && list.len() <= MAX_WEBHOOK_EVENTS => {
            for (i, name) in list.iter().enumerate() {
                let ty = name.as_str().and_then(IntegrationEventType::parse);
                if let Some(ty) = bad.check(&format!("events[{i}]"), ty) {
                    if !events.contains(&ty) {
                        events.push(ty);
                    }
                }
            }
        }
        _ => bad.0.push("events".into()),
    }
    match url {
        Some(url) if bad.0.is_empty() => Ok((url, events)),
        _ => {
            let known: Vec<&str> = IntegrationEventType::ALL
                .iter()
                .map(|t| t.as_str())
                .collect();
            Err(bad.into_error(&format!(
                " (url: http:// or https:// with a host, at most {MAX_URL_LEN} bytes; events: 1-{MAX_WEBHOOK_EVENTS} of {})",
                known.join(", ")
            )))
        }
    }
}

/// A webhook id from a path: one that cannot exist is simply not found.
pub fn webhook_id(id: &str) -> Result<WebhookId, ApiError> {
    WebhookId::parse(id).ok_or_else(|| ApiError::not_found(format!("webhook {id}")))
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

    #[test]
    fn delivery_details_are_optional_and_checked() {
        let none = delivery_details(None).unwrap();
        assert_eq!((none.delivered_at, none.delivery_location), (None, None));
        let ok = delivery_details(Some(&json!({
            "deliveredAt": "2026-11-30T10:00:00.5+01:00", "deliveryLocation": "front door"
        })))
        .unwrap();
        assert_eq!(
            ok.delivered_at.as_deref(),
            Some("2026-11-30T10:00:00.5+01:00")
        );
        let err = delivery_details(Some(
            &json!({"deliveredAt": "yesterday", "deliveryLocation": " "}),
        ))
        .unwrap_err();
        assert_eq!(fields(err), vec!["deliveredAt", "deliveryLocation"]);
        let long = "x".repeat(MAX_DELIVERY_LOCATION + 1);
        let err = delivery_details(Some(&json!({"deliveryLocation": long}))).unwrap_err();
        assert_eq!(fields(err), vec!["deliveryLocation"]);
        assert!(delivery_details(Some(&json!([1]))).is_err());
    }

    #[test]
    fn rfc3339_date_times_only() {
        for ok in [
            "2026-11-30T10:00:00Z",
            "2024-02-29T23:59:60.123456z",
            "2026-01-01t00:00:00-05:30",
        ] {
            assert!(rfc3339(ok), "{ok}");
        }
        for bad in [
            "2026-11-30",
            "2026-11-30 10:00:00Z",
            "2025-02-29T10:00:00Z",
            "2026-13-01T10:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T10:00:00",
            "2026-11-30T10:00:00.Z",
            "2026-11-30T10:00:00+0100",
            "２026-11-30T10:00:00Z",
        ] {
            assert!(!rfc3339(bad), "{bad}");
        }
    }

    #[test]
    fn webhook_validation_names_every_bad_field() {
        let (url, events) =
            webhook(&json!({"url": "https://example.com/h", "events": ["order.status_updated"]}))
                .unwrap();
        assert_eq!((url.as_str(), events.len()), ("https://example.com/h", 1));
        let err = webhook(&json!({"url": "ftp://x", "events": ["order.teleported"]})).unwrap_err();
        assert_eq!(fields(err), vec!["url", "events[0]"]);
        let err = webhook(&json!({"url": "http://x", "events": []})).unwrap_err();
        assert_eq!(fields(err), vec!["events"]);
    }
}

//! The regional node's public and admin API as a test client sees it (API.md), with
//! the waits most flows need. The gateway serves the same paths, so this works against
//! a gateway URL as well.

use std::time::Duration;

use serde_json::{json, Value};

use crate::http::{HttpClient, Response};
use crate::poll::eventually;

/// Statuses from which an order never moves again without an operator.
pub const TERMINAL: &[&str] = &["DELIVERED", "REJECTED", "PAYMENT_FAILED", "CANCELLED"];

/// The events of an order whose payment is declined, up to the released reservation.
pub const PAYMENT_FAILED_FLOW: &[&str] = &[
    "OrderPlaced",
    "InventoryReserved",
    "OrderConfirmed",
    "PaymentFailed",
    "OrderPaymentFailed",
    "InventoryReleased",
];

/// The statuses an order may rest in without an operator: terminal, or shipped
/// (awaiting the carrier).
pub const SETTLED: &[&str] = &[
    "SHIPPED",
    "DELIVERED",
    "REJECTED",
    "PAYMENT_FAILED",
    "CANCELLED",
];

/// Generous bound for one order's asynchronous workflow on a loaded 2-core machine.
pub const FLOW: Duration = Duration::from_secs(30);

/// The product most flows start from.
pub const WIDGET: &str = "WIDGET-001";

/// The events of an order cancelled after its confirmation and before any charge:
/// the stock is released and nothing is refunded.
pub const CANCELLED_BEFORE_PAYMENT: &[&str] = &[
    "OrderPlaced",
    "InventoryReserved",
    "OrderConfirmed",
    "OrderCancelled",
    "InventoryReleased",
];

/// The happy path's events up to shipping.
pub const HAPPY_PATH_TO_SHIPPED: &[&str] = &[
    "OrderPlaced",
    "InventoryReserved",
    "OrderConfirmed",
    "PaymentProcessed",
    "OrderPaid",
    "ShipmentCreated",
    "OrderShipped",
];

#[derive(Debug, Clone)]
pub struct Api {
    pub http: HttpClient,
}

/// `{"customerId","items":[{"sku","quantity"}],"shippingAddress","paymentToken"}`.
pub fn order_body(customer: &str, items: &[(&str, u64)], payment_token: &str) -> Value {
    json!({
        "customerId": customer,
        "items": items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
        "shippingAddress": "1 Main St",
        "paymentToken": payment_token,
    })
}

impl Api {
    pub fn new(http: HttpClient) -> Api {
        Api { http }
    }

    // --- products -------------------------------------------------------------

    /// PUT a product; asserts 200/201.
    pub async fn put_product(&self, sku: &str, price: u64, stock: u64) -> Value {
        let r = self
            .http
            .put(
                &format!("/api/v1/products/{sku}"),
                &json!({"name": format!("Product {sku}"), "price": price, "currency": "USD", "stock": stock}),
            )
            .await;
        assert!(
            r.status == 200 || r.status == 201,
            "PUT product {sku}: {} {}",
            r.status,
            r.text
        );
        r.json
    }

    /// GET a product; asserts 200.
    pub async fn product(&self, sku: &str) -> Value {
        let r = self.http.get(&format!("/api/v1/products/{sku}")).await;
        assert_eq!(r.status, 200, "GET product {sku}: {}", r.text);
        r.json
    }

    /// `(stock, reserved, available)` of a product.
    pub async fn stock(&self, sku: &str) -> (i64, i64, i64) {
        let p = self.product(sku).await;
        let n = |f: &str| {
            p[f].as_i64()
                .unwrap_or_else(|| panic!("product {sku} has no integer `{f}`: {p}"))
        };
        (n("stock"), n("reserved"), n("available"))
    }

    // --- orders ---------------------------------------------------------------

    pub async fn place_order(&self, body: &Value) -> Response {
        self.http.post("/orders", body).await
    }

    pub async fn place_order_with_key(&self, body: &Value, key: &str) -> Response {
        self.http
            .post_with_headers("/orders", body, &[("Idempotency-Key", key)])
            .await
    }

    /// Places an order and asserts 201; returns its orderId.
    pub async fn place_ok(&self, body: &Value) -> String {
        self.place_order(body).await.order_id()
    }

    /// Places `count` orders of one `sku` at once (customers `c-0`, `c-1`...), all
    /// paid with `tok_ok`; returns their ids once every POST was answered 201, in the
    /// order the answers came. Orders still in flight are what the crash tests need.
    pub async fn place_concurrently(&self, sku: &str, count: usize) -> Vec<String> {
        let mut set = tokio::task::JoinSet::new();
        for i in 0..count {
            let api = self.clone();
            let body = order_body(&format!("c-{i}"), &[(sku, 1)], "tok_ok");
            set.spawn(async move { api.place_ok(&body).await });
        }
        let mut ids = Vec::with_capacity(count);
        while let Some(id) = set.join_next().await {
            ids.push(id.expect("join an order's placement"));
        }
        ids
    }

    /// The starting point of many flows: [`WIDGET`] in stock (price 1000, 10 on hand)
    /// and one order of one unit for `c-1`, paid with `tok_ok`, shipped: status
    /// `SHIPPED` and exactly the happy path's events. Returns the order id.
    pub async fn shipped_order(&self) -> String {
        self.put_product(WIDGET, 1000, 10).await;
        let id = self
            .place_ok(&order_body("c-1", &[(WIDGET, 1)], "tok_ok"))
            .await;
        self.wait_status(&id, &["SHIPPED"], FLOW).await;
        self.wait_events(&id, HAPPY_PATH_TO_SHIPPED, FLOW).await;
        id
    }

    pub async fn order(&self, id: &str) -> Response {
        self.http.get(&format!("/orders/{id}")).await
    }

    pub async fn cancel(&self, id: &str) -> Response {
        self.http
            .post(&format!("/orders/{id}/cancel"), &json!({"reason": "test"}))
            .await
    }

    /// Polls `GET /orders/{id}` until its status is one of `statuses`; returns the order.
    pub async fn wait_status(&self, id: &str, statuses: &[&str], deadline: Duration) -> Value {
        eventually(
            deadline,
            &format!("order {id} in one of {statuses:?}"),
            || async {
                let r = self.order(id).await;
                let status = r.json["status"].as_str().unwrap_or("");
                if r.status == 200 && statuses.contains(&status) {
                    Ok(r.json)
                } else {
                    Err(format!("{} {}", r.status, r.text))
                }
            },
        )
        .await
    }

    /// Polls until the aggregate's event types equal `expected` exactly.
    pub async fn wait_events(&self, aggregate: &str, expected: &[&str], deadline: Duration) {
        eventually(
            deadline,
            &format!("events of {aggregate} == {expected:?}"),
            || async {
                let types = self.event_types(aggregate).await;
                if types == expected {
                    Ok(())
                } else {
                    Err(types)
                }
            },
        )
        .await
    }

    // --- shipments ------------------------------------------------------------

    pub async fn dispatch(&self, shipment_id: &str) -> Response {
        self.http
            .post_empty(&format!("/shipments/{shipment_id}/dispatch"))
            .await
    }

    pub async fn deliver(&self, shipment_id: &str) -> Response {
        self.http
            .post_empty(&format!("/shipments/{shipment_id}/deliver"))
            .await
    }

    // --- events ---------------------------------------------------------------

    /// Every event of `aggregate` via `GET /api/events?aggregateId=`, following `next`.
    pub async fn events(&self, aggregate: &str) -> Vec<Value> {
        self.events_query(&format!("aggregateId={aggregate}")).await
    }

    /// Every event matching `query` (e.g. `eventType=OrderPlaced`), following `next`.
    pub async fn events_query(&self, query: &str) -> Vec<Value> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        for _ in 0..10_000 {
            let path = match &after {
                None => format!("/api/events?{query}&limit=1000"),
                Some(c) => format!("/api/events?{query}&limit=1000&after={c}"),
            };
            let r = self.http.get(&path).await;
            assert_eq!(r.status, 200, "GET {path}: {}", r.text);
            let batch = r.json["events"]
                .as_array()
                .unwrap_or_else(|| panic!("GET {path}: no `events` array: {}", r.text));
            out.extend(batch.iter().cloned());
            match r.json["next"].as_str() {
                Some(next) if !batch.is_empty() => after = Some(next.to_string()),
                _ => return out,
            }
        }
        panic!("GET /api/events?{query}: pagination did not end");
    }

    /// The `eventType`s of `aggregate`, oldest first.
    pub async fn event_types(&self, aggregate: &str) -> Vec<String> {
        self.events(aggregate)
            .await
            .iter()
            .map(|e| e["eventType"].as_str().unwrap_or("?").to_string())
            .collect()
    }

    // --- admin ----------------------------------------------------------------

    pub async fn dlq(&self) -> Response {
        self.http.get("/admin/dlq").await
    }

    pub async fn replay(&self, entry_id: &str) -> Response {
        self.http
            .post_empty(&format!("/admin/dlq/{entry_id}/replay"))
            .await
    }

    pub async fn rebuild(&self) -> Response {
        self.http.post_empty("/admin/rebuild").await
    }

    pub async fn role(&self) -> Response {
        self.http.get("/admin/role").await
    }

    /// Polls `GET /admin/role` until the node reports `role` at `epoch`; returns that
    /// answer. Anything else, a non-200 while the node rejoins included, is "not yet".
    pub async fn wait_role(&self, role: &str, epoch: u64, deadline: Duration) -> Value {
        eventually(deadline, &format!("{role} at epoch {epoch}"), || async {
            let r = self.role().await.json;
            if r["role"] == role && r["epoch"] == epoch {
                Ok(r)
            } else {
                Err(r)
            }
        })
        .await
    }

    pub async fn promote(&self, epoch: u64) -> Response {
        self.http
            .post("/admin/promote", &json!({ "epoch": epoch }))
            .await
    }

    pub async fn demote(&self, epoch: u64) -> Response {
        self.http
            .post("/admin/demote", &json!({ "epoch": epoch }))
            .await
    }

    pub async fn metrics(&self) -> String {
        let r = self.http.get("/metrics").await;
        assert_eq!(r.status, 200, "GET /metrics: {}", r.text);
        r.text
    }
}

/// Sum of the samples of `metric` in a Prometheus text exposition whose labels contain
/// every `label="value"` pair of `labels` (`None` when no sample matches).
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let Some(rest) = line.strip_prefix(metric) else {
            continue;
        };
        let (label_part, value) = if let Some(r) = rest.strip_prefix('{') {
            let Some(end) = r.find('}') else { continue };
            (&r[..end], r[end + 1..].trim())
        } else if rest.starts_with(' ') {
            ("", rest.trim())
        } else {
            continue; // another metric with this prefix
        };
        if !labels
            .iter()
            .all(|(k, v)| label_part.contains(&format!("{k}=\"{v}\"")))
        {
            continue;
        }
        let value = value.split_whitespace().next().unwrap_or("");
        if let Ok(v) = value.parse::<f64>() {
            *sum.get_or_insert(0.0) += v;
        }
    }
    sum
}

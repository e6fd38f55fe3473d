//! The seed's order flows on one regional node: what a client sees over HTTP (answers,
//! statuses), what an operator sees (the aggregate's events, the DLQ) and the stock.

use serde_json::{json, Value};
use system_tests::api::{
    metric_sum, order_body, CANCELLED_BEFORE_PAYMENT, FLOW, HAPPY_PATH_TO_SHIPPED,
    PAYMENT_FAILED_FLOW,
};
use system_tests::redis_state;
use system_tests::{eventually, Region};
use tokio::task::JoinSet;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const TRACEPARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn happy_path_then(extra: &[&'static str]) -> Vec<&'static str> {
    HAPPY_PATH_TO_SHIPPED
        .iter()
        .copied()
        .chain(extra.iter().copied())
        .collect()
}

/// Statuses of the order's history, oldest first.
fn history_statuses(order: &Value) -> Vec<String> {
    order["history"]
        .as_array()
        .unwrap_or_else(|| panic!("order without history: {order}"))
        .iter()
        .map(|h| h["status"].as_str().unwrap_or("?").to_string())
        .collect()
}

#[tokio::test]
async fn happy_path_order_is_shipped_then_delivered() {
    // Given a product with 10 on hand
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;

    // When a client checks availability and places an order for 2
    let check = api
        .http
        .post(
            "/api/v1/products/check-availability",
            &json!({"items":[{"product_id":"WIDGET-001","quantity":2}]}),
        )
        .await;
    assert_eq!(check.status, 200, "{}", check.text);
    assert_eq!(
        check.json,
        json!({"all_available": true, "items": [
            {"product_id": "WIDGET-001", "requested": 2, "available": 10, "is_available": true}
        ]})
    );
    let placed = api
        .http
        .post_with_headers(
            "/orders",
            &order_body("c-1", &[("WIDGET-001", 2)], "tok_ok"),
            &[
                ("X-Request-Id", "req-happy-1"),
                ("traceparent", TRACEPARENT),
            ],
        )
        .await;

    // Then it is accepted as PENDING with the amount, the region and its location
    let id = placed.order_id();
    assert_eq!(placed.json["status"], "PENDING");
    assert_eq!(placed.json["amount"], 2000);
    assert_eq!(placed.json["currency"], "USD");
    assert_eq!(placed.json["region"], "a");
    assert_eq!(placed.header("location"), Some(&*format!("/orders/{id}")));
    assert_eq!(placed.header("x-region"), Some("a"));
    assert_eq!(placed.header("x-request-id"), Some("req-happy-1"));

    // And the workflow ships it: reserved, confirmed, paid, shipment created, shipped
    let order = api.wait_status(&id, &["SHIPPED"], FLOW).await;
    api.wait_events(&id, HAPPY_PATH_TO_SHIPPED, FLOW).await;
    assert_eq!(order["customerId"], "c-1");
    assert_eq!(order["amount"], 2000);
    assert_eq!(order["items"][0]["sku"], "WIDGET-001");
    assert_eq!(order["items"][0]["quantity"], 2);
    assert_eq!(order["items"][0]["unitPrice"], 1000);
    assert!(order["paymentId"].is_string(), "no paymentId: {order}");
    assert!(
        order["trackingNumber"]
            .as_str()
            .is_some_and(|t| t.starts_with("TRK")),
        "trackingNumber: {order}"
    );
    assert!(
        order["carrier"].as_str().is_some_and(|c| !c.is_empty()),
        "carrier: {order}"
    );
    assert_eq!(
        history_statuses(&order),
        ["PENDING", "CONFIRMED", "PAID", "SHIPPED"]
    );
    // And the whole saga can be followed from the request: same correlation and trace,
    // each event caused by an earlier one
    let saga = api.events(&id).await;
    let mut seen_ids = vec!["req-happy-1".to_string()];
    for e in &saga {
        assert_eq!(e["correlationId"], "req-happy-1", "{e}");
        assert!(
            e["traceparent"]
                .as_str()
                .is_some_and(|t| t.contains(TRACE_ID)),
            "trace not propagated: {e}"
        );
        let cause = e["causationId"].as_str().unwrap_or("");
        if e["eventType"] != "OrderPlaced" {
            assert!(
                seen_ids.iter().any(|s| s == cause),
                "causationId {cause}: {e}"
            );
        }
        seen_ids.push(e["eventId"].as_str().unwrap().to_string());
    }
    // Shipping moves the quantity out of both stock and reserved
    assert_eq!(api.stock("WIDGET-001").await, (8, 0, 8));

    // When the shipment is dispatched and delivered
    let shipment = order["shipmentId"]
        .as_str()
        .expect("shipmentId")
        .to_string();
    let r = api.dispatch(&shipment).await;
    assert_eq!(r.status, 200, "dispatch: {}", r.text);
    let r = api.deliver(&shipment).await;
    assert_eq!(r.status, 200, "deliver: {}", r.text);

    // Then the order is DELIVERED and the saga is complete, in order, numbered 1..n
    let order = api.wait_status(&id, &["DELIVERED"], FLOW).await;
    let expected = happy_path_then(&["ShipmentDispatched", "ShipmentDelivered", "OrderDelivered"]);
    api.wait_events(&id, &expected, FLOW).await;
    let events = api.events(&id).await;
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().expect("sequence"))
        .collect();
    assert_eq!(sequences, (1..=expected.len() as u64).collect::<Vec<_>>());
    for e in &events {
        assert_eq!(e["aggregateId"], id.as_str(), "{e}");
        assert_eq!(e["region"], "a", "{e}");
        assert!(
            e["eventId"].is_string() && e["occurredAt"].is_string(),
            "{e}"
        );
    }
    assert_eq!(
        history_statuses(&order),
        ["PENDING", "CONFIRMED", "PAID", "SHIPPED", "DELIVERED"]
    );
    // One event is also readable on its own
    let first = events[0]["eventId"].as_str().unwrap();
    let one = api.http.get(&format!("/api/events/{first}")).await;
    assert_eq!(one.status, 200, "{}", one.text);
    assert_eq!(one.json["eventType"], "OrderPlaced");
    assert_eq!(api.stock("WIDGET-001").await, (8, 0, 8));
}

#[tokio::test]
async fn unavailable_products_are_refused_before_any_order_exists() {
    // Given one product with 1 on hand and another with plenty
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("SHORT-1", 500, 1).await;
    api.put_product("PLENTY-1", 700, 100).await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let before = redis_state::snapshot(&mut redis).await;

    // When an order asks for 2 of the short one and 3 of the other
    let r = api
        .place_order(&order_body(
            "c-1",
            &[("SHORT-1", 2), ("PLENTY-1", 3)],
            "tok_ok",
        ))
        .await;

    // Then 400 products_unavailable with the per-item availability of the seed
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error_code(), "products_unavailable", "{}", r.text);
    assert_eq!(r.json["all_available"], false);
    assert_eq!(
        r.json["items"],
        json!([
            {"product_id": "SHORT-1", "requested": 2, "available": 1, "is_available": false},
            {"product_id": "PLENTY-1", "requested": 3, "available": 100, "is_available": true}
        ])
    );

    // And no order, no event, no stock change exists
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "refused order");
    assert!(api.events_query("eventType=OrderPlaced").await.is_empty());
    assert_eq!(api.stock("SHORT-1").await, (1, 0, 1));
    assert_eq!(api.stock("PLENTY-1").await, (100, 0, 100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_beyond_stock_are_rejected() {
    // Given products with exactly 4 on hand
    let region = Region::start().await;
    let api = &region.api;
    let mut saw_rejection = false;

    // A burst of orders for all 4 units each: those that arrive before the first
    // reservation all pass the synchronous pre-check; the asynchronous reservation is
    // the authority, so exactly one of them fits. The race is real, so we try a few
    // fresh products until at least two orders got past the pre-check.
    for round in 0..5 {
        let sku = format!("LAST-{round}");
        api.put_product(&sku, 100, 4).await;

        // When 12 clients order the last 4 units at once
        let mut set = JoinSet::new();
        for i in 0..12 {
            let api = api.clone();
            let body = order_body(&format!("c-{i}"), &[(&sku, 4)], "tok_ok");
            set.spawn(async move { api.place_order(&body).await });
        }
        let mut accepted = Vec::new();
        while let Some(r) = set.join_next().await {
            let r = r.unwrap();
            match r.status {
                201 => accepted.push(r.json["orderId"].as_str().unwrap().to_string()),
                400 => assert_eq!(r.error_code(), "products_unavailable", "{}", r.text),
                other => panic!("unexpected answer {other}: {}", r.text),
            }
        }
        assert!(!accepted.is_empty(), "no order passed the pre-check");

        // Then exactly one accepted order ships; every other one is REJECTED with
        // OrderPlaced -> InventoryReservationFailed -> OrderRejected
        let mut shipped = 0;
        for id in &accepted {
            let order = api.wait_status(id, &["SHIPPED", "REJECTED"], FLOW).await;
            if order["status"] == "SHIPPED" {
                shipped += 1;
                api.wait_events(id, HAPPY_PATH_TO_SHIPPED, FLOW).await;
            } else {
                api.wait_events(
                    id,
                    &["OrderPlaced", "InventoryReservationFailed", "OrderRejected"],
                    FLOW,
                )
                .await;
            }
        }
        assert_eq!(shipped, 1, "orders {accepted:?}: {shipped} shipped");
        // And the stock is exactly used up, nothing left reserved
        assert_eq!(api.stock(&sku).await, (0, 0, 0));
        if accepted.len() > 1 {
            saw_rejection = true;
            break;
        }
    }
    assert!(
        saw_rejection,
        "in 5 rounds no two orders passed the pre-check: the reservation race was never exercised"
    );
}

#[tokio::test]
async fn payment_failure_releases_stock() {
    // Given a product with 10 on hand
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;

    // When an order for 3 is paid with a card that is declined
    let id = api
        .place_ok(&order_body("c-1", &[("WIDGET-001", 3)], "tok_decline"))
        .await;

    // Then the order ends PAYMENT_FAILED and its reservation is released
    let order = api.wait_status(&id, &["PAYMENT_FAILED"], FLOW).await;
    api.wait_events(&id, PAYMENT_FAILED_FLOW, FLOW).await;
    let failed = api
        .events(&id)
        .await
        .into_iter()
        .find(|e| e["eventType"] == "PaymentFailed")
        .unwrap();
    assert!(
        failed["payload"].to_string().contains("card_declined"),
        "PaymentFailed without reason card_declined: {failed}"
    );
    assert!(order["shipmentId"].is_null(), "{order}");
    assert_eq!(api.stock("WIDGET-001").await, (10, 0, 10));
}

#[tokio::test]
async fn flaky_payment_completes_after_a_retry() {
    // Given a product
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;

    // When the payment provider fails the first attempt and accepts the retry
    let id = api
        .place_ok(&order_body("c-1", &[("WIDGET-001", 1)], "tok_flaky"))
        .await;

    // Then the order ships with exactly the happy path: the failed attempt left no event
    api.wait_status(&id, &["SHIPPED"], FLOW).await;
    api.wait_events(&id, HAPPY_PATH_TO_SHIPPED, FLOW).await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    assert_eq!(
        redis_state::stream_event_types(&mut redis, &id).await,
        HAPPY_PATH_TO_SHIPPED
    );
    // And nothing was dead-lettered
    let dlq = api.dlq().await;
    assert_eq!(dlq.status, 200, "{}", dlq.text);
    assert_eq!(dlq.json["entries"], json!([]), "{}", dlq.text);
    assert_eq!(api.stock("WIDGET-001").await, (9, 0, 9));
}

/// Places a `tok_error` order and waits until its payment is dead-lettered; returns
/// the order id and its DLQ entry.
async fn order_stuck_in_dlq(api: &system_tests::Api, sku: &str, quantity: u64) -> (String, Value) {
    let id = api
        .place_ok(&order_body("c-err", &[(sku, quantity)], "tok_error"))
        .await;
    let entry = eventually(FLOW, "the payment lands in the DLQ", || async {
        let r = api.dlq().await;
        assert_eq!(r.status, 200, "{}", r.text);
        let entries = r.json["entries"].as_array().cloned().unwrap_or_default();
        entries
            .into_iter()
            .find(|e| e["event"]["aggregateId"] == id.as_str())
            .ok_or(r.json)
    })
    .await;
    (id, entry)
}

#[tokio::test]
async fn payment_error_ends_in_the_dead_letter_stream() {
    // Given a product
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;

    // When the payment provider errors on every attempt
    let (id, entry) = order_stuck_in_dlq(api, "WIDGET-001", 2).await;

    // Then the confirmation is parked in the DLQ after its retries, with the reason
    assert_eq!(entry["eventType"], "OrderConfirmed", "{entry}");
    assert!(entry["id"].is_string(), "{entry}");
    assert!(entry["group"].is_string(), "{entry}");
    assert_eq!(entry["eventId"], entry["event"]["eventId"], "{entry}");
    assert!(
        entry["attempts"].as_u64().is_some_and(|a| a >= 3),
        "3 tries expected: {entry}"
    );
    assert!(
        entry["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{entry}"
    );

    // And the order stays CONFIRMED with its stock reserved, no payment event written
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let order = api.order(&id).await;
    assert_eq!(order.json["status"], "CONFIRMED", "{}", order.text);
    assert_eq!(
        api.event_types(&id).await,
        ["OrderPlaced", "InventoryReserved", "OrderConfirmed"]
    );
    assert_eq!(api.stock("WIDGET-001").await, (10, 2, 8));

    // When the operator replays the entry while the provider still errors
    let entry_id = entry["id"].as_str().unwrap();
    let r = api.replay(entry_id).await;

    // Then the replay reports the failure, and the entry and the order stay as they were
    assert!(
        !(200..300).contains(&r.status) && r.status != 500,
        "replay of a still-failing entry: {} {}",
        r.status,
        r.text
    );
    let dlq = api.dlq().await.json;
    assert_eq!(dlq["entries"].as_array().map(Vec::len), Some(1), "{dlq}");
    assert_eq!(dlq["entries"][0]["id"], entry_id, "{dlq}");
    assert_eq!(api.order(&id).await.json["status"], "CONFIRMED");
    assert_eq!(
        api.event_types(&id).await,
        ["OrderPlaced", "InventoryReserved", "OrderConfirmed"]
    );

    // And replaying an entry that does not exist is a 404
    let r = api.replay("0-1").await;
    assert_eq!(r.status, 404, "{}", r.text);
    assert_eq!(r.error_code(), "not_found", "{}", r.text);
}

#[tokio::test]
async fn cancelling_a_confirmed_order_releases_stock() {
    // Given an order that stays CONFIRMED because its payment is dead-lettered
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;
    let (id, _) = order_stuck_in_dlq(api, "WIDGET-001", 4).await;
    assert_eq!(api.stock("WIDGET-001").await, (10, 4, 6));

    // When the client cancels it
    let r = api.cancel(&id).await;

    // Then it is CANCELLED, its stock released, and nothing is refunded
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "CANCELLED", "{}", r.text);
    api.wait_events(&id, CANCELLED_BEFORE_PAYMENT, FLOW).await;
    assert_eq!(api.stock("WIDGET-001").await, (10, 0, 10));
    assert_eq!(api.order(&id).await.json["status"], "CANCELLED");

    // And a second cancel is refused: CANCELLED is final
    let again = api.cancel(&id).await;
    assert_eq!(again.status, 409, "{}", again.text);
    assert_eq!(again.error_code(), "invalid_state");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letter_replay_takes_the_entry_once() {
    // Given a dead-lettered payment whose order was cancelled since
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;
    let (id, entry) = order_stuck_in_dlq(api, "WIDGET-001", 4).await;
    let entry_id = entry["id"].as_str().unwrap().to_string();
    assert_eq!(api.cancel(&id).await.status, 200);
    api.wait_events(&id, CANCELLED_BEFORE_PAYMENT, FLOW).await;

    // When operators replay the parked payment, eight times at once
    let mut set = JoinSet::new();
    for _ in 0..8 {
        let (api, entry_id) = (api.clone(), entry_id.clone());
        set.spawn(async move { api.replay(&entry_id).await });
    }
    let mut answers = Vec::new();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        answers.push((r.status, r.error_code().to_string()));
    }

    // Then one replay takes the entry (there is nothing to pay for any more), the others
    // find it gone; the DLQ is empty and its gauge back at 0, not below
    let taken = answers.iter().filter(|(s, _)| *s == 200).count();
    assert_eq!(taken, 1, "answers: {answers:?}");
    assert!(
        answers
            .iter()
            .all(|(s, c)| *s == 200 || (*s == 404 && c == "not_found")),
        "answers: {answers:?}"
    );
    assert_eq!(api.dlq().await.json["entries"], json!([]));
    eventually(FLOW, "dead-letter gauge back to 0", || async {
        let text = api.metrics().await;
        match metric_sum(&text, "tandem_node_dead_letters", &[]) {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert_eq!(api.order(&id).await.json["status"], "CANCELLED");
    assert_eq!(api.event_types(&id).await.len(), 5);
    assert_eq!(api.stock("WIDGET-001").await, (10, 0, 10));
}

/// Consumer-group name of the shipments module (also the `group` label of the node's
/// metrics and DLQ entries).
const SHIPMENTS_GROUP: &str = "shipments";

#[tokio::test]
async fn cancelling_a_paid_order_refunds_and_releases_stock() {
    // Given a node whose shipments module is stalled: its consumer group's position is
    // moved past any entry that will be written, so paid orders stay PAID (an order
    // is PAID only for the instant between OrderPaid and ShipmentCreated otherwise)
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 10).await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let resume_from = redis_state::groups_progress(&mut redis)
        .await
        .last_generated_id;
    let set_shipments_position = |id: String| {
        let mut redis = redis.clone();
        async move {
            let _: () = redis::cmd("XGROUP")
                .arg("SETID")
                .arg(redis_state::EVENTS)
                .arg(SHIPMENTS_GROUP)
                .arg(&id)
                .query_async(&mut redis)
                .await
                .unwrap_or_else(|e| panic!("XGROUP SETID {SHIPMENTS_GROUP} {id}: {e}"));
        }
    };
    set_shipments_position("99999999999999-0".into()).await;

    // And two paid orders, for 3 and for 2
    let cancelled = api
        .place_ok(&order_body("c-1", &[("WIDGET-001", 3)], "tok_ok"))
        .await;
    let kept = api
        .place_ok(&order_body("c-2", &[("WIDGET-001", 2)], "tok_ok"))
        .await;
    for id in [&cancelled, &kept] {
        api.wait_status(id, &["PAID"], FLOW).await;
    }
    assert_eq!(api.stock("WIDGET-001").await, (10, 5, 5));

    // When the client cancels the first one
    let r = api.cancel(&cancelled).await;

    // Then it is CANCELLED, refunded and its stock released
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["status"], "CANCELLED", "{}", r.text);
    let paid_then_cancelled = [
        "OrderPlaced",
        "InventoryReserved",
        "OrderConfirmed",
        "PaymentProcessed",
        "OrderPaid",
        "OrderCancelled",
    ];
    // Inventory and payments react to OrderCancelled independently: either order.
    let types = eventually(FLOW, "refund and release after the cancel", || async {
        let types = api.event_types(&cancelled).await;
        let mut tail: Vec<&str> = types.iter().skip(6).map(String::as_str).collect();
        tail.sort();
        if types.len() == 8 && tail == ["InventoryReleased", "PaymentRefunded"] {
            Ok(types)
        } else {
            Err(types)
        }
    })
    .await;
    assert_eq!(types[..6], paid_then_cancelled, "{types:?}");
    assert_eq!(api.stock("WIDGET-001").await, (10, 2, 8));

    // When the shipments module catches up
    set_shipments_position(resume_from).await;

    // Then only the kept order ships; the cancelled one never does
    api.wait_status(&kept, &["SHIPPED"], FLOW).await;
    api.wait_events(&kept, HAPPY_PATH_TO_SHIPPED, FLOW).await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let order = api.order(&cancelled).await.json;
    assert_eq!(order["status"], "CANCELLED", "{order}");
    assert!(order["shipmentId"].is_null(), "{order}");
    assert_eq!(api.event_types(&cancelled).await, types);
    assert_eq!(api.stock("WIDGET-001").await, (8, 0, 8));
}

#[tokio::test]
async fn cancelling_a_shipped_order_is_refused() {
    // Given a shipped order
    let region = Region::start().await;
    let api = &region.api;
    let id = api.shipped_order().await;

    // When the client tries to cancel it
    let r = api.cancel(&id).await;

    // Then 409 invalid_state and nothing changes
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "invalid_state", "{}", r.text);
    assert_eq!(api.order(&id).await.json["status"], "SHIPPED");
    assert_eq!(api.event_types(&id).await, HAPPY_PATH_TO_SHIPPED);
    assert_eq!(api.stock("WIDGET-001").await, (9, 0, 9));

    // And an unknown order is 404 not_found, for reads and for cancels
    let r = api.order("no-such-order").await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"), "{}", r.text);
    let r = api.cancel("no-such-order").await;
    assert_eq!((r.status, r.error_code()), (404, "not_found"), "{}", r.text);
}

//! Seed 003's saga timeout (API.md `NODE_SAGA_TIMEOUT_MS`): an order whose payment
//! keeps failing is not left CONFIRMED with its stock reserved forever. Once it has
//! been unpaid for the timeout it is cancelled (reason `saga_timeout`) and compensated
//! through the ordinary events, by whichever region is active when the deadline passes.

use std::time::{Duration, Instant};

use serde_json::Value;
use system_tests::api::{metric_sum, order_body, Api, CANCELLED_BEFORE_PAYMENT, FLOW};
use system_tests::gateway::{rfc3339_micros, Gateway, GatewayOptions, TwoRegions};
use system_tests::redis_state::{self, EVENTS, SAGA_CURSOR_GROUP};
use system_tests::{eventually, Region};

const SKU: &str = "SAGA-1";

/// The events of a `tok_error` order the saga timeout compensated: its payment was
/// dead-lettered, nothing was charged, so the stock is released and nothing refunded.
const TIMED_OUT: &[&str] = CANCELLED_BEFORE_PAYMENT;

/// Milliseconds from `earlier` to `later`, both RFC 3339 timestamps.
fn millis_between(earlier: &str, later: &str) -> i64 {
    let t = |s: &str| rfc3339_micros(s).unwrap_or_else(|| panic!("not RFC 3339: {s}"));
    (t(later) - t(earlier)) / 1000
}

fn event<'a>(events: &'a [Value], ty: &str) -> &'a Value {
    events
        .iter()
        .find(|e| e["eventType"] == ty)
        .unwrap_or_else(|| panic!("no {ty} among {events:?}"))
}

/// Waits until `order` has the events of a saga timeout's compensation; returns them,
/// its OrderCancelled checked to name the timeout as the reason.
async fn timed_out_events(api: &Api, order: &str) -> Vec<Value> {
    api.wait_events(order, TIMED_OUT, FLOW).await;
    let events = api.events(order).await;
    let cancelled = event(&events, "OrderCancelled");
    assert_eq!(
        cancelled["payload"]["reason"], "saga_timeout",
        "{cancelled}"
    );
    events
}

/// Places a `tok_error` order and waits until its payment is dead-lettered.
async fn stuck_order(api: &Api, dlq: &Api, quantity: u64) -> (String, Value) {
    let id = api
        .place_ok(&order_body("c-saga", &[(SKU, quantity)], "tok_error"))
        .await;
    let entry = eventually(FLOW, "the payment lands in the DLQ", || async {
        let r = dlq.dlq().await;
        let entries = r.json["entries"].as_array().cloned().unwrap_or_default();
        entries
            .into_iter()
            .find(|e| e["event"]["aggregateId"] == id.as_str())
            .ok_or(r.text)
    })
    .await;
    (id, entry)
}

fn saga_timeouts(metrics: &str) -> Option<f64> {
    metric_sum(metrics, "tandem_node_saga_timeouts_total", &[])
}

#[tokio::test]
async fn unpaid_order_is_cancelled_by_the_saga_timeout_and_its_stock_released() {
    // Given a node whose sagas time out after 3 s, and a product with 10 on hand
    const TIMEOUT_MS: i64 = 3000;
    let region = Region::start_with(Default::default(), |o| {
        o.env("NODE_SAGA_TIMEOUT_MS", TIMEOUT_MS)
    })
    .await;
    let api = &region.api;
    api.put_product(SKU, 1000, 10).await;
    assert_eq!(saga_timeouts(&api.metrics().await), Some(0.0));

    // When an order's payment errors on every attempt (it ends in the DLQ), while
    // another order of the same moment is paid normally
    let paid = api
        .place_ok(&order_body("c-ok", &[(SKU, 1)], "tok_ok"))
        .await;
    let (id, entry) = stuck_order(api, api, 2).await;

    // Then once its time is up it is CANCELLED, its stock released, nothing refunded
    let order = api.wait_status(&id, &["CANCELLED"], FLOW).await;
    let events = timed_out_events(api, &id).await;
    let cancelled = event(&events, "OrderCancelled");
    assert_eq!(
        cancelled["payload"]["previousStatus"], "CONFIRMED",
        "{cancelled}"
    );
    // And not before its deadline: the timeout counts from the placement
    let placed_at = event(&events, "OrderPlaced")["occurredAt"]
        .as_str()
        .unwrap();
    let cancelled_at = cancelled["occurredAt"].as_str().unwrap();
    let waited = millis_between(placed_at, cancelled_at);
    assert!(
        waited >= TIMEOUT_MS,
        "cancelled {waited} ms after it was placed"
    );
    let history: Vec<&str> = order["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["status"].as_str().unwrap())
        .collect();
    assert_eq!(history, ["PENDING", "CONFIRMED", "CANCELLED"], "{order}");
    api.wait_status(&paid, &["SHIPPED"], FLOW).await;
    assert_eq!(api.stock(SKU).await, (9, 0, 9));
    assert_eq!(saga_timeouts(&api.metrics().await), Some(1.0));

    // And the paid order was left alone
    assert!(
        !api.event_types(&paid)
            .await
            .contains(&"OrderCancelled".to_string()),
        "the paid order was cancelled"
    );

    // And the parked payment, replayed now, finds nothing to do (nothing is charged)
    let r = api.replay(entry["id"].as_str().unwrap()).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["outcome"], "nothing_to_do", "{}", r.text);

    // When the watch goes over the same orders again (its position set back to the
    // start, as if a failover had lost its latest copy)
    let mut redis = region.redis.client().await;
    let _: () = redis::cmd("XGROUP")
        .arg("SETID")
        .arg(EVENTS)
        .arg(SAGA_CURSOR_GROUP)
        .arg("0")
        .query_async(&mut redis)
        .await
        .expect("XGROUP SETID");
    let placed_entry = redis_state::events(&mut redis)
        .await
        .into_iter()
        .find(|(_, e)| e["aggregateId"] == id.as_str() && e["eventType"] == "OrderPlaced")
        .map(|(entry_id, _)| entry_id)
        .expect("the order's OrderPlaced entry");
    eventually(FLOW, "the watch passed the order again", || {
        let mut redis = redis.clone();
        let placed_entry = placed_entry.clone();
        async move {
            let groups: redis::streams::StreamInfoGroupsReply =
                redis::AsyncCommands::xinfo_groups(&mut redis, EVENTS)
                    .await
                    .expect("XINFO GROUPS");
            let at = groups
                .groups
                .iter()
                .find(|g| g.name == SAGA_CURSOR_GROUP)
                .map(|g| g.last_delivered_id.clone())
                .unwrap_or_default();
            if stream_id(&at) >= stream_id(&placed_entry) {
                Ok(())
            } else {
                Err(at)
            }
        }
    })
    .await;

    // Then nothing more happens: one cancellation, counted once
    assert_eq!(api.event_types(&id).await, TIMED_OUT);
    assert_eq!(saga_timeouts(&api.metrics().await), Some(1.0));
    assert_eq!(api.stock(SKU).await, (9, 0, 9));
}

fn stream_id(id: &str) -> (u64, u64) {
    let (ms, seq) = id.split_once('-').unwrap_or((id, "0"));
    (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn saga_timeout_is_enforced_by_the_new_active_when_region_a_dies() {
    // Given two replicated regions behind a gateway, a active, sagas timing out after
    // 10 s in both, and a product with 10 on hand
    const TIMEOUT_MS: i64 = 10_000;
    let mut regions = TwoRegions::start_with(true, |_| {
        vec![
            ("NODE_SAGA_TIMEOUT_MS".into(), TIMEOUT_MS.to_string()),
            ("NODE_RETRY_BASE_MS".into(), "50".into()),
        ]
    })
    .await;
    let gw = Gateway::start(GatewayOptions::new(&regions.regions())).await;
    gw.wait_active("a", 1, FLOW).await;
    gw.wait_healthy(&["a", "b"], FLOW).await;
    let api = gw.api();
    api.put_product(SKU, 1000, 10).await;

    // And an order placed in a whose payment is dead-lettered, copied to b
    let (a, b) = (regions.a.node.api(), regions.b.node.api());
    let placed = Instant::now();
    let (id, _) = stuck_order(&api, &a, 3).await;
    eventually(FLOW, "b holds the CONFIRMED order", || async {
        let r = b.order(&id).await;
        if r.json["status"] == "CONFIRMED" {
            Ok(())
        } else {
            Err(r.text)
        }
    })
    .await;

    // When region a dies (node and Redis) before the order's deadline
    let before_kill = a.order(&id).await;
    assert_eq!(
        before_kill.json["status"], "CONFIRMED",
        "the deadline passed before region a could be killed (machine too slow for this test): {}",
        before_kill.text
    );
    regions.a.node.kill();
    regions.a.redis.kill();
    let killed_after = placed.elapsed();

    // Then b takes over, and once the deadline has passed the order is CANCELLED there,
    // its stock released
    gw.wait_active("b", 2, FLOW).await;
    api.wait_status(
        &id,
        &["CANCELLED"],
        FLOW + Duration::from_millis(TIMEOUT_MS as u64),
    )
    .await;
    let events = timed_out_events(&api, &id).await;
    let cancelled = event(&events, "OrderCancelled");
    assert_eq!(cancelled["region"], "b", "{cancelled}");
    assert_eq!(cancelled["epoch"], 2, "{cancelled}");
    let waited = millis_between(
        event(&events, "OrderPlaced")["occurredAt"]
            .as_str()
            .unwrap(),
        cancelled["occurredAt"].as_str().unwrap(),
    );
    assert!(
        waited >= TIMEOUT_MS,
        "cancelled {waited} ms after it was placed"
    );
    eprintln!("[saga] region a killed {killed_after:?} after the order; b cancelled it {waited} ms after placement");
    assert_eq!(api.stock(SKU).await, (10, 0, 10));
    assert_eq!(saga_timeouts(&b.metrics().await), Some(1.0));
}

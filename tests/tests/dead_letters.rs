//! The dead-letter list as an operator uses it (issue 11): pages with a cursor, filters
//! by group and event type, and bulk replay of a filter; each replay is recorded as a
//! `DeadLetterReplayed` event (a replicated fact). Real Redis, real node.

use serde_json::{json, Value};
use system_tests::api::{metric_sum, order_body, FLOW};
use system_tests::redis_state::{self, DLQ, EVENTS};
use system_tests::{eventually, Api, Region};

const SKU: &str = "DLQ-1";
/// `tok_error` orders: each parks its payment (group `payments`, `OrderConfirmed`).
const STUCK: usize = 6;

/// A node with `STUCK` payments and two unreadable entries parked: one the inventory
/// group gave up on (`OrderPlaced`), one the orders group did (`ShipmentCreated`).
/// Returns the region, the stuck orders and every parked entry, oldest first.
async fn parked() -> (Region, Vec<String>, Vec<Value>) {
    // Saga timeouts off: the parked payments' orders must stay as they are however
    // long the test takes on a loaded machine.
    let region = Region::start_with(Default::default(), |o| o.env("NODE_SAGA_TIMEOUT_MS", 0)).await;
    let api = &region.api;
    api.put_product(SKU, 1000, 100).await;
    let mut orders = Vec::new();
    for i in 0..STUCK {
        let id = api
            .place_ok(&order_body(&format!("c-{i}"), &[(SKU, 1)], "tok_error"))
            .await;
        orders.push(id);
    }
    let mut redis = region.redis.client().await;
    for (ty, event) in [("OrderPlaced", "{broken"), ("ShipmentCreated", "not json")] {
        let _: String = redis::cmd("XADD")
            .arg(EVENTS)
            .arg("*")
            .arg("type")
            .arg(ty)
            .arg("event")
            .arg(event)
            .query_async(&mut redis)
            .await
            .expect("XADD");
    }
    let all = eventually(FLOW, "every entry parked", || async {
        let r = api.dlq().await;
        let entries = r.json["entries"].as_array().cloned().unwrap_or_default();
        if entries.len() == STUCK + 2 {
            Ok(entries)
        } else {
            Err(r.text)
        }
    })
    .await;
    (region, orders, all)
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["id"].as_str().expect("entry id").to_string())
        .collect()
}

/// `GET /admin/dlq?{query}`, asserting 200.
async fn list(api: &Api, query: &str) -> (Vec<Value>, Value) {
    let r = api.http.get(&format!("/admin/dlq?{query}")).await;
    assert_eq!(r.status, 200, "GET /admin/dlq?{query}: {}", r.text);
    let entries = r.json["entries"].as_array().cloned().expect("entries");
    (entries, r.json["next"].clone())
}

/// Follows `next` from the first page of `query` to the end.
async fn list_all(api: &Api, query: &str) -> (Vec<Value>, usize) {
    let (mut all, mut next) = list(api, query).await;
    let mut pages = 1;
    while let Some(after) = next.as_str().map(str::to_string) {
        let (more, n) = list(api, &format!("{query}&after={after}")).await;
        all.extend(more);
        next = n;
        pages += 1;
        assert!(pages < 100, "paging does not end");
    }
    (all, pages)
}

#[tokio::test]
async fn dead_letters_are_paged_with_a_cursor_and_filtered_by_group_and_type() {
    // Given six parked payments and two unreadable entries
    let (region, _, all) = parked().await;
    let api = &region.api;
    let groups: Vec<&str> = all.iter().map(|e| e["group"].as_str().unwrap()).collect();
    assert_eq!(groups.iter().filter(|g| **g == "payments").count(), STUCK);
    assert!(
        groups.contains(&"inventory") && groups.contains(&"orders"),
        "{groups:?}"
    );
    for e in &all {
        for field in ["id", "group", "entryId", "eventType", "error", "at"] {
            assert!(e[field].is_string(), "{field} missing: {e}");
        }
    }

    // When the operator lists the whole list without parameters (as before paging)
    let (whole, next) = list(api, "").await;
    // Then it is everything, and there is no next page
    assert_eq!(ids(&whole), ids(&all));
    assert_eq!(next, Value::Null);

    // When they page three at a time
    let (paged, pages) = list_all(api, "limit=3").await;
    // Then the pages hold every entry once, in order
    assert_eq!(ids(&paged), ids(&all));
    assert_eq!(pages, 3);

    // When they filter by group, by event type, or both
    let (payments, _) = list_all(api, "group=payments&limit=4").await;
    let (confirmed, _) = list_all(api, "eventType=OrderConfirmed").await;
    let (inventory, _) = list_all(api, "group=inventory").await;
    let (shipments, _) = list_all(api, "group=orders&eventType=ShipmentCreated").await;
    let (none, next) = list(api, "group=inventory&eventType=OrderConfirmed").await;

    // Then each holds exactly the matching entries
    assert_eq!(payments.len(), STUCK);
    assert!(payments
        .iter()
        .all(|e| e["group"] == "payments" && e["eventType"] == "OrderConfirmed"));
    assert_eq!(ids(&confirmed), ids(&payments));
    assert_eq!(inventory.len(), 1);
    assert_eq!(inventory[0]["eventType"], "OrderPlaced");
    assert_eq!(shipments.len(), 1);
    assert_eq!(shipments[0]["group"], "orders");
    assert!(none.is_empty());
    assert_eq!(next, Value::Null);

    // When the parameters make no sense
    for (query, field) in [
        ("group=billing", "group"),
        ("eventType=OrderTeleported", "eventType"),
        ("after=yesterday", "after"),
        ("limit=0", "limit"),
        ("limit=1001", "limit"),
        ("limit=many", "limit"),
    ] {
        let r = api.http.get(&format!("/admin/dlq?{query}")).await;
        // Then each is a 400 naming the parameter
        assert_eq!(r.status, 400, "{query}: {}", r.text);
        assert_eq!(r.error_code(), "validation_failed", "{query}: {}", r.text);
        assert_eq!(
            r.json["error"]["fields"],
            json!([field]),
            "{query}: {}",
            r.text
        );
    }
}

#[tokio::test]
async fn bulk_replay_of_a_filter_replays_each_entry_and_records_it() {
    // Given six parked payments, four of whose orders were cancelled since (their
    // payment has nothing left to do) and two still failing
    let (region, orders, all) = parked().await;
    let api = &region.api;
    let payments: Vec<&Value> = all.iter().filter(|e| e["group"] == "payments").collect();
    let order_of = |e: &Value| e["event"]["aggregateId"].as_str().unwrap().to_string();
    let still_failing = [order_of(payments[2]), order_of(payments[4])];
    for id in &orders {
        if !still_failing.contains(id) {
            let r = api.cancel(id).await;
            assert_eq!(r.status, 200, "{}", r.text);
        }
    }
    // (and the releases those cancellations cause are done)
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;

    // When the body makes no sense
    let before = redis_state::snapshot(&mut redis).await;
    let dlq_len = |mut c: redis::aio::MultiplexedConnection| async move {
        let n: u64 = redis::cmd("XLEN")
            .arg(DLQ)
            .query_async(&mut c)
            .await
            .unwrap();
        n
    };
    let dlq_before = dlq_len(redis.clone()).await;
    for (body, code, fields) in [
        (json!([]), "validation_failed", json!(null)),
        (json!({"limit": 0}), "validation_failed", json!(["limit"])),
        (json!({"group": 5}), "validation_failed", json!(["group"])),
        (
            json!({"group": "billing", "eventType": "X", "after": "-"}),
            "validation_failed",
            json!(["group", "eventType", "after"]),
        ),
    ] {
        let r = api.http.post("/admin/dlq/replay", &body).await;
        // Then it is a 400 naming what is wrong, and nothing is written
        assert_eq!(r.status, 400, "{body}: {}", r.text);
        assert_eq!(r.error_code(), code, "{body}: {}", r.text);
        if !fields.is_null() {
            assert_eq!(r.json["error"]["fields"], fields, "{body}: {}", r.text);
        }
    }
    let r = api
        .http
        .post_raw("/admin/dlq/replay", b"{not json".to_vec())
        .await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error_code(), "malformed_json", "{}", r.text);
    redis_state::assert_unchanged(
        &before,
        &redis_state::snapshot(&mut redis).await,
        "rejected bulk replays",
    );
    assert_eq!(dlq_len(redis.clone()).await, dlq_before);

    // When the operator replays the payments two at a time
    let first = api
        .http
        .post(
            "/admin/dlq/replay",
            &json!({"group": "payments", "limit": 2}),
        )
        .await;

    // Then the two oldest are replayed (nothing left to pay for), and a cursor continues
    assert_eq!(first.status, 200, "{}", first.text);
    assert_eq!(first.json["replayed"], 2, "{}", first.text);
    assert_eq!(first.json["failed"], 0, "{}", first.text);
    let first_ids: Vec<&str> = first.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        first_ids,
        [
            payments[0]["id"].as_str().unwrap(),
            payments[1]["id"].as_str().unwrap()
        ]
    );
    assert!(first.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .all(|r| r["outcome"] == "nothing_to_do" && r["group"] == "payments"));
    assert!(first.json["next"].is_string(), "{}", first.text);

    // When they replay the rest of the filter
    let rest = api
        .http
        .post("/admin/dlq/replay", &json!({"group": "payments"}))
        .await;

    // Then the two whose payment still fails are reported and stay listed; the others
    // are replayed; the unreadable entries of other groups were not touched
    assert_eq!(rest.status, 200, "{}", rest.text);
    assert_eq!(rest.json["replayed"], 2, "{}", rest.text);
    assert_eq!(rest.json["failed"], 2, "{}", rest.text);
    assert_eq!(rest.json["next"], Value::Null, "{}", rest.text);
    let failed: Vec<&Value> = rest.json["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r.get("error").is_some())
        .collect();
    assert!(failed.iter().all(|r| r["error"]["code"] == "replay_failed"));
    let (left, _) = list(api, "group=payments").await;
    let left_orders: Vec<String> = left.iter().map(order_of).collect();
    assert_eq!(left_orders, still_failing);
    let (everything, _) = list(api, "").await;
    assert_eq!(everything.len(), 4);

    // And each replay is an event in the log: four DeadLetterReplayed, one per entry
    let replayed = api.events_query("eventType=DeadLetterReplayed").await;
    let mut marked: Vec<&str> = replayed
        .iter()
        .map(|e| e["payload"]["dlqId"].as_str().unwrap())
        .collect();
    marked.sort();
    let mut expected: Vec<&str> = [0, 1, 3, 5]
        .iter()
        .map(|i| payments[*i]["id"].as_str().unwrap())
        .collect();
    expected.sort();
    assert_eq!(marked, expected);

    // And the dead-letter gauge counts what is left
    eventually(FLOW, "dead-letter gauge: two payments left", || async {
        let text = api.metrics().await;
        match metric_sum(&text, "tandem_node_dead_letters", &[("group", "payments")]) {
            Some(2.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;

    // And replaying past the last failing entry finds nothing
    let last = left.last().unwrap()["id"].as_str().unwrap();
    let none = api
        .http
        .post(
            "/admin/dlq/replay",
            &json!({"group": "payments", "after": last}),
        )
        .await;
    assert_eq!(none.status, 200, "{}", none.text);
    assert_eq!(none.json["replayed"], 0);
    assert_eq!(none.json["failed"], 0);
    assert_eq!(none.json["results"], json!([]));
}

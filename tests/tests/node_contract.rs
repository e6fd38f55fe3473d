//! The node's contract at its edges: input validation, idempotency keys, roles and
//! epochs, admin auth, metrics and shutdown.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use system_tests::api::{metric_sum, order_body, FLOW, HAPPY_PATH_TO_SHIPPED};
use system_tests::redis_state;
use system_tests::{HttpClient, Region};
use tokio::task::JoinSet;

/// A node with WIDGET-001 (50 in stock) and an idle workflow, a connection to its
/// Redis, and a snapshot of that Redis: what every refusal must leave unchanged.
async fn idle_region_with_a_widget() -> (Region, MultiplexedConnection, redis_state::Snapshot) {
    let region = Region::start().await;
    region.api.put_product("WIDGET-001", 1000, 50).await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let before = redis_state::snapshot(&mut redis).await;
    (region, redis, before)
}

#[tokio::test]
async fn bad_order_inputs_are_refused_without_writing() {
    // Given a node with one product and an idle workflow
    let (region, mut redis, before) = idle_region_with_a_widget().await;
    let api = &region.api;

    let valid = order_body("c-1", &[("WIDGET-001", 1)], "tok_ok");
    let with = |pointer: &str, value: Value| {
        let mut body = valid.clone();
        *body.pointer_mut(pointer).unwrap() = value;
        serde_json::to_vec(&body).unwrap()
    };
    let without = |field: &str| {
        let mut body = valid.clone();
        body.as_object_mut().unwrap().remove(field);
        serde_json::to_vec(&body).unwrap()
    };
    let items = |n: usize| {
        let list: Vec<Value> = (0..n)
            .map(|_| json!({"sku": "WIDGET-001", "quantity": 1}))
            .collect();
        with("/items", Value::Array(list))
    };
    let mut huge = valid.clone();
    huge["shippingAddress"] = json!("x".repeat((1 << 20) + 1024));

    // (case, body, status, code, a field that must be named)
    type Case<'a> = (&'a str, Vec<u8>, u16, &'a str, Option<&'a str>);
    let cases: Vec<Case> = vec![
        (
            "body over 1 MiB",
            serde_json::to_vec(&huge).unwrap(),
            413,
            "payload_too_large",
            None,
        ),
        (
            "malformed JSON",
            br#"{"customerId": "c-1", "items": ["#.to_vec(),
            400,
            "malformed_json",
            None,
        ),
        (
            "quantity is a string",
            with("/items/0/quantity", json!("two")),
            400,
            "validation_failed",
            Some("items[0].quantity"),
        ),
        (
            "customerId is a number",
            with("/customerId", json!(5)),
            400,
            "validation_failed",
            Some("customerId"),
        ),
        (
            "no items",
            items(0),
            400,
            "validation_failed",
            Some("items"),
        ),
        (
            "101 items",
            items(101),
            400,
            "validation_failed",
            Some("items"),
        ),
        (
            "quantity 0",
            with("/items/0/quantity", json!(0)),
            400,
            "validation_failed",
            Some("items[0].quantity"),
        ),
        (
            "quantity 10001",
            with("/items/0/quantity", json!(10001)),
            400,
            "validation_failed",
            Some("items[0].quantity"),
        ),
        (
            "unknown SKU",
            with("/items/0/sku", json!("NO-SUCH-SKU")),
            400,
            "unknown_sku",
            None,
        ),
        (
            "missing customerId",
            without("customerId"),
            400,
            "validation_failed",
            Some("customerId"),
        ),
        (
            "missing items",
            without("items"),
            400,
            "validation_failed",
            Some("items"),
        ),
    ];

    let mut failures = Vec::new();
    for (case, body, status, code, field) in cases {
        // When the client posts it
        let r = api
            .http
            .try_request(reqwest::Method::POST, "/orders", Some(body), &[])
            .await;

        // Then it gets the status and stable code, naming the bad field
        match r {
            Err(e) => failures.push(format!("{case}: transport error {e}")),
            Ok(r) => {
                if r.status != status || r.error_code() != code {
                    failures.push(format!(
                        "{case}: expected {status} {code}, got {} {}",
                        r.status,
                        truncate(&r.text)
                    ));
                }
                if let Some(field) = field {
                    let named = r.json["error"]["fields"]
                        .as_array()
                        .is_some_and(|f| f.iter().any(|x| x == field));
                    if !named {
                        failures.push(format!(
                            "{case}: error.fields should name {field:?}: {}",
                            truncate(&r.text)
                        ));
                    }
                }
                if r.json["error"]["message"]
                    .as_str()
                    .is_none_or(str::is_empty)
                {
                    failures.push(format!("{case}: no error.message: {}", truncate(&r.text)));
                }
            }
        }
        // And nothing was written: no key, no stream entry, no state change
        let after = redis_state::snapshot(&mut redis).await;
        if after != before {
            failures.push(format!(
                "{case}: Redis changed (events {} -> {}, keys {} -> {})",
                before.events_len,
                after.events_len,
                before.keys.len(),
                after.keys.len()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The node is still healthy after all of it
    let ok = api.place_order(&valid).await;
    assert_eq!(ok.status, 201, "{}", ok.text);
}

fn truncate(s: &str) -> String {
    s.chars().take(300).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idempotency_key_returns_the_first_order() {
    // Given a product
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("WIDGET-001", 1000, 100).await;
    let body = order_body("c-1", &[("WIDGET-001", 2)], "tok_ok");

    // When the same key and body are posted twice
    let first = api.place_order_with_key(&body, "key-1").await;
    let second = api.place_order_with_key(&body, "key-1").await;

    // Then both answers are 201 with the same order
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(second.status, 201, "{}", second.text);
    let id = first.json["orderId"].as_str().unwrap().to_string();
    assert_eq!(second.json["orderId"], id.as_str(), "{}", second.text);

    // When the key is reused with another body
    let other = order_body("c-1", &[("WIDGET-001", 3)], "tok_ok");
    let reused = api.place_order_with_key(&other, "key-1").await;

    // Then 409 idempotency_key_reused
    assert_eq!(reused.status, 409, "{}", reused.text);
    assert_eq!(reused.error_code(), "idempotency_key_reused");

    // When eight clients race with one new key
    let mut set = JoinSet::new();
    let racing = order_body("c-2", &[("WIDGET-001", 1)], "tok_ok");
    for _ in 0..8 {
        let (api, racing) = (api.clone(), racing.clone());
        // A request that finds the key's first request still in progress may be told
        // to retry (409 idempotency_key_in_use); a client does exactly that.
        set.spawn(async move {
            let deadline = std::time::Instant::now() + FLOW;
            loop {
                let r = api.place_order_with_key(&racing, "key-race").await;
                let in_use = r.status == 409 && r.error_code() == "idempotency_key_in_use";
                if !in_use || std::time::Instant::now() > deadline {
                    return r;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
    }
    let mut raced = std::collections::BTreeSet::new();
    while let Some(r) = set.join_next().await {
        let r = r.unwrap();
        assert_eq!(r.status, 201, "{}", r.text);
        raced.insert(r.json["orderId"].as_str().unwrap().to_string());
    }

    // Then they all got one and the same order
    assert_eq!(raced.len(), 1, "{raced:?}");
    let raced_id = raced.into_iter().next().unwrap();

    // And exactly two orders exist: one OrderPlaced each, both ship, stock for 3 used
    let placed = api.events_query("eventType=OrderPlaced").await;
    let mut placed_ids: Vec<&str> = placed
        .iter()
        .map(|e| e["aggregateId"].as_str().unwrap())
        .collect();
    placed_ids.sort();
    let mut expected = vec![id.as_str(), raced_id.as_str()];
    expected.sort();
    assert_eq!(placed_ids, expected);
    for id in [&id, &raced_id] {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
        api.wait_events(id, HAPPY_PATH_TO_SHIPPED, FLOW).await;
    }
    assert_eq!(api.stock("WIDGET-001").await, (97, 0, 97));

    // And the first answer is still returned after the order moved on
    let later = api.place_order_with_key(&body, "key-1").await;
    assert_eq!(later.status, 201, "{}", later.text);
    assert_eq!(later.json["orderId"], id.as_str());
}

#[tokio::test]
async fn standby_refuses_writes_until_promoted() {
    // Given a node that starts as standby on an empty Redis
    let region = Region::start_with(Default::default(), |o| o.role("standby")).await;
    let api = &region.api;
    let role = api.role().await;
    assert_eq!(role.status, 200, "{}", role.text);
    assert_eq!(role.json["role"], "standby", "{}", role.text);
    assert_eq!(role.json["region"], "a", "{}", role.text);
    let epoch = role.json["epoch"].as_u64().expect("epoch");
    let mut redis = region.redis.client().await;
    let before = redis_state::snapshot(&mut redis).await;

    // When a client writes an order and a product
    let order = api
        .place_order(&order_body("c-1", &[("WIDGET-001", 1)], "tok_ok"))
        .await;
    let product = api
        .http
        .put(
            "/api/v1/products/WIDGET-001",
            &json!({"name": "Widget", "price": 1000, "currency": "USD", "stock": 10}),
        )
        .await;

    // Then both are refused with 503 region_not_active and nothing is written
    assert_eq!(order.status, 503, "{}", order.text);
    assert_eq!(order.error_code(), "region_not_active", "{}", order.text);
    assert_eq!(product.status, 503, "{}", product.text);
    assert_eq!(
        product.error_code(),
        "region_not_active",
        "{}",
        product.text
    );
    assert_eq!(order.header("x-region"), Some("a"));
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "writes on a standby");

    // When an operator promotes it at a higher epoch (two up, so that a lower one
    // that is still a valid epoch number exists below it)
    let promoted_to = epoch + 2;
    let promoted = api.promote(promoted_to).await;
    assert_eq!(promoted.status, 200, "{}", promoted.text);
    let role = api.role().await;
    assert_eq!(role.json["role"], "active", "{}", role.text);
    assert_eq!(role.json["epoch"], promoted_to, "{}", role.text);

    // Then writes work and the workflow runs, stamped with the new epoch
    let id = api.shipped_order().await;
    for e in api.events(&id).await {
        assert_eq!(e["epoch"], promoted_to, "{e}");
    }

    // And a promotion or demotion at a lower epoch is refused as stale
    let stale = api.promote(promoted_to - 1).await;
    assert_eq!(stale.status, 409, "{}", stale.text);
    assert_eq!(stale.error_code(), "stale_epoch", "{}", stale.text);
    let stale = api.demote(promoted_to - 1).await;
    assert_eq!(stale.status, 409, "{}", stale.text);
    assert_eq!(stale.error_code(), "stale_epoch", "{}", stale.text);
    let role = api.role().await;
    assert_eq!(
        (role.json["role"].as_str(), role.json["epoch"].as_u64()),
        (Some("active"), Some(promoted_to))
    );
}

#[tokio::test]
async fn admin_endpoints_require_the_token() {
    // Given a node with an admin token
    let region = Region::start().await;
    let anonymous = HttpClient::new(region.node.url());
    let wrong = HttpClient::new(region.node.url()).with_token("wrong-token");

    // When admin endpoints are called without it or with a wrong one
    for (who, http) in [("no token", &anonymous), ("wrong token", &wrong)] {
        for r in [
            http.get("/admin/dlq").await,
            http.get("/admin/role").await,
            http.post("/admin/promote", &json!({"epoch": 99})).await,
            http.post_empty("/admin/rebuild").await,
        ] {
            // Then 401 unauthorized
            assert_eq!(r.status, 401, "{who}: {}", r.text);
            assert_eq!(r.error_code(), "unauthorized", "{who}: {}", r.text);
        }
    }
    // And the refused promotion changed nothing
    let role = region.api.role().await;
    assert_eq!(role.status, 200, "{}", role.text);
    assert_ne!(role.json["epoch"], 99);
    assert_eq!(region.api.dlq().await.status, 200);

    // And without NODE_ADMIN_TOKEN, admin is open to loopback callers
    let open = Region::start_with(Default::default(), |o| o.admin_token(None)).await;
    let r = HttpClient::new(open.node.url()).get("/admin/role").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["role"], "active", "{}", r.text);
}

#[tokio::test]
async fn metrics_count_requests_events_and_orders() {
    // Given a node that shipped one order and refused one bad request
    let region = Region::start().await;
    let api = &region.api;
    api.shipped_order().await;
    let bad = api.http.post_raw("/orders", b"{".to_vec()).await;
    assert_eq!(bad.status, 400);
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;

    // When Prometheus scrapes it
    let text = api.metrics().await;

    // Then requests, appended and handled events, and orders by status are counted
    let at_least = |metric: &str, labels: &[(&str, &str)], min: f64| {
        let v = metric_sum(&text, metric, labels);
        assert!(
            v.is_some_and(|v| v >= min),
            "{metric}{labels:?} = {v:?}, expected >= {min}\n{text}"
        );
    };
    at_least(
        "tandem_node_http_requests_total",
        &[("method", "POST"), ("status", "201")],
        1.0,
    );
    at_least(
        "tandem_node_http_requests_total",
        &[("method", "POST"), ("status", "400")],
        1.0,
    );
    for event_type in HAPPY_PATH_TO_SHIPPED {
        at_least(
            "tandem_node_events_appended_total",
            &[("event_type", event_type)],
            1.0,
        );
    }
    at_least(
        "tandem_node_events_handled_total",
        &[("event_type", "OrderPlaced")],
        1.0,
    );
    at_least("tandem_node_handler_duration_seconds_count", &[], 1.0);
    assert!(
        text.contains("tandem_node_dead_letters"),
        "tandem_node_dead_letters missing:\n{text}"
    );
    // And the gauges read from Redis (refreshed periodically) show the shipped order
    system_tests::eventually(FLOW, "gauges: one SHIPPED order, active role", || async {
        let text = api.metrics().await;
        let seen = (
            metric_sum(&text, "tandem_node_orders", &[("status", "SHIPPED")]),
            metric_sum(&text, "tandem_node_orders", &[("status", "PENDING")]),
            metric_sum(&text, "tandem_node_role", &[("role", "active")]),
            metric_sum(&text, "tandem_node_epoch", &[]),
            // Every group has caught up, so the lag summed over groups is 0.
            metric_sum(&text, "tandem_node_consumer_lag", &[]),
        );
        match seen {
            (Some(1.0), Some(0.0), Some(1.0), Some(e), Some(0.0)) if e >= 1.0 => Ok(()),
            _ => Err(seen),
        }
    })
    .await;
}

#[tokio::test]
async fn sigterm_stops_the_node_cleanly() {
    // Given a node that has served traffic
    let mut region = Region::start().await;
    region.api.shipped_order().await;

    // When it receives SIGTERM
    let started = std::time::Instant::now();
    let status = region.node.terminate(Duration::from_secs(5)).await;

    // Then it exits 0 within a few seconds and stops listening
    assert_eq!(status.code(), Some(0), "exit status {status}");
    assert!(started.elapsed() < Duration::from_secs(5));
    let gone = region
        .api
        .http
        .try_request(reqwest::Method::GET, "/health/live", None, &[])
        .await;
    assert!(gone.is_err(), "still answering after exit: {gone:?}");
}

#[tokio::test]
async fn role_stored_in_redis_wins_over_node_role() {
    // Given a Redis whose role was seeded active by a first node
    let redis = system_tests::RedisServer::start().await;
    let mut first = system_tests::Node::start(system_tests::NodeOptions::new(redis.url())).await;
    first.wait_ready().await;
    let seeded = system_tests::Api::new(first.http()).role().await.json;
    assert_eq!(seeded["role"], "active", "{seeded}");
    first.kill();

    // When a node starts on it with NODE_ROLE=standby
    let second =
        system_tests::Node::start(system_tests::NodeOptions::new(redis.url()).role("standby"))
            .await;
    second.wait_ready().await;
    let api = system_tests::Api::new(second.http());

    // Then the stored role and epoch stand, and it takes writes
    let role = api.role().await.json;
    assert_eq!(role["role"], "active", "{role}");
    assert_eq!(role["epoch"], seeded["epoch"], "{role}");
    api.shipped_order().await;
}

#[tokio::test]
async fn bad_product_inputs_are_refused_without_writing() {
    // Given a node with one product
    let (region, mut redis, before) = idle_region_with_a_widget().await;
    let api = &region.api;

    let good = json!({"name": "Widget", "price": 1000, "currency": "USD", "stock": 10});
    let with = |field: &str, value: Value| {
        let mut body = good.clone();
        body[field] = value;
        serde_json::to_vec(&body).unwrap()
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("malformed JSON", b"{\"name\":".to_vec(), "malformed_json"),
        (
            "negative stock",
            with("stock", json!(-1)),
            "validation_failed",
        ),
        (
            "price as text",
            with("price", json!("ten")),
            "validation_failed",
        ),
        (
            "stock as float",
            with("stock", json!(1.5)),
            "validation_failed",
        ),
    ];
    let mut failures = Vec::new();
    for (case, body, code) in cases {
        // When the client puts it
        let r = api
            .http
            .request(
                reqwest::Method::PUT,
                "/api/v1/products/WIDGET-002",
                Some(body),
                &[],
            )
            .await;
        // Then 400 with the stable code, and nothing was written
        if r.status != 400 || r.error_code() != code {
            failures.push(format!(
                "{case}: expected 400 {code}, got {} {}",
                r.status,
                truncate(&r.text)
            ));
        }
        if redis_state::snapshot(&mut redis).await != before {
            failures.push(format!("{case}: Redis changed"));
        }
    }
    // And availability checks of bad shape are refused the same way
    let r = api
        .http
        .post(
            "/api/v1/products/check-availability",
            &json!({"items": [{"product_id": "WIDGET-001", "quantity": 0}]}),
        )
        .await;
    if r.status != 400 || r.error_code() != "validation_failed" {
        failures.push(format!(
            "check-availability quantity 0: {} {}",
            r.status,
            truncate(&r.text)
        ));
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    assert_eq!(api.product("WIDGET-001").await["stock"], 50);
    let missing = api.http.get("/api/v1/products/WIDGET-002").await;
    assert_eq!((missing.status, missing.error_code()), (404, "not_found"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_flow_loses_no_order() {
    // Given a node with 30 orders just accepted and still in flight
    let redis = system_tests::RedisServer::start().await;
    let options = system_tests::NodeOptions::new(redis.url()).env("NODE_RECLAIM_IDLE_MS", 1000);
    let mut first = system_tests::Node::start(options.clone()).await;
    first.wait_ready().await;
    let api = system_tests::Api::new(first.http());
    api.put_product("WIDGET-001", 100, 1_000).await;
    let ids = api.place_concurrently("WIDGET-001", 30).await;

    // When it receives SIGTERM
    let status = first.terminate(Duration::from_secs(12)).await;

    // Then it exits 0, and a node started afterwards finishes every order exactly once
    assert_eq!(status.code(), Some(0), "exit status {status}");
    let second = system_tests::Node::start(options).await;
    second.wait_ready().await;
    let api = system_tests::Api::new(second.http());
    for id in &ids {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    let mut conn = redis.client().await;
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    for id in &ids {
        assert_eq!(
            redis_state::stream_event_types(&mut conn, id).await,
            HAPPY_PATH_TO_SHIPPED,
            "order {id}"
        );
    }
    assert_eq!(api.stock("WIDGET-001").await, (970, 0, 970));
}

#[tokio::test]
async fn logs_are_json_lines_on_request() {
    // Given a node started with LOG_FORMAT=json
    let region = Region::start_with(Default::default(), |o| o.env("LOG_FORMAT", "json")).await;

    // When it serves a little traffic
    region.api.put_product("WIDGET-001", 1000, 10).await;

    // Then every line it logged is one JSON object with a level and a message
    let tail = region.node.log_tail(200);
    let lines: Vec<&str> = tail.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty(), "no log lines");
    for line in lines {
        let v: Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string(), "no level: {line}");
        assert!(
            v["message"].is_string() || v["fields"]["message"].is_string(),
            "no message: {line}"
        );
    }
}

#[tokio::test]
async fn the_event_store_pages_oldest_first_with_a_cursor() {
    // Given a shipped order (7 events) and its product (1 event)
    let region = Region::start().await;
    let api = &region.api;
    api.shipped_order().await;

    // When a client reads the whole store two events at a time, following `next`
    let mut seen: Vec<Value> = Vec::new();
    let mut after = String::new();
    for _ in 0..20 {
        let r = api
            .http
            .get(&format!("/api/events?limit=2&after={after}"))
            .await;
        assert_eq!(r.status, 200, "{}", r.text);
        let page = r.json["events"].as_array().cloned().unwrap_or_default();
        assert!(page.len() <= 2, "{}", r.text);
        seen.extend(page);
        match r.json["next"].as_str() {
            Some(next) => after = next.to_string(),
            None => break,
        }
    }

    // Then it gets every event once, oldest first: the product, then the order's saga
    let types: Vec<&str> = seen
        .iter()
        .map(|e| e["eventType"].as_str().unwrap())
        .collect();
    let mut expected = vec!["ProductUpserted"];
    expected.extend(HAPPY_PATH_TO_SHIPPED);
    assert_eq!(types, expected);
    let ids: Vec<&str> = seen
        .iter()
        .map(|e| e["streamId"].as_str().unwrap())
        .collect();
    assert!(
        ids.windows(2).all(|w| w[0] < w[1]),
        "not oldest first: {ids:?}"
    );

    // And a cursor that is not one is refused
    let bad = api.http.get("/api/events?after=yesterday").await;
    assert_eq!(bad.status, 400, "{}", bad.text);
    assert_eq!(bad.error_code(), "validation_failed", "{}", bad.text);
}

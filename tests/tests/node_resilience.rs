//! The node under duress: redelivered events, a node killed mid-flow, two nodes sharing
//! one Redis, a Redis restart under a running node, and rebuilding state from events.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use redis::AsyncCommands;
use serde_json::Value;
use system_tests::api::{metric_sum, order_body, FLOW, HAPPY_PATH_TO_SHIPPED, PAYMENT_FAILED_FLOW};
use system_tests::redis_state::{self, diff_dumps, DERIVED_PATTERNS, EVENTS};
use system_tests::{Api, Node, NodeOptions, RedisServer, Region};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

/// Raw stream events grouped by aggregate: aggregateId -> event types, oldest first.
async fn stream_types_by_aggregate(
    redis: &mut redis::aio::MultiplexedConnection,
) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (_, e) in redis_state::events(redis).await {
        out.entry(e["aggregateId"].as_str().unwrap_or("?").to_string())
            .or_default()
            .push(e["eventType"].as_str().unwrap_or("?").to_string());
    }
    out
}

#[tokio::test]
async fn redelivered_events_have_no_second_effect() {
    // Given a shipped order and an idle workflow
    let region = Region::start().await;
    let api = &region.api;
    let id = api.shipped_order().await;
    let mut redis = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;
    let order_before = api.order(&id).await.json;
    let stock_before = api.stock("WIDGET-001").await;

    // When the order's OrderPlaced, OrderConfirmed and OrderPaid entries are delivered
    // again (appended anew with their exact fields, as a replay or a copy would)
    let mut copied = Vec::new();
    for (_, fields) in redis_state::stream_entries(&mut redis, EVENTS).await {
        let event = fields.iter().find(|(f, _)| f == "event").unwrap();
        let envelope: Value = serde_json::from_slice(&event.1).unwrap();
        let kind = envelope["eventType"].as_str().unwrap().to_string();
        if envelope["aggregateId"] == id.as_str()
            && ["OrderPlaced", "OrderConfirmed", "OrderPaid"].contains(&kind.as_str())
        {
            let pairs: Vec<(String, Vec<u8>)> = fields.clone();
            let _: String = redis.xadd(EVENTS, "*", &pairs).await.unwrap();
            copied.push(kind);
        }
    }
    assert_eq!(copied, ["OrderPlaced", "OrderConfirmed", "OrderPaid"]);
    redis_state::wait_workflow_idle(&mut redis, FLOW).await;

    // Then no handler acted twice: the stream holds only our copies beyond the saga
    let mut expected: Vec<String> = HAPPY_PATH_TO_SHIPPED
        .iter()
        .map(|s| s.to_string())
        .collect();
    expected.extend(copied.iter().cloned());
    assert_eq!(
        redis_state::stream_event_types(&mut redis, &id).await,
        expected
    );
    // And the order, the stock and the DLQ are as before
    let order_after = api.order(&id).await.json;
    assert_eq!(order_after["status"], "SHIPPED");
    assert_eq!(order_after["version"], order_before["version"]);
    assert_eq!(order_after["history"], order_before["history"]);
    assert_eq!(api.stock("WIDGET-001").await, stock_before);
    assert_eq!(api.dlq().await.json["entries"], serde_json::json!([]));
    // And the event store still lists each event once
    assert_eq!(api.event_types(&id).await, HAPPY_PATH_TO_SHIPPED);
}

/// What placing one order produced: its id when acknowledged, else the failure.
type Placed = Result<String, String>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_complete_after_a_node_is_killed_mid_flow() {
    // Given a node that reclaims a dead consumer's entries after 1 s
    let redis = RedisServer::start().await;
    let options = NodeOptions::new(redis.url()).env("NODE_RECLAIM_IDLE_MS", 1000);
    let mut first = Node::start(options.clone()).await;
    first.wait_ready().await;
    let api = Api::new(first.http());
    for sku in ["SKU-A", "SKU-B", "SKU-C"] {
        api.put_product(sku, 100, 100_000).await;
    }
    let mut conn = redis.client().await;

    // When 80 orders are being placed and the node is SIGKILLed after 40 answers
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Placed>();
    let mut set = JoinSet::new();
    let gate = Arc::new(Semaphore::new(16));
    for i in 0..80u64 {
        let (api, tx, gate) = (api.clone(), tx.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let sku = ["SKU-A", "SKU-B", "SKU-C"][(i % 3) as usize];
            let body = order_body(&format!("c-{i}"), &[(sku, i % 4 + 1)], "tok_ok");
            let r = api
                .http
                .try_request(
                    reqwest::Method::POST,
                    "/orders",
                    Some(serde_json::to_vec(&body).unwrap()),
                    &[],
                )
                .await;
            let placed = match r {
                Ok(r) if r.status == 201 => Ok(r.json["orderId"].as_str().unwrap().to_string()),
                Ok(r) => Err(format!("{} {}", r.status, r.text)),
                Err(e) => Err(e.to_string()),
            };
            let _ = tx.send(placed);
        });
    }
    drop(tx);
    let mut acknowledged = Vec::new();
    while let Some(placed) = rx.recv().await {
        if let Ok(id) = placed {
            acknowledged.push(id);
            if acknowledged.len() == 40 {
                first.kill();
                break;
            }
        }
    }
    while let Some(placed) = rx.recv().await {
        if let Ok(id) = placed {
            acknowledged.push(id);
        }
    }
    while set.join_next().await.is_some() {}
    let at_kill = stream_types_by_aggregate(&mut conn).await;
    let unfinished = at_kill
        .iter()
        .filter(|(_, t)| t.first().is_some_and(|t| t == "OrderPlaced"))
        .filter(|(_, t)| !t.iter().any(|t| t == "OrderShipped"))
        .count();
    assert!(
        unfinished > 0,
        "every order had shipped before the kill: the crash hit no in-flight work"
    );

    // And another node starts on the same Redis
    let second = Node::start(options).await;
    second.wait_ready().await;
    let api = Api::new(second.http());

    // Then every order whose OrderPlaced was written ships exactly once
    let placed: BTreeSet<String> = at_kill
        .iter()
        .filter(|(_, t)| t.first().is_some_and(|t| t == "OrderPlaced"))
        .map(|(id, _)| id.clone())
        .collect();
    for id in &acknowledged {
        assert!(
            placed.contains(id),
            "acknowledged order {id} has no OrderPlaced"
        );
    }
    for id in &placed {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    let after = stream_types_by_aggregate(&mut conn).await;
    for id in &placed {
        assert_eq!(after[id], HAPPY_PATH_TO_SHIPPED, "order {id}");
    }
    // And the stock adds up: what shipped left, nothing stays reserved
    let mut shipped_qty: BTreeMap<String, i64> = BTreeMap::new();
    for id in &placed {
        for item in api.order(id).await.json["items"].as_array().unwrap() {
            *shipped_qty
                .entry(item["sku"].as_str().unwrap().to_string())
                .or_default() += item["quantity"].as_i64().unwrap();
        }
    }
    for sku in ["SKU-A", "SKU-B", "SKU-C"] {
        let left = 100_000 - shipped_qty.get(sku).copied().unwrap_or(0);
        assert_eq!(api.stock(sku).await, (left, 0, left), "{sku}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_workflow_without_double_effects() {
    // Given two nodes on one Redis and four products
    let redis = RedisServer::start().await;
    let a = Node::start(NodeOptions::new(redis.url())).await;
    let b = Node::start(NodeOptions::new(redis.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let apis = [Api::new(a.http()), Api::new(b.http())];
    let skus = ["SKU-A", "SKU-B", "SKU-C", "SKU-D"];
    for sku in skus {
        apis[0].put_product(sku, 250, 5_000).await;
    }

    // When 500 orders are placed, split between the nodes, 32 at a time; every tenth
    // card is declined
    let gate = Arc::new(Semaphore::new(32));
    let mut set = JoinSet::new();
    for i in 0..500usize {
        let (api, gate) = (apis[i % 2].clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            let sku = skus[i % 4];
            let quantity = (i % 3 + 1) as i64;
            let token = if i % 10 == 9 { "tok_decline" } else { "tok_ok" };
            let id = api
                .place_ok(&order_body(
                    &format!("c-{i}"),
                    &[(sku, quantity as u64)],
                    token,
                ))
                .await;
            (id, sku, quantity, token)
        });
    }
    let mut orders = Vec::new();
    while let Some(r) = set.join_next().await {
        orders.push(r.unwrap());
    }
    assert_eq!(orders.len(), 500);

    // Then every order reaches its final status, with each effect exactly once
    let mut conn = redis.client().await;
    for (id, _, _, token) in &orders {
        let want = if *token == "tok_ok" {
            "SHIPPED"
        } else {
            "PAYMENT_FAILED"
        };
        apis[0].wait_status(id, &[want], FLOW).await;
    }
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    let by_aggregate = stream_types_by_aggregate(&mut conn).await;
    let mut wrong = Vec::new();
    for (id, _, _, token) in &orders {
        let want: &[&str] = if *token == "tok_ok" {
            HAPPY_PATH_TO_SHIPPED
        } else {
            PAYMENT_FAILED_FLOW
        };
        if by_aggregate[id] != want {
            wrong.push(format!("{id}: {:?}", by_aggregate[id]));
        }
    }
    assert!(
        wrong.is_empty(),
        "{} orders wrong:\n{}",
        wrong.len(),
        wrong.join("\n")
    );

    // And the stock adds up
    for sku in skus {
        let shipped: i64 = orders
            .iter()
            .filter(|(_, s, _, t)| *s == sku && *t == "tok_ok")
            .map(|(_, _, q, _)| q)
            .sum();
        let left = 5_000 - shipped;
        assert_eq!(apis[1].stock(sku).await, (left, 0, left), "{sku}");
    }
    // And both nodes took part in the workflow
    for (name, api) in [("a", &apis[0]), ("b", &apis[1])] {
        let text = api.metrics().await;
        let handled = metric_sum(&text, "tandem_node_events_handled_total", &[]).unwrap_or(0.0);
        assert!(handled > 0.0, "node {name} handled no event");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_survives_a_redis_restart() {
    // Given a node on a Redis that persists every write
    let mut region = Region::start_with(
        system_tests::RedisOptions {
            appendonly: true,
            ..Default::default()
        },
        |o| o,
    )
    .await;
    let api = region.api.clone();
    api.put_product("WIDGET-001", 100, 1_000).await;

    // And 20 orders just accepted, still in flight
    let in_flight = api.place_concurrently("WIDGET-001", 20).await;

    // When Redis dies
    region.redis.kill();

    // Then new orders are refused fast with 503 redis_unavailable and readiness drops
    for _ in 0..3 {
        let started = Instant::now();
        let r = api
            .http
            .try_request(
                reqwest::Method::POST,
                "/orders",
                Some(
                    serde_json::to_vec(&order_body("c-x", &[("WIDGET-001", 1)], "tok_ok")).unwrap(),
                ),
                &[],
            )
            .await
            .expect("the node answers while Redis is down");
        let took = started.elapsed();
        assert_eq!(r.status, 503, "{}", r.text);
        assert_eq!(r.error_code(), "redis_unavailable", "{}", r.text);
        assert!(took < Duration::from_millis(2500), "took {took:?}");
    }
    let ready = api.http.get("/health/ready").await;
    assert_eq!(ready.status, 503, "{}", ready.text);
    assert_eq!(api.http.get("/health/live").await.status, 200);

    // When Redis is back on the same port with its data
    region.redis.restart().await;

    // Then the same node serves again and finishes the in-flight orders exactly once
    region.node.wait_ready().await;
    for id in &in_flight {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    let mut conn = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    for id in &in_flight {
        assert_eq!(
            redis_state::stream_event_types(&mut conn, id).await,
            HAPPY_PATH_TO_SHIPPED,
            "order {id}"
        );
    }
    let id = api
        .place_ok(&order_body("c-after", &[("WIDGET-001", 1)], "tok_ok"))
        .await;
    api.wait_status(&id, &["SHIPPED"], FLOW).await;
    assert_eq!(api.stock("WIDGET-001").await, (979, 0, 979));
    assert!(region.node.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_reproduces_live_state() {
    // Given a mixed workload: shipped, delivered, dispatched, declined, dead-lettered,
    // cancelled, idempotent and refused orders, and a re-priced product
    let region = Region::start().await;
    let api = &region.api;
    api.put_product("SKU-A", 1000, 100).await;
    api.put_product("SKU-B", 250, 50).await;
    api.put_product("SKU-C", 99, 1).await;
    api.put_product("SKU-B", 300, 60).await;

    let shipped = api
        .place_ok(&order_body("c-1", &[("SKU-A", 2), ("SKU-B", 1)], "tok_ok"))
        .await;
    let delivered = api
        .place_ok(&order_body("c-2", &[("SKU-A", 1)], "tok_ok"))
        .await;
    let dispatched = api
        .place_ok(&order_body("c-3", &[("SKU-B", 3)], "tok_flaky"))
        .await;
    let declined = api
        .place_ok(&order_body("c-4", &[("SKU-A", 5)], "tok_decline"))
        .await;
    let stuck = api
        .place_ok(&order_body("c-5", &[("SKU-B", 2)], "tok_error"))
        .await;
    let cancelled = api
        .place_ok(&order_body("c-6", &[("SKU-A", 1)], "tok_error"))
        .await;
    let keyed = api
        .place_order_with_key(&order_body("c-7", &[("SKU-C", 1)], "tok_ok"), "rebuild-key")
        .await;
    assert_eq!(keyed.status, 201, "{}", keyed.text);
    let keyed = keyed.json["orderId"].as_str().unwrap().to_string();
    let refused = api
        .place_order(&order_body("c-8", &[("SKU-C", 5)], "tok_ok"))
        .await;
    assert_eq!(refused.status, 400, "{}", refused.text);

    for id in [&shipped, &delivered, &dispatched, &keyed] {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    api.wait_status(&declined, &["PAYMENT_FAILED"], FLOW).await;
    for id in [&delivered, &dispatched] {
        let order = api.order(id).await.json;
        let shipment = order["shipmentId"].as_str().unwrap().to_string();
        assert_eq!(api.dispatch(&shipment).await.status, 200);
        if id == &delivered {
            assert_eq!(api.deliver(&shipment).await.status, 200);
        }
    }
    api.wait_status(&delivered, &["DELIVERED"], FLOW).await;
    system_tests::eventually(FLOW, "two entries in the DLQ", || async {
        let dlq = api.dlq().await.json;
        let n = dlq["entries"].as_array().map_or(0, Vec::len);
        if n == 2 {
            Ok(())
        } else {
            Err(dlq)
        }
    })
    .await;
    let r = api.cancel(&cancelled).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut conn = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    assert_eq!(api.order(&stuck).await.json["status"], "CONFIRMED");
    let live = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    for id in [&shipped, &delivered, &stuck, &cancelled] {
        assert!(
            live.contains_key(&format!("tandem:order:{id}")),
            "no tandem:order:{id} in the live state; keys: {:?}",
            live.keys().collect::<Vec<_>>()
        );
    }

    // And derived state has been damaged: keys lost, one overwritten, one invented
    // (a rebuild that does nothing must not pass)
    let product_a = live
        .get("tandem:product:SKU-A")
        .expect("tandem:product:SKU-A in the live state")
        .clone();
    let _: () = redis::cmd("DEL")
        .arg(format!("tandem:order:{shipped}"))
        .arg(format!("tandem:agg:{delivered}"))
        .arg("tandem:stats:orders")
        .arg("tandem:idem:rebuild-key")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = redis::cmd("DEL")
        .arg("tandem:product:SKU-A")
        .query_async(&mut conn)
        .await
        .unwrap();
    let _: () = conn.set("tandem:product:SKU-A", "{}").await.unwrap();
    let _: () = conn.set("tandem:order:invented", "{}").await.unwrap();
    let damaged = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    assert_ne!(damaged, live);

    // When the operator rebuilds the derived state from the events
    let r = api.rebuild().await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Then every derived key is byte for byte what it was
    let rebuilt = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    let diff = diff_dumps(&live, &rebuilt, 20);
    assert!(
        diff.is_empty(),
        "rebuilt state differs from live state (live first):\n{}",
        diff.join("\n")
    );
    assert_eq!(rebuilt.get("tandem:product:SKU-A"), Some(&product_a));

    // And the node carries on: the keyed order is still recognised, new orders ship
    let again = api
        .place_order_with_key(&order_body("c-7", &[("SKU-C", 1)], "tok_ok"), "rebuild-key")
        .await;
    assert_eq!(again.json["orderId"], keyed.as_str(), "{}", again.text);
    let id = api
        .place_ok(&order_body("c-9", &[("SKU-A", 1)], "tok_ok"))
        .await;
    api.wait_status(&id, &["SHIPPED"], FLOW).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_under_traffic_loses_nothing() {
    // Given a node taking a steady stream of orders
    let region = Region::start().await;
    let api = region.api.clone();
    api.put_product("SKU-A", 100, 10_000).await;
    let mut set = JoinSet::new();
    let gate = Arc::new(Semaphore::new(8));
    for i in 0..60 {
        let (api, gate) = (api.clone(), gate.clone());
        set.spawn(async move {
            let _permit = gate.acquire().await.unwrap();
            api.place_ok(&order_body(&format!("c-{i}"), &[("SKU-A", 1)], "tok_ok"))
                .await
        });
    }

    // When the operator rebuilds while orders are placed and handled
    let placed_before = api.events_query("eventType=OrderPlaced").await.len();
    let r = api.rebuild().await;
    assert_eq!(r.status, 200, "{}", r.text);
    let mut ids = Vec::new();
    while let Some(id) = set.join_next().await {
        ids.push(id.unwrap());
    }
    assert!(
        placed_before < ids.len(),
        "every order was placed before the rebuild started: no traffic overlapped it"
    );

    // Then every order ships exactly once and the stock adds up
    for id in &ids {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    let mut conn = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
    let by_aggregate = stream_types_by_aggregate(&mut conn).await;
    for id in &ids {
        assert_eq!(by_aggregate[id], HAPPY_PATH_TO_SHIPPED, "order {id}");
    }
    assert_eq!(api.stock("SKU-A").await, (9_940, 0, 9_940));

    // And the live state is what a rebuild at rest computes
    let live = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    assert_eq!(api.rebuild().await.status, 200);
    let rebuilt = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    let diff = diff_dumps(&live, &rebuilt, 20);
    assert!(diff.is_empty(), "after traffic:\n{}", diff.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standby_projects_copied_events_into_identical_state() {
    // Given an active region that shipped, declined and keyed some orders
    let active = Region::start().await;
    let api = &active.api;
    api.put_product("SKU-A", 1000, 100).await;
    api.put_product("SKU-B", 500, 20).await;
    let shipped = api
        .place_ok(&order_body("c-1", &[("SKU-A", 2), ("SKU-B", 1)], "tok_ok"))
        .await;
    let declined = api
        .place_ok(&order_body("c-2", &[("SKU-B", 3)], "tok_decline"))
        .await;
    let keyed = api
        .place_order_with_key(&order_body("c-3", &[("SKU-A", 1)], "tok_ok"), "copy-key")
        .await;
    assert_eq!(keyed.status, 201, "{}", keyed.text);
    let keyed = keyed.json["orderId"].as_str().unwrap().to_string();
    for id in [&shipped, &keyed] {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    api.wait_status(&declined, &["PAYMENT_FAILED"], FLOW).await;
    let mut active_conn = active.redis.client().await;
    redis_state::wait_workflow_idle(&mut active_conn, FLOW).await;

    // And a standby region of its own
    let standby = Region::start_with(Default::default(), |o| o.region("b").role("standby")).await;
    let mut standby_conn = standby.redis.client().await;

    // When the active region's events are copied into the standby with their ids, as
    // the replicator does
    let entries = redis_state::stream_entries(&mut active_conn, EVENTS).await;
    for (id, fields) in &entries {
        let _: String = standby_conn.xadd(EVENTS, id, fields).await.unwrap();
    }

    // Then the standby serves the same orders and stock
    let b = &standby.api;
    b.wait_status(&shipped, &["SHIPPED"], FLOW).await;
    b.wait_status(&keyed, &["SHIPPED"], FLOW).await;
    b.wait_status(&declined, &["PAYMENT_FAILED"], FLOW).await;
    system_tests::eventually(FLOW, "standby state equals active state", || {
        let (mut a, mut s) = (active_conn.clone(), standby_conn.clone());
        async move {
            let live = redis_state::dump(&mut a, DERIVED_PATTERNS).await;
            let projected = redis_state::dump(&mut s, DERIVED_PATTERNS).await;
            let diff = diff_dumps(&live, &projected, 10);
            if diff.is_empty() {
                Ok(())
            } else {
                Err(diff)
            }
        }
    })
    .await;
    assert_eq!(b.stock("SKU-A").await, api.stock("SKU-A").await);
    assert_eq!(b.event_types(&shipped).await, HAPPY_PATH_TO_SHIPPED);
    // And the standby wrote no event of its own
    let len: u64 = standby_conn.xlen(EVENTS).await.unwrap();
    assert_eq!(len as usize, entries.len());
}

#[tokio::test]
async fn a_restock_through_another_node_is_seen_by_the_availability_check() {
    // Given two nodes on one Redis, and node a has sold the last unit of a product (so
    // a holds the product's state as of that sale)
    let redis = RedisServer::start().await;
    let a = Node::start(NodeOptions::new(redis.url())).await;
    let b = Node::start(NodeOptions::new(redis.url())).await;
    a.wait_ready().await;
    b.wait_ready().await;
    let (api_a, api_b) = (Api::new(a.http()), Api::new(b.http()));
    api_a.put_product("LAST-1", 100, 1).await;
    let first = api_a
        .place_ok(&order_body("c-1", &[("LAST-1", 1)], "tok_ok"))
        .await;
    api_a.wait_status(&first, &["SHIPPED"], FLOW).await;
    let short = api_a
        .place_order(&order_body("c-2", &[("LAST-1", 1)], "tok_ok"))
        .await;
    assert_eq!(short.status, 400, "{}", short.text);
    assert_eq!(short.error_code(), "products_unavailable", "{}", short.text);

    // When the product is restocked through node b
    api_b.put_product("LAST-1", 100, 50).await;

    // Then node a sees the new stock at once: its availability check and an order
    let check = a
        .http()
        .post(
            "/api/v1/products/check-availability",
            &serde_json::json!({"items": [{"product_id": "LAST-1", "quantity": 5}]}),
        )
        .await;
    assert_eq!(check.json["all_available"], true, "{}", check.text);
    let placed = api_a
        .place_order(&order_body("c-3", &[("LAST-1", 5)], "tok_ok"))
        .await;
    assert_eq!(placed.status, 201, "{}", placed.text);
}

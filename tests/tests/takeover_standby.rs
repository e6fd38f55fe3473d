//! The standby before a takeover (issue 3): its read models are the active's, byte for
//! byte, and in `replicated` durability an acknowledged order is already in its Redis.

use std::collections::BTreeSet;
use std::time::Duration;

use system_tests::api::{metric_sum, order_body, Api, FLOW, PAYMENT_FAILED_FLOW};
use system_tests::redis_state::{self, diff_dumps, DLQ, EVENTS};
use system_tests::takeover::{derived, Takeover};
use system_tests::{eventually, Response};
use tokio::task::JoinSet;

/// Places orders for the last units of a fresh product from many clients at once until
/// the asynchronous reservation rejects one that passed the pre-check (the seed's
/// "race after the pre-check"). Returns every accepted order id and the skus used.
async fn provoke_a_rejection(api: &Api) -> (Vec<String>, Vec<String>) {
    let mut accepted = Vec::new();
    let mut skus = Vec::new();
    for round in 0..6 {
        let sku = format!("RM-LAST-{round}");
        api.put_product(&sku, 100, 3).await;
        skus.push(sku.clone());
        let mut set = JoinSet::new();
        for i in 0..10 {
            let api = api.clone();
            let body = order_body(&format!("c-race-{i}"), &[(&sku, 3)], "tok_ok");
            set.spawn(async move { api.place_order(&body).await });
        }
        let mut round_ids = Vec::new();
        while let Some(r) = set.join_next().await {
            let r = r.expect("join");
            match r.status {
                201 => round_ids.push(r.order_id()),
                400 => assert_eq!(r.error_code(), "products_unavailable", "{}", r.text),
                other => panic!("unexpected answer {other}: {}", r.text),
            }
        }
        let mut rejected = false;
        for id in &round_ids {
            let o = api.wait_status(id, &["SHIPPED", "REJECTED"], FLOW).await;
            rejected |= o["status"] == "REJECTED";
        }
        accepted.extend(round_ids);
        if rejected {
            return (accepted, skus);
        }
    }
    panic!("in 6 rounds no order was rejected by the reservation: the rejection flow never ran");
}

#[tokio::test]
async fn standby_read_models_equal_the_active() {
    // Given region a active and region b its standby, with b's replicator copying a
    let t = Takeover::start().await;
    let (a, b) = (t.api_a(), t.api_b());
    a.put_product("RM-1", 1000, 50).await;
    a.put_product("RM-2", 250, 20).await;
    let mut orders = Vec::new();
    let mut skus: Vec<String> = vec!["RM-1".into(), "RM-2".into()];

    // When clients run every flow on a:
    // a happy path through dispatch and delivery,
    let delivered = a
        .place_ok(&order_body("c-1", &[("RM-1", 2), ("RM-2", 1)], "tok_ok"))
        .await;
    let shipped = a.wait_status(&delivered, &["SHIPPED"], FLOW).await;
    let shipment = shipped["shipmentId"]
        .as_str()
        .unwrap_or_else(|| panic!("shipped order without shipmentId: {shipped}"))
        .to_string();
    let r = a.dispatch(&shipment).await;
    assert_eq!(r.status, 200, "dispatch: {}", r.text);
    let r = a.deliver(&shipment).await;
    assert_eq!(r.status, 200, "deliver: {}", r.text);
    a.wait_status(&delivered, &["DELIVERED"], FLOW).await;
    orders.push(delivered);
    // a happy path that stops at SHIPPED, one whose first charge fails (tok_flaky),
    for token in ["tok_ok", "tok_flaky"] {
        let id = a.place_ok(&order_body("c-2", &[("RM-2", 2)], token)).await;
        a.wait_status(&id, &["SHIPPED"], FLOW).await;
        orders.push(id);
    }
    // a declined payment,
    let declined = a
        .place_ok(&order_body("c-3", &[("RM-1", 1)], "tok_decline"))
        .await;
    a.wait_status(&declined, &["PAYMENT_FAILED"], FLOW).await;
    a.wait_events(&declined, PAYMENT_FAILED_FLOW, FLOW).await;
    orders.push(declined);
    // a payment that fails every attempt (dead-lettered), then cancelled while CONFIRMED,
    let cancelled = a
        .place_ok(&order_body("c-4", &[("RM-1", 3)], "tok_error"))
        .await;
    eventually(FLOW, "the tok_error payment dead-lettered on a", || async {
        let r = a.dlq().await;
        let parked = r.json["entries"].as_array().map_or(0, Vec::len);
        if r.status == 200 && parked > 0 {
            Ok(())
        } else {
            Err(r.text)
        }
    })
    .await;
    let r = a.cancel(&cancelled).await;
    assert_eq!(r.status, 200, "cancel: {}", r.text);
    eventually(FLOW, "the cancelled order's stock released", || async {
        let types = a.event_types(&cancelled).await;
        if types.last().map(String::as_str) == Some("InventoryReleased") {
            Ok(())
        } else {
            Err(types)
        }
    })
    .await;
    orders.push(cancelled);
    // and orders racing for the last units, one of them rejected by the reservation.
    let (raced, race_skus) = provoke_a_rejection(&a).await;
    orders.extend(raced);
    skus.extend(race_skus);

    // And once a's workflow is idle and b holds and has projected all of a's events
    let mut conn_a = t.conn_a().await;
    let mut conn_b = t.conn_b().await;
    redis_state::wait_workflow_idle(&mut conn_a, FLOW).await;
    t.wait_b_caught_up().await;

    // Then every order reads the same on b as on a
    for id in &orders {
        let (on_a, on_b) = (a.order(id).await, b.order(id).await);
        assert_eq!(on_a.status, 200, "order {id} on a: {}", on_a.text);
        assert_eq!(on_b.status, 200, "order {id} on b: {}", on_b.text);
        assert_eq!(on_a.json, on_b.json, "order {id} differs between a and b");
    }
    let statuses: BTreeSet<String> = {
        let mut s = BTreeSet::new();
        for id in &orders {
            s.insert(
                b.order(id).await.json["status"]
                    .as_str()
                    .unwrap_or("?")
                    .to_string(),
            );
        }
        s
    };
    for expected in [
        "DELIVERED",
        "SHIPPED",
        "PAYMENT_FAILED",
        "CANCELLED",
        "REJECTED",
    ] {
        assert!(
            statuses.contains(expected),
            "no {expected} order seen on b: {statuses:?}"
        );
    }

    // And every product reads the same
    for sku in &skus {
        assert_eq!(a.product(sku).await, b.product(sku).await, "product {sku}");
    }

    // And the event store reads the same, per order through the API and whole streams
    // (ids and fields) in Redis
    for id in &orders {
        let (ea, eb) = (a.events(id).await, b.events(id).await);
        assert!(!ea.is_empty(), "no events for {id} on a");
        assert_eq!(ea, eb, "events of {id} differ between a and b");
    }
    for stream in [EVENTS, DLQ] {
        let ea = redis_state::stream_entries(&mut conn_a, stream).await;
        let eb = redis_state::stream_entries(&mut conn_b, stream).await;
        assert!(!ea.is_empty(), "{stream} is empty on a");
        assert_eq!(ea, eb, "{stream} differs between a and b");
    }

    // And an operator watching b sees the dead letter a parked
    eventually(
        FLOW,
        "b's dead-letter gauge counts the parked payment",
        || async {
            let text = b.metrics().await;
            match metric_sum(&text, "tandem_node_dead_letters", &[("group", "payments")]) {
                Some(1.0) => Ok(()),
                other => Err(other),
            }
        },
    )
    .await;

    // And the derived state behind every read model is equal key for key
    let (da, db) = (derived(&mut conn_a).await, derived(&mut conn_b).await);
    assert!(
        orders
            .iter()
            .all(|id| db.contains_key(&format!("tandem:order:{id}"))),
        "b's derived state lacks orders"
    );
    assert!(
        da == db,
        "derived state differs between a and b ({} vs {} keys):\n{}",
        da.len(),
        db.len(),
        diff_dumps(&da, &db, 20).join("\n")
    );
}

#[tokio::test]
async fn replicated_durability_waits_for_the_standby_and_can_refuse_without_it() {
    // Given region a active in `replicated` durability that refuses when the standby
    // cannot confirm, and b's replicator running
    let mut t = Takeover::start_with(|o| {
        o.env("NODE_DURABILITY", "replicated")
            .env("NODE_REPLICATED_TIMEOUT_MS", 1500)
            .env("NODE_REPLICATED_FALLBACK", "refuse")
    })
    .await;
    let a = t.api_a();
    a.put_product("DUR-1", 1000, 100).await;
    let mut conn_b = t.conn_b().await;
    let body = order_body("c-dur", &[("DUR-1", 1)], "tok_ok");

    // When a client places an order (retrying while the node refuses it: on a loaded
    // machine the standby may miss an answer for a moment)
    let placed = acknowledged(&a, &body, "dur-key-1").await;

    // Then it is acknowledged 201, and at that moment b's stream already holds its
    // OrderPlaced (read before anything else can happen)
    let id = placed.order_id();
    assert_eq!(placed.header("tandem-durability"), None);
    let on_b = order_placed_on(&mut conn_b, &id).await;
    assert!(
        on_b,
        "201 for {id} but b's stream has no OrderPlaced for it"
    );

    // When b's replicator is down and a client places another order
    t.rep_b.kill();
    let body2 = order_body("c-dur-2", &[("DUR-1", 2)], "tok_ok");
    let timed_out = a.place_order_with_key(&body2, "dur-key-2").await;

    // Then the client is told 503 replication_timeout, with the order's id
    assert_eq!(timed_out.status, 503, "{}", timed_out.text);
    assert_eq!(
        timed_out.error_code(),
        "replication_timeout",
        "{}",
        timed_out.text
    );
    let id2 = timed_out.json["orderId"]
        .as_str()
        .unwrap_or_else(|| panic!("replication_timeout without orderId: {}", timed_out.text))
        .to_string();
    assert!(
        !order_placed_on(&mut conn_b, &id2).await,
        "b holds {id2} although its replicator is down"
    );
    // And the order exists on a, and its workflow runs there
    let r = a.order(&id2).await;
    assert_eq!(r.status, 200, "order {id2} on a: {}", r.text);
    a.wait_status(&id2, &["SHIPPED"], FLOW).await;

    // And from then on the node knows the standby is behind: the next order is refused
    // at once, nothing is written, and the operator sees it in the metric
    let mut conn_a = t.conn_a().await;
    let events_before = redis_state::stream_entries(&mut conn_a, EVENTS).await.len();
    let started = std::time::Instant::now();
    let refused = a
        .place_order(&order_body("c-dur-3", &[("DUR-1", 1)], "tok_ok"))
        .await;
    assert_eq!(refused.status, 503, "{}", refused.text);
    assert_eq!(
        refused.error_code(),
        "replication_unavailable",
        "{}",
        refused.text
    );
    assert!(
        started.elapsed() < Duration::from_millis(1000),
        "refused only after {:?}: it waited for a standby known to be behind",
        started.elapsed()
    );
    assert_eq!(
        redis_state::stream_entries(&mut conn_a, EVENTS).await.len(),
        events_before,
        "a refused order wrote something"
    );
    assert_eq!(degraded(&a).await, Some(1.0));

    // When the replicator comes back and the client retries with its Idempotency-Key
    t.rep_b.restart().await;
    eventually(FLOW, "b receives the order that timed out", || {
        let mut c = conn_b.clone();
        let id2 = id2.clone();
        async move {
            if order_placed_on(&mut c, &id2).await {
                Ok(())
            } else {
                Err("not yet")
            }
        }
    })
    .await;
    let retried = a.place_order_with_key(&body2, "dur-key-2").await;

    // Then it gets the same order, and there is still only one of it
    assert_eq!(retried.order_id(), id2, "{}", retried.text);
    let placed_events = a
        .events_query(&format!("eventType=OrderPlaced&aggregateId={id2}"))
        .await;
    let n = placed_events
        .iter()
        .filter(|e| e["aggregateId"] == id2.as_str() && e["eventType"] == "OrderPlaced")
        .count();
    assert_eq!(n, 1, "OrderPlaced events of {id2}: {placed_events:?}");

    // And durability is replicated again: the gauge is back to 0 and a new order is
    // on b when it is acknowledged
    eventually(FLOW, "durability restored", || async {
        match degraded(&a).await {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let fresh = acknowledged(
        &a,
        &order_body("c-dur-4", &[("DUR-1", 1)], "tok_ok"),
        "dur-key-4",
    )
    .await;
    let id4 = fresh.order_id();
    assert!(order_placed_on(&mut conn_b, &id4).await);
}

#[tokio::test]
async fn replicated_durability_falls_back_to_local_acks_while_the_standby_is_down() {
    // Given region a active in `replicated` durability (fallback `async`, the default)
    let t = Takeover::start_with(|o| {
        o.env("NODE_DURABILITY", "replicated")
            .env("NODE_REPLICATED_TIMEOUT_MS", 3000)
    })
    .await;
    let a = t.api_a();
    a.put_product("FB-1", 1000, 1000).await;
    let first = a
        .place_order(&order_body("c-fb-0", &[("FB-1", 1)], "tok_ok"))
        .await;
    first.order_id();
    assert_eq!(first.header("tandem-durability"), None);

    // When the standby's Redis hangs
    t.redis_b.pause();

    // Then the node knows it once (the gauge), not per request: every order is
    // acknowledged at once, saying it is held by this region only
    let resume_on_drop = ResumeOnDrop(&t.redis_b);
    eventually(FLOW, "durability degraded", || async {
        match degraded(&a).await {
            Some(1.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let mut local_ids = Vec::new();
    for i in 0..5 {
        let started = std::time::Instant::now();
        let r = a
            .place_order(&order_body(&format!("c-fb-{i}"), &[("FB-1", 1)], "tok_ok"))
            .await;
        local_ids.push(r.order_id());
        assert_eq!(r.header("tandem-durability"), Some("local"), "{}", r.text);
        assert!(
            started.elapsed() < Duration::from_millis(1000),
            "order {i} took {:?}: it waited for a standby known to be down",
            started.elapsed()
        );
    }
    // And so is a cancellation (of an order whose payment keeps failing, so that it is
    // still cancellable)
    let stuck = a
        .place_order(&order_body("c-fb-stuck", &[("FB-1", 1)], "tok_error"))
        .await
        .order_id();
    let r = a.cancel(&stuck).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("tandem-durability"), Some("local"), "{}", r.text);

    // When the standby's Redis answers again and its replicator copies the backlog
    drop(resume_on_drop);
    let mut conn_b = t.conn_b().await;
    eventually(
        FLOW,
        "the standby caught up and durability is restored",
        || {
            let mut c = conn_b.clone();
            let a = a.clone();
            let last = local_ids.last().unwrap().clone();
            async move {
                let held = order_placed_on(&mut c, &last).await;
                match (held, degraded(&a).await) {
                    (true, Some(0.0)) => Ok(()),
                    other => Err(other),
                }
            }
        },
    )
    .await;

    // Then orders are confirmed by the standby again before they are acknowledged
    let r = a
        .place_order(&order_body("c-fb-back", &[("FB-1", 1)], "tok_ok"))
        .await;
    let id = r.order_id();
    assert_eq!(r.header("tandem-durability"), None, "{}", r.text);
    assert!(order_placed_on(&mut conn_b, &id).await);
    // And so are cancellations: b holds the OrderCancelled when the client hears 200
    let id = acknowledged(
        &a,
        &order_body("c-fb-cancel", &[("FB-1", 1)], "tok_error"),
        "fb-cancel",
    )
    .await
    .order_id();
    let r = a.cancel(&id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.header("tandem-durability"), None, "{}", r.text);
    assert!(
        event_on(&mut conn_b, &id, "OrderCancelled").await,
        "cancellation of {id} acknowledged before b held it"
    );
}

#[tokio::test]
async fn a_retried_order_is_acknowledged_as_replicated_only_when_the_standby_holds_it() {
    // Given region a active in `replicated` durability (fallback `async`), and b's
    // replicator stopped: b holds nothing a writes from now on
    let mut t = Takeover::start_with(|o| {
        o.env("NODE_DURABILITY", "replicated")
            .env("NODE_REPLICATED_TIMEOUT_MS", 500)
    })
    .await;
    let a = t.api_a();
    a.put_product("RT-1", 1000, 1000).await;
    t.wait_b_caught_up().await;
    t.rep_b.kill();
    let body = order_body("c-rt", &[("RT-1", 1)], "tok_ok");

    // When an order is placed: the standby never confirms it, so the answer says local
    let first = a.place_order_with_key(&body, "rt-1").await;
    assert_eq!(first.status, 201, "{}", first.text);
    assert_eq!(
        first.header("tandem-durability"),
        Some("local"),
        "{}",
        first.text
    );
    let order_id = first.order_id();

    // And b's stream then moves past the order's id with entries of its own, as a peer
    // promoted meanwhile appends them, so the node sees its standby "caught up" again
    let mut conn_b = t.conn_b().await;
    let _: String = redis::cmd("XADD")
        .arg("tandem:events")
        .arg("*")
        .arg("type")
        .arg("ProductUpserted")
        .arg("event")
        .arg("{}")
        .query_async(&mut conn_b)
        .await
        .unwrap();
    eventually(FLOW, "durability no longer degraded", || async {
        match degraded(&a).await {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    assert!(!order_placed_on(&mut conn_b, &order_id).await);

    // Then the client's retry (its first answer may never have reached it) gets the same
    // order, still acknowledged as held by region a only: b does not hold it
    let retry = a.place_order_with_key(&body, "rt-1").await;
    assert_eq!(retry.status, 201, "{}", retry.text);
    assert_eq!(retry.order_id(), order_id);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    assert_eq!(
        retry.header("tandem-durability"),
        Some("local"),
        "{}",
        retry.text
    );
}

/// Resumes a paused Redis, also when the test fails while it is paused.
struct ResumeOnDrop<'a>(&'a system_tests::RedisServer);

impl Drop for ResumeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.resume();
    }
}

/// Places an order with `key`, retrying while the node answers 503
/// `replication_unavailable` (nothing written), as a client would.
async fn acknowledged(api: &Api, body: &serde_json::Value, key: &str) -> Response {
    eventually(FLOW, "order acknowledged", || async {
        let r = api.place_order_with_key(body, key).await;
        if r.status == 503 && r.error_code() == "replication_unavailable" {
            Err(r.text)
        } else {
            Ok(r)
        }
    })
    .await
}

/// `tandem_node_durability_degraded` of a node.
async fn degraded(api: &Api) -> Option<f64> {
    metric_sum(&api.metrics().await, "tandem_node_durability_degraded", &[])
}

/// Whether the region's raw event stream holds an OrderPlaced of `order_id`.
async fn order_placed_on(conn: &mut redis::aio::MultiplexedConnection, order_id: &str) -> bool {
    event_on(conn, order_id, "OrderPlaced").await
}

/// Whether the region's raw event stream holds an `event_type` of `order_id`.
async fn event_on(
    conn: &mut redis::aio::MultiplexedConnection,
    order_id: &str,
    event_type: &str,
) -> bool {
    redis_state::events(conn)
        .await
        .iter()
        .any(|(_, e)| e["eventType"] == event_type && e["aggregateId"] == order_id)
}

//! Takeover by the standby (issue 3): the active region's node dies with orders in
//! flight, the operator promotes the standby at the next epoch, and the standby
//! finishes every order exactly once from the replicated log and group positions.

use std::collections::{BTreeMap, BTreeSet};

use redis::aio::MultiplexedConnection;
use serde_json::Value;
use system_tests::api::{order_body, Api, FLOW, SETTLED};
use system_tests::eventually;
use system_tests::redis_state::{self, DLQ, EVENTS};
use system_tests::takeover::{role_of, union_by_event_id, wait_role, Takeover, CATCH_UP};
use tokio::task::JoinSet;

/// One placed order and what the client asked for.
#[derive(Debug, Clone)]
struct Placed {
    id: String,
    token: &'static str,
    quantity: i64,
}

/// Places `n` orders at once, cycling through the payment tokens; returns them once
/// every POST was answered.
async fn place_wave(api: &Api, sku: &str, wave: usize, n: usize) -> Vec<Placed> {
    const TOKENS: [&str; 3] = ["tok_ok", "tok_flaky", "tok_decline"];
    let mut set = JoinSet::new();
    for i in 0..n {
        let api = api.clone();
        let token = TOKENS[i % TOKENS.len()];
        let quantity = (i % 3 + 1) as i64;
        let body = order_body(&format!("c-{wave}-{i}"), &[(sku, quantity as u64)], token);
        set.spawn(async move {
            let r = api.place_order(&body).await;
            Placed {
                id: r.order_id(),
                token,
                quantity,
            }
        });
    }
    let mut out = Vec::new();
    while let Some(p) = set.join_next().await {
        out.push(p.expect("join"));
    }
    out
}

/// The status of an order in a region's derived state, read straight from Redis (the
/// region's node may be dead).
async fn status_in_redis(conn: &mut MultiplexedConnection, order_id: &str) -> String {
    let raw: Option<String> = redis::cmd("GET")
        .arg(format!("tandem:order:{order_id}"))
        .query_async(conn)
        .await
        .expect("GET order");
    raw.and_then(|r| serde_json::from_str::<Value>(&r).ok())
        .and_then(|o| o["status"].as_str().map(String::from))
        .unwrap_or_else(|| "MISSING".into())
}

/// The `tandem:epochs` record of `epoch`: `{"region","startOffsets":{stream: id},"at"}`.
async fn epoch_record(conn: &mut MultiplexedConnection, epoch: u64) -> Value {
    let raw: Option<String> = redis::cmd("HGET")
        .arg("tandem:epochs")
        .arg(epoch)
        .query_async(conn)
        .await
        .expect("HGET tandem:epochs");
    let raw = raw.unwrap_or_else(|| panic!("no tandem:epochs record for epoch {epoch}"));
    serde_json::from_str(&raw).unwrap_or_else(|e| panic!("epoch record {raw}: {e}"))
}

/// The whole epoch history of a region.
async fn epochs(conn: &mut MultiplexedConnection) -> BTreeMap<String, String> {
    redis::cmd("HGETALL")
        .arg("tandem:epochs")
        .query_async(conn)
        .await
        .expect("HGETALL tandem:epochs")
}

/// Waits until `b`'s consumer groups equal `a`'s (positions and pending entries);
/// returns how many entries each group has pending.
async fn wait_groups_copied(t: &Takeover) -> BTreeMap<String, usize> {
    let (a, b) = (t.conn_a().await, t.conn_b().await);
    eventually(
        CATCH_UP,
        "b's replicator copied a's consumer groups",
        || {
            let (mut a, mut b) = (a.clone(), b.clone());
            async move {
                let ga = system_tests::replicator::groups(&mut a, EVENTS).await;
                let gb = system_tests::replicator::groups(&mut b, EVENTS).await;
                if !ga.is_empty() && ga == gb {
                    Ok(ga.into_iter().map(|g| (g.name, g.pending.len())).collect())
                } else {
                    Err((ga, gb))
                }
            }
        },
    )
    .await
}

/// Waits until `b`'s event stream holds exactly `a`'s entries (the node in `a` is dead,
/// so `a`'s stream no longer grows).
async fn wait_copied(t: &Takeover) {
    let (a, b) = (t.conn_a().await, t.conn_b().await);
    eventually(CATCH_UP, "b's replicator copied a's whole stream", || {
        let (mut a, mut b) = (a.clone(), b.clone());
        async move {
            let la = system_tests::replicator::xlen(&mut a, EVENTS).await;
            let lb = system_tests::replicator::xlen(&mut b, EVENTS).await;
            let ia: Vec<String> = redis_state::stream_entries(&mut a, EVENTS)
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            let ib: Vec<String> = redis_state::stream_entries(&mut b, EVENTS)
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if la == lb && ia == ib {
                Ok(())
            } else {
                Err((la, lb))
            }
        }
    })
    .await
}

#[tokio::test]
async fn promotion_finishes_in_flight_orders_exactly_once() {
    in_flight_scenario(Promote::AfterGroupsCopied).await
}

#[tokio::test]
async fn promotion_right_after_the_stream_is_copied_finishes_orders_exactly_once() {
    in_flight_scenario(Promote::AsSoonAsStreamCopied).await
}

/// When the operator promotes, relative to the replicator's copy of the consumer groups.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Promote {
    /// Groups (positions and pending entries) equal the dead active's: the promotion
    /// must take over the entries its consumer held.
    AfterGroupsCopied,
    /// As soon as the stream is copied, whatever the groups' copy says by then: entries
    /// already handled may be delivered again and must change nothing.
    AsSoonAsStreamCopied,
}

async fn in_flight_scenario(when: Promote) {
    // Given region a active (flaky charges retried after ~400 ms, so they are in flight
    // for a while) and b its standby, with a product of 1000 on hand
    let mut t = Takeover::start_with(|o| o.env("NODE_RETRY_BASE_MS", 400)).await;
    let (a, b) = (t.api_a(), t.api_b());
    const SKU: &str = "TK-1";
    const ON_HAND: i64 = 1000;
    a.put_product(SKU, 100, ON_HAND as u64).await;

    // And a first wave of orders of which some have already shipped
    let mut placed = place_wave(&a, SKU, 1, 12).await;
    let first = placed
        .iter()
        .find(|p| p.token == "tok_ok")
        .unwrap()
        .id
        .clone();
    a.wait_status(&first, &["SHIPPED"], FLOW).await;

    // And a second wave of which some have just been confirmed
    let second = place_wave(&a, SKU, 2, 9).await;
    eventually(FLOW, "an order of the second wave past PENDING", || async {
        for p in &second {
            let o = a.order(&p.id).await;
            if o.json["status"] != "PENDING" {
                return Ok(());
            }
        }
        Err("all PENDING")
    })
    .await;
    placed.extend(second);

    // When a third wave is answered and region a's node (and its replicator) are
    // SIGKILLed right away, with orders at every step of the workflow
    placed.extend(place_wave(&a, SKU, 3, 9).await);
    t.node_a.kill();
    t.rep_a.kill();
    let mut conn_a = t.conn_a().await;
    let mut at_kill = BTreeMap::new();
    for p in &placed {
        *at_kill
            .entry(status_in_redis(&mut conn_a, &p.id).await)
            .or_insert(0) += 1;
    }
    let in_flight: usize = at_kill
        .iter()
        .filter(|(s, _)| !SETTLED.contains(&s.as_str()))
        .map(|(_, n)| n)
        .sum();
    eprintln!("order statuses in a's Redis at the kill: {at_kill:?}");
    assert!(
        in_flight > 0,
        "every order had settled before the kill, nothing was in flight: {at_kill:?}"
    );

    // And b's replicator has copied a's whole stream (a's Redis is still up), and the
    // consumer groups' positions with the entries a's node held unacknowledged
    wait_copied(&t).await;
    if when == Promote::AfterGroupsCopied {
        let held = wait_groups_copied(&t).await;
        eprintln!("entries held by a's dead consumer, per group: {held:?}");
        assert!(
            held.values().sum::<usize>() > 0,
            "a's node held no entry at the kill: the takeover of pending entries is not exercised"
        );
    }

    // And the operator promotes b at epoch 2
    let last_of_a = redis_state::stream_entries(&mut conn_a, EVENTS)
        .await
        .last()
        .map(|(id, _)| id.clone())
        .expect("a wrote events");
    let r = b.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);
    assert_eq!(role_of(&b).await, ("active".to_string(), 2));
    let mut conn_b = t.conn_b().await;

    // Then epoch 2 is recorded as b's, starting right after a's last event
    let record = epoch_record(&mut conn_b, 2).await;
    assert_eq!(record["region"], "b", "{record}");
    assert_eq!(
        record["startOffsets"][EVENTS],
        Value::from(last_of_a.as_str()),
        "{record}"
    );

    // And every order settles on b
    for p in &placed {
        b.wait_status(&p.id, SETTLED, FLOW).await;
    }
    redis_state::wait_workflow_idle(&mut conn_b, FLOW).await;

    // And each ended as its payment token says: charged ones shipped, declined ones failed
    let mut shipped_quantity = 0;
    let mut statuses = BTreeMap::new();
    for p in &placed {
        let o = b.order(&p.id).await;
        assert_eq!(o.status, 200, "{}", o.text);
        let status = o.json["status"].as_str().unwrap_or("?").to_string();
        let expected = match p.token {
            "tok_decline" => "PAYMENT_FAILED",
            _ => "SHIPPED",
        };
        assert_eq!(status, expected, "order {} ({}): {}", p.id, p.token, o.text);
        if status == "SHIPPED" {
            shipped_quantity += p.quantity;
        }
        statuses.insert(p.id.clone(), status);
    }

    // And over the events of both regions (merged by eventId) every order was reserved
    // at most once, charged exactly once when paid and never twice, and took each step
    // of its flow once, in an unbroken per-order sequence
    let all = union_by_event_id(&mut [conn_a.clone(), conn_b.clone()]).await;
    let mut by_order: BTreeMap<String, Vec<&Value>> = BTreeMap::new();
    for e in all.values() {
        if let Some(id) = e["aggregateId"].as_str() {
            by_order.entry(id.to_string()).or_default().push(e);
        }
    }
    for p in &placed {
        let events = by_order.get(&p.id).cloned().unwrap_or_default();
        let count = |t: &str| events.iter().filter(|e| e["eventType"] == t).count();
        assert!(
            count("InventoryReserved") <= 1,
            "order {} reserved twice",
            p.id
        );
        match statuses[&p.id].as_str() {
            "SHIPPED" => {
                assert_eq!(
                    count("PaymentProcessed"),
                    1,
                    "order {} charged {} times",
                    p.id,
                    count("PaymentProcessed")
                );
                assert_eq!(count("PaymentFailed"), 0, "order {}", p.id);
            }
            _ => {
                assert_eq!(
                    count("PaymentProcessed"),
                    0,
                    "declined order {} charged",
                    p.id
                );
                assert_eq!(count("PaymentFailed"), 1, "declined order {}", p.id);
            }
        }
        let mut types: Vec<&str> = events
            .iter()
            .map(|e| e["eventType"].as_str().unwrap_or("?"))
            .collect();
        types.sort();
        let unique: BTreeSet<&str> = types.iter().copied().collect();
        assert_eq!(
            types.len(),
            unique.len(),
            "order {} took a step twice: {types:?}",
            p.id
        );
        let mut seqs: Vec<u64> = events
            .iter()
            .map(|e| e["sequence"].as_u64().unwrap_or(0))
            .collect();
        seqs.sort();
        let expected: Vec<u64> = (1..=events.len() as u64).collect();
        assert_eq!(seqs, expected, "order {} sequences", p.id);
    }

    // And b's stream holds every event once (no entry appended twice)
    let raw = redis_state::events(&mut conn_b).await;
    let distinct: BTreeSet<&str> = raw
        .iter()
        .filter_map(|(_, e)| e["eventId"].as_str())
        .collect();
    assert_eq!(
        distinct.len(),
        raw.len(),
        "an event appears twice in b's stream"
    );
    assert_eq!(distinct.len(), all.len(), "a holds events b never received");

    // And nothing was dead-lettered
    let dlq = redis_state::stream_entries(&mut conn_b, DLQ).await;
    assert!(dlq.is_empty(), "dead letters on b: {dlq:?}");

    // And the stock adds up: reserved equals what orders still hold (none: every order
    // settled), shipped units left the shelf, released ones came back
    let held: i64 = placed
        .iter()
        .filter(|p| matches!(statuses[&p.id].as_str(), "CONFIRMED" | "PAID"))
        .map(|p| p.quantity)
        .sum();
    let (stock, reserved, available) = b.stock(SKU).await;
    assert_eq!(reserved, held, "reserved units");
    assert_eq!(stock, ON_HAND - shipped_quantity, "units on hand");
    assert_eq!(available, stock - reserved);
}

#[tokio::test]
async fn idempotent_post_after_failover_returns_the_same_order() {
    // Given an order placed on a with an Idempotency-Key, replicated to b
    let mut t = Takeover::start().await;
    let (a, b) = (t.api_a(), t.api_b());
    a.put_product("IDEM-1", 500, 10).await;
    let body = order_body("c-idem", &[("IDEM-1", 2)], "tok_ok");
    let first = a.place_order_with_key(&body, "idem-failover-1").await;
    let id = first.order_id();
    t.wait_b_caught_up().await;

    // When region a's node dies and b is promoted at epoch 2
    t.node_a.kill();
    let r = b.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);

    // And the client retries the same POST (same key, same body) against b
    let again = b.place_order_with_key(&body, "idem-failover-1").await;

    // Then it gets the same order back, 201
    assert_eq!(again.status, 201, "{}", again.text);
    assert_eq!(
        again.json["orderId"], first.json["orderId"],
        "{}",
        again.text
    );
    assert_eq!(again.json["amount"], first.json["amount"], "{}", again.text);

    // And the same key with another body is refused
    let other = order_body("c-idem", &[("IDEM-1", 3)], "tok_ok");
    let reused = b.place_order_with_key(&other, "idem-failover-1").await;
    assert_eq!(reused.status, 409, "{}", reused.text);
    assert_eq!(
        reused.error_code(),
        "idempotency_key_reused",
        "{}",
        reused.text
    );

    // And the order exists once: one OrderPlaced in b's log, and it completes on b
    b.wait_status(&id, &["SHIPPED"], FLOW).await;
    let mut conn_b = t.conn_b().await;
    let placed: Vec<Value> = redis_state::events(&mut conn_b)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .filter(|e| e["eventType"] == "OrderPlaced")
        .collect();
    assert_eq!(placed.len(), 1, "OrderPlaced events on b: {placed:?}");
    assert_eq!(placed[0]["aggregateId"], Value::from(id.as_str()));
}

#[tokio::test]
async fn stale_promote_is_refused() {
    // Given b standby of a (a active at epoch 1)
    let t = Takeover::start().await;
    let (a, b) = (t.api_a(), t.api_b());
    a.put_product("ST-1", 100, 10).await;
    assert_eq!(role_of(&a).await, ("active".to_string(), 1));

    // When the operator promotes b at epoch 2
    let r = b.promote(2).await;

    // Then b is active at epoch 2, and the epoch's start is recorded
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(role_of(&b).await, ("active".to_string(), 2));
    let mut conn_b = t.conn_b().await;
    let record = epoch_record(&mut conn_b, 2).await;

    // When the same promotion is repeated (a retried call)
    let again = b.promote(2).await;

    // Then it succeeds without change: same role, same epoch record
    assert_eq!(again.status, 200, "{}", again.text);
    assert_eq!(role_of(&b).await, ("active".to_string(), 2));
    assert_eq!(epoch_record(&mut conn_b, 2).await, record);

    // When a promotion at an older epoch arrives
    let epochs_before = epochs(&mut conn_b).await;
    let stale = b.promote(1).await;

    // Then it is refused as stale and b keeps its epoch
    assert_eq!(stale.status, 409, "{}", stale.text);
    assert_eq!(stale.error_code(), "stale_epoch", "{}", stale.text);
    assert_eq!(role_of(&b).await, ("active".to_string(), 2));
    assert_eq!(epoch_record(&mut conn_b, 2).await, record);
    assert_eq!(
        epochs(&mut conn_b).await,
        epochs_before,
        "a refused promotion changed the epoch history"
    );

    // And the old active, seeing b active at a higher epoch, steps down and refuses
    // writes
    wait_role(&a, "standby", 2).await;
    let r = a
        .place_order(&order_body("c-stale", &[("ST-1", 1)], "tok_ok"))
        .await;
    assert_eq!(r.status, 503, "{}", r.text);
    assert_eq!(r.error_code(), "region_not_active", "{}", r.text);
}

//! The paths where an acknowledged order could be silently lost or the regions could
//! silently diverge (issue 7, section 1), each shown closed the way an operator or a
//! client would notice: a promotion never activates an incomplete state, a standby that
//! cannot apply an event says so and refuses to take over, an admin call cut short by
//! its caller leaves nothing half done, and a replayed dead letter stays replayed after
//! a failover.

use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use serde_json::{json, Value};
use system_tests::api::{metric_sum, order_body, FLOW};
use system_tests::redis_state::{self, DLQ, EVENTS};
use system_tests::takeover::{projection_cursor, role_of, Takeover, CATCH_UP};
use system_tests::{eventually, wait_until, Api, HttpClient, Region, Response};

/// A rebuild of tens of thousands of events by a debug build on a loaded 2-core machine.
const REBUILD: Duration = Duration::from_secs(90);

/// A `ProductUpserted` envelope as a node of region `a` writes it.
fn product_upserted(sku: &str, sequence: u64) -> String {
    json!({
        "eventId": uuid_like(sku, sequence),
        "eventType": "ProductUpserted",
        "aggregateId": sku,
        "aggregateType": "product",
        "sequence": sequence,
        "occurredAt": "2026-11-30T12:00:00.000Z",
        "version": 1,
        "correlationId": format!("seed-{sku}"),
        "causationId": format!("seed-{sku}"),
        "region": "a",
        "epoch": 1,
        "payload": {"sku": sku, "name": sku, "price": 100, "currency": "USD", "stock": 5}
    })
    .to_string()
}

fn uuid_like(sku: &str, sequence: u64) -> String {
    let n: u64 = sku.bytes().fold(sequence, |h, b| {
        h.wrapping_mul(31).wrapping_add(u64::from(b))
    });
    format!("00000000-0000-4000-8000-{:012x}", n & 0xffff_ffff_ffff)
}

/// Appends entries (`type`, envelope JSON) to a region's event stream, pipelined.
async fn append(conn: &mut MultiplexedConnection, entries: &[(String, String)]) -> Vec<String> {
    let mut ids = Vec::new();
    for chunk in entries.chunks(1000) {
        let mut pipe = redis::pipe();
        for (ty, event) in chunk {
            pipe.cmd("XADD")
                .arg(EVENTS)
                .arg("*")
                .arg("type")
                .arg(ty)
                .arg("event")
                .arg(event);
        }
        let added: Vec<String> = pipe.query_async(conn).await.expect("XADD");
        ids.extend(added);
    }
    ids
}

async fn get(conn: &mut MultiplexedConnection, key: &str) -> Option<String> {
    redis::cmd("GET")
        .arg(key)
        .query_async(conn)
        .await
        .expect("GET")
}

async fn intent_epoch(conn: &mut MultiplexedConnection) -> Option<u64> {
    let v: Option<String> = redis::cmd("HGET")
        .arg("tandem:promotion-intent")
        .arg("epoch")
        .query_async(conn)
        .await
        .expect("HGET intent");
    v.and_then(|e| e.parse().ok())
}

/// Whether a rebuild has paused commits (`paused` in the role hash).
async fn paused(conn: &mut MultiplexedConnection) -> bool {
    let v: Option<String> = redis::cmd("HGET")
        .arg("tandem:role")
        .arg("paused")
        .query_async(conn)
        .await
        .expect("HGET paused");
    v.is_some()
}

async fn last_id(conn: &mut MultiplexedConnection) -> Option<String> {
    redis_state::stream_entries(conn, EVENTS)
        .await
        .last()
        .map(|(id, _)| id.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn promotion_never_activates_on_an_incomplete_projection() {
    // Given a standby whose promotions may take 1 s at most, and a replicated backlog
    // far larger than it can apply in that time
    let t = Takeover::start_with_both(|o| o, |o| o.env("NODE_PROMOTION_TIMEOUT_MS", 1000)).await;
    let api_b = t.api_b();
    let mut conn_b = t.conn_b().await;
    const BACKLOG: usize = 150_000;
    append(&mut conn_b, &products("BULK", BACKLOG)).await;
    let last = last_id(&mut conn_b).await.expect("backlog written");

    // When the gateway keeps asking to promote it at epoch 2 (as it does after a kill)
    let started = Instant::now();
    let mut answers = Vec::new();
    let promoted = loop {
        let r = api_b.promote(2).await;
        answers.push((r.status, r.error_code().to_string()));
        // Then whenever it says "active", its state holds the whole log
        if r.status == 200 {
            let cursor = projection_cursor(&mut conn_b).await;
            assert_eq!(
                cursor.as_deref(),
                Some(last.as_str()),
                "promoted with the projection at {cursor:?}, the stream ends at {last}"
            );
            let sku = format!("BULK-{:06}", BACKLOG - 1);
            assert!(
                get(&mut conn_b, &format!("tandem:product:{sku}"))
                    .await
                    .is_some(),
                "promoted without the last product of the log"
            );
            break r;
        }
        // and until then it is not active, and says why
        assert_eq!(r.status, 503, "{}", r.text);
        assert!(
            ["promotion_in_progress", "promotion_failed"].contains(&r.error_code()),
            "{}",
            r.text
        );
        assert_eq!(role_of(&api_b).await.0, "standby");
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "not promoted after 2 min: {answers:?}"
        );
    };
    assert_eq!(promoted.json["role"], "active", "{}", promoted.text);
    // The backlog took longer than one promotion may: some attempts were refused
    assert!(
        answers.iter().any(|(s, _)| *s == 503),
        "the backlog was applied within one promotion; make it larger: {answers:?}"
    );
    assert_eq!(intent_epoch(&mut conn_b).await, None, "intent left behind");
}

#[tokio::test]
async fn a_standby_halts_at_an_event_it_cannot_apply_and_refuses_promotion() {
    // Given a standby following region a
    let t = Takeover::start().await;
    let (api_a, api_b) = (t.api_a(), t.api_b());
    api_a.put_product("KNOWN-1", 1000, 10).await;
    t.wait_b_caught_up().await;

    // When a writes an event this version does not know (a newer node's), then an
    // ordinary one
    let mut conn_a = t.conn_a().await;
    let mut unknown: Value = serde_json::from_str(&product_upserted("KNOWN-1", 99)).unwrap();
    unknown["eventType"] = json!("ProductTeleported");
    let ids = append(
        &mut conn_a,
        &[("ProductTeleported".into(), unknown.to_string())],
    )
    .await;
    let bad = ids[0].clone();
    api_a.put_product("AFTER-1", 1000, 10).await;

    // Then b reports itself not ready, naming the entry, and its gauge says halted
    let http_b = t.node_b.http();
    let ready = wait_until(
        CATCH_UP,
        "b not ready with projection_halted",
        || http_b.get("/health/ready"),
        |r| r.status == 503,
    )
    .await;
    let reason = ready.json["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("projection_halted") && reason.contains(&bad),
        "{}",
        ready.text
    );
    assert_eq!(ready.json["projection"]["entry"], bad.as_str());
    let halted = metric_sum(&api_b.metrics().await, "tandem_node_projection_halted", &[]);
    assert_eq!(halted, Some(1.0));
    // and nothing after the entry reached its state (it did not skip ahead)
    let mut conn_b = t.conn_b().await;
    eventually(CATCH_UP, "the entry is copied to b", || {
        let mut c = conn_b.clone();
        let bad = bad.clone();
        async move {
            let ids: Vec<String> = redis_state::stream_entries(&mut c, EVENTS)
                .await
                .into_iter()
                .map(|(id, _)| id)
                .collect();
            if ids.contains(&bad) {
                Ok(())
            } else {
                Err(ids.len())
            }
        }
    })
    .await;
    let after = api_b.http.get("/api/v1/products/AFTER-1").await;
    assert_eq!(
        after.status, 404,
        "applied past the halted entry: {}",
        after.text
    );
    let cursor = projection_cursor(&mut conn_b).await.unwrap_or_default();
    assert!(
        cursor < bad,
        "cursor {cursor} moved past the halted entry {bad}"
    );

    // And a promotion is refused while it stands
    let r = api_b.promote(2).await;
    assert_eq!(r.status, 409, "{}", r.text);
    assert_eq!(r.error_code(), "projection_halted", "{}", r.text);
    assert_eq!(role_of(&api_b).await.0, "standby");
    assert_eq!(intent_epoch(&mut conn_b).await, None);
}

/// Sends an admin request, waits until `started` says the node is working on it, then
/// gives up on it: the connection is dropped while the handler runs.
async fn abandon<F, Fut>(url: &str, body: &Value, started: F)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let (url, body) = (url.to_string(), body.clone());
    let request = tokio::spawn(async move {
        reqwest::Client::new()
            .post(url)
            .header(
                "authorization",
                format!("Bearer {}", system_tests::TEST_ADMIN_TOKEN),
            )
            .json(&body)
            .send()
            .await
    });
    eventually(FLOW, "the node started working on the request", || async {
        if started().await {
            Ok(())
        } else {
            Err(())
        }
    })
    .await;
    assert!(
        !request.is_finished(),
        "the request was answered before it could be cut short: make the work larger"
    );
    request.abort();
}

#[tokio::test]
async fn a_promotion_cut_short_by_its_caller_finishes_or_leaves_no_intent() {
    // Given a standby following region a
    let t = Takeover::start().await;
    t.api_a().put_product("P-1", 1000, 10).await;
    t.wait_b_caught_up().await;
    let mut conn_b = t.conn_b().await;
    // (with a replicated backlog to apply, so the promotion takes a while)
    append(&mut conn_b, &products("CUT", 60_000)).await;

    // When a promotion is asked for and the caller goes away at once
    let url = format!("{}/admin/promote", t.node_b.url());
    abandon(&url, &json!({"epoch": 2}), || {
        let mut c = conn_b.clone();
        async move { intent_epoch(&mut c).await == Some(2) }
    })
    .await;

    // Then the promotion still ends cleanly, whichever way: no intent is left to hold
    // b's replicator or fence a's renewals, and b is either active at epoch 2 (it
    // finished) or still standby at epoch 1 (it ran out of its time limit applying the
    // backlog, as a promotion on a loaded machine may), never anything in between
    let b = t.api_b();
    let role = eventually(
        CATCH_UP,
        "the promotion ended, no intent left behind",
        || {
            let mut c = conn_b.clone();
            let b = b.clone();
            async move {
                let intent = intent_epoch(&mut c).await;
                let role = role_of(&b).await;
                let ended = role == ("active".to_string(), 2) || role == ("standby".to_string(), 1);
                if intent.is_none() && ended {
                    Ok(role)
                } else {
                    Err((intent, role))
                }
            }
        },
    )
    .await;
    println!("the abandoned promotion ended with b {role:?}");
}

/// A region with a log large enough that a rebuild takes a while (appended behind the
/// node's back: only a rebuild brings it into the read models).
async fn region_with_history(count: usize) -> Region {
    let region = Region::start().await;
    let mut conn = region.redis.client().await;
    append(&mut conn, &products("H", count)).await;
    region
}

/// `ProductUpserted` entries for skus `{prefix}-000000` onwards.
fn products(prefix: &str, count: usize) -> Vec<(String, String)> {
    (0..count)
        .map(|i| {
            let sku = format!("{prefix}-{i:06}");
            ("ProductUpserted".to_string(), product_upserted(&sku, 1))
        })
        .collect()
}

/// A write after the rebuild: product AFTER put, which a paused region refuses.
async fn put_after(api: &Api) -> Response {
    api.http
        .put(
            "/api/v1/products/AFTER",
            &json!({"name":"A","price":1,"stock":1}),
        )
        .await
}

#[tokio::test]
async fn a_rebuild_cut_short_by_its_caller_finishes_and_unpauses() {
    // Given a region with history its read models do not reflect yet, one of them
    // corrupted
    let region = region_with_history(40_000).await;
    let api = &region.api;
    let mut conn = region.redis.client().await;
    let _: () = redis::cmd("SET")
        .arg("tandem:product:H-000007")
        .arg("{\"corrupt\":true}")
        .query_async(&mut conn)
        .await
        .unwrap();

    // When a rebuild is asked for and the caller goes away at once
    let url = format!("{}/admin/rebuild", region.node.url());
    abandon(&url, &json!({}), || {
        let mut c = conn.clone();
        async move { paused(&mut c).await }
    })
    .await;

    // Then the rebuild still finishes (the read models are rebuilt), the region is not
    // left paused, and writes go through
    eventually(REBUILD, "read model repaired", || {
        let api = api.clone();
        async move {
            let p = api.http.get("/api/v1/products/H-000007").await;
            if p.status == 200 && p.json["sku"] == "H-000007" {
                Ok(())
            } else {
                Err(p.text)
            }
        }
    })
    .await;
    eventually(REBUILD, "region unpaused", || async {
        let r = api.role().await;
        if r.json["paused"] == false {
            Ok(())
        } else {
            Err(r.text)
        }
    })
    .await;
    let r = put_after(api).await;
    assert_eq!(r.status, 201, "{}", r.text);
}

#[tokio::test]
async fn a_node_killed_during_a_rebuild_does_not_leave_the_region_paused() {
    // Given a region with history, rebuilding
    let mut region = region_with_history(40_000).await;
    let url = format!("{}/admin/rebuild", region.node.url());
    tokio::spawn(async move {
        let client = reqwest::Client::new();
        let _ = client
            .post(url)
            .header(
                "authorization",
                format!("Bearer {}", system_tests::TEST_ADMIN_TOKEN),
            )
            .send()
            .await;
    });
    let conn = region.redis.client().await;
    eventually(FLOW, "the rebuild paused the region", || {
        let mut c = conn.clone();
        async move {
            if paused(&mut c).await {
                Ok(())
            } else {
                Err(())
            }
        }
    })
    .await;

    // When its node is killed halfway and another takes its place
    region.node.kill();
    let node = system_tests::Node::start(region.node.options().clone()).await;
    node.wait_ready().await;
    let api = Api::new(node.http());

    // Then writes go through again within seconds (the pause lapses by itself)
    let started = Instant::now();
    eventually(FLOW, "writes accepted again", || async {
        let r = put_after(&api).await;
        if r.status == 201 {
            Ok(())
        } else {
            Err(r.text)
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "paused for {:?}",
        started.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_dead_letter_stays_replayed_after_a_failover() {
    // Given a payment parked in a's dead-letter stream (tok_error), whose order was then
    // cancelled, and b following a
    let t = Takeover::start().await;
    let (api_a, api_b) = (t.api_a(), t.api_b());
    api_a.put_product("DLQ-1", 1000, 10).await;
    let id = api_a
        .place_ok(&order_body("c-dlq", &[("DLQ-1", 1)], "tok_error"))
        .await;
    let entry = eventually(FLOW, "the payment is dead-lettered", || async {
        let r = api_a.dlq().await;
        r.json["entries"]
            .as_array()
            .and_then(|e| e.first().cloned())
            .ok_or(r.text)
    })
    .await;
    let entry_id = entry["id"].as_str().unwrap().to_string();
    eventually(FLOW, "b lists the dead letter too", || async {
        let r = api_b.dlq().await;
        if r.json["entries"][0]["id"] == entry_id.as_str() {
            Ok(())
        } else {
            Err(r.text)
        }
    })
    .await;
    assert_eq!(api_a.cancel(&id).await.status, 200);
    api_a.wait_status(&id, &["CANCELLED"], FLOW).await;

    // When the operator replays it on a
    let r = api_a.replay(&entry_id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(api_a.dlq().await.json["entries"], json!([]));

    // Then b, once caught up, no longer lists it either
    t.wait_b_caught_up().await;
    assert_eq!(api_b.dlq().await.json["entries"], json!([]));

    // And after a failover to b it stays replayed: not listed, not counted, not
    // replayable a second time
    let mut conn_b = t.conn_b().await;
    let dlq_entries = redis_state::stream_entries(&mut conn_b, DLQ).await;
    assert_eq!(
        dlq_entries.len(),
        1,
        "the dead-letter stream is append-only"
    );
    let r = api_b.promote(2).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(api_b.dlq().await.json["entries"], json!([]));
    eventually(FLOW, "b's dead-letter gauge is 0", || async {
        match metric_sum(&api_b.metrics().await, "tandem_node_dead_letters", &[]) {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let again = api_b.replay(&entry_id).await;
    assert_eq!(again.status, 404, "{}", again.text);
}

#[tokio::test]
async fn an_unreadable_promotion_intent_holds_copying() {
    // Given a standby following region a
    let t = Takeover::start().await;
    let api_a = t.api_a();
    api_a.put_product("HOLD-1", 1000, 10).await;
    t.wait_b_caught_up().await;
    let mut conn_b = t.conn_b().await;

    // When b's promotion intent cannot be read (here: a value of the wrong type)
    let _: () = redis::cmd("SET")
        .arg("tandem:promotion-intent")
        .arg("garbled")
        .query_async(&mut conn_b)
        .await
        .unwrap();
    let http = t.rep_b.http();
    let idle = wait_until(
        CATCH_UP,
        "b's replicator idle",
        || http.get("/health/ready"),
        |r| r.json["state"] == "idle",
    )
    .await;
    assert!(
        idle.text.contains("promotion intent"),
        "reason names the intent: {}",
        idle.text
    );

    // Then nothing a writes is copied meanwhile
    let before = redis_state::stream_entries(&mut conn_b, EVENTS).await.len();
    api_a.put_product("HOLD-2", 1000, 10).await;
    let mut conn_a = t.conn_a().await;
    let on_a = redis_state::stream_entries(&mut conn_a, EVENTS).await.len();
    assert_eq!(on_a, before + 1);
    // (ten more decisions of b's gate, each of which would have let a copy start)
    t.rep_b.wait_gate_rounds(10).await;
    let n = redis_state::stream_entries(&mut conn_b, EVENTS).await.len();
    assert_eq!(
        n, before,
        "b copied while its promotion intent was unreadable"
    );

    // And copying resumes once the intent reads again
    let _: () = redis::cmd("DEL")
        .arg("tandem:promotion-intent")
        .query_async(&mut conn_b)
        .await
        .unwrap();
    t.wait_b_caught_up().await;
}

#[tokio::test]
async fn replication_lag_keeps_growing_while_the_peer_is_unreachable() {
    // Given a standby's replicator, caught up with region a
    let mut t = Takeover::start().await;
    t.api_a().put_product("LAG-1", 1000, 10).await;
    t.wait_b_caught_up().await;
    let rep = &t.rep_b;
    eventually(CATCH_UP, "peer up and lag 0", || async {
        let up = rep.metric("tandem_replicator_peer_up").await;
        let lag = rep
            .metric("tandem_replicator_lag_seconds{stream=\"tandem:events\"}")
            .await;
        if up == Some(1.0) && lag == Some(0.0) {
            Ok(())
        } else {
            Err((up, lag))
        }
    })
    .await;

    // When region a's Redis becomes unreachable
    t.redis_a.kill();

    // Then the replicator says the peer is down, and the lag in seconds grows from the
    // moment the copy was last known complete instead of freezing
    eventually(CATCH_UP, "peer_up 0", || async {
        match rep.metric("tandem_replicator_peer_up").await {
            Some(0.0) => Ok(()),
            other => Err(other),
        }
    })
    .await;
    let lag = || async {
        rep.metric("tandem_replicator_lag_seconds{stream=\"tandem:events\"}")
            .await
            .unwrap_or(0.0)
    };
    let first = wait_until(CATCH_UP, "lag above 0.5 s", lag, |l| *l > 0.5).await;
    let later = wait_until(CATCH_UP, "lag keeps growing", lag, |l| *l >= first + 1.0).await;
    assert!(later > first);
}

/// A write the node decided on inside its lease but that reaches Redis only after the
/// lease ended (the node or its Redis stalled in between) must not be committed: by
/// then the gateway may have promoted the other region. Writes are held in Redis with
/// `CLIENT PAUSE ... WRITE` (reads go on, so the node decides in time); the commit
/// arrives after the lease has run out by Redis' clock.
#[tokio::test]
async fn a_commit_that_reaches_redis_after_the_lease_ended_is_refused() {
    // Given an active node holding a short lease, and a product
    let region = Region::start_with(Default::default(), |o| {
        o.env("NODE_REDIS_TIMEOUT_MS", 10_000)
    })
    .await;
    let api = &region.api;
    api.put_product("LEASE-1", 100, 10).await;
    let lease = region
        .node
        .http()
        .post("/admin/lease", &json!({"epoch": 1, "ttlMs": 800}))
        .await;
    assert_eq!(lease.status, 200, "lease: {}", lease.text);
    let granted = Instant::now();

    // When Redis holds every write for longer than the lease, and an order comes in
    // while the lease still runs
    let mut conn = region.redis.client().await;
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2_000)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .expect("CLIENT PAUSE");
    let placed = api
        .place_order_with_key(
            &order_body("c-lease", &[("LEASE-1", 1)], "tok_ok"),
            "lease-key-1",
        )
        .await;
    assert!(
        granted.elapsed() > Duration::from_millis(800),
        "the order was answered before the lease ended: the pause did not hold it"
    );

    // Then the order is refused (the client retries elsewhere), and nothing was written
    assert_eq!(
        placed.status, 503,
        "a commit after the lease ended: {}",
        placed.text
    );
    let mut conn = region.redis.client().await;
    let events: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(EVENTS)
        .arg("-")
        .arg("+")
        .query_async(&mut conn)
        .await
        .expect("XRANGE");
    assert!(
        events.iter().all(|(_, fields)| !fields
            .iter()
            .any(|(k, v)| k == "type" && v == "OrderPlaced")),
        "an order was committed after the lease ended"
    );
}

/// Chaos finding F1: a renewal held up in a paused Redis used to open a full write window
/// when Redis resumed, after the gateway had stopped counting on it (and might have
/// promoted the peer): a commit queued behind it then landed in the old epoch after the
/// new one began. The gateway now sends its bound of the renewal (`notAfterMs`), and the
/// window never ends after it.
#[tokio::test]
async fn a_lease_renewal_that_reaches_redis_after_its_deadline_opens_no_write_window() {
    // Given an active node holding a lease
    let region = Region::start_with(Default::default(), |o| {
        o.env("NODE_REDIS_TIMEOUT_MS", 10_000)
    })
    .await;
    let http = region.node.http();
    let lease = http
        .post("/admin/lease", &json!({"epoch": 1, "ttlMs": 800}))
        .await;
    assert_eq!(lease.status, 200, "lease: {}", lease.text);

    let mut conn = region.redis.client().await;
    let granted: u64 = write_until(&mut conn).await;

    // When Redis holds every write for 1.5 s, and a renewal comes in during the hold
    // whose gateway stops counting on it 300 ms later
    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1_500)
        .arg("WRITE")
        .query_async(&mut conn)
        .await
        .expect("CLIENT PAUSE");
    let not_after = unix_ms() + 300;
    let renewal = renew_lease(&http, json!(not_after)).await;

    // Then the renewal is refused with a stable code, and Redis' write window (what the
    // commit script checks) still ends where the first grant put it
    assert_eq!(renewal.status, 409, "late renewal: {}", renewal.text);
    assert_eq!(
        renewal.json["error"]["code"], "lease_expired",
        "{}",
        renewal.text
    );
    let until: u64 = write_until(&mut conn).await;
    assert_eq!(
        until, granted,
        "the late renewal moved the write window (its bound was {not_after})"
    );

    // And a renewal that arrives in time opens it again, still within its bound
    let not_after = unix_ms() + 5_000;
    let renewal = renew_lease(&http, json!(not_after)).await;
    assert_eq!(renewal.status, 200, "renewal in time: {}", renewal.text);
    let until: u64 = write_until(&mut conn).await;
    assert!(until > unix_ms() && until <= not_after, "window {until}");

    // And a malformed bound is refused as bad input
    let bad = renew_lease(&http, json!("soon")).await;
    assert_eq!(bad.status, 400, "malformed notAfterMs: {}", bad.text);
}

/// A promotion opens a write window by itself, until the gateway's first lease (2 s).
/// A gateway sharing control through etcd may lose control right after it promoted, and
/// the next controller promotes at once, counting on every window its predecessor opened
/// having ended with its control. So `POST /admin/promote` takes the gateway's bound
/// (`notAfterMs`) too, and the promotion's own window never ends after it.
#[tokio::test]
async fn a_promotions_own_write_window_ends_by_the_gateways_bound() {
    // Given a region that was active and fenced by a lease (epoch 1), then demoted (2)
    let region = Region::start().await;
    let http = region.node.http();
    region.api.put_product("BOUND-1", 100, 50).await;
    let lease = http
        .post("/admin/lease", &json!({"epoch": 1, "ttlMs": 800}))
        .await;
    assert_eq!(lease.status, 200, "lease: {}", lease.text);
    assert_eq!(region.api.demote(2).await.status, 200);
    let mut conn = region.redis.client().await;

    // When it is promoted at epoch 3 by a gateway whose control ends 1 s from now
    let not_after = unix_ms() + 1_000;
    let promoted = http
        .post(
            "/admin/promote",
            &json!({"epoch": 3, "notAfterMs": not_after}),
        )
        .await;
    assert_eq!(promoted.status, 200, "promote: {}", promoted.text);

    // Then Redis' write window (what the commit script checks) ends by that bound, not
    // 2 s after the promotion
    let until: u64 = write_until(&mut conn).await;
    assert!(
        until <= not_after,
        "the promotion's window ends at {until}, after the bound {not_after}"
    );

    // And once the bound has passed, with no lease since, the region takes no order
    let body = order_body("c-bound", &[("BOUND-1", 1)], "tok_ok");
    // (the node's own 2 s grace would run about 1.3 s past the bound, past this deadline)
    wait_until(
        Duration::from_millis(1_600),
        "an order refused after the promotion's bound",
        || region.api.place_order(&body),
        |r| r.status == 503,
    )
    .await;

    // And a malformed bound is refused as bad input, the role unchanged
    let bad = http
        .post("/admin/promote", &json!({"epoch": 4, "notAfterMs": "soon"}))
        .await;
    assert_eq!(bad.status, 400, "malformed notAfterMs: {}", bad.text);
    assert_eq!(region.api.role().await.json["epoch"], 3);
}

/// `POST /admin/lease` for epoch 1, 800 ms, that the gateway counts on only until
/// `not_after_ms` (a Unix time in ms; anything else to test the refusal of bad input).
async fn renew_lease(http: &HttpClient, not_after_ms: Value) -> Response {
    http.post(
        "/admin/lease",
        &json!({"epoch": 1, "ttlMs": 800, "notAfterMs": not_after_ms}),
    )
    .await
}

async fn write_until(conn: &mut MultiplexedConnection) -> u64 {
    redis::cmd("HGET")
        .arg("tandem:role")
        .arg("write_until")
        .query_async(conn)
        .await
        .expect("HGET write_until")
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

/// Two rebuilds of one region (two nodes, or a node and its restarted self) take turns:
/// the second is refused while the first holds the pause, so the first one's end can
/// never end the pause under the second while it is still writing.
#[tokio::test]
async fn a_second_rebuild_waits_its_turn() {
    // Given a region with a history long enough that a rebuild takes a while, and a
    // second node on the same Redis
    let region = region_with_history(40_000).await;
    let second =
        system_tests::Node::start(system_tests::NodeOptions::new(region.redis.url())).await;
    second.wait_ready().await;
    let mut conn = region.redis.client().await;

    // When one rebuild runs (its caller does not wait for it)
    abandon(
        &format!("{}/admin/rebuild", region.node.url()),
        &json!({}),
        || async { paused(&mut region.redis.client().await).await },
    )
    .await;
    assert!(
        paused(&mut conn).await,
        "the first rebuild paused the region"
    );

    // Then a rebuild asked of the other node is refused with a stable code
    let refused = Api::new(second.http()).rebuild().await;
    assert_eq!(refused.status, 409, "second rebuild: {}", refused.text);
    assert_eq!(
        refused.error_code(),
        "rebuild_in_progress",
        "{}",
        refused.text
    );

    // And the first one finishes and unpauses
    wait_until(
        REBUILD,
        "the first rebuild unpauses the region",
        || async { paused(&mut region.redis.client().await).await },
        |still_paused| !*still_paused,
    )
    .await;
}

/// Chaos seeds 9402 and 9406: the node reads the peer's word (role, epoch, promotion
/// intent) to keep writing on a lapsed lease. Read in two steps, a promotion finishing
/// in between read as "standby at the old epoch, no intent", which vouched for an epoch
/// the peer had just left, and the old active committed into the new one. Here the
/// peer's Redis flips, atomically and as fast as it can, between the two states a
/// promotion's end goes through (standby at 16 with intent 17; active at 17, no
/// intent); no reading may mix them.
#[tokio::test]
async fn the_peers_word_is_never_a_mix_of_before_and_after_its_promotion() {
    use regional_node::roles::Roles;
    use regional_node::store::Store;
    use system_tests::redis_server::RedisServer;

    let (own, peer) = (RedisServer::start().await, RedisServer::start().await);
    let connect = |url: String| Store::connect(&url, None, Duration::from_secs(5)).unwrap();
    let roles = Roles::new(connect(own.url()), Some(connect(peer.url())));

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let mut conn = peer.client().await;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut flips = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let mut p = redis::pipe();
                if flips.is_multiple_of(2) {
                    p.atomic()
                        .hset_multiple("tandem:role", &[("role", "standby"), ("epoch", "16")])
                        .hset("tandem:promotion-intent", "epoch", "17");
                } else {
                    p.atomic()
                        .hset_multiple("tandem:role", &[("role", "active"), ("epoch", "17")])
                        .del("tandem:promotion-intent");
                }
                let _: () = p.query_async(&mut conn).await.expect("flip");
                flips += 1;
            }
            flips
        })
    };

    let mut mixed = Vec::new();
    let mut readings = 0;
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(3) {
        let Some(p) = roles.peer_status().await else {
            continue;
        };
        readings += 1;
        let before = p.epoch == 16 && p.intent_epoch == 17;
        let after = p.epoch == 17 && p.intent_epoch == 0;
        let unset = p.epoch == 0 && p.intent_epoch == 0; // before the first flip
        if !(before || after || unset) {
            mixed.push(p);
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.await.unwrap();
    assert!(
        flips > 100 && readings > 100,
        "{flips} flips, {readings} readings"
    );
    assert!(
        mixed.is_empty(),
        "{} of {readings} readings mixed the two states (first: {:?})",
        mixed.len(),
        mixed.first()
    );
}

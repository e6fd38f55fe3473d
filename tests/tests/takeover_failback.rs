//! The whole cycle (issue 3): region a dies, b takes over at epoch 2, a returns as b's
//! standby, and the operator switches back to a at epoch 3 the way the gateway's
//! planned switchover does (demote the active at the new epoch, wait until the standby
//! holds its last event, promote the standby), with orders in flight on b.

use std::collections::BTreeMap;

use serde_json::Value;
use system_tests::api::{order_body, Api, FLOW, SETTLED};
use system_tests::eventually;
use system_tests::redis_state::{self, diff_dumps};
use system_tests::takeover::{
    derived, role_of, union_by_event_id, wait_role, wait_streams_equal, Takeover, CATCH_UP,
};
use tokio::task::JoinSet;

/// Places `n` orders at once (tok_ok, tok_flaky, tok_decline in turn); returns
/// `(orderId, token)` once every POST was answered.
async fn place_wave(api: &Api, sku: &str, wave: &str, n: usize) -> Vec<(String, &'static str)> {
    const TOKENS: [&str; 3] = ["tok_ok", "tok_flaky", "tok_decline"];
    let mut set = JoinSet::new();
    for i in 0..n {
        let api = api.clone();
        let token = TOKENS[i % TOKENS.len()];
        let body = order_body(&format!("c-{wave}-{i}"), &[(sku, 1)], token);
        set.spawn(async move { (api.place_order(&body).await.order_id(), token) });
    }
    let mut out = Vec::new();
    while let Some(p) = set.join_next().await {
        out.push(p.expect("join"));
    }
    out
}

/// `lastEventId` from `GET /admin/role`.
async fn last_event_id(api: &Api) -> String {
    let r = api.role().await;
    assert_eq!(r.status, 200, "GET /admin/role: {}", r.text);
    r.json["lastEventId"].as_str().unwrap_or("").to_string()
}

#[tokio::test]
async fn planned_failback_after_a_takeover_loses_nothing() {
    // Given a took orders at epoch 1, died, and b took over at epoch 2 with all of them
    let mut t = Takeover::start_with(|o| o.env("NODE_RETRY_BASE_MS", 200)).await;
    let b = t.api_b();
    t.api_a().put_product("FB-1", 100, 500).await;
    let mut placed = place_wave(&t.api_a(), "FB-1", "epoch1", 6).await;
    t.node_a.kill();
    t.rep_a.kill();
    let (conn_a, conn_b) = (t.conn_a().await, t.conn_b().await);
    wait_streams_equal(&conn_a, &conn_b, "b holds all of a's events").await;
    let r = b.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);
    placed.extend(place_wave(&b, "FB-1", "epoch2", 6).await);

    // And region a came back as b's standby (its replicator first, then its node)
    t.rep_a.restart().await;
    t.restart_node_a().await;
    let a = t.api_a();
    wait_role(&a, "standby", 2).await;

    // When more orders are answered on b and the operator, right away, demotes b at
    // epoch 3, waits until a holds b's last event, and promotes a at epoch 3
    placed.extend(place_wave(&b, "FB-1", "switch", 9).await);
    let r = b.demote(3).await;
    assert_eq!(r.status, 200, "demote b: {}", r.text);
    assert_eq!(role_of(&b).await, ("standby".to_string(), 3));
    let last_b = last_event_id(&b).await;
    eventually(CATCH_UP, "a holds b's last event", || async {
        let last_a = last_event_id(&a).await;
        if last_a == last_b {
            Ok(())
        } else {
            Err(format!("a at {last_a}, b at {last_b}"))
        }
    })
    .await;
    let r = a.promote(3).await;
    assert_eq!(r.status, 200, "promote a: {}", r.text);
    assert_eq!(role_of(&a).await, ("active".to_string(), 3));

    // Then every order of all three epochs settles on a, as its token says
    for (id, token) in &placed {
        let o = a.wait_status(id, SETTLED, FLOW).await;
        let expected = if *token == "tok_decline" {
            "PAYMENT_FAILED"
        } else {
            "SHIPPED"
        };
        assert_eq!(o["status"], expected, "order {id} ({token}): {o}");
    }
    let (mut conn_a, mut conn_b) = (t.conn_a().await, t.conn_b().await);
    redis_state::wait_workflow_idle(&mut conn_a, FLOW).await;

    // And each order was charged at most once and reserved at most once, over the
    // events of both regions
    let all = union_by_event_id(&mut [conn_a.clone(), conn_b.clone()]).await;
    let mut counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for e in all.values() {
        let key = (
            e["aggregateId"].as_str().unwrap_or("?").to_string(),
            e["eventType"].as_str().unwrap_or("?").to_string(),
        );
        *counts.entry(key).or_default() += 1;
    }
    for (id, token) in &placed {
        let n = |t: &str| {
            counts
                .get(&(id.clone(), t.to_string()))
                .copied()
                .unwrap_or(0)
        };
        let charged = usize::from(*token != "tok_decline");
        assert_eq!(
            n("PaymentProcessed"),
            charged,
            "order {id} ({token}) charges"
        );
        assert_eq!(n("InventoryReserved"), 1, "order {id} reservations");
        assert_eq!(n("OrderPlaced"), 1, "order {id} placements");
    }

    // And nothing was quarantined on either side: no event was lost in the switch
    for (name, api) in [("a", &a), ("b", &b)] {
        let q = api.http.get("/admin/quarantine").await;
        assert_eq!(q.status, 200, "{}", q.text);
        assert_eq!(
            q.json["count"],
            Value::from(0),
            "quarantine on {name}: {}",
            q.text
        );
    }

    // And b follows a again: same log, same read models
    wait_streams_equal(&conn_a, &conn_b, "b follows a at epoch 3").await;
    let (da, db) = (derived(&mut conn_a).await, derived(&mut conn_b).await);
    assert!(
        da == db,
        "derived state differs between a and b:\n{}",
        diff_dumps(&da, &db, 20).join("\n")
    );
    assert_eq!(role_of(&b).await, ("standby".to_string(), 3));
}

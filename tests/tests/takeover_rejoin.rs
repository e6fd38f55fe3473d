//! Failback (issue 3): a region whose node died after writing events the standby never
//! received comes back after the standby took over. It rejoins as standby at the new
//! epoch; its divergent tail is quarantined and reported, never silently dropped nor
//! kept; then its log and read models follow the new active.

use std::collections::BTreeSet;

use system_tests::api::{order_body, Api, FLOW};
use system_tests::eventually;
use system_tests::redis_state::{self, diff_dumps};
use system_tests::takeover::{
    derived, event_ids, role_of, wait_role, wait_streams_equal, Takeover, CATCH_UP,
};

/// Places `n` orders one after the other and waits until each has shipped.
async fn ship_orders(api: &Api, customer: &str, sku: &str, n: usize) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        let id = api
            .place_ok(&order_body(
                &format!("{customer}-{i}"),
                &[(sku, 1)],
                "tok_ok",
            ))
            .await;
        api.wait_status(&id, &["SHIPPED"], FLOW).await;
        ids.push(id);
    }
    ids
}

/// The `eventId`s listed by `GET /admin/quarantine`.
async fn quarantined(api: &Api) -> (u64, BTreeSet<String>) {
    let r = api.http.get("/admin/quarantine").await;
    assert_eq!(r.status, 200, "GET /admin/quarantine: {}", r.text);
    let ids = r.json["events"]
        .as_array()
        .unwrap_or_else(|| panic!("no `events` array: {}", r.text))
        .iter()
        .map(|q| q["event"]["eventId"].as_str().unwrap_or("?").to_string())
        .collect();
    (r.json["count"].as_u64().unwrap_or(0), ids)
}

/// Which of region `a`'s processes comes back first. Both orders happen in practice
/// (they are separate processes restarted by separate supervisors), and the outcome
/// must not depend on it.
#[derive(Debug, Clone, Copy)]
enum Return {
    NodeFirst,
    ReplicatorFirst,
    /// The node comes back and is demoted at the new epoch (as the gateway demotes an
    /// old active after a failover) before its replicator returns: its epoch then
    /// already equals b's, and only the record of the demotion tells the replicator
    /// that a's log may have diverged.
    DemotedAtTheNewEpoch,
}

#[tokio::test]
async fn rejoin_quarantines_the_divergent_tail() {
    rejoin_scenario(Return::NodeFirst).await
}

#[tokio::test]
async fn rejoin_quarantines_the_divergent_tail_of_a_region_demoted_at_the_new_epoch() {
    rejoin_scenario(Return::DemotedAtTheNewEpoch).await
}

#[tokio::test]
async fn rejoin_quarantines_the_divergent_tail_when_the_replicator_returns_first() {
    rejoin_scenario(Return::ReplicatorFirst).await
}

async fn rejoin_scenario(order: Return) {
    // Given a active and b its standby, with a common history b has caught up on
    let mut t = Takeover::start().await;
    let (a, b) = (t.api_a(), t.api_b());
    a.put_product("RJ-1", 500, 100).await;
    let common = ship_orders(&a, "c-common", "RJ-1", 2).await;
    let mut conn_a = t.conn_a().await;
    let mut conn_b = t.conn_b().await;
    redis_state::wait_workflow_idle(&mut conn_a, FLOW).await;
    t.wait_b_caught_up().await;

    // And b's replicator dies, after which a writes a tail b never receives
    t.rep_b.kill();
    let tail_orders = ship_orders(&a, "c-tail", "RJ-1", 2).await;
    redis_state::wait_workflow_idle(&mut conn_a, FLOW).await;
    let divergent: BTreeSet<String> = event_ids(&mut conn_a)
        .await
        .difference(&event_ids(&mut conn_b).await)
        .cloned()
        .collect();
    assert!(
        divergent.len() >= 2 * 7,
        "a's divergent tail is {} events: {divergent:?}",
        divergent.len()
    );

    // And region a's node and replicator die
    t.node_a.kill();
    t.rep_a.kill();

    // When b is promoted at epoch 2 and takes orders of its own
    let r = b.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);
    let new_orders = ship_orders(&b, "c-new", "RJ-1", 2).await;
    redis_state::wait_workflow_idle(&mut conn_b, FLOW).await;

    // And region a comes back: its node on the same Redis and its replicator, which
    // copies from b, one after the other
    match order {
        Return::NodeFirst => {
            t.restart_node_a().await;
            t.node_a.wait_ready().await;
            t.rep_a.restart().await;
        }
        Return::ReplicatorFirst => {
            t.rep_a.restart().await;
            t.restart_node_a().await;
        }
        Return::DemotedAtTheNewEpoch => {
            t.restart_node_a().await;
            t.node_a.wait_ready().await;
            let r = t.api_a().demote(2).await;
            assert_eq!(r.status, 200, "demote a at epoch 2: {}", r.text);
            t.rep_a.restart().await;
        }
    }
    let a = t.api_a();

    // Then a is standby at epoch 2
    wait_role(&a, "standby", 2).await;

    // And GET /admin/quarantine on a lists exactly the events b never received
    let listed = eventually(
        CATCH_UP,
        "a's quarantine lists its divergent tail",
        || async {
            let (count, ids) = quarantined(&a).await;
            if count as usize == divergent.len() && ids == divergent {
                Ok(ids)
            } else {
                Err(format!(
                    "count {count}; missing {:?}; extra {:?}",
                    divergent.difference(&ids).collect::<Vec<_>>(),
                    ids.difference(&divergent).collect::<Vec<_>>()
                ))
            }
        },
    )
    .await;
    assert_eq!(listed, divergent);
    // And the replicator in a reports them on its metrics
    let counted = t
        .rep_a
        .metric("tandem_replicator_quarantined_events_total")
        .await;
    assert_eq!(counted, Some(divergent.len() as f64));

    // And a's event stream then equals b's, with a's state projected from it
    wait_streams_equal(&conn_b, &conn_a, "a follows b after the rejoin").await;
    let ids_a = event_ids(&mut conn_a).await;
    assert!(
        ids_a.is_disjoint(&divergent),
        "a still holds part of its divergent tail"
    );

    // And a's read models equal b's once a has projected what it copied: the tail's
    // orders are gone, b's new ones are there
    eventually(CATCH_UP, "a's derived state equals b's", || {
        let (mut conn_a, mut conn_b) = (conn_a.clone(), conn_b.clone());
        async move {
            let (da, db) = (derived(&mut conn_a).await, derived(&mut conn_b).await);
            if da == db {
                Ok(())
            } else {
                Err(format!(
                    "a has {} keys, b {}:\n{}",
                    da.len(),
                    db.len(),
                    diff_dumps(&da, &db, 20).join("\n")
                ))
            }
        }
    })
    .await;
    for id in common.iter().chain(&new_orders) {
        let (on_a, on_b) = (a.order(id).await, b.order(id).await);
        assert_eq!(on_b.status, 200, "order {id} on b: {}", on_b.text);
        assert_eq!(on_a.status, 200, "order {id} on a: {}", on_a.text);
        assert_eq!(on_a.json, on_b.json, "order {id}");
    }
    for id in &tail_orders {
        let r = a.order(id).await;
        assert_eq!(
            r.status, 404,
            "quarantined order {id} still readable on a: {}",
            r.text
        );
    }
    assert_eq!(a.product("RJ-1").await, b.product("RJ-1").await);

    // And b never saw any of it and is still active at epoch 2
    let ids_b = event_ids(&mut conn_b).await;
    assert!(ids_b.is_disjoint(&divergent));
    assert_eq!(role_of(&b).await, ("active".to_string(), 2));
}

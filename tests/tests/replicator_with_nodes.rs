//! The replicator between two real regional nodes: an order placed in the active region
//! is readable in the standby, and the workflow's consumer groups are mirrored there.

use std::time::Duration;

use system_tests::replicator::{conn, groups, wait_streams_equal, Replicator};
use system_tests::{eventually, order_body, Region};

const DEADLINE: Duration = Duration::from_secs(30);

/// Region a with its active node, and region b with a standby node: the failover pair
/// every test here starts from.
async fn regions() -> (Region, Region) {
    let a = Region::start().await;
    let b = Region::start_with(Default::default(), |o| o.region("b").role("standby")).await;
    (a, b)
}

/// b's replicator: copies the active region a into b.
async fn replicator_into_b(a: &Region, b: &Region) -> Replicator {
    Replicator::start(&b.redis.url(), &a.redis.url(), &[]).await
}

/// a's replicator: follows b once b is promoted (the local and peer regions swapped).
async fn replicator_into_a(a: &Region, b: &Region) -> Replicator {
    Replicator::start(
        &a.redis.url(),
        &b.redis.url(),
        &[
            ("REPLICATOR_LOCAL_REGION", "a"),
            ("REPLICATOR_PEER_REGION", "b"),
        ],
    )
    .await
}

/// Stocks WIDGET-001 in a and places an order there; returns its id once a has shipped
/// it and b serves it as shipped, with b's view of it.
async fn shipped_in_a_and_copied_to_b(a: &Region, b: &Region) -> (String, serde_json::Value) {
    a.api.put_product("WIDGET-001", 1000, 50).await;
    let id = a
        .api
        .place_ok(&order_body("c-1", &[("WIDGET-001", 1)], "tok_ok"))
        .await;
    a.api.wait_status(&id, &["SHIPPED"], DEADLINE).await;
    let on_b = b.api.wait_status(&id, &["SHIPPED"], DEADLINE).await;
    (id, on_b)
}

#[tokio::test]
async fn an_order_placed_in_the_active_region_is_served_by_the_standby() {
    // Given region a (active node) and region b (standby node), and b's replicator
    let (a, b) = regions().await;
    let _rep = replicator_into_b(&a, &b).await;

    // When a client places an order in region a and the workflow ships it
    a.api.put_product("WIDGET-001", 1000, 50).await;
    let id = a
        .api
        .place_ok(&order_body("c-1", &[("WIDGET-001", 2)], "tok_ok"))
        .await;
    let shipped = a.api.wait_status(&id, &["SHIPPED"], DEADLINE).await;

    // Then the standby holds the same events, with the same ids
    let (ca, cb) = (conn(&a.redis.url()).await, conn(&b.redis.url()).await);
    wait_streams_equal(&ca, &cb, "tandem:events", DEADLINE).await;

    // And the standby node serves the order as region a knows it
    let on_b = b.api.wait_status(&id, &["SHIPPED"], DEADLINE).await;
    assert_eq!(on_b["amount"], shipped["amount"]);
    assert_eq!(on_b["items"], shipped["items"]);

    // And the workflow's consumer groups are mirrored
    eventually(DEADLINE, "groups mirrored", || {
        let (mut ca, mut cb) = (ca.clone(), cb.clone());
        async move {
            let (x, y) = (
                groups(&mut ca, "tandem:events").await,
                groups(&mut cb, "tandem:events").await,
            );
            if !x.is_empty() && x == y {
                Ok(())
            } else {
                Err((x, y))
            }
        }
    })
    .await;
}

#[tokio::test]
async fn after_a_switchover_the_old_active_follows_the_new_one() {
    // Given a active, b standby, and a replicator in each region
    let (a, b) = regions().await;
    let _into_b = replicator_into_b(&a, &b).await;
    let into_a = replicator_into_a(&a, &b).await;

    // And an order that shipped in a and reached b
    let (first, on_b) = shipped_in_a_and_copied_to_b(&a, &b).await;

    // When b is promoted to epoch 2
    let r = b.api.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);

    // Then a's replicator makes a the standby of b at epoch 2, with nothing quarantined
    a.api.wait_role("standby", 2, DEADLINE).await;
    assert_eq!(
        into_a
            .metric("tandem_replicator_quarantined_events_total")
            .await,
        Some(0.0)
    );

    // And what b does from now on reaches a: the shipped order is delivered in b ...
    let shipment = on_b["shipmentId"].as_str().expect("shipmentId").to_string();
    assert_eq!(b.api.dispatch(&shipment).await.status, 200);
    assert_eq!(b.api.deliver(&shipment).await.status, 200);
    b.api.wait_status(&first, &["DELIVERED"], DEADLINE).await;
    a.api.wait_status(&first, &["DELIVERED"], DEADLINE).await;
    // ... and a new order placed in b is served by a
    let second = b
        .api
        .place_ok(&order_body("c-2", &[("WIDGET-001", 1)], "tok_ok"))
        .await;
    b.api.wait_status(&second, &["SHIPPED"], DEADLINE).await;
    a.api.wait_status(&second, &["SHIPPED"], DEADLINE).await;

    // And both streams are equal
    let (ca, cb) = (conn(&a.redis.url()).await, conn(&b.redis.url()).await);
    wait_streams_equal(&ca, &cb, "tandem:events", DEADLINE).await;
}

#[tokio::test]
async fn writes_the_new_active_never_received_are_quarantined_on_rejoin() {
    // Given a active and b standby, each region with its replicator
    let (a, b) = regions().await;
    let mut into_b = replicator_into_b(&a, &b).await;
    let into_a = replicator_into_a(&a, &b).await;
    shipped_in_a_and_copied_to_b(&a, &b).await;

    // And a second order that b never receives (b's replicator is down)
    into_b.kill();
    let lost = a
        .api
        .place_ok(&order_body("c-2", &[("WIDGET-001", 3)], "tok_ok"))
        .await;
    a.api.wait_status(&lost, &["SHIPPED"], DEADLINE).await;
    let lost_events = a.api.event_types(&lost).await;
    assert!(!lost_events.is_empty());

    // When b is promoted to epoch 2 without it
    let r = b.api.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);

    // Then a rejoins as b's standby and sets exactly the lost order's events aside
    a.api.wait_role("standby", 2, DEADLINE).await;
    let q = a.api.http.get("/admin/quarantine").await;
    assert_eq!(q.status, 200, "{}", q.text);
    let quarantined: Vec<&serde_json::Value> = q.json["events"]
        .as_array()
        .expect("events")
        .iter()
        .collect();
    assert_eq!(quarantined.len(), lost_events.len(), "{}", q.text);
    assert!(
        quarantined
            .iter()
            .all(|e| e["event"]["aggregateId"] == lost.as_str()),
        "{}",
        q.text
    );
    assert!(quarantined
        .iter()
        .all(|e| e["epoch"] == "1" && e["stream"] == "tandem:events"));
    let n = into_a
        .metric("tandem_replicator_quarantined_events_total")
        .await;
    assert_eq!(n, Some(lost_events.len() as f64));

    // And a's node no longer shows the lost order; stock agrees with b's
    // (a's node may be rebuilding meanwhile, so a non-200 just means "not yet".)
    eventually(
        DEADLINE,
        "a's read model without the lost order",
        || async {
            let status = a.api.order(&lost).await.status;
            let pa = a.api.http.get("/api/v1/products/WIDGET-001").await;
            let pb = b.api.http.get("/api/v1/products/WIDGET-001").await;
            let same = pa.status == 200
                && pb.status == 200
                && pa.json["available"] == pb.json["available"];
            if status == 404 && same {
                Ok(())
            } else {
                Err((status, pa.text, pb.text))
            }
        },
    )
    .await;

    // And a's stream equals b's again
    let (ca, cb) = (conn(&a.redis.url()).await, conn(&b.redis.url()).await);
    wait_streams_equal(&ca, &cb, "tandem:events", DEADLINE).await;
}

//! Seed 002's integration events and webhooks (API.md "Integration events and
//! webhooks"): every status change after an order is placed is published as an
//! `order.status_updated` event, readable through the event store and delivered to
//! webhooks per Standard Webhooks: signed, at least once, in order per order, retried
//! after failures, parked after the bound, stopped by a delete.

use std::collections::{BTreeMap, BTreeSet};

use reqwest::Method;
use serde_json::{json, Value};
use system_tests::api::{metric_sum, order_body, Api, FLOW, WIDGET};
use system_tests::node::NodeOptions;
use system_tests::redis_state;
use system_tests::webhook_receiver::{Received, WebhookReceiver};
use system_tests::{eventually, Region};

const STATUS_UPDATED: &str = "order.status_updated";

/// A node whose webhook retries are quick, so the tests' failures play out in seconds.
fn quick_retries(max_attempts: u32) -> impl FnOnce(NodeOptions) -> NodeOptions {
    move |o| {
        o.env("NODE_WEBHOOK_BACKOFF_MS", 50)
            .env("NODE_WEBHOOK_BACKOFF_MAX_MS", 200)
            .env("NODE_WEBHOOK_TIMEOUT_MS", 2000)
            .env("NODE_WEBHOOK_MAX_ATTEMPTS", max_attempts)
    }
}

/// Subscribes `url` to the status events; returns `(id, secret)`.
async fn subscribe(api: &Api, url: &str) -> (String, String) {
    let r = api
        .http
        .post(
            "/api/v1/webhooks",
            &json!({"url": url, "events": [STATUS_UPDATED]}),
        )
        .await;
    assert_eq!(r.status, 201, "{}", r.text);
    assert_eq!(r.json["url"], url);
    assert_eq!(r.json["events"], json!([STATUS_UPDATED]));
    let id = r.json["id"].as_str().expect("id").to_string();
    let secret = r.json["secret"].as_str().expect("secret").to_string();
    (id, secret)
}

/// The integration events of `order` through the event store.
async fn integration_events(api: &Api, order: &str) -> Vec<Value> {
    api.events_query(&format!("aggregateId={order}&format=integration"))
        .await
}

/// Waits until the event store lists exactly `count` integration events of `order`.
async fn wait_integration_events(api: &Api, order: &str, count: usize) -> Vec<Value> {
    eventually(FLOW, &format!("{count} integration events"), || async {
        let e = integration_events(api, order).await;
        if e.len() == count {
            Ok(e)
        } else {
            Err(e)
        }
    })
    .await
}

/// Dispatches and delivers `order`'s shipment; the delivery with `body`.
async fn dispatch_and_deliver(api: &Api, order: &str, body: Option<Value>) {
    let shipment = api.order(order).await.json["shipmentId"]
        .as_str()
        .expect("a shipped order has a shipment")
        .to_string();
    let r = api.dispatch(&shipment).await;
    assert_eq!(r.status, 200, "dispatch: {}", r.text);
    let path = format!("/shipments/{shipment}/deliver");
    let r = match body {
        Some(b) => api.http.post(&path, &b).await,
        None => api.deliver(&shipment).await,
    };
    assert_eq!(r.status, 200, "deliver: {}", r.text);
    api.wait_status(order, &["DELIVERED"], FLOW).await;
}

/// `(previous, current)` statuses of integration events, in order.
fn transitions(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["data"]["previous_status"].as_str().unwrap_or("?").into(),
                e["data"]["current_status"].as_str().unwrap_or("?").into(),
            )
        })
        .collect()
}

const DELIVERED_PATH: &[(&str, &str)] = &[
    ("PENDING", "CONFIRMED"),
    ("CONFIRMED", "PAID"),
    ("PAID", "SHIPPED"),
    ("SHIPPED", "DELIVERED"),
];

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    expected
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// `tandem_node_webhook_deliveries_total` for one outcome (delivered, failed, parked).
fn deliveries(metrics: &str, outcome: &str) -> Option<f64> {
    metric_sum(
        metrics,
        "tandem_node_webhook_deliveries_total",
        &[("outcome", outcome)],
    )
}

/// Places `count` orders of one widget each, for customers `{prefix}0`, `{prefix}1`...
async fn place_orders(api: &Api, prefix: &str, count: usize) -> Vec<String> {
    let mut orders = Vec::with_capacity(count);
    for i in 0..count {
        let body = order_body(&format!("{prefix}{i}"), &[(WIDGET, 1)], "tok_ok");
        orders.push(api.place_ok(&body).await);
    }
    orders
}

/// Waits until `receiver` has accepted each of `orders`' three status changes up to
/// SHIPPED; returns the accepted events by order.
async fn wait_delivered(
    receiver: &WebhookReceiver,
    orders: &[String],
    what: &str,
) -> BTreeMap<String, Vec<Value>> {
    eventually(FLOW, what, || async {
        let got = accepted_by_order(&receiver.accepted());
        if orders
            .iter()
            .all(|o| got.get(o).is_some_and(|e| e.len() == 3))
        {
            Ok(got)
        } else {
            Err(got)
        }
    })
    .await
}

/// The events each order's accepted deliveries carried, first acceptance of each
/// webhook-id only (a redelivery repeats one), in the order received.
fn accepted_by_order(accepted: &[Received]) -> BTreeMap<String, Vec<Value>> {
    let mut seen = BTreeSet::new();
    let mut out: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for r in accepted {
        if seen.insert(r.webhook_id.clone()) {
            let v = r.json();
            let order = v["data"]["order_id"].as_str().unwrap_or("?").to_string();
            out.entry(order).or_default().push(v);
        }
    }
    out
}

#[tokio::test]
async fn status_changes_are_integration_events_in_the_event_store() {
    // Given an order that was shipped
    let region = Region::start().await;
    let api = &region.api;
    let id = api.shipped_order().await;

    // When the carrier dispatches it, and delivers it saying when and where; a bad
    // delivery body first, which changes nothing
    let shipment = api.order(&id).await.json["shipmentId"]
        .as_str()
        .unwrap()
        .to_string();
    let r = api.dispatch(&shipment).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let before = api.event_types(&id).await;
    for bad in [
        json!({"deliveredAt": "yesterday"}),
        json!({"deliveredAt": "2026-02-30T10:00:00Z"}),
        json!({"deliveryLocation": ""}),
        json!({"deliveryLocation": "x".repeat(501)}),
        json!({"deliveryLocation": 7}),
        json!(["not", "an", "object"]),
    ] {
        let r = api
            .http
            .post(&format!("/shipments/{shipment}/deliver"), &bad)
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert_eq!(r.error_code(), "validation_failed", "{bad}");
    }
    assert_eq!(
        api.event_types(&id).await,
        before,
        "a refused delivery wrote nothing"
    );
    let r = api
        .http
        .post(
            &format!("/shipments/{shipment}/deliver"),
            &json!({"deliveredAt": "2026-11-30T09:15:00+01:00", "deliveryLocation": "front porch"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    api.wait_status(&id, &["DELIVERED"], FLOW).await;

    // Then the catalog's payloads carry their new fields
    let events = api.events(&id).await;
    let payload = |ty: &str| {
        events
            .iter()
            .find(|e| e["eventType"] == ty)
            .unwrap_or_else(|| panic!("no {ty}"))["payload"]
            .clone()
    };
    assert_eq!(payload("OrderConfirmed")["amount"], 1000);
    assert!(payload("ShipmentDispatched")["dispatchedAt"].is_string());
    assert_eq!(
        payload("ShipmentDelivered")["deliveredAt"],
        "2026-11-30T09:15:00+01:00"
    );
    assert_eq!(
        payload("ShipmentDelivered")["deliveryLocation"],
        "front porch"
    );

    // And the event store lists one integration event per status change after
    // placing, in the seed's shape, each with an id fixed by its domain event
    let published = wait_integration_events(api, &id, 4).await;
    assert_eq!(transitions(&published), pairs(DELIVERED_PATH));
    let domain_id = |ty: &str| {
        events.iter().find(|e| e["eventType"] == ty).unwrap()["eventId"]
            .as_str()
            .unwrap()
            .to_string()
    };
    for (event, ty) in published.iter().zip([
        "OrderConfirmed",
        "OrderPaid",
        "OrderShipped",
        "OrderDelivered",
    ]) {
        assert_eq!(event["event_type"], STATUS_UPDATED);
        assert_eq!(event["source"], "tandem.orders");
        assert_eq!(event["data"]["order_id"], id.as_str());
        assert_eq!(event["event_id"], format!("evt_{}", domain_id(ty)));
        assert!(event["timestamp"].is_string());
        // Readable by id too.
        let one = api
            .http
            .get(&format!(
                "/api/events/{}",
                event["event_id"].as_str().unwrap()
            ))
            .await;
        assert_eq!(one.status, 200, "{}", one.text);
        assert_eq!(&one.json, event);
    }
    let order = api.order(&id).await.json;
    let shipped = &published[2]["data"];
    assert_eq!(shipped["tracking_number"], order["trackingNumber"]);
    assert_eq!(shipped["carrier"], order["carrier"]);
    assert!(shipped["tracking_number"]
        .as_str()
        .is_some_and(|t| !t.is_empty()));
    let delivered = &published[3]["data"];
    assert_eq!(delivered["delivered_at"], "2026-11-30T09:15:00+01:00");
    assert_eq!(delivered["delivery_location"], "front porch");
    assert_eq!(published[0]["data"].get("tracking_number"), None);

    // And an empty delivery body still works: delivered when it was recorded
    let second = api
        .place_ok(&order_body("c-2", &[(WIDGET, 1)], "tok_ok"))
        .await;
    api.wait_status(&second, &["SHIPPED"], FLOW).await;
    dispatch_and_deliver(api, &second, None).await;
    let published = wait_integration_events(api, &second, 4).await;
    assert!(published[3]["data"]["delivered_at"].is_string());
    assert_eq!(published[3]["data"].get("delivery_location"), None);

    // And a bad format is refused
    let r = api.http.get("/api/events?format=xml").await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_eq!(r.error_code(), "validation_failed");
}

#[tokio::test]
async fn webhooks_are_managed_and_bad_subscriptions_refused() {
    // Given a node
    let region = Region::start().await;
    let api = &region.api;
    let mut conn = region.redis.client().await;
    let before = redis_state::snapshot(&mut conn).await;

    // When bad subscriptions are asked for, they are refused and nothing is written
    for (bad, field) in [
        (
            json!({"url": "ftp://example.com/h", "events": [STATUS_UPDATED]}),
            "url",
        ),
        (
            json!({"url": "example.com/h", "events": [STATUS_UPDATED]}),
            "url",
        ),
        (
            json!({"url": format!("https://example.com/{}", "a".repeat(2048)), "events": [STATUS_UPDATED]}),
            "url",
        ),
        (
            json!({"url": "https://example.com/h", "events": []}),
            "events",
        ),
        (
            json!({"url": "https://example.com/h", "events": ["order.teleported"]}),
            "events[0]",
        ),
        (json!({"url": "https://example.com/h"}), "events"),
    ] {
        let r = api.http.post("/api/v1/webhooks", &bad).await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
        assert_eq!(r.error_code(), "validation_failed");
        assert!(
            r.json["error"]["fields"]
                .as_array()
                .is_some_and(|f| f.contains(&json!(field))),
            "{bad}: {}",
            r.text
        );
    }
    let after = redis_state::snapshot(&mut conn).await;
    redis_state::assert_unchanged(&before, &after, "refused subscriptions");

    // And a good one is created with a Standard Webhooks secret
    let (id, secret) = subscribe(api, "https://example.com/hook").await;
    let raw = secret.strip_prefix("whsec_").expect("whsec_ prefix");
    use base64::Engine as _;
    let key = base64::engine::general_purpose::STANDARD
        .decode(raw)
        .expect("base64");
    assert!((24..=64).contains(&key.len()), "{} bytes", key.len());

    // Then the list shows it, without its secret, and the secret is not in Redis
    let list = api.http.get("/api/v1/webhooks").await;
    assert_eq!(list.status, 200, "{}", list.text);
    let hooks = list.json["webhooks"].as_array().unwrap();
    assert_eq!(hooks.len(), 1);
    assert_eq!(hooks[0]["id"], id.as_str());
    assert_eq!(hooks[0]["url"], "https://example.com/hook");
    assert_eq!(hooks[0].get("secret"), None);
    let everything = format!("{:?}", redis_state::dump_all(&mut conn).await);
    assert!(!everything.contains(raw), "the secret is stored sealed");
    let events = api.events(&id).await;
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0]["eventType"], "WebhookSubscribed");
    assert_eq!(events[0]["payload"]["url"], "https://example.com/hook");
    assert_eq!(events[0]["payload"].get("secret"), None, "not even sealed");

    // And a delete removes it; a second delete, or an unknown id, is 404
    let del = |path: String| {
        let http = api.http.clone();
        async move { http.request(Method::DELETE, &path, None, &[]).await }
    };
    assert_eq!(del(format!("/api/v1/webhooks/{id}")).await.status, 204);
    assert_eq!(del(format!("/api/v1/webhooks/{id}")).await.status, 404);
    assert_eq!(del("/api/v1/webhooks/wh_nope".into()).await.status, 404);
    assert_eq!(del("/api/v1/webhooks/a:b".into()).await.status, 404);
    let list = api.http.get("/api/v1/webhooks").await;
    assert_eq!(list.json["webhooks"], json!([]));

    // And the subscription is state a rebuild restores (it lives in the event stream)
    let (kept, _) = subscribe(api, "http://127.0.0.1:9/hook").await;
    let r = api.rebuild().await;
    assert!(r.status < 300, "rebuild: {}", r.text);
    eventually(FLOW, "the rebuilt list", || async {
        let list = api.http.get("/api/v1/webhooks").await;
        let ids: Vec<Value> = list.json["webhooks"]
            .as_array()
            .map(|h| h.iter().map(|h| h["id"].clone()).collect())
            .unwrap_or_default();
        if ids == [json!(kept)] {
            Ok(())
        } else {
            Err(list.text)
        }
    })
    .await;
}

#[tokio::test]
async fn deliveries_are_signed_ordered_per_order_and_retried_after_500s() {
    // Given a node with quick retries, a webhook whose receiver answers 500 to its
    // first three requests, and three orders
    let region = Region::start_with(Default::default(), quick_retries(10)).await;
    let api = &region.api;
    let receiver = WebhookReceiver::start().await;
    receiver.fail_next(3);
    let (_, secret) = subscribe(api, &receiver.url()).await;
    api.put_product(WIDGET, 1000, 100).await;
    let orders = place_orders(api, "c-", 3).await;

    // When they are shipped and delivered
    for id in &orders {
        api.wait_status(id, &["SHIPPED"], FLOW).await;
        dispatch_and_deliver(api, id, Some(json!({"deliveryLocation": "mailroom"}))).await;
    }

    // Then the receiver accepted every integration event of the event store, once
    // each at least, in each order's order, every request signed with the secret
    let by_order = eventually(FLOW, "every status change delivered", || async {
        let got = accepted_by_order(&receiver.accepted());
        let complete = orders
            .iter()
            .all(|o| got.get(o).is_some_and(|e| e.len() == 4));
        if complete {
            Ok(got)
        } else {
            Err(got)
        }
    })
    .await;
    for id in &orders {
        let store = integration_events(api, id).await;
        assert_eq!(by_order[id], store, "order {id}: delivered == published");
        assert_eq!(transitions(&by_order[id]), pairs(DELIVERED_PATH));
        assert_eq!(by_order[id][3]["data"]["delivery_location"], "mailroom");
    }
    let all = receiver.received();
    assert!(
        all.iter().all(|r| r.verifies(&secret)),
        "every signature verifies"
    );
    assert!(!all[0].verifies("whsec_AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"));
    for r in &all {
        assert_eq!(
            r.webhook_id,
            r.json()["event_id"],
            "webhook-id is the event id"
        );
        let ts: u64 = r.timestamp.parse().expect("unix seconds");
        assert!(ts > 1_700_000_000, "{ts}");
    }

    // And the first event was retried after the 500s with the same id
    let first = &all[0].webhook_id;
    let tries: Vec<u16> = all
        .iter()
        .filter(|r| &r.webhook_id == first)
        .map(|r| r.status)
        .collect();
    assert_eq!(tries, [500, 500, 500, 204]);

    // And the operator sees the outcomes and the latency in the metrics
    let metrics = api.metrics().await;
    let outcome = |o: &str| deliveries(&metrics, o).unwrap_or(0.0);
    assert_eq!(outcome("failed"), 3.0);
    assert!(outcome("delivered") >= 12.0, "{metrics}");
    assert!(
        metric_sum(
            &metrics,
            "tandem_node_webhook_delivery_latency_seconds_count",
            &[]
        )
        .unwrap_or(0.0)
            >= 12.0
    );

    // And the webhook's cursor is no workflow backlog: the workflow reads as idle
    let mut conn = region.redis.client().await;
    redis_state::wait_workflow_idle(&mut conn, FLOW).await;
}

#[tokio::test]
async fn a_receiver_that_keeps_failing_gets_its_events_parked_and_a_delete_stops_deliveries() {
    // Given a node that tries each delivery twice, a webhook whose receiver always
    // answers 500, and another whose receiver is fine
    let region = Region::start_with(Default::default(), quick_retries(2)).await;
    let api = &region.api;
    let broken = WebhookReceiver::start().await;
    broken.set_failing(true);
    let fine = WebhookReceiver::start().await;
    let (broken_id, _) = subscribe(api, &broken.url()).await;
    subscribe(api, &fine.url()).await;
    api.put_product(WIDGET, 1000, 100).await;

    // When an order is placed and shipped
    let first = api
        .place_ok(&order_body("c-1", &[(WIDGET, 1)], "tok_ok"))
        .await;
    api.wait_status(&first, &["SHIPPED"], FLOW).await;

    // Then each of its events is tried twice at the broken receiver, then parked in
    // that webhook's dead-letter stream, while the fine one gets them all
    let conn = region.redis.client().await;
    let dlq = format!("tandem:webhook-dlq:{broken_id}");
    let parked = eventually(FLOW, "three events parked", || async {
        let mut conn = conn.clone();
        let entries: redis::streams::StreamRangeReply = redis::cmd("XRANGE")
            .arg(&dlq)
            .arg("-")
            .arg("+")
            .query_async(&mut conn)
            .await
            .unwrap();
        if entries.ids.len() == 3 {
            Ok(entries)
        } else {
            Err(entries.ids.len())
        }
    })
    .await;
    let published = integration_events(api, &first).await;
    let parked_ids: Vec<String> = parked
        .ids
        .iter()
        .map(|e| e.get::<String>("eventId").unwrap())
        .collect();
    let published_ids: Vec<String> = published
        .iter()
        .map(|e| e["event_id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(parked_ids, published_ids);
    // And the subscriber can read what it missed, paged
    let page = api
        .http
        .get(&format!(
            "/api/v1/webhooks/{broken_id}/dead-letters?limit=2"
        ))
        .await;
    assert_eq!(page.status, 200, "{}", page.text);
    let first_page = page.json["entries"].as_array().unwrap().clone();
    assert_eq!(first_page.len(), 2);
    assert_eq!(first_page[0]["event"], published[0]);
    assert_eq!(first_page[0]["attempts"], 2);
    assert_eq!(first_page[0]["error"], "HTTP 500");
    let next = page.json["next"].as_str().unwrap();
    let rest = api
        .http
        .get(&format!(
            "/api/v1/webhooks/{broken_id}/dead-letters?limit=2&after={next}"
        ))
        .await;
    assert_eq!(rest.json["entries"].as_array().unwrap().len(), 1);
    assert_eq!(
        rest.json["entries"][0]["eventId"],
        published_ids[2].as_str()
    );
    for bad in ["limit=0", "after=nope"] {
        let r = api
            .http
            .get(&format!("/api/v1/webhooks/{broken_id}/dead-letters?{bad}"))
            .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.text);
    }
    let unknown = api.http.get("/api/v1/webhooks/wh_nope/dead-letters").await;
    assert_eq!(unknown.status, 404, "{}", unknown.text);
    assert_eq!(broken.received().len(), 6, "two attempts per event");
    let what = "the fine receiver has all three";
    wait_delivered(&fine, std::slice::from_ref(&first), what).await;
    let metrics = api.metrics().await;
    assert_eq!(deliveries(&metrics, "parked"), Some(3.0));

    // When the broken webhook is deleted and another order goes through
    let r = api
        .http
        .request(
            Method::DELETE,
            &format!("/api/v1/webhooks/{broken_id}"),
            None,
            &[],
        )
        .await;
    assert_eq!(r.status, 204, "{}", r.text);
    broken.set_failing(false);
    let tried_before = broken.received().len();
    let second = api
        .place_ok(&order_body("c-2", &[(WIDGET, 1)], "tok_ok"))
        .await;
    api.wait_status(&second, &["SHIPPED"], FLOW).await;

    // Then the fine receiver gets its events and the deleted webhook's receiver none
    let what = "the fine receiver has the second order's events";
    wait_delivered(&fine, std::slice::from_ref(&second), what).await;
    assert_eq!(broken.received().len(), tried_before);
    // And the deleted webhook's cursor goes with it
    let group = format!("webhook:{broken_id}");
    eventually(FLOW, "the deleted webhook's group destroyed", || async {
        let groups = event_groups(&conn).await.expect("XINFO GROUPS");
        let names: Vec<String> = groups.into_iter().map(|g| g.name).collect();
        if names.contains(&group) {
            Err(names)
        } else {
            Ok(())
        }
    })
    .await;
}

/// The consumer groups of the event stream; `None` when XINFO fails (no stream yet).
async fn event_groups(
    conn: &redis::aio::MultiplexedConnection,
) -> Option<Vec<redis::streams::StreamInfoGroup>> {
    let mut conn = conn.clone();
    let info: redis::streams::StreamInfoGroupsReply = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(redis_state::EVENTS)
        .query_async(&mut conn)
        .await
        .ok()?;
    Some(info.groups)
}

/// The `(last-delivered-id, pending)` of a consumer group, if it exists.
async fn group_position(
    conn: &redis::aio::MultiplexedConnection,
    group: &str,
) -> Option<(String, usize)> {
    event_groups(conn)
        .await?
        .into_iter()
        .find(|g| g.name == group)
        .map(|g| (g.last_delivered_id, g.pending))
}

#[tokio::test]
async fn the_new_active_region_resumes_deliveries_after_a_takeover() {
    // Given two regions (a active, b standby) with quick webhook retries and a webhook
    // subscribed on a, whose receiver accepted every event of a first wave of orders,
    // and b's copy of the webhook's cursor stands past them
    let mut t =
        system_tests::takeover::Takeover::start_with_both(quick_retries(100), quick_retries(100))
            .await;
    let (a, b) = (t.api_a(), t.api_b());
    let receiver = WebhookReceiver::start().await;
    let (hook, secret) = subscribe(&a, &receiver.url()).await;
    a.put_product(WIDGET, 1000, 100).await;
    let wave1 = place_orders(&a, "c-1-", 3).await;
    for id in &wave1 {
        a.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    wait_delivered(&receiver, &wave1, "the first wave delivered").await;
    let group = format!("webhook:{hook}");
    let (conn_a, conn_b) = (t.conn_a().await, t.conn_b().await);
    eventually(FLOW, "b holds a's webhook cursor", || async {
        let on_a = group_position(&conn_a, &group).await;
        let on_b = group_position(&conn_b, &group).await;
        match (&on_a, &on_b) {
            (Some((a_id, 0)), Some((b_id, 0))) if a_id == b_id => Ok(()),
            _ => Err((on_a, on_b)),
        }
    })
    .await;
    let wave1_accepted = receiver.accepted().len();

    // When the receiver fails while a second wave is placed (a keeps retrying it),
    // region a dies, b is promoted, and the receiver recovers
    receiver.set_failing(true);
    let before_wave2 = receiver.received().len();
    let wave2 = place_orders(&a, "c-2-", 2).await;
    eventually(FLOW, "a is retrying the second wave", || async {
        let n = receiver.received().len();
        if n >= before_wave2 + 2 {
            Ok(())
        } else {
            Err(n)
        }
    })
    .await;
    t.wait_b_caught_up().await;
    t.node_a.kill();
    t.rep_a.kill();
    let r = b.promote(2).await;
    assert_eq!(r.status, 200, "promote b: {}", r.text);
    receiver.set_failing(false);

    // Then b delivers every event of the second wave, each order's in order
    for id in &wave2 {
        b.wait_status(id, &["SHIPPED"], FLOW).await;
    }
    let got = wait_delivered(&receiver, &wave2, "the second wave delivered by b").await;
    for id in wave1.iter().chain(&wave2) {
        let published = integration_events(&b, id).await;
        assert_eq!(
            got[id], published,
            "order {id}: delivered == published on b"
        );
    }

    // And it resumed where a stopped: nothing of the first wave came again
    let accepted = receiver.accepted();
    let wave1_ids: BTreeSet<String> = accepted[..wave1_accepted]
        .iter()
        .map(|r| r.webhook_id.clone())
        .collect();
    let again: Vec<&Received> = accepted[wave1_accepted..]
        .iter()
        .filter(|r| wave1_ids.contains(&r.webhook_id))
        .collect();
    assert!(
        again.is_empty(),
        "redelivered after the takeover: {again:?}"
    );

    // And every request, from either region, is signed with the one secret
    assert!(receiver.received().iter().all(|r| r.verifies(&secret)));
    let metrics = b.metrics().await;
    assert!(
        deliveries(&metrics, "delivered").unwrap_or(0.0) >= 6.0,
        "b delivered the second wave: {metrics}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_of_one_region_deliver_each_event_once_in_order() {
    // Given two nodes on one Redis and a webhook
    let redis = system_tests::redis_server::RedisServer::start().await;
    let nodes = [
        system_tests::node::Node::start(NodeOptions::new(redis.url())).await,
        system_tests::node::Node::start(NodeOptions::new(redis.url())).await,
    ];
    for n in &nodes {
        n.wait_ready().await;
    }
    let apis = [Api::new(nodes[0].http()), Api::new(nodes[1].http())];
    let receiver = WebhookReceiver::start().await;
    // A slow subscriber: events pile up while one is being delivered.
    receiver.set_delay_ms(20);
    subscribe(&apis[0], &receiver.url()).await;
    apis[0].put_product(WIDGET, 1000, 1000).await;

    // When orders are placed through both, at once
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let api = apis[i % 2].clone();
        set.spawn(async move {
            api.place_ok(&order_body(&format!("c-{i}"), &[(WIDGET, 1)], "tok_ok"))
                .await
        });
    }
    let mut orders = Vec::new();
    while let Some(id) = set.join_next().await {
        orders.push(id.unwrap());
    }

    // Then every status change is delivered once (the receiver never failed), each
    // order's in order: one node of the region delivers the webhook
    let got = wait_delivered(&receiver, &orders, "every order's three events").await;
    for id in &orders {
        assert_eq!(transitions(&got[id]), pairs(&DELIVERED_PATH[..3]), "{id}");
    }
    assert_eq!(
        receiver.received().len(),
        orders.len() * 3,
        "each event once"
    );
}

#[tokio::test]
async fn a_receiver_that_hangs_does_not_slow_order_handling() {
    // Given a webhook whose receiver takes 20 s to answer (deliveries time out after 5 s)
    let region = Region::start_with(Default::default(), |o| {
        o.env("NODE_WEBHOOK_TIMEOUT_MS", 5000)
    })
    .await;
    let api = &region.api;
    let receiver = WebhookReceiver::start().await;
    receiver.set_delay_ms(20_000);
    subscribe(api, &receiver.url()).await;
    api.put_product(WIDGET, 1000, 100).await;

    // When orders are placed
    let started = std::time::Instant::now();
    let orders = place_orders(api, "c-", 5).await;

    // Then they are all shipped long before even one delivery could have timed out:
    // the deliveries wait on their own
    for id in &orders {
        api.wait_status(id, &["SHIPPED"], std::time::Duration::from_secs(4))
            .await;
    }
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // And the hanging delivery times out, counted as failed, and is retried
    eventually(FLOW, "a delivery attempt timed out", || async {
        let m = api.metrics().await;
        match deliveries(&m, "failed") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(other),
        }
    })
    .await;
}

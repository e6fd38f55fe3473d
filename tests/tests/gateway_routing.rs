//! The gateway in front of two real regions: who becomes active, where requests go,
//! what every response says, and the gateway's own limits and admin guard.

use std::time::Duration;

use serde_json::json;
use system_tests::gateway::metric as metric_sum;
use system_tests::gateway::{run_gateway_expecting_exit, Gateway, GatewayOptions, TwoRegions};
use system_tests::order_body;

const SETTLE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_makes_the_primary_active_and_routes_orders_there() {
    // Given two regions that are both standby, and a gateway with primary a
    let regions = TwoRegions::start(false).await;
    let mut gw = Gateway::start(GatewayOptions::new(&regions.regions())).await;

    // Then the gateway promotes a at epoch 1
    let epoch = gw.wait_active("a", 1, SETTLE).await;
    assert_eq!(epoch, 1);
    let role = regions.a.node.role().await;
    assert_eq!(role["role"], "active");
    assert_eq!(role["epoch"], 1);
    assert_eq!(regions.b.node.role().await["role"], "standby");

    // When a client places an order through the gateway
    let api = gw.api();
    api.put_product("GW-1", 1000, 10).await;
    let placed = api
        .http
        .post_with_headers(
            "/orders",
            &order_body("c-1", &[("GW-1", 2)], "tok_ok"),
            &[
                ("X-Request-Id", "req-from-client-1"),
                ("Idempotency-Key", "gw-k-1"),
            ],
        )
        .await;

    // Then region a served it, and the response says so
    assert_eq!(placed.status, 201, "{}", placed.text);
    assert_eq!(placed.header("x-region"), Some("a"));
    assert_eq!(placed.header("x-request-id"), Some("req-from-client-1"));
    let id = placed.json["orderId"].as_str().unwrap().to_string();
    let got = api.order(&id).await;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-region"), Some("a"));
    assert!(
        got.header("x-request-id").is_some_and(|v| !v.is_empty()),
        "a request without an id gets one"
    );
    // And the order reached region a's node itself
    assert_eq!(regions.a.node.api().order(&id).await.status, 200);

    // And the gateway's view and metrics agree
    let view = gw.regions().await;
    assert_eq!(view["active"], "a");
    assert_eq!(view["epoch"], 1);
    let ids: Vec<&str> = view["regions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["a", "b"]);
    let metrics = gw.metrics().await;
    assert_eq!(
        metric_sum(
            &metrics,
            "tandem_gateway_requests_total",
            &[
                ("region", "a"),
                ("route", "/orders/{orderId}"),
                ("method", "GET")
            ]
        ),
        Some(1.0),
        "{metrics}"
    );
    assert!(!metrics.contains(&id), "raw ids must not become labels");
    assert_eq!(
        metric_sum(&metrics, "tandem_gateway_active_region", &[("region", "a")]),
        Some(1.0)
    );
    assert_eq!(metric_sum(&metrics, "tandem_gateway_epoch", &[]), Some(1.0));
    assert_eq!(
        metric_sum(
            &metrics,
            "tandem_gateway_region_healthy",
            &[("region", "b")]
        ),
        Some(1.0)
    );
    assert!(metrics.contains("tandem_gateway_request_duration_seconds_bucket"));
    assert_eq!(
        metric_sum(
            &metrics,
            "tandem_gateway_failovers_total",
            &[("from", "a"), ("to", "b")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "tandem_gateway_retries_total",
            &[("reason", "timeout")]
        ),
        Some(0.0)
    );

    // The nodes' admin API is not reachable through the public endpoint
    assert_eq!(gw.http().get("/admin/role").await.status, 404);

    // And SIGTERM stops the gateway cleanly
    let status = gw.terminate(Duration::from_secs(10)).await;
    assert!(status.success(), "exit status {status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_go_to_any_healthy_region_when_configured_and_drained_regions_get_none() {
    // Given reads allowed from any region
    let regions = TwoRegions::start(false).await;
    let gw =
        Gateway::start(GatewayOptions::new(&regions.regions()).env("GATEWAY_READ_POLICY", "any"))
            .await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.wait_healthy(&["a", "b"], SETTLE).await;

    // When reading many times, both regions serve
    let mut served = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let r = gw.http().get("/api/v1/products/NOPE").await;
        served.insert(r.header("x-region").unwrap_or("-").to_string());
    }
    assert_eq!(served.into_iter().collect::<Vec<_>>(), ["a", "b"]);

    // When b is drained, only a serves
    let drained = gw.admin().post_empty("/gateway/regions/b/drain").await;
    assert_eq!(drained.status, 200, "{}", drained.text);
    for _ in 0..10 {
        let r = gw.http().get("/api/v1/products/NOPE").await;
        assert_eq!(r.header("x-region"), Some("a"));
    }
    let view = gw.regions().await;
    assert_eq!(view["regions"][1]["drained"], true);

    // And undrained, b serves again
    assert_eq!(
        gw.admin()
            .post_empty("/gateway/regions/b/undrain")
            .await
            .status,
        200
    );
    let mut b_served = false;
    for _ in 0..10 {
        b_served |= gw
            .http()
            .get("/api/v1/products/NOPE")
            .await
            .header("x-region")
            == Some("b");
    }
    assert!(b_served);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_limits_answer_413_429_and_401() {
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_MAX_BODY_BYTES", 1024)
            .env("GATEWAY_RATE_LIMIT_PER_SEC", 5)
            .env("GATEWAY_RATE_LIMIT_BURST", 5)
            .env("GATEWAY_MAX_HEADER_BYTES", 2048),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;

    // An oversized body is refused before any region sees it
    let big = gw.http().post_raw("/orders", vec![b'x'; 4096]).await;
    assert_eq!(big.status, 413, "{}", big.text);
    assert_eq!(big.error_code(), "payload_too_large");

    // Oversized headers are refused too
    let long = "x".repeat(4096);
    let headers = gw
        .http()
        .request(
            reqwest::Method::GET,
            "/api/v1/products/NOPE",
            None,
            &[("x-long", &long)],
        )
        .await;
    assert_eq!(headers.status, 431, "{}", headers.text);
    assert_eq!(headers.error_code(), "headers_too_large");

    // Admin endpoints need the gateway's token
    let anon = gw
        .http()
        .post("/gateway/failover", &json!({"to": "b"}))
        .await;
    assert_eq!(anon.status, 401);
    assert_eq!(anon.error_code(), "unauthorized");
    let wrong = gw
        .http()
        .with_token("not-the-token")
        .post_empty("/gateway/regions/b/drain")
        .await;
    assert_eq!(wrong.status, 401);
    assert_eq!(gw.regions().await["regions"][1]["drained"], false);

    // Past the burst, a client gets 429 with Retry-After
    let mut limited = None;
    for _ in 0..20 {
        let r = gw.http().get("/api/v1/products/NOPE").await;
        if r.status == 429 {
            limited = Some(r);
            break;
        }
    }
    let limited = limited.expect("no 429 after 20 quick requests at 5/s");
    assert_eq!(limited.error_code(), "rate_limited");
    let retry_after: u64 = limited.header("retry-after").unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let metrics = gw.metrics().await;
    assert!(metric_sum(
        &metrics,
        "tandem_gateway_rejected_total",
        &[("code", "rate_limited")]
    )
    .is_some_and(|n| n >= 1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_post_to_a_hung_region_times_out_and_is_never_sent_twice() {
    // Given a short attempt deadline and b drained, so no failover can happen
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_ATTEMPT_TIMEOUT_MS", 400)
            .env("GATEWAY_REQUEST_TIMEOUT_MS", 2000),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.api().put_product("HANG-1", 100, 10).await;
    assert_eq!(
        gw.admin()
            .post_empty("/gateway/regions/b/drain")
            .await
            .status,
        200
    );

    // When a hangs and a client sends a POST without an Idempotency-Key
    regions.a.node.pause();
    let started = std::time::Instant::now();
    let r = gw
        .api()
        .place_order(&order_body("c-h", &[("HANG-1", 1)], "tok_ok"))
        .await;
    let took = started.elapsed();
    regions.a.node.resume();

    // Then the gateway answers 504 within the attempt deadline and sent it nowhere else
    assert_eq!(r.status, 504, "{}", r.text);
    assert_eq!(r.error_code(), "gateway_timeout");
    assert!(took < Duration::from_millis(1500), "took {took:?}");
    let m = gw.metrics().await;
    assert_eq!(
        metric_sum(&m, "tandem_gateway_retries_total", &[]),
        Some(0.0),
        "{m}"
    );
}

#[test]
fn bad_configuration_exits_64_naming_the_key() {
    let (code, out) = run_gateway_expecting_exit(&[
        (
            "GATEWAY_REGIONS",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
        ),
        ("GATEWAY_HEALTH_INTERVAL_MS", "soon"),
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("health_interval_ms"), "{out}");

    let (code, out) = run_gateway_expecting_exit(&[("GATEWAY_REGIONS", "a=http://127.0.0.1:1")]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("regions"), "{out}");

    let (code, out) = run_gateway_expecting_exit(&[
        (
            "GATEWAY_REGIONS",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
        ),
        ("GATEWAY_PRIMARY", "c"),
    ]);
    assert_eq!(code, 64, "{out}");
    assert!(out.contains("primary"), "{out}");
}

//! TLS on the public listener, and the epoch the gateway persists across restarts.

use std::time::Duration;

use system_tests::gateway::{test_certificates, Gateway, GatewayOptions, TwoRegions};
use system_tests::order_body;
use system_tests::workdir::WorkDir;

const SETTLE: Duration = Duration::from_secs(15);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_over_https_with_a_rustls_client() {
    // Given a gateway with a certificate from a test CA
    let regions = TwoRegions::start(false).await;
    let certs = WorkDir::new("gw-certs");
    let (ca, cert, key) = test_certificates(certs.path());
    let gw = Gateway::start(GatewayOptions::new(&regions.regions()).tls(&cert, &key)).await;
    gw.wait_active("a", 1, SETTLE).await;

    // When a rustls client that trusts only that CA places an order
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let client = reqwest::Client::builder()
        .add_root_certificate(root)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let base = format!("https://localhost:{}", gw.port());
    let put = client
        .put(format!("{base}/api/v1/products/TLS-1"))
        .json(&serde_json::json!({"name":"T","price":500,"currency":"USD","stock":5}))
        .send()
        .await
        .expect("TLS handshake and PUT");
    assert!(put.status().is_success(), "{:?}", put.status());
    let resp = client
        .post(format!("{base}/orders"))
        .header("Idempotency-Key", "tls-1")
        .json(&order_body("c-tls", &[("TLS-1", 1)], "tok_ok"))
        .send()
        .await
        .unwrap();

    // Then it is served by the active region over TLS
    assert_eq!(resp.status(), 201);
    assert_eq!(resp.headers()["x-region"], "a");
    let order: serde_json::Value = resp.json().await.unwrap();
    let id = order["orderId"].as_str().unwrap();
    let got = client
        .get(format!("{base}/orders/{id}"))
        .send()
        .await
        .unwrap();
    assert_eq!(got.status(), 200);

    // And a plain-HTTP client gets no answer on the TLS port
    let plain = gw
        .http()
        .try_request(reqwest::Method::GET, "/gateway/health", None, &[])
        .await;
    assert!(plain.is_err() || plain.unwrap().status != 200);

    // And HTTP/2 is offered through ALPN (curl, when installed, shows the version)
    if let Ok(out) = std::process::Command::new("curl")
        .args([
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version}",
            "--http2",
            "--cacert",
        ])
        .arg(&ca)
        .arg(format!("{base}/gateway/health"))
        .output()
    {
        let version = String::from_utf8_lossy(&out.stdout).to_string();
        if out.status.success() && !version.is_empty() {
            assert_eq!(version, "2", "curl negotiated HTTP/{version}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restart_keeps_its_epoch_and_never_reuses_a_lower_one() {
    // Given a gateway that made a active at epoch 1, then switched over to b at epoch 2
    let regions = TwoRegions::start(false).await;
    let state = WorkDir::new("gw-state");
    let mut gw =
        Gateway::start(GatewayOptions::new(&regions.regions()).state_dir(state.path())).await;
    gw.wait_active("a", 1, SETTLE).await;
    let sw = gw
        .admin()
        .post("/gateway/failover", &serde_json::json!({"to": "b"}))
        .await;
    assert_eq!(sw.status, 200, "{}", sw.text);
    assert_eq!(sw.json["active"], "b");
    assert_eq!(sw.json["epoch"], 2);
    assert_eq!(sw.json["previous"], "a");
    assert_eq!(sw.json["lostEvents"], 0);

    // When the gateway restarts
    gw.restart().await;

    // Then it adopts b at epoch 2 rather than promoting its primary again
    let epoch = gw.wait_active("b", 2, SETTLE).await;
    assert_eq!(epoch, 2);
    assert_eq!(regions.a.node.role().await["role"], "standby");
    let persisted = std::fs::read_to_string(state.path().join("epoch.json")).unwrap();
    assert!(persisted.contains("\"epoch\":2"), "{persisted}");
    drop(gw);

    // And in front of fresh regions (no epoch anywhere) it starts above what it used
    let fresh = TwoRegions::start(false).await;
    let gw2 = Gateway::start(GatewayOptions::new(&fresh.regions()).state_dir(state.path())).await;
    let epoch = gw2.wait_active("a", 3, SETTLE).await;
    assert_eq!(epoch, 3, "a restarted gateway must not reuse epoch 1 or 2");
    assert_eq!(fresh.a.node.role().await["epoch"], 3);
}

//! The gateway as an OAuth2 resource server (API.md "Security"): every forged, stale or
//! misdirected token is refused with the RFC 6750 answer and writes nothing; scopes
//! per route; customers reach only their own orders; the JWKS rotates without a
//! restart, from a file or over HTTPS with a pinned CA.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::{json, Value};
use system_tests::gateway::metric;
use system_tests::gateway::{run_gateway_expecting_exit, Gateway, GatewayOptions, TwoRegions};
use system_tests::http::{HttpClient, Response};
use system_tests::redis_state;
use system_tests::tokens::{
    claims, hmac_token, now, tampered, unsigned_token, write_jwks, JwksServer, SigningKey,
    AUDIENCE, ISSUER,
};
use system_tests::workdir::WorkDir;
use system_tests::{eventually, order_body};

const SETTLE: Duration = Duration::from_secs(15);
const CHALLENGE: &str = "Bearer realm=\"tandem\"";
const INVALID: &str = "Bearer error=\"invalid_token\"";

fn auth_options(regions: &TwoRegions, jwks: &str) -> GatewayOptions {
    GatewayOptions::new(&regions.regions())
        .env("GATEWAY_AUTH_JWKS", jwks)
        .env("GATEWAY_AUTH_ISSUER", ISSUER)
        .env("GATEWAY_AUTH_AUDIENCE", AUDIENCE)
}

/// A request with exactly these Authorization values (none, one, or several).
async fn call(
    gw: &Gateway,
    method: Method,
    path: &str,
    body: Option<&Value>,
    authorization: &[&str],
) -> Response {
    let headers: Vec<(&str, &str)> = authorization
        .iter()
        .map(|v| ("authorization", *v))
        .collect();
    gw.http()
        .request(
            method,
            path,
            body.map(|b| serde_json::to_vec(b).expect("json")),
            &headers,
        )
        .await
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

fn as_user(gw: &Gateway, token: &str) -> HttpClient {
    gw.http().with_token(token)
}

/// Two regions behind a gateway that trusts `keys` (a JWKS file in `dir`), region a
/// active. The regions are handed back so that they live as long as the test.
async fn gateway_trusting(dir: &WorkDir, keys: &[&SigningKey]) -> (TwoRegions, Gateway) {
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, keys);
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(auth_options(&regions, &jwks.display().to_string())).await;
    gw.wait_active("a", 1, SETTLE).await;
    (regions, gw)
}

/// Puts product `sku` (10 in stock) through the gateway as the catalog writer `ops`.
async fn put_widget(ops: &HttpClient, sku: &str, price: u64) {
    let put = ops
        .put(
            &format!("/api/v1/products/{sku}"),
            &json!({"name": "Widget", "price": price, "currency": "USD", "stock": 10}),
        )
        .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_forged_stale_or_misdirected_token_is_refused_and_writes_nothing() {
    // Given a gateway checking tokens against a JWKS file with an RSA and an EC key
    let dir = WorkDir::new("auth-keys");
    let rsa = SigningKey::rsa(dir.path(), "rsa-1");
    let ec = SigningKey::ec(dir.path(), "ec-1");
    let stranger = SigningKey::rsa(dir.path(), "stranger");
    let (regions, gw) = gateway_trusting(&dir, &[&rsa, &ec]).await;

    // And a product put by a catalog writer (RS256), and nothing else going on
    let ops = as_user(&gw, &rsa.sign(&claims("ops", "catalog:write")));
    put_widget(&ops, "AUTH-1", 1000).await;
    let mut redis_a = regions.a.redis.client().await;
    let mut redis_b = regions.b.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis_a, SETTLE).await;
    let before_a = redis_state::snapshot(&mut redis_a).await;
    let before_b = redis_state::snapshot(&mut redis_b).await;

    // When orders are placed for c-1 with every kind of bad credential
    let order = order_body("c-1", &[("AUTH-1", 1)], "tok_ok");
    let t = now();
    let good = claims("c-1", "orders:write orders:read");
    let with = |patch: Value| {
        let mut c = good.clone();
        for (k, v) in patch.as_object().expect("object") {
            if v.is_null() {
                c.as_object_mut().expect("object").remove(k);
            } else {
                c[k] = v.clone();
            }
        }
        c
    };
    let other_customer = rsa.sign(&claims("c-2", "orders:write"));
    let attacks: Vec<(&str, Vec<String>, u16, &str, &str)> = vec![
        ("no token", vec![], 401, CHALLENGE, "missing_token"),
        (
            "another scheme",
            vec!["Basic YzE6cGFzc3dvcmQ=".into()],
            401,
            CHALLENGE,
            "missing_token",
        ),
        (
            "not a JWT",
            vec![bearer("not-a-jwt")],
            401,
            INVALID,
            "malformed",
        ),
        (
            "expired beyond the leeway",
            vec![bearer(&rsa.sign(&with(
                json!({"iat": t - 3600, "nbf": t - 3600, "exp": t - 120}),
            )))],
            401,
            INVALID,
            "expired",
        ),
        (
            "not yet valid beyond the leeway",
            vec![bearer(&ec.sign(&with(json!({"nbf": t + 120}))))],
            401,
            INVALID,
            "not_yet_valid",
        ),
        (
            "wrong issuer",
            vec![bearer(
                &rsa.sign(&with(json!({"iss": "https://evil.example/"}))),
            )],
            401,
            INVALID,
            "wrong_issuer",
        ),
        (
            "wrong audience",
            vec![bearer(&rsa.sign(&with(json!({"aud": "another-api"}))))],
            401,
            INVALID,
            "wrong_audience",
        ),
        (
            "no exp",
            vec![bearer(&rsa.sign(&with(json!({"exp": null}))))],
            401,
            INVALID,
            "missing_claim",
        ),
        (
            "no sub",
            vec![bearer(&rsa.sign(&with(json!({"sub": null}))))],
            401,
            INVALID,
            "missing_claim",
        ),
        (
            "signed by a key not in the set, naming a key that is",
            vec![bearer(&stranger.sign_as("rsa-1", &good))],
            401,
            INVALID,
            "bad_signature",
        ),
        (
            "tampered payload (c-2's token claiming c-1)",
            vec![bearer(&tampered(&other_customer, &good))],
            401,
            INVALID,
            "bad_signature",
        ),
        (
            "unknown kid",
            vec![bearer(&stranger.sign(&good))],
            401,
            INVALID,
            "unknown_kid",
        ),
        (
            "alg none",
            vec![bearer(&unsigned_token("rsa-1", &good))],
            401,
            INVALID,
            "algorithm",
        ),
        (
            "HS256 keyed with the RSA public key",
            vec![bearer(&hmac_token("rsa-1", &rsa.public_pem, &good))],
            401,
            INVALID,
            "algorithm",
        ),
        (
            "ES256 token naming the RSA key",
            vec![bearer(&ec.sign_as("rsa-1", &good))],
            401,
            INVALID,
            "algorithm",
        ),
        (
            "two Authorization headers",
            vec![bearer(&rsa.sign(&good)), bearer(&rsa.sign(&good))],
            401,
            INVALID,
            "malformed",
        ),
        (
            "missing scope",
            vec![bearer(&rsa.sign(&claims("c-1", "orders:read")))],
            403,
            "Bearer error=\"insufficient_scope\", scope=\"orders:write\"",
            "insufficient_scope",
        ),
        (
            "an order for another customer",
            vec![bearer(&other_customer)],
            403,
            "Bearer error=\"insufficient_scope\", scope=\"orders:admin\"",
            "not_owner",
        ),
    ];
    let mut expected_reasons: std::collections::BTreeMap<&str, f64> = Default::default();
    for (name, authorization, status, challenge, reason) in &attacks {
        let values: Vec<&str> = authorization.iter().map(String::as_str).collect();
        let r = call(&gw, Method::POST, "/orders", Some(&order), &values).await;
        // Then each gets the documented answer
        assert_eq!(r.status, *status, "{name}: {}", r.text);
        let code = if *status == 401 {
            "unauthorized"
        } else {
            "insufficient_scope"
        };
        assert_eq!(r.error_code(), code, "{name}: {}", r.text);
        assert_eq!(r.header("www-authenticate"), Some(*challenge), "{name}");
        assert!(r.header("x-request-id").is_some(), "{name}");
        *expected_reasons.entry(reason).or_default() += 1.0;
    }

    // And nothing was written in either region
    let after_a = redis_state::snapshot(&mut redis_a).await;
    let after_b = redis_state::snapshot(&mut redis_b).await;
    redis_state::assert_unchanged(&before_a, &after_a, "region a after the attacks");
    redis_state::assert_unchanged(&before_b, &after_b, "region b after the attacks");

    // And every refusal is counted by reason
    let metrics = gw.metrics().await;
    for (reason, n) in &expected_reasons {
        assert_eq!(
            metric(
                &metrics,
                "tandem_gateway_auth_failures_total",
                &[("reason", reason)]
            ),
            Some(*n),
            "{reason}\n{metrics}"
        );
    }

    // And tokens within the 60 s leeway, or with our audience among several, are good
    let read = |token: String| {
        let gw = &gw;
        async move {
            call(
                gw,
                Method::GET,
                "/api/v1/products/AUTH-1",
                None,
                &[&bearer(&token)],
            )
            .await
        }
    };
    for (name, c) in [
        ("expired 30 s ago", with(json!({"exp": t - 30}))),
        ("valid in 30 s", with(json!({"nbf": t + 30}))),
        ("audience list", with(json!({"aud": ["other", AUDIENCE]}))),
        ("no scope at all", with(json!({"scope": null}))),
    ] {
        let r = read(ec.sign(&c)).await;
        assert_eq!(r.status, 200, "{name}: {}", r.text);
    }

    // And health probes, the gateway's own endpoints and metrics need no token
    for path in [
        "/health/ready",
        "/health/live",
        "/gateway/regions",
        "/gateway/health",
        "/metrics",
    ] {
        let r = gw.http().get(path).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text);
    }
    // But product reads do
    let r = gw.http().get("/api/v1/products/AUTH-1").await;
    assert_eq!(r.status, 401);

    // And a good token places the order, for its own customer
    let placed = as_user(&gw, &ec.sign(&good)).post("/orders", &order).await;
    assert_eq!(placed.status, 201, "{}", placed.text);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn customers_reach_only_their_own_orders() {
    // Given a gateway with auth, a product, and an order placed by customer c-1
    let dir = WorkDir::new("auth-keys");
    let key = SigningKey::ec(dir.path(), "ec-1");
    let (regions, gw) = gateway_trusting(&dir, &[&key]).await;
    let ops = as_user(&gw, &key.sign(&claims("ops", "catalog:write")));
    put_widget(&ops, "OWN-1", 500).await;
    let c1 = as_user(&gw, &key.sign(&claims("c-1", "orders:read orders:write")));
    let c2 = as_user(&gw, &key.sign(&claims("c-2", "orders:read orders:write")));
    let admin = as_user(
        &gw,
        &key.sign(&claims(
            "support-7",
            "orders:read orders:write orders:admin",
        )),
    );
    let placed = c1
        .post(
            "/orders",
            &order_body("c-1", &[("OWN-1", 1)], "tok_decline"),
        )
        .await;
    let id = placed.order_id();
    // (a declined payment leaves it PAYMENT_FAILED: terminal, so nothing moves after this)
    let final_state = eventually(SETTLE, "order settles", || {
        let c1 = c1.clone();
        let id = id.clone();
        async move {
            let r = c1.get(&format!("/orders/{id}")).await;
            if r.json["status"] == "PAYMENT_FAILED" {
                Ok(r)
            } else {
                Err(r.json)
            }
        }
    })
    .await;
    assert_eq!(final_state.json["customerId"], "c-1");
    let mut redis = regions.a.redis.client().await;
    redis_state::wait_workflow_idle(&mut redis, SETTLE).await;
    let before = redis_state::snapshot(&mut redis).await;

    // When c-2 reads it, it is not found — exactly as an order that does not exist
    let theirs = c2.get(&format!("/orders/{id}")).await;
    let missing = c2.get("/orders/no-such-order").await;
    assert_eq!(theirs.status, 404, "{}", theirs.text);
    assert_eq!(theirs.error_code(), "not_found");
    assert_eq!(
        theirs.json["error"]["message"],
        format!("order {id} not found")
    );
    assert_eq!(missing.status, 404);
    assert_eq!(
        theirs
            .json
            .as_object()
            .map(|o| o.keys().collect::<Vec<_>>()),
        missing
            .json
            .as_object()
            .map(|o| o.keys().collect::<Vec<_>>())
    );
    assert!(!theirs.text.contains("c-1"), "{}", theirs.text);

    // And when c-2 cancels it, it is not found and nothing is written
    let cancel = c2.post_empty(&format!("/orders/{id}/cancel")).await;
    assert_eq!(cancel.status, 404, "{}", cancel.text);
    assert_eq!(cancel.error_code(), "not_found");
    // And c-2 cannot place an order in c-1's name, nor smuggle c-1 in a second customerId
    let as_c1 = c2
        .post("/orders", &order_body("c-1", &[("OWN-1", 1)], "tok_ok"))
        .await;
    assert_eq!(as_c1.status, 403, "{}", as_c1.text);
    assert_eq!(as_c1.error_code(), "insufficient_scope");
    let smuggled = c2
        .post_raw(
            "/orders",
            br#"{"customerId":"c-2","items":[{"sku":"OWN-1","quantity":1}],"shippingAddress":"x","customerId":"c-1"}"#.to_vec(),
        )
        .await;
    assert_eq!(smuggled.status, 400, "{}", smuggled.text);
    assert_eq!(smuggled.error_code(), "malformed_json");
    let after = redis_state::snapshot(&mut redis).await;
    redis_state::assert_unchanged(&before, &after, "another customer's attempts");
    let metrics = gw.metrics().await;
    assert_eq!(
        metric(
            &metrics,
            "tandem_gateway_auth_failures_total",
            &[("reason", "not_owner")]
        ),
        Some(3.0),
        "{metrics}"
    );

    // But c-1 and an orders:admin token see it
    assert_eq!(c1.get(&format!("/orders/{id}")).await.status, 200);
    let seen = admin.get(&format!("/orders/{id}")).await;
    assert_eq!(seen.status, 200, "{}", seen.text);
    assert_eq!(seen.json["customerId"], "c-1");
    // And an admin may place for a customer, and that customer cancel it
    let for_c1 = admin
        .post("/orders", &order_body("c-1", &[("OWN-1", 1)], "tok_ok"))
        .await;
    assert_eq!(for_c1.status, 201, "{}", for_c1.text);
    let id2 = for_c1.json["orderId"]
        .as_str()
        .expect("orderId")
        .to_string();
    let cancelled = c1
        .post(
            &format!("/orders/{id2}/cancel"),
            &json!({"reason": "changed my mind"}),
        )
        .await;
    assert!(
        cancelled.status == 200 || cancelled.status == 409,
        "{}",
        cancelled.text
    );
    assert_eq!(
        cancelled.json["customerId"].as_str().unwrap_or("c-1"),
        "c-1"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_jwks_with_a_pinned_ca_rotates_keys_without_restart() {
    // Given a JWKS served over HTTPS by a server whose certificate a test CA signed
    let dir = WorkDir::new("auth-https");
    let old = SigningKey::ec(dir.path(), "ec-old");
    let new = SigningKey::rsa(dir.path(), "rsa-new");
    let server = JwksServer::start(dir.path(), &[&old]).await;
    let regions = TwoRegions::start(false).await;
    let gw = Gateway::start(
        auth_options(&regions, &server.url())
            .env("GATEWAY_AUTH_JWKS_CA", server.ca().display())
            .env("GATEWAY_AUTH_JWKS_MIN_REFRESH_MS", 500)
            .env("GATEWAY_AUTH_JWKS_REFRESH_MS", 2_000),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    let read = |token: String| {
        let http = gw.http().with_token(token);
        async move { http.get("/api/v1/products/NONE").await }
    };
    // Then a token signed by the published key is accepted (the product does not exist)
    let r = read(old.sign(&claims("c-1", ""))).await;
    assert_eq!(r.status, 404, "{}", r.text);

    // When the provider starts signing with a key it has not published yet, refused
    let r = read(new.sign(&claims("c-1", ""))).await;
    assert_eq!(r.status, 401, "{}", r.text);

    // When it publishes the new key, tokens signed with it are accepted without a restart
    server.set_keys(&[&old, &new]);
    let started = Instant::now();
    eventually(SETTLE, "the rotated key is accepted", || {
        let r = read(new.sign(&claims("c-1", "")));
        async move {
            let r = r.await;
            if r.status == 404 {
                Ok(())
            } else {
                Err(json!([r.status, r.text]))
            }
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );

    // And a flood of made-up key ids does not hammer the JWKS server
    let fetches_before = server.fetches();
    let flood_started = Instant::now();
    for i in 0..200 {
        let r = read(new.sign_as(&format!("bogus-{i}"), &claims("c-1", ""))).await;
        assert_eq!(r.status, 401);
    }
    let allowed = (flood_started.elapsed().as_millis() / 500) as usize
        + 2
        + (flood_started.elapsed().as_millis() / 2_000) as usize;
    let fetched = server.fetches() - fetches_before;
    assert!(
        fetched <= allowed,
        "{fetched} fetches in {:?} for 200 unknown kids",
        flood_started.elapsed()
    );

    // And when the old key is withdrawn, its tokens stop working at the next refresh
    server.set_keys(&[&new]);
    eventually(SETTLE, "the withdrawn key is refused", || {
        let r = read(old.sign(&claims("c-1", "")));
        async move {
            let r = r.await;
            if r.status == 401 {
                Ok(())
            } else {
                Err(json!([r.status, r.text]))
            }
        }
    })
    .await;
    assert_eq!(read(new.sign(&claims("c-1", ""))).await.status, 404);
    let metrics = gw.metrics().await;
    assert_eq!(metric(&metrics, "tandem_gateway_jwks_keys", &[]), Some(1.0));
}

#[tokio::test]
async fn auth_configuration_errors_stop_the_start_with_the_key_named() {
    let dir = WorkDir::new("auth-config");
    let missing = dir.path().join("missing.json");
    let missing = missing.display().to_string();
    let base = [
        ("GATEWAY_LISTEN", "127.0.0.1:0"),
        (
            "GATEWAY_REGIONS",
            "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
        ),
    ];
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![
                ("GATEWAY_AUTH_JWKS", "http://idp.example/jwks.json"),
                ("GATEWAY_AUTH_ISSUER", ISSUER),
                ("GATEWAY_AUTH_AUDIENCE", AUDIENCE),
            ],
            "auth_jwks",
        ),
        (
            vec![
                ("GATEWAY_AUTH_JWKS", "/etc/jwks.json"),
                ("GATEWAY_AUTH_AUDIENCE", AUDIENCE),
            ],
            "auth_issuer",
        ),
        (
            vec![
                ("GATEWAY_AUTH_JWKS", "/etc/jwks.json"),
                ("GATEWAY_AUTH_ISSUER", ISSUER),
            ],
            "auth_audience",
        ),
        (
            vec![
                ("GATEWAY_AUTH_JWKS", missing.as_str()),
                ("GATEWAY_AUTH_ISSUER", ISSUER),
                ("GATEWAY_AUTH_AUDIENCE", AUDIENCE),
            ],
            "GATEWAY_AUTH_JWKS",
        ),
    ];
    for (extra, named) in cases {
        let env: Vec<(&str, &str)> = base.iter().copied().chain(extra).collect();
        let (code, output) = run_gateway_expecting_exit(&env);
        assert_eq!(code, 64, "{output}");
        assert!(output.contains(named), "{named}: {output}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_need_the_webhooks_write_scope() {
    // Given a gateway with auth in front of the regions
    let dir = WorkDir::new("auth-keys");
    let key = SigningKey::ec(dir.path(), "ec-1");
    let (_regions, gw) = gateway_trusting(&dir, &[&key]).await;
    let body = json!({"url": "https://example.com/hook", "events": ["order.status_updated"]});

    // When a caller without the scope manages webhooks, it is refused
    let orders = as_user(&gw, &key.sign(&claims("c-1", "orders:write events:read")));
    for (method, path) in [
        (Method::POST, "/api/v1/webhooks"),
        (Method::GET, "/api/v1/webhooks"),
        (Method::DELETE, "/api/v1/webhooks/wh_1"),
        (Method::GET, "/api/v1/webhooks/wh_1/dead-letters"),
    ] {
        let r = orders
            .request(
                method.clone(),
                path,
                Some(serde_json::to_vec(&body).unwrap()),
                &[],
            )
            .await;
        assert_eq!(r.status, 403, "{method} {path}: {}", r.text);
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer error=\"insufficient_scope\", scope=\"webhooks:write\""),
            "{method} {path}"
        );
    }

    // Then one with `webhooks:write` creates, lists and deletes them through the gateway
    let ops = as_user(&gw, &key.sign(&claims("ops", "webhooks:write")));
    let created = ops.post("/api/v1/webhooks", &body).await;
    assert_eq!(created.status, 201, "{}", created.text);
    let id = created.json["id"].as_str().unwrap().to_string();
    let list = ops.get("/api/v1/webhooks").await;
    assert_eq!(list.status, 200, "{}", list.text);
    assert_eq!(list.json["webhooks"][0]["id"], id.as_str());
    let deleted = ops
        .request(Method::DELETE, &format!("/api/v1/webhooks/{id}"), None, &[])
        .await;
    assert_eq!(deleted.status, 204, "{}", deleted.text);
}

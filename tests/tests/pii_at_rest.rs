//! Personal data at rest (API.md "Security", issue 10): payment tokens and shipping
//! addresses are sealed in events with a key ring both regions share, so neither
//! region's Redis (streams, keys, the AOF on disk) holds them in plain text; no public
//! answer contains a token; `/api/events` shows addresses only with `pii:read`; the
//! payments handler still charges after a failover, and keys rotate.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use reqwest::Method;
use serde_json::{json, Value};
use system_tests::api::{HAPPY_PATH_TO_SHIPPED, PAYMENT_FAILED_FLOW};
use system_tests::gateway::{Gateway, GatewayOptions, TwoRegions};
use system_tests::http::{HttpClient, Response};
use system_tests::process::workspace_binary;
use system_tests::redis_state::{self, Dumped, DERIVED_PATTERNS};
use system_tests::tokens::{claims, write_jwks, SigningKey, AUDIENCE, ISSUER};
use system_tests::workdir::WorkDir;
use system_tests::{Api, Node, RedisOptions, RedisServer, Region};

const SETTLE: Duration = Duration::from_secs(30);
/// Two test keys (32 bytes each, standard base64): bytes 0..32 and 32..64.
const K1: &str = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=";
const K2: &str = "ICEiIyQlJicoKSorLC0uLzAxMjM0NTY3ODk6Ozw9Pj8=";
const SKU: &str = "PII-1";

/// Text no other test run could have written: it is searched for byte by byte.
fn unique(label: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_nanos();
    format!("{label}{}x{nanos}", std::process::id())
}

fn order(customer: &str, address: &str, token: &str) -> Value {
    json!({
        "customerId": customer,
        "items": [{"sku": SKU, "quantity": 1}],
        "shippingAddress": address,
        "paymentToken": token,
    })
}

async fn get_as(http: &HttpClient, path: &str, headers: &[(&str, &str)]) -> Response {
    let r = http.request(Method::GET, path, None, headers).await;
    assert_eq!(r.status, 200, "GET {path}: {}", r.text);
    r
}

/// The OrderPlaced event of `order_id` as `/api/events?aggregateId=` answers it.
async fn placed_event(http: &HttpClient, order_id: &str, headers: &[(&str, &str)]) -> Value {
    let r = get_as(
        http,
        &format!("/api/events?aggregateId={order_id}"),
        headers,
    )
    .await;
    r.json["events"]
        .as_array()
        .and_then(|events| events.iter().find(|e| e["eventType"] == "OrderPlaced"))
        .cloned()
        .unwrap_or_else(|| panic!("no OrderPlaced for {order_id}: {}", r.text))
}

/// Every byte string a key holds: its name, and each value, field and member.
fn key_bytes(key: &str, value: &Dumped) -> Vec<Vec<u8>> {
    let mut out = vec![key.as_bytes().to_vec()];
    match value {
        Dumped::String(v) => out.push(v.clone()),
        Dumped::Hash(m) => {
            for (f, v) in m {
                out.push(f.as_bytes().to_vec());
                out.push(v.clone());
            }
        }
        Dumped::List(l) => out.extend(l.iter().cloned()),
        Dumped::Set(s) => out.extend(s.iter().cloned()),
        Dumped::ZSet(z) => out.extend(z.iter().map(|(m, _)| m.clone())),
        Dumped::Stream(entries) => {
            for (id, fields) in entries {
                out.push(id.as_bytes().to_vec());
                for (f, v) in fields {
                    out.push(f.as_bytes().to_vec());
                    out.push(v.clone());
                }
            }
        }
        Dumped::Other(kind) => panic!("key {key} of unexpected type {kind}"),
    }
    out
}

fn holds(haystack: &[u8], needle: &str) -> bool {
    haystack
        .windows(needle.len())
        .any(|w| w == needle.as_bytes())
}

/// Every file under `dir` (the AOF directory included) with its bytes.
fn files_under(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read data dir").flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else if let Ok(bytes) = std::fs::read(&path) {
            out.push((path.display().to_string(), bytes));
        }
    }
    out
}

/// Scans one region's Redis (every key, every stream entry) and its data files on disk:
/// none of `secrets` may appear; every one of `present` must (the scan sees plain text,
/// so a secret stored in plain text would be found).
async fn scan_region(
    name: &str,
    redis: &RedisServer,
    secrets: &[&str],
    present: &[&str],
) -> (usize, usize) {
    let mut conn = redis.client().await;
    let keys = redis_state::dump_all(&mut conn).await;
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (key, value) in &keys {
        for bytes in key_bytes(key, value) {
            for secret in secrets {
                assert!(
                    !holds(&bytes, secret),
                    "region {name}: key {key} holds {secret:?} in plain text: {}",
                    String::from_utf8_lossy(&bytes)
                );
            }
            for p in present {
                if holds(&bytes, p) {
                    *seen.entry(p).or_default() += 1;
                }
            }
        }
    }
    for p in present {
        assert!(
            seen.contains_key(p),
            "region {name}: no key holds {p:?}: the scan does not see what was written"
        );
    }
    let files = files_under(&redis.data_dir());
    let aof: Vec<_> = files.iter().filter(|(p, _)| p.contains(".aof")).collect();
    assert!(
        !aof.is_empty(),
        "region {name}: no AOF file in {files:?}",
        files = files.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    for (path, bytes) in &files {
        for secret in secrets {
            assert!(
                !holds(bytes, secret),
                "region {name}: {path} holds {secret:?}"
            );
        }
    }
    for p in present {
        assert!(
            aof.iter().any(|(_, bytes)| holds(bytes, p)),
            "region {name}: no AOF file holds {p:?}: the scan of the files sees nothing"
        );
    }
    (keys.len(), files.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn personal_data_is_sealed_in_both_regions_and_never_answered() {
    // Given two regions with AOF persistence and one key ring, replicated, behind a
    // gateway that checks tokens; region a's payment retries wait a minute (so an order
    // paid with tok_flaky is still unpaid when a dies)
    let dir = WorkDir::new("pii-keys");
    let idp = SigningKey::rsa(dir.path(), "rsa-1");
    let jwks = dir.path().join("jwks.json");
    write_jwks(&jwks, &[&idp]);
    let ring = format!("k1:{K1}");
    let regions = TwoRegions::start_on(
        RedisServer::start_persistent().await,
        RedisServer::start_persistent().await,
        true,
        |region| {
            let mut env = vec![
                ("NODE_PII_KEYS".to_string(), ring.clone()),
                ("NODE_TRUST_IDENTITY_HEADERS".into(), "true".into()),
            ];
            if region == "a" {
                env.push(("NODE_RETRY_BASE_MS".into(), "60000".into()));
            }
            env
        },
    )
    .await;
    let mut regions = regions;
    let gw = Gateway::start(
        GatewayOptions::new(&regions.regions())
            .env("GATEWAY_AUTH_JWKS", jwks.display())
            .env("GATEWAY_AUTH_ISSUER", ISSUER)
            .env("GATEWAY_AUTH_AUDIENCE", AUDIENCE),
    )
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    let as_user = |sub: &str, scope: &str| gw.http().with_token(idp.sign(&claims(sub, scope)));
    let customer_id = unique("c-pii-");
    let customer = as_user(&customer_id, "orders:write orders:read");
    let reader = as_user("reader", "events:read");
    let auditor = as_user("auditor", "events:read pii:read");
    let put = as_user("ops", "catalog:write")
        .put(
            &format!("/api/v1/products/{SKU}"),
            &json!({"name": "Widget", "price": 1000, "currency": "USD", "stock": 100}),
        )
        .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text);

    // When the customer places orders: one paid, one with a token the provider does not
    // know (declined), one whose first charge fails
    let secret_token = unique("tok_");
    let (addr_ok, addr_declined, addr_flaky) = (
        unique("1 Quiet Lane, flat "),
        unique("2 Quiet Lane, flat "),
        unique("3 Quiet Lane, flat "),
    );
    let mut answers: Vec<String> = Vec::new();
    let place = |body: Value| {
        let customer = customer.clone();
        async move {
            let r = customer.post("/orders", &body).await;
            let id = r.order_id();
            (id, r.text)
        }
    };
    let (ok_id, text) = place(order(&customer_id, &addr_ok, "tok_ok")).await;
    answers.push(text);
    let (declined_id, text) = place(order(&customer_id, &addr_declined, &secret_token)).await;
    answers.push(text);
    let (flaky_id, text) = place(order(&customer_id, &addr_flaky, "tok_flaky")).await;
    answers.push(text);
    let customer_api = Api::new(customer.clone());
    customer_api.wait_status(&ok_id, &["SHIPPED"], SETTLE).await;
    customer_api
        .wait_status(&declined_id, &["PAYMENT_FAILED"], SETTLE)
        .await;
    let node_a = regions.a.node.api();
    node_a
        .wait_events(&declined_id, PAYMENT_FAILED_FLOW, SETTLE)
        .await;

    // And region a dies (its node; its Redis and AOF stay) while the tok_flaky order's
    // charge waits for its retry, held pending in the payments group b has a copy of
    let b_redis = regions.b.redis.client().await;
    redis_state::wait_payment_pending(
        &b_redis,
        &flaky_id,
        SETTLE,
        "the tok_flaky charge pending in b's copy",
    )
    .await;
    regions.a.node.kill();

    // Then b takes over and charges the order: it opened the token a sealed
    gw.wait_active("b", 2, SETTLE).await;
    customer_api
        .wait_status(&flaky_id, &["SHIPPED"], SETTLE)
        .await;
    let flaky_events = get_as(
        &auditor,
        &format!("/api/events?aggregateId={flaky_id}"),
        &[],
    )
    .await;
    let charged = flaky_events.json["events"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["eventType"] == "PaymentProcessed"))
        .unwrap_or_else(|| panic!("no PaymentProcessed: {}", flaky_events.text));
    assert_eq!(charged["region"], "b", "charged by {charged}");
    let types: Vec<&str> = flaky_events.json["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["eventType"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(types, HAPPY_PATH_TO_SHIPPED, "{}", flaky_events.text);
    answers.push(flaky_events.text.clone());

    // And public answers: the customer sees the address of their own order and never a
    // token; an events reader sees neither; `pii:read` opens the address, never a token
    for (id, address) in [
        (&ok_id, &addr_ok),
        (&declined_id, &addr_declined),
        (&flaky_id, &addr_flaky),
    ] {
        let own = get_as(&customer, &format!("/orders/{id}"), &[]).await;
        assert_eq!(
            own.json["shippingAddress"],
            address.as_str(),
            "{}",
            own.text
        );
        assert!(own.json.get("paymentToken").is_none(), "{}", own.text);
        answers.push(own.text);

        let hidden = placed_event(&reader, id, &[]).await;
        assert_eq!(hidden["payload"]["orderId"], id.as_str(), "{hidden}");
        assert!(
            hidden["payload"].get("shippingAddress").is_none(),
            "{hidden}"
        );
        assert!(hidden["payload"].get("paymentToken").is_none(), "{hidden}");
        answers.push(hidden.to_string());

        let shown = placed_event(&auditor, id, &[]).await;
        assert_eq!(
            shown["payload"]["shippingAddress"],
            address.as_str(),
            "{shown}"
        );
        assert!(shown["payload"].get("paymentToken").is_none(), "{shown}");
        let one = get_as(
            &auditor,
            &format!("/api/events/{}", shown["eventId"].as_str().unwrap()),
            &[],
        )
        .await;
        assert_eq!(one.json["payload"]["shippingAddress"], address.as_str());
        assert!(
            one.json["payload"].get("paymentToken").is_none(),
            "{}",
            one.text
        );
        answers.push(shown.to_string());
        answers.push(one.text);
    }
    // A client's own identity headers never pass the gateway (auth on or off)
    let forged = placed_event(
        &reader,
        &ok_id,
        &[("tandem-scopes", "events:read pii:read")],
    )
    .await;
    assert!(
        forged["payload"].get("shippingAddress").is_none(),
        "{forged}"
    );
    let all = get_as(&auditor, "/api/events?limit=1000", &[]).await;
    answers.push(all.text);
    for tok in ["tok_ok", "tok_flaky", secret_token.as_str()] {
        for answer in &answers {
            assert!(
                !answer.contains(tok),
                "an answer holds the token {tok}: {answer}"
            );
        }
    }

    // And neither region's Redis nor its AOF holds a token or an address in plain text,
    // while both hold the customer's id (not personal data here) and sealed values
    let secrets = [
        secret_token.as_str(),
        "tok_ok",
        "tok_flaky",
        addr_ok.as_str(),
        addr_declined.as_str(),
        addr_flaky.as_str(),
    ];
    let present = [customer_id.as_str(), "pii1:k1:"];
    for (name, redis) in [("a", &regions.a.redis), ("b", &regions.b.redis)] {
        let (keys, files) = scan_region(name, redis, &secrets, &present).await;
        eprintln!("region {name}: scanned {keys} keys and {files} data files");
    }
}

/// A node of region `a` on `redis` with these extra variables (they win).
async fn node_with(redis: &RedisServer, env: &[(&str, &str)]) -> (Node, Api) {
    let mut options = system_tests::NodeOptions::new(redis.url()).env("NODE_RETRY_BASE_MS", 50);
    for (k, v) in env {
        options = options.env(k, v);
    }
    let node = Node::start(options).await;
    node.wait_ready().await;
    let api = Api::new(node.http());
    (node, api)
}

#[tokio::test]
async fn keys_rotate_and_the_node_trusts_identity_headers_only_when_told() {
    // Given a node sealing with key k1, trusting the gateway's identity headers
    let region = Region::start_with(RedisOptions::default(), |o| {
        o.env("NODE_PII_KEYS", format!("k1:{K1}"))
            .env("NODE_TRUST_IDENTITY_HEADERS", "true")
            .env("NODE_RETRY_BASE_MS", 50)
    })
    .await;
    let redis = &region.redis;
    let mut node = region.node;
    let api = region.api;
    api.put_product(SKU, 1000, 100).await;
    let (addr1, addr2) = (unique("1 Old Key Rd "), unique("2 New Key Rd "));
    let first = api.place_ok(&order("c-1", &addr1, "tok_ok")).await;
    api.wait_status(&first, &["SHIPPED"], SETTLE).await;
    let pii = [("tandem-scopes", "events:read pii:read")];

    // When a new key k2 is put first in the ring and the node restarts
    node.kill();
    let both = format!("k2:{K2},k1:{K1}");
    let (mut node, api) = node_with(
        redis,
        &[
            ("NODE_PII_KEYS", &both),
            ("NODE_TRUST_IDENTITY_HEADERS", "true"),
        ],
    )
    .await;
    let second = api.place_ok(&order("c-2", &addr2, "tok_ok")).await;

    // Then the new order is sealed with k2 and charged (its token opened), the old one
    // stays sealed with k1, and both addresses open for `pii:read`
    api.wait_status(&second, &["SHIPPED"], SETTLE).await;
    let mut conn = redis.client().await;
    let stored: BTreeMap<String, Value> = redis_state::events(&mut conn)
        .await
        .into_iter()
        .filter(|(_, e)| e["eventType"] == "OrderPlaced")
        .map(|(_, e)| {
            (
                e["aggregateId"].as_str().unwrap().to_string(),
                e["payload"].clone(),
            )
        })
        .collect();
    for (id, kid) in [(&first, "pii1:k1:"), (&second, "pii1:k2:")] {
        for field in ["paymentToken", "shippingAddress"] {
            let v = stored[id.as_str()][field].as_str().unwrap_or_default();
            assert!(v.starts_with(kid), "{id} {field} = {v}");
        }
    }
    for (id, address) in [(&first, &addr1), (&second, &addr2)] {
        let shown = placed_event(&api.http, id, &pii).await;
        assert_eq!(
            shown["payload"]["shippingAddress"],
            address.as_str(),
            "{shown}"
        );
        assert!(shown["payload"].get("paymentToken").is_none(), "{shown}");
        let own = get_as(&api.http, &format!("/orders/{id}"), &[]).await;
        assert!(
            own.json.get("shippingAddress").is_none(),
            "anonymous: {}",
            own.text
        );
    }
    let owner = get_as(
        &api.http,
        &format!("/orders/{first}"),
        &[("tandem-subject", "c-1")],
    )
    .await;
    assert_eq!(
        owner.json["shippingAddress"],
        addr1.as_str(),
        "{}",
        owner.text
    );
    let other = get_as(
        &api.http,
        &format!("/orders/{first}"),
        &[("tandem-subject", "c-2")],
    )
    .await;
    assert!(
        other.json.get("shippingAddress").is_none(),
        "{}",
        other.text
    );

    // And a rebuild from the events reproduces the derived state byte for byte
    let before = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    let rebuilt = api.rebuild().await;
    assert_eq!(rebuilt.status, 200, "{}", rebuilt.text);
    let after = redis_state::dump(&mut conn, DERIVED_PATTERNS).await;
    assert!(before == after, "rebuild changed derived state");

    // When k1 is dropped from the ring, its addresses are withheld, not garbled, and
    // the event store still answers
    node.kill();
    let only_new = format!("k2:{K2}");
    let (mut node, api) = node_with(
        redis,
        &[
            ("NODE_PII_KEYS", &only_new),
            ("NODE_TRUST_IDENTITY_HEADERS", "true"),
        ],
    )
    .await;
    let old = placed_event(&api.http, &first, &pii).await;
    assert!(old["payload"].get("shippingAddress").is_none(), "{old}");
    let new = placed_event(&api.http, &second, &pii).await;
    assert_eq!(new["payload"]["shippingAddress"], addr2.as_str(), "{new}");

    // When the node is not told to trust identity headers (the default), a caller
    // writing them gets nothing personal
    node.kill();
    let (_node, api) = node_with(redis, &[("NODE_PII_KEYS", &both)]).await;
    let forged = placed_event(&api.http, &first, &pii).await;
    assert!(
        forged["payload"].get("shippingAddress").is_none(),
        "{forged}"
    );
    let forged = get_as(
        &api.http,
        &format!("/orders/{first}"),
        &[("tandem-subject", "c-1")],
    )
    .await;
    assert!(
        forged.json.get("shippingAddress").is_none(),
        "{}",
        forged.text
    );
}

#[test]
fn a_bad_key_ring_stops_the_node_before_it_starts_and_is_never_echoed() {
    for (ring, says) in [
        ("k1:c2hvcnQ=", "entry 1 (`k1`): the key must be 32 bytes"),
        (&*format!("k1:{K1},k1:{K2}"), "appears twice"),
        (&*format!("bad kid:{K1}"), "key id must be"),
        ("k1", "expected `kid:base64key`"),
    ] {
        let out = std::process::Command::new(workspace_binary("regional-node"))
            .env_clear()
            .env("NODE_REGION", "a")
            .env("NODE_LISTEN", "127.0.0.1:0")
            .env("NODE_PII_KEYS", ring)
            .output()
            .expect("run regional-node");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{ring}: {stderr}");
        assert!(stderr.contains("NODE_PII_KEYS"), "{ring}: {stderr}");
        assert!(stderr.contains(says), "{ring}: {stderr}");
        for key in ["c2hvcnQ=", K1, K2] {
            assert!(!stderr.contains(key), "{ring}: the key is echoed: {stderr}");
        }
    }
}

//! Encryption and identity inside (issue 10): the gateway reaches the nodes over HTTPS
//! with a pinned CA and mutual TLS, the nodes and the replicators reach Redis over
//! `rediss://`, each logged in as its own ACL user from deploy/redis/users.acl.
//!
//! The certificates are made here, by a test CA (rcgen), plus a second, untrusted CA
//! for the attacks.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use system_tests::gateway::{Gateway, GatewayOptions, Links, NodeHttps, RegionNode, TwoRegions};
use system_tests::poll::eventually;
use system_tests::process::workspace_root;
use system_tests::takeover::{event_ids, wait_streams_equal};
use system_tests::workdir::WorkDir;
use system_tests::{order_body, ClientTls, HttpClient, RedisOptions, RedisServer, RedisTls};

const FLOW: Duration = Duration::from_secs(30);

/// The users of deploy/redis/users.acl and their development passwords (README).
const ADMIN: (&str, &str) = ("tandem-admin", "tandem-admin-dev");
const NODE: (&str, &str) = ("tandem-node", "tandem-node-dev");
const REPLICATOR: (&str, &str) = ("tandem-replicator", "tandem-replicator-dev");

/// A certificate authority made for one test, writing its PEM files into `dir`.
struct TestCa {
    dir: PathBuf,
    name: String,
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate (what a peer pins).
    cert: PathBuf,
}

impl TestCa {
    fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        let path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&path, cert.pem()).expect("write CA");
        TestCa {
            dir: dir.to_path_buf(),
            name: name.into(),
            issuer: Issuer::new(params, key),
            cert: path,
        }
    }

    /// A certificate for `localhost` and 127.0.0.1, for a server or for a client;
    /// returns `(cert, key)` PEM paths.
    fn issue(&self, who: &str, usage: ExtendedKeyUsagePurpose) -> (PathBuf, PathBuf) {
        let mut params = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()])
            .expect("leaf params");
        params.distinguished_name.push(DnType::CommonName, who);
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        let stem = self.dir.join(format!("{}-{who}", self.name));
        let (cert_path, key_path) = (stem.with_extension("pem"), stem.with_extension("key"));
        std::fs::write(&cert_path, cert.pem()).expect("write cert");
        std::fs::write(&key_path, key.serialize_pem()).expect("write key");
        (cert_path, key_path)
    }

    fn server(&self, who: &str) -> (PathBuf, PathBuf) {
        self.issue(who, ExtendedKeyUsagePurpose::ServerAuth)
    }

    fn client(&self, who: &str) -> (PathBuf, PathBuf) {
        self.issue(who, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

/// A Redis that speaks TLS only, with the shipped ACL file; the harness logs in as
/// the admin user.
async fn secured_redis(ca: &TestCa) -> RedisServer {
    let (cert, key) = ca.server("redis");
    RedisServer::start_with(RedisOptions {
        tls: Some(RedisTls {
            ca: ca.cert.clone(),
            cert,
            key,
        }),
        acl_file: Some(workspace_root().join("deploy/redis/users.acl")),
        login: Some((ADMIN.0.into(), ADMIN.1.into())),
        ..RedisOptions::default()
    })
    .await
}

fn login((user, password): (&str, &str)) -> Option<(String, String)> {
    Some((user.into(), password.into()))
}

/// Nodes serving HTTPS with a certificate of `ca`, requiring client certificates of
/// `ca` when `mutual`; the harness presents one of its own.
fn node_https(ca: &TestCa, mutual: bool) -> NodeHttps {
    let (cert, key) = ca.server("node");
    NodeHttps {
        cert,
        key,
        client_ca: mutual.then(|| ca.cert.clone()),
        harness: ClientTls {
            ca: ca.cert.clone(),
            identity: Some(ca.client("harness")),
        },
    }
}

/// A gateway for these tests. Every link here does TLS on top of the usual work, on a
/// shared 2-core machine running debug builds: probes get 1 s instead of 100 ms (and
/// the lease 4 s) so that a slow moment is not taken for a dead region.
fn gateway_options(regions: &[(&str, String)]) -> GatewayOptions {
    GatewayOptions::new(regions)
        .env("GATEWAY_HEALTH_TIMEOUT_MS", 1000)
        .env("GATEWAY_CONNECT_TIMEOUT_MS", 1000)
        .env("GATEWAY_LEASE_MS", 4000)
}

/// Nodes patient with Redis over TLS (the harness' default is 300 ms).
fn patient_nodes(_region: &str) -> Vec<(String, String)> {
    vec![("NODE_REDIS_TIMEOUT_MS".into(), "1000".into())]
}

/// The regions the gateway sees as healthy, from `/gateway/regions`.
async fn healthy(gw: &Gateway) -> Vec<(String, bool)> {
    let view = gw.http().get("/gateway/regions").await.json;
    view["regions"]
        .as_array()
        .map(|rs| {
            rs.iter()
                .map(|r| {
                    (
                        r["id"].as_str().unwrap_or("").to_string(),
                        r["healthy"] == true,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

async fn wait_log(what: &str, log: impl Fn() -> String, needle: &str) {
    eventually(FLOW, what, || {
        let tail = log();
        async move {
            if tail.contains(needle) {
                Ok(())
            } else {
                Err(tail)
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_order_crosses_only_encrypted_and_authenticated_links() {
    // Given two regions whose Redis speaks TLS only and knows only the shipped ACL
    // users, nodes that serve HTTPS and require client certificates, replicators over
    // rediss://, and a gateway that pins the CA and presents its own certificate
    let dir = WorkDir::new("pki");
    let ca = TestCa::new(dir.path(), "tandem");
    let links = Links {
        node_login: login(NODE),
        replicator_login: login(REPLICATOR),
        redis_ca: Some(ca.cert.clone()),
        https: Some(node_https(&ca, true)),
    };
    let mut regions = TwoRegions::start_linked(
        secured_redis(&ca).await,
        secured_redis(&ca).await,
        true,
        patient_nodes,
        &links,
    )
    .await;
    assert!(regions
        .regions()
        .iter()
        .all(|(_, url)| url.starts_with("https://")));
    let (gw_cert, gw_key) = ca.client("gateway");
    let gw = Gateway::start(
        gateway_options(&regions.regions()).node_tls(&ca.cert, Some((&gw_cert, &gw_key))),
    )
    .await;

    // When a client places an order through the gateway
    gw.wait_active("a", 1, FLOW).await;
    let api = gw.api();
    api.put_product("TLS-1", 1500, 10).await;
    let id = api
        .place_ok(&order_body("c-tls", &[("TLS-1", 2)], "tok_ok"))
        .await;

    // Then it is served, and replicated to region b over the encrypted links
    eventually(FLOW, "order readable through the gateway", || {
        let api = api.clone();
        let id = id.clone();
        async move {
            let r = api.order(&id).await;
            if r.status == 200 {
                Ok(())
            } else {
                Err(r.text)
            }
        }
    })
    .await;
    let (a, b) = (
        regions.a.redis.client().await,
        regions.b.redis.client().await,
    );
    wait_streams_equal(&a, &b, "region b holds region a's events").await;
    let events = event_ids(&mut b.clone()).await;
    assert!(
        events.len() >= 2,
        "the product and the order reached region b: {events:?}"
    );
    // And when region a's node dies, the gateway fails over to b over the same links,
    // b's promotion running as the node's ACL user, and orders go on
    regions.a.node.kill();
    gw.wait_active("b", 2, FLOW).await;
    let after = api
        .place_order(&order_body("c-tls", &[("TLS-1", 1)], "tok_ok"))
        .await;
    assert_eq!(
        after.status, 201,
        "an order after the failover: {}",
        after.text
    );

    // And no process was refused a command by its ACL user on the way
    for (name, log) in [
        ("node a", regions.a.node.log_tail(400)),
        ("node b", regions.b.node.log_tail(400)),
        ("replicator b", regions.replicators[0].log_tail(400)),
        ("replicator a", regions.replicators[1].log_tail(400)),
    ] {
        assert!(!log.contains("NOPERM"), "{name} hit its ACL:\n{log}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_refuses_clients_without_a_certificate_of_its_ca() {
    // Given nodes that require client certificates of the tandem CA
    let dir = WorkDir::new("pki");
    let ca = TestCa::new(dir.path(), "tandem");
    let rogue = TestCa::new(dir.path(), "rogue");
    let links = Links {
        https: Some(node_https(&ca, true)),
        ..Links::default()
    };
    let regions = TwoRegions::start_linked(
        RedisServer::start().await,
        RedisServer::start().await,
        false,
        patient_nodes,
        &links,
    )
    .await;
    let url = regions.a.node.url();

    // When clients that trust the node's CA call it with no certificate, with one of
    // another CA, and with one of its CA
    let bare = HttpClient::new_tls(
        url.clone(),
        &ClientTls {
            ca: ca.cert.clone(),
            identity: None,
        },
    );
    let foreign = HttpClient::new_tls(
        url.clone(),
        &ClientTls {
            ca: ca.cert.clone(),
            identity: Some(rogue.client("intruder")),
        },
    );
    // Then only the last gets an answer, admin routes included
    for (who, http) in [("no certificate", &bare), ("rogue CA", &foreign)] {
        for path in ["/health/live", "/admin/role", "/api/v1/products/X"] {
            let r = http
                .try_request(reqwest::Method::GET, path, None, &[])
                .await;
            assert!(r.is_err(), "{who} got an answer on {path}: {r:?}");
        }
    }
    assert_eq!(regions.a.node.http().get("/admin/role").await.status, 200);
    wait_log(
        "node a logs the refused handshakes",
        || regions.a.node.log_tail(200),
        "TLS handshake refused",
    )
    .await;

    // And a gateway that presents no certificate, or one of another CA, finds no
    // healthy region
    let (rogue_cert, rogue_key) = rogue.client("gateway");
    for client in [None, Some((rogue_cert.as_path(), rogue_key.as_path()))] {
        let gw =
            Gateway::start(gateway_options(&regions.regions()).node_tls(&ca.cert, client)).await;
        wait_log(
            "the gateway logs why the probes fail",
            || gw.log_tail(200),
            "probe failed",
        )
        .await;
        eventually(FLOW, "both regions unhealthy", || {
            let gw = &gw;
            async move {
                let view = healthy(gw).await;
                if view.len() == 2 && view.iter().all(|(_, ok)| !ok) {
                    Ok(())
                } else {
                    Err(view)
                }
            }
        })
        .await;
        let r = gw
            .api()
            .place_order(&order_body("c-1", &[("X", 1)], "tok_ok"))
            .await;
        assert!(
            r.status >= 500,
            "an order with no region reachable: {} {}",
            r.status,
            r.text
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_does_not_use_a_node_whose_certificate_it_does_not_trust() {
    // Given region a's node presenting a certificate of a CA the gateway does not pin,
    // and region b's one of the pinned CA
    let dir = WorkDir::new("pki");
    let ca = TestCa::new(dir.path(), "tandem");
    let rogue = TestCa::new(dir.path(), "rogue");
    let (redis_a, redis_b) = (RedisServer::start().await, RedisServer::start().await);
    let impostor = NodeHttps {
        harness: ClientTls {
            ca: rogue.cert.clone(),
            identity: None,
        },
        ..node_https(&rogue, false)
    };
    let node_a = RegionNode::start_with(
        "a",
        &redis_a.url(),
        Some(&redis_b.url()),
        &[],
        Some(impostor),
    )
    .await;
    let node_b = RegionNode::start_with(
        "b",
        &redis_b.url(),
        Some(&redis_a.url()),
        &[],
        Some(node_https(&ca, false)),
    )
    .await;

    // When the gateway probes both
    let mut options =
        gateway_options(&[("a", node_a.url()), ("b", node_b.url())]).node_tls(&ca.cert, None);
    options.primary = "b".into();
    let gw = Gateway::start(options).await;

    // Then region a stays unhealthy, with the reason in the gateway's log, and region
    // b is used
    gw.wait_healthy(&["b"], FLOW).await;
    wait_log(
        "the gateway logs the untrusted certificate",
        || gw.log_tail(300),
        "invalid peer certificate",
    )
    .await;
    let view = healthy(&gw).await;
    assert!(view.contains(&("a".into(), false)), "{view:?}");
    gw.wait_active("b", 1, FLOW).await;
    gw.api().put_product("TLS-2", 100, 5).await;
    node_b.api().product("TLS-2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_service_may_do_only_its_part_in_redis() {
    // Given a Redis with the shipped ACL file
    let dir = WorkDir::new("pki");
    let ca = TestCa::new(dir.path(), "tandem");
    let redis = secured_redis(&ca).await;
    let node = redis.client_as(NODE.0, NODE.1).await;
    let replicator = redis.client_as(REPLICATOR.0, REPLICATOR.1).await;
    let mut admin = redis.client().await;
    let _: () = redis::cmd("SET")
        .arg("other:secret")
        .arg("x")
        .query_async(&mut admin)
        .await
        .expect("the admin user may write anything");

    // When each service's user tries what it has no business doing
    let cmd = |args: &[&str]| {
        let mut c = redis::cmd(args[0]);
        for a in &args[1..] {
            c.arg(*a);
        }
        c
    };
    let attempts = [
        ("node", &node, cmd(&["FLUSHALL"])),
        ("node", &node, cmd(&["CONFIG", "SET", "appendonly", "no"])),
        ("node", &node, cmd(&["GET", "other:secret"])),
        ("node", &node, cmd(&["KEYS", "*"])),
        ("replicator", &replicator, cmd(&["FLUSHALL"])),
        ("replicator", &replicator, cmd(&["ACL", "LIST"])),
        (
            "replicator",
            &replicator,
            cmd(&["CONFIG", "SET", "maxmemory", "1"]),
        ),
        ("replicator", &replicator, cmd(&["GET", "other:secret"])),
    ];
    // Then Redis refuses each with NOPERM
    for (who, conn, c) in attempts {
        match c.query_async::<redis::Value>(&mut conn.clone()).await {
            Ok(v) => panic!("{who}: {c:?} was allowed: {v:?}"),
            Err(e) => assert!(
                e.to_string().to_ascii_uppercase().contains("NOPERM"),
                "{who}: {c:?}: {e}"
            ),
        }
    }
    // while what they need works
    let _: () = redis::cmd("HSET")
        .arg("tandem:order:o-1")
        .arg("status")
        .arg("PAID")
        .query_async(&mut node.clone())
        .await
        .expect("the node writes its keys");
    let _: String = redis::cmd("XADD")
        .arg("tandem:events")
        .arg("*")
        .arg("k")
        .arg("v")
        .query_async(&mut replicator.clone())
        .await
        .expect("the replicator appends to streams");
    // And the default user is off: no login, no commands
    let anonymous = format!("rediss://127.0.0.1:{}", redis.port());
    let client = redis.redis_client(&anonymous).expect("client");
    let answer = match client.get_multiplexed_async_connection().await {
        Ok(mut c) => redis::cmd("GET")
            .arg("tandem:events")
            .query_async::<redis::Value>(&mut c)
            .await
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    };
    assert!(
        answer.as_ref().is_err_and(|e| {
            let e = e.to_ascii_uppercase();
            e.contains("NOAUTH") || e.contains("NOPERM")
        }),
        "{answer:?}"
    );
}

#[test]
fn a_gateway_with_https_regions_and_no_pinned_ca_does_not_start() {
    // Given https:// regions or client-certificate settings without what they need
    let dir = WorkDir::new("pki");
    let missing = dir.path().join("missing-ca.pem");
    let missing = missing.display().to_string();
    let cases: Vec<(Vec<(&str, &str)>, &str)> = vec![
        (
            vec![(
                "GATEWAY_REGIONS",
                "a=https://localhost:1,b=http://127.0.0.1:2",
            )],
            "node_ca",
        ),
        (
            vec![
                (
                    "GATEWAY_REGIONS",
                    "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
                ),
                ("GATEWAY_NODE_CLIENT_CERT", "/etc/cert.pem"),
                ("GATEWAY_NODE_CLIENT_KEY", "/etc/key.pem"),
            ],
            "node_ca",
        ),
        (
            vec![
                (
                    "GATEWAY_REGIONS",
                    "a=https://localhost:1,b=https://localhost:2",
                ),
                ("GATEWAY_NODE_CA", missing.as_str()),
                ("GATEWAY_NODE_CLIENT_CERT", "/etc/cert.pem"),
            ],
            "node_client_key",
        ),
        (
            vec![
                (
                    "GATEWAY_REGIONS",
                    "a=https://localhost:1,b=https://localhost:2",
                ),
                ("GATEWAY_NODE_CA", missing.as_str()),
            ],
            "GATEWAY_NODE_CA",
        ),
    ];
    // Then it exits 64 (EX_USAGE) naming the setting to fix
    for (mut env, named) in cases {
        env.push(("GATEWAY_LISTEN", "127.0.0.1:0"));
        let (code, output) = system_tests::gateway::run_gateway_expecting_exit(&env);
        assert_eq!(code, 64, "{env:?}: {output}");
        assert!(
            output.contains(named),
            "{env:?} should name {named}: {output}"
        );
    }
}

//! Failover drills through the gateway, with real nodes, real Redis servers and the
//! replicators: the active region killed, hung (SIGSTOP) or cut off, and a planned
//! switchover. Clients keep placing orders with Idempotency-Keys throughout.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::gateway::{metric, Blackhole, Gateway, GatewayOptions, RegionNode, TwoRegions};
use system_tests::poll::{eventually, wait_until};
use system_tests::replicator::entries;
use system_tests::replicator::Replicator;
use system_tests::RedisServer;
use system_tests::{order_body, Api, HttpClient};

const SETTLE: Duration = Duration::from_secs(20);
const SKU: &str = "DRILL-1";

/// One answer seen by a client during a drill.
#[derive(Debug, Clone)]
struct Seen {
    sent: Instant,
    done: Instant,
    status: u16,
    region: String,
    key: String,
    order_id: Option<String>,
    body: String,
}

/// Clients placing orders (each with its own Idempotency-Key) and reading the
/// product, one after the other, until stopped.
struct OrderStream {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl OrderStream {
    fn start(gw: &Gateway, clients: usize, reads: bool) -> OrderStream {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let http = gw.http();
            let (stop_w, seen_w) = (stop.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                let (stop, seen) = (stop_w, seen_w);
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("drill-{c}-{n}");
                    let s = place(&http, &key).await;
                    seen.lock().unwrap().push(s);
                }
            }));
            if reads {
                let http = gw.http();
                let (stop_r, seen_r) = (stop.clone(), seen.clone());
                tasks.push(tokio::spawn(async move {
                    let (stop, seen) = (stop_r, seen_r);
                    while !stop.load(Ordering::Relaxed) {
                        let sent = Instant::now();
                        let r = http
                            .try_request(
                                reqwest::Method::GET,
                                &format!("/api/v1/products/{SKU}"),
                                None,
                                &[],
                            )
                            .await;
                        let (status, region, body) = match r {
                            Ok(r) => (
                                r.status,
                                r.header("x-region").unwrap_or("-").to_string(),
                                r.text,
                            ),
                            Err(e) => (0, "-".into(), e.to_string()),
                        };
                        seen.lock().unwrap().push(Seen {
                            sent,
                            done: Instant::now(),
                            status,
                            region,
                            key: "GET".into(),
                            order_id: None,
                            body,
                        });
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                }));
            }
        }
        OrderStream { stop, seen, tasks }
    }

    fn snapshot(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// Waits until `n` more orders than now were answered 201 by `region`.
    async fn wait_orders_from(&self, region: &str, n: usize, deadline: Duration) {
        let base = self.count_from(region);
        eventually(deadline, &format!("{n} orders from {region}"), || async {
            let c = self.count_from(region);
            if c >= base + n {
                Ok(())
            } else {
                Err((c, self.snapshot().last().cloned()))
            }
        })
        .await
    }

    fn count_from(&self, region: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.status == 201 && s.region == region)
            .count()
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

async fn place(http: &HttpClient, key: &str) -> Seen {
    let sent = Instant::now();
    let body = serde_json::to_vec(&order_body("c-drill", &[(SKU, 1)], "tok_ok")).unwrap();
    let r = http
        .try_request(
            reqwest::Method::POST,
            "/orders",
            Some(body),
            &[("Idempotency-Key", key)],
        )
        .await;
    let done = Instant::now();
    match r {
        Ok(r) => Seen {
            sent,
            done,
            status: r.status,
            region: r.header("x-region").unwrap_or("-").to_string(),
            key: key.to_string(),
            order_id: r.json["orderId"].as_str().map(String::from),
            body: r.text,
        },
        Err(e) => Seen {
            sent,
            done,
            status: 0,
            region: "-".into(),
            key: key.to_string(),
            order_id: None,
            body: e.to_string(),
        },
    }
}

/// Two replicated regions, a gateway with a active, and a product both regions know.
async fn drill_setup(gateway_via_blackhole: bool) -> (TwoRegions, Gateway, Option<Blackhole>) {
    let regions = TwoRegions::start(true).await;
    let blackhole = if gateway_via_blackhole {
        Some(Blackhole::start(regions.a.node.port()).await)
    } else {
        None
    };
    let a_url = blackhole
        .as_ref()
        .map(|b| b.url())
        .unwrap_or_else(|| regions.a.node.url());
    let gw = Gateway::start(GatewayOptions::new(&[
        ("a", a_url),
        ("b", regions.b.node.url()),
    ]))
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.wait_healthy(&["a", "b"], SETTLE).await;
    gw.api().put_product(SKU, 100, 1_000_000).await;
    wait_product_on_b(&regions.b.node.http()).await;
    (regions, gw, blackhole)
}

/// Every answer a client saw was a success: 201 for orders, 200 for reads.
fn assert_no_client_errors(seen: &[Seen]) {
    let bad: Vec<&Seen> = seen
        .iter()
        .filter(|s| !(s.status == 201 || (s.key == "GET" && s.status == 200)))
        .collect();
    assert!(
        bad.is_empty(),
        "{} of {} requests failed, e.g. {:#?}",
        bad.len(),
        seen.len(),
        &bad[..bad.len().min(3)]
    );
}

/// Time from `at` to the first order answered by `region` that was sent after `at`,
/// and the longest any single request took.
fn recovery(seen: &[Seen], at: Instant, region: &str) -> (Duration, Duration) {
    let first = seen
        .iter()
        .filter(|s| s.status == 201 && s.region == region && s.done > at)
        .map(|s| s.done)
        .min()
        .expect("an order served by the new active");
    let longest = seen
        .iter()
        .map(|s| s.done - s.sent)
        .max()
        .unwrap_or_default();
    (first - at, longest)
}

/// Waits until region b serves the product the drills order, copied from a.
async fn wait_product_on_b(b: &HttpClient) {
    let path = format!("/api/v1/products/{SKU}");
    wait_until(
        SETTLE,
        "product replicated to b",
        || b.get(&path),
        |r| r.status == 200,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn order_stream_survives_killing_the_active_region() {
    // Given orders and reads streaming through the gateway to region a
    let (mut regions, gw, _) = drill_setup(false).await;
    let stream = OrderStream::start(&gw, 2, true);
    stream.wait_orders_from("a", 20, SETTLE).await;

    // When region a's node and its Redis are killed
    let killed = Instant::now();
    regions.a.node.kill();
    regions.a.redis.kill();

    // Then b takes over, and no client sees an error
    stream.wait_orders_from("b", 20, SETTLE).await;
    let seen = stream.stop().await;
    assert_no_client_errors(&seen);
    let (rto, longest) = recovery(&seen, killed, "b");
    eprintln!(
        "[drill] kill: first order from b {rto:?} after the kill; slowest request {longest:?}; {} requests",
        seen.len()
    );
    // The goal is under 1 s (bench/gateway.sh measures it with release binaries);
    // debug binaries on a loaded CI machine get some slack here.
    assert!(rto < Duration::from_millis(2000), "recovery took {rto:?}");
    assert_eq!(gw.regions().await["active"], "b");
    assert_eq!(regions.b.node.role().await["epoch"], 2);
    let m = gw.metrics().await;
    assert_eq!(
        metric(
            &m,
            "tandem_gateway_failovers_total",
            &[("from", "a"), ("to", "b"), ("reason", "unhealthy")]
        ),
        Some(1.0),
        "{m}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hung_active_region_is_replaced_and_demoted_when_it_wakes() {
    // Given orders streaming through the gateway to region a
    let (regions, gw, _) = drill_setup(false).await;
    let stream = OrderStream::start(&gw, 2, true);
    stream.wait_orders_from("a", 20, SETTLE).await;

    // When a's node hangs (SIGSTOP: its sockets stay open, nothing answers)
    let hung = Instant::now();
    regions.a.node.pause();

    // Then b takes over, and no client sees an error
    stream.wait_orders_from("b", 20, SETTLE).await;
    let seen = stream.stop().await;
    let (rto, longest) = recovery(&seen, hung, "b");
    eprintln!(
        "[drill] hang: first order from b {rto:?} after SIGSTOP; slowest request {longest:?}; {} requests",
        seen.len()
    );
    assert_no_client_errors(&seen);
    // The goal is under 1 s (bench/gateway.sh measures it with release binaries);
    // debug binaries on a loaded CI machine get some slack here.
    assert!(rto < Duration::from_millis(2000), "recovery took {rto:?}");

    // And when a wakes up, it is fenced and then demoted at the new epoch
    regions.a.node.resume();
    let a = regions.a.node.http();
    Api::new(a.clone()).wait_role("standby", 2, SETTLE).await;
    assert_eq!(gw.regions().await["active"], "b");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_active_keeps_its_lease_while_the_old_region_hangs() {
    // Given orders streaming through the gateway to region a
    let (regions, gw, _) = drill_setup(false).await;
    let stream = OrderStream::start(&gw, 2, false);
    stream.wait_orders_from("a", 20, SETTLE).await;

    // When the whole of region a hangs, its Redis too: b's node, which reads a's Redis
    // to check its lease renewals, gets no answer at all (as through a cut link)
    regions.a.node.pause();
    regions.a.redis.pause();
    stream.wait_orders_from("b", 10, SETTLE).await;
    let promoted = Instant::now();

    // Then b holds on to its lease: it serves every order for the next few seconds
    // (before the fix each renewal waited out the 200 ms peer timeout, the gateway gave
    // up on it, and b fenced itself again and again)
    let before = stream.snapshot().len();
    eventually(SETTLE, "60 more answers", || async {
        let n = stream.snapshot().len();
        if n >= before + 60 && promoted.elapsed() > Duration::from_secs(3) {
            Ok(())
        } else {
            Err(n - before)
        }
    })
    .await;
    let seen = stream.stop().await;
    assert_no_client_errors(&seen[before..]);
    let b_role = regions.b.node.role().await;
    assert_eq!(b_role["role"], "active", "{b_role}");
    assert_eq!(b_role["fenced"], false, "{b_role}");
    regions.a.redis.resume();
    regions.a.node.resume();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_returning_stale_active_quarantines_what_the_new_active_never_received() {
    // Given region a active, whose node and replicator reach b's Redis through a link
    // that can be cut, and the gateway reaching a through another one
    let (redis_a, redis_b) = (RedisServer::start().await, RedisServer::start().await);
    let a_to_b = Blackhole::start(redis_b.port()).await;
    let b_via_link = format!("redis://127.0.0.1:{}", a_to_b.port());
    let node_a = RegionNode::start("a", &redis_a.url(), Some(&b_via_link)).await;
    let node_b = RegionNode::start("b", &redis_b.url(), Some(&redis_a.url())).await;
    let mut replicator_b = Replicator::start(&redis_b.url(), &redis_a.url(), &[]).await;
    let _replicator_a = Replicator::start(
        &redis_a.url(),
        &b_via_link,
        &[
            ("REPLICATOR_LOCAL_REGION", "a"),
            ("REPLICATOR_PEER_REGION", "b"),
        ],
    )
    .await;
    let gateway_to_a = Blackhole::start(node_a.port()).await;
    let gw = Gateway::start(GatewayOptions::new(&[
        ("a", gateway_to_a.url()),
        ("b", node_b.url()),
    ]))
    .await;
    gw.wait_active("a", 1, SETTLE).await;
    gw.wait_healthy(&["a", "b"], SETTLE).await;
    gw.api().put_product(SKU, 100, 1_000).await;
    let b = node_b.http();
    wait_product_on_b(&b).await;

    // When b's replicator is down, a acknowledges an order that b never receives
    replicator_b.kill();
    let placed = place(&gw.http(), "stale-active-1").await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    assert_eq!(placed.region, "a");
    let id = placed.order_id.unwrap();

    // and a is cut off, from the gateway and from b's Redis, so b is promoted
    gateway_to_a.cut(true);
    a_to_b.cut(true);
    gw.wait_active("b", 2, SETTLE).await;
    replicator_b.restart().await;

    // When the gateway reaches a again first: it demotes a, which still cannot read b
    gateway_to_a.cut(false);
    let a = node_a.http();
    eventually(SETTLE, "a demoted by the gateway", || async {
        let r = a.get("/admin/role").await.json;
        if r["role"] == "standby" {
            Ok(())
        } else {
            Err(r)
        }
    })
    .await;
    a_to_b.cut(false);

    // Then a rejoins as b's standby, and the order it acknowledged is reported in its
    // quarantine (the compose test once lost such an order after a partition; this is
    // the same sequence with processes, and here it holds)
    eventually(SETTLE, "the order in b or in a's quarantine", || async {
        let in_b = b.get(&format!("/orders/{id}")).await.status == 200;
        let q = a.get("/admin/quarantine").await.json;
        let quarantined = q["events"].as_array().is_some_and(|es| {
            es.iter().any(|e| {
                e["event"]["eventType"] == "OrderPlaced" && e["event"]["aggregateId"] == id.as_str()
            })
        });
        let role = a.get("/admin/role").await.json;
        if (in_b || quarantined) && role["epoch"] == 2 {
            Ok(())
        } else {
            Err(format!("in b: {in_b}, a's quarantine: {q}, a: {role}"))
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitioned_active_fences_itself_before_the_standby_acts() {
    // Given the gateway reaching a through a proxy that can drop the link
    let (regions, gw, blackhole) = drill_setup(true).await;
    let blackhole = blackhole.unwrap();
    let (a, b) = (regions.a.node.http(), regions.b.node.http());
    assert_eq!(a.get("/admin/role").await.json["role"], "active");

    // When the link between the gateway and a goes silent (a itself keeps running)
    blackhole.cut(true);
    let cut = Instant::now();

    // Then, sampling both regions directly, b is never active while a still accepts
    // writes; a fences (or steps down) and b becomes active
    let mut samples = 0;
    let mut a_fenced_at = None;
    let b_active_at = loop {
        let rb = b.get("/admin/role").await.json;
        let ra = a.get("/admin/role").await.json;
        samples += 1;
        let a_acts = ra["role"] == "active" && ra["fenced"] != true;
        if !a_acts && a_fenced_at.is_none() {
            a_fenced_at = Some(cut.elapsed());
        }
        if rb["role"] == "active" {
            assert!(
                !a_acts,
                "b active at epoch {} while a still acts: {ra}",
                rb["epoch"]
            );
            break cut.elapsed();
        }
        assert!(cut.elapsed() < SETTLE, "b never became active: {rb}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    eprintln!(
        "[drill] partition: a stopped acting at {a_fenced_at:?}, b active at {b_active_at:?} ({samples} samples)"
    );
    gw.wait_active("b", 2, SETTLE).await;

    // And a write through the gateway lands on b
    let placed = place(&gw.http(), "after-partition-1").await;
    assert_eq!(placed.status, 201, "{}", placed.body);
    assert_eq!(placed.region, "b");

    // And when the link heals, a is demoted at the new epoch
    blackhole.cut(false);
    Api::new(a.clone()).wait_role("standby", 2, SETTLE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn planned_switchover_under_load_loses_nothing() {
    // Given orders streaming through the gateway to region a
    let (regions, gw, _) = drill_setup(false).await;
    let stream = OrderStream::start(&gw, 2, false);
    stream.wait_orders_from("a", 20, SETTLE).await;

    // When an operator switches over to b
    let sw = gw
        .admin()
        .post("/gateway/failover", &json!({"to": "b"}))
        .await;

    // Then the switchover reports no lost events and b is active at epoch 2
    assert_eq!(sw.status, 200, "{}", sw.text);
    assert_eq!(
        sw.json,
        json!({"active": "b", "epoch": 2, "previous": "a", "lostEvents": 0})
    );
    stream.wait_orders_from("b", 10, SETTLE).await;
    let seen = stream.stop().await;
    assert_no_client_errors(&seen);

    // And every order any client was told about exists in b, with its events
    let b = regions.b.node.api();
    for s in seen.iter().filter(|s| s.status == 201) {
        let id = s.order_id.as_deref().unwrap();
        let got = b.order(id).await;
        assert_eq!(got.status, 200, "order {id} ({}) missing in b", s.key);
    }
    // And b's event stream holds every entry of a's, with the same ids
    let mut ca = regions.a.redis.client().await;
    let mut cb = regions.b.redis.client().await;
    let a_ids: Vec<String> = entries(&mut ca, "tandem:events")
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    let b_ids: std::collections::HashSet<String> = entries(&mut cb, "tandem:events")
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    let missing: Vec<&String> = a_ids.iter().filter(|id| !b_ids.contains(*id)).collect();
    assert!(!a_ids.is_empty());
    assert!(
        missing.is_empty(),
        "{} of {} events of a missing in b",
        missing.len(),
        a_ids.len()
    );
    assert_eq!(regions.a.node.role().await["role"], "standby");
}

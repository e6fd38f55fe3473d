//! Several gateways sharing failover control through real etcd (GATEWAY_ETCD_ENDPOINTS):
//! the controlling gateway killed or cut off from etcd, killed together with the active
//! region, etcd down under load, and gateway restarts. Clients switch gateway on every
//! request and resend a failed one (same Idempotency-Key) through the next gateway.
//!
//! The nodes log every promote, demote and lease call with the calling gateway's id;
//! the tests read those logs to check who acted, when, and at which epoch.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use gateway::etcd::EtcdClient;
use serde_json::json;
use system_tests::etcd::EtcdCluster;
use system_tests::gateway::{
    metric, Blackhole, ControlCall, Gateway, GatewayOptions, TwoRegions, CONTROL_CALL_LOGS,
};
use system_tests::poll::eventually;
use system_tests::{order_body, Api, HttpClient};

const SETTLE: Duration = Duration::from_secs(20);
const SKU: &str = "CTL-1";
/// How long one order may take, across gateways and retries, before the test fails.
const ORDER_DEADLINE: Duration = Duration::from_secs(30);

/// One answer a client got.
#[derive(Debug, Clone)]
struct Answer {
    gateway: usize,
    status: u16,
    region: String,
    order_id: Option<String>,
    error: String,
}

/// One order as a client placed it: every answer, until one was 201.
#[derive(Debug, Clone)]
struct Placed {
    key: String,
    sent: Instant,
    done: Instant,
    answers: Vec<Answer>,
}

impl Placed {
    fn accepted(&self) -> Option<&Answer> {
        self.answers.iter().find(|a| a.status == 201)
    }
}

/// Clients placing orders through the gateways in turn, each order with its own
/// Idempotency-Key; a request that fails goes again, same key, through the next gateway,
/// as a client behind DNS or a load balancer would do.
struct SwitchingClients {
    stop: Arc<AtomicBool>,
    placed: Arc<Mutex<Vec<Placed>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl SwitchingClients {
    fn start(gateways: &[HttpClient], clients: usize, tag: &str) -> SwitchingClients {
        let stop = Arc::new(AtomicBool::new(false));
        let placed = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for c in 0..clients {
            let gateways = gateways.to_vec();
            let (stop, placed) = (stop.clone(), placed.clone());
            let tag = tag.to_string();
            tasks.push(tokio::spawn(async move {
                let mut next = c;
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let key = format!("{tag}-{c}-{n}");
                    let p = place_switching(&gateways, &mut next, &key).await;
                    placed.lock().unwrap().push(p);
                }
            }));
        }
        SwitchingClients {
            stop,
            placed,
            tasks,
        }
    }

    fn count(&self, pred: impl Fn(&Placed) -> bool) -> usize {
        self.placed
            .lock()
            .unwrap()
            .iter()
            .filter(|p| pred(p))
            .count()
    }

    /// Waits until `n` more orders than now were accepted by `region`.
    async fn wait_accepted_by(&self, region: &str, n: usize, deadline: Duration) {
        let by = |p: &Placed| p.accepted().is_some_and(|a| a.region == region);
        let base = self.count(by);
        eventually(
            deadline,
            &format!("{n} orders accepted by {region}"),
            || async {
                let c = self.count(by);
                if c >= base + n {
                    Ok(())
                } else {
                    Err((c, self.placed.lock().unwrap().last().cloned()))
                }
            },
        )
        .await
    }

    async fn stop(self) -> Vec<Placed> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.placed).unwrap().into_inner().unwrap()
    }
}

async fn place_switching(gateways: &[HttpClient], next: &mut usize, key: &str) -> Placed {
    let body = serde_json::to_vec(&order_body("c-ctl", &[(SKU, 1)], "tok_ok")).unwrap();
    let sent = Instant::now();
    let mut answers = Vec::new();
    while sent.elapsed() < ORDER_DEADLINE {
        let gateway = *next % gateways.len();
        *next += 1;
        let r = gateways[gateway]
            .try_request(
                reqwest::Method::POST,
                "/orders",
                Some(body.clone()),
                &[("Idempotency-Key", key)],
            )
            .await;
        let answer = match r {
            Ok(r) => Answer {
                gateway,
                status: r.status,
                region: r.header("x-region").unwrap_or("-").to_string(),
                order_id: r.json["orderId"].as_str().map(String::from),
                error: if r.status == 201 {
                    String::new()
                } else {
                    r.text
                },
            },
            Err(e) => Answer {
                gateway,
                status: 0,
                region: "-".into(),
                order_id: None,
                error: e.to_string(),
            },
        };
        let ok = answer.status == 201;
        answers.push(answer);
        if ok {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Placed {
        key: key.to_string(),
        sent,
        done: Instant::now(),
        answers,
    }
}

/// Every order was accepted in the end, every answer for one key names the same order,
/// no two keys share an order, and `region` holds exactly the accepted orders: none
/// lost, none twice.
async fn assert_each_order_exactly_once(placed: &[Placed], region: &Api) {
    let failed: Vec<&Placed> = placed.iter().filter(|p| p.accepted().is_none()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} orders never accepted, e.g. {:#?}",
        failed.len(),
        placed.len(),
        &failed[..failed.len().min(2)]
    );
    let mut acked = HashSet::new();
    for p in placed {
        let ids: HashSet<&str> = p
            .answers
            .iter()
            .filter(|a| a.status == 201)
            .filter_map(|a| a.order_id.as_deref())
            .collect();
        assert_eq!(
            ids.len(),
            1,
            "key {} got several orders: {:#?}",
            p.key,
            p.answers
        );
        let id = ids.into_iter().next().unwrap().to_string();
        assert!(acked.insert(id), "two keys got the same order: {}", p.key);
    }
    let stored: Vec<String> = region
        .events_query("eventType=OrderPlaced")
        .await
        .iter()
        .filter_map(|e| e["aggregateId"].as_str().map(String::from))
        .collect();
    let unique: HashSet<String> = stored.iter().cloned().collect();
    assert_eq!(unique.len(), stored.len(), "an order was placed twice");
    let lost: Vec<&String> = acked.iter().filter(|id| !unique.contains(*id)).collect();
    let extra: Vec<&String> = unique.iter().filter(|id| !acked.contains(*id)).collect();
    assert!(
        lost.is_empty(),
        "{} acknowledged orders missing: {lost:?}",
        lost.len()
    );
    assert!(
        extra.is_empty(),
        "{} orders nobody was told about: {extra:?}",
        extra.len()
    );
}

/// Two replicated regions whose nodes log control calls, etcd, and gateways started one
/// after another (the first one takes control and makes a active), with a product.
struct Fleet {
    regions: TwoRegions,
    etcd: EtcdCluster,
    gateways: Vec<Gateway>,
}

impl Fleet {
    /// `gateways`: each id, and its etcd endpoints (`None`: the cluster's own).
    async fn start(members: usize, gateways: &[(&str, Option<String>)]) -> Fleet {
        let etcd = EtcdCluster::start(members).await;
        Self::start_on(etcd, gateways).await
    }

    async fn start_on(etcd: EtcdCluster, gateways: &[(&str, Option<String>)]) -> Fleet {
        let regions = TwoRegions::start_with(true, |_| {
            CONTROL_CALL_LOGS
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .await;
        let mut fleet = Fleet {
            regions,
            etcd,
            gateways: Vec::new(),
        };
        for (n, (id, endpoints)) in gateways.iter().enumerate() {
            let endpoints = endpoints.clone().unwrap_or_else(|| fleet.etcd.endpoints());
            let gw = fleet.start_gateway(id, &endpoints).await;
            if n == 0 {
                gw.wait_controller(id, SETTLE).await;
            }
            fleet.gateways.push(gw);
        }
        for gw in &fleet.gateways {
            gw.wait_active("a", 1, SETTLE).await;
            gw.wait_healthy(&["a", "b"], SETTLE).await;
        }
        fleet.gateways[0]
            .api()
            .put_product(SKU, 100, 1_000_000)
            .await;
        fleet.regions.b.node.wait_product(SKU, SETTLE).await;
        fleet
    }

    async fn start_gateway(&self, id: &str, endpoints: &str) -> Gateway {
        Gateway::start(GatewayOptions::new(&self.regions.regions()).etcd(id, endpoints)).await
    }

    fn clients(&self) -> Vec<HttpClient> {
        self.gateways.iter().map(|g| g.http()).collect()
    }

    /// Every control call both nodes received, oldest first, with the node's region.
    fn control_calls(&self) -> Vec<(&'static str, ControlCall)> {
        let mut calls: Vec<(&'static str, ControlCall)> = Vec::new();
        calls.extend(
            self.regions
                .a
                .node
                .control_calls()
                .into_iter()
                .map(|c| ("a", c)),
        );
        calls.extend(
            self.regions
                .b
                .node
                .control_calls()
                .into_iter()
                .map(|c| ("b", c)),
        );
        calls.sort_by_key(|(_, c)| c.at_us);
        calls
    }
}

/// The granted promotions the nodes logged: `(region, caller, epoch)`.
fn promotions(calls: &[(&str, ControlCall)]) -> Vec<(String, String, u64)> {
    calls
        .iter()
        .filter(|(_, c)| c.action == "promote" && c.ok)
        .map(|(r, c)| (r.to_string(), c.caller.clone(), c.epoch))
        .collect()
}

/// Callers in the order they acted, consecutive repeats folded: `["g1", "g2"]` means
/// g1 acted, then g2, and g1 never again.
fn turns(calls: &[(&str, ControlCall)]) -> Vec<String> {
    let mut turns: Vec<String> = Vec::new();
    for (_, c) in calls {
        if turns.last() != Some(&c.caller) {
            turns.push(c.caller.clone());
        }
    }
    turns
}

fn unix_micros() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_micros() as i64
}

async fn metric_of(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric(&gw.metrics().await, name, labels).unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_controller_under_load_hands_control_over_without_a_failover() {
    // Given two gateways on a three-member etcd cluster, g1 in control, and clients
    // switching gateway with every request
    let mut f = Fleet::start(3, &[("g1", None), ("g2", None)]).await;
    assert_eq!(f.gateways[1].controller().await.as_deref(), Some("g1"));
    assert_eq!(
        metric_of(&f.gateways[0], "tandem_gateway_controller", &[]).await,
        1.0
    );
    assert_eq!(
        metric_of(&f.gateways[1], "tandem_gateway_controller", &[]).await,
        0.0
    );
    let clients = SwitchingClients::start(&f.clients(), 3, "kill-ctl");
    clients.wait_accepted_by("a", 20, SETTLE).await;

    // When the controlling gateway is killed
    let killed = Instant::now();
    f.gateways[0].kill();

    // Then g2 takes control, and orders keep being accepted by a
    f.gateways[1].wait_controller("g2", SETTLE).await;
    let took = killed.elapsed();
    eprintln!("[drill] controller kill: g2 in control {took:?} after g1 was killed");
    assert_eq!(
        metric_of(&f.gateways[1], "tandem_gateway_controller", &[]).await,
        1.0
    );
    clients.wait_accepted_by("a", 30, SETTLE).await;
    let placed = clients.stop().await;

    // And no region failed over: a is still active at epoch 1, b never promoted
    assert_eq!(f.regions.a.node.role().await["role"], "active");
    assert_eq!(f.regions.a.node.role().await["epoch"], 1);
    assert_eq!(f.regions.b.node.role().await["role"], "standby");
    let calls = f.control_calls();
    assert_eq!(promotions(&calls), [("a".into(), "g1".into(), 1)]);
    assert!(
        calls.iter().all(|(_, c)| c.action != "demote"),
        "{calls:#?}"
    );
    assert_eq!(
        metric_of(&f.gateways[1], "tandem_gateway_failovers_total", &[]).await,
        0.0
    );

    // And g2 continued a's lease at epoch 1, after g1's last renewal
    assert_eq!(turns(&calls), ["g1", "g2"]);
    let g2_leases: Vec<&ControlCall> = calls
        .iter()
        .filter(|(r, c)| *r == "a" && c.caller == "g2" && c.action == "lease")
        .map(|(_, c)| c)
        .collect();
    assert!(!g2_leases.is_empty());
    assert!(
        g2_leases.iter().all(|c| c.ok && c.epoch == 1),
        "{g2_leases:#?}"
    );

    // And clients that found g1 gone got their order through g2, once
    let switched: Vec<&Placed> = placed
        .iter()
        .filter(|p| p.answers.iter().any(|a| a.gateway == 0 && a.status != 201))
        .collect();
    assert!(!switched.is_empty(), "no client ever found g1 gone");
    let mut refusals: HashMap<(u16, String), usize> = HashMap::new();
    for a in placed
        .iter()
        .flat_map(|p| &p.answers)
        .filter(|a| a.status != 201)
    {
        let code = serde_json::from_str::<serde_json::Value>(&a.error)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(String::from))
            .unwrap_or_else(|| "transport".into());
        *refusals.entry((a.status, code)).or_default() += 1;
    }
    eprintln!(
        "[drill] controller kill: {} orders resent through g2; failed attempts by status \
         and code: {refusals:?}",
        switched.len()
    );
    assert_each_order_exactly_once(&placed, &f.regions.a.node.api()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_and_active_region_die_together_and_b_is_promoted_once() {
    // Given two gateways, g1 in control, a active, clients switching gateway
    let mut f = Fleet::start(3, &[("g1", None), ("g2", None)]).await;
    let clients = SwitchingClients::start(&f.clients(), 3, "kill-both");
    clients.wait_accepted_by("a", 20, SETTLE).await;

    // When g1, a's node and a's Redis are killed at once
    let killed = Instant::now();
    f.gateways[0].kill();
    f.regions.a.node.kill();
    f.regions.a.redis.kill();

    // Then g2 takes control and promotes b, and orders are accepted by b
    clients.wait_accepted_by("b", 20, SETTLE).await;
    let placed = clients.stop().await;
    let rto = placed
        .iter()
        .filter(|p| p.done > killed)
        .filter(|p| p.accepted().is_some_and(|a| a.region == "b"))
        .map(|p| p.done - killed)
        .min()
        .expect("an order accepted by b");
    let longest = placed.iter().map(|p| p.done - p.sent).max().unwrap();
    eprintln!(
        "[drill] controller+region kill: first order from b {rto:?} after the kill; \
         slowest order {longest:?}; {} orders",
        placed.len()
    );
    // Goal: under 2 s with release binaries (bench/controller-drill.sh); debug binaries
    // on a loaded machine get slack here.
    assert!(rto < Duration::from_secs(6), "recovery took {rto:?}");
    assert_eq!(f.gateways[1].controller().await.as_deref(), Some("g2"));

    // And b was promoted exactly once, by g2, at epoch 2, which etcd recorded
    let calls = f.control_calls();
    assert_eq!(
        promotions(&calls),
        [("a".into(), "g1".into(), 1), ("b".into(), "g2".into(), 2)]
    );
    assert_eq!(f.regions.b.node.role().await["epoch"], 2);
    let etcd = EtcdClient::new(f.etcd.client_urls(), Duration::from_secs(1)).unwrap();
    let record: serde_json::Value =
        serde_json::from_slice(&etcd.get("/tandem/epoch").await.unwrap().unwrap().value).unwrap();
    assert_eq!(record["epoch"], 2);
    assert_eq!(record["region"], "b");
    assert_eq!(
        metric_of(
            &f.gateways[1],
            "tandem_gateway_failovers_total",
            &[("from", "a"), ("to", "b"), ("reason", "unhealthy")]
        )
        .await,
        1.0
    );

    // And no client was told two different orders for one key
    for p in &placed {
        let ids: HashSet<&str> = p
            .answers
            .iter()
            .filter_map(|a| a.order_id.as_deref())
            .collect();
        assert!(ids.len() <= 1, "key {}: {:#?}", p.key, p.answers);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_cut_off_from_etcd_stops_acting_before_another_gateway_starts() {
    // Given g1 reaching every etcd member only through a proxy that can go silent, g2
    // reaching them directly; g1 in control
    let etcd = EtcdCluster::start(3).await;
    let mut proxies = Vec::new();
    for m in &etcd.members {
        proxies.push(Blackhole::start(m.client_port()).await);
    }
    let via_proxies = proxies
        .iter()
        .map(|p| p.url())
        .collect::<Vec<_>>()
        .join(",");
    let f = Fleet::start_on(etcd, &[("g1", Some(via_proxies)), ("g2", None)]).await;
    let clients = SwitchingClients::start(&f.clients(), 2, "cut-ctl");
    clients.wait_accepted_by("a", 20, SETTLE).await;

    // When g1's links to etcd go silent (g1 still reaches the regions)
    let cut = Instant::now();
    for p in &proxies {
        p.cut(true);
    }

    // Then g2 takes control; g1 knows it no longer controls
    f.gateways[1].wait_controller("g2", SETTLE).await;
    eprintln!(
        "[drill] partition: g2 in control {:?} after the cut",
        cut.elapsed()
    );
    assert_eq!(
        metric_of(&f.gateways[0], "tandem_gateway_controller", &[]).await,
        0.0
    );
    assert_ne!(f.gateways[0].controller().await.as_deref(), Some("g1"));
    clients.wait_accepted_by("a", 20, SETTLE).await;

    // And g1 still routes: orders sent to g1 alone are accepted by a at once
    let g1 = f.gateways[0].http();
    let mut direct = Vec::new();
    for n in 0..5 {
        let key = format!("via-g1-{n}");
        let p = place_switching(std::slice::from_ref(&g1), &mut 0, &key).await;
        let a = p.accepted().unwrap_or_else(|| panic!("{p:#?}"));
        assert_eq!(a.region, "a");
        assert_eq!(p.answers.len(), 1, "{p:#?}");
        direct.push(p);
    }
    let mut placed = clients.stop().await;
    placed.extend(direct);

    // And the nodes saw g1 act, then g2, never both in turn, and no failover
    let calls = f.control_calls();
    assert_eq!(turns(&calls), ["g1", "g2"], "{calls:#?}");
    assert_eq!(promotions(&calls), [("a".into(), "g1".into(), 1)]);
    assert!(calls.iter().all(|(_, c)| c.epoch == 1), "{calls:#?}");
    // And every lease g1 granted ran out before g2's first call
    let first_g2 = calls
        .iter()
        .find(|(_, c)| c.caller == "g2")
        .unwrap()
        .1
        .at_us;
    let g1_end = calls
        .iter()
        .filter(|(_, c)| c.caller == "g1" && c.ok)
        .map(|(_, c)| c.at_us + c.ttl_ms.unwrap_or(0) as i64 * 1000)
        .max()
        .unwrap();
    eprintln!(
        "[drill] partition: g1's last lease ended {} ms before g2's first call",
        (first_g2 - g1_end) / 1000
    );
    assert!(
        g1_end <= first_g2,
        "g1's lease ran {} µs into g2's turn",
        g1_end - first_g2
    );
    assert_each_order_exactly_once(&placed, &f.regions.a.node.api()).await;

    // And when the links heal, g1 follows g2 and stays out of control
    for p in &proxies {
        p.cut(false);
    }
    f.gateways[0].wait_controller("g2", SETTLE).await;
    assert_eq!(
        metric_of(&f.gateways[0], "tandem_gateway_controller", &[]).await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orders_keep_being_accepted_while_etcd_is_down() {
    // Given two gateways on a single etcd member, and clients switching gateway
    let mut f = Fleet::start(1, &[("g1", None), ("g2", None)]).await;
    let clients = SwitchingClients::start(&f.clients(), 3, "etcd-down");
    clients.wait_accepted_by("a", 20, SETTLE).await;

    // When etcd is down for 10 s
    f.etcd.kill_all();
    let down = Instant::now();
    let before = clients.count(|p| p.accepted().is_some());
    eventually(Duration::from_secs(15), "etcd outage of 10 s", || async {
        // The outage's length, not a wait for a condition: orders flow meanwhile.
        if down.elapsed() >= Duration::from_secs(10) {
            Ok(())
        } else {
            Err(down.elapsed())
        }
    })
    .await;
    let during = clients.count(|p| p.accepted().is_some()) - before;
    eprintln!("[drill] etcd down 10 s: {during} orders accepted meanwhile");

    // Then a kept accepting orders all along (nobody could renew its lease; the peer
    // region's Redis vouched that no other epoch began)
    assert!(
        during >= 50,
        "only {during} orders accepted while etcd was down"
    );
    assert_eq!(
        metric_of(&f.gateways[0], "tandem_gateway_controller", &[]).await,
        0.0
    );
    assert_eq!(
        metric_of(&f.gateways[1], "tandem_gateway_controller", &[]).await,
        0.0
    );

    // And when etcd is back, a gateway controls again and renews a's lease
    f.etcd.restart_all().await;
    let back = Instant::now();
    let back_us = unix_micros();
    eventually(SETTLE, "a controller again", || async {
        let mut ids = Vec::new();
        for g in &f.gateways {
            ids.push(g.controller().await);
        }
        match (&ids[0], &ids[1]) {
            (Some(x), Some(y)) if x == y => Ok(x.clone()),
            _ => Err(ids),
        }
    })
    .await;
    clients.wait_accepted_by("a", 20, SETTLE).await;
    let placed = clients.stop().await;
    eprintln!(
        "[drill] etcd back: control again within {:?}",
        back.elapsed()
    );
    let calls = f.control_calls();
    assert!(
        calls
            .iter()
            .any(|(r, c)| *r == "a" && c.action == "lease" && c.ok && c.at_us > back_us),
        "a's lease was not renewed after etcd came back: {:#?}",
        &calls[calls.len().saturating_sub(5)..]
    );

    // And no failover happened, and every order exists exactly once
    assert_eq!(promotions(&calls), [("a".into(), "g1".into(), 1)]);
    assert_eq!(f.regions.a.node.role().await["epoch"], 1);
    assert_each_order_exactly_once(&placed, &f.regions.a.node.api()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gateway_restarts_never_reuse_an_epoch() {
    // Given two gateways sharing etcd, g1 in control
    let mut f = Fleet::start(1, &[("g1", None), ("g2", None)]).await;
    let switch = |gw: &Gateway, to: &str| {
        let admin = gw.admin();
        let to = to.to_string();
        async move { admin.post("/gateway/failover", &json!({ "to": to })).await }
    };

    // Then only the controller switches over; the other says who does
    let refused = switch(&f.gateways[1], "b").await;
    assert_eq!(refused.status, 409, "{}", refused.text);
    assert_eq!(refused.error_code(), "not_controller");
    assert!(refused.text.contains("g1"), "{}", refused.text);
    let r = switch(&f.gateways[0], "b").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["epoch"], 2);
    // And the other gateway follows: it routes writes to b
    f.gateways[1].wait_active("b", 2, SETTLE).await;
    let placed = place_switching(&[f.gateways[1].http()], &mut 0, "after-switch").await;
    assert_eq!(
        placed.accepted().map(|a| a.region.as_str()),
        Some("b"),
        "{placed:#?}"
    );

    // When every gateway is killed and a new one (empty state dir) starts
    for g in &mut f.gateways {
        g.kill();
    }
    let endpoints = f.etcd.endpoints();
    let g3 = f.start_gateway("g3", &endpoints).await;
    g3.wait_controller("g3", SETTLE).await;

    // Then it keeps b active at epoch 2, and its switchover takes epoch 3
    g3.wait_active("b", 2, SETTLE).await;
    g3.wait_healthy(&["a", "b"], SETTLE).await;
    let r = switch(&g3, "a").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.json["epoch"], 3);

    // When g3 stops (SIGTERM hands control over) and etcd itself restarts
    let mut g3 = g3;
    g3.terminate(Duration::from_secs(10)).await;
    f.etcd.restart_all().await;
    f.gateways[0].restart().await;
    f.gateways[0].wait_controller("g1", SETTLE).await;
    f.gateways[0].wait_active("a", 3, SETTLE).await;
    f.gateways[0].wait_healthy(&["a", "b"], SETTLE).await;
    let r = switch(&f.gateways[0], "b").await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Then the epoch still grows, and every promotion the nodes saw had its own epoch
    assert_eq!(r.json["epoch"], 4);
    let calls = f.control_calls();
    let promoted = promotions(&calls);
    let epochs: Vec<u64> = promoted.iter().map(|(_, _, e)| *e).collect();
    assert_eq!(epochs, [1, 2, 3, 4], "{promoted:?}");
    let callers: HashMap<u64, &str> = promoted.iter().map(|(_, c, e)| (*e, c.as_str())).collect();
    assert_eq!(callers[&3], "g3");
}

#[test]
fn bad_etcd_settings_exit_64_naming_the_key() {
    let regions = (
        "GATEWAY_REGIONS",
        "a=http://127.0.0.1:1,b=http://127.0.0.1:2",
    );
    let cases: [(&[(&str, &str)], &str); 4] = [
        (
            &[("GATEWAY_ETCD_ENDPOINTS", "127.0.0.1:2379")],
            "etcd_endpoints",
        ),
        (
            // A 2 s node lease cannot nest in a 1 s controller lease.
            &[
                ("GATEWAY_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                ("GATEWAY_LEASE_MS", "2000"),
            ],
            "etcd_lease_ttl_s",
        ),
        (
            &[
                ("GATEWAY_ETCD_ENDPOINTS", "http://127.0.0.1:2379"),
                ("GATEWAY_ETCD_TIMEOUT_MS", "900"),
            ],
            "etcd_timeout_ms",
        ),
        (&[("GATEWAY_ID", "gw one")], "`id`"),
    ];
    for (env, key) in cases {
        let mut all = vec![regions];
        all.extend_from_slice(env);
        let (code, out) = system_tests::gateway::run_gateway_expecting_exit(&all);
        assert_eq!(code, 64, "{env:?}: {out}");
        assert!(out.contains(key), "{env:?} should name {key}: {out}");
    }
}

//! The container stack with two gateways sharing failover control through etcd
//! (`docker-compose.yml` + `docker-compose.gateways.yml`, images from
//! `deploy/build-images.sh`): clients use either gateway; `docker kill` of the one that
//! controls failover hands control to the other within a bound, and orders keep being
//! acknowledged through it with no failover of the regions (same active region, same
//! epoch). Needs a Docker engine: skipped with a message where none answers, a failure
//! under CI or TANDEM_REQUIRE_DOCKER=1 (see `system_tests::compose`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::json;
use system_tests::compose::{docker_or_skip, Stack};
use system_tests::{eventually, order_body, HttpClient};

const SKU: &str = "GW-WIDGET";
const GATEWAYS: [&str; 2] = ["gw-1", "gw-2"];
/// Stack-level waits (Prometheus scrapes every 5 s).
const SETTLE: Duration = Duration::from_secs(60);
/// How soon the surviving gateway must control failover after the controller's kill:
/// the controller's etcd lease (1 s) runs out, then the next campaign wins. README says
/// about 1.5 s; the bound leaves room for a loaded machine.
const HANDOVER_BOUND: Duration = Duration::from_secs(6);

#[tokio::test]
async fn killing_the_controlling_gateway_hands_control_to_the_other_without_a_failover() {
    if !docker_or_skip(
        "killing_the_controlling_gateway_hands_control_to_the_other_without_a_failover",
    ) {
        return;
    }
    // Given the stack with two gateways and etcd, region a active
    let started = Instant::now();
    let stack = Stack::up_gateways().await;
    eprintln!(
        "[stack] {} up and healthy in {:.1}s ({})",
        stack.project,
        started.elapsed().as_secs_f64(),
        stack.tool.name()
    );
    // The single gateway of docker-compose.yml stays parked
    assert!(
        !stack.has_container("gateway").await,
        "the single gateway was created beside gw-1 and gw-2"
    );
    let gws: BTreeMap<&str, HttpClient> = GATEWAYS
        .iter()
        .map(|g| (*g, stack.gateway_named(g)))
        .collect();

    // Both gateways name the same controller, one of them, with a active
    let (controller, epoch) = agreed_controller(&gws).await;
    assert!(GATEWAYS.contains(&controller.as_str()), "{controller}");
    let survivor = *GATEWAYS.iter().find(|g| **g != controller).unwrap();
    eprintln!("[gateways] controller {controller}, epoch {epoch}; {survivor} will survive");
    for (name, gw) in &gws {
        let m = gw.get("/metrics").await.text;
        let expected = if *name == controller { 1.0 } else { 0.0 };
        assert_eq!(
            metric(&m, "tandem_gateway_controller"),
            Some(expected),
            "{name}: tandem_gateway_controller"
        );
    }

    // Prometheus scrapes both gateways (and etcd)
    gateways_scraped(&stack).await;

    // Clients place orders through both gateways
    let gw = &gws[survivor];
    let put = gw
        .put(
            &format!("/api/v1/products/{SKU}"),
            &json!({"name": "Gateway widget", "price": 100, "currency": "USD", "stock": 1_000_000}),
        )
        .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text);
    for name in GATEWAYS {
        let r = place(&gws[name], &format!("before-{name}")).await;
        assert_eq!(r.0, 201, "order through {name}: {}", r.2);
        assert_eq!(r.1, "a", "order through {name} served by region a");
    }

    // When the controlling gateway is killed while a client places orders through the
    // other one
    let load = Load::start(gw.clone());
    load.wait_acks(5).await;
    let killed = Instant::now();
    stack.kill(&[controller.as_str()]).await;

    // Then the survivor takes control within the bound
    let handover = eventually(
        HANDOVER_BOUND + Duration::from_secs(10),
        "the surviving gateway controls failover",
        || async {
            let v = gw.get("/gateway/regions").await.json;
            if v["controller"] == survivor {
                Ok(killed.elapsed())
            } else {
                Err(v)
            }
        },
    )
    .await;
    eprintln!(
        "[gateways] {survivor} took control {:.0} ms after {controller} was killed",
        handover.as_secs_f64() * 1000.0
    );
    assert!(
        handover <= HANDOVER_BOUND,
        "handover took {handover:?} (bound {HANDOVER_BOUND:?})"
    );
    let m = gw.get("/metrics").await.text;
    assert_eq!(metric(&m, "tandem_gateway_controller"), Some(1.0));

    // And orders keep being acknowledged through it, by region a, at the same epoch
    let before = load.acks();
    load.wait_acks(before + 20).await;
    let seen = load.stop().await;
    let failed: Vec<&(u16, String, String, Duration)> =
        seen.iter().filter(|s| s.0 != 201).collect();
    let by_region =
        seen.iter()
            .filter(|s| s.0 == 201)
            .fold(BTreeMap::<&str, usize>::new(), |mut m, s| {
                *m.entry(s.1.as_str()).or_default() += 1;
                m
            });
    eprintln!(
        "[load] {} orders through {survivor}: {} acknowledged {by_region:?}, {} not: {:?}",
        seen.len(),
        seen.len() - failed.len(),
        failed.len(),
        failed.iter().take(5).collect::<Vec<_>>()
    );
    assert!(
        failed.is_empty(),
        "orders through {survivor} not acknowledged: {failed:?}"
    );
    assert_eq!(by_region.keys().collect::<Vec<_>>(), [&"a"]);

    let regions = gw.get("/gateway/regions").await.json;
    assert_eq!(regions["active"], "a", "{regions}");
    assert_eq!(regions["epoch"], epoch, "the epoch moved: {regions}");
    let m = gw.get("/metrics").await.text;
    assert_eq!(
        metric(&m, "tandem_gateway_failovers_total").unwrap_or(0.0),
        0.0,
        "{survivor} failed over"
    );
    // The nodes say the same: a active, b standby, both at the epoch of before.
    for (region, role) in [("a", "active"), ("b", "standby")] {
        let node = stack.node(region).await;
        let r = node.get("/admin/role").await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.json["role"], role, "node {region}: {}", r.text);
        assert_eq!(r.json["epoch"], epoch, "node {region}: {}", r.text);
    }
}

/// Polls both gateways until they name the same controller with region a active;
/// returns it and the epoch.
async fn agreed_controller(gws: &BTreeMap<&str, HttpClient>) -> (String, u64) {
    eventually(
        SETTLE,
        "both gateways name one controller, a active",
        || async {
            let mut seen = Vec::new();
            for gw in gws.values() {
                seen.push(gw.get("/gateway/regions").await.json);
            }
            let c = &seen[0]["controller"];
            let agreed = seen.iter().all(|v| {
                v["controller"] == *c && v["active"] == "a" && v["epoch"] == seen[0]["epoch"]
            });
            match (c.as_str(), seen[0]["epoch"].as_u64()) {
                (Some(c), Some(e)) if agreed => Ok((c.to_string(), e)),
                _ => Err(seen),
            }
        },
    )
    .await
}

/// Waits until Prometheus has scraped both gateways and etcd successfully.
async fn gateways_scraped(stack: &Stack) {
    let prom = stack.prometheus();
    eventually(SETTLE, "Prometheus scrapes gw-1, gw-2 and etcd", || async {
        let r = prom
            .get("/api/v1/query?query=up%7Bjob%3D~%22tandem-gateway%7Cetcd%22%7D")
            .await;
        let targets: BTreeMap<String, String> = r.json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .map(|s| {
                (
                    s["metric"]["instance"].as_str().unwrap_or("?").to_string(),
                    s["value"][1].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        let want = ["etcd:2379", "gw-1:8080", "gw-2:8080"];
        if want
            .iter()
            .all(|t| targets.get(*t).is_some_and(|v| v == "1"))
        {
            Ok(())
        } else {
            Err(targets)
        }
    })
    .await;
}

/// One order with Idempotency-Key `key`: (status, region that served it, body).
async fn place(gw: &HttpClient, key: &str) -> (u16, String, String) {
    let body = serde_json::to_vec(&order_body("c-gw", &[(SKU, 1)], "tok_ok")).unwrap();
    match gw
        .try_request(
            reqwest::Method::POST,
            "/orders",
            Some(body),
            &[("Idempotency-Key", key)],
        )
        .await
    {
        Ok(r) => (
            r.status,
            r.header("x-region").unwrap_or("-").to_string(),
            r.text,
        ),
        Err(e) => (0, "-".into(), e.to_string()),
    }
}

/// A client placing orders one after the other through one gateway until stopped,
/// each answer kept as (status, region, body, when after the start).
struct Load {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<(u16, String, String, Duration)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Load {
    fn start(gw: HttpClient) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (s, log) = (stop.clone(), seen.clone());
        let task = tokio::spawn(async move {
            let t0 = Instant::now();
            let mut n = 0;
            while !s.load(Ordering::Relaxed) {
                n += 1;
                let (status, region, body) = place(&gw, &format!("load-{n}")).await;
                log.lock()
                    .unwrap()
                    .push((status, region, body, t0.elapsed()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        });
        Load { stop, seen, task }
    }

    fn acks(&self) -> usize {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.0 == 201)
            .count()
    }

    async fn wait_acks(&self, n: usize) {
        eventually(
            SETTLE,
            "orders acknowledged through the gateway",
            || async {
                let acks = self.acks();
                if acks >= n {
                    Ok(())
                } else {
                    let last: Vec<(u16, String)> = self
                        .seen
                        .lock()
                        .unwrap()
                        .iter()
                        .rev()
                        .take(3)
                        .map(|s| (s.0, s.2.clone()))
                        .collect();
                    Err((acks, last))
                }
            },
        )
        .await;
    }

    async fn stop(self) -> Vec<(u16, String, String, Duration)> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

/// The sum of every sample of `name` in a Prometheus text exposition.
fn metric(text: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

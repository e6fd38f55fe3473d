//! The stack users run, `docker-compose.yml`, started from the images
//! `deploy/build-images.sh` builds, and attacked with Docker's own faults while clients
//! place orders through the gateway's published port: region a killed (`docker kill`),
//! hung (`docker pause`) and cut off (`docker network disconnect`), each time brought back
//! to rejoin as standby (and, after the kill and the hang, switched back by a planned
//! switchover). Prometheus in the
//! stack is checked through its HTTP API: every target up, an alert after the kill, and
//! every metric the alert rules and the dashboard query present.
//!
//! Needs a Docker engine: skipped with a message where none answers, a failure in CI
//! (see `system_tests::compose`).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use system_tests::compose::{docker_or_skip, Stack, WAN};
use system_tests::poll::eventually;
use system_tests::replicator::entries;
use system_tests::{order_body, HttpClient};

/// Long enough for a failover, a rejoin or an alert on a loaded 2-core machine.
const SETTLE: Duration = Duration::from_secs(60);
const SKU: &str = "STACK-1";
const REGION_A: &[&str] = &["redis-a", "node-a", "replicator-a"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compose_stack_survives_kill_pause_and_partition_of_a_region() {
    if !docker_or_skip("compose_stack_survives_kill_pause_and_partition_of_a_region") {
        return;
    }
    // Given the stack up, region a active
    let started = Instant::now();
    let stack = Stack::up().await;
    eprintln!(
        "[stack] {} up and healthy in {:.1}s ({})",
        stack.project,
        started.elapsed().as_secs_f64(),
        stack.tool.name()
    );
    let gw = stack.gateway();
    wait_active(&gw, "a", 1).await;
    secure_defaults(&stack).await;

    // Prometheus scrapes every process
    every_target_up(&stack).await;

    // A client places orders through the gateway's published port, and they ship
    let put = gw
        .put(
            &format!("/api/v1/products/{SKU}"),
            &json!({"name": "Stack widget", "price": 100, "currency": "USD", "stock": 1_000_000}),
        )
        .await;
    assert!(put.status == 200 || put.status == 201, "{}", put.text);
    let first = place(&gw, "first-order").await;
    assert_eq!(first.status, 201, "{}", first.body);
    assert_eq!(first.region, "a");
    wait_shipped(&gw, first.order_id.as_deref().unwrap()).await;
    let mut history = Vec::new();

    // --- kill -------------------------------------------------------------------------
    // When region a's containers are killed under load
    let clients = Clients::start(&gw, 2, "kill");
    clients.wait_acks_from("a", 10).await;
    let killed = Instant::now();
    stack.kill(REGION_A).await;

    // Then b takes over and serves the clients
    let epoch = wait_active(&gw, "b", 2).await;
    clients.wait_acks_from("b", 10).await;
    let seen = clients.stop().await;
    report("kill", &seen, killed, "b");
    history.extend(seen);

    // And Prometheus fires the region-down and failover alerts
    wait_alert(&stack, "TandemRegionDown", &[("region", "a")]).await;
    wait_alert(&stack, "TandemFailover", &[("from", "a"), ("to", "b")]).await;

    // When region a is started again, it rejoins as standby at b's epoch
    stack.start(REGION_A).await;
    rejoined(&stack, epoch).await;

    // --- planned switchover back ------------------------------------------------------
    let epoch = switch_over(&stack, "a", "b", epoch).await;

    // --- pause ------------------------------------------------------------------------
    // When region a hangs (its node, Redis and replicator frozen) under load
    let clients = Clients::start(&gw, 2, "pause");
    clients.wait_acks_from("a", 10).await;
    let paused = Instant::now();
    stack.pause(REGION_A).await;

    // Then b takes over and keeps serving while a stays frozen
    let epoch = wait_active(&gw, "b", epoch + 1).await;
    clients.wait_acks_from("b", 30).await;
    let seen = clients.stop().await;
    report("pause", &seen, paused, "b");
    history.extend(seen);

    // When a thaws, it finds the higher epoch and rejoins as standby
    stack.unpause(REGION_A).await;
    rejoined(&stack, epoch).await;
    let epoch = switch_over(&stack, "a", "b", epoch).await;

    // --- partition --------------------------------------------------------------------
    // When region a is cut off from the gateway and region b (it keeps its own network)
    let clients = Clients::start(&gw, 2, "partition");
    clients.wait_acks_from("a", 10).await;
    let (node_a, node_b) = (stack.node("a").await, stack.node("b").await);
    let cut = Instant::now();
    stack.disconnect(WAN, REGION_A).await;

    // Then a stops acting (fenced) before b is promoted, sampled on both nodes directly
    let (a_stopped, b_active) = fenced_before_promoted(&node_a, &node_b, cut).await;
    eprintln!("[partition] a stopped acting after {a_stopped:?}, b active after {b_active:?}");
    let epoch = wait_active(&gw, "b", epoch + 1).await;
    clients.wait_acks_from("b", 10).await;
    let seen = clients.stop().await;
    report("partition", &seen, cut, "b");
    // And no client got an acknowledgement from a once b was promoted
    let late: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.status == 201 && s.region == "a" && s.done > cut + b_active)
        .collect();
    assert!(
        late.is_empty(),
        "acknowledged by a after b was promoted: {late:#?}"
    );
    history.extend(seen);
    // And a refuses a write even from a client that still reaches it
    let direct = node_a
        .post_with_headers(
            "/orders",
            &order_body("c-direct", &[(SKU, 1)], "tok_ok"),
            &[("Idempotency-Key", "direct-to-a")],
        )
        .await;
    assert_eq!(
        direct.status, 503,
        "a took a write while cut off: {}",
        direct.text
    );
    assert_eq!(direct.error_code(), "region_not_active", "{}", direct.text);

    // When the link heals, a rejoins as standby. (Not switched back here: after a
    // partition, b's replicator has been seen not to resume copying from a once a was
    // active again; see deploy/README.md, "Known problems".)
    stack.connect(WAN, REGION_A).await;
    rejoined(&stack, epoch).await;
    assert!(epoch >= 6, "epoch {epoch}");

    // --- the whole history ------------------------------------------------------------
    // Then every acknowledged order exists in the active region or sits, reported, in a
    // quarantine (async durability), one order per Idempotency-Key, and all ship
    every_ack_kept(&stack, &gw, &history).await;
    // And both regions hold the same event stream
    regions_converge(&stack).await;
    // And every metric the alert rules and the dashboard query exists
    queried_metrics_exist(&stack, &gw).await;
    eprintln!(
        "[stack] scenario done in {:.1}s",
        started.elapsed().as_secs_f64()
    );
}

// --- clients ------------------------------------------------------------------------

/// One order as a client saw it, after its retries.
#[derive(Debug, Clone)]
struct Seen {
    key: String,
    sent: Instant,
    done: Instant,
    status: u16,
    region: String,
    order_id: Option<String>,
    body: String,
    /// Answers before the last one (retried with the same Idempotency-Key).
    retries: u32,
}

/// Places one order with `key`, retrying with the same key (as a careful client does)
/// while the answer says "try again": a transport error, 502-504, or 503.
async fn place(http: &HttpClient, key: &str) -> Seen {
    let sent = Instant::now();
    let body = serde_json::to_vec(&order_body("c-stack", &[(SKU, 1)], "tok_ok")).unwrap();
    let mut retries = 0;
    loop {
        let r = http
            .try_request(
                reqwest::Method::POST,
                "/orders",
                Some(body.clone()),
                &[("Idempotency-Key", key)],
            )
            .await;
        let (status, region, order_id, text) = match r {
            Ok(r) => (
                r.status,
                r.header("x-region").unwrap_or("-").to_string(),
                r.json["orderId"].as_str().map(String::from),
                r.text,
            ),
            Err(e) => (0, "-".into(), None, e.to_string()),
        };
        let again = status == 0 || (500..600).contains(&status);
        if !again || retries >= 50 {
            return Seen {
                key: key.to_string(),
                sent,
                done: Instant::now(),
                status,
                region,
                order_id,
                body: text,
                retries,
            };
        }
        retries += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Clients placing orders one after the other until stopped.
struct Clients {
    stop: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<Seen>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    fn start(gw: &HttpClient, n: usize, phase: &str) -> Clients {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..n)
            .map(|c| {
                let (http, stop, seen) = (gw.clone(), stop.clone(), seen.clone());
                let phase = phase.to_string();
                tokio::spawn(async move {
                    let mut i = 0;
                    while !stop.load(Ordering::Relaxed) {
                        i += 1;
                        let s = place(&http, &format!("{phase}-{c}-{i}")).await;
                        seen.lock().unwrap().push(s);
                    }
                })
            })
            .collect();
        Clients { stop, seen, tasks }
    }

    fn acks_from(&self, region: &str) -> usize {
        let seen = self.seen.lock().unwrap();
        seen.iter()
            .filter(|s| s.status == 201 && s.region == region)
            .count()
    }

    /// Waits until `n` more orders than now were acknowledged by `region`.
    async fn wait_acks_from(&self, region: &str, n: usize) {
        let base = self.acks_from(region);
        eventually(
            SETTLE,
            &format!("{n} orders acknowledged by {region}"),
            || async {
                let c = self.acks_from(region);
                if c >= base + n {
                    Ok(())
                } else {
                    Err((c - base, self.seen.lock().unwrap().last().cloned()))
                }
            },
        )
        .await;
    }

    async fn stop(self) -> Vec<Seen> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        Arc::try_unwrap(self.seen).unwrap().into_inner().unwrap()
    }
}

/// Prints what the clients saw around a fault: recovery time (fault to the first order
/// acknowledged by the new active that was sent after the fault), retries, failures;
/// fails on an order given up on or refused.
fn report(phase: &str, seen: &[Seen], fault: Instant, new_active: &str) {
    let first = seen
        .iter()
        .filter(|s| s.status == 201 && s.region == new_active && s.sent >= fault)
        .map(|s| s.done)
        .min()
        .map(|t| t - fault);
    let retried = seen.iter().filter(|s| s.retries > 0).count();
    let longest = seen
        .iter()
        .map(|s| s.done - s.sent)
        .max()
        .unwrap_or_default();
    eprintln!(
        "[{phase}] {} orders, {retried} needed retries, slowest {longest:?}, first order from {new_active} {first:?} after the fault",
        seen.len()
    );
    let failed: Vec<&Seen> = seen.iter().filter(|s| s.status != 201).collect();
    assert!(
        failed.is_empty(),
        "[{phase}] {} orders not acknowledged after retries: {:#?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
}

// --- the stack ----------------------------------------------------------------------

/// Waits until the gateway routes writes to `region` at `min_epoch` or later.
async fn wait_active(gw: &HttpClient, region: &str, min_epoch: u64) -> u64 {
    eventually(
        SETTLE,
        &format!("{region} active at epoch >= {min_epoch}"),
        || async {
            let r = gw
                .try_request(reqwest::Method::GET, "/gateway/health", None, &[])
                .await
                .map_err(|e| Value::String(e.to_string()))?;
            let epoch = r.json["epoch"].as_u64().unwrap_or(0);
            if r.status == 200
                && r.json["active"] == region
                && r.json["writes"] == true
                && epoch >= min_epoch
            {
                Ok(epoch)
            } else {
                Err(r.json)
            }
        },
    )
    .await
}

/// Published ports are loopback only; the admin API wants the token.
async fn secure_defaults(stack: &Stack) {
    let out = docker_ps_ports(stack).await;
    for line in out.lines() {
        let ports = line.split_once(' ').map_or("", |(_, ports)| ports);
        for mapping in ports.split(", ").filter(|m| m.contains("->")) {
            assert!(
                mapping.starts_with("127.0.0.1:"),
                "published beyond loopback: {line}"
            );
        }
    }
    let gw = stack.gateway();
    let no_token = gw.post("/gateway/failover", &json!({"to": "b"})).await;
    assert_eq!(no_token.status, 401, "{}", no_token.text);
    let wrong = gw
        .clone()
        .with_token("not-the-token")
        .post("/gateway/failover", &json!({"to": "b"}))
        .await;
    assert_eq!(wrong.status, 401, "{}", wrong.text);
    let node = stack.node("a").await;
    let anonymous = HttpClient::new(node.base().to_string())
        .get("/admin/role")
        .await;
    assert_eq!(anonymous.status, 401, "{}", anonymous.text);
}

async fn docker_ps_ports(stack: &Stack) -> String {
    system_tests::compose::docker(&[
        "ps",
        "--filter",
        &format!("label=com.docker.compose.project={}", stack.project),
        "--format",
        "{{.Names}} {{.Ports}}",
    ])
    .await
}

async fn wait_shipped(gw: &HttpClient, id: &str) {
    eventually(SETTLE, &format!("order {id} shipped"), || async {
        let r = gw.get(&format!("/orders/{id}")).await;
        if r.status == 200 && r.json["status"] == "SHIPPED" {
            Ok(())
        } else {
            Err(format!("{} {}", r.status, r.text))
        }
    })
    .await;
}

/// Waits until region a is standby at `epoch`, its replicator copying from b, b's
/// handlers idle, a caught up with b (same last event id), and the gateway sees both
/// regions healthy.
async fn rejoined(stack: &Stack, epoch: u64) {
    let (a, b) = (stack.node("a").await, stack.node("b").await);
    let replicator_a = HttpClient::new(format!(
        "http://127.0.0.1:{}",
        stack.published_port("replicator-a", 9101).await
    ));
    eventually(
        SETTLE,
        &format!("a standby at epoch {epoch}, caught up"),
        || async {
            let ra = a
                .try_request(reqwest::Method::GET, "/admin/role", None, &[])
                .await
                .map_err(|e| e.to_string())?
                .json;
            let rb = b.get("/admin/role").await.json;
            let rep = replicator_a
                .try_request(reqwest::Method::GET, "/health/ready", None, &[])
                .await
                .map_err(|e| e.to_string())?
                .json;
            // Orders placed just before the fault may still be moving on b: wait until b's
            // handlers are done (consumer groups drained) and a holds all of it.
            let settled =
                metric_sum(&b.get("/metrics").await.text, "tandem_node_consumer_lag") == 0.0;
            // A rejoin that quarantined events rebuilds a's derived state (`paused`); a
            // promotion during the rebuild can outlast the gateway's control timeout.
            if ra["role"] == "standby"
                && ra["epoch"] == epoch
                && ra["paused"] == false
                && rep["state"] == "copying"
                && settled
                && ra["lastEventId"] == rb["lastEventId"]
            {
                Ok(())
            } else {
                // What the gateway saw too: a region that is active where a standby is
                // expected was promoted by it, and its view says why.
                let gw = stack
                    .gateway()
                    .try_request(reqwest::Method::GET, "/gateway/regions", None, &[])
                    .await
                    .map(|r| r.text)
                    .unwrap_or_else(|e| e.to_string());
                let mut why = String::new();
                if ra["role"] == "active" {
                    let log = stack.logs("gateway", 400).await;
                    let warnings: Vec<&str> =
                        log.lines().filter(|l| l.contains("\"WARN\"")).collect();
                    why = warnings[warnings.len().saturating_sub(12)..].join("\n");
                }
                Err(format!(
                    "a: {ra} b: {rb} replicator-a: {rep} gateway: {gw}\n{why}"
                ))
            }
        },
    )
    .await;
    let gw = stack.gateway();
    eventually(SETTLE, "gateway: both regions healthy", || async {
        let v = gw.get("/gateway/regions").await.json;
        let healthy = v["regions"]
            .as_array()
            .is_some_and(|rs| rs.len() == 2 && rs.iter().all(|r| r["healthy"] == true));
        if healthy {
            Ok(())
        } else {
            Err(v)
        }
    })
    .await;
}

/// A planned switchover from `from` to `to`: no lost events, then clients see no error.
///
/// Made while no order is in flight (`rejoined` waited for the regions to agree): under
/// load it fails now and then with 409 replication_lag (safely: the old active is given
/// its role back), because the standby's replicator stops copying as soon as it sees its
/// peer demoted, which can be before it copied the last events. See deploy/README.md,
/// "Known problems"; `gateway_failover.rs` covers the switchover under load.
async fn switch_over(stack: &Stack, to: &str, from: &str, epoch: u64) -> u64 {
    let gw = stack.gateway();
    let r = stack
        .gateway_admin()
        .post("/gateway/failover", &json!({ "to": to }))
        .await;
    assert_eq!(r.status, 200, "switchover to {to}: {}", r.text);
    assert_eq!(
        r.json,
        json!({"active": to, "epoch": epoch + 1, "previous": from, "lostEvents": 0})
    );
    let clients = Clients::start(&gw, 2, &format!("switch-{epoch}"));
    clients.wait_acks_from(to, 5).await;
    let seen = clients.stop().await;
    let failed: Vec<&Seen> = seen
        .iter()
        .filter(|s| s.status != 201 || s.retries > 0)
        .collect();
    assert!(
        failed.is_empty(),
        "clients saw errors after a planned switchover: {:#?}",
        &failed[..failed.len().min(3)]
    );
    epoch + 1
}

/// Samples both nodes until b is active; fails if b is active while a still acts
/// (active and not fenced). Returns when a stopped acting and when b became active,
/// both from `cut`.
async fn fenced_before_promoted(
    a: &HttpClient,
    b: &HttpClient,
    cut: Instant,
) -> (Duration, Duration) {
    let mut a_stopped = None;
    loop {
        let rb = b.get("/admin/role").await.json;
        let ra = a.get("/admin/role").await.json;
        let a_acts = ra["role"] == "active" && ra["fenced"] != true;
        if !a_acts && a_stopped.is_none() {
            a_stopped = Some(cut.elapsed());
        }
        if rb["role"] == "active" && rb["epoch"].as_u64() > ra["epoch"].as_u64() {
            assert!(
                !a_acts,
                "b active at epoch {} while a still acts: {ra}",
                rb["epoch"]
            );
            return (a_stopped.expect("a stopped"), cut.elapsed());
        }
        assert!(cut.elapsed() < SETTLE, "b never became active: {rb}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

// --- Prometheus ---------------------------------------------------------------------

async fn every_target_up(stack: &Stack) {
    let prom = stack.prometheus();
    eventually(SETTLE, "every scrape target up", || async {
        let r = prom.get("/api/v1/query?query=up").await;
        let results = r.json["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let targets: BTreeMap<String, String> = results
            .iter()
            .map(|s| {
                (
                    format!("{}/{}", s["metric"]["job"], s["metric"]["instance"]),
                    s["value"][1].as_str().unwrap_or("?").to_string(),
                )
            })
            .collect();
        // The gateway, two nodes, two replicators and Prometheus itself.
        if targets.len() == 6 && targets.values().all(|v| v == "1") {
            Ok(())
        } else {
            Err(targets)
        }
    })
    .await;
}

/// Waits until Prometheus reports `alert` firing with `labels`.
async fn wait_alert(stack: &Stack, alert: &str, labels: &[(&str, &str)]) {
    let prom = stack.prometheus();
    let since = Instant::now();
    eventually(
        SETTLE,
        &format!("alert {alert} {labels:?} firing"),
        || async {
            let r = prom.get("/api/v1/alerts").await;
            let alerts = r.json["data"]["alerts"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let found = alerts.iter().any(|a| {
                a["labels"]["alertname"] == alert
                    && a["state"] == "firing"
                    && labels.iter().all(|(k, v)| a["labels"][*k] == *v)
            });
            if found {
                Ok(())
            } else {
                Err(alerts)
            }
        },
    )
    .await;
    eprintln!(
        "[prometheus] {alert} firing ({:?} of waiting)",
        since.elapsed()
    );
}

/// Every metric name the alert rules and the Grafana dashboard query has been scraped
/// by the stack's Prometheus by now (it has seen kills, hangs and partitions).
async fn queried_metrics_exist(stack: &Stack, gw: &HttpClient) {
    // tandem_gateway_rejected_total exists once the gateway rejected something: a
    // request for a path it does not know.
    let r = gw.get("/gateway/no-such-thing").await;
    assert_eq!(r.status, 404, "{}", r.text);
    let mut wanted = BTreeSet::new();
    for expr in queries() {
        wanted.extend(metric_names(&expr));
    }
    assert!(
        wanted.len() > 20,
        "too few metrics found in the queries: {wanted:?}"
    );
    wanted.insert("up".into());
    let prom = stack.prometheus();
    let missing = eventually(SETTLE, "every queried metric scraped", || async {
        let r = prom.get("/api/v1/label/__name__/values").await;
        let have: BTreeSet<String> = r.json["data"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .iter()
            .filter_map(|v| v.as_str().map(String::from))
            .collect();
        let missing: Vec<&String> = wanted.iter().filter(|m| !have.contains(*m)).collect();
        if missing.is_empty() {
            Ok(missing.len())
        } else {
            Err(missing.into_iter().cloned().collect::<Vec<_>>())
        }
    })
    .await;
    assert_eq!(missing, 0);
    eprintln!("[prometheus] all {} queried metrics exist", wanted.len());
}

/// Every PromQL expression of the alert rules and of the dashboard's panels.
fn queries() -> Vec<String> {
    let root = system_tests::process::workspace_root();
    let rules: serde_yaml_ng::Value = serde_yaml_ng::from_str(
        &std::fs::read_to_string(root.join("deploy/prometheus/alerts.yml")).unwrap(),
    )
    .expect("alerts.yml is YAML");
    let mut out: Vec<String> = rules["groups"]
        .as_sequence()
        .into_iter()
        .flatten()
        .flat_map(|g| g["rules"].as_sequence().cloned().unwrap_or_default())
        .filter_map(|r| r["expr"].as_str().map(String::from))
        .collect();
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/tandem.json")).unwrap(),
    )
    .expect("tandem.json is JSON");
    fn exprs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    match (k.as_str(), v) {
                        ("expr", Value::String(e)) => out.push(e.clone()),
                        _ => exprs(v, out),
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
            _ => {}
        }
    }
    exprs(&dashboard, &mut out);
    out
}

/// Sum of every sample of `metric` in a Prometheus text exposition.
fn metric_sum(text: &str, metric: &str) -> f64 {
    system_tests::api::metric_sum(text, metric, &[]).unwrap_or(0.0)
}

/// The `tandem_*` metric names in a PromQL expression.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(pos) = text[i..].find("tandem_") {
        let start = i + pos;
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = start
            + text[start..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(text.len() - start);
        if boundary {
            names.insert(text[start..end].to_string());
        }
        i = end;
    }
    names
}

// --- the history --------------------------------------------------------------------

/// Every acknowledged order exists in the active region (or its OrderPlaced is in a
/// region's quarantine, reported), one order per key, and each existing one ships.
async fn every_ack_kept(stack: &Stack, gw: &HttpClient, history: &[Seen]) {
    let mut by_key: HashMap<&str, BTreeSet<&str>> = HashMap::new();
    for s in history.iter().filter(|s| s.status == 201) {
        by_key
            .entry(&s.key)
            .or_default()
            .insert(s.order_id.as_deref().expect("201 with an orderId"));
    }
    let doubled: Vec<_> = by_key.iter().filter(|(_, ids)| ids.len() > 1).collect();
    assert!(doubled.is_empty(), "one key, several orders: {doubled:?}");
    let mut quarantined = BTreeSet::new();
    for region in ["a", "b"] {
        let q = stack.node(region).await.get("/admin/quarantine").await;
        assert_eq!(q.status, 200, "{}", q.text);
        for e in q.json["events"].as_array().cloned().unwrap_or_default() {
            if e["event"]["eventType"] == "OrderPlaced" {
                quarantined.insert(e["event"]["aggregateId"].as_str().unwrap_or("").to_string());
            }
        }
    }
    let mut in_quarantine = 0;
    let mut lost = Vec::new();
    for s in history.iter().filter(|s| s.status == 201) {
        let id = s.order_id.as_deref().unwrap();
        let r = gw.get(&format!("/orders/{id}")).await;
        if r.status == 200 {
            continue;
        }
        if quarantined.contains(id) {
            in_quarantine += 1;
        } else {
            lost.push(format!(
                "{id} ({}, by {}): {} {}",
                s.key, s.region, r.status, r.text
            ));
        }
    }
    // A loss in any phase fails, the partition's included: a region demoted at the new
    // active's epoch rejoins (quarantining its divergent tail) before it copies (885fb22;
    // before that, orders acknowledged by a just before the cut were lost).
    assert!(
        lost.is_empty(),
        "acknowledged orders neither in the active region nor in a quarantine: {lost:#?}"
    );
    let acked = history.iter().filter(|s| s.status == 201).count();
    eprintln!(
        "[history] {acked} orders acknowledged, {in_quarantine} of them quarantined, {} lost",
        lost.len()
    );
    // Every order still in the active region moves on to SHIPPED (an order once seen to
    // stay PENDING after a drill was a rejoin that left its consumer groups past entries
    // whose outcome it had quarantined: aeaad92, b8e8e0c).
    let live: Vec<&str> = history
        .iter()
        .filter_map(|s| s.order_id.as_deref())
        .filter(|id| !quarantined.contains(*id))
        .collect();
    let deadline = Instant::now() + SETTLE;
    let mut open = Vec::new();
    for id in &live {
        loop {
            let r = gw.get(&format!("/orders/{id}")).await;
            if r.json["status"] == "SHIPPED" {
                break;
            }
            if Instant::now() > deadline {
                open.push(format!("{id}: {} {}", r.status, r.json["status"]));
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    assert!(
        open.is_empty(),
        "{} acknowledged orders never shipped: {open:?}",
        open.len()
    );
    eprintln!("[history] every acknowledged order shipped");
}

/// Both regions' event streams hold the same entries (ids and content) once the system
/// settles. (They once differed for good after the partition: the same cause as the
/// losses in `every_ack_kept`.)
async fn regions_converge(stack: &Stack) {
    let deadline = Instant::now() + SETTLE;
    loop {
        let a = entries(&mut stack.redis("a").await, "tandem:events").await;
        let b = entries(&mut stack.redis("b").await, "tandem:events").await;
        if a == b {
            eprintln!("[history] both regions hold the same {} events", a.len());
            return;
        }
        if Instant::now() > deadline {
            let ids_a: BTreeSet<&String> = a.iter().map(|e| &e.0).collect();
            let ids_b: BTreeSet<&String> = b.iter().map(|e| &e.0).collect();
            panic!(
                "the regions differ: a has {} events, b {}; only in a: {:?}; only in b: {:?}",
                a.len(),
                b.len(),
                ids_a.difference(&ids_b).take(10).collect::<Vec<_>>(),
                ids_b.difference(&ids_a).take(10).collect::<Vec<_>>()
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

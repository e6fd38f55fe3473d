//! Failover throughput benchmark (not a test): write throughput before and after the
//! active region is killed, and the recovery time, for each durability mode.
//!
//! For each mode it starts two regions (Redis, node, replicator each) and the gateway
//! with the workspace binaries (`TANDEM_BIN_DIR`, e.g. `target/release`), runs closed-loop
//! clients that place orders through the gateway (each order with its own
//! Idempotency-Key, retried with the same key until answered 201), SIGKILLs region a's
//! node and Redis halfway, and reports:
//! - orders/s acknowledged before the kill, and after recovery (from one second after
//!   the first order answered by b to the end);
//! - RTO: from the kill to the first new order answered 201 by region b (a retried
//!   order's first answer, replayed by the standby, does not count);
//! - how many acknowledgements said `Tandem-Durability: local`.
//!
//! Usage: failover_bench [--seconds 10] [--clients 16] [--modes async,replicated]
//! (bench/failover-throughput.sh builds the release binaries and runs it.)

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use system_tests::gateway::{Gateway, GatewayOptions};
use system_tests::replicator::Replicator;
use system_tests::{eventually, Node, NodeOptions, RedisServer};

struct Args {
    seconds: u64,
    clients: usize,
    modes: Vec<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        seconds: 10,
        clients: 16,
        modes: vec!["async".into(), "replicated".into()],
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--seconds" => args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?,
            "--clients" => args.clients = value()?.parse().map_err(|e| format!("--clients: {e}"))?,
            "--modes" => args.modes = value()?.split(',').map(String::from).collect(),
            "--help" | "-h" => {
                return Err("usage: failover_bench [--seconds 10] [--clients 16] [--modes async,replicated,replicated-refuse]".into())
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.seconds < 4 {
        return Err("--seconds must be at least 4".into());
    }
    Ok(args)
}

/// One acknowledged order: when, by which region, and whether only locally.
#[derive(Debug, Clone, Copy)]
struct Ack {
    at: Instant,
    region_b: bool,
    local: bool,
    /// The first answer of an order placed before (`Idempotent-Replayed`): a standby
    /// can give it, so it does not count as a write taken by b.
    replayed: bool,
}

#[derive(Debug)]
struct Outcome {
    mode: String,
    before: f64,
    after: f64,
    rto: Option<Duration>,
    local: usize,
    acked: usize,
    errors: usize,
}

async fn run(mode: &str, seconds: u64, clients: usize) -> Outcome {
    let (durability, fallback) = match mode {
        "async" => ("async", "async"),
        "replicated" => ("replicated", "async"),
        "replicated-refuse" => ("replicated", "refuse"),
        other => panic!("unknown mode {other}"),
    };
    let redis_a = RedisServer::start().await;
    let redis_b = RedisServer::start().await;
    let node = |region: &str, role: &str, own: &RedisServer, peer: &RedisServer| {
        NodeOptions::new(own.url())
            .region(region)
            .role(role)
            .env("NODE_PEER_REDIS_URL", peer.url())
            .env("NODE_DURABILITY", durability)
            .env("NODE_REPLICATED_FALLBACK", fallback)
            .env("RUST_LOG", "warn")
    };
    let mut node_a = Node::start(node("a", "active", &redis_a, &redis_b)).await;
    let node_b = Node::start(node("b", "standby", &redis_b, &redis_a)).await;
    let _rep_b = Replicator::start(&redis_b.url(), &redis_a.url(), &[("RUST_LOG", "warn")]).await;
    let _rep_a = Replicator::start(
        &redis_a.url(),
        &redis_b.url(),
        &[
            ("REPLICATOR_LOCAL_REGION", "a"),
            ("REPLICATOR_PEER_REGION", "b"),
            ("RUST_LOG", "warn"),
        ],
    )
    .await;
    let gw = Gateway::start(
        GatewayOptions::new(&[("a", node_a.url()), ("b", node_b.url())])
            .env("RUST_LOG", "warn")
            // All clients share one address: the per-client limit would cap the run.
            .env("GATEWAY_RATE_LIMIT_PER_SEC", 0),
    )
    .await;
    gw.wait_active("a", 1, Duration::from_secs(20)).await;
    let api = gw.api();
    api.put_product("BENCH-1", 100, 1_000_000_000).await;
    // The standby must know the product before it can take orders for it.
    let b = node_b.http();
    eventually(
        Duration::from_secs(20),
        "product replicated to b",
        || async {
            let r = b.get("/api/v1/products/BENCH-1").await;
            if r.status == 200 {
                Ok(())
            } else {
                Err(r.status)
            }
        },
    )
    .await;

    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    let errors: Arc<Mutex<usize>> = Arc::default();
    let start = Instant::now();
    let end = start + Duration::from_secs(seconds);
    let mut tasks = Vec::new();
    for c in 0..clients {
        let http = gw.http();
        let (acks, errors) = (acks.clone(), errors.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < end {
                n += 1;
                let key = format!("bench-{c}-{n}");
                let body = system_tests::order_body(&format!("c-{c}"), &[("BENCH-1", 1)], "tok_ok");
                let body = serde_json::to_vec(&body).unwrap();
                loop {
                    let r = http
                        .try_request(
                            reqwest::Method::POST,
                            "/orders",
                            Some(body.clone()),
                            &[("idempotency-key", &key)],
                        )
                        .await;
                    match r {
                        Ok(r) if r.status == 201 => {
                            acks.lock().unwrap().push(Ack {
                                at: Instant::now(),
                                region_b: r.header("x-region") == Some("b"),
                                local: r.header("tandem-durability") == Some("local"),
                                replayed: r.header("idempotent-replayed") == Some("true"),
                            });
                            break;
                        }
                        _ => {
                            *errors.lock().unwrap() += 1;
                            if Instant::now() >= end {
                                break;
                            }
                            tokio::time::sleep(Duration::from_millis(10)).await;
                        }
                    }
                }
            }
        }));
    }
    let kill_at = start + Duration::from_secs(seconds / 2);
    tokio::time::sleep_until(kill_at.into()).await;
    let killed = Instant::now();
    node_a.kill();
    let mut redis_a = redis_a;
    redis_a.kill();
    for t in tasks {
        let _ = t.await;
    }
    let acks = acks.lock().unwrap().clone();
    let warm = start + Duration::from_secs(1);
    let before = acks
        .iter()
        .filter(|a| a.at >= warm && a.at < killed)
        .count() as f64
        / killed.duration_since(warm).as_secs_f64();
    let first_b = acks
        .iter()
        .filter(|a| a.region_b && !a.replayed && a.at >= killed)
        .map(|a| a.at)
        .min();
    let rto = first_b.map(|t| t.duration_since(killed));
    let after = match first_b {
        Some(t) => {
            let from = t + Duration::from_secs(1);
            if from >= end {
                0.0
            } else {
                acks.iter().filter(|a| a.at >= from).count() as f64
                    / end.duration_since(from).as_secs_f64()
            }
        }
        None => 0.0,
    };
    let errors = *errors.lock().unwrap();
    if rto.is_none() && mode != "replicated-refuse" {
        eprintln!(
            "failover_bench: {mode}: no new order answered by b after the kill\n--- gateway\n{}\n--- node b\n{}",
            gw.log_tail(40),
            node_b.log_tail(40)
        );
    }
    drop(gw);
    Outcome {
        mode: mode.into(),
        before,
        after,
        rto,
        local: acks.iter().filter(|a| a.local).count(),
        acked: acks.len(),
        errors,
    }
}

#[tokio::main]
async fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(64);
        }
    };
    let mut results = Vec::new();
    for mode in &args.modes {
        eprintln!(
            "failover_bench: {mode}, {} s, {} clients",
            args.seconds, args.clients
        );
        results.push(run(mode, args.seconds, args.clients).await);
    }
    println!(
        "{:<18} {:>12} {:>12} {:>7} {:>9} {:>8} {:>7} {:>8}",
        "mode", "before/s", "after/s", "ratio", "RTO ms", "acked", "local", "retries"
    );
    for r in &results {
        println!(
            "{:<18} {:>12.0} {:>12.0} {:>7.2} {:>9} {:>8} {:>7} {:>8}",
            r.mode,
            r.before,
            r.after,
            if r.before > 0.0 {
                r.after / r.before
            } else {
                0.0
            },
            r.rto
                .map(|d| d.as_millis().to_string())
                .unwrap_or_else(|| "none".into()),
            r.acked,
            r.local,
            r.errors
        );
    }
}

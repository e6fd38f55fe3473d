//! Order workflow benchmark (not a test): places orders at fixed rates against a
//! running regional node and reports, per rate, the latency from sending
//! `POST /orders` to the order's `OrderShipped` event, and whether the node kept up.
//!
//! The shipped time is taken when the event appears in the region's stream (read with
//! XREAD on the node's Redis), so the node is not slowed by polling.
//!
//! With `--webhook`, it also subscribes a webhook receiver (tests/src/webhook_receiver.rs)
//! to `order.status_updated` and reports, per rate, how many status events were
//! delivered and the delivery latency p50/p99: from the status change (the integration
//! event's `timestamp`, the commit of the domain event) to the receiver reading the
//! request. After each rate it waits for the deliveries to stop before the next one.
//!
//! Usage: order_bench --node http://127.0.0.1:8081 --redis redis://127.0.0.1:6380
//!        [--rates 200,1000,2000] [--seconds 10] [--webhook]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

struct Args {
    node: String,
    redis: String,
    rates: Vec<u64>,
    seconds: u64,
    webhook: bool,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        node: String::new(),
        redis: String::new(),
        rates: vec![200, 1000, 2000],
        seconds: 10,
        webhook: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or(format!("{flag} needs a value"));
        match flag.as_str() {
            "--node" => args.node = value()?,
            "--redis" => args.redis = value()?,
            "--rates" => {
                args.rates = value()?
                    .split(',')
                    .map(|r| r.parse().map_err(|e| format!("--rates: {e}")))
                    .collect::<Result<_, _>>()?
            }
            "--seconds" => {
                args.seconds = value()?.parse().map_err(|e| format!("--seconds: {e}"))?
            }
            "--webhook" => args.webhook = true,
            "--help" | "-h" => {
                return Err(
                    "usage: order_bench --node URL --redis URL [--rates 200,1000] [--seconds 10] [--webhook]"
                        .into(),
                )
            }
            other => return Err(format!("unknown argument {other}")),
        }
    }
    if args.node.is_empty() || args.redis.is_empty() {
        return Err("--node and --redis are required".into());
    }
    Ok(args)
}

const SKUS: usize = 20;

#[derive(Default)]
struct Step {
    sent: HashMap<String, Instant>,
    /// OrderShipped seen before the POST's answer was processed (a fast workflow can
    /// overtake the client's own bookkeeping).
    early: HashMap<String, Instant>,
    shipped: Vec<Duration>,
    post: Vec<Duration>,
    errors: u64,
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
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(512)
        .build()
        .expect("client");
    for i in 0..SKUS {
        let body = serde_json::json!({"name": format!("Bench {i}"), "price": 1000, "currency": "USD", "stock": 1_000_000_000});
        let r = http
            .put(format!("{}/api/v1/products/BENCH-{i:03}", args.node))
            .json(&body)
            .send()
            .await
            .expect("node reachable");
        assert!(
            r.status().is_success(),
            "product setup failed: {}",
            r.status()
        );
    }

    let receiver = if args.webhook {
        let receiver = system_tests::webhook_receiver::WebhookReceiver::start().await;
        let r = http
            .post(format!("{}/api/v1/webhooks", args.node))
            .json(&serde_json::json!({"url": receiver.url(), "events": ["order.status_updated"]}))
            .send()
            .await
            .expect("node reachable");
        assert_eq!(r.status(), 201, "webhook subscription failed");
        Some(receiver)
    } else {
        None
    };

    let state: Arc<Mutex<Step>> = Arc::default();
    let client = redis::Client::open(args.redis.as_str()).expect("redis url");
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .expect("redis reachable");
    let start_id: Vec<(String, redis::Value)> = redis::cmd("XREVRANGE")
        .arg("tandem:events")
        .arg("+")
        .arg("-")
        .arg("COUNT")
        .arg(1)
        .query_async(&mut conn)
        .await
        .unwrap();
    let mut last_id = start_id
        .first()
        .map(|(id, _)| id.clone())
        .unwrap_or_else(|| "0-0".into());
    {
        let state = state.clone();
        tokio::spawn(async move {
            loop {
                let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREAD")
                    .arg("COUNT")
                    .arg(1000)
                    .arg("BLOCK")
                    .arg(100)
                    .arg("STREAMS")
                    .arg("tandem:events")
                    .arg(&last_id)
                    .query_async(&mut conn)
                    .await
                    .expect("XREAD");
                let now = Instant::now();
                for entry in reply.into_iter().flat_map(|r| r.keys).flat_map(|k| k.ids) {
                    last_id = entry.id.clone();
                    let is_shipped = matches!(entry.map.get("type"), Some(redis::Value::BulkString(t)) if t == b"OrderShipped");
                    if !is_shipped {
                        continue;
                    }
                    let Some(redis::Value::BulkString(raw)) = entry.map.get("event") else {
                        continue;
                    };
                    let Ok(ev) = serde_json::from_slice::<serde_json::Value>(raw) else {
                        continue;
                    };
                    let order_id = ev["aggregateId"].as_str().unwrap_or_default();
                    let mut st = state.lock().unwrap();
                    if let Some(sent) = st.sent.remove(order_id) {
                        st.shipped.push(now - sent);
                    } else {
                        st.early.insert(order_id.to_string(), now);
                    }
                }
            }
        });
    }

    let webhook_columns = if receiver.is_some() {
        ",webhooks_delivered,webhook_p50_ms,webhook_p99_ms,webhook_drain_s"
    } else {
        ""
    };
    println!("rate_target,rate_sent,orders,shipped,errors,post_p50_ms,post_p99_ms,shipped_p50_ms,shipped_p99_ms,kept_up{webhook_columns}");
    let mut best = 0;
    for &rate in &args.rates {
        *state.lock().unwrap() = Step::default();
        let delivered_before = receiver.as_ref().map_or(0, |r| r.received().len());
        let total = rate * args.seconds;
        let interval = Duration::from_secs_f64(1.0 / rate as f64);
        let started = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for n in 0..total {
            // Open loop: the schedule does not wait for answers, as real clients do not.
            let due = started + interval.mul_f64(n as f64);
            tokio::time::sleep_until(due.into()).await;
            let http = http.clone();
            let state = state.clone();
            let url = format!("{}/orders", args.node);
            let body = serde_json::json!({
                "customerId": format!("bench-{n}"),
                "items": [{"sku": format!("BENCH-{:03}", n as usize % SKUS), "quantity": 1}],
                "shippingAddress": "1 Bench Way",
                "paymentToken": "tok_ok",
            });
            tasks.spawn(async move {
                let sent = Instant::now();
                let r = http.post(url).json(&body).send().await;
                let ok = match r {
                    Ok(r) if r.status() == 201 => r.json::<serde_json::Value>().await.ok(),
                    _ => None,
                };
                let mut st = state.lock().unwrap();
                st.post.push(sent.elapsed());
                match ok.and_then(|v| v["orderId"].as_str().map(str::to_string)) {
                    Some(id) => match st.early.remove(&id) {
                        Some(shipped) => st.shipped.push(shipped - sent),
                        None => {
                            st.sent.insert(id, sent);
                        }
                    },
                    None => st.errors += 1,
                }
            });
            while let Some(Some(_)) = tasks.try_join_next().map(Some) {}
        }
        let send_secs = started.elapsed().as_secs_f64();
        while tasks.join_next().await.is_some() {}
        // The orders still in flight get a short grace to finish.
        let drain = Instant::now() + Duration::from_secs(3);
        while Instant::now() < drain && !state.lock().unwrap().sent.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let webhooks = match &receiver {
            Some(r) => deliveries(r, delivered_before, send_secs, started).await,
            None => String::new(),
        };
        let mut st = state.lock().unwrap();
        st.shipped.sort();
        st.post.sort();
        let pct = |v: &[Duration], p: f64| {
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .map(|d| d.as_secs_f64() * 1000.0)
                .unwrap_or(f64::NAN)
        };
        let sent_rate = total as f64 / send_secs;
        let kept_up = st.errors == 0
            && st.sent.is_empty()
            && sent_rate >= rate as f64 * 0.95
            && pct(&st.shipped, 0.99) < 1000.0;
        if kept_up {
            best = best.max(rate);
        }
        println!(
            "{rate},{sent_rate:.0},{total},{},{},{:.2},{:.2},{:.2},{:.2},{kept_up}{webhooks}",
            st.shipped.len(),
            st.errors,
            pct(&st.post, 0.5),
            pct(&st.post, 0.99),
            pct(&st.shipped, 0.5),
            pct(&st.shipped, 0.99),
        );
    }
    println!("highest_sustained_orders_per_s,{best}");
}

/// Waits until the receiver has had nothing new for a second (at most two minutes),
/// then summarises the deliveries since `from`: `,count,p50_ms,p99_ms,drain_s` where
/// drain is how long after the last order was sent the last delivery came.
async fn deliveries(
    receiver: &system_tests::webhook_receiver::WebhookReceiver,
    from: usize,
    send_secs: f64,
    started: Instant,
) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut seen = receiver.received().len();
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline && quiet_since.elapsed() < Duration::from_secs(1) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let n = receiver.received().len();
        if n != seen {
            seen = n;
            quiet_since = Instant::now();
        }
    }
    let drain = (quiet_since.duration_since(started).as_secs_f64() - send_secs).max(0.0);
    let got = receiver.received();
    let mut latencies: Vec<f64> = got[from.min(got.len())..]
        .iter()
        .filter(|r| (200..300).contains(&r.status))
        .filter_map(|r| {
            let ts = r.json()["timestamp"].as_str().map(str::to_string)?;
            let sent = ms_of_day(&ts)?;
            let at = r.received_at.duration_since(std::time::UNIX_EPOCH).ok()?;
            let at = (at.as_millis() % DAY_MS) as i64;
            // Both are times of day (UTC, ms): a run across midnight wraps.
            Some((at - sent).rem_euclid(DAY_MS as i64) as f64)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or(f64::NAN)
    };
    format!(
        ",{},{:.0},{:.0},{drain:.1}",
        latencies.len(),
        pct(0.5),
        pct(0.99)
    )
}

const DAY_MS: u128 = 86_400_000;

/// Milliseconds since midnight of an RFC 3339 UTC time `...THH:MM:SS.mmmZ`.
fn ms_of_day(ts: &str) -> Option<i64> {
    let time = ts.split_once('T')?.1.trim_end_matches('Z');
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut parts = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, m, s) = (parts.next()??, parts.next()??, parts.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    Some(((h * 60 + m) * 60 + s) * 1000 + ms)
}

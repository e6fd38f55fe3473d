//! Careful clients: several concurrent tasks that place orders through the gateway,
//! each with its own `Idempotency-Key`, retried with the same key and body until the
//! system answers definitively (a 2xx, or a 4xx that means "no"); some orders are
//! cancelled right after their acknowledgement (retried the same way); a reader mixes
//! in order and product reads. Every attempt is recorded with its times and outcome.
//!
//! What is retried: no answer at all (timeout, refused or reset connection), 408, 429,
//! any 5xx, and 409 `idempotency_key_in_use` (the first attempt is still running). A
//! retry of an order after its first attempt committed gets the first answer again
//! (the key is replicated with the order), so an order is never placed twice.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use super::history::{AckDurability, Attempt, CancelWrite, Fate, History, OrderWrite, Outcome};
use super::schedule::SplitMix64;
use super::Durability;

/// A product the clients order from.
#[derive(Debug, Clone)]
pub struct Sku {
    pub sku: String,
    pub stock: i64,
}

/// The catalogue a campaign starts with: plenty of most products, and two scarce ones
/// so that stock runs out and reservations race (`products_unavailable`, REJECTED).
pub fn catalogue() -> Vec<Sku> {
    let mut skus: Vec<Sku> = (1..=4)
        .map(|i| Sku {
            sku: format!("CHAOS-{i:03}"),
            stock: 1_000_000,
        })
        .collect();
    skus.extend((1..=2).map(|i| Sku {
        sku: format!("SCARCE-{i:03}"),
        stock: 40,
    }));
    skus
}

#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// The gateway's base URL.
    pub gateway: String,
    pub seed: u64,
    pub durability: Durability,
    /// Concurrent order tasks.
    pub workers: usize,
    /// Orders per second, all workers together (each paces itself).
    pub rate: f64,
    pub skus: Vec<Sku>,
    /// Share of acknowledged orders cancelled at once, in percent.
    pub cancel_percent: u64,
}

struct Shared {
    settings: ClientSettings,
    clock: Instant,
    http: reqwest::Client,
    history: Mutex<History>,
    /// Acknowledged order ids, for the reader.
    acked: Mutex<Vec<String>>,
    /// No new writes; the ones under way go on until answered.
    stop_new: AtomicBool,
    /// Stop retrying: whatever is unanswered stays unresolved.
    give_up: AtomicBool,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }
}

/// The running clients.
pub struct Clients {
    shared: Arc<Shared>,
    writers: Vec<tokio::task::JoinHandle<()>>,
    reader: tokio::task::JoinHandle<()>,
}

/// Per-attempt deadline: longer than the gateway's own request deadline (10 s), so the
/// gateway's answer (504) is what a client normally sees.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(12);

impl Clients {
    /// Starts the clients; `clock` is the campaign's time origin.
    pub fn start(settings: ClientSettings, clock: Instant) -> Clients {
        let http = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(Duration::from_secs(2))
            .pool_max_idle_per_host(64)
            .build()
            .expect("reqwest client");
        let shared = Arc::new(Shared {
            settings,
            clock,
            http,
            history: Mutex::new(History::default()),
            acked: Mutex::new(Vec::new()),
            stop_new: AtomicBool::new(false),
            give_up: AtomicBool::new(false),
        });
        let writers = (0..shared.settings.workers)
            .map(|w| tokio::spawn(order_worker(shared.clone(), w)))
            .collect();
        let reader = tokio::spawn(reader(shared.clone()));
        Clients {
            shared,
            writers,
            reader,
        }
    }

    /// Acknowledged orders so far.
    pub fn acked(&self) -> usize {
        self.shared.acked.lock().expect("acked lock").len()
    }

    /// Stops starting new writes; returns once every write under way has its answer,
    /// or at `deadline` (after which the unanswered ones are given up).
    pub async fn finish(self, deadline: Duration) -> History {
        self.shared.stop_new.store(true, Ordering::SeqCst);
        let start = Instant::now();
        for w in &self.writers {
            while !w.is_finished() && start.elapsed() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        self.shared.give_up.store(true, Ordering::SeqCst);
        for w in self.writers {
            let _ = w.await;
        }
        let _ = self.reader.await;
        let history = self.shared.history.lock().expect("history lock").clone();
        history
    }
}

/// The answer to one attempt, parsed.
struct Reply {
    outcome: Outcome,
    body: Value,
}

async fn send(
    shared: &Shared,
    method: reqwest::Method,
    path: &str,
    body: Option<&Value>,
    key: Option<&str>,
) -> (u64, u64, Reply) {
    let sent = shared.now_ms();
    let mut req = shared
        .http
        .request(method, format!("{}{path}", shared.settings.gateway));
    if let Some(b) = body {
        req = req.json(b);
    }
    if let Some(k) = key {
        req = req.header("Idempotency-Key", k);
    }
    let reply = match req.send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let headers = resp.headers().clone();
            match resp.bytes().await {
                Ok(bytes) => {
                    let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                    Reply {
                        outcome: answer(status, &headers, &body),
                        body,
                    }
                }
                Err(e) => Reply {
                    outcome: Outcome::Transport(transport_kind(&e)),
                    body: Value::Null,
                },
            }
        }
        Err(e) => Reply {
            outcome: Outcome::Transport(transport_kind(&e)),
            body: Value::Null,
        },
    };
    (sent, shared.now_ms(), reply)
}

fn answer(status: u16, headers: &HeaderMap, body: &Value) -> Outcome {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    Outcome::Answer {
        status,
        code: body["error"]["code"].as_str().unwrap_or("").to_string(),
        region: header("x-region").map(String::from),
        local: header("tandem-durability") == Some("local"),
        replayed: header("idempotent-replayed") == Some("true"),
        order_id: body["orderId"].as_str().map(String::from),
    }
}

fn transport_kind(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timeout".into()
    } else if e.is_connect() {
        "connect".into()
    } else {
        "io".into()
    }
}

/// What the client does with an answer.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    Done,
    Refused,
    Retry,
}

fn next_step(outcome: &Outcome) -> Next {
    match outcome {
        Outcome::Transport(_) => Next::Retry,
        Outcome::Answer { status, code, .. } => match *status {
            200..=299 => Next::Done,
            408 | 429 => Next::Retry,
            409 if code == "idempotency_key_in_use" => Next::Retry,
            400..=499 => Next::Refused,
            _ => Next::Retry,
        },
    }
}

/// Sends until a definitive answer or until the clients give up.
async fn until_answered(
    shared: &Shared,
    rng: &mut SplitMix64,
    method: reqwest::Method,
    path: &str,
    body: &Value,
    key: Option<&str>,
) -> (Vec<Attempt>, Option<(Next, Reply, u64)>) {
    let mut attempts = Vec::new();
    let mut backoff = 25u64;
    loop {
        let (sent_ms, done_ms, reply) = send(shared, method.clone(), path, Some(body), key).await;
        attempts.push(Attempt {
            sent_ms,
            done_ms,
            outcome: reply.outcome.clone(),
        });
        let next = next_step(&reply.outcome);
        if next != Next::Retry {
            return (attempts, Some((next, reply, done_ms)));
        }
        if shared.give_up.load(Ordering::SeqCst) {
            return (attempts, None);
        }
        tokio::time::sleep(Duration::from_millis(backoff / 2 + rng.below(backoff))).await;
        backoff = (backoff * 2).min(500);
    }
}

async fn order_worker(shared: Arc<Shared>, worker: usize) {
    let s = &shared.settings;
    let mut rng = SplitMix64::new(s.seed ^ (0xC11E_0000 + worker as u64));
    let interval = Duration::from_secs_f64(s.workers as f64 / s.rate.max(0.1));
    let mut next_at = tokio::time::Instant::now();
    let mut n = 0u64;
    let plentiful: Vec<&Sku> = s.skus.iter().filter(|k| k.stock >= 1000).collect();
    let scarce: Vec<&Sku> = s.skus.iter().filter(|k| k.stock < 1000).collect();
    while !shared.stop_new.load(Ordering::SeqCst) {
        n += 1;
        let key = format!("chaos-{}-{worker}-{n}", s.seed);
        let mut items: Vec<(String, u64)> = Vec::new();
        let lines = 1 + rng.below(2) as usize;
        for _ in 0..lines {
            let pool = if !scarce.is_empty() && rng.below(100) < 20 {
                &scarce
            } else {
                &plentiful
            };
            let sku = &pool[rng.below(pool.len() as u64) as usize].sku;
            if !items.iter().any(|(k, _)| k == sku) {
                items.push((sku.clone(), 1 + rng.below(3)));
            }
        }
        let token = match rng.below(100) {
            0..=79 => "tok_ok",
            80..=89 => "tok_decline",
            _ => "tok_flaky",
        };
        let body = json!({
            "customerId": format!("chaos-{worker}"),
            "items": items.iter().map(|(sku, q)| json!({"sku": sku, "quantity": q})).collect::<Vec<_>>(),
            "shippingAddress": "1 Chaos Street",
            "paymentToken": token,
        });
        let (attempts, end) = until_answered(
            &shared,
            &mut rng,
            reqwest::Method::POST,
            "/orders",
            &body,
            Some(&key),
        )
        .await;
        let (fate, order_id) = match end {
            Some((Next::Done, reply, done_ms)) => {
                let Outcome::Answer { region, local, .. } = &reply.outcome else {
                    unreachable!("a 2xx is an answer")
                };
                let durability = match s.durability {
                    Durability::Async => AckDurability::Local,
                    Durability::Replicated if *local => AckDurability::Local,
                    Durability::Replicated => AckDurability::Replicated,
                };
                (
                    Fate::Acked {
                        at_ms: done_ms,
                        region: region.clone(),
                        durability,
                    },
                    reply.body["orderId"].as_str().map(String::from),
                )
            }
            Some((_, reply, _)) => match &reply.outcome {
                Outcome::Answer { status, code, .. } => (
                    Fate::Refused {
                        status: *status,
                        code: code.clone(),
                    },
                    None,
                ),
                Outcome::Transport(_) => unreachable!("a transport error is retried"),
            },
            None => (Fate::Unresolved, None),
        };
        let acked = matches!(fate, Fate::Acked { .. });
        shared
            .history
            .lock()
            .expect("history lock")
            .orders
            .push(OrderWrite {
                key,
                items,
                payment_token: token.to_string(),
                order_id: order_id.clone(),
                attempts,
                fate,
            });
        if let (true, Some(id)) = (acked, order_id) {
            shared.acked.lock().expect("acked lock").push(id.clone());
            if rng.below(100) < s.cancel_percent {
                cancel(
                    &shared,
                    &mut rng,
                    &id,
                    &format!("chaos-{}-{worker}-{n}-cancel", s.seed),
                )
                .await;
            }
        }
        next_at = (next_at + interval).max(tokio::time::Instant::now());
        tokio::time::sleep_until(next_at).await;
    }
}

/// Cancels `order_id` with a reason no other request uses, so the checker can find
/// the `OrderCancelled` this request wrote. A cancellation is not keyed: a retry after
/// a first attempt that did cancel gets 409 `invalid_state`, and the reason tells.
async fn cancel(shared: &Shared, rng: &mut SplitMix64, order_id: &str, reason: &str) {
    let path = format!("/orders/{order_id}/cancel");
    let body = json!({ "reason": reason });
    let (attempts, end) =
        until_answered(shared, rng, reqwest::Method::POST, &path, &body, None).await;
    let fate = match end {
        Some((Next::Done, reply, done_ms)) => {
            let Outcome::Answer { region, local, .. } = &reply.outcome else {
                unreachable!("a 2xx is an answer")
            };
            Fate::Acked {
                at_ms: done_ms,
                region: region.clone(),
                // `replicated` waits for the standby before it acknowledges a
                // cancellation too, unless it says `Tandem-Durability: local`.
                durability: match shared.settings.durability {
                    Durability::Async => AckDurability::Local,
                    Durability::Replicated if *local => AckDurability::Local,
                    Durability::Replicated => AckDurability::Replicated,
                },
            }
        }
        Some((_, reply, _)) => match &reply.outcome {
            Outcome::Answer { status, code, .. } => Fate::Refused {
                status: *status,
                code: code.clone(),
            },
            Outcome::Transport(_) => unreachable!("a transport error is retried"),
        },
        None => Fate::Unresolved,
    };
    shared
        .history
        .lock()
        .expect("history lock")
        .cancels
        .push(CancelWrite {
            order_id: order_id.to_string(),
            reason: reason.to_string(),
            attempts,
            fate,
        });
}

/// Reads an acknowledged order or a product now and then; counts the outcomes.
async fn reader(shared: Arc<Shared>) {
    let mut rng = SplitMix64::new(shared.settings.seed ^ 0x5EAD);
    while !shared.stop_new.load(Ordering::SeqCst) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let path = {
            let acked = shared.acked.lock().expect("acked lock");
            if !acked.is_empty() && rng.below(4) != 0 {
                format!("/orders/{}", acked[rng.below(acked.len() as u64) as usize])
            } else {
                let skus = &shared.settings.skus;
                format!(
                    "/api/v1/products/{}",
                    skus[rng.below(skus.len() as u64) as usize].sku
                )
            }
        };
        let (_, _, reply) = send(&shared, reqwest::Method::GET, &path, None, None).await;
        let key = reply.outcome.error_key().unwrap_or_else(|| "ok".into());
        *shared
            .history
            .lock()
            .expect("history lock")
            .reads
            .entry(key)
            .or_default() += 1;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(status: u16, code: &str) -> Outcome {
        Outcome::Answer {
            status,
            code: code.into(),
            region: None,
            local: false,
            replayed: false,
            order_id: None,
        }
    }

    #[test]
    fn only_a_definitive_answer_ends_the_retries() {
        assert_eq!(next_step(&a(201, "")), Next::Done);
        assert_eq!(next_step(&a(400, "products_unavailable")), Next::Refused);
        assert_eq!(next_step(&a(409, "invalid_state")), Next::Refused);
        assert_eq!(next_step(&a(409, "idempotency_key_in_use")), Next::Retry);
        assert_eq!(next_step(&a(503, "region_not_active")), Next::Retry);
        assert_eq!(next_step(&a(500, "internal")), Next::Retry);
        assert_eq!(next_step(&a(429, "rate_limited")), Next::Retry);
        assert_eq!(
            next_step(&Outcome::Transport("timeout".into())),
            Next::Retry
        );
    }
}

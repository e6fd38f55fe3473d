//! A webhook receiver: what a subscriber's endpoint sees of the node's deliveries.
//!
//! It records every request (headers and body) and answers 204, or 500 while told to
//! fail (for the next `n` requests, or until told otherwise). Signatures are checked
//! here with the Standard Webhooks rule, independently of the node's code.

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use serde_json::Value;
use sha2::Sha256;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::receiver::Listener;

/// One request as received.
#[derive(Debug, Clone)]
pub struct Received {
    pub webhook_id: String,
    pub timestamp: String,
    pub signature: String,
    pub body: Vec<u8>,
    /// What the receiver answered.
    pub status: u16,
    /// When the request's body had been read (the benchmark's delivery time).
    pub received_at: std::time::SystemTime,
}

impl Received {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or(Value::Null)
    }

    /// Whether the `webhook-signature` is the HMAC-SHA256 of `<id>.<timestamp>.<body>`
    /// keyed by the base64-decoded part of the `whsec_` secret (one of the
    /// space-separated `v1,` signatures matches).
    pub fn verifies(&self, secret: &str) -> bool {
        let Some(key) = secret
            .strip_prefix("whsec_")
            .and_then(|k| STANDARD.decode(k).ok())
        else {
            return false;
        };
        let mut mac = Hmac::<Sha256>::new_from_slice(&key).expect("any key length");
        mac.update(format!("{}.{}.", self.webhook_id, self.timestamp).as_bytes());
        mac.update(&self.body);
        let expected = STANDARD.encode(mac.finalize().into_bytes());
        self.signature
            .split(' ')
            .any(|s| s.strip_prefix("v1,") == Some(expected.as_str()))
    }
}

#[derive(Default)]
struct Shared {
    received: Mutex<Vec<Received>>,
    /// Requests still to answer 500.
    fail_next: AtomicU32,
    /// Answer 500 to everything while set.
    failing: AtomicBool,
    /// Take this long to answer (ms): a slow subscriber.
    delay_ms: AtomicU32,
}

/// The receiver; stops when dropped.
pub struct WebhookReceiver {
    listener: Listener,
    shared: Arc<Shared>,
}

impl WebhookReceiver {
    pub async fn start() -> WebhookReceiver {
        let shared = Arc::new(Shared::default());
        let listener =
            Listener::start("webhook receiver", shared.clone(), |req, kept| async move {
                receive(req, &kept).await
            })
            .await;
        WebhookReceiver { listener, shared }
    }

    /// The URL to subscribe.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}/hook", self.listener.port())
    }

    /// Answer 500 to the next `n` requests.
    pub fn fail_next(&self, n: u32) {
        self.shared.fail_next.store(n, Ordering::SeqCst);
    }

    /// Answer 500 to everything (`true`) or 204 again (`false`).
    pub fn set_failing(&self, failing: bool) {
        self.shared.failing.store(failing, Ordering::SeqCst);
    }

    /// Take `ms` milliseconds to answer each request from now on.
    pub fn set_delay_ms(&self, ms: u32) {
        self.shared.delay_ms.store(ms, Ordering::SeqCst);
    }

    /// Every request so far, in the order received.
    pub fn received(&self) -> Vec<Received> {
        self.shared
            .received
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The requests answered 2xx, in order: what the subscriber accepted.
    pub fn accepted(&self) -> Vec<Received> {
        self.received()
            .into_iter()
            .filter(|r| (200..300).contains(&r.status))
            .collect()
    }
}

async fn receive(req: Request<Incoming>, shared: &Shared) -> Response<Full<Bytes>> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    let (webhook_id, timestamp, signature) = (
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
    );
    let body = match tokio::time::timeout(Duration::from_secs(10), req.into_body().collect()).await
    {
        Ok(Ok(b)) => b.to_bytes().to_vec(),
        _ => Vec::new(),
    };
    let received_at = std::time::SystemTime::now();
    let delay = shared.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
    }
    let fail = shared.failing.load(Ordering::SeqCst)
        || shared
            .fail_next
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
    let status = if fail {
        StatusCode::INTERNAL_SERVER_ERROR
    } else {
        StatusCode::NO_CONTENT
    };
    shared
        .received
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(Received {
            webhook_id,
            timestamp,
            signature,
            body,
            status: status.as_u16(),
            received_at,
        });
    let mut answer = Response::new(Full::new(Bytes::new()));
    *answer.status_mut() = status;
    answer
}

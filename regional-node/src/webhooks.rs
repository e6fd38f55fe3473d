//! Webhooks (API.md "Integration events and webhooks"): subscribing, listing and
//! deleting, and delivering the integration events to the subscribers, signed as
//! Standard Webhooks asks.
//!
//! Subscriptions are events (`WebhookSubscribed`, `WebhookDeleted`), so the replicator
//! copies them and a rebuild restores them; `apply` keeps the live ones under
//! `tandem:webhooks`.
//!
//! Deliveries: each subscription has a consumer group on the event stream
//! (`webhook:<id>`) that starts at the subscription's own event. Its one task (one
//! node of the region holds a lease on it; only the active region runs it) reads the stream in order, derives each
//! entry's integration event ([`orders_model::integration::derive`]), POSTs it, and
//! acknowledges the entry once the receiver answered 2xx or the event was parked in
//! the webhook's dead-letter stream after the bound of attempts. An entry is only
//! acknowledged after that, so a crash or a failover delivers it again (at least
//! once, same `webhook-id`); the replicator copies the group's position and pending
//! entries, and the new active region takes them over and resumes there. One entry at
//! a time keeps every order's events in order. The task is apart from the workflow's
//! consumer groups and every call has a timeout: a slow or dead receiver holds up its
//! own deliveries only.

use crate::store::Entry;
use crate::store::{Store, StoreError};
use crate::workflow::{Decision, Workflow, WorkflowError};
use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use eventlog::envelope::StreamId;
use eventlog::keys;
use hmac::{Hmac, Mac};
use orders_model::events::{Cause, DomainEvent, WebhookDeleted, WebhookSubscribed};
use orders_model::integration::{self, IntegrationEventType};
use orders_model::pii::{Field, KeyRing, NONCE_LEN};
use orders_model::webhooks::{Webhook, WebhookId, WebhookUrl, Webhooks};
use redis::Value;
use sha2::Sha256;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// How webhooks are delivered (`NODE_WEBHOOK_*`).
#[derive(Debug, Clone)]
pub struct DeliverySettings {
    /// Longest one delivery attempt may take.
    pub timeout: Duration,
    /// Attempts per event before it is parked.
    pub max_attempts: u32,
    /// Wait after the first failed attempt; doubles up to `backoff_max`.
    pub backoff: Duration,
    pub backoff_max: Duration,
}

/// Standard Webhooks' secret prefix.
const SECRET_PREFIX: &str = "whsec_";
/// Random bytes in a new secret (Standard Webhooks asks for 24 to 64).
const SECRET_BYTES: usize = 32;
/// How often the deliverer looks for subscriptions added or deleted, and for a change
/// of role.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// A blocking read waits this long for new entries.
pub const BLOCK_MS: u64 = 500;
/// Entries read at a time.
const BATCH: usize = 100;
/// A node holds a webhook's deliveries this long past its last renewal (renewed every
/// [`WATCH_EVERY`]); another node of the region takes over once it lapses.
const LEASE_MS: u64 = 5_000;

/// KEYS: the lease. ARGV: our consumer name, lease ms. Takes the lease when free or
/// ours and extends it; 1 when we hold it.
static LEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
local cur = redis.call('GET', KEYS[1])
if cur and cur ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
return 1
"#,
    )
});

/// KEYS: the lease. ARGV: our consumer name. Gives the lease up if it is ours.
static RELEASE: std::sync::LazyLock<redis::Script> = std::sync::LazyLock::new(|| {
    redis::Script::new(
        r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"#,
    )
});

/// Whether this node holds (and has just extended) the lease on `id`'s deliveries.
async fn hold_lease(wf: &Workflow, id: &WebhookId) -> Result<bool, StoreError> {
    let mut inv = LEASE.prepare_invoke();
    inv.key(keys::webhook_lease(id.as_str()))
        .arg(&wf.consumer)
        .arg(LEASE_MS);
    let held: i64 = wf.store.invoke(&inv).await?;
    Ok(held == 1)
}

/// A subscription as answered to a client: the secret only when it was just created.
pub fn view(hook: &Webhook, secret: Option<&str>) -> serde_json::Value {
    let mut v = serde_json::json!({
        "id": hook.id,
        "url": hook.url,
        "events": hook.events,
        "createdAt": hook.created_at,
    });
    if let Some(secret) = secret {
        v["secret"] = secret.into();
    }
    v
}

/// `POST /api/v1/webhooks`: records the subscription and returns it with its secret
/// (`whsec_` and the base64 of 32 random bytes), the only time the secret is shown.
pub async fn subscribe(
    wf: &Workflow,
    url: WebhookUrl,
    events: Vec<IntegrationEventType>,
    cause: &Cause,
) -> Result<(Webhook, String), WorkflowError> {
    let id = WebhookId::parse(&format!("wh_{}", uuid::Uuid::new_v4().simple()))
        .expect("a UUID makes a webhook id");
    let secret = format!(
        "{SECRET_PREFIX}{}",
        STANDARD.encode(rand::random::<[u8; SECRET_BYTES]>())
    );
    let sealed = wf.pii.seal(
        Field::WebhookSecret,
        id.as_str(),
        &secret,
        rand::random::<[u8; NONCE_LEN]>(),
    );
    let event = WebhookSubscribed {
        webhook_id: id.clone(),
        url,
        events,
        secret: sealed,
    };
    let done = wf
        .command(keys::WEBHOOKS.to_string(), cause, |_| {
            Ok(Decision::Emit {
                last_sequence: 0,
                events: vec![DomainEvent::WebhookSubscribed(event.clone())],
            })
        })
        .await?;
    let hooks: Webhooks = orders_model::apply::get_json(&done, keys::WEBHOOKS)?.unwrap_or_default();
    let hook = hooks.get(&id).cloned().expect("just subscribed");
    Ok((hook, secret))
}

/// `DELETE /api/v1/webhooks/{id}`: deliveries stop (the deliverer sees the
/// subscription gone within [`WATCH_EVERY`], and stops between two attempts).
pub async fn delete(wf: &Workflow, id: &WebhookId, cause: &Cause) -> Result<(), WorkflowError> {
    let not_found = || WorkflowError::NotFound(format!("webhook {}", id.as_str()));
    wf.command(keys::WEBHOOKS.to_string(), cause, |tx| {
        let hooks: Webhooks =
            orders_model::apply::get_json(tx, keys::WEBHOOKS)?.unwrap_or_default();
        let hook = hooks.get(id).ok_or_else(not_found)?;
        Ok(Decision::Emit {
            last_sequence: hook.version,
            events: vec![DomainEvent::WebhookDeleted(WebhookDeleted {
                webhook_id: id.clone(),
            })],
        })
    })
    .await?;
    Ok(())
}

/// The live subscriptions.
pub async fn list(store: &Store) -> Result<Webhooks, StoreError> {
    Ok(store
        .get_json::<Webhooks>(keys::WEBHOOKS)
        .await?
        .unwrap_or_default())
}

/// The `webhook-signature` header's value: `v1,` and the base64 of the HMAC-SHA256 of
/// `<id>.<timestamp>.<body>`, keyed by the secret's decoded bytes.
pub fn signature(key: &[u8], id: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

/// The signing key of a `whsec_` secret.
pub fn signing_key(secret: &str) -> Option<Vec<u8>> {
    STANDARD
        .decode(secret.strip_prefix(SECRET_PREFIX)?)
        .ok()
        .filter(|k| !k.is_empty())
}

/// The webhook's signing key, or `None` (logged once per webhook in `unopened`) when
/// the ring cannot open its secret.
fn opened_key(
    ring: &KeyRing,
    hook: &Webhook,
    unopened: &mut std::collections::HashSet<WebhookId>,
) -> Option<Vec<u8>> {
    match ring.open(Field::WebhookSecret, hook.id.as_str(), &hook.secret) {
        Ok(secret) => signing_key(&secret),
        Err(e) => {
            if unopened.insert(hook.id.clone()) {
                tracing::error!(webhook = hook.id.as_str(), error = %e, "cannot open the webhook's secret; not delivering (is NODE_PII_KEYS the same in both regions?)");
            }
            None
        }
    }
}

/// The wait after failed attempt `attempt` (1-based).
fn backoff(settings: &DeliverySettings, attempt: u32) -> Duration {
    let factor = 1u32 << attempt.saturating_sub(1).min(16);
    settings
        .backoff
        .saturating_mul(factor)
        .min(settings.backoff_max)
}

/// Runs the deliveries of every subscription while the region is active, until `stop`.
/// `blocking` is a connection of its own for the blocking reads (see `bus`), with a
/// response timeout above [`BLOCK_MS`].
pub async fn run(
    wf: Workflow,
    settings: DeliverySettings,
    blocking: Store,
    mut stop: watch::Receiver<bool>,
) {
    let client = match reqwest::Client::builder()
        .timeout(settings.timeout)
        .connect_timeout(settings.timeout)
        // A receiver answers; it does not send deliveries elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .build()
    {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot build the webhook HTTP client; no deliveries");
            return;
        }
    };
    let mut running: HashMap<WebhookId, JoinHandle<()>> = HashMap::new();
    let mut unopened = std::collections::HashSet::new();
    while !*stop.borrow() {
        let active = wf.roles.current().writable();
        let hooks = if active {
            match list(&wf.store).await {
                Ok(h) => Some(h),
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the webhooks; keeping deliveries as they are");
                    None
                }
            }
        } else {
            Some(Webhooks::new())
        };
        if let Some(hooks) = hooks {
            let gone: Vec<WebhookId> = running
                .keys()
                .filter(|id| !hooks.contains_key(*id))
                .cloned()
                .collect();
            for id in gone {
                if let Some(task) = running.remove(&id) {
                    task.abort();
                }
                if active {
                    // Deleted: its cursor goes too. (Demoted: it stays, for the
                    // region that takes over.)
                    let _: Result<Value, _> = wf
                        .store
                        .query(
                            redis::cmd("XGROUP")
                                .arg("DESTROY")
                                .arg(keys::EVENTS)
                                .arg(keys::webhook_group(id.as_str())),
                        )
                        .await;
                }
            }
            for (id, hook) in hooks {
                // One node of the region delivers each webhook: another one (several
                // nodes may share a region) would split its events and their order.
                match hold_lease(&wf, &id).await {
                    Ok(true) => {}
                    Ok(false) | Err(_) => {
                        if let Some(task) = running.remove(&id) {
                            task.abort();
                        }
                        continue;
                    }
                }
                if running.get(&id).is_some_and(|t| !t.is_finished()) {
                    continue;
                }
                let Some(key) = opened_key(&wf.pii, &hook, &mut unopened) else {
                    continue;
                };
                let subscriber = Subscriber {
                    wf: wf.clone(),
                    hook,
                    key,
                    client: client.clone(),
                    settings: settings.clone(),
                    blocking: blocking.clone(),
                };
                running.insert(id, tokio::spawn(subscriber.run()));
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(WATCH_EVERY) => {}
            _ = stop.changed() => {}
        }
    }
    for (id, task) in running {
        task.abort();
        // A node stopping hands its webhooks to the others of the region at once.
        let mut inv = RELEASE.prepare_invoke();
        inv.key(keys::webhook_lease(id.as_str())).arg(&wf.consumer);
        let _: Result<i64, _> = wf.store.invoke(&inv).await;
    }
}

/// One subscription's deliveries.
struct Subscriber {
    wf: Workflow,
    hook: Webhook,
    /// The secret's decoded bytes.
    key: Vec<u8>,
    client: reqwest::Client,
    settings: DeliverySettings,
    blocking: Store,
}

/// Why a delivery stopped before its entry was done.
#[derive(Debug, thiserror::Error)]
enum Stopped {
    #[error("the region is no longer active")]
    NotActive,
    #[error("the subscription was deleted")]
    Deleted,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl Subscriber {
    fn group(&self) -> String {
        keys::webhook_group(self.hook.id.as_str())
    }

    /// Delivers until aborted (subscription deleted, region demoted, node stopping).
    async fn run(self) {
        let mut failures = 0u32;
        loop {
            match self.deliver_all().await {
                Ok(()) => return,
                Err(Stopped::NotActive | Stopped::Deleted) => return,
                Err(Stopped::Store(e)) => {
                    failures += 1;
                    if failures == 1 || failures.is_multiple_of(50) {
                        tracing::warn!(webhook = self.hook.id.as_str(), error = %e, failures, "webhook deliveries: Redis call failed; retrying");
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn deliver_all(&self) -> Result<(), Stopped> {
        self.ensure_group().await?;
        self.take_over().await?;
        // This consumer's pending entries first (taken over, or held before a restart),
        // paged by id, then new ones.
        let mut from = "0".to_string();
        loop {
            let reply: Value = self
                .blocking
                .query(
                    redis::cmd("XREADGROUP")
                        .arg("GROUP")
                        .arg(self.group())
                        .arg(&self.wf.consumer)
                        .arg("COUNT")
                        .arg(BATCH)
                        .arg("BLOCK")
                        .arg(BLOCK_MS)
                        .arg("STREAMS")
                        .arg(keys::EVENTS)
                        .arg(&from),
                )
                .await?;
            let entries = Entry::from_read(reply);
            if from != ">" {
                match entries.last() {
                    Some(last) => from = last.id.clone(),
                    None => from = ">".into(),
                }
            }
            for entry in entries {
                self.deliver_entry(&entry).await?;
            }
        }
    }

    /// Creates the group at the subscription's own event unless it exists (copied from
    /// the peer region, with its position: that one is kept).
    async fn ensure_group(&self) -> Result<(), Stopped> {
        let first: Option<String> = self
            .wf
            .store
            .query(
                redis::cmd("LINDEX")
                    .arg(keys::aggregate(self.hook.id.as_str()))
                    .arg(0),
            )
            .await?;
        let start = first.unwrap_or_else(|| "$".into());
        let created: Result<String, StoreError> = self
            .wf
            .store
            .query(
                redis::cmd("XGROUP")
                    .arg("CREATE")
                    .arg(keys::EVENTS)
                    .arg(self.group())
                    .arg(start),
            )
            .await;
        match created {
            Ok(_) => Ok(()),
            Err(StoreError::Redis(msg)) if msg.contains("BUSYGROUP") => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Takes every pending entry of the group, whoever held it (the old active region's
    /// consumer, after a failover): one task per region delivers, so nobody else is
    /// working on them.
    async fn take_over(&self) -> Result<(), Stopped> {
        let mut cursor = "0-0".to_string();
        loop {
            let reply: Value = self
                .wf
                .store
                .query(
                    redis::cmd("XAUTOCLAIM")
                        .arg(keys::EVENTS)
                        .arg(self.group())
                        .arg(&self.wf.consumer)
                        .arg(0)
                        .arg(&cursor)
                        .arg("COUNT")
                        .arg(1000)
                        .arg("JUSTID"),
                )
                .await?;
            let next = match &reply {
                Value::Array(parts) => parts
                    .first()
                    .and_then(|v| redis::from_redis_value_ref::<String>(v).ok()),
                _ => None,
            };
            match next {
                Some(n) if n != "0-0" => cursor = n,
                _ => return Ok(()),
            }
        }
    }

    /// Delivers one entry's integration event, if it has one for this subscription,
    /// then acknowledges the entry.
    async fn deliver_entry(&self, entry: &Entry) -> Result<(), Stopped> {
        let env = entry.envelope().ok();
        let domain = env
            .as_ref()
            .and_then(|env| DomainEvent::from_envelope(env).ok());
        if let Some(DomainEvent::WebhookDeleted(d)) = &domain {
            if d.webhook_id == self.hook.id {
                // Nothing committed after the delete is delivered, whenever the
                // deliverer learns of it (the stream orders the two).
                return Err(Stopped::Deleted);
            }
        }
        let event = env
            .as_ref()
            .zip(domain.as_ref())
            .and_then(|(env, domain)| integration::derive(env, domain));
        if let Some(event) = event.filter(|e| self.hook.wants(e.event_type)) {
            let body = serde_json::to_vec(&event).expect("integration events serialise");
            self.deliver(entry, &event.event_id, &body).await?;
        }
        let _: i64 = self
            .wf
            .store
            .query(
                redis::cmd("XACK")
                    .arg(keys::EVENTS)
                    .arg(self.group())
                    .arg(&entry.id),
            )
            .await?;
        Ok(())
    }

    /// POSTs until a 2xx, or parks the event after the last attempt.
    async fn deliver(&self, entry: &Entry, id: &str, body: &[u8]) -> Result<(), Stopped> {
        let m = &self.wf.metrics;
        let mut last_error = String::new();
        for attempt in 1..=self.settings.max_attempts {
            if !self.wf.roles.current().writable() {
                return Err(Stopped::NotActive);
            }
            let timestamp = eventlog::time::now_ms() / 1000;
            let sent = Instant::now();
            let answer = self
                .client
                .post(self.hook.url.as_str())
                .header("content-type", "application/json")
                .header("webhook-id", id)
                .header("webhook-timestamp", timestamp.to_string())
                .header(
                    "webhook-signature",
                    signature(&self.key, id, timestamp, body),
                )
                .body(body.to_vec())
                .send()
                .await;
            match answer {
                Ok(r) if r.status().is_success() => {
                    m.webhook_deliveries.with_label_values(&["delivered"]).inc();
                    // The entry id is the commit's time in the active region.
                    if let Some(at) = StreamId::parse(&entry.id) {
                        let waited = eventlog::time::now_ms().saturating_sub(at.ms);
                        m.webhook_delivery_latency.observe(waited as f64 / 1000.0);
                    }
                    return Ok(());
                }
                Ok(r) => last_error = format!("HTTP {}", r.status().as_u16()),
                Err(e) if e.is_timeout() => {
                    last_error = format!("no answer within {:?}", sent.elapsed())
                }
                Err(e) => last_error = format!("unreachable: {e}"),
            }
            m.webhook_deliveries.with_label_values(&["failed"]).inc();
            tracing::debug!(webhook = self.hook.id.as_str(), event_id = id, attempt, error = %last_error, "webhook delivery failed");
            if attempt < self.settings.max_attempts {
                tokio::time::sleep(backoff(&self.settings, attempt)).await;
            }
        }
        self.park(entry, id, body, &last_error).await
    }

    /// Puts the event in the webhook's dead-letter stream (copied like every `tandem:`
    /// stream) and lets deliveries go on.
    async fn park(&self, entry: &Entry, id: &str, body: &[u8], error: &str) -> Result<(), Stopped> {
        if !self.wf.roles.current().writable() {
            return Err(Stopped::NotActive);
        }
        let _: String = self
            .wf
            .store
            .query(
                redis::cmd("XADD")
                    .arg(keys::webhook_dlq(self.hook.id.as_str()))
                    .arg("*")
                    .arg("webhookId")
                    .arg(self.hook.id.as_str())
                    .arg("eventId")
                    .arg(id)
                    .arg("streamId")
                    .arg(&entry.id)
                    .arg("attempts")
                    .arg(self.settings.max_attempts)
                    .arg("error")
                    .arg(error)
                    .arg("event")
                    .arg(body),
            )
            .await?;
        self.wf
            .metrics
            .webhook_deliveries
            .with_label_values(&["parked"])
            .inc();
        tracing::warn!(
            webhook = self.hook.id.as_str(),
            event_id = id,
            error,
            "webhook delivery parked after the last attempt"
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_follow_standard_webhooks() {
        // The example of the Standard Webhooks specification.
        let key = signing_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let body = br#"{"test": 2432232314}"#;
        assert_eq!(
            signature(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body),
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
        );
        assert_eq!(signing_key("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"), None);
        assert_eq!(signing_key("whsec_!!"), None);
    }

    #[test]
    fn backoff_doubles_up_to_its_bound() {
        let s = DeliverySettings {
            timeout: Duration::from_secs(1),
            max_attempts: 5,
            backoff: Duration::from_millis(100),
            backoff_max: Duration::from_millis(350),
        };
        let waits: Vec<u128> = (1..=4).map(|a| backoff(&s, a).as_millis()).collect();
        assert_eq!(waits, [100, 200, 350, 350]);
    }
}

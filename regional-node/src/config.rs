//! Typed configuration: defaults, then an optional TOML file, then `NODE_*` variables.

use eventlog::{RegionId, Role};
use internal_tls::PemFile;
use orders_model::pii::KeyRing;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// Acknowledge after the local write (RPO = replication lag).
    Async,
    /// Acknowledge an order only once the standby holds it (RPO = 0 for acked orders).
    Replicated,
}

#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// NODE_REGION: this region's id.
    pub region: RegionId,
    /// NODE_LISTEN
    pub listen: SocketAddr,
    /// NODE_REDIS_URL
    pub redis_url: String,
    /// NODE_PEER_REDIS_URL: the other region's Redis, read for fencing and durability.
    pub peer_redis_url: Option<String>,
    /// NODE_ROLE: seeds the role only when Redis holds none.
    pub role: Role,
    /// NODE_DURABILITY
    pub durability: Durability,
    /// NODE_ADMIN_TOKEN: bearer token for /admin/*; unset: admin only from loopback.
    pub admin_token: Option<String>,
    /// NODE_REDIS_TIMEOUT_MS: longest wait for one Redis call before answering 503.
    pub redis_timeout_ms: u64,
    /// NODE_RECLAIM_IDLE_MS: pending entries idle this long are taken from their
    /// (presumably dead) consumer. Must exceed the longest handling incl. retries.
    pub reclaim_idle_ms: u64,
    /// NODE_RETRY_BASE_MS: first backoff of a failed handler attempt (doubles, jittered).
    pub retry_base_ms: u64,
    /// NODE_HANDLER_CONCURRENCY: workers per consumer group; one aggregate always goes
    /// to the same worker, so its events are handled in order.
    pub handler_concurrency: usize,
    /// NODE_REPLICATED_TIMEOUT_MS: longest wait for the standby in `replicated` mode.
    pub replicated_timeout_ms: u64,
    /// NODE_REPLICATED_FALLBACK: what `replicated` durability does while the standby is
    /// known to be down or behind.
    pub replicated_fallback: crate::durability::Fallback,
    /// NODE_SHUTDOWN_GRACE_MS: how long SIGTERM waits for in-flight work.
    pub shutdown_grace_ms: u64,
    /// NODE_PROMOTION_TIMEOUT_MS: longest a promotion may take (mostly applying the
    /// replicated backlog); past it the promotion fails and the region stays standby.
    pub promotion_timeout_ms: u64,
    /// NODE_PII_KEYS: the key ring personal data in events is sealed with
    /// (`kid:base64key,...`, the first seals; orders_model::pii). Both regions need the
    /// same ring. Unset or empty: the public development key, with a warning at start.
    #[serde(default, deserialize_with = "key_ring")]
    pub pii_keys: Option<KeyRing>,
    /// NODE_TRUST_IDENTITY_HEADERS [false]: take `Tandem-Scopes` (the gateway's word on
    /// what the caller may do, e.g. `pii:read`) at face value. Only for a node nobody
    /// but the gateway can reach (its own network, or mutual TLS): anyone who can send
    /// a request to the node can also send the header.
    pub trust_identity_headers: bool,
    /// NODE_TLS_CERT, NODE_TLS_KEY: certificate chain and key (PEM); both set, the node
    /// serves HTTPS only.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// NODE_TLS_CLIENT_CA: with TLS on, every client must present a certificate this CA
    /// (PEM bundle) signed, or its handshake fails: mutual TLS with the gateway, for
    /// every route, admin included.
    pub tls_client_ca: Option<PathBuf>,
    /// NODE_REDIS_CA: the only CA (PEM bundle) trusted for `rediss://` URLs (this
    /// region's Redis and the peer's); unset, the system's roots.
    pub redis_ca: Option<PathBuf>,
    /// NODE_SAGA_TIMEOUT_MS: an order not paid (or ended) this long after it was placed
    /// is cancelled and compensated (seed 003's saga timeout); 0 turns it off.
    pub saga_timeout_ms: u64,
    /// NODE_WEBHOOK_TIMEOUT_MS: longest a webhook receiver may take to answer one
    /// delivery (connecting included); past it the attempt failed.
    pub webhook_timeout_ms: u64,
    /// NODE_WEBHOOK_MAX_ATTEMPTS: attempts per integration event before it is parked in
    /// the webhook's dead-letter stream and deliveries go on with the next.
    pub webhook_max_attempts: u32,
    /// NODE_WEBHOOK_BACKOFF_MS: wait after the first failed attempt; doubles per
    /// attempt up to NODE_WEBHOOK_BACKOFF_MAX_MS.
    pub webhook_backoff_ms: u64,
    /// NODE_WEBHOOK_BACKOFF_MAX_MS
    pub webhook_backoff_max_ms: u64,
    /// NODE_HTTP_MAX_CONNECTIONS [1024]: open client connections at most; further ones
    /// wait in the listen backlog until one closes.
    pub http_max_connections: usize,
    /// NODE_HTTP_HEADER_TIMEOUT_MS [10000]: a connection that has not sent a complete
    /// request head this long after it opened, or after the head's first byte, is
    /// closed (slow clients cannot hold a connection slot).
    pub http_header_timeout_ms: u64,
    /// NODE_HTTP_IDLE_TIMEOUT_MS [75000]: a keep-alive connection with nothing sent
    /// since its last answer is closed after this long. Longer than the gateway's pool
    /// keeps an idle connection (60 s), so the node never closes one the gateway is
    /// about to reuse.
    pub http_idle_timeout_ms: u64,
    /// NODE_HTTP_BODY_TIMEOUT_MS [30000]: longest wait for a request body; past it the
    /// answer is 408 `request_timeout`.
    pub http_body_timeout_ms: u64,
}

/// `NODE_PII_KEYS`: parsed at load, so a bad ring stops the node before it starts (the
/// message names the entry, never the key material).
fn key_ring<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<KeyRing>, D::Error> {
    let raw: Option<String> = Option::deserialize(d)?;
    match raw.as_deref().map(str::trim) {
        None | Some("") => Ok(None),
        Some(spec) => KeyRing::parse(spec)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("bad key ring: {e}"))),
    }
}

#[derive(Debug, thiserror::Error)]
#[error("configuration: {0}")]
pub struct ConfigError(String);

impl Config {
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("listen", "127.0.0.1:8081")
            .and_then(|b| b.set_default("redis_url", "redis://127.0.0.1:6379"))
            .and_then(|b| b.set_default("role", "standby"))
            .and_then(|b| b.set_default("durability", "async"))
            .and_then(|b| b.set_default("redis_timeout_ms", 1000))
            .and_then(|b| b.set_default("reclaim_idle_ms", 10_000))
            .and_then(|b| b.set_default("retry_base_ms", 100))
            .and_then(|b| b.set_default("handler_concurrency", 8))
            .and_then(|b| b.set_default("replicated_timeout_ms", 2000))
            .and_then(|b| b.set_default("replicated_fallback", "async"))
            .and_then(|b| b.set_default("shutdown_grace_ms", 10_000))
            .and_then(|b| b.set_default("promotion_timeout_ms", 30_000))
            .and_then(|b| b.set_default("trust_identity_headers", false))
            .and_then(|b| b.set_default("saga_timeout_ms", 30_000))
            .and_then(|b| b.set_default("webhook_timeout_ms", 5_000))
            .and_then(|b| b.set_default("webhook_max_attempts", 8))
            .and_then(|b| b.set_default("webhook_backoff_ms", 500))
            .and_then(|b| b.set_default("webhook_backoff_max_ms", 60_000))
            .and_then(|b| b.set_default("http_max_connections", 1024))
            .and_then(|b| b.set_default("http_header_timeout_ms", 10_000))
            .and_then(|b| b.set_default("http_idle_timeout_ms", 75_000))
            .and_then(|b| b.set_default("http_body_timeout_ms", 30_000))
            .map_err(|e| ConfigError(e.to_string()))?;
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).required(true));
        }
        let cfg: Config = builder
            .add_source(
                config::Environment::with_prefix("NODE")
                    .prefix_separator("_")
                    .separator("__")
                    .try_parsing(true),
            )
            .build()
            .and_then(|c| c.try_deserialize())
            .map_err(|e| ConfigError(explain(e)))?;
        let mut cfg = cfg;
        // An empty variable (`NODE_TLS_CERT=` in a compose file) means unset.
        for path in [
            &mut cfg.tls_cert,
            &mut cfg.tls_key,
            &mut cfg.tls_client_ca,
            &mut cfg.redis_ca,
        ] {
            if path.as_ref().is_some_and(|p| p.as_os_str().is_empty()) {
                *path = None;
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if !self.redis_url.starts_with("redis://") && !self.redis_url.starts_with("rediss://") {
            return Err(ConfigError(format!(
                "redis_url (NODE_REDIS_URL) must be a redis:// or rediss:// URL, got {:?}",
                redact(&self.redis_url)
            )));
        }
        if let Some(peer) = &self.peer_redis_url {
            if !peer.starts_with("redis://") && !peer.starts_with("rediss://") {
                return Err(ConfigError(format!(
                    "peer_redis_url (NODE_PEER_REDIS_URL) must be a redis:// or rediss:// URL, got {:?}",
                    redact(peer)
                )));
            }
        }
        match (self.tls_cert.is_some(), self.tls_key.is_some()) {
            (true, false) => {
                return Err(ConfigError(
                    "tls_key (NODE_TLS_KEY): NODE_TLS_CERT is set but NODE_TLS_KEY is not".into(),
                ))
            }
            (false, true) => {
                return Err(ConfigError(
                    "tls_cert (NODE_TLS_CERT): NODE_TLS_KEY is set but NODE_TLS_CERT is not".into(),
                ))
            }
            _ => {}
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err(ConfigError(
                "tls_client_ca (NODE_TLS_CLIENT_CA) needs NODE_TLS_CERT and NODE_TLS_KEY: client certificates are checked on HTTPS only".into(),
            ));
        }
        if self.redis_ca.is_some()
            && !std::iter::once(&self.redis_url)
                .chain(&self.peer_redis_url)
                .any(|u| u.starts_with("rediss://"))
        {
            return Err(ConfigError(
                "redis_ca (NODE_REDIS_CA) is set but no Redis URL is rediss:// (TLS)".into(),
            ));
        }
        if self.durability == Durability::Replicated && self.peer_redis_url.is_none() {
            return Err(ConfigError(
                "durability (NODE_DURABILITY) `replicated` needs the standby's Redis: set NODE_PEER_REDIS_URL".into(),
            ));
        }
        if self.promotion_timeout_ms < 1000 {
            return Err(ConfigError(
                "promotion_timeout_ms (NODE_PROMOTION_TIMEOUT_MS) must be at least 1000".into(),
            ));
        }
        if self.http_max_connections == 0 {
            return Err(ConfigError(
                "http_max_connections (NODE_HTTP_MAX_CONNECTIONS) must be at least 1".into(),
            ));
        }
        if self.http_header_timeout_ms == 0
            || self.http_body_timeout_ms == 0
            || self.http_idle_timeout_ms == 0
        {
            return Err(ConfigError(
                "NODE_HTTP_HEADER_TIMEOUT_MS, NODE_HTTP_BODY_TIMEOUT_MS and NODE_HTTP_IDLE_TIMEOUT_MS must be above 0".into(),
            ));
        }
        if self.handler_concurrency == 0 || self.handler_concurrency > 256 {
            return Err(ConfigError(
                "handler_concurrency (NODE_HANDLER_CONCURRENCY) must be 1-256".into(),
            ));
        }
        if self.webhook_timeout_ms == 0 || self.webhook_timeout_ms > 60_000 {
            return Err(ConfigError(
                "webhook_timeout_ms (NODE_WEBHOOK_TIMEOUT_MS) must be 1-60000".into(),
            ));
        }
        if self.webhook_max_attempts == 0 || self.webhook_max_attempts > 100 {
            return Err(ConfigError(
                "webhook_max_attempts (NODE_WEBHOOK_MAX_ATTEMPTS) must be 1-100".into(),
            ));
        }
        if self.webhook_backoff_ms == 0 || self.webhook_backoff_max_ms < self.webhook_backoff_ms {
            return Err(ConfigError(
                "webhook_backoff_ms (NODE_WEBHOOK_BACKOFF_MS) must be at least 1 and at most NODE_WEBHOOK_BACKOFF_MAX_MS".into(),
            ));
        }
        Ok(())
    }

    /// The server side of HTTPS, when NODE_TLS_CERT and NODE_TLS_KEY are set.
    pub fn tls_server(&self) -> Result<Option<internal_tls::TlsAcceptor>, internal_tls::TlsError> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let config = internal_tls::server_config(
            PemFile::new("NODE_TLS_CERT", cert),
            PemFile::new("NODE_TLS_KEY", key),
            self.tls_client_ca
                .as_deref()
                .map(|ca| PemFile::new("NODE_TLS_CLIENT_CA", ca)),
            &[b"http/1.1"],
        )?;
        Ok(Some(internal_tls::TlsAcceptor::from(std::sync::Arc::new(
            config,
        ))))
    }

    /// NODE_REDIS_CA as a PEM file setting.
    pub fn redis_ca(&self) -> Option<PemFile<'_>> {
        self.redis_ca
            .as_deref()
            .map(|p| PemFile::new("NODE_REDIS_CA", p))
    }

    /// How webhooks are delivered.
    pub fn webhook_settings(&self) -> crate::webhooks::DeliverySettings {
        crate::webhooks::DeliverySettings {
            timeout: Duration::from_millis(self.webhook_timeout_ms),
            max_attempts: self.webhook_max_attempts,
            backoff: Duration::from_millis(self.webhook_backoff_ms),
            backoff_max: Duration::from_millis(self.webhook_backoff_max_ms),
        }
    }

    pub fn redis_timeout(&self) -> Duration {
        Duration::from_millis(self.redis_timeout_ms)
    }

    pub fn promotion_timeout(&self) -> Duration {
        Duration::from_millis(self.promotion_timeout_ms)
    }

    /// `None` when saga timeouts are off.
    pub fn saga_timeout(&self) -> Option<Duration> {
        (self.saga_timeout_ms > 0).then(|| Duration::from_millis(self.saga_timeout_ms))
    }
}

/// A Redis URL with its password replaced, for error messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            let user = userinfo.split(':').next().unwrap_or("");
            format!("{}{user}:***{}", &url[..scheme + 3], &url[at..])
        }
        _ => url.to_string(),
    }
}

/// Names the environment variable next to the key the `config` crate complains about.
fn explain(e: config::ConfigError) -> String {
    let msg = e.to_string();
    let env = |key: &str| format!("NODE_{}", key.to_uppercase().replace('.', "__"));
    if let Some(rest) = msg.split("missing configuration field \"").nth(1) {
        let key = rest.split('"').next().unwrap_or("");
        return format!("missing `{key}`: set {}", env(key));
    }
    if let Some(rest) = msg.split("for key `").nth(1) {
        let key = rest.split('`').next().unwrap_or("");
        return format!("{msg} (set by {})", env(key));
    }
    msg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_environment_variable() {
        let missing = config::ConfigError::Message("missing configuration field \"region\"".into());
        assert_eq!(explain(missing), "missing `region`: set NODE_REGION");
        let bad =
            config::ConfigError::Message("invalid socket address syntax for key `listen`".into());
        assert!(explain(bad).ends_with("(set by NODE_LISTEN)"));
    }
}

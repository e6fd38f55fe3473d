//! The JSON Web Key Set (RFC 7517) that access tokens are checked against: read from a
//! file or fetched from an `https://` URL, kept decoded in memory (a request never
//! parses a key), fetched again periodically and when a token names a key id the set
//! does not hold — at most once per `jwks_min_refresh`, so a flood of made-up key ids
//! costs the JWKS server nothing. Keys rotate without a restart.
//!
//! Only signature keys the gateway accepts are kept: RSA (RS256, at least 2048 bits)
//! and EC P-256 (ES256), each with a `kid`. A key's algorithm comes from the key, never
//! from the token, which is what defeats algorithm confusion (an HS256 token "signed"
//! with the public key, `alg: none`).

use crate::config::{AuthConfig, JwksSource};
use crate::metrics::Metrics;
use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, PublicKeyUse};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{watch, Notify};

/// A key set document larger than this is refused (real ones are a few KiB).
const MAX_JWKS_BYTES: usize = 1024 * 1024;
/// One fetch of an `https://` key set, connection included.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);
/// Clock skew allowed on `exp` and `nbf` (API.md).
pub const LEEWAY_SECS: u64 = 60;

/// Why a key set could not be had.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("GATEWAY_AUTH_JWKS {0}: {1}")]
    Read(String, String),
    #[error("GATEWAY_AUTH_JWKS {0}: not a JWKS: {1}")]
    Parse(String, String),
    #[error("GATEWAY_AUTH_JWKS {0}: no usable key (RS256 or ES256 with a kid)")]
    Empty(String),
    #[error("GATEWAY_AUTH_JWKS_CA {0}: {1}")]
    Ca(String, String),
}

/// One verification key with everything a check needs, prepared once.
pub struct VerifyingKey {
    pub algorithm: Algorithm,
    pub key: DecodingKey,
    /// Issuer, audience, leeway and required claims, for this key's algorithm only.
    pub validation: Validation,
}

/// The keys by `kid`.
#[derive(Default)]
pub struct KeySet {
    keys: HashMap<String, VerifyingKey>,
}

impl KeySet {
    pub fn get(&self, kid: &str) -> Option<&VerifyingKey> {
        self.keys.get(kid)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// What became of a request for a fresh key set.
pub enum Refresh {
    /// A fetch finished (successfully or not): look the key up again.
    Done,
    /// Too soon after the last one: the key is unknown for now.
    Throttled,
}

/// The current key set and the machinery that renews it.
pub struct KeyRing {
    source: JwksSource,
    client: Option<reqwest::Client>,
    current: ArcSwap<KeySet>,
    /// Issuer, audience and the rest, without an algorithm yet.
    template: Validation,
    refresh_every: Duration,
    min_refresh: Duration,
    /// Milliseconds since `epoch` before which an unknown `kid` may not trigger a fetch.
    next_on_demand_ms: AtomicU64,
    epoch: Instant,
    /// A fetch is under way: an unknown `kid` waits for it rather than being refused.
    fetching: AtomicBool,
    wake: Notify,
    /// Bumped after every fetch, good or bad.
    fetched: watch::Sender<u64>,
    metrics: Arc<Metrics>,
}

impl KeyRing {
    /// Loads the key set once. A file that cannot be read or holds no usable key stops
    /// the start (a configuration error); an unreachable URL does not: the gateway also
    /// controls failover and must run while the identity provider is down, so it starts
    /// with no keys (answering 503 `auth_unavailable`) and keeps trying.
    pub async fn load(cfg: &AuthConfig, metrics: Arc<Metrics>) -> Result<KeyRing, JwksError> {
        let client = match &cfg.jwks {
            JwksSource::File(_) => None,
            JwksSource::Url(_) => Some(https_client(cfg.jwks_ca.as_deref())?),
        };
        let mut template = Validation::new(Algorithm::RS256);
        template.leeway = LEEWAY_SECS;
        template.validate_exp = true;
        template.validate_nbf = true;
        template.set_issuer(&[&cfg.issuer]);
        template.set_audience(&[&cfg.audience]);
        template.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let ring = KeyRing {
            source: cfg.jwks.clone(),
            client,
            current: ArcSwap::from_pointee(KeySet::default()),
            template,
            refresh_every: cfg.jwks_refresh,
            min_refresh: cfg.jwks_min_refresh,
            next_on_demand_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            fetching: AtomicBool::new(false),
            wake: Notify::new(),
            fetched: watch::channel(0).0,
            metrics,
        };
        match ring.fetch().await {
            Ok(set) => ring.install(set),
            Err(e) if matches!(ring.source, JwksSource::File(_)) => return Err(e),
            Err(e) => {
                ring.count("error");
                tracing::error!(error = %e, "cannot load the JWKS; every request that needs a token is answered 503 until it loads");
            }
        }
        Ok(ring)
    }

    /// The keys as they are now (lock-free).
    pub fn keys(&self) -> arc_swap::Guard<Arc<KeySet>> {
        self.current.load()
    }

    /// Asks for a fetch because a token named an unknown key, and waits for it (at
    /// most one fetch per `min_refresh`; requests in between are refused at once
    /// unless a fetch is already under way, which they wait for).
    pub async fn refresh_for_unknown_kid(&self) -> Refresh {
        let mut done = self.fetched.subscribe();
        if !self.fetching.load(Ordering::Acquire) {
            let now = self.epoch.elapsed().as_millis() as u64;
            let next = self.next_on_demand_ms.load(Ordering::Acquire);
            if now < next {
                return Refresh::Throttled;
            }
            let then = now + self.min_refresh.as_millis() as u64;
            if self
                .next_on_demand_ms
                .compare_exchange(next, then, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
            {
                self.fetching.store(true, Ordering::Release);
                self.wake.notify_one();
            }
            // Otherwise another request claimed this slot a moment ago and is waking
            // the fetcher: wait for that fetch too.
        }
        match tokio::time::timeout(FETCH_TIMEOUT + Duration::from_secs(1), done.changed()).await {
            Ok(_) => Refresh::Done,
            Err(_) => Refresh::Throttled,
        }
    }

    /// Fetches the set every `jwks_refresh` (every `jwks_min_refresh` while none has
    /// loaded yet) and whenever [`refresh_for_unknown_kid`](Self::refresh_for_unknown_kid)
    /// asks. Runs until the gateway stops.
    pub async fn run(self: Arc<Self>) {
        loop {
            let period = if self.current.load().is_empty() {
                self.min_refresh
            } else {
                self.refresh_every
            };
            tokio::select! {
                _ = tokio::time::sleep(period) => {}
                _ = self.wake.notified() => {}
            }
            self.fetching.store(true, Ordering::Release);
            match self.fetch().await {
                Ok(set) => self.install(set),
                Err(e) => {
                    self.count("error");
                    tracing::warn!(error = %e, "JWKS refresh failed; keeping the keys already loaded");
                }
            }
            self.fetching.store(false, Ordering::Release);
            self.fetched.send_modify(|n| *n += 1);
        }
    }

    fn install(&self, set: KeySet) {
        let old = self.current.load();
        let mut kids: Vec<&str> = set.keys.keys().map(String::as_str).collect();
        kids.sort_unstable();
        if old.len() != set.len() || kids.iter().any(|k| old.get(k).is_none()) {
            tracing::info!(keys = ?kids, "JWKS loaded");
        }
        self.metrics.jwks_keys.set(set.len() as i64);
        self.count("ok");
        self.current.store(Arc::new(set));
    }

    fn count(&self, outcome: &str) {
        self.metrics
            .jwks_fetches
            .with_label_values(&[outcome])
            .inc();
    }

    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let (name, bytes) = match &self.source {
            JwksSource::File(path) => {
                let name = path.display().to_string();
                let bytes = tokio::fs::read(path)
                    .await
                    .map_err(|e| JwksError::Read(name.clone(), e.to_string()))?;
                if bytes.len() > MAX_JWKS_BYTES {
                    return Err(JwksError::Read(name, "larger than 1 MiB".into()));
                }
                (name, bytes)
            }
            JwksSource::Url(url) => {
                let client = self.client.as_ref().expect("https client for a URL");
                (url.clone(), download(client, url).await?)
            }
        };
        let set =
            parse_key_set(&bytes, &self.template).map_err(|e| JwksError::Parse(name.clone(), e))?;
        if set.is_empty() {
            return Err(JwksError::Empty(name));
        }
        Ok(set)
    }
}

/// A client that speaks only HTTPS, trusting only `ca` when given.
fn https_client(ca: Option<&std::path::Path>) -> Result<reqwest::Client, JwksError> {
    let mut builder = reqwest::Client::builder()
        .https_only(true)
        .timeout(FETCH_TIMEOUT)
        .connect_timeout(FETCH_TIMEOUT)
        .redirect(reqwest::redirect::Policy::limited(3))
        .user_agent(concat!("tandem-gateway/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca {
        let name = path.display().to_string();
        let pem = std::fs::read(path).map_err(|e| JwksError::Ca(name.clone(), e.to_string()))?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| JwksError::Ca(name.clone(), e.to_string()))?;
        if certs.is_empty() {
            return Err(JwksError::Ca(name, "no certificate found".into()));
        }
        // Pinned: the public roots are not trusted for this URL.
        builder = builder.tls_built_in_root_certs(false);
        for cert in certs {
            builder = builder.add_root_certificate(cert);
        }
    }
    builder
        .build()
        .map_err(|e| JwksError::Ca("(client)".into(), e.to_string()))
}

async fn download(client: &reqwest::Client, url: &str) -> Result<Vec<u8>, JwksError> {
    let failed = |e: String| JwksError::Read(url.to_string(), e);
    let mut resp = client
        .get(url)
        .header("accept", "application/json")
        .send()
        .await
        .map_err(|e| failed(crate::node_api::error_chain(&e)))?;
    if !resp.status().is_success() {
        return Err(failed(format!("answered {}", resp.status())));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| failed(e.to_string()))? {
        if body.len() + chunk.len() > MAX_JWKS_BYTES {
            return Err(failed("larger than 1 MiB".into()));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Keeps the usable signature keys of a JWKS document; a key the gateway cannot use is
/// skipped with a warning, never the whole set (a set may also carry encryption keys).
fn parse_key_set(bytes: &[u8], template: &Validation) -> Result<KeySet, String> {
    #[derive(serde::Deserialize)]
    struct Document {
        keys: Vec<serde_json::Value>,
    }
    let doc: Document = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
    let mut set = KeySet::default();
    for raw in doc.keys {
        let kid = raw.get("kid").and_then(|k| k.as_str()).map(str::to_string);
        match usable_key(raw, template) {
            Ok((kid, key)) => match set.keys.entry(kid) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    tracing::warn!(kid = %e.key(), "JWKS names this kid twice; keeping the first");
                }
                std::collections::hash_map::Entry::Vacant(e) => {
                    e.insert(key);
                }
            },
            Err(why) => {
                tracing::warn!(kid = kid.as_deref().unwrap_or("-"), why, "JWKS key skipped")
            }
        }
    }
    Ok(set)
}

fn usable_key(
    raw: serde_json::Value,
    template: &Validation,
) -> Result<(String, VerifyingKey), &'static str> {
    let jwk: Jwk = serde_json::from_value(raw).map_err(|_| "not a key this gateway reads")?;
    let kid = jwk.common.key_id.clone().ok_or("no kid")?;
    if kid.is_empty() || kid.len() > 256 {
        return Err("kid empty or longer than 256 bytes");
    }
    if matches!(jwk.common.public_key_use, Some(PublicKeyUse::Encryption)) {
        return Err("an encryption key (use=enc)");
    }
    let algorithm = match (&jwk.algorithm, jwk.common.key_algorithm) {
        (AlgorithmParameters::RSA(rsa), None | Some(KeyAlgorithm::RS256)) => {
            // ring refuses shorter moduli anyway; say so at load time, not per request.
            let n = b64url_len(&rsa.n).ok_or("bad modulus")?;
            if n < 256 {
                return Err("RSA key shorter than 2048 bits");
            }
            Algorithm::RS256
        }
        (AlgorithmParameters::EllipticCurve(ec), None | Some(KeyAlgorithm::ES256))
            if ec.curve == EllipticCurve::P256 =>
        {
            if b64url_len(&ec.x) != Some(32) || b64url_len(&ec.y) != Some(32) {
                return Err("P-256 coordinates must be 32 bytes");
            }
            Algorithm::ES256
        }
        _ => return Err("only RS256 (RSA) and ES256 (EC P-256) keys are accepted"),
    };
    let key = DecodingKey::from_jwk(&jwk).map_err(|_| "key parameters do not decode")?;
    let mut validation = template.clone();
    validation.algorithms = vec![algorithm];
    Ok((
        kid,
        VerifyingKey {
            algorithm,
            key,
            validation,
        },
    ))
}

/// Decoded length of unpadded base64url, or `None` when it is not base64url.
fn b64url_len(s: &str) -> Option<usize> {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(s.trim_end_matches('='))
        .ok()
        .map(|v| v.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template() -> Validation {
        let mut v = Validation::new(Algorithm::RS256);
        v.set_issuer(&["iss"]);
        v
    }

    #[test]
    fn unusable_keys_are_skipped_not_fatal() {
        let x = "f83OJ3D2xF1Bg8vub9tLe1gHMzV76e8Tus9uPHvRVEU";
        let y = "x_FEzRu9m36HLN_tue659LNpXW6pCyStikYjKIWI5a0";
        let doc = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec-1"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "enc", "use": "enc"},
            {"kty": "EC", "crv": "P-256", "x": x, "y": y, "kid": "ec-1"},
            {"kty": "weird", "kid": "w"}
        ]});
        let set = parse_key_set(doc.to_string().as_bytes(), &template()).unwrap();
        assert_eq!(set.len(), 1);
        assert_eq!(set.get("ec-1").unwrap().algorithm, Algorithm::ES256);
        assert_eq!(
            set.get("ec-1").unwrap().validation.algorithms,
            vec![Algorithm::ES256]
        );
    }

    #[test]
    fn short_rsa_keys_and_non_documents_are_refused() {
        let doc =
            serde_json::json!({"keys": [{"kty": "RSA", "n": "AQAB", "e": "AQAB", "kid": "small"}]});
        assert!(parse_key_set(doc.to_string().as_bytes(), &template())
            .unwrap()
            .is_empty());
        assert!(parse_key_set(b"<html>", &template()).is_err());
    }
}

//! Typed configuration: defaults, then an optional TOML file, then `GATEWAY_*`
//! environment variables (which win). Everything is validated here, before anything
//! starts, so a bad value stops the process with a message that names its key.

use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Most regions a gateway fronts: a request's set of tried regions is one 64-bit word
/// ([`crate::routing::Tried`]).
pub const MAX_REGIONS: usize = 64;

/// A configuration error; `main` prints it and exits with `EX_USAGE` (64).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("configuration: {0}")]
    Load(#[from] config::ConfigError),
    #[error("configuration key `{key}`: {message}")]
    Invalid { key: &'static str, message: String },
}

fn invalid(key: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key,
        message: message.into(),
    }
}

/// Which regions may serve reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ReadPolicy {
    /// Reads go to the active region, like writes (read-your-writes).
    Active,
    /// Reads may go to any healthy region; the standby's read models may lag.
    Any,
}

/// The raw shape as deserialised; [`Config`] is the validated form.
#[derive(Debug, Deserialize)]
struct RawConfig {
    listen: String,
    regions: String,
    primary: Option<String>,
    state_dir: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    admin_token: Option<String>,
    node_token: Option<String>,
    /// GATEWAY_NODE_CA: the CA trusted for https:// regions (and no other).
    node_ca: Option<PathBuf>,
    /// GATEWAY_NODE_CLIENT_CERT, GATEWAY_NODE_CLIENT_KEY: presented to the nodes.
    node_client_cert: Option<PathBuf>,
    node_client_key: Option<PathBuf>,
    /// GATEWAY_HEALTH_INTERVAL_MS: probe period.
    health_interval_ms: u64,
    health_timeout_ms: u64,
    health_rise: u32,
    health_fall: u32,
    outlier_consecutive_failures: u32,
    /// GATEWAY_LEASE_MS: lease granted to the active region with every successful probe.
    lease_ms: u64,
    lease_margin_ms: u64,
    request_timeout_ms: u64,
    attempt_timeout_ms: u64,
    connect_timeout_ms: u64,
    max_body_bytes: u64,
    max_header_bytes: u64,
    rate_limit_per_sec: f64,
    rate_limit_burst: f64,
    read_policy: ReadPolicy,
    retry_budget_percent: u32,
    retry_min_concurrent: u32,
    switchover_timeout_ms: u64,
    shutdown_grace_ms: u64,
    workers: usize,
    auth_jwks: Option<String>,
    auth_issuer: Option<String>,
    auth_audience: Option<String>,
    auth_jwks_ca: Option<PathBuf>,
    auth_jwks_refresh_ms: u64,
    auth_jwks_min_refresh_ms: u64,
    max_connections: usize,
    max_connections_per_client: usize,
    header_read_timeout_ms: u64,
    idle_timeout_ms: u64,
    linger_ms: u64,
    linger_bytes: u64,
    /// GATEWAY_ID: this gateway's name among several.
    id: Option<String>,
    /// GATEWAY_ETCD_ENDPOINTS: set, failover control is shared through etcd.
    etcd_endpoints: Option<String>,
    etcd_prefix: String,
    etcd_lease_ttl_s: u64,
    etcd_timeout_ms: u64,
}

/// One upstream region as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionConfig {
    /// Region id, e.g. `a`.
    pub id: String,
    /// Base URL without a trailing slash, e.g. `http://127.0.0.1:8081`.
    pub url: String,
    /// `host:port` taken from `url`.
    pub authority: hyper::http::uri::Authority,
    /// `https://`: the gateway reaches the region over TLS (see [`NodeTls`]).
    pub tls: bool,
}

/// How the gateway reaches regions given as `https://`.
#[derive(Debug, Clone)]
pub struct NodeTls {
    /// PEM bundle of the CA(s) that signed the nodes' certificates: the only ones
    /// trusted (a pinned CA, not the system's roots).
    pub ca: PathBuf,
    /// Certificate chain and key (PEM) presented to nodes that require client
    /// certificates (mutual TLS).
    pub client: Option<(PathBuf, PathBuf)>,
}

/// Failover control shared by several gateways through etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdConfig {
    /// Client URLs of the cluster's members, e.g. `http://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Prefix of the keys the gateways share (`<prefix>/controller`, `<prefix>/epoch`), so
    /// several deployments can use one cluster.
    pub prefix: String,
    /// TTL of the controller's etcd lease. etcd counts whole seconds and raises a TTL
    /// below 1.5 of its election timeout.
    pub lease_ttl: Duration,
    /// Timeout of one request to one etcd member.
    pub timeout: Duration,
}

/// The validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub regions: Vec<RegionConfig>,
    /// Made active at the first start when no region holds an epoch yet.
    pub primary: String,
    /// Where the epoch is persisted; `None` keeps it in memory only (tests, demos).
    pub state_dir: Option<PathBuf>,
    /// Certificate chain and key (PEM); both set means the listener speaks TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub admin_token: Option<String>,
    pub node_token: Option<String>,
    /// Set when a CA is configured for the nodes (required by any `https://` region).
    pub node_tls: Option<NodeTls>,
    pub health_interval: Duration,
    pub health_timeout: Duration,
    /// Consecutive successful probes that make an unhealthy region healthy again.
    pub health_rise: u32,
    /// Consecutive failed probes that make a healthy region unhealthy.
    pub health_fall: u32,
    /// Consecutive failed requests (connect errors, 5xx, timeouts) that eject a region
    /// before its probes notice.
    pub outlier_consecutive_failures: u32,
    pub lease: Duration,
    /// Added to the lease before a promotion, for clock-rate differences and scheduling.
    pub lease_margin: Duration,
    /// The whole request's deadline, across retries and waiting for a failover.
    pub request_timeout: Duration,
    /// One attempt's deadline; a hung region costs at most this before a safe retry.
    pub attempt_timeout: Duration,
    pub connect_timeout: Duration,
    pub max_body_bytes: u64,
    pub max_header_bytes: usize,
    /// Requests per second per client (its token's `sub` with auth on, else its
    /// address); 0 disables the limit.
    pub rate_limit_per_sec: f64,
    pub rate_limit_burst: f64,
    pub read_policy: ReadPolicy,
    pub retry_budget_percent: u32,
    pub retry_min_concurrent: u32,
    /// How long a planned switchover waits for replication to catch up.
    pub switchover_timeout: Duration,
    pub shutdown_grace: Duration,
    /// Worker threads, each with its own listener and runtime; 0 in the file or the
    /// environment means one per core.
    pub workers: usize,
    /// OAuth2 resource server settings; `None` (no JWKS configured) leaves every
    /// public route open, the local default.
    pub auth: Option<AuthConfig>,
    pub connections: ConnectionLimits,
    /// This gateway's name (`GATEWAY_ID`, default the host name): sent to the nodes
    /// with every control call and stored in etcd while it controls failover.
    pub id: String,
    /// `None`: this gateway alone controls failover, its epoch in `state_dir`.
    pub etcd: Option<EtcdConfig>,
}

/// Where the JSON Web Key Set comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JwksSource {
    File(PathBuf),
    /// An `https://` URL; plain `http://` is refused, as anyone on the path could
    /// then hand the gateway their own keys.
    Url(String),
}

/// How access tokens are checked (API.md "Security").
#[derive(Debug, Clone)]
pub struct AuthConfig {
    pub jwks: JwksSource,
    /// The `iss` every token must carry.
    pub issuer: String,
    /// The `aud` every token must carry (one of its values, when it is a list).
    pub audience: String,
    /// PEM file of the CA(s) trusted for an `https://` JWKS; unset: the public web roots.
    pub jwks_ca: Option<PathBuf>,
    /// The key set is fetched again this often, so removed keys stop working.
    pub jwks_refresh: Duration,
    /// A token naming an unknown `kid` triggers a fetch at most this often, so a flood
    /// of made-up key ids cannot hammer the JWKS server.
    pub jwks_min_refresh: Duration,
}

/// Connection-level defences (slowloris, idle floods, bodies sent on after a refusal).
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open client connections across all workers; past it the longest-idle one is
    /// closed to make room, or the newcomer when none is idle.
    pub max_connections: usize,
    /// Open connections from one client address; 0 turns the check off.
    pub max_per_client: usize,
    /// A request head (and, on HTTP/1.1, the wait for the next one on a kept-alive
    /// connection: hyper has one timer for both) must arrive within this; also a
    /// connection that has sent nothing yet.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2 too).
    pub idle_timeout: Duration,
    /// After answering a request whose body was not read (413, 401, ...), how long the
    /// gateway goes on reading and discarding what the client still sends, so that the
    /// client reads the answer instead of a connection reset (nginx's lingering close).
    pub linger: Duration,
    /// ... and at most this many bytes.
    pub linger_bytes: u64,
}

impl Config {
    /// Loads defaults, the optional file, then the environment (`GATEWAY_` prefix).
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder()
            .set_default("listen", "127.0.0.1:8080")?
            .set_default("regions", "")?
            .set_default("health_interval_ms", 200)?
            .set_default("health_timeout_ms", 100)?
            .set_default("health_rise", 2)?
            .set_default("health_fall", 2)?
            .set_default("outlier_consecutive_failures", 5)?
            .set_default("lease_ms", 600)?
            .set_default("lease_margin_ms", 50)?
            .set_default("request_timeout_ms", 10_000)?
            .set_default("attempt_timeout_ms", 1_000)?
            .set_default("connect_timeout_ms", 200)?
            .set_default("max_body_bytes", 1_048_576)?
            .set_default("max_header_bytes", 16_384)?
            .set_default("rate_limit_per_sec", 1000.0)?
            .set_default("rate_limit_burst", 2000.0)?
            .set_default("read_policy", "active")?
            .set_default("retry_budget_percent", 20)?
            .set_default("retry_min_concurrent", 3)?
            .set_default("switchover_timeout_ms", 5_000)?
            .set_default("shutdown_grace_ms", 5_000)?
            .set_default("workers", 0)?
            .set_default("auth_jwks_refresh_ms", 300_000)?
            .set_default("auth_jwks_min_refresh_ms", 10_000)?
            .set_default("max_connections", 10_000)?
            .set_default("max_connections_per_client", 1_000)?
            .set_default("header_read_timeout_ms", 30_000)?
            .set_default("idle_timeout_ms", 60_000)?
            .set_default("linger_ms", 30_000)?
            .set_default("linger_bytes", 64 * 1024 * 1024)?
            .set_default("etcd_prefix", "/tandem")?
            .set_default("etcd_lease_ttl_s", 1)?
            .set_default("etcd_timeout_ms", 500)?;
        if let Some(path) = file {
            builder = builder.add_source(config::File::from(path).format(config::FileFormat::Toml));
        }
        builder = builder.add_source(
            config::Environment::with_prefix("GATEWAY")
                .prefix_separator("_")
                .separator("__"),
        );
        let raw: RawConfig = builder.build()?.try_deserialize()?;
        Config::validate(raw)
    }

    fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
        let listen: SocketAddr = raw
            .listen
            .parse()
            .map_err(|e| invalid("listen", format!("{:?} is not an address: {e}", raw.listen)))?;
        let regions = parse_regions(&raw.regions)?;
        let primary = match raw.primary {
            Some(p) if !p.is_empty() => p,
            _ => regions[0].id.clone(),
        };
        if !regions.iter().any(|r| r.id == primary) {
            return Err(invalid(
                "primary",
                format!("{primary:?} is not one of the configured regions"),
            ));
        }
        let tls = match (raw.tls_cert, raw.tls_key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid("tls_key", "tls_cert is set but tls_key is not"))
            }
            (None, Some(_)) => {
                return Err(invalid("tls_cert", "tls_key is set but tls_cert is not"))
            }
        };
        let path = |p: Option<PathBuf>| p.filter(|p| !p.as_os_str().is_empty());
        let node_client = match (path(raw.node_client_cert), path(raw.node_client_key)) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            (Some(_), None) => {
                return Err(invalid(
                    "node_client_key",
                    "node_client_cert is set but node_client_key is not",
                ))
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "node_client_cert",
                    "node_client_key is set but node_client_cert is not",
                ))
            }
        };
        let node_tls = match path(raw.node_ca) {
            Some(ca) => Some(NodeTls {
                ca,
                client: node_client,
            }),
            None if node_client.is_some() => {
                return Err(invalid(
                    "node_ca",
                    "a client certificate for the nodes is set but node_ca is not: \
                     the nodes must be reached over https:// with a pinned CA",
                ))
            }
            None => None,
        };
        if let Some(r) = regions.iter().find(|r| r.tls) {
            if node_tls.is_none() {
                return Err(invalid(
                    "node_ca",
                    format!(
                        "region {:?} is https://: set node_ca (GATEWAY_NODE_CA) to the CA that \
                         signed the nodes' certificates",
                        r.id
                    ),
                ));
            }
        }
        let positive = |key: &'static str, v: u64| {
            if v == 0 {
                Err(invalid(key, "must be greater than 0"))
            } else {
                Ok(Duration::from_millis(v))
            }
        };
        if raw.health_rise == 0 {
            return Err(invalid("health_rise", "must be at least 1"));
        }
        if raw.health_fall == 0 {
            return Err(invalid("health_fall", "must be at least 1"));
        }
        if raw.health_timeout_ms >= raw.lease_ms {
            return Err(invalid(
                "health_timeout_ms",
                "must be shorter than lease_ms",
            ));
        }
        if raw.health_interval_ms >= raw.lease_ms {
            return Err(invalid(
                "health_interval_ms",
                "must be shorter than lease_ms, or the lease lapses between renewals",
            ));
        }
        if raw.rate_limit_per_sec.is_nan() || raw.rate_limit_per_sec < 0.0 {
            return Err(invalid("rate_limit_per_sec", "must be 0 (off) or positive"));
        }
        if raw.rate_limit_per_sec > 0.0
            && (raw.rate_limit_burst.is_nan() || raw.rate_limit_burst < 1.0)
        {
            return Err(invalid("rate_limit_burst", "must be at least 1"));
        }
        if raw.retry_budget_percent > 100 {
            return Err(invalid("retry_budget_percent", "must be between 0 and 100"));
        }
        let empty_is_none = |s: Option<String>| s.filter(|s| !s.is_empty());
        let auth = match empty_is_none(raw.auth_jwks) {
            None => None,
            Some(jwks) => Some(AuthConfig {
                jwks: parse_jwks_source(&jwks)?,
                issuer: empty_is_none(raw.auth_issuer).ok_or_else(|| {
                    invalid(
                        "auth_issuer",
                        "required when auth_jwks is set (the tokens' `iss`)",
                    )
                })?,
                audience: empty_is_none(raw.auth_audience).ok_or_else(|| {
                    invalid(
                        "auth_audience",
                        "required when auth_jwks is set (the tokens' `aud`)",
                    )
                })?,
                jwks_ca: raw.auth_jwks_ca.filter(|p| !p.as_os_str().is_empty()),
                jwks_refresh: positive("auth_jwks_refresh_ms", raw.auth_jwks_refresh_ms)?,
                jwks_min_refresh: positive(
                    "auth_jwks_min_refresh_ms",
                    raw.auth_jwks_min_refresh_ms,
                )?,
            }),
        };
        if raw.max_connections == 0 {
            return Err(invalid("max_connections", "must be at least 1"));
        }
        let connections = ConnectionLimits {
            max_connections: raw.max_connections,
            max_per_client: raw.max_connections_per_client,
            header_read_timeout: positive("header_read_timeout_ms", raw.header_read_timeout_ms)?,
            idle_timeout: positive("idle_timeout_ms", raw.idle_timeout_ms)?,
            linger: Duration::from_millis(raw.linger_ms),
            linger_bytes: raw.linger_bytes,
        };
        let id = match empty_is_none(raw.id) {
            Some(id) => id,
            None => hostname(),
        };
        let id_ok = id.len() <= 64
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
        if !id_ok {
            return Err(invalid("id", format!("{id:?}: use 1-64 of [A-Za-z0-9._-]")));
        }
        let etcd = match empty_is_none(raw.etcd_endpoints) {
            None => None,
            Some(list) => Some(parse_etcd(
                &list,
                raw.etcd_prefix,
                raw.etcd_lease_ttl_s,
                raw.etcd_timeout_ms,
            )?),
        };
        if let Some(etcd) = &etcd {
            // The controller clips the node lease it grants to its own etcd lease (minus
            // the renewal timeout and the margin); what is left must outlast two probe
            // periods, or the active region's lease lapses between renewals.
            let lease_timeout = Duration::from_millis(raw.health_timeout_ms.max(raw.lease_ms / 3));
            let left = etcd
                .lease_ttl
                .saturating_sub(lease_timeout + Duration::from_millis(raw.lease_margin_ms));
            if left < Duration::from_millis(2 * raw.health_interval_ms) {
                return Err(invalid(
                    "etcd_lease_ttl_s",
                    format!(
                        "{:?} leaves {left:?} of node lease after the renewal timeout \
                         ({lease_timeout:?}) and lease_margin_ms: need two probe periods",
                        etcd.lease_ttl
                    ),
                ));
            }
        }
        Ok(Config {
            listen,
            regions,
            primary,
            state_dir: raw.state_dir.filter(|p| !p.as_os_str().is_empty()),
            tls,
            admin_token: empty_is_none(raw.admin_token),
            node_token: empty_is_none(raw.node_token),
            node_tls,
            health_interval: positive("health_interval_ms", raw.health_interval_ms)?,
            health_timeout: positive("health_timeout_ms", raw.health_timeout_ms)?,
            health_rise: raw.health_rise,
            health_fall: raw.health_fall,
            outlier_consecutive_failures: raw.outlier_consecutive_failures.max(1),
            lease: positive("lease_ms", raw.lease_ms)?,
            lease_margin: Duration::from_millis(raw.lease_margin_ms),
            request_timeout: positive("request_timeout_ms", raw.request_timeout_ms)?,
            attempt_timeout: positive("attempt_timeout_ms", raw.attempt_timeout_ms)?,
            connect_timeout: positive("connect_timeout_ms", raw.connect_timeout_ms)?,
            max_body_bytes: raw.max_body_bytes,
            max_header_bytes: usize::try_from(raw.max_header_bytes)
                .map_err(|_| invalid("max_header_bytes", "too large"))?,
            rate_limit_per_sec: raw.rate_limit_per_sec,
            rate_limit_burst: raw.rate_limit_burst,
            read_policy: raw.read_policy,
            retry_budget_percent: raw.retry_budget_percent,
            retry_min_concurrent: raw.retry_min_concurrent,
            switchover_timeout: positive("switchover_timeout_ms", raw.switchover_timeout_ms)?,
            shutdown_grace: Duration::from_millis(raw.shutdown_grace_ms),
            workers: match raw.workers {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n if n > 256 => return Err(invalid("workers", "at most 256")),
                n => n,
            },
            auth,
            connections,
            id,
            etcd,
        })
    }

    /// How long a lease renewal may take. A node may check its peer's Redis while
    /// granting, which is slow when that Redis is down, so a third of the lease rather
    /// than the probe timeout; an unanswered renewal counts as running until then.
    pub fn lease_timeout(&self) -> Duration {
        self.health_timeout.max(self.lease / 3)
    }
}

/// The host's name, the default `GATEWAY_ID`.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "gateway".to_string())
}

/// Parses `http://127.0.0.1:2379,http://127.0.0.1:22379` and the other etcd settings.
fn parse_etcd(
    list: &str,
    prefix: String,
    lease_ttl_s: u64,
    timeout_ms: u64,
) -> Result<EtcdConfig, ConfigError> {
    let mut endpoints = Vec::new();
    for url in list.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        let rest = url
            .strip_prefix("http://")
            .or_else(|| url.strip_prefix("https://"))
            .ok_or_else(|| {
                invalid(
                    "etcd_endpoints",
                    format!("{url:?}: give http://host:port (or https://)"),
                )
            })?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(invalid(
                "etcd_endpoints",
                format!("{url:?}: give scheme and host:port only, no path"),
            ));
        }
        endpoints.push(url.trim_end_matches('/').to_string());
    }
    if endpoints.is_empty() {
        return Err(invalid("etcd_endpoints", "no endpoint given"));
    }
    let prefix = prefix.trim_end_matches('/').to_string();
    if !prefix.starts_with('/') {
        return Err(invalid(
            "etcd_prefix",
            format!("{prefix:?} must start with /"),
        ));
    }
    if !(1..=60).contains(&lease_ttl_s) {
        return Err(invalid("etcd_lease_ttl_s", "must be 1-60 seconds"));
    }
    let lease_ttl = Duration::from_secs(lease_ttl_s);
    let timeout = Duration::from_millis(timeout_ms);
    if timeout.is_zero() || timeout * 2 > lease_ttl {
        return Err(invalid(
            "etcd_timeout_ms",
            "must be above 0 and at most half of etcd_lease_ttl_s",
        ));
    }
    Ok(EtcdConfig {
        endpoints,
        prefix,
        lease_ttl,
        timeout,
    })
}

/// A path, or an `https://` URL.
fn parse_jwks_source(s: &str) -> Result<JwksSource, ConfigError> {
    let lower = s.to_ascii_lowercase();
    if lower.starts_with("https://") {
        return Ok(JwksSource::Url(s.to_string()));
    }
    if lower.contains("://") {
        return Err(invalid(
            "auth_jwks",
            format!("{s:?}: give a file path or an https:// URL (keys must not travel in clear)"),
        ));
    }
    Ok(JwksSource::File(PathBuf::from(s)))
}

/// Parses `a=http://127.0.0.1:8081,b=http://127.0.0.1:8082`.
fn parse_regions(s: &str) -> Result<Vec<RegionConfig>, ConfigError> {
    let mut out: Vec<RegionConfig> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, url) = part
            .split_once('=')
            .ok_or_else(|| invalid("regions", format!("{part:?} is not id=url")))?;
        let id = id.trim().to_string();
        let url = url.trim().trim_end_matches('/').to_string();
        let id_ok = !id.is_empty()
            && id.len() <= 32
            && id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !id_ok {
            return Err(invalid(
                "regions",
                format!("region id {id:?}: use 1-32 of [a-z0-9-]"),
            ));
        }
        let (authority, tls) = match url.split_once("://") {
            Some(("http", rest)) => (rest, false),
            Some(("https", rest)) => (rest, true),
            _ => {
                return Err(invalid(
                    "regions",
                    format!("{url:?}: give http:// or https:// (with node_ca) and host:port"),
                ))
            }
        };
        if authority.is_empty() || authority.contains('/') {
            return Err(invalid(
                "regions",
                format!("{url:?}: give scheme and host:port only, no path"),
            ));
        }
        let authority: hyper::http::uri::Authority = authority
            .parse()
            .map_err(|e| invalid("regions", format!("{url:?}: {e}")))?;
        if tls {
            internal_tls::server_name(authority.host())
                .map_err(|e| invalid("regions", format!("{url:?}: {e}")))?;
        }
        if out.iter().any(|r| r.id == id) {
            return Err(invalid("regions", format!("region {id:?} appears twice")));
        }
        out.push(RegionConfig {
            id,
            url,
            authority,
            tls,
        });
    }
    if out.len() > MAX_REGIONS {
        return Err(invalid(
            "regions",
            format!("at most {} regions", MAX_REGIONS),
        ));
    }
    if out.len() < 2 {
        return Err(invalid(
            "regions",
            "need at least two regions, e.g. a=http://127.0.0.1:8081,b=http://127.0.0.1:8082",
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_parse_and_reject_duplicates() {
        let r = parse_regions("a=http://127.0.0.1:1/, b=http://127.0.0.1:2").unwrap();
        assert_eq!(r[0].url, "http://127.0.0.1:1");
        assert_eq!(r[1].id, "b");
        assert!(parse_regions("a=http://x:1,a=http://x:2").is_err());
        assert!(parse_regions("a=https://x:1,b=http://x:2").unwrap()[0].tls);
        assert!(parse_regions("a=ftp://x:1,b=http://x:2").is_err());
        assert!(parse_regions("a=http://x:1").is_err());
    }

    #[test]
    fn jwks_is_a_path_or_an_https_url() {
        assert_eq!(
            parse_jwks_source("/etc/jwks.json").unwrap(),
            JwksSource::File("/etc/jwks.json".into())
        );
        assert!(matches!(
            parse_jwks_source("https://idp.example/jwks").unwrap(),
            JwksSource::Url(_)
        ));
        assert!(parse_jwks_source("http://idp.example/jwks").is_err());
    }

    #[test]
    fn etcd_endpoints_parse_and_bad_settings_name_their_key() {
        let e = parse_etcd(
            " http://127.0.0.1:2379/,https://e2:2379",
            "/tandem/".into(),
            1,
            250,
        )
        .unwrap();
        assert_eq!(e.endpoints, ["http://127.0.0.1:2379", "https://e2:2379"]);
        assert_eq!(e.prefix, "/tandem");
        let key = |r: Result<EtcdConfig, ConfigError>| match r {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            key(parse_etcd("127.0.0.1:2379", "/t".into(), 1, 250)),
            "etcd_endpoints"
        );
        assert_eq!(
            key(parse_etcd("http://h:1/v3", "/t".into(), 1, 250)),
            "etcd_endpoints"
        );
        assert_eq!(key(parse_etcd(",", "/t".into(), 1, 250)), "etcd_endpoints");
        assert_eq!(
            key(parse_etcd("http://h:1", "t".into(), 1, 250)),
            "etcd_prefix"
        );
        assert_eq!(
            key(parse_etcd("http://h:1", "/t".into(), 0, 250)),
            "etcd_lease_ttl_s"
        );
        assert_eq!(
            key(parse_etcd("http://h:1", "/t".into(), 1, 600)),
            "etcd_timeout_ms"
        );
    }
}

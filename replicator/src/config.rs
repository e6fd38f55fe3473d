//! Typed, layered configuration: serde defaults, then the optional TOML file given with
//! `--config`, then `REPLICATOR_*` environment variables, which win (API.md).
//!
//! Everything is validated here, before any task starts, so a typo fails fast with the
//! name of the key instead of as a connection error minutes later.

use eventlog::RegionId;
use serde::Deserialize;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Prefix of every environment variable; nested keys would use `__`.
pub const ENV_PREFIX: &str = "REPLICATOR";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The region this replicator writes into (it runs next to that region's Redis).
    pub local_region: RegionId,
    pub local_redis_url: String,
    /// The region it copies from, while that region is active.
    pub peer_region: RegionId,
    pub peer_redis_url: String,
    /// `/metrics`, `/health/live`, `/health/ready`. Port 0 picks a free port.
    #[serde(default = "defaults::listen")]
    pub listen: SocketAddr,
    /// Entries per XREAD and per pipelined write batch.
    #[serde(default = "defaults::batch_size")]
    pub batch_size: usize,
    /// Batches written to the local Redis before the replies to the first are read.
    #[serde(default = "defaults::write_depth")]
    pub write_depth: usize,
    /// How long one XREAD waits for new entries on the peer. Bounds how quickly the
    /// copier notices a role change or a newly discovered stream.
    #[serde(default = "defaults::block_ms")]
    pub block_ms: u64,
    /// How often both role records are read (the role gate).
    #[serde(default = "defaults::poll_interval_ms")]
    pub poll_interval_ms: u64,
    /// How often consumer-group state is compared and copied.
    #[serde(default = "defaults::group_interval_ms")]
    pub group_interval_ms: u64,
    /// How often the peer is scanned for new streams.
    #[serde(default = "defaults::discovery_interval_ms")]
    pub discovery_interval_ms: u64,
    /// How often lag metrics are refreshed.
    #[serde(default = "defaults::lag_interval_ms")]
    pub lag_interval_ms: u64,
    #[serde(default = "defaults::connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// A command that takes longer fails and its connection is replaced (a hung peer).
    #[serde(default = "defaults::response_timeout_ms")]
    pub response_timeout_ms: u64,
    /// Upper bound of the exponential backoff after failures.
    #[serde(default = "defaults::max_backoff_ms")]
    pub max_backoff_ms: u64,
    /// REPLICATOR_REDIS_CA: the CA (PEM bundle) trusted for `rediss://` URLs, the only
    /// one: both Redis links, the copier's own RESP connections included, are verified
    /// against it. Required when either URL is `rediss://`.
    #[serde(default)]
    pub redis_ca: Option<PathBuf>,
}

mod defaults {
    use std::net::SocketAddr;
    pub fn listen() -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], 9101))
    }
    pub fn batch_size() -> usize {
        500
    }
    pub fn write_depth() -> usize {
        2
    }
    pub fn block_ms() -> u64 {
        100
    }
    pub fn poll_interval_ms() -> u64 {
        100
    }
    pub fn group_interval_ms() -> u64 {
        10
    }
    pub fn discovery_interval_ms() -> u64 {
        1000
    }
    pub fn lag_interval_ms() -> u64 {
        500
    }
    pub fn connect_timeout_ms() -> u64 {
        1000
    }
    pub fn response_timeout_ms() -> u64 {
        2000
    }
    pub fn max_backoff_ms() -> u64 {
        2000
    }
}

/// Every key, for error messages that name the environment variable to fix.
const KEYS: &[&str] = &[
    "local_region",
    "local_redis_url",
    "peer_region",
    "peer_redis_url",
    "redis_ca",
    "listen",
    "batch_size",
    "write_depth",
    "block_ms",
    "poll_interval_ms",
    "group_interval_ms",
    "discovery_interval_ms",
    "lag_interval_ms",
    "connect_timeout_ms",
    "response_timeout_ms",
    "max_backoff_ms",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid configuration: {message}{hint}")]
    Invalid { message: String, hint: String },
}

impl ConfigError {
    fn new(message: impl Into<String>) -> ConfigError {
        let message = message.into();
        let hint = KEYS
            .iter()
            .find(|k| message.contains(*k))
            .map(|k| format!(" (set {} or `{k}` in the --config file)", env_name(k)))
            .unwrap_or_default();
        ConfigError::Invalid { message, hint }
    }
}

/// The environment variable for a key: `local_region` -> `REPLICATOR_LOCAL_REGION`.
pub fn env_name(key: &str) -> String {
    format!("{ENV_PREFIX}_{}", key.to_ascii_uppercase())
}

impl Config {
    /// Loads the TOML file (when given), then the process environment over it.
    pub fn load(file: Option<&Path>) -> Result<Config, ConfigError> {
        let env: Vec<(String, String)> = std::env::vars().collect();
        Config::load_from(file, env)
    }

    /// Like [`Config::load`] with an explicit environment, for tests.
    pub fn load_from(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut builder = config::Config::builder();
        if let Some(path) = file {
            if !path.exists() {
                return Err(ConfigError::new(format!(
                    "config file {} does not exist",
                    path.display()
                )));
            }
            builder = builder.add_source(
                config::File::from(path)
                    .format(config::FileFormat::Toml)
                    .required(true),
            );
        }
        let vars: std::collections::HashMap<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")) && k != "REPLICATOR_CONFIG")
            .collect();
        builder = builder.add_source(
            config::Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(vars)),
        );
        let raw = builder
            .build()
            .map_err(|e| ConfigError::new(e.to_string()))?;
        let config: Config = raw
            .try_deserialize()
            .map_err(|e| ConfigError::new(e.to_string()))?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.local_region == self.peer_region {
            return Err(ConfigError::new(format!(
                "local_region and peer_region are both {:?}: the replicator copies between two regions",
                self.local_region.as_str()
            )));
        }
        for (key, url) in [
            ("local_redis_url", &self.local_redis_url),
            ("peer_redis_url", &self.peer_redis_url),
        ] {
            // The copier speaks RESP2 over TCP (or TLS) itself (see `wire`).
            if let Err(e) = crate::wire::Endpoint::parse(url) {
                return Err(ConfigError::new(format!(
                    "{key} {url:?} is not a usable Redis URL: {e}"
                )));
            }
        }
        let redis_ca = self.redis_ca.as_ref().filter(|p| !p.as_os_str().is_empty());
        let tls = [&self.local_redis_url, &self.peer_redis_url]
            .iter()
            .any(|u| u.starts_with("rediss://"));
        match (tls, redis_ca) {
            (true, None) => return Err(ConfigError::new(
                "redis_ca is required with a rediss:// URL: the CA that signed Redis' certificate",
            )),
            (false, Some(_)) => {
                return Err(ConfigError::new(
                    "redis_ca is set but neither Redis URL is rediss:// (TLS)",
                ))
            }
            _ => {}
        }
        if let Err(e) = self.redis_tls() {
            return Err(ConfigError::new(format!("redis_ca: {e}")));
        }
        if self.local_redis_url == self.peer_redis_url {
            return Err(ConfigError::new(
                "local_redis_url and peer_redis_url are the same: a region cannot copy into itself",
            ));
        }
        if self.write_depth == 0 || self.write_depth > 64 {
            return Err(ConfigError::new("write_depth must be between 1 and 64"));
        }
        if self.batch_size == 0 || self.batch_size > 100_000 {
            return Err(ConfigError::new("batch_size must be between 1 and 100000"));
        }
        for (key, v) in [
            ("block_ms", self.block_ms),
            ("poll_interval_ms", self.poll_interval_ms),
            ("group_interval_ms", self.group_interval_ms),
            ("discovery_interval_ms", self.discovery_interval_ms),
            ("lag_interval_ms", self.lag_interval_ms),
            ("connect_timeout_ms", self.connect_timeout_ms),
            ("response_timeout_ms", self.response_timeout_ms),
            ("max_backoff_ms", self.max_backoff_ms),
        ] {
            if v == 0 {
                return Err(ConfigError::new(format!("{key} must be greater than 0")));
            }
        }
        if self.response_timeout_ms <= self.block_ms {
            return Err(ConfigError::new(
                "response_timeout_ms must be greater than block_ms (a blocking XREAD would time out)",
            ));
        }
        Ok(())
    }

    /// REPLICATOR_REDIS_CA as a PEM file setting.
    pub fn redis_ca(&self) -> Option<internal_tls::PemFile<'_>> {
        self.redis_ca
            .as_deref()
            .filter(|p| !p.as_os_str().is_empty())
            .map(|p| internal_tls::PemFile::new("REPLICATOR_REDIS_CA", p))
    }

    /// The copier's TLS client for `rediss://` (see `wire`), trusting only the CA.
    pub fn redis_tls(&self) -> Result<Option<internal_tls::TlsConnector>, internal_tls::TlsError> {
        self.redis_ca()
            .map(|ca| {
                internal_tls::client_config(ca, None)
                    .map(|c| internal_tls::TlsConnector::from(std::sync::Arc::new(c)))
            })
            .transpose()
    }

    pub fn connect_timeout(&self) -> Duration {
        Duration::from_millis(self.connect_timeout_ms)
    }
    pub fn response_timeout(&self) -> Duration {
        Duration::from_millis(self.response_timeout_ms)
    }
    pub fn max_backoff(&self) -> Duration {
        Duration::from_millis(self.max_backoff_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const BASE: &[(&str, &str)] = &[
        ("REPLICATOR_LOCAL_REGION", "b"),
        ("REPLICATOR_LOCAL_REDIS_URL", "redis://127.0.0.1:7001"),
        ("REPLICATOR_PEER_REGION", "a"),
        ("REPLICATOR_PEER_REDIS_URL", "redis://127.0.0.1:7000"),
    ];

    #[test]
    fn env_vars_with_defaults() {
        let c = Config::load_from(None, env(BASE)).unwrap();
        assert_eq!(c.local_region.as_str(), "b");
        assert_eq!(c.listen.to_string(), "127.0.0.1:9101");
        assert_eq!(c.batch_size, 500);
    }

    #[test]
    fn env_overrides_numbers() {
        let mut e = env(BASE);
        e.push(("REPLICATOR_BATCH_SIZE".into(), "50".into()));
        e.push(("REPLICATOR_LISTEN".into(), "127.0.0.1:0".into()));
        let c = Config::load_from(None, e).unwrap();
        assert_eq!(c.batch_size, 50);
        assert_eq!(c.listen.port(), 0);
    }

    #[test]
    fn missing_key_names_the_env_var() {
        let e = env(&BASE[1..]);
        let msg = Config::load_from(None, e).unwrap_err().to_string();
        assert!(msg.contains("REPLICATOR_LOCAL_REGION"), "{msg}");
    }

    #[test]
    fn bad_region_is_rejected() {
        let mut e = env(&BASE[1..]);
        e.push(("REPLICATOR_LOCAL_REGION".into(), "B!".into()));
        let msg = Config::load_from(None, e).unwrap_err().to_string();
        assert!(msg.contains("REPLICATOR_LOCAL_REGION"), "{msg}");
    }

    #[test]
    fn only_plain_tcp_urls_are_accepted() {
        let mut e = env(BASE);
        e.push((
            "REPLICATOR_PEER_REDIS_URL".into(),
            "unix:///tmp/redis.sock".into(),
        ));
        let msg = Config::load_from(None, e).unwrap_err().to_string();
        assert!(msg.contains("REPLICATOR_PEER_REDIS_URL"), "{msg}");
    }

    #[test]
    fn toml_file_then_env() {
        let dir = std::env::temp_dir().join(format!("replicator-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("replicator.toml");
        std::fs::write(
            &file,
            "local_region = \"b\"\nlocal_redis_url = \"redis://127.0.0.1:7001\"\npeer_region = \"a\"\npeer_redis_url = \"redis://127.0.0.1:7000\"\nbatch_size = 70\n",
        )
        .unwrap();
        let c = Config::load_from(Some(&file), env(&[("REPLICATOR_BATCH_SIZE", "80")])).unwrap();
        assert_eq!(c.batch_size, 80);
        assert_eq!(c.peer_redis_url, "redis://127.0.0.1:7000");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn same_region_is_rejected() {
        let mut e = env(BASE);
        e.push(("REPLICATOR_PEER_REGION".into(), "b".into()));
        assert!(Config::load_from(None, e).is_err());
    }
}

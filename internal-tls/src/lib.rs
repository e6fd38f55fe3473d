//! TLS for the links inside the system (gateway -> node, node and replicator ->
//! Redis), with rustls and its `ring` provider, the one the gateway's public listener
//! already uses.
//!
//! # Layout
//! - [`files`]: certificates, keys and CA bundles read from PEM files; errors name the
//!   setting that pointed at the file.
//! - [`client_config`] / [`server_config`]: a client that trusts only a pinned CA (and
//!   may present a certificate), a server that may require one.
//! - [`stream`]: a connection that is plain or TLS, chosen at connect time.
//! - `redis_client` (feature `redis`): a redis-rs client for `redis://` or `rediss://`.
#![forbid(unsafe_code)]

pub mod files;
pub mod stream;

use std::sync::Arc;
use tokio_rustls::rustls;
use tokio_rustls::rustls::server::WebPkiClientVerifier;

pub use files::{certificates, private_key, roots, PemFile};
pub use rustls_pki_types::ServerName;
pub use stream::MaybeTls;
pub use tokio_rustls::{TlsAcceptor, TlsConnector};

/// What went wrong building a TLS configuration.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file that cannot be read or holds nothing usable; `setting` names the
    /// variable that pointed at it.
    #[error("{setting} {path}: {message}")]
    File {
        setting: &'static str,
        path: String,
        message: String,
    },
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    #[error("client certificate verification: {0}")]
    Verifier(String),
}

/// The provider every configuration here is built with.
pub fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Makes `ring` the process-wide default provider, for libraries that build their own
/// rustls configuration with `ClientConfig::builder()` (redis-rs does). Idempotent.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}

/// A client certificate and its key, presented for mutual TLS.
#[derive(Debug, Clone)]
pub struct Identity<'a> {
    pub cert: PemFile<'a>,
    pub key: PemFile<'a>,
}

/// A client that trusts only the CA(s) in `ca` (not the system's roots: a pinned CA)
/// and presents `identity` when the server asks for one.
pub fn client_config(
    ca: PemFile<'_>,
    identity: Option<Identity<'_>>,
) -> Result<rustls::ClientConfig, TlsError> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots(ca)?);
    let mut config = match identity {
        Some(id) => builder.with_client_auth_cert(certificates(id.cert)?, private_key(id.key)?)?,
        None => builder.with_no_client_auth(),
    };
    // Internal links speak HTTP/1.1 (or RESP); no ALPN negotiation needed.
    config.alpn_protocols = Vec::new();
    Ok(config)
}

/// A server presenting `cert`/`key`; with `client_ca`, every client must present a
/// certificate that CA signed, or the handshake fails (nothing reaches the
/// application, admin endpoints included).
pub fn server_config(
    cert: PemFile<'_>,
    key: PemFile<'_>,
    client_ca: Option<PemFile<'_>>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, TlsError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?;
    let builder = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots(ca)?), provider())
                    .build()
                    .map_err(|e| TlsError::Verifier(e.to_string()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certificates(cert)?, private_key(key)?)?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

/// The name a server's certificate must carry: the host of `host` (an IP address or a
/// DNS name, as given in the URL).
pub fn server_name(host: &str) -> Result<ServerName<'static>, String> {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    ServerName::try_from(host.to_string()).map_err(|e| format!("{host:?}: {e}"))
}

/// A redis-rs client for `url`. A `rediss://` URL with `ca` trusts only that CA;
/// without it, the system's roots. `ca` with a `redis://` URL is refused, as the
/// operator evidently meant the link to be encrypted.
#[cfg(feature = "redis")]
pub fn redis_client(url: &str, ca: Option<PemFile<'_>>) -> Result<redis::Client, String> {
    let tls = url.starts_with("rediss://");
    match (tls, ca) {
        (true, Some(ca)) => {
            // redis-rs reads the PEM bytes itself; read them here so a bad file is
            // reported with the setting's name.
            roots(ca).map_err(|e| e.to_string())?;
            let pem = std::fs::read(ca.path)
                .map_err(|e| format!("{} {}: {e}", ca.setting, ca.path.display()))?;
            install_default_provider();
            redis::Client::build_with_tls(
                url,
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(pem),
                },
            )
            .map_err(|e| e.to_string())
        }
        (false, Some(ca)) => Err(format!(
            "{} is set but the Redis URL is not rediss:// (TLS): use rediss://",
            ca.setting
        )),
        (tls, None) => {
            if tls {
                install_default_provider();
            }
            redis::Client::open(url).map_err(|e| e.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn server_names_are_hosts_as_given_in_urls() {
        assert!(server_name("localhost").is_ok());
        assert!(server_name("127.0.0.1").is_ok());
        assert!(server_name("[::1]").is_ok());
        assert!(server_name("not a host").is_err());
    }

    #[test]
    fn pem_errors_name_the_setting_and_the_file() {
        let missing = Path::new("/nonexistent/ca.pem");
        let e = client_config(PemFile::new("NODE_REDIS_CA", missing), None).unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.starts_with("NODE_REDIS_CA /nonexistent/ca.pem"),
            "{msg}"
        );
    }

    #[cfg(feature = "redis")]
    #[test]
    fn a_redis_ca_with_a_plain_url_is_refused() {
        let ca = PemFile::new("REPLICATOR_REDIS_CA", Path::new("/nonexistent/ca.pem"));
        let e = redis_client("redis://127.0.0.1:1", Some(ca)).unwrap_err();
        assert!(
            e.contains("REPLICATOR_REDIS_CA") && e.contains("rediss://"),
            "{e}"
        );
        assert!(redis_client("rediss://127.0.0.1:1", None).is_ok());
    }
}

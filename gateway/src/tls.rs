//! TLS with rustls, both ways: the public listener (certificate chain and key from PEM
//! files, ALPN offering HTTP/2 and HTTP/1.1), and the client side of `https://`
//! regions (a pinned CA, a client certificate for nodes that require one). The PEM
//! handling is the `internal-tls` crate's, shared with the node and the replicator.

use crate::config::NodeTls;
use internal_tls::PemFile;
use std::path::Path;
use std::sync::Arc;
use tokio_rustls::rustls::ClientConfig;
use tokio_rustls::TlsAcceptor;

pub use internal_tls::TlsError;

/// Builds the acceptor; fails with a message naming the bad file.
pub fn acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    let config = internal_tls::server_config(
        PemFile::new("GATEWAY_TLS_CERT", cert),
        PemFile::new("GATEWAY_TLS_KEY", key),
        None,
        &[b"h2", b"http/1.1"],
    )?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The client for `https://` regions: trusts only GATEWAY_NODE_CA and presents
/// GATEWAY_NODE_CLIENT_CERT when a node asks for a certificate. Shared by the proxy's
/// pools and the health and control calls, so probes test the very link requests use.
pub fn node_client(tls: &NodeTls) -> Result<Arc<ClientConfig>, TlsError> {
    let identity = tls
        .client
        .as_ref()
        .map(|(cert, key)| internal_tls::Identity {
            cert: PemFile::new("GATEWAY_NODE_CLIENT_CERT", cert),
            key: PemFile::new("GATEWAY_NODE_CLIENT_KEY", key),
        });
    let config = internal_tls::client_config(PemFile::new("GATEWAY_NODE_CA", &tls.ca), identity)?;
    Ok(Arc::new(config))
}

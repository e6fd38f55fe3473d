//! PEM files: certificate chains, private keys, CA bundles.

use crate::TlsError;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use tokio_rustls::rustls::RootCertStore;

/// A PEM file and the setting that named it (for error messages).
#[derive(Debug, Clone, Copy)]
pub struct PemFile<'a> {
    pub setting: &'static str,
    pub path: &'a Path,
}

impl<'a> PemFile<'a> {
    pub fn new(setting: &'static str, path: &'a Path) -> PemFile<'a> {
        PemFile { setting, path }
    }

    fn error(&self, message: impl ToString) -> TlsError {
        TlsError::File {
            setting: self.setting,
            path: self.path.display().to_string(),
            message: message.to_string(),
        }
    }
}

/// Every certificate in the file, in order (a chain: leaf first).
pub fn certificates(file: PemFile<'_>) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(file.path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| file.error(e))?;
    if certs.is_empty() {
        return Err(file.error("no certificate found"));
    }
    Ok(certs)
}

/// The first private key in the file (PKCS#8, PKCS#1 or SEC1).
pub fn private_key(file: PemFile<'_>) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(file.path).map_err(|e| file.error(e))
}

/// A trust store holding exactly the certificates of the file.
pub fn roots(file: PemFile<'_>) -> Result<RootCertStore, TlsError> {
    let mut store = RootCertStore::empty();
    for cert in certificates(file)? {
        store
            .add(cert)
            .map_err(|e| file.error(format!("not a usable CA certificate: {e}")))?;
    }
    Ok(store)
}

//! A test identity provider: key pairs made in the test with openssl(1), their JWKS
//! (RFC 7517) written to a file or served over HTTPS by [`JwksServer`], and access
//! tokens signed with them — good ones and every kind of forgery a test needs.
//!
//! - [`SigningKey`]: an RSA (RS256) or EC P-256 (ES256) key pair with a `kid`.
//! - [`claims`]: a token's claims for a subject and scopes, valid for an hour.
//! - [`JwksServer`]: HTTPS on a free port with a test CA's certificate, serving
//!   whatever key set the test sets, and counting fetches.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// The issuer and audience the tests configure the gateway with.
pub const ISSUER: &str = "https://idp.tandem.test/";
pub const AUDIENCE: &str = "tandem-api";

/// A key pair the test signs with; `jwk` is its public half as a JWKS entry.
#[derive(Clone)]
pub struct SigningKey {
    pub kid: String,
    pub algorithm: Algorithm,
    pub encoding: EncodingKey,
    pub jwk: Value,
    /// The public key in PEM, for algorithm-confusion attempts.
    pub public_pem: Vec<u8>,
}

/// Runs `openssl args` in `dir`; its stdout. Panics with openssl's stderr when it fails.
pub(crate) fn openssl(dir: &Path, args: &[&str]) -> Vec<u8> {
    let out = std::process::Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// Writes a fresh EC P-256 private key (SEC1 PEM) to `file` in `dir`.
pub(crate) fn ec_p256_key(dir: &Path, file: &str) {
    openssl(
        dir,
        &[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            file,
        ],
    );
}

impl SigningKey {
    /// A fresh 2048-bit RSA key pair (RS256), files in `dir`.
    pub fn rsa(dir: &Path, kid: &str) -> SigningKey {
        let private = format!("{kid}.rsa.pem");
        openssl(dir, &["genrsa", "-traditional", "-out", &private, "2048"]);
        let modulus = String::from_utf8(openssl(
            dir,
            &["rsa", "-in", &private, "-noout", "-modulus"],
        ))
        .expect("utf-8");
        let hex = modulus.trim().trim_start_matches("Modulus=");
        let n: Vec<u8> = (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).expect("hex modulus"))
            .collect();
        let public_pem = openssl(dir, &["rsa", "-in", &private, "-pubout"]);
        let pem = std::fs::read(dir.join(&private)).expect("read key");
        SigningKey {
            kid: kid.into(),
            algorithm: Algorithm::RS256,
            encoding: EncodingKey::from_rsa_pem(&pem).expect("RSA key"),
            jwk: json!({
                "kty": "RSA", "use": "sig", "alg": "RS256", "kid": kid,
                "n": URL_SAFE_NO_PAD.encode(n), "e": "AQAB",
            }),
            public_pem,
        }
    }

    /// A fresh EC P-256 key pair (ES256), files in `dir`.
    pub fn ec(dir: &Path, kid: &str) -> SigningKey {
        let sec1 = format!("{kid}.ec.pem");
        let pkcs8 = format!("{kid}.ec8.pem");
        ec_p256_key(dir, &sec1);
        openssl(
            dir,
            &["pkcs8", "-topk8", "-nocrypt", "-in", &sec1, "-out", &pkcs8],
        );
        // The SubjectPublicKeyInfo of a P-256 key ends with the point 04 || x || y.
        let der = openssl(dir, &["ec", "-in", &sec1, "-pubout", "-outform", "DER"]);
        let point = &der[der.len() - 65..];
        assert_eq!(point[0], 4, "uncompressed point");
        let public_pem = openssl(dir, &["ec", "-in", &sec1, "-pubout"]);
        let pem = std::fs::read(dir.join(&pkcs8)).expect("read key");
        SigningKey {
            kid: kid.into(),
            algorithm: Algorithm::ES256,
            encoding: EncodingKey::from_ec_pem(&pem).expect("EC key"),
            jwk: json!({
                "kty": "EC", "use": "sig", "alg": "ES256", "kid": kid, "crv": "P-256",
                "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
                "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            }),
            public_pem,
        }
    }

    /// A token with these claims, signed by this key and naming its kid.
    pub fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// Signed by this key but naming `kid` (another key's id, or an unknown one).
    pub fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(self.algorithm);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, claims, &self.encoding).expect("sign token")
    }
}

/// `{"keys":[...]}` of the given keys.
pub fn jwks(keys: &[&SigningKey]) -> Value {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() })
}

/// Writes a key set to `path` atomically (write, then rename), as a deploy would.
pub fn write_jwks(path: &Path, keys: &[&SigningKey]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, jwks(keys).to_string()).expect("write jwks");
    std::fs::rename(&tmp, path).expect("rename jwks");
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

/// Valid claims: our issuer and audience, issued now, expiring in an hour.
pub fn claims(sub: &str, scope: &str) -> Value {
    let now = now();
    json!({
        "iss": ISSUER, "aud": AUDIENCE, "sub": sub, "scope": scope,
        "iat": now, "nbf": now, "exp": now + 3600,
    })
}

/// base64url of a JSON value, for hand-made (unsigned or forged) tokens.
pub fn b64(v: &Value) -> String {
    URL_SAFE_NO_PAD.encode(v.to_string())
}

/// An unsigned token: `alg: none`.
pub fn unsigned_token(kid: &str, claims: &Value) -> String {
    format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT", "kid": kid})),
        b64(claims)
    )
}

/// HS256 "signed" with `secret` (e.g. the RSA public key), naming `kid`: the classic
/// algorithm-confusion forgery.
pub fn hmac_token(kid: &str, secret: &[u8], claims: &Value) -> String {
    let mut header = Header::new(Algorithm::HS256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, claims, &EncodingKey::from_secret(secret)).expect("sign")
}

/// `token` with its payload replaced by `claims` and the original signature kept.
pub fn tampered(token: &str, claims: &Value) -> String {
    let parts: Vec<&str> = token.split('.').collect();
    format!("{}.{}.{}", parts[0], b64(claims), parts[2])
}

/// HTTPS server of a JWKS for the gateway to fetch, with a certificate from a test CA.
pub struct JwksServer {
    port: u16,
    body: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    ca: PathBuf,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    /// Serves `keys` at `/jwks.json`; certificates are made in `dir`.
    pub async fn start(dir: &Path, keys: &[&SigningKey]) -> JwksServer {
        use rustls_pki_types::pem::PemObject;
        use rustls_pki_types::{CertificateDer, PrivateKeyDer};
        use tokio_rustls::rustls;

        let (ca, cert, key) = crate::gateway::test_certificates(dir);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert)
            .expect("cert file")
            .collect::<Result<_, _>>()
            .expect("cert");
        let key = PrivateKeyDer::from_pem_file(&key).expect("key");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocols")
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .expect("server config");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let body = Arc::new(Mutex::new(jwks(keys).to_string()));
        let fetches = Arc::new(AtomicUsize::new(0));
        let (b, f) = (body.clone(), fetches.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (acceptor, body, fetches) = (acceptor.clone(), b.clone(), f.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(stream).await else {
                        return;
                    };
                    let mut head = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                        if head.len() > 16 * 1024 {
                            return;
                        }
                    }
                    fetches.fetch_add(1, Ordering::SeqCst);
                    let text = body.lock().expect("lock").clone();
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{text}",
                        text.len()
                    );
                    let _ = tls.write_all(resp.as_bytes()).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        JwksServer {
            port,
            body,
            fetches,
            ca,
            task,
        }
    }

    /// `https://127.0.0.1:<port>/jwks.json` (the certificate names 127.0.0.1).
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}/jwks.json", self.port)
    }

    /// The test CA's certificate, for `GATEWAY_AUTH_JWKS_CA`.
    pub fn ca(&self) -> &Path {
        &self.ca
    }

    /// Serves another key set from now on.
    pub fn set_keys(&self, keys: &[&SigningKey]) {
        *self.body.lock().expect("lock") = jwks(keys).to_string();
    }

    /// How many times the key set was fetched.
    pub fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

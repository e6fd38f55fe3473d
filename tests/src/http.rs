//! A small HTTP client for driving the binaries: every call returns status, headers and
//! the body parsed as JSON (`Value::Null` when the body is not JSON; `text` keeps it).

use std::time::Duration;

use reqwest::header::{HeaderMap, HeaderName, HeaderValue};
use reqwest::Method;
use serde_json::Value;

/// Per-request timeout; a request that hangs fails the test instead of the suite.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
/// How long a pooled connection may wait for reuse: under the gateway's 30 s limit on an
/// idle HTTP/1.1 connection (the node's is 75 s). With reqwest's default of 90 s, a test
/// running longer than 30 s could send on a connection the gateway was closing that
/// very moment ("error sending request"), the race any client with a longer pool
/// timeout than the server's has.
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: HeaderMap,
    pub json: Value,
    pub text: String,
}

impl Response {
    /// `error.code` of an error body, or "" when absent.
    pub fn error_code(&self) -> &str {
        self.json["error"]["code"].as_str().unwrap_or("")
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The `orderId` of an answer to `POST /orders`, which must be 201.
    pub fn order_id(&self) -> String {
        assert_eq!(self.status, 201, "POST /orders: {}", self.text);
        self.json["orderId"]
            .as_str()
            .unwrap_or_else(|| panic!("201 without orderId: {}", self.text))
            .to_string()
    }
}

/// What a client over HTTPS trusts and presents.
#[derive(Debug, Clone)]
pub struct ClientTls {
    /// The only CA trusted.
    pub ca: std::path::PathBuf,
    /// Client certificate and key (PEM) for servers that require one.
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

/// Client for one base URL, optionally with a bearer token for `/admin/*`.
#[derive(Debug, Clone)]
pub struct HttpClient {
    base: String,
    client: reqwest::Client,
    token: Option<String>,
}

impl HttpClient {
    /// Polls `/health/ready` until it answers `status` (200 ready, 503 not ready) and
    /// returns that answer, so a test can assert on the reason given.
    pub async fn wait_readiness(&self, status: u16, deadline: Duration, what: &str) -> Response {
        crate::poll::wait_until(
            deadline,
            what,
            || self.get("/health/ready"),
            |r| r.status == status,
        )
        .await
    }

    pub fn new(base: impl Into<String>) -> HttpClient {
        let client = reqwest::Client::builder()
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(16)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .build()
            .expect("build reqwest client");
        HttpClient {
            base: base.into().trim_end_matches('/').to_string(),
            client,
            token: None,
        }
    }

    /// A client that trusts only `tls.ca` (not the system's roots) and presents
    /// `tls.identity` when the server asks for a certificate.
    pub fn new_tls(base: impl Into<String>, tls: &ClientTls) -> HttpClient {
        let read = |p: &std::path::Path| {
            std::fs::read(p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
        };
        let ca = reqwest::Certificate::from_pem(&read(&tls.ca)).expect("CA certificate PEM");
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(ca)
            .timeout(REQUEST_TIMEOUT)
            .pool_max_idle_per_host(16)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT);
        if let Some((cert, key)) = &tls.identity {
            let mut pem = read(cert);
            pem.extend(read(key));
            builder =
                builder.identity(reqwest::Identity::from_pem(&pem).expect("client identity PEM"));
        }
        HttpClient {
            base: base.into().trim_end_matches('/').to_string(),
            client: builder.build().expect("build reqwest client"),
            token: None,
        }
    }

    /// Sends `Authorization: Bearer <token>` on every request.
    pub fn with_token(mut self, token: impl Into<String>) -> HttpClient {
        self.token = Some(token.into());
        self
    }

    pub fn base(&self) -> &str {
        &self.base
    }

    pub async fn get(&self, path: &str) -> Response {
        self.request(Method::GET, path, None, &[]).await
    }

    pub async fn post(&self, path: &str, body: &Value) -> Response {
        self.request(Method::POST, path, Some(body_of(body)), &[])
            .await
    }

    pub async fn post_empty(&self, path: &str) -> Response {
        self.request(Method::POST, path, None, &[]).await
    }

    pub async fn put(&self, path: &str, body: &Value) -> Response {
        self.request(Method::PUT, path, Some(body_of(body)), &[])
            .await
    }

    /// POST with extra headers, e.g. `Idempotency-Key`.
    pub async fn post_with_headers(
        &self,
        path: &str,
        body: &Value,
        headers: &[(&str, &str)],
    ) -> Response {
        self.request(Method::POST, path, Some(body_of(body)), headers)
            .await
    }

    /// POST of raw bytes as `application/json`, for malformed or oversized bodies.
    pub async fn post_raw(&self, path: &str, body: Vec<u8>) -> Response {
        self.request(Method::POST, path, Some(body), &[]).await
    }

    /// Like [`request`](Self::request) but returns the transport error instead of
    /// panicking (for a node that is down or a Redis outage that hangs a request).
    pub async fn try_request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Result<Response, reqwest::Error> {
        let mut req = self
            .client
            .request(method, format!("{}{}", self.base, path));
        if let Some(token) = &self.token {
            req = req.bearer_auth(token);
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        for (name, value) in headers {
            req = req.header(
                HeaderName::from_bytes(name.as_bytes()).expect("valid header name"),
                HeaderValue::from_str(value).expect("valid header value"),
            );
        }
        let resp = req.send().await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let bytes = resp.bytes().await?;
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let json = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Response {
            status,
            headers,
            json,
            text,
        })
    }

    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
        headers: &[(&str, &str)],
    ) -> Response {
        let m = method.clone();
        self.try_request(method, path, body, headers)
            .await
            .unwrap_or_else(|e| panic!("{m} {}{path}: {e}", self.base))
    }
}

fn body_of(v: &Value) -> Vec<u8> {
    serde_json::to_vec(v).expect("serialise JSON body")
}

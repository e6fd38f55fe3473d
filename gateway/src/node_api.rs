//! The regional node's health and admin endpoints, as the gateway calls them:
//! readiness probes, role queries, promote, demote and lease renewal.

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::http::{header, Method, Request, StatusCode};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use std::sync::Arc;
use std::time::Duration;
use tokio_rustls::rustls::ClientConfig;

/// How long a promotion may keep answering "in progress" (a node's own promotion time
/// limit, `NODE_PROMOTION_TIMEOUT_MS`, is 30 s by default).
pub const PROMOTION_DEADLINE: Duration = Duration::from_secs(35);

/// What went wrong talking to a node.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("could not connect: {0}")]
    Connect(String),
    #[error("request failed: {0}")]
    Transport(String),
    #[error("answered {status}: {body}")]
    Status { status: StatusCode, body: String },
    #[error("unexpected answer: {0}")]
    Decode(String),
}

impl NodeError {
    /// True when the node certainly never received the request (nothing was sent).
    pub fn never_sent(&self) -> bool {
        matches!(self, NodeError::Connect(_))
    }

    /// True when the request certainly extended nothing: never sent, or refused.
    pub fn extended_nothing(&self) -> bool {
        matches!(self, NodeError::Connect(_) | NodeError::Status { .. })
    }

    /// The stable error code of a refused request, e.g. `stale_epoch`.
    pub fn code(&self) -> Option<String> {
        match self {
            NodeError::Status { body, .. } => serde_json::from_str::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v["error"]["code"].as_str().map(str::to_string)),
            _ => None,
        }
    }
}

/// `GET /health/ready` and the admin endpoints' common shape.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RoleReport {
    #[serde(default)]
    pub region: Option<String>,
    pub role: String,
    pub epoch: u64,
    #[serde(default)]
    pub lease_remaining_ms: Option<u64>,
    /// Last entry id of the region's event stream (admin/role only); compared between
    /// regions to tell replication progress.
    #[serde(default)]
    pub last_event_id: Option<serde_json::Value>,
}

impl RoleReport {
    pub fn is_active(&self) -> bool {
        self.role == "active"
    }
}

/// A small pooled client for the nodes' control endpoints, separate from the proxy's
/// pool so probes never queue behind client traffic.
#[derive(Clone)]
pub struct NodeApi {
    /// `http://` regions in plain text, `https://` ones with the gateway's node TLS
    /// client (pinned CA, client certificate).
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    token: Option<String>,
    /// `GATEWAY_ID`, sent as `Tandem-Gateway` so a node's log says who renewed,
    /// promoted or demoted it.
    caller: hyper::http::HeaderValue,
}

/// The header naming the calling gateway.
pub const CALLER_HEADER: &str = "tandem-gateway";

impl NodeApi {
    pub fn new(
        token: Option<String>,
        connect_timeout: Duration,
        caller: &str,
        tls: Option<&Arc<ClientConfig>>,
    ) -> NodeApi {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(connect_timeout));
        connector.enforce_http(false);
        // Without a node CA no region is https:// (the configuration refuses it); an
        // empty trust store then makes sure nothing would be trusted anyway.
        let tls = tls.map(|c| (**c).clone()).unwrap_or_else(|| {
            ClientConfig::builder_with_provider(internal_tls::provider())
                .with_safe_default_protocol_versions()
                .expect("ring supports the default protocol versions")
                .with_root_certificates(tokio_rustls::rustls::RootCertStore::empty())
                .with_no_client_auth()
        });
        let connector = HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(4)
            .build(connector);
        // The id was validated as [A-Za-z0-9._-]: always a valid header value.
        let caller = hyper::http::HeaderValue::from_str(caller)
            .unwrap_or_else(|_| hyper::http::HeaderValue::from_static("gateway"));
        NodeApi {
            client,
            token,
            caller,
        }
    }

    /// `GET /health/ready`; a 503 is an error.
    pub async fn ready(&self, base: &str, timeout: Duration) -> Result<RoleReport, NodeError> {
        self.call(Method::GET, base, "/health/ready", None, timeout)
            .await
    }

    /// `GET /admin/role`.
    pub async fn role(&self, base: &str, timeout: Duration) -> Result<RoleReport, NodeError> {
        self.call(Method::GET, base, "/admin/role", None, timeout)
            .await
    }

    /// `POST /admin/promote {"epoch":N}`. A node applying a replicated backlog answers
    /// 503 `promotion_in_progress` while it works (it never becomes active on an
    /// incomplete projection); the same epoch is asked again until it is done, or fails,
    /// or [`PROMOTION_DEADLINE`] passes, or `may_go_on` says the caller may no longer act
    /// (with several gateways: it lost control of failover).
    /// `not_after` bounds the write window the promotion opens by itself (until the
    /// first lease), by this gateway's wall clock; `None` leaves the node's own grace.
    pub async fn promote(
        &self,
        base: &str,
        epoch: u64,
        not_after: Option<std::time::SystemTime>,
        timeout: Duration,
        may_go_on: impl Fn() -> bool,
    ) -> Result<RoleReport, NodeError> {
        let mut body = serde_json::json!({ "epoch": epoch });
        if let Some(t) = not_after {
            body["notAfterMs"] = unix_ms(t).into();
        }
        let deadline = tokio::time::Instant::now() + PROMOTION_DEADLINE;
        loop {
            let result = self
                .call(
                    Method::POST,
                    base,
                    "/admin/promote",
                    Some(body.clone()),
                    timeout,
                )
                .await;
            match result {
                Err(e)
                    if e.code().as_deref() == Some("promotion_in_progress")
                        && tokio::time::Instant::now() < deadline
                        && may_go_on() =>
                {
                    tracing::info!(%base, epoch, "promotion still applying the backlog; asking again");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                other => return other,
            }
        }
    }

    /// `POST /admin/demote {"epoch":N}`.
    pub async fn demote(
        &self,
        base: &str,
        epoch: u64,
        timeout: Duration,
    ) -> Result<RoleReport, NodeError> {
        let body = serde_json::json!({ "epoch": epoch });
        self.call(Method::POST, base, "/admin/demote", Some(body), timeout)
            .await
    }

    /// `POST /admin/lease {"epoch":N,"ttlMs":M,"notAfterMs":T}`: `not_after` is this
    /// gateway's bound of the renewal; the node's write window never ends after it.
    pub async fn lease(
        &self,
        base: &str,
        epoch: u64,
        ttl: Duration,
        not_after: std::time::SystemTime,
        timeout: Duration,
    ) -> Result<RoleReport, NodeError> {
        let body = serde_json::json!({
            "epoch": epoch,
            "ttlMs": ttl.as_millis() as u64,
            "notAfterMs": unix_ms(not_after),
        });
        self.call(Method::POST, base, "/admin/lease", Some(body), timeout)
            .await
    }

    async fn call(
        &self,
        method: Method,
        base: &str,
        path: &str,
        body: Option<serde_json::Value>,
        timeout: Duration,
    ) -> Result<RoleReport, NodeError> {
        let mut builder = Request::builder()
            .method(method)
            .uri(format!("{base}{path}"))
            .header(header::ACCEPT, "application/json")
            .header(CALLER_HEADER, self.caller.clone());
        if let Some(token) = &self.token {
            builder = builder.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        let bytes = match body {
            Some(v) => {
                builder = builder.header(header::CONTENT_TYPE, "application/json");
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        let req = builder
            .body(Full::new(bytes))
            .map_err(|e| NodeError::Transport(e.to_string()))?;
        let exchange = async {
            let resp = self.client.request(req).await.map_err(|e| {
                if e.is_connect() {
                    NodeError::Connect(error_chain(&e))
                } else {
                    NodeError::Transport(error_chain(&e))
                }
            })?;
            let status = resp.status();
            let body = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| NodeError::Transport(e.to_string()))?
                .to_bytes();
            Ok::<_, NodeError>((status, body))
        };
        let (status, body) = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| NodeError::Timeout(timeout))??;
        if !status.is_success() {
            return Err(NodeError::Status {
                status,
                body: String::from_utf8_lossy(&body[..body.len().min(512)]).into_owned(),
            });
        }
        serde_json::from_slice(&body).map_err(|e| NodeError::Decode(e.to_string()))
    }
}

/// An error and its causes on one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Milliseconds since the Unix epoch, as the nodes read `notAfterMs`.
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

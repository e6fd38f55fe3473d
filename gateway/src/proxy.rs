//! Forwarding a client's request to a region: limits, header hygiene, the retry policy
//! and the request's deadline, which holds across retries and across waiting for a
//! failover.

use crate::error::GatewayError;
use crate::limits::header_bytes;
use crate::metrics::route_template;
use crate::node_api::error_chain;
use crate::routing::Routing;
use crate::Shared;
use http_body_util::{combinators::BoxBody, BodyExt, Full, Limited};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::http::{
    header, uri, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri,
    Version,
};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::sync::watch;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// Every body the gateway sends or receives: streamed from a peer or built here.
pub type Body = BoxBody<Bytes, BoxError>;

/// Request bodies up to this size are buffered, so a request that never reached a
/// region (connect refused) can be sent to another; larger ones stream.
const BUFFER_UP_TO: u64 = 64 * 1024;
/// First pause before sending again to a region that just failed, when there is no
/// other region to try.
const RETRY_BACKOFF: Duration = Duration::from_millis(25);
/// An attempt still unanswered after this starts watching for a failover or for its
/// region turning unhealthy (see [`Failure::Overtaken`]).
const WATCH_AFTER: Duration = Duration::from_millis(50);

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_REGION: HeaderName = HeaderName::from_static("x-region");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

pub fn full_body(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|never| match never {}).boxed()
}

/// A pooled client to the regions. Each worker thread has its own, so a request and
/// its upstream connection live on one thread.
pub type UpstreamClient = Client<HttpConnector, Body>;

pub fn upstream_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .build(connector)
}

/// How an attempt failed, and so whether the request may be sent again: decided here,
/// once, not at each call site.
enum Failure {
    /// The connection was never established: nothing was sent, any request may go again.
    NotSent,
    /// Sent, then the connection broke before an answer: only a safe request may go again.
    Broken,
    /// No answer within the attempt's deadline.
    Timeout,
    /// The region answered 502, 503 or 504.
    Unavailable(Response<Incoming>),
    /// Still waiting when the region was judged unhealthy (a read) or stopped being
    /// the active one (a write): a safe request goes to its successor at once rather
    /// than wait out the attempt's timeout on a hung region.
    Overtaken,
}

impl Failure {
    fn may_retry(&self, idempotent: bool) -> bool {
        matches!(self, Failure::NotSent) || idempotent
    }

    fn reason(&self) -> &'static str {
        match self {
            Failure::NotSent => "connect",
            Failure::Broken => "reset",
            Failure::Timeout => "timeout",
            Failure::Unavailable(_) => "status_5xx",
            Failure::Overtaken => "failover",
        }
    }
}

enum RequestBody {
    Buffered(Bytes),
    /// Streams once; `None` after the first attempt took it.
    Streaming(Option<Incoming>),
}

/// Forwards one client request; always answers.
pub async fn forward(
    shared: &Shared,
    client: &UpstreamClient,
    req: Request<Incoming>,
    peer: SocketAddr,
    tls: bool,
) -> Response<Body> {
    let start = Instant::now();
    let (parts, body) = req.into_parts();
    let route = route_template(parts.uri.path());
    let method = parts.method.clone();
    let request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_request_id);

    let result = forward_inner(
        shared,
        client,
        (parts, body),
        (peer, tls),
        &request_id,
        start,
    )
    .await;
    let (mut resp, region) = match result {
        Ok((resp, region)) => (resp, region),
        Err(e) => {
            shared.metrics.rejected.with_label_values(&[e.code()]).inc();
            (e.to_response(), "gateway")
        }
    };
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let status = resp.status();
    shared
        .metrics
        .requests
        .with_label_values(&[region, method_label(&method), route, status.as_str()])
        .inc();
    shared
        .metrics
        .duration
        .with_label_values(&[region, route])
        .observe(start.elapsed().as_secs_f64());
    if status.is_server_error() {
        tracing::warn!(%method, route, region, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(%method, route, region, status = status.as_u16(), "request");
    }
    resp
}

async fn forward_inner<'a>(
    shared: &'a Shared,
    client: &UpstreamClient,
    (mut parts, body): (hyper::http::request::Parts, Incoming),
    (peer, tls): (SocketAddr, bool),
    request_id: &HeaderValue,
    start: Instant,
) -> Result<(Response<Body>, &'a str), GatewayError> {
    let cfg = &shared.config;
    shared
        .limiter
        .check(peer.ip())
        .map_err(|retry_after_secs| GatewayError::RateLimited { retry_after_secs })?;
    if header_bytes(&parts.headers) > cfg.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge(cfg.max_header_bytes));
    }
    let content_length = parts
        .headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if content_length.is_some_and(|n| n > cfg.max_body_bytes) {
        return Err(GatewayError::BodyTooLarge(cfg.max_body_bytes));
    }

    let is_read = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
    // Safe to send twice: reads, and POSTs whose Idempotency-Key makes the node answer a
    // repeat with the first answer (also after a failover, since the key is replicated).
    let idempotent =
        is_read || (parts.method == Method::POST && parts.headers.contains_key(&IDEMPOTENCY_KEY));

    let mut body = if body.is_end_stream() {
        RequestBody::Buffered(Bytes::new())
    } else if idempotent || content_length.is_some_and(|n| n <= BUFFER_UP_TO) {
        let limit = usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX);
        match Limited::new(body, limit).collect().await {
            Ok(c) => RequestBody::Buffered(c.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::BodyTooLarge(cfg.max_body_bytes))
            }
            Err(_) => {
                return Err(GatewayError::BadRequest(
                    "request body could not be read".into(),
                ))
            }
        }
    } else {
        RequestBody::Streaming(Some(body))
    };

    prepare_headers(&mut parts.headers, request_id, peer, tls);
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));

    let deadline = start + cfg.request_timeout;
    let routing = &shared.routing;
    let mut changes = routing.subscribe();
    let _active = shared.retry_budget.enter();
    let mut tried: Vec<usize> = Vec::with_capacity(2);
    let mut last_failure: Option<(Failure, usize)> = None;
    let mut backed_off = false;
    let mut backoff = RETRY_BACKOFF;

    loop {
        changes.borrow_and_update();
        let now = Instant::now();
        if now >= deadline {
            return conclude(shared, last_failure);
        }
        let pick = if is_read {
            routing.pick_read(&tried)
        } else {
            routing.pick_write()
        };
        let target = match pick {
            Some(t) if !tried.contains(&t) || backed_off => t,
            Some(_) => {
                // Only a region that failed this request is left: give it a moment (or
                // a failover a chance) before sending again.
                wait_for_change(&mut changes, backoff.min(deadline - now)).await;
                backoff = (backoff * 2).min(Duration::from_millis(200));
                backed_off = true;
                continue;
            }
            None => {
                // No usable region (a failover is under way, say): wait for a change.
                wait_for_change(&mut changes, deadline - now).await;
                continue;
            }
        };
        backed_off = false;

        let _retry_permit = if let Some((failure, _)) = &last_failure {
            match shared.retry_budget.try_retry() {
                Some(p) => {
                    shared
                        .metrics
                        .retries
                        .with_label_values(&[failure.reason()])
                        .inc();
                    Some(p)
                }
                None => {
                    tracing::debug!("retry budget spent");
                    return conclude(shared, last_failure);
                }
            }
        } else {
            None
        };

        let region = routing.region(target);
        let upstream_body = match &mut body {
            RequestBody::Buffered(b) => full_body(b.clone()),
            RequestBody::Streaming(s) => match s.take() {
                Some(incoming) => {
                    let limit = usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX);
                    Limited::new(incoming, limit).boxed()
                }
                None => return conclude(shared, last_failure),
            },
        };
        let uri = Uri::builder()
            .scheme(uri::Scheme::HTTP)
            .authority(region.authority.clone())
            .path_and_query(path_and_query.clone())
            .build()
            .map_err(|_| GatewayError::BadRequest("bad request target".into()))?;
        let mut upstream = Request::new(upstream_body);
        *upstream.method_mut() = parts.method.clone();
        *upstream.uri_mut() = uri;
        *upstream.version_mut() = Version::HTTP_11;
        *upstream.headers_mut() = parts.headers.clone();

        if !tried.contains(&target) {
            tried.push(target);
        }
        let attempt_deadline = cfg
            .attempt_timeout
            .min(deadline.saturating_duration_since(Instant::now()));
        let exchange = client.request(upstream);
        tokio::pin!(exchange);
        // Most answers come quickly: only a slow one pays for watching the topology.
        let first = WATCH_AFTER.min(attempt_deadline);
        let outcome = match tokio::time::timeout(first, &mut exchange).await {
            Ok(r) => Some(Ok(r)),
            Err(_) => tokio::select! {
                biased;
                r = tokio::time::timeout(attempt_deadline - first, &mut exchange) => Some(r),
                _ = overtaken(routing, &mut changes, target, is_read), if idempotent => None,
            },
        };
        let failure = match outcome {
            None => Failure::Overtaken,
            Some(Ok(Ok(resp))) => {
                if matches!(
                    resp.status(),
                    StatusCode::BAD_GATEWAY
                        | StatusCode::SERVICE_UNAVAILABLE
                        | StatusCode::GATEWAY_TIMEOUT
                ) {
                    routing.record_failure(target);
                    Failure::Unavailable(resp)
                } else {
                    routing.record_success(target);
                    return Ok((into_client_response(resp, &region.id), region.id.as_str()));
                }
            }
            Some(Ok(Err(e))) => {
                if has_length_limit_error(&e) {
                    return Err(GatewayError::BodyTooLarge(cfg.max_body_bytes));
                }
                routing.record_failure(target);
                tracing::debug!(region = %region.id, error = %error_chain(&e), "attempt failed");
                if e.is_connect() {
                    Failure::NotSent
                } else {
                    Failure::Broken
                }
            }
            Some(Err(_)) => {
                routing.record_failure(target);
                Failure::Timeout
            }
        };
        let replayable = matches!(body, RequestBody::Buffered(_));
        if !(replayable && failure.may_retry(idempotent)) {
            return conclude(shared, Some((failure, target)));
        }
        last_failure = Some((failure, target));
    }
}

/// The answer when no attempt succeeded: the region's own 5xx if that was the last
/// thing seen, else the gateway's error for how the last attempt failed.
fn conclude(
    shared: &Shared,
    last: Option<(Failure, usize)>,
) -> Result<(Response<Body>, &str), GatewayError> {
    match last {
        None => Err(GatewayError::NoRegion),
        Some((Failure::Timeout | Failure::Overtaken, _)) => Err(GatewayError::Timeout),
        Some((Failure::NotSent | Failure::Broken, _)) => Err(GatewayError::Upstream),
        Some((Failure::Unavailable(resp), i)) => {
            let id = shared.routing.region(i).id.as_str();
            Ok((into_client_response(resp, id), id))
        }
    }
}

/// Completes when `target` should no longer hold this request: for a read, when it is
/// unhealthy; for a write, when another region has become active.
async fn overtaken(
    routing: &Routing,
    changes: &mut watch::Receiver<u64>,
    target: usize,
    is_read: bool,
) {
    loop {
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
        let gone = if is_read {
            !routing.region(target).is_healthy()
        } else {
            routing.active().is_some_and(|a| a != target)
        };
        if gone {
            return;
        }
    }
}

async fn wait_for_change(changes: &mut watch::Receiver<u64>, at_most: Duration) {
    let _ = tokio::time::timeout(at_most, changes.changed()).await;
}

fn has_length_limit_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Hop-by-hop headers are for one connection only (RFC 9110 7.6.1).
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Usually there are none: one pass over the names is cheaper than eight removals.
    let is_hop = |k: &HeaderName| {
        k == header::CONNECTION
            || k == header::TRANSFER_ENCODING
            || k == header::TE
            || k == header::TRAILER
            || k == header::UPGRADE
            || k == header::PROXY_AUTHORIZATION
            || k.as_str() == "keep-alive"
            || k.as_str() == "proxy-connection"
    };
    if !headers.keys().any(is_hop) {
        return;
    }
    if let Some(conn) = headers.get(header::CONNECTION).cloned() {
        if let Ok(list) = conn.to_str() {
            for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                headers.remove(name);
            }
        }
    }
    for h in [
        header::CONNECTION,
        header::TRANSFER_ENCODING,
        header::TE,
        header::TRAILER,
        header::UPGRADE,
        header::PROXY_AUTHORIZATION,
    ] {
        headers.remove(h);
    }
    headers.remove("keep-alive");
    headers.remove("proxy-connection");
}

fn prepare_headers(headers: &mut HeaderMap, request_id: &HeaderValue, peer: SocketAddr, tls: bool) {
    strip_hop_by_hop(headers);
    headers.insert(X_REQUEST_ID.clone(), request_id.clone());
    if !headers.contains_key(&TRACEPARENT) {
        headers.insert(TRACEPARENT.clone(), new_traceparent());
    }
    let xff = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip())).ok(),
        None => Some(peer_header(peer.ip())),
    };
    if let Some(v) = xff {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
    headers.insert(
        X_FORWARDED_PROTO.clone(),
        HeaderValue::from_static(if tls { "https" } else { "http" }),
    );
}

fn into_client_response(resp: Response<Incoming>, region: &str) -> Response<Body> {
    let (mut parts, body) = resp.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    if !parts.headers.contains_key(&X_REGION) {
        if let Ok(v) = HeaderValue::from_str(region) {
            parts.headers.insert(X_REGION.clone(), v);
        }
    }
    Response::from_parts(parts, body.map_err(BoxError::from).boxed())
}

fn new_request_id() -> HeaderValue {
    let id = uuid::Builder::from_random_bytes(random_bytes()).into_uuid();
    HeaderValue::from_str(
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
    .expect("uuid is a valid header value")
}

/// A W3C trace context for a request that came without one, so the trace starts here:
/// `00-<32 hex trace id>-<16 hex span id>-01`.
fn new_traceparent() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    let trace = random_bytes();
    let span = random_bytes();
    for (i, b) in trace.iter().chain(&span[..8]).enumerate() {
        // Trace id at offset 3, span id after the dash at offset 36.
        let at = if i < 16 { 3 + 2 * i } else { 36 + 2 * (i - 16) };
        out[at] = HEX[usize::from(b >> 4)];
        out[at + 1] = HEX[usize::from(b & 0xf)];
    }
    HeaderValue::from_bytes(&out).expect("hex is a valid header value")
}

/// The client address as a header value, remembered per thread: keep-alive clients
/// send many requests from one address.
fn peer_header(ip: std::net::IpAddr) -> HeaderValue {
    use std::cell::RefCell;
    thread_local! {
        static LAST: RefCell<Option<(std::net::IpAddr, HeaderValue)>> = const { RefCell::new(None) };
    }
    LAST.with(|last| {
        let mut last = last.borrow_mut();
        match &*last {
            Some((cached, v)) if *cached == ip => v.clone(),
            _ => {
                let v = HeaderValue::from_str(&ip.to_string())
                    .expect("an address is a valid header value");
                *last = Some((ip, v.clone()));
                v
            }
        }
    })
}

/// 16 random bytes from a per-thread generator seeded once from the OS: ids must be
/// unique, not secret, and a getrandom(2) call per request shows in profiles.
fn random_bytes() -> [u8; 16] {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new(u64::from_le_bytes(
            uuid::Uuid::new_v4().as_bytes()[..8].try_into().expect("8 bytes"),
        ));
    }
    // splitmix64: tiny, fast, and every 64-bit seed gives a full-period sequence.
    let next = || {
        STATE.with(|s| {
            let z = s.get().wrapping_add(0x9E37_79B9_7F4A_7C15);
            s.set(z);
            let z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            let z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        })
    };
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&next().to_le_bytes());
    out[8..].copy_from_slice(&next().to_le_bytes());
    out
}

/// Method label with a bounded set of values.
pub fn method_label(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::HEAD => "HEAD",
        Method::PATCH => "PATCH",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_is_w3c_shaped_and_ids_differ() {
        let a = new_traceparent();
        let b = new_traceparent();
        let s = a.to_str().unwrap();
        assert_eq!(s.len(), 55);
        let parts: Vec<&str> = s.split('-').collect();
        assert_eq!(parts.len(), 4);
        assert_eq!((parts[0], parts[3]), ("00", "01"));
        assert_eq!((parts[1].len(), parts[2].len()), (32, 16));
        assert!(parts[1].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
        assert_ne!(new_request_id(), new_request_id());
    }

    #[test]
    fn hop_by_hop_headers_go_and_named_ones_too() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
    }
}

//! Forwarding a client's request to a region: limits, header hygiene, the retry policy
//! and the request's deadline, which holds across retries and across waiting for a
//! failover.

use crate::access::{self, Need, Ownership};
use crate::auth::{Failure as AuthFailure, Principal, Scope};
use crate::error::GatewayError;
use crate::limits::{header_bytes, ClientKey};
use crate::metrics::{method_label, Route, NO_REGION_LABEL};
use crate::node_api::error_chain;
use crate::routing::{Region, Routing, Tried};
use crate::slow_attempts;
use crate::upstream::{Added, Head, SendBody, Target, Upstream, UpstreamError};
use crate::Shared;
use backon::{BackoffBuilder as _, ExponentialBackoff, ExponentialBuilder};
use http_body_util::{BodyExt, Limited};
use hyper::body::{Body as _, Bytes, Incoming};
use hyper::http::{
    header, uri, HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode,
};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;
use tracing::Instrument as _;

pub use crate::body::{full_body, Body, BoxError};

/// Request bodies up to this size are buffered, so a request that never reached a
/// region (connect refused) can be sent to another; larger ones stream.
const BUFFER_UP_TO: u64 = 64 * 1024;
/// Pauses before sending again to a region that just failed, when there is no other
/// region to try: 25 ms doubling up to 200 ms.
const RETRY_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(25))
    .with_max_delay(Duration::from_millis(200))
    .without_max_times();

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_REGION: HeaderName = HeaderName::from_static("x-region");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
/// The authenticated caller's `sub`, for the node (API.md "Security"); never the client's.
pub static TANDEM_SUBJECT: HeaderName = HeaderName::from_static("tandem-subject");
/// The caller's `scope` claim as given, for the node (e.g. `pii:read` on `/api/events`).
pub static TANDEM_SCOPES: HeaderName = HeaderName::from_static("tandem-scopes");
/// An order as the node shows it is a few KiB; more than this is not an order.
const MAX_ORDER_BYTES: usize = 1024 * 1024;

/// The regions as one worker reaches them (see [`crate::upstream`]).
pub type UpstreamClient = Arc<Upstream>;

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
    Unavailable(Response<Body>),
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

/// Who asked (with auth on) and whether the route is one customer's order.
struct Caller {
    principal: Option<Principal>,
    /// `None` when auth is off and for `orders:admin`.
    ownership: Ownership,
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
    let route = Route::of(parts.uri.path());
    let method = parts.method.clone();
    let request_id = parts
        .headers
        .get(&X_REQUEST_ID)
        .filter(|v| !v.is_empty() && v.len() <= 128)
        .cloned()
        .unwrap_or_else(new_request_id);
    // The request's span (disabled, and free, unless spans are exported): it continues
    // the caller's trace and the node's request span continues it.
    let span = tracing::info_span!(
        target: telemetry::trace::SPANS,
        "gateway request",
        otel.name = %format_args!("{} {}", method_label(&method), route.template()),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = method_label(&method),
        http.route = route.template(),
        http.response.status_code = tracing::field::Empty,
        tandem.region = tracing::field::Empty,
    );
    let traceparent = if span.is_disabled() {
        None
    } else {
        let incoming = parts
            .headers
            .get(&TRACEPARENT)
            .and_then(|v| v.to_str().ok());
        telemetry::trace::continue_from(&span, incoming);
        telemetry::trace::traceparent(&span).and_then(|t| HeaderValue::try_from(t).ok())
    };

    let inner = forward_inner(
        shared,
        client,
        (parts, body),
        (peer, tls),
        (&request_id, traceparent),
        start,
    );
    // Entering and leaving a disabled span at every poll is work for nothing.
    let result = if span.is_disabled() {
        inner.await
    } else {
        inner.instrument(span.clone()).await
    };
    let (mut resp, served_by) = match result {
        Ok((resp, region)) => (resp, Some(region)),
        Err(e) => {
            shared.metrics.rejected.with_label_values(&[e.code()]).inc();
            (e.to_response(), None)
        }
    };
    let region = served_by.map_or(NO_REGION_LABEL, |i| shared.routing.region(i).id.as_str());
    resp.headers_mut().insert(X_REQUEST_ID.clone(), request_id);
    let status = resp.status();
    span.record("http.response.status_code", status.as_u16());
    span.record("tandem.region", region);
    if status.is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    shared.metrics.record_request(
        served_by,
        &method,
        route,
        status,
        start.elapsed().as_secs_f64(),
    );
    let route = route.template();
    if status.is_server_error() {
        tracing::warn!(%method, route, region, status = status.as_u16(), "request failed");
    } else {
        tracing::debug!(%method, route, region, status = status.as_u16(), "request");
    }
    resp
}

/// Ok: the answer and the index of the region that gave it.
async fn forward_inner(
    shared: &Shared,
    client: &UpstreamClient,
    (mut parts, body): (hyper::http::request::Parts, Incoming),
    (peer, tls): (SocketAddr, bool),
    (request_id, traceparent): (&HeaderValue, Option<HeaderValue>),
    start: Instant,
) -> Result<(Response<Body>, usize), GatewayError> {
    let cfg = &shared.config;
    if header_bytes(&parts.headers) > cfg.max_header_bytes {
        return Err(GatewayError::HeadersTooLarge(cfg.max_header_bytes));
    }
    let caller = admit(shared, &parts, peer).await?;
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
    // The deadline covers reading the body too: a client trickling it holds nothing for long.
    let deadline = start + cfg.request_timeout;

    let body = if body.is_end_stream() {
        RequestBody::Buffered(Bytes::new())
    } else if idempotent
        || caller.ownership == Ownership::Place
        || content_length.is_some_and(|n| n <= BUFFER_UP_TO)
    {
        let limit = usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX);
        let read = tokio::time::timeout_at(deadline.into(), Limited::new(body, limit).collect());
        match read.await {
            Err(_) => return Err(GatewayError::RequestTimeout),
            Ok(Ok(c)) => RequestBody::Buffered(c.to_bytes()),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(GatewayError::BodyTooLarge(cfg.max_body_bytes))
            }
            Ok(Err(_)) => {
                return Err(GatewayError::BadRequest(
                    "request body could not be read".into(),
                ))
            }
        }
    } else {
        RequestBody::Streaming(Some(body))
    };
    if let (Ownership::Place, Some(principal), RequestBody::Buffered(bytes)) =
        (&caller.ownership, &caller.principal, &body)
    {
        placing_as_self(shared, principal, bytes)?;
    }

    let added = prepare_headers(&mut parts.headers, (request_id, traceparent), peer, tls);
    let added = Added {
        // The node learns who asked from the identity headers; the token itself is a
        // credential it has no use for.
        drop_authorization: shared.auth.is_some(),
        subject: caller.principal.as_ref().map(|p| p.subject.clone()),
        scopes: caller.principal.as_ref().map(|p| p.scope_claim.clone()),
        ..added
    };
    let path_and_query = parts
        .uri
        .path_and_query()
        .cloned()
        .unwrap_or_else(|| uri::PathAndQuery::from_static("/"));
    let mut body = body;

    let (Ownership::Order(order_id), Some(principal)) = (&caller.ownership, &caller.principal)
    else {
        let outgoing = Outgoing {
            method: &parts.method,
            path_and_query: &path_and_query,
            headers: &parts.headers,
            added: &added,
            read: is_read,
            idempotent,
        };
        return exchange(shared, client, &outgoing, &mut body, deadline).await;
    };
    // One customer's order. A read is checked on the answer; anything else (cancel)
    // first reads the order from the active region, which never changes its owner, and
    // goes ahead only for the owner: someone else's order is "not found" and nothing
    // reaches the node's write path.
    let subject = principal.subject();
    if parts.method != Method::GET {
        let read = exchange(
            shared,
            client,
            &Outgoing {
                method: &Method::GET,
                path_and_query: &order_path(order_id)?,
                // Nothing of the client's own: the gateway's trace and identity only.
                headers: &HeaderMap::new(),
                added: &added,
                read: false,
                idempotent: true,
            },
            &mut RequestBody::Buffered(Bytes::new()),
            deadline,
        )
        .await?;
        if read.0.status() != StatusCode::OK {
            return Ok(read);
        }
        let (checked, region) = owner_only(shared, read, order_id, subject, deadline).await?;
        if checked.status() != StatusCode::OK {
            return Ok((checked, region));
        }
    }
    let outgoing = Outgoing {
        method: &parts.method,
        path_and_query: &path_and_query,
        headers: &parts.headers,
        added: &added,
        read: is_read,
        idempotent,
    };
    let answer = exchange(shared, client, &outgoing, &mut body, deadline).await?;
    if parts.method == Method::GET && answer.0.status() == StatusCode::OK {
        return owner_only(shared, answer, order_id, subject, deadline).await;
    }
    Ok(answer)
}

/// Who is asking and whether the route lets them, decided before a byte goes upstream;
/// the rate limit is taken here too, keyed by the caller.
async fn admit(
    shared: &Shared,
    parts: &hyper::http::request::Parts,
    peer: SocketAddr,
) -> Result<Caller, GatewayError> {
    let open = Caller {
        principal: None,
        ownership: Ownership::None,
    };
    let Some(auth) = &shared.auth else {
        rate_limit(shared, ClientKey::Addr(peer.ip()))?;
        return Ok(open);
    };
    let (need, ownership) = access::rule(&parts.method, parts.uri.path());
    if need == Need::Open {
        rate_limit(shared, ClientKey::Addr(peer.ip()))?;
        return Ok(open);
    }
    let verdict = auth.authenticate(&parts.headers).await;
    match &verdict {
        Ok(p) => rate_limit(shared, ClientKey::Subject(p.subject()))?,
        Err(_) => rate_limit(shared, ClientKey::Addr(peer.ip()))?,
    }
    let principal = verdict.map_err(|f| refuse(shared, f))?;
    if let Need::Scope(scope) = need {
        if !principal.scopes.has(scope) {
            refuse(shared, AuthFailure::InsufficientScope);
            return Err(GatewayError::InsufficientScope(scope.name()));
        }
    }
    let ownership = if principal.scopes.has(Scope::OrdersAdmin) {
        Ownership::None
    } else {
        ownership
    };
    Ok(Caller {
        principal: Some(principal),
        ownership,
    })
}

fn rate_limit(shared: &Shared, client: ClientKey<'_>) -> Result<(), GatewayError> {
    shared
        .limiter
        .check(client)
        .map_err(|retry_after_secs| GatewayError::RateLimited { retry_after_secs })
}

/// Counts a refusal and gives its answer.
fn refuse(shared: &Shared, failure: AuthFailure) -> GatewayError {
    shared
        .metrics
        .auth_failures
        .with_label_values(&[failure.reason()])
        .inc();
    tracing::debug!(reason = failure.reason(), "request refused by auth");
    failure.to_error()
}

/// `POST /orders` by a customer: the order must be placed for the caller.
fn placing_as_self(
    shared: &Shared,
    principal: &Principal,
    body: &[u8],
) -> Result<(), GatewayError> {
    match access::customer_id(body) {
        Err(e) => Err(GatewayError::MalformedJson(e)),
        Ok(Some(customer)) if customer != principal.subject() => {
            refuse(shared, AuthFailure::NotOwner);
            Err(GatewayError::InsufficientScope(Scope::OrdersAdmin.name()))
        }
        // The caller's own id, or none at all (which the node refuses as invalid).
        Ok(_) => Ok(()),
    }
}

/// The order's answer if it belongs to `subject`; otherwise the node's own "not found"
/// answer for a missing order, so another customer's order cannot even be told to exist.
async fn owner_only(
    shared: &Shared,
    (resp, region): (Response<Body>, usize),
    order_id: &str,
    subject: &str,
    deadline: Instant,
) -> Result<(Response<Body>, usize), GatewayError> {
    let (mut parts, body) = resp.into_parts();
    let read = tokio::time::timeout_at(deadline.into(), read_up_to(body, MAX_ORDER_BYTES));
    let bytes = match read.await {
        Err(_) => return Err(GatewayError::Timeout),
        Ok(None) => return Err(GatewayError::Upstream),
        Ok(Some(b)) => b,
    };
    if matches!(access::customer_id(&bytes), Ok(Some(c)) if c == subject) {
        return Ok((Response::from_parts(parts, full_body(bytes)), region));
    }
    refuse(shared, AuthFailure::NotOwner);
    let not_found = serde_json::json!({
        "error": { "code": "not_found", "message": format!("order {order_id} not found") }
    });
    parts.status = StatusCode::NOT_FOUND;
    parts.headers.remove(header::CONTENT_LENGTH);
    Ok((
        Response::from_parts(parts, full_body(not_found.to_string())),
        region,
    ))
}

/// A region's answer body, whole, if it is at most `limit` bytes and arrives intact.
async fn read_up_to(mut body: Body, limit: usize) -> Option<Bytes> {
    let mut out = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.ok()?.into_data() {
            if out.len() + data.len() > limit {
                return None;
            }
            out.extend_from_slice(&data);
        }
    }
    Some(Bytes::from(out))
}

fn order_path(order_id: &str) -> Result<uri::PathAndQuery, GatewayError> {
    uri::PathAndQuery::try_from(format!("/orders/{order_id}"))
        .map_err(|_| GatewayError::BadRequest("bad request target".into()))
}

/// One request as it goes upstream (perhaps more than once).
struct Outgoing<'r> {
    method: &'r Method,
    path_and_query: &'r uri::PathAndQuery,
    /// The client's fields, hop-by-hop ones gone.
    headers: &'r HeaderMap,
    /// What the gateway adds (and the client's fields of those names that never pass).
    added: &'r Added,
    /// Routed as a read (any healthy region, per the read policy) or to the active one.
    read: bool,
    /// Safe to send again.
    idempotent: bool,
}

/// Sends `req` to a region, retrying when that is safe and waiting out a failover,
/// within `deadline`.
async fn exchange(
    shared: &Shared,
    client: &UpstreamClient,
    req: &Outgoing<'_>,
    body: &mut RequestBody,
    deadline: Instant,
) -> Result<(Response<Body>, usize), GatewayError> {
    let cfg = &shared.config;
    let (is_read, idempotent) = (req.read, req.idempotent);
    let routing = &shared.routing;
    // Subscribed to routing changes only when this request has to wait for one (most
    // never do): a subscription is two updates of a counter every worker shares.
    let mut changes: Option<watch::Receiver<u64>> = None;
    let _active = shared.retry_budget.enter();
    let mut tried = Tried::default();
    let mut last_failure: Option<(Failure, usize)> = None;
    let mut backed_off = false;
    // Built on the first pause only: most requests never need one.
    let mut backoff: Option<ExponentialBackoff> = None;

    loop {
        if let Some(changes) = &mut changes {
            changes.borrow_and_update();
        }
        let now = Instant::now();
        if now >= deadline {
            return conclude(shared, last_failure);
        }
        let pick = if is_read {
            routing.pick_read(tried)
        } else {
            routing.pick_write()
        };
        let target = match pick {
            Some(t) if !tried.contains(t) || backed_off => t,
            _ => {
                let Some(changes) = &mut changes else {
                    // Subscribe, then look again: a change just before subscribing is seen.
                    changes = Some(routing.subscribe());
                    continue;
                };
                if pick.is_some() {
                    // Only a region that failed this request is left: give it a moment
                    // (or a failover a chance) before sending again.
                    let pause = backoff
                        .get_or_insert_with(|| RETRY_BACKOFF.build())
                        .next()
                        .unwrap_or(Duration::from_millis(200));
                    wait_for_change(changes, pause.min(deadline - now)).await;
                    backed_off = true;
                } else {
                    // No usable region (a failover is under way, say): wait for a change.
                    wait_for_change(changes, deadline - now).await;
                }
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
        let upstream_body = match body {
            RequestBody::Buffered(b) => SendBody::Buffered(b.clone()),
            RequestBody::Streaming(s) => match s.take() {
                Some(incoming) => SendBody::Streaming {
                    body: incoming,
                    limit: usize::try_from(cfg.max_body_bytes).unwrap_or(usize::MAX),
                    length: req
                        .headers
                        .get(header::CONTENT_LENGTH)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| v.parse::<u64>().ok()),
                },
                None => return conclude(shared, last_failure),
            },
        };
        let head = Head {
            method: req.method,
            path_and_query: req.path_and_query.as_str(),
            headers: req.headers,
            added: req.added,
        };

        tried = tried.with(target);
        // `now` from the top of the loop: a clock read costs as much as a header lookup.
        let attempt_ends = now + cfg.attempt_timeout.min(deadline - now);
        let to = Target {
            index: target,
            authority: region.authority.as_str(),
            host: &region.host_header,
        };
        let sent = client.send(to, head, upstream_body);
        tokio::pin!(sent);
        // Most answers come quickly: only a slow one pays for watching the topology and
        // for a timer of its own (an attempt with little time left has one at once).
        let answered = if attempt_ends >= now + slow_attempts::WOKEN_WITHIN {
            tokio::select! {
                biased;
                r = &mut sent => Some(r),
                () = client.slow.a_while() => None,
            }
        } else {
            None
        };
        let outcome = match answered {
            Some(r) => Some(Ok(r)),
            None => {
                let changes = changes.get_or_insert_with(|| routing.subscribe());
                tokio::select! {
                    biased;
                    r = tokio::time::timeout_at(attempt_ends.into(), &mut sent) => Some(r),
                    _ = overtaken(routing, changes, target, is_read), if idempotent => None,
                }
            }
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
                    return Ok((into_client_response(resp, region), target));
                }
            }
            Some(Ok(Err(e))) => {
                if matches!(e, UpstreamError::BodyTooLarge) {
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
        let replayable = matches!(*body, RequestBody::Buffered(_));
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
) -> Result<(Response<Body>, usize), GatewayError> {
    match last {
        None => Err(GatewayError::NoRegion),
        Some((Failure::Timeout | Failure::Overtaken, _)) => Err(GatewayError::Timeout),
        Some((Failure::NotSent | Failure::Broken, _)) => Err(GatewayError::Upstream),
        Some((Failure::Unavailable(resp), i)) => {
            Ok((into_client_response(resp, shared.routing.region(i)), i))
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
        // Looked at first too: the receiver may have been made after the attempt began.
        let gone = if is_read {
            !routing.region(target).is_healthy()
        } else {
            routing.active().is_some_and(|a| a != target)
        };
        if gone {
            return;
        }
        if changes.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}

async fn wait_for_change(changes: &mut watch::Receiver<u64>, at_most: Duration) {
    let _ = tokio::time::timeout(at_most, changes.changed()).await;
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

/// `traceparent` is the gateway's request span when spans are exported; otherwise the
/// caller's trace context passes as it is, and a request without one starts a trace.
/// The fields the gateway sets are not written into the client's map: the upstream
/// client writes them after the client's own and leaves the client's copies of those
/// names out (see [`Added`]), which spares a map update per field.
fn prepare_headers(
    headers: &mut HeaderMap,
    (request_id, traceparent): (&HeaderValue, Option<HeaderValue>),
    peer: SocketAddr,
    tls: bool,
) -> Added {
    strip_hop_by_hop(headers);
    let traceparent = traceparent
        .or_else(|| headers.get(&TRACEPARENT).cloned())
        .unwrap_or_else(new_traceparent);
    let forwarded_for = match headers.get(&X_FORWARDED_FOR).map(|v| v.to_str()) {
        Some(Ok(prev)) => HeaderValue::from_str(&format!("{prev}, {}", peer.ip()))
            .unwrap_or_else(|_| peer_header(peer.ip())),
        _ => peer_header(peer.ip()),
    };
    Added {
        request_id: request_id.clone(),
        traceparent,
        forwarded_for,
        forwarded_proto: HeaderValue::from_static(if tls { "https" } else { "http" }),
        // Identity is the gateway's word alone: a client's own copies never pass.
        subject: None,
        scopes: None,
        drop_authorization: false,
    }
}

fn into_client_response(resp: Response<Body>, region: &Region) -> Response<Body> {
    // Hop-by-hop fields were left out when the answer head was read (see
    // [`crate::upstream`]).
    let (mut parts, body) = resp.into_parts();
    if !parts.headers.contains_key(&X_REGION) {
        parts
            .headers
            .insert(X_REGION.clone(), region.id_header.clone());
    }
    Response::from_parts(parts, body)
}

fn new_request_id() -> HeaderValue {
    let id = uuid::Uuid::new_v4();
    HeaderValue::from_str(
        id.hyphenated()
            .encode_lower(&mut uuid::Uuid::encode_buffer()),
    )
    .expect("uuid is a valid header value")
}

/// A W3C trace context for a request that came without one while spans are not
/// exported, so the trace starts here: `00-<32 hex trace id>-<16 hex span id>-01`.
/// Ids must be unique, not secret: rand's thread-local generator, seeded once from the
/// OS (a getrandom(2) call per request shows in profiles); hex by hand, since this runs
/// for most requests.
fn new_traceparent() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut out = *b"00-00000000000000000000000000000000-0000000000000000-01";
    // 16 bytes of trace id, then 8 of span id (all zero: one chance in 2^64, and then
    // only this request's trace is lost).
    let ids: [u8; 24] = rand::random();
    for (i, b) in ids.iter().enumerate() {
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
    fn a_client_cannot_claim_an_identity() {
        let mut h = HeaderMap::new();
        h.insert("tandem-subject", HeaderValue::from_static("c-victim"));
        h.insert(
            "tandem-scopes",
            HeaderValue::from_static("orders:admin pii:read"),
        );
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        let peer: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let added = prepare_headers(
            &mut h,
            (&HeaderValue::from_static("r-1"), None),
            peer,
            false,
        );
        let head = crate::upstream::written_head(&h, &added);
        assert!(!head.contains("c-victim"), "{head}");
        assert!(!head.contains("orders:admin"), "{head}");
        assert!(head.contains("x-kept: 1\r\n"), "{head}");
        assert!(head.contains("x-request-id: r-1\r\n"), "{head}");
        assert!(
            head.contains("x-forwarded-for: 10.0.0.1, 127.0.0.1\r\n"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
        assert_eq!(head.matches("traceparent: 00-").count(), 1, "{head}");
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

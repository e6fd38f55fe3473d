//! The node's HTTP API (API.md): routes, request context, body parsing, headers and
//! request metrics.

mod admin;
mod error;
mod events;
mod identity;
mod ops;
mod public;
mod requests;
mod webhooks;

pub use error::ApiError;
pub use ops::OPENAPI;

use crate::config::Config;
use crate::workflow::Workflow;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::handler::Handler;
use axum::http::{request::Parts, HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, on, post, MethodFilter, MethodRouter};
use axum::Router;
use serde_json::Value;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::Instrument as _;

/// Largest accepted request body.
pub const MAX_BODY: usize = 1024 * 1024;

#[derive(Clone)]
pub struct AppState {
    pub wf: Workflow,
    pub config: Arc<Config>,
    /// The other region's Redis, for `replicated` durability.
    pub peer: Option<crate::store::Store>,
    /// Promotion and rebuild, which run to completion whatever the caller does.
    pub jobs: Arc<admin::AdminJobs>,
    /// The standby as `replicated` durability sees it.
    pub standby: Arc<crate::durability::Standby>,
}

/// One public route: what the router serves and what `openapi.json` must document.
struct Endpoint {
    method: Method,
    path: &'static str,
    route: MethodRouter<AppState>,
}

fn endpoint<H, T>(method: Method, path: &'static str, handler: H) -> Endpoint
where
    H: Handler<T, AppState>,
    T: 'static,
{
    let filter = MethodFilter::try_from(method.clone()).expect("a method axum routes");
    Endpoint {
        method,
        path,
        route: on(filter, handler),
    }
}

/// The public API, one entry per method and path. The router is built from this table
/// (axum's routes cannot be listed), so the OpenAPI test can check that the document
/// covers exactly what the node serves.
fn public_endpoints() -> Vec<Endpoint> {
    vec![
        endpoint(Method::POST, "/orders", public::place_order),
        endpoint(Method::GET, "/orders/{order_id}", public::get_order),
        endpoint(
            Method::POST,
            "/orders/{order_id}/cancel",
            public::cancel_order,
        ),
        endpoint(
            Method::POST,
            "/api/v1/products/check-availability",
            public::check_availability,
        ),
        endpoint(
            Method::PUT,
            "/api/v1/products/{sku}",
            public::upsert_product,
        ),
        endpoint(Method::GET, "/api/v1/products/{sku}", public::get_product),
        endpoint(
            Method::POST,
            "/shipments/{shipment_id}/dispatch",
            public::dispatch,
        ),
        endpoint(
            Method::POST,
            "/shipments/{shipment_id}/deliver",
            public::deliver,
        ),
        endpoint(Method::GET, "/api/events", events::list),
        endpoint(Method::GET, "/api/events/{event_id}", events::one),
        endpoint(Method::POST, "/api/v1/webhooks", webhooks::create),
        endpoint(Method::GET, "/api/v1/webhooks", webhooks::list),
        endpoint(
            Method::DELETE,
            "/api/v1/webhooks/{webhook_id}",
            webhooks::delete,
        ),
        endpoint(
            Method::GET,
            "/api/v1/webhooks/{webhook_id}/dead-letters",
            webhooks::dead_letters,
        ),
        endpoint(Method::GET, "/health/live", ops::live),
        endpoint(Method::GET, "/health/ready", ops::ready),
        endpoint(Method::GET, "/metrics", ops::metrics),
        endpoint(Method::GET, "/openapi.json", ops::openapi),
    ]
}

/// Method and path template (axum's `{name}` syntax) of every public route.
pub fn public_routes() -> Vec<(Method, &'static str)> {
    public_endpoints()
        .into_iter()
        .map(|e| (e.method, e.path))
        .collect()
}

pub fn router(state: AppState) -> Router {
    let admin = Router::new()
        .route("/admin/role", get(admin::role))
        .route("/admin/promote", post(admin::promote))
        .route("/admin/demote", post(admin::demote))
        .route("/admin/lease", post(admin::lease))
        .route("/admin/dlq", get(admin::dlq))
        .route("/admin/dlq/replay", post(admin::replay_many))
        .route("/admin/dlq/{entry_id}/replay", post(admin::replay))
        .route("/admin/rebuild", post(admin::rebuild))
        .route("/admin/quarantine", get(admin::quarantine));
    // Routes of one path merge into one method router (axum does that for `route`).
    let public = public_endpoints()
        .into_iter()
        .fold(Router::new(), |r, e| r.route(e.path, e.route));
    public
        .merge(admin)
        .fallback(|| async { ApiError::not_found("route") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this path does not take this method (see Allow)",
            )
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), context))
        .with_state(state)
}

/// `NODE_HTTP_BODY_TIMEOUT_MS`, for the body extractors (which see no state).
#[derive(Clone, Copy)]
struct BodyTimeout(Duration);

/// Who asked: the request id (the caller's or a new one) and the W3C trace context.
#[derive(Debug, Clone)]
pub struct RequestContext {
    pub request_id: String,
    pub traceparent: Option<String>,
}

impl<S: Send + Sync> FromRequestParts<S> for RequestContext {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestContext>()
            .cloned()
            .unwrap_or_else(|| RequestContext {
                request_id: uuid::Uuid::new_v4().to_string(),
                traceparent: None,
            }))
    }
}

static X_REGION: HeaderName = HeaderName::from_static("x-region");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Sets the request context and stamps `X-Region` and `X-Request-Id` on every answer.
async fn context(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let request_id =
        header(&req, "x-request-id").unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let traceparent = header(&req, "traceparent");
    req.extensions_mut().insert(RequestContext {
        request_id: request_id.clone(),
        traceparent,
    });
    req.extensions_mut()
        .insert(BodyTimeout(Duration::from_millis(
            state.config.http_body_timeout_ms,
        )));
    let mut response = as_json_error(next.run(req).await).await;
    if matches!(
        response.status(),
        StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT
    ) {
        // The body was left unread, so this connection cannot carry another request:
        // say so, or a client would send its next one into a closing connection.
        response.headers_mut().insert(
            axum::http::header::CONNECTION,
            HeaderValue::from_static("close"),
        );
    }
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(state.config.region.as_str()) {
        headers.insert(X_REGION.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    response
}

/// Every failure in our error format, also the ones axum answers itself in plain text
/// (a path or query its extractors cannot parse, an unknown method): a client matches
/// on `error.code` and never has to parse anything else.
async fn as_json_error(response: Response) -> Response {
    let status = response.status();
    let is_json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let code = match status {
        StatusCode::NOT_FOUND => "not_found",
        StatusCode::METHOD_NOT_ALLOWED => "method_not_allowed",
        StatusCode::PAYLOAD_TOO_LARGE => "payload_too_large",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported_media_type",
        StatusCode::REQUEST_TIMEOUT => "request_timeout",
        s if s.is_server_error() => "internal",
        _ => "bad_request",
    };
    let (parts, body) = response.into_parts();
    // axum's rejection texts are short and name what could not be parsed.
    let text = axum::body::to_bytes(body, 1024).await.unwrap_or_default();
    let message = match String::from_utf8_lossy(&text).trim() {
        "" => status
            .canonical_reason()
            .unwrap_or("bad request")
            .to_string(),
        t => t.to_string(),
    };
    let mut json = ApiError::new(status, code, message).into_response();
    // Keep what the original answer said besides its body (`Allow` on a 405).
    for (name, value) in parts.headers.iter() {
        if name != axum::http::header::CONTENT_TYPE && name != axum::http::header::CONTENT_LENGTH {
            json.headers_mut().insert(name.clone(), value.clone());
        }
    }
    json
}

/// A header's value if it is short, visible ASCII (it ends up in logs and events).
fn header(req: &Request, name: &str) -> Option<String> {
    req.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .filter(|v| !v.is_empty() && v.len() <= 128 && v.bytes().all(|b| b.is_ascii_graphic()))
        .map(str::to_string)
}

/// Counts requests by route template (never raw ids, to bound label cardinality), and
/// runs each in its span.
///
/// The span (disabled, and free, unless spans are exported) continues the caller's
/// `traceparent`, and the events the request commits carry the span's own instead, so
/// the consumer-group steps that handle them are its descendants.
async fn observe(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let method = req.method().as_str().to_string();
    let span = tracing::info_span!(
        target: telemetry::trace::SPANS,
        "node request",
        otel.name = %format_args!("{method} {route}"),
        otel.kind = "server",
        otel.status_code = tracing::field::Empty,
        http.request.method = %method,
        http.route = %route,
        http.response.status_code = tracing::field::Empty,
        tandem.region = %state.config.region,
    );
    if !span.is_disabled() {
        if let Some(ctx) = req.extensions_mut().get_mut::<RequestContext>() {
            telemetry::trace::continue_from(&span, ctx.traceparent.as_deref());
            if let Some(own) = telemetry::trace::traceparent(&span) {
                ctx.traceparent = Some(own);
            }
        }
    }
    let started = Instant::now();
    let response = next.run(req).instrument(span.clone()).await;
    let m = &state.wf.metrics;
    m.http_requests
        .with_label_values(&[&route, &method, response.status().as_str()])
        .inc();
    m.http_duration
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    span.record("http.response.status_code", response.status().as_u16());
    if response.status().is_server_error() {
        span.record("otel.status_code", "ERROR");
    }
    response
}

/// A JSON body whose every failure is answered in our error format:
/// too large -> 413 `payload_too_large`, not JSON -> 400 `malformed_json`.
pub struct JsonBody(pub Value);

impl<S: Send + Sync> FromRequest<S> for JsonBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        parse_json(&bytes).map(JsonBody)
    }
}

/// Like [`JsonBody`], but an empty body is fine (`None`).
pub struct OptionalJsonBody(pub Option<Value>);

impl<S: Send + Sync> FromRequest<S> for OptionalJsonBody {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = body_bytes(req, state).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJsonBody(None));
        }
        parse_json(&bytes).map(|v| OptionalJsonBody(Some(v)))
    }
}

/// The whole body, within [`MAX_BODY`] and the body timeout (a client trickling its
/// body must not hold a connection and a handler forever).
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    let timeout = req
        .extensions()
        .get::<BodyTimeout>()
        .map_or(Duration::from_secs(30), |t| t.0);
    let read = tokio::time::timeout(timeout, Bytes::from_request(req, state))
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} ms",
                    timeout.as_millis()
                ),
            )
        })?;
    read.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!("request body over {MAX_BODY} bytes"),
            )
        } else {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "malformed_body",
                rejection.body_text(),
            )
        }
    })
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    })
}

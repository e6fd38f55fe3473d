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

use crate::config::Config;
use crate::workflow::Workflow;
use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, MatchedPath, Request, State};
use axum::http::{request::Parts, HeaderName, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{delete, get, post, put};
use axum::Router;
use serde_json::Value;
use std::sync::Arc;
use std::time::Instant;
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
    Router::new()
        .route("/orders", post(public::place_order))
        .route("/orders/{order_id}", get(public::get_order))
        .route("/orders/{order_id}/cancel", post(public::cancel_order))
        .route(
            "/api/v1/products/check-availability",
            post(public::check_availability),
        )
        .route(
            "/api/v1/products/{sku}",
            put(public::upsert_product).get(public::get_product),
        )
        .route("/shipments/{shipment_id}/dispatch", post(public::dispatch))
        .route("/shipments/{shipment_id}/deliver", post(public::deliver))
        .route("/api/events", get(events::list))
        .route("/api/events/{event_id}", get(events::one))
        .route(
            "/api/v1/webhooks",
            post(webhooks::create).get(webhooks::list),
        )
        .route("/api/v1/webhooks/{webhook_id}", delete(webhooks::delete))
        .route(
            "/api/v1/webhooks/{webhook_id}/dead-letters",
            get(webhooks::dead_letters),
        )
        .route("/health/live", get(ops::live))
        .route("/health/ready", get(ops::ready))
        .route("/metrics", get(ops::metrics))
        .merge(admin)
        .fallback(|| async { ApiError::not_found("route") })
        .route_layer(middleware::from_fn_with_state(state.clone(), observe))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .layer(middleware::from_fn_with_state(state.clone(), context))
        .with_state(state)
}

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
    let mut response = next.run(req).await;
    let headers = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(state.config.region.as_str()) {
        headers.insert(X_REGION.clone(), v);
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        headers.insert(X_REQUEST_ID.clone(), v);
    }
    response
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

/// The whole body, within [`MAX_BODY`].
async fn body_bytes<S: Send + Sync>(req: Request, state: &S) -> Result<Bytes, ApiError> {
    Bytes::from_request(req, state).await.map_err(|rejection| {
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

//! Liveness, readiness and metrics.

use super::{ApiError, AppState};
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

pub async fn live() -> Json<serde_json::Value> {
    Json(json!({ "status": "ok" }))
}

/// 200 when the node can serve: Redis answers, the role is known and, on a standby,
/// the projection follows the log (a halted one could not take over).
pub async fn ready(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let redis = st.wf.store.ping().await;
    let role = st.wf.roles.current();
    let halt = st.wf.projection.halted();
    let ok = redis.is_ok() && role.known && halt.is_none();
    let mut body = json!({
        "region": st.config.region,
        "role": role.role,
        "epoch": role.epoch,
        "fenced": role.fenced,
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
    });
    if let Some(h) = halt {
        body["reason"] = json!(format!("projection_halted: {h}"));
        body["projection"] = json!({ "halted": true, "entry": h.entry, "reason": h.reason });
    }
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    Ok((status, Json(body)))
}

pub async fn metrics(State(st): State<AppState>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        st.wf.metrics.render(),
    )
}

/// The OpenAPI 3.1 document of the public API, written by hand (`openapi/node.json` at
/// the repository's root) so that a change of the API is a reviewable change of it.
pub const OPENAPI: &str = include_str!("../../../openapi/node.json");

pub async fn openapi() -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI)
}

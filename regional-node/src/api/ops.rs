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

/// 200 when the node can serve: Redis answers and the role is known.
pub async fn ready(State(st): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let redis = st.wf.store.ping().await;
    let role = st.wf.roles.current();
    let ok = redis.is_ok() && role.known;
    let body = json!({
        "region": st.config.region,
        "role": role.role,
        "epoch": role.epoch,
        "fenced": role.fenced,
        "redis": if redis.is_ok() { "ok" } else { "unavailable" },
    });
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

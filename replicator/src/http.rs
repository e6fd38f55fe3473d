//! `/metrics`, `/health/live` and `/health/ready`.
//!
//! Ready means both Redis servers answered the last time they were asked; whether the
//! replicator is copying is reported but does not decide readiness (an idle replicator
//! next to an active region is doing its job).

use crate::status::Shared;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;

pub fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/metrics", get(metrics))
        .route("/health/live", get(live))
        .route("/health/ready", get(ready))
        .with_state(shared)
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        shared.metrics.render(),
    )
        .into_response()
}

async fn live() -> Json<serde_json::Value> {
    Json(json!({"status": "live"}))
}

/// Per-stream lag as last measured (see [`crate::lag`]), for operators and for a
/// planned switchover that waits for zero.
fn lag(shared: &Shared) -> serde_json::Value {
    let streams = shared.streams.borrow().clone();
    let m = &shared.metrics;
    let per_stream: serde_json::Map<String, serde_json::Value> = streams
        .into_iter()
        .map(|s| {
            let events = m.lag_events.with_label_values(&[&s]).get();
            let seconds = m.lag_seconds.with_label_values(&[&s]).get();
            (s, json!({"events": events, "seconds": seconds}))
        })
        .collect();
    serde_json::Value::Object(per_stream)
}

async fn ready(State(shared): State<Arc<Shared>>) -> Response {
    let h = shared.health();
    let gate = shared.gate.borrow().clone();
    let role = |r: Option<eventlog::RoleRecord>| {
        r.map(|r| json!({"role": r.role.as_str(), "epoch": r.epoch.0}))
            .unwrap_or(serde_json::Value::Null)
    };
    let mut reasons = Vec::new();
    if !h.checked && h.local_error.is_none() && h.peer_error.is_none() {
        reasons.push("not checked yet".to_string());
    }
    reasons.extend(h.local_error.iter().map(|e| format!("local: {e}")));
    reasons.extend(h.peer_error.iter().map(|e| format!("peer: {e}")));
    let ok = reasons.is_empty();
    let body = json!({
        "local": {
            "region": shared.config.local_region.as_str(),
            "redis": if h.local_error.is_none() { "ok" } else { "unreachable" },
            "role": role(h.local_role),
        },
        "peer": {
            "region": shared.config.peer_region.as_str(),
            "redis": if h.peer_error.is_none() { "ok" } else { "unreachable" },
            "role": role(h.peer_role),
        },
        "copying": gate.is_copy(),
        "state": gate.name(),
        "reason": if ok { h.reason.clone().map(serde_json::Value::String).unwrap_or(serde_json::Value::Null) }
                  else { serde_json::Value::String(reasons.join("; ")) },
        "streams": *shared.streams.borrow(),
        "lag": lag(&shared),
    });
    let status = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(body)).into_response()
}

//! Admin endpoints: role and epoch, lease, dead letters, rebuild, quarantine.
//! Guarded by `NODE_ADMIN_TOKEN` (bearer), or loopback-only when no token is set.

use super::{ApiError, AppState, JsonBody};
use crate::bus;
use crate::projector;
use crate::promotion;
use axum::extract::{ConnectInfo, FromRequestParts, Path, State};
use axum::http::{request::Parts, StatusCode};
use axum::Json;
use eventlog::{keys, Role};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::Duration;

/// Proof that the caller may use admin endpoints.
pub struct Admin;

impl FromRequestParts<AppState> for Admin {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, ApiError> {
        let unauthorized = || {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "admin endpoints need `Authorization: Bearer <NODE_ADMIN_TOKEN>`",
            )
        };
        match &st.config.admin_token {
            Some(token) => {
                let given = parts
                    .headers
                    .get("authorization")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("Bearer "));
                // Compare without an early exit, so timing does not reveal the token.
                let ok = given.is_some_and(|g| {
                    g.len() == token.len()
                        && g.bytes()
                            .zip(token.bytes())
                            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                            == 0
                });
                if ok {
                    Ok(Admin)
                } else {
                    Err(unauthorized())
                }
            }
            None => {
                let peer = parts
                    .extensions
                    .get::<ConnectInfo<SocketAddr>>()
                    .map(|c| c.0.ip());
                if peer.is_some_and(|ip| ip.is_loopback()) {
                    Ok(Admin)
                } else {
                    Err(unauthorized())
                }
            }
        }
    }
}

fn epoch_of(body: &Value) -> Result<u64, ApiError> {
    body.get("epoch")
        .and_then(Value::as_u64)
        .filter(|e| *e > 0)
        .ok_or_else(|| {
            ApiError::validation(
                "epoch must be a positive whole number",
                vec!["epoch".into()],
            )
        })
}

async fn role_json(st: &AppState) -> Result<Value, ApiError> {
    let role = st.wf.roles.refresh().await;
    if !role.known {
        st.wf.store.ping().await?;
    }
    let last = st.wf.store.last_id(keys::EVENTS).await?;
    Ok(json!({
        "region": st.config.region,
        "role": role.role,
        "epoch": role.epoch,
        "fenced": role.fenced,
        "paused": role.paused,
        "leaseRemainingMs": st.wf.roles.lease_remaining().map(|d| d.as_millis() as u64),
        "lastEventId": last,
    }))
}

pub async fn role(_: Admin, State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    Ok(Json(role_json(&st).await?))
}

pub async fn promote(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    promotion::promote(&st.wf, epoch).await?;
    Ok(Json(role_json(&st).await?))
}

pub async fn demote(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    st.wf.roles.transition(Role::Standby, epoch).await?;
    Ok(Json(role_json(&st).await?))
}

pub async fn lease(
    _: Admin,
    State(st): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    let ttl = body
        .get("ttlMs")
        .and_then(Value::as_u64)
        .filter(|t| (1..=60_000).contains(t))
        .ok_or_else(|| ApiError::validation("ttlMs must be 1-60000", vec!["ttlMs".into()]))?;
    let role = st
        .wf
        .roles
        .grant_lease(epoch, Duration::from_millis(ttl))
        .await?;
    Ok(Json(json!({
        "region": st.config.region,
        "role": role.role,
        "epoch": role.epoch,
        "leaseRemainingMs": st.wf.roles.lease_remaining().map(|d| d.as_millis() as u64),
    })))
}

pub async fn dlq(_: Admin, State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let entries = st.wf.store.xrange(keys::DLQ, "-", "+", 1000).await?;
    Ok(Json(
        json!({ "entries": entries.iter().map(bus::dlq_view).collect::<Vec<_>>() }),
    ))
}

pub async fn replay(
    _: Admin,
    State(st): State<AppState>,
    Path(entry_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if eventlog::envelope::StreamId::parse(&entry_id).is_none() {
        return Err(ApiError::not_found(format!("dead-letter entry {entry_id}")));
    }
    Ok(Json(bus::replay(&st.wf, &entry_id).await?))
}

pub async fn rebuild(_: Admin, State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let report = projector::rebuild(&st.wf.store).await?;
    tracing::info!(
        events = report.events,
        keys = report.keys,
        "derived state rebuilt from the event stream"
    );
    Ok(Json(
        json!({ "rebuilt": true, "events": report.events, "keys": report.keys }),
    ))
}

pub async fn quarantine(_: Admin, State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let entries = st.wf.store.xrange(keys::QUARANTINE, "-", "+", 1000).await?;
    let view: Vec<Value> = entries
        .iter()
        .map(|e| {
            let event: Value = e
                .field_str("event")
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or(Value::Null);
            json!({
                "id": e.id,
                "stream": e.field_str("stream"),
                "originalId": e.field_str("originalId"),
                "epoch": e.field_str("epoch"),
                "event": event,
            })
        })
        .collect();
    Ok(Json(json!({ "count": view.len(), "events": view })))
}

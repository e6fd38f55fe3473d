//! `/api/v1/webhooks` (API.md): subscribe, list, delete. Behind the gateway these need
//! the `webhooks:write` scope.

use super::{requests, ApiError, AppState, JsonBody, RequestContext};
use crate::webhooks;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use orders_model::Cause;
use serde_json::{json, Value};

/// `POST /api/v1/webhooks {"url","events"}` -> 201 `{"id","url","events","secret"}`.
pub async fn create(
    State(st): State<AppState>,
    ctx: RequestContext,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let (url, events) = requests::webhook(&body)?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let (hook, secret) = webhooks::subscribe(&st.wf, url, events, &cause).await?;
    Ok((
        StatusCode::CREATED,
        Json(webhooks::view(&hook, Some(&secret))),
    )
        .into_response())
}

/// `GET /api/v1/webhooks`: `{"webhooks":[{"id","url","events","createdAt"}]}`. The
/// secret is shown once, when the webhook is created (as Stripe and Svix do): a list
/// is read more often and by more tools, and whoever holds a secret can forge
/// deliveries. A lost secret is replaced by a new subscription.
pub async fn list(State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let hooks = webhooks::list(&st.wf.store).await?;
    let list: Vec<Value> = hooks.values().map(|h| webhooks::view(h, None)).collect();
    Ok(Json(json!({ "webhooks": list })))
}

/// `DELETE /api/v1/webhooks/{id}` -> 204; deliveries stop.
pub async fn delete(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = requests::webhook_id(&id)?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    webhooks::delete(&st.wf, &id, &cause).await?;
    Ok(StatusCode::NO_CONTENT)
}

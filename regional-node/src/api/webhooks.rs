//! `/api/v1/webhooks` (API.md): subscribe, list, delete. Behind the gateway these need
//! the `webhooks:write` scope.

use super::{requests, ApiError, AppState, JsonBody, RequestContext};
use crate::webhooks;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use eventlog::envelope::StreamId;
use eventlog::keys;
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

#[derive(Debug, serde::Deserialize)]
pub struct DeadLetterQuery {
    after: Option<String>,
    limit: Option<String>,
}

const MAX_DEAD_LETTERS: usize = 1000;

/// `GET /api/v1/webhooks/{id}/dead-letters?after=&limit=`: the events this webhook's
/// deliveries gave up on, oldest first: `{"entries":[{"id","eventId","streamId",
/// "attempts","error","event"}],"next"}` (`next` is the cursor for `after`). They stay
/// readable after the webhook is deleted.
pub async fn dead_letters(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<DeadLetterQuery>,
) -> Result<Json<Value>, ApiError> {
    let id = requests::webhook_id(&id)?;
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_DEAD_LETTERS).contains(l))
            .ok_or_else(|| {
                ApiError::validation(
                    format!("limit must be 1-{MAX_DEAD_LETTERS}"),
                    vec!["limit".into()],
                )
            })?,
    };
    let start = match q.after.as_deref() {
        None | Some("") => "-".to_string(),
        Some(a) => format!(
            "({}",
            StreamId::parse(a).ok_or_else(|| {
                ApiError::validation(
                    "after must be a cursor returned as `next`",
                    vec!["after".into()],
                )
            })?
        ),
    };
    let stream = keys::webhook_dlq(id.as_str());
    let entries = st.wf.store.xrange(&stream, &start, "+", limit).await?;
    if entries.is_empty() && start == "-" {
        let live = webhooks::list(&st.wf.store).await?;
        if !live.contains_key(&id) {
            return Err(ApiError::not_found(format!("webhook {}", id.as_str())));
        }
    }
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id.clone()))
        .flatten();
    let list: Vec<Value> = entries
        .iter()
        .map(|e| {
            let text = |f: &str| e.field_str(f).unwrap_or_default().to_string();
            json!({
                "id": e.id,
                "eventId": text("eventId"),
                "streamId": text("streamId"),
                "attempts": text("attempts").parse::<u64>().ok(),
                "error": text("error"),
                "event": e.field("event").and_then(|b| serde_json::from_slice::<Value>(b).ok()),
            })
        })
        .collect();
    Ok(Json(json!({ "entries": list, "next": next })))
}

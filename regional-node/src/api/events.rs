//! The event store API (seed): list events oldest first with filters and a cursor,
//! and fetch one by id. The cursor is the stream entry id, so paging is stable while
//! new events arrive.

use super::identity::Caller;
use super::{ApiError, AppState};
use crate::store::Entry;
use axum::extract::{Path, Query, State};
use axum::Json;
use eventlog::envelope::StreamId;
use eventlog::keys;
use orders_model::integration;
use orders_model::pii::{self, Disclosure, KeyRing};
use serde::Deserialize;
use serde_json::{json, Value};

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ListQuery {
    event_type: Option<String>,
    aggregate_id: Option<String>,
    after: Option<String>,
    limit: Option<String>,
    format: Option<String>,
}

/// What `GET /api/events` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    /// The domain events in their envelopes (the default).
    Envelope,
    /// The integration events (seed 002's `order.status_updated`), each derived from
    /// its domain event by `orders_model::integration::derive`, so both regions list
    /// the same ones with the same ids.
    Integration,
}

/// The integration event of a stream entry, if it has one.
fn integration_json(entry: &Entry) -> Option<Value> {
    let env = entry.envelope().ok()?;
    let event = orders_model::DomainEvent::from_envelope(&env).ok()?;
    serde_json::to_value(integration::derive(&env, &event)?).ok()
}

const MAX_LIMIT: usize = 1000;
/// A filtered scan stops after this many entries and hands back a cursor.
const MAX_SCAN: usize = 10_000;

/// An event as the public sees it: never a payment token, a shipping address only
/// for a caller with `pii:read` (see `identity`).
fn event_json(ring: &KeyRing, disclosure: Disclosure, entry: &Entry) -> Option<Value> {
    let mut v: Value =
        serde_json::from_slice(entry.field(eventlog::envelope::FIELD_EVENT)?).ok()?;
    let aggregate = v["aggregateId"].as_str().unwrap_or_default().to_string();
    if let Some(payload) = v.get_mut("payload") {
        // A webhook's signing secret (sealed) is for the deliverer only.
        if let Some(obj) = payload.as_object_mut() {
            obj.remove("secret");
        }
        if let Err(e) = pii::disclose(payload, &aggregate, ring, disclosure) {
            tracing::warn!(stream_id = %entry.id, error = %e, "shipping address withheld");
        }
    }
    v["streamId"] = json!(entry.id);
    Some(v)
}

pub async fn list(
    State(st): State<AppState>,
    caller: Caller,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let format = match q.format.as_deref() {
        None | Some("") | Some("envelope") => Format::Envelope,
        Some("integration") => Format::Integration,
        Some(_) => {
            return Err(ApiError::validation(
                "format must be `envelope` or `integration`",
                vec!["format".into()],
            ))
        }
    };
    let event_json = |entry: &Entry| match format {
        Format::Envelope => event_json(&st.wf.pii, caller.events(), entry),
        Format::Integration => integration_json(entry),
    };
    let limit = match q.limit.as_deref() {
        None => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_LIMIT).contains(l))
            .ok_or_else(|| {
                ApiError::validation(format!("limit must be 1-{MAX_LIMIT}"), vec!["limit".into()])
            })?,
    };
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(StreamId::parse(a).ok_or_else(|| {
            ApiError::validation(
                "after must be a cursor returned as `next`",
                vec!["after".into()],
            )
        })?),
    };
    let wanted = |e: &Entry| match (&q.event_type, format) {
        (Some(t), Format::Envelope) if !t.is_empty() => {
            e.field_str(eventlog::envelope::FIELD_TYPE) == Some(t.as_str())
        }
        // Only one integration event type exists; any other names none.
        (Some(t), Format::Integration) if !t.is_empty() => {
            integration::IntegrationEventType::parse(t).is_some()
        }
        _ => true,
    };
    let store = &st.wf.store;
    let mut events = Vec::new();
    let mut next = None;
    // The stream entry of the last event listed: where the next page starts.
    let mut last_listed: Option<String> = None;

    if let Some(aggregate) = q.aggregate_id.as_deref().filter(|a| !a.is_empty()) {
        let ids: Vec<String> = store
            .query(
                redis::cmd("LRANGE")
                    .arg(keys::aggregate(aggregate))
                    .arg(0)
                    .arg(-1),
            )
            .await?;
        let ids: Vec<String> = ids
            .into_iter()
            .filter(|id| after.is_none_or(|a| StreamId::parse(id).is_some_and(|i| i > a)))
            .collect();
        for chunk in ids.chunks(100) {
            let mut pipe = redis::pipe();
            for id in chunk {
                pipe.cmd("XRANGE").arg(keys::EVENTS).arg(id).arg(id);
            }
            let replies: Vec<redis::Value> = store.query_pipe(&pipe).await?;
            for entry in replies.into_iter().flat_map(Entry::from_range) {
                if events.len() == limit {
                    next = last_listed.take();
                    break;
                }
                if wanted(&entry) {
                    if let Some(v) = event_json(&entry) {
                        events.push(v);
                        last_listed = Some(entry.id.clone());
                    }
                }
            }
            if next.is_some() {
                break;
            }
        }
    } else {
        let mut start = after.map(|a| format!("({a}")).unwrap_or_else(|| "-".into());
        let mut scanned = 0;
        'scan: loop {
            let batch = store.xrange(keys::EVENTS, &start, "+", 500).await?;
            for entry in &batch {
                scanned += 1;
                if wanted(entry) {
                    events.extend(event_json(entry));
                    if !events.is_empty() && events.len() == limit {
                        // There may be more: the client continues after this one.
                        next = Some(entry.id.clone());
                        break 'scan;
                    }
                }
            }
            let Some(last) = batch.last() else { break };
            if batch.len() < 500 {
                break;
            }
            if scanned >= MAX_SCAN {
                // A sparse filter: hand back where the scan stopped.
                next = Some(last.id.clone());
                break;
            }
            start = format!("({}", last.id);
        }
    }
    Ok(Json(json!({ "events": events, "next": next })))
}

pub async fn one(
    State(st): State<AppState>,
    caller: Caller,
    Path(event_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let not_found = || ApiError::not_found(format!("event {event_id}"));
    if event_id.len() > 64 {
        return Err(not_found());
    }
    // An integration event's id names the domain event it is derived from.
    let integration = event_id.strip_prefix(integration::EVENT_ID_PREFIX);
    let id: Option<String> = st
        .wf
        .store
        .query(
            redis::cmd("HGET")
                .arg(keys::EVENT_INDEX)
                .arg(integration.unwrap_or(&event_id)),
        )
        .await?;
    let id = id.ok_or_else(not_found)?;
    let entry = st
        .wf
        .store
        .xrange(keys::EVENTS, &id, &id, 1)
        .await?
        .into_iter()
        .next()
        .ok_or_else(not_found)?;
    match integration {
        Some(_) => integration_json(&entry),
        None => event_json(&st.wf.pii, caller.events(), &entry),
    }
    .map(Json)
    .ok_or_else(not_found)
}

//! Admin endpoints: role and epoch, lease, dead letters, rebuild, quarantine.
//! Guarded by `NODE_ADMIN_TOKEN` (bearer), or loopback-only when no token is set.

use super::{ApiError, AppState, JsonBody, OptionalJsonBody};
use crate::bus;
use crate::dead_letters;
use crate::jobs::{Jobs, Waited};
use crate::projector::{self, RebuildError, RebuildReport};
use crate::promotion::{self, PromotionError};
use crate::store::Entry;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Query, State};
use axum::http::{request::Parts, HeaderMap, StatusCode};
use axum::Json;
use eventlog::envelope::StreamId;
use eventlog::{keys, Role};
use orders_model::EventType;
use serde_json::{json, Value};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// How long a promote request waits for the promotion before answering 503
/// `promotion_in_progress` (the promotion goes on; the caller asks again with the same
/// epoch). Short enough for the gateway's control-call timeout.
const PROMOTE_WAIT: Duration = Duration::from_secs(1);
/// How long a rebuild request waits before answering 202 (the rebuild goes on).
const REBUILD_WAIT: Duration = Duration::from_secs(30);

/// The admin jobs that must not be cut short by a caller going away.
#[derive(Default)]
pub struct AdminJobs {
    /// Keyed by epoch: a repeated request for the same epoch joins the running one.
    promotion: Jobs<u64, Result<(), Arc<PromotionError>>>,
    rebuild: Jobs<(), Result<RebuildReport, Arc<RebuildError>>>,
}

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

/// Who asked for a role change or a lease: the gateway's `Tandem-Gateway` header.
/// Each such call is logged with it (promote and demote at info, lease renewals at
/// debug), so an operator can tell which gateway acted when, as several may run.
fn caller(headers: &HeaderMap) -> &str {
    headers
        .get("tandem-gateway")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("-")
}

fn outcome<T>(result: &Result<T, impl std::fmt::Display>) -> String {
    match result {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

/// `notAfterMs` of a control call: the gateway's bound, by its wall clock, of the write
/// window the call may open. Optional: older gateways, and a single gateway for its
/// promotions, do not send it.
fn not_after_of(body: &Value) -> Result<Option<std::time::SystemTime>, ApiError> {
    match body.get("notAfterMs") {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .map(|ms| Some(std::time::UNIX_EPOCH + Duration::from_millis(ms)))
            .ok_or_else(|| {
                ApiError::validation(
                    "notAfterMs must be a unix time in milliseconds",
                    vec!["notAfterMs".into()],
                )
            }),
    }
}

pub async fn promote(
    _: Admin,
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    // Bounds the write window the promotion opens until the first lease (a promotion
    // may finish after the gateway that asked for it lost control).
    let not_after = not_after_of(&body)?;
    let result = start_promotion(&st, epoch, not_after).await;
    tracing::info!(
        caller = caller(&headers),
        action = "promote",
        epoch,
        outcome = result.as_ref().map_or_else(|e| e.code, |_| "ok"),
        "control call"
    );
    result
}

async fn start_promotion(
    st: &AppState,
    epoch: u64,
    not_after: Option<std::time::SystemTime>,
) -> Result<Json<Value>, ApiError> {
    let (wf, limit) = (st.wf.clone(), st.config.promotion_timeout());
    let job = st
        .jobs
        .promotion
        .start(epoch, async move {
            promotion::promote(&wf, epoch, limit, not_after)
                .await
                .map_err(Arc::new)
        })
        .map_err(|running| {
            in_progress(format!(
                "a promotion to epoch {running} is in progress; retry"
            ))
        })?;
    match job.wait(PROMOTE_WAIT).await {
        Waited::Done(Ok(())) => Ok(Json(role_json(st).await?)),
        Waited::Done(Err(e)) => Err(ApiError::from(&*e)),
        Waited::Running => Err(in_progress(format!(
            "the promotion to epoch {epoch} is still running (applying the replicated backlog); \
             ask again with the same epoch"
        ))),
    }
}

fn in_progress(message: String) -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "promotion_in_progress",
        message,
    )
}

pub async fn demote(
    _: Admin,
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    let result = st.wf.roles.transition(Role::Standby, epoch).await;
    tracing::info!(caller = caller(&headers), action = "demote", epoch, outcome = %outcome(&result), "control call");
    result?;
    Ok(Json(role_json(&st).await?))
}

pub async fn lease(
    _: Admin,
    State(st): State<AppState>,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let epoch = epoch_of(&body)?;
    let ttl = body
        .get("ttlMs")
        .and_then(Value::as_u64)
        .filter(|t| (1..=60_000).contains(t))
        .ok_or_else(|| ApiError::validation("ttlMs must be 1-60000", vec!["ttlMs".into()]))?;
    // The gateway's bound of this renewal (see `Roles::grant_lease`).
    let not_after = not_after_of(&body)?;
    let result = st
        .wf
        .roles
        .grant_lease(epoch, Duration::from_millis(ttl), not_after)
        .await;
    tracing::debug!(caller = caller(&headers), action = "lease", epoch, ttl_ms = ttl, outcome = %outcome(&result), "control call");
    let role = result?;
    Ok(Json(json!({
        "region": st.config.region,
        "role": role.role,
        "epoch": role.epoch,
        "leaseRemainingMs": st.wf.roles.lease_remaining().map(|d| d.as_millis() as u64),
    })))
}

/// `GET /admin/dlq?group=&eventType=&after=&limit=`: the entries not yet replayed,
/// oldest first, a page at a time (`limit` 1-1000, 1000 by default as before paging
/// existed); `next` is the `after` of the following page, `null` at the end.
pub async fn dlq(
    _: Admin,
    State(st): State<AppState>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, ApiError> {
    let text = |k: &str| q.get(k).map(|v| Param::Text(v.as_str()));
    let sel = Selection::parse(
        text("group"),
        text("eventType"),
        text("after"),
        text("limit"),
        dead_letters::MAX_LIMIT,
    )?;
    let page = dead_letters::page(&st.wf.store, &sel.filter, sel.after, sel.limit).await?;
    Ok(Json(json!({
        "entries": page.entries.iter().map(dlq_view).collect::<Vec<_>>(),
        "next": page.next,
    })))
}

/// `POST /admin/dlq/replay {"group","eventType","after","limit"}` (all optional; no
/// body: every entry): replays the entries `GET /admin/dlq` lists for the same
/// selection (`limit` 100 by default), one after the other, each as
/// `POST /admin/dlq/{entryId}/replay` does. Answers what happened to each; entries that
/// failed stay listed, and `next` continues past them.
pub async fn replay_many(
    _: Admin,
    State(st): State<AppState>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<Value>, ApiError> {
    let body = match body {
        None => Value::Object(Default::default()),
        Some(v @ Value::Object(_)) => v,
        Some(_) => {
            return Err(ApiError::validation(
                "the body must be a JSON object",
                Vec::new(),
            ))
        }
    };
    let field = |k: &str| body.get(k).filter(|v| !v.is_null()).map(Param::Json);
    let sel = Selection::parse(
        field("group"),
        field("eventType"),
        field("after"),
        field("limit"),
        BULK_REPLAY_LIMIT,
    )?;
    let report = dead_letters::replay_matching(&st.wf, &sel.filter, sel.after, sel.limit)
        .await
        .map_err(|(e, done)| {
            let mut err = ApiError::from(e);
            err.message = format!("{} ({done} entries were replayed before)", err.message);
            err
        })?;
    let replayed = report.outcomes.iter().filter(|(_, o)| o.is_ok()).count();
    let failed = report.outcomes.len() - replayed;
    let results: Vec<Value> = report
        .outcomes
        .into_iter()
        .map(|(id, outcome)| match outcome {
            Ok(done) => replayed_view(&done),
            Err(e) => {
                let e = ApiError::from(e);
                json!({ "id": id, "error": { "code": e.code, "message": e.message } })
            }
        })
        .collect();
    Ok(Json(json!({
        "replayed": replayed,
        "failed": failed,
        "results": results,
        "next": report.next,
    })))
}

/// Entries one bulk replay takes unless told otherwise.
const BULK_REPLAY_LIMIT: usize = 100;

/// A selection parameter, from the query string or from a JSON body.
enum Param<'a> {
    Text(&'a str),
    Json(&'a Value),
}

impl Param<'_> {
    fn text(&self) -> Option<&str> {
        match self {
            Param::Text(s) => Some(s),
            Param::Json(v) => v.as_str(),
        }
    }

    fn count(&self) -> Option<usize> {
        match self {
            Param::Text(s) => s.parse().ok(),
            Param::Json(v) => v.as_u64().and_then(|n| usize::try_from(n).ok()),
        }
    }
}

/// Which dead letters a request means.
struct Selection {
    filter: dead_letters::Filter,
    after: Option<StreamId>,
    limit: usize,
}

impl Selection {
    /// Every invalid parameter is named in one `validation_failed`.
    fn parse(
        group: Option<Param>,
        event_type: Option<Param>,
        after: Option<Param>,
        limit: Option<Param>,
        default_limit: usize,
    ) -> Result<Selection, ApiError> {
        let mut bad = Vec::new();
        let mut sel = Selection {
            filter: dead_letters::Filter::default(),
            after: None,
            limit: default_limit,
        };
        match group.as_ref().map(Param::text) {
            None | Some(Some("")) => {}
            Some(Some(g)) => match bus::Group::parse(g) {
                Some(g) => sel.filter.group = Some(g),
                None => bad.push("group"),
            },
            Some(None) => bad.push("group"),
        }
        match event_type.as_ref().map(Param::text) {
            None | Some(Some("")) => {}
            Some(Some(t)) => match t.parse::<EventType>() {
                Ok(t) => sel.filter.event_type = Some(t),
                Err(_) => bad.push("eventType"),
            },
            Some(None) => bad.push("eventType"),
        }
        match after.as_ref().map(Param::text) {
            None | Some(Some("")) => {}
            Some(Some(a)) => match StreamId::parse(a) {
                Some(a) => sel.after = Some(a),
                None => bad.push("after"),
            },
            Some(None) => bad.push("after"),
        }
        if let Some(l) = limit {
            match l
                .count()
                .filter(|l| (1..=dead_letters::MAX_LIMIT).contains(l))
            {
                Some(l) => sel.limit = l,
                None => bad.push("limit"),
            }
        }
        if bad.is_empty() {
            return Ok(sel);
        }
        Err(ApiError::validation(
            format!(
                "invalid {}: group is one of inventory, payments, shipments, orders; \
                 eventType an event type of the catalog; after a cursor returned as `next` \
                 (a dead-letter entry id); limit 1-{}",
                bad.join(", "),
                dead_letters::MAX_LIMIT
            ),
            bad.into_iter().map(String::from).collect(),
        ))
    }
}

pub async fn replay(
    _: Admin,
    State(st): State<AppState>,
    Path(entry_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if eventlog::envelope::StreamId::parse(&entry_id).is_none() {
        return Err(ApiError::not_found(format!("dead-letter entry {entry_id}")));
    }
    let replayed = bus::replay(&st.wf, &entry_id).await?;
    Ok(Json(replayed_view(&replayed)))
}

fn replayed_view(r: &bus::Replayed) -> Value {
    json!({
        "id": r.dlq_id,
        "group": r.group.name(),
        "eventId": r.event_id,
        "outcome": r.outcome,
    })
}

/// One dead-letter entry, as `GET /admin/dlq` shows it.
fn dlq_view(entry: &Entry) -> Value {
    json!({
        "id": entry.id,
        "group": entry.field_str("group"),
        "entryId": entry.field_str("entryId"),
        "eventId": entry.field_str("eventId"),
        "eventType": entry.field_str("eventType"),
        "error": entry.field_str("error"),
        "attempts": entry.field_str("attempts").and_then(|a| a.parse::<u32>().ok()),
        "at": entry.field_str("at"),
        "event": stored_event(entry),
    })
}

/// The event JSON an entry of the dead-letter or quarantine stream holds.
fn stored_event(entry: &Entry) -> Value {
    entry
        .field_str("event")
        .and_then(|s| serde_json::from_str(s).ok())
        .unwrap_or(Value::Null)
}

pub async fn rebuild(
    _: Admin,
    State(st): State<AppState>,
) -> Result<(StatusCode, Json<Value>), ApiError> {
    let store = st.wf.store.clone();
    let job = st
        .jobs
        .rebuild
        .start((), async move {
            let result = projector::rebuild(&store).await;
            match &result {
                Ok(report) => tracing::info!(
                    events = report.events,
                    keys = report.keys,
                    "derived state rebuilt from the event stream"
                ),
                Err(e) => tracing::error!(error = %e, "rebuild failed"),
            }
            result.map_err(Arc::new)
        })
        .expect("rebuild jobs share one key");
    match job.wait(REBUILD_WAIT).await {
        Waited::Done(Ok(report)) => Ok((
            StatusCode::OK,
            Json(json!({ "rebuilt": true, "events": report.events, "keys": report.keys })),
        )),
        Waited::Done(Err(e)) => Err(ApiError::from(&*e)),
        Waited::Running => Ok((
            StatusCode::ACCEPTED,
            Json(json!({ "rebuilt": false, "running": true })),
        )),
    }
}

pub async fn quarantine(_: Admin, State(st): State<AppState>) -> Result<Json<Value>, ApiError> {
    let entries = st.wf.store.xrange(keys::QUARANTINE, "-", "+", 1000).await?;
    let view: Vec<Value> = entries
        .iter()
        .map(|e| {
            json!({
                "id": e.id,
                "stream": e.field_str("stream"),
                "originalId": e.field_str("originalId"),
                "epoch": e.field_str("epoch"),
                "event": stored_event(e),
            })
        })
        .collect();
    Ok(Json(json!({ "count": view.len(), "events": view })))
}

//! Public endpoints: orders, products and inventory, shipments.

use super::{ApiError, AppState, JsonBody, OptionalJsonBody, RequestContext};
use crate::config::Durability;
use crate::durability::{Confirmation, Fallback};
use crate::events::Cause;
use crate::inventory::{self, Product, Sku, UpsertProduct};
use crate::orders::{self, Order, PlaceOrder, Placed};
use crate::shipments::{self, Step};
use crate::store::Tx;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use eventlog::envelope::StreamId;
use eventlog::keys;
use serde_json::{json, Value};
use std::time::Duration;

fn idempotency_key(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(raw) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let key = raw
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic()));
    key.map(|k| Some(k.to_string())).ok_or_else(|| {
        ApiError::validation(
            "Idempotency-Key must be 1-255 visible ASCII characters",
            vec!["Idempotency-Key".into()],
        )
    })
}

pub async fn place_order(
    State(st): State<AppState>,
    ctx: RequestContext,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let key = idempotency_key(&headers)?;
    let cmd =
        PlaceOrder::parse(&body).map_err(|(msg, fields)| ApiError::validation(msg, fields))?;
    let replicated = st.config.durability == Durability::Replicated;
    let refuse = st.config.replicated_fallback == Fallback::Refuse;
    if replicated && refuse && st.standby.is_degraded() {
        // Known before anything is written: refuse at once rather than wait. A retry of
        // an order placed before still gets its first answer.
        let replay = match &key {
            Some(k) => orders::idempotent_answer(&st.wf, k, &cmd.fingerprint()).await?,
            None => None,
        };
        if replay.is_none() {
            return Err(replication_unavailable());
        }
    }
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let (answer, replayed) = match orders::place(&st.wf, &cmd, key.as_deref(), &cause).await? {
        Placed::New(answer) => (answer, false),
        Placed::Replayed(answer) => (answer, true),
    };
    let order_id = answer["orderId"].as_str().unwrap_or_default().to_string();
    let local_only = if !replicated {
        false
    } else if replayed {
        // A retry: the first answer stands; say whether the standby is keeping up now.
        st.standby.is_degraded()
    } else if await_standby(&st, &order_id).await? == Confirmation::Held {
        false
    } else {
        if refuse {
            return Err(ApiError {
                extra: Some(json!({ "orderId": order_id })),
                ..ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "replication_timeout",
                    "the order was accepted but the standby has not confirmed it in time; it is not lost",
                )
            });
        }
        true
    };
    let mut response = (StatusCode::CREATED, Json(answer)).into_response();
    let headers = response.headers_mut();
    if let Ok(location) = HeaderValue::from_str(&format!("/orders/{order_id}")) {
        headers.insert(header::LOCATION, location);
    }
    if replayed {
        headers.insert("idempotent-replayed", HeaderValue::from_static("true"));
    }
    if local_only {
        // `replicated` durability fell back: this order is held by this region only
        // (RPO = replication lag, as in `async`) until the standby catches up.
        headers.insert("tandem-durability", HeaderValue::from_static("local"));
    }
    Ok(response)
}

fn replication_unavailable() -> ApiError {
    ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "replication_unavailable",
        "durability is `replicated` and the standby is unreachable or behind; nothing was written",
    )
}

/// `replicated` durability: waits until the standby's Redis holds the order's first
/// event (see `durability`).
async fn await_standby(st: &AppState, order_id: &str) -> Result<Confirmation, ApiError> {
    let ids: Vec<String> = st
        .wf
        .store
        .query(
            redis::cmd("LRANGE")
                .arg(keys::aggregate(order_id))
                .arg(0)
                .arg(0),
        )
        .await?;
    let Some(id) = ids.first().and_then(|id| StreamId::parse(id)) else {
        return Ok(Confirmation::Held);
    };
    let limit = Duration::from_millis(st.config.replicated_timeout_ms);
    Ok(st.standby.confirm(id, limit).await)
}

fn order_id_checked(id: &str) -> Result<(), ApiError> {
    if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    {
        return Err(ApiError::not_found(format!("order {id}")));
    }
    Ok(())
}

pub async fn get_order(
    State(st): State<AppState>,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    order_id_checked(&order_id)?;
    let raw = st
        .wf
        .store
        .get(&keys::order(&order_id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("order {order_id}")))?;
    let order: Order =
        serde_json::from_str(&raw).map_err(|e| crate::store::StoreError::Redis(e.to_string()))?;
    Ok(Json(order.view()))
}

pub async fn cancel_order(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(order_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<Value>, ApiError> {
    order_id_checked(&order_id)?;
    let reason = match body.as_ref().map(|b| b.get("reason")) {
        None | Some(None) | Some(Some(Value::Null)) => None,
        Some(Some(Value::String(r))) if r.len() <= 500 => Some(r.clone()),
        Some(Some(_)) => {
            return Err(ApiError::validation(
                "reason must be text of at most 500 characters",
                vec!["reason".into()],
            ))
        }
    };
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let order = orders::cancel(&st.wf, &order_id, reason, &cause).await?;
    Ok(Json(order.view()))
}

fn sku_from_path(sku: &str) -> Result<Sku, ApiError> {
    Sku::parse(sku).map_err(|msg| ApiError::validation(msg, vec!["sku".into()]))
}

pub async fn upsert_product(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(sku): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let sku = sku_from_path(&sku)?;
    let cmd =
        UpsertProduct::parse(&body).map_err(|(msg, fields)| ApiError::validation(msg, fields))?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let (product, created) = inventory::upsert(&st.wf, &sku, &cmd, &cause).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(product.view())).into_response())
}

pub async fn get_product(
    State(st): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sku = Sku::parse(&sku).map_err(|_| ApiError::not_found(format!("product {sku}")))?;
    let raw = st
        .wf
        .store
        .get(&keys::product(sku.as_str()))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("product {}", sku.as_str())))?;
    let product: Product =
        serde_json::from_str(&raw).map_err(|e| crate::store::StoreError::Redis(e.to_string()))?;
    Ok(Json(product.view()))
}

/// Seed shape: `{"items":[{"product_id","quantity"}]}` -> per-item availability.
pub async fn check_availability(
    State(st): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let mut bad = Vec::new();
    let mut items = Vec::new();
    match body.get("items").and_then(Value::as_array) {
        Some(list) if !list.is_empty() && list.len() <= orders::MAX_ITEMS => {
            for (i, item) in list.iter().enumerate() {
                let sku = item
                    .get("product_id")
                    .and_then(Value::as_str)
                    .and_then(|s| Sku::parse(s).ok());
                let qty = item
                    .get("quantity")
                    .and_then(Value::as_i64)
                    .filter(|q| (1..=orders::MAX_QUANTITY).contains(q));
                if sku.is_none() {
                    bad.push(format!("items[{i}].product_id"));
                }
                if qty.is_none() {
                    bad.push(format!("items[{i}].quantity"));
                }
                if let (Some(s), Some(q)) = (sku, qty) {
                    items.push((s, q));
                }
            }
        }
        _ => bad.push("items".into()),
    }
    if !bad.is_empty() {
        return Err(ApiError::validation(
            format!("invalid fields: {}", bad.join(", ")),
            bad,
        ));
    }
    // A read answered as is: no cached values, which another node may have outdated.
    let mut tx = Tx::fresh();
    tx.peek(
        &st.wf.store,
        items.iter().map(|(s, _)| keys::product(s.as_str())),
    )
    .await?;
    let products = inventory::products_for(&tx, items.iter().map(|(s, _)| s))?;
    let availability = inventory::availability(&products, &items);
    let all = availability.iter().all(|a| a.is_available);
    Ok(Json(json!({ "all_available": all, "items": availability })))
}

pub async fn dispatch(
    st: State<AppState>,
    ctx: RequestContext,
    id: Path<String>,
) -> Result<Json<Value>, ApiError> {
    shipment_step(st, ctx, id, Step::Dispatch).await
}

pub async fn deliver(
    st: State<AppState>,
    ctx: RequestContext,
    id: Path<String>,
) -> Result<Json<Value>, ApiError> {
    shipment_step(st, ctx, id, Step::Deliver).await
}

async fn shipment_step(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(shipment_id): Path<String>,
    step: Step,
) -> Result<Json<Value>, ApiError> {
    order_id_checked(&shipment_id)
        .map_err(|_| ApiError::not_found(format!("shipment {shipment_id}")))?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let order = shipments::advance(&st.wf, &shipment_id, step, &cause).await?;
    Ok(Json(shipments::view(&order)))
}

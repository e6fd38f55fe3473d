//! Public endpoints: orders, products and inventory, shipments.

use super::identity::Caller;
use super::{requests, ApiError, AppState, JsonBody, OptionalJsonBody, RequestContext};
use crate::config::Durability;
use crate::durability::{Confirmation, Fallback};
use crate::shipments::{self, CarrierStep};
use crate::{inventory, orders};
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use eventlog::envelope::StreamId;
use eventlog::keys;
use orders_model::order::PlacedOrder;
use orders_model::pii::Field;
use orders_model::{Cause, Order, OrderId, Product, Sku};
use serde_json::{json, Value};
use std::time::Duration;

pub async fn place_order(
    State(st): State<AppState>,
    ctx: RequestContext,
    headers: HeaderMap,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let key = requests::idempotency_key(&headers)?;
    let cmd = requests::place_order(&body)?;
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
    let (answer, replayed) = match orders::place(&st.wf, &cmd, key.as_ref(), &cause).await? {
        orders::Placed::New(answer) => (answer, false),
        orders::Placed::Replayed(answer) => (answer, true),
    };
    let order_id = answer.order_id.clone();
    // A retry (`replayed`) gets its first answer again, and the same question about the
    // standby as the first attempt: the client may never have seen that first answer (its
    // connection dropped while the node waited for the standby), so "the standby is not
    // degraded right now" says nothing about this order (chaos seed 7003, replicated: three
    // retried orders acknowledged as replicated that were only in a quarantine).
    let local_only = if !replicated
        || await_standby(&st, &order_id, Which::First, !replayed).await? == Confirmation::Held
    {
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
    let mut response = (StatusCode::CREATED, Json(placed_view(&answer))).into_response();
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

/// Which of an order's events a `replicated` acknowledgement waits for.
#[derive(Clone, Copy)]
enum Which {
    /// `OrderPlaced`: the order exists on the standby.
    First,
    /// The latest, e.g. the `OrderCancelled` a cancellation just wrote.
    Last,
}

/// `replicated` durability: waits until the standby's Redis holds the order's first
/// (or latest) event (see `durability`). Without `wait` (a retry, whose event was
/// written long ago) the standby is only asked whether it holds the event now.
async fn await_standby(
    st: &AppState,
    order_id: &OrderId,
    which: Which,
    wait: bool,
) -> Result<Confirmation, ApiError> {
    let at = match which {
        Which::First => 0,
        Which::Last => -1,
    };
    let ids: Vec<String> = st
        .wf
        .store
        .query(
            redis::cmd("LRANGE")
                .arg(keys::aggregate(order_id.as_str()))
                .arg(at)
                .arg(at),
        )
        .await?;
    let Some(id) = ids.first().and_then(|id| StreamId::parse(id)) else {
        return Ok(Confirmation::Held);
    };
    if wait {
        let limit = Duration::from_millis(st.config.replicated_timeout_ms);
        let confirmed = st.standby.confirm(id, limit).await;
        if confirmed != Confirmation::Held {
            return Ok(confirmed);
        }
    }
    Ok(st.standby.holds(id).await)
}

pub async fn get_order(
    State(st): State<AppState>,
    caller: Caller,
    Path(order_id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let order_id = requests::order_id(&order_id)?;
    let order = orders::find(&st.wf, &order_id).await?;
    Ok(Json(order_view(&st, &caller, &order)))
}

pub async fn cancel_order(
    State(st): State<AppState>,
    caller: Caller,
    ctx: RequestContext,
    Path(order_id): Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Response, ApiError> {
    let order_id = requests::order_id(&order_id)?;
    let reason = requests::cancel_reason(body.as_ref())?;
    let replicated = st.config.durability == Durability::Replicated;
    let refuse = st.config.replicated_fallback == Fallback::Refuse;
    if replicated && refuse && st.standby.is_degraded() {
        return Err(replication_unavailable());
    }
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let order = orders::cancel(&st.wf, &order_id, reason, &cause).await?;
    // A cancellation is a promise to the customer like an order is: under `replicated`
    // durability it is acknowledged once the standby holds it, with the same fallback.
    let local_only =
        replicated && await_standby(&st, &order_id, Which::Last, true).await? != Confirmation::Held;
    if local_only && refuse {
        return Err(ApiError {
            extra: Some(json!({ "orderId": order_id })),
            ..ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "replication_timeout",
                "the cancellation was accepted but the standby has not confirmed it in time; it is not lost",
            )
        });
    }
    let mut response = Json(order_view(&st, &caller, &order)).into_response();
    if local_only {
        response
            .headers_mut()
            .insert("tandem-durability", HeaderValue::from_static("local"));
    }
    Ok(response)
}

pub async fn upsert_product(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(sku): Path<String>,
    JsonBody(body): JsonBody,
) -> Result<Response, ApiError> {
    let sku = requests::sku(&sku)?;
    let cmd = requests::upsert_product(&body)?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let (product, created) = inventory::upsert(&st.wf, &sku, &cmd, &cause).await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(product_view(&product))).into_response())
}

pub async fn get_product(
    State(st): State<AppState>,
    Path(sku): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let sku = Sku::parse(&sku).map_err(|_| ApiError::not_found(format!("product {sku}")))?;
    let product = inventory::find(&st.wf, &sku).await?;
    Ok(Json(product_view(&product)))
}

/// Seed shape: `{"items":[{"product_id","quantity"}]}` -> per-item availability.
pub async fn check_availability(
    State(st): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<Value>, ApiError> {
    let items = requests::availability_check(&body)?;
    let availability = inventory::check_availability(&st.wf, &items).await?;
    let all = availability.iter().all(|a| a.is_available);
    Ok(Json(json!({ "all_available": all, "items": availability })))
}

pub async fn dispatch(
    st: State<AppState>,
    ctx: RequestContext,
    id: Path<String>,
) -> Result<Json<Value>, ApiError> {
    shipment_step(st, ctx, id, CarrierStep::Dispatch).await
}

/// Takes an optional `{"deliveredAt","deliveryLocation"}`; bad fields are refused
/// before anything is read or written.
pub async fn deliver(
    st: State<AppState>,
    ctx: RequestContext,
    id: Path<String>,
    OptionalJsonBody(body): OptionalJsonBody,
) -> Result<Json<Value>, ApiError> {
    let details = requests::delivery_details(body.as_ref())?;
    shipment_step(st, ctx, id, CarrierStep::Deliver(details)).await
}

async fn shipment_step(
    State(st): State<AppState>,
    ctx: RequestContext,
    Path(shipment_id): Path<String>,
    step: CarrierStep,
) -> Result<Json<Value>, ApiError> {
    let shipment_id = requests::shipment_id(&shipment_id)?;
    let cause = Cause::request(&ctx.request_id, ctx.traceparent.clone());
    let order = shipments::advance(&st.wf, &shipment_id, step, &cause).await?;
    Ok(Json(shipment_view(&order)))
}

/// The answer to a new order (201), and to its retries.
fn placed_view(p: &PlacedOrder) -> Value {
    json!({
        "orderId": p.order_id,
        "status": p.status,
        "amount": p.amount,
        "currency": p.currency,
        "region": p.region,
    })
}

/// `GET /orders/{id}`. The payment token stays inside; the shipping address is shown
/// only to whom `identity` allows.
fn order_view(st: &AppState, caller: &Caller, o: &Order) -> Value {
    let address = caller.may_see_address(o).then(|| {
        st.wf
            .pii
            .open(
                Field::ShippingAddress,
                o.order_id.as_str(),
                &o.shipping_address,
            )
            .inspect_err(
                |e| tracing::warn!(order_id = %o.order_id, error = %e, "shipping address withheld"),
            )
            .ok()
    });
    let mut view = json!({
        "orderId": o.order_id,
        "customerId": o.customer_id,
        "status": o.status,
        "items": o.items,
        "amount": o.amount,
        "currency": o.currency,
        "paymentId": o.payment_id,
        "paymentStatus": o.payment,
        "shipmentId": o.shipment_id,
        "shipmentStatus": o.shipment,
        "trackingNumber": o.tracking_number,
        "carrier": o.carrier,
        "region": o.region,
        "version": o.version,
        "createdAt": o.created_at,
        "updatedAt": o.updated_at,
        "history": o.history,
    });
    if let Some(Some(address)) = address {
        view["shippingAddress"] = address.into();
    }
    view
}

fn product_view(p: &Product) -> Value {
    json!({
        "sku": p.sku,
        "name": p.name,
        "price": p.price,
        "currency": p.currency,
        "stock": p.stock,
        "reserved": p.reserved,
        "available": p.available(),
        "version": p.version,
    })
}

/// The shipment part of an order, as `POST /shipments/{id}/...` answers it.
fn shipment_view(o: &Order) -> Value {
    json!({
        "shipmentId": o.shipment_id,
        "orderId": o.order_id,
        "status": o.shipment,
        "trackingNumber": o.tracking_number,
        "carrier": o.carrier,
        "orderStatus": o.status,
    })
}

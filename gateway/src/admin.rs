//! The gateway's own endpoints: `/gateway/health`, `/gateway/regions`, planned
//! switchover, drain and undrain (behind `GATEWAY_ADMIN_TOKEN`), and `/metrics`.

use crate::error::GatewayError;
use crate::proxy::{full_body, Body};
use crate::Shared;
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use hyper::http::{header, HeaderValue, Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;

/// Answers a request for `/gateway/*` or `/metrics`.
pub async fn handle(shared: &Shared, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    match route(shared, req, peer).await {
        Ok(resp) => resp,
        Err(e) => {
            shared.metrics.rejected.with_label_values(&[e.code()]).inc();
            e.to_response()
        }
    }
}

async fn route(
    shared: &Shared,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Result<Response<Body>, GatewayError> {
    let path = req.uri().path().trim_end_matches('/').to_string();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    match (req.method(), segs.as_slice()) {
        (&Method::GET, ["metrics"]) => {
            // Control can end between two changes the controller task sees (a
            // keep-alive that fails): read it as of now.
            let controlling = shared.controller.is_controller();
            shared.metrics.controller.set(i64::from(controlling));
            let mut resp = Response::new(full_body(shared.metrics.render()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            Ok(resp)
        }
        (&Method::GET, ["openapi.json"]) => {
            let mut resp = Response::new(full_body(crate::openapi::document()));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            Ok(resp)
        }
        (&Method::GET, ["gateway", "health"]) => Ok(health(shared)),
        (&Method::GET, ["gateway", "regions"]) => Ok(json(StatusCode::OK, regions(shared))),
        (&Method::POST, ["gateway", "failover"]) => {
            authorize(shared, &req, peer)?;
            let body = read_json(req).await?;
            let to = body["to"]
                .as_str()
                .ok_or_else(|| {
                    GatewayError::BadRequest("body must be {\"to\":\"<region>\"}".into())
                })?
                .to_string();
            let done = shared.controller.switchover(&to).await?;
            Ok(json(
                StatusCode::OK,
                serde_json::to_value(done).expect("serialize switchover"),
            ))
        }
        (&Method::POST, ["gateway", "regions", id, action @ ("drain" | "undrain")]) => {
            authorize(shared, &req, peer)?;
            let region = shared.routing.find(id).ok_or(GatewayError::NotFound)?;
            let drained = *action == "drain";
            shared.routing.set_drained(region.index, drained);
            tracing::info!(region = %region.id, drained, "drain state changed");
            Ok(json(StatusCode::OK, regions(shared)))
        }
        (_, ["metrics" | "openapi.json"] | ["gateway", "health" | "regions" | "failover"]) => {
            Err(GatewayError::MethodNotAllowed)
        }
        (_, ["gateway", "regions", _, "drain" | "undrain"]) => Err(GatewayError::MethodNotAllowed),
        _ => Err(GatewayError::NotFound),
    }
}

/// With `GATEWAY_ADMIN_TOKEN` set, the bearer token must match; without it, admin
/// requests are taken only from loopback clients.
fn authorize(
    shared: &Shared,
    req: &Request<Incoming>,
    peer: SocketAddr,
) -> Result<(), GatewayError> {
    match &shared.config.admin_token {
        Some(token) => {
            let given = req
                .headers()
                .get(header::AUTHORIZATION)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "));
            match given {
                Some(g) if constant_time_eq(g.as_bytes(), token.as_bytes()) => Ok(()),
                _ => Err(GatewayError::Unauthorized),
            }
        }
        None if peer.ip().is_loopback() => Ok(()),
        None => Err(GatewayError::Unauthorized),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn read_json(req: Request<Incoming>) -> Result<serde_json::Value, GatewayError> {
    let bytes = Limited::new(req.into_body(), 64 * 1024)
        .collect()
        .await
        .map_err(|_| GatewayError::BadRequest("body could not be read".into()))?
        .to_bytes();
    serde_json::from_slice(&bytes)
        .map_err(|e| GatewayError::BadRequest(format!("invalid JSON: {e}")))
}

fn health(shared: &Shared) -> Response<Body> {
    let routing = &shared.routing;
    let can_write = routing.pick_write().is_some();
    let can_read = routing
        .pick_read(crate::routing::Tried::default())
        .is_some();
    let ok = shared.controller.is_ready() && (can_write || can_read);
    let body = serde_json::json!({
        "status": if ok { "ok" } else { "unavailable" },
        "active": routing.active().map(|i| routing.region(i).id.clone()),
        "epoch": routing.epoch(),
        "writes": can_write,
        "reads": can_read,
    });
    json(
        if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        },
        body,
    )
}

fn regions(shared: &Shared) -> serde_json::Value {
    let routing = &shared.routing;
    let active = routing.active();
    let list: Vec<serde_json::Value> = routing
        .regions()
        .iter()
        .map(|r| {
            let reported = r.reported.lock().unwrap_or_else(|e| e.into_inner()).clone();
            let role = if active == Some(r.index) {
                "active".to_string()
            } else {
                match &reported {
                    Some((role, _)) if role != "active" => role.clone(),
                    _ => "standby".to_string(),
                }
            };
            serde_json::json!({
                "id": r.id,
                "url": r.url,
                "healthy": r.is_healthy(),
                "role": role,
                "drained": r.is_drained(),
                "lastProbeMs": r.last_probe_ms.load(Ordering::Relaxed),
                "reportedEpoch": reported.map(|(_, e)| e),
            })
        })
        .collect();
    serde_json::json!({
        "active": active.map(|i| routing.region(i).id.clone()),
        "epoch": routing.epoch(),
        "controller": shared.controller.controller_id(),
        "regions": list,
    })
}

fn json(status: StatusCode, value: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full_body(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

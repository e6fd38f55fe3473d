//! Who may do what (API.md "Security"): the scope each public route needs, and which
//! routes touch one customer's orders, where a token's `sub` must be the order's
//! `customerId` unless it holds `orders:admin`.
//!
//! Paths are matched segment by segment exactly as the node's router matches them (no
//! trimming or decoding), and by prefix for whole subtrees (`/orders/{id}/...`,
//! `/shipments/...`, `/api/events...`), so a route added to the node later inherits its
//! subtree's scope instead of opening up. Anything unknown needs a valid token.

use crate::auth::Scope;
use hyper::http::Method;

/// What a route asks of the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Need {
    /// Health probes and the API document: no token.
    Open,
    /// Any valid token (product reads, check-availability, unknown paths).
    AnyToken,
    Scope(Scope),
}

/// Whether a route acts on one customer's orders.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    None,
    /// `POST /orders`: the body's `customerId` must be the caller.
    Place,
    /// `/orders/{id}` and below: the order's `customerId` must be the caller. The id
    /// is the raw path segment, as the node will see it.
    Order(String),
}

/// The need and ownership rule of a request.
pub fn rule(method: &Method, path: &str) -> (Need, Ownership) {
    let Some(rest) = path.strip_prefix('/') else {
        return (Need::AnyToken, Ownership::None);
    };
    let mut segs = rest.split('/');
    let first = segs.next().unwrap_or("");
    let second = segs.next();
    let read = *method == Method::GET || *method == Method::HEAD;
    match (first, second) {
        ("orders", None) => (Need::Scope(Scope::OrdersWrite), Ownership::Place),
        ("orders", Some(id)) => {
            let deeper = segs.next().is_some();
            let need = if read && !deeper {
                Scope::OrdersRead
            } else {
                Scope::OrdersWrite
            };
            (Need::Scope(need), Ownership::Order(id.to_string()))
        }
        ("shipments", _) => (Need::Scope(Scope::ShipmentsWrite), Ownership::None),
        ("health", Some("live" | "ready")) if segs.next().is_none() => {
            (Need::Open, Ownership::None)
        }
        ("openapi.json", None) => (Need::Open, Ownership::None),
        ("api", Some("events")) => (Need::Scope(Scope::EventsRead), Ownership::None),
        ("api", Some("v1")) => match segs.next() {
            Some("webhooks") => (Need::Scope(Scope::WebhooksWrite), Ownership::None),
            Some("products") => match (segs.next(), segs.next()) {
                (Some("check-availability"), None) => (Need::AnyToken, Ownership::None),
                _ if read => (Need::AnyToken, Ownership::None),
                _ => (Need::Scope(Scope::CatalogWrite), Ownership::None),
            },
            _ => (Need::AnyToken, Ownership::None),
        },
        _ => (Need::AnyToken, Ownership::None),
    }
}

/// The `customerId` of a JSON body (an order to place, or an order as the node shows
/// it). A duplicated `customerId` is an error: the node keeps the last one, so a body
/// with two could be checked against one and placed under the other.
pub fn customer_id(body: &[u8]) -> Result<Option<String>, String> {
    #[derive(serde::Deserialize)]
    struct Owner {
        #[serde(rename = "customerId", default)]
        customer_id: Option<serde_json::Value>,
    }
    let owner: Owner = serde_json::from_slice(body).map_err(|e| e.to_string())?;
    Ok(match owner.customer_id {
        Some(serde_json::Value::String(s)) => Some(s),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_need_the_scopes_of_api_md() {
        let r = |m: Method, p: &str| rule(&m, p);
        assert_eq!(
            r(Method::POST, "/orders"),
            (Need::Scope(Scope::OrdersWrite), Ownership::Place)
        );
        assert_eq!(
            r(Method::GET, "/orders/o-1"),
            (
                Need::Scope(Scope::OrdersRead),
                Ownership::Order("o-1".into())
            )
        );
        assert_eq!(
            r(Method::POST, "/orders/o-1/cancel"),
            (
                Need::Scope(Scope::OrdersWrite),
                Ownership::Order("o-1".into())
            )
        );
        assert_eq!(
            r(Method::GET, "/orders/o-1/cancel").0,
            Need::Scope(Scope::OrdersWrite)
        );
        assert_eq!(
            r(Method::PUT, "/api/v1/products/W-1").0,
            Need::Scope(Scope::CatalogWrite)
        );
        assert_eq!(r(Method::GET, "/api/v1/products/W-1").0, Need::AnyToken);
        assert_eq!(
            r(Method::POST, "/api/v1/products/check-availability").0,
            Need::AnyToken
        );
        assert_eq!(
            r(Method::POST, "/shipments/s-1/dispatch").0,
            Need::Scope(Scope::ShipmentsWrite)
        );
        assert_eq!(
            r(Method::GET, "/api/events").0,
            Need::Scope(Scope::EventsRead)
        );
        assert_eq!(
            r(Method::GET, "/api/events/e-1").0,
            Need::Scope(Scope::EventsRead)
        );
        assert_eq!(
            r(Method::DELETE, "/api/v1/webhooks/w-1").0,
            Need::Scope(Scope::WebhooksWrite)
        );
        assert_eq!(
            r(Method::GET, "/api/v1/webhooks").0,
            Need::Scope(Scope::WebhooksWrite)
        );
        assert_eq!(r(Method::GET, "/health/ready").0, Need::Open);
        assert_eq!(r(Method::GET, "/openapi.json").0, Need::Open);
        assert_eq!(r(Method::GET, "/health/ready/x").0, Need::AnyToken);
        assert_eq!(r(Method::GET, "/whatever").0, Need::AnyToken);
        assert_eq!(r(Method::GET, "/api/eventsx").0, Need::AnyToken);
    }

    #[test]
    fn a_duplicated_customer_id_is_refused() {
        assert_eq!(
            customer_id(br#"{"customerId":"c-1","items":[]}"#),
            Ok(Some("c-1".into()))
        );
        assert_eq!(customer_id(br#"{"items":[]}"#), Ok(None));
        assert_eq!(customer_id(br#"{"customerId":7}"#), Ok(None));
        assert!(customer_id(br#"{"customerId":"me","customerId":"you"}"#).is_err());
        assert!(customer_id(br#"{"customer\u0049d":"me","customerId":"you"}"#).is_err());
        assert!(customer_id(b"not json").is_err());
    }
}

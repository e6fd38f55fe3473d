//! Who is asking, as far as personal data is concerned.
//!
//! The node authenticates nobody itself: the gateway checks the caller's token and
//! passes on what it found, `Tandem-Subject: <sub>` and `Tandem-Scopes: <scope claim>`,
//! after removing any copy a client sent. The node takes those headers at face value
//! only with `NODE_TRUST_IDENTITY_HEADERS=true`, that is, when the operator says that
//! nobody but the gateway can reach it (its own network, or mutual TLS): anyone who can
//! send a request to the node directly can also write the headers. Without that, and
//! for every request without the headers (the gateway with auth off sends none), the
//! caller is anonymous and sees no personal data at all.
//!
//! What a caller sees: the payment token never (it only ever leaves the node opened for
//! the payment provider); the shipping address in `/api/events` with `pii:read`, and on
//! `GET /orders/{id}` with `pii:read` or as the order's own customer (`sub` =
//! `customerId`).

use super::AppState;
use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use orders_model::pii::Disclosure;
use orders_model::Order;

/// The scope that opens shipping addresses.
pub const PII_READ: &str = "pii:read";

#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The token's `sub`, when the gateway vouches for it.
    subject: Option<String>,
    pii_read: bool,
}

impl Caller {
    /// What `/api/events` may show this caller.
    pub fn events(&self) -> Disclosure {
        if self.pii_read {
            Disclosure::ShippingAddress
        } else {
            Disclosure::None
        }
    }

    /// Whether this caller may see the shipping address of `order`.
    pub fn may_see_address(&self, order: &Order) -> bool {
        self.pii_read || self.subject.as_deref() == Some(order.customer_id.as_str())
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(parts: &mut Parts, st: &AppState) -> Result<Self, Self::Rejection> {
        if !st.config.trust_identity_headers {
            return Ok(Caller::default());
        }
        let header = |name: &str| {
            parts
                .headers
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        Ok(Caller {
            subject: header("tandem-subject").filter(|s| !s.is_empty()),
            pii_read: header("tandem-scopes")
                .is_some_and(|s| s.split_ascii_whitespace().any(|scope| scope == PII_READ)),
        })
    }
}

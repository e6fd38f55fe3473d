//! The OAuth2 resource server: who is asking. A request's bearer token (a JWT, RS256
//! or ES256) is checked against the key ring (signature, `iss`, `aud`, `exp`, `nbf`
//! with 60 s leeway) and becomes a [`Principal`]: the token's `sub` and its scopes.
//! What a principal may do is [`access`](crate::access)'s concern.
//!
//! The signature is checked by the `jsonwebtoken` crate (ring underneath) with the
//! algorithm of the key the `kid` names; the token's own `alg` only has to agree.

use crate::error::GatewayError;
use crate::jwks::{KeyRing, Refresh, VerifyingKey};
use hyper::http::{header, HeaderMap, HeaderValue};
use jsonwebtoken::errors::ErrorKind;
use std::sync::Arc;

/// A scope of API.md "Security"; the token's `scope` claim lists them, space-separated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    OrdersRead,
    OrdersWrite,
    /// Reach every customer's orders, not only one's own.
    OrdersAdmin,
    CatalogWrite,
    ShipmentsWrite,
    EventsRead,
    WebhooksWrite,
    /// Personal data in `/api/events` (enforced by the node, from `Tandem-Scopes`).
    PiiRead,
}

impl Scope {
    const ALL: [Scope; 8] = [
        Scope::OrdersRead,
        Scope::OrdersWrite,
        Scope::OrdersAdmin,
        Scope::CatalogWrite,
        Scope::ShipmentsWrite,
        Scope::EventsRead,
        Scope::WebhooksWrite,
        Scope::PiiRead,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scope::OrdersRead => "orders:read",
            Scope::OrdersWrite => "orders:write",
            Scope::OrdersAdmin => "orders:admin",
            Scope::CatalogWrite => "catalog:write",
            Scope::ShipmentsWrite => "shipments:write",
            Scope::EventsRead => "events:read",
            Scope::WebhooksWrite => "webhooks:write",
            Scope::PiiRead => "pii:read",
        }
    }

    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The known scopes a token holds, as bits (unknown ones are ignored here but still
/// forwarded in `Tandem-Scopes`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u16);

impl Scopes {
    pub fn parse(claim: &str) -> Scopes {
        let mut bits = 0;
        for word in claim.split(' ') {
            if let Some(s) = Scope::ALL.iter().find(|s| s.name() == word) {
                bits |= s.bit();
            }
        }
        Scopes(bits)
    }

    pub fn has(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }
}

/// An authenticated caller.
#[derive(Debug, Clone)]
pub struct Principal {
    /// The token's `sub`: 1-128 visible ASCII characters, so it is a valid header value
    /// and can equal a `customerId` (which the node caps at 128).
    pub subject: HeaderValue,
    pub scopes: Scopes,
    /// The `scope` claim as given (possibly empty), forwarded to the node.
    pub scope_claim: HeaderValue,
}

impl Principal {
    pub fn subject(&self) -> &str {
        self.subject.to_str().unwrap_or_default()
    }
}

/// Why a request was refused, as counted in `tandem_gateway_auth_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// No `Authorization: Bearer` at all.
    MissingToken,
    /// Not three base64url parts, a header or claims that are not JSON, a bad `sub`.
    Malformed,
    /// `alg` is not the key's algorithm (`none`, HS256 with the public key, ...).
    Algorithm,
    /// No `kid`, or one the key set does not hold even after a refresh.
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongIssuer,
    WrongAudience,
    /// `exp`, `iss`, `aud` or `sub` missing or of the wrong type.
    MissingClaim,
    /// No key set has loaded yet (the JWKS URL has been unreachable since the start).
    KeysUnavailable,
    InsufficientScope,
    /// Someone else's order (answered 404) or placing one for someone else (403).
    NotOwner,
}

impl Failure {
    pub const ALL: [Failure; 13] = [
        Failure::MissingToken,
        Failure::Malformed,
        Failure::Algorithm,
        Failure::UnknownKey,
        Failure::BadSignature,
        Failure::Expired,
        Failure::NotYetValid,
        Failure::WrongIssuer,
        Failure::WrongAudience,
        Failure::MissingClaim,
        Failure::KeysUnavailable,
        Failure::InsufficientScope,
        Failure::NotOwner,
    ];

    /// The metric label.
    pub fn reason(self) -> &'static str {
        match self {
            Failure::MissingToken => "missing_token",
            Failure::Malformed => "malformed",
            Failure::Algorithm => "algorithm",
            Failure::UnknownKey => "unknown_kid",
            Failure::BadSignature => "bad_signature",
            Failure::Expired => "expired",
            Failure::NotYetValid => "not_yet_valid",
            Failure::WrongIssuer => "wrong_issuer",
            Failure::WrongAudience => "wrong_audience",
            Failure::MissingClaim => "missing_claim",
            Failure::KeysUnavailable => "keys_unavailable",
            Failure::InsufficientScope => "insufficient_scope",
            Failure::NotOwner => "not_owner",
        }
    }

    /// The answer for an authentication failure. The message says little on purpose:
    /// expired and not-yet-valid tell a client what to do; the rest is "invalid".
    pub fn to_error(self) -> GatewayError {
        match self {
            Failure::MissingToken => GatewayError::MissingToken,
            Failure::KeysUnavailable => GatewayError::AuthUnavailable,
            Failure::Expired => GatewayError::InvalidToken("the access token has expired"),
            Failure::NotYetValid => GatewayError::InvalidToken("the access token is not valid yet"),
            _ => GatewayError::InvalidToken("the access token is invalid"),
        }
    }
}

/// Checks bearer tokens against the key ring.
pub struct Authenticator {
    ring: Arc<KeyRing>,
}

#[derive(serde::Deserialize)]
struct Claims {
    /// Optional here so that a missing `sub` is reported by the validation as a
    /// missing claim (it is in the required set), not as unreadable JSON.
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

impl Authenticator {
    pub fn new(ring: Arc<KeyRing>) -> Authenticator {
        Authenticator { ring }
    }

    pub fn key_ring(&self) -> &Arc<KeyRing> {
        &self.ring
    }

    /// The principal of the request's bearer token.
    pub async fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, Failure> {
        let token = bearer_token(headers)?;
        let header = jsonwebtoken::decode_header(token).map_err(|e| header_failure(token, &e))?;
        let kid = header.kid.as_deref().ok_or(Failure::UnknownKey)?;
        // Verified while the key set is pinned; no await in between.
        if let Some(result) = self.verify_with_current(token, kid, header.alg) {
            return result;
        }
        if self.ring.keys().is_empty() {
            return Err(Failure::KeysUnavailable);
        }
        // A key id we do not know: perhaps the provider rotated keys since the last fetch.
        match self.ring.refresh_for_unknown_kid().await {
            Refresh::Done => self
                .verify_with_current(token, kid, header.alg)
                .unwrap_or(Err(Failure::UnknownKey)),
            Refresh::Throttled => Err(Failure::UnknownKey),
        }
    }

    fn verify_with_current(
        &self,
        token: &str,
        kid: &str,
        alg: jsonwebtoken::Algorithm,
    ) -> Option<Result<Principal, Failure>> {
        let keys = self.ring.keys();
        let key = keys.get(kid)?;
        Some(verify(token, key, alg))
    }
}

fn verify(
    token: &str,
    key: &VerifyingKey,
    alg: jsonwebtoken::Algorithm,
) -> Result<Principal, Failure> {
    if alg != key.algorithm {
        return Err(Failure::Algorithm);
    }
    let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
        .map_err(|e| claim_failure(&e))?;
    let Claims { sub, scope } = data.claims;
    let sub = sub.ok_or(Failure::MissingClaim)?;
    let sub_ok = !sub.is_empty() && sub.len() <= 128 && sub.bytes().all(|b| b.is_ascii_graphic());
    if !sub_ok {
        return Err(Failure::Malformed);
    }
    let scope = scope.unwrap_or_default();
    let scope_claim = HeaderValue::from_str(&scope).map_err(|_| Failure::Malformed)?;
    Ok(Principal {
        subject: HeaderValue::from_str(&sub).map_err(|_| Failure::Malformed)?,
        scopes: Scopes::parse(&scope),
        scope_claim,
    })
}

/// The token of `Authorization: Bearer <token>`. Another scheme counts as no token
/// (RFC 6750 3.1); two Authorization headers are malformed.
fn bearer_token(headers: &HeaderMap) -> Result<&str, Failure> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Err(Failure::MissingToken);
    };
    if values.next().is_some() {
        return Err(Failure::Malformed);
    }
    let value = value.to_str().map_err(|_| Failure::Malformed)?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(Failure::MissingToken);
    }
    let token = token.trim();
    if token.is_empty() {
        return Err(Failure::MissingToken);
    }
    Ok(token)
}

/// A header the crate would not read: `alg: none` and other unknown algorithms are
/// told apart from garbage for the metric.
fn header_failure(token: &str, e: &jsonwebtoken::errors::Error) -> Failure {
    use base64::Engine;
    if !matches!(e.kind(), ErrorKind::Json(_)) {
        return Failure::Malformed;
    }
    let alg_named = token
        .split('.')
        .next()
        .and_then(|h| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(h)
                .ok()
        })
        .and_then(|h| serde_json::from_slice::<serde_json::Value>(&h).ok())
        .is_some_and(|h| h.get("alg").is_some_and(|a| a.is_string()));
    if alg_named {
        Failure::Algorithm
    } else {
        Failure::Malformed
    }
}

fn claim_failure(e: &jsonwebtoken::errors::Error) -> Failure {
    match e.kind() {
        ErrorKind::InvalidSignature | ErrorKind::Crypto(_) => Failure::BadSignature,
        ErrorKind::InvalidAlgorithm | ErrorKind::MissingAlgorithm => Failure::Algorithm,
        ErrorKind::ExpiredSignature => Failure::Expired,
        ErrorKind::ImmatureSignature => Failure::NotYetValid,
        ErrorKind::InvalidIssuer => Failure::WrongIssuer,
        ErrorKind::InvalidAudience => Failure::WrongAudience,
        ErrorKind::MissingRequiredClaim(_) | ErrorKind::InvalidSubject => Failure::MissingClaim,
        _ => Failure::Malformed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_are_whole_words() {
        let s = Scopes::parse("orders:read  catalog:write orders:readx pii:read");
        assert!(s.has(Scope::OrdersRead));
        assert!(s.has(Scope::CatalogWrite));
        assert!(s.has(Scope::PiiRead));
        assert!(!s.has(Scope::OrdersWrite));
        assert!(!Scopes::parse("").has(Scope::OrdersRead));
    }

    #[test]
    fn bearer_token_per_rfc_6750() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer_token(&h), Err(Failure::MissingToken));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer_token(&h), Err(Failure::MissingToken));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer a.b.c"),
        );
        assert_eq!(bearer_token(&h), Ok("a.b.c"));
        h.append(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer x.y.z"),
        );
        assert_eq!(bearer_token(&h), Err(Failure::Malformed));
    }
}

//! The gateway's own error answers: one enum, each variant with its status and a stable
//! `error.code`, rendered as `{"error":{"code","message"}}`.

use crate::body::{full_body, Body};
use hyper::http::{header, HeaderValue, Response, StatusCode};

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("too many requests from this client; retry after {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    #[error("request body is larger than {0} bytes")]
    BodyTooLarge(u64),
    #[error("request headers are larger than {0} bytes")]
    HeadersTooLarge(usize),
    #[error("no region can serve this request now")]
    NoRegion,
    #[error("the region did not answer within the deadline")]
    Timeout,
    #[error("the region could not be reached")]
    Upstream,
    #[error("not found")]
    NotFound,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    /// A route that needs an access token was called without one (RFC 6750 3.1: the
    /// challenge then carries no error code).
    #[error("this route needs an access token (Authorization: Bearer <JWT>)")]
    MissingToken,
    #[error("{0}")]
    InvalidToken(&'static str),
    /// The token is good but lacks the scope the route needs (named here).
    #[error("the access token lacks the scope {0}")]
    InsufficientScope(&'static str),
    /// No key set has loaded yet, so no token can be checked.
    #[error("access tokens cannot be checked now (no signing keys loaded); retry shortly")]
    AuthUnavailable,
    #[error("the request was not received in time")]
    RequestTimeout,
    #[error("the body is not valid JSON: {0}")]
    MalformedJson(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    BadRequest(String),
    /// A refused admin operation, e.g. a switchover to an unhealthy region.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// A control-plane step failed (a node refused or did not answer).
    #[error("{message}")]
    ControlFailed { code: &'static str, message: String },
}

impl GatewayError {
    pub fn status(&self) -> StatusCode {
        match self {
            GatewayError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            GatewayError::BodyTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            GatewayError::HeadersTooLarge(_) => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            GatewayError::NoRegion => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::Timeout => StatusCode::GATEWAY_TIMEOUT,
            GatewayError::Upstream => StatusCode::BAD_GATEWAY,
            GatewayError::NotFound => StatusCode::NOT_FOUND,
            GatewayError::Unauthorized
            | GatewayError::MissingToken
            | GatewayError::InvalidToken(_) => StatusCode::UNAUTHORIZED,
            GatewayError::InsufficientScope(_) => StatusCode::FORBIDDEN,
            GatewayError::AuthUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            GatewayError::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            GatewayError::MalformedJson(_) => StatusCode::BAD_REQUEST,
            GatewayError::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            GatewayError::BadRequest(_) => StatusCode::BAD_REQUEST,
            GatewayError::Conflict { .. } => StatusCode::CONFLICT,
            GatewayError::ControlFailed { .. } => StatusCode::BAD_GATEWAY,
        }
    }

    /// The stable code clients and dashboards may match on.
    pub fn code(&self) -> &'static str {
        match self {
            GatewayError::RateLimited { .. } => "rate_limited",
            GatewayError::BodyTooLarge(_) => "payload_too_large",
            GatewayError::HeadersTooLarge(_) => "headers_too_large",
            GatewayError::NoRegion => "no_region_available",
            GatewayError::Timeout => "gateway_timeout",
            GatewayError::Upstream => "upstream_unavailable",
            GatewayError::NotFound => "not_found",
            GatewayError::Unauthorized
            | GatewayError::MissingToken
            | GatewayError::InvalidToken(_) => "unauthorized",
            GatewayError::InsufficientScope(_) => "insufficient_scope",
            GatewayError::AuthUnavailable => "auth_unavailable",
            GatewayError::RequestTimeout => "request_timeout",
            GatewayError::MalformedJson(_) => "malformed_json",
            GatewayError::MethodNotAllowed => "method_not_allowed",
            GatewayError::BadRequest(_) => "bad_request",
            GatewayError::Conflict { code, .. } => code,
            GatewayError::ControlFailed { code, .. } => code,
        }
    }

    pub fn to_response(&self) -> Response<Body> {
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": self.to_string() }
        });
        let mut resp = Response::new(full_body(body.to_string()));
        *resp.status_mut() = self.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        match self {
            GatewayError::RateLimited { retry_after_secs } => {
                h.insert(header::RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            GatewayError::NoRegion | GatewayError::AuthUnavailable => {
                h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            GatewayError::Unauthorized => {
                h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // RFC 6750 3: the scheme is followed by at least one auth-param; with no
            // credentials at all, no error code (3.1).
            GatewayError::MissingToken => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer realm=\"tandem\""),
                );
            }
            GatewayError::InvalidToken(_) => {
                h.insert(
                    header::WWW_AUTHENTICATE,
                    HeaderValue::from_static("Bearer error=\"invalid_token\""),
                );
            }
            GatewayError::InsufficientScope(scope) => {
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "Bearer error=\"insufficient_scope\", scope=\"{scope}\""
                )) {
                    h.insert(header::WWW_AUTHENTICATE, v);
                }
            }
            _ => {}
        }
        resp
    }
}

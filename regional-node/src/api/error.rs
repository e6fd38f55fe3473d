//! The HTTP error type: every failure maps to a status and a stable `error.code`.

use crate::bus::ReplayError;
use crate::projector::{ProjectError, RebuildError};
use crate::promotion::PromotionError;
use crate::roles::RoleError;
use crate::store::StoreError;
use crate::workflow::WorkflowError;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{json, Value};

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    /// Names of the offending fields, for validation errors.
    pub fields: Vec<String>,
    /// Top-level members added next to `error` (the seed's availability shape).
    pub extra: Option<Value>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            fields: Vec::new(),
            extra: None,
        }
    }

    pub fn validation(message: impl Into<String>, fields: Vec<String>) -> ApiError {
        ApiError {
            fields,
            ..ApiError::new(StatusCode::BAD_REQUEST, "validation_failed", message)
        }
    }

    pub fn not_found(what: impl Into<String>) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} not found", what.into()),
        )
    }

    fn internal(cause: &dyn std::error::Error) -> ApiError {
        // The cause chain goes to the log, not to the client.
        let mut chain = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            chain.push_str(": ");
            chain.push_str(&s.to_string());
            source = s.source();
        }
        tracing::error!(error = %chain, "internal error");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "internal error; see the node's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({ "code": self.code, "message": self.message });
        if !self.fields.is_empty() {
            error["fields"] = json!(self.fields);
        }
        let mut body = json!({ "error": error });
        if let Some(Value::Object(extra)) = self.extra {
            for (k, v) in extra {
                body[k] = v;
            }
        }
        let retry_after = self.status == StatusCode::SERVICE_UNAVAILABLE;
        let mut response = (self.status, axum::Json(body)).into_response();
        if retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        match e {
            StoreError::Unavailable(msg) => {
                tracing::warn!(error = %msg, "redis unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "redis_unavailable",
                    "the region's Redis is unavailable; retry shortly",
                )
            }
            other => ApiError::internal(&other),
        }
    }
}

impl From<WorkflowError> for ApiError {
    fn from(e: WorkflowError) -> ApiError {
        use WorkflowError::*;
        match e {
            NotFound(what) => ApiError::not_found(what),
            InvalidState(msg) => ApiError::new(StatusCode::CONFLICT, "invalid_state", msg),
            ProductsUnavailable(items) => ApiError {
                extra: Some(json!({ "all_available": false, "items": items })),
                ..ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "products_unavailable",
                    "some items are not available in the requested quantity",
                )
            },
            UnknownSku(skus) => {
                let skus: Vec<String> = skus.iter().map(|s| s.as_str().to_string()).collect();
                ApiError {
                    message: format!("unknown sku: {}", skus.join(", ")),
                    fields: skus,
                    ..ApiError::new(StatusCode::BAD_REQUEST, "unknown_sku", "")
                }
            }
            Validation(msg) => ApiError::validation(msg, Vec::new()),
            IdempotencyKeyReused => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_reused",
                "this Idempotency-Key was already used with a different request body",
            ),
            IdempotencyKeyTaken => ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_key_in_use",
                "a concurrent request with this Idempotency-Key is in progress; retry",
            ),
            NotActive { role, epoch } => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "region_not_active",
                format!("this region does not accept writes (role {role}, epoch {epoch})"),
            ),
            Contended(n) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "contended",
                format!("gave up after {n} concurrent updates of the same data; retry"),
            ),
            Rebuilding => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "rebuilding",
                "derived state is being rebuilt; retry shortly",
            ),
            Store(e) => e.into(),
            e @ (Provider(_) | Sealed(_) | Apply(_)) => ApiError::internal(&e),
        }
    }
}

impl From<RoleError> for ApiError {
    fn from(e: RoleError) -> ApiError {
        match e {
            RoleError::StaleEpoch { .. } => {
                ApiError::new(StatusCode::CONFLICT, "stale_epoch", e.to_string())
            }
            RoleError::LeaseExpired { .. } => {
                ApiError::new(StatusCode::CONFLICT, "lease_expired", e.to_string())
            }
            RoleError::Store(e) => e.into(),
        }
    }
}

impl From<ReplayError> for ApiError {
    fn from(e: ReplayError) -> ApiError {
        match e {
            ReplayError::NotFound(id) => ApiError::not_found(format!("dead-letter entry {id}")),
            ReplayError::Unreadable(..) => {
                ApiError::new(StatusCode::CONFLICT, "replay_failed", e.to_string())
            }
            ReplayError::Failed(WorkflowError::Store(e)) => e.into(),
            ReplayError::Failed(e @ WorkflowError::NotActive { .. }) => e.into(),
            ReplayError::Failed(e) => ApiError::new(
                StatusCode::CONFLICT,
                "replay_failed",
                format!("replay failed: {e}"),
            ),
        }
    }
}

impl From<&PromotionError> for ApiError {
    fn from(e: &PromotionError) -> ApiError {
        use PromotionError::*;
        let (status, code) = match e {
            StaleEpoch { .. } | Superseded { .. } => (StatusCode::CONFLICT, "stale_epoch"),
            ProjectionHalted(_) => (StatusCode::CONFLICT, "projection_halted"),
            IntentLapsed | TimedOut(_) => (StatusCode::SERVICE_UNAVAILABLE, "promotion_failed"),
            Store(StoreError::Unavailable(_)) => {
                (StatusCode::SERVICE_UNAVAILABLE, "redis_unavailable")
            }
            Store(other) => return ApiError::internal(other),
        };
        ApiError::new(status, code, e.to_string())
    }
}

impl From<&RebuildError> for ApiError {
    fn from(e: &RebuildError) -> ApiError {
        match e {
            RebuildError::Project(e) => ApiError::from(e),
            RebuildError::Running => {
                ApiError::new(StatusCode::CONFLICT, "rebuild_in_progress", e.to_string())
            }
        }
    }
}

impl From<&ProjectError> for ApiError {
    fn from(e: &ProjectError) -> ApiError {
        match e {
            ProjectError::Halted(h) => {
                ApiError::new(StatusCode::CONFLICT, "projection_halted", h.to_string())
            }
            ProjectError::Store(StoreError::Unavailable(_)) => ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "redis_unavailable",
                "the region's Redis is unavailable; retry shortly",
            ),
            ProjectError::Store(other) => ApiError::internal(other),
        }
    }
}

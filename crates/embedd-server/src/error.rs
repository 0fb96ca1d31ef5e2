//! The one place where errors become HTTP responses.

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use embedd_api::{ErrorBody, LocItem, ValidationError, ValidationErrors};
use embedd_runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Validation(#[from] ValidationErrors),
    #[error("invalid or missing API key")]
    Unauthorized,
    #[error("request body larger than the limit of {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("the request body did not arrive within {} s", .0.as_secs_f64())]
    RequestTimeout(std::time::Duration),
    /// A request the server cannot read (a body that ended early, say).
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after_secs: u64,
    },
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    /// Maps a runtime failure; input-specific ones are located under `field` (`input`, `documents`).
    pub fn from_runtime(error: RuntimeError, field: &str) -> Self {
        match error {
            RuntimeError::InputTooLong { index, tokens, max } => {
                ValidationErrors::single(ValidationError::value(
                    vec!["body".into(), field.into(), LocItem::Index(index)],
                    format!(
                        "input {index} has {tokens} tokens, more than the model's maximum of {max}; \
                         send \"truncate\": true to cut it to {max}"
                    ),
                ))
                .into()
            }
            RuntimeError::QueryTooLong { .. } => ValidationErrors::single(ValidationError::value(
                vec!["body".into(), "query".into()],
                error.to_string(),
            ))
            .into(),
            RuntimeError::UnknownTask { .. } => ValidationErrors::single(ValidationError::value(
                vec!["body".into(), "task".into()],
                error.to_string(),
            ))
            .into(),
            RuntimeError::Overloaded {
                retry_after_secs, ..
            } => ApiError::Overloaded {
                message: error.to_string(),
                retry_after_secs,
            },
            RuntimeError::WorkerStopped => ApiError::Unavailable(error.to_string()),
            other => {
                tracing::error!(error = %other, "request failed in the runtime");
                ApiError::Internal(other.to_string())
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let detail = |status: StatusCode, msg: String| (status, Json(ErrorBody::new(msg)));
        match self {
            ApiError::Validation(errors) => {
                (StatusCode::UNPROCESSABLE_ENTITY, Json(errors)).into_response()
            }
            ApiError::Unauthorized => (
                [(header::WWW_AUTHENTICATE, "Bearer")],
                detail(StatusCode::UNAUTHORIZED, self.to_string()),
            )
                .into_response(),
            ApiError::PayloadTooLarge { .. } => {
                detail(StatusCode::PAYLOAD_TOO_LARGE, self.to_string()).into_response()
            }
            ApiError::RequestTimeout(_) => (
                [(header::CONNECTION, "close")],
                detail(StatusCode::REQUEST_TIMEOUT, self.to_string()),
            )
                .into_response(),
            ApiError::BadRequest(m) => detail(StatusCode::BAD_REQUEST, m).into_response(),
            ApiError::NotFound(m) => detail(StatusCode::NOT_FOUND, m).into_response(),
            ApiError::Forbidden(m) => detail(StatusCode::FORBIDDEN, m).into_response(),
            ApiError::Conflict(m) => detail(StatusCode::CONFLICT, m).into_response(),
            ApiError::Overloaded {
                message,
                retry_after_secs,
            } => (
                [(header::RETRY_AFTER, retry_after_secs.to_string())],
                detail(StatusCode::TOO_MANY_REQUESTS, message),
            )
                .into_response(),
            ApiError::Unavailable(m) => detail(StatusCode::SERVICE_UNAVAILABLE, m).into_response(),
            ApiError::Internal(m) => detail(StatusCode::INTERNAL_SERVER_ERROR, m).into_response(),
        }
    }
}

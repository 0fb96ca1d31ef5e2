//! The JSON body extractor: size limit as 413, a body slower than `--body-read-timeout-secs` as
//! 408, bad JSON as FastAPI's `json_invalid` 422.

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::StatusCode;
use serde_json::Value;

use crate::error::ApiError;
use crate::state::AppState;
use embedd_api::ValidationErrors;

/// A request body parsed as JSON (whatever its content type: curl's `-d` sends form encoding).
pub struct JsonBody(pub Value);

impl FromRequest<AppState> for JsonBody {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let deadline = state.limits.body_read_timeout;
        let read = tokio::time::timeout(deadline, Bytes::from_request(req, state));
        let bytes = read.await.map_err(|_| ApiError::RequestTimeout(deadline))?;
        let bytes = bytes.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge {
                    limit: state.limits.max_body_bytes,
                }
            } else {
                // The client's doing: a body shorter than declared, a connection closed early.
                ApiError::BadRequest(format!("the request body could not be read: {rejection}"))
            }
        })?;
        serde_json::from_slice(&bytes).map(JsonBody).map_err(|e| {
            let offset = byte_offset(&bytes, e.line(), e.column());
            ApiError::Validation(ValidationErrors::json_invalid(offset, &e.to_string()))
        })
    }
}

/// serde_json reports line/column; FastAPI locates JSON errors by character offset.
fn byte_offset(bytes: &[u8], line: usize, column: usize) -> usize {
    let start: usize = bytes
        .split(|&b| b == b'\n')
        .take(line.saturating_sub(1))
        .map(|l| l.len() + 1)
        .sum();
    start + column.saturating_sub(1)
}

//! The one place where error responses that did not come from [`crate::error::ApiError`]
//! (axum's extractor rejections: a multipart body without a boundary, a path that is not UTF-8,
//! a missing or unparsable query parameter, an incomplete body) get the contract's shape: every
//! error body is JSON with a `detail` string.

use axum::body::{to_bytes, Body};
use axum::extract::Request;
use axum::http::{header, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use embedd_api::ErrorBody;

/// Rejection texts are a line or two; anything longer is cut.
const MAX_REJECTION_BYTES: usize = 4096;

pub async fn json_errors(req: Request, next: Next) -> Response {
    let response = next.run(req).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (mut parts, body) = response.into_parts();
    let text = match to_bytes(body, MAX_REJECTION_BYTES).await {
        Ok(bytes) => String::from_utf8_lossy(&bytes).trim().to_string(),
        Err(_) => String::new(),
    };
    let detail = if text.is_empty() {
        status.canonical_reason().unwrap_or("Error").to_string()
    } else {
        text
    };
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    let json = Json(ErrorBody::new(detail)).into_response();
    Response::from_parts(parts, Body::new(json.into_body()))
}

//! Early 413 for bodies whose declared length is over the route's limit.
//!
//! Answering before the body is read and then closing the connection makes the client's kernel
//! see a reset while it is still sending, and many clients then report a broken pipe instead of
//! the 413. So a body over the limit by a bounded amount is read and thrown away first; only a
//! body far over it is refused at once.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, Method};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use crate::error::ApiError;
use crate::state::AppState;

/// How far past the limit a body is still read (and discarded) so the client sees the 413.
const DRAIN_BEYOND_LIMIT: u64 = 16 * 1024 * 1024;
/// Longest time spent reading a rejected body.
const DRAIN_TIME: Duration = Duration::from_secs(10);

fn route_limit(state: &AppState, method: &Method, path: &str) -> usize {
    let upload =
        path == crate::routes::BULK_UPLOAD_PATH || path == crate::routes::openai_batch::FILES_PATH;
    if method == Method::POST && upload {
        state.limits.max_upload_bytes
    } else {
        state.limits.max_body_bytes
    }
}

fn declared_length(req: &Request) -> Option<u64> {
    req.headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

pub async fn reject_oversized(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let limit = route_limit(&state, req.method(), req.uri().path());
    let Some(declared) = declared_length(&req) else {
        return next.run(req).await;
    };
    if declared <= limit as u64 {
        return next.run(req).await;
    }
    if declared <= limit as u64 + DRAIN_BEYOND_LIMIT {
        let _ = tokio::time::timeout(DRAIN_TIME, discard(req.into_body())).await;
    }
    let mut response = ApiError::PayloadTooLarge { limit }.into_response();
    response
        .headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    response
}

async fn discard(body: Body) {
    use http_body_util::BodyExt;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            return;
        }
    }
}

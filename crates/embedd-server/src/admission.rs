//! Admission at the door: at most `--max-concurrent-requests` API requests in the handlers at
//! once; more are answered 429 with `Retry-After` at once rather than queued behind them (each
//! model's queue then admits by expected wait, see `embedd_runtime::scheduler`).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::error::ApiError;

/// The permits API requests hold while they are handled.
#[derive(Clone)]
pub struct ConcurrencyLimit {
    permits: Arc<Semaphore>,
    max: usize,
}

impl ConcurrencyLimit {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
        }
    }
}

pub async fn limit_concurrency(
    State(limit): State<ConcurrencyLimit>,
    request: Request,
    next: Next,
) -> Response {
    let Ok(_permit) = limit.permits.clone().try_acquire_owned() else {
        metrics::counter!("embedd_requests_refused_total", "reason" => "concurrency").increment(1);
        return ApiError::Overloaded {
            message: format!(
                "the server is handling its limit of {} concurrent requests; retry in 1 s",
                limit.max
            ),
            retry_after_secs: 1,
        }
        .into_response();
    };
    next.run(request).await
}

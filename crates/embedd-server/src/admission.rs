//! Admission at the door: at most `--max-concurrent-requests` API requests in the handlers at
//! once; more are answered 429 with `Retry-After` at once rather than queued behind them (each
//! model's queue then admits by expected wait, see `embedd_runtime::scheduler`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Requests admitted so far, for the idle-time memory trim.
    admitted: Arc<AtomicU64>,
}

impl ConcurrencyLimit {
    pub fn new(max: usize) -> Self {
        let max = max.max(1);
        Self {
            permits: Arc::new(Semaphore::new(max)),
            max,
            admitted: Arc::new(AtomicU64::new(0)),
        }
    }

    fn idle(&self) -> bool {
        self.permits.available_permits() == self.max
    }

    /// Returns freed memory to the system once the API has gone idle after serving requests
    /// (checked every `every`): a large request's buffers, the tokenizer's and the batches',
    /// would otherwise stay resident in the allocator's arenas.
    pub fn spawn_memory_trim(&self, every: Duration) {
        let limit = self.clone();
        tokio::spawn(async move {
            let mut trimmed_at = 0;
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                let admitted = limit.admitted.load(Ordering::Relaxed);
                if admitted != trimmed_at && limit.idle() {
                    trimmed_at = admitted;
                    let _ =
                        tokio::task::spawn_blocking(embedd_runtime::allocator::return_free_memory)
                            .await;
                }
            }
        });
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
    limit.admitted.fetch_add(1, Ordering::Relaxed);
    next.run(request).await
}

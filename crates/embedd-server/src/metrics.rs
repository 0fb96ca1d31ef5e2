//! `GET /metrics` in the Prometheus text format.
//!
//! Counters and histograms are recorded where things happen (this module's request layer, the
//! runtime's scheduler, the handlers); gauges that describe current state (queue depth, bulk jobs
//! by status) are read when the page is rendered.

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::state::AppState;

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

const LATENCY_BUCKETS: [f64; 14] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];
const TOKEN_BUCKETS: [f64; 10] = [
    16.0, 64.0, 256.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0,
];

/// Installs the process-wide recorder once; later calls reuse it (tests build several routers).
pub fn install() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".into()),
                    &LATENCY_BUCKETS,
                )
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("embedd_batch_size".into()),
                        &BATCH_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full("embedd_batch_tokens".into()),
                        &TOKEN_BUCKETS,
                    )
                })
                .expect("static bucket lists are non-empty")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder may already be installed (in tests); metrics then go there.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}

/// Counts every request by route template and status, and times it.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_string(), |p| p.as_str().to_string());
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!("embedd_requests_total", "route" => route.clone(), "status" => status)
        .increment(1);
    metrics::histogram!("embedd_request_duration_seconds", "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}

/// Tokens embedded for a model on a route.
pub fn record_tokens(model: &str, route: &'static str, tokens: usize) {
    metrics::counter!("embedd_tokens_total", "model" => model.to_string(), "route" => route)
        .increment(tokens as u64);
}

pub async fn render(State(state): State<AppState>) -> Response {
    for (model, queued) in state.models.queue_depths() {
        metrics::gauge!("embedd_queue_depth", "model" => model).set(queued as f64);
    }
    if let Ok(counts) = state.bulk.store.count_by_status().await {
        for status in ["waiting", "in-progress", "completed", "failed"] {
            let n = counts
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            metrics::gauge!("embedd_bulk_jobs", "status" => status).set(n as f64);
        }
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        install().render(),
    )
        .into_response()
}

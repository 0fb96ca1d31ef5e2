//! The router: one module per route group.

pub mod bulk;
pub mod embeddings;
pub mod health;
pub mod multi_vector;
pub mod openai_batch;
pub mod openapi;
pub mod rerank;
pub mod ui;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{middleware, Json, Router};
use embedd_api::ErrorBody;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::cors::CorsLayer;
use tower_http::trace::TraceLayer;

use crate::auth::require_key;
use crate::state::AppState;

/// The bulk upload route, whose body limit (`--max-upload-bytes`) differs from the others'.
pub const BULK_UPLOAD_PATH: &str = "/v1/bulk-embeddings";

// The deprecated alias is still served; `#[deprecated]` on it only marks it so in OpenAPI.
#[allow(deprecated)]
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/embeddings", post(embeddings::create))
        .route("/v1/rerank", post(rerank::rank))
        .route("/v1/multi-vector", post(multi_vector::create))
        .route(
            "/v1/multi-embeddings",
            post(multi_vector::create_deprecated),
        )
        .route(
            BULK_UPLOAD_PATH,
            post(bulk::start).layer(DefaultBodyLimit::max(state.limits.max_upload_bytes)),
        )
        .route("/v1/bulk-embeddings/{job_id}", get(bulk::status))
        .route(
            "/v1/bulk-embeddings/{job_id}/download-result",
            post(bulk::download_link),
        )
        .route(
            openai_batch::FILES_PATH,
            post(openai_batch::upload_file)
                .layer(DefaultBodyLimit::max(state.limits.max_upload_bytes))
                .get(openai_batch::list_files),
        )
        .route(
            "/v1/files/{file_id}",
            get(openai_batch::get_file).delete(openai_batch::delete_file),
        )
        .route(
            "/v1/files/{file_id}/content",
            get(openai_batch::file_content),
        )
        .route(
            "/v1/batches",
            post(openai_batch::create_batch).get(openai_batch::list_batches),
        )
        .route("/v1/batches/{batch_id}", get(openai_batch::get_batch))
        .route(
            "/v1/batches/{batch_id}/cancel",
            post(openai_batch::cancel_batch),
        )
        .route("/v1/models", get(health::list_models))
        .route("/v1/models/{model_id}", get(health::get_model))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_key))
        .route_layer(middleware::from_fn_with_state(
            state.concurrency.clone(),
            crate::admission::limit_concurrency,
        ));
    Router::new()
        .route("/", get(health::root))
        .route("/health", get(health::health))
        .route("/live", get(health::live))
        .route("/ready", get(health::ready))
        .route("/openapi.json", get(openapi::document))
        .route("/docs", get(openapi::docs_page))
        .route("/ui", get(ui::page))
        .route("/metrics", get(crate::metrics::render))
        // Signed links work without the API key.
        .route("/v1/bulk-embeddings/{job_id}/result", get(bulk::download))
        .merge(api)
        .route_layer(middleware::from_fn(crate::metrics::track))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(crate::error_bodies::json_errors))
        .layer(DefaultBodyLimit::max(state.limits.max_body_bytes))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            crate::body_limit::reject_oversized,
        ))
        .layer(CatchPanicLayer::custom(panic_response))
        .layer(cors(&state.cors_allow_origins))
        .layer(TraceLayer::new_for_http())
        .with_state(state)
}

/// `--cors-allow-origin`: outermost but for tracing, so preflights are answered before auth and
/// routing, for every route. No origins: no CORS headers (browsers allow same-origin only).
fn cors(origins: &[String]) -> tower::util::Either<CorsLayer, tower::layer::util::Identity> {
    use axum::http::HeaderValue;
    use tower_http::cors::{AllowOrigin, Any};
    if origins.is_empty() {
        return tower::util::Either::Right(tower::layer::util::Identity::new());
    }
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::from(Any)
    } else {
        AllowOrigin::list(
            origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect::<Vec<_>>(),
        )
    };
    tower::util::Either::Left(
        CorsLayer::new()
            .allow_origin(allow)
            .allow_methods(Any)
            .allow_headers(Any)
            .expose_headers(Any)
            .max_age(std::time::Duration::from_secs(3600)),
    )
}

/// Runs CPU-bound or blocking work (tokenization, CSV checks, job-store writes) off the async
/// runtime; `what` names it if the task itself fails.
pub(crate) async fn off_runtime<T: Send + 'static>(
    what: &str,
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, crate::error::ApiError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| crate::error::ApiError::Internal(format!("{what} task: {e}")))
}

/// What a request's prepared inputs cost the model, in tokens (patches for images).
pub(crate) fn total_tokens<T: embedd_runtime::TokenCost>(items: &[T]) -> usize {
    items.iter().map(T::tokens).sum()
}

/// The query's share of a rerank request's estimated cost: it is tokenized into every pair.
pub(crate) fn estimate_pair_cost(query: &str, documents: usize) -> usize {
    embedd_runtime::tokenize::estimated_tokens(&[query.to_string()], usize::MAX) * documents
}

async fn not_found() -> Response {
    (StatusCode::NOT_FOUND, Json(ErrorBody::new("Not Found"))).into_response()
}

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(ErrorBody::new("Method Not Allowed")),
    )
        .into_response()
}

fn panic_response(_: Box<dyn std::any::Any + Send + 'static>) -> Response {
    tracing::error!("a request handler panicked");
    (
        StatusCode::INTERNAL_SERVER_ERROR,
        Json(ErrorBody::new("Internal Server Error")),
    )
        .into_response()
}

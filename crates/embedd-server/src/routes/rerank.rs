//! `POST /v1/rerank`.

use axum::extract::State;
use axum::Json;
use embedd_api::{RerankRequest, RerankResponse, ValidationErrors};

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Rank pairs: score each document against the query with a cross-encoder.
#[utoipa::path(
    post, path = "/v1/rerank", tag = "rerank",
    request_body = RerankRequest,
    responses(
        (status = 200, description = "Rank output", body = RerankResponse),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn rank(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<RerankResponse>, ApiError> {
    let request = RerankRequest::from_json(&body)?;
    let lookup = state.models.reranker(&request.model)?;
    request.check_against(&lookup.capabilities, state.limits.max_rerank_documents)?;
    let model = lookup.checked()?;

    let (query, documents) = (request.query.clone(), request.texts());
    let query_cost = crate::routes::estimate_pair_cost(&query, documents.len());
    model
        .check_admission(&documents, query_cost)
        .map_err(|e| ApiError::from_runtime(e, "documents"))?;
    let tokenizer_model = model.clone();
    let pairs = super::off_runtime("tokenizer", move || {
        tokenizer_model.prepare(&query, &documents)
    })
    .await?
    .map_err(|e| ApiError::from_runtime(e, "documents"))?;
    embedd_api::check_token_budget(
        super::total_tokens(&pairs),
        state.limits.max_request_tokens,
        "documents",
    )?;
    let scored = model
        .score(pairs)
        .await
        .map_err(|e| ApiError::from_runtime(e, "documents"))?;
    crate::metrics::record_tokens(&request.model, "/v1/rerank", scored.tokens);
    Ok(Json(RerankResponse::new(
        &request,
        &scored.scores,
        scored.tokens,
    )))
}

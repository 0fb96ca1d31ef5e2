//! `POST /v1/multi-vector` and its deprecated alias `POST /v1/multi-embeddings`.

use axum::extract::State;
use axum::Json;
use embedd_api::{
    check_input_count, InputType, MultiVectorRequest, MultiVectorResponse, ValidationErrors,
};
use embedd_runtime::Side;

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Create multiple vector representations of the given input texts: one vector per token.
#[utoipa::path(
    post, path = "/v1/multi-vector", tag = "multi-vector",
    request_body = MultiVectorRequest,
    responses(
        (status = 200, description = "Create multi vector embeddings", body = MultiVectorResponse),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<MultiVectorResponse>, ApiError> {
    embed(state, body).await
}

/// Deprecated alias of `/v1/multi-vector`.
#[utoipa::path(
    post, path = "/v1/multi-embeddings", tag = "multi-vector",
    request_body = MultiVectorRequest,
    responses(
        (status = 200, description = "Create multi vector embeddings", body = MultiVectorResponse),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = [])),
)]
#[deprecated(note = "use /v1/multi-vector")]
pub async fn create_deprecated(
    State(state): State<AppState>,
    body: JsonBody,
) -> Result<Json<MultiVectorResponse>, ApiError> {
    embed(state, body).await
}

async fn embed(
    state: AppState,
    JsonBody(body): JsonBody,
) -> Result<Json<MultiVectorResponse>, ApiError> {
    let request = MultiVectorRequest::from_json(&body)?;
    let lookup = state.models.colbert(&request.model)?;
    request.check_against(&lookup.capabilities)?;
    let model = lookup.checked()?;
    check_input_count(request.input.len(), state.limits.max_client_batch_size)?;

    let side = match request.input_type {
        InputType::Query => Side::Query,
        InputType::Document => Side::Document,
    };
    let texts = request.texts();
    model
        .check_admission(&texts, 0)
        .map_err(|e| ApiError::from_runtime(e, "input"))?;
    let tokenizer_model = model.clone();
    let items = super::off_runtime("tokenizer", move || tokenizer_model.prepare(&texts, side))
        .await?
        .map_err(|e| ApiError::from_runtime(e, "input"))?;
    embedd_api::check_token_budget(
        super::total_tokens(&items),
        state.limits.max_request_tokens,
        "input",
    )?;
    let out = model
        .embed(items)
        .await
        .map_err(|e| ApiError::from_runtime(e, "input"))?;
    crate::metrics::record_tokens(&request.model, "/v1/multi-vector", out.tokens);
    Ok(Json(MultiVectorResponse::new(
        &request,
        out.vectors,
        out.tokens,
    )))
}

//! `POST /v1/embeddings`.

use axum::extract::State;
use axum::Json;
use embedd_api::{check_input_count, EmbedRequest, EmbedResponse, ValidationErrors};

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Create embedding representations of the given input texts.
#[utoipa::path(
    post, path = "/v1/embeddings", tag = "embeddings",
    request_body = EmbedRequest,
    responses(
        (status = 200, description = "Create embeddings", body = EmbedResponse),
        (status = 422, description = "Validation Error", body = ValidationErrors),
    ),
    security(("bearer" = []))
)]
pub async fn create(
    State(state): State<AppState>,
    JsonBody(body): JsonBody,
) -> Result<Json<EmbedResponse>, ApiError> {
    let request = EmbedRequest::from_json(&body)?;
    let lookup = state.models.embedder(&request.model)?;
    request.check_against(&lookup.capabilities)?;
    let model = lookup.checked()?;
    check_input_count(request.input.len(), state.limits.max_client_batch_size)?;

    let texts = request.texts();
    let (truncate, late_chunking) = (request.truncate, request.late_chunking);
    let task = request.task.map(|t| t.as_str());
    let tokenizer_model = model.clone();
    let items = super::off_runtime("tokenizer", move || {
        if late_chunking {
            tokenizer_model.prepare_late_chunks(&texts, truncate, task)
        } else {
            tokenizer_model.prepare_for_task(&texts, truncate, task)
        }
    })
    .await?
    .map_err(|e| ApiError::from_runtime(e, "input"))?;

    let embedded = model
        .embed(items)
        .await
        .map_err(|e| ApiError::from_runtime(e, "input"))?;
    crate::metrics::record_tokens(&request.model, "/v1/embeddings", embedded.tokens);
    Ok(Json(EmbedResponse::new(
        &request,
        embedded.vectors,
        embedded.tokens,
    )))
}

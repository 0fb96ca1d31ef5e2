//! `POST /v1/embeddings`.

use axum::extract::State;
use axum::Json;
use embedd_api::{
    check_input_count, EmbedRequest, EmbedResponse, InputItem, LocItem, ValidationError,
    ValidationErrors,
};
use embedd_runtime::Priority;
use futures_util::StreamExt;

use crate::error::ApiError;
use crate::extract::JsonBody;
use crate::state::AppState;

/// Image URLs one request fetches at once.
const CONCURRENT_FETCHES: usize = 8;

/// Create embedding representations of the given input texts and images.
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
    embed(&state, &body, Priority::Live).await.map(Json)
}

/// The route's work, for a live request or (at background priority, past admission, which
/// guards live latency) a batch request.
pub(crate) async fn embed(
    state: &AppState,
    body: &serde_json::Value,
    priority: Priority,
) -> Result<EmbedResponse, ApiError> {
    let request = EmbedRequest::from_json(body)?;
    let lookup = state.models.embedder(&request.model)?;
    request.check_against(&lookup.capabilities)?;
    let model = lookup.checked()?;
    check_input_count(request.input.len(), state.limits.max_client_batch_size)?;

    // Texts go through the text tower, images through the image tower; the two run at once
    // and the vectors are put back in input order.
    let mut text_slots = Vec::new();
    let mut image_slots = Vec::new();
    for (i, item) in request.input.iter().enumerate() {
        match item {
            InputItem::Text(_) => text_slots.push(i),
            InputItem::Image(source) => image_slots.push((i, source.clone())),
        }
    }
    let texts = request.texts();
    if priority == Priority::Live {
        model
            .check_admission(&texts, image_slots.len() * model.tokens_per_image())
            .map_err(|e| ApiError::from_runtime(e, "input"))?;
    }
    // Clients that cannot send `truncate` (LangChain, LlamaIndex, Haystack) get the server's
    // default; an explicit `false` still refuses over-long input.
    let truncate = request.truncate.unwrap_or(state.limits.auto_truncate);
    let late_chunking = request.late_chunking;
    let task = request.task.map(|t| t.as_str());
    let tokenizer_model = model.clone();
    let text_items = super::off_runtime("tokenizer", move || {
        if late_chunking {
            tokenizer_model.prepare_late_chunks(&texts, truncate, task)
        } else {
            tokenizer_model.prepare_for_task(&texts, truncate, task)
        }
    })
    .await?
    .map_err(|e| ApiError::from_runtime(e, "input"))?;
    let pixel_items = prepare_images(state, &model, image_slots.clone()).await?;
    let planned = super::total_tokens(&text_items) + super::total_tokens(&pixel_items);
    embedd_api::check_token_budget(planned, state.limits.max_request_tokens, "input")?;

    let (texts, images) = tokio::join!(
        model.embed_with(text_items, priority),
        model.embed_images_if_any(pixel_items)
    );
    let texts = texts.map_err(|e| ApiError::from_runtime(e, "input"))?;
    let images = images.map_err(|e| ApiError::from_runtime(e, "input"))?;
    let tokens = texts.tokens + images.tokens;
    crate::metrics::record_tokens(&request.model, "/v1/embeddings", tokens);
    let vectors = if image_slots.is_empty() {
        texts.vectors
    } else {
        let mut slots: Vec<Option<Vec<f32>>> = vec![None; request.input.len()];
        for (slot, v) in text_slots.into_iter().zip(texts.vectors) {
            slots[slot] = Some(v);
        }
        for ((slot, _), v) in image_slots.into_iter().zip(images.vectors) {
            slots[slot] = Some(v);
        }
        slots.into_iter().flatten().collect()
    };
    Ok(EmbedResponse::new(&request, vectors, tokens))
}

/// Fetches or decodes every image input, then decodes and preprocesses it off the runtime;
/// every input that fails is a 422 naming it.
async fn prepare_images(
    state: &AppState,
    model: &std::sync::Arc<embedd_runtime::TextEmbedder>,
    slots: Vec<(usize, embedd_api::ImageSource)>,
) -> Result<Vec<embedd_runtime::embedder::PixelItem>, ApiError> {
    if slots.is_empty() {
        return Ok(Vec::new());
    }
    let fetcher = state.images.clone();
    let fetched: Vec<_> = futures_util::stream::iter(slots.iter().cloned())
        .map(|(i, source)| {
            let fetcher = fetcher.clone();
            async move { (i, fetcher.bytes(&source).await) }
        })
        .buffered(CONCURRENT_FETCHES)
        .collect()
        .await;
    let mut errors = ValidationErrors::default();
    let mut bytes = Vec::with_capacity(fetched.len());
    for (i, result) in fetched {
        match result {
            Ok(b) => bytes.push((i, b)),
            Err(e) => errors.push(image_error(i, e.to_string())),
        }
    }
    if !errors.is_empty() {
        return Err(errors.into());
    }
    let (max_pixels, preparer) = (state.limits.max_image_pixels, model.clone());
    let prepared = super::off_runtime("image decoding", move || {
        let (slots, bytes): (Vec<usize>, Vec<Vec<u8>>) = bytes.into_iter().unzip();
        slots
            .into_iter()
            .zip(preparer.prepare_images(&bytes, max_pixels))
            .collect::<Vec<_>>()
    })
    .await?;
    let mut items = Vec::with_capacity(prepared.len());
    for (i, result) in prepared {
        match result {
            Ok(item) => items.push(item),
            Err(e) => errors.push(image_error(i, e.to_string())),
        }
    }
    errors.into_result(items).map_err(ApiError::from)
}

fn image_error(index: usize, msg: String) -> ValidationError {
    ValidationError::value(
        vec!["body".into(), "input".into(), LocItem::Index(index)],
        msg,
    )
}

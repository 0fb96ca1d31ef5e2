//! `GET /` (the contract's health check), `GET /health`, `GET /v1/models`.

use axum::extract::State;
use axum::Json;
use embedd_api::ModelList;
use serde_json::{json, Value};

use crate::state::AppState;

/// The contract's health check: an empty object.
#[utoipa::path(get, path = "/", tag = "health", responses((status = 200, description = "Healthy", body = Object)))]
pub async fn root() -> Json<Value> {
    Json(json!({}))
}

/// Liveness with the served models.
#[utoipa::path(get, path = "/health", tag = "health", responses((status = 200, description = "Healthy", body = Object)))]
pub async fn health(State(state): State<AppState>) -> Json<Value> {
    let models: Vec<String> = state.models.cards().into_iter().map(|c| c.id).collect();
    Json(json!({"status": "ok", "models": models}))
}

/// The served models.
#[utoipa::path(get, path = "/v1/models", tag = "models", responses((status = 200, body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList::new(state.models.cards()))
}

//! `GET /` (the contract's health check), `GET /health`, `/live` and `/ready` for orchestrators,
//! `GET /v1/models`.

use std::sync::atomic::Ordering;
use std::time::{Duration, UNIX_EPOCH};

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use embedd_api::{ModelCard, ModelList};
use embedd_runtime::{HealthReport, WorkerState};
use serde_json::{json, Value};

use crate::state::AppState;

/// The contract's health check: an empty object.
#[utoipa::path(get, path = "/", tag = "health", responses((status = 200, description = "Healthy", body = Object)))]
pub async fn root() -> Json<Value> {
    Json(json!({}))
}

/// The served models and each one's health: batches run, batches failed, panics caught, the
/// last failure. 503 with `"status": "degraded"` when a model's worker has stopped.
#[utoipa::path(get, path = "/health", tag = "health", responses(
    (status = 200, description = "Every model is serving", body = Object),
    (status = 503, description = "A model's worker has stopped", body = Object),
))]
pub async fn health(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let mut names = Vec::new();
    let mut models = serde_json::Map::new();
    let mut all_serving = true;
    for served in state.models.iter() {
        let report = served.health();
        all_serving &= report.state == WorkerState::Serving;
        names.push(served.capabilities.name.clone());
        models.insert(served.capabilities.name.clone(), report_json(&report));
    }
    let (status, word) = if all_serving {
        (StatusCode::OK, "ok")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "degraded")
    };
    (
        status,
        Json(json!({"status": word, "models": names, "model_health": models})),
    )
}

/// Liveness: the process answers. Orchestrators restart it when this fails.
#[utoipa::path(get, path = "/live", tag = "health", responses((status = 200, description = "The process answers", body = Object)))]
pub async fn live() -> Json<Value> {
    Json(json!({"status": "live"}))
}

/// How long `/ready` waits for each store.
const STORE_PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// A store's answer to a ping within [`STORE_PROBE_TIMEOUT`].
async fn probe<E: std::fmt::Display>(
    ping: impl std::future::Future<Output = Result<(), E>>,
) -> Result<(), String> {
    match tokio::time::timeout(STORE_PROBE_TIMEOUT, ping).await {
        Ok(answer) => answer.map_err(|e| e.to_string()),
        Err(_) => Err(format!(
            "no answer within {} s",
            STORE_PROBE_TIMEOUT.as_secs()
        )),
    }
}

/// Readiness: every model serving (models load before the server listens), the bulk job store
/// and object store answering, and not shutting down. 503 names what is not ready, so an
/// orchestrator sends traffic elsewhere until it is.
#[utoipa::path(get, path = "/ready", tag = "health", responses(
    (status = 200, description = "Ready for traffic", body = Object),
    (status = 503, description = "Not ready: the body names why", body = Object),
))]
pub async fn ready(State(state): State<AppState>) -> (StatusCode, Json<Value>) {
    let mut waiting = Vec::new();
    for served in state.models.iter() {
        if served.health().state != WorkerState::Serving {
            waiting.push(format!("model '{}' has stopped", served.capabilities.name));
        }
    }
    let bulk = &state.bulk;
    let stores = [
        ("bulk job store", probe(bulk.store.ping()).await),
        ("bulk object store", probe(bulk.objects.ping()).await),
    ];
    for (store, answer) in stores {
        if let Err(reason) = answer {
            waiting.push(format!("{store}: {reason}"));
        }
    }
    if bulk.stopping.load(Ordering::Acquire) {
        waiting.push("shutting down".into());
    }
    if waiting.is_empty() {
        (StatusCode::OK, Json(json!({"status": "ready"})))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not ready", "reasons": waiting})),
        )
    }
}

fn report_json(report: &HealthReport) -> Value {
    let incident = report.last_incident.as_ref().map(|i| {
        json!({
            "at_unix_secs": i.at.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
            "error": i.error,
            "panicked": i.panicked,
        })
    });
    json!({
        "status": match report.state {
            WorkerState::Serving => "serving",
            WorkerState::Stopped => "stopped",
        },
        "batches": report.batches,
        "failed_batches": report.failed_batches,
        "panics": report.panics,
        "last_incident": incident,
    })
}

/// The served models.
#[utoipa::path(get, path = "/v1/models", tag = "models", responses((status = 200, body = ModelList)))]
pub async fn list_models(State(state): State<AppState>) -> Json<ModelList> {
    Json(ModelList::new(state.models.cards()))
}

/// One served model (the OpenAI client's `models.retrieve`).
#[utoipa::path(
    get, path = "/v1/models/{model_id}", tag = "models",
    params(("model_id" = String, Path, description = "A served model's name")),
    responses(
        (status = 200, body = ModelCard),
        (status = 404, description = "Not served here", body = embedd_api::ErrorBody),
    )
)]
pub async fn get_model(
    State(state): State<AppState>,
    axum::extract::Path(model_id): axum::extract::Path<String>,
) -> Result<Json<ModelCard>, crate::error::ApiError> {
    state
        .models
        .iter()
        .find(|m| m.capabilities.name == model_id)
        .map(|m| Json(m.card()))
        .ok_or_else(|| {
            crate::error::ApiError::NotFound(format!("model '{model_id}' is not served here"))
        })
}

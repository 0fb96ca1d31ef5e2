//! The embedd HTTP server: configuration, model loading, the router.

pub mod auth;
pub mod body_limit;
pub mod bulk;
pub mod catalog;
pub mod config;
pub mod error;
pub mod extract;
pub mod metrics;
pub mod routes;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use embedd_runtime::colbert::ColbertSpec;
use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::reranker::RerankerSpec;
use embedd_runtime::{
    ColbertModel, CrossEncoder, ModelDir, ModelSource, SchedulerConfig, TextEmbedder,
};

use crate::catalog::Catalog;
use crate::config::Config;
use crate::state::{AppState, Limits, ModelRegistry, ServedModel};

/// Loads every configured model; any failure names the model and the file or field at fault.
pub fn build_state(config: &Config) -> anyhow::Result<AppState> {
    metrics::install();
    let catalog = Catalog::load(config.models_file.as_deref())?;
    let scheduler = SchedulerConfig {
        max_batch_tokens: config.max_batch_tokens.max(1),
        max_batch_size: config.max_batch_size.max(1),
        max_queued_items: config.max_queued_inputs.max(1),
        max_background_batch_size: config.max_background_batch_size.max(1),
    };
    let mut registry = ModelRegistry::default();
    for spec in &config.models {
        let choice = catalog.resolve(spec, &config.weights_dir)?;
        let started = Instant::now();
        let kind = match &choice.kind {
            Some(k) => k.clone(),
            None => detect_kind(&choice.source)
                .with_context(|| format!("model '{}' from {}", choice.name, choice.source))?,
        };
        let model = match kind.as_str() {
            "multi-vector" => {
                let colbert = ColbertModel::load(&ColbertSpec {
                    name: choice.name.clone(),
                    source: choice.source.clone(),
                    device: config.device,
                    precision: config.dtype,
                    scheduler,
                })
                .with_context(|| {
                    format!(
                        "loading ColBERT model '{}' from {}",
                        choice.name, choice.source
                    )
                })?;
                ServedModel::MultiVector(Arc::new(colbert))
            }
            "reranker" => {
                let reranker = CrossEncoder::load(&RerankerSpec {
                    name: choice.name.clone(),
                    source: choice.source.clone(),
                    max_tokens: choice.max_tokens,
                    device: config.device,
                    precision: config.dtype,
                    scheduler,
                })
                .with_context(|| {
                    format!("loading reranker '{}' from {}", choice.name, choice.source)
                })?;
                ServedModel::Reranker(Arc::new(reranker))
            }
            "embedding" => {
                let embedder = TextEmbedder::load(&EmbedderSpec {
                    name: choice.name.clone(),
                    source: choice.source.clone(),
                    pooling: choice.pooling,
                    max_tokens: choice.max_tokens,
                    device: config.device,
                    precision: config.dtype,
                    scheduler,
                })
                .with_context(|| {
                    format!("loading model '{}' from {}", choice.name, choice.source)
                })?;
                ServedModel::Embedding(Arc::new(embedder))
            }
            other => anyhow::bail!(
                "model '{}': kind '{other}' is not served by this build yet",
                choice.name
            ),
        };
        let seconds = started.elapsed().as_secs_f64();
        ::metrics::gauge!("embedd_model_load_seconds", "model" => choice.name.clone()).set(seconds);
        tracing::info!(model = %choice.name, seconds, "model ready");
        registry.insert(choice.name, model);
    }
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    Ok(AppState {
        models: Arc::new(registry),
        api_keys: Arc::new(
            config
                .api_keys
                .iter()
                .map(|k| k.trim().to_string())
                .filter(|k| !k.is_empty())
                .collect(),
        ),
        limits: Limits {
            max_body_bytes: config.max_body_bytes,
            max_client_batch_size: config.max_client_batch_size,
            max_rerank_documents: config.max_rerank_documents,
            max_upload_bytes: config.max_upload_bytes,
        },
        bulk: Arc::new(bulk::BulkState::open(config)?),
    })
}

/// The kind of a model named only by its source: a ColBERT checkpoint (`artifact.metadata`, or
/// the `HF_ColBERT` architecture) is multi-vector, a sequence classifier is a reranker.
fn detect_kind(source: &ModelSource) -> anyhow::Result<String> {
    let dir = ModelDir::resolve(source, &["artifact.metadata"])?;
    let architectures = dir.architectures()?;
    Ok(
        if dir.extra_file("artifact.metadata").is_some()
            || architectures.iter().any(|a| a == "HF_ColBERT")
        {
            "multi-vector".into()
        } else if architectures
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            "reranker".into()
        } else {
            "embedding".into()
        },
    )
}

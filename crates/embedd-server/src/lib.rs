//! The embedd HTTP server: configuration, model loading, the router.

pub mod admission;
pub mod auth;
pub mod body_limit;
pub mod bulk;
pub mod catalog;
pub mod config;
pub mod error;
pub mod error_bodies;
pub mod extract;
pub mod images;
pub mod metrics;
pub mod routes;
pub mod serve;
pub mod state;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use embedd_api::ModelKind;
use embedd_runtime::checkpoint::Checkpoint;
use embedd_runtime::colbert::ColbertSpec;
use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::reranker::RerankerSpec;
use embedd_runtime::{
    ColbertModel, CrossEncoder, ModelDir, ModelSource, SchedulerConfig, TextEmbedder,
};

use crate::catalog::{Catalog, ModelChoice};
use crate::config::Config;
use crate::state::{AppState, Limits, ModelRegistry, ServedModel};

/// Loads every configured model and opens the bulk store; any failure names the model and the
/// file or field at fault.
pub async fn build_state(config: &Config) -> anyhow::Result<AppState> {
    metrics::install();
    let load_config = config.clone();
    let registry = tokio::task::spawn_blocking(move || load_models(&load_config))
        .await
        .context("model loading task")??;
    state_with_models(config, registry).await
}

/// The state around an already loaded set of models.
pub async fn state_with_models(
    config: &Config,
    registry: ModelRegistry,
) -> anyhow::Result<AppState> {
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data dir {}", config.data_dir.display()))?;
    let bulk = Arc::new(bulk::BulkState::open(config).await?);
    if config.auto_truncate {
        tracing::info!("--auto-truncate: requests without `truncate` have over-long inputs cut to the model's length");
    }
    Ok(AppState {
        models: Arc::new(registry),
        cors_allow_origins: Arc::new(
            config
                .cors_allow_origins
                .iter()
                .map(|o| o.trim().trim_end_matches('/').to_string())
                .filter(|o| !o.is_empty())
                .collect(),
        ),
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
            max_image_pixels: config.max_image_pixels,
            max_request_tokens: config.max_request_tokens.max(1),
            body_read_timeout: config::seconds(config.body_read_timeout_secs),
            upload_read_timeout: config::seconds(config.upload_read_timeout_secs),
            auto_truncate: config.auto_truncate,
        },
        bulk,
        concurrency: admission::ConcurrencyLimit::new(config.max_concurrent_requests),
        images: images::ImageFetcher::new(images::FetchLimits {
            max_bytes: config.max_image_bytes,
            timeout: std::time::Duration::from_secs(config.image_fetch_timeout_secs.max(1)),
            allow_private: config.allow_private_image_urls,
        })?,
    })
}

/// `embedd pull NAME...`: fetches each model's files into the hub cache ahead of time (a progress
/// bar per download), or confirms a local one is complete; every name is tried, and the result
/// fails when any did.
pub fn pull(config: &Config, names: &[String]) -> anyhow::Result<()> {
    anyhow::ensure!(
        !names.is_empty(),
        "usage: embedd pull NAME... (catalog names or NAME=SOURCE)"
    );
    let catalog = Catalog::load(config.models_file.as_deref())?;
    let mut failed = Vec::new();
    for name in names {
        let fetched = catalog
            .resolve(name, &config.weights_dir)
            .map_err(anyhow::Error::from)
            .and_then(|choice| {
                let dir = Checkpoint::open_showing(&choice.source, PULLED_EXTRAS, true)?.dir;
                Ok((choice, dir))
            });
        match fetched {
            Ok((choice, dir)) => println!(
                "{}: ready ({}, {} weight file(s), from {})",
                choice.name,
                dir.config
                    .parent()
                    .map_or_else(String::new, |p| p.display().to_string()),
                dir.weight_files.len(),
                choice.source
            ),
            Err(e) => {
                eprintln!("{name}: {e:#}");
                failed.push(name.clone());
            }
        }
    }
    anyhow::ensure!(failed.is_empty(), "could not pull: {}", failed.join(", "));
    Ok(())
}

/// The optional files some family or head reads, fetched by `embedd pull` with the rest.
const PULLED_EXTRAS: &[&str] = &[
    "artifact.metadata",
    "preprocessor_config.json",
    "config_sentence_transformers.json",
];

fn load_models(config: &Config) -> anyhow::Result<ModelRegistry> {
    let catalog = Catalog::load(config.models_file.as_deref())?;
    let scheduler = SchedulerConfig {
        max_batch_tokens: config.batch_token_budget(),
        max_batch_size: config.batch_size_limit(),
        max_queued_items: config.max_queued_inputs.max(1),
        max_background_batch_size: config.max_background_batch_size.max(1),
        max_queue_wait: (config.max_queue_wait_secs > 0.0)
            .then(|| config::seconds(config.max_queue_wait_secs)),
    };
    let mut registry = ModelRegistry::default();
    for spec in &config.models {
        let choice = catalog.resolve(spec, &config.weights_dir)?;
        let started = Instant::now();
        let kind = match choice.kind {
            Some(k) => k,
            None => detect_kind(&choice.source)
                .with_context(|| format!("model '{}' from {}", choice.name, choice.source))?,
        };
        let what = format!(
            "loading {} model '{}' from {}",
            kind.as_str(),
            choice.name,
            choice.source
        );
        check_catalog_architecture(&choice).with_context(|| what.clone())?;
        let model = load_model(kind, &choice, config, scheduler).with_context(|| what.clone())?;
        let dimensions = match &model {
            ServedModel::Embedding(m) => m.dimensions(),
            ServedModel::Reranker(_) => 1,
            ServedModel::MultiVector(m) => m.dimensions(),
        };
        if let Some(expected) = choice.dimensions.filter(|&d| d != dimensions) {
            anyhow::bail!(
                "{what}: the catalog lists {expected} dimensions, the loaded model gives {dimensions}"
            );
        }
        let seconds = started.elapsed().as_secs_f64();
        ::metrics::gauge!("embedd_model_load_seconds", "model" => choice.name.clone()).set(seconds);
        tracing::info!(model = %choice.name, seconds, "model ready");
        registry.insert(model);
    }
    Ok(registry)
}

/// One model of `kind`, loaded as the configuration asks.
fn load_model(
    kind: ModelKind,
    choice: &ModelChoice,
    config: &Config,
    scheduler: SchedulerConfig,
) -> anyhow::Result<ServedModel> {
    let (name, source) = (choice.name.clone(), choice.source.clone());
    let (device, precision) = (config.device, config.dtype);
    Ok(match kind {
        ModelKind::Embedding => {
            ServedModel::Embedding(Arc::new(TextEmbedder::load(&EmbedderSpec {
                name,
                source,
                pooling: choice.pooling,
                max_tokens: choice.max_tokens,
                device,
                precision,
                scheduler,
            })?))
        }
        ModelKind::Reranker => {
            ServedModel::Reranker(Arc::new(CrossEncoder::load(&RerankerSpec {
                name,
                source,
                max_tokens: choice.max_tokens,
                device,
                precision,
                scheduler,
            })?))
        }
        ModelKind::MultiVector => {
            ServedModel::MultiVector(Arc::new(ColbertModel::load(&ColbertSpec {
                name,
                source,
                device,
                precision,
                scheduler,
            })?))
        }
    })
}

/// A catalog entry names the architecture family its weights must be; a checkpoint of another
/// family (a wrong hub id, a mislabelled local directory) is refused before it loads.
fn check_catalog_architecture(choice: &ModelChoice) -> anyhow::Result<()> {
    let Some(expected) = choice.architecture else {
        return Ok(());
    };
    let found = Checkpoint::open(&choice.source, &[])?.config.family();
    anyhow::ensure!(
        found == expected,
        "the catalog says architecture '{}', but config.json describes '{}'",
        expected.as_str(),
        found.as_str()
    );
    Ok(())
}

/// The kind of a model named only by its source: a ColBERT checkpoint (`artifact.metadata`, or
/// the `HF_ColBERT` architecture) is multi-vector, a sequence classifier is a reranker.
fn detect_kind(source: &ModelSource) -> anyhow::Result<ModelKind> {
    let dir = ModelDir::resolve(source, &["artifact.metadata"])?;
    let architectures = dir.architectures()?;
    Ok(
        if dir.extra_file("artifact.metadata").is_some()
            || architectures.iter().any(|a| a == "HF_ColBERT")
        {
            ModelKind::MultiVector
        } else if architectures
            .iter()
            .any(|a| a.ends_with("ForSequenceClassification"))
        {
            ModelKind::Reranker
        } else {
            ModelKind::Embedding
        },
    )
}

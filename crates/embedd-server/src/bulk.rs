//! Wiring the bulk-job crate into the server: its state, and how its worker embeds rows.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::response::IntoResponse;
use embedd_bulk::worker::{EmbedFuture, EmbeddedRows, RequestFuture};
use embedd_bulk::{BulkWorker, JobObjects, JobStore, RowEmbedder, UrlSigner, WorkerConfig};
use embedd_runtime::Priority;
use tokio::sync::Notify;

use crate::config::Config;
use crate::error::ApiError;
use crate::state::AppState;

/// Everything the bulk routes share.
pub struct BulkState {
    pub store: Arc<JobStore>,
    pub objects: JobObjects,
    pub signer: UrlSigner,
    /// Wakes the worker when a job is uploaded.
    pub wake: Arc<Notify>,
    pub stopping: Arc<AtomicBool>,
    pub config: WorkerConfig,
    pub url_ttl: Duration,
    pub public_url: Option<String>,
    /// The address the server listens on, for download links when `--public-url` is unset.
    pub listen_url: std::sync::OnceLock<String>,
    /// Build download links from the request's `Host` header (`--trust-host-header`).
    pub trust_host_header: bool,
    /// Unfinished jobs one key may have (`--bulk-max-jobs-per-key`); more uploads get 429.
    pub max_jobs_per_key: u64,
}

impl BulkState {
    /// Opens the job store and object store (`--bulk-store`, `--bulk-objects`) and the signing
    /// key (`--signing-key`, else one kept in the data dir).
    pub async fn open(config: &Config) -> anyhow::Result<Self> {
        let store = JobStore::open(config.bulk_store.as_deref(), &config.data_dir)
            .await
            .context("opening the bulk job store (--bulk-store)")?;
        let local = config.data_dir.join("bulk");
        let objects = JobObjects::open(config.bulk_objects.as_deref(), &local)
            .context("opening the bulk object store (--bulk-objects)")?;
        let signer = match &config.signing_key {
            Some(key) => UrlSigner::from_hex(key)
                .context("--signing-key must be hex, at least 32 bytes (64 hex digits)")?,
            None => {
                if store.is_shared() {
                    tracing::warn!(
                        "bulk jobs are shared but --signing-key is unset: a download link works \
                         only on the replica that made it"
                    );
                }
                UrlSigner::load_or_create(&local.join("url-signing.key"))?
            }
        };
        tracing::info!(
            store = store.describe(),
            objects = objects.describe(),
            "bulk jobs"
        );
        Ok(Self {
            store: Arc::new(store),
            objects,
            signer,
            wake: Arc::new(Notify::new()),
            stopping: Arc::new(AtomicBool::new(false)),
            config: WorkerConfig {
                chunk_rows: config.bulk_chunk_rows.max(1),
                workers: config.bulk_workers.max(1),
                lease: crate::config::seconds(config.bulk_lease_secs.max(1.0)),
                retention: Duration::from_secs(config.bulk_retention_hours * 3600),
                poll: Duration::from_secs(2),
                notify_command: config.bulk_notify_command.clone(),
            },
            url_ttl: Duration::from_secs(config.download_url_ttl_secs),
            public_url: config
                .public_url
                .as_ref()
                .map(|u| u.trim_end_matches('/').to_string()),
            listen_url: std::sync::OnceLock::new(),
            trust_host_header: config.trust_host_header,
            max_jobs_per_key: config.bulk_max_jobs_per_key.max(1),
        })
    }

    /// Records the bound address for download links; an unspecified one (0.0.0.0) becomes
    /// loopback, which only this machine reaches, so a deployment sets `--public-url`.
    pub fn set_listen_address(&self, addr: std::net::SocketAddr) {
        let mut addr = addr;
        if addr.ip().is_unspecified() {
            addr.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
            if self.public_url.is_none() && !self.trust_host_header {
                tracing::warn!(%addr, "download links point at {addr}: set --public-url for clients elsewhere");
            }
        }
        let _ = self.listen_url.set(format!("http://{addr}"));
    }

    pub fn worker(&self, state: AppState) -> BulkWorker {
        BulkWorker::new(
            self.store.clone(),
            self.objects.clone(),
            Arc::new(RegistryRows { state }),
            self.config.clone(),
            self.wake.clone(),
            self.stopping.clone(),
        )
    }
}

/// Embeds bulk rows with the served model, truncated to its length, and answers batch
/// requests as their routes do, both at background priority.
struct RegistryRows {
    state: AppState,
}

/// An error as its route would answer it: status and JSON body.
async fn error_answer(error: ApiError) -> (u16, serde_json::Value) {
    let response = error.into_response();
    let status = response.status().as_u16();
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| serde_json::json!({"detail": "the request failed"}));
    (status, body)
}

impl RowEmbedder for RegistryRows {
    fn run_request<'a>(
        &'a self,
        endpoint: &'a str,
        body: serde_json::Map<String, serde_json::Value>,
    ) -> RequestFuture<'a> {
        Box::pin(async move {
            if endpoint != "/v1/embeddings" {
                return error_answer(ApiError::NotFound(format!(
                    "batches can target /v1/embeddings, not '{endpoint}'"
                )))
                .await;
            }
            let body = serde_json::Value::Object(body);
            match crate::routes::embeddings::embed(&self.state, &body, Priority::Background).await {
                Ok(response) => match serde_json::to_value(response) {
                    Ok(value) => (200, value),
                    Err(e) => error_answer(ApiError::Internal(e.to_string())).await,
                },
                Err(e) => error_answer(e).await,
            }
        })
    }

    fn models(&self) -> Vec<String> {
        self.state
            .models
            .iter()
            .filter(|m| m.capabilities.kind == embedd_api::ModelKind::Embedding)
            .map(|m| m.capabilities.name.clone())
            .collect()
    }

    fn embed<'a>(&'a self, model: &'a str, texts: Vec<String>) -> EmbedFuture<'a> {
        Box::pin(async move {
            let embedder = self
                .state
                .models
                .embedder(model)
                .ok()
                .and_then(|l| l.model)
                .ok_or_else(|| format!("model '{model}' is not served by this server"))?;
            let preparer = embedder.clone();
            let items = tokio::task::spawn_blocking(move || preparer.prepare(&texts, true))
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            let truncated = items.iter().filter(|i| i.truncated).count() as u64;
            let out = embedder
                .embed_with(items, Priority::Background)
                .await
                .map_err(|e| e.to_string())?;
            let vectors = out
                .vectors
                .into_iter()
                .map(|mut v| {
                    embedd_api::embeddings::l2_normalize(&mut v);
                    v
                })
                .collect();
            Ok(EmbeddedRows {
                vectors,
                tokens: out.tokens as u64,
                truncated,
            })
        })
    }
}

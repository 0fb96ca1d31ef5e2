//! Wiring the bulk-job crate into the server: its state, and how its worker embeds rows.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use embedd_bulk::worker::{EmbedFuture, EmbeddedRows};
use embedd_bulk::{BulkWorker, JobStore, RowEmbedder, UrlSigner, WorkerConfig};
use embedd_runtime::Priority;
use tokio::sync::Notify;

use crate::config::Config;
use crate::state::ModelRegistry;

/// Everything the bulk routes share.
pub struct BulkState {
    pub store: Arc<JobStore>,
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
    pub fn open(config: &Config) -> anyhow::Result<Self> {
        let store = Arc::new(JobStore::open(&config.data_dir)?);
        let signer = UrlSigner::load_or_create(&store.root().join("url-signing.key"))?;
        Ok(Self {
            store,
            signer,
            wake: Arc::new(Notify::new()),
            stopping: Arc::new(AtomicBool::new(false)),
            config: WorkerConfig {
                chunk_rows: config.bulk_chunk_rows.max(1),
                workers: config.bulk_workers.max(1),
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

    pub fn worker(&self, models: Arc<ModelRegistry>) -> BulkWorker {
        BulkWorker::new(
            self.store.clone(),
            Arc::new(RegistryRows { models }),
            self.config.clone(),
            self.wake.clone(),
            self.stopping.clone(),
        )
    }
}

/// Embeds bulk rows with the served model, truncated to its length, at background priority.
struct RegistryRows {
    models: Arc<ModelRegistry>,
}

impl RowEmbedder for RegistryRows {
    fn embed<'a>(&'a self, model: &'a str, texts: Vec<String>) -> EmbedFuture<'a> {
        Box::pin(async move {
            let embedder = self
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

//! What every handler shares: the loaded models, the keys, the limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use embedd_api::{ModelCapabilities, ModelCard, ModelKind, ValidationError, ValidationErrors};
use embedd_runtime::{ColbertModel, CrossEncoder, HealthReport, TextEmbedder};

/// A loaded model, by the route family that serves it.
#[derive(Clone)]
pub enum ServedModel {
    Embedding(Arc<TextEmbedder>),
    Reranker(Arc<CrossEncoder>),
    MultiVector(Arc<ColbertModel>),
}

/// A served model with what it can do, worked out once at load: the only place the server
/// looks at which runtime type a model is.
#[derive(Clone)]
pub struct Served {
    pub capabilities: ModelCapabilities,
    /// Where the weights came from: a directory or a hub repository.
    pub source: String,
    pub model: ServedModel,
    /// When this server loaded it (unix seconds): the OpenAI listing's `created`.
    pub loaded_unix: i64,
}

impl Served {
    pub fn new(model: ServedModel) -> Self {
        let (capabilities, source) = match &model {
            ServedModel::Embedding(m) => (
                ModelCapabilities {
                    name: m.name().to_string(),
                    kind: ModelKind::Embedding,
                    dimensions: m.dimensions(),
                    max_input_tokens: m.max_tokens(),
                    accepts_images: m.accepts_images(),
                    // Late chunking pools spans of a text encoder's window; a text-image
                    // model's text vector is one token's.
                    supports_late_chunking: !m.accepts_images(),
                    tasks: m.tasks().to_vec(),
                },
                m.source().to_string(),
            ),
            ServedModel::Reranker(m) => (
                ModelCapabilities {
                    name: m.name().to_string(),
                    kind: ModelKind::Reranker,
                    dimensions: 1,
                    max_input_tokens: m.max_tokens(),
                    accepts_images: false,
                    supports_late_chunking: false,
                    tasks: Vec::new(),
                },
                m.source().to_string(),
            ),
            ServedModel::MultiVector(m) => (
                ModelCapabilities {
                    name: m.name().to_string(),
                    kind: ModelKind::MultiVector,
                    dimensions: m.dimensions(),
                    max_input_tokens: m.settings().doc_maxlen,
                    accepts_images: false,
                    supports_late_chunking: false,
                    tasks: Vec::new(),
                },
                m.source().to_string(),
            ),
        };
        Self {
            capabilities,
            source,
            model,
            loaded_unix: time::OffsetDateTime::now_utc().unix_timestamp(),
        }
    }

    pub fn card(&self) -> ModelCard {
        ModelCard::new(&self.capabilities, self.source.clone(), self.loaded_unix)
    }

    /// Inputs waiting or running in the model's scheduler.
    pub fn queued_items(&self) -> usize {
        match &self.model {
            ServedModel::Embedding(m) => m.queued_items(),
            ServedModel::Reranker(m) => m.queued_items(),
            ServedModel::MultiVector(m) => m.queued_items(),
        }
    }

    pub fn health(&self) -> HealthReport {
        match &self.model {
            ServedModel::Embedding(m) => m.health(),
            ServedModel::Reranker(m) => m.health(),
            ServedModel::MultiVector(m) => m.health(),
        }
    }
}

#[derive(Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, Served>,
}

impl ModelRegistry {
    pub fn insert(&mut self, model: ServedModel) {
        let served = Served::new(model);
        self.models.insert(served.capabilities.name.clone(), served);
    }

    pub fn iter(&self) -> impl Iterator<Item = &Served> {
        self.models.values()
    }

    /// Inputs queued per model, for the metrics page.
    pub fn queue_depths(&self) -> Vec<(String, usize)> {
        self.iter()
            .map(|m| (m.capabilities.name.clone(), m.queued_items()))
            .collect()
    }

    pub fn cards(&self) -> Vec<ModelCard> {
        self.iter().map(Served::card).collect()
    }

    /// The model a request names, or a 422 on its `model` field listing what is served.
    pub fn get(&self, name: &str) -> Result<&Served, ValidationErrors> {
        self.models.get(name).ok_or_else(|| {
            ValidationErrors::single(ValidationError::value(
                vec!["body".into(), "model".into()],
                format!(
                    "model '{name}' is not served here; available: {}",
                    self.models.keys().cloned().collect::<Vec<_>>().join(", ")
                ),
            ))
        })
    }

    /// The model a request names, with the model itself when it is of the kind `pick` takes. A
    /// model of another kind is refused by the request's `check_against`, which the caller runs
    /// on the capabilities first.
    fn lookup<M>(
        &self,
        name: &str,
        pick: impl FnOnce(&ServedModel) -> Option<Arc<M>>,
    ) -> Result<Lookup<M>, ValidationErrors> {
        let served = self.get(name)?;
        Ok(Lookup {
            capabilities: served.capabilities.clone(),
            model: pick(&served.model),
        })
    }

    pub fn embedder(&self, name: &str) -> Result<Lookup<TextEmbedder>, ValidationErrors> {
        self.lookup(name, |m| match m {
            ServedModel::Embedding(m) => Some(m.clone()),
            _ => None,
        })
    }

    pub fn colbert(&self, name: &str) -> Result<Lookup<ColbertModel>, ValidationErrors> {
        self.lookup(name, |m| match m {
            ServedModel::MultiVector(m) => Some(m.clone()),
            _ => None,
        })
    }

    pub fn reranker(&self, name: &str) -> Result<Lookup<CrossEncoder>, ValidationErrors> {
        self.lookup(name, |m| match m {
            ServedModel::Reranker(m) => Some(m.clone()),
            _ => None,
        })
    }
}

/// A named model's capabilities, and the model itself when it is of the kind asked for.
pub struct Lookup<M> {
    pub capabilities: ModelCapabilities,
    pub model: Option<Arc<M>>,
}

impl<M> Lookup<M> {
    /// The model, once the request was checked against `capabilities` (which refuses other kinds).
    pub fn checked(self) -> Result<Arc<M>, crate::error::ApiError> {
        self.model
            .ok_or_else(|| crate::error::ApiError::Internal("model kind was not checked".into()))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_client_batch_size: usize,
    pub max_rerank_documents: usize,
    pub max_upload_bytes: usize,
    pub max_image_pixels: u64,
    /// Tokens one request's inputs may come to (`--max-request-tokens`).
    pub max_request_tokens: usize,
    /// A JSON body must have arrived by then (408 otherwise).
    pub body_read_timeout: std::time::Duration,
    /// The same for a bulk upload.
    pub upload_read_timeout: std::time::Duration,
    /// `truncate` for requests that leave it out (`--auto-truncate`).
    pub auto_truncate: bool,
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<ModelRegistry>,
    /// `--cors-allow-origin`: empty for none, `*` for any.
    pub cors_allow_origins: Arc<Vec<String>>,
    pub api_keys: Arc<Vec<String>>,
    pub limits: Limits,
    pub bulk: Arc<crate::bulk::BulkState>,
    pub concurrency: crate::admission::ConcurrencyLimit,
    pub images: crate::images::ImageFetcher,
}

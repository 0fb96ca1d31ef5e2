//! What a served model can do, as far as request validation and `/v1/models` need to know.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Which routes a model serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ModelKind {
    /// Dense vectors on `/v1/embeddings`.
    Embedding,
    /// Cross-encoder scores on `/v1/rerank`.
    Reranker,
    /// Per-token vectors on `/v1/multi-vector`.
    MultiVector,
}

impl ModelKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ModelKind::Embedding => "embedding",
            ModelKind::Reranker => "reranker",
            ModelKind::MultiVector => "multi-vector",
        }
    }

    pub fn route(self) -> &'static str {
        match self {
            ModelKind::Embedding => "/v1/embeddings",
            ModelKind::Reranker => "/v1/rerank",
            ModelKind::MultiVector => "/v1/multi-vector",
        }
    }
}

/// The limits a request is checked against once its model is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelCapabilities {
    pub name: String,
    pub kind: ModelKind,
    /// Output vector size.
    pub dimensions: usize,
    /// The most tokens one input may have, special tokens included.
    pub max_input_tokens: usize,
    pub accepts_images: bool,
    pub supports_late_chunking: bool,
    /// The tasks the model has adapters for; empty: `task` is accepted and has no effect.
    pub tasks: Vec<String>,
}

impl ModelCapabilities {
    /// A 422 on `model` when the named model serves another route than the one called.
    pub fn expect_kind(&self, kind: ModelKind) -> Option<crate::ValidationError> {
        (self.kind != kind).then(|| {
            crate::ValidationError::value(
                vec!["body".into(), "model".into()],
                format!(
                    "model '{}' is a {} model, served on {}",
                    self.name,
                    self.kind.as_str(),
                    self.kind.route()
                ),
            )
        })
    }
}

/// One entry of `GET /v1/models`, in the OpenAI list shape with embedd's details added.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelCard {
    pub id: String,
    pub object: &'static str,
    /// When the server loaded the model (unix seconds).
    pub created: i64,
    pub owned_by: &'static str,
    pub kind: ModelKind,
    pub dimensions: usize,
    pub max_input_tokens: usize,
    /// Where the weights were loaded from: a directory or a hub repository.
    pub source: String,
}

impl ModelCard {
    pub fn new(capabilities: &ModelCapabilities, source: impl Into<String>, created: i64) -> Self {
        Self {
            id: capabilities.name.clone(),
            object: "model",
            created,
            owned_by: "embedd",
            kind: capabilities.kind,
            dimensions: capabilities.dimensions,
            max_input_tokens: capabilities.max_input_tokens,
            source: source.into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct ModelList {
    pub object: &'static str,
    pub data: Vec<ModelCard>,
}

impl ModelList {
    pub fn new(data: Vec<ModelCard>) -> Self {
        Self {
            object: "list",
            data,
        }
    }
}

//! What every handler shares: the loaded models, the keys, the limits.

use std::collections::BTreeMap;
use std::sync::Arc;

use embedd_api::{ModelCapabilities, ModelCard, ModelKind, ValidationError, ValidationErrors};
use embedd_runtime::TextEmbedder;

/// A loaded model, by the route family that serves it.
#[derive(Clone)]
pub enum ServedModel {
    Embedding(Arc<TextEmbedder>),
}

impl ServedModel {
    pub fn capabilities(&self) -> ModelCapabilities {
        match self {
            ServedModel::Embedding(m) => ModelCapabilities {
                name: m.name().to_string(),
                kind: ModelKind::Embedding,
                dimensions: m.dimensions(),
                max_input_tokens: m.max_tokens(),
                accepts_images: false,
                supports_late_chunking: true,
            },
        }
    }

    pub fn card(&self) -> ModelCard {
        let source = match self {
            ServedModel::Embedding(m) => m.source().to_string(),
        };
        ModelCard::new(&self.capabilities(), source)
    }
}

#[derive(Default)]
pub struct ModelRegistry {
    models: BTreeMap<String, ServedModel>,
}

impl ModelRegistry {
    pub fn insert(&mut self, name: String, model: ServedModel) {
        self.models.insert(name, model);
    }

    pub fn cards(&self) -> Vec<ModelCard> {
        self.models.values().map(ServedModel::card).collect()
    }

    /// The model a request names, or a 422 on its `model` field listing what is served.
    pub fn get(&self, name: &str) -> Result<&ServedModel, ValidationErrors> {
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

    /// The embedding model a request names, checked for kind.
    pub fn embedder(
        &self,
        name: &str,
    ) -> Result<(Arc<TextEmbedder>, ModelCapabilities), ValidationErrors> {
        let model = self.get(name)?;
        let caps = model.capabilities();
        match model {
            ServedModel::Embedding(m) => Ok((m.clone(), caps)),
        }
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_client_batch_size: usize,
}

#[derive(Clone)]
pub struct AppState {
    pub models: Arc<ModelRegistry>,
    pub api_keys: Arc<Vec<String>>,
    pub limits: Limits,
}

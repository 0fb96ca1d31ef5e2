//! The model catalog (models/catalog.toml, compiled in, plus an optional user file) and how a
//! `--model` argument becomes something to load.

use std::path::{Path, PathBuf};

use embedd_api::ModelKind;
use embedd_runtime::{Family, ModelSource, Pooling};
use serde::Deserialize;

const BUILT_IN: &str = include_str!("../../../models/catalog.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub name: String,
    pub kind: ModelKind,
    pub architecture: Family,
    pub hub: Option<String>,
    pub local: Option<String>,
    pub pooling: Option<String>,
    pub max_tokens: Option<usize>,
    pub dimensions: Option<usize>,
    pub package: Option<String>,
}

#[derive(Debug, Deserialize)]
struct CatalogFile {
    #[serde(default)]
    model: Vec<CatalogEntry>,
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("{file}: {reason}")]
    File { file: String, reason: String },
    #[error("--model '{spec}': {reason}")]
    Spec { spec: String, reason: String },
}

#[derive(Debug, Clone, Default)]
pub struct Catalog {
    entries: Vec<CatalogEntry>,
}

/// A `--model` argument resolved to what the runtime loads.
#[derive(Debug, Clone)]
pub struct ModelChoice {
    pub name: String,
    /// From the catalog; `None` for a model given only by its source (detected from its files).
    pub kind: Option<ModelKind>,
    /// The family the catalog says the weights are, checked against their `config.json`.
    pub architecture: Option<Family>,
    pub source: ModelSource,
    pub pooling: Option<Pooling>,
    pub max_tokens: Option<usize>,
    /// The output size the catalog lists, checked against the loaded model.
    pub dimensions: Option<usize>,
}

impl Catalog {
    pub fn load(user_file: Option<&Path>) -> Result<Self, CatalogError> {
        let mut entries = parse(BUILT_IN, "models/catalog.toml (built in)")?;
        if let Some(path) = user_file {
            let text = std::fs::read_to_string(path).map_err(|e| CatalogError::File {
                file: path.display().to_string(),
                reason: e.to_string(),
            })?;
            // Later entries with the same name replace built-in ones.
            for entry in parse(&text, &path.display().to_string())? {
                entries.retain(|e: &CatalogEntry| e.name != entry.name);
                entries.push(entry);
            }
        }
        Ok(Self { entries })
    }

    pub fn get(&self, name: &str) -> Option<&CatalogEntry> {
        self.entries.iter().find(|e| e.name == name)
    }

    /// `NAME` (catalog) or `NAME=SOURCE`.
    pub fn resolve(&self, spec: &str, weights_dir: &Path) -> Result<ModelChoice, CatalogError> {
        let err = |reason: String| CatalogError::Spec {
            spec: spec.to_string(),
            reason,
        };
        let (name, explicit_source) = match spec.split_once('=') {
            Some((n, s)) => (n.trim(), Some(s.trim())),
            None => (spec.trim(), None),
        };
        if name.is_empty() {
            return Err(err("the model name is empty".into()));
        }
        let entry = self.get(name);
        let source = match (explicit_source, entry) {
            (Some(s), _) => ModelSource::parse(s).map_err(err)?,
            (None, Some(e)) => catalog_source(e, weights_dir).map_err(err)?,
            (None, None) => {
                return Err(err(format!(
                    "not in the catalog; give a source as NAME=DIR or NAME=org/repo (catalog: {})",
                    self.entries
                        .iter()
                        .map(|e| e.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )))
            }
        };
        let catalog_weights = entry.filter(|_| explicit_source.is_none());
        let pooling = entry
            .and_then(|e| e.pooling.as_deref())
            .map(str::parse)
            .transpose()
            .map_err(err)?;
        Ok(ModelChoice {
            name: name.to_string(),
            kind: entry.map(|e| e.kind),
            // What the catalog says of its own weights; a source given on the command line may
            // be another model served under the same name.
            architecture: catalog_weights.map(|e| e.architecture),
            source,
            pooling,
            max_tokens: entry.and_then(|e| e.max_tokens),
            dimensions: catalog_weights.and_then(|e| e.dimensions),
        })
    }
}

fn catalog_source(entry: &CatalogEntry, weights_dir: &Path) -> Result<ModelSource, String> {
    if let Some(local) = &entry.local {
        let dir: PathBuf = weights_dir.join(local);
        if dir.join("config.json").is_file() {
            return Ok(ModelSource::Local(dir));
        }
    }
    match &entry.hub {
        Some(hub) => ModelSource::parse(hub),
        None => Err(format!(
            "no local weights under {} and no hub repository in the catalog",
            weights_dir.display()
        )),
    }
}

fn parse(text: &str, file: &str) -> Result<Vec<CatalogEntry>, CatalogError> {
    toml::from_str::<CatalogFile>(text)
        .map(|f| f.model)
        .map_err(|e| CatalogError::File {
            file: file.to_string(),
            reason: e.to_string(),
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_in_catalog_parses_and_names_the_jina_models() {
        let c = Catalog::load(None).unwrap();
        for name in [
            "all-MiniLM-L6-v2",
            "jina-embeddings-v2-base-en",
            "jina-colbert-v1-en",
            "jina-colbert-v2",
            "jina-reranker-v1-base-en",
        ] {
            assert!(c.get(name).is_some(), "{name}");
        }
    }

    #[test]
    fn jina_colbert_v2_entries_match_its_layout() {
        // The fixture in jina-colbert-v2's hub layout resolves to the family the catalog names,
        // so `--model jina-colbert-v2` passes the architecture check at load.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-jina-colbert-v2");
        let source = ModelSource::Local(dir);
        let found = embedd_runtime::checkpoint::Checkpoint::open(&source, &[])
            .unwrap()
            .config
            .family();
        let c = Catalog::load(None).unwrap();
        for (name, dimensions) in [
            ("jina-colbert-v2", 128),
            ("jina-colbert-v2-96", 96),
            ("jina-colbert-v2-64", 64),
        ] {
            let entry = c.get(name).unwrap();
            assert_eq!(entry.kind, ModelKind::MultiVector, "{name}");
            assert_eq!(entry.architecture, found, "{name}");
            assert_eq!(entry.dimensions, Some(dimensions), "{name}");
        }
    }

    #[test]
    fn jina_embeddings_v5_entries_match_its_layout() {
        let c = Catalog::load(None).unwrap();
        for (name, fixture) in [
            ("jina-embeddings-v5-text-small", "tiny-jina-v5-small"),
            ("jina-embeddings-v5-text-nano", "tiny-jina-v5-nano"),
        ] {
            let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../../tests/fixtures/models")
                .join(fixture);
            let found = embedd_runtime::checkpoint::Checkpoint::open(&ModelSource::Local(dir), &[])
                .unwrap()
                .config
                .family();
            let entry = c.get(name).unwrap();
            assert_eq!(entry.architecture, found, "{name}");
            assert_eq!(entry.kind, ModelKind::Embedding, "{name}");
        }
    }

    #[test]
    fn an_unknown_kind_or_architecture_is_refused_naming_it() {
        let entry = |kind: &str, arch: &str| {
            format!("[[model]]\nname = \"m\"\nkind = \"{kind}\"\narchitecture = \"{arch}\"\nhub = \"o/m\"\n")
        };
        assert!(parse(&entry("embedding", "jina-bert"), "f").is_ok());
        let err = parse(&entry("image", "bert"), "f").unwrap_err().to_string();
        assert!(err.contains("image"), "{err}");
        let err = parse(&entry("embedding", "gpt"), "f")
            .unwrap_err()
            .to_string();
        assert!(err.contains("gpt"), "{err}");
    }

    #[test]
    fn specs_resolve_to_local_or_hub() {
        let c = Catalog::load(None).unwrap();
        let empty = std::env::temp_dir().join("embedd-no-weights-here");
        let choice = c.resolve("all-MiniLM-L6-v2", &empty).unwrap();
        assert_eq!(
            choice.source,
            ModelSource::Hub {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: None
            }
        );
        assert_eq!(choice.pooling, Some(Pooling::Mean));
        assert_eq!(choice.kind, Some(ModelKind::Embedding));
        assert_eq!(choice.architecture, Some(Family::Bert));
        let choice = c.resolve("mine=org/model@main", &empty).unwrap();
        assert_eq!(choice.name, "mine");
        assert_eq!(choice.kind, None);
        let err = c.resolve("nope", &empty).unwrap_err().to_string();
        assert!(err.contains("not in the catalog"), "{err}");
    }
}

//! A model's files, from a local directory or the Hugging Face hub, and what its sentence-transformers
//! metadata says about pooling, normalization and length.

use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Result, RuntimeError};
use crate::heads::Pooling;

/// Where a model's files come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    Local(PathBuf),
    /// A hub repository id, optionally pinned (`org/name@revision`).
    Hub {
        repo: String,
        revision: Option<String>,
    },
}

impl ModelSource {
    /// An existing directory is local; anything shaped like `org/name[@rev]` is a hub repository.
    pub fn parse(s: &str) -> std::result::Result<Self, String> {
        let path = Path::new(s);
        if path.is_dir() {
            return Ok(Self::Local(path.to_path_buf()));
        }
        let (repo, revision) = match s.split_once('@') {
            Some((r, rev)) => (r, Some(rev.to_string())),
            None => (s, None),
        };
        let parts: Vec<&str> = repo.split('/').collect();
        let looks_like_repo = matches!(parts.as_slice(), [o, n] if !o.is_empty() && !n.is_empty() && !o.starts_with('.'));
        if looks_like_repo && !s.starts_with('/') {
            Ok(Self::Hub {
                repo: repo.to_string(),
                revision,
            })
        } else {
            Err(format!(
                "'{s}' is neither an existing model directory nor a hub repository id (org/name)"
            ))
        }
    }
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Local(p) => write!(f, "{}", p.display()),
            Self::Hub {
                repo,
                revision: Some(r),
            } => write!(f, "hf://{repo}@{r}"),
            Self::Hub {
                repo,
                revision: None,
            } => write!(f, "hf://{repo}"),
        }
    }
}

/// What sentence-transformers' own files say about the pipeline after the transformer.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SentenceTransformersInfo {
    pub pooling: Option<Pooling>,
    /// A `Normalize` module ends the pipeline.
    pub normalize: bool,
    /// `max_seq_length` of `sentence_bert_config.json`.
    pub max_seq_length: Option<usize>,
    /// `prompts` of `config_sentence_transformers.json`: text put before inputs, by name
    /// (Qwen3-Embedding's `query` instruction).
    pub prompts: std::collections::BTreeMap<String, String>,
}

/// The files of one model, resolved to local paths.
#[derive(Debug, Clone)]
pub struct ModelDir {
    pub source: ModelSource,
    pub config: PathBuf,
    pub tokenizer: PathBuf,
    /// The weights file, or the shard index of a sharded checkpoint (what errors name).
    pub weights: PathBuf,
    /// Every file holding tensors: the one file, or each shard the index names.
    pub weight_files: Vec<PathBuf>,
    pub sentence_transformers: SentenceTransformersInfo,
    /// Extra files by relative name (a ColBERT projection, say), present when asked for and found.
    pub extra: Vec<(String, PathBuf)>,
}

const WEIGHT_FILES: [&str; 3] = ["model.safetensors", SAFETENSORS_INDEX, "pytorch_model.bin"];

/// A sharded safetensors checkpoint's index: `weight_map` names the shard of every tensor.
const SAFETENSORS_INDEX: &str = "model.safetensors.index.json";

/// Fetches files by relative name from one place: a directory or a hub repository.
trait FileSource {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>>;
    fn describe(&self) -> String;
}

struct LocalFiles(PathBuf);

impl FileSource for LocalFiles {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>> {
        let path = self.0.join(name);
        Ok(path.is_file().then_some(path))
    }
    fn describe(&self) -> String {
        self.0.display().to_string()
    }
}

struct HubFiles {
    repo: hf_hub::Repo,
    offline: bool,
    /// A progress bar per download on the terminal (`embedd pull`); the log has a line each way.
    progress: bool,
}

impl FileSource for HubFiles {
    fn fetch(&self, name: &str) -> Result<Option<PathBuf>> {
        let cache = hf_hub::Cache::from_env();
        if let Some(path) = cache.repo(self.repo.clone()).get(name) {
            return Ok(Some(path));
        }
        if self.offline {
            return Ok(None);
        }
        let api = hf_hub::api::sync::ApiBuilder::from_env()
            .with_progress(self.progress)
            .build()
            .map_err(|e| RuntimeError::Hub(e.to_string()))?;
        let started = std::time::Instant::now();
        tracing::info!(source = %self.describe(), file = name, "downloading from the hub");
        match api.repo(self.repo.clone()).get(name) {
            Ok(path) => {
                let bytes = std::fs::metadata(&path).map_or(0, |m| m.len());
                tracing::info!(
                    source = %self.describe(), file = name, bytes,
                    seconds = started.elapsed().as_secs_f64(), "downloaded"
                );
                Ok(Some(path))
            }
            Err(hf_hub::api::sync::ApiError::RequestError(e))
                if matches!(*e, ureq::Error::Status(404, _)) =>
            {
                Ok(None)
            }
            Err(e) => Err(RuntimeError::Hub(format!(
                "{}: fetching {name}: {e}",
                self.describe()
            ))),
        }
    }
    fn describe(&self) -> String {
        format!("hf://{}", self.repo.url())
    }
}

impl ModelDir {
    /// Resolves every file the runtime needs; `extra` names optional files to look for too.
    pub fn resolve(source: &ModelSource, extra: &[&str]) -> Result<Self> {
        Self::resolve_showing(source, extra, false)
    }

    /// [`Self::resolve`], with a progress bar on the terminal for each file it downloads.
    pub fn resolve_showing(source: &ModelSource, extra: &[&str], progress: bool) -> Result<Self> {
        let files = file_source(source, progress)?;
        let required = |name: &str| -> Result<PathBuf> {
            files.fetch(name)?.ok_or_else(|| RuntimeError::ModelFile {
                path: PathBuf::from(files.describe()).join(name),
                reason: "required file is missing".into(),
            })
        };
        let config = required("config.json")?;
        let tokenizer = required("tokenizer.json")?;
        let mut weights = None;
        for name in WEIGHT_FILES {
            if let Some(p) = files.fetch(name)? {
                weights = Some(p);
                break;
            }
        }
        let weights = weights.ok_or_else(|| RuntimeError::ModelFile {
            path: PathBuf::from(files.describe()),
            reason: format!("no weights: expected one of {}", WEIGHT_FILES.join(", ")),
        })?;
        let weight_files = if weights.ends_with(SAFETENSORS_INDEX) {
            shard_files(files.as_ref(), &weights)?
        } else {
            vec![weights.clone()]
        };
        let sentence_transformers = read_sentence_transformers(files.as_ref())?;
        let mut found = Vec::new();
        for name in extra {
            if let Some(p) = files.fetch(name)? {
                found.push((name.to_string(), p));
            }
        }
        Ok(Self {
            source: source.clone(),
            config,
            tokenizer,
            weights,
            weight_files,
            sentence_transformers,
            extra: found,
        })
    }

    /// `architectures` of `config.json`.
    pub fn architectures(&self) -> Result<Vec<String>> {
        Ok(self
            .read_config()?
            .get("architectures")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default())
    }

    pub fn read_config(&self) -> Result<Value> {
        read_json(&self.config)
    }

    /// Looks for more optional files once the config has said which (a model's task adapters).
    pub fn fetch_extra(&mut self, names: &[String], progress: bool) -> Result<()> {
        let files = file_source(&self.source, progress)?;
        for name in names {
            if self.extra_file(name).is_none() {
                if let Some(p) = files.fetch(name)? {
                    self.extra.push((name.clone(), p));
                }
            }
        }
        Ok(())
    }

    pub fn extra_file(&self, name: &str) -> Option<&Path> {
        find_extra(&self.extra, name)
    }
}

/// The path of extra file `name` among `extra` (relative name, path), if it was found.
pub fn find_extra<'a>(extra: &'a [(String, PathBuf)], name: &str) -> Option<&'a Path> {
    extra
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p.as_path())
}

/// Where `source`'s files come from.
fn file_source(source: &ModelSource, progress: bool) -> Result<Box<dyn FileSource>> {
    Ok(match source {
        ModelSource::Local(dir) => {
            if !dir.is_dir() {
                return Err(RuntimeError::ModelFile {
                    path: dir.clone(),
                    reason: "not a directory".into(),
                });
            }
            Box::new(LocalFiles(dir.clone()))
        }
        ModelSource::Hub { repo, revision } => {
            let repo = match revision {
                Some(r) => {
                    hf_hub::Repo::with_revision(repo.clone(), hf_hub::RepoType::Model, r.clone())
                }
                None => hf_hub::Repo::model(repo.clone()),
            };
            let offline = std::env::var("HF_HUB_OFFLINE")
                .is_ok_and(|v| matches!(v.as_str(), "1" | "true" | "TRUE" | "yes"));
            Box::new(HubFiles {
                repo,
                offline,
                progress,
            })
        }
    })
}

/// The shards a safetensors index names, each fetched once, in first-mention order.
fn shard_files(files: &dyn FileSource, index: &Path) -> Result<Vec<PathBuf>> {
    let map = read_json(index)?;
    let Some(weight_map) = map.get("weight_map").and_then(Value::as_object) else {
        return Err(RuntimeError::ModelConfig {
            path: index.to_path_buf(),
            field: "weight_map".into(),
            reason: "missing or not an object".into(),
        });
    };
    let mut names: Vec<&str> = Vec::new();
    for shard in weight_map.values() {
        let Some(name) = shard.as_str() else {
            return Err(RuntimeError::ModelConfig {
                path: index.to_path_buf(),
                field: "weight_map".into(),
                reason: format!("shard {shard} is not a file name"),
            });
        };
        if name.contains("..") || name.starts_with('/') {
            return Err(RuntimeError::ModelConfig {
                path: index.to_path_buf(),
                field: "weight_map".into(),
                reason: format!("shard '{name}' is outside the model directory"),
            });
        }
        if !names.contains(&name) {
            names.push(name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            files.fetch(name)?.ok_or_else(|| RuntimeError::ModelFile {
                path: PathBuf::from(files.describe()).join(name),
                reason: format!("shard named by {SAFETENSORS_INDEX} is missing"),
            })
        })
        .collect()
}

pub(crate) fn read_json(path: &Path) -> Result<Value> {
    let text = std::fs::read_to_string(path).map_err(|e| RuntimeError::ModelFile {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    serde_json::from_str(&text).map_err(|e| RuntimeError::ModelFile {
        path: path.to_path_buf(),
        reason: format!("invalid JSON: {e}"),
    })
}

#[derive(Deserialize)]
struct ModuleEntry {
    #[serde(default)]
    path: String,
    #[serde(rename = "type")]
    kind: String,
}

/// Reads `modules.json`, the pooling module's config and `sentence_bert_config.json` where present.
fn read_sentence_transformers(files: &dyn FileSource) -> Result<SentenceTransformersInfo> {
    let mut info = SentenceTransformersInfo::default();
    if let Some(path) = files.fetch("config_sentence_transformers.json")? {
        if let Some(prompts) = read_json(&path)?.get("prompts").and_then(Value::as_object) {
            info.prompts = prompts
                .iter()
                .filter_map(|(name, p)| Some((name.clone(), p.as_str()?.to_string())))
                .collect();
        }
    }
    if let Some(path) = files.fetch("sentence_bert_config.json")? {
        info.max_seq_length = read_json(&path)?
            .get("max_seq_length")
            .and_then(Value::as_u64)
            .map(|v| v as usize);
    }
    let Some(modules_path) = files.fetch("modules.json")? else {
        return Ok(info);
    };
    let modules: Vec<ModuleEntry> =
        serde_json::from_value(read_json(&modules_path)?).map_err(|e| {
            RuntimeError::ModelConfig {
                path: modules_path.clone(),
                field: "[]".into(),
                reason: e.to_string(),
            }
        })?;
    for module in modules {
        let kind = module.kind.rsplit('.').next().unwrap_or_default();
        match kind {
            "Transformer" => {}
            "Normalize" => info.normalize = true,
            "Pooling" => {
                let name = format!("{}/config.json", module.path.trim_end_matches('/'));
                let path = files.fetch(&name)?.ok_or_else(|| RuntimeError::ModelFile {
                    path: PathBuf::from(files.describe()).join(&name),
                    reason: "modules.json names a Pooling module but its config is missing".into(),
                })?;
                info.pooling = Some(pooling_from_config(&path, &read_json(&path)?)?);
            }
            other => {
                return Err(RuntimeError::ModelConfig {
                    path: modules_path,
                    field: "type".into(),
                    reason: format!(
                        "sentence-transformers module '{other}' ({}) is not supported",
                        module.kind
                    ),
                })
            }
        }
    }
    Ok(info)
}

fn pooling_from_config(path: &Path, config: &Value) -> Result<Pooling> {
    let flag = |k: &str| config.get(k).and_then(Value::as_bool).unwrap_or(false);
    let modes = [
        ("pooling_mode_cls_token", Some(Pooling::Cls)),
        ("pooling_mode_mean_tokens", Some(Pooling::Mean)),
        ("pooling_mode_max_tokens", Some(Pooling::Max)),
        ("pooling_mode_lasttoken", Some(Pooling::LastToken)),
        ("pooling_mode_mean_sqrt_len_tokens", None),
        ("pooling_mode_weightedmean_tokens", None),
    ];
    let enabled: Vec<_> = modes.iter().filter(|(k, _)| flag(k)).collect();
    match enabled.as_slice() {
        [(_, Some(p))] => Ok(*p),
        [(k, None)] => Err(RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            field: k.to_string(),
            reason: "this pooling mode is not supported".into(),
        }),
        [] => Err(RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            field: "pooling_mode_*".into(),
            reason: "no pooling mode is enabled".into(),
        }),
        _ => Err(RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            field: "pooling_mode_*".into(),
            reason: "several pooling modes at once (concatenated) are not supported".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_parse_as_dir_or_repo() {
        let dir = std::env::temp_dir();
        assert_eq!(
            ModelSource::parse(dir.to_str().unwrap()),
            Ok(ModelSource::Local(dir.clone()))
        );
        assert_eq!(
            ModelSource::parse("sentence-transformers/all-MiniLM-L6-v2"),
            Ok(ModelSource::Hub {
                repo: "sentence-transformers/all-MiniLM-L6-v2".into(),
                revision: None
            })
        );
        assert_eq!(
            ModelSource::parse("org/name@v2"),
            Ok(ModelSource::Hub {
                repo: "org/name".into(),
                revision: Some("v2".into())
            })
        );
        assert!(ModelSource::parse("/no/such/dir").is_err());
        assert!(ModelSource::parse("just-a-name").is_err());
    }

    #[test]
    fn pooling_config_maps_to_one_mode() {
        let p = Path::new("x");
        let cfg =
            serde_json::json!({"pooling_mode_mean_tokens": true, "pooling_mode_cls_token": false});
        assert_eq!(pooling_from_config(p, &cfg).unwrap(), Pooling::Mean);
        let cfg = serde_json::json!({"pooling_mode_mean_sqrt_len_tokens": true});
        let err = pooling_from_config(p, &cfg).unwrap_err().to_string();
        assert!(err.contains("pooling_mode_mean_sqrt_len_tokens"), "{err}");
    }

    #[test]
    fn a_sharded_checkpoint_lists_every_shard_once() {
        let dir = std::env::temp_dir().join(format!("embedd-shards-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for f in [
            "config.json",
            "tokenizer.json",
            "a.safetensors",
            "b.safetensors",
        ] {
            std::fs::write(dir.join(f), "{}").unwrap();
        }
        let index = serde_json::json!({"weight_map": {
            "x": "a.safetensors", "y": "b.safetensors", "z": "a.safetensors"}});
        std::fs::write(dir.join(SAFETENSORS_INDEX), index.to_string()).unwrap();
        let found = ModelDir::resolve(&ModelSource::Local(dir.clone()), &[]).unwrap();
        assert_eq!(
            found.weight_files,
            vec![dir.join("a.safetensors"), dir.join("b.safetensors")]
        );
        std::fs::remove_file(dir.join("b.safetensors")).unwrap();
        let err = ModelDir::resolve(&ModelSource::Local(dir.clone()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("b.safetensors"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn missing_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("embedd-empty-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let err = ModelDir::resolve(&ModelSource::Local(dir.clone()), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.json"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }
}

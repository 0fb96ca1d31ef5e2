//! Backbones: one module per architecture family, each turning a [`PackedBatch`] into token
//! vectors ([`Hidden`]). `config.json` is read once into an [`ArchitectureConfig`], and
//! [`load_backbone`] builds the family it names under an [`ExecutionPlan`].
//!
//! A new family is a module here whose config type implements [`FamilyConfig`] and whose model
//! implements [`Backbone`], registered by one line in [`FAMILIES`] (and its catalog name in
//! [`Family`]).

pub mod bert;
pub mod clip;
pub mod dense;
pub mod eva;
#[cfg(test)]
mod executors;
pub mod int8;
pub mod jina_clip;
pub mod lora;
pub mod peft;
pub mod qwen;
pub mod t5;
mod vision;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde::Deserialize;
use serde_json::Value;

use crate::batch::{Hidden, PackedBatch};
use crate::error::{Result, RuntimeError};
use crate::heads::Pooling;
use crate::model_dir::ModelDir;
use crate::plan::ExecutionPlan;

pub use bert::{BertConfig, BertModel, BertVariant};
pub use dense::Dense;
pub use t5::{T5Config, T5EncoderModel};

/// A network that turns token ids into one vector per token. Heads (pooling, classifiers,
/// projections) read its output; it knows none of them.
pub trait Backbone: Send + Sync {
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Hidden>;
    fn hidden_size(&self) -> usize;
}

/// An image encoder: normalized pixels `[n, channels, side, side]` in, one float32 vector per
/// image out, in the space its family's text vectors share.
pub trait ImageTower: Send + Sync {
    fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor>;
    /// The square input side, in pixels, the tower was built for.
    fn image_size(&self) -> usize;
    /// Tokens one image costs the tower (patches and class token): its batching cost.
    fn tokens_per_image(&self) -> usize;
}

/// What a family's resolved `config.json` tells the rest of the runtime, and how it builds its
/// backbone.
pub trait FamilyConfig: std::fmt::Debug + Send + Sync {
    /// Which family (and member) the checkpoint is.
    fn family(&self) -> Family;
    fn hidden_size(&self) -> usize;
    /// The longest input the position scheme allows; `None` where nothing bounds it (T5's
    /// relative buckets).
    fn max_positions(&self) -> Option<usize>;
    /// The task adapters the checkpoint has; none by default.
    fn task_adapters(&self) -> TaskAdapters {
        TaskAdapters::default()
    }
    /// Files beside the weights the family reads (task adapters), by relative name.
    fn extra_files(&self) -> Vec<String> {
        Vec::new()
    }
    /// The pooling the architecture implies, where it implies one (CLIP: the end-of-text
    /// token); the model's sentence-transformers files and the catalog override it.
    fn default_pooling(&self) -> Option<Pooling> {
        None
    }
    /// Builds the (text) backbone from `dir`'s weights, held as `plan` runs it.
    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>>;
    /// The projection from pooled text vectors into a shared text-image space, if the family
    /// has one.
    fn text_projection(&self, _weights: &Weights) -> Result<Option<Linear>> {
        Ok(None)
    }
    /// The image encoder, if the family has one.
    fn load_image_tower(
        &self,
        _weights: &Weights,
        _plan: &ExecutionPlan,
    ) -> Result<Option<Box<dyn ImageTower>>> {
        Ok(None)
    }
}

/// Reads a family's config from `config.json`; a refusal names the field and why.
type ReadConfig = fn(&Value) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)>;

/// Every family, by the `model_type` values it serves: the one registration a family needs.
pub const FAMILIES: &[(&[&str], ReadConfig)] = &[
    (
        &["bert", "roberta", "xlm-roberta", "camembert"],
        bert::read_config,
    ),
    (&["t5"], t5::read_config),
    (&["clip"], clip::read_config),
    (&["jina_clip"], jina_clip::read_config),
    (
        &["qwen3", "qwen2", "eurobert", "jina_embeddings_v5"],
        qwen::read_config,
    ),
];

/// A checkpoint's architecture, from `config.json`, resolved once at load.
#[derive(Debug)]
pub struct ArchitectureConfig(Box<dyn FamilyConfig>);

/// The architecture families, as the catalog names them (`architecture = "..."`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Family {
    Bert,
    Roberta,
    JinaBert,
    JinaBertQkPostNorm,
    /// Jina's flash XLM-R layout: jina-embeddings-v3 (with its LoRA adapters) and
    /// jina-reranker-v2 (`xlm-roberta-flash` in the catalog).
    #[serde(alias = "xlm-roberta-flash")]
    XlmRobertaLora,
    T5Encoder,
    Clip,
    JinaClip,
    Qwen2,
    Qwen3,
    /// EuroBERT (jina-embeddings-v5-text-nano's base): the Llama block, attending both ways.
    #[serde(rename = "eurobert")]
    EuroBert,
    /// jina-embeddings-v5-text (small: Qwen3, nano: EuroBERT) with its PEFT task adapters.
    #[serde(rename = "jina-embeddings-v5")]
    JinaEmbeddingsV5,
}

impl Family {
    pub fn as_str(self) -> &'static str {
        match self {
            Family::Bert => "bert",
            Family::Roberta => "roberta",
            Family::JinaBert => "jina-bert",
            Family::JinaBertQkPostNorm => "jina-bert-qk-post-norm",
            Family::XlmRobertaLora => "xlm-roberta-lora",
            Family::T5Encoder => "t5-encoder",
            Family::Clip => "clip",
            Family::JinaClip => "jina-clip",
            Family::Qwen2 => "qwen2",
            Family::Qwen3 => "qwen3",
            Family::EuroBert => "eurobert",
            Family::JinaEmbeddingsV5 => "jina-embeddings-v5",
        }
    }
}

/// The task adapters a model has (jina-embeddings-v3), from `config.json`'s `lora_adaptations`
/// and `task_instructions`.
#[derive(Debug, Clone, Default)]
pub struct TaskAdapters {
    /// Task names in adapter order.
    pub names: Vec<String>,
    /// The text each task puts before an input.
    pub instructions: BTreeMap<String, String>,
    /// The adapter every input runs with whatever its task (jina-clip's text tower: its
    /// default LoRA task's); tasks then choose only the instruction.
    pub pinned: Option<usize>,
    /// The task an input without one is given.
    pub default_task: Option<String>,
}

impl TaskAdapters {
    /// A model without adapters whose sentence-transformers prompts name Jina tasks, or the
    /// roles they stand for (`query` for `retrieval.query`; `document` or `passage` for
    /// `retrieval.passage`): those tasks put the prompt in front of each input.
    pub fn with_prompts(mut self, prompts: &BTreeMap<String, String>) -> Self {
        if !self.names.is_empty() || self.pinned.is_some() {
            return self;
        }
        // jina-code-embeddings names its prompts TASK_query / TASK_document; plain retrieval
        // takes the natural-language-to-code pair, code search being what the model is for.
        let roles: [(&str, &[&str]); 2] = [
            (
                "retrieval.query",
                &["retrieval.query", "query", "nl2code_query"],
            ),
            (
                "retrieval.passage",
                &[
                    "retrieval.passage",
                    "document",
                    "passage",
                    "nl2code_document",
                ],
            ),
        ];
        for (task, names) in roles {
            if let Some(prompt) = names.iter().find_map(|n| prompts.get(*n)) {
                self.instructions.insert(task.to_string(), prompt.clone());
            }
        }
        for task in ["text-matching", "classification", "separation"] {
            if let Some(prompt) = prompts.get(task) {
                self.instructions.insert(task.to_string(), prompt.clone());
            }
        }
        for code_task in ["nl2code", "code2code", "code2nl", "code2completion", "qa"] {
            for (role, suffix) in [("query", "query"), ("passage", "document")] {
                if let Some(prompt) = prompts.get(&format!("{code_task}_{suffix}")) {
                    self.instructions
                        .insert(format!("{code_task}.{role}"), prompt.clone());
                }
            }
        }
        self
    }

    /// The adapter index and instruction for `task`. Models without adapters take any task and
    /// ignore it; a model with adapters refuses a task it has none for.
    pub fn select(&self, task: Option<&str>) -> Result<(Option<usize>, &str)> {
        let task = task.or(self.default_task.as_deref());
        if let Some(adapter) = self.pinned {
            let Some(task) = task else {
                return Ok((Some(adapter), ""));
            };
            return match self.instructions.get(task) {
                Some(instruction) => Ok((Some(adapter), instruction.as_str())),
                None => Err(RuntimeError::UnknownTask {
                    task: task.to_string(),
                    known: self.instructions.keys().cloned().collect(),
                }),
            };
        }
        let Some(task) = task else {
            return Ok((None, ""));
        };
        if self.names.is_empty() {
            // No adapters: any task is taken; one with a prompt gets it in front.
            let instruction = self.instructions.get(task).map_or("", String::as_str);
            return Ok((None, instruction));
        }
        let Some(index) = self.names.iter().position(|n| n == task) else {
            return Err(RuntimeError::UnknownTask {
                task: task.to_string(),
                known: self.names.clone(),
            });
        };
        let instruction = self.instructions.get(task).map_or("", String::as_str);
        Ok((Some(index), instruction))
    }
}

impl ArchitectureConfig {
    pub fn read(dir: &ModelDir) -> Result<Self> {
        Self::from_json(&dir.read_config()?, &dir.config)
    }

    /// The family registered for `model_type` (BERT when absent, as old checkpoints omit it).
    pub fn from_json(raw: &Value, path: &Path) -> Result<Self> {
        let refuse = |field: &str, reason: String| RuntimeError::ModelConfig {
            path: path.to_path_buf(),
            field: field.to_string(),
            reason,
        };
        let model_type = match raw.get("model_type") {
            None => "bert",
            Some(v) => v
                .as_str()
                .ok_or_else(|| refuse("model_type", format!("{v} is not a string")))?,
        };
        let Some((_, read)) = FAMILIES
            .iter()
            .find(|(types, _)| types.contains(&model_type))
        else {
            return Err(refuse(
                "model_type",
                format!("architecture '{model_type}' is not supported yet"),
            ));
        };
        read(raw)
            .map(Self)
            .map_err(|(field, reason)| refuse(&field, reason))
    }

    pub fn family(&self) -> Family {
        self.0.family()
    }

    pub fn hidden_size(&self) -> usize {
        self.0.hidden_size()
    }

    pub fn max_positions(&self) -> Option<usize> {
        self.0.max_positions()
    }

    pub fn task_adapters(&self) -> TaskAdapters {
        self.0.task_adapters()
    }

    pub fn extra_files(&self) -> Vec<String> {
        self.0.extra_files()
    }

    pub fn default_pooling(&self) -> Option<Pooling> {
        self.0.default_pooling()
    }

    pub fn text_projection(&self, weights: &Weights) -> Result<Option<Linear>> {
        self.0.text_projection(weights)
    }

    pub fn load_image_tower(
        &self,
        weights: &Weights,
        plan: &ExecutionPlan,
    ) -> Result<Option<Box<dyn ImageTower>>> {
        self.0.load_image_tower(weights, plan)
    }
}

/// Builds the backbone `config` names from the checkpoint's weights, held as `plan` runs it.
pub fn load_backbone(
    weights: &Weights,
    config: &ArchitectureConfig,
    plan: &ExecutionPlan,
) -> Result<Box<dyn Backbone>> {
    config.0.load(weights, plan)
}

/// A checkpoint's tensors, opened once on the plan's device in its storage dtype: the backbone,
/// the heads and an image tower all read them from here.
#[derive(Clone)]
pub struct Weights {
    pub vb: VarBuilder<'static>,
    /// What errors name: the weights file, or a sharded checkpoint's index.
    path: PathBuf,
    /// The model directory's extra files by relative name (task adapters' files among them).
    pub extra: Vec<(String, PathBuf)>,
}

impl Weights {
    pub fn open(dir: &ModelDir, plan: &ExecutionPlan) -> Result<Self> {
        let vb = var_builder(&dir.weight_files, plan.storage, &plan.device).map_err(|e| {
            RuntimeError::ModelFile {
                path: dir.weights.clone(),
                reason: format!("cannot read weights: {e}"),
            }
        })?;
        Ok(Self {
            vb,
            path: dir.weights.clone(),
            extra: dir.extra.clone(),
        })
    }

    /// The weights file, or a sharded checkpoint's index.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    pub fn extra_file(&self, name: &str) -> Option<&std::path::Path> {
        crate::model_dir::find_extra(&self.extra, name)
    }

    /// A weights/config mismatch, named by file.
    pub fn mismatch(&self, e: candle_core::Error) -> RuntimeError {
        RuntimeError::ModelFile {
            path: self.path.clone(),
            reason: format!("weights do not match config.json: {e}"),
        }
    }
}

/// A fused [q | k | v] projection's output `[n, len, 3 * heads * head_dim]` as three contiguous
/// `[n, heads, len, head_dim]` tensors.
pub(crate) fn split_qkv(
    qkv: &Tensor,
    heads: usize,
    head_dim: usize,
) -> candle_core::Result<(Tensor, Tensor, Tensor)> {
    let (n, l, _) = qkv.dims3()?;
    let parts = qkv
        .reshape((n, l, 3, heads, head_dim))?
        .permute((2, 0, 3, 1, 4))?;
    let part = |i: usize| parts.get(i)?.contiguous();
    Ok((part(0)?, part(1)?, part(2)?))
}

/// Tensors from safetensors files (read tensor by tensor; several for a sharded checkpoint) or one
/// PyTorch `.bin`.
pub fn var_builder(
    files: &[PathBuf],
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    match files {
        [single] if single.extension().is_none_or(|e| e != "safetensors") => {
            VarBuilder::from_pth(single, dtype, device)
        }
        _ => Ok(VarBuilder::from_backend(
            Box::new(crate::safetensors_files::SafetensorsFiles::open(files)?),
            dtype,
            device.clone(),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_type_picks_the_family() {
        let path = Path::new("config.json");
        let bert = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32,
        });
        let config = ArchitectureConfig::from_json(&bert, path).unwrap();
        assert_eq!(config.family(), Family::Bert);
        assert_eq!(config.max_positions(), Some(32));
        let mut gpt = bert.clone();
        gpt["model_type"] = "gpt2".into();
        let err = ArchitectureConfig::from_json(&gpt, path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model_type") && err.contains("gpt2"), "{err}");
    }

    #[test]
    fn tasks_select_adapters_and_instructions() {
        let tasks = TaskAdapters {
            names: vec!["a".into(), "b".into()],
            instructions: [("b".to_string(), "B: ".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(tasks.select(None).unwrap(), (None, ""));
        assert_eq!(tasks.select(Some("b")).unwrap(), (Some(1), "B: "));
        assert!(tasks.select(Some("c")).is_err());
        assert_eq!(
            TaskAdapters::default().select(Some("c")).unwrap(),
            (None, "")
        );
        let prompts: BTreeMap<String, String> =
            [("query".to_string(), "Instruct: find\nQuery:".to_string())].into();
        let prompted = TaskAdapters::default().with_prompts(&prompts);
        assert_eq!(
            prompted.select(Some("retrieval.query")).unwrap(),
            (None, "Instruct: find\nQuery:")
        );
        assert_eq!(
            prompted.select(Some("retrieval.passage")).unwrap(),
            (None, "")
        );
        assert_eq!(prompted.select(None).unwrap(), (None, ""));
    }
}

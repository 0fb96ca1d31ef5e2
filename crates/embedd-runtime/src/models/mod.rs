//! Encoder architectures. Each takes a [`Batch`] and returns token vectors `[batch, seq, hidden]`.

pub mod bert;
pub mod classifier;
pub mod dense;
pub mod lora;
pub mod t5;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::batch::Batch;
use crate::device::Precision;
use crate::error::{Result, RuntimeError};
use crate::model_dir::ModelDir;

pub use bert::{BertConfig, BertModel};
pub use classifier::{ScoreActivation, SequenceClassifier};
pub use dense::Dense;
pub use t5::{T5Config, T5EncoderModel};

/// Interprets `config.json` (as read from `dir`) as a BERT-family config, refusing what this
/// family cannot run.
pub fn bert_config(dir: &ModelDir, raw: &serde_json::Value) -> Result<BertConfig> {
    let model_type = raw
        .get("model_type")
        .and_then(|v| v.as_str())
        .unwrap_or("bert")
        .to_string();
    if !matches!(
        model_type.as_str(),
        "bert" | "roberta" | "xlm-roberta" | "camembert"
    ) {
        return Err(RuntimeError::ModelConfig {
            path: dir.config.clone(),
            field: "model_type".into(),
            reason: format!("architecture '{model_type}' is not supported yet"),
        });
    }
    let config: BertConfig =
        serde_json::from_value(raw.clone()).map_err(|e| RuntimeError::ModelConfig {
            path: dir.config.clone(),
            field: "(bert config)".into(),
            reason: e.to_string(),
        })?;
    if let Some(p) = config
        .position_embedding_type
        .as_deref()
        .filter(|p| !matches!(*p, "absolute" | "alibi" | "rotary"))
    {
        return Err(RuntimeError::ModelConfig {
            path: dir.config.clone(),
            field: "position_embedding_type".into(),
            reason: format!("'{p}' is not supported ('absolute', 'alibi' or 'rotary')"),
        });
    }
    if let Some(t) = config
        .feed_forward_type
        .as_deref()
        .filter(|t| !matches!(*t, "original" | "geglu"))
    {
        return Err(RuntimeError::ModelConfig {
            path: dir.config.clone(),
            field: "feed_forward_type".into(),
            reason: format!("'{t}' is not supported ('original' or 'geglu')"),
        });
    }
    Ok(config)
}

/// The checkpoint's tensors on `device`, with load errors naming the weights file.
pub fn open_weights(dir: &ModelDir, device: &Device) -> Result<VarBuilder<'static>> {
    bert::var_builder(&dir.weights, DType::F32, device).map_err(|e| RuntimeError::ModelFile {
        path: dir.weights.clone(),
        reason: format!("cannot read weights: {e}"),
    })
}

/// A weights/config mismatch, named by file.
pub(crate) fn weights_error(dir: &ModelDir, e: candle_core::Error) -> RuntimeError {
    RuntimeError::ModelFile {
        path: dir.weights.clone(),
        reason: format!("weights do not match config.json: {e}"),
    }
}

/// Switches a loaded BERT-family encoder to `precision`.
pub fn set_precision(model: &mut BertModel, precision: Precision) -> Result<()> {
    match precision {
        Precision::F32 => Ok(()),
        Precision::Bf16 => model.use_bf16().map_err(|e| RuntimeError::Precision {
            precision: precision.to_string(),
            reason: e.to_string(),
        }),
    }
}

pub trait Encoder: Send + Sync {
    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor>;
    fn hidden_size(&self) -> usize;
}

/// The activation names found in `hidden_act` of Hugging Face configs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum Activation {
    /// Exact (erf) GELU, what BERT's "gelu" means.
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation.
    #[serde(alias = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
    #[serde(rename = "relu")]
    Relu,
    #[serde(alias = "silu", alias = "swish")]
    Silu,
}

impl Activation {
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
        }
    }
}

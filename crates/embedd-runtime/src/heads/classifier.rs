//! The sequence-classification head of a cross-encoder reranker: the first token's vector
//! through a dense + tanh layer and a one-label projection.
//!
//! Two checkpoint layouts exist: BERT's (`bert.pooler.dense` + tanh, then `classifier`) and
//! RoBERTa's (`classifier.dense` + tanh, then `classifier.out_proj`).

use candle_core::{DType, Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

use crate::batch::Hidden;

/// What turns the single logit into `relevance_score`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScoreActivation {
    Sigmoid,
    Identity,
}

impl ScoreActivation {
    /// sentence-transformers records the cross-encoder's activation in `config.json`; without it a
    /// single-label head gets a sigmoid, as sentence-transformers and Jina's API apply.
    pub fn from_config(config: &Value) -> Self {
        let named = config
            .pointer("/sentence_transformers/activation_fn")
            .or_else(|| config.get("sbert_ce_default_activation_function"))
            .and_then(Value::as_str)
            .unwrap_or("Sigmoid");
        if named.ends_with("Identity") {
            Self::Identity
        } else {
            Self::Sigmoid
        }
    }

    fn apply(self, logits: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Self::Sigmoid => candle_nn::ops::sigmoid(logits),
            Self::Identity => Ok(logits.clone()),
        }
    }
}

pub struct ClassifierHead {
    /// BERT's pooler or RoBERTa's `classifier.dense`, followed by tanh.
    dense: Linear,
    out: Linear,
    activation: ScoreActivation,
}

/// Where task-head checkpoints keep the encoder, and so BERT's pooler.
const ENCODER_PREFIXES: [&str; 4] = ["bert.", "roberta.", "model.", ""];

impl ClassifierHead {
    /// `vb` is the checkpoint's root.
    pub fn load(
        vb: &VarBuilder,
        hidden: usize,
        activation: ScoreActivation,
    ) -> candle_core::Result<Self> {
        if vb.contains_tensor("classifier.out_proj.weight") {
            return Ok(Self {
                dense: candle_nn::linear(hidden, hidden, vb.pp("classifier.dense"))?,
                out: candle_nn::linear(hidden, 1, vb.pp("classifier.out_proj"))?,
                activation,
            });
        }
        let Some(prefix) = ENCODER_PREFIXES
            .iter()
            .find(|p| vb.contains_tensor(&format!("{p}pooler.dense.weight")))
        else {
            candle_core::bail!(
                "no classifier head: expected `classifier.out_proj` or a pooler and `classifier`"
            )
        };
        Ok(Self {
            dense: candle_nn::linear(hidden, hidden, vb.pp(format!("{prefix}pooler.dense")))?,
            out: candle_nn::linear(hidden, 1, vb.pp("classifier"))?,
            activation,
        })
    }

    pub fn activation(&self) -> ScoreActivation {
        self.activation
    }

    /// One score per sequence, after the activation.
    pub fn score(&self, hidden: &Hidden) -> candle_core::Result<Vec<f32>> {
        if hidden.is_empty() {
            return Ok(Vec::new());
        }
        let first: Vec<u32> = (0..hidden.len())
            .map(|i| hidden.offsets[i] as u32)
            .collect();
        let first = Tensor::new(first.as_slice(), hidden.states.device())?;
        let tokens = hidden.states.index_select(&first, 0)?;
        let pooled = self.dense.forward(&tokens)?.tanh()?;
        let logits = self.out.forward(&pooled)?.squeeze(1)?;
        self.activation
            .apply(&logits)?
            .to_dtype(DType::F32)?
            .to_vec1()
    }
}

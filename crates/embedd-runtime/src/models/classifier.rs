//! Sequence-classification heads on a BERT-family encoder: what cross-encoder rerankers are.
//!
//! Two checkpoint layouts exist: BERT's (`bert.pooler.dense` + tanh, then `classifier`) and
//! RoBERTa's (`classifier.dense` + tanh, then `classifier.out_proj`). Both read the first token.

use candle_core::{Module, Tensor};
use candle_nn::{Linear, VarBuilder};
use serde_json::Value;

use super::bert::{model_prefix, BertConfig, BertModel};
use super::Encoder;
use crate::batch::Batch;

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

enum Head {
    /// BERT: pooler (dense + tanh) then `classifier`.
    Bert { pooler: Linear, classifier: Linear },
    /// RoBERTa: `classifier.dense` + tanh then `classifier.out_proj`.
    Roberta { dense: Linear, out_proj: Linear },
}

impl Head {
    fn load(vb: &VarBuilder, hidden: usize, labels: usize) -> candle_core::Result<Self> {
        if vb.contains_tensor("classifier.out_proj.weight") {
            return Ok(Head::Roberta {
                dense: candle_nn::linear(hidden, hidden, vb.pp("classifier.dense"))?,
                out_proj: candle_nn::linear(hidden, labels, vb.pp("classifier.out_proj"))?,
            });
        }
        let pooler = match model_prefix(vb) {
            Some(p) => vb.pp(p).pp("pooler.dense"),
            None => vb.pp("pooler.dense"),
        };
        Ok(Head::Bert {
            pooler: candle_nn::linear(hidden, hidden, pooler)?,
            classifier: candle_nn::linear(hidden, labels, vb.pp("classifier"))?,
        })
    }

    fn forward(&self, first_token: &Tensor) -> candle_core::Result<Tensor> {
        let (dense, out) = match self {
            Head::Bert { pooler, classifier } => (pooler, classifier),
            Head::Roberta { dense, out_proj } => (dense, out_proj),
        };
        out.forward(&dense.forward(first_token)?.tanh()?)
    }
}

/// An encoder with a one-label classification head: one score per sequence.
pub struct SequenceClassifier {
    encoder: BertModel,
    head: Head,
    activation: ScoreActivation,
}

impl SequenceClassifier {
    pub fn load(
        vb: VarBuilder,
        config: &BertConfig,
        activation: ScoreActivation,
    ) -> candle_core::Result<Self> {
        let head = Head::load(&vb, config.hidden_size, 1)?;
        Ok(Self {
            encoder: BertModel::load(vb, config)?,
            head,
            activation,
        })
    }

    pub fn encoder_mut(&mut self) -> &mut BertModel {
        &mut self.encoder
    }

    /// Scores `[batch]` after the activation.
    pub fn score(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let hidden = self.encoder.forward(batch)?;
        let first = hidden.narrow(1, 0, 1)?.squeeze(1)?;
        let logits = self.head.forward(&first)?.squeeze(1)?;
        self.activation.apply(&logits)
    }
}

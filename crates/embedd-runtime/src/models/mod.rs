//! Encoder architectures. Each takes a [`Batch`] and returns token vectors `[batch, seq, hidden]`.

pub mod bert;

use candle_core::Tensor;

use crate::batch::Batch;

pub use bert::{BertConfig, BertModel};

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

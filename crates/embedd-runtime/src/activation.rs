//! The elementwise activations of feed-forward layers, by the names Hugging Face configs use in
//! `hidden_act`. Shared by the model families and the fused kernels, so neither depends on the
//! other.

use candle_core::Tensor;

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
    /// CLIP's `x * sigmoid(1.702 x)`.
    #[serde(rename = "quick_gelu")]
    QuickGelu,
}

impl Activation {
    /// The graph executor's form.
    pub fn apply(self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            Activation::Gelu => x.gelu_erf(),
            Activation::GeluTanh => x.gelu(),
            Activation::Relu => x.relu(),
            Activation::Silu => x.silu(),
            Activation::QuickGelu => x * candle_nn::ops::sigmoid(&(x * 1.702)?)?,
        }
    }
}

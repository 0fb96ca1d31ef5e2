//! T5 encoders, as the jina-embedding-*-en-v1 sentence embedders use them: pre-norm blocks with
//! RMS layer norms, unscaled attention with a learned relative-position bias (bucketed,
//! bidirectional, computed in the first block and shared by all), and a ReLU or gated-GELU
//! feed-forward; no biases anywhere.

use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use super::{Backbone, Family, FamilyConfig, Weights};
use crate::batch::{Hidden, PackedBatch};
use crate::error::Result;
use crate::plan::ExecutionPlan;

fn default_buckets() -> usize {
    32
}
fn default_max_distance() -> usize {
    128
}
fn default_eps() -> f64 {
    1e-6
}
fn default_ff() -> String {
    "relu".into()
}

#[derive(Debug, Clone, Deserialize)]
pub struct T5Config {
    pub vocab_size: usize,
    pub d_model: usize,
    pub d_kv: usize,
    pub d_ff: usize,
    pub num_layers: usize,
    pub num_heads: usize,
    #[serde(default = "default_buckets")]
    pub relative_attention_num_buckets: usize,
    #[serde(default = "default_max_distance")]
    pub relative_attention_max_distance: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_epsilon: f64,
    #[serde(default = "default_ff")]
    pub feed_forward_proj: String,
}

/// The family's registration.
pub(super) fn read_config(
    raw: &serde_json::Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    let config: T5Config = serde_json::from_value(raw.clone())
        .map_err(|e| ("(t5 config)".to_string(), e.to_string()))?;
    Ok(Box::new(config))
}

impl FamilyConfig for T5Config {
    fn family(&self) -> Family {
        Family::T5Encoder
    }

    fn hidden_size(&self) -> usize {
        self.d_model
    }

    fn max_positions(&self) -> Option<usize> {
        None
    }

    /// T5 runs on candle's graph: it has no fused kernels.
    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        plan.without_fused_kernels("T5")?;
        let model =
            T5EncoderModel::load(weights.vb.clone(), self).map_err(|e| weights.mismatch(e))?;
        Ok(Box::new(model))
    }
}

/// T5's layer norm: scale only, no mean removal, no bias.
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32)
    }
}

fn linear(vb: VarBuilder, inp: usize, out: usize) -> candle_core::Result<Linear> {
    Ok(Linear::new(vb.get((out, inp), "weight")?, None))
}

struct T5Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    heads: usize,
    d_kv: usize,
}

impl T5Attention {
    fn load(vb: VarBuilder, c: &T5Config) -> candle_core::Result<Self> {
        let inner = c.num_heads * c.d_kv;
        Ok(Self {
            q: linear(vb.pp("q"), c.d_model, inner)?,
            k: linear(vb.pp("k"), c.d_model, inner)?,
            v: linear(vb.pp("v"), c.d_model, inner)?,
            o: linear(vb.pp("o"), inner, c.d_model)?,
            heads: c.num_heads,
            d_kv: c.d_kv,
        })
    }

    /// `bias`: relative-position bias plus padding mask, `[batch or 1, heads, seq, seq]`.
    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let split = |t: Tensor| -> candle_core::Result<Tensor> {
            t.reshape((b, l, self.heads, self.d_kv))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split(self.q.forward(x)?)?;
        let k = split(self.k.forward(x)?)?;
        let v = split(self.v.forward(x)?)?;
        // T5 folds the 1/sqrt(d) scale into its weights: scores are not scaled here.
        let scores = q.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let ctx = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * self.d_kv))?;
        self.o.forward(&ctx)
    }
}

enum T5FeedForward {
    Relu {
        wi: Linear,
        wo: Linear,
    },
    /// `wo(gelu_tanh(wi_0 x) * wi_1 x)`.
    GatedGelu {
        wi_0: Linear,
        wi_1: Linear,
        wo: Linear,
    },
}

impl T5FeedForward {
    fn load(vb: VarBuilder, c: &T5Config) -> candle_core::Result<Self> {
        Ok(if c.feed_forward_proj.starts_with("gated") {
            T5FeedForward::GatedGelu {
                wi_0: linear(vb.pp("wi_0"), c.d_model, c.d_ff)?,
                wi_1: linear(vb.pp("wi_1"), c.d_model, c.d_ff)?,
                wo: linear(vb.pp("wo"), c.d_ff, c.d_model)?,
            }
        } else {
            T5FeedForward::Relu {
                wi: linear(vb.pp("wi"), c.d_model, c.d_ff)?,
                wo: linear(vb.pp("wo"), c.d_ff, c.d_model)?,
            }
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        match self {
            T5FeedForward::Relu { wi, wo } => wo.forward(&wi.forward(x)?.relu()?),
            T5FeedForward::GatedGelu { wi_0, wi_1, wo } => {
                wo.forward(&(wi_0.forward(x)?.gelu()? * wi_1.forward(x)?)?)
            }
        }
    }
}

struct T5Block {
    attention_norm: RmsNorm,
    attention: T5Attention,
    ff_norm: RmsNorm,
    ff: T5FeedForward,
}

impl T5Block {
    fn load(vb: VarBuilder, c: &T5Config) -> candle_core::Result<Self> {
        Ok(Self {
            attention_norm: RmsNorm::load(
                vb.pp("layer.0.layer_norm"),
                c.d_model,
                c.layer_norm_epsilon,
            )?,
            attention: T5Attention::load(vb.pp("layer.0.SelfAttention"), c)?,
            ff_norm: RmsNorm::load(vb.pp("layer.1.layer_norm"), c.d_model, c.layer_norm_epsilon)?,
            ff: T5FeedForward::load(vb.pp("layer.1.DenseReluDense"), c)?,
        })
    }

    fn forward(&self, x: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
        let x = (x + self
            .attention
            .forward(&self.attention_norm.forward(x)?, bias)?)?;
        &x + self.ff.forward(&self.ff_norm.forward(&x)?)?
    }
}

pub struct T5EncoderModel {
    embed: Embedding,
    blocks: Vec<T5Block>,
    /// `[buckets, heads]`, from the first block.
    relative_bias: Embedding,
    final_norm: RmsNorm,
    config: T5Config,
}

impl T5EncoderModel {
    pub fn load(vb: VarBuilder, config: &T5Config) -> candle_core::Result<Self> {
        // T5EncoderModel checkpoints keep the table as `shared` (and often a tied copy under
        // `encoder.embed_tokens`).
        let table = if vb.contains_tensor("encoder.embed_tokens.weight") {
            vb.pp("encoder.embed_tokens")
        } else {
            vb.pp("shared")
        };
        let enc = vb.pp("encoder");
        let blocks = (0..config.num_layers)
            .map(|i| T5Block::load(enc.pp(format!("block.{i}")), config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embed: candle_nn::embedding(config.vocab_size, config.d_model, table)?,
            blocks,
            relative_bias: candle_nn::embedding(
                config.relative_attention_num_buckets,
                config.num_heads,
                enc.pp("block.0.layer.0.SelfAttention.relative_attention_bias"),
            )?,
            final_norm: RmsNorm::load(
                enc.pp("final_layer_norm"),
                config.d_model,
                config.layer_norm_epsilon,
            )?,
            config: config.clone(),
        })
    }

    /// `[1, heads, len, len]` learned bias for the batch's length.
    fn position_bias(&self, len: usize, device: &Device) -> candle_core::Result<Tensor> {
        let buckets: Vec<u32> = (0..len)
            .flat_map(|q| {
                (0..len).map(move |k| {
                    relative_bucket(
                        k as i64 - q as i64,
                        self.config.relative_attention_num_buckets,
                        self.config.relative_attention_max_distance,
                    )
                })
            })
            .collect();
        let buckets = Tensor::from_vec(buckets, (len, len), device)?;
        self.relative_bias
            .forward(&buckets)? // [len, len, heads]
            .permute((2, 0, 1))?
            .unsqueeze(0)
    }
}

/// T5's bidirectional bucketing of a key-minus-query distance: half the buckets per direction,
/// exact for small distances, logarithmic up to `max_distance`.
pub fn relative_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> u32 {
    let half = (num_buckets / 2) as i64;
    let mut bucket = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    let max_exact = half / 2;
    bucket += if distance < max_exact {
        distance
    } else {
        let scaled = ((distance as f32 / max_exact as f32).ln()
            / (max_distance as f32 / max_exact as f32).ln()
            * (half - max_exact) as f32) as i64;
        (max_exact + scaled).min(half - 1)
    };
    bucket as u32
}

impl Backbone for T5EncoderModel {
    /// The graph executor only: T5 has no fused kernels.
    fn forward(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let batch = packed.padded(self.embed.embeddings().device())?;
        let mut x = self.embed.forward(&batch.input_ids)?;
        let mask = super::bert::attention_bias(&batch.attention_mask, x.dtype())?;
        let bias = self
            .position_bias(batch.max_len, x.device())?
            .to_dtype(x.dtype())?
            .broadcast_add(&mask)?;
        for block in &self.blocks {
            x = block.forward(&x, &bias)?;
        }
        Hidden::from_padded(&self.final_norm.forward(&x)?, packed)
    }

    fn hidden_size(&self) -> usize {
        self.config.d_model
    }
}

#[cfg(test)]
mod tests {
    use super::relative_bucket;

    #[test]
    fn buckets_match_t5_for_small_and_large_distances() {
        // 32 buckets, max distance 128: 16 per direction, exact below 8 (values from transformers).
        assert_eq!(relative_bucket(0, 32, 128), 0);
        assert_eq!(relative_bucket(-3, 32, 128), 3);
        assert_eq!(relative_bucket(3, 32, 128), 19);
        assert_eq!(relative_bucket(-8, 32, 128), 8);
        assert_eq!(relative_bucket(-20, 32, 128), 10);
        assert_eq!(relative_bucket(-1000, 32, 128), 15);
        assert_eq!(relative_bucket(1000, 32, 128), 31);
    }
}

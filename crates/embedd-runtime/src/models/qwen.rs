//! Qwen2 and Qwen3 decoders as embedders (Qwen3-Embedding; jina-code-embeddings, built on
//! Qwen2.5-Coder), in the transformers layout (`Qwen3Model`, `Qwen2Model`): causal attention with
//! grouped key/value heads, rotary positions, SwiGLU feed-forwards, pre-RMSNorm blocks; Qwen3
//! RMS-normalizes each head's query and key, Qwen2 biases the query, key and value projections
//! instead. The text's vector is its last token's. Runs on candle's graph.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, RmsNorm, VarBuilder};
use serde::Deserialize;

use super::{Backbone, Family, FamilyConfig, Weights};
use crate::batch::{Hidden, PackedBatch};
use crate::error::Result;
use crate::heads::Pooling;
use crate::plan::ExecutionPlan;

fn default_theta() -> f64 {
    1_000_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

/// Where the two generations differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QwenGeneration {
    /// Biased q/k/v projections.
    Qwen2,
    /// Per-head q/k RMSNorm; biases only with `attention_bias`.
    #[default]
    Qwen3,
}

/// The fields of a Qwen2 or Qwen3 `config.json` the family reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// From `model_type`.
    #[serde(skip)]
    pub generation: QwenGeneration,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it apart from `hidden_size / heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes the rotary settings here (`rope_theta`, `rope_type`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
}

impl Qwen3Config {
    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(self.rope_theta)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

/// The family's registration.
pub(super) fn read_config(
    raw: &serde_json::Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    let mut config: Qwen3Config = serde_json::from_value(raw.clone())
        .map_err(|e| ("(qwen config)".to_string(), e.to_string()))?;
    if raw.get("model_type").and_then(serde_json::Value::as_str) == Some("qwen2") {
        config.generation = QwenGeneration::Qwen2;
    }
    let refuse = |field: &str, reason: String| Err((field.to_string(), reason));
    if config.num_key_value_heads == 0
        || !config
            .num_attention_heads
            .is_multiple_of(config.num_key_value_heads)
    {
        return refuse(
            "num_key_value_heads",
            format!(
                "{} key/value heads do not divide {} attention heads",
                config.num_key_value_heads, config.num_attention_heads
            ),
        );
    }
    if !config.head_dim().is_multiple_of(2) {
        return refuse(
            "head_dim",
            "rotary embeddings need an even head size".into(),
        );
    }
    if config.hidden_act != "silu" {
        return refuse(
            "hidden_act",
            format!("'{}' is not supported (silu)", config.hidden_act),
        );
    }
    if config.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse(
            "rope_scaling",
            "scaled rotary embeddings are not supported".into(),
        );
    }
    let rope_type = config
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_type"))
        .and_then(serde_json::Value::as_str);
    if rope_type.is_some_and(|t| t != "default") {
        return refuse(
            "rope_parameters.rope_type",
            format!(
                "'{}' is not supported (default)",
                rope_type.unwrap_or_default()
            ),
        );
    }
    if config.use_sliding_window {
        return refuse(
            "use_sliding_window",
            "sliding-window attention is not supported".into(),
        );
    }
    Ok(Box::new(config))
}

impl FamilyConfig for Qwen3Config {
    fn family(&self) -> Family {
        match self.generation {
            QwenGeneration::Qwen2 => Family::Qwen2,
            QwenGeneration::Qwen3 => Family::Qwen3,
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.max_position_embeddings)
    }

    /// A decoder's last token has seen the whole input.
    fn default_pooling(&self) -> Option<Pooling> {
        Some(Pooling::LastToken)
    }

    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        plan.without_fused_kernels("Qwen")?;
        // Saved from a *ForCausalLM the layers sit under `model.`; from *Model at the root.
        let vb = if weights.vb.contains_tensor("model.embed_tokens.weight") {
            weights.vb.pp("model")
        } else {
            weights.vb.clone()
        };
        let model = Qwen3Model::load(vb, self).map_err(|e| weights.mismatch(e))?;
        Ok(Box::new(model))
    }
}

/// RoPE's cos and sin for positions `0..len`, `[len, head_dim]` (each half repeated).
fn rotary(
    len: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in 0..len {
        let row: Vec<f64> = (0..half)
            .map(|i| p as f64 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() as f32));
            sin.extend(row.iter().map(|a| a.sin() as f32));
        }
    }
    let table = |v: Vec<f32>| Tensor::from_vec(v, (len, head_dim), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

/// `x * cos + rotate_half(x) * sin` on `[b, heads, len, head_dim]`, the first half of each head
/// turned against the second.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let first = x.narrow(D::Minus1, 0, d / 2)?;
    let second = x.narrow(D::Minus1, d / 2, d / 2)?;
    let turned = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + turned.broadcast_mul(sin)?
}

struct Qwen3Attention {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// Qwen3's per-head norms (Qwen2 has none).
    q_norm: Option<RmsNorm>,
    k_norm: Option<RmsNorm>,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

impl Qwen3Attention {
    fn load(vb: VarBuilder, c: &Qwen3Config) -> candle_core::Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (q_out, kv_out) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let qwen2 = c.generation == QwenGeneration::Qwen2;
        let (qkv_bias, o_bias) = (qwen2 || c.attention_bias, !qwen2 && c.attention_bias);
        let norm = |name: &str| match qwen2 {
            true => Ok(None),
            false => candle_nn::rms_norm(d, c.rms_norm_eps, vb.pp(name)).map(Some),
        };
        Ok(Self {
            q: candle_nn::linear_b(h, q_out, qkv_bias, vb.pp("q_proj"))?,
            k: candle_nn::linear_b(h, kv_out, qkv_bias, vb.pp("k_proj"))?,
            v: candle_nn::linear_b(h, kv_out, qkv_bias, vb.pp("v_proj"))?,
            o: candle_nn::linear_b(q_out, h, o_bias, vb.pp("o_proj"))?,
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
        })
    }

    /// `bias`: `[b, 1, len, len]`, causal and padding together.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        // `[b, heads, len, head_dim]`, each head's query and key RMS-normalized first.
        let split =
            |t: Tensor, heads: usize, norm: Option<&RmsNorm>| -> candle_core::Result<Tensor> {
                let t = t.reshape((b, l, heads, self.head_dim))?;
                let t = match norm {
                    Some(norm) => norm.forward(&t)?,
                    None => t,
                };
                t.transpose(1, 2)?.contiguous()
            };
        let q = split(self.q.forward(x)?, self.heads, self.q_norm.as_ref())?;
        let k = split(self.k.forward(x)?, self.kv_heads, self.k_norm.as_ref())?;
        let v = split(self.v.forward(x)?, self.kv_heads, None)?;
        let q = apply_rotary(&q, &rope.0, &rope.1)?;
        let k = apply_rotary(&k, &rope.0, &rope.1)?;
        // Grouped heads: each key/value head serves `heads / kv_heads` query heads in turn.
        let groups = self.heads / self.kv_heads;
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            if groups == 1 {
                return t.contiguous();
            }
            t.unsqueeze(2)?
                .expand((b, self.kv_heads, groups, l, self.head_dim))?
                .reshape((b, self.heads, l, self.head_dim))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scale = (self.head_dim as f64).powf(-0.5);
        let scores = (q * scale)?.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context =
            probs
                .matmul(&v)?
                .transpose(1, 2)?
                .reshape((b, l, self.heads * self.head_dim))?;
        self.o.forward(&context)
    }
}

/// `down(silu(gate x) * up x)`.
struct Qwen3Mlp {
    gate: Linear,
    up: Linear,
    down: Linear,
}

impl Qwen3Mlp {
    fn load(vb: VarBuilder, c: &Qwen3Config) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            gate: candle_nn::linear_no_bias(h, i, vb.pp("gate_proj"))?,
            up: candle_nn::linear_no_bias(h, i, vb.pp("up_proj"))?,
            down: candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let gate = candle_nn::ops::silu(&self.gate.forward(x)?)?;
        self.down.forward(&(gate * self.up.forward(x)?)?)
    }
}

/// `x + attn(norm(x))`, then `+ mlp(norm(.))`.
struct Qwen3Layer {
    input_norm: RmsNorm,
    attention: Qwen3Attention,
    post_attention_norm: RmsNorm,
    mlp: Qwen3Mlp,
}

impl Qwen3Layer {
    fn load(vb: VarBuilder, c: &Qwen3Config) -> candle_core::Result<Self> {
        Ok(Self {
            input_norm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("input_layernorm"),
            )?,
            attention: Qwen3Attention::load(vb.pp("self_attn"), c)?,
            post_attention_norm: candle_nn::rms_norm(
                c.hidden_size,
                c.rms_norm_eps,
                vb.pp("post_attention_layernorm"),
            )?,
            mlp: Qwen3Mlp::load(vb.pp("mlp"), c)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
    ) -> candle_core::Result<Tensor> {
        let x = (x + self
            .attention
            .forward(&self.input_norm.forward(x)?, bias, rope)?)?;
        &x + self.mlp.forward(&self.post_attention_norm.forward(&x)?)?
    }
}

/// The decoder up to its final RMSNorm: one vector per token.
pub struct Qwen3Model {
    embed_tokens: Embedding,
    layers: Vec<Qwen3Layer>,
    norm: RmsNorm,
    hidden_size: usize,
    head_dim: usize,
    theta: f64,
}

impl Qwen3Model {
    fn load(vb: VarBuilder, c: &Qwen3Config) -> candle_core::Result<Self> {
        Ok(Self {
            embed_tokens: candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?,
            layers: (0..c.num_hidden_layers)
                .map(|i| Qwen3Layer::load(vb.pp(format!("layers.{i}")), c))
                .collect::<candle_core::Result<_>>()?,
            norm: candle_nn::rms_norm(c.hidden_size, c.rms_norm_eps, vb.pp("norm"))?,
            hidden_size: c.hidden_size,
            head_dim: c.head_dim(),
            theta: c.theta(),
        })
    }
}

impl Backbone for Qwen3Model {
    fn forward(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let table = self.embed_tokens.embeddings();
        let (device, dtype) = (table.device().clone(), table.dtype());
        let batch = packed.padded(&device)?;
        let l = batch.max_len;
        let mut x = self.embed_tokens.forward(&batch.input_ids)?;
        // Right padding under a causal mask: real tokens never see the padding after them, and
        // the padded rows are dropped when the batch is packed again.
        let bias = super::clip::causal_bias(l, dtype, &device)?
            .broadcast_add(&super::bert::attention_bias(&batch.attention_mask, dtype)?)?;
        let rope = rotary(l, self.head_dim, self.theta, dtype, &device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, &rope)?;
        }
        Hidden::from_padded(&self.norm.forward(&x)?, packed)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

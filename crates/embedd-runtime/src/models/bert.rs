//! BERT-family encoders: BERT, MiniLM, RoBERTa / XLM-RoBERTa (the same blocks with position ids
//! offset past the padding index), and JinaBERT (jina-embeddings-v2, jina-reranker-v1,
//! jina-colbert-v1: no position embeddings but an ALiBi attention bias, and a gated GELU
//! feed-forward), and jina-embeddings-v3's XLM-RoBERTa (rotary position embeddings, per-task LoRA
//! adapters, tensors named as its flash-attention implementation saves them). Post-layer-norm
//! blocks throughout.

use std::collections::BTreeMap;

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::lora::{self, AdapterSpan, EmbeddingLora, LinearLora, LoraShape};
use super::{Activation, Dense, Encoder};
use crate::batch::Batch;
use crate::kernels::{self, AttentionProducts, AttentionShape, HostSlice, RotaryTable};

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// The fields of a Hugging Face `config.json` this family reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// JinaBERT's gated feed-forward (`geglu`); absent for BERT's plain one.
    #[serde(default)]
    pub feed_forward_type: Option<String>,
    /// RoPE's base, for `position_embedding_type: "rotary"` (jina-embeddings-v3).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    #[serde(default)]
    pub rotary_emb_interleaved: Option<bool>,
    /// The tasks of the LoRA adapters, in the checkpoint's order (jina-embeddings-v3).
    #[serde(default)]
    pub lora_adaptations: Option<Vec<String>>,
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// The instruction each task puts before an input.
    #[serde(default)]
    pub task_instructions: Option<BTreeMap<String, String>>,
}

impl BertConfig {
    /// RoBERTa-style models number positions from `pad_token_id + 1`.
    pub fn position_offset(&self) -> usize {
        match self.model_type.as_deref() {
            Some("roberta" | "xlm-roberta" | "camembert") => {
                self.pad_token_id.unwrap_or(1) as usize + 1
            }
            _ => 0,
        }
    }

    /// How many tokens fit the position table (for ALiBi: the length the model was built for).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }

    /// JinaBERT: attention biased by distance (ALiBi) instead of position embeddings.
    pub fn uses_alibi(&self) -> bool {
        self.position_embedding_type.as_deref() == Some("alibi")
    }

    /// jina-embeddings-v3: queries and keys rotated by position instead of position embeddings.
    pub fn uses_rotary(&self) -> bool {
        self.position_embedding_type.as_deref() == Some("rotary")
    }

    /// RoPE's base: `rotary_emb_base`, else RoFormer's 10,000.
    pub fn rotary_base(&self) -> f64 {
        self.rotary_emb_base.unwrap_or(10_000.0)
    }

    /// The adapters' sizes, when the config names task adapters.
    pub fn lora_shape(&self) -> Option<LoraShape> {
        let tasks = self.lora_adaptations.as_ref()?.len();
        let rank = self.lora_rank.unwrap_or(4);
        Some(LoraShape {
            tasks,
            rank,
            scaling: self.lora_alpha.unwrap_or(1.0) / rank as f64,
        })
    }

    fn gated_feed_forward(&self) -> bool {
        matches!(self.feed_forward_type.as_deref(), Some(t) if t.contains("glu"))
    }
}

struct BertEmbeddings {
    word: Embedding,
    word_lora: Option<EmbeddingLora>,
    /// Absent for ALiBi and rotary models, whose positions live in the attention.
    position: Option<Embedding>,
    token_type: Embedding,
    token_type_lora: Option<EmbeddingLora>,
    layer_norm: LayerNorm,
    position_offset: usize,
    /// XLM-RoBERTa has one token type; pair tokenizers may still emit type 1 for the second text.
    single_token_type: bool,
}

impl BertEmbeddings {
    /// `vb` is the model root: the tables are under `embeddings`, and so is the LayerNorm except
    /// in the flash layout (`emb_ln`).
    fn load(vb: &VarBuilder, config: &BertConfig, layout: Layout) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let tables = vb.pp("embeddings");
        let (word, word_lora) = embedding(tables.pp("word_embeddings"), config.vocab_size, config)?;
        let (token_type, token_type_lora) = embedding(
            tables.pp("token_type_embeddings"),
            config.type_vocab_size,
            config,
        )?;
        let norm = match layout {
            Layout::Hf => tables.pp("LayerNorm"),
            Layout::Flash => vb.pp("emb_ln"),
        };
        Ok(Self {
            word,
            word_lora,
            position: if config.uses_alibi() || config.uses_rotary() {
                None
            } else {
                Some(candle_nn::embedding(
                    config.max_position_embeddings,
                    h,
                    tables.pp("position_embeddings"),
                )?)
            },
            token_type,
            token_type_lora,
            layer_norm: layer_norm(norm, h, config.layer_norm_eps)?,
            position_offset: config.position_offset(),
            single_token_type: config.type_vocab_size == 1,
        })
    }

    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let mut words = self.word.forward(&batch.input_ids)?;
        if let Some(lora) = &self.word_lora {
            words = lora.add(&batch.input_ids, words, &batch.adapters)?;
        }
        let type_ids = if self.single_token_type {
            batch.token_type_ids.zeros_like()?
        } else {
            batch.token_type_ids.clone()
        };
        let mut types = self.token_type.forward(&type_ids)?;
        if let Some(lora) = &self.token_type_lora {
            types = lora.add(&type_ids, types, &batch.adapters)?;
        }
        let mut x = (words + types)?;
        if let Some(table) = &self.position {
            // Right padding: every row's real tokens sit at positions 0..len; padding is masked.
            let start = self.position_offset as u32;
            let positions = Tensor::arange(start, start + batch.max_len as u32, x.device())?;
            x = x.broadcast_add(&table.forward(&positions)?)?;
        }
        self.layer_norm.forward(&x)
    }
}

struct BertAttention {
    /// Query, key and value projections fused into one matmul.
    qkv: Dense,
    output: Dense,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    /// ALiBi slope per head, shaped `[1, heads, 1, 1]`; `None` for position-embedding models.
    alibi_slopes: Option<Tensor>,
    /// The same slopes for the fused CPU path.
    alibi_host: Option<Vec<f32>>,
    /// jina-bert-v2-qk-post-norm: LayerNorms on the whole query and key projections.
    qk_norm: Option<(LayerNorm, LayerNorm)>,
    eps: f32,
    /// bfloat16 on the reduced-precision path, as the dense layers.
    products: AttentionProducts,
}

/// Attention scores are computed in blocks of query rows no larger than this, so a long input
/// (ALiBi models take 8192 tokens) never holds a whole `[heads, seq, seq]` matrix at once.
const ATTENTION_BLOCK_BYTES: usize = 64 << 20;

impl BertAttention {
    /// Hugging Face names: `attention.self.{query,key,value}`, `attention.output.*`.
    fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let sv = vb.pp("self");
        let weights = ["query", "key", "value"]
            .iter()
            .map(|n| sv.pp(n).get((h, h), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = ["query", "key", "value"]
            .iter()
            .map(|n| sv.pp(n).get(h, "bias"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let qkv = Dense::new(Linear::new(
            Tensor::cat(&weights, 0)?,
            Some(Tensor::cat(&biases, 0)?),
        ))?;
        let qk_norm = if sv.contains_tensor("layer_norm_q.weight") {
            Some((
                layer_norm(sv.pp("layer_norm_q"), h, config.layer_norm_eps)?,
                layer_norm(sv.pp("layer_norm_k"), h, config.layer_norm_eps)?,
            ))
        } else {
            None
        };
        let output = dense(vb.pp("output.dense"), h, h, config)?;
        let norm = layer_norm(vb.pp("output.LayerNorm"), h, config.layer_norm_eps)?;
        Self::new(qkv, output, norm, qk_norm, config, vb.device(), vb.dtype())
    }

    /// The flash layout (`vb` is the layer): `mixer.Wqkv` giving [q | k | v], `mixer.out_proj`,
    /// `norm1`.
    fn load_flash(vb: &VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let qkv = dense(vb.pp("mixer.Wqkv"), h, 3 * h, config)?;
        let output = dense(vb.pp("mixer.out_proj"), h, h, config)?;
        let norm = layer_norm(vb.pp("norm1"), h, config.layer_norm_eps)?;
        Self::new(qkv, output, norm, None, config, vb.device(), vb.dtype())
    }

    fn new(
        qkv: Dense,
        output: Dense,
        layer_norm: LayerNorm,
        qk_norm: Option<(LayerNorm, LayerNorm)>,
        config: &BertConfig,
        device: &Device,
        dtype: DType,
    ) -> candle_core::Result<Self> {
        let head_dim = config.hidden_size / config.num_attention_heads;
        let alibi_host = config
            .uses_alibi()
            .then(|| alibi_slopes(config.num_attention_heads));
        Ok(Self {
            qkv,
            output,
            layer_norm,
            num_heads: config.num_attention_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            alibi_slopes: match &alibi_host {
                Some(slopes) => Some(
                    Tensor::from_vec(slopes.clone(), (1, slopes.len(), 1, 1), device)?
                        .to_dtype(dtype)?,
                ),
                None => None,
            },
            alibi_host,
            qk_norm,
            eps: config.layer_norm_eps as f32,
            products: AttentionProducts::F32,
        })
    }

    /// The fused CPU path over packed rows (see [`kernels`]): `x` is `rows x hidden`.
    fn forward_packed(&self, x: &[f32], rows: &Rows) -> candle_core::Result<Vec<f32>> {
        let h = self.num_heads * self.head_dim;
        let mut qkv = self
            .qkv
            .forward_host_adapted(x, rows.total(), &rows.adapters)?;
        kernels::bias_activation(&mut qkv, 3 * h, self.qkv.host_bias()?.as_deref(), None);
        if let Some((norm_q, norm_k)) = &self.qk_norm {
            for (column, norm) in [(0, norm_q), (h, norm_k)] {
                let (gamma, beta) = host_norm(norm)?;
                kernels::layer_norm_columns(&mut qkv, 3 * h, column, &gamma, &beta, self.eps);
            }
        }
        if let Some(table) = &rows.rotary {
            kernels::rotary(
                &mut qkv,
                &rows.offsets,
                self.num_heads,
                self.head_dim,
                table,
            );
        }
        let shape = AttentionShape {
            heads: self.num_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
        };
        let context = kernels::attention(
            &qkv,
            &rows.offsets,
            rows.attended,
            shape,
            self.alibi_host.as_deref(),
            self.products,
        );
        drop(qkv);
        let mut out = self
            .output
            .forward_host_adapted(&context, rows.total(), &rows.adapters)?;
        layer_norm_residual(
            &mut out,
            x,
            self.output.host_bias()?.as_deref(),
            &self.layer_norm,
            self.eps,
        )?;
        Ok(out)
    }

    fn forward(&self, hidden: &Tensor, step: &Step) -> candle_core::Result<Tensor> {
        let (b, l, h) = hidden.dims3()?;
        let qkv = self.qkv.forward_adapted(hidden, step.adapters)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            let mut part = qkv.narrow(D::Minus1, i * h, h)?;
            if let (Some((norm_q, norm_k)), 0 | 1) = (&self.qk_norm, i) {
                part = if i == 0 { norm_q } else { norm_k }.forward(&part)?;
            }
            part.reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (mut q, mut k, v) = (heads(0)?, heads(1)?, heads(2)?);
        if let Some((cos, sin)) = &step.rotary {
            q = candle_nn::rotary_emb::rope(&q, cos, sin)?;
            k = candle_nn::rotary_emb::rope(&k, cos, sin)?;
        }
        let k_t = k.t()?;
        let row_bytes = b * self.num_heads * l * q.dtype().size_in_bytes();
        let block = (ATTENTION_BLOCK_BYTES / row_bytes.max(1)).clamp(1, l);
        let mut blocks = Vec::with_capacity(l.div_ceil(block));
        for start in (0..l).step_by(block) {
            let rows = block.min(l - start);
            let q_rows = q.narrow(2, start, rows)?;
            let mut scores = (q_rows.matmul(&k_t)? * self.scale)?.broadcast_add(&step.mask_bias)?;
            if let Some(slopes) = &self.alibi_slopes {
                scores = scores.broadcast_add(&alibi_bias(slopes, start, rows, l)?)?;
            }
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            blocks.push(probs.matmul(&v)?);
        }
        let context = Tensor::cat(&blocks, 2)?
            .transpose(1, 2)?
            .reshape((b, l, h))?;
        let out = self.output.forward_adapted(&context, step.adapters)?;
        self.layer_norm.forward(&(out + hidden)?)
    }
}

/// What every layer of the candle path needs besides its input.
struct Step<'a> {
    /// `[batch, 1, 1, seq]`: 0 for attended tokens, a large negative number for the rest.
    mask_bias: Tensor,
    /// RoPE's cos and sin, `[seq, head_dim / 2]`, for rotary models.
    rotary: Option<(Tensor, Tensor)>,
    /// Each batch row's task adapter.
    adapters: &'a [Option<usize>],
}

/// The feed-forward half of a block, residual and layer norm included.
enum FeedForward {
    /// BERT: `intermediate.dense`, activation, `output.dense`, `output.LayerNorm`.
    Plain {
        intermediate: Dense,
        output: Dense,
        layer_norm: LayerNorm,
        activation: Activation,
    },
    /// JinaBERT: `mlp.gated_layers` (no bias) gives [gate | value]; activation(gate) * value,
    /// then `mlp.wo` and `mlp.layernorm`. The qk-post-norm variant names them
    /// `mlp.up_gated_layer` (giving [value | gate]), `mlp.down_layer` and `layer_norm_2`.
    Gated {
        gated_layers: Dense,
        wo: Dense,
        layer_norm: LayerNorm,
        activation: Activation,
        intermediate_size: usize,
        gate_first: bool,
    },
}

impl FeedForward {
    /// The fused CPU path: `x` is `rows x hidden`, the attention block's output.
    fn forward_packed(&self, x: &[f32], packed: &Rows, eps: f32) -> candle_core::Result<Vec<f32>> {
        let (rows, spans) = (packed.total(), &packed.adapters);
        let (inner, output, layer_norm) = match self {
            FeedForward::Plain {
                intermediate,
                output,
                layer_norm,
                activation,
            } => {
                let i = intermediate.out_features()?;
                let mut inner = intermediate.forward_host_adapted(x, rows, spans)?;
                kernels::bias_activation(
                    &mut inner,
                    i,
                    intermediate.host_bias()?.as_deref(),
                    Some(*activation),
                );
                (inner, output, layer_norm)
            }
            FeedForward::Gated {
                gated_layers,
                wo,
                layer_norm,
                activation,
                intermediate_size,
                gate_first,
            } => {
                let both = gated_layers.forward_host_adapted(x, rows, spans)?;
                let inner =
                    kernels::gated_activation(&both, *intermediate_size, *activation, *gate_first);
                (inner, wo, layer_norm)
            }
        };
        let mut out = output.forward_host_adapted(&inner, rows, spans)?;
        layer_norm_residual(&mut out, x, output.host_bias()?.as_deref(), layer_norm, eps)?;
        Ok(out)
    }

    fn load(vb: &VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        // (gate-and-value layer, output layer, LayerNorm, gate in the first half)
        let gated = if vb.contains_tensor("mlp.up_gated_layer.weight") {
            Some((
                "mlp.up_gated_layer",
                "mlp.down_layer",
                "layer_norm_2",
                false,
            ))
        } else if config.gated_feed_forward() {
            Some(("mlp.gated_layers", "mlp.wo", "mlp.layernorm", true))
        } else {
            None
        };
        if let Some((both, out, norm, gate_first)) = gated {
            return Ok(FeedForward::Gated {
                gated_layers: Dense::new(Linear::new(
                    vb.pp(both).get((2 * i, h), "weight")?,
                    None,
                ))?,
                wo: dense(vb.pp(out), i, h, config)?,
                layer_norm: layer_norm(vb.pp(norm), h, eps)?,
                activation: config.hidden_act,
                intermediate_size: i,
                gate_first,
            });
        }
        Ok(FeedForward::Plain {
            intermediate: dense(vb.pp("intermediate.dense"), h, i, config)?,
            output: dense(vb.pp("output.dense"), i, h, config)?,
            layer_norm: layer_norm(vb.pp("output.LayerNorm"), h, eps)?,
            activation: config.hidden_act,
        })
    }

    fn forward(&self, x: &Tensor, adapters: &[Option<usize>]) -> candle_core::Result<Tensor> {
        match self {
            FeedForward::Plain {
                intermediate,
                output,
                layer_norm,
                activation,
            } => {
                let inner = activation.apply(&intermediate.forward_adapted(x, adapters)?)?;
                layer_norm.forward(&(output.forward_adapted(&inner, adapters)? + x)?)
            }
            FeedForward::Gated {
                gated_layers,
                wo,
                layer_norm,
                activation,
                intermediate_size,
                gate_first,
            } => {
                let both = gated_layers.forward_adapted(x, adapters)?;
                let first = both.narrow(D::Minus1, 0, *intermediate_size)?;
                let second = both.narrow(D::Minus1, *intermediate_size, *intermediate_size)?;
                let (gate, value) = if *gate_first {
                    (first, second)
                } else {
                    (second, first)
                };
                let inner = (activation.apply(&gate)? * value)?;
                layer_norm.forward(&(wo.forward_adapted(&inner, adapters)? + x)?)
            }
        }
    }
}

struct BertLayer {
    attention: BertAttention,
    /// jina-bert-v2-qk-post-norm's `layer_norm_1`: a second residual LayerNorm over the
    /// attention block's output and the layer's input.
    input_norm: Option<LayerNorm>,
    feed_forward: FeedForward,
}

/// Where each sequence's rows sit once padding is removed, and what runs on them.
struct Rows<'a> {
    /// First row of each sequence, then the total.
    offsets: Vec<usize>,
    /// Leading rows of each sequence that are attended to.
    attended: &'a [usize],
    /// Runs of rows whose sequences use a task adapter.
    adapters: Vec<AdapterSpan>,
    /// RoPE's table up to the longest sequence, for rotary models.
    rotary: Option<RotaryTable>,
}

impl<'a> Rows<'a> {
    fn of(batch: &'a Batch, rotary: Option<RotaryTable>) -> Self {
        let mut offsets = Vec::with_capacity(batch.lengths.len() + 1);
        offsets.push(0);
        for len in &batch.lengths {
            offsets.push(offsets[offsets.len() - 1] + len);
        }
        let mut adapters: Vec<AdapterSpan> = Vec::new();
        for (i, adapter) in batch.adapters.iter().enumerate() {
            let Some(task) = *adapter else { continue };
            let rows = offsets[i]..offsets[i + 1];
            match adapters.last_mut() {
                Some((last, t)) if *t == task && last.end == rows.start => last.end = rows.end,
                _ => adapters.push((rows, task)),
            }
        }
        Self {
            offsets,
            attended: &batch.attended,
            adapters,
            rotary,
        }
    }

    fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }
}

/// A LayerNorm's gain and bias as host slices, for the fused path.
fn host_norm(norm: &LayerNorm) -> candle_core::Result<(HostSlice<'_>, HostSlice<'_>)> {
    let Some(beta) = norm.bias() else {
        candle_core::bail!("LayerNorm without a bias")
    };
    Ok((HostSlice::of(norm.weight())?, HostSlice::of(beta)?))
}

/// `out = LayerNorm(out + bias + residual)` on the fused path.
fn layer_norm_residual(
    out: &mut [f32],
    residual: &[f32],
    bias: Option<&[f32]>,
    layer_norm: &LayerNorm,
    eps: f32,
) -> candle_core::Result<()> {
    let (gamma, beta) = host_norm(layer_norm)?;
    kernels::bias_residual_layer_norm(out, residual, bias, &gamma, &beta, eps);
    Ok(())
}

impl BertLayer {
    fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let input_norm = if vb.contains_tensor("layer_norm_1.weight") {
            Some(layer_norm(
                vb.pp("layer_norm_1"),
                config.hidden_size,
                config.layer_norm_eps,
            )?)
        } else {
            None
        };
        Ok(Self {
            attention: BertAttention::load(vb.pp("attention"), config)?,
            input_norm,
            feed_forward: FeedForward::load(&vb, config)?,
        })
    }

    /// The flash layout: `mixer`, `norm1`, `mlp.fc1`, `mlp.fc2`, `norm2`.
    fn load_flash(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            attention: BertAttention::load_flash(&vb, config)?,
            input_norm: None,
            feed_forward: FeedForward::Plain {
                intermediate: dense(vb.pp("mlp.fc1"), h, i, config)?,
                output: dense(vb.pp("mlp.fc2"), i, h, config)?,
                layer_norm: layer_norm(vb.pp("norm2"), h, config.layer_norm_eps)?,
                activation: config.hidden_act,
            },
        })
    }

    fn forward(&self, hidden: &Tensor, step: &Step) -> candle_core::Result<Tensor> {
        let mut attended = self.attention.forward(hidden, step)?;
        if let Some(norm) = &self.input_norm {
            attended = norm.forward(&(attended + hidden)?)?;
        }
        self.feed_forward.forward(&attended, step.adapters)
    }

    fn forward_packed(&self, x: &[f32], rows: &Rows) -> candle_core::Result<Vec<f32>> {
        let mut attended = self.attention.forward_packed(x, rows)?;
        if let Some(norm) = &self.input_norm {
            layer_norm_residual(&mut attended, x, None, norm, self.attention.eps)?;
        }
        self.feed_forward
            .forward_packed(&attended, rows, self.attention.eps)
    }
}

pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    hidden_size: usize,
    dtype: DType,
    /// (head size, base) for rotary models.
    rotary: Option<(usize, f64)>,
}

/// How a checkpoint names its tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// Hugging Face's BERT names: `embeddings.LayerNorm`, `encoder.layer.N.attention.self.query`...
    Hf,
    /// The flash-attention implementation's (jina-embeddings-v3): `emb_ln`,
    /// `encoder.layers.N.mixer.Wqkv`, `norm1`, `mlp.fc1`...
    Flash,
}

impl BertModel {
    /// Loads from a checkpoint whose tensors are at the root (`embeddings.*`, sentence-transformers
    /// exports) or under a model prefix (`bert.*`, `roberta.*`, as task heads save them).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let vb = match model_prefix(&vb) {
            Some(prefix) => vb.pp(prefix),
            None => vb,
        };
        if config.uses_rotary() && config.rotary_emb_interleaved == Some(true) {
            candle_core::bail!("interleaved rotary embeddings are not supported");
        }
        let layout = if vb.contains_tensor("emb_ln.weight") {
            Layout::Flash
        } else {
            Layout::Hf
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| match layout {
                Layout::Hf => BertLayer::load(vb.pp(format!("encoder.layer.{i}")), config),
                Layout::Flash => {
                    BertLayer::load_flash(vb.pp(format!("encoder.layers.{i}")), config)
                }
            })
            .collect::<candle_core::Result<Vec<_>>>()?;
        let head_dim = config.hidden_size / config.num_attention_heads;
        if config.uses_rotary() && !head_dim.is_multiple_of(2) {
            candle_core::bail!("rotary embeddings need an even head size, not {head_dim}");
        }
        Ok(Self {
            embeddings: BertEmbeddings::load(&vb, config, layout)?,
            layers,
            hidden_size: config.hidden_size,
            dtype: vb.dtype(),
            rotary: config
                .uses_rotary()
                .then(|| (head_dim, config.rotary_base())),
        })
    }

    fn rotary_table(&self, batch: &Batch) -> Option<RotaryTable> {
        self.rotary
            .map(|(head_dim, base)| RotaryTable::new(head_dim, base, batch.max_len))
    }

    /// The layers as candle operations, one tensor per step: the path for GPUs and reduced
    /// precision, and the reference the fused CPU path is tested against.
    pub fn forward_unfused(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let rotary = match self.rotary_table(batch) {
            Some(table) => Some(table.tensors(batch.input_ids.device(), self.dtype)?),
            None => None,
        };
        let step = Step {
            mask_bias: attention_bias(&batch.attention_mask, self.dtype)?,
            rotary,
            adapters: &batch.adapters,
        };
        let mut hidden = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &step)?;
        }
        Ok(hidden)
    }

    /// Runs the dense layers and the attention products with bfloat16 inputs (float32 sums,
    /// softmax and LayerNorm): the reduced-precision CPU path. Needs AVX-512 BF16.
    pub fn use_bf16(&mut self) -> candle_core::Result<()> {
        if !kernels::bf16::available() {
            candle_core::bail!("bf16 needs a CPU with AVX-512 BF16 (avx512_bf16); use f32")
        }
        for layer in &mut self.layers {
            if !layer.attention.qkv.on_host() {
                candle_core::bail!("bf16 on the fused path needs a float32 model on the CPU")
            }
            layer.attention.qkv.use_bf16()?;
            layer.attention.output.use_bf16()?;
            layer.attention.products = AttentionProducts::Bf16;
            match &mut layer.feed_forward {
                FeedForward::Plain {
                    intermediate,
                    output,
                    ..
                } => {
                    intermediate.use_bf16()?;
                    output.use_bf16()?;
                }
                FeedForward::Gated {
                    gated_layers, wo, ..
                } => {
                    gated_layers.use_bf16()?;
                    wo.use_bf16()?;
                }
            }
        }
        Ok(())
    }

    /// The fused float32 CPU path: padding removed, layers run by [`kernels`].
    fn forward_fused(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let embedded = self.embeddings.forward(batch)?;
        let (b, l, h) = embedded.dims3()?;
        let rows = Rows::of(batch, self.rotary_table(batch));
        let padded = embedded.flatten_all()?.to_vec1::<f32>()?;
        let mut x = Vec::with_capacity(rows.total() * h);
        for (i, len) in batch.lengths.iter().enumerate() {
            x.extend_from_slice(&padded[i * l * h..][..len * h]);
        }
        drop(padded);
        for layer in &self.layers {
            x = layer.forward_packed(&x, &rows)?;
        }
        // Back to `[batch, seq, hidden]`, padding positions zero.
        let mut out = vec![0f32; b * l * h];
        for (i, len) in batch.lengths.iter().enumerate() {
            out[i * l * h..][..len * h].copy_from_slice(&x[rows.offsets[i] * h..][..len * h]);
        }
        Tensor::from_vec(out, (b, l, h), embedded.device())
    }
}

impl Encoder for BertModel {
    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        if kernels::on_cpu_f32(&batch.attention_mask) && self.dtype == DType::F32 {
            // On a pool worker, the kernels' parallel loops hand work to the other workers
            // directly; called from outside the pool, each of them would wait on a cross-thread
            // wake-up of its own (a few hundred per forward pass at batch 1).
            rayon::scope(|_| self.forward_fused(batch))
        } else {
            self.forward_unfused(batch)
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

/// ALiBi's head slopes (Press et al., 2022): a geometric sequence starting at 2^(-8/n) for n a
/// power of two; otherwise those of the next lower power of two, then every other slope of the
/// next higher one.
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    fn power_of_two(n: usize) -> Vec<f64> {
        let start = 2f64.powf(-(2f64.powf(-((n as f64).log2() - 3.0))));
        (0..n).map(|i| start * start.powi(i as i32)).collect()
    }
    let slopes = if heads.is_power_of_two() {
        power_of_two(heads)
    } else {
        let lower = 1usize << heads.ilog2();
        let mut s = power_of_two(lower);
        s.extend(
            alibi_slopes(2 * lower)
                .into_iter()
                .map(f64::from)
                .step_by(2)
                .take(heads - lower),
        );
        s
    };
    slopes.into_iter().map(|v| v as f32).collect()
}

/// `-slope * |i - j|` for query rows `start..start+rows` against all `len` keys:
/// `[1, heads, rows, len]`, built per batch for just the rows in hand.
fn alibi_bias(
    slopes: &Tensor,
    start: usize,
    rows: usize,
    len: usize,
) -> candle_core::Result<Tensor> {
    let device = slopes.device();
    let i = Tensor::arange(start as u32, (start + rows) as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((rows, 1))?;
    let j = Tensor::arange(0u32, len as u32, device)?
        .to_dtype(DType::F32)?
        .reshape((1, len))?;
    let distance = j.broadcast_sub(&i)?.abs()?.to_dtype(slopes.dtype())?;
    distance
        .reshape((1, 1, rows, len))?
        .broadcast_mul(&slopes.neg()?)
}

/// The prefix a task-head checkpoint stores the encoder under (`bert`, `roberta`), if any.
pub(crate) fn model_prefix(vb: &VarBuilder) -> Option<&'static str> {
    ["bert", "roberta", "model"].into_iter().find(|p| {
        let words = format!("{p}.embeddings.word_embeddings");
        vb.contains_tensor(&format!("{words}.weight"))
            || vb.contains_tensor(&format!("{words}.parametrizations.weight.original"))
    })
}

/// A weight stored plainly (`weight`) or as a LoRA parametrization's base
/// (`parametrizations.weight.original`).
fn parametrized_weight(vb: &VarBuilder, shape: (usize, usize)) -> candle_core::Result<Tensor> {
    if vb.contains_tensor("weight") {
        vb.get(shape, "weight")
    } else {
        vb.get(shape, "parametrizations.weight.original")
    }
}

/// The adapters' sizes for a layer that has adapters.
fn lora_shape(vb: &VarBuilder, config: &BertConfig) -> candle_core::Result<LoraShape> {
    match config.lora_shape() {
        Some(shape) => Ok(shape),
        None => candle_core::bail!(
            "{} has LoRA adapters but config.json names no `lora_adaptations`",
            vb.prefix()
        ),
    }
}

/// A Linear with a bias (weight stored plainly or as a parametrization), and its task adapters
/// when the checkpoint has them.
fn dense(
    vb: VarBuilder,
    in_features: usize,
    out_features: usize,
    config: &BertConfig,
) -> candle_core::Result<Dense> {
    let weight = parametrized_weight(&vb, (out_features, in_features))?;
    let bias = vb.get(out_features, "bias")?;
    let dense = Dense::new(Linear::new(weight, Some(bias)))?;
    Ok(match lora::adapters_of(&vb) {
        Some(adapters) => dense.with_lora(LinearLora::load(
            adapters,
            lora_shape(&vb, config)?,
            in_features,
            out_features,
        )?),
        None => dense,
    })
}

/// An embedding table (`hidden_size` wide), and its task adapters when the checkpoint has them.
fn embedding(
    vb: VarBuilder,
    rows: usize,
    config: &BertConfig,
) -> candle_core::Result<(Embedding, Option<EmbeddingLora>)> {
    let h = config.hidden_size;
    let table = Embedding::new(parametrized_weight(&vb, (rows, h))?, h);
    let lora = match lora::adapters_of(&vb) {
        Some(adapters) => Some(EmbeddingLora::load(
            adapters,
            lora_shape(&vb, config)?,
            rows,
            h,
        )?),
        None => None,
    };
    Ok((table, lora))
}

/// `[batch, seq]` 1/0 mask to an additive `[batch, 1, 1, seq]` bias.
pub(crate) fn attention_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let bias = ((mask.ones_like()? - mask)? * -1e30f64)?;
    bias.reshape((b, 1, 1, l))?.to_dtype(dtype)
}

fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    // Older BERT checkpoints name the LayerNorm parameters gamma/beta.
    let (weight, bias) = if vb.contains_tensor("weight") {
        (vb.get(size, "weight")?, vb.get(size, "bias")?)
    } else {
        (vb.get(size, "gamma")?, vb.get(size, "beta")?)
    };
    Ok(LayerNorm::new(weight, bias, eps))
}

/// Builds a model on `device` from safetensors files (memory-mapped) or a PyTorch `.bin`.
pub fn var_builder(
    weights: &std::path::Path,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<VarBuilder<'static>> {
    if weights.extension().is_some_and(|e| e == "safetensors") {
        // SAFETY: the file is mapped read-only and embedd never writes to model files while serving.
        unsafe { VarBuilder::from_mmaped_safetensors(&[weights], dtype, device) }
    } else {
        VarBuilder::from_pth(weights, dtype, device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenize::TokenSequence;

    /// A random-weight model of `config`'s shape, tensors named as in Hugging Face checkpoints.
    fn random_model(config: &BertConfig, qk_post_norm: bool) -> BertModel {
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![v, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.position_embeddings.weight".into(), vec![64, h]),
            ("embeddings.LayerNorm.weight".into(), vec![h]),
            ("embeddings.LayerNorm.bias".into(), vec![h]),
        ];
        for layer in 0..config.num_hidden_layers {
            let p = format!("encoder.layer.{layer}");
            for n in ["query", "key", "value"] {
                shapes.push((format!("{p}.attention.self.{n}.weight"), vec![h, h]));
                shapes.push((format!("{p}.attention.self.{n}.bias"), vec![h]));
            }
            let mut more = vec![
                ("attention.output.dense.weight", vec![h, h]),
                ("attention.output.dense.bias", vec![h]),
                ("attention.output.LayerNorm.weight", vec![h]),
                ("attention.output.LayerNorm.bias", vec![h]),
            ];
            if qk_post_norm {
                more.extend([
                    ("attention.self.layer_norm_q.weight", vec![h]),
                    ("attention.self.layer_norm_q.bias", vec![h]),
                    ("attention.self.layer_norm_k.weight", vec![h]),
                    ("attention.self.layer_norm_k.bias", vec![h]),
                    ("layer_norm_1.weight", vec![h]),
                    ("layer_norm_1.bias", vec![h]),
                    ("mlp.up_gated_layer.weight", vec![2 * i, h]),
                    ("mlp.down_layer.weight", vec![h, i]),
                    ("mlp.down_layer.bias", vec![h]),
                    ("layer_norm_2.weight", vec![h]),
                    ("layer_norm_2.bias", vec![h]),
                ]);
            } else if config.gated_feed_forward() {
                more.extend([
                    ("mlp.gated_layers.weight", vec![2 * i, h]),
                    ("mlp.wo.weight", vec![h, i]),
                    ("mlp.wo.bias", vec![h]),
                    ("mlp.layernorm.weight", vec![h]),
                    ("mlp.layernorm.bias", vec![h]),
                ]);
            } else {
                more.extend([
                    ("intermediate.dense.weight", vec![i, h]),
                    ("intermediate.dense.bias", vec![i]),
                    ("output.dense.weight", vec![h, i]),
                    ("output.dense.bias", vec![h]),
                    ("output.LayerNorm.weight", vec![h]),
                    ("output.LayerNorm.bias", vec![h]),
                ]);
            }
            shapes.extend(more.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = Tensor::randn(0f32, 0.3, shape, &Device::Cpu).unwrap();
                // LayerNorm gains near 1, as trained models have them.
                let is_norm = name.ends_with("norm.weight")
                    || name.ends_with("LayerNorm.weight")
                    || name.contains("layer_norm_");
                let t = if is_norm && name.ends_with("weight") {
                    (t + 1.0).unwrap()
                } else {
                    t
                };
                (name, t)
            })
            .collect();
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        BertModel::load(vb, config).unwrap()
    }

    fn config(alibi: bool) -> BertConfig {
        serde_json::from_value(serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 64,
            "position_embedding_type": if alibi { "alibi" } else { "absolute" },
            "feed_forward_type": if alibi { "geglu" } else { "original" },
        }))
        .unwrap()
    }

    #[test]
    fn fused_cpu_path_matches_candle_operations() {
        for (alibi, qk_post_norm) in [(false, false), (true, false), (true, true)] {
            let model = random_model(&config(alibi), qk_post_norm);
            let sequences: Vec<TokenSequence> = [7usize, 3, 12]
                .iter()
                .map(|&n| TokenSequence {
                    ids: (0..n as u32).map(|t| (t * 7 + 3) % 50).collect(),
                    type_ids: vec![0; n],
                })
                .collect();
            let refs: Vec<&TokenSequence> = sequences.iter().collect();
            // The last sequence has trailing input that is not attended to (ColBERT queries).
            let batch = Batch::with_attention(&refs, &[7, 3, 9], 0, &Device::Cpu).unwrap();
            assert_paths_agree(&model, &batch, &format!("alibi={alibi}"));
        }
    }

    #[test]
    fn rotary_and_task_adapters_match_on_both_paths() {
        // The jina-embeddings-v3 fixture (flash layout, LoRA adapters, rotary): the fused path
        // against candle's operations, rows of one batch on different adapters.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-jina-v3");
        let config: BertConfig =
            serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
                .unwrap();
        let vb = var_builder(&dir.join("model.safetensors"), DType::F32, &Device::Cpu).unwrap();
        let model = BertModel::load(vb, &config).unwrap();
        let sequences: Vec<TokenSequence> = [9usize, 4, 30]
            .iter()
            .map(|&n| TokenSequence {
                ids: (0..n as u32).map(|t| (t * 131 + 7) % 30522).collect(),
                type_ids: vec![0; n],
            })
            .collect();
        let refs: Vec<&TokenSequence> = sequences.iter().collect();
        let batch = Batch::new(&refs, 0, &Device::Cpu)
            .unwrap()
            .with_adapters(vec![Some(4), None, Some(0)]);
        assert_paths_agree(&model, &batch, "v3");
    }

    /// The fused path's token vectors within 1e-4 of the candle path's, padding aside.
    fn assert_paths_agree(model: &BertModel, batch: &Batch, what: &str) {
        let fused = model.forward(batch).unwrap().to_vec3::<f32>().unwrap();
        let reference = model
            .forward_unfused(batch)
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        for (row, &len) in batch.lengths.iter().enumerate() {
            for t in 0..len {
                for (a, b) in fused[row][t].iter().zip(&reference[row][t]) {
                    assert!(
                        (a - b).abs() < 1e-4,
                        "{what} row {row} token {t}: {a} vs {b}"
                    );
                }
            }
        }
    }

    #[test]
    fn alibi_slopes_follow_the_paper() {
        let eight = alibi_slopes(8);
        let expected: Vec<f32> = (1..=8).map(|i| 2f32.powi(-i)).collect();
        assert_eq!(eight, expected);
        // 12 heads: the 8 slopes of 8 heads, then every other slope of 16 heads.
        let twelve = alibi_slopes(12);
        let sixteen = alibi_slopes(16);
        assert_eq!(&twelve[..8], &eight[..]);
        assert_eq!(
            &twelve[8..],
            &[sixteen[0], sixteen[2], sixteen[4], sixteen[6]]
        );
    }

    #[test]
    fn alibi_bias_is_symmetric_distance_times_slope() {
        let slopes = Tensor::new(&[0.5f32, 0.25], &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 1, 1))
            .unwrap();
        let bias = alibi_bias(&slopes, 1, 2, 3).unwrap();
        assert_eq!(bias.dims(), &[1, 2, 2, 3]);
        let v: Vec<Vec<Vec<f32>>> = bias.squeeze(0).unwrap().to_vec3().unwrap();
        assert_eq!(v[0], vec![vec![-0.5, 0.0, -0.5], vec![-1.0, -0.5, 0.0]]);
        assert_eq!(v[1][1], vec![-0.5, -0.25, 0.0]);
    }
}

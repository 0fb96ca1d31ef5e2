//! BERT-family encoders: BERT, MiniLM, and RoBERTa / XLM-RoBERTa (the same blocks with position ids
//! offset past the padding index). Post-layer-norm blocks, absolute position embeddings.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::{Activation, Encoder};
use crate::batch::Batch;

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

    /// How many tokens fit the position table.
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings - self.position_offset()
    }
}

struct BertEmbeddings {
    word: Embedding,
    position: Embedding,
    token_type: Embedding,
    layer_norm: LayerNorm,
    position_offset: usize,
    /// XLM-RoBERTa has one token type; pair tokenizers may still emit type 1 for the second text.
    single_token_type: bool,
}

impl BertEmbeddings {
    fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        Ok(Self {
            word: candle_nn::embedding(config.vocab_size, h, vb.pp("word_embeddings"))?,
            position: candle_nn::embedding(
                config.max_position_embeddings,
                h,
                vb.pp("position_embeddings"),
            )?,
            token_type: candle_nn::embedding(
                config.type_vocab_size,
                h,
                vb.pp("token_type_embeddings"),
            )?,
            layer_norm: layer_norm(vb.pp("LayerNorm"), h, config.layer_norm_eps)?,
            position_offset: config.position_offset(),
            single_token_type: config.type_vocab_size == 1,
        })
    }

    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let device = batch.input_ids.device();
        let start = self.position_offset as u32;
        // Right padding means every row's real tokens sit at positions 0..len; padded rows are masked.
        let positions = Tensor::arange(start, start + batch.max_len as u32, device)?;
        let words = self.word.forward(&batch.input_ids)?;
        let types = if self.single_token_type {
            self.token_type
                .forward(&batch.token_type_ids.zeros_like()?)?
        } else {
            self.token_type.forward(&batch.token_type_ids)?
        };
        let positions = self.position.forward(&positions)?;
        let x = (words + types)?.broadcast_add(&positions)?;
        self.layer_norm.forward(&x)
    }
}

struct BertAttention {
    /// Query, key and value projections fused into one matmul.
    qkv: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
}

impl BertAttention {
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
        let qkv = Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?));
        let head_dim = h / config.num_attention_heads;
        Ok(Self {
            qkv,
            output: candle_nn::linear(h, h, vb.pp("output.dense"))?,
            layer_norm: layer_norm(vb.pp("output.LayerNorm"), h, config.layer_norm_eps)?,
            num_heads: config.num_attention_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
        })
    }

    /// `mask_bias` is `[batch, 1, 1, seq]`: 0 for real tokens, a large negative number for padding.
    fn forward(&self, hidden: &Tensor, mask_bias: &Tensor) -> candle_core::Result<Tensor> {
        let (b, l, h) = hidden.dims3()?;
        let qkv = self.qkv.forward(hidden)?;
        let heads = |i: usize| -> candle_core::Result<Tensor> {
            qkv.narrow(D::Minus1, i * h, h)?
                .reshape((b, l, self.num_heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let (q, k, v) = (heads(0)?, heads(1)?, heads(2)?);
        let scores = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(mask_bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        let out = self.output.forward(&context)?;
        self.layer_norm.forward(&(out + hidden)?)
    }
}

struct BertLayer {
    attention: BertAttention,
    intermediate: Linear,
    output: Linear,
    layer_norm: LayerNorm,
    activation: Activation,
}

impl BertLayer {
    fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let (h, i) = (config.hidden_size, config.intermediate_size);
        Ok(Self {
            attention: BertAttention::load(vb.pp("attention"), config)?,
            intermediate: candle_nn::linear(h, i, vb.pp("intermediate.dense"))?,
            output: candle_nn::linear(i, h, vb.pp("output.dense"))?,
            layer_norm: layer_norm(vb.pp("output.LayerNorm"), h, config.layer_norm_eps)?,
            activation: config.hidden_act,
        })
    }

    fn forward(&self, hidden: &Tensor, mask_bias: &Tensor) -> candle_core::Result<Tensor> {
        let attended = self.attention.forward(hidden, mask_bias)?;
        let inner = self
            .activation
            .apply(&self.intermediate.forward(&attended)?)?;
        let out = self.output.forward(&inner)?;
        self.layer_norm.forward(&(out + attended)?)
    }
}

pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    hidden_size: usize,
    dtype: DType,
}

impl BertModel {
    /// Loads from a checkpoint whose tensors are at the root (`embeddings.*`, sentence-transformers
    /// exports) or under a model prefix (`bert.*`, `roberta.*`, as task heads save them).
    pub fn load(vb: VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let vb = match model_prefix(&vb) {
            Some(prefix) => vb.pp(prefix),
            None => vb,
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(format!("encoder.layer.{i}")), config))
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self {
            embeddings: BertEmbeddings::load(vb.pp("embeddings"), config)?,
            layers,
            hidden_size: config.hidden_size,
            dtype: vb.dtype(),
        })
    }
}

impl Encoder for BertModel {
    fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let mask_bias = attention_bias(&batch.attention_mask, self.dtype)?;
        let mut hidden = self.embeddings.forward(batch)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &mask_bias)?;
        }
        Ok(hidden)
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

/// The prefix a task-head checkpoint stores the encoder under (`bert`, `roberta`), if any.
pub(crate) fn model_prefix(vb: &VarBuilder) -> Option<&'static str> {
    ["bert", "roberta", "model"]
        .into_iter()
        .find(|p| vb.contains_tensor(&format!("{p}.embeddings.word_embeddings.weight")))
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

//! CLIP (Radford et al., 2021) in the transformers layout (`CLIPModel`): a causal text
//! transformer whose end-of-text token, projected, is the text's vector, and a ViT whose class
//! token, normalized and projected, is the image's; both in one shared space. Pre-LayerNorm
//! blocks with quick-GELU feed-forwards throughout. Both towers run on the fused CPU kernels
//! (f32 or bf16) or on candle's graph, as the plan says.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::dense::host_norm;
use super::vision::{ImageRows, PatchEmbedding};
use super::{Backbone, Dense, Family, FamilyConfig, ImageTower, Weights};
use crate::activation::Activation;
use crate::batch::{Hidden, PackedBatch};
use crate::error::Result;
use crate::heads::Pooling;
use crate::kernels::{self, AttentionProducts, AttentionShape};
use crate::plan::{ExecutionPlan, FusedProducts};

fn default_act() -> Activation {
    Activation::QuickGelu
}
fn default_eps() -> f64 {
    1e-5
}
fn default_channels() -> usize {
    3
}

/// One tower's sizes (`text_config` or `vision_config`).
#[derive(Debug, Clone, Deserialize)]
pub struct TowerConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    /// Text: the position table's length (77).
    #[serde(default)]
    pub max_position_embeddings: Option<usize>,
    #[serde(default)]
    pub vocab_size: Option<usize>,
    /// Vision: the input's side in pixels and the patch side.
    #[serde(default)]
    pub image_size: Option<usize>,
    #[serde(default)]
    pub patch_size: Option<usize>,
    #[serde(default = "default_channels")]
    pub num_channels: usize,
}

#[derive(Debug, Clone, Deserialize)]
pub struct ClipConfig {
    pub text_config: TowerConfig,
    pub vision_config: TowerConfig,
    pub projection_dim: usize,
}

/// The family's registration.
pub(super) fn read_config(
    raw: &serde_json::Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    let config: ClipConfig = serde_json::from_value(raw.clone())
        .map_err(|e| ("(clip config)".to_string(), e.to_string()))?;
    let missing = |field: &str| Err((field.to_string(), "missing".to_string()));
    if config.text_config.max_position_embeddings.is_none() {
        return missing("text_config.max_position_embeddings");
    }
    if config.text_config.vocab_size.is_none() {
        return missing("text_config.vocab_size");
    }
    match (
        config.vision_config.image_size,
        config.vision_config.patch_size,
    ) {
        (Some(image), Some(patch)) if patch > 0 && image.is_multiple_of(patch) => {}
        _ => {
            return Err((
                "vision_config.image_size".into(),
                "image_size and patch_size must be set, the image a whole number of patches".into(),
            ))
        }
    }
    for (tower, c) in [
        ("text_config", &config.text_config),
        ("vision_config", &config.vision_config),
    ] {
        if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
            return Err((
                format!("{tower}.num_attention_heads"),
                "does not divide hidden_size".into(),
            ));
        }
    }
    Ok(Box::new(config))
}

impl FamilyConfig for ClipConfig {
    fn family(&self) -> Family {
        Family::Clip
    }

    /// The shared space's size: what both towers' projections give.
    fn hidden_size(&self) -> usize {
        self.projection_dim
    }

    fn max_positions(&self) -> Option<usize> {
        self.text_config.max_position_embeddings
    }

    /// The text's vector is its end-of-text token's, the last one of every tokenized input.
    fn default_pooling(&self) -> Option<Pooling> {
        Some(Pooling::LastToken)
    }

    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        let text =
            ClipTextTransformer::load(weights.vb.pp("text_model"), &self.text_config, plan.fused())
                .map_err(|e| weights.mismatch(e))?;
        Ok(Box::new(text))
    }

    fn text_projection(&self, weights: &Weights) -> Result<Option<Linear>> {
        let shape = (self.projection_dim, self.text_config.hidden_size);
        let weight = weights
            .vb
            .get(shape, "text_projection.weight")
            .map_err(|e| weights.mismatch(e))?;
        Ok(Some(Linear::new(weight, None)))
    }

    fn load_image_tower(
        &self,
        weights: &Weights,
        plan: &ExecutionPlan,
    ) -> Result<Option<Box<dyn ImageTower>>> {
        let tower = ClipVisionTower::load(
            &weights.vb,
            &self.vision_config,
            self.projection_dim,
            plan.fused(),
        )
        .map_err(|e| weights.mismatch(e))?;
        Ok(Some(Box::new(tower)))
    }
}

/// The fused path's packed rows: each sequence's first row and the total, the rows each one
/// attends to, and whether attention is causal.
struct FusedRows<'a> {
    offsets: &'a [usize],
    keys: &'a [usize],
    causal: bool,
}

impl FusedRows<'_> {
    fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }
}

struct ClipAttention {
    /// The query, key and value projections as one product giving [q | k | v] (one large
    /// product runs faster than three small ones).
    qkv: Dense,
    out: Dense,
    heads: usize,
    head_dim: usize,
    products: AttentionProducts,
}

impl ClipAttention {
    fn load(
        vb: VarBuilder,
        c: &TowerConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let parts = ["q_proj", "k_proj", "v_proj"];
        let weights = parts
            .iter()
            .map(|p| vb.get((h, h), &format!("{p}.weight")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let biases = parts
            .iter()
            .map(|p| vb.get(h, &format!("{p}.bias")))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let qkv = Linear::new(Tensor::cat(&weights, 0)?, Some(Tensor::cat(&biases, 0)?));
        Ok(Self {
            qkv: Dense::load(qkv, fused)?,
            out: Dense::load(candle_nn::linear(h, h, vb.pp("out_proj"))?, fused)?,
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
            products: match fused {
                Some(FusedProducts::Bf16) => AttentionProducts::Bf16,
                _ => AttentionProducts::F32,
            },
        })
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// `bias` is added to the scores (`[batch or 1, 1, seq, seq]`), if any.
    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let (q, k, v) = super::split_qkv(&self.qkv.forward(x)?, self.heads, self.head_dim)?;
        let q = (q * self.scale())?;
        let mut scores = q.matmul(&k.t()?)?;
        if let Some(bias) = bias {
            scores = scores.broadcast_add(bias)?;
        }
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.out.forward(&context)
    }

    /// The fused path: the output projection's product, its bias left to the residual step.
    fn forward_fused(&self, x: &[f32], rows: &FusedRows) -> candle_core::Result<Vec<f32>> {
        let qkv = self
            .qkv
            .forward_host_activated(x, rows.total(), &[], None)?;
        let shape = AttentionShape {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            scale: self.scale() as f32,
            causal: rows.causal,
        };
        let context = kernels::attention(&qkv, rows.offsets, rows.keys, shape, None, self.products);
        drop(qkv);
        self.out.forward_host(&context, rows.total())
    }
}

/// A pre-LayerNorm block: `x + attn(ln1(x))`, then `+ mlp(ln2(.))`.
struct ClipLayer {
    layer_norm1: LayerNorm,
    attention: ClipAttention,
    layer_norm2: LayerNorm,
    fc1: Dense,
    fc2: Dense,
    activation: Activation,
    eps: f32,
}

impl ClipLayer {
    fn load(
        vb: VarBuilder,
        c: &TowerConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        Ok(Self {
            layer_norm1: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm1"))?,
            attention: ClipAttention::load(vb.pp("self_attn"), c, fused)?,
            layer_norm2: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("layer_norm2"))?,
            fc1: Dense::load(candle_nn::linear(h, i, vb.pp("mlp.fc1"))?, fused)?,
            fc2: Dense::load(candle_nn::linear(i, h, vb.pp("mlp.fc2"))?, fused)?,
            activation: c.hidden_act,
            eps: c.layer_norm_eps as f32,
        })
    }

    fn forward(&self, x: &Tensor, bias: Option<&Tensor>) -> candle_core::Result<Tensor> {
        let x = (x + self
            .attention
            .forward(&self.layer_norm1.forward(x)?, bias)?)?;
        let inner = self
            .activation
            .apply(&self.fc1.forward(&self.layer_norm2.forward(&x)?)?)?;
        &x + self.fc2.forward(&inner)?
    }

    /// The fused path, `x` (`rows x hidden`) updated in place.
    fn forward_fused(&self, x: &mut [f32], rows: &FusedRows) -> candle_core::Result<()> {
        let (gamma, beta) = host_norm(&self.layer_norm1)?;
        let normed = kernels::layer_norm(x, &gamma, &beta, self.eps);
        let attended = self.attention.forward_fused(&normed, rows)?;
        drop(normed);
        let (gamma, beta) = host_norm(&self.layer_norm2)?;
        let out_bias = self.attention.out.host_bias()?;
        let normed = kernels::residual_then_layer_norm(
            x,
            &attended,
            out_bias.as_deref(),
            &gamma,
            &beta,
            self.eps,
        );
        drop(attended);
        let inner =
            self.fc1
                .forward_host_activated(&normed, rows.total(), &[], Some(self.activation))?;
        drop(normed);
        let out = self.fc2.forward_host(&inner, rows.total())?;
        kernels::residual_add(x, &out, self.fc2.host_bias()?.as_deref());
        Ok(())
    }
}

fn layers(
    vb: VarBuilder,
    c: &TowerConfig,
    fused: Option<FusedProducts>,
) -> candle_core::Result<Vec<ClipLayer>> {
    (0..c.num_hidden_layers)
        .map(|i| ClipLayer::load(vb.pp(format!("encoder.layers.{i}")), c, fused))
        .collect()
}

/// The text tower up to its final LayerNorm: one vector per token.
pub struct ClipTextTransformer {
    token_embedding: Embedding,
    position_embedding: Embedding,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    hidden_size: usize,
    eps: f32,
    fused: Option<FusedProducts>,
}

impl ClipTextTransformer {
    fn load(
        vb: VarBuilder,
        c: &TowerConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let h = c.hidden_size;
        let vocab = c.vocab_size.unwrap_or_default();
        let positions = c.max_position_embeddings.unwrap_or_default();
        Ok(Self {
            token_embedding: candle_nn::embedding(vocab, h, vb.pp("embeddings.token_embedding"))?,
            position_embedding: candle_nn::embedding(
                positions,
                h,
                vb.pp("embeddings.position_embedding"),
            )?,
            layers: layers(vb.clone(), c, fused)?,
            final_layer_norm: candle_nn::layer_norm(
                h,
                c.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            hidden_size: h,
            eps: c.layer_norm_eps as f32,
            fused,
        })
    }

    fn forward_graph(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let device = self.token_embedding.embeddings().device().clone();
        let dtype = self.token_embedding.embeddings().dtype();
        let batch = packed.padded(&device)?;
        let l = batch.max_len;
        let positions = Tensor::arange(0u32, l as u32, &device)?;
        let mut x = self
            .token_embedding
            .forward(&batch.input_ids)?
            .broadcast_add(&self.position_embedding.forward(&positions)?)?;
        // Causal, as the text tower was trained; right padding is then never attended by a
        // real token, and padded rows are dropped by the packing below.
        let bias = causal_bias(l, dtype, &device)?
            .broadcast_add(&super::bert::attention_bias(&batch.attention_mask, dtype)?)?;
        for layer in &self.layers {
            x = layer.forward(&x, Some(&bias))?;
        }
        Hidden::from_padded(&self.final_layer_norm.forward(&x)?, packed)
    }

    /// The fused path over the packed tokens (no padding), causal attention per sequence.
    fn forward_fused(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let device = self.token_embedding.embeddings().device().clone();
        let ids = packed.packed_ids();
        let positions: Vec<u32> = packed
            .sequences
            .iter()
            .flat_map(|s| 0..s.len() as u32)
            .collect();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &device)?;
        let positions = Tensor::from_vec(positions, total, &device)?;
        let embedded =
            (self.token_embedding.forward(&ids)? + self.position_embedding.forward(&positions)?)?;
        let mut x = embedded.flatten_all()?.to_vec1::<f32>()?;
        let rows = FusedRows {
            offsets: &packed.offsets,
            keys: &packed.attended,
            causal: true,
        };
        for layer in &self.layers {
            layer.forward_fused(&mut x, &rows)?;
        }
        let (gamma, beta) = host_norm(&self.final_layer_norm)?;
        kernels::layer_norm_columns(&mut x, self.hidden_size, 0, &gamma, &beta, self.eps);
        Ok(Hidden::new(
            Tensor::from_vec(x, (total, self.hidden_size), &device)?,
            packed,
        ))
    }
}

impl Backbone for ClipTextTransformer {
    fn forward(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        match self.fused {
            // On a pool worker, as the BERT family does: the kernels' parallel loops then hand
            // work to the other workers directly.
            Some(_) => rayon::scope(|_| self.forward_fused(packed)),
            None => self.forward_graph(packed),
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

/// `[1, 1, len, len]`: 0 on and below the diagonal, a large negative number above it.
pub(super) fn causal_bias(
    len: usize,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<Tensor> {
    let floor = if dtype == DType::F16 { -3.0e4 } else { -1.0e30 };
    let values: Vec<f32> = (0..len)
        .flat_map(|i| (0..len).map(move |j| if j > i { floor } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (1, 1, len, len), device)?.to_dtype(dtype)
}

/// The vision tower with its projection: pixels in, one vector per image in the shared space.
pub struct ClipVisionTower {
    patch_embedding: PatchEmbedding,
    class_embedding: Tensor,
    position_embedding: Embedding,
    pre_layernorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    projection: Dense,
    image_size: usize,
    tokens: usize,
    eps: f32,
    fused: Option<FusedProducts>,
}

impl ClipVisionTower {
    fn load(
        root: &VarBuilder,
        c: &TowerConfig,
        projection_dim: usize,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let vb = root.pp("vision_model");
        let h = c.hidden_size;
        let image_size = c.image_size.unwrap_or_default();
        let patch_size = c.patch_size.unwrap_or(1);
        let grid = image_size / patch_size;
        let embeddings = vb.pp("embeddings");
        Ok(Self {
            patch_embedding: PatchEmbedding::load(
                embeddings.pp("patch_embedding"),
                c.num_channels,
                h,
                patch_size,
                grid,
                false,
                fused,
            )?,
            class_embedding: embeddings.get(h, "class_embedding")?,
            position_embedding: candle_nn::embedding(
                grid * grid + 1,
                h,
                embeddings.pp("position_embedding"),
            )?,
            // The checkpoint's own spelling.
            pre_layernorm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("pre_layrnorm"))?,
            layers: layers(vb.clone(), c, fused)?,
            post_layernorm: candle_nn::layer_norm(h, c.layer_norm_eps, vb.pp("post_layernorm"))?,
            projection: Dense::load(
                Linear::new(
                    root.get((projection_dim, h), "visual_projection.weight")?,
                    None,
                ),
                fused,
            )?,
            image_size,
            tokens: grid * grid + 1,
            eps: c.layer_norm_eps as f32,
            fused,
        })
    }

    fn embed_graph(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.class_embedding.dtype();
        let n = pixels.dim(0)?;
        let pixels = pixels
            .to_device(self.class_embedding.device())?
            .to_dtype(dtype)?;
        let patches = self.patch_embedding.forward(&pixels)?; // [n, g*g, h]
        let h = patches.dim(D::Minus1)?;
        let class = self.class_embedding.reshape((1, 1, h))?.repeat((n, 1, 1))?;
        let tokens = Tensor::cat(&[&class, &patches], 1)?;
        let mut x = tokens.broadcast_add(self.position_embedding.embeddings())?;
        x = self.pre_layernorm.forward(&x)?;
        for layer in &self.layers {
            x = layer.forward(&x, None)?;
        }
        let pooled = self
            .post_layernorm
            .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        self.projection.forward(&pooled)?.to_dtype(DType::F32)
    }

    fn embed_fused(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let n = pixels.dim(0)?;
        let rows = ImageRows::new(n, self.tokens);
        let patches = self.patch_embedding.forward_host(pixels)?;
        let class = kernels::HostSlice::of(&self.class_embedding)?;
        let positions = kernels::HostSlice::of(self.position_embedding.embeddings())?;
        let mut x = rows.tokens(&class, &patches, &positions)?;
        drop(patches);
        let h = class.len();
        let (gamma, beta) = host_norm(&self.pre_layernorm)?;
        kernels::layer_norm_columns(&mut x, h, 0, &gamma, &beta, self.eps);
        let fused_rows = FusedRows {
            offsets: &rows.offsets,
            keys: &rows.keys,
            causal: false,
        };
        for layer in &self.layers {
            layer.forward_fused(&mut x, &fused_rows)?;
        }
        let mut pooled = rows.class_rows(&x, h);
        let (gamma, beta) = host_norm(&self.post_layernorm)?;
        kernels::layer_norm_columns(&mut pooled, h, 0, &gamma, &beta, self.eps);
        let projected = self.projection.forward_host(&pooled, n)?;
        let dim = self.projection.out_features()?;
        Tensor::from_vec(projected, (n, dim), &candle_core::Device::Cpu)
    }
}

impl ImageTower for ClipVisionTower {
    fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        match self.fused {
            Some(_) => rayon::scope(|_| self.embed_fused(pixels)),
            None => self.embed_graph(pixels),
        }
    }

    fn image_size(&self) -> usize {
        self.image_size
    }

    fn tokens_per_image(&self) -> usize {
        self.tokens
    }
}

//! EVA02 (Fang et al., 2023) as jina-clip's vision tower: a ViT with 2D rotary embeddings on the
//! patch tokens, SwiGLU feed-forwards and sub-LayerNorms, pooled at the class token. Tensors as
//! the jina-clip implementation names them (`patch_embed.proj`, `blocks.N.attn.q_proj`,
//! `attn.q_bias`, `mlp.w1`...). Runs on the fused CPU kernels (f32 or bf16) or candle's graph.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};
use serde::Deserialize;

use super::dense::host_norm;
use super::vision::{ImageRows, PatchEmbedding};
use super::{Dense, ImageTower};
use crate::activation::Activation;
use crate::kernels::{self, AttentionProducts, AttentionShape, RotaryTable};
use crate::plan::FusedProducts;

/// EVA's LayerNorms, as the implementation builds them.
const EPS: f64 = 1e-6;

/// The rotary frequencies' base (the implementation's default, which jina-clip keeps).
const ROPE_BASE: f64 = 10_000.0;

/// `vision_config` of a jina-clip checkpoint (`JinaCLIPVisionConfig`).
#[derive(Debug, Clone, Deserialize)]
pub struct EvaVisionConfig {
    /// The tower's output size.
    pub embed_dim: usize,
    pub width: usize,
    pub image_size: usize,
    pub patch_size: usize,
    pub layers: usize,
    pub head_width: usize,
    pub mlp_ratio: f64,
    #[serde(default)]
    pub ls_init_value: Option<f64>,
    #[serde(default = "yes")]
    pub qkv_bias: bool,
    #[serde(default)]
    pub post_norm: bool,
    #[serde(default)]
    pub rope_embeddings: bool,
    /// The patch grid's side the rotary positions were trained at.
    #[serde(default = "default_pt_hw")]
    pub pt_hw_seq_len: usize,
    /// Interpolate the rotary positions from `pt_hw_seq_len` to the actual grid.
    #[serde(default)]
    pub intp_freq: bool,
    #[serde(default)]
    pub naive_swiglu: bool,
    #[serde(default)]
    pub subln: bool,
    #[serde(default)]
    pub proj_type: Option<String>,
}

fn yes() -> bool {
    true
}
fn default_pt_hw() -> usize {
    16
}

impl EvaVisionConfig {
    /// Refuses the options jina-clip's released towers do not use (and embedd has no reference
    /// for), naming the field.
    pub fn check(&self) -> std::result::Result<(), (String, String)> {
        let refuse =
            |field: &str, reason: &str| Err((format!("vision_config.{field}"), reason.into()));
        // jina-clip-v2 is 512 px in 14-pixel patches: the convolution drops the last 8 pixels.
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return refuse("patch_size", "must be at least 1 and at most image_size");
        }
        if self.head_width == 0 || !self.width.is_multiple_of(self.head_width) {
            return refuse("head_width", "does not divide width");
        }
        if !self.head_width.is_multiple_of(4) {
            return refuse("head_width", "2D rotary embeddings need a multiple of 4");
        }
        if !self.rope_embeddings {
            return refuse(
                "rope_embeddings",
                "only EVA02 towers with rotary embeddings are supported",
            );
        }
        if !self.naive_swiglu || !self.subln {
            return refuse(
                "subln",
                "only the SwiGLU feed-forward with sub-LayerNorms (naive_swiglu, subln) is supported",
            );
        }
        if self.post_norm {
            return refuse("post_norm", "post-norm blocks are not supported");
        }
        if self.ls_init_value.is_some() {
            return refuse("ls_init_value", "layer scale is not supported");
        }
        if !self.intp_freq && self.pt_hw_seq_len != self.grid() {
            return refuse(
                "pt_hw_seq_len",
                "without intp_freq the rotary grid must be the patch grid",
            );
        }
        match self.proj_type.as_deref() {
            None if self.embed_dim != self.width => refuse(
                "proj_type",
                "embed_dim differs from width but no projection is named",
            ),
            None | Some("linear") => Ok(()),
            Some(other) => Err((
                "vision_config.proj_type".into(),
                format!("'{other}' is not supported (none or 'linear')"),
            )),
        }
    }

    /// Patches per side, as the patch convolution (stride = kernel = patch) gives them.
    fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    fn heads(&self) -> usize {
        self.width / self.head_width
    }

    /// The feed-forward's width, as the implementation truncates it.
    fn mlp_width(&self) -> usize {
        (self.width as f64 * self.mlp_ratio) as usize
    }
}

/// The 2D rotary table of the tokens: `[1 + grid * grid, head_dim]` cos and sin. The class token
/// (row 0) is not turned (cos 1, sin 0); for the patches the first half of each head is turned by
/// the patch's row, the second by its column, channel pairs sharing an angle.
fn rotary_tables(c: &EvaVisionConfig) -> (Vec<f32>, Vec<f32>) {
    let (grid, head_dim) = (c.grid(), c.head_width);
    let half = head_dim / 2;
    let frequencies: Vec<f64> = (0..half / 2)
        .map(|k| 1.0 / ROPE_BASE.powf((2 * k) as f64 / half as f64))
        .collect();
    let reference = if c.intp_freq { c.pt_hw_seq_len } else { grid } as f64;
    let position = |i: usize| i as f64 / grid as f64 * reference;
    let mut cos = vec![1.0; head_dim];
    let mut sin = vec![0.0; head_dim];
    for row in 0..grid {
        for col in 0..grid {
            for channel in 0..head_dim {
                let (at, k) = if channel < half {
                    (position(row), channel / 2)
                } else {
                    (position(col), (channel - half) / 2)
                };
                let angle = at * frequencies[k];
                cos.push(angle.cos() as f32);
                sin.push(angle.sin() as f32);
            }
        }
    }
    (cos, sin)
}

/// The fused path's rotary table, for query and key channels reordered per head so that each
/// interleaved pair `(2i, 2i + 1)` becomes `(i, i + head_dim / 2)` (see [`half_split_order`]):
/// pair `i`'s angle is the patch's row times frequency `i` for the first quarter of the
/// channels, its column times frequency `i - head_dim / 4` for the second; the class token's
/// angles are 0.
fn half_split_rotary(c: &EvaVisionConfig) -> RotaryTable {
    let (grid, head_dim) = (c.grid(), c.head_width);
    let quarter = head_dim / 4;
    let frequencies: Vec<f64> = (0..quarter)
        .map(|k| 1.0 / ROPE_BASE.powf((2 * k) as f64 / (head_dim / 2) as f64))
        .collect();
    let reference = if c.intp_freq { c.pt_hw_seq_len } else { grid } as f64;
    let position = |i: usize| i as f64 / grid as f64 * reference;
    let mut angles = vec![0.0; head_dim / 2];
    for row in 0..grid {
        for col in 0..grid {
            angles.extend(frequencies.iter().map(|f| position(row) * f));
            angles.extend(frequencies.iter().map(|f| position(col) * f));
        }
    }
    RotaryTable::from_angles(head_dim, &angles)
}

/// Output channels of a `[heads · head_dim, in]` projection reordered so that within each head
/// the even channels come first, then the odd ones: EVA's interleaved rotary pairs become the
/// half-split pairs the fused rotary kernel turns. Queries and keys reordered alike leave every
/// `q · k` as it was.
fn half_split_order(heads: usize, head_dim: usize) -> Vec<u32> {
    (0..heads)
        .flat_map(|h| {
            let base = (h * head_dim) as u32;
            (0..head_dim as u32)
                .step_by(2)
                .chain((1..head_dim as u32).step_by(2))
                .map(move |c| base + c)
        })
        .collect()
}

struct EvaAttention {
    /// The query, key and value projections as one product giving [q | k | v] (one large
    /// product runs faster than three small ones); the key's bias is zero, as EVA has none. On
    /// the fused path the query and key channels are in [`half_split_order`].
    qkv: Dense,
    inner_norm: LayerNorm,
    proj: Dense,
    heads: usize,
    head_dim: usize,
    products: AttentionProducts,
}

impl EvaAttention {
    fn load(
        vb: VarBuilder,
        c: &EvaVisionConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let w = c.width;
        let mut q = vb.get((w, w), "q_proj.weight")?;
        let mut k = vb.get((w, w), "k_proj.weight")?;
        let mut q_bias = c.qkv_bias.then(|| vb.get(w, "q_bias")).transpose()?;
        if fused.is_some() {
            let order = Tensor::new(half_split_order(c.heads(), c.head_width), q.device())?;
            q = q.index_select(&order, 0)?;
            k = k.index_select(&order, 0)?;
            q_bias = q_bias.map(|b| b.index_select(&order, 0)).transpose()?;
        }
        let weight = Tensor::cat(&[&q, &k, &vb.get((w, w), "v_proj.weight")?], 0)?;
        let bias = match q_bias {
            Some(q) => Some(Tensor::cat(
                &[&q, &q.zeros_like()?, &vb.get(w, "v_bias")?],
                0,
            )?),
            None => None,
        };
        Ok(Self {
            qkv: Dense::load(Linear::new(weight, bias), fused)?,
            inner_norm: candle_nn::layer_norm(w, EPS, vb.pp("inner_attn_ln"))?,
            proj: Dense::load(candle_nn::linear(w, w, vb.pp("proj"))?, fused)?,
            heads: c.heads(),
            head_dim: c.head_width,
            products: match fused {
                Some(FusedProducts::Bf16) => AttentionProducts::Bf16,
                _ => AttentionProducts::F32,
            },
        })
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    fn forward(&self, x: &Tensor, rotary: &Rotary) -> candle_core::Result<Tensor> {
        let (n, l, w) = x.dims3()?;
        let (q, k, v) = super::split_qkv(&self.qkv.forward(x)?, self.heads, self.head_dim)?;
        let (q, k) = (rotary.apply(&q)?, rotary.apply(&k)?);
        let scores = (q * self.scale())?.matmul(&k.t()?)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs.matmul(&v)?.transpose(1, 2)?.reshape((n, l, w))?;
        self.proj.forward(&self.inner_norm.forward(&context)?)
    }

    /// The fused path: the output projection's product, its bias left to the residual step.
    fn forward_fused(
        &self,
        x: &[f32],
        rows: &ImageRows,
        table: &RotaryTable,
    ) -> candle_core::Result<Vec<f32>> {
        let w = self.heads * self.head_dim;
        let mut qkv = self
            .qkv
            .forward_host_activated(x, rows.total(), &[], None)?;
        kernels::rotary(
            &mut qkv,
            &rows.offsets,
            (self.heads, self.heads, self.head_dim),
            table,
        );
        let shape = AttentionShape {
            heads: self.heads,
            kv_heads: self.heads,
            head_dim: self.head_dim,
            scale: self.scale() as f32,
            causal: false,
        };
        let mut context =
            kernels::attention(&qkv, &rows.offsets, &rows.keys, shape, None, self.products);
        drop(qkv);
        let (gamma, beta) = host_norm(&self.inner_norm)?;
        kernels::layer_norm_columns(&mut context, w, 0, &gamma, &beta, EPS as f32);
        self.proj.forward_host(&context, rows.total())
    }
}

/// The rotary table on the tower's device, one row per token (the class token's the identity).
struct Rotary {
    cos: Tensor,
    sin: Tensor,
}

impl Rotary {
    /// `x`: `[n, heads, 1 + patches, head_dim]`.
    fn apply(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let (n, heads, l, d) = x.dims4()?;
        let pairs = x.reshape((n, heads, l, d / 2, 2))?;
        let first = pairs.narrow(D::Minus1, 0, 1)?;
        let second = pairs.narrow(D::Minus1, 1, 1)?;
        let turned =
            Tensor::cat(&[&second.neg()?, &first], D::Minus1)?.reshape((n, heads, l, d))?;
        x.broadcast_mul(&self.cos)? + turned.broadcast_mul(&self.sin)?
    }
}

/// `w3(ffn_ln(silu(w1 x) * w2 x))`, `w1` and `w2` run as one product giving [gate | value].
struct SwiGlu {
    gate_value: Dense,
    hidden: usize,
    norm: LayerNorm,
    w3: Dense,
}

impl SwiGlu {
    fn load(
        vb: VarBuilder,
        c: &EvaVisionConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let (w, m) = (c.width, c.mlp_width());
        let weight = Tensor::cat(
            &[vb.get((m, w), "w1.weight")?, vb.get((m, w), "w2.weight")?],
            0,
        )?;
        let bias = Tensor::cat(&[vb.get(m, "w1.bias")?, vb.get(m, "w2.bias")?], 0)?;
        Ok(Self {
            gate_value: Dense::load(Linear::new(weight, Some(bias)), fused)?,
            hidden: m,
            norm: candle_nn::layer_norm(m, EPS, vb.pp("ffn_ln"))?,
            w3: Dense::load(candle_nn::linear(m, w, vb.pp("w3"))?, fused)?,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let both = self.gate_value.forward(x)?;
        let gate = candle_nn::ops::silu(&both.narrow(D::Minus1, 0, self.hidden)?)?;
        let hidden = (gate * both.narrow(D::Minus1, self.hidden, self.hidden)?)?;
        self.w3.forward(&self.norm.forward(&hidden)?)
    }

    /// The fused path: `w3`'s product, its bias left to the residual step.
    fn forward_fused(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        let both = self.gate_value.forward_host_activated(x, rows, &[], None)?;
        let mut hidden = kernels::gated_activation(&both, self.hidden, Activation::Silu, true);
        drop(both);
        let (gamma, beta) = host_norm(&self.norm)?;
        kernels::layer_norm_columns(&mut hidden, self.hidden, 0, &gamma, &beta, EPS as f32);
        self.w3.forward_host(&hidden, rows)
    }
}

/// A pre-LayerNorm block: `x + attn(norm1(x))`, then `+ mlp(norm2(.))`.
struct EvaBlock {
    norm1: LayerNorm,
    attention: EvaAttention,
    norm2: LayerNorm,
    mlp: SwiGlu,
}

impl EvaBlock {
    fn load(
        vb: VarBuilder,
        c: &EvaVisionConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: candle_nn::layer_norm(c.width, EPS, vb.pp("norm1"))?,
            attention: EvaAttention::load(vb.pp("attn"), c, fused)?,
            norm2: candle_nn::layer_norm(c.width, EPS, vb.pp("norm2"))?,
            mlp: SwiGlu::load(vb.pp("mlp"), c, fused)?,
        })
    }

    fn forward(&self, x: &Tensor, rotary: &Rotary) -> candle_core::Result<Tensor> {
        let x = (x + self.attention.forward(&self.norm1.forward(x)?, rotary)?)?;
        &x + self.mlp.forward(&self.norm2.forward(&x)?)?
    }

    /// The fused path, `x` (`rows x width`) updated in place.
    fn forward_fused(
        &self,
        x: &mut [f32],
        rows: &ImageRows,
        table: &RotaryTable,
    ) -> candle_core::Result<()> {
        let eps = EPS as f32;
        let (gamma, beta) = host_norm(&self.norm1)?;
        let normed = kernels::layer_norm(x, &gamma, &beta, eps);
        let attended = self.attention.forward_fused(&normed, rows, table)?;
        drop(normed);
        let (gamma, beta) = host_norm(&self.norm2)?;
        let bias = self.attention.proj.host_bias()?;
        let normed =
            kernels::residual_then_layer_norm(x, &attended, bias.as_deref(), &gamma, &beta, eps);
        drop(attended);
        let out = self.mlp.forward_fused(&normed, rows.total())?;
        kernels::residual_add(x, &out, self.mlp.w3.host_bias()?.as_deref());
        Ok(())
    }
}

/// The tower with its head and the model's visual projection, if any: pixels in, one vector per
/// image in the space the text tower shares.
pub struct EvaVisionTower {
    patch_embed: PatchEmbedding,
    cls_token: Tensor,
    pos_embed: Tensor,
    /// The graph's rotary table, or the fused path's.
    rotary: Rotary,
    fused_rotary: Option<RotaryTable>,
    blocks: Vec<EvaBlock>,
    norm: LayerNorm,
    head: Option<Dense>,
    projection: Option<Dense>,
    image_size: usize,
    tokens: usize,
}

impl EvaVisionTower {
    /// `vb` at the tower (`vision_model`); `projection` the model's `visual_projection`, if it
    /// has one.
    pub fn load(
        vb: VarBuilder,
        c: &EvaVisionConfig,
        projection: Option<Linear>,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let (w, grid) = (c.width, c.grid());
        let tokens = grid * grid + 1;
        let (cos, sin) = rotary_tables(c);
        let table = |values: Vec<f32>| -> candle_core::Result<Tensor> {
            Tensor::from_vec(values, (tokens, c.head_width), vb.device())?.to_dtype(vb.dtype())
        };
        let head = match c.proj_type.as_deref() {
            Some("linear") => Some(Dense::load(
                Linear::new(
                    vb.get((c.embed_dim, w), "head.weight")?,
                    c.qkv_bias
                        .then(|| vb.get(c.embed_dim, "head.bias"))
                        .transpose()?,
                ),
                fused,
            )?),
            _ => None,
        };
        Ok(Self {
            patch_embed: PatchEmbedding::load(
                vb.pp("patch_embed.proj"),
                3,
                w,
                c.patch_size,
                grid,
                true,
                fused,
            )?,
            cls_token: vb.get((1, 1, w), "cls_token")?,
            pos_embed: vb.get((1, tokens, w), "pos_embed")?,
            rotary: Rotary {
                cos: table(cos)?,
                sin: table(sin)?,
            },
            fused_rotary: fused.map(|_| half_split_rotary(c)),
            blocks: (0..c.layers)
                .map(|i| EvaBlock::load(vb.pp(format!("blocks.{i}")), c, fused))
                .collect::<candle_core::Result<_>>()?,
            norm: candle_nn::layer_norm(w, EPS, vb.pp("norm"))?,
            head,
            projection: projection.map(|p| Dense::load(p, fused)).transpose()?,
            image_size: c.image_size,
            tokens,
        })
    }

    fn embed_graph(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let dtype = self.cls_token.dtype();
        let n = pixels.dim(0)?;
        let pixels = pixels.to_device(self.cls_token.device())?.to_dtype(dtype)?;
        let patches = self.patch_embed.forward(&pixels)?; // [n, grid * grid, width]
        let w = patches.dim(D::Minus1)?;
        let class = self.cls_token.broadcast_as((n, 1, w))?;
        let mut x = Tensor::cat(&[&class, &patches], 1)?.broadcast_add(&self.pos_embed)?;
        for block in &self.blocks {
            x = block.forward(&x, &self.rotary)?;
        }
        let mut pooled = self.norm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?;
        for linear in self.head.iter().chain(&self.projection) {
            pooled = linear.forward(&pooled)?;
        }
        pooled.to_dtype(DType::F32)
    }

    fn embed_fused(&self, pixels: &Tensor, table: &RotaryTable) -> candle_core::Result<Tensor> {
        let n = pixels.dim(0)?;
        let rows = ImageRows::new(n, self.tokens);
        let patches = self.patch_embed.forward_host(pixels)?;
        let class = kernels::HostSlice::of(&self.cls_token)?;
        let positions = kernels::HostSlice::of(&self.pos_embed)?;
        let mut x = rows.tokens(&class, &patches, &positions)?;
        drop(patches);
        for block in &self.blocks {
            block.forward_fused(&mut x, &rows, table)?;
        }
        let w = class.len();
        let mut pooled = rows.class_rows(&x, w);
        let (gamma, beta) = host_norm(&self.norm)?;
        kernels::layer_norm_columns(&mut pooled, w, 0, &gamma, &beta, EPS as f32);
        for dense in self.head.iter().chain(&self.projection) {
            pooled = dense.forward_host_activated(&pooled, n, &[], None)?;
        }
        let dim = pooled.len() / n.max(1);
        Tensor::from_vec(pooled, (n, dim), &candle_core::Device::Cpu)
    }
}

impl ImageTower for EvaVisionTower {
    fn embed(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        match &self.fused_rotary {
            Some(table) => rayon::scope(|_| self.embed_fused(pixels, table)),
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

//! Self-attention with the family's position schemes: none (positions were embedded), ALiBi
//! distance biases, or rotary queries and keys; optional LayerNorms on queries and keys.

use candle_core::{DType, Module, Tensor, D};
use candle_nn::{LayerNorm, Linear, VarBuilder};

use super::config::{BertConfig, BertVariant, PositionEncoding};
use super::weights::{dense, host_norm, layer_norm, layer_norm_residual};
use super::{FusedRows, GraphStep};
use crate::kernels::{self, AttentionProducts, AttentionShape};
use crate::models::Dense;
use crate::plan::FusedProducts;

pub(super) struct BertAttention {
    /// Query, key and value projections fused into one product giving [q | k | v].
    qkv: Dense,
    output: Dense,
    layer_norm: LayerNorm,
    num_heads: usize,
    head_dim: usize,
    scale: f64,
    /// ALiBi's slope per head; `None` for other position schemes.
    alibi_slopes: Option<Vec<f32>>,
    /// jina-bert-v2-qk-post-norm: LayerNorms on the whole query and key projections.
    qk_norm: Option<(LayerNorm, LayerNorm)>,
    pub(super) eps: f32,
    products: AttentionProducts,
}

/// Attention scores are computed in blocks of query rows no larger than this, so a long input
/// (ALiBi models take 8192 tokens) never holds a whole `[heads, seq, seq]` matrix at once.
const ATTENTION_BLOCK_BYTES: usize = 64 << 20;

impl BertAttention {
    /// `vb` is the layer. Hugging Face names: `attention.self.{query,key,value}`,
    /// `attention.output.*`; the flash layout: `mixer.Wqkv` giving [q | k | v],
    /// `mixer.out_proj`, `norm1`.
    pub(super) fn load(
        vb: &VarBuilder,
        config: &BertConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let (qkv, output, norm, qk_norm) = if config.flash_layout() {
            (
                dense(vb.pp("mixer.Wqkv"), h, 3 * h, config, fused)?,
                dense(vb.pp("mixer.out_proj"), h, h, config, fused)?,
                layer_norm(vb.pp("norm1"), h, eps)?,
                None,
            )
        } else {
            let vb = vb.pp("attention");
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
            let qk_norm = if config.variant == BertVariant::JinaBertQkPostNorm {
                Some((
                    layer_norm(sv.pp("layer_norm_q"), h, eps)?,
                    layer_norm(sv.pp("layer_norm_k"), h, eps)?,
                ))
            } else {
                None
            };
            (
                Dense::load(qkv, fused)?,
                dense(vb.pp("output.dense"), h, h, config, fused)?,
                layer_norm(vb.pp("output.LayerNorm"), h, eps)?,
                qk_norm,
            )
        };
        let head_dim = config.head_dim();
        Ok(Self {
            qkv,
            output,
            layer_norm: norm,
            num_heads: config.num_attention_heads,
            head_dim,
            scale: 1.0 / (head_dim as f64).sqrt(),
            alibi_slopes: (config.positions() == PositionEncoding::Alibi)
                .then(|| alibi_slopes(config.num_attention_heads)),
            qk_norm,
            eps: eps as f32,
            products: match fused {
                Some(FusedProducts::Bf16) => AttentionProducts::Bf16,
                _ => AttentionProducts::F32,
            },
        })
    }

    /// The fused CPU path over packed rows (see [`kernels`]): `x` is `rows x hidden`.
    pub(super) fn forward_fused(
        &self,
        x: &[f32],
        rows: &FusedRows,
    ) -> candle_core::Result<Vec<f32>> {
        let h = self.num_heads * self.head_dim;
        let mut qkv = self
            .qkv
            .forward_host_activated(x, rows.total(), &rows.adapters, None)?;
        if let Some((norm_q, norm_k)) = &self.qk_norm {
            for (column, norm) in [(0, norm_q), (h, norm_k)] {
                let (gamma, beta) = host_norm(norm)?;
                kernels::layer_norm_columns(&mut qkv, 3 * h, column, &gamma, &beta, self.eps);
            }
        }
        if let Some(table) = &rows.rotary {
            kernels::rotary(
                &mut qkv,
                rows.offsets,
                (self.num_heads, self.num_heads, self.head_dim),
                table,
            );
        }
        let shape = AttentionShape {
            heads: self.num_heads,
            kv_heads: self.num_heads,
            head_dim: self.head_dim,
            scale: self.scale as f32,
            causal: false,
        };
        let context = kernels::attention(
            &qkv,
            rows.offsets,
            rows.attended,
            shape,
            self.alibi_slopes.as_deref(),
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

    /// The graph executor: `[batch, seq, hidden]` in and out.
    pub(super) fn forward(&self, hidden: &Tensor, step: &GraphStep) -> candle_core::Result<Tensor> {
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
        let slopes = match &self.alibi_slopes {
            Some(s) => Some(
                Tensor::from_slice(s, (1, s.len(), 1, 1), hidden.device())?
                    .to_dtype(hidden.dtype())?,
            ),
            None => None,
        };
        let k_t = k.t()?;
        let row_bytes = b * self.num_heads * l * q.dtype().size_in_bytes();
        let block = (ATTENTION_BLOCK_BYTES / row_bytes.max(1)).clamp(1, l);
        let mut blocks = Vec::with_capacity(l.div_ceil(block));
        for start in (0..l).step_by(block) {
            let rows = block.min(l - start);
            let q_rows = q.narrow(2, start, rows)?;
            let mut scores = (q_rows.matmul(&k_t)? * self.scale)?.broadcast_add(&step.mask_bias)?;
            if let Some(slopes) = &slopes {
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

/// `[batch, seq]` 1/0 mask to an additive `[batch, 1, 1, seq]` bias. The bias is the most
/// negative value the dtype holds at a safe margin, so half precision does not overflow to -inf
/// (a row attending nothing would then give NaN).
pub(crate) fn attention_bias(mask: &Tensor, dtype: DType) -> candle_core::Result<Tensor> {
    let (b, l) = mask.dims2()?;
    let floor = if dtype == DType::F16 { -3.0e4 } else { -1.0e30 };
    let bias = ((mask.ones_like()? - mask)? * floor)?;
    bias.reshape((b, 1, 1, l))?.to_dtype(dtype)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

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

    #[test]
    fn the_mask_bias_stays_finite_in_half_precision() {
        let mask = Tensor::new(&[[1f32, 0.0]], &Device::Cpu).unwrap();
        let bias = attention_bias(&mask, DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(bias[0], 0.0);
        assert!(bias[1].is_finite() && bias[1] < -1e4, "{bias:?}");
    }
}

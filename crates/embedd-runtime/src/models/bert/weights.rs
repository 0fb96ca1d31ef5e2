//! How the family's checkpoints store a layer: LayerNorms as weight/bias or gamma/beta, Linear
//! weights plainly or as a LoRA parametrization's base, adapters beside them.

use candle_core::Tensor;
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder};

use super::config::BertConfig;
use crate::kernels;
pub(super) use crate::models::dense::host_norm;
use crate::models::lora::{self, EmbeddingLora, LinearLora, LoraShape};
use crate::models::Dense;
use crate::plan::FusedProducts;

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
/// when the checkpoint has them, held as the executor reads it.
pub(super) fn dense(
    vb: VarBuilder,
    in_features: usize,
    out_features: usize,
    config: &BertConfig,
    fused: Option<FusedProducts>,
) -> candle_core::Result<Dense> {
    let weight = parametrized_weight(&vb, (out_features, in_features))?;
    let bias = vb.get(out_features, "bias")?;
    let lora = lora::adapters_of(&vb)
        .map(|adapters| {
            LinearLora::load(
                adapters,
                lora_shape(&vb, config)?,
                in_features,
                out_features,
            )
        })
        .transpose()?;
    Ok(Dense::load(Linear::new(weight, Some(bias)), fused)?.with_lora(lora))
}

/// A Linear without a bias.
pub(super) fn dense_unbiased(
    vb: VarBuilder,
    in_features: usize,
    out_features: usize,
    fused: Option<FusedProducts>,
) -> candle_core::Result<Dense> {
    let weight = vb.get((out_features, in_features), "weight")?;
    Dense::load(Linear::new(weight, None), fused)
}

/// An embedding table (`hidden_size` wide), and its task adapters when the checkpoint has them.
pub(super) fn embedding(
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

pub(super) fn layer_norm(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<LayerNorm> {
    // Older BERT checkpoints name the LayerNorm parameters gamma/beta.
    let (weight, bias) = if vb.contains_tensor("weight") {
        (vb.get(size, "weight")?, vb.get(size, "bias")?)
    } else {
        (vb.get(size, "gamma")?, vb.get(size, "beta")?)
    };
    Ok(LayerNorm::new(weight, bias, eps))
}

/// `out = LayerNorm(out + bias + residual)` on the fused path.
pub(super) fn layer_norm_residual(
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

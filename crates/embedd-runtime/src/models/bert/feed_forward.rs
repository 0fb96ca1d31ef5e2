//! The feed-forward half of a block, residual and LayerNorm included: BERT's plain one or
//! JinaBERT's gated one.

use candle_core::{Module, Tensor, D};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::{BertConfig, BertVariant};
use super::weights::{dense, dense_unbiased, layer_norm, layer_norm_residual};
use super::FusedRows;
use crate::activation::Activation;
use crate::kernels;
use crate::models::Dense;
use crate::plan::FusedProducts;

pub(super) enum FeedForward {
    /// BERT: `intermediate.dense`, activation, `output.dense`, `output.LayerNorm` (the flash
    /// layout: `mlp.fc1`, `mlp.fc2`, `norm2`).
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
    /// `vb` is the layer.
    pub(super) fn load(
        vb: &VarBuilder,
        config: &BertConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let (h, i, eps) = (
            config.hidden_size,
            config.intermediate_size,
            config.layer_norm_eps,
        );
        if config.gated_feed_forward() {
            // (gate-and-value layer, output layer, LayerNorm, gate in the first half)
            let (both, out, norm, gate_first) = match config.variant {
                BertVariant::JinaBertQkPostNorm => (
                    "mlp.up_gated_layer",
                    "mlp.down_layer",
                    "layer_norm_2",
                    false,
                ),
                BertVariant::JinaBertFlash => ("mlp.gated_layers", "mlp.wo", "norm2", true),
                _ => ("mlp.gated_layers", "mlp.wo", "mlp.layernorm", true),
            };
            return Ok(FeedForward::Gated {
                gated_layers: dense_unbiased(vb.pp(both), h, 2 * i, fused)?,
                wo: dense(vb.pp(out), i, h, config, fused)?,
                layer_norm: layer_norm(vb.pp(norm), h, eps)?,
                activation: config.hidden_act,
                intermediate_size: i,
                gate_first,
            });
        }
        let (inner, out, norm) = match config.variant {
            BertVariant::XlmRobertaFlash => ("mlp.fc1", "mlp.fc2", "norm2"),
            _ => ("intermediate.dense", "output.dense", "output.LayerNorm"),
        };
        Ok(FeedForward::Plain {
            intermediate: dense(vb.pp(inner), h, i, config, fused)?,
            output: dense(vb.pp(out), i, h, config, fused)?,
            layer_norm: layer_norm(vb.pp(norm), h, eps)?,
            activation: config.hidden_act,
        })
    }

    /// The fused CPU path: `x` is `rows x hidden`, the attention block's output.
    pub(super) fn forward_fused(
        &self,
        x: &[f32],
        packed: &FusedRows,
        eps: f32,
    ) -> candle_core::Result<Vec<f32>> {
        let (rows, spans) = (packed.total(), &packed.adapters);
        let (inner, output, layer_norm) = match self {
            FeedForward::Plain {
                intermediate,
                output,
                layer_norm,
                activation,
            } => {
                let inner =
                    intermediate.forward_host_activated(x, rows, spans, Some(*activation))?;
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

    /// The graph executor.
    pub(super) fn forward(
        &self,
        x: &Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
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

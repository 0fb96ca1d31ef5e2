//! A Linear layer that also serves the fused CPU path, in float32 or bfloat16.

use candle_core::{Module, Tensor};
use candle_nn::{LayerNorm, Linear};

use super::int8::Int8Layer;
use super::lora::{AdapterSpan, LinearLora};
use crate::activation::Activation;
use crate::kernels::{self, HostSlice, PackedBf16, PackedF32};
use crate::plan::FusedProducts;

/// Where a Dense layer's weight lives. Each layer holds one form only: a packed copy beside the
/// candle tensor would double the model's resident memory.
enum Weight {
    /// candle's `[out, in]` weight: GPUs, and float32 CPUs without AVX-512, where it is stored
    /// transposed in memory (the same tensor to candle) so gemm reads it in place instead of
    /// repacking it on every call.
    Candle(Tensor),
    /// Packed into column strips for the fused float32 kernel (CPUs with AVX-512).
    F32(PackedF32),
    /// Rounded to bfloat16 and packed, when the model runs in reduced precision.
    Bf16(PackedBf16),
    /// Quantized to 8 bits per output column and group of inputs, and packed (`--dtype int8`);
    /// float32 until its model's calibration pass has run.
    Int8(Int8Layer),
}

pub struct Dense {
    weight: Weight,
    bias: Option<Tensor>,
    /// Per-task low-rank updates (jina-embeddings-v3), applied on top of the base product.
    lora: Option<LinearLora>,
}

impl Dense {
    /// Holds `linear`'s weight in the form the plan's executor reads: candle's tensor for the
    /// graph; for the fused kernels, packed float32 strips (AVX-512 CPUs; elsewhere the
    /// tensor stored transposed, which gemm reads in place) or packed bfloat16.
    pub fn load(linear: Linear, fused: Option<FusedProducts>) -> candle_core::Result<Self> {
        let bias = linear.bias().cloned();
        let weight = linear.weight();
        let weight = match fused {
            None => Weight::Candle(weight.clone()),
            Some(FusedProducts::Bf16) => Weight::Bf16(with_transposed(weight, PackedBf16::pack)?),
            Some(FusedProducts::Int8) => Weight::Int8(with_transposed(weight, Int8Layer::new)?),
            Some(FusedProducts::F32) if PackedF32::available() => {
                Weight::F32(with_transposed(weight, PackedF32::pack)?)
            }
            Some(FusedProducts::F32) => Weight::Candle(weight.t()?.contiguous()?.t()?),
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    /// The product with its task adapters, where it has any.
    pub fn with_lora(mut self, lora: Option<LinearLora>) -> Self {
        self.lora = lora;
        self
    }

    pub fn out_features(&self) -> candle_core::Result<usize> {
        match &self.weight {
            Weight::Candle(w) => w.dim(0),
            Weight::F32(p) => Ok(p.n()),
            Weight::Bf16(p) => Ok(p.n()),
            Weight::Int8(p) => Ok(p.n()),
        }
    }

    /// The graph executor's `x · Wᵀ + b`.
    pub fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_adapted(x, &[])
    }

    /// The graph executor's `x · Wᵀ + b`, each batch row with its task adapter's update
    /// (`[batch, seq, in]` input).
    pub fn forward_adapted(
        &self,
        x: &Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let Weight::Candle(weight) = &self.weight else {
            candle_core::bail!("a layer packed for the fused kernels was run on the graph")
        };
        let out = Linear::new(weight.clone(), self.bias.clone()).forward(x)?;
        match &self.lora {
            Some(lora) => lora.add(x, out, adapters),
            None => Ok(out),
        }
    }

    /// [`Self::forward_host`] with the adapters' updates for the rows in `spans`.
    pub fn forward_host_adapted(
        &self,
        x: &[f32],
        rows: usize,
        spans: &[AdapterSpan],
    ) -> candle_core::Result<Vec<f32>> {
        let mut out = self.forward_host(x, rows)?;
        if let Some(lora) = &self.lora {
            lora.add_host(x, &mut out, spans)?;
        }
        Ok(out)
    }

    /// `activation(x · Wᵀ + b)` on the fused path, with the adapters' updates for the rows in
    /// `spans`: the packed kernels add the bias and apply the activation to each block of the
    /// product while it is in cache; the other forms, and adapters under an activation, in a
    /// pass after it.
    pub fn forward_host_activated(
        &self,
        x: &[f32],
        rows: usize,
        spans: &[AdapterSpan],
        activation: Option<Activation>,
    ) -> candle_core::Result<Vec<f32>> {
        let bias = self.host_bias()?;
        let epilogue = kernels::Epilogue {
            bias: bias.as_deref(),
            activation,
            // In a bfloat16 plan what reads an activation is a bfloat16 product.
            reduced: matches!(self.weight, Weight::Bf16(_)),
        };
        // The adapters' updates are added after the product: under an activation they must
        // come before it, so the epilogue cannot take it.
        let fused = self.lora.is_none() || activation.is_none();
        let (mut out, applied) = match &self.weight {
            Weight::F32(packed) if fused => (packed.matmul_with(x, rows, epilogue), true),
            Weight::Bf16(packed) if fused => (packed.matmul_with(x, rows, epilogue), true),
            _ => (self.forward_host(x, rows)?, false),
        };
        if let Some(lora) = &self.lora {
            lora.add_host(x, &mut out, spans)?;
        }
        if !applied {
            let n = self.out_features()?;
            kernels::bias_activation(&mut out, n, epilogue.bias, activation);
        }
        Ok(out)
    }

    /// `x · Wᵀ` on the fused path (`x` is `rows x in_features`); the bias is left to the pass
    /// that follows.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        match &self.weight {
            Weight::F32(packed) => Ok(packed.matmul(x, rows)),
            Weight::Bf16(packed) => Ok(packed.matmul(x, rows)),
            Weight::Int8(layer) => layer.matmul(x, rows),
            Weight::Candle(w) => {
                with_transposed(w, |weight, k, n| kernels::matmul(x, rows, k, weight, n))
            }
        }
    }

    pub fn host_bias(&self) -> candle_core::Result<Option<HostSlice<'_>>> {
        self.bias.as_ref().map(HostSlice::of).transpose()
    }
}

/// A LayerNorm's gain and bias as host slices, for the fused path.
pub fn host_norm(norm: &LayerNorm) -> candle_core::Result<(HostSlice<'_>, HostSlice<'_>)> {
    let Some(beta) = norm.bias() else {
        candle_core::bail!("LayerNorm without a bias")
    };
    Ok((HostSlice::of(norm.weight())?, HostSlice::of(beta)?))
}

/// Calls `f` with a host float32 `[out, in]` weight as its `k x n` (`in x out`) row-major
/// transpose. Free for the weights `Dense::load` keeps on the CPU, which are transposed in memory.
fn with_transposed<T>(
    weight: &Tensor,
    f: impl FnOnce(&[f32], usize, usize) -> T,
) -> candle_core::Result<T> {
    let (n, k) = weight.dims2()?;
    let transposed = weight.t()?.contiguous()?;
    let host = HostSlice::of(&transposed)?;
    Ok(f(&host, k, n))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    fn layer(weight: Weight, bias: &Tensor) -> Dense {
        Dense {
            weight,
            bias: Some(bias.clone()),
            lora: None,
        }
    }

    /// Every form a weight can take gives the product candle's Linear gives: the packed kernel
    /// (AVX-512 CPUs), the bfloat16 kernel, and gemm on the transposed weight, the float32 path
    /// of CPUs without AVX-512, which this machine would otherwise never run.
    #[test]
    fn every_weight_form_computes_the_linear_product() -> candle_core::Result<()> {
        let (rows, k, n) = (11, 48, 40);
        let values = |len: usize, seed: usize| -> Vec<f32> {
            (0..len)
                .map(|i| ((i * seed) % 29) as f32 / 14.0 - 1.0)
                .collect()
        };
        let weight = Tensor::from_vec(values(n * k, 31), (n, k), &Device::Cpu)?;
        let bias = Tensor::from_vec(values(n, 7), n, &Device::Cpu)?;
        let x = values(rows * k, 17);
        let want = Linear::new(weight.clone(), Some(bias.clone()))
            .forward(&Tensor::from_vec(x.clone(), (rows, k), &Device::Cpu)?)?
            .broadcast_sub(&bias)?
            .flatten_all()?
            .to_vec1::<f32>()?;

        let transposed = weight.t()?.contiguous()?.t()?;
        let mut forms = vec![("gemm", layer(Weight::Candle(transposed), &bias))];
        if PackedF32::available() {
            let linear = Linear::new(weight.clone(), None);
            forms.push(("packed f32", Dense::load(linear, Some(FusedProducts::F32))?));
        }
        if kernels::bf16::available() {
            let linear = Linear::new(weight.clone(), None);
            forms.push(("bf16", Dense::load(linear, Some(FusedProducts::Bf16))?));
        }
        if kernels::int8::available() {
            let linear = Linear::new(weight.clone(), None);
            forms.push(("int8", Dense::load(linear, Some(FusedProducts::Int8))?));
        }
        for (name, dense) in &forms {
            assert_eq!(dense.out_features()?, n, "{name}");
            // The bias is left to the pass after the product.
            let got = dense.forward_host(&x, rows)?;
            let tolerance = match *name {
                "bf16" => 2e-2,
                "int8" => 5e-2,
                _ => 1e-5,
            };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= tolerance * w.abs().max(1.0),
                    "{name}: {g} vs {w}"
                );
            }
        }
        Ok(())
    }
}

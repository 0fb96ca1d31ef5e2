//! A Linear layer that also serves the fused CPU path, in float32 or bfloat16.

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use super::lora::{AdapterSpan, LinearLora};
use crate::kernels::{self, HostSlice, PackedBf16, PackedF32};

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
}

pub struct Dense {
    weight: Weight,
    bias: Option<Tensor>,
    /// Per-task low-rank updates (jina-embeddings-v3), applied on top of the base product.
    lora: Option<LinearLora>,
}

impl Dense {
    pub fn new(linear: Linear) -> candle_core::Result<Self> {
        let bias = linear.bias().cloned();
        let weight = linear.weight();
        let weight = if !kernels::on_cpu_f32(weight) {
            Weight::Candle(weight.clone())
        } else if PackedF32::available() {
            Weight::F32(with_transposed(weight, PackedF32::pack)?)
        } else {
            Weight::Candle(weight.t()?.contiguous()?.t()?)
        };
        Ok(Self {
            weight,
            bias,
            lora: None,
        })
    }

    pub fn with_lora(mut self, lora: LinearLora) -> Self {
        self.lora = Some(lora);
        self
    }

    pub fn out_features(&self) -> candle_core::Result<usize> {
        match &self.weight {
            Weight::Candle(w) => w.dim(0),
            Weight::F32(p) => Ok(p.n()),
            Weight::Bf16(p) => Ok(p.n()),
        }
    }

    /// Whether the layer runs on the fused CPU path (float32 in host memory).
    pub fn on_host(&self) -> bool {
        match &self.weight {
            Weight::Candle(w) => kernels::on_cpu_f32(w),
            Weight::F32(_) | Weight::Bf16(_) => true,
        }
    }

    /// The weight as candle's `[out, in]` tensor. Packed layers rebuild it: only the candle
    /// path on a host model (the reference the fused path is tested against) needs that.
    fn candle_weight(&self) -> candle_core::Result<Tensor> {
        let (k, n, transposed) = match &self.weight {
            Weight::Candle(w) => return Ok(w.clone()),
            Weight::F32(p) => (p.k(), p.n(), p.unpack()),
            Weight::Bf16(p) => (p.k(), p.n(), p.unpack()),
        };
        Tensor::from_vec(transposed, (k, n), &candle_core::Device::Cpu)?.t()
    }

    fn linear(&self) -> candle_core::Result<Linear> {
        Ok(Linear::new(self.candle_weight()?, self.bias.clone()))
    }

    /// `x · Wᵀ + b`, each batch row with its task adapter's update (`[batch, seq, in]` input).
    pub fn forward_adapted(
        &self,
        x: &Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let out = self.linear()?.forward(x)?;
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

    /// Packs the weight for the bfloat16 kernel (CPU float32 models only).
    pub fn use_bf16(&mut self) -> candle_core::Result<()> {
        let packed = match &self.weight {
            Weight::Bf16(_) => return Ok(()),
            Weight::F32(p) => PackedBf16::pack(&p.unpack(), p.k(), p.n()),
            Weight::Candle(w) => with_transposed(w, PackedBf16::pack)?,
        };
        self.weight = Weight::Bf16(packed);
        Ok(())
    }

    /// `x · Wᵀ` on the fused path (`x` is `rows x in_features`); the bias is left to the pass
    /// that follows.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        match &self.weight {
            Weight::F32(packed) => Ok(packed.matmul(x, rows)),
            Weight::Bf16(packed) => Ok(packed.matmul(x, rows)),
            Weight::Candle(w) => {
                with_transposed(w, |weight, k, n| kernels::matmul(x, rows, k, weight, n))
            }
        }
    }

    pub fn host_bias(&self) -> candle_core::Result<Option<HostSlice<'_>>> {
        self.bias.as_ref().map(HostSlice::of).transpose()
    }
}

/// Calls `f` with a host float32 `[out, in]` weight as its `k x n` (`in x out`) row-major
/// transpose. Free for the weights `Dense::new` keeps on the CPU, which are transposed in memory.
fn with_transposed<T>(
    weight: &Tensor,
    f: impl FnOnce(&[f32], usize, usize) -> T,
) -> candle_core::Result<T> {
    let (n, k) = weight.dims2()?;
    let transposed = weight.t()?.contiguous()?;
    let host = HostSlice::of(&transposed)?;
    Ok(f(&host, k, n))
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear()?.forward(x)
    }
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
            forms.push(("packed f32", Dense::new(Linear::new(weight.clone(), None))?));
            let mut bf16 = Dense::new(Linear::new(weight.clone(), None))?;
            if kernels::bf16::available() {
                bf16.use_bf16()?;
                forms.push(("bf16", bf16));
            }
        }
        for (name, dense) in &forms {
            assert_eq!(dense.out_features()?, n, "{name}");
            assert!(dense.on_host(), "{name}");
            // The bias is left to the pass after the product.
            let got = dense.forward_host(&x, rows)?;
            let tolerance = if *name == "bf16" { 2e-2 } else { 1e-5 };
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= tolerance * w.abs().max(1.0),
                    "{name}: {g} vs {w}"
                );
            }
            // The candle path rebuilds the weight from whatever form holds it.
            if *name != "bf16" {
                let rebuilt = dense.candle_weight()?.flatten_all()?.to_vec1::<f32>()?;
                assert_eq!(rebuilt, weight.flatten_all()?.to_vec1::<f32>()?, "{name}");
            }
        }
        Ok(())
    }
}

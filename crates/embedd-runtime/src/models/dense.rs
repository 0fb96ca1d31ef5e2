//! A Linear layer that also serves the fused CPU path, in float32 or bfloat16.

use candle_core::{Module, Tensor};
use candle_nn::Linear;

use super::lora::{AdapterSpan, LinearLora};
use crate::kernels::{self, HostSlice, PackedBf16};

pub struct Dense {
    /// On the CPU in float32 the weight is stored transposed in memory (the same tensor to
    /// candle), so gemm reads it in place instead of repacking it on every call.
    linear: Linear,
    /// The weight rounded to bfloat16 and packed, when the model runs in reduced precision.
    bf16: Option<PackedBf16>,
    /// Per-task low-rank updates (jina-embeddings-v3), applied on top of the base product.
    lora: Option<LinearLora>,
}

impl Dense {
    pub fn new(linear: Linear) -> candle_core::Result<Self> {
        let linear = if kernels::on_cpu_f32(linear.weight()) {
            let weight = linear.weight().t()?.contiguous()?.t()?;
            Linear::new(weight, linear.bias().cloned())
        } else {
            linear
        };
        Ok(Self {
            linear,
            bf16: None,
            lora: None,
        })
    }

    pub fn with_lora(mut self, lora: LinearLora) -> Self {
        self.lora = Some(lora);
        self
    }

    /// `x · Wᵀ + b`, each batch row with its task adapter's update (`[batch, seq, in]` input).
    pub fn forward_adapted(
        &self,
        x: &Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let out = self.linear.forward(x)?;
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

    pub fn weight(&self) -> &Tensor {
        self.linear.weight()
    }

    /// Packs the weight for the bfloat16 kernel (CPU float32 models only).
    pub fn use_bf16(&mut self) -> candle_core::Result<()> {
        let (n, k) = self.weight().dims2()?;
        let transposed = self.weight().t()?;
        let packed = PackedBf16::pack(&HostSlice::of(&transposed)?, k, n);
        self.bf16 = Some(packed);
        Ok(())
    }

    /// `x · Wᵀ` on the fused path (`x` is `rows x in_features`); the bias is left to the pass
    /// that follows.
    pub fn forward_host(&self, x: &[f32], rows: usize) -> candle_core::Result<Vec<f32>> {
        if let Some(packed) = &self.bf16 {
            return Ok(packed.matmul(x, rows));
        }
        let (n, k) = self.weight().dims2()?;
        let transposed = self.weight().t()?;
        let weight = HostSlice::of(&transposed)?;
        Ok(kernels::matmul(x, rows, k, &weight, n))
    }

    pub fn host_bias(&self) -> candle_core::Result<Option<HostSlice<'_>>> {
        self.linear.bias().map(HostSlice::of).transpose()
    }
}

impl Module for Dense {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.linear.forward(x)
    }
}

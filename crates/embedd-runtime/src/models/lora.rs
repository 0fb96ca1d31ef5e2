//! Per-task LoRA adapters (jina-embeddings-v3): task `t` adds a rank-`r` update to a layer's
//! weight. The update is applied at run time as two thin products, so one copy of the base
//! weights serves every task, and rows of one batch may each use a different task.
//!
//! Checkpoints store them as torch parametrizations beside the base weight
//! (`<layer>.parametrizations.weight.original`, `...weight.0.lora_A`, `...weight.0.lora_B`),
//! the task index first.

use candle_core::{Tensor, D};
use candle_nn::VarBuilder;

use crate::kernels::{self, HostSlice};

/// The adapters' sizes, from `config.json` (`lora_adaptations`, `lora_rank`, `lora_alpha`).
#[derive(Debug, Clone, Copy)]
pub struct LoraShape {
    pub tasks: usize,
    pub rank: usize,
    /// `lora_alpha / lora_rank`.
    pub scaling: f64,
}

pub use crate::batch::AdapterSpan;

/// A Linear's adapters: with task `t`, `W` becomes `W + scaling · Bₜ · Aₜ`.
pub struct LinearLora {
    /// `[tasks, rank, in]`.
    a: Tensor,
    /// `[tasks, rank, out]`: Bₜ transposed, so both products read rows.
    b_t: Tensor,
    scaling: f64,
}

impl LinearLora {
    /// `vb` points at `parametrizations.weight.0`.
    pub fn load(
        vb: VarBuilder,
        shape: LoraShape,
        in_features: usize,
        out_features: usize,
    ) -> candle_core::Result<Self> {
        let a = vb.get((shape.tasks, shape.rank, in_features), "lora_A")?;
        let b = vb.get((shape.tasks, out_features, shape.rank), "lora_B")?;
        Ok(Self {
            a,
            b_t: b.transpose(1, 2)?.contiguous()?,
            scaling: shape.scaling,
        })
    }

    /// Adds each row's update to `out` (`[batch, seq, out]`) for `x` (`[batch, seq, in]`).
    pub fn add(
        &self,
        x: &Tensor,
        out: Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        add_per_row(out, adapters, self.scaling, |i, task| {
            let low = x.get(i)?.matmul(&self.a.get(task)?.t()?)?;
            low.matmul(&self.b_t.get(task)?)
        })
    }

    /// The fused path: adds the updates to packed rows `out` (`rows x out`) for `x` (`rows x in`).
    pub fn add_host(
        &self,
        x: &[f32],
        out: &mut [f32],
        spans: &[AdapterSpan],
    ) -> candle_core::Result<()> {
        let (_, _, k) = self.a.dims3()?;
        let n = self.b_t.dim(D::Minus1)?;
        for (rows, task) in spans {
            let (a, b_t) = (self.a.get(*task)?, self.b_t.get(*task)?);
            kernels::low_rank_update(
                &x[rows.start * k..rows.end * k],
                k,
                &HostSlice::of(&a)?,
                &HostSlice::of(&b_t)?,
                self.scaling as f32,
                &mut out[rows.start * n..rows.end * n],
            );
        }
        Ok(())
    }
}

/// An Embedding's adapters: with task `t`, the table becomes `E + scaling · Aₜ · Bₜ`, so token
/// `i` gains `scaling · Aₜ[i] · Bₜ`.
pub struct EmbeddingLora {
    /// `[tasks, vocab, rank]`.
    a: Tensor,
    /// `[tasks, rank, dim]`.
    b: Tensor,
    scaling: f64,
}

impl EmbeddingLora {
    /// `vb` points at `parametrizations.weight.0`.
    pub fn load(
        vb: VarBuilder,
        shape: LoraShape,
        rows: usize,
        dim: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            a: vb.get((shape.tasks, rows, shape.rank), "lora_A")?,
            b: vb.get((shape.tasks, shape.rank, dim), "lora_B")?,
            scaling: shape.scaling,
        })
    }

    /// Adds each row's update to the looked-up vectors `out` (`[batch, seq, dim]`) of `ids`.
    pub fn add(
        &self,
        ids: &Tensor,
        out: Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        add_per_row(out, adapters, self.scaling, |i, task| {
            let low = self.a.get(task)?.index_select(&ids.get(i)?, 0)?;
            low.matmul(&self.b.get(task)?)
        })
    }
}

/// `out[i] += scaling · update(i, task)` for each batch row `i` that has a task.
fn add_per_row(
    out: Tensor,
    adapters: &[Option<usize>],
    scaling: f64,
    update: impl Fn(usize, usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    if adapters.iter().all(Option::is_none) {
        return Ok(out);
    }
    let rows = adapters
        .iter()
        .enumerate()
        .map(|(i, adapter)| {
            let row = out.get(i)?;
            match adapter {
                Some(task) => row + (update(i, *task)? * scaling)?,
                None => Ok(row),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Tensor::stack(&rows, 0)
}

/// Where a parametrized weight keeps its adapters, if it has them.
pub fn adapters_of<'a>(vb: &VarBuilder<'a>) -> Option<VarBuilder<'a>> {
    let adapters = vb.pp("parametrizations.weight.0");
    adapters.contains_tensor("lora_A").then_some(adapters)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    fn shape() -> LoraShape {
        LoraShape {
            tasks: 2,
            rank: 3,
            scaling: 0.5,
        }
    }

    /// `lora_A` and `lora_B` as a checkpoint's `parametrizations.weight.0` holds them.
    fn adapter_weights(a: &Tensor, b: &Tensor) -> VarBuilder<'static> {
        let tensors = [
            ("lora_A".to_string(), a.clone()),
            ("lora_B".to_string(), b.clone()),
        ];
        VarBuilder::from_tensors(tensors.into(), DType::F32, &Device::Cpu)
    }

    fn randn(dims: &[usize]) -> Tensor {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu).unwrap()
    }

    /// The update as the merged weight `W + s·B·A` would give it, for one task.
    #[test]
    fn linear_update_equals_the_merged_weight_on_both_paths() {
        let (k, n) = (5, 4);
        let (a, b) = (randn(&[2, 3, k]), randn(&[2, n, 3]));
        let vb = adapter_weights(&a, &b);
        let lora = LinearLora::load(vb, shape(), k, n).unwrap();
        let x = randn(&[2, 3, k]);
        let zeros = Tensor::zeros((2, 3, n), DType::F32, &Device::Cpu).unwrap();
        let got = lora.add(&x, zeros, &[None, Some(1)]).unwrap();
        let merged = (b.get(1).unwrap().matmul(&a.get(1).unwrap()).unwrap() * 0.5).unwrap();
        let want = x.get(1).unwrap().matmul(&merged.t().unwrap()).unwrap();
        let diff = (got.get(1).unwrap() - &want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
        assert_eq!(
            got.get(0)
                .unwrap()
                .abs()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );

        // Packed rows: sequence 1's three rows follow sequence 0's.
        let packed = x
            .flatten_to(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let mut out = vec![0f32; 6 * n];
        lora.add_host(&packed, &mut out, &[(3..6, 1)]).unwrap();
        let want = want.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(out[..3 * n].iter().all(|v| *v == 0.0));
        for (g, w) in out[3 * n..].iter().zip(&want) {
            assert!((g - w).abs() < 1e-5, "{g} vs {w}");
        }
    }

    #[test]
    fn embedding_update_equals_the_merged_table() {
        let (vocab, dim) = (7, 4);
        let (a, b) = (randn(&[2, vocab, 3]), randn(&[2, 3, dim]));
        let vb = adapter_weights(&a, &b);
        let lora = EmbeddingLora::load(vb, shape(), vocab, dim).unwrap();
        let ids = Tensor::new(&[[6u32, 0, 3]], &Device::Cpu).unwrap();
        let zeros = Tensor::zeros((1, 3, dim), DType::F32, &Device::Cpu).unwrap();
        let got = lora.add(&ids, zeros, &[Some(0)]).unwrap();
        let merged = (a.get(0).unwrap().matmul(&b.get(0).unwrap()).unwrap() * 0.5).unwrap();
        let want = merged.index_select(&ids.get(0).unwrap(), 0).unwrap();
        let diff = (got.get(0).unwrap() - want).unwrap().abs().unwrap();
        assert!(diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5);
    }
}

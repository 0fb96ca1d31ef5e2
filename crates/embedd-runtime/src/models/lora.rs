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

/// The parts of `spans` inside `rows`, numbered from `rows.start`: a row chunk's adapters.
pub fn spans_within(spans: &[AdapterSpan], rows: std::ops::Range<usize>) -> Vec<AdapterSpan> {
    spans
        .iter()
        .filter_map(|(span, task)| {
            let (start, end) = (span.start.max(rows.start), span.end.min(rows.end));
            (start < end).then(|| ((start - rows.start)..(end - rows.start), *task))
        })
        .collect()
}

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

    /// Adapters already stacked: `a` `[tasks, rank, in]`, `b_t` `[tasks, rank, out]`.
    pub fn from_stacked(a: Tensor, b_t: Tensor, scaling: f64) -> Self {
        Self { a, b_t, scaling }
    }

    /// Adds each row's update to `out` (`[batch, seq, out]`) for `x` (`[batch, seq, in]`).
    pub fn add(
        &self,
        x: &Tensor,
        out: Tensor,
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let (b, l, k) = x.dims3()?;
        let rows = x.contiguous()?.reshape((b * l, k))?;
        add_by_task(out, adapters, self.scaling, |task| {
            let low = rows.matmul(&self.a.get(task)?.t()?)?;
            let update = low.matmul(&self.b_t.get(task)?)?;
            let n = update.dim(D::Minus1)?;
            update.reshape((b, l, n))
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
        let (b, l) = ids.dims2()?;
        let flat = ids.flatten_all()?;
        add_by_task(out, adapters, self.scaling, |task| {
            let low = self.a.get(task)?.index_select(&flat, 0)?;
            let update = low.matmul(&self.b.get(task)?)?;
            let n = update.dim(D::Minus1)?;
            update.reshape((b, l, n))
        })
    }
}

/// `out[i] += scaling · update(task)[i]` for each batch row `i` whose task is `task`: one
/// batched update per task in the batch (not per row: on a GPU each row's products would be
/// their own kernel launches), masked to that task's rows where the batch mixes tasks.
fn add_by_task(
    mut out: Tensor,
    adapters: &[Option<usize>],
    scaling: f64,
    update: impl Fn(usize) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let mut tasks: Vec<usize> = adapters.iter().flatten().copied().collect();
    tasks.sort_unstable();
    tasks.dedup();
    for task in tasks {
        let delta = (update(task)? * scaling)?;
        out = if adapters.iter().all(|a| *a == Some(task)) {
            (out + delta)?
        } else {
            let mask: Vec<f32> = adapters
                .iter()
                .map(|a| if *a == Some(task) { 1.0 } else { 0.0 })
                .collect();
            let mask = Tensor::from_vec(mask, (adapters.len(), 1, 1), out.device())?
                .to_dtype(out.dtype())?;
            (out + delta.broadcast_mul(&mask)?)?
        };
    }
    Ok(out)
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

    /// One batch whose rows use task 1, no task and task 0: each row gets its own task's update.
    #[test]
    fn a_batch_mixing_tasks_gives_each_row_its_own_update() {
        let (k, n) = (5, 4);
        let (a, b) = (randn(&[2, 3, k]), randn(&[2, n, 3]));
        let lora = LinearLora::load(adapter_weights(&a, &b), shape(), k, n).unwrap();
        let x = randn(&[3, 2, k]);
        let zeros = Tensor::zeros((3, 2, n), DType::F32, &Device::Cpu).unwrap();
        let got = lora.add(&x, zeros, &[Some(1), None, Some(0)]).unwrap();
        for (row, task) in [(0, Some(1)), (1, None), (2, Some(0))] {
            let want = match task {
                Some(t) => {
                    let merged =
                        (b.get(t).unwrap().matmul(&a.get(t).unwrap()).unwrap() * 0.5).unwrap();
                    x.get(row).unwrap().matmul(&merged.t().unwrap()).unwrap()
                }
                None => Tensor::zeros((2, n), DType::F32, &Device::Cpu).unwrap(),
            };
            let diff = (got.get(row).unwrap() - want).unwrap().abs().unwrap();
            assert!(
                diff.max_all().unwrap().to_scalar::<f32>().unwrap() < 1e-5,
                "row {row}"
            );
        }
    }

    #[test]
    fn spans_within_a_chunk_are_cut_and_renumbered() {
        let spans = vec![(0..3, 1), (3..10, 0), (12..14, 2)];
        assert_eq!(spans_within(&spans, 2..12), vec![(0..1, 1), (1..8, 0)]);
        assert_eq!(spans_within(&spans, 10..12), vec![]);
        assert_eq!(spans_within(&spans, 13..20), vec![(0..1, 2)]);
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

//! ColBERT's token projection: each token vector through `linear` (no bias), L2-normalized.

use candle_core::{DType, Module, Tensor};
use candle_nn::Linear;

use crate::batch::Hidden;

pub struct ColbertProjection {
    linear: Linear,
    dimensions: usize,
}

impl ColbertProjection {
    /// `weight` is `[dimensions, hidden]`.
    pub fn new(weight: Tensor) -> candle_core::Result<Self> {
        let dimensions = weight.dim(0)?;
        Ok(Self {
            linear: Linear::new(weight, None),
            dimensions,
        })
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    /// Per sequence, the normalized projection of each token whose `keep` flag is set.
    pub fn project(
        &self,
        hidden: &Hidden,
        keep: &[&[bool]],
    ) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
        let projected: Vec<Vec<f32>> = if hidden.states.dim(0)? == 0 {
            Vec::new()
        } else {
            self.linear
                .forward(&hidden.states)?
                .to_dtype(DType::F32)?
                .to_vec2()?
        };
        Ok((0..hidden.len())
            .map(|i| {
                projected[hidden.rows(i)]
                    .iter()
                    .zip(keep[i])
                    .filter(|(_, keep)| **keep)
                    .map(|(row, _)| normalized(row.clone()))
                    .collect()
            })
            .collect())
    }
}

/// `torch.nn.functional.normalize`: x / max(||x||, 1e-12).
fn normalized(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

//! What the image towers (CLIP's ViT, EVA02) share: the patch convolution as one product over
//! patch rows, and an image batch's tokens packed for the fused path.

use candle_core::Tensor;
use candle_nn::{Linear, VarBuilder};

use super::Dense;
use crate::kernels::HostSlice;
use crate::plan::FusedProducts;

/// A ViT's patch embedding: a convolution whose stride is its kernel, which is a product of each
/// patch's pixels with the kernel, so both executors run it as a [`Dense`] over patch rows.
pub(crate) struct PatchEmbedding {
    dense: Dense,
    patch: usize,
    grid: usize,
}

impl PatchEmbedding {
    /// `vb` at the convolution: `weight` `[width, channels, patch, patch]`, `bias` if `biased`.
    pub(crate) fn load(
        vb: VarBuilder,
        channels: usize,
        width: usize,
        patch: usize,
        grid: usize,
        biased: bool,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let weight = vb
            .get((width, channels, patch, patch), "weight")?
            .reshape((width, channels * patch * patch))?;
        let bias = biased.then(|| vb.get(width, "bias")).transpose()?;
        Ok(Self {
            dense: Dense::load(Linear::new(weight, bias), fused)?,
            patch,
            grid,
        })
    }

    /// `[n, channels, side, side]` pixels as `[n, grid², channels · patch²]` rows, each patch in
    /// the kernel's (channel, row, column) order. Pixels past the last whole patch are dropped,
    /// as the convolution drops them (jina-clip-v2: 512 px in 14-pixel patches).
    fn rows(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        let (n, channels, _, _) = pixels.dims4()?;
        let (g, p) = (self.grid, self.patch);
        pixels
            .narrow(2, 0, g * p)?
            .narrow(3, 0, g * p)?
            .contiguous()?
            .reshape((n, channels, g, p, g, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((n, g * g, channels * p * p))
    }

    /// The graph's patch vectors, `[n, grid², width]`.
    pub(crate) fn forward(&self, pixels: &Tensor) -> candle_core::Result<Tensor> {
        self.dense.forward(&self.rows(pixels)?)
    }

    /// The fused path's patch vectors, `n · grid²` rows of `width`.
    pub(crate) fn forward_host(&self, pixels: &Tensor) -> candle_core::Result<Vec<f32>> {
        let rows = self.rows(pixels)?;
        let count = rows.dim(0)? * rows.dim(1)?;
        let host = HostSlice::of(&rows)?;
        self.dense.forward_host_activated(&host, count, &[], None)
    }
}

/// An image batch's tokens on the fused path: every image `tokens` rows long, the class token
/// first, packed image after image; every token attends to all of its image's.
pub(crate) struct ImageRows {
    pub offsets: Vec<usize>,
    pub keys: Vec<usize>,
    pub tokens: usize,
}

impl ImageRows {
    pub(crate) fn new(images: usize, tokens: usize) -> Self {
        Self {
            offsets: (0..=images).map(|i| i * tokens).collect(),
            keys: vec![tokens; images],
            tokens,
        }
    }

    pub(crate) fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Each image's rows: its class token's vector, then its patches', each plus its position's
    /// embedding (`positions` holds `tokens` rows of `width`).
    pub(crate) fn tokens(
        &self,
        class: &[f32],
        patches: &[f32],
        positions: &[f32],
    ) -> candle_core::Result<Vec<f32>> {
        let width = class.len();
        if positions.len() != self.tokens * width
            || patches.len() != (self.total() - self.offsets.len() + 1) * width
        {
            candle_core::bail!("image tokens do not match the position table");
        }
        let mut x = Vec::with_capacity(self.total() * width);
        for image in patches.chunks_exact((self.tokens - 1) * width) {
            x.extend(class.iter().zip(&positions[..width]).map(|(c, p)| c + p));
            x.extend(image.iter().zip(&positions[width..]).map(|(v, p)| v + p));
        }
        Ok(x)
    }

    /// The class token's row of every image.
    pub(crate) fn class_rows(&self, x: &[f32], width: usize) -> Vec<f32> {
        self.offsets[..self.offsets.len() - 1]
            .iter()
            .flat_map(|&first| x[first * width..(first + 1) * width].iter().copied())
            .collect()
    }
}

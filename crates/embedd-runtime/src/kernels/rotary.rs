//! Rotary position embeddings (RoPE, Su et al. 2021) over packed sequences.

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::{rows_per_task, simd_function};

/// cos and sin of `position · θᵢ` for positions `0..len`, `θᵢ = base^(-2i/head_dim)`, built per
/// batch for the longest input in it (no table of the model's whole 8,192-token range).
pub struct RotaryTable {
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

impl RotaryTable {
    pub fn new(head_dim: usize, base: f64, len: usize) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| base.powf(-((2 * i) as f64) / head_dim as f64))
            .collect();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for position in 0..len {
            for f in &inv_freq {
                let (s, c) = (position as f64 * f).sin_cos();
                cos.push(c as f32);
                sin.push(s as f32);
            }
        }
        Self { cos, sin, half }
    }

    /// A table of given angles: `angles` holds `head_dim / 2` per position, position after
    /// position (2D schemes such as EVA's, where a channel pair's angle is not `position · θᵢ`).
    pub fn from_angles(head_dim: usize, angles: &[f64]) -> Self {
        let half = head_dim / 2;
        assert!(
            half > 0 && angles.len().is_multiple_of(half),
            "angles are not whole rows of {half}"
        );
        let (sin, cos) = angles
            .iter()
            .map(|a| {
                let (s, c) = a.sin_cos();
                (s as f32, c as f32)
            })
            .unzip();
        Self { cos, sin, half }
    }

    /// The table as `[len, head_dim / 2]` tensors, as `candle_nn::rotary_emb::rope` takes them.
    pub fn tensors(&self, device: &Device, dtype: DType) -> candle_core::Result<(Tensor, Tensor)> {
        let len = self.cos.len() / self.half.max(1);
        let cos = Tensor::from_slice(&self.cos, (len, self.half), device)?.to_dtype(dtype)?;
        let sin = Tensor::from_slice(&self.sin, (len, self.half), device)?.to_dtype(dtype)?;
        Ok((cos, sin))
    }

    fn at(&self, position: usize) -> (&[f32], &[f32]) {
        let range = position * self.half..(position + 1) * self.half;
        (&self.cos[range.clone()], &self.sin[range])
    }
}

simd_function! {
    fn rotate_row(row: &mut [f32], cos: &[f32], sin: &[f32]) {
        for head in row.chunks_exact_mut(2 * cos.len()) {
            let (first, second) = head.split_at_mut(cos.len());
            for (((a, b), c), s) in first.iter_mut().zip(second.iter_mut()).zip(cos).zip(sin) {
                let (x1, x2) = (*a, *b);
                *a = x1 * c - x2 * s;
                *b = x2 * c + x1 * s;
            }
        }
    }
}

/// Rotates the query and key parts of packed `[q | k | v]` rows (`heads` query heads and
/// `kv_heads` key and value heads of `head_dim`) in place, each row by its position in its own
/// sequence. Each head's first half turns against its second half (GPT-NeoX style, not
/// interleaved), as jina-embeddings-v3 and Qwen do.
pub fn rotary(
    qkv: &mut [f32],
    offsets: &[usize],
    (heads, kv_heads, head_dim): (usize, usize, usize),
    table: &RotaryTable,
) {
    let turned = (heads + kv_heads) * head_dim;
    let width = turned + kv_heads * head_dim;
    assert_eq!(
        table.half * 2,
        head_dim,
        "table built for another head size"
    );
    let per_task = rows_per_task(width);
    qkv.par_chunks_mut(per_task * width)
        .enumerate()
        .for_each(|(chunk, rows)| {
            for (i, row) in rows.chunks_exact_mut(width).enumerate() {
                let index = chunk * per_task + i;
                let sequence = offsets.partition_point(|&o| o <= index).saturating_sub(1);
                let (cos, sin) = table.at(index - offsets[sequence]);
                rotate_row(&mut row[..turned], cos, sin);
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_of_angles_is_the_table_of_their_positions() {
        let built = RotaryTable::new(4, 100.0, 3);
        let angles: Vec<f64> = (0..3).flat_map(|p| [p as f64, p as f64 * 0.1]).collect();
        let given = RotaryTable::from_angles(4, &angles);
        for (a, b) in built
            .cos
            .iter()
            .chain(&built.sin)
            .zip(given.cos.iter().chain(&given.sin))
        {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
    }

    #[test]
    fn rotates_each_half_pair_by_position_times_frequency() {
        // One head of size 4: pairs (0, 2) and (1, 3) turn by p·1 and p·base^(-1/2).
        let table = RotaryTable::new(4, 100.0, 3);
        let row = |v: f32| [v, 2.0 * v, 3.0 * v, 4.0 * v];
        // Two sequences: rows 0-1 are positions 0-1, row 2 is position 0 again.
        let mut qkv: Vec<f32> = [1.0f32, 1.0, 1.0]
            .iter()
            .flat_map(|&v| row(v).into_iter().chain(row(v)).chain(row(9.0)))
            .collect();
        rotary(&mut qkv, &[0, 2, 3], (1, 1, 4), &table);
        let turned = |p: f32| {
            let (a1, a2) = (p, p * 0.1);
            [
                a1.cos() - 3.0 * a1.sin(),
                2.0 * a2.cos() - 4.0 * a2.sin(),
                3.0 * a1.cos() + a1.sin(),
                4.0 * a2.cos() + 2.0 * a2.sin(),
            ]
        };
        for (r, p) in [(0usize, 0.0f32), (1, 1.0), (2, 0.0)] {
            let got = &qkv[r * 12..(r + 1) * 12];
            for part in 0..2 {
                for (g, w) in got[part * 4..part * 4 + 4].iter().zip(turned(p)) {
                    assert!((g - w).abs() < 1e-5, "row {r}: {g} vs {w}");
                }
            }
            assert_eq!(&got[8..], &row(9.0), "values are not rotated");
        }
    }
}

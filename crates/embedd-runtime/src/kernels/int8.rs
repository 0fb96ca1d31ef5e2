//! 8-bit integer products on AVX-512 VNNI, for `--dtype int8`.
//!
//! `vpdpbusd` multiplies four unsigned bytes by four signed bytes and adds the four products to
//! an int32 lane: four times the multiply-adds of an f32 FMA per instruction. Weights are
//! quantized once at load with a scale per output column and per group of 32 steps of `k`
//! (`w ≈ scale_gc · q`, `q` in -127..=127); inputs per row on every call, asymmetrically
//! (`x ≈ scale_r · (u - zero_r)`, `u` in 0..=255), the zero point's share
//! (`zero_r · Σ_k scale_gc · q`) taken back out per row and column. A few input channels that
//! calibration found to carry outliers ([`PackedI8::pack`]'s `outliers`) skip the bytes: their
//! products run in float32 in the kernel's epilogue.
//!
//! Why each part, on all-MiniLM-L6-v2 (lowest cosine to float32 over the parity fixture, torch
//! simulations of the same arithmetic): symmetric inputs and a scale per column reach 0.981;
//! asymmetric inputs 0.992 (the zero point spends all 256 steps on the row's own range, which
//! the feed-forward's mostly positive GELU outputs need); eight float32 outlier channels per
//! layer 0.9986 (a handful of channels after each LayerNorm run 10-50x the others and set every
//! row's scale); group scales on top 0.9992 (with the inputs right, the weights' rounding is
//! what is left: one scale per 1536-long column spends most of its steps on that column's
//! largest entry; groups of 64 reach 0.9991, of 128 0.9988).

use rayon::prelude::*;

use super::packed::{padded_width, tiled_product, unpad, Tile, LANES, STRIP};
use super::rows_per_task;
use super::Epilogue;

/// Quads of `k` per pass: a strip's weights for a pass (192 quads x 32 columns x 4 bytes, 24 KiB)
/// stay in L1 while the block's rows go by. A whole number of groups.
const PASS_QUADS: usize = 192;
/// Quads of `k` per weight group: 32 steps of `k` share a column's scale.
const GROUP_QUADS: usize = 8;
/// Rows per kernel call: each row holds two int32 sums for the group and two float32 sums
/// across groups, so four rows take 16 of the 32 vector registers.
const KERNEL_ROWS: usize = 4;

/// Whether this CPU runs the int8 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu_has_avx512() && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Where weight `(row, col)` lies in the packed bytes: per strip of 32 columns, per quad of
/// rows, two vectors of 16 lanes x 4 bytes.
fn position(quads: usize, row: usize, col: usize) -> usize {
    let (strip, within) = (col / STRIP, col % STRIP);
    let (vector, lane) = (within / LANES, within % LANES);
    (((strip * quads + row / 4) * 2 + vector) * LANES + lane) * 4 + row % 4
}

/// Symmetric 8-bit quantization of `values` with the scale that maps the largest magnitude to
/// 127: the scale and the rounded values.
fn quantize(values: impl Iterator<Item = f32> + Clone) -> (f32, impl Iterator<Item = i8>) {
    let max = values.clone().fold(0f32, |m, v| m.max(v.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let inv = 1.0 / scale;
    (
        scale,
        values.map(move |v| (v * inv).round().clamp(-127.0, 127.0) as i8),
    )
}

/// Quantizes each `k`-wide row of `rows` asymmetrically to unsigned bytes over
/// `[min(0, lo), max(0, hi)]` (zero stays exact): four bytes per u32 of `dst` (`k / 4` rounded
/// up per row; `dst` comes zeroed, so padding bytes are zero and meet zero weights), each row's
/// scale and zero point (`x ≈ scale · (u - zero)`). The `outliers` channels are taken out first:
/// their values go to `outlier_values` (`outlier_stride` per row) and they quantize as zero.
#[allow(clippy::too_many_arguments)]
fn quantize_rows(
    rows: &[f32],
    k: usize,
    outliers: &[usize],
    dst: &mut [u32],
    scales: &mut [f32],
    zeros: &mut [f32],
    outlier_values: &mut [f32],
    outlier_stride: usize,
) {
    let quads = k.div_ceil(4);
    let mut without_outliers = vec![0f32; if outliers.is_empty() { 0 } else { k }];
    let rows = rows.chunks_exact(k);
    let outputs = dst.chunks_exact_mut(quads).zip(scales).zip(zeros);
    let taken_out = outlier_values.chunks_exact_mut(outlier_stride);
    for ((row, ((dst, scale), zero)), taken_out) in rows.zip(outputs).zip(taken_out) {
        let row = if outliers.is_empty() {
            row
        } else {
            without_outliers.copy_from_slice(row);
            for (value, &channel) in taken_out.iter_mut().zip(outliers) {
                *value = std::mem::take(&mut without_outliers[channel]);
            }
            &without_outliers
        };
        (*scale, *zero) = quantize_row(row, dst);
    }
}

/// One row's bytes into `dst` (four per u32): its scale and zero point.
fn quantize_row(row: &[f32], dst: &mut [u32]) -> (f32, f32) {
    #[cfg(target_arch = "x86_64")]
    if super::cpu_has_avx512() {
        // SAFETY: the CPU has AVX-512 F, BW and VL.
        return unsafe { x86::quantize_row(row, dst) };
    }
    let lo = row.iter().fold(0f32, |m, &v| m.min(v));
    let hi = row.iter().fold(0f32, |m, &v| m.max(v));
    let (scale, inv, zero) = scale_and_zero(lo, hi);
    for (d, quad) in dst.iter_mut().zip(row.chunks(4)) {
        let mut bytes = [0u8; 4];
        for (b, &v) in bytes.iter_mut().zip(quad) {
            *b = quantize_value(v, inv, zero) as u8;
        }
        *d = u32::from_le_bytes(bytes);
    }
    (scale, zero)
}

/// The scale, its inverse and the zero point that map `[lo, hi]` (`lo <= 0 <= hi`) onto 0..=255.
fn scale_and_zero(lo: f32, hi: f32) -> (f32, f32, f32) {
    let scale = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
    let inv = 1.0 / scale;
    (scale, inv, (-lo * inv).round().clamp(0.0, 255.0))
}

/// `v`'s byte, as a float: rounded half to even, as the vector instructions round.
fn quantize_value(v: f32, inv: f32, zero: f32) -> f32 {
    (v * inv + zero).round_ties_even().clamp(0.0, 255.0)
}

/// A `k x n` weight (the transposed Linear weight) quantized per column and group of `k`, and
/// packed for [`PackedI8::matmul`]; its outlier input channels kept in float32.
pub struct PackedI8 {
    k: usize,
    n: usize,
    /// Per strip of 32 columns, per quad of `k`: two vectors of 16 lanes x 4 bytes. Outlier
    /// channels' bytes are zero.
    data: Vec<i8>,
    /// Groups of `k` ([`GROUP_QUADS`] quads each, the last one possibly short).
    groups: usize,
    /// Per strip, per group, per column of the strip: the weights' scale (padding columns 0).
    scales: Vec<f32>,
    /// Per column (padded to whole strips): `Σ_k scale · q`, what one unit of an input row's
    /// zero point adds to it.
    sums: Vec<f32>,
    /// The input channels multiplied in float32, ascending.
    outliers: Vec<usize>,
    /// Per strip, per outlier channel: its 32 columns' float32 weights.
    outlier_weights: Vec<f32>,
}

impl PackedI8 {
    /// Quantizes and packs `w` (`k x n`, row-major); the rows (input channels) in `outliers`
    /// stay float32.
    pub fn pack(w: &[f32], k: usize, n: usize, outliers: &[usize]) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let mut outliers = outliers.to_vec();
        outliers.sort_unstable();
        outliers.dedup();
        assert!(outliers.iter().all(|&c| c < k), "outlier channel past {k}");
        let mut is_outlier = vec![false; k];
        for &c in &outliers {
            is_outlier[c] = true;
        }
        let (quads, width) = (k.div_ceil(4), padded_width(n));
        let groups = quads.div_ceil(GROUP_QUADS);
        let group_len = 4 * GROUP_QUADS;
        let mut data = vec![0i8; width * quads * 4];
        let mut scales = vec![0f32; width * groups];
        let mut sums = vec![0f32; width];
        let mut outlier_weights = vec![0f32; width * outliers.len()];
        for col in 0..n {
            let (strip, within) = (col / STRIP, col % STRIP);
            let mut sum = 0f64;
            for group in 0..groups {
                let rows = group * group_len..k.min((group + 1) * group_len);
                let value = |row: usize| {
                    if is_outlier[row] {
                        0.0
                    } else {
                        w[row * n + col]
                    }
                };
                let (scale, q) = quantize(rows.clone().map(value));
                for (row, q) in rows.zip(q) {
                    data[position(quads, row, col)] = q;
                    sum += f64::from(q) * f64::from(scale);
                }
                scales[(strip * groups + group) * STRIP + within] = scale;
            }
            sums[col] = sum as f32;
            for (i, &channel) in outliers.iter().enumerate() {
                outlier_weights[(strip * outliers.len() + i) * STRIP + within] =
                    w[channel * n + col];
            }
        }
        Self {
            k,
            n,
            data,
            groups,
            scales,
            sums,
            outliers,
            outlier_weights,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The weight as the kernel multiplies it, as float32 in its `k x n` row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n, quads) = (self.k, self.n, self.k.div_ceil(4));
        let mut w = vec![0f32; k * n];
        for col in 0..n {
            let (strip, within) = (col / STRIP, col % STRIP);
            for row in 0..k {
                let group = row / (4 * GROUP_QUADS);
                let scale = self.scales[(strip * self.groups + group) * STRIP + within];
                w[row * n + col] = f32::from(self.data[position(quads, row, col)]) * scale;
            }
            for (i, &channel) in self.outliers.iter().enumerate() {
                w[channel * n + col] =
                    self.outlier_weights[(strip * self.outliers.len() + i) * STRIP + within];
            }
        }
        w
    }

    /// `x · w` for `x` of `m x k` (float32), each row of `x` (but its outlier channels)
    /// quantized to 8 bits with its own scale and zero point: `m x n` float32. Call only where
    /// [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "lhs is not {m} x {}", self.k);
        assert!(available(), "int8 matmul on a CPU without AVX-512 VNNI");
        let quads = self.k.div_ceil(4);
        let outliers = self.outliers.len();
        let outlier_stride = outliers.max(1);
        // Inputs as unsigned bytes, four per u32 (the value a kernel broadcasts), each row's
        // scale and zero point, and its outlier channels' values. A row's padding bytes meet
        // zero weights.
        let mut a = vec![0u32; m * quads];
        let mut row_scales = vec![0f32; m];
        let mut row_zeros = vec![0f32; m];
        let mut outlier_x = vec![0f32; m * outlier_stride];
        let task_rows = rows_per_task(self.k);
        a.par_chunks_mut(quads * task_rows)
            .zip(row_scales.par_chunks_mut(task_rows))
            .zip(row_zeros.par_chunks_mut(task_rows))
            .zip(outlier_x.par_chunks_mut(outlier_stride * task_rows))
            .zip(x.par_chunks(self.k * task_rows))
            .for_each(|((((dst, scales), zeros), taken_out), rows)| {
                quantize_rows(
                    rows,
                    self.k,
                    &self.outliers,
                    dst,
                    scales,
                    zeros,
                    taken_out,
                    outlier_stride,
                )
            });
        let stride = padded_width(self.n);
        let kernel = |tile: Tile, at: *mut f32| {
            let strip_len = quads * STRIP * 4;
            let strip = &self.data[tile.strip * strip_len..][..strip_len];
            let weights = &strip[tile.pass.start * STRIP * 4..tile.pass.end * STRIP * 4];
            let group_scales =
                &self.scales[tile.strip * self.groups * STRIP..][..self.groups * STRIP];
            let columns = tile.strip * STRIP..(tile.strip + 1) * STRIP;
            let sums = &self.sums[columns];
            let outlier_w =
                &self.outlier_weights[tile.strip * outliers * STRIP..][..outliers * STRIP];
            let strip = Strip {
                weights,
                group_scales,
                sums,
                outlier_weights: outlier_w,
                outliers,
            };
            for start in (0..tile.rows).step_by(KERNEL_ROWS) {
                let first = tile.first + start;
                let count = KERNEL_ROWS.min(tile.rows - start);
                let rows = first..first + count;
                let inputs = Inputs {
                    bytes: &a[first * quads..(first + count) * quads],
                    quads,
                    scales: &row_scales[rows.clone()],
                    zeros: &row_zeros[rows.clone()],
                    outliers: &outlier_x[first * outlier_stride..(first + count) * outlier_stride],
                    outlier_stride,
                };
                // SAFETY: `available()` was checked above; `at` is valid for the tile's rows
                // of 32 (see `tiled_product`), so for these `count` of them from `start`.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    let at = at.add(start * stride);
                    let pass = tile.pass.clone();
                    let accumulate = tile.accumulate;
                    match count {
                        4 => x86::strip_kernel::<4>(&inputs, &strip, pass, at, stride, accumulate),
                        3 => x86::strip_kernel::<3>(&inputs, &strip, pass, at, stride, accumulate),
                        2 => x86::strip_kernel::<2>(&inputs, &strip, pass, at, stride, accumulate),
                        _ => x86::strip_kernel::<1>(&inputs, &strip, pass, at, stride, accumulate),
                    }
                };
            }
        };
        // SAFETY: the kernel writes its whole tile on a first pass.
        let out =
            unsafe { tiled_product(m, self.n, quads, PASS_QUADS, Epilogue::default(), kernel) };
        unpad(out, m, self.n)
    }
}

/// A kernel call's rows: their quantized bytes and what turns the products back into floats.
struct Inputs<'a> {
    /// `quads` u32 per row.
    bytes: &'a [u32],
    quads: usize,
    scales: &'a [f32],
    zeros: &'a [f32],
    /// `outlier_stride` per row: the outlier channels' values.
    outliers: &'a [f32],
    outlier_stride: usize,
}

/// A kernel call's strip of 32 columns.
struct Strip<'a> {
    /// The pass's quads: two vectors of 16 lanes x 4 bytes each.
    weights: &'a [i8],
    /// Per group of the whole `k`: 32 scales.
    group_scales: &'a [f32],
    /// 32 columns' `Σ_k scale · q`.
    sums: &'a [f32],
    /// Per outlier channel: 32 float32 weights.
    outlier_weights: &'a [f32],
    outliers: usize,
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::x86::{start_sums, store_sums};
    use super::super::packed::LANES;
    use super::{Inputs, Strip, GROUP_QUADS};

    /// [`super::quantize_row`] on 16 values at a time.
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VL.
    #[target_feature(enable = "avx512f,avx512bw,avx512vl")]
    pub unsafe fn quantize_row(row: &[f32], dst: &mut [u32]) -> (f32, f32) {
        assert!(dst.len() * 4 >= row.len());
        let full = row.len() / LANES * LANES;
        let tail = row.len() - full;
        let tail_mask = ((1u32 << tail) - 1) as __mmask16;
        let (x, out) = (row.as_ptr(), dst.as_mut_ptr() as *mut u8);
        let (mut lo, mut hi) = (_mm512_setzero_ps(), _mm512_setzero_ps());
        for i in (0..full).step_by(LANES) {
            // SAFETY: i + 16 <= row.len().
            let v = unsafe { _mm512_loadu_ps(x.add(i)) };
            (lo, hi) = (_mm512_min_ps(lo, v), _mm512_max_ps(hi, v));
        }
        // SAFETY: the mask reads the row's last `tail` values only; masked lanes are zero,
        // which the range holds anyway.
        let last = unsafe { _mm512_maskz_loadu_ps(tail_mask, x.add(full)) };
        (lo, hi) = (_mm512_min_ps(lo, last), _mm512_max_ps(hi, last));
        let (scale, inv, zero) =
            super::scale_and_zero(_mm512_reduce_min_ps(lo), _mm512_reduce_max_ps(hi));
        let (inv, zero_v) = (_mm512_set1_ps(inv), _mm512_set1_ps(zero));
        for i in (0..full).step_by(LANES) {
            // SAFETY: as above; dst holds a byte per value.
            unsafe {
                let bytes = to_bytes(_mm512_loadu_ps(x.add(i)), inv, zero_v);
                _mm_storeu_si128(out.add(i) as *mut __m128i, bytes);
            }
        }
        if tail > 0 {
            // SAFETY: as above, `tail` bytes from `full`.
            unsafe {
                _mm_mask_storeu_epi8(
                    out.add(full) as *mut i8,
                    tail_mask,
                    to_bytes(last, inv, zero_v),
                )
            };
        }
        (scale, zero)
    }

    /// [`super::quantize_value`] of 16 values, as 16 bytes.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn to_bytes(v: __m512, inv: __m512, zero: __m512) -> __m128i {
        let shifted = _mm512_add_ps(_mm512_mul_ps(v, inv), zero);
        let rounded =
            _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(shifted);
        let clamped = _mm512_min_ps(
            _mm512_max_ps(rounded, _mm512_setzero_ps()),
            _mm512_set1_ps(255.0),
        );
        _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(clamped))
    }

    /// Quads `pass` of R rows times the same quads of one 32-column strip, in int32 per group
    /// of quads, each group's sums scaled by its columns' scales into float32; then scaled by
    /// the rows' scales and written to `out` (row stride `stride`) by the first pass, which
    /// also takes out the rows' zero points (`zero_r · Σ_k scale · q`) and adds the outlier
    /// channels' float32 products, and added to it by the later ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `out` must be valid for R rows of 32.
    #[target_feature(enable = "avx512f,avx512vnni")]
    pub unsafe fn strip_kernel<const R: usize>(
        rows: &Inputs,
        strip: &Strip,
        pass: std::ops::Range<usize>,
        out: *mut f32,
        stride: usize,
        accumulate: bool,
    ) {
        let quads = rows.quads;
        assert!(pass.end <= quads && rows.bytes.len() >= R * quads);
        assert!(strip.weights.len() >= pass.len() * 8 * LANES);
        assert!(strip.group_scales.len() >= quads.div_ceil(GROUP_QUADS) * 2 * LANES);
        assert!(rows.scales.len() >= R && rows.zeros.len() >= R && strip.sums.len() >= 2 * LANES);
        assert!(rows.outliers.len() >= R * rows.outlier_stride);
        assert!(rows.outlier_stride >= strip.outliers);
        assert!(strip.outlier_weights.len() >= strip.outliers * 2 * LANES);
        let (ap, bp) = (rows.bytes.as_ptr(), strip.weights.as_ptr());
        let mut scaled = [[_mm512_setzero_ps(); 2]; R];
        let mut group_start = pass.start;
        while group_start < pass.end {
            let group = group_start / GROUP_QUADS;
            let group_end = pass.end.min((group + 1) * GROUP_QUADS);
            let mut acc = [[_mm512_setzero_si512(); 2]; R];
            for q in group_start..group_end {
                let i = q - pass.start;
                // SAFETY: the weights hold the pass's quads, each 2 vectors x 16 lanes x 4
                // bytes, and the inputs R rows of `quads` (asserted).
                unsafe {
                    let b0 = _mm512_loadu_si512(bp.add(i * 8 * LANES) as *const _);
                    let b1 = _mm512_loadu_si512(bp.add(i * 8 * LANES + 4 * LANES) as *const _);
                    for (r, row) in acc.iter_mut().enumerate() {
                        let quad = _mm512_set1_epi32(*ap.add(r * quads + q) as i32);
                        row[0] = _mm512_dpbusd_epi32(row[0], quad, b0);
                        row[1] = _mm512_dpbusd_epi32(row[1], quad, b1);
                    }
                }
            }
            // SAFETY: the strip has 32 scales for every group of `k` (asserted).
            let scales = unsafe {
                let at = strip.group_scales.as_ptr().add(group * 2 * LANES);
                [_mm512_loadu_ps(at), _mm512_loadu_ps(at.add(LANES))]
            };
            for (sums, acc) in scaled.iter_mut().zip(&acc) {
                for v in 0..2 {
                    sums[v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[v]), scales[v], sums[v]);
                }
            }
            group_start = group_end;
        }
        // SAFETY: per the caller; the column and outlier slices hold 32 columns (asserted).
        unsafe {
            let mut sums = start_sums::<R>(out, stride, accumulate);
            let col_sums = [
                _mm512_loadu_ps(strip.sums.as_ptr()),
                _mm512_loadu_ps(strip.sums.as_ptr().add(LANES)),
            ];
            for (r, (row, scaled)) in sums.iter_mut().zip(&scaled).enumerate() {
                let row_scale = _mm512_set1_ps(rows.scales[r]);
                let row_zero = _mm512_set1_ps(rows.zeros[r]);
                for v in 0..2 {
                    let mut product = scaled[v];
                    if !accumulate {
                        product = _mm512_fnmadd_ps(row_zero, col_sums[v], product);
                    }
                    row[v] = _mm512_fmadd_ps(product, row_scale, row[v]);
                }
                if !accumulate {
                    let values = &rows.outliers[r * rows.outlier_stride..];
                    for (i, &x) in values[..strip.outliers].iter().enumerate() {
                        let x = _mm512_set1_ps(x);
                        let w = strip.outlier_weights.as_ptr().add(i * 2 * LANES);
                        row[0] = _mm512_fmadd_ps(x, _mm512_loadu_ps(w), row[0]);
                        row[1] = _mm512_fmadd_ps(x, _mm512_loadu_ps(w.add(LANES)), row[1]);
                    }
                }
            }
            store_sums(&sums, out, stride);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::packed::{test_products, TestProduct};
    use super::*;

    /// One row through [`quantize_rows`] (no outliers): its scale, zero point and `k` bytes.
    fn quantize_input(row: &[f32]) -> (f32, f32, Vec<u8>) {
        let k = row.len();
        let (mut dst, mut scale, mut zero) = (vec![0u32; k.div_ceil(4)], [0f32], [0f32]);
        quantize_rows(row, k, &[], &mut dst, &mut scale, &mut zero, &mut [0f32], 1);
        let bytes = dst.iter().flat_map(|q| q.to_le_bytes()).take(k).collect();
        (scale[0], zero[0], bytes)
    }

    /// A row as the kernel sees it: the outlier channels exact, the rest quantized.
    fn as_quantized(row: &[f32], outliers: &[usize]) -> Vec<f32> {
        let mut rest = row.to_vec();
        for &c in outliers {
            rest[c] = 0.0;
        }
        let (s, z, u) = quantize_input(&rest);
        let mut seen: Vec<f32> = u.into_iter().map(|u| (f32::from(u) - z) * s).collect();
        for &c in outliers {
            seen[c] = row[c];
        }
        seen
    }

    #[test]
    fn inputs_spend_all_256_steps_on_their_range_and_keep_zero_exact() {
        let (scale, zero, u) = quantize_input(&[-0.5, 2.0, 0.0, 1.0, 0.5]);
        assert_eq!((scale, zero), (2.5 / 255.0, 51.0));
        assert_eq!(u, vec![0, 255, 51, 153, 102]);
        // All positive: the range starts at zero. 17 values: a full vector and a tail.
        let row: Vec<f32> = (0..17).map(|i| i as f32 / 16.0).collect();
        let (scale, zero, u) = quantize_input(&row);
        assert_eq!((scale, zero), (1.0 / 255.0, 0.0));
        assert_eq!((u[4], u[16]), (64, 255));
        let (scale, zero, u) = quantize_input(&[0.0; 3]);
        assert_eq!((scale, zero, u), (1.0, 0.0, vec![0, 0, 0]));
    }

    #[test]
    fn outlier_channels_leave_the_row_and_do_not_set_its_scale() {
        let rows = [0.5f32, 40.0, -0.25, 1.0, 0.0, -30.0, 0.75, 0.1];
        let (mut dst, mut scales, mut zeros) = ([0u32; 4], [0f32; 2], [0f32; 2]);
        let mut taken = [0f32; 4];
        quantize_rows(
            &rows,
            4,
            &[1],
            &mut dst,
            &mut scales,
            &mut zeros,
            &mut taken,
            2,
        );
        assert_eq!([taken[0], taken[2]], [40.0, -30.0]);
        assert_eq!(scales, [1.25 / 255.0, 0.75 / 255.0]);
        // The outlier's own byte is the row's zero point: it adds nothing.
        assert_eq!(dst[0].to_le_bytes()[1] as f32, zeros[0]);
        assert_eq!(dst[1].to_le_bytes()[1] as f32, zeros[1]);
    }

    /// The vector form gives the scalar form's bytes, over every tail length.
    #[test]
    fn rows_quantize_the_same_in_vectors_and_scalars() {
        for k in [1usize, 5, 16, 17, 31, 33, 384] {
            let row: Vec<f32> = (0..k).map(|i| ((i * 29) % 41) as f32 / 7.0 - 2.5).collect();
            let mut got = vec![0u32; k.div_ceil(4)];
            let (scale, zero) = quantize_row(&row, &mut got);
            let lo = row.iter().fold(0f32, |m, &v| m.min(v));
            let hi = row.iter().fold(0f32, |m, &v| m.max(v));
            let (s, inv, z) = scale_and_zero(lo, hi);
            assert_eq!((scale, zero), (s, z));
            let bytes: Vec<u8> = got.iter().flat_map(|q| q.to_le_bytes()).collect();
            for (i, &v) in row.iter().enumerate() {
                assert_eq!(f32::from(bytes[i]), quantize_value(v, inv, z), "k {k}, {i}");
            }
            assert!(bytes[k..].iter().all(|&b| b == 0), "padding of k {k}");
        }
    }

    #[test]
    fn quantization_maps_the_largest_magnitude_to_127() {
        let (scale, q) = quantize([0.5f32, -2.0, 1.0, 0.0].into_iter());
        assert_eq!(scale, 2.0 / 127.0);
        assert_eq!(q.collect::<Vec<_>>(), vec![32, -127, 64, 0]);
        let (scale, q) = quantize([0.0f32; 3].into_iter());
        assert_eq!((scale, q.collect::<Vec<_>>()), (1.0, vec![0, 0, 0]));
    }

    /// A large weight costs only its own group's resolution, and an outlier channel's weights
    /// are kept exactly.
    #[test]
    fn weights_are_scaled_per_group_of_32_and_outlier_rows_stay_float() {
        let (k, n) = (96, 3);
        let mut w: Vec<f32> = (0..k * n)
            .map(|i| ((i * 7) % 13) as f32 / 100.0 - 0.06)
            .collect();
        w[5 * n + 1] = 50.0; // group 0 of column 1
        w[70 * n + 2] = 1234.5; // an outlier channel
        let packed = PackedI8::pack(&w, k, n, &[70]);
        let back = packed.unpack();
        assert_eq!(back[70 * n + 2], 1234.5);
        for row in 0..k {
            for col in 0..n {
                let error = (back[row * n + col] - w[row * n + col]).abs();
                let bound = if col == 1 && row < 32 {
                    50.0 / 254.0
                } else {
                    0.06 / 254.0
                };
                assert!(error <= bound * 1.0001, "({row}, {col}): {error}");
            }
        }
    }

    /// The kernel's product is the product of the quantized operands (up to float32 rounding
    /// of the scales), and within a few hundredths of a percent of the float32 product's scale;
    /// with outlier channels too.
    #[test]
    fn int8_matmul_is_the_product_of_the_quantized_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        for TestProduct { m, k, n, x, w } in test_products() {
            for outliers in [vec![], vec![0, k / 2, k - 1]] {
                let packed = PackedI8::pack(&w, k, n, &outliers);
                let dequantized = packed.unpack();
                let quantized_x: Vec<f32> = x
                    .chunks_exact(k)
                    .flat_map(|row| as_quantized(row, &outliers))
                    .collect();
                let got = packed.matmul(&x, m);
                let exact = super::super::matmul(&quantized_x, m, k, &dequantized, n);
                let full = super::super::matmul(&x, m, k, &w, n);
                let scale = full.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
                for ((g, e), f) in got.iter().zip(&exact).zip(&full) {
                    assert!((g - e).abs() < 1e-4 * scale, "{g} vs {e} ({m}x{k}x{n})");
                    assert!((g - f).abs() < 0.03 * scale, "{g} vs {f} ({m}x{k}x{n})");
                }
            }
        }
    }
}

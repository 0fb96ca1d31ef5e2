//! 8-bit integer products on AVX-512 VNNI, for `--dtype int8`.
//!
//! `vpdpbusd` multiplies four unsigned bytes by four signed bytes and adds the four products to
//! an int32 lane: four times the multiply-adds of an f32 FMA per instruction. Weights are
//! quantized once at load per output column (`w ≈ scale_c · q`, `q` in -127..=127); inputs per
//! row on every call, asymmetrically (`x ≈ scale_r · (u - zero_r)`, `u` in 0..=255), the zero
//! point's share (`zero_r · Σ_k q_w`) taken back out per row and column. Per-row input scales
//! keep an outlier in one token from flattening every other token's resolution, where a scale
//! per tensor (what dynamic quantization usually does) loses them; the zero point spends all
//! 256 steps on the row's own range, which matters for the feed-forward's GELU outputs (their
//! range is mostly positive): on all-MiniLM-L6-v2 the lowest cosine to float32 went from
//! 0.981 with symmetric inputs to 0.992.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::packed::with_row_count;
use super::packed::{padded_width, tiled_product, unpad, Tile, LANES, STRIP};
use super::{rows_per_task, simd_function};

/// Quads of `k` per pass: a strip's weights for a pass (192 quads x 32 columns x 4 bytes, 24 KiB)
/// stay in L1 while the block's rows go by.
const PASS_QUADS: usize = 192;

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

simd_function! {
    /// Quantizes each `k`-wide row of `rows` asymmetrically to unsigned bytes over
    /// `[min(0, lo), max(0, hi)]` (zero stays exact): four bytes per u32 of `dst` (`k / 4`
    /// rounded up per row; padding bytes are zero and meet zero weights), each row's scale
    /// and zero point (`x ≈ scale · (u - zero)`). Rounds half to even so it vectorizes.
    fn quantize_rows(
        rows: &[f32],
        k: usize,
        dst: &mut [u32],
        scales: &mut [f32],
        zeros: &mut [f32],
    ) {
        let quads = k.div_ceil(4);
        let mut bytes = vec![0u8; quads * 4];
        let rows = rows.chunks_exact(k);
        for (((row, dst), scale), zero) in rows.zip(dst.chunks_exact_mut(quads)).zip(scales).zip(zeros) {
            let (mut lo, mut hi) = ([0f32; LANES], [0f32; LANES]);
            let chunks = row.chunks_exact(LANES);
            let tail = chunks.remainder();
            for c in chunks {
                for i in 0..LANES {
                    lo[i] = if c[i] < lo[i] { c[i] } else { lo[i] };
                    hi[i] = if c[i] > hi[i] { c[i] } else { hi[i] };
                }
            }
            for (i, &v) in tail.iter().enumerate() {
                lo[i] = if v < lo[i] { v } else { lo[i] };
                hi[i] = if v > hi[i] { v } else { hi[i] };
            }
            let lo = lo.iter().fold(0f32, |m, &v| m.min(v));
            let hi = hi.iter().fold(0f32, |m, &v| m.max(v));
            let s = if hi > lo { (hi - lo) / 255.0 } else { 1.0 };
            let inv = 1.0 / s;
            let z = (-lo * inv).round().clamp(0.0, 255.0);
            for (b, &v) in bytes.iter_mut().zip(row) {
                *b = (v * inv + z).round_ties_even().clamp(0.0, 255.0) as u8;
            }
            for (d, q) in dst.iter_mut().zip(bytes.chunks_exact(4)) {
                *d = u32::from_le_bytes([q[0], q[1], q[2], q[3]]);
            }
            (*scale, *zero) = (s, z);
        }
    }
}

/// A `k x n` weight (the transposed Linear weight) quantized per column and packed for
/// [`PackedI8::matmul`].
pub struct PackedI8 {
    k: usize,
    n: usize,
    /// Per strip of 32 columns, per quad of `k`: two vectors of 16 lanes x 4 bytes.
    data: Vec<i8>,
    /// Per column (padded to whole strips with zeros): the weight's scale.
    scales: Vec<f32>,
    /// Per column: `Σ_k q · scale`, what one unit of an input row's zero point adds to it.
    sums: Vec<f32>,
}

impl PackedI8 {
    /// Quantizes and packs `w` (`k x n`, row-major).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let (quads, width) = (k.div_ceil(4), padded_width(n));
        let mut data = vec![0i8; width * quads * 4];
        let mut scales = vec![0f32; width];
        let mut sums = vec![0f32; width];
        for col in 0..n {
            let (scale, q) = quantize((0..k).map(|row| w[row * n + col]));
            let mut sum = 0i32;
            for (row, q) in q.enumerate() {
                data[position(quads, row, col)] = q;
                sum += i32::from(q);
            }
            scales[col] = scale;
            sums[col] = sum as f32 * scale;
        }
        Self {
            k,
            n,
            data,
            scales,
            sums,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// The quantized weight as float32 in its `k x n` row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n, quads) = (self.k, self.n, self.k.div_ceil(4));
        let mut w = vec![0f32; k * n];
        for col in 0..n {
            for row in 0..k {
                w[row * n + col] =
                    f32::from(self.data[position(quads, row, col)]) * self.scales[col];
            }
        }
        w
    }

    /// `x · w` for `x` of `m x k` (float32), each row of `x` quantized to 8 bits with its own
    /// scale and zero point: `m x n` float32. Call only where [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "lhs is not {m} x {}", self.k);
        assert!(available(), "int8 matmul on a CPU without AVX-512 VNNI");
        let quads = self.k.div_ceil(4);
        // Inputs as unsigned bytes, four per u32 (the value a kernel broadcasts), and each row's
        // scale and zero point. A row's padding bytes meet zero weights.
        let mut a = vec![0u32; m * quads];
        let mut row_scales = vec![0f32; m];
        let mut row_zeros = vec![0f32; m];
        let task_rows = rows_per_task(self.k);
        a.par_chunks_mut(quads * task_rows)
            .zip(row_scales.par_chunks_mut(task_rows))
            .zip(row_zeros.par_chunks_mut(task_rows))
            .zip(x.par_chunks(self.k * task_rows))
            .for_each(|(((dst, scales), zeros), rows)| {
                quantize_rows(rows, self.k, dst, scales, zeros)
            });
        let stride = padded_width(self.n);
        let kernel = |tile: Tile, at: *mut f32| {
            let strip_len = quads * STRIP * 4;
            let strip = &self.data[tile.strip * strip_len..][..strip_len];
            let weights = &strip[tile.pass.start * STRIP * 4..tile.pass.end * STRIP * 4];
            let inputs = &a[tile.first * quads..(tile.first + tile.rows) * quads];
            let rows = tile.first..tile.first + tile.rows;
            let (rows, zeros) = (&row_scales[rows.clone()], &row_zeros[rows]);
            let columns = tile.strip * STRIP..(tile.strip + 1) * STRIP;
            let (scales, sums) = (&self.scales[columns.clone()], &self.sums[columns]);
            // SAFETY: `available()` was checked above; `at` is valid for the tile's rows of 32
            // (see `tiled_product`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                with_row_count!(
                    tile.rows,
                    x86::strip_kernel(
                        inputs,
                        quads,
                        tile.pass,
                        weights,
                        rows,
                        zeros,
                        scales,
                        sums,
                        at,
                        stride,
                        tile.accumulate
                    )
                )
            };
        };
        // SAFETY: the kernel writes its whole tile on a first pass.
        let out = unsafe { tiled_product(m, stride, quads, PASS_QUADS, kernel) };
        unpad(out, m, self.n)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::x86::{start_sums, store_sums};
    use super::super::packed::LANES;

    /// Quads `pass` of R rows of `a` (`quads` per row) times the same quads of one 32-column
    /// strip (`b`, starting at the pass), in int32; then scaled to float32 by the rows' and
    /// columns' scales and written to `out` (row stride `stride`) by the first pass, which also
    /// takes out the rows' zero points (`zero_r · Σ_k q · scale_c`), and added to it by the
    /// later ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 VNNI; `out` must be valid for R rows of 32.
    #[target_feature(enable = "avx512f,avx512vnni")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn strip_kernel<const R: usize>(
        a: &[u32],
        quads: usize,
        pass: std::ops::Range<usize>,
        b: &[i8],
        row_scales: &[f32],
        row_zeros: &[f32],
        col_scales: &[f32],
        col_sums: &[f32],
        out: *mut f32,
        stride: usize,
        accumulate: bool,
    ) {
        assert!(b.len() >= pass.len() * 8 * LANES && a.len() >= R * quads && pass.end <= quads);
        assert!(row_scales.len() >= R && row_zeros.len() >= R);
        assert!(col_scales.len() >= 2 * LANES && col_sums.len() >= 2 * LANES);
        let mut acc = [[_mm512_setzero_si512(); 2]; R];
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for (i, q) in pass.enumerate() {
            // SAFETY: b holds the pass's quads, each 2 vectors x 16 lanes x 4 bytes, and a holds
            // R rows of `quads` (asserted).
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
        // SAFETY: per the caller; the scale slices hold 32 columns (asserted).
        unsafe {
            let mut sums = start_sums::<R>(out, stride, accumulate);
            let scales = [
                _mm512_loadu_ps(col_scales.as_ptr()),
                _mm512_loadu_ps(col_scales.as_ptr().add(LANES)),
            ];
            let col_sums = [
                _mm512_loadu_ps(col_sums.as_ptr()),
                _mm512_loadu_ps(col_sums.as_ptr().add(LANES)),
            ];
            for (r, (row, acc)) in sums.iter_mut().zip(&acc).enumerate() {
                let row_scale = _mm512_set1_ps(row_scales[r]);
                let row_zero = _mm512_set1_ps(row_zeros[r]);
                for v in 0..2 {
                    let mut scaled = _mm512_mul_ps(_mm512_cvtepi32_ps(acc[v]), scales[v]);
                    if !accumulate {
                        scaled = _mm512_fnmadd_ps(row_zero, col_sums[v], scaled);
                    }
                    row[v] = _mm512_fmadd_ps(scaled, row_scale, row[v]);
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

    /// One row through [`quantize_rows`]: its scale, zero point and `k` bytes.
    fn quantize_input(row: &[f32]) -> (f32, f32, Vec<u8>) {
        let k = row.len();
        let (mut dst, mut scale, mut zero) = (vec![0u32; k.div_ceil(4)], [0f32], [0f32]);
        quantize_rows(row, k, &mut dst, &mut scale, &mut zero);
        let bytes = dst.iter().flat_map(|q| q.to_le_bytes()).take(k).collect();
        (scale[0], zero[0], bytes)
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
    fn quantization_maps_the_largest_magnitude_to_127() {
        let (scale, q) = quantize([0.5f32, -2.0, 1.0, 0.0].into_iter());
        assert_eq!(scale, 2.0 / 127.0);
        assert_eq!(q.collect::<Vec<_>>(), vec![32, -127, 64, 0]);
        let (scale, q) = quantize([0.0f32; 3].into_iter());
        assert_eq!((scale, q.collect::<Vec<_>>()), (1.0, vec![0, 0, 0]));
    }

    /// The kernel's product is the product of the quantized operands (up to float32 rounding
    /// of the scales), and within a few hundredths of a percent of the float32 product's scale.
    #[test]
    fn int8_matmul_is_the_product_of_the_quantized_operands() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 VNNI");
            return;
        }
        for TestProduct { m, k, n, x, w } in test_products() {
            let packed = PackedI8::pack(&w, k, n);
            let dequantized = packed.unpack();
            let quantized_x: Vec<f32> = x
                .chunks_exact(k)
                .flat_map(|row| {
                    let (s, z, u) = quantize_input(row);
                    u.into_iter()
                        .map(move |u| (f32::from(u) - z) * s)
                        .collect::<Vec<_>>()
                })
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

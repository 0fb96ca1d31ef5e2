//! Reduced precision: bfloat16 weights and inputs, float32 sums, on AVX-512 BF16.
//!
//! `vdpbf16ps` multiplies pairs of bfloat16 values and adds both products to a float32 lane,
//! twice the work of an f32 FMA per instruction. Weights are rounded and packed once at load into
//! the layout it reads (16 output columns per vector, two consecutive `k` per lane); inputs are
//! rounded per call. Only the dense layers use this; attention, softmax and LayerNorm stay f32.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::packed::with_row_count;
use super::packed::{padded_width, tiled_product, unpad, Tile, LANES, STRIP};
use super::rows_per_task;

/// Pairs of `k` per pass: one pass's weights for a strip (192 pairs x 32 columns, 24 KiB) stay in
/// L1 while the block's rows go by.
const PASS_PAIRS: usize = 192;

/// Round to nearest even, as PyTorch's `.to(torch.bfloat16)` does.
#[inline(always)]
fn to_bf16(x: f32) -> u16 {
    let bits = x.to_bits();
    if x.is_nan() {
        return 0x7fc0;
    }
    ((bits + 0x7fff + ((bits >> 16) & 1)) >> 16) as u16
}

fn from_bf16(v: u16) -> f32 {
    f32::from_bits((v as u32) << 16)
}

/// Where weight `(row, col)` lies in the packed data: per strip of 32 columns, per pair of rows,
/// two vectors of 16 lanes x 2 values.
fn position(pairs: usize, row: usize, col: usize) -> usize {
    let (strip, within) = (col / STRIP, col % STRIP);
    let (vector, lane) = (within / LANES, within % LANES);
    (((strip * pairs + row / 2) * 2 + vector) * LANES + lane) * 2 + row % 2
}

/// Whether this CPU runs the bfloat16 kernel.
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::cpu_has_avx512() && std::arch::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// A `k x n` weight (the transposed Linear weight) packed for [`PackedBf16::matmul`].
pub struct PackedBf16 {
    k: usize,
    n: usize,
    /// Per strip of 32 columns, per pair of `k`: two vectors of 16 lanes x 2 values.
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs `w` (`k x n`, row-major).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let pairs = k.div_ceil(2);
        let mut data = vec![0u16; padded_width(n) * pairs * 2];
        for col in 0..n {
            for row in 0..k {
                data[position(pairs, row, col)] = to_bf16(w[row * n + col]);
            }
        }
        Self { k, n, data }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `k` rounded up to pairs.
    fn pairs(&self) -> usize {
        self.k.div_ceil(2)
    }

    /// The rounded weight as float32 in its `k x n` row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n, pairs) = (self.k, self.n, self.pairs());
        let mut w = vec![0f32; k * n];
        for col in 0..n {
            for row in 0..k {
                w[row * n + col] = from_bf16(self.data[position(pairs, row, col)]);
            }
        }
        w
    }

    /// `x · w` for `x` of `m x k` (float32): `m x n` float32. Call only where [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "lhs is not {m} x {}", self.k);
        assert!(available(), "bfloat16 matmul on a CPU without AVX-512 BF16");
        let pairs = self.pairs();
        // Inputs as bf16 pairs, one u32 per pair: the value a kernel broadcasts.
        let mut a = vec![0u32; m * pairs];
        let task_rows = rows_per_task(self.k);
        a.par_chunks_mut(pairs * task_rows)
            .zip(x.par_chunks(self.k * task_rows))
            .for_each(|(dst, rows)| {
                for (dst, row) in dst.chunks_exact_mut(pairs).zip(rows.chunks_exact(self.k)) {
                    // SAFETY: `available()` was checked above.
                    #[cfg(target_arch = "x86_64")]
                    unsafe {
                        x86::round_pairs(row, dst)
                    };
                }
            });
        let stride = padded_width(self.n);
        let strip_len = pairs * STRIP * 2;
        let kernel = |tile: Tile, at: *mut f32| {
            let strip = &self.data[tile.strip * strip_len..][..strip_len];
            let b = &strip[tile.pass.start * STRIP * 2..tile.pass.end * STRIP * 2];
            let inputs = &a[tile.first * pairs..(tile.first + tile.rows) * pairs];
            // SAFETY: `available()` was checked above; `at` is valid for the tile's rows of 32
            // (see `tiled_product`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                with_row_count!(
                    tile.rows,
                    x86::strip_kernel(inputs, pairs, tile.pass, b, at, stride, tile.accumulate)
                )
            };
        };
        // SAFETY: the kernel writes its whole tile on a first pass.
        let out = unsafe { tiled_product(m, stride, pairs, PASS_PAIRS, kernel) };
        unpad(out, m, self.n)
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::super::packed::x86::{start_sums, store_sums};
    use super::super::packed::LANES;
    use super::to_bf16;

    /// Rounds a row of float32 to bfloat16 pairs (`vcvtne2ps2bf16`: to nearest even, as
    /// [`to_bf16`]), one u32 per pair of consecutive values; an odd last value pairs with 0.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_pairs(row: &[f32], pairs: &mut [u32]) {
        assert_eq!(
            pairs.len(),
            row.len().div_ceil(2),
            "pairs for a row of {}",
            row.len()
        );
        let whole = row.len() / 32;
        for i in 0..whole {
            // SAFETY: values 32i..32i+32 of `row` and pairs 16i..16i+16 of `pairs` exist.
            unsafe {
                let lo = _mm512_loadu_ps(row.as_ptr().add(32 * i));
                let hi = _mm512_loadu_ps(row.as_ptr().add(32 * i + 16));
                let both = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_storeu_si512(
                    pairs.as_mut_ptr().add(16 * i) as *mut _,
                    std::mem::transmute::<__m512bh, __m512i>(both),
                );
            }
        }
        for (p, d) in pairs.iter_mut().enumerate().skip(16 * whole) {
            let lo = to_bf16(row[2 * p]) as u32;
            let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
            *d = lo | (hi << 16);
        }
    }

    /// Pairs `pass` of R rows of `a` (`pairs` per row) times the same pairs of one 32-column
    /// strip (`b`, starting at the pass), written to `out` (row stride `stride`) by the first
    /// pass and added to it by the later ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `out` must be valid for R rows of 32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn strip_kernel<const R: usize>(
        a: &[u32],
        pairs: usize,
        pass: std::ops::Range<usize>,
        b: &[u16],
        out: *mut f32,
        stride: usize,
        accumulate: bool,
    ) {
        assert!(b.len() >= pass.len() * 4 * LANES && a.len() >= R * pairs && pass.end <= pairs);
        // SAFETY: per the caller.
        let mut sums = unsafe { start_sums::<R>(out, stride, accumulate) };
        let (ap, bp) = (a.as_ptr(), b.as_ptr());
        for (i, p) in pass.enumerate() {
            // SAFETY: b holds the pass's pairs, each 2 vectors x 16 lanes x 2 values, and a
            // holds R rows of `pairs` (asserted).
            unsafe {
                let b0: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(i * 4 * LANES) as *const _,
                ));
                let b1: __m512bh = std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(
                    bp.add(i * 4 * LANES + 2 * LANES) as *const _,
                ));
                for (r, row) in sums.iter_mut().enumerate() {
                    let pair = _mm512_set1_epi32(*ap.add(r * pairs + p) as i32);
                    let pair = std::mem::transmute::<__m512i, __m512bh>(pair);
                    row[0] = _mm512_dpbf16_ps(row[0], pair, b0);
                    row[1] = _mm512_dpbf16_ps(row[1], pair, b1);
                }
            }
        }
        // SAFETY: per the caller.
        unsafe { store_sums(&sums, out, stride) };
    }
}

#[cfg(test)]
mod tests {
    use super::super::packed::{test_products, TestProduct};
    use super::*;

    #[test]
    fn rounding_is_to_nearest_even() {
        assert_eq!(to_bf16(1.0), 0x3f80);
        // 1 + 2^-8 is half-way between two bf16 values: rounds to the even one (1.0).
        assert_eq!(to_bf16(1.0 + 1.0 / 256.0), 0x3f80);
        assert_eq!(to_bf16(1.0 + 3.0 / 256.0), 0x3f82);
        assert_eq!(to_bf16(-2.0), 0xc000);
    }

    #[test]
    fn vector_rounding_matches_the_scalar_rounding() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // 71 values: two whole vectors of pairs, then a tail with an odd last value; ties
        // (1 + 2^-8, 1 + 3 * 2^-8) among them.
        let row: Vec<f32> = (0..71)
            .map(|i| match i % 5 {
                0 => 1.0 + 1.0 / 256.0,
                1 => -(1.0 + 3.0 / 256.0),
                _ => (i as f32 * 0.731).sin() * 1e3,
            })
            .collect();
        let mut got = vec![0u32; 36];
        // SAFETY: `available()` was checked above.
        unsafe { x86::round_pairs(&row, &mut got) };
        let want: Vec<u32> = (0..36)
            .map(|p| {
                let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
                to_bf16(row[2 * p]) as u32 | (hi << 16)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    fn bf16_matmul_is_close_to_f32() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        for TestProduct { m, k, n, x, w } in test_products() {
            let packed = PackedBf16::pack(&w, k, n);
            let rounded: Vec<f32> = w.iter().map(|&v| from_bf16(to_bf16(v))).collect();
            assert_eq!(packed.unpack(), rounded);
            let got = packed.matmul(&x, m);
            let want = super::super::matmul(&x, m, k, &w, n);
            assert_eq!(got.len(), want.len());
            let scale = want.iter().map(|v| v.abs()).fold(0f32, f32::max).max(1.0);
            for (g, w) in got.iter().zip(&want) {
                // bf16 keeps 8 significant bits: errors of a few parts per thousand.
                assert!((g - w).abs() < 0.02 * scale, "{g} vs {w} ({m}x{k}x{n})");
            }
        }
    }
}

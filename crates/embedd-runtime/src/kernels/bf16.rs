//! Reduced precision: bfloat16 weights and inputs, float32 sums, on AVX-512 BF16.
//!
//! `vdpbf16ps` multiplies pairs of bfloat16 values and adds both products to a float32 lane,
//! twice the work of an f32 FMA per instruction. Weights are rounded and packed once at load into
//! the layout it reads (16 output columns per vector, two consecutive `k` per lane); inputs are
//! rounded per call. Only the dense layers use this; attention, softmax and LayerNorm stay f32.

use rayon::prelude::*;

use super::DisjointWrites;

/// Output columns per vector register.
const LANES: usize = 16;
/// Columns per task: two registers per row.
const STRIP: usize = 2 * LANES;
/// Rows per micro-kernel call.
const ROWS: usize = 8;
/// Rows per task: a block's inputs (at most 64 x 768 pairs, 192 KiB) stay in L2 while strips
/// pass over them. Without blocks, a batch of 800 rows streamed its 2.4 MiB of inputs from L3
/// once per strip, and the k = 1536 products ran at half speed.
const BLOCK_ROWS: usize = 64;
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
    /// `k` rounded up to pairs.
    pairs: usize,
    /// `n` rounded up to whole strips.
    n_padded: usize,
    /// Per strip of 32 columns, per pair of `k`: two vectors of 16 lanes x 2 values.
    data: Vec<u16>,
}

impl PackedBf16 {
    /// Packs `w` (`k x n`, row-major).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let pairs = k.div_ceil(2);
        let n_padded = n.div_ceil(STRIP) * STRIP;
        let mut data = vec![0u16; n_padded * pairs * 2];
        for col in 0..n {
            let (strip, within) = (col / STRIP, col % STRIP);
            let (vector, lane) = (within / LANES, within % LANES);
            for row in 0..k {
                let p = row / 2;
                let index = (((strip * pairs + p) * 2 + vector) * LANES + lane) * 2 + row % 2;
                data[index] = to_bf16(w[row * n + col]);
            }
        }
        Self {
            k,
            n,
            pairs,
            n_padded,
            data,
        }
    }

    pub fn k(&self) -> usize {
        self.k
    }

    pub fn n(&self) -> usize {
        self.n
    }

    /// `x · w` for `x` of `m x k` (float32): `m x n` float32. Call only where [`available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "lhs is not {m} x {}", self.k);
        assert!(available(), "bfloat16 matmul on a CPU without AVX-512 BF16");
        // Inputs as bf16 pairs, one u32 per pair: the value a kernel broadcasts.
        let mut a = vec![0u32; m * self.pairs];
        a.par_chunks_mut(self.pairs)
            .zip(x.par_chunks(self.k))
            .for_each(|(dst, row)| {
                for (p, d) in dst.iter_mut().enumerate() {
                    let lo = to_bf16(row[2 * p]) as u32;
                    let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
                    *d = lo | (hi << 16);
                }
            });
        let mut out = vec![0f32; m * self.n_padded];
        let strips = self.n_padded / STRIP;
        let strip_len = self.pairs * STRIP * 2;
        let pairs = self.pairs;
        // Each task owns a column strip of a block of rows of `out`; within it, `k` goes by in
        // passes whose weights stay in L1 while the block's rows are walked.
        let out_ptr = DisjointWrites::new(&mut out);
        (0..m.div_ceil(BLOCK_ROWS) * strips)
            .into_par_iter()
            .for_each(|task| {
                let (block, s) = (task / strips, task % strips);
                let strip = &self.data[s * strip_len..][..strip_len];
                let block_rows = block * BLOCK_ROWS..m.min((block + 1) * BLOCK_ROWS);
                for start in (0..pairs).step_by(PASS_PAIRS) {
                    let pass = start..pairs.min(start + PASS_PAIRS);
                    let b = &strip[start * STRIP * 2..pass.end * STRIP * 2];
                    for first in block_rows.clone().step_by(ROWS) {
                        let rows = ROWS.min(block_rows.end - first);
                        // SAFETY: `available()` was checked above; the task writes only
                        // columns s*32..s*32+32 of rows first..first+rows, inside `out`.
                        unsafe {
                            #[cfg(target_arch = "x86_64")]
                            x86::strip_kernel(
                                &a[first * pairs..(first + rows) * pairs],
                                rows,
                                pairs,
                                pass.clone(),
                                b,
                                out_ptr.at(first * self.n_padded + s * STRIP),
                                self.n_padded,
                            );
                        }
                    }
                }
            });
        if self.n_padded != self.n {
            let n = self.n;
            for r in 0..m {
                out.copy_within(r * self.n_padded..r * self.n_padded + n, r * n);
            }
            out.truncate(m * n);
        }
        out
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, ROWS};

    /// Pairs `pass` of `rows` (at most 8) rows of `a` (`pairs` per row) times the same pairs of
    /// one 32-column strip (`b`, starting at the pass), written to `out` (row stride `stride`)
    /// by the first pass and added to it by the later ones.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16; `out` must be valid for `rows` rows of 32.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn strip_kernel(
        a: &[u32],
        rows: usize,
        pairs: usize,
        pass: std::ops::Range<usize>,
        b: &[u16],
        out: *mut f32,
        stride: usize,
    ) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        if pass.start > 0 {
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                // SAFETY: the caller guarantees 32 valid floats at each of the `rows` rows.
                unsafe {
                    acc[0] = _mm512_loadu_ps(out.add(r * stride));
                    acc[1] = _mm512_loadu_ps(out.add(r * stride + LANES));
                }
            }
        }
        assert!(b.len() >= pass.len() * 4 * LANES && a.len() >= rows * pairs);
        let bp = b.as_ptr();
        for (i, p) in pass.enumerate() {
            // SAFETY: b holds the pass's pairs, each 2 vectors x 16 lanes x 2 values (asserted).
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_si512(bp.add(i * 4 * LANES) as *const _),
                    _mm512_loadu_si512(bp.add(i * 4 * LANES + 2 * LANES) as *const _),
                )
            };
            let (b0, b1): (__m512bh, __m512bh) = (
                std::mem::transmute::<__m512i, __m512bh>(b0),
                std::mem::transmute::<__m512i, __m512bh>(b1),
            );
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let pair = _mm512_set1_epi32(a[r * pairs + p] as i32);
                let pair = std::mem::transmute::<__m512i, __m512bh>(pair);
                acc[0] = _mm512_dpbf16_ps(acc[0], pair, b0);
                acc[1] = _mm512_dpbf16_ps(acc[1], pair, b1);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: the caller guarantees 32 writable floats at each of the `rows` rows.
            unsafe {
                _mm512_storeu_ps(out.add(r * stride), acc[0]);
                _mm512_storeu_ps(out.add(r * stride + LANES), acc[1]);
            }
        }
    }
}

#[cfg(test)]
mod tests {
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
    fn bf16_matmul_is_close_to_f32() {
        if !available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // The last two span several row blocks and several passes over k.
        for (m, k, n) in [
            (1, 7, 5),
            (13, 64, 40),
            (9, 384, 96),
            (70, 801, 40),
            (130, 1536, 64),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 37) % 19) as f32 / 9.0 - 1.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 53) % 23) as f32 / 11.0 - 1.0)
                .collect();
            let got = PackedBf16::pack(&w, k, n).matmul(&x, m);
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

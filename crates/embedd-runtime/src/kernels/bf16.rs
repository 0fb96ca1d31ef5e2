//! Reduced precision: bfloat16 weights and inputs, float32 sums, on AVX-512 BF16.
//!
//! `vdpbf16ps` multiplies pairs of bfloat16 values and adds both products to a float32 lane,
//! twice the work of an f32 FMA per instruction. Weights are rounded and packed once at load into
//! the layout it reads (16 output columns per vector, two consecutive `k` per lane); inputs are
//! rounded per call. The dense layers and the attention products use this ([`StripOperand`] for
//! the latter); softmax and LayerNorm stay f32.

use rayon::prelude::*;

#[cfg(target_arch = "x86_64")]
use super::packed::with_row_count;
use super::packed::{for_each_tile, padded_width, tiled_product, unpad, Tile, LANES, STRIP};
use super::{rows_per_task, Epilogue};

/// Pairs of `k` per pass: one pass's weights for a strip (256 pairs x 32 columns, 32 KiB) stay in
/// L1 while the block's rows go by. 256 rather than 192: k = 1024 then runs in two equal passes
/// instead of three (192, 192, 128), and on a Zen 4 machine (kernel-bench, 2026-12-04) the
/// Qwen3-0.6B-shaped products ran 4-8% faster and MiniLM's no slower.
const PASS_PAIRS: usize = 256;

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
    /// Runs on AMX tiles where the CPU has them and `k` is whole tile steps (32 values).
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.product(x, m, true, Epilogue::default())
    }

    /// [`Self::matmul`] with `epilogue` applied to each block of the output as it is finished.
    pub fn matmul_with(&self, x: &[f32], m: usize, epilogue: Epilogue) -> Vec<f32> {
        self.product(x, m, true, epilogue)
    }

    fn product(&self, x: &[f32], m: usize, tiles_allowed: bool, epilogue: Epilogue) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "lhs is not {m} x {}", self.k);
        assert!(available(), "bfloat16 matmul on a CPU without AVX-512 BF16");
        let pairs = self.pairs();
        #[cfg(target_arch = "x86_64")]
        let on_tiles = tiles_allowed && super::amx::takes(pairs);
        #[cfg(not(target_arch = "x86_64"))]
        let on_tiles = false && tiles_allowed;
        // Inputs as bf16 pairs, one u32 per pair: the value a kernel broadcasts (and AMX's
        // left tile rows). Not zeroed first: every pair is written below.
        let mut a: Vec<u32> = Vec::with_capacity(m.next_multiple_of(16) * pairs);
        let task_rows = rows_per_task(self.k);
        a.spare_capacity_mut()[..m * pairs]
            .par_chunks_mut(pairs * task_rows)
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
        // SAFETY: round_pairs wrote every pair of every row.
        unsafe { a.set_len(m * pairs) };
        let stride = padded_width(self.n);
        #[cfg(target_arch = "x86_64")]
        if on_tiles {
            // Whole row tiles: the rows past `m` are zeros, and their sums are dropped.
            let rows = m.next_multiple_of(super::amx::TILE_ROWS);
            a.resize(rows * pairs, 0);
            let mut out = super::amx::product(&self.data, pairs, &a, rows, self.n, epilogue);
            out.truncate(m * stride);
            return unpad(out, m, self.n);
        }
        // SAFETY: `available()` was checked above; `at` is valid for the tile's rows of 32 (see
        // `tiled_product`).
        let kernel =
            |tile: Tile, at: *mut f32| unsafe { run_tile(&self.data, pairs, &a, tile, at, stride) };
        // SAFETY: the kernel writes its whole tile on a first pass.
        let out = unsafe { tiled_product(m, self.n, pairs, PASS_PAIRS, epilogue, kernel) };
        unpad(out, m, self.n)
    }
}

/// One tile of `a · B`: `a` holds rows of `pairs` pairs, `data` is `B` packed as
/// [`PackedBf16::data`] (`pairs` per strip); the tile is written (or added) at `at`, row stride
/// `stride`.
///
/// # Safety
/// The CPU must run [`available`]'s kernel; `at` must be valid for the tile's rows of 32.
unsafe fn run_tile(data: &[u16], pairs: usize, a: &[u32], tile: Tile, at: *mut f32, stride: usize) {
    let strip_len = pairs * STRIP * 2;
    let strip = &data[tile.strip * strip_len..][..strip_len];
    let b = &strip[tile.pass.start * STRIP * 2..tile.pass.end * STRIP * 2];
    let inputs = &a[tile.first * pairs..(tile.first + tile.rows) * pairs];
    // SAFETY: per the caller.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        with_row_count!(
            tile.rows,
            x86::strip_kernel(inputs, pairs, tile.pass, b, at, stride, tile.accumulate)
        )
    };
}

/// A right-hand operand packed per call in [`PackedBf16`]'s layout, for products too small to
/// run through [`tiled_product`] (attention's keys and values, one sequence and head at a time).
#[derive(Default)]
pub(crate) struct StripOperand {
    /// As [`PackedBf16::data`], a pair of bf16 per u32.
    data: Vec<u32>,
    pairs: usize,
    strips: usize,
}

impl StripOperand {
    /// Zeros for `strips` strips of `pairs` pairs: what the padding keeps.
    fn reset(&mut self, pairs: usize, strips: usize) {
        assert!(
            available(),
            "bfloat16 operands on a CPU without AVX-512 BF16"
        );
        self.pairs = pairs;
        self.strips = strips;
        self.data.clear();
        self.data.resize(strips * pairs * STRIP, 0);
    }

    /// `B[t][j] = rows[j][t]`, `k = d`, `n = count` (padded to whole strips with zeros): the
    /// keys of `q · kᵀ`. Row `j` starts at `src[j * stride]`. Call only where [`available`].
    pub(crate) fn pack_keys(&mut self, src: &[f32], stride: usize, count: usize, d: usize) {
        assert!(count == 0 || src.len() >= (count - 1) * stride + d);
        let pairs = d.div_ceil(2);
        self.reset(pairs, count.div_ceil(STRIP));
        // A key's pairs are rounded a strip's width of values at a time, then spread one per
        // step of `k`.
        let mut rounded = [std::mem::MaybeUninit::new(0u32); STRIP / 2];
        for j in 0..count {
            let base = (j / STRIP) * pairs * STRIP + j % STRIP;
            for (c, chunk) in src[j * stride..][..d].chunks(STRIP).enumerate() {
                let rounded = &mut rounded[..chunk.len().div_ceil(2)];
                // SAFETY: `available()` was checked above.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::round_pairs(chunk, rounded)
                };
                for (p, pair) in rounded.iter().enumerate() {
                    // SAFETY: round_pairs wrote every pair.
                    self.data[base + (c * STRIP / 2 + p) * STRIP] = unsafe { pair.assume_init() };
                }
            }
        }
    }

    /// `B[j][t] = rows[j][t]`, `k = count`, `n = d` (a multiple of 32): the values of
    /// `p · v`. Row `j` starts at `src[j * stride]`. Call only where [`available`].
    pub(crate) fn pack_values(&mut self, src: &[f32], stride: usize, count: usize, d: usize) {
        assert!(
            d.is_multiple_of(STRIP),
            "value width {d} is not whole strips"
        );
        assert!(count == 0 || src.len() >= (count - 1) * stride + d);
        let pairs = count.div_ceil(2);
        self.reset(pairs, d / STRIP);
        const ZEROS: [f32; STRIP] = [0.0; STRIP];
        for p in 0..pairs {
            let row = |j: usize| &src[j * stride..][..d];
            let even = row(2 * p).chunks_exact(STRIP);
            // An odd last key pairs with zeros.
            let odd = (2 * p + 1 < count).then(|| row(2 * p + 1));
            for (strip, even) in even.enumerate() {
                let odd = odd.map_or(&ZEROS[..], |o| &o[strip * STRIP..][..STRIP]);
                let dst = &mut self.data[(strip * pairs + p) * STRIP..][..STRIP];
                // SAFETY: `available()` was checked above.
                #[cfg(target_arch = "x86_64")]
                unsafe {
                    x86::interleave_pairs(even, odd, dst)
                };
            }
        }
    }

    /// Frees the packed data if it holds more than `bytes`.
    pub(crate) fn release_over(&mut self, bytes: usize) {
        super::release_over(&mut self.data, bytes);
    }

    /// `a · B` for `m` rows of `a` (pairs as [`round_rows`] writes them, `k / 2` rounded up per
    /// row), on the calling thread: every strip's 32 columns written to `out`, row stride
    /// `stride`.
    ///
    /// # Safety
    /// `out` must be valid for `m` rows of `32 * strips` floats at row stride `stride`.
    pub(crate) unsafe fn product(&self, a: &[u32], m: usize, out: *mut f32, stride: usize) {
        let pairs = self.pairs;
        assert!(a.len() >= m * pairs, "lhs is not {m} x {pairs} pairs");
        assert!(
            available(),
            "bfloat16 product on a CPU without AVX-512 BF16"
        );
        if pairs == 0 {
            for r in 0..m {
                // SAFETY: per the caller.
                unsafe { std::ptr::write_bytes(out.add(r * stride), 0, self.strips * STRIP) };
            }
            return;
        }
        // SAFETY: a u32 is two u16 in memory, low half first: the layout the kernel reads.
        let b: &[u16] =
            unsafe { std::slice::from_raw_parts(self.data.as_ptr().cast(), self.data.len() * 2) };
        for strip in 0..self.strips {
            for_each_tile(0..m, strip, pairs, PASS_PAIRS, |tile| {
                // SAFETY: the tile's rows and strip lie inside `out` (the caller's promise);
                // `available()` was checked above.
                unsafe {
                    let at = out.add(tile.first * stride + strip * STRIP);
                    run_tile(b, pairs, a, tile, at, stride)
                }
            });
        }
    }
}

/// Rounds `m` rows of `width` values (row `r` at `src[r * stride]`) to bf16 pairs, `width / 2`
/// rounded up per row, into `out`: the left-hand operand of [`StripOperand::product`]. Call
/// only where [`available`].
pub(crate) fn round_rows(src: &[f32], stride: usize, m: usize, width: usize, out: &mut Vec<u32>) {
    assert!(
        available(),
        "bfloat16 rounding on a CPU without AVX-512 BF16"
    );
    let pairs = width.div_ceil(2);
    out.clear();
    out.reserve(m * pairs);
    for (r, dst) in out.spare_capacity_mut()[..m * pairs]
        .chunks_exact_mut(pairs)
        .enumerate()
    {
        // SAFETY: `available()` was checked above.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            x86::round_pairs(&src[r * stride..][..width], dst)
        };
    }
    // SAFETY: every row's pairs were written above.
    unsafe { out.set_len(m * pairs) };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;
    use std::mem::MaybeUninit;

    use super::super::packed::x86::{start_sums, store_sums};
    use super::super::packed::LANES;

    /// Rounds a row of float32 to bfloat16 pairs (`vcvtne2ps2bf16`: to nearest even, as
    /// [`to_bf16`](super::to_bf16)), one u32 per pair of consecutive values; an odd last value
    /// pairs with 0.
    ///
    /// # Safety
    /// The CPU must have AVX-512F and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn round_pairs(row: &[f32], pairs: &mut [MaybeUninit<u32>]) {
        assert_eq!(
            pairs.len(),
            row.len().div_ceil(2),
            "pairs for a row of {}",
            row.len()
        );
        // Pair p of a chunk of 32 values is (value 2p, value 2p + 1): the low and high halves of
        // lane p of the two converted vectors.
        for (i, chunk) in row.chunks(32).enumerate() {
            let (lo_len, hi_len) = (chunk.len().min(16), chunk.len().saturating_sub(16));
            let lanes = chunk.len().div_ceil(2);
            // SAFETY: the masks cover the chunk's values and its pairs (asserted above); masked
            // lanes are neither read nor written.
            unsafe {
                let at = row.as_ptr().add(32 * i);
                let lo = _mm512_maskz_loadu_ps(mask(lo_len), at);
                let hi = _mm512_maskz_loadu_ps(mask(hi_len), at.add(16));
                let both = _mm512_cvtne2ps_pbh(hi, lo);
                _mm512_mask_storeu_epi32(
                    pairs.as_mut_ptr().add(16 * i) as *mut _,
                    mask(lanes),
                    std::mem::transmute::<__m512bh, __m512i>(both),
                );
            }
        }
    }

    /// The first `lanes` (at most 16) lanes.
    #[inline(always)]
    fn mask(lanes: usize) -> __mmask16 {
        ((1u32 << lanes) - 1) as __mmask16
    }

    /// `dst[t] = (even[t], odd[t])` as a bf16 pair (even in the low half), for 32 values.
    ///
    /// # Safety
    /// The CPU must have AVX-512F, AVX-512BW and AVX-512 BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    pub unsafe fn interleave_pairs(even: &[f32], odd: &[f32], dst: &mut [u32]) {
        assert!(even.len() >= 32 && odd.len() >= 32 && dst.len() >= 32);
        // Word i of the result takes word ORDER[i] of [even 0..16 | odd 0..16].
        const ORDER: [i16; 32] = {
            let mut order = [0i16; 32];
            let mut i = 0;
            while i < 16 {
                order[2 * i] = i as i16;
                order[2 * i + 1] = 16 + i as i16;
                i += 1;
            }
            order
        };
        for half in 0..2 {
            // SAFETY: 16 values at 16 * half of even, odd and dst exist (asserted).
            unsafe {
                let order = _mm512_loadu_si512(ORDER.as_ptr() as *const _);
                let e = _mm512_loadu_ps(even.as_ptr().add(16 * half));
                let o = _mm512_loadu_ps(odd.as_ptr().add(16 * half));
                let both = std::mem::transmute::<__m512bh, __m512i>(_mm512_cvtne2ps_pbh(o, e));
                let pairs = _mm512_permutexvar_epi16(order, both);
                _mm512_storeu_si512(dst.as_mut_ptr().add(16 * half) as *mut _, pairs);
            }
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
        let mut got = vec![std::mem::MaybeUninit::new(0u32); 36];
        // SAFETY: `available()` was checked above.
        unsafe { x86::round_pairs(&row, &mut got) };
        // SAFETY: initialized above.
        let got: Vec<u32> = got.iter().map(|v| unsafe { v.assume_init() }).collect();
        let want: Vec<u32> = (0..36)
            .map(|p| {
                let hi = row.get(2 * p + 1).map_or(0, |&v| to_bf16(v) as u32);
                to_bf16(row[2 * p]) as u32 | (hi << 16)
            })
            .collect();
        assert_eq!(got, want);
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn amx_tiles_agree_with_the_vector_kernel() {
        if !super::super::amx::takes(16) {
            eprintln!("skipped: this CPU (or process) has no AMX-BF16");
            return;
        }
        // Row counts around the 16-row tiles and 32-row blocks; k of 1, 2 and 48 tile steps;
        // n with a partial strip, and with 13 strips (tasks of several strips, the last short).
        for (m, k, n) in [
            (1, 32, 32),
            (16, 64, 40),
            (25, 384, 384),
            (33, 384, 100),
            (70, 1536, 64),
            (40, 64, 416),
        ] {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i * 7 % 23) as f32 - 11.0) * 0.13)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i * 5 % 19) as f32 - 9.0) * 0.07)
                .collect();
            let packed = PackedBf16::pack(&w, k, n);
            let tiles = packed.product(&x, m, true, Epilogue::default());
            let vectors = packed.product(&x, m, false, Epilogue::default());
            assert_eq!(tiles.len(), m * n);
            // The same bf16 products summed in float32, in a different order.
            let scale = vectors
                .iter()
                .map(|v| v.abs())
                .fold(0f32, f32::max)
                .max(1.0);
            for (t, v) in tiles.iter().zip(&vectors) {
                assert!((t - v).abs() <= 1e-5 * scale, "{t} vs {v} ({m}x{k}x{n})");
            }
        }
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

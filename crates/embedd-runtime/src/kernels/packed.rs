//! Dense-layer weights packed at load into column strips, and the blocked product over them.
//!
//! A strip is 32 output columns; its weights for every `k` lie contiguous, so a micro-kernel
//! walks them in order. In the plain `k x n` layout the same walk jumps a whole row (several KiB)
//! per step of `k`: a new page at every step for the larger layers, and at batch 1, where each
//! weight is read once per pass, those TLB misses and the strided loads were a quarter of the
//! time. Both the float32 and the bfloat16 ([`super::bf16`]) kernels run through
//! [`tiled_product`].

use std::ops::Range;

use rayon::prelude::*;

use super::{DisjointWrites, Epilogue};

/// Output columns per vector register.
pub(crate) const LANES: usize = 16;
/// Columns per strip: two registers per row.
pub(crate) const STRIP: usize = 2 * LANES;
/// Rows per micro-kernel call.
pub(crate) const ROWS: usize = 8;
/// Rows per task: a block's inputs (at most 64 x 1536 floats, 384 KiB) stay in L2 while strips
/// pass over them. Without blocks, a batch of 800 rows streamed its inputs from L3 once per
/// strip, and the k = 1536 products ran at half speed.
const BLOCK_ROWS: usize = 64;

/// One call of a micro-kernel: rows `first..first + rows` (at most [`ROWS`]) of the output,
/// strip `strip`, steps `pass` of `k`; `accumulate` when an earlier pass wrote these sums.
pub(crate) struct Tile {
    pub first: usize,
    pub rows: usize,
    pub strip: usize,
    pub pass: Range<usize>,
    pub accumulate: bool,
}

/// Computes an `m x padded_width(n)` product one [`Tile`] at a time: tasks of a block of rows
/// and a strip, `depth` steps of `k` in passes of `pass_len` (whose weights stay in L1 while the
/// block's rows go by). `tile` writes through the pointer it is given: the output at the tile's
/// first row and strip, row stride `padded_width(n)`. After a tile's last pass, `epilogue`
/// runs on its `n` real columns.
///
/// The output is not zeroed first: clearing it was 3-5% of a bfloat16 forward pass.
///
/// # Safety
/// `tile` must write all of its tile (`rows` rows of [`STRIP`] floats) when not `accumulate`.
pub(crate) unsafe fn tiled_product(
    m: usize,
    n: usize,
    depth: usize,
    pass_len: usize,
    epilogue: Epilogue,
    tile: impl Fn(Tile, *mut f32) + Sync,
) -> Vec<f32> {
    epilogue.assert_width(n);
    let n_padded = padded_width(n);
    if depth == 0 {
        let mut out = vec![0f32; m * n_padded];
        for strip in 0..n_padded / STRIP {
            // SAFETY: the strip's columns of all `m` rows lie inside `out`, borrowed here alone.
            unsafe {
                epilogue.apply(
                    out.as_mut_ptr().add(strip * STRIP),
                    m,
                    n_padded,
                    strip_columns(strip, n),
                )
            };
        }
        return out;
    }
    let mut out = Vec::with_capacity(m * n_padded);
    let strips = n_padded / STRIP;
    let out_ptr = DisjointWrites::uninit(out.spare_capacity_mut());
    (0..m.div_ceil(BLOCK_ROWS) * strips)
        .into_par_iter()
        .for_each(|task| {
            let (block, strip) = (task / strips, task % strips);
            let block_rows = block * BLOCK_ROWS..m.min((block + 1) * BLOCK_ROWS);
            for_each_tile(block_rows, strip, depth, pass_len, |t| {
                // SAFETY: the offset is inside the buffer (first < m, strip < strips), and the
                // tile's columns of these rows belong to this task alone.
                let at = unsafe { out_ptr.at(t.first * n_padded + strip * STRIP) };
                let (rows, last) = (t.rows, t.pass.end == depth);
                tile(t, at);
                if last {
                    // SAFETY: the tile's rows of its strip were written just now, by this task.
                    unsafe { epilogue.apply(at, rows, n_padded, strip_columns(strip, n)) };
                }
            });
        });
    // SAFETY: the tiles cover every row of every strip, and the first pass (depth > 0) of each
    // wrote all of it (the caller's promise).
    unsafe { out.set_len(m * n_padded) };
    out
}

/// The tiles of rows `rows` of one strip, pass by pass over `depth` steps of `k` (`pass_len`
/// each), each pass's tiles in row order: the order that keeps a pass's weights in L1.
pub(crate) fn for_each_tile(
    rows: Range<usize>,
    strip: usize,
    depth: usize,
    pass_len: usize,
    mut tile: impl FnMut(Tile),
) {
    for start in (0..depth).step_by(pass_len) {
        let pass = start..depth.min(start + pass_len);
        for first in rows.clone().step_by(ROWS) {
            tile(Tile {
                first,
                rows: ROWS.min(rows.end - first),
                strip,
                pass: pass.clone(),
                accumulate: start > 0,
            });
        }
    }
}

/// The real columns (of `n`) of strip `strip`: the last strip's padding is left out.
pub(crate) fn strip_columns(strip: usize, n: usize) -> Range<usize> {
    strip * STRIP..n.min((strip + 1) * STRIP)
}

/// `n` columns rounded up to whole strips: the row stride of a packed product.
pub(crate) fn padded_width(n: usize) -> usize {
    n.div_ceil(STRIP) * STRIP
}

/// Drops the padding columns of an `m x padded_width(n)` product, leaving `m x n`.
pub(crate) fn unpad(mut out: Vec<f32>, m: usize, n: usize) -> Vec<f32> {
    let n_padded = padded_width(n);
    if n_padded != n {
        for r in 0..m {
            out.copy_within(r * n_padded..r * n_padded + n, r * n);
        }
        out.truncate(m * n);
    }
    out
}

/// Calls `kernel::<R>(args)` with a tile's row count (1 to [`ROWS`]) as the constant `R`: a
/// micro-kernel that knows it at compile time unrolls its row loop with no test per row (those
/// tests were a third of the bfloat16 kernel's instructions).
#[cfg(target_arch = "x86_64")]
macro_rules! with_row_count {
    ($rows:expr, $($kernel:ident)::+($($arg:expr),* $(,)?)) => {
        match $rows {
            8 => $($kernel)::+::<8>($($arg),*),
            7 => $($kernel)::+::<7>($($arg),*),
            6 => $($kernel)::+::<6>($($arg),*),
            5 => $($kernel)::+::<5>($($arg),*),
            4 => $($kernel)::+::<4>($($arg),*),
            3 => $($kernel)::+::<3>($($arg),*),
            2 => $($kernel)::+::<2>($($arg),*),
            1 => $($kernel)::+::<1>($($arg),*),
            rows => panic!("a tile has 1 to 8 rows, not {rows}"),
        }
    };
}
#[cfg(target_arch = "x86_64")]
pub(crate) use with_row_count;

/// Steps of `k` per pass of the float32 kernel: a strip's weights for a pass (192 x 32 floats,
/// 24 KiB) stay in L1.
const F32_PASS: usize = 192;

/// A `k x n` float32 weight (the transposed Linear weight) packed for [`PackedF32::matmul`].
pub struct PackedF32 {
    k: usize,
    n: usize,
    /// Per strip, per step of `k`: the strip's 32 weights.
    data: Vec<f32>,
}

impl PackedF32 {
    /// Whether this CPU runs the packed float32 kernel (AVX-512F).
    pub fn available() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            super::cpu_has_avx512()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }

    /// Packs `w` (`k x n`, row-major).
    pub fn pack(w: &[f32], k: usize, n: usize) -> Self {
        assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
        let mut data = vec![0f32; padded_width(n) * k];
        for (s, strip) in data.chunks_exact_mut(k * STRIP).enumerate() {
            let columns = s * STRIP..n.min((s + 1) * STRIP);
            for (t, dst) in strip.chunks_exact_mut(STRIP).enumerate() {
                dst[..columns.len()]
                    .copy_from_slice(&w[t * n + columns.start..t * n + columns.end]);
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

    /// The weight back in its `k x n` row-major layout.
    pub fn unpack(&self) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        let mut w = vec![0f32; k * n];
        for (s, strip) in self.data.chunks_exact(k * STRIP).enumerate() {
            let columns = s * STRIP..n.min((s + 1) * STRIP);
            for (t, src) in strip.chunks_exact(STRIP).enumerate() {
                w[t * n + columns.start..t * n + columns.end]
                    .copy_from_slice(&src[..columns.len()]);
            }
        }
        w
    }

    /// `x · w` for `x` of `m x k`: `m x n`. Call only where [`Self::available`].
    pub fn matmul(&self, x: &[f32], m: usize) -> Vec<f32> {
        self.matmul_with(x, m, Epilogue::default())
    }

    /// [`Self::matmul`] with `epilogue` applied to each tile after its last pass.
    pub fn matmul_with(&self, x: &[f32], m: usize, epilogue: Epilogue) -> Vec<f32> {
        let (k, n) = (self.k, self.n);
        assert_eq!(x.len(), m * k, "lhs is not {m} x {k}");
        assert!(
            Self::available(),
            "packed float32 matmul on a CPU without AVX-512"
        );
        let stride = padded_width(n);
        let kernel = |tile: Tile, at: *mut f32| {
            let strip = &self.data[tile.strip * k * STRIP..][..k * STRIP];
            let weights = &strip[tile.pass.start * STRIP..tile.pass.end * STRIP];
            let inputs = &x[tile.first * k..(tile.first + tile.rows) * k];
            // SAFETY: AVX-512F was checked above; `at` is valid for the tile's rows of 32
            // (see `tiled_product`).
            #[cfg(target_arch = "x86_64")]
            unsafe {
                with_row_count!(
                    tile.rows,
                    x86::strip_kernel(inputs, k, tile.pass, weights, at, stride, tile.accumulate)
                )
            };
        };
        // SAFETY: the kernel writes its whole tile on a first pass.
        let out = unsafe { tiled_product(m, n, k, F32_PASS, epilogue, kernel) };
        unpad(out, m, n)
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod x86 {
    use std::arch::x86_64::*;

    use super::{LANES, STRIP};

    /// A tile's sums: per row, its 32 columns in two registers.
    pub type Sums<const R: usize> = [[__m512; 2]; R];

    /// The sums a pass starts from: zeros on a tile's first pass, what the earlier ones wrote
    /// otherwise.
    ///
    /// # Safety
    /// AVX-512F; with `accumulate`, `out` must be valid for R rows of 32 (row stride `stride`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn start_sums<const R: usize>(
        out: *const f32,
        stride: usize,
        accumulate: bool,
    ) -> Sums<R> {
        let mut sums = [[_mm512_setzero_ps(); 2]; R];
        if accumulate {
            for (r, row) in sums.iter_mut().enumerate() {
                // SAFETY: per the caller.
                unsafe {
                    row[0] = _mm512_loadu_ps(out.add(r * stride));
                    row[1] = _mm512_loadu_ps(out.add(r * stride + LANES));
                }
            }
        }
        sums
    }

    /// # Safety
    /// AVX-512F; `out` must be valid for R rows of 32 (row stride `stride`).
    #[target_feature(enable = "avx512f")]
    #[inline]
    pub unsafe fn store_sums<const R: usize>(sums: &Sums<R>, out: *mut f32, stride: usize) {
        for (r, row) in sums.iter().enumerate() {
            // SAFETY: per the caller.
            unsafe {
                _mm512_storeu_ps(out.add(r * stride), row[0]);
                _mm512_storeu_ps(out.add(r * stride + LANES), row[1]);
            }
        }
    }

    /// Steps `pass` of `k` for R rows of `x` (`k` per row) times the same steps of one strip
    /// (`w`, starting at the pass), written to `out` (row stride `stride`), or added to it where
    /// `accumulate`.
    ///
    /// # Safety
    /// AVX-512F; `out` must be valid for R rows of 32.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn strip_kernel<const R: usize>(
        x: &[f32],
        k: usize,
        pass: std::ops::Range<usize>,
        w: &[f32],
        out: *mut f32,
        stride: usize,
        accumulate: bool,
    ) {
        assert!(w.len() >= pass.len() * STRIP && x.len() >= R * k && pass.end <= k);
        // SAFETY: per the caller.
        let mut sums = unsafe { start_sums::<R>(out, stride, accumulate) };
        let (wp, xp) = (w.as_ptr(), x.as_ptr());
        for (i, t) in pass.enumerate() {
            // SAFETY: w holds the pass's steps, 32 floats each, and x holds R rows of k
            // (asserted).
            unsafe {
                let b0 = _mm512_loadu_ps(wp.add(i * STRIP));
                let b1 = _mm512_loadu_ps(wp.add(i * STRIP + LANES));
                for (r, row) in sums.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*xp.add(r * k + t));
                    row[0] = _mm512_fmadd_ps(a, b0, row[0]);
                    row[1] = _mm512_fmadd_ps(a, b1, row[1]);
                }
            }
        }
        // SAFETY: per the caller.
        unsafe { store_sums(&sums, out, stride) };
    }
}

/// A product for the kernels' tests: `x` (`m x k`) times `w` (`k x n`).
#[cfg(test)]
pub(crate) struct TestProduct {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub x: Vec<f32>,
    pub w: Vec<f32>,
}

/// The products the kernels' tests run: ragged strips, several row blocks and several passes
/// over k (70 and 130 rows), and row counts that together leave every tail length (1 to 7 rows)
/// for the micro-kernels.
#[cfg(test)]
pub(crate) fn test_products() -> Vec<TestProduct> {
    [
        (1, 7, 5),
        (13, 64, 40),
        (9, 384, 96),
        (70, 801, 40),
        (130, 1536, 64),
        (3, 40, 33),
        (4, 48, 64),
        (7, 17, 70),
    ]
    .into_iter()
    .map(|(m, k, n)| TestProduct {
        m,
        k,
        n,
        x: (0..m * k)
            .map(|i| ((i * 37) % 19) as f32 / 9.0 - 1.0)
            .collect(),
        w: (0..k * n)
            .map(|i| ((i * 53) % 23) as f32 / 11.0 - 1.0)
            .collect(),
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packed_f32_matmul_matches_the_plain_product() {
        if !PackedF32::available() {
            eprintln!("skipped: this CPU has no AVX-512");
            return;
        }
        for TestProduct { m, k, n, x, w } in test_products() {
            let packed = PackedF32::pack(&w, k, n);
            assert_eq!(packed.unpack(), w);
            let got = packed.matmul(&x, m);
            let want = super::super::matmul(&x, m, k, &w, n);
            assert_eq!(got.len(), want.len());
            for (g, w) in got.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * w.abs().max(1.0),
                    "{g} vs {w} ({m}x{k}x{n})"
                );
            }
        }
    }

    /// The epilogue gives what the pass after the product gives: bias and activation on every
    /// column of every row, the padding columns of a partial strip left alone, in the float32
    /// kernel and both bfloat16 ones (vectors, and AMX tiles where `k` is whole tile steps).
    #[test]
    fn epilogues_match_the_separate_pass() {
        use crate::activation::Activation;
        use crate::kernels::{bf16, bias_activation, PackedBf16};
        let close = |got: &[f32], want: &[f32], what: &str| {
            assert_eq!(got.len(), want.len(), "{what}");
            for (g, w) in got.iter().zip(want) {
                assert!(
                    (g - w).abs() <= 1e-6 * w.abs().max(1.0),
                    "{g} vs {w} ({what})"
                );
            }
        };
        let mut products = test_products();
        products.push(TestProduct {
            m: 33,
            k: 64,
            n: 100,
            x: (0..33 * 64).map(|i| (i % 13) as f32 / 6.0 - 1.0).collect(),
            w: (0..64 * 100).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect(),
        });
        for TestProduct { m, k, n, x, w } in products {
            let bias: Vec<f32> = (0..n).map(|j| j as f32 / n as f32 - 0.5).collect();
            for activation in [None, Some(Activation::Gelu), Some(Activation::Silu)] {
                let epilogue = Epilogue {
                    bias: Some(&bias),
                    activation,
                    reduced: false,
                };
                let what = format!("{m}x{k}x{n} {activation:?}");
                if PackedF32::available() {
                    let packed = PackedF32::pack(&w, k, n);
                    let mut want = packed.matmul(&x, m);
                    bias_activation(&mut want, n, Some(&bias), activation);
                    close(&packed.matmul_with(&x, m, epilogue), &want, &what);
                }
                if bf16::available() {
                    let packed = PackedBf16::pack(&w, k, n);
                    let mut want = packed.matmul(&x, m);
                    bias_activation(&mut want, n, Some(&bias), activation);
                    close(&packed.matmul_with(&x, m, epilogue), &want, &what);
                    // GELU to bfloat16's digits.
                    let reduced = Epilogue {
                        reduced: true,
                        ..epilogue
                    };
                    let got = packed.matmul_with(&x, m, reduced);
                    for (g, w) in got.iter().zip(&want) {
                        assert!(
                            (g - w).abs() <= 3e-5 * w.abs().max(1.0),
                            "{g} vs {w} ({what})"
                        );
                    }
                }
            }
        }
    }
}

//! Dense layers: `x · Wᵀ` and the elementwise pass that follows it.

use rayon::prelude::*;

use super::{math, rows_per_task, simd_function};
use crate::activation::Activation;

/// `x · w` for `x` of `m x k` and `w` of `k x n`, both row-major: `m x n`.
///
/// Linear layers keep their weights transposed (`k x n`, the transpose of PyTorch's layout) for
/// this: gemm then reads the weight in place, where the PyTorch layout makes it repack the whole
/// weight on every call, which costs as much as the product itself for a single short input.
pub fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(x.len(), m * k, "lhs is not {m} x {k}");
    assert_eq!(w.len(), k * n, "weight is not {k} x {n}");
    let mut out = vec![0f32; m * n];
    if m == 0 || n == 0 {
        return out;
    }
    #[cfg(target_arch = "x86_64")]
    if m <= SMALL_ROWS && n.is_multiple_of(strips::WIDTH) && super::cpu_has_avx512() {
        strips::matmul(x, m, k, w, n, &mut out);
        return out;
    }
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 && m * n * k >= 1 << 15 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: the three buffers have the sizes asserted above, and the strides below stay inside
    // them: all three are row-major.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            n as isize,
            false,
            x.as_ptr(),
            1,
            k as isize,
            w.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            parallelism,
        );
    }
    out
}

/// Up to this many rows, products go through [`strips`]: gemm's own kernels leave the weight
/// unpacked for so few rows and read it column by column, which halves their speed.
const SMALL_ROWS: usize = 64;

/// `x · w` a strip of 32 output columns at a time: each step of `k` loads two vectors of the
/// strip's row of `w` (contiguous in the `k x n` layout) and adds them, scaled by a broadcast
/// `x` value, to the sums of up to eight rows. Strips are independent tasks.
#[cfg(target_arch = "x86_64")]
mod strips {
    use std::arch::x86_64::*;

    use rayon::prelude::*;

    use super::super::DisjointWrites;

    pub const WIDTH: usize = 32;
    const ROWS: usize = 8;

    /// Call only where the CPU has AVX-512F; `n` must be a multiple of [`WIDTH`].
    pub fn matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize, out: &mut [f32]) {
        assert!(
            n.is_multiple_of(WIDTH) && out.len() == m * n && x.len() == m * k && w.len() == k * n
        );
        let dst = DisjointWrites::new(out);
        (0..n / WIDTH).into_par_iter().for_each(|s| {
            for first in (0..m).step_by(ROWS) {
                let rows = ROWS.min(m - first);
                // SAFETY: AVX-512F was checked by the caller; the strip's columns of rows
                // first..first+rows are inside `out` and written by this task only.
                unsafe {
                    strip(
                        &x[first * k..(first + rows) * k],
                        rows,
                        k,
                        &w[s * WIDTH..],
                        n,
                        dst.at(first * n + s * WIDTH),
                    )
                }
            }
        });
    }

    /// # Safety
    /// AVX-512F; `w` holds `k` rows of stride `n` from its start with 32 readable values each;
    /// `out` is valid for `rows` rows of stride `n`, 32 values each.
    #[target_feature(enable = "avx512f")]
    unsafe fn strip(x: &[f32], rows: usize, k: usize, w: &[f32], n: usize, out: *mut f32) {
        let mut acc = [[_mm512_setzero_ps(); 2]; ROWS];
        let wp = w.as_ptr();
        for t in 0..k {
            // SAFETY: row t of the strip is inside `w` (see above).
            let (b0, b1) = unsafe {
                (
                    _mm512_loadu_ps(wp.add(t * n)),
                    _mm512_loadu_ps(wp.add(t * n + 16)),
                )
            };
            for (r, acc) in acc.iter_mut().enumerate().take(rows) {
                let a = _mm512_set1_ps(x[r * k + t]);
                acc[0] = _mm512_fmadd_ps(a, b0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, b1, acc[1]);
            }
        }
        for (r, acc) in acc.iter().enumerate().take(rows) {
            // SAFETY: the caller guarantees 32 writable floats at each row.
            unsafe {
                _mm512_storeu_ps(out.add(r * n), acc[0]);
                _mm512_storeu_ps(out.add(r * n + 16), acc[1]);
            }
        }
    }
}

simd_function! {
    fn bias_activation_rows(rows: &mut [f32], bias: Option<&[f32]>, activation: Option<Activation>) {
        let n = bias.map_or(rows.len(), <[f32]>::len);
        for row in rows.chunks_exact_mut(n) {
            bias_activation_row(row, bias, activation);
        }
    }
}

/// `row += bias`, then `activation`, in one pass (`bias` as long as `row`).
#[inline(always)]
fn bias_activation_row(row: &mut [f32], bias: Option<&[f32]>, activation: Option<Activation>) {
    match activation {
        None => map_row(row, bias, |v| v),
        Some(Activation::Gelu) => map_row(row, bias, math::gelu),
        Some(Activation::GeluTanh) => map_row(row, bias, math::gelu_tanh),
        Some(Activation::Relu) => map_row(row, bias, math::relu),
        Some(Activation::Silu) => map_row(row, bias, math::silu),
        Some(Activation::QuickGelu) => map_row(row, bias, math::quick_gelu),
    }
}

/// `row[i] = f(row[i] + bias[i])`, a vector register's worth at a time: a loop over the whole
/// row vectorizes four registers per step and leaves a 32-column tile to its scalar tail.
#[inline(always)]
fn map_row(row: &mut [f32], bias: Option<&[f32]>, f: impl Fn(f32) -> f32) {
    let mut chunks = row.chunks_exact_mut(math::LANES);
    let mut at = 0;
    for chunk in &mut chunks {
        let chunk: &mut [f32; math::LANES] = chunk.try_into().expect("whole chunk");
        match bias {
            Some(bias) => {
                let b: &[f32; math::LANES] =
                    bias[at..at + math::LANES].try_into().expect("whole chunk");
                for i in 0..math::LANES {
                    chunk[i] = f(chunk[i] + b[i]);
                }
            }
            None => {
                for v in chunk.iter_mut() {
                    *v = f(*v);
                }
            }
        }
        at += math::LANES;
    }
    for (i, v) in chunks.into_remainder().iter_mut().enumerate() {
        *v = f(*v + bias.map_or(0.0, |b| b[at + i]));
    }
}

/// What a packed product applies to each block of its output as the block is finished, while
/// it is still in L1: the layer's bias and activation. A separate pass afterwards read the whole
/// output back from L2 or L3, one more parallel dispatch per layer.
#[derive(Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// One per output column.
    pub bias: Option<&'a [f32]>,
    pub activation: Option<Activation>,
    /// The output is rounded to bfloat16 before anything reads it (a bfloat16 product's
    /// input): GELU then needs only bfloat16's digits ([`math::gelu_reduced`]).
    pub reduced: bool,
}

impl Epilogue<'_> {
    pub fn is_empty(&self) -> bool {
        self.bias.is_none() && self.activation.is_none()
    }

    /// Panics unless the bias (if any) has one value per column of an `n`-wide output.
    pub(crate) fn assert_width(&self, n: usize) {
        if let Some(bias) = self.bias {
            assert_eq!(bias.len(), n, "bias length");
        }
    }

    /// Applies it to `rows` rows of columns `columns` of an output whose row stride is `stride`,
    /// the first row at `at` (column `columns.start`).
    ///
    /// # Safety
    /// `at` must be valid for `rows` rows of `columns.len()` floats at stride `stride`, written
    /// by this task alone while it runs.
    pub(crate) unsafe fn apply(
        &self,
        at: *mut f32,
        rows: usize,
        stride: usize,
        columns: std::ops::Range<usize>,
    ) {
        if self.is_empty() || columns.is_empty() {
            return;
        }
        let bias = self.bias.map(|b| &b[columns.clone()]);
        let activation = match self.activation {
            Some(Activation::Gelu) if self.reduced => Some(TileActivation::GeluReduced),
            other => other.map(TileActivation::Exact),
        };
        epilogue_tile(at, rows, stride, columns.len(), bias, activation);
    }
}

/// An epilogue's activation: the exact one, or GELU to bfloat16's precision.
#[derive(Clone, Copy)]
enum TileActivation {
    Exact(Activation),
    GeluReduced,
}

simd_function! {
    /// One call per tile, not per row: each call sets up the activation's constants again,
    /// which for a 32-column row cost as much as the row.
    ///
    /// Safety (a contract the macro's safe signature cannot carry, kept by [`Epilogue::apply`],
    /// its one caller): `at` is valid for `rows` rows of `width` floats at stride `stride`,
    /// written by the calling task alone.
    fn epilogue_tile(
        at: *mut f32,
        rows: usize,
        stride: usize,
        width: usize,
        bias: Option<&[f32]>,
        activation: Option<TileActivation>,
    ) {
        for r in 0..rows {
            // SAFETY: per the contract above.
            let row = unsafe { std::slice::from_raw_parts_mut(at.add(r * stride), width) };
            match activation {
                Some(TileActivation::GeluReduced) => map_row(row, bias, math::gelu_reduced),
                Some(TileActivation::Exact(activation)) => {
                    bias_activation_row(row, bias, Some(activation))
                }
                None => bias_activation_row(row, bias, None),
            }
        }
    }
}

/// Adds `bias` (length `n`) to every row of `out` and applies `activation`, in one pass.
pub fn bias_activation(
    out: &mut [f32],
    n: usize,
    bias: Option<&[f32]>,
    activation: Option<Activation>,
) {
    if bias.is_none() && activation.is_none() {
        return;
    }
    if let Some(b) = bias {
        assert_eq!(b.len(), n, "bias length");
    }
    out.par_chunks_mut(rows_per_task(n) * n)
        .for_each(|rows| bias_activation_rows(rows, bias, activation));
}

simd_function! {
    fn gated_rows(
        both: &[f32],
        out: &mut [f32],
        width: usize,
        activation: Activation,
        gate_first: bool,
    ) {
        for (pair, row) in both.chunks_exact(2 * width).zip(out.chunks_exact_mut(width)) {
            let (first, second) = pair.split_at(width);
            let (gate, value) = if gate_first { (first, second) } else { (second, first) };
            match activation {
                Activation::Gelu => {
                    for ((o, g), v) in row.iter_mut().zip(gate).zip(value) {
                        *o = math::gelu(*g) * v;
                    }
                }
                Activation::GeluTanh => {
                    for ((o, g), v) in row.iter_mut().zip(gate).zip(value) {
                        *o = math::gelu_tanh(*g) * v;
                    }
                }
                Activation::Relu => {
                    for ((o, g), v) in row.iter_mut().zip(gate).zip(value) {
                        *o = math::relu(*g) * v;
                    }
                }
                Activation::Silu => {
                    for ((o, g), v) in row.iter_mut().zip(gate).zip(value) {
                        *o = math::silu(*g) * v;
                    }
                }
                Activation::QuickGelu => {
                    for ((o, g), v) in row.iter_mut().zip(gate).zip(value) {
                        *o = math::quick_gelu(*g) * v;
                    }
                }
            }
        }
    }
}

/// GLU feed-forward: rows of `both` are `[gate | value]` (`[value | gate]` unless
/// `gate_first`), each `width` wide; returns `activation(gate) * value` per row.
pub fn gated_activation(
    both: &[f32],
    width: usize,
    activation: Activation,
    gate_first: bool,
) -> Vec<f32> {
    let rows = both.len() / (2 * width);
    let mut out = vec![0f32; rows * width];
    let per_task = rows_per_task(width);
    out.par_chunks_mut(per_task * width)
        .zip(both.par_chunks(per_task * 2 * width))
        .for_each(|(out, both)| gated_rows(both, out, width, activation, gate_first));
    out
}

simd_function! {
    fn residual_layer_norm_rows(
        rows: &mut [f32],
        residual: &[f32],
        bias: Option<&[f32]>,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        let n = gamma.len();
        for (row, res) in rows.chunks_exact_mut(n).zip(residual.chunks_exact(n)) {
            match bias {
                Some(bias) => {
                    for ((v, r), b) in row.iter_mut().zip(res).zip(bias) {
                        *v += r + b;
                    }
                }
                None => {
                    for (v, r) in row.iter_mut().zip(res) {
                        *v += r;
                    }
                }
            }
            normalize(row, gamma, beta, eps);
        }
    }
}

#[inline(always)]
fn normalize(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len();
    let mean = math::sum(row) / n as f32;
    row.iter_mut().for_each(|v| *v -= mean);
    let mut squares = [0f32; math::LANES];
    let chunks = row.chunks_exact(math::LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for i in 0..math::LANES {
            squares[i] += c[i] * c[i];
        }
    }
    let var = (squares.iter().sum::<f32>() + tail) / n as f32;
    let inv = 1.0 / (var + eps).sqrt();
    for ((v, g), b) in row.iter_mut().zip(gamma).zip(beta) {
        *v = *v * inv * g + b;
    }
}

simd_function! {
    fn layer_norm_column_rows(
        rows: &mut [f32],
        row_len: usize,
        column: usize,
        gamma: &[f32],
        beta: &[f32],
        eps: f32,
    ) {
        for row in rows.chunks_exact_mut(row_len) {
            normalize(&mut row[column..column + gamma.len()], gamma, beta, eps);
        }
    }
}

/// LayerNorm, in place, of columns `column..column + gamma.len()` of every row (`row_len`
/// wide): a norm over one part of fused projections, as the query of `[q | k | v]`.
pub fn layer_norm_columns(
    out: &mut [f32],
    row_len: usize,
    column: usize,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    assert!(column + gamma.len() <= row_len, "columns outside the row");
    assert_eq!(beta.len(), gamma.len(), "LayerNorm beta length");
    out.par_chunks_mut(rows_per_task(row_len) * row_len)
        .for_each(|rows| layer_norm_column_rows(rows, row_len, column, gamma, beta, eps));
}

/// `out = LayerNorm(out + bias + residual)` row by row, in place (post-norm residual blocks).
pub fn bias_residual_layer_norm(
    out: &mut [f32],
    residual: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) {
    let n = gamma.len();
    assert_eq!(out.len(), residual.len(), "residual shape");
    assert_eq!(beta.len(), n, "LayerNorm beta length");
    let per_task = rows_per_task(n) * n;
    out.par_chunks_mut(per_task)
        .zip(residual.par_chunks(per_task))
        .for_each(|(rows, res)| residual_layer_norm_rows(rows, res, bias, gamma, beta, eps));
}

simd_function! {
    /// `beta` `None`: RMSNorm, else LayerNorm.
    fn pre_norm_rows(
        x: &mut [f32],
        update: &[f32],
        bias: Option<&[f32]>,
        normed: &mut [f32],
        gamma: &[f32],
        beta: Option<&[f32]>,
        eps: f32,
    ) {
        let n = gamma.len();
        for ((row, add), out) in x
            .chunks_exact_mut(n)
            .zip(update.chunks_exact(n))
            .zip(normed.chunks_exact_mut(n))
        {
            match bias {
                Some(bias) => {
                    for ((v, a), b) in row.iter_mut().zip(add).zip(bias) {
                        *v += a + b;
                    }
                }
                None => {
                    for (v, a) in row.iter_mut().zip(add) {
                        *v += a;
                    }
                }
            }
            out.copy_from_slice(row);
            match beta {
                Some(beta) => normalize(out, gamma, beta, eps),
                None => rms_normalize(out, gamma, eps),
            }
        }
    }
}

fn residual_then_norm(
    x: &mut [f32],
    update: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: Option<&[f32]>,
    eps: f32,
) -> Vec<f32> {
    let n = gamma.len();
    assert_eq!(x.len(), update.len(), "residual shape");
    if let Some(beta) = beta {
        assert_eq!(beta.len(), n, "LayerNorm beta length");
    }
    let mut normed = vec![0f32; x.len()];
    let per_task = rows_per_task(n) * n;
    x.par_chunks_mut(per_task)
        .zip(update.par_chunks(per_task))
        .zip(normed.par_chunks_mut(per_task))
        .for_each(|((x, update), normed)| pre_norm_rows(x, update, bias, normed, gamma, beta, eps));
    normed
}

/// The residual step of a pre-norm block: `x += update + bias` in place, and returns
/// `LayerNorm(x)` for the next sub-block, in one pass over the rows.
pub fn residual_then_layer_norm(
    x: &mut [f32],
    update: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> Vec<f32> {
    residual_then_norm(x, update, bias, gamma, Some(beta), eps)
}

/// [`residual_then_layer_norm`] with an RMSNorm (`x / rms(x) · gamma`).
pub fn residual_then_rms_norm(
    x: &mut [f32],
    update: &[f32],
    bias: Option<&[f32]>,
    gamma: &[f32],
    eps: f32,
) -> Vec<f32> {
    residual_then_norm(x, update, bias, gamma, None, eps)
}

#[inline(always)]
fn rms_normalize(row: &mut [f32], gamma: &[f32], eps: f32) {
    let mut squares = [0f32; math::LANES];
    let chunks = row.chunks_exact(math::LANES);
    let tail: f32 = chunks.remainder().iter().map(|v| v * v).sum();
    for c in chunks {
        for i in 0..math::LANES {
            squares[i] += c[i] * c[i];
        }
    }
    let mean = (squares.iter().sum::<f32>() + tail) / row.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for (v, g) in row.iter_mut().zip(gamma) {
        *v = *v * inv * g;
    }
}

simd_function! {
    fn rms_norm_column_rows(
        rows: &mut [f32],
        row_len: usize,
        column: usize,
        parts: usize,
        gamma: &[f32],
        eps: f32,
    ) {
        let n = gamma.len();
        for row in rows.chunks_exact_mut(row_len) {
            for part in row[column..column + parts * n].chunks_exact_mut(n) {
                rms_normalize(part, gamma, eps);
            }
        }
    }
}

/// RMSNorm, in place, of `parts` consecutive runs of `gamma.len()` columns from `column` in
/// every row (`row_len` wide): the whole row, or each head of a query or key projection.
pub fn rms_norm_columns(
    out: &mut [f32],
    row_len: usize,
    column: usize,
    parts: usize,
    gamma: &[f32],
    eps: f32,
) {
    assert!(
        column + parts * gamma.len() <= row_len,
        "columns outside the row"
    );
    out.par_chunks_mut(rows_per_task(row_len) * row_len)
        .for_each(|rows| rms_norm_column_rows(rows, row_len, column, parts, gamma, eps));
}

/// `RMSNorm(x)` of every row (`gamma.len()` wide) into a new buffer.
pub fn rms_norm(x: &[f32], gamma: &[f32], eps: f32) -> Vec<f32> {
    let mut normed = x.to_vec();
    rms_norm_columns(&mut normed, gamma.len(), 0, 1, gamma, eps);
    normed
}

/// `LayerNorm(x)` of every row (`gamma.len()` wide) into a new buffer, `x` left as it is.
pub fn layer_norm(x: &[f32], gamma: &[f32], beta: &[f32], eps: f32) -> Vec<f32> {
    let mut normed = x.to_vec();
    layer_norm_columns(&mut normed, gamma.len(), 0, gamma, beta, eps);
    normed
}

/// `x += update + bias` row by row (a residual step with nothing normalized after it).
pub fn residual_add(x: &mut [f32], update: &[f32], bias: Option<&[f32]>) {
    assert_eq!(x.len(), update.len(), "residual shape");
    let n = bias.map_or(x.len().max(1), <[f32]>::len);
    let per_task = rows_per_task(n) * n;
    x.par_chunks_mut(per_task)
        .zip(update.par_chunks(per_task))
        .for_each(|(x, update)| match bias {
            Some(bias) => {
                for (row, add) in x.chunks_exact_mut(n).zip(update.chunks_exact(n)) {
                    for ((v, a), b) in row.iter_mut().zip(add).zip(bias) {
                        *v += a + b;
                    }
                }
            }
            None => x.iter_mut().zip(update).for_each(|(v, a)| *v += a),
        });
}

simd_function! {
    fn low_rank_rows(
        x: &[f32],
        out: &mut [f32],
        k: usize,
        a: &[f32],
        b_t: &[f32],
        scale: f32,
    ) {
        let n = b_t.len() / (a.len() / k);
        for (x, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(n)) {
            for (a, b) in a.chunks_exact(k).zip(b_t.chunks_exact(n)) {
                let mut dot = 0f32;
                for (x, a) in x.iter().zip(a) {
                    dot += x * a;
                }
                let coefficient = dot * scale;
                for (o, b) in out.iter_mut().zip(b) {
                    *o += coefficient * b;
                }
            }
        }
    }
}

/// `out += scale · (x · Aᵀ) · Bᵀ` for rows of `x` (`k` wide): a low-rank (LoRA) update.
/// `a` is `rank x k` and `b_t` (Bᵀ) is `rank x n`, both row-major. With a rank of a few, each row
/// is `rank` dot products and `rank` scaled additions, cheaper than any matrix-product setup.
pub fn low_rank_update(x: &[f32], k: usize, a: &[f32], b_t: &[f32], scale: f32, out: &mut [f32]) {
    let rank = a.len() / k;
    assert_eq!(a.len(), rank * k, "A shape");
    assert!(rank > 0 && b_t.len().is_multiple_of(rank), "B shape");
    let n = b_t.len() / rank;
    assert_eq!(x.len() / k, out.len() / n, "rows of x and out");
    let rows = rows_per_task(n.max(k));
    out.par_chunks_mut(rows * n)
        .zip(x.par_chunks(rows * k))
        .for_each(|(out, x)| low_rank_rows(x, out, k, a, b_t, scale));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_matmul(x: &[f32], m: usize, k: usize, w: &[f32], n: usize) -> Vec<f32> {
        let mut out = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                out[i * n + j] = (0..k).map(|t| x[i * k + t] * w[t * n + j]).sum();
            }
        }
        out
    }

    fn pseudo_random(len: usize, seed: u32) -> Vec<f32> {
        let mut s = seed.wrapping_mul(2_654_435_761).max(1);
        (0..len)
            .map(|_| {
                s ^= s << 13;
                s ^= s >> 17;
                s ^= s << 5;
                (s % 2000) as f32 / 1000.0 - 1.0
            })
            .collect()
    }

    #[test]
    fn matmul_matches_the_definition() {
        // The last two take the small-row strip kernel where the CPU has AVX-512.
        for (m, k, n) in [
            (1, 3, 2),
            (7, 33, 5),
            (40, 64, 48),
            (9, 70, 64),
            (64, 40, 96),
        ] {
            let x = pseudo_random(m * k, 1);
            let w = pseudo_random(n * k, 2);
            let got = matmul(&x, m, k, &w, n);
            let want = naive_matmul(&x, m, k, &w, n);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-4, "{g} vs {w}");
            }
        }
    }

    #[test]
    fn low_rank_update_adds_scaled_x_a_t_b_t() {
        let (m, k, r, n) = (5, 7, 3, 6);
        let x = pseudo_random(m * k, 3);
        let a = pseudo_random(r * k, 4);
        let b_t = pseudo_random(r * n, 5);
        let base = pseudo_random(m * n, 6);
        let mut out = base.clone();
        low_rank_update(&x, k, &a, &b_t, 0.25, &mut out);
        // x·Aᵀ is m x r; A is r x k, so Aᵀ as a k x r matrix is its transpose.
        let a_t: Vec<f32> = (0..k * r).map(|i| a[(i % r) * k + i / r]).collect();
        let xa = naive_matmul(&x, m, k, &a_t, r);
        let delta = naive_matmul(&xa, m, r, &b_t, n);
        for ((o, b), d) in out.iter().zip(&base).zip(&delta) {
            assert!((o - (b + 0.25 * d)).abs() < 1e-4, "{o} vs {}", b + 0.25 * d);
        }
    }

    #[test]
    fn bias_gelu_and_gated_rows() {
        let mut rows = vec![0.0f32, 1.0, -1.0, 2.0];
        bias_activation(&mut rows, 2, Some(&[1.0, 0.0]), Some(Activation::Gelu));
        let want = [1.0f32, 1.0, 0.0, 2.0].map(math::gelu);
        assert_eq!(rows, want);
        let both = vec![1.0f32, 2.0, 3.0, 4.0];
        assert_eq!(
            gated_activation(&both, 2, Activation::Relu, true),
            vec![3.0, 8.0]
        );
        let both = vec![1.0f32, 2.0, -3.0, 4.0];
        assert_eq!(
            gated_activation(&both, 2, Activation::Relu, false),
            vec![0.0, 8.0]
        );
    }

    #[test]
    fn pre_norm_residual_updates_x_and_normalizes_a_copy() {
        let mut x = vec![1.0f32, 2.0, 3.0, 10.0, 10.0, 10.0];
        let update = vec![1.0f32, 1.0, 1.0, 2.0, 3.0, 4.0];
        let (gamma, beta) = ([1.0f32, 1.0, 2.0], [0.0f32, 0.5, 0.0]);
        let normed = residual_then_layer_norm(
            &mut x,
            &update,
            Some(&[0.0, 0.0, 0.0]),
            &gamma,
            &beta,
            1e-12,
        );
        assert_eq!(x, vec![2.0, 3.0, 4.0, 12.0, 13.0, 14.0]);
        assert_eq!(normed, layer_norm(&x, &gamma, &beta, 1e-12));
        let z = 1.224_744_9f32;
        for row in normed.chunks(3) {
            assert!((row[0] + z).abs() < 1e-5 && (row[1] - 0.5).abs() < 1e-5);
            assert!((row[2] - 2.0 * z).abs() < 1e-5, "{row:?}");
        }
        residual_add(&mut x, &update, Some(&[1.0, 0.0, 0.0]));
        assert_eq!(x, vec![4.0, 4.0, 5.0, 15.0, 16.0, 18.0]);
        residual_add(&mut x, &update, None);
        assert_eq!(x, vec![5.0, 5.0, 6.0, 17.0, 19.0, 22.0]);
    }

    #[test]
    fn rms_norm_scales_each_part_to_unit_mean_square() {
        // Two heads of 2 in a row of 5: columns 1..5 normalized per head, column 0 untouched.
        let mut rows = vec![7.0f32, 3.0, 4.0, 1.0, 1.0];
        rms_norm_columns(&mut rows, 5, 1, 2, &[1.0, 2.0], 0.0);
        let r = (12.5f32).sqrt();
        let want = [7.0, 3.0 / r, 8.0 / r, 1.0, 2.0];
        for (g, w) in rows.iter().zip(want) {
            assert!((g - w).abs() < 1e-6, "{rows:?}");
        }
        let mut x = vec![1.0f32, 1.0];
        let normed = residual_then_rms_norm(&mut x, &[2.0, 3.0], None, &[1.0, 1.0], 0.0);
        assert_eq!(x, vec![3.0, 4.0]);
        assert_eq!(normed, rms_norm(&x, &[1.0, 1.0], 0.0));
        let r = (12.5f32).sqrt();
        assert!((normed[0] - 3.0 / r).abs() < 1e-6 && (normed[1] - 4.0 / r).abs() < 1e-6);
    }

    #[test]
    fn residual_layer_norm_normalizes_each_row() {
        let mut out = vec![1.0f32, 2.0, 3.0, 10.0, 10.0, 10.0];
        let residual = vec![0.0f32, 0.0, 0.0, 1.0, 2.0, 3.0];
        bias_residual_layer_norm(
            &mut out,
            &residual,
            Some(&[1.0, 1.0, 1.0]),
            &[1.0, 1.0, 2.0],
            &[0.0, 0.5, 0.0],
            1e-12,
        );
        // Row 0 is 2,3,4 and row 1 is 12,13,14: both normalize to -1.2247, 0, 1.2247.
        let z = 1.224_744_9f32;
        for row in out.chunks(3) {
            assert!((row[0] + z).abs() < 1e-5 && (row[1] - 0.5).abs() < 1e-5);
            assert!((row[2] - 2.0 * z).abs() < 1e-5, "{row:?}");
        }
    }
}

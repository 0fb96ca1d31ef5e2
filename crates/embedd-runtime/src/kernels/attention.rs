//! Multi-head self-attention over packed sequences, one (sequence, head) pair per task.

use rayon::prelude::*;

use super::{math, simd_function, DisjointWrites};

/// Sizes for [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
}

/// Query rows per score block: a block holds at most this many scores, so an 8192-token input
/// needs 16 MiB per worker instead of a 256 MiB `seq x seq` matrix per head.
const BLOCK_SCORES: usize = 1 << 22;

/// Self-attention for sequences packed row after row in `qkv` (each row `[q | k | v]`, each
/// `heads * head_dim` wide); `offsets` holds each sequence's first row plus the total at the
/// end, and every row of sequence `s` attends to its first `keys[s]` rows (all of them, unless
/// trailing rows are input that is not attended to, as ColBERT's query [MASK]s).
/// `alibi_slopes` (one per head) adds `-slope * |i - j|` to the scores. Returns the context
/// rows, `heads * head_dim` wide, in the same packed order.
pub fn attention(
    qkv: &[f32],
    offsets: &[usize],
    keys: &[usize],
    shape: AttentionShape,
    alibi_slopes: Option<&[f32]>,
) -> Vec<f32> {
    let h = shape.heads * shape.head_dim;
    let total = offsets.last().copied().unwrap_or(0);
    assert_eq!(qkv.len(), total * 3 * h, "qkv is not {total} x {}", 3 * h);
    if let Some(s) = alibi_slopes {
        assert_eq!(s.len(), shape.heads, "one ALiBi slope per head");
    }
    let mut out = vec![0f32; total * h];
    let out_ptr = DisjointWrites::new(&mut out);
    let sequences = offsets.len().saturating_sub(1);
    assert_eq!(keys.len(), sequences, "one key count per sequence");
    (0..sequences * shape.heads)
        .into_par_iter()
        .for_each_init(Vec::new, |scores, task| {
            let (seq, head) = (task / shape.heads, task % shape.heads);
            let rows = Rows {
                first: offsets[seq],
                len: offsets[seq + 1] - offsets[seq],
                keys: keys[seq].min(offsets[seq + 1] - offsets[seq]),
            };
            let slope = alibi_slopes.map(|s| s[head]);
            // SAFETY: (seq, head) pairs are distinct per task, so their output blocks are too.
            unsafe { attend_one(qkv, out_ptr, rows, head, h, shape, slope, scores) }
        });
    out
}

/// One sequence's rows in the packed buffers.
#[derive(Clone, Copy)]
struct Rows {
    first: usize,
    len: usize,
    /// Leading rows attended to.
    keys: usize,
}

/// # Safety
/// `out` must be valid for `(first + len) * h` floats, and no other task may write rows
/// `first..first + len`, columns of `head`.
#[allow(clippy::too_many_arguments)]
unsafe fn attend_one(
    qkv: &[f32],
    out: DisjointWrites,
    Rows { first, len, keys }: Rows,
    head: usize,
    h: usize,
    shape: AttentionShape,
    slope: Option<f32>,
    scores: &mut Vec<f32>,
) {
    if keys == 0 {
        return;
    }
    let d = shape.head_dim;
    let row = 3 * h as isize;
    let base = first * 3 * h + head * d;
    let (q, k, v) = (
        qkv[base..].as_ptr(),
        qkv[base + h..].as_ptr(),
        qkv[base + 2 * h..].as_ptr(),
    );
    let block = (BLOCK_SCORES / keys).clamp(1, len);
    for start in (0..len).step_by(block) {
        let rows = block.min(len - start);
        scores.clear();
        scores.resize(rows * keys, 0.0);
        // SAFETY: q rows start..start+rows and all len k rows lie inside this sequence's block of
        // qkv; scores holds rows x len.
        unsafe {
            gemm::gemm(
                rows,
                keys,
                d,
                scores.as_mut_ptr(),
                1,
                keys as isize,
                false,
                q.offset(start as isize * row),
                1,
                row,
                k,
                row,
                1,
                0.0,
                shape.scale,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(scores, keys, start, slope.unwrap_or(0.0));
        // SAFETY: the destination is this task's rows x head columns of `out` (row stride h).
        unsafe {
            gemm::gemm(
                rows,
                d,
                keys,
                out.at((first + start) * h + head * d),
                1,
                h as isize,
                false,
                scores.as_ptr(),
                1,
                keys as isize,
                v,
                1,
                row,
                0.0,
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
    }
}

simd_function! {
    /// Softmax of each row of `scores` (rows of `len`), the first being query `first_row`; with a
    /// nonzero `slope` the ALiBi bias `-slope * |i - j|` is added first.
    fn softmax_rows(scores: &mut [f32], len: usize, first_row: usize, slope: f32) {
        for (r, row) in scores.chunks_exact_mut(len).enumerate() {
            if slope != 0.0 {
                let i = (first_row + r) as f32;
                for (j, s) in row.iter_mut().enumerate() {
                    *s -= slope * (j as f32 - i).abs();
                }
            }
            let max = math::max(row);
            row.iter_mut().for_each(|s| *s = math::exp(*s - max));
            let inv = 1.0 / math::sum(row);
            row.iter_mut().for_each(|s| *s *= inv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Straightforward attention for one sequence, for comparison.
    fn reference(
        qkv: &[f32],
        len: usize,
        keys: usize,
        shape: AttentionShape,
        slopes: &[f32],
    ) -> Vec<f32> {
        let (d, h) = (shape.head_dim, shape.heads * shape.head_dim);
        let mut out = vec![0f32; len * h];
        for head in 0..shape.heads {
            for i in 0..len {
                let q = &qkv[i * 3 * h + head * d..][..d];
                let mut s: Vec<f32> = (0..keys)
                    .map(|j| {
                        let k = &qkv[j * 3 * h + h + head * d..][..d];
                        let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        dot * shape.scale - slopes[head] * (i as f32 - j as f32).abs()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                s.iter_mut().for_each(|v| *v = (*v - m).exp());
                let z: f32 = s.iter().sum();
                for j in 0..keys {
                    let v = &qkv[j * 3 * h + 2 * h + head * d..][..d];
                    for t in 0..d {
                        out[i * h + head * d + t] += s[j] / z * v[t];
                    }
                }
            }
        }
        out
    }

    #[test]
    fn packed_attention_matches_the_definition() {
        let shape = AttentionShape {
            heads: 3,
            head_dim: 4,
            scale: 0.5,
        };
        let h = 12;
        let lens = [5usize, 1, 9];
        let keys = [5usize, 1, 6];
        let total: usize = lens.iter().sum();
        let qkv: Vec<f32> = (0..total * 3 * h)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut offsets = vec![0];
        for l in lens {
            offsets.push(offsets.last().unwrap() + l);
        }
        for slopes in [None, Some([0.5f32, 0.25, 0.125])] {
            let got = attention(
                &qkv,
                &offsets,
                &keys,
                shape,
                slopes.as_ref().map(|s| &s[..]),
            );
            for (s, &l) in lens.iter().enumerate() {
                let part = &qkv[offsets[s] * 3 * h..offsets[s + 1] * 3 * h];
                let want = reference(part, l, keys[s], shape, &slopes.unwrap_or([0.0; 3]));
                let got = &got[offsets[s] * h..offsets[s + 1] * h];
                for (g, w) in got.iter().zip(&want) {
                    assert!((g - w).abs() < 1e-5, "{g} vs {w}");
                }
            }
        }
    }
}

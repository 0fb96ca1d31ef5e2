//! Multi-head self-attention over packed sequences, one (sequence, head) pair per task.

use rayon::prelude::*;

use super::{bf16, math, packed, simd_function, DisjointWrites};

/// Sizes for [`attention`].
#[derive(Debug, Clone, Copy)]
pub struct AttentionShape {
    pub heads: usize,
    /// Key/value heads (grouped-query attention): each serves `heads / kv_heads` query heads
    /// in turn; `heads` for plain multi-head attention.
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies `q · k` before the softmax (usually `1 / sqrt(head_dim)`).
    pub scale: f32,
    /// Each row attends only to the rows up to itself (decoders, CLIP's text tower).
    pub causal: bool,
}

impl AttentionShape {
    /// Width of a packed `[q | k | v]` row.
    pub fn row_width(&self) -> usize {
        (self.heads + 2 * self.kv_heads) * self.head_dim
    }

    /// The key/value head query head `head` reads.
    fn kv_head(&self, head: usize) -> usize {
        head / (self.heads / self.kv_heads)
    }
}

/// The arithmetic of the two products, `q · kᵀ` and `softmax · v`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttentionProducts {
    /// float32 throughout: exact parity with float32 references.
    F32,
    /// q, k, v and the softmax rounded to bfloat16, float32 sums (AVX-512 BF16), as the dense
    /// layers of the reduced-precision path. Runs as [`Self::F32`] on CPUs without it and for
    /// head sizes that are not whole 32-column strips.
    Bf16,
}

/// Query rows per score block: a block holds at most this many scores, so an 8192-token input
/// needs 16 MiB per worker instead of a 256 MiB `seq x seq` matrix per head.
const BLOCK_SCORES: usize = 1 << 22;

/// Self-attention for sequences packed row after row in `qkv` (each row `[q | k | v]`, `q`
/// `heads * head_dim` wide, `k` and `v` `kv_heads * head_dim`); `offsets` holds each sequence's first row plus the total at the
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
    products: AttentionProducts,
) -> Vec<f32> {
    let h = shape.heads * shape.head_dim;
    let total = offsets.last().copied().unwrap_or(0);
    assert!(
        shape.kv_heads > 0 && shape.heads.is_multiple_of(shape.kv_heads),
        "{} key/value heads for {} heads",
        shape.kv_heads,
        shape.heads
    );
    let width = shape.row_width();
    assert_eq!(qkv.len(), total * width, "qkv is not {total} x {width}");
    if let Some(s) = alibi_slopes {
        assert_eq!(s.len(), shape.heads, "one ALiBi slope per head");
    }
    assert!(
        shape.scale > 0.0,
        "attention scale {} is not positive",
        shape.scale
    );
    let bf16 = products == AttentionProducts::Bf16
        && bf16::available()
        && shape.head_dim.is_multiple_of(packed::STRIP);
    // Not zeroed first: every task writes all of its rows' columns.
    let mut out = Vec::with_capacity(total * h);
    let out_ptr = DisjointWrites::uninit(out.spare_capacity_mut());
    let sequences = offsets.len().saturating_sub(1);
    assert_eq!(keys.len(), sequences, "one key count per sequence");
    (0..sequences * shape.heads)
        .into_par_iter()
        .for_each(|task| {
            let (seq, head) = (task / shape.heads, task % shape.heads);
            let rows = SequenceRows {
                first: offsets[seq],
                len: offsets[seq + 1] - offsets[seq],
                keys: keys[seq].min(offsets[seq + 1] - offsets[seq]),
            };
            let one = Head {
                index: head,
                slope: alibi_slopes.map_or(0.0, |s| s[head]),
                shape,
            };
            SCRATCH.with_borrow_mut(|scratch| {
                // SAFETY: (seq, head) pairs are distinct per task, so their output blocks are too.
                unsafe {
                    if rows.keys == 0 {
                        attend_nothing(out_ptr, rows, one)
                    } else if bf16 {
                        attend_one_bf16(qkv, out_ptr, rows, one, scratch)
                    } else {
                        attend_one(qkv, out_ptr, rows, one, scratch)
                    }
                }
                scratch.release_large();
            })
        });
    // SAFETY: the (sequence, head) tasks cover every row and column, and each wrote its block.
    unsafe { out.set_len(total * h) };
    out
}

/// One sequence's rows in the packed buffers.
#[derive(Clone, Copy)]
struct SequenceRows {
    first: usize,
    len: usize,
    /// Leading rows attended to.
    keys: usize,
}

/// One head of the attention.
#[derive(Clone, Copy)]
struct Head {
    index: usize,
    /// Its ALiBi slope, 0 without ALiBi.
    slope: f32,
    shape: AttentionShape,
}

impl Head {
    /// Where this head's query, key and value columns start in the row at `row_start`.
    fn columns(&self, row_start: usize) -> (usize, usize, usize) {
        let (d, shape) = (self.shape.head_dim, self.shape);
        let kv = shape.kv_head(self.index) * d;
        let k = row_start + shape.heads * d;
        (
            row_start + self.index * d,
            k + kv,
            k + shape.kv_heads * d + kv,
        )
    }
}

/// A worker's buffers. Grown, never cleared: each use overwrites what it reads.
#[derive(Default)]
struct Scratch {
    scores: Vec<f32>,
    keys: bf16::StripOperand,
    values: bf16::StripOperand,
    lhs: Vec<u32>,
}

/// Bytes a buffer may keep between tasks: those of a 512-token sequence's scores. Longer inputs
/// allocate theirs per task rather than hold up to [`BLOCK_SCORES`] per thread for good.
const RETAINED_BYTES: usize = 512 * 512 * 4;

impl Scratch {
    fn release_large(&mut self) {
        super::release_over(&mut self.scores, RETAINED_BYTES);
        super::release_over(&mut self.lhs, RETAINED_BYTES);
        self.keys.release_over(RETAINED_BYTES);
        self.values.release_over(RETAINED_BYTES);
    }
}

thread_local! {
    /// Kept across tasks and calls, so that a forward pass does not allocate four buffers per
    /// (sequence, head).
    static SCRATCH: std::cell::RefCell<Scratch> = std::cell::RefCell::new(Scratch::default());
}

/// The first `len` values of `buffer`, grown to hold them.
fn grown(buffer: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if buffer.len() < len {
        buffer.resize(len, 0.0);
    }
    &mut buffer[..len]
}

/// Writes zeros for a sequence that attends to nothing.
///
/// # Safety
/// As [`attend_one`].
unsafe fn attend_nothing(
    out: DisjointWrites,
    SequenceRows { first, len, .. }: SequenceRows,
    head: Head,
) {
    let (d, h) = (head.shape.head_dim, head.shape.heads * head.shape.head_dim);
    for r in first..first + len {
        // SAFETY: this task's columns of row r (see the caller's contract).
        unsafe { std::ptr::write_bytes(out.at(r * h + head.index * d), 0, d) };
    }
}

/// # Safety
/// `out` must be valid for `(first + len) * h` floats, and no other task may write rows
/// `first..first + len`, columns of `head`; `keys` is at least 1.
unsafe fn attend_one(
    qkv: &[f32],
    out: DisjointWrites,
    SequenceRows { first, len, keys }: SequenceRows,
    head: Head,
    scratch: &mut Scratch,
) {
    let d = head.shape.head_dim;
    let h = head.shape.heads * d;
    let width = head.shape.row_width();
    let row = width as isize;
    let (q, k, v) = head.columns(first * width);
    let (q, k, v) = (qkv[q..].as_ptr(), qkv[k..].as_ptr(), qkv[v..].as_ptr());
    let block = (BLOCK_SCORES / keys).clamp(1, len);
    for start in (0..len).step_by(block) {
        let rows = block.min(len - start);
        let scores = grown(&mut scratch.scores, rows * keys);
        // SAFETY: q rows start..start+rows and all len k rows lie inside this sequence's block of
        // qkv; scores holds rows x keys.
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
                1.0,
                false,
                false,
                false,
                gemm::Parallelism::None,
            );
        }
        softmax_rows(
            scores,
            keys,
            keys,
            start,
            head.shape.scale,
            head.slope,
            head.shape.causal,
        );
        // SAFETY: the destination is this task's rows x head columns of `out` (row stride h).
        unsafe {
            gemm::gemm(
                rows,
                d,
                keys,
                out.at((first + start) * h + head.index * d),
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

/// [`attend_one`] with bfloat16 products: keys and values packed once per (sequence, head),
/// queries and softmax rows rounded per block.
///
/// # Safety
/// As [`attend_one`]; the CPU must run [`bf16`] and `head_dim` be whole strips.
unsafe fn attend_one_bf16(
    qkv: &[f32],
    out: DisjointWrites,
    SequenceRows { first, len, keys }: SequenceRows,
    head: Head,
    scratch: &mut Scratch,
) {
    let d = head.shape.head_dim;
    let h = head.shape.heads * d;
    let width = head.shape.row_width();
    let (q, k, v) = head.columns(first * width);
    let end = (first + len - 1) * width + width;
    scratch.keys.pack_keys(&qkv[k..end], width, keys, d);
    scratch.values.pack_values(&qkv[v..end], width, keys, d);
    // Score rows are whole strips wide; the padding columns are left out of the softmax.
    let stride = packed::padded_width(keys);
    let block = (BLOCK_SCORES / stride).clamp(1, len);
    for start in (0..len).step_by(block) {
        let rows = block.min(len - start);
        bf16::round_rows(
            &qkv[q + start * width..end],
            width,
            rows,
            d,
            &mut scratch.lhs,
        );
        let scores = grown(&mut scratch.scores, rows * stride);
        // SAFETY: scores holds rows x stride, the keys' strips' width.
        unsafe {
            scratch
                .keys
                .product(&scratch.lhs, rows, scores.as_mut_ptr(), stride)
        };
        softmax_rows(
            scores,
            keys,
            stride,
            start,
            head.shape.scale,
            head.slope,
            head.shape.causal,
        );
        bf16::round_rows(scores, stride, rows, keys, &mut scratch.lhs);
        // SAFETY: the destination is this task's rows x head columns of `out` (row stride h),
        // d wide: the values' strips.
        unsafe {
            scratch.values.product(
                &scratch.lhs,
                rows,
                out.at((first + start) * h + head.index * d),
                h,
            )
        };
    }
}

simd_function! {
    /// Softmax of the first `len` scores of each row of `scores` (rows `stride` apart) after
    /// multiplying them by `scale`, the first row being query `first_row`; with a nonzero
    /// `slope` the ALiBi bias `-slope * |i - j|` is added first; `causal` rows weigh only the
    /// keys up to their own position (the later ones get 0).
    fn softmax_rows(scores: &mut [f32], len: usize, stride: usize, first_row: usize, scale: f32, slope: f32, causal: bool) {
        for (r, row) in scores.chunks_exact_mut(stride).enumerate() {
            let row = if causal {
                let seen = (first_row + r + 1).min(len);
                row[seen..len].fill(0.0);
                &mut row[..seen]
            } else {
                &mut row[..len]
            };
            // Without ALiBi the scale joins the exponent (scale > 0 keeps the maximum).
            let scale = if slope != 0.0 {
                let i = (first_row + r) as f32;
                for (j, s) in row.iter_mut().enumerate() {
                    *s = s.mul_add(scale, -slope * (j as f32 - i).abs());
                }
                1.0
            } else {
                scale
            };
            let shift = -math::max(row) * scale;
            row.iter_mut().for_each(|s| *s = math::exp(s.mul_add(scale, shift)));
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
        let w = shape.row_width();
        let kv_h = shape.kv_heads * d;
        let mut out = vec![0f32; len * h];
        for head in 0..shape.heads {
            let kv = head / (shape.heads / shape.kv_heads) * d;
            for i in 0..len {
                let q = &qkv[i * w + head * d..][..d];
                let seen = if shape.causal { keys.min(i + 1) } else { keys };
                let mut s: Vec<f32> = (0..seen)
                    .map(|j| {
                        let k = &qkv[j * w + h + kv..][..d];
                        let dot: f32 = q.iter().zip(k).map(|(a, b)| a * b).sum();
                        dot * shape.scale - slopes[head] * (i as f32 - j as f32).abs()
                    })
                    .collect();
                let m = s.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
                s.iter_mut().for_each(|v| *v = (*v - m).exp());
                let z: f32 = s.iter().sum();
                for j in 0..seen {
                    let v = &qkv[j * w + h + kv_h + kv..][..d];
                    for t in 0..d {
                        out[i * h + head * d + t] += s[j] / z * v[t];
                    }
                }
            }
        }
        out
    }

    /// Runs [`attention`] on sequences of `lens` rows attending to their first `keys` rows and
    /// compares every sequence with [`reference`]; returns the output.
    fn check(
        shape: AttentionShape,
        lens: &[usize],
        keys: &[usize],
        slopes: Option<&[f32]>,
        products: AttentionProducts,
        tolerance: f32,
    ) -> Vec<f32> {
        let (h, w) = (shape.heads * shape.head_dim, shape.row_width());
        let total: usize = lens.iter().sum();
        let qkv: Vec<f32> = (0..total * w)
            .map(|i| ((i * 7919) % 101) as f32 / 50.0 - 1.0)
            .collect();
        let mut offsets = vec![0];
        for l in lens {
            offsets.push(offsets.last().unwrap() + l);
        }
        let got = attention(&qkv, &offsets, keys, shape, slopes, products);
        let no_slopes = vec![0.0; shape.heads];
        for (s, &l) in lens.iter().enumerate() {
            let part = &qkv[offsets[s] * w..offsets[s + 1] * w];
            let want = reference(part, l, keys[s], shape, slopes.unwrap_or(&no_slopes));
            let got = &got[offsets[s] * h..offsets[s + 1] * h];
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < tolerance, "{g} vs {w} ({products:?})");
            }
        }
        got
    }

    #[test]
    fn packed_attention_matches_the_definition() {
        for (causal, kv_heads) in [(false, 3), (true, 3), (true, 1)] {
            let shape = AttentionShape {
                heads: 3,
                kv_heads,
                head_dim: 4,
                scale: 0.5,
                causal,
            };
            for slopes in [None, Some(&[0.5f32, 0.25, 0.125][..])] {
                let (lens, keys) = ([5, 1, 9, 2], [5, 1, 6, 0]);
                check(shape, &lens, &keys, slopes, AttentionProducts::F32, 1e-5);
                // No whole strips of head columns: bf16 falls back to float32.
                check(shape, &lens, &keys, slopes, AttentionProducts::Bf16, 1e-5);
            }
        }
    }

    #[test]
    fn bf16_attention_stays_close_to_the_definition() {
        if !bf16::available() {
            eprintln!("skipped: this CPU has no AVX-512 BF16");
            return;
        }
        // Odd key counts, several strips of keys, and (400 keys) two passes of value pairs.
        let (lens, keys) = ([5, 1, 41, 400, 3], [5, 1, 33, 400, 0]);
        for (slopes, causal, kv_heads) in [
            (None, false, 2),
            (Some(&[0.5f32, 0.0625][..]), false, 2),
            (None, true, 1),
        ] {
            let shape = AttentionShape {
                heads: 2,
                kv_heads,
                head_dim: 64,
                scale: 0.125,
                causal,
            };
            let exact = check(shape, &lens, &keys, slopes, AttentionProducts::F32, 1e-4);
            // bf16 keeps 8 significant bits of inputs in [-1, 1].
            let reduced = check(shape, &lens, &keys, slopes, AttentionProducts::Bf16, 2e-2);
            assert_ne!(exact, reduced, "the bf16 products ran");
        }
    }
}

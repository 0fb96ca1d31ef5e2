//! Sentence pooling over token vectors, as sentence-transformers' `Pooling` module does it.

use std::ops::Range;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::batch::Hidden;
use crate::kernels::HostSlice;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pooling {
    /// Average of the attended token vectors.
    Mean,
    /// The first token's vector ([CLS]).
    Cls,
    /// Element-wise maximum over the attended tokens.
    Max,
    /// The last attended token's vector (decoders, whose last token has seen the whole input).
    #[serde(rename = "lasttoken")]
    LastToken,
}

impl std::str::FromStr for Pooling {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "mean" => Ok(Self::Mean),
            "cls" => Ok(Self::Cls),
            "max" => Ok(Self::Max),
            "lasttoken" | "last_token" => Ok(Self::LastToken),
            _ => Err(format!(
                "unknown pooling '{s}': expected mean, cls, max or lasttoken"
            )),
        }
    }
}

impl Pooling {
    /// One float32 vector per sequence, over its attended tokens. A sequence with no attended
    /// token pools to zeros.
    pub fn pool(self, hidden: &Hidden) -> candle_core::Result<Vec<Vec<f32>>> {
        let spans: Vec<Range<usize>> = (0..hidden.len())
            .map(|i| {
                let start = hidden.offsets[i];
                let attended = start..start + hidden.attended[i];
                match self {
                    Pooling::Mean | Pooling::Max => attended,
                    Pooling::Cls => start..(start + 1).min(hidden.offsets[i + 1]),
                    Pooling::LastToken => attended.end.saturating_sub(1).max(start)..attended.end,
                }
            })
            .collect();
        let reduce = match self {
            Pooling::Max => Reduce::Max,
            // One row each for Cls and LastToken: the mean of one row is the row.
            Pooling::Mean | Pooling::Cls | Pooling::LastToken => Reduce::Mean,
        };
        reduce_rows(&hidden.states, &spans, reduce)
    }

    /// The mean of each span of rows of the packed states (late chunking pools every input over
    /// its own tokens of a shared window). An empty span gives zeros.
    pub fn mean_of_spans(
        hidden: &Hidden,
        spans: &[Range<usize>],
    ) -> candle_core::Result<Vec<Vec<f32>>> {
        reduce_rows(&hidden.states, spans, Reduce::Mean)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Reduce {
    Mean,
    Max,
}

/// Reduces each span of rows of `states` (`[rows, dim]`): on the host directly for float32
/// CPU tensors, else on the tensor's device, one transfer of the results at the end.
fn reduce_rows(
    states: &Tensor,
    spans: &[Range<usize>],
    reduce: Reduce,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let (_, dim) = states.dims2()?;
    if matches!(states.device(), Device::Cpu) && states.dtype() == DType::F32 {
        let contiguous = states.contiguous()?;
        let host = HostSlice::of(&contiguous)?;
        return Ok(spans
            .iter()
            .map(|span| reduce_host(&host[span.start * dim..span.end * dim], dim, reduce))
            .collect());
    }
    reduce_on_device(states, spans, reduce)
}

fn reduce_host(rows: &[f32], dim: usize, reduce: Reduce) -> Vec<f32> {
    let count = rows.len() / dim.max(1);
    if count == 0 {
        return vec![0.0; dim];
    }
    let mut out = rows[..dim].to_vec();
    for row in rows.chunks_exact(dim).skip(1) {
        for (o, v) in out.iter_mut().zip(row) {
            *o = match reduce {
                Reduce::Mean => *o + v,
                Reduce::Max => o.max(*v),
            };
        }
    }
    if reduce == Reduce::Mean {
        let n = count as f32;
        out.iter_mut().for_each(|o| *o /= n);
    }
    out
}

fn reduce_on_device(
    states: &Tensor,
    spans: &[Range<usize>],
    reduce: Reduce,
) -> candle_core::Result<Vec<Vec<f32>>> {
    if reduce == Reduce::Mean && disjoint(spans) {
        return mean_by_segment(states, spans);
    }
    reduce_span_by_span(states, spans, reduce)
}

/// Whether no row is in two spans (inputs' own tokens are; late chunking's too).
fn disjoint(spans: &[Range<usize>]) -> bool {
    let mut sorted: Vec<&Range<usize>> = spans.iter().filter(|s| !s.is_empty()).collect();
    sorted.sort_by_key(|s| s.start);
    sorted.windows(2).all(|w| w[0].end <= w[1].start)
}

/// Each span's mean as one scatter-add of the rows into their span's slot (rows in no span go
/// to a spare slot that is dropped) and one division, float32 sums: a fixed handful of kernel
/// launches per batch on a GPU, not a few per sequence.
fn mean_by_segment(states: &Tensor, spans: &[Range<usize>]) -> candle_core::Result<Vec<Vec<f32>>> {
    let (rows, dim) = states.dims2()?;
    let spare = spans.len() as u32;
    let mut slot = vec![spare; rows];
    let mut counts = vec![1f32; spans.len() + 1];
    for (i, span) in spans.iter().enumerate() {
        slot[span.clone()].fill(i as u32);
        counts[i] = span.len().max(1) as f32;
    }
    let device = states.device();
    let slot = Tensor::from_vec(slot, rows, device)?;
    let counts = Tensor::from_vec(counts, (spans.len() + 1, 1), device)?;
    let sums = Tensor::zeros((spans.len() + 1, dim), DType::F32, device)?.index_add(
        &slot,
        &states.to_dtype(DType::F32)?,
        0,
    )?;
    let mut means = sums.broadcast_div(&counts)?.to_vec2::<f32>()?;
    means.truncate(spans.len());
    Ok(means)
}

fn reduce_span_by_span(
    states: &Tensor,
    spans: &[Range<usize>],
    reduce: Reduce,
) -> candle_core::Result<Vec<Vec<f32>>> {
    let (_, dim) = states.dims2()?;
    let zeros = Tensor::zeros(dim, DType::F32, states.device())?;
    let pooled = spans
        .iter()
        .map(|span| {
            if span.is_empty() {
                return Ok(zeros.clone());
            }
            let rows = states
                .narrow(0, span.start, span.len())?
                .to_dtype(DType::F32)?;
            match reduce {
                Reduce::Mean => rows.mean(0),
                Reduce::Max => rows.max(0),
            }
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    if pooled.is_empty() {
        return Ok(Vec::new());
    }
    Tensor::stack(&pooled, 0)?.to_vec2()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two sequences of 3 and 2 tokens, dim 2; the second attends to its first token only.
    fn fixture() -> Hidden {
        let states = Tensor::new(
            &[[1f32, 2.], [3., 4.], [5., -6.], [-1., 0.], [7., 8.]],
            &Device::Cpu,
        )
        .unwrap();
        Hidden {
            states,
            offsets: vec![0, 3, 5],
            attended: vec![3, 1],
        }
    }

    #[test]
    fn each_mode_ignores_what_is_not_attended() {
        let h = fixture();
        let get = |p: Pooling| p.pool(&h).unwrap();
        assert_eq!(get(Pooling::Mean), vec![vec![3., 0.], vec![-1., 0.]]);
        assert_eq!(get(Pooling::Cls), vec![vec![1., 2.], vec![-1., 0.]]);
        assert_eq!(get(Pooling::Max), vec![vec![5., 4.], vec![-1., 0.]]);
        assert_eq!(get(Pooling::LastToken), vec![vec![5., -6.], vec![-1., 0.]]);
    }

    #[test]
    fn the_device_path_reduces_as_the_host_path() {
        let h = fixture();
        // Disjoint spans (the scatter-add mean), rows in no span, and overlapping spans (span by
        // span).
        for spans in [
            vec![0..3, 3..3, 3..5],
            vec![1..2, 2..2, 4..5],
            vec![0..3, 3..3, 1..5],
        ] {
            for reduce in [Reduce::Mean, Reduce::Max] {
                let host = reduce_rows(&h.states, &spans, reduce).unwrap();
                let half = h.states.to_dtype(DType::BF16).unwrap();
                let device = reduce_rows(&half, &spans, reduce).unwrap();
                assert_eq!(host, device, "{reduce:?} {spans:?}");
                assert_eq!(host[1], vec![0.0, 0.0]);
            }
        }
    }
}

//! Batches as the backbones take them and give them back.
//!
//! A [`PackedBatch`] is what every backbone's `forward` takes: the sequences one after another
//! with their offsets (`cu_seqlens`), so a batch costs its real tokens and no padding. Executors
//! that need a rectangle (candle's graph) ask for its [`PackedBatch::padded`] view. A backbone
//! answers with [`Hidden`]: the token vectors in the same packed order, whatever executor ran.

use std::ops::Range;

use candle_core::{Device, Tensor};

use crate::tokenize::TokenSequence;

/// Rows `range` of a packed batch run with task adapter `task`.
pub type AdapterSpan = (Range<usize>, usize);

/// Sequences packed row after row.
pub struct PackedBatch<'a> {
    pub sequences: Vec<&'a TokenSequence>,
    /// First row of each sequence, then the total.
    pub offsets: Vec<usize>,
    /// Leading tokens of each sequence that are attended to (at most its length: ColBERT's
    /// [MASK] query padding is input, but not attended).
    pub attended: Vec<usize>,
    /// Per sequence, the task adapter it runs with (`None`: the base weights).
    pub adapters: Vec<Option<usize>>,
    /// The tokenizer's padding id, for the padded view.
    pub pad_id: u32,
}

impl<'a> PackedBatch<'a> {
    /// Every token attended to, no adapters.
    pub fn new(sequences: Vec<&'a TokenSequence>, pad_id: u32) -> Self {
        let attended = sequences.iter().map(|s| s.len()).collect();
        Self::with_attention(sequences, attended, pad_id)
    }

    /// Only the first `attended[i]` tokens of sequence `i` are attended to.
    pub fn with_attention(
        sequences: Vec<&'a TokenSequence>,
        attended: Vec<usize>,
        pad_id: u32,
    ) -> Self {
        assert_eq!(attended.len(), sequences.len(), "one count per sequence");
        let mut offsets = Vec::with_capacity(sequences.len() + 1);
        offsets.push(0);
        for s in &sequences {
            offsets.push(offsets[offsets.len() - 1] + s.len());
        }
        let attended = attended
            .iter()
            .zip(&sequences)
            .map(|(&a, s)| a.min(s.len()))
            .collect();
        Self {
            adapters: vec![None; sequences.len()],
            sequences,
            offsets,
            attended,
            pad_id,
        }
    }

    /// Sets each sequence's task adapter.
    pub fn with_adapters(mut self, adapters: Vec<Option<usize>>) -> Self {
        assert_eq!(adapters.len(), self.sequences.len(), "one adapter per row");
        self.adapters = adapters;
        self
    }

    pub fn len(&self) -> usize {
        self.sequences.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sequences.is_empty()
    }

    pub fn total_tokens(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    pub fn max_len(&self) -> usize {
        self.sequences.iter().map(|s| s.len()).max().unwrap_or(0)
    }

    /// Every sequence's token ids, one after another: the fused path's rows.
    pub fn packed_ids(&self) -> Vec<u32> {
        self.sequences
            .iter()
            .flat_map(|s| s.ids.iter().copied())
            .collect()
    }

    /// Runs of rows whose sequences use a task adapter, neighbours on one task merged.
    pub fn adapter_spans(&self) -> Vec<AdapterSpan> {
        let mut spans: Vec<AdapterSpan> = Vec::new();
        for (i, adapter) in self.adapters.iter().enumerate() {
            let Some(task) = *adapter else { continue };
            let rows = self.offsets[i]..self.offsets[i + 1];
            match spans.last_mut() {
                Some((last, t)) if *t == task && last.end == rows.start => last.end = rows.end,
                _ => spans.push((rows, task)),
            }
        }
        spans
    }

    /// The rectangle candle's graph runs on.
    pub fn padded(&self, device: &Device) -> candle_core::Result<Batch> {
        Batch::with_attention(&self.sequences, &self.attended, self.pad_id, device)
            .map(|b| b.with_adapters(self.adapters.clone()))
    }
}

/// Right-padded `[batch, seq]` tensors: the graph executor's view of a [`PackedBatch`].
pub struct Batch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    /// 1.0 for attended tokens, 0.0 for the rest (f32).
    pub attention_mask: Tensor,
    pub max_len: usize,
    /// Input tokens per row (the rest of the row is padding).
    pub lengths: Vec<usize>,
    /// Leading tokens per row that are attended to (at most `lengths[i]`).
    pub attended: Vec<usize>,
    /// Per row, the task adapter to run it with.
    pub adapters: Vec<Option<usize>>,
}

impl Batch {
    /// Only the first `attended[i]` positions of sequence `i` are attended to.
    pub fn with_attention(
        sequences: &[&TokenSequence],
        attended: &[usize],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let max_len = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(1);
        let n = sequences.len();
        let mut ids = Vec::with_capacity(n * max_len);
        let mut types = Vec::with_capacity(n * max_len);
        let mut mask = Vec::with_capacity(n * max_len);
        let mut attended_tokens = Vec::with_capacity(n);
        for (s, &att) in sequences.iter().zip(attended) {
            let pad = max_len - s.len();
            let att = att.min(s.len());
            attended_tokens.push(att);
            ids.extend_from_slice(&s.ids);
            ids.extend(std::iter::repeat_n(pad_id, pad));
            types.extend_from_slice(&s.type_ids);
            types.extend(std::iter::repeat_n(0u32, pad));
            mask.extend(std::iter::repeat_n(1f32, att));
            mask.extend(std::iter::repeat_n(0f32, max_len - att));
        }
        Ok(Self {
            input_ids: Tensor::from_vec(ids, (n, max_len), device)?,
            token_type_ids: Tensor::from_vec(types, (n, max_len), device)?,
            attention_mask: Tensor::from_vec(mask, (n, max_len), device)?,
            max_len,
            lengths: sequences.iter().map(|s| s.len()).collect(),
            attended: attended_tokens,
            adapters: vec![None; n],
        })
    }

    pub fn with_adapters(mut self, adapters: Vec<Option<usize>>) -> Self {
        assert_eq!(adapters.len(), self.lengths.len(), "one adapter per row");
        self.adapters = adapters;
        self
    }
}

/// A backbone's output: one vector per token, sequences packed as in the [`PackedBatch`].
pub struct Hidden {
    /// `[total tokens, hidden]`, on the plan's device, in its storage dtype.
    pub states: Tensor,
    pub offsets: Vec<usize>,
    pub attended: Vec<usize>,
}

impl Hidden {
    pub fn new(states: Tensor, batch: &PackedBatch) -> Self {
        Self {
            states,
            offsets: batch.offsets.clone(),
            attended: batch.attended.clone(),
        }
    }

    /// Packs a graph's `[batch, seq, hidden]` output, dropping the padding.
    pub fn from_padded(padded: &Tensor, batch: &PackedBatch) -> candle_core::Result<Self> {
        let (b, l, h) = padded.dims3()?;
        let states = if batch.sequences.iter().all(|s| s.len() == l) {
            padded.reshape((b * l, h))?
        } else {
            // One gather of every sequence's rows: a single kernel on a GPU, where a copy per
            // sequence would be one launch each.
            let rows: Vec<u32> = batch
                .sequences
                .iter()
                .enumerate()
                .flat_map(|(i, s)| (i * l..i * l + s.len()).map(|r| r as u32))
                .collect();
            if rows.is_empty() {
                Tensor::zeros((0, h), padded.dtype(), padded.device())?
            } else {
                let count = rows.len();
                let index = Tensor::from_vec(rows, count, padded.device())?;
                padded
                    .contiguous()?
                    .reshape((b * l, h))?
                    .index_select(&index, 0)?
            }
        };
        Ok(Self::new(states, batch))
    }

    pub fn len(&self) -> usize {
        self.offsets.len().saturating_sub(1)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sequence `i`'s rows.
    pub fn rows(&self, i: usize) -> Range<usize> {
        self.offsets[i]..self.offsets[i + 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seq(ids: &[u32]) -> TokenSequence {
        TokenSequence {
            ids: ids.to_vec(),
            type_ids: vec![0; ids.len()],
        }
    }

    #[test]
    fn packing_and_the_padded_view_agree() -> candle_core::Result<()> {
        let (a, b, c) = (seq(&[1, 2, 3]), seq(&[4]), seq(&[5, 6]));
        let batch = PackedBatch::with_attention(vec![&a, &b, &c], vec![3, 1, 1], 0)
            .with_adapters(vec![Some(1), Some(1), None]);
        assert_eq!(batch.offsets, vec![0, 3, 4, 6]);
        assert_eq!(batch.adapter_spans(), vec![(0..4, 1)]);
        let padded = batch.padded(&Device::Cpu)?;
        assert_eq!(
            padded.input_ids.to_vec2::<u32>()?,
            vec![vec![1, 2, 3], vec![4, 0, 0], vec![5, 6, 0]]
        );
        assert_eq!(
            padded.attention_mask.to_vec2::<f32>()?[2],
            vec![1.0, 0.0, 0.0]
        );
        // A graph's output, each token's vector its id: packing drops exactly the padding.
        let out = padded
            .input_ids
            .to_dtype(candle_core::DType::F32)?
            .unsqueeze(2)?;
        let hidden = Hidden::from_padded(&out, &batch)?;
        assert_eq!(
            hidden.states.flatten_all()?.to_vec1::<f32>()?,
            vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
        );
        assert_eq!(hidden.rows(2), 4..6);
        Ok(())
    }
}

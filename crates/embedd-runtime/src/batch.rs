//! A padded batch of token sequences as the encoders take it.

use candle_core::{Device, Tensor};

use crate::tokenize::TokenSequence;

/// Right-padded `[batch, seq]` tensors for a set of sequences.
pub struct Batch {
    pub input_ids: Tensor,
    pub token_type_ids: Tensor,
    /// 1.0 for real tokens, 0.0 for padding (f32).
    pub attention_mask: Tensor,
    pub max_len: usize,
    /// Input tokens per row (the rest of the row is padding).
    pub lengths: Vec<usize>,
    /// Leading tokens per row that are attended to (at most `lengths[i]`).
    pub attended: Vec<usize>,
    /// Per row, the task adapter to run it with (models with task adapters; `None`: the base
    /// weights).
    pub adapters: Vec<Option<usize>>,
}

impl Batch {
    /// Every real token attended to.
    pub fn new(
        sequences: &[&TokenSequence],
        pad_id: u32,
        device: &Device,
    ) -> candle_core::Result<Self> {
        let attended: Vec<usize> = sequences.iter().map(|s| s.len()).collect();
        Self::with_attention(sequences, &attended, pad_id, device)
    }

    /// Only the first `attended[i]` positions of sequence `i` are attended to (ColBERT's [MASK]
    /// query padding is input, but not attended).
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

    /// Sets each row's task adapter.
    pub fn with_adapters(mut self, adapters: Vec<Option<usize>>) -> Self {
        assert_eq!(adapters.len(), self.lengths.len(), "one adapter per row");
        self.adapters = adapters;
        self
    }
}

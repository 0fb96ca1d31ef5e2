//! Word, token-type and (absolute) position embeddings, summed and normalized.

use candle_core::{Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::config::{BertConfig, PositionEncoding};
use super::weights::{embedding, layer_norm};
use crate::batch::Batch;
use crate::models::lora::EmbeddingLora;

pub(super) struct BertEmbeddings {
    word: Embedding,
    word_lora: Option<EmbeddingLora>,
    /// Absent for ALiBi and rotary models, whose positions live in the attention.
    position: Option<Embedding>,
    token_type: Embedding,
    token_type_lora: Option<EmbeddingLora>,
    layer_norm: LayerNorm,
    position_offset: usize,
    /// XLM-RoBERTa has one token type; pair tokenizers may still emit type 1 for the second text.
    single_token_type: bool,
}

impl BertEmbeddings {
    /// `vb` is the model root: the tables are under `embeddings`, and so is the LayerNorm except
    /// in the flash layout (`emb_ln`).
    pub(super) fn load(vb: &VarBuilder, config: &BertConfig) -> candle_core::Result<Self> {
        let h = config.hidden_size;
        let tables = vb.pp("embeddings");
        let (word, word_lora) = embedding(tables.pp("word_embeddings"), config.vocab_size, config)?;
        let (token_type, token_type_lora) = embedding(
            tables.pp("token_type_embeddings"),
            config.type_vocab_size,
            config,
        )?;
        let norm = if config.flash_layout() {
            vb.pp("emb_ln")
        } else {
            tables.pp("LayerNorm")
        };
        let position = match config.positions() {
            PositionEncoding::Absolute => Some(candle_nn::embedding(
                config.max_position_embeddings,
                h,
                tables.pp("position_embeddings"),
            )?),
            PositionEncoding::Alibi | PositionEncoding::Rotary { .. } => None,
        };
        Ok(Self {
            word,
            word_lora,
            position,
            token_type,
            token_type_lora,
            layer_norm: layer_norm(norm, h, config.layer_norm_eps)?,
            position_offset: config.position_offset(),
            single_token_type: config.type_vocab_size == 1,
        })
    }

    pub(super) fn device(&self) -> candle_core::Device {
        self.word.embeddings().device().clone()
    }

    /// `[batch, seq, hidden]` for a padded batch.
    pub(super) fn forward(&self, batch: &Batch) -> candle_core::Result<Tensor> {
        let mut words = self.word.forward(&batch.input_ids)?;
        if let Some(lora) = &self.word_lora {
            words = lora.add(&batch.input_ids, words, &batch.adapters)?;
        }
        let type_ids = if self.single_token_type {
            batch.token_type_ids.zeros_like()?
        } else {
            batch.token_type_ids.clone()
        };
        let mut types = self.token_type.forward(&type_ids)?;
        if let Some(lora) = &self.token_type_lora {
            types = lora.add(&type_ids, types, &batch.adapters)?;
        }
        let mut x = (words + types)?;
        if let Some(table) = &self.position {
            // Right padding: every row's real tokens sit at positions 0..len; padding is masked.
            let start = self.position_offset as u32;
            let positions = Tensor::arange(start, start + batch.max_len as u32, x.device())?;
            x = x.broadcast_add(&table.forward(&positions)?)?;
        }
        self.layer_norm.forward(&x)
    }
}

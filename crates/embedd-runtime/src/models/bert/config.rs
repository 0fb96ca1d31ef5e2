//! The BERT family's `config.json`, and the variant it names, resolved once at load.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::activation::Activation;
use crate::models::lora::LoraShape;

fn default_act() -> Activation {
    Activation::Gelu
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}

/// Which member of the family a checkpoint is. Each one differs in named, documented ways;
/// the layers read this instead of looking for tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BertVariant {
    /// BERT, MiniLM: absolute positions, GELU feed-forward, post-norm blocks.
    #[default]
    Bert,
    /// RoBERTa, XLM-RoBERTa, CamemBERT: BERT's blocks, positions numbered past the padding id.
    Roberta,
    /// JinaBERT (jina-embeddings-v2, jina-reranker-v1, jina-colbert-v1): ALiBi attention bias
    /// instead of position embeddings, gated GELU feed-forward (`mlp.gated_layers` giving
    /// [gate | value], `mlp.wo`, `mlp.layernorm`).
    JinaBert,
    /// jina-bert-v2-qk-post-norm (jina-embeddings-v2-base-code): JinaBERT with LayerNorms on the
    /// query and key projections, a second residual LayerNorm after attention (`layer_norm_1`),
    /// and the feed-forward as `mlp.up_gated_layer` ([value | gate]), `mlp.down_layer`,
    /// `layer_norm_2`.
    JinaBertQkPostNorm,
    /// jina-bert-flash-implementation (jina-clip-v1's text tower): JinaBERT's blocks (ALiBi, gated
    /// GELU feed-forward) with tensors named as the flash-attention code saves them (`emb_ln`,
    /// `encoder.layers.N.mixer.Wqkv`, `mixer.out_proj`, `norm1`, `mlp.gated_layers`, `mlp.wo`,
    /// `norm2`).
    JinaBertFlash,
    /// xlm-roberta-flash-implementation (jina-embeddings-v3): XLM-RoBERTa with tensors named as
    /// the flash-attention code saves them (`emb_ln`, `encoder.layers.N.mixer.Wqkv`, `norm1`,
    /// `mlp.fc1`...), rotary positions, and per-task LoRA adapters.
    XlmRobertaFlash,
}

/// How token positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum PositionEncoding {
    /// A learned table added to the embeddings.
    Absolute,
    /// A per-head distance penalty on the attention scores.
    Alibi,
    /// Queries and keys rotated by position (RoPE) with this base.
    Rotary { base: f64 },
}

/// The fields of a Hugging Face `config.json` this family reads.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_act")]
    pub hidden_act: Activation,
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default)]
    pub pad_token_id: Option<u32>,
    #[serde(default)]
    pub model_type: Option<String>,
    #[serde(default)]
    pub position_embedding_type: Option<String>,
    /// JinaBERT's gated feed-forward (`geglu`); absent for BERT's plain one.
    #[serde(default)]
    pub feed_forward_type: Option<String>,
    /// RoPE's base, for `position_embedding_type: "rotary"` (jina-embeddings-v3).
    #[serde(default)]
    pub rotary_emb_base: Option<f64>,
    #[serde(default)]
    pub rotary_emb_interleaved: Option<bool>,
    /// The tasks of the LoRA adapters, in the checkpoint's order (jina-embeddings-v3).
    #[serde(default)]
    pub lora_adaptations: Option<Vec<String>>,
    #[serde(default)]
    pub lora_rank: Option<usize>,
    #[serde(default)]
    pub lora_alpha: Option<f64>,
    /// The instruction each task puts before an input.
    #[serde(default)]
    pub task_instructions: Option<BTreeMap<String, String>>,
    /// Resolved from `model_type`, `auto_map` and `position_embedding_type` by [`Self::resolve`].
    #[serde(skip)]
    pub variant: BertVariant,
}

impl BertConfig {
    /// Reads the config and settles its variant, refusing what the family cannot run.
    pub fn resolve(raw: &Value) -> Result<Self, (String, String)> {
        let mut config: BertConfig = serde_json::from_value(raw.clone())
            .map_err(|e| ("(bert config)".to_string(), e.to_string()))?;
        let refuse = |field: &str, reason: String| Err((field.to_string(), reason));
        if let Some(p) = config
            .position_embedding_type
            .as_deref()
            .filter(|p| !matches!(*p, "absolute" | "alibi" | "rotary"))
        {
            return refuse(
                "position_embedding_type",
                format!("'{p}' is not supported ('absolute', 'alibi' or 'rotary')"),
            );
        }
        if let Some(t) = config
            .feed_forward_type
            .as_deref()
            .filter(|t| !matches!(*t, "original" | "geglu"))
        {
            return refuse(
                "feed_forward_type",
                format!("'{t}' is not supported ('original' or 'geglu')"),
            );
        }
        if config.rotary_emb_interleaved == Some(true) {
            return refuse(
                "rotary_emb_interleaved",
                "interleaved rotary embeddings are not supported".into(),
            );
        }
        if config.num_attention_heads == 0
            || !config
                .hidden_size
                .is_multiple_of(config.num_attention_heads)
        {
            return refuse(
                "num_attention_heads",
                format!(
                    "{} heads do not divide hidden_size {}",
                    config.num_attention_heads, config.hidden_size
                ),
            );
        }
        // The remote-code implementation a checkpoint names is what tells the Jina variants
        // apart; their configs share BERT's and XLM-R's model types.
        let implementation = raw
            .get("auto_map")
            .and_then(Value::as_object)
            .map(|m| {
                m.values()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(" ")
            })
            .unwrap_or_default();
        config.variant = if implementation.contains("qk-post-norm") {
            BertVariant::JinaBertQkPostNorm
        } else if implementation.contains("xlm-roberta-flash") {
            BertVariant::XlmRobertaFlash
        } else if implementation.contains("jina-bert-flash") {
            BertVariant::JinaBertFlash
        } else if config.position_embedding_type.as_deref() == Some("alibi") {
            BertVariant::JinaBert
        } else if matches!(
            config.model_type.as_deref(),
            Some("roberta" | "xlm-roberta" | "camembert")
        ) {
            BertVariant::Roberta
        } else {
            BertVariant::Bert
        };
        if config.positions() == PositionEncoding::Alibi
            && matches!(
                config.variant,
                BertVariant::Bert | BertVariant::Roberta | BertVariant::XlmRobertaFlash
            )
        {
            return refuse(
                "position_embedding_type",
                "ALiBi is JinaBERT's; this checkpoint names another implementation".into(),
            );
        }
        if config.variant == BertVariant::JinaBertFlash {
            // The flash JinaBERT has no position table: ALiBi is its only position scheme.
            if config.positions() != PositionEncoding::Alibi
                && config.position_embedding_type.is_some()
            {
                return refuse(
                    "position_embedding_type",
                    "jina-bert-flash-implementation positions tokens by ALiBi only".into(),
                );
            }
            config.position_embedding_type = Some("alibi".into());
            if raw.get("use_qk_norm").and_then(Value::as_bool) == Some(true) {
                return refuse(
                    "use_qk_norm",
                    "query/key LayerNorms of jina-bert-flash-implementation are not supported"
                        .into(),
                );
            }
        }
        let head_dim = config.hidden_size / config.num_attention_heads;
        if matches!(config.positions(), PositionEncoding::Rotary { .. })
            && !head_dim.is_multiple_of(2)
        {
            return refuse(
                "hidden_size",
                format!("rotary embeddings need an even head size, not {head_dim}"),
            );
        }
        Ok(config)
    }

    pub fn positions(&self) -> PositionEncoding {
        match self.position_embedding_type.as_deref() {
            Some("alibi") => PositionEncoding::Alibi,
            Some("rotary") => PositionEncoding::Rotary {
                base: self.rotary_emb_base.unwrap_or(10_000.0),
            },
            _ => PositionEncoding::Absolute,
        }
    }

    /// RoBERTa-style models number positions from `pad_token_id + 1`; so does Jina's flash
    /// XLM-R, whose configs (jina-reranker-v2's) may carry no `model_type` at all.
    pub fn position_offset(&self) -> usize {
        let roberta = matches!(
            self.model_type.as_deref(),
            Some("roberta" | "xlm-roberta" | "camembert")
        );
        if roberta || self.variant == BertVariant::XlmRobertaFlash {
            self.pad_token_id.unwrap_or(1) as usize + 1
        } else {
            0
        }
    }

    /// How many tokens fit the position table (for ALiBi: the length the model was built for).
    pub fn max_tokens(&self) -> usize {
        self.max_position_embeddings
            .saturating_sub(self.position_offset())
    }

    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads
    }

    /// The adapters' sizes, when the config names task adapters.
    pub fn lora_shape(&self) -> Option<LoraShape> {
        let tasks = self.lora_adaptations.as_ref()?.len();
        let rank = self.lora_rank.unwrap_or(4);
        Some(LoraShape {
            tasks,
            rank,
            scaling: self.lora_alpha.unwrap_or(1.0) / rank as f64,
        })
    }

    /// Tensors named as the flash-attention code saves them (`emb_ln`, `encoder.layers`,
    /// `mixer.*`, `norm1`, `norm2`).
    pub(super) fn flash_layout(&self) -> bool {
        matches!(
            self.variant,
            BertVariant::XlmRobertaFlash | BertVariant::JinaBertFlash
        )
    }

    /// JinaBERT's gated feed-forward; its configs may still ask for the plain one.
    pub(super) fn gated_feed_forward(&self) -> bool {
        match self.variant {
            BertVariant::JinaBertQkPostNorm | BertVariant::JinaBertFlash => true,
            BertVariant::JinaBert => {
                matches!(self.feed_forward_type.as_deref(), Some(t) if t.contains("glu"))
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(extra: Value) -> BertConfig {
        let mut raw = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32,
        });
        raw.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        BertConfig::resolve(&raw).unwrap()
    }

    #[test]
    fn the_variant_comes_from_the_config() {
        assert_eq!(resolve(serde_json::json!({})).variant, BertVariant::Bert);
        let roberta = resolve(serde_json::json!({"model_type": "xlm-roberta", "pad_token_id": 1}));
        assert_eq!(roberta.variant, BertVariant::Roberta);
        assert_eq!(roberta.max_tokens(), 30);
        let jina = resolve(serde_json::json!({"position_embedding_type": "alibi"}));
        assert_eq!(jina.variant, BertVariant::JinaBert);
        assert_eq!(jina.positions(), PositionEncoding::Alibi);
        let code = resolve(serde_json::json!({"position_embedding_type": "alibi",
            "auto_map": {"AutoModel": "jinaai/jina-bert-v2-qk-post-norm--modeling_bert.JinaBertModel"}}));
        assert_eq!(code.variant, BertVariant::JinaBertQkPostNorm);
        let v3 = resolve(serde_json::json!({"model_type": "xlm-roberta",
            "position_embedding_type": "rotary", "rotary_emb_base": 20000.0,
            "auto_map": {"AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"}}));
        assert_eq!(v3.variant, BertVariant::XlmRobertaFlash);
        assert_eq!(v3.positions(), PositionEncoding::Rotary { base: 20000.0 });
        // jina-clip-v1's text tower: ALiBi and the gated feed-forward whatever the config says.
        let flash = resolve(serde_json::json!({"model_type": "bert",
            "auto_map": {"AutoModel": "jinaai/jina-bert-flash-implementation--modeling_bert.BertModel"}}));
        assert_eq!(flash.variant, BertVariant::JinaBertFlash);
        assert_eq!(flash.positions(), PositionEncoding::Alibi);
        assert!(flash.gated_feed_forward() && flash.flash_layout());
        assert_eq!(flash.position_offset(), 0);
    }

    #[test]
    fn unsupported_settings_name_their_field() {
        let raw = serde_json::json!({
            "vocab_size": 10, "hidden_size": 8, "num_hidden_layers": 1,
            "num_attention_heads": 3, "intermediate_size": 16, "max_position_embeddings": 32,
        });
        assert_eq!(
            BertConfig::resolve(&raw).unwrap_err().0,
            "num_attention_heads"
        );
        let mut raw = raw;
        raw["num_attention_heads"] = 2.into();
        raw["position_embedding_type"] = "relative_key".into();
        assert_eq!(
            BertConfig::resolve(&raw).unwrap_err().0,
            "position_embedding_type"
        );
        let mut flash = raw;
        flash["position_embedding_type"] = "alibi".into();
        flash["auto_map"] =
            serde_json::json!({"AutoModel": "jinaai/jina-bert-flash-implementation"});
        flash["use_qk_norm"] = true.into();
        assert_eq!(BertConfig::resolve(&flash).unwrap_err().0, "use_qk_norm");
        flash["use_qk_norm"] = false.into();
        flash["position_embedding_type"] = "rotary".into();
        assert_eq!(
            BertConfig::resolve(&flash).unwrap_err().0,
            "position_embedding_type"
        );
    }
}

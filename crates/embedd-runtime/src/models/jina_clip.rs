//! jina-clip (`model_type: jina_clip`, the jina-clip implementation): an EVA02 vision tower and
//! a Hugging Face text encoder (jina-clip-v1: JinaBERT as jina-bert-flash-implementation saves
//! it; jina-clip-v2: jina-embeddings-v3's XLM-RoBERTa with its LoRA adapters) pooled into one
//! shared space.
//!
//! The text tower's `config.json` is not in the checkpoint: the implementation loads the config
//! of the model `hf_model_name_or_path` names, then sets `hf_model_config_kwargs` over it. embedd
//! carries the configs of the text models the released checkpoints name, and applies the kwargs
//! the same way.

use candle_core::Tensor;
use candle_nn::Linear;
use serde::Deserialize;
use serde_json::{Map, Value};

use super::eva::{EvaVisionConfig, EvaVisionTower};
use super::Weights;
use super::{Backbone, BertConfig, BertModel, Family, FamilyConfig, ImageTower, TaskAdapters};
use crate::error::Result;
use crate::heads::Pooling;
use crate::plan::ExecutionPlan;

/// Where the checkpoint keeps the text encoder (`HFTextEncoder.transformer`).
const TEXT_PREFIX: &str = "text_model.transformer";

fn default_projection_dim() -> usize {
    768
}

/// `text_config` (`JinaCLIPTextConfig`).
#[derive(Debug, Clone, Deserialize)]
struct TextTowerConfig {
    embed_dim: usize,
    hf_model_name_or_path: String,
    #[serde(default)]
    hf_model_config_kwargs: Option<Map<String, Value>>,
    #[serde(default)]
    default_instruction_task: Option<String>,
    #[serde(default)]
    default_lora_task: Option<String>,
    #[serde(default)]
    pooler_type: Option<String>,
    #[serde(default)]
    proj_type: Option<String>,
    #[serde(default)]
    proj_bias: bool,
}

#[derive(Debug, Clone, Deserialize)]
struct RawConfig {
    text_config: TextTowerConfig,
    vision_config: EvaVisionConfig,
    #[serde(default)]
    add_projections: bool,
    #[serde(default = "default_projection_dim")]
    projection_dim: usize,
}

/// A jina-clip checkpoint's architecture, both towers resolved.
#[derive(Debug, Clone)]
pub struct JinaClipConfig {
    text: BertConfig,
    tower: TextTowerConfig,
    vision: EvaVisionConfig,
    add_projections: bool,
    projection_dim: usize,
    pooling: Pooling,
    /// The adapter every text runs with: the default LoRA task's.
    adapter: Option<usize>,
}

/// The `config.json` of the text encoders released jina-clip checkpoints name, as far as the
/// architecture goes (the model hub is not reachable at load; `hf_model_config_kwargs` may set
/// any of it).
fn known_text_config(name: &str) -> Option<Value> {
    match name {
        "jinaai/jina-embeddings-v3" => Some(serde_json::json!({
            "auto_map": {
                "AutoModel": "jinaai/xlm-roberta-flash-implementation--modeling_lora.XLMRobertaLoRA"
            },
            "hidden_act": "gelu",
            "hidden_size": 1024,
            "intermediate_size": 4096,
            "layer_norm_eps": 1e-5,
            "lora_adaptations": [
                "retrieval.query", "retrieval.passage", "separation", "classification",
                "text-matching"
            ],
            "lora_alpha": 1,
            "lora_rank": 4,
            "max_position_embeddings": 8194,
            "model_type": "xlm-roberta",
            "num_attention_heads": 16,
            "num_hidden_layers": 24,
            "pad_token_id": 1,
            "position_embedding_type": "rotary",
            "rotary_emb_base": 20000.0,
            "task_instructions": {
                "retrieval.query": "Represent the query for retrieving evidence documents: ",
                "retrieval.passage": "Represent the document for retrieval: ",
                "separation": "",
                "classification": "",
                "text-matching": ""
            },
            "type_vocab_size": 1,
            "vocab_size": 250002
        })),
        // jina-clip-v1's: jina-embeddings-v2-base-en's shape (ALiBi, gated GELU) in the flash
        // layout; the implementation runs it without query/key LayerNorms.
        "jinaai/jina-bert-flash-implementation" => Some(serde_json::json!({
            "auto_map": {
                "AutoConfig": "jinaai/jina-bert-flash-implementation--configuration_bert.JinaBertConfig",
                "AutoModel": "jinaai/jina-bert-flash-implementation--modeling_bert.BertModel"
            },
            "hidden_act": "gelu",
            "hidden_size": 768,
            "intermediate_size": 3072,
            "layer_norm_eps": 1e-12,
            "max_position_embeddings": 8192,
            "model_type": "bert",
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 0,
            "position_embedding_type": "alibi",
            "type_vocab_size": 2,
            "use_qk_norm": false,
            "vocab_size": 30528
        })),
        _ => None,
    }
}

/// The family's registration.
pub(super) fn read_config(
    raw: &Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    let config: RawConfig = serde_json::from_value(raw.clone())
        .map_err(|e| ("(jina-clip config)".to_string(), e.to_string()))?;
    config.vision_config.check()?;
    let tower = config.text_config;
    let name = tower.hf_model_name_or_path.as_str();
    let mut text = match known_text_config(name) {
        Some(base) => base,
        None => {
            return Err((
                "text_config.hf_model_name_or_path".into(),
                format!(
                    "text encoder '{name}' is not supported (jinaai/jina-embeddings-v3, \
                     jinaai/jina-bert-flash-implementation)"
                ),
            ))
        }
    };
    if let (Some(object), Some(kwargs)) = (text.as_object_mut(), &tower.hf_model_config_kwargs) {
        // PretrainedConfig.update: each key replaces the base's.
        object.extend(kwargs.clone());
    }
    let text = BertConfig::resolve(&text)
        .map_err(|(field, reason)| (format!("text_config.{field}"), reason))?;
    let pooling = match tower.pooler_type.as_deref() {
        Some("mean_pooler") => Pooling::Mean,
        Some("cls_pooler") => Pooling::Cls,
        // The implementation's defaults per encoder type.
        None if text.model_type.as_deref() == Some("bert") => Pooling::Cls,
        None => Pooling::Mean,
        Some(other) => {
            return Err((
                "text_config.pooler_type".into(),
                format!("'{other}' is not supported (mean_pooler or cls_pooler)"),
            ))
        }
    };
    if !matches!(tower.proj_type.as_deref(), None | Some("linear")) {
        return Err((
            "text_config.proj_type".into(),
            "only no projection or 'linear' is supported".into(),
        ));
    }
    if !config.add_projections && tower.embed_dim != config.vision_config.embed_dim {
        return Err((
            "text_config.embed_dim".into(),
            "without projections both towers must give the same size".into(),
        ));
    }
    let tasks = text.lora_adaptations.clone().unwrap_or_default();
    let adapter = match &tower.default_lora_task {
        None => None,
        Some(task) => Some(tasks.iter().position(|t| t == task).ok_or_else(|| {
            (
                "text_config.default_lora_task".to_string(),
                format!("'{task}' is not one of the text encoder's adapters {tasks:?}"),
            )
        })?),
    };
    Ok(Box::new(JinaClipConfig {
        text,
        tower,
        vision: config.vision_config,
        add_projections: config.add_projections,
        projection_dim: config.projection_dim,
        pooling,
        adapter,
    }))
}

/// `second(first(x))` as one Linear.
fn chain(first: Option<Linear>, second: Option<Linear>) -> candle_core::Result<Option<Linear>> {
    match (first, second) {
        (Some(a), Some(b)) => {
            let weight = b.weight().matmul(a.weight())?;
            let bias = match a.bias() {
                Some(bias) => Some(b.weight().matmul(&bias.unsqueeze(1)?)?.squeeze(1)?),
                None => None,
            };
            Ok(Some(Linear::new(weight, bias)))
        }
        (one, None) | (None, one) => Ok(one),
    }
}

impl FamilyConfig for JinaClipConfig {
    fn family(&self) -> Family {
        Family::JinaClip
    }

    fn hidden_size(&self) -> usize {
        if self.add_projections {
            self.projection_dim
        } else {
            self.tower.embed_dim
        }
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.text.max_tokens())
    }

    /// Every text runs with the default LoRA task's adapter; a request's task only picks the
    /// instruction put in front, as the implementation's `encode_text` does.
    fn task_adapters(&self) -> TaskAdapters {
        TaskAdapters {
            names: self.text.lora_adaptations.clone().unwrap_or_default(),
            instructions: self.text.task_instructions.clone().unwrap_or_default(),
            pinned: self.adapter,
            default_task: self.tower.default_instruction_task.clone(),
        }
    }

    fn default_pooling(&self) -> Option<Pooling> {
        Some(self.pooling)
    }

    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        let model = BertModel::load(weights.vb.pp(TEXT_PREFIX), &self.text, plan)
            .map_err(|e| weights.mismatch(e))?;
        Ok(Box::new(model))
    }

    fn text_projection(&self, weights: &Weights) -> Result<Option<Linear>> {
        let load = || -> candle_core::Result<Option<Linear>> {
            let (d_model, embed) = (self.text.hidden_size, self.tower.embed_dim);
            let vb = weights.vb.pp("text_model.proj");
            let inner = if d_model != embed || self.tower.proj_type.is_some() {
                let bias = self
                    .tower
                    .proj_bias
                    .then(|| vb.get(embed, "bias"))
                    .transpose()?;
                Some(Linear::new(vb.get((embed, d_model), "weight")?, bias))
            } else {
                None
            };
            let outer = self
                .add_projections
                .then(|| {
                    weights
                        .vb
                        .get((self.projection_dim, embed), "text_projection.weight")
                })
                .transpose()?
                .map(|w| Linear::new(w, None));
            chain(inner, outer)
        };
        load().map_err(|e| weights.mismatch(e))
    }

    fn load_image_tower(
        &self,
        weights: &Weights,
        plan: &ExecutionPlan,
    ) -> Result<Option<Box<dyn ImageTower>>> {
        let load = || -> candle_core::Result<EvaVisionTower> {
            let projection = self
                .add_projections
                .then(|| {
                    weights.vb.get(
                        (self.projection_dim, self.vision.embed_dim),
                        "visual_projection.weight",
                    )
                })
                .transpose()?
                .map(|w: Tensor| Linear::new(w, None));
            EvaVisionTower::load(
                weights.vb.pp("vision_model"),
                &self.vision,
                projection,
                plan.fused(),
            )
        };
        let tower = load().map_err(|e| weights.mismatch(e))?;
        Ok(Some(Box::new(tower)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2_config() -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("../../tests/fixtures/models/tiny-jina-clip-v2/config.json"),
            )
            .unwrap(),
        )
        .unwrap()
    }

    #[test]
    fn the_text_tower_is_the_named_encoder_with_the_kwargs_over_it() {
        let config = read_config(&v2_config()).unwrap();
        assert_eq!(config.family(), Family::JinaClip);
        assert_eq!(config.hidden_size(), 64);
        assert_eq!(config.max_positions(), Some(8192));
        assert_eq!(config.default_pooling(), Some(Pooling::Mean));
        let tasks = config.task_adapters();
        assert_eq!(tasks.pinned, Some(0));
        // The kwargs' single adapter and instruction replace jina-embeddings-v3's five.
        assert_eq!(tasks.names, ["retrieval.query"]);
        assert!(tasks.select(Some("retrieval.passage")).is_err());
        let (adapter, instruction) = tasks.select(None).unwrap();
        assert_eq!((adapter, instruction), (Some(0), ""));
        let (adapter, instruction) = tasks.select(Some("retrieval.query")).unwrap();
        assert_eq!(adapter, Some(0));
        assert!(instruction.starts_with("Represent the query"));
    }

    #[test]
    fn unsupported_towers_name_their_field() {
        let mut raw = v2_config();
        raw["text_config"]["hf_model_name_or_path"] = "jinaai/jina-bert-implementation".into();
        let (field, reason) = read_config(&raw).unwrap_err();
        assert_eq!(field, "text_config.hf_model_name_or_path");
        assert!(reason.contains("jina-bert-flash"), "{reason}");
        let mut raw = v2_config();
        raw["text_config"]["hf_model_name_or_path"] =
            "jinaai/jina-bert-flash-implementation".into();
        raw["text_config"]["hf_model_config_kwargs"] = serde_json::json!({"use_qk_norm": true});
        raw["text_config"]["default_lora_task"] = Value::Null;
        assert_eq!(read_config(&raw).unwrap_err().0, "text_config.use_qk_norm");
        let mut raw = v2_config();
        raw["vision_config"]["post_norm"] = true.into();
        assert_eq!(read_config(&raw).unwrap_err().0, "vision_config.post_norm");
        let mut raw = v2_config();
        raw["text_config"]["default_lora_task"] = "classification".into();
        assert_eq!(
            read_config(&raw).unwrap_err().0,
            "text_config.default_lora_task"
        );
    }
}

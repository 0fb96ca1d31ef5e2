//! The BERT family: BERT, MiniLM, RoBERTa / XLM-RoBERTa, JinaBERT and its qk-post-norm variant,
//! and jina-embeddings-v3's XLM-RoBERTa (rotary positions, task LoRA adapters, the flash
//! implementation's tensor names). Post-LayerNorm blocks throughout; [`BertVariant`] says which
//! member a checkpoint is.
//!
//! Two executors run the same weights: the fused CPU kernels over packed rows, and candle's
//! graph over the padded view (GPUs, and the reference the fused path is tested against). The
//! [`ExecutionPlan`] picks one at load.

mod attention;
mod config;
mod embeddings;
mod feed_forward;
mod weights;

use candle_core::{DType, Tensor};
use candle_nn::{LayerNorm, Module, VarBuilder};

pub use attention::alibi_slopes;
pub(crate) use attention::attention_bias;
pub use config::{BertConfig, BertVariant, PositionEncoding};
pub(crate) use weights::model_prefix;

use self::attention::BertAttention;
use self::embeddings::BertEmbeddings;
use self::feed_forward::FeedForward;
use self::weights::{layer_norm, layer_norm_residual};
use super::{Backbone, Family, FamilyConfig, TaskAdapters, Weights};
use crate::batch::{AdapterSpan, Hidden, PackedBatch};
use crate::error::Result;
use crate::kernels::RotaryTable;
use crate::plan::{ExecutionPlan, FusedProducts};

/// The family's registration: reads and checks `config.json`.
pub(super) fn read_config(
    raw: &serde_json::Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    Ok(Box::new(BertConfig::resolve(raw)?))
}

impl FamilyConfig for BertConfig {
    fn family(&self) -> Family {
        match self.variant {
            BertVariant::Bert => Family::Bert,
            BertVariant::Roberta => Family::Roberta,
            BertVariant::JinaBert | BertVariant::JinaBertFlash => Family::JinaBert,
            BertVariant::JinaBertQkPostNorm => Family::JinaBertQkPostNorm,
            BertVariant::XlmRobertaFlash => Family::XlmRobertaLora,
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.max_tokens())
    }

    fn task_adapters(&self) -> TaskAdapters {
        TaskAdapters {
            names: self.lora_adaptations.clone().unwrap_or_default(),
            instructions: self.task_instructions.clone().unwrap_or_default(),
            ..Default::default()
        }
    }

    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        let model =
            BertModel::load(weights.vb.clone(), self, plan).map_err(|e| weights.mismatch(e))?;
        Ok(Box::new(model))
    }
}

/// What every layer of the fused path needs besides its input.
pub(super) struct FusedRows<'a> {
    /// First row of each sequence, then the total.
    offsets: &'a [usize],
    /// Leading rows of each sequence that are attended to.
    attended: &'a [usize],
    /// Runs of rows whose sequences use a task adapter.
    adapters: Vec<AdapterSpan>,
    /// RoPE's table up to the longest sequence, for rotary models.
    rotary: Option<RotaryTable>,
}

impl FusedRows<'_> {
    fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }
}

/// What every layer of the graph needs besides its input.
pub(super) struct GraphStep<'a> {
    /// `[batch, 1, 1, seq]`: 0 for attended tokens, a large negative number for the rest.
    mask_bias: Tensor,
    /// RoPE's cos and sin, `[seq, head_dim / 2]`, for rotary models.
    rotary: Option<(Tensor, Tensor)>,
    /// Each batch row's task adapter.
    adapters: &'a [Option<usize>],
}

struct BertLayer {
    attention: BertAttention,
    /// jina-bert-v2-qk-post-norm's `layer_norm_1`: a second residual LayerNorm over the
    /// attention block's output and the layer's input.
    input_norm: Option<LayerNorm>,
    feed_forward: FeedForward,
}

impl BertLayer {
    fn load(
        vb: VarBuilder,
        config: &BertConfig,
        fused: Option<FusedProducts>,
    ) -> candle_core::Result<Self> {
        let input_norm = match config.variant {
            BertVariant::JinaBertQkPostNorm => Some(layer_norm(
                vb.pp("layer_norm_1"),
                config.hidden_size,
                config.layer_norm_eps,
            )?),
            _ => None,
        };
        Ok(Self {
            attention: BertAttention::load(&vb, config, fused)?,
            input_norm,
            feed_forward: FeedForward::load(&vb, config, fused)?,
        })
    }

    fn forward(&self, hidden: &Tensor, step: &GraphStep) -> candle_core::Result<Tensor> {
        let mut attended = self.attention.forward(hidden, step)?;
        if let Some(norm) = &self.input_norm {
            attended = norm.forward(&(attended + hidden)?)?;
        }
        self.feed_forward.forward(&attended, step.adapters)
    }

    fn forward_fused(&self, x: &[f32], rows: &FusedRows) -> candle_core::Result<Vec<f32>> {
        let mut attended = self.attention.forward_fused(x, rows)?;
        if let Some(norm) = &self.input_norm {
            layer_norm_residual(&mut attended, x, None, norm, self.attention.eps)?;
        }
        self.feed_forward
            .forward_fused(&attended, rows, self.attention.eps)
    }
}

pub struct BertModel {
    embeddings: BertEmbeddings,
    layers: Vec<BertLayer>,
    hidden_size: usize,
    storage: DType,
    /// (head size, base) for rotary models.
    rotary: Option<(usize, f64)>,
    fused: Option<FusedProducts>,
}

impl BertModel {
    /// Loads from a checkpoint whose tensors are at the root (`embeddings.*`, sentence-transformers
    /// exports) or under a model prefix (`bert.*`, `roberta.*`, as task heads save them), with
    /// every layer held as `plan`'s executor reads it.
    pub fn load(
        vb: VarBuilder,
        config: &BertConfig,
        plan: &ExecutionPlan,
    ) -> candle_core::Result<Self> {
        let vb = match model_prefix(&vb) {
            Some(prefix) => vb.pp(prefix),
            None => vb,
        };
        let fused = plan.fused();
        let stack = if config.flash_layout() {
            "encoder.layers"
        } else {
            "encoder.layer"
        };
        let layers = (0..config.num_hidden_layers)
            .map(|i| BertLayer::load(vb.pp(format!("{stack}.{i}")), config, fused))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let rotary = match config.positions() {
            PositionEncoding::Rotary { base } => Some((config.head_dim(), base)),
            _ => None,
        };
        Ok(Self {
            embeddings: BertEmbeddings::load(&vb, config)?,
            layers,
            hidden_size: config.hidden_size,
            storage: vb.dtype(),
            rotary,
            fused,
        })
    }

    fn rotary_table(&self, len: usize) -> Option<RotaryTable> {
        self.rotary
            .map(|(head_dim, base)| RotaryTable::new(head_dim, base, len))
    }

    /// The layers as candle operations over the padded view, one tensor per step.
    fn forward_graph(&self, batch: &PackedBatch) -> candle_core::Result<Hidden> {
        let device = self.embeddings.device();
        let padded = batch.padded(&device)?;
        let rotary = match self.rotary_table(padded.max_len) {
            Some(table) => Some(table.tensors(&device, self.storage)?),
            None => None,
        };
        let step = GraphStep {
            mask_bias: attention_bias(&padded.attention_mask, self.storage)?,
            rotary,
            adapters: &padded.adapters,
        };
        let mut hidden = self.embeddings.forward(&padded)?;
        for layer in &self.layers {
            hidden = layer.forward(&hidden, &step)?;
        }
        Hidden::from_padded(&hidden, batch)
    }

    /// The fused CPU path: padding removed, layers run by [`crate::kernels`].
    fn forward_fused(&self, batch: &PackedBatch) -> candle_core::Result<Hidden> {
        let device = self.embeddings.device();
        let padded = batch.padded(&device)?;
        let embedded = self.embeddings.forward(&padded)?;
        let (_, l, h) = embedded.dims3()?;
        let rows = FusedRows {
            offsets: &batch.offsets,
            attended: &batch.attended,
            adapters: batch.adapter_spans(),
            rotary: self.rotary_table(l),
        };
        let flat = embedded.flatten_all()?.to_vec1::<f32>()?;
        let mut x = Vec::with_capacity(rows.total() * h);
        for (i, s) in batch.sequences.iter().enumerate() {
            x.extend_from_slice(&flat[i * l * h..][..s.len() * h]);
        }
        drop(flat);
        for layer in &self.layers {
            x = layer.forward_fused(&x, &rows)?;
        }
        let total = rows.total();
        Ok(Hidden::new(
            Tensor::from_vec(x, (total, h), &device)?,
            batch,
        ))
    }
}

impl Backbone for BertModel {
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Hidden> {
        match self.fused {
            // On a pool worker, the kernels' parallel loops hand work to the other workers
            // directly; called from outside the pool, each of them would wait on a cross-thread
            // wake-up of its own (a few hundred per forward pass at batch 1).
            Some(_) => rayon::scope(|_| self.forward_fused(batch)),
            None => self.forward_graph(batch),
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::tokenize::TokenSequence;

    fn fused_plan() -> ExecutionPlan {
        ExecutionPlan::resolve(crate::DeviceSpec::Cpu, crate::Precision::F32).unwrap()
    }

    fn graph_plan() -> ExecutionPlan {
        ExecutionPlan::graph(Device::Cpu, DType::F32)
    }

    /// Random tensors named as in Hugging Face checkpoints of `config`'s variant.
    fn random_weights(config: &BertConfig) -> VarBuilder<'static> {
        let (h, i, v) = (
            config.hidden_size,
            config.intermediate_size,
            config.vocab_size,
        );
        let mut shapes: Vec<(String, Vec<usize>)> = vec![
            ("embeddings.word_embeddings.weight".into(), vec![v, h]),
            ("embeddings.token_type_embeddings.weight".into(), vec![2, h]),
            ("embeddings.position_embeddings.weight".into(), vec![64, h]),
        ];
        if config.variant == BertVariant::JinaBertFlash {
            shapes.extend([
                ("emb_ln.weight".into(), vec![h]),
                ("emb_ln.bias".into(), vec![h]),
            ]);
            for layer in 0..config.num_hidden_layers {
                let p = format!("encoder.layers.{layer}");
                shapes.extend(
                    [
                        ("mixer.Wqkv.weight", vec![3 * h, h]),
                        ("mixer.Wqkv.bias", vec![3 * h]),
                        ("mixer.out_proj.weight", vec![h, h]),
                        ("mixer.out_proj.bias", vec![h]),
                        ("norm1.weight", vec![h]),
                        ("norm1.bias", vec![h]),
                        ("mlp.gated_layers.weight", vec![2 * i, h]),
                        ("mlp.wo.weight", vec![h, i]),
                        ("mlp.wo.bias", vec![h]),
                        ("norm2.weight", vec![h]),
                        ("norm2.bias", vec![h]),
                    ]
                    .into_iter()
                    .map(|(n, s)| (format!("{p}.{n}"), s)),
                );
            }
        } else {
            shapes.extend([
                ("embeddings.LayerNorm.weight".into(), vec![h]),
                ("embeddings.LayerNorm.bias".into(), vec![h]),
            ]);
            for layer in 0..config.num_hidden_layers {
                let p = format!("encoder.layer.{layer}");
                for n in ["query", "key", "value"] {
                    shapes.push((format!("{p}.attention.self.{n}.weight"), vec![h, h]));
                    shapes.push((format!("{p}.attention.self.{n}.bias"), vec![h]));
                }
                let mut more = vec![
                    ("attention.output.dense.weight", vec![h, h]),
                    ("attention.output.dense.bias", vec![h]),
                    ("attention.output.LayerNorm.weight", vec![h]),
                    ("attention.output.LayerNorm.bias", vec![h]),
                ];
                match config.variant {
                    BertVariant::JinaBertQkPostNorm => more.extend([
                        ("attention.self.layer_norm_q.weight", vec![h]),
                        ("attention.self.layer_norm_q.bias", vec![h]),
                        ("attention.self.layer_norm_k.weight", vec![h]),
                        ("attention.self.layer_norm_k.bias", vec![h]),
                        ("layer_norm_1.weight", vec![h]),
                        ("layer_norm_1.bias", vec![h]),
                        ("mlp.up_gated_layer.weight", vec![2 * i, h]),
                        ("mlp.down_layer.weight", vec![h, i]),
                        ("mlp.down_layer.bias", vec![h]),
                        ("layer_norm_2.weight", vec![h]),
                        ("layer_norm_2.bias", vec![h]),
                    ]),
                    BertVariant::JinaBert => more.extend([
                        ("mlp.gated_layers.weight", vec![2 * i, h]),
                        ("mlp.wo.weight", vec![h, i]),
                        ("mlp.wo.bias", vec![h]),
                        ("mlp.layernorm.weight", vec![h]),
                        ("mlp.layernorm.bias", vec![h]),
                    ]),
                    _ => more.extend([
                        ("intermediate.dense.weight", vec![i, h]),
                        ("intermediate.dense.bias", vec![i]),
                        ("output.dense.weight", vec![h, i]),
                        ("output.dense.bias", vec![h]),
                        ("output.LayerNorm.weight", vec![h]),
                        ("output.LayerNorm.bias", vec![h]),
                    ]),
                }
                shapes.extend(more.into_iter().map(|(n, s)| (format!("{p}.{n}"), s)));
            }
        }
        let tensors = shapes
            .into_iter()
            .map(|(name, shape)| {
                let t = Tensor::randn(0f32, 0.3, shape, &Device::Cpu).unwrap();
                // LayerNorm gains near 1, as trained models have them.
                let is_norm = name.ends_with("norm.weight")
                    || name.ends_with("LayerNorm.weight")
                    || name.ends_with("norm1.weight")
                    || name.ends_with("norm2.weight")
                    || name.ends_with("ln.weight")
                    || name.contains("layer_norm_");
                let t = if is_norm && name.ends_with("weight") {
                    (t + 1.0).unwrap()
                } else {
                    t
                };
                (name, t)
            })
            .collect();
        VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu)
    }

    fn config(variant: BertVariant) -> BertConfig {
        let alibi = variant != BertVariant::Bert;
        let mut raw = serde_json::json!({
            "vocab_size": 50, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 48,
            "max_position_embeddings": 64,
            "position_embedding_type": if alibi { "alibi" } else { "absolute" },
            "feed_forward_type": if alibi { "geglu" } else { "original" },
        });
        if variant == BertVariant::JinaBertQkPostNorm {
            raw["auto_map"] = serde_json::json!({"AutoModel": "jinaai/jina-bert-v2-qk-post-norm"});
        }
        if variant == BertVariant::JinaBertFlash {
            raw["auto_map"] =
                serde_json::json!({"AutoModel": "jinaai/jina-bert-flash-implementation"});
        }
        let config = BertConfig::resolve(&raw).unwrap();
        assert_eq!(config.variant, variant);
        config
    }

    #[test]
    fn fused_cpu_path_matches_candle_operations() {
        for variant in [
            BertVariant::Bert,
            BertVariant::JinaBert,
            BertVariant::JinaBertQkPostNorm,
            BertVariant::JinaBertFlash,
        ] {
            let config = config(variant);
            let vb = random_weights(&config);
            let fused = BertModel::load(vb.clone(), &config, &fused_plan()).unwrap();
            let graph = BertModel::load(vb, &config, &graph_plan()).unwrap();
            let sequences = token_sequences(&[7, 3, 12], 7, 50);
            // The last sequence has trailing input that is not attended to (ColBERT queries).
            let batch = PackedBatch::with_attention(sequences.iter().collect(), vec![7, 3, 9], 0);
            assert_paths_agree(&fused, &graph, &batch, &format!("{variant:?}"));
        }
    }

    #[test]
    fn rotary_and_task_adapters_match_on_both_paths() {
        // The jina-embeddings-v3 fixture (flash layout, LoRA adapters, rotary): the fused path
        // against candle's operations, rows of one batch on different adapters.
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models/tiny-jina-v3");
        let raw = serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap())
            .unwrap();
        let config = BertConfig::resolve(&raw).unwrap();
        assert_eq!(config.variant, BertVariant::XlmRobertaFlash);
        let files = [dir.join("model.safetensors")];
        let vb = crate::models::var_builder(&files, DType::F32, &Device::Cpu).unwrap();
        let fused = BertModel::load(vb.clone(), &config, &fused_plan()).unwrap();
        let graph = BertModel::load(vb, &config, &graph_plan()).unwrap();
        let sequences = token_sequences(&[9, 4, 30], 131, 30522);
        let batch = PackedBatch::new(sequences.iter().collect(), 0).with_adapters(vec![
            Some(4),
            None,
            Some(0),
        ]);
        assert_paths_agree(&fused, &graph, &batch, "v3");
    }

    /// Sequences of `lengths` with ids striding through a `vocab`.
    fn token_sequences(lengths: &[usize], stride: u32, vocab: u32) -> Vec<TokenSequence> {
        lengths
            .iter()
            .map(|&n| TokenSequence {
                ids: (0..n as u32).map(|t| (t * stride + 3) % vocab).collect(),
                type_ids: vec![0; n],
            })
            .collect()
    }

    /// The fused path's token vectors within 1e-4 of the graph's.
    fn assert_paths_agree(fused: &BertModel, graph: &BertModel, batch: &PackedBatch, what: &str) {
        let a = fused.forward(batch).unwrap();
        let b = graph.forward(batch).unwrap();
        assert_eq!(a.offsets, b.offsets);
        let a = a.states.to_vec2::<f32>().unwrap();
        let b = b.states.to_vec2::<f32>().unwrap();
        assert_eq!(a.len(), batch.total_tokens());
        for (t, (ra, rb)) in a.iter().zip(&b).enumerate() {
            for (x, y) in ra.iter().zip(rb) {
                assert!((x - y).abs() < 1e-4, "{what} token {t}: {x} vs {y}");
            }
        }
    }
}

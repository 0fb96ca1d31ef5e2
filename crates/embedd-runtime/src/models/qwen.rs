//! Llama-style blocks as embedders, in the transformers layout: the Qwen2 and Qwen3 decoders
//! (Qwen3-Embedding; jina-code-embeddings, built on Qwen2.5-Coder; `Qwen3Model`, `Qwen2Model`) and
//! the EuroBERT encoder (`EuroBertModel`). Grouped key/value heads, rotary positions, SwiGLU
//! feed-forwards, pre-RMSNorm blocks; Qwen3 RMS-normalizes each head's query and key, Qwen2 biases
//! the query, key and value projections instead, EuroBERT has neither. The decoders attend
//! causally and a text's vector is its last token's; EuroBERT attends both ways and is
//! mean-pooled. Runs on the fused CPU kernels (f32 or bf16: packed rows, grouped attention per
//! (sequence, head)) or candle's graph.

use candle_core::{DType, Device, Module, Tensor, D};
use candle_nn::{Embedding, Linear, VarBuilder};
use serde::Deserialize;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::lora::{spans_within, AdapterSpan, LinearLora};
use super::peft::{adapter_files, PeftAdapter, PeftAdapters};
use super::{Backbone, Dense, Family, FamilyConfig, TaskAdapters, Weights};
use crate::activation::Activation;
use crate::batch::{Hidden, PackedBatch};
use crate::error::{Result, RuntimeError};
use crate::heads::Pooling;
use crate::kernels::{self, AttentionProducts, AttentionShape, HostSlice, RotaryTable};
use crate::plan::{ExecutionPlan, FusedProducts};

fn default_theta() -> f64 {
    1_000_000.0
}
fn default_eps() -> f64 {
    1e-6
}
fn default_act() -> String {
    "silu".into()
}

/// Where the members of the family differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QwenGeneration {
    /// Biased q/k/v projections.
    Qwen2,
    /// Per-head q/k RMSNorm; biases only with `attention_bias`.
    #[default]
    Qwen3,
    /// Bidirectional attention; no head norms, biases only with `attention_bias`.
    EuroBert,
}

impl QwenGeneration {
    fn causal(self) -> bool {
        self != QwenGeneration::EuroBert
    }
}

/// The fields of a Qwen2 or Qwen3 `config.json` the family reads.
#[derive(Debug, Clone, Deserialize)]
pub struct Qwen3Config {
    /// From `model_type`.
    #[serde(skip)]
    pub generation: QwenGeneration,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    /// Qwen3 sets it apart from `hidden_size / heads`.
    #[serde(default)]
    pub head_dim: Option<usize>,
    pub max_position_embeddings: usize,
    #[serde(default = "default_theta")]
    pub rope_theta: f64,
    #[serde(default = "default_eps")]
    pub rms_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default)]
    pub attention_bias: bool,
    #[serde(default)]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes the rotary settings here (`rope_theta`, `rope_type`).
    #[serde(default)]
    pub rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    pub use_sliding_window: bool,
    /// Llama's (EuroBERT's) biased feed-forward; not served.
    #[serde(default)]
    pub mlp_bias: bool,
    /// jina-embeddings-v5-text: the PEFT adapters under `adapters/<name>/`.
    #[serde(default)]
    pub task_names: Option<Vec<String>>,
    /// From `model_type: jina_embeddings_v5`: the base model with its task adapters.
    #[serde(skip)]
    pub jina_v5: bool,
}

impl Qwen3Config {
    fn theta(&self) -> f64 {
        self.rope_parameters
            .as_ref()
            .and_then(|p| p.get("rope_theta"))
            .and_then(serde_json::Value::as_f64)
            .unwrap_or(self.rope_theta)
    }

    fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }
}

/// The family's registration.
pub(super) fn read_config(
    raw: &serde_json::Value,
) -> std::result::Result<Box<dyn FamilyConfig>, (String, String)> {
    parse_config(raw).map(|c| Box::new(c) as Box<dyn FamilyConfig>)
}

fn parse_config(raw: &serde_json::Value) -> std::result::Result<Qwen3Config, (String, String)> {
    let mut config: Qwen3Config = serde_json::from_value(raw.clone())
        .map_err(|e| ("(qwen config)".to_string(), e.to_string()))?;
    let model_type = raw.get("model_type").and_then(serde_json::Value::as_str);
    // jina-embeddings-v5-text's config is its base model's under another model_type: Qwen3's
    // (small) or EuroBERT's (nano), which alone has the masked-LM fields.
    let eurobert_fields =
        raw.get("mask_token_id").is_some() || raw.get("classifier_pooling").is_some();
    config.generation = match model_type {
        Some("qwen2") => QwenGeneration::Qwen2,
        Some("eurobert") => QwenGeneration::EuroBert,
        Some("jina_embeddings_v5") if eurobert_fields => QwenGeneration::EuroBert,
        _ => QwenGeneration::Qwen3,
    };
    config.jina_v5 = model_type == Some("jina_embeddings_v5");
    if config.jina_v5 && config.task_names.as_ref().is_none_or(Vec::is_empty) {
        return Err((
            "task_names".into(),
            "jina-embeddings-v5 names its task adapters here".into(),
        ));
    }
    let refuse = |field: &str, reason: String| Err((field.to_string(), reason));
    if config.num_key_value_heads == 0
        || !config
            .num_attention_heads
            .is_multiple_of(config.num_key_value_heads)
    {
        return refuse(
            "num_key_value_heads",
            format!(
                "{} key/value heads do not divide {} attention heads",
                config.num_key_value_heads, config.num_attention_heads
            ),
        );
    }
    if !config.head_dim().is_multiple_of(2) {
        return refuse(
            "head_dim",
            "rotary embeddings need an even head size".into(),
        );
    }
    if config.hidden_act != "silu" {
        return refuse(
            "hidden_act",
            format!("'{}' is not supported (silu)", config.hidden_act),
        );
    }
    if config.rope_scaling.as_ref().is_some_and(|v| !v.is_null()) {
        return refuse(
            "rope_scaling",
            "scaled rotary embeddings are not supported".into(),
        );
    }
    let rope_type = config
        .rope_parameters
        .as_ref()
        .and_then(|p| p.get("rope_type"))
        .and_then(serde_json::Value::as_str);
    if rope_type.is_some_and(|t| t != "default") {
        return refuse(
            "rope_parameters.rope_type",
            format!(
                "'{}' is not supported (default)",
                rope_type.unwrap_or_default()
            ),
        );
    }
    if config.mlp_bias {
        return refuse(
            "mlp_bias",
            "biased feed-forward projections are not supported".into(),
        );
    }
    if config.use_sliding_window {
        return refuse(
            "use_sliding_window",
            "sliding-window attention is not supported".into(),
        );
    }
    Ok(config)
}

/// The prompts jina-embeddings-v5's modeling code puts first: queries', and everything else's.
const V5_QUERY_PROMPT: &str = "Query: ";
const V5_DOCUMENT_PROMPT: &str = "Document: ";

impl Qwen3Config {
    /// jina-embeddings-v5's served tasks in adapter-stack order: (API task, adapter, prompt).
    /// Its `retrieval` adapter serves `retrieval.query` and `retrieval.passage`; `clustering` is
    /// the API's `separation`, as it is for jina-embeddings-v3.
    fn v5_tasks(&self) -> Vec<(String, String, &'static str)> {
        let mut tasks = Vec::new();
        for name in self.task_names.iter().flatten() {
            match name.as_str() {
                "retrieval" => {
                    for (task, prompt) in [
                        ("retrieval.query", V5_QUERY_PROMPT),
                        ("retrieval.passage", V5_DOCUMENT_PROMPT),
                    ] {
                        tasks.push((task.to_string(), name.clone(), prompt));
                    }
                }
                "clustering" => tasks.push(("separation".into(), name.clone(), V5_DOCUMENT_PROMPT)),
                _ => tasks.push((name.clone(), name.clone(), V5_DOCUMENT_PROMPT)),
            }
        }
        tasks
    }

    /// Whether `module` is a projection of this model's blocks (what an adapter may target).
    fn has_projection(&self, module: &str) -> bool {
        let Some(rest) = module.strip_prefix("layers.") else {
            return false;
        };
        let Some((layer, name)) = rest.split_once('.') else {
            return false;
        };
        layer
            .parse::<usize>()
            .is_ok_and(|i| i < self.num_hidden_layers)
            && matches!(
                name,
                "self_attn.q_proj"
                    | "self_attn.k_proj"
                    | "self_attn.v_proj"
                    | "self_attn.o_proj"
                    | "mlp.gate_proj"
                    | "mlp.up_proj"
                    | "mlp.down_proj"
            )
    }

    /// The served tasks' adapters, read from the model directory's `adapters/`.
    fn open_adapters(&self, weights: &Weights) -> Result<PeftAdapters> {
        let mut opened: BTreeMap<String, Arc<PeftAdapter>> = BTreeMap::new();
        let mut tasks = Vec::new();
        for (_, adapter, _) in self.v5_tasks() {
            if let Some(open) = opened.get(&adapter) {
                tasks.push(open.clone());
                continue;
            }
            let [config, tensors] = adapter_files(&adapter);
            let path = |name: &str| {
                weights
                    .extra_file(name)
                    .map(Path::to_path_buf)
                    .ok_or_else(|| RuntimeError::ModelFile {
                        path: PathBuf::from(name),
                        reason: format!(
                            "task adapter '{adapter}' (config.json task_names) is missing"
                        ),
                    })
            };
            let open = Arc::new(PeftAdapter::open(&path(&config)?, &path(&tensors)?, |m| {
                self.has_projection(m)
            })?);
            opened.insert(adapter, open.clone());
            tasks.push(open);
        }
        Ok(PeftAdapters::new(tasks, weights.path().to_path_buf()))
    }
}

impl FamilyConfig for Qwen3Config {
    fn family(&self) -> Family {
        if self.jina_v5 {
            return Family::JinaEmbeddingsV5;
        }
        match self.generation {
            QwenGeneration::Qwen2 => Family::Qwen2,
            QwenGeneration::Qwen3 => Family::Qwen3,
            QwenGeneration::EuroBert => Family::EuroBert,
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }

    fn max_positions(&self) -> Option<usize> {
        Some(self.max_position_embeddings)
    }

    /// A decoder's last token has seen the whole input; an encoder's tokens all have.
    /// jina-embeddings-v5 takes the last token on either base.
    fn default_pooling(&self) -> Option<Pooling> {
        Some(match self.generation.causal() || self.jina_v5 {
            true => Pooling::LastToken,
            false => Pooling::Mean,
        })
    }

    fn task_adapters(&self) -> TaskAdapters {
        if !self.jina_v5 {
            return TaskAdapters::default();
        }
        let tasks = self.v5_tasks();
        let default_task = tasks
            .iter()
            .map(|(task, _, _)| task)
            .find(|t| *t == "retrieval.passage")
            .or(tasks.first().map(|(task, _, _)| task))
            .cloned();
        TaskAdapters {
            names: tasks.iter().map(|(task, _, _)| task.clone()).collect(),
            instructions: tasks
                .iter()
                .map(|(task, _, prompt)| (task.clone(), prompt.to_string()))
                .collect(),
            pinned: None,
            default_task,
        }
    }

    fn extra_files(&self) -> Vec<String> {
        self.task_names
            .iter()
            .flatten()
            .flat_map(|name| adapter_files(name))
            .collect()
    }

    fn load(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Box<dyn Backbone>> {
        Ok(Box::new(self.build(weights, plan)?))
    }
}

impl Qwen3Config {
    /// The model with its blocks' task adapters (jina-embeddings-v5), held as `plan` runs it.
    fn build(&self, weights: &Weights, plan: &ExecutionPlan) -> Result<Qwen3Model> {
        // Saved from a *ForCausalLM the layers sit under `model.`; from *Model at the root.
        let vb = if weights.vb.contains_tensor("model.embed_tokens.weight") {
            weights.vb.pp("model")
        } else {
            weights.vb.clone()
        };
        let fused = plan.fused();
        let adapters = match self.jina_v5 {
            true => Some(self.open_adapters(weights)?),
            false => None,
        };
        // The fused kernels read float32 host tensors; the graph reads the weights' own format.
        let (dtype, device) = match fused {
            Some(_) => (DType::F32, Device::Cpu),
            None => (plan.storage, plan.device.clone()),
        };
        let loras = (0..self.num_hidden_layers)
            .map(|i| LayerLoras::build(adapters.as_ref(), self, i, dtype, &device))
            .collect::<Result<Vec<_>>>()?;
        Qwen3Model::load(vb, self, fused, loras).map_err(|e| weights.mismatch(e))
    }
}

/// RoPE's cos and sin for positions `0..len`, `[len, head_dim]` (each half repeated).
fn rotary(
    len: usize,
    head_dim: usize,
    theta: f64,
    dtype: DType,
    device: &Device,
) -> candle_core::Result<(Tensor, Tensor)> {
    let half = head_dim / 2;
    let mut cos = Vec::with_capacity(len * head_dim);
    let mut sin = Vec::with_capacity(len * head_dim);
    for p in 0..len {
        let row: Vec<f64> = (0..half)
            .map(|i| p as f64 / theta.powf((2 * i) as f64 / head_dim as f64))
            .collect();
        for _ in 0..2 {
            cos.extend(row.iter().map(|a| a.cos() as f32));
            sin.extend(row.iter().map(|a| a.sin() as f32));
        }
    }
    let table = |v: Vec<f32>| Tensor::from_vec(v, (len, head_dim), device)?.to_dtype(dtype);
    Ok((table(cos)?, table(sin)?))
}

/// `x * cos + rotate_half(x) * sin` on `[b, heads, len, head_dim]`, the first half of each head
/// turned against the second.
fn apply_rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    let first = x.narrow(D::Minus1, 0, d / 2)?;
    let second = x.narrow(D::Minus1, d / 2, d / 2)?;
    let turned = Tensor::cat(&[&second.neg()?, &first], D::Minus1)?;
    x.broadcast_mul(cos)? + turned.broadcast_mul(sin)?
}

/// An RMSNorm's gain (`x / rms(x) · weight`), read by both executors.
struct RmsWeight {
    weight: Tensor,
    eps: f64,
}

impl RmsWeight {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            weight: vb.get(size, "weight")?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        candle_nn::ops::rms_norm(x, &self.weight, self.eps as f32)
    }

    fn host(&self) -> candle_core::Result<HostSlice<'_>> {
        HostSlice::of(&self.weight)
    }
}

/// One block's task adapters, per product (jina-embeddings-v5; none elsewhere).
#[derive(Default)]
struct LayerLoras {
    qkv: Option<LinearLora>,
    o: Option<LinearLora>,
    gate_up: Option<LinearLora>,
    down: Option<LinearLora>,
}

impl LayerLoras {
    fn build(
        adapters: Option<&PeftAdapters>,
        c: &Qwen3Config,
        layer: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let Some(set) = adapters else {
            return Ok(Self::default());
        };
        let (h, i, d) = (c.hidden_size, c.intermediate_size, c.head_dim());
        let (q_out, kv_out) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let name = |m: &str| format!("layers.{layer}.{m}");
        let (q, k, v, o) = (
            name("self_attn.q_proj"),
            name("self_attn.k_proj"),
            name("self_attn.v_proj"),
            name("self_attn.o_proj"),
        );
        let (gate, up, down) = (
            name("mlp.gate_proj"),
            name("mlp.up_proj"),
            name("mlp.down_proj"),
        );
        Ok(Self {
            qkv: set.linear(&[(&q, q_out), (&k, kv_out), (&v, kv_out)], h, dtype, device)?,
            o: set.linear(&[(&o, h)], q_out, dtype, device)?,
            gate_up: set.linear(&[(&gate, i), (&up, i)], h, dtype, device)?,
            down: set.linear(&[(&down, h)], i, dtype, device)?,
        })
    }
}

struct Qwen3Attention {
    /// The query, key and value projections as one product giving [q | k | v].
    qkv: Dense,
    o: Dense,
    /// Qwen3's per-head norms (Qwen2 and EuroBERT have none).
    q_norm: Option<RmsWeight>,
    k_norm: Option<RmsWeight>,
    causal: bool,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    products: AttentionProducts,
}

impl Qwen3Attention {
    fn load(
        vb: VarBuilder,
        c: &Qwen3Config,
        fused: Option<FusedProducts>,
        qkv_lora: Option<LinearLora>,
        o_lora: Option<LinearLora>,
    ) -> candle_core::Result<Self> {
        let (h, d) = (c.hidden_size, c.head_dim());
        let (q_out, kv_out) = (c.num_attention_heads * d, c.num_key_value_heads * d);
        let qwen2 = c.generation == QwenGeneration::Qwen2;
        let (qkv_bias, o_bias) = (qwen2 || c.attention_bias, !qwen2 && c.attention_bias);
        let norm = |name: &str| match c.generation {
            QwenGeneration::Qwen3 => RmsWeight::load(vb.pp(name), d, c.rms_norm_eps).map(Some),
            QwenGeneration::Qwen2 | QwenGeneration::EuroBert => Ok(None),
        };
        let parts = [("q_proj", q_out), ("k_proj", kv_out), ("v_proj", kv_out)];
        let weight = parts
            .iter()
            .map(|(name, out)| vb.pp(name).get((*out, h), "weight"))
            .collect::<candle_core::Result<Vec<_>>>()?;
        let bias = qkv_bias
            .then(|| {
                parts
                    .iter()
                    .map(|(name, out)| vb.pp(name).get(*out, "bias"))
                    .collect::<candle_core::Result<Vec<_>>>()
            })
            .transpose()?;
        let qkv = Linear::new(
            Tensor::cat(&weight, 0)?,
            bias.map(|b| Tensor::cat(&b, 0)).transpose()?,
        );
        Ok(Self {
            qkv: Dense::load(qkv, fused)?.with_lora(qkv_lora),
            o: Dense::load(
                candle_nn::linear_b(q_out, h, o_bias, vb.pp("o_proj"))?,
                fused,
            )?
            .with_lora(o_lora),
            q_norm: norm("q_norm")?,
            k_norm: norm("k_norm")?,
            causal: c.generation.causal(),
            heads: c.num_attention_heads,
            kv_heads: c.num_key_value_heads,
            head_dim: d,
            products: match fused {
                Some(FusedProducts::Bf16) => AttentionProducts::Bf16,
                _ => AttentionProducts::F32,
            },
        })
    }

    fn scale(&self) -> f64 {
        (self.head_dim as f64).powf(-0.5)
    }

    /// `bias`: `[b, 1, len, len]`, padding and (for the decoders) causal together.
    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let (b, l, _) = x.dims3()?;
        let d = self.head_dim;
        let qkv = self.qkv.forward_adapted(x, adapters)?;
        // `[b, heads, len, head_dim]`, each head's query and key RMS-normalized first.
        let split =
            |first: usize, heads: usize, norm: Option<&RmsWeight>| -> candle_core::Result<Tensor> {
                let t = qkv
                    .narrow(D::Minus1, first * d, heads * d)?
                    .reshape((b, l, heads, d))?;
                let t = match norm {
                    Some(norm) => norm.forward(&t)?,
                    None => t,
                };
                t.transpose(1, 2)?.contiguous()
            };
        let q = split(0, self.heads, self.q_norm.as_ref())?;
        let k = split(self.heads, self.kv_heads, self.k_norm.as_ref())?;
        let v = split(self.heads + self.kv_heads, self.kv_heads, None)?;
        let q = apply_rotary(&q, &rope.0, &rope.1)?;
        let k = apply_rotary(&k, &rope.0, &rope.1)?;
        // Grouped heads: each key/value head serves `heads / kv_heads` query heads in turn.
        let groups = self.heads / self.kv_heads;
        let repeat = |t: Tensor| -> candle_core::Result<Tensor> {
            if groups == 1 {
                return t.contiguous();
            }
            t.unsqueeze(2)?
                .expand((b, self.kv_heads, groups, l, d))?
                .reshape((b, self.heads, l, d))
        };
        let (k, v) = (repeat(k)?, repeat(v)?);
        let scores = (q * self.scale())?.matmul(&k.t()?)?.broadcast_add(bias)?;
        let probs = candle_nn::ops::softmax_last_dim(&scores)?;
        let context = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, l, self.heads * d))?;
        self.o.forward_adapted(&context, adapters)
    }

    /// The fused path over packed rows: the output projection's product, its bias (if any)
    /// left to the residual step.
    fn forward_fused(
        &self,
        x: &[f32],
        offsets: &[usize],
        keys: &[usize],
        table: &RotaryTable,
        spans: &[AdapterSpan],
    ) -> candle_core::Result<Vec<f32>> {
        let rows = offsets.last().copied().unwrap_or(0);
        let d = self.head_dim;
        let width = (self.heads + 2 * self.kv_heads) * d;
        let mut qkv = self.qkv.forward_host_activated(x, rows, spans, None)?;
        let norms = [
            (0, self.heads, &self.q_norm),
            (self.heads, self.kv_heads, &self.k_norm),
        ];
        for (first, heads, norm) in norms {
            if let Some(norm) = norm {
                let gamma = norm.host()?;
                kernels::rms_norm_columns(
                    &mut qkv,
                    width,
                    first * d,
                    heads,
                    &gamma,
                    norm.eps as f32,
                );
            }
        }
        kernels::rotary(&mut qkv, offsets, (self.heads, self.kv_heads, d), table);
        let shape = AttentionShape {
            heads: self.heads,
            kv_heads: self.kv_heads,
            head_dim: d,
            scale: self.scale() as f32,
            causal: self.causal,
        };
        let context = kernels::attention(&qkv, offsets, keys, shape, None, self.products);
        drop(qkv);
        self.o.forward_host_adapted(&context, rows, spans)
    }
}

/// `down(silu(gate x) * up x)`, `gate` and `up` run as one product giving [gate | up].
struct Qwen3Mlp {
    gate_up: Dense,
    /// The model's width (the input's and the output's).
    width: usize,
    hidden: usize,
    down: Dense,
}

impl Qwen3Mlp {
    fn load(
        vb: VarBuilder,
        c: &Qwen3Config,
        fused: Option<FusedProducts>,
        gate_up_lora: Option<LinearLora>,
        down_lora: Option<LinearLora>,
    ) -> candle_core::Result<Self> {
        let (h, i) = (c.hidden_size, c.intermediate_size);
        let weight = Tensor::cat(
            &[
                vb.pp("gate_proj").get((i, h), "weight")?,
                vb.pp("up_proj").get((i, h), "weight")?,
            ],
            0,
        )?;
        Ok(Self {
            gate_up: Dense::load(Linear::new(weight, None), fused)?.with_lora(gate_up_lora),
            width: h,
            hidden: i,
            down: Dense::load(candle_nn::linear_no_bias(i, h, vb.pp("down_proj"))?, fused)?
                .with_lora(down_lora),
        })
    }

    fn forward(&self, x: &Tensor, adapters: &[Option<usize>]) -> candle_core::Result<Tensor> {
        let both = self.gate_up.forward_adapted(x, adapters)?;
        let gate = candle_nn::ops::silu(&both.narrow(D::Minus1, 0, self.hidden)?)?;
        let inner = (gate * both.narrow(D::Minus1, self.hidden, self.hidden)?)?;
        self.down.forward_adapted(&inner, adapters)
    }

    /// Chunk by chunk of `chunks` (see [`BlockChunks`]).
    fn forward_fused(&self, x: &[f32], chunks: &[RowChunk]) -> candle_core::Result<Vec<f32>> {
        let mut out = Vec::with_capacity(x.len());
        for chunk in chunks {
            let rows = chunk.rows.len();
            let x = &x[chunk.rows.start * self.width..chunk.rows.end * self.width];
            let both = self.gate_up.forward_host_adapted(x, rows, &chunk.spans)?;
            let inner = kernels::gated_activation(&both, self.hidden, Activation::Silu, true);
            drop(both);
            out.extend(self.down.forward_host_adapted(&inner, rows, &chunk.spans)?);
        }
        Ok(out)
    }
}

/// `x + attn(norm(x))`, then `+ mlp(norm(.))`.
struct Qwen3Layer {
    input_norm: RmsWeight,
    attention: Qwen3Attention,
    post_attention_norm: RmsWeight,
    mlp: Qwen3Mlp,
}

impl Qwen3Layer {
    fn load(
        vb: VarBuilder,
        c: &Qwen3Config,
        fused: Option<FusedProducts>,
        loras: LayerLoras,
    ) -> candle_core::Result<Self> {
        let (h, eps) = (c.hidden_size, c.rms_norm_eps);
        let LayerLoras {
            qkv,
            o,
            gate_up,
            down,
        } = loras;
        Ok(Self {
            input_norm: RmsWeight::load(vb.pp("input_layernorm"), h, eps)?,
            attention: Qwen3Attention::load(vb.pp("self_attn"), c, fused, qkv, o)?,
            post_attention_norm: RmsWeight::load(vb.pp("post_attention_layernorm"), h, eps)?,
            mlp: Qwen3Mlp::load(vb.pp("mlp"), c, fused, gate_up, down)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        bias: &Tensor,
        rope: &(Tensor, Tensor),
        adapters: &[Option<usize>],
    ) -> candle_core::Result<Tensor> {
        let normed = self.input_norm.forward(x)?;
        let x = (x + self.attention.forward(&normed, bias, rope, adapters)?)?;
        let normed = self.post_attention_norm.forward(&x)?;
        &x + self.mlp.forward(&normed, adapters)?
    }

    /// The fused path, `x` (`rows x hidden`) updated in place, chunk by chunk of `chunks`.
    fn forward_fused(
        &self,
        x: &mut [f32],
        keys: &[usize],
        table: &RotaryTable,
        chunks: &BlockChunks,
    ) -> candle_core::Result<()> {
        let width = self.mlp.width;
        let norm = &self.input_norm;
        let normed = kernels::rms_norm(x, &norm.host()?, norm.eps as f32);
        let mut attended = Vec::with_capacity(x.len());
        for run in &chunks.attention {
            attended.extend(self.attention.forward_fused(
                &normed[run.rows.start * width..run.rows.end * width],
                &run.offsets,
                &keys[run.sequences.clone()],
                table,
                &run.spans,
            )?);
        }
        drop(normed);
        let norm = &self.post_attention_norm;
        let o_bias = self.attention.o.host_bias()?;
        let normed = kernels::residual_then_rms_norm(
            x,
            &attended,
            o_bias.as_deref(),
            &norm.host()?,
            norm.eps as f32,
        );
        drop(attended);
        let out = self.mlp.forward_fused(&normed, &chunks.feed_forward)?;
        kernels::residual_add(x, &out, None);
        Ok(())
    }
}

/// The most one layer product holds at a time on the fused path: the allocator's reuse threshold,
/// so a large batch's buffers are reused layer after layer instead of mapped afresh.
const CHUNK_FLOATS: usize = crate::allocator::REUSED_BUFFER_BYTES / std::mem::size_of::<f32>();

/// Consecutive runs of the sequences that `offsets` (one more than the sequences) delimit, each
/// of at most `max_rows` rows, or of one sequence where that alone is longer.
fn sequence_chunks(offsets: &[usize], max_rows: usize) -> Vec<std::ops::Range<usize>> {
    let sequences = offsets.len().saturating_sub(1);
    let mut chunks = Vec::new();
    let mut start = 0;
    for end in 1..=sequences {
        let fits = offsets[end] - offsets[start] <= max_rows;
        if !fits && end - 1 > start {
            chunks.push(start..end - 1);
            start = end - 1;
        }
    }
    if start < sequences {
        chunks.push(start..sequences);
    }
    chunks
}

/// Rows of a batch and their adapters, numbered from the chunk's first row.
struct RowChunk {
    rows: std::ops::Range<usize>,
    spans: Vec<AdapterSpan>,
}

/// A run of whole sequences: its rows, which sequences, their offsets from its first row.
struct SequenceRun {
    rows: std::ops::Range<usize>,
    sequences: std::ops::Range<usize>,
    offsets: Vec<usize>,
    spans: Vec<AdapterSpan>,
}

/// How a batch goes through every block on the fused path, worked out once per forward pass:
/// attention in runs of whole sequences and the feed-forward in row chunks, each product at most
/// `chunk_floats` (a longer sequence's runs alone). A 4,096-token batch at Qwen3-0.6B's width
/// would otherwise map (and fault in) 150 MB of fresh pages per layer.
struct BlockChunks {
    attention: Vec<SequenceRun>,
    feed_forward: Vec<RowChunk>,
}

impl BlockChunks {
    /// `qkv_width` / `gate_up_width`: the floats per row of the two widest products.
    fn new(
        packed: &PackedBatch,
        spans: &[AdapterSpan],
        chunk_floats: usize,
        qkv_width: usize,
        gate_up_width: usize,
    ) -> Self {
        let offsets = &packed.offsets;
        let attention = sequence_chunks(offsets, chunk_floats / qkv_width.max(1))
            .into_iter()
            .map(|sequences| {
                let (first, last) = (offsets[sequences.start], offsets[sequences.end]);
                SequenceRun {
                    rows: first..last,
                    offsets: offsets[sequences.start..=sequences.end]
                        .iter()
                        .map(|o| o - first)
                        .collect(),
                    sequences,
                    spans: spans_within(spans, first..last),
                }
            })
            .collect();
        let rows = offsets.last().copied().unwrap_or(0);
        let step = (chunk_floats / gate_up_width.max(1)).max(1);
        let feed_forward = (0..rows)
            .step_by(step)
            .map(|start| {
                let rows = start..rows.min(start + step);
                RowChunk {
                    spans: spans_within(spans, rows.clone()),
                    rows,
                }
            })
            .collect();
        Self {
            attention,
            feed_forward,
        }
    }
}

/// The decoder up to its final RMSNorm: one vector per token.
pub struct Qwen3Model {
    embed_tokens: Embedding,
    layers: Vec<Qwen3Layer>,
    norm: RmsWeight,
    hidden_size: usize,
    head_dim: usize,
    theta: f64,
    causal: bool,
    fused: Option<FusedProducts>,
    /// [`CHUNK_FLOATS`]; smaller in tests, so the chunked path runs on tiny models.
    chunk_floats: usize,
    /// Floats per row of the [q | k | v] and [gate | up] products.
    qkv_width: usize,
    gate_up_width: usize,
}

impl Qwen3Model {
    /// `loras`: each block's task adapters, in block order.
    fn load(
        vb: VarBuilder,
        c: &Qwen3Config,
        fused: Option<FusedProducts>,
        loras: Vec<LayerLoras>,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            embed_tokens: candle_nn::embedding(c.vocab_size, c.hidden_size, vb.pp("embed_tokens"))?,
            layers: loras
                .into_iter()
                .enumerate()
                .map(|(i, l)| Qwen3Layer::load(vb.pp(format!("layers.{i}")), c, fused, l))
                .collect::<candle_core::Result<_>>()?,
            norm: RmsWeight::load(vb.pp("norm"), c.hidden_size, c.rms_norm_eps)?,
            hidden_size: c.hidden_size,
            head_dim: c.head_dim(),
            theta: c.theta(),
            causal: c.generation.causal(),
            fused,
            chunk_floats: CHUNK_FLOATS,
            qkv_width: (c.num_attention_heads + 2 * c.num_key_value_heads) * c.head_dim(),
            gate_up_width: 2 * c.intermediate_size,
        })
    }

    fn forward_graph(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let table = self.embed_tokens.embeddings();
        let (device, dtype) = (table.device().clone(), table.dtype());
        let batch = packed.padded(&device)?;
        let l = batch.max_len;
        let mut x = self.embed_tokens.forward(&batch.input_ids)?;
        // Right padding: the padding mask keeps real tokens from it (so does a causal mask), and
        // the padded rows are dropped when the batch is packed again.
        let mut bias = super::bert::attention_bias(&batch.attention_mask, dtype)?;
        if self.causal {
            bias = super::clip::causal_bias(l, dtype, &device)?.broadcast_add(&bias)?;
        }
        let rope = rotary(l, self.head_dim, self.theta, dtype, &device)?;
        for layer in &self.layers {
            x = layer.forward(&x, &bias, &rope, &batch.adapters)?;
        }
        Hidden::from_padded(&self.norm.forward(&x)?, packed)
    }

    /// The fused path over the packed tokens: no padding, so no masks; each sequence attends
    /// within its own rows (causally for the decoders).
    fn forward_fused(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        let device = self.embed_tokens.embeddings().device().clone();
        let ids = packed.packed_ids();
        let total = ids.len();
        let ids = Tensor::from_vec(ids, total, &device)?;
        let mut x = self
            .embed_tokens
            .forward(&ids)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let table = RotaryTable::new(self.head_dim, self.theta, packed.max_len());
        let chunks = BlockChunks::new(
            packed,
            &packed.adapter_spans(),
            self.chunk_floats,
            self.qkv_width,
            self.gate_up_width,
        );
        for layer in &self.layers {
            layer.forward_fused(&mut x, &packed.attended, &table, &chunks)?;
        }
        let gamma = self.norm.host()?;
        kernels::rms_norm_columns(&mut x, self.hidden_size, 0, 1, &gamma, self.norm.eps as f32);
        Ok(Hidden::new(
            Tensor::from_vec(x, (total, self.hidden_size), &device)?,
            packed,
        ))
    }
}

impl Backbone for Qwen3Model {
    fn forward(&self, packed: &PackedBatch) -> candle_core::Result<Hidden> {
        match self.fused {
            // On a pool worker, as the BERT family does.
            Some(_) => rayon::scope(|_| self.forward_fused(packed)),
            None => self.forward_graph(packed),
        }
    }

    fn hidden_size(&self) -> usize {
        self.hidden_size
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::batch::PackedBatch;
    use crate::checkpoint::Checkpoint;
    use crate::model_dir::ModelSource;
    use crate::plan::ExecutionPlan;
    use crate::tokenize::TokenSequence;
    use crate::{DeviceSpec, Precision};

    /// A fixture checkpoint's fused model, its blocks' adapters included.
    fn fused_model(name: &str) -> Qwen3Model {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(name);
        let dir = Checkpoint::open(&ModelSource::Local(path), &[])
            .unwrap()
            .dir;
        let config = parse_config(&crate::model_dir::read_json(&dir.config).unwrap()).unwrap();
        let plan = ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::F32).unwrap();
        let weights = Weights::open(&dir, &plan).unwrap();
        config.build(&weights, &plan).unwrap()
    }

    /// Row chunks of the feed-forward and sequence chunks of attention (forced small here) give
    /// the vectors of one pass over the whole batch, task adapters per row included.
    #[test]
    fn chunked_layers_give_the_whole_batchs_vectors() {
        for name in ["tiny-qwen3", "tiny-jina-v5-small", "tiny-jina-v5-nano"] {
            let mut model = fused_model(name);
            let sequences: Vec<TokenSequence> = [9usize, 30, 4, 17, 12]
                .iter()
                .enumerate()
                .map(|(s, len)| {
                    let ids: Vec<u32> = (0..*len).map(|i| ((3 + 7 * i + s) % 240) as u32).collect();
                    TokenSequence {
                        type_ids: vec![0; ids.len()],
                        ids,
                    }
                })
                .collect();
            let adapters = match name {
                "tiny-qwen3" => vec![None; 5],
                _ => vec![Some(0), Some(2), None, Some(4), Some(1)],
            };
            let batch = PackedBatch::new(sequences.iter().collect(), 0).with_adapters(adapters);
            let whole = model.forward_fused(&batch).unwrap().states;
            // 20 rows of [q | k | v] (and fewer of [gate | up]) per chunk: several of each.
            model.chunk_floats = 20 * 192;
            let chunked = model.forward_fused(&batch).unwrap().states;
            let diff = (whole - chunked).unwrap().abs().unwrap().max_all().unwrap();
            assert!(diff.to_scalar::<f32>().unwrap() < 1e-5, "{name}");
        }
    }

    #[test]
    fn sequence_chunks_fill_up_to_the_row_limit() {
        // Sequences of 3, 4, 10 and 2 rows.
        let offsets = [0, 3, 7, 17, 19];
        assert_eq!(sequence_chunks(&offsets, 8), vec![0..2, 2..3, 3..4]);
        assert_eq!(sequence_chunks(&offsets, 100), vec![0..4]);
        assert_eq!(sequence_chunks(&offsets, 1), vec![0..1, 1..2, 2..3, 3..4]);
        assert_eq!(
            sequence_chunks(&[0], 8),
            Vec::<std::ops::Range<usize>>::new()
        );
    }
}

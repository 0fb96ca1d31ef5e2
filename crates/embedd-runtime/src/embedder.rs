//! A served dense-embedding model: tokenizer, encoder, pooling, behind a [`BatchScheduler`].

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use crate::batch::Batch;
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use crate::model_dir::{ModelDir, ModelSource};
use crate::models::{
    bert_config, open_weights, set_precision, weights_error, BertModel, Encoder, T5Config,
    T5EncoderModel,
};
use crate::pooling::Pooling;
use crate::scheduler::{BatchScheduler, Priority, SchedulerConfig, TokenCost};
use crate::tokenize::{BareEncoding, TextTokenizer, TokenSequence};

/// What to load and how to serve it.
#[derive(Debug, Clone)]
pub struct EmbedderSpec {
    pub name: String,
    pub source: ModelSource,
    /// Overrides the pooling found in the model's sentence-transformers files (default: mean).
    pub pooling: Option<Pooling>,
    /// Overrides the model's own maximum input length (capped by its position table).
    pub max_tokens: Option<usize>,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub scheduler: SchedulerConfig,
}

/// One unit of work for the encoder: a sequence, pooled whole or, for late chunking, per span.
#[derive(Debug, Clone)]
pub struct EncodeItem {
    pub sequence: TokenSequence,
    pub spans: Option<Vec<Range<usize>>>,
    /// The input was cut to the model's maximum length.
    pub truncated: bool,
    /// The task adapter it runs with (models with task adapters only).
    pub adapter: Option<usize>,
}

impl TokenCost for EncodeItem {
    fn tokens(&self) -> usize {
        self.sequence.len()
    }
}

/// Raw pooled vectors (not normalized, full size) in input order, and the tokens run.
#[derive(Debug, Clone)]
pub struct Embedded {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: usize,
}

pub struct TextEmbedder {
    name: String,
    source: ModelSource,
    tokenizer: TextTokenizer,
    scheduler: BatchScheduler<EncodeItem, Vec<Vec<f32>>>,
    dimensions: usize,
    pooling: Pooling,
    tasks: TaskAdapters,
}

/// The task adapters a model has (jina-embeddings-v3), from `config.json`'s `lora_adaptations`
/// and `task_instructions`.
#[derive(Debug, Clone, Default)]
pub struct TaskAdapters {
    /// Task names in adapter order.
    names: Vec<String>,
    /// The text each task puts before an input.
    instructions: BTreeMap<String, String>,
}

impl TaskAdapters {
    /// The adapter index and instruction for `task`. Models without adapters take any task and
    /// ignore it; a model with adapters refuses a task it has none for.
    fn select(&self, task: Option<&str>) -> Result<(Option<usize>, &str)> {
        let (Some(task), false) = (task, self.names.is_empty()) else {
            return Ok((None, ""));
        };
        let Some(index) = self.names.iter().position(|n| n == task) else {
            return Err(RuntimeError::UnknownTask {
                task: task.to_string(),
                known: self.names.clone(),
            });
        };
        let instruction = self.instructions.get(task).map_or("", String::as_str);
        Ok((Some(index), instruction))
    }
}

/// The input length served when neither the catalog nor the model's files name one and the
/// architecture has no position table (T5).
const DEFAULT_MAX_TOKENS: usize = 512;

/// Loads the encoder named by `config.json`'s `model_type`; returns it and the length its
/// position table allows (`None`: no table, as T5's relative buckets).
fn load_encoder(
    dir: &ModelDir,
    device: &Device,
    precision: Precision,
) -> Result<(Box<dyn Encoder>, Option<usize>, TaskAdapters)> {
    let raw = dir.read_config()?;
    if raw.get("model_type").and_then(|v| v.as_str()) == Some("t5") {
        let config: T5Config =
            serde_json::from_value(raw.clone()).map_err(|e| RuntimeError::ModelConfig {
                path: dir.config.clone(),
                field: "(t5 config)".into(),
                reason: e.to_string(),
            })?;
        if precision != Precision::F32 {
            return Err(RuntimeError::Precision {
                precision: precision.to_string(),
                reason: "reduced precision is implemented for BERT-family encoders only".into(),
            });
        }
        let vb = open_weights(dir, device)?;
        let model = T5EncoderModel::load(vb, &config).map_err(|e| weights_error(dir, e))?;
        return Ok((Box::new(model), None, TaskAdapters::default()));
    }
    let config = bert_config(dir, &raw)?;
    let vb = open_weights(dir, device)?;
    let mut model = BertModel::load(vb, &config).map_err(|e| weights_error(dir, e))?;
    set_precision(&mut model, precision)?;
    let tasks = TaskAdapters {
        names: config.lora_adaptations.clone().unwrap_or_default(),
        instructions: config.task_instructions.clone().unwrap_or_default(),
    };
    Ok((Box::new(model), Some(config.max_tokens()), tasks))
}

impl TextEmbedder {
    pub fn load(spec: &EmbedderSpec) -> Result<Self> {
        let dir = ModelDir::resolve(&spec.source, &[])?;
        let device = spec.device.open()?;
        let (encoder, position_limit, tasks) = load_encoder(&dir, &device, spec.precision)?;
        let st = &dir.sentence_transformers;
        let max_tokens = spec
            .max_tokens
            .or(st.max_seq_length)
            .or(position_limit)
            .unwrap_or(DEFAULT_MAX_TOKENS)
            .min(position_limit.unwrap_or(usize::MAX));
        let pooling = spec.pooling.or(st.pooling).unwrap_or(Pooling::Mean);
        let tokenizer = TextTokenizer::from_file(&dir.tokenizer, max_tokens)?;
        let dimensions = encoder.hidden_size();
        let encoder: Arc<dyn Encoder> = Arc::from(encoder);
        let pad_id = tokenizer.pad_id();
        let run = move |items: &[&EncodeItem]| -> Result<Vec<Vec<Vec<f32>>>> {
            Ok(encode_batch(
                encoder.as_ref(),
                pooling,
                pad_id,
                &device,
                items,
            )?)
        };
        let scheduler = BatchScheduler::new(&spec.name, spec.scheduler, Box::new(run));
        tracing::info!(
            model = %spec.name, source = %spec.source, dimensions, max_tokens, ?pooling,
            tasks = ?tasks.names, "embedding model loaded"
        );
        Ok(Self {
            name: spec.name.clone(),
            source: spec.source.clone(),
            tokenizer,
            scheduler,
            dimensions,
            pooling,
            tasks,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    pub fn queued_items(&self) -> usize {
        self.scheduler.queued_items()
    }

    /// The tasks the model has adapters for (empty: it has none and ignores `task`).
    pub fn tasks(&self) -> &[String] {
        &self.tasks.names
    }

    /// Tokenizes texts, one work item each. CPU-bound: call it off the async runtime.
    pub fn prepare(&self, texts: &[String], truncate: bool) -> Result<Vec<EncodeItem>> {
        self.prepare_for_task(texts, truncate, None)
    }

    /// [`Self::prepare`] for a task: on a model with task adapters, each text gets the task's
    /// instruction in front and runs with its adapter.
    pub fn prepare_for_task(
        &self,
        texts: &[String],
        truncate: bool,
        task: Option<&str>,
    ) -> Result<Vec<EncodeItem>> {
        let (adapter, instruction) = self.tasks.select(task)?;
        let instructed: Vec<String>;
        let texts = if instruction.is_empty() {
            texts
        } else {
            instructed = texts.iter().map(|t| format!("{instruction}{t}")).collect();
            &instructed
        };
        Ok(self
            .tokenizer
            .encode_batch_flagged(texts, truncate)?
            .into_iter()
            .map(|(sequence, truncated)| EncodeItem {
                sequence,
                spans: None,
                truncated,
                adapter,
            })
            .collect())
    }

    /// Late chunking: the texts are concatenated (in order) into as few model-length windows as
    /// they fit, each window runs once, and every text is pooled over its own tokens. A text too
    /// long for a window alone is cut when `truncate`, an error otherwise. With a task, each
    /// window opens with the task's instruction (pooled into no text) and runs with its adapter.
    pub fn prepare_late_chunks(
        &self,
        texts: &[String],
        truncate: bool,
        task: Option<&str>,
    ) -> Result<Vec<EncodeItem>> {
        let (adapter, instruction) = self.tasks.select(task)?;
        let BareEncoding {
            texts: bare,
            mut before,
            after,
        } = self.tokenizer.encode_bare(texts)?;
        if !instruction.is_empty() {
            let prefix = self.tokenizer.encode_bare(&[instruction.to_string()])?;
            before.extend(prefix.texts.into_iter().flatten());
        }
        let max = self.tokenizer.max_tokens();
        let capacity = max.saturating_sub(before.len() + after.len()).max(1);
        let mut windows = Vec::new();
        let mut ids = before.clone();
        let mut spans: Vec<Range<usize>> = Vec::new();
        let mut any_truncated = false;
        for (index, mut text_ids) in bare.into_iter().enumerate() {
            if text_ids.len() > capacity {
                any_truncated = true;
                if !truncate {
                    return Err(RuntimeError::InputTooLong {
                        index,
                        tokens: text_ids.len() + before.len() + after.len(),
                        max,
                    });
                }
                text_ids.truncate(capacity);
            }
            if ids.len() - before.len() + text_ids.len() > capacity {
                windows.push(close_window(
                    ids,
                    &after,
                    std::mem::take(&mut spans),
                    any_truncated,
                    adapter,
                ));
                any_truncated = false;
                ids = before.clone();
            }
            spans.push(ids.len()..ids.len() + text_ids.len());
            ids.extend(text_ids);
        }
        windows.push(close_window(ids, &after, spans, any_truncated, adapter));
        Ok(windows)
    }

    /// Runs prepared items through the scheduler; one vector per text, in order.
    pub async fn embed(&self, items: Vec<EncodeItem>) -> Result<Embedded> {
        self.embed_with(items, Priority::Live).await
    }

    /// [`Self::embed`] at a given priority (bulk jobs run at [`Priority::Background`]).
    pub async fn embed_with(&self, items: Vec<EncodeItem>, priority: Priority) -> Result<Embedded> {
        let tokens = items.iter().map(|i| i.sequence.len()).sum();
        let outputs = self.scheduler.submit_with(items, priority).await?;
        Ok(Embedded {
            vectors: outputs.into_iter().flatten().collect(),
            tokens,
        })
    }
}

fn close_window(
    mut ids: Vec<u32>,
    after: &[u32],
    spans: Vec<Range<usize>>,
    truncated: bool,
    adapter: Option<usize>,
) -> EncodeItem {
    ids.extend_from_slice(after);
    let type_ids = vec![0; ids.len()];
    EncodeItem {
        sequence: TokenSequence { ids, type_ids },
        spans: Some(spans),
        truncated,
        adapter,
    }
}

/// One batch through the encoder and pooling; runs on the scheduler's worker thread.
fn encode_batch(
    encoder: &dyn Encoder,
    pooling: Pooling,
    pad_id: u32,
    device: &Device,
    items: &[&EncodeItem],
) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let sequences: Vec<&TokenSequence> = items.iter().map(|i| &i.sequence).collect();
    let adapters = items.iter().map(|i| i.adapter).collect();
    let batch = Batch::new(&sequences, pad_id, device)?.with_adapters(adapters);
    let hidden = encoder.forward(&batch)?;
    let pooled = pooling
        .pool(&hidden, &batch.attention_mask)?
        .to_vec2::<f32>()?;
    items
        .iter()
        .zip(pooled)
        .enumerate()
        .map(|(row, (item, whole))| match &item.spans {
            None => Ok(vec![whole]),
            Some(spans) => {
                let tokens = hidden.get(row)?;
                spans.iter().map(|s| mean_of_span(&tokens, s)).collect()
            }
        })
        .collect()
}

fn mean_of_span(tokens: &Tensor, span: &Range<usize>) -> candle_core::Result<Vec<f32>> {
    if span.is_empty() {
        return Ok(vec![0.0; tokens.dim(1)?]);
    }
    tokens
        .narrow(0, span.start, span.len())?
        .to_dtype(DType::F32)?
        .mean(0)?
        .to_vec1()
}

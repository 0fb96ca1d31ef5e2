//! A served dense-embedding model: tokenizer, encoder, pooling, behind a [`BatchScheduler`].

use std::ops::Range;
use std::sync::Arc;

use crate::batch::PackedBatch;
use crate::checkpoint::{warm_up_sequence, Checkpoint};
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use candle_core::{Module, Tensor};
use candle_nn::Linear;

use crate::heads::Pooling;
use crate::images::{decode, ImageError, ImageProcessor};
use crate::model_dir::ModelSource;
use crate::models::{Backbone, ImageTower, TaskAdapters};
use crate::scheduler::{BatchScheduler, HealthReport, Priority, SchedulerConfig, TokenCost};
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

/// One image, decoded and preprocessed, ready for the image tower.
#[derive(Debug, Clone)]
pub struct PixelItem {
    /// `[3, side, side]`, channel first.
    pub pixels: Vec<f32>,
    /// What the tower runs per image (patches and class token): its batching cost.
    pub tokens: usize,
}

impl TokenCost for PixelItem {
    fn tokens(&self) -> usize {
        self.tokens
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
    plan: String,
    images: Option<ImageServing>,
}

/// The image side of a text-image model: its tower behind a scheduler of its own.
struct ImageServing {
    scheduler: BatchScheduler<PixelItem, Vec<f32>>,
    processor: ImageProcessor,
    tokens_per_image: usize,
}

impl TextEmbedder {
    pub fn load(spec: &EmbedderSpec) -> Result<Self> {
        let checkpoint = Checkpoint::open(&spec.source, &[PREPROCESSOR_CONFIG])?;
        let loaded = checkpoint.load(spec.device, spec.precision)?;
        let max_tokens = checkpoint.max_tokens(spec.max_tokens);
        let (dir, config) = (&checkpoint.dir, &checkpoint.config);
        let images = match config.load_image_tower(&loaded.weights, &loaded.plan)? {
            Some(tower) => {
                let side = tower.image_size() as u32;
                let processor = match dir.extra_file(PREPROCESSOR_CONFIG) {
                    Some(path) => ImageProcessor::from_file(path, side)?,
                    None => ImageProcessor::clip(side),
                };
                Some(ImageParts { tower, processor })
            }
            None => None,
        };
        let parts = EmbedderParts {
            tokenizer: checkpoint.tokenizer(max_tokens)?,
            backbone: loaded.backbone,
            pooling: spec
                .pooling
                .or(dir.sentence_transformers.pooling)
                .or(config.default_pooling())
                .unwrap_or(Pooling::Mean),
            tasks: config
                .task_adapters()
                .with_prompts(&dir.sentence_transformers.prompts),
            plan: loaded.plan.to_string(),
            text_projection: config.text_projection(&loaded.weights)?,
            images,
        };
        Self::from_parts(&spec.name, spec.source.clone(), spec.scheduler, parts)
    }

    /// Serves a backbone built elsewhere: warms it up with one forward pass, then puts it behind
    /// its scheduler.
    pub fn from_parts(
        name: &str,
        source: ModelSource,
        scheduler: SchedulerConfig,
        parts: EmbedderParts,
    ) -> Result<Self> {
        let EmbedderParts {
            tokenizer,
            backbone,
            pooling,
            tasks,
            plan,
            text_projection,
            images,
        } = parts;
        let dimensions = match &text_projection {
            Some(p) => p.weight().dim(0)?,
            None => backbone.hidden_size(),
        };
        let backbone: Arc<dyn Backbone> = Arc::from(backbone);
        let pad_id = tokenizer.pad_id();
        let run = move |items: &[&EncodeItem]| -> Result<Vec<Vec<Vec<f32>>>> {
            let pooled = encode_batch(backbone.as_ref(), pooling, pad_id, items)?;
            match &text_projection {
                Some(projection) => Ok(project(projection, pooled)?),
                None => Ok(pooled),
            }
        };
        let warm_up = EncodeItem {
            sequence: warm_up_sequence(&tokenizer)?,
            spans: None,
            truncated: false,
            adapter: None,
        };
        run(&[&warm_up])?;
        let images = images
            .map(|parts| ImageServing::start(name, scheduler, parts))
            .transpose()?;
        let scheduler = BatchScheduler::new(name, scheduler, Box::new(run));
        tracing::info!(
            model = %name, %source, dimensions, max_tokens = tokenizer.max_tokens(), ?pooling,
            tasks = ?tasks.names, %plan, images = images.is_some(), "embedding model loaded"
        );
        Ok(Self {
            name: name.to_string(),
            source,
            tokenizer,
            scheduler,
            dimensions,
            pooling,
            tasks,
            plan,
            images,
        })
    }

    /// Whether the model embeds images too (into the space its texts share).
    pub fn accepts_images(&self) -> bool {
        self.images.is_some()
    }

    /// Decodes and preprocesses each image (bytes as fetched or sent); each one's own failure in
    /// its place. CPU-bound: call it off the async runtime.
    pub fn prepare_images(
        &self,
        images: &[Vec<u8>],
        max_pixels: u64,
    ) -> Vec<Result<PixelItem, ImageError>> {
        let Some(serving) = &self.images else {
            return images
                .iter()
                .map(|_| {
                    Err(ImageError::Undecodable(
                        "this model embeds text only".into(),
                    ))
                })
                .collect();
        };
        images
            .iter()
            .map(|bytes| {
                let image = decode(bytes, max_pixels)?;
                Ok(PixelItem {
                    pixels: serving.processor.preprocess(&image)?,
                    tokens: serving.tokens_per_image,
                })
            })
            .collect()
    }

    /// [`Self::embed_images`], answering nothing for no images (also on text-only models).
    pub async fn embed_images_if_any(&self, items: Vec<PixelItem>) -> Result<Embedded> {
        if items.is_empty() {
            return Ok(Embedded {
                vectors: Vec::new(),
                tokens: 0,
            });
        }
        self.embed_images(items).await
    }

    /// Runs prepared images through the image tower's scheduler; one vector per image, in order.
    pub async fn embed_images(&self, items: Vec<PixelItem>) -> Result<Embedded> {
        let serving = self.images.as_ref().ok_or_else(|| {
            RuntimeError::Inference(candle_core::Error::Msg(
                "this model embeds text only".into(),
            ))
        })?;
        let tokens = items.iter().map(|i| i.tokens).sum();
        let vectors = serving.scheduler.submit(items).await?;
        Ok(Embedded { vectors, tokens })
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

    /// What one image costs the image tower (patches and class token); 0 for a text model.
    pub fn tokens_per_image(&self) -> usize {
        self.images.as_ref().map_or(0, |i| i.tokens_per_image)
    }

    /// Refuses (as [`crate::RuntimeError::Overloaded`]) a live request of these texts, plus
    /// `extra_tokens` (images), that would wait too long, before any tokenization is spent on it.
    pub fn check_admission(
        &self,
        texts: &[String],
        extra_tokens: usize,
    ) -> crate::error::Result<()> {
        let tokens = crate::tokenize::estimated_tokens(texts, self.max_tokens()) + extra_tokens;
        self.scheduler.check_admission(tokens)
    }

    pub fn health(&self) -> HealthReport {
        self.scheduler.health()
    }

    /// The execution plan it runs under, in words (`cpu fused f32, F32 weights`).
    pub fn plan(&self) -> &str {
        &self.plan
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

/// The optional file holding a text-image model's image preprocessing.
const PREPROCESSOR_CONFIG: &str = "preprocessor_config.json";

/// What a served embedding model is made of.
pub struct EmbedderParts {
    pub tokenizer: TextTokenizer,
    pub backbone: Box<dyn Backbone>,
    pub pooling: Pooling,
    pub tasks: TaskAdapters,
    /// The execution plan, in words, for the logs.
    pub plan: String,
    /// Into the space text and images share (CLIP's `text_projection`), after pooling.
    pub text_projection: Option<Linear>,
    pub images: Option<ImageParts>,
}

/// A text-image model's image side.
pub struct ImageParts {
    pub tower: Box<dyn ImageTower>,
    pub processor: ImageProcessor,
}

impl ImageServing {
    /// Warms the tower up on a grey image, then puts it behind its own scheduler (images cost
    /// their patch count, so a batch holds as many as the token budget allows).
    fn start(name: &str, config: SchedulerConfig, parts: ImageParts) -> Result<Self> {
        let ImageParts { tower, processor } = parts;
        let tokens_per_image = tower.tokens_per_image();
        // The preprocessor's output must be the tower's input; the warm-up below fails at load
        // when a checkpoint's configs disagree.
        let side = tower.image_size();
        let run = move |items: &[&PixelItem]| -> Result<Vec<Vec<f32>>> {
            if items.is_empty() {
                return Ok(Vec::new());
            }
            let flat: Vec<f32> = items
                .iter()
                .flat_map(|i| i.pixels.iter().copied())
                .collect();
            let pixels = Tensor::from_vec(
                flat,
                (items.len(), 3, side, side),
                &candle_core::Device::Cpu,
            )?;
            Ok(tower.embed(&pixels)?.to_vec2()?)
        };
        let grey = image::RgbImage::from_pixel(8, 8, image::Rgb([128, 128, 128]));
        let warm_up = PixelItem {
            pixels: processor
                .preprocess(&grey)
                .map_err(|e| RuntimeError::Inference(candle_core::Error::Msg(e.to_string())))?,
            tokens: tokens_per_image,
        };
        run(&[&warm_up])?;
        Ok(Self {
            scheduler: BatchScheduler::new(&format!("{name}-images"), config, Box::new(run)),
            processor,
            tokens_per_image,
        })
    }
}

/// Each pooled text vector through the projection into the shared space.
fn project(
    projection: &Linear,
    pooled: Vec<Vec<Vec<f32>>>,
) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let weight = projection.weight();
    pooled
        .into_iter()
        .map(|vectors| {
            let rows = vectors.len();
            if rows == 0 {
                return Ok(vectors);
            }
            let dim = vectors[0].len();
            let flat: Vec<f32> = vectors.into_iter().flatten().collect();
            let x =
                Tensor::from_vec(flat, (rows, dim), weight.device())?.to_dtype(weight.dtype())?;
            projection
                .forward(&x)?
                .to_dtype(candle_core::DType::F32)?
                .to_vec2()
        })
        .collect()
}

/// One batch through the backbone and pooling; runs on the scheduler's worker thread.
fn encode_batch(
    backbone: &dyn Backbone,
    pooling: Pooling,
    pad_id: u32,
    items: &[&EncodeItem],
) -> candle_core::Result<Vec<Vec<Vec<f32>>>> {
    let sequences = items.iter().map(|i| &i.sequence).collect();
    let adapters = items.iter().map(|i| i.adapter).collect();
    let batch = PackedBatch::new(sequences, pad_id).with_adapters(adapters);
    let hidden = backbone.forward(&batch)?;
    let pooled = pooling.pool(&hidden)?;
    items
        .iter()
        .zip(pooled)
        .enumerate()
        .map(|(row, (item, whole))| match &item.spans {
            None => Ok(vec![whole]),
            Some(spans) => {
                let start = hidden.offsets[row];
                let rows: Vec<Range<usize>> = spans
                    .iter()
                    .map(|s| start + s.start..start + s.end)
                    .collect();
                Pooling::mean_of_spans(&hidden, &rows)
            }
        })
        .collect()
}

//! A served cross-encoder: (query, document) pairs scored behind a [`BatchScheduler`].

use crate::batch::PackedBatch;
use crate::checkpoint::{warm_up_sequence, Checkpoint};
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use crate::heads::{ClassifierHead, ScoreActivation};
use crate::model_dir::ModelSource;
use crate::scheduler::{BatchScheduler, HealthReport, SchedulerConfig};
use crate::tokenize::{TextTokenizer, TokenSequence};

#[derive(Debug, Clone)]
pub struct RerankerSpec {
    pub name: String,
    pub source: ModelSource,
    pub max_tokens: Option<usize>,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub scheduler: SchedulerConfig,
}

/// Scores in document order and the tokens run.
#[derive(Debug, Clone)]
pub struct Scored {
    pub scores: Vec<f32>,
    pub tokens: usize,
}

pub struct CrossEncoder {
    name: String,
    source: ModelSource,
    tokenizer: TextTokenizer,
    scheduler: BatchScheduler<TokenSequence, f32>,
}

impl CrossEncoder {
    pub fn load(spec: &RerankerSpec) -> Result<Self> {
        let checkpoint = Checkpoint::open(&spec.source, &[])?;
        let dir = &checkpoint.dir;
        let raw = dir.read_config()?;
        let labels = raw
            .get("id2label")
            .and_then(|v| v.as_object())
            .map_or(1, |m| m.len());
        if labels != 1 {
            return Err(RuntimeError::ModelConfig {
                path: dir.config.clone(),
                field: "id2label".into(),
                reason: format!("a reranker needs a single-label head, this one has {labels}"),
            });
        }
        let loaded = checkpoint.load(spec.device, spec.precision)?;
        let activation = ScoreActivation::from_config(&raw);
        let head = ClassifierHead::load(
            &loaded.weights.vb,
            checkpoint.config.hidden_size(),
            activation,
        )
        .map_err(|e| loaded.weights.mismatch(e))?;
        let max_tokens = checkpoint.max_tokens(spec.max_tokens);
        let tokenizer = checkpoint.tokenizer(max_tokens)?;
        let pad_id = tokenizer.pad_id();
        let backbone = loaded.backbone;
        let run = move |items: &[&TokenSequence]| -> Result<Vec<f32>> {
            let batch = PackedBatch::new(items.to_vec(), pad_id);
            Ok(head.score(&backbone.forward(&batch)?)?)
        };
        run(&[&warm_up_sequence(&tokenizer)?])?;
        let scheduler = BatchScheduler::new(&spec.name, spec.scheduler, Box::new(run));
        tracing::info!(
            model = %spec.name, source = %spec.source, max_tokens, ?activation,
            plan = %loaded.plan, "reranker loaded"
        );
        Ok(Self {
            name: spec.name.clone(),
            source: spec.source.clone(),
            tokenizer,
            scheduler,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// Inputs waiting or running in this model's scheduler.
    pub fn queued_items(&self) -> usize {
        self.scheduler.queued_items()
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

    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
    }

    pub fn health(&self) -> HealthReport {
        self.scheduler.health()
    }

    /// Tokenizes (query, document) pairs, cutting documents (never the query) to the model's
    /// length. CPU-bound: call it off the async runtime.
    pub fn prepare(&self, query: &str, documents: &[String]) -> Result<Vec<TokenSequence>> {
        self.tokenizer.encode_pairs(query, documents)
    }

    pub async fn score(&self, pairs: Vec<TokenSequence>) -> Result<Scored> {
        let tokens = pairs.iter().map(TokenSequence::len).sum();
        let scores = self.scheduler.submit(pairs).await?;
        Ok(Scored { scores, tokens })
    }
}

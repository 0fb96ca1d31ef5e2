//! A served cross-encoder: (query, document) pairs scored behind a [`BatchScheduler`].

use crate::batch::Batch;
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use crate::model_dir::{ModelDir, ModelSource};
use crate::models::{
    bert_config, open_weights, set_precision, weights_error, ScoreActivation, SequenceClassifier,
};
use crate::scheduler::{BatchScheduler, SchedulerConfig};
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
        let dir = ModelDir::resolve(&spec.source, &[])?;
        let device = spec.device.open()?;
        let raw = dir.read_config()?;
        let config = bert_config(&dir, &raw)?;
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
        let activation = ScoreActivation::from_config(&raw);
        let mut model = SequenceClassifier::load(open_weights(&dir, &device)?, &config, activation)
            .map_err(|e| weights_error(&dir, e))?;
        set_precision(model.encoder_mut(), spec.precision)?;
        let max_tokens = spec
            .max_tokens
            .or(dir.sentence_transformers.max_seq_length)
            .unwrap_or(config.max_tokens())
            .min(config.max_tokens());
        let tokenizer = TextTokenizer::from_file(&dir.tokenizer, max_tokens)?;
        let pad_id = tokenizer.pad_id();
        let run = move |items: &[&TokenSequence]| -> Result<Vec<f32>> {
            let batch = Batch::new(items, pad_id, &device)?;
            Ok(model.score(&batch)?.to_vec1::<f32>()?)
        };
        let scheduler = BatchScheduler::new(&spec.name, spec.scheduler, Box::new(run));
        tracing::info!(model = %spec.name, source = %spec.source, max_tokens, ?activation, "reranker loaded");
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

    pub fn max_tokens(&self) -> usize {
        self.tokenizer.max_tokens()
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

//! A served ColBERT (late-interaction) model, following the reference implementation
//! (stanford-futuredata/ColBERT): a marker token after [CLS] ([unused0] for queries, [unused1] for
//! documents; `<s>` and `[QueryMarker]` / `[DocumentMarker]` in XLM-R vocabularies such as
//! jina-colbert-v2's); queries cut to `query_maxlen` and padded to it with [MASK] (attended or not, as the
//! checkpoint says), every position returned; documents cut to `doc_maxlen`, not padded, with
//! punctuation tokens left out; the encoder output projected by `linear` (no bias) and
//! L2-normalized per token.

use std::collections::HashSet;

use serde_json::Value;

use crate::batch::PackedBatch;
use crate::checkpoint::{warm_up_sequence, Checkpoint};
use crate::device::{DeviceSpec, Precision};
use crate::error::{Result, RuntimeError};
use crate::heads::ColbertProjection;
use crate::model_dir::{read_json, ModelSource};
use crate::scheduler::{BatchScheduler, HealthReport, SchedulerConfig, TokenCost};
use crate::tokenize::{TextTokenizer, TokenSequence};

/// The ColBERT settings a checkpoint carries in `artifact.metadata` (defaults as the reference's).
#[derive(Debug, Clone, PartialEq)]
pub struct ColbertSettings {
    pub query_maxlen: usize,
    pub doc_maxlen: usize,
    pub mask_punctuation: bool,
    pub attend_to_mask_tokens: bool,
    pub query_token: String,
    pub doc_token: String,
}

impl Default for ColbertSettings {
    fn default() -> Self {
        Self {
            query_maxlen: 32,
            doc_maxlen: 220,
            mask_punctuation: true,
            attend_to_mask_tokens: false,
            query_token: "[unused0]".into(),
            doc_token: "[unused1]".into(),
        }
    }
}

impl ColbertSettings {
    fn from_metadata(meta: &Value) -> Self {
        let d = Self::default();
        let usize_of = |k: &str, default: usize| {
            meta.get(k)
                .and_then(Value::as_u64)
                .map_or(default, |v| v as usize)
        };
        let bool_of =
            |k: &str, default: bool| meta.get(k).and_then(Value::as_bool).unwrap_or(default);
        let str_of = |k: &str, default: &str| {
            meta.get(k)
                .and_then(Value::as_str)
                .unwrap_or(default)
                .to_string()
        };
        Self {
            query_maxlen: usize_of("query_maxlen", d.query_maxlen),
            doc_maxlen: usize_of("doc_maxlen", d.doc_maxlen),
            mask_punctuation: bool_of("mask_punctuation", d.mask_punctuation),
            attend_to_mask_tokens: bool_of("attend_to_mask_tokens", d.attend_to_mask_tokens),
            query_token: str_of("query_token_id", &d.query_token),
            doc_token: str_of("doc_token_id", &d.doc_token),
        }
    }
}

/// Query or document side of late interaction.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Query,
    Document,
}

/// One input ready for the encoder: which positions are attended and which are returned.
#[derive(Debug, Clone)]
pub struct ColbertItem {
    pub sequence: TokenSequence,
    /// Positions `0..attended` are attended to; the rest ([MASK] padding of queries) are not.
    pub attended: usize,
    /// Whether each position's vector is returned.
    pub keep: Vec<bool>,
}

impl TokenCost for ColbertItem {
    fn tokens(&self) -> usize {
        self.sequence.len()
    }
}

/// Token vectors per input, and the tokens run.
#[derive(Debug, Clone)]
pub struct TokenVectors {
    pub vectors: Vec<Vec<Vec<f32>>>,
    pub tokens: usize,
}

#[derive(Debug, Clone)]
pub struct ColbertSpec {
    pub name: String,
    pub source: ModelSource,
    pub device: DeviceSpec,
    pub precision: Precision,
    pub scheduler: SchedulerConfig,
}

struct SpecialIds {
    cls: u32,
    sep: u32,
    mask: u32,
    query_marker: u32,
    doc_marker: u32,
}

pub struct ColbertModel {
    name: String,
    source: ModelSource,
    settings: ColbertSettings,
    tokenizer: TextTokenizer,
    special: SpecialIds,
    /// Token ids of punctuation characters: left out of document outputs.
    skiplist: HashSet<u32>,
    dimensions: usize,
    scheduler: BatchScheduler<ColbertItem, Vec<Vec<f32>>>,
}

const METADATA: &str = "artifact.metadata";

impl ColbertModel {
    pub fn load(spec: &ColbertSpec) -> Result<Self> {
        let checkpoint = Checkpoint::open(&spec.source, &[METADATA])?;
        let dir = &checkpoint.dir;
        let settings = match dir.extra_file(METADATA) {
            Some(path) => ColbertSettings::from_metadata(&read_json(path)?),
            None => ColbertSettings::default(),
        };
        let max_tokens = settings.query_maxlen.max(settings.doc_maxlen);
        let positions = checkpoint.config.max_positions().unwrap_or(usize::MAX);
        if max_tokens > positions {
            return Err(RuntimeError::ModelConfig {
                path: dir
                    .extra_file(METADATA)
                    .unwrap_or(&dir.config)
                    .to_path_buf(),
                field: "doc_maxlen".into(),
                reason: format!("{max_tokens} is more than the encoder's {positions} positions"),
            });
        }
        let loaded = checkpoint.load(spec.device, spec.precision)?;
        let projection = loaded
            .weights
            .vb
            .get_unchecked("linear.weight")
            .and_then(ColbertProjection::new)
            .map_err(|e| RuntimeError::ModelFile {
                path: dir.weights.clone(),
                reason: format!("no ColBERT projection `linear.weight`: {e}"),
            })?;
        let dimensions = projection.dimensions();
        let tokenizer = checkpoint.tokenizer(max_tokens)?;
        // The configured marker first, then the names BERT-vocabulary checkpoints (colbertv2.0,
        // jina-colbert-v1) and XLM-R ones (jina-colbert-v2) give the same tokens.
        let id = |field: &str, names: &[&str]| {
            names
                .iter()
                .find_map(|name| tokenizer.token_id(name))
                .ok_or_else(|| RuntimeError::ModelConfig {
                    path: dir.tokenizer.clone(),
                    field: field.into(),
                    reason: format!("none of {names:?} is in the vocabulary"),
                })
        };
        let special = SpecialIds {
            cls: id("cls_token", &["[CLS]", "<s>"])?,
            sep: id("sep_token", &["[SEP]", "</s>"])?,
            mask: id("mask_token", &["[MASK]", "<mask>"])?,
            query_marker: id(
                "query_token_id",
                &[&settings.query_token, "[QueryMarker]", "[Q]", "[unused0]"],
            )?,
            doc_marker: id(
                "doc_token_id",
                &[&settings.doc_token, "[DocumentMarker]", "[D]", "[unused1]"],
            )?,
        };
        let skiplist = if settings.mask_punctuation {
            punctuation_ids(&tokenizer)?
        } else {
            HashSet::new()
        };

        let pad_id = tokenizer.pad_id();
        let backbone = loaded.backbone;
        let run = move |items: &[&ColbertItem]| -> Result<Vec<Vec<Vec<f32>>>> {
            let sequences = items.iter().map(|i| &i.sequence).collect();
            let attended = items.iter().map(|i| i.attended).collect();
            let batch = PackedBatch::with_attention(sequences, attended, pad_id);
            let keep: Vec<&[bool]> = items.iter().map(|i| i.keep.as_slice()).collect();
            Ok(projection.project(&backbone.forward(&batch)?, &keep)?)
        };
        let warm_up = warm_up_sequence(&tokenizer)?;
        run(&[&item(warm_up.ids, 1, vec![true; warm_up.type_ids.len()])])?;
        let scheduler = BatchScheduler::new(&spec.name, spec.scheduler, Box::new(run));
        tracing::info!(
            model = %spec.name, source = %spec.source, dimensions, ?settings,
            plan = %loaded.plan, "ColBERT model loaded"
        );
        Ok(Self {
            name: spec.name.clone(),
            source: spec.source.clone(),
            settings,
            tokenizer,
            special,
            skiplist,
            dimensions,
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
        let tokens =
            crate::tokenize::estimated_tokens(texts, self.tokenizer.max_tokens()) + extra_tokens;
        self.scheduler.check_admission(tokens)
    }

    pub fn dimensions(&self) -> usize {
        self.dimensions
    }

    pub fn health(&self) -> HealthReport {
        self.scheduler.health()
    }

    pub fn settings(&self) -> &ColbertSettings {
        &self.settings
    }

    /// Tokenizes texts for one side. CPU-bound: call it off the async runtime.
    pub fn prepare(&self, texts: &[String], side: Side) -> Result<Vec<ColbertItem>> {
        let bare = self.tokenizer.encode_bare(texts)?.texts;
        let s = &self.special;
        Ok(bare
            .into_iter()
            .map(|mut ids| match side {
                Side::Query => {
                    let len = self.settings.query_maxlen;
                    ids.truncate(len.saturating_sub(3));
                    let mut seq = vec![s.cls, s.query_marker];
                    seq.extend(ids);
                    seq.push(s.sep);
                    let real = seq.len();
                    seq.resize(len.max(real), s.mask);
                    let attended = if self.settings.attend_to_mask_tokens {
                        seq.len()
                    } else {
                        real
                    };
                    let keep = vec![true; seq.len()];
                    item(seq, attended, keep)
                }
                Side::Document => {
                    ids.truncate(self.settings.doc_maxlen.saturating_sub(3));
                    let mut seq = vec![s.cls, s.doc_marker];
                    seq.extend(ids);
                    seq.push(s.sep);
                    let keep = seq.iter().map(|id| !self.skiplist.contains(id)).collect();
                    let attended = seq.len();
                    item(seq, attended, keep)
                }
            })
            .collect())
    }

    pub async fn embed(&self, items: Vec<ColbertItem>) -> Result<TokenVectors> {
        let tokens = items.iter().map(|i| i.attended).sum();
        let vectors = self.scheduler.submit(items).await?;
        Ok(TokenVectors { vectors, tokens })
    }
}

fn item(ids: Vec<u32>, attended: usize, keep: Vec<bool>) -> ColbertItem {
    let type_ids = vec![0; ids.len()];
    ColbertItem {
        sequence: TokenSequence { ids, type_ids },
        attended,
        keep,
    }
}

/// The first token id of each ASCII punctuation character, as the reference builds its skiplist.
fn punctuation_ids(tokenizer: &TextTokenizer) -> Result<HashSet<u32>> {
    let symbols: Vec<String> = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"
        .chars()
        .map(String::from)
        .collect();
    Ok(tokenizer
        .encode_bare(&symbols)?
        .texts
        .into_iter()
        .filter_map(|ids| ids.first().copied())
        .collect())
}

/// Late-interaction relevance: for each query vector, its best dot product over the document's
/// vectors, summed.
pub fn max_sim(query: &[Vec<f32>], document: &[Vec<f32>]) -> f32 {
    query
        .iter()
        .map(|q| {
            document
                .iter()
                .map(|d| q.iter().zip(d).map(|(a, b)| a * b).sum::<f32>())
                .fold(f32::NEG_INFINITY, f32::max)
        })
        .filter(|s| s.is_finite())
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_sim_sums_the_best_match_per_query_token() {
        let q = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let d = vec![vec![0.5, 0.5], vec![1.0, 0.0]];
        assert_eq!(max_sim(&q, &d), 1.0 + 0.5);
        assert_eq!(max_sim(&q, &[]), 0.0);
    }

    #[test]
    fn settings_default_as_the_reference() {
        let s = ColbertSettings::from_metadata(&serde_json::json!({"doc_maxlen": 300}));
        assert_eq!(s.doc_maxlen, 300);
        assert_eq!(s.query_maxlen, 32);
        assert!(s.mask_punctuation && !s.attend_to_mask_tokens);
        assert_eq!(s.query_token, "[unused0]");
    }
}

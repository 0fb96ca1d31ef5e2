//! Text to token ids with the model's own `tokenizer.json`; truncation and length checks are ours.

use std::path::Path;

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Result, RuntimeError};

/// One tokenized input, special tokens included.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenSequence {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl TokenSequence {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Texts tokenized without special tokens, and the specials that wrap one sequence.
pub struct BareEncoding {
    pub texts: Vec<Vec<u32>>,
    pub before: Vec<u32>,
    pub after: Vec<u32>,
}

/// A tokenizer that counts every input against `max_tokens` and truncates only when asked.
pub struct TextTokenizer {
    plain: Tokenizer,
    truncating: Tokenizer,
    /// Cuts only the second text of a pair (the document), never the query.
    pair_truncating: Tokenizer,
    max_tokens: usize,
    pad_id: u32,
}

impl TextTokenizer {
    pub fn from_file(path: &Path, max_tokens: usize) -> Result<Self> {
        let mut plain = Tokenizer::from_file(path).map_err(|e| RuntimeError::ModelFile {
            path: path.to_path_buf(),
            reason: format!("cannot load tokenizer: {e}"),
        })?;
        // Whatever padding/truncation the file carries, batching and limits are the runtime's job.
        plain.with_padding(None);
        plain
            .with_truncation(None)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let mut truncating = plain.clone();
        truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let mut pair_truncating = plain.clone();
        pair_truncating
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::OnlySecond,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let pad_id = ["[PAD]", "<pad>", "<|endoftext|>"]
            .iter()
            .find_map(|t| plain.token_to_id(t))
            .unwrap_or(0);
        Ok(Self {
            plain,
            truncating,
            pair_truncating,
            max_tokens,
            pad_id,
        })
    }

    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.plain.token_to_id(token)
    }

    /// Tokenizes a batch of texts (in parallel). Without `truncate`, the first input over the
    /// limit is an [`RuntimeError::InputTooLong`] naming its index.
    pub fn encode_batch(&self, texts: &[String], truncate: bool) -> Result<Vec<TokenSequence>> {
        Ok(self
            .encode_batch_flagged(texts, truncate)?
            .into_iter()
            .map(|(s, _)| s)
            .collect())
    }

    /// [`Self::encode_batch`], with whether each input was cut.
    pub fn encode_batch_flagged(
        &self,
        texts: &[String],
        truncate: bool,
    ) -> Result<Vec<(TokenSequence, bool)>> {
        let tokenizer = if truncate {
            &self.truncating
        } else {
            &self.plain
        };
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let encodings = tokenizer
            .encode_batch(inputs, true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        encodings
            .into_iter()
            .enumerate()
            .map(|(index, e)| {
                if e.len() > self.max_tokens {
                    return Err(RuntimeError::InputTooLong {
                        index,
                        tokens: e.len(),
                        max: self.max_tokens,
                    });
                }
                let truncated = !e.get_overflowing().is_empty();
                Ok((
                    TokenSequence {
                        ids: e.get_ids().to_vec(),
                        type_ids: e.get_type_ids().to_vec(),
                    },
                    truncated,
                ))
            })
            .collect()
    }

    /// Tokenizes `(query, document)` pairs, documents cut to fit. A query that leaves no room for
    /// a document is [`RuntimeError::QueryTooLong`].
    pub fn encode_pairs(&self, query: &str, documents: &[String]) -> Result<Vec<TokenSequence>> {
        let query_tokens = self
            .plain
            .encode(query, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?
            .len();
        let specials = self
            .plain
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(true));
        if query_tokens + specials >= self.max_tokens {
            return Err(RuntimeError::QueryTooLong {
                tokens: query_tokens + specials,
                max: self.max_tokens,
            });
        }
        let pairs: Vec<(String, String)> = documents
            .iter()
            .map(|d| (query.to_string(), d.clone()))
            .collect();
        let encodings = self
            .pair_truncating
            .encode_batch(pairs, true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        Ok(encodings
            .into_iter()
            .map(|e| TokenSequence {
                ids: e.get_ids().to_vec(),
                type_ids: e.get_type_ids().to_vec(),
            })
            .collect())
    }

    /// Token ids of each text without special tokens, and the special tokens the model wraps a
    /// single sequence in: what late chunking concatenates.
    pub fn encode_bare(&self, texts: &[String]) -> Result<BareEncoding> {
        let inputs: Vec<&str> = texts.iter().map(String::as_str).collect();
        let bare = self
            .plain
            .encode_batch(inputs, false)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?
            .into_iter()
            .map(|e| e.get_ids().to_vec())
            .collect();
        let wrapped = self
            .plain
            .encode("", true)
            .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?;
        let specials = wrapped.get_ids();
        // Single-sequence templates put one token before the text ([CLS] / <s>) and the rest after.
        let (before, after) = specials.split_at(specials.len().min(1));
        Ok(BareEncoding {
            texts: bare,
            before: before.to_vec(),
            after: after.to_vec(),
        })
    }
}

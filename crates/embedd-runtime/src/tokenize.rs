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

/// Bytes of text per kept token [`TextTokenizer::bounded_prefix`] first tries; it grows the
/// prefix fourfold while the prefix holds too few tokens.
const PREFIX_BYTES_PER_TOKEN: usize = 12;

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
        let (tokenizer, inputs) = if truncate {
            let prefixes = texts
                .iter()
                .map(|t| self.bounded_prefix(t))
                .collect::<Result<Vec<_>>>()?;
            (&self.truncating, prefixes)
        } else {
            (&self.plain, texts.iter().map(String::as_str).collect())
        };
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
        let pairs = documents
            .iter()
            .map(|d| Ok((query.to_string(), self.bounded_prefix(d)?.to_string())))
            .collect::<Result<Vec<(String, String)>>>()?;
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

    /// The part of `text` that truncation to the model's length can keep from: the shortest
    /// prefix, cut before a whitespace character, whose tokens alone are more than the model
    /// takes; else the whole text. Every word before the cut is tokenized as in the whole text
    /// (pre-tokenizers split at whitespace), so truncating the prefix keeps exactly the tokens
    /// truncating the whole would, and a megabyte-long input costs a few kilobytes of work.
    fn bounded_prefix<'t>(&self, text: &'t str) -> Result<&'t str> {
        let mut budget = self
            .max_tokens
            .saturating_mul(PREFIX_BYTES_PER_TOKEN)
            .max(256);
        while budget < text.len() {
            while !text.is_char_boundary(budget) {
                budget += 1;
            }
            let Some(cut) = text[budget..].find(char::is_whitespace).map(|i| budget + i) else {
                break;
            };
            let prefix = &text[..cut];
            let tokens = self
                .plain
                .encode(prefix, false)
                .map_err(|e| RuntimeError::Tokenizer(e.to_string()))?
                .len();
            if tokens > self.max_tokens {
                return Ok(prefix);
            }
            budget = budget.saturating_mul(4);
        }
        Ok(text)
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

/// A cheap low estimate of what `texts` tokenize to, each cut to `max_tokens`: a fifth of its
/// bytes (English runs 4-5 bytes a token in word-piece and BPE vocabularies) plus its special
/// tokens. For refusing a request before tokenizing it, never for limits that must be exact.
pub fn estimated_tokens(texts: &[String], max_tokens: usize) -> usize {
    texts
        .iter()
        .map(|t| (t.len() / 5 + 2).min(max_tokens.max(1)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_tokenizer(model: &str, max_tokens: usize) -> TextTokenizer {
        let path = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../tests/fixtures/models")
            .join(model)
            .join("tokenizer.json");
        TextTokenizer::from_file(&path, max_tokens).unwrap()
    }

    /// Long inputs of several scripts and shapes: words, punctuation runs, CJK, a word longer
    /// than WordPiece takes, text without whitespace near the cut.
    fn long_texts() -> Vec<String> {
        let words = "The quick brown fox, jumping over 12 lazy dogs; naïve café — déjà vu! ";
        vec![
            words.repeat(8_000),
            "东京是日本的首都，人口众多。 ".repeat(8_000),
            format!("{} {}", "x".repeat(5_000), words.repeat(2_000)),
            format!(
                "{}{}",
                words.repeat(10),
                "supercalifragilistic".repeat(3_000)
            ),
            "a\tb\n\nc  ".repeat(30_000),
            words.repeat(3),
        ]
    }

    #[test]
    fn truncating_a_bounded_prefix_keeps_exactly_the_whole_texts_tokens() {
        for (model, max) in [
            ("tiny-bert-cross-encoder", 128),
            ("tiny-xlm-roberta-cross-encoder", 64),
            ("tiny-clip", 77),
            ("tiny-t5-relu", 512),
        ] {
            let tokenizer = fixture_tokenizer(model, max);
            for (i, text) in long_texts().iter().enumerate() {
                let whole = tokenizer.truncating.encode(text.as_str(), true).unwrap();
                let got = tokenizer
                    .encode_batch_flagged(std::slice::from_ref(text), true)
                    .unwrap()
                    .remove(0);
                assert_eq!(got.0.ids, whole.get_ids(), "{model} text {i}");
                assert_eq!(
                    got.1,
                    !whole.get_overflowing().is_empty(),
                    "{model} text {i}"
                );
                let prefix = tokenizer.bounded_prefix(text).unwrap();
                if text.len() > 100_000 && i != 3 {
                    assert!(
                        prefix.len() < 50_000,
                        "{model} text {i}: {} bytes",
                        prefix.len()
                    );
                }
            }
            // Rerank pairs cut the document the same way.
            let docs = long_texts();
            let pairs = tokenizer.encode_pairs("a query", &docs).unwrap();
            for (doc, pair) in docs.iter().zip(&pairs) {
                let whole = tokenizer
                    .pair_truncating
                    .encode(("a query", doc.as_str()), true)
                    .unwrap();
                assert_eq!(pair.ids, whole.get_ids(), "{model} pair");
            }
        }
    }
}

//! `POST /v1/multi-vector` (and its deprecated alias `/v1/multi-embeddings`): ColBERT token vectors.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::embeddings::{shape, Usage};
use crate::encoding::{EncodedVector, EncodingSelection};
use crate::error::ValidationErrors;
use crate::input::{image_errors, InputItem};
use crate::models::{ModelCapabilities, ModelKind};
use crate::reader::FieldReader;

/// Which side of late interaction the inputs are: queries are padded with [MASK] to the model's
/// query length, documents are not padded and skip punctuation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum InputType {
    Query,
    #[default]
    Document,
}

/// A validated multi-vector request; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MultiVectorRequest {
    pub model: String,
    /// A string, a list of strings, a `{text}` document, or a list of them.
    #[schema(value_type = Object)]
    pub input: Vec<InputItem>,
    /// `query` or `document` (default).
    pub input_type: InputType,
    /// Sent as `embedding_type`, `encoding_type` or `encoding_format`; applied to every token vector.
    pub embedding_type: EncodingSelection,
    /// Keep the first N values of every token vector (re-normalized); at or above the model's size,
    /// the whole vector.
    pub dimensions: Option<usize>,
}

impl MultiVectorRequest {
    pub fn from_json(body: &Value) -> Result<Self, ValidationErrors> {
        let mut reader = FieldReader::new(body);
        if !reader.is_object() {
            return Err(reader.errors);
        }
        let model = reader.required_str("model");
        let input = reader.input();
        let input_type = match reader
            .optional_literal("input_type", &["query", "document"])
            .as_deref()
        {
            Some("query") => InputType::Query,
            _ => InputType::Document,
        };
        let embedding_type = reader.encoding();
        let dimensions = reader.optional_int("dimensions", 1).map(|d| d as usize);
        let errors = reader.errors;
        match (model, input, embedding_type) {
            (Some(model), Some(input), Some(embedding_type)) if errors.is_empty() => Ok(Self {
                model,
                input,
                input_type,
                embedding_type,
                dimensions,
            }),
            _ => Err(errors),
        }
    }

    pub fn check_against(&self, model: &ModelCapabilities) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        errors
            .detail
            .extend(model.expect_kind(ModelKind::MultiVector));
        errors.detail.extend(image_errors(&self.input, &model.name));
        errors.into_result(())
    }

    pub fn texts(&self) -> Vec<String> {
        crate::input::texts(&self.input)
    }

    /// Applies `dimensions` to one token vector; the model's vectors are unit length, and so are
    /// the truncated ones after re-normalization.
    fn shape(&self, vector: Vec<f32>) -> Vec<f32> {
        shape(vector, self.dimensions, true)
    }
}

/// One input's token vectors in the requested encoding(s).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum EncodedTokenVectors {
    /// One format: a list of encoded vectors, in token order.
    One(Vec<EncodedVector>),
    /// Several formats: an object keyed by format, each a list of encoded vectors.
    Keyed(BTreeMap<&'static str, Vec<EncodedVector>>),
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MultiVectorObject {
    /// Always `"embeddings"`.
    pub object: &'static str,
    pub index: usize,
    /// Token vectors in token order (an object keyed by format when several were asked for).
    #[schema(value_type = Vec<Object>)]
    pub embeddings: EncodedTokenVectors,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct MultiVectorResponse {
    pub model: String,
    pub object: &'static str,
    pub data: Vec<MultiVectorObject>,
    pub usage: Usage,
}

impl MultiVectorResponse {
    pub fn new(request: &MultiVectorRequest, inputs: Vec<Vec<Vec<f32>>>, tokens: usize) -> Self {
        let data = inputs
            .into_iter()
            .enumerate()
            .map(|(index, vectors)| {
                let shaped: Vec<Vec<f32>> = vectors.into_iter().map(|v| request.shape(v)).collect();
                let embeddings = match &request.embedding_type {
                    EncodingSelection::Single(f) => {
                        EncodedTokenVectors::One(shaped.iter().map(|v| f.encode(v)).collect())
                    }
                    EncodingSelection::Several(formats) => EncodedTokenVectors::Keyed(
                        formats
                            .iter()
                            .map(|f| (f.as_str(), shaped.iter().map(|v| f.encode(v)).collect()))
                            .collect(),
                    ),
                };
                MultiVectorObject {
                    object: "embeddings",
                    index,
                    embeddings,
                }
            })
            .collect();
        Self {
            model: request.model.clone(),
            object: "list",
            data,
            usage: Usage::tokens(tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reader::body_loc;
    use serde_json::json;

    #[test]
    fn parses_defaults_and_fields() {
        let r = MultiVectorRequest::from_json(&json!({"model": "c", "input": "x"})).unwrap();
        assert_eq!(r.input_type, InputType::Document);
        let r = MultiVectorRequest::from_json(
            &json!({"model": "c", "input": [{"text": "x"}], "input_type": "query", "dimensions": 2, "encoding_type": "ubinary"}),
        )
        .unwrap();
        assert_eq!(r.input_type, InputType::Query);
        assert_eq!(r.dimensions, Some(2));
        let err = MultiVectorRequest::from_json(
            &json!({"model": "c", "input": "x", "input_type": "passage"}),
        )
        .unwrap_err();
        assert_eq!(err.detail[0].loc, body_loc("input_type"));
        assert_eq!(err.detail[0].kind, "literal_error");
    }

    #[test]
    fn response_shapes_every_token_vector() {
        let r = MultiVectorRequest::from_json(
            &json!({"model": "c", "input": ["a"], "dimensions": 1, "embedding_type": ["float", "ubinary"]}),
        )
        .unwrap();
        let resp = MultiVectorResponse::new(&r, vec![vec![vec![0.6, 0.8], vec![-0.6, 0.8]]], 3);
        let json = serde_json::to_value(resp).unwrap();
        assert_eq!(
            json["data"][0],
            json!({"object": "embeddings", "index": 0,
                   "embeddings": {"float": [[1.0], [-1.0]], "ubinary": [[128], [0]]}})
        );
        assert_eq!(
            json["usage"],
            json!({"total_tokens": 3, "prompt_tokens": 3})
        );
    }
}

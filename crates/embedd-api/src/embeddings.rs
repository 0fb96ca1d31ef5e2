//! `POST /v1/embeddings`: the request as clients send it, its checks, and the response.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::encoding::{EncodedEmbedding, EncodingSelection};
use crate::error::{ValidationError, ValidationErrors};
use crate::input::{image_errors, InputItem, Task};
use crate::models::{ModelCapabilities, ModelKind};
use crate::reader::{body_loc, FieldReader};

/// A validated embeddings request. Parsed with [`EmbedRequest::from_json`]; unknown fields (the
/// OpenAI client's `user`, say) are ignored.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EmbedRequest {
    /// The served model name.
    pub model: String,
    /// A string, a list of strings, a `{text}` or image (`{url}`, `{bytes}`, `{image}`) document, a
    /// list mixing them, or image data URIs.
    #[schema(value_type = Object)]
    pub input: Vec<InputItem>,
    /// Sent as `embedding_type`, `encoding_type` or `encoding_format`: `float`, `base64`, `binary`,
    /// `ubinary`, or a list of them.
    pub embedding_type: EncodingSelection,
    /// Selects a task adapter on models that have them; accepted and ignored by the others.
    pub task: Option<Task>,
    /// Matryoshka truncation: keep the first `dimensions` values (re-normalized when `normalized`).
    /// Values at or above the model's size return the whole vector.
    pub dimensions: Option<usize>,
    /// L2-normalize the output (default true).
    pub normalized: bool,
    /// Cut over-long inputs to the model's maximum instead of rejecting them (default false, or
    /// the server's `--auto-truncate`); `None` when the request leaves it out.
    #[schema(value_type = bool)]
    pub truncate: Option<bool>,
    /// Embed the concatenated inputs in one pass and pool each input's own tokens (default false).
    pub late_chunking: bool,
}

impl EmbedRequest {
    /// Parses and checks every field that needs no knowledge of the model, reporting all errors at once.
    pub fn from_json(body: &Value) -> Result<Self, ValidationErrors> {
        let mut reader = FieldReader::new(body);
        if !reader.is_object() {
            return Err(reader.errors);
        }
        let model = reader.required_str("model");
        let input = reader.input();
        let embedding_type = reader.encoding();
        let task = reader
            .optional_literal("task", &Task::NAMES)
            .and_then(|t| Task::parse(&t));
        let dimensions = reader.optional_int("dimensions", 1).map(|d| d as usize);
        let normalized = reader.optional_bool("normalized").unwrap_or(true);
        let truncate = reader.optional_bool("truncate");
        let late_chunking = reader.optional_bool("late_chunking").unwrap_or(false);

        let errors = reader.errors;
        match (model, input, embedding_type) {
            (Some(model), Some(input), Some(embedding_type)) if errors.is_empty() => Ok(Self {
                model,
                input,
                embedding_type,
                task,
                dimensions,
                normalized,
                truncate,
                late_chunking,
            }),
            _ => Err(errors),
        }
    }

    /// Checks what depends on the model: its kind, image support, late chunking.
    pub fn check_against(&self, model: &ModelCapabilities) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        errors
            .detail
            .extend(model.expect_kind(ModelKind::Embedding));
        if !model.accepts_images {
            errors.detail.extend(image_errors(&self.input, &model.name));
        }
        if let Some(task) = self
            .task
            .filter(|t| !model.tasks.is_empty() && !model.tasks.iter().any(|n| n == t.as_str()))
        {
            errors.push(ValidationError::value(
                body_loc("task"),
                format!(
                    "model '{}' has no adapter for task '{}'; its tasks are: {}",
                    model.name,
                    task.as_str(),
                    model.tasks.join(", ")
                ),
            ));
        }
        if self.late_chunking && !model.supports_late_chunking {
            errors.push(ValidationError::value(
                body_loc("late_chunking"),
                format!("model '{}' does not support late chunking", model.name),
            ));
        } else if self.late_chunking && model.accepts_images {
            for (i, item) in self.input.iter().enumerate() {
                if matches!(item, InputItem::Image(_)) {
                    errors.push(ValidationError::value(
                        vec!["body".into(), "input".into(), i.into()],
                        "late_chunking pools text inputs over a shared window; images cannot join it",
                    ));
                }
            }
        }
        errors.into_result(())
    }

    /// The texts of a request that passed [`Self::check_against`] for a text model.
    pub fn texts(&self) -> Vec<String> {
        crate::input::texts(&self.input)
    }

    /// Applies `dimensions` and `normalized` to a model's raw pooled vector.
    pub fn shape_vector(&self, vector: Vec<f32>) -> Vec<f32> {
        shape(vector, self.dimensions, self.normalized)
    }
}

/// Matryoshka truncation to `dimensions` (none, or more than the vector has: the whole vector),
/// then L2 normalization when asked.
pub fn shape(mut vector: Vec<f32>, dimensions: Option<usize>, normalize: bool) -> Vec<f32> {
    if let Some(d) = dimensions {
        vector.truncate(d);
    }
    if normalize {
        l2_normalize(&mut vector);
    }
    vector
}

/// Scales to unit length; a zero vector stays zero rather than turning into NaNs.
pub fn l2_normalize(vector: &mut [f32]) {
    let norm = vector.iter().map(|v| v * v).sum::<f32>().sqrt();
    if norm > 0.0 {
        vector.iter_mut().for_each(|v| *v /= norm);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct Usage {
    pub total_tokens: usize,
    pub prompt_tokens: usize,
}

impl Usage {
    pub fn tokens(n: usize) -> Self {
        Self {
            total_tokens: n,
            prompt_tokens: n,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EmbeddingObject {
    /// Always `"embedding"`.
    pub object: &'static str,
    pub index: usize,
    #[schema(value_type = Object)]
    pub embedding: EncodedEmbedding,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct EmbedResponse {
    pub model: String,
    /// Always `"list"`.
    pub object: &'static str,
    /// One entry per input, in input order.
    pub data: Vec<EmbeddingObject>,
    pub usage: Usage,
}

impl EmbedResponse {
    /// Encodes shaped vectors (in input order) as the request asked.
    pub fn new(request: &EmbedRequest, vectors: Vec<Vec<f32>>, total_tokens: usize) -> Self {
        let data = vectors
            .into_iter()
            .enumerate()
            .map(|(index, v)| EmbeddingObject {
                object: "embedding",
                index,
                embedding: request.embedding_type.encode(&request.shape_vector(v)),
            })
            .collect();
        Self {
            model: request.model.clone(),
            object: "list",
            data,
            usage: Usage::tokens(total_tokens),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::encoding::EncodingFormat;
    use crate::error::LocItem;
    use serde_json::json;

    fn caps() -> ModelCapabilities {
        ModelCapabilities {
            name: "m".into(),
            kind: ModelKind::Embedding,
            dimensions: 4,
            max_input_tokens: 16,
            accepts_images: false,
            supports_late_chunking: true,
            tasks: Vec::new(),
        }
    }

    #[test]
    fn defaults_follow_the_contract() {
        let r = EmbedRequest::from_json(&json!({"model": "m", "input": "hi"})).unwrap();
        assert_eq!(r.input, vec![InputItem::Text("hi".into())]);
        assert_eq!(
            r.embedding_type,
            EncodingSelection::Single(EncodingFormat::Float)
        );
        assert!(r.normalized);
        assert_eq!(r.truncate, None);
        assert!(!r.late_chunking);
        assert_eq!(r.task, None);
        assert_eq!(r.dimensions, None);
    }

    #[test]
    fn all_fields_parse_and_unknown_ones_are_ignored() {
        let r = EmbedRequest::from_json(&json!({
            "model": "m", "input": ["a"], "task": "retrieval.query", "dimensions": 2,
            "normalized": false, "truncate": true, "late_chunking": true, "user": "me",
            "encoding_format": ["base64"]
        }))
        .unwrap();
        assert_eq!(r.task, Some(Task::RetrievalQuery));
        assert_eq!(r.dimensions, Some(2));
        assert!(!r.normalized && r.truncate == Some(true) && r.late_chunking);
    }

    #[test]
    fn every_bad_field_is_reported_at_once() {
        let err = EmbedRequest::from_json(&json!({
            "input": [], "task": "nope", "dimensions": 0, "normalized": "yes", "embedding_type": "int8"
        }))
        .unwrap_err();
        let fields: Vec<LocItem> = err.detail.iter().map(|e| e.loc[1].clone()).collect();
        for f in [
            "model",
            "input",
            "embedding_type",
            "task",
            "dimensions",
            "normalized",
        ] {
            assert!(fields.contains(&f.into()), "{f} missing from {err:?}");
        }
        let model = err
            .detail
            .iter()
            .find(|e| e.loc[1] == "model".into())
            .unwrap();
        assert_eq!(model.kind, "missing");
        assert_eq!(model.msg, "Field required");
    }

    #[test]
    fn body_must_be_an_object() {
        let err = EmbedRequest::from_json(&json!(["a"])).unwrap_err();
        assert_eq!(err.detail[0].loc, vec![LocItem::from("body")]);
        assert_eq!(err.detail[0].kind, "model_attributes_type");
    }

    #[test]
    fn model_checks_name_the_field() {
        let r = EmbedRequest::from_json(&json!({
            "model": "m", "input": ["a", {"url": "https://x/y.png"}], "late_chunking": true
        }))
        .unwrap();
        let mut c = caps();
        c.supports_late_chunking = false;
        let err = r.check_against(&c).unwrap_err();
        assert_eq!(
            err.detail[0].loc,
            vec!["body".into(), "input".into(), 1.into()]
        );
        assert_eq!(
            err.detail[1].loc,
            vec!["body".into(), "late_chunking".into()]
        );
    }

    #[test]
    fn shaping_truncates_then_renormalizes() {
        let r =
            EmbedRequest::from_json(&json!({"model": "m", "input": "x", "dimensions": 2})).unwrap();
        assert_eq!(r.shape_vector(vec![3.0, 4.0, 100.0, 1.0]), vec![0.6, 0.8]);
        let r = EmbedRequest::from_json(
            &json!({"model": "m", "input": "x", "dimensions": 9, "normalized": false}),
        )
        .unwrap();
        assert_eq!(r.shape_vector(vec![3.0, 4.0]), vec![3.0, 4.0]);
        let mut zero = vec![0.0, 0.0];
        l2_normalize(&mut zero);
        assert_eq!(zero, vec![0.0, 0.0]);
    }

    #[test]
    fn response_keeps_input_order_and_object_names() {
        let r = EmbedRequest::from_json(
            &json!({"model": "m", "input": ["a", "b"], "normalized": false}),
        )
        .unwrap();
        let resp = EmbedResponse::new(&r, vec![vec![1.0], vec![2.0]], 7);
        let json = serde_json::to_value(resp).unwrap();
        assert_eq!(
            json,
            json!({"model": "m", "object": "list", "data": [
                {"object": "embedding", "index": 0, "embedding": [1.0]},
                {"object": "embedding", "index": 1, "embedding": [2.0]}],
                "usage": {"total_tokens": 7, "prompt_tokens": 7}})
        );
    }
}

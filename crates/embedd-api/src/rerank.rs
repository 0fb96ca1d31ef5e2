//! `POST /v1/rerank`: a query scored against documents by a cross-encoder.

use serde::Serialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use crate::embeddings::Usage;
use crate::error::{LocItem, ValidationError, ValidationErrors};
use crate::models::{ModelCapabilities, ModelKind};
use crate::reader::{body_loc, FieldReader};

/// One document as sent: its text, and what to echo back when `return_documents` is true.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RerankDocument {
    pub text: String,
    /// `{"text": ...}` for a string, the whole object (extra fields kept) for a document.
    #[schema(value_type = Object)]
    pub echo: Value,
}

/// A validated rerank request. `top_n: null` is the same as leaving it out.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RerankRequest {
    pub model: String,
    /// A string or a `{text}` document.
    #[schema(value_type = Object)]
    pub query: String,
    /// Strings or `{text, ...}` documents (extra fields are returned as sent).
    #[schema(value_type = Vec<Object>)]
    pub documents: Vec<RerankDocument>,
    /// How many of the best results to return (default: all).
    pub top_n: Option<usize>,
    /// Return each result's document (default true).
    pub return_documents: bool,
}

impl RerankRequest {
    pub fn from_json(body: &Value) -> Result<Self, ValidationErrors> {
        let mut reader = FieldReader::new(body);
        if !reader.is_object() {
            return Err(reader.errors);
        }
        let model = reader.required_str("model");
        let query = reader
            .required("query")
            .and_then(|q| match text_of(q, &body_loc("query")) {
                Ok(t) => Some(t),
                Err(e) => {
                    reader.errors.push(e);
                    None
                }
            });
        let documents = reader.required("documents").and_then(|d| {
            parse_documents(d)
                .map_err(|e| reader.errors.detail.extend(e.detail))
                .ok()
        });
        let top_n = reader.optional_int("top_n", 1).map(|n| n as usize);
        let return_documents = reader.optional_bool("return_documents").unwrap_or(true);
        let errors = reader.errors;
        match (model, query, documents) {
            (Some(model), Some(query), Some(documents)) if errors.is_empty() => Ok(Self {
                model,
                query,
                documents,
                top_n,
                return_documents,
            }),
            _ => Err(errors),
        }
    }

    /// Checks the model kind and the per-request document limit.
    pub fn check_against(
        &self,
        model: &ModelCapabilities,
        max_documents: usize,
    ) -> Result<(), ValidationErrors> {
        let mut errors = ValidationErrors::default();
        errors.detail.extend(model.expect_kind(ModelKind::Reranker));
        if self.documents.len() > max_documents {
            errors.push(ValidationError::value(
                body_loc("documents"),
                format!(
                    "{} documents in one request; at most {max_documents} are accepted",
                    self.documents.len()
                ),
            ));
        }
        errors.into_result(())
    }

    pub fn texts(&self) -> Vec<String> {
        self.documents.iter().map(|d| d.text.clone()).collect()
    }
}

fn text_of(value: &Value, loc: &[LocItem]) -> Result<String, ValidationError> {
    match value {
        Value::String(s) => Ok(s.clone()),
        Value::Object(doc) => match doc.get("text") {
            Some(Value::String(s)) => Ok(s.clone()),
            Some(_) => {
                let mut loc = loc.to_vec();
                loc.push("text".into());
                Err(ValidationError::new(
                    loc,
                    "Input should be a valid string",
                    "string_type",
                ))
            }
            None => {
                let mut loc = loc.to_vec();
                loc.push("text".into());
                Err(ValidationError::missing(loc))
            }
        },
        _ => Err(ValidationError::new(
            loc.to_vec(),
            "Input should be a valid string or a document with a 'text' field",
            "string_type",
        )),
    }
}

fn parse_documents(value: &Value) -> Result<Vec<RerankDocument>, ValidationErrors> {
    let loc = body_loc("documents");
    let Value::Array(items) = value else {
        return Err(ValidationErrors::single(ValidationError::new(
            loc,
            "Input should be a valid list",
            "list_type",
        )));
    };
    if items.is_empty() {
        return Err(ValidationErrors::single(ValidationError::new(
            loc,
            "List should have at least 1 item after validation, not 0",
            "too_short",
        )));
    }
    let mut errors = ValidationErrors::default();
    let mut docs = Vec::with_capacity(items.len());
    for (i, item) in items.iter().enumerate() {
        let mut item_loc = loc.clone();
        item_loc.push(i.into());
        match text_of(item, &item_loc) {
            Ok(text) => {
                let echo = match item {
                    Value::Object(_) => item.clone(),
                    _ => Value::Object(Map::from_iter([(
                        "text".to_string(),
                        Value::String(text.clone()),
                    )])),
                };
                docs.push(RerankDocument { text, echo });
            }
            Err(e) => errors.push(e),
        }
    }
    errors.into_result(docs)
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RerankResult {
    /// Position of the document in the request's list.
    pub index: usize,
    pub relevance_score: f64,
    /// Present when `return_documents` is true.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Object)]
    pub document: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct RerankResponse {
    pub model: String,
    pub usage: Usage,
    /// Highest score first; ties in request order.
    pub results: Vec<RerankResult>,
}

impl RerankResponse {
    /// Orders `scores` (one per document, request order), applies `top_n` and `return_documents`.
    pub fn new(request: &RerankRequest, scores: &[f32], total_tokens: usize) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        order.truncate(request.top_n.unwrap_or(order.len()));
        let results = order
            .into_iter()
            .map(|index| RerankResult {
                index,
                relevance_score: scores[index] as f64,
                document: request
                    .return_documents
                    .then(|| request.documents[index].echo.clone()),
            })
            .collect();
        Self {
            model: request.model.clone(),
            usage: Usage::tokens(total_tokens),
            results,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn query_and_documents_in_every_form() {
        let r = RerankRequest::from_json(&json!({
            "model": "m", "query": {"text": "q"},
            "documents": ["a", {"text": "b", "id": 7, "meta": {"k": 1}}], "top_n": null
        }))
        .unwrap();
        assert_eq!(r.query, "q");
        assert_eq!(r.texts(), vec!["a", "b"]);
        assert_eq!(r.documents[0].echo, json!({"text": "a"}));
        assert_eq!(
            r.documents[1].echo,
            json!({"text": "b", "id": 7, "meta": {"k": 1}})
        );
        assert_eq!(r.top_n, None);
        assert!(r.return_documents);
    }

    #[test]
    fn errors_name_the_field() {
        let err = RerankRequest::from_json(&json!({
            "model": "m", "query": 3, "documents": [], "top_n": 0, "return_documents": "no"
        }))
        .unwrap_err();
        let locs: Vec<_> = err.detail.iter().map(|e| e.loc.clone()).collect();
        assert_eq!(
            locs,
            vec![
                body_loc("query"),
                body_loc("documents"),
                body_loc("top_n"),
                body_loc("return_documents")
            ]
        );
        let err = RerankRequest::from_json(&json!({
            "model": "m", "query": "q", "documents": ["ok", {"id": 1}, 5]
        }))
        .unwrap_err();
        assert_eq!(
            err.detail[0].loc,
            vec!["body".into(), "documents".into(), 1.into(), "text".into()]
        );
        assert_eq!(
            err.detail[1].loc,
            vec!["body".into(), "documents".into(), 2.into()]
        );
    }

    #[test]
    fn results_sort_by_score_then_index_and_honour_top_n() {
        let r = RerankRequest::from_json(&json!({
            "model": "m", "query": "q", "documents": ["a", "b", "c", "d"], "top_n": 3
        }))
        .unwrap();
        let resp = RerankResponse::new(&r, &[0.5, 0.9, 0.5, 0.1], 40);
        let order: Vec<usize> = resp.results.iter().map(|x| x.index).collect();
        assert_eq!(order, vec![1, 0, 2]);
        assert_eq!(resp.results[0].document, Some(json!({"text": "b"})));
        assert_eq!(resp.usage.total_tokens, 40);

        let r = RerankRequest::from_json(&json!({
            "model": "m", "query": "q", "documents": ["a"], "top_n": 10, "return_documents": false
        }))
        .unwrap();
        let json = serde_json::to_value(RerankResponse::new(&r, &[0.25], 5)).unwrap();
        assert_eq!(
            json["results"],
            json!([{"index": 0, "relevance_score": 0.25}])
        );
    }
}

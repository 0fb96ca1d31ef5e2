//! The `input` field in all its client forms, and `task`.

use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use crate::error::{LocItem, ValidationError, ValidationErrors};

/// Where an image input comes from, as clients send it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ImageSource {
    /// An `http(s)` URL.
    Url(String),
    /// A `data:image/...;base64,` URI.
    DataUri(String),
    /// Base64 image bytes without a URI prefix.
    Base64(String),
}

/// One item to embed, after the request's `input` is flattened to a list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum InputItem {
    Text(String),
    Image(ImageSource),
}

impl InputItem {
    pub fn as_text(&self) -> Option<&str> {
        match self {
            InputItem::Text(t) => Some(t),
            InputItem::Image(_) => None,
        }
    }
}

/// The downstream use a client names; models with task adapters pick one by it, models with
/// task prompts put the prompt in front, others ignore it. The code tasks are
/// jina-code-embeddings', as the hosted API names them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
pub enum Task {
    #[serde(rename = "retrieval.query")]
    RetrievalQuery,
    #[serde(rename = "retrieval.passage")]
    RetrievalPassage,
    #[serde(rename = "text-matching")]
    TextMatching,
    #[serde(rename = "classification")]
    Classification,
    #[serde(rename = "separation")]
    Separation,
    #[serde(rename = "nl2code.query")]
    Nl2CodeQuery,
    #[serde(rename = "nl2code.passage")]
    Nl2CodePassage,
    #[serde(rename = "code2code.query")]
    Code2CodeQuery,
    #[serde(rename = "code2code.passage")]
    Code2CodePassage,
    #[serde(rename = "code2nl.query")]
    Code2NlQuery,
    #[serde(rename = "code2nl.passage")]
    Code2NlPassage,
    #[serde(rename = "code2completion.query")]
    Code2CompletionQuery,
    #[serde(rename = "code2completion.passage")]
    Code2CompletionPassage,
    #[serde(rename = "qa.query")]
    QaQuery,
    #[serde(rename = "qa.passage")]
    QaPassage,
}

impl Task {
    pub const ALL: [Task; 15] = [
        Task::RetrievalQuery,
        Task::RetrievalPassage,
        Task::TextMatching,
        Task::Classification,
        Task::Separation,
        Task::Nl2CodeQuery,
        Task::Nl2CodePassage,
        Task::Code2CodeQuery,
        Task::Code2CodePassage,
        Task::Code2NlQuery,
        Task::Code2NlPassage,
        Task::Code2CompletionQuery,
        Task::Code2CompletionPassage,
        Task::QaQuery,
        Task::QaPassage,
    ];

    pub const NAMES: [&'static str; 15] = [
        "retrieval.query",
        "retrieval.passage",
        "text-matching",
        "classification",
        "separation",
        "nl2code.query",
        "nl2code.passage",
        "code2code.query",
        "code2code.passage",
        "code2nl.query",
        "code2nl.passage",
        "code2completion.query",
        "code2completion.passage",
        "qa.query",
        "qa.passage",
    ];

    pub fn parse(name: &str) -> Option<Self> {
        let at = Self::NAMES.iter().position(|n| *n == name)?;
        Some(Self::ALL[at])
    }

    pub fn as_str(self) -> &'static str {
        let at = Self::ALL.iter().position(|t| *t == self).unwrap_or(0);
        Self::NAMES[at]
    }
}

/// A 422 on `input` when a request carries more inputs than the server takes in one request
/// (`--max-client-batch-size`), for every route that takes a list of inputs.
pub fn check_input_count(count: usize, max: usize) -> Result<(), ValidationErrors> {
    if count <= max {
        return Ok(());
    }
    Err(ValidationErrors::single(ValidationError::value(
        vec!["body".into(), "input".into()],
        format!("{count} inputs in one request; at most {max} are accepted"),
    )))
}

/// Refuses a request whose inputs tokenize to more than `max` tokens in all: what bounds one
/// request's model time, whatever mix of input count and length it has.
pub fn check_token_budget(tokens: usize, max: usize, field: &str) -> Result<(), ValidationErrors> {
    if tokens <= max {
        return Ok(());
    }
    Err(ValidationErrors::single(ValidationError::value(
        vec!["body".into(), field.into()],
        format!(
            "the inputs come to {tokens} tokens, more than the {max} one request may carry; \
             split them across requests"
        ),
    )))
}

/// The texts of items already checked to be text (images are skipped).
pub fn texts(items: &[InputItem]) -> Vec<String> {
    items
        .iter()
        .filter_map(|i| i.as_text().map(str::to_string))
        .collect()
}

/// A 422 for each image input sent to a model that embeds text only.
pub fn image_errors(items: &[InputItem], model: &str) -> Vec<ValidationError> {
    items
        .iter()
        .enumerate()
        .filter(|(_, item)| matches!(item, InputItem::Image(_)))
        .map(|(i, _)| {
            ValidationError::value(
                vec!["body".into(), "input".into(), i.into()],
                format!("model '{model}' embeds text only; image inputs need an image model"),
            )
        })
        .collect()
}

const INPUT_SHAPE: &str =
    "Input should be a string, a {text} or image document, or a non-empty list of them";
const ITEM_SHAPE: &str =
    "Input should be a valid string or a document with a 'text', 'url', 'bytes' or 'image' field";

/// Flattens `input` (string, document, or a list mixing strings and documents) into items.
/// Errors are located at `loc` (for a list, at `loc + [index]`).
pub fn parse_input(value: &Value, loc: &[LocItem]) -> Result<Vec<InputItem>, ValidationErrors> {
    match value {
        Value::Array(items) => {
            if items.is_empty() {
                return Err(ValidationErrors::single(ValidationError::new(
                    loc.to_vec(),
                    "List should have at least 1 item after validation, not 0",
                    "too_short",
                )));
            }
            let mut errors = ValidationErrors::default();
            let mut parsed = Vec::with_capacity(items.len());
            for (i, item) in items.iter().enumerate() {
                let mut item_loc = loc.to_vec();
                item_loc.push(i.into());
                match parse_item(item, &item_loc) {
                    Ok(p) => parsed.push(p),
                    Err(e) => errors.push(e),
                }
            }
            errors.into_result(parsed)
        }
        Value::String(_) | Value::Object(_) => parse_item(value, loc)
            .map(|item| vec![item])
            .map_err(ValidationErrors::single),
        _ => Err(ValidationErrors::single(ValidationError::new(
            loc.to_vec(),
            INPUT_SHAPE,
            "union_type",
        ))),
    }
}

fn parse_item(value: &Value, loc: &[LocItem]) -> Result<InputItem, ValidationError> {
    match value {
        Value::String(s) => Ok(string_item(s)),
        Value::Object(doc) => {
            if let Some(text) = doc.get("text").filter(|v| !v.is_null()) {
                return match text.as_str() {
                    Some(t) => Ok(InputItem::Text(t.to_string())),
                    None => Err(field_error(loc, "text", "Input should be a valid string")),
                };
            }
            for field in ["url", "image", "bytes"] {
                let Some(v) = doc.get(field).filter(|v| !v.is_null()) else {
                    continue;
                };
                let Some(s) = v.as_str().filter(|s| !s.is_empty()) else {
                    return Err(field_error(
                        loc,
                        field,
                        "Input should be a non-empty string",
                    ));
                };
                return Ok(InputItem::Image(image_source(field, s)));
            }
            Err(ValidationError::new(
                loc.to_vec(),
                "Document needs a 'text' field (or 'url', 'bytes' or 'image' for an image)",
                "missing",
            ))
        }
        _ => Err(ValidationError::new(
            loc.to_vec(),
            ITEM_SHAPE,
            "string_type",
        )),
    }
}

fn field_error(loc: &[LocItem], field: &str, msg: &str) -> ValidationError {
    let mut loc = loc.to_vec();
    loc.push(field.into());
    ValidationError::new(loc, msg, "string_type")
}

/// A bare string is text unless it is an image data URI, which clients send in place of a document.
fn string_item(s: &str) -> InputItem {
    if s.starts_with("data:image/") {
        InputItem::Image(ImageSource::DataUri(s.to_string()))
    } else {
        InputItem::Text(s.to_string())
    }
}

fn image_source(field: &str, s: &str) -> ImageSource {
    if s.starts_with("data:") {
        ImageSource::DataUri(s.to_string())
    } else if field == "url"
        || (field == "image" && (s.starts_with("http://") || s.starts_with("https://")))
    {
        // Whatever a `url` holds is fetched as a URL (other schemes are refused by name).
        ImageSource::Url(s.to_string())
    } else {
        ImageSource::Base64(s.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn loc() -> Vec<LocItem> {
        vec!["body".into(), "input".into()]
    }

    #[test]
    fn every_client_form_flattens_to_items() {
        let text = |s: &str| InputItem::Text(s.into());
        assert_eq!(parse_input(&json!("a"), &loc()).unwrap(), vec![text("a")]);
        assert_eq!(
            parse_input(&json!(["a", "b"]), &loc()).unwrap(),
            vec![text("a"), text("b")]
        );
        assert_eq!(
            parse_input(&json!({"text": "a", "id": "x"}), &loc()).unwrap(),
            vec![text("a")]
        );
        let mixed = parse_input(
            &json!([{"text": "a"}, "b", {"url": "https://x/y.png"}, "data:image/png;base64,AAA", {"bytes": "QUJD"}]),
            &loc(),
        )
        .unwrap();
        assert_eq!(
            mixed,
            vec![
                text("a"),
                text("b"),
                InputItem::Image(ImageSource::Url("https://x/y.png".into())),
                InputItem::Image(ImageSource::DataUri("data:image/png;base64,AAA".into())),
                InputItem::Image(ImageSource::Base64("QUJD".into())),
            ]
        );
    }

    #[test]
    fn empty_text_is_a_valid_input() {
        assert_eq!(
            parse_input(&json!([""]), &loc()).unwrap(),
            vec![InputItem::Text(String::new())]
        );
    }

    #[test]
    fn bad_items_are_located_by_index() {
        let err = parse_input(&json!(["ok", 3, {"text": 5}, {}]), &loc()).unwrap_err();
        let locs: Vec<_> = err.detail.iter().map(|e| e.loc.clone()).collect();
        assert_eq!(
            locs,
            vec![
                vec!["body".into(), "input".into(), 1.into()],
                vec!["body".into(), "input".into(), 2.into(), "text".into()],
                vec!["body".into(), "input".into(), 3.into()],
            ]
        );
    }

    #[test]
    fn empty_list_and_wrong_type_are_rejected() {
        let err = parse_input(&json!([]), &loc()).unwrap_err();
        assert_eq!(err.detail[0].kind, "too_short");
        let err = parse_input(&json!(42), &loc()).unwrap_err();
        assert_eq!(err.detail[0].kind, "union_type");
    }
}

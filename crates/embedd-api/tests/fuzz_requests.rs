//! The request readers driven by generated JSON: whatever the body, each reader returns a
//! request or validation errors in FastAPI's shape (every error located under `body`), and
//! never panics. Bodies are built from the contract's own field names and value forms so the
//! generator reaches the readers' deep paths (input items, output formats, documents).

use embedd_api::{EmbedRequest, MultiVectorRequest, RerankRequest, ValidationErrors};
use proptest::prelude::*;
use serde_json::{Map, Value};

const FIELDS: &[&str] = &[
    "model",
    "input",
    "text",
    "image",
    "url",
    "bytes",
    "embedding_type",
    "encoding_type",
    "encoding_format",
    "task",
    "dimensions",
    "normalized",
    "truncate",
    "late_chunking",
    "query",
    "documents",
    "top_n",
    "return_documents",
    "input_type",
    "id",
    "user",
];

const STRINGS: &[&str] = &[
    "",
    "clip",
    "all-MiniLM-L6-v2",
    "float",
    "base64",
    "binary",
    "ubinary",
    "query",
    "document",
    "retrieval.query",
    "text-matching",
    "https://example.com/cat.png",
    "http://127.0.0.1/x.jpg",
    "data:image/png;base64,iVBORw0KGgo=",
    "data:image/png;base64,!!",
    "data:text/plain,hi",
    "QUJD",
    "\u{0}",
    "ünïcödé 🚀",
    "a very ordinary sentence",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        (-3i64..3000).prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        any::<u64>().prop_map(Value::from),
        proptest::sample::select(STRINGS).prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
    ]
}

fn json() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(4, 48, 8, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
            proptest::collection::vec(
                (
                    prop_oneof![
                        proptest::sample::select(FIELDS).prop_map(str::to_string),
                        "[a-z_]{0,8}"
                    ],
                    inner
                ),
                0..8
            )
            .prop_map(|pairs| Value::Object(pairs.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

/// A body that is an object with the contract's fields, each holding any generated value.
fn request_body() -> impl Strategy<Value = Value> {
    proptest::collection::vec((proptest::sample::select(FIELDS), json()), 0..10).prop_map(|pairs| {
        Value::Object(pairs.into_iter().map(|(k, v)| (k.to_string(), v)).collect())
    })
}

fn located(errors: &ValidationErrors) -> bool {
    let body = serde_json::to_value(errors).unwrap();
    let detail = body["detail"].as_array().cloned().unwrap_or_default();
    !detail.is_empty()
        && detail
            .iter()
            .all(|e| e["loc"][0] == "body" && e["msg"].is_string() && e["type"].is_string())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn embedding_requests_parse_or_name_the_field(body in prop_oneof![request_body(), json()]) {
        if let Err(errors) = EmbedRequest::from_json(&body) {
            prop_assert!(located(&errors), "{}", serde_json::to_string(&errors).unwrap());
        }
    }

    #[test]
    fn rerank_requests_parse_or_name_the_field(body in prop_oneof![request_body(), json()]) {
        if let Err(errors) = RerankRequest::from_json(&body) {
            prop_assert!(located(&errors), "{}", serde_json::to_string(&errors).unwrap());
        }
    }

    #[test]
    fn multi_vector_requests_parse_or_name_the_field(body in prop_oneof![request_body(), json()]) {
        if let Err(errors) = MultiVectorRequest::from_json(&body) {
            prop_assert!(located(&errors), "{}", serde_json::to_string(&errors).unwrap());
        }
    }
}

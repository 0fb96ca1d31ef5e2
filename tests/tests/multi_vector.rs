//! POST /v1/multi-vector (and /v1/multi-embeddings) through the real binary, with the random-weight
//! ColBERT fixture checked against colbert-ai's vectors.

use base64::Engine;
use embedd_blackbox::*;

const COLBERT: &str = "tiny-colbert";

fn start() -> Server {
    let dir = workspace().join("tests/fixtures/models").join(COLBERT);
    let spec = format!("{COLBERT}={}", dir.display());
    Server::start(&["--model", MODEL, "--model", &spec])
}

fn fixture() -> Value {
    let path = workspace().join("tests/fixtures/colbert.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn token_vectors(resp: &Value) -> Vec<Vec<Vec<f32>>> {
    resp["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["embeddings"]
                .as_array()
                .unwrap()
                .iter()
                .map(floats)
                .collect()
        })
        .collect()
}

fn assert_close(ours: &[Vec<Vec<f32>>], theirs: &Value, what: &str) {
    let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(theirs.clone()).unwrap();
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "{what} {i}: token count");
        for (x, y) in a.iter().zip(b) {
            assert!(cosine(x, y) >= 0.9999, "{what} {i}");
        }
    }
}

#[test]
fn documents_and_queries_match_the_reference_on_both_routes() {
    let server = start();
    let f = fixture();
    for route in ["/v1/multi-vector", "/v1/multi-embeddings"] {
        let (status, docs) =
            server.post(route, &json!({"model": COLBERT, "input": f["documents"]}));
        assert_eq!(status, 200, "{docs}");
        assert_eq!(docs["object"], "list");
        assert_eq!(docs["model"], COLBERT);
        for (i, d) in docs["data"].as_array().unwrap().iter().enumerate() {
            assert_eq!(d["object"], "embeddings");
            assert_eq!(d["index"], i);
        }
        assert_close(&token_vectors(&docs), &f["document_vectors"], "document");
        assert!(docs["usage"]["total_tokens"].as_u64().unwrap() > 0);

        let (status, queries) = server.post(
            route,
            &json!({"model": COLBERT, "input": f["queries"], "input_type": "query"}),
        );
        assert_eq!(status, 200, "{queries}");
        assert_close(&token_vectors(&queries), &f["query_vectors"], "query");
    }
}

#[test]
fn input_forms_encodings_and_dimensions() {
    let server = start();
    let post = |body: Value| {
        let (status, resp) = server.post("/v1/multi-vector", &body);
        assert_eq!(status, 200, "{body} -> {resp}");
        resp
    };
    let reference = token_vectors(&post(
        json!({"model": COLBERT, "input": ["late interaction"]}),
    ));
    for input in [
        json!("late interaction"),
        json!({"text": "late interaction"}),
        json!([{"text": "late interaction"}]),
    ] {
        let v = token_vectors(&post(json!({"model": COLBERT, "input": input})));
        assert_eq!(v, reference, "{input}");
    }
    let b64 =
        post(json!({"model": COLBERT, "input": "late interaction", "encoding_format": "base64"}));
    let first = b64["data"][0]["embeddings"][0].as_str().unwrap();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(first)
        .unwrap();
    let decoded: Vec<f32> = bytes
        .chunks(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    assert_eq!(decoded, reference[0][0]);

    let several = post(
        json!({"model": COLBERT, "input": "late interaction", "embedding_type": ["float", "ubinary"]}),
    );
    let e = &several["data"][0]["embeddings"];
    assert_eq!(e["float"].as_array().unwrap().len(), reference[0].len());
    assert_eq!(
        e["ubinary"][0].as_array().unwrap().len(),
        2,
        "16 dims pack into 2 bytes"
    );

    let short = token_vectors(&post(
        json!({"model": COLBERT, "input": "late interaction", "dimensions": 8}),
    ));
    assert!(short[0]
        .iter()
        .all(|v| v.len() == 8 && (norm(v) - 1.0).abs() < 1e-5));
}

#[test]
fn multi_vector_errors_name_the_field() {
    let server = start();
    let cases = [
        (json!({"input": "x"}), json!(["body", "model"]), "missing"),
        (
            json!({"model": COLBERT}),
            json!(["body", "input"]),
            "missing",
        ),
        (
            json!({"model": COLBERT, "input": []}),
            json!(["body", "input"]),
            "too_short",
        ),
        (
            json!({"model": COLBERT, "input": "x", "input_type": "passage"}),
            json!(["body", "input_type"]),
            "literal_error",
        ),
        (
            json!({"model": COLBERT, "input": "x", "encoding_type": "int8"}),
            json!(["body", "encoding_type"]),
            "literal_error",
        ),
        (
            json!({"model": COLBERT, "input": "x", "dimensions": 0}),
            json!(["body", "dimensions"]),
            "greater_than_equal",
        ),
        (
            json!({"model": COLBERT, "input": [{"url": "https://x/y.png"}]}),
            json!(["body", "input", 0]),
            "value_error",
        ),
        (
            json!({"model": MODEL, "input": "x"}),
            json!(["body", "model"]),
            "value_error",
        ),
    ];
    for (body, loc, kind) in cases {
        let (status, resp) = server.post("/v1/multi-vector", &body);
        assert_eq!(status, 422, "{body} -> {resp}");
        let (got_loc, got_kind, _) = first_error(&resp);
        assert_eq!(
            (got_loc, got_kind.as_str()),
            (loc, kind),
            "{body} -> {resp}"
        );
    }
    let card = server.model_card(COLBERT);
    assert_eq!(card["kind"], "multi-vector");
    assert_eq!(card["dimensions"], 16);
}

/// jina-colbert-v2's layout over HTTP: each Matryoshka width the model card lists (128, 96, 64)
/// is the reference's vector cut to that prefix and re-normalized, for queries and documents.
#[test]
fn jina_colbert_v2_serves_each_matryoshka_width() {
    const V2: &str = "tiny-jina-colbert-v2";
    let dir = workspace().join("tests/fixtures/models").join(V2);
    let server = Server::start(&["--model", &format!("{V2}={}", dir.display())]);
    let path = workspace().join("tests/fixtures/jina_colbert_v2.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let prefix = |v: &[f32], d: usize| {
        let cut = &v[..d];
        let n = norm(cut) as f32;
        cut.iter().map(|x| x / n).collect::<Vec<f32>>()
    };
    for (input_type, texts, vectors) in [
        ("query", &f["queries"], &f["query_vectors"]),
        ("document", &f["documents"], &f["document_vectors"]),
    ] {
        let theirs: Vec<Vec<Vec<f32>>> = serde_json::from_value(vectors.clone()).unwrap();
        for dimensions in [128, 96, 64] {
            let body = json!({"model": V2, "input": texts, "input_type": input_type,
                "dimensions": dimensions});
            let (status, resp) = server.post("/v1/multi-vector", &body);
            assert_eq!(status, 200, "{resp}");
            let ours = token_vectors(&resp);
            assert_eq!(ours.len(), theirs.len());
            for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
                assert_eq!(a.len(), b.len(), "{input_type} {i}: token count");
                for (x, y) in a.iter().zip(b) {
                    assert_eq!(x.len(), dimensions);
                    let c = cosine(x, &prefix(y, dimensions));
                    assert!(c >= 0.9999, "{input_type} {i} at {dimensions}: {c}");
                }
            }
        }
    }
    let (status, resp) = server.post(
        "/v1/multi-vector",
        &json!({"model": V2, "input": "x", "input_type": "passage"}),
    );
    assert_eq!(status, 422, "{resp}");
    assert_eq!(first_error(&resp).0, json!(["body", "input_type"]));
    let card = server.model_card(V2);
    assert_eq!(card["dimensions"], 128);
}

//! POST /v1/rerank through the real binary, with the random-weight cross-encoder fixtures.

use embedd_blackbox::*;

const RERANKER: &str = "tiny-bert-cross-encoder";

fn start(extra: &[&str]) -> Server {
    let dir = workspace().join("tests/fixtures/models").join(RERANKER);
    let spec = format!("{RERANKER}={}", dir.display());
    let mut args = vec!["--model", MODEL, "--model", spec.as_str()];
    args.extend_from_slice(extra);
    Server::start(&args)
}

fn fixture() -> Value {
    let path = workspace().join("tests/fixtures/rerank.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

#[test]
fn scores_and_order_match_the_reference_over_http() {
    let server = start(&[]);
    let f = fixture();
    for (q, query) in f["queries"].as_array().unwrap().iter().enumerate().take(5) {
        let (status, resp) = server.post(
            "/v1/rerank",
            &json!({"model": RERANKER, "query": query, "documents": f["documents"]}),
        );
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["model"], RERANKER);
        let reference: Vec<f64> = f["models"][RERANKER]["scores"][q]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let results = resp["results"].as_array().unwrap();
        assert_eq!(results.len(), reference.len());
        let mut previous = f64::INFINITY;
        for r in results {
            let index = r["index"].as_u64().unwrap() as usize;
            let score = r["relevance_score"].as_f64().unwrap();
            assert!(
                (score - reference[index]).abs() < 1e-4,
                "query {q} doc {index}"
            );
            assert!(score <= previous, "sorted by score, highest first");
            previous = score;
            assert_eq!(r["document"]["text"], f["documents"][index]);
        }
        assert!(resp["usage"]["total_tokens"].as_u64().unwrap() > 0);
        assert_eq!(
            resp["usage"]["total_tokens"],
            resp["usage"]["prompt_tokens"]
        );
    }
}

/// jina-reranker-v2's layout (tests/fixtures/make_jina_reranker_v2_fixture.py) over HTTP: found
/// a reranker from its checkpoint alone, scores and order as the reference's.
#[test]
fn jina_reranker_v2_scores_over_http() {
    let name = "tiny-jina-reranker-v2";
    let dir = workspace().join("tests/fixtures/models").join(name);
    let server = Server::start(&["--model", &format!("{name}={}", dir.display())]);
    let path = workspace().join("tests/fixtures/rerank_v2.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (_, models) = server.get("/v1/models");
    assert_eq!(models["data"][0]["kind"], "reranker");
    for (q, query) in f["queries"].as_array().unwrap().iter().enumerate().take(3) {
        let (status, resp) = server.post(
            "/v1/rerank",
            &json!({"model": name, "query": query, "documents": f["documents"], "top_n": 5}),
        );
        assert_eq!(status, 200, "{resp}");
        let reference: Vec<f64> = f["models"][name]["scores"][q]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        let mut best: Vec<usize> = (0..reference.len()).collect();
        best.sort_by(|&a, &b| reference[b].total_cmp(&reference[a]));
        let results = resp["results"].as_array().unwrap();
        assert_eq!(results.len(), 5);
        for (r, want) in results.iter().zip(&best) {
            let index = r["index"].as_u64().unwrap() as usize;
            assert_eq!(index, *want, "query {q}");
            let score = r["relevance_score"].as_f64().unwrap();
            assert!(
                (score - reference[index]).abs() < 1e-4,
                "query {q} doc {index}"
            );
        }
    }
}

#[test]
fn top_n_return_documents_and_document_forms() {
    let server = start(&[]);
    let docs = json!(["alpha doc", {"text": "beta doc", "id": "b", "meta": {"k": 1}}, "gamma doc"]);
    let (status, all) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": {"text": "which doc"}, "documents": docs, "top_n": null}),
    );
    assert_eq!(status, 200, "{all}");
    let results = all["results"].as_array().unwrap();
    assert_eq!(results.len(), 3);
    let beta = results.iter().find(|r| r["index"] == 1).unwrap();
    assert_eq!(
        beta["document"],
        json!({"text": "beta doc", "id": "b", "meta": {"k": 1}})
    );
    let alpha = results.iter().find(|r| r["index"] == 0).unwrap();
    assert_eq!(alpha["document"], json!({"text": "alpha doc"}));

    let (_, top) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": "which doc", "documents": docs, "top_n": 2, "return_documents": false}),
    );
    let top = top["results"].as_array().unwrap();
    assert_eq!(top.len(), 2);
    assert_eq!(top[0]["index"], results[0]["index"]);
    assert_eq!(top[1]["index"], results[1]["index"]);
    assert!(top.iter().all(|r| r.get("document").is_none()));

    let (status, many) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": "q", "documents": ["x", ""], "top_n": 50}),
    );
    assert_eq!(
        status, 200,
        "an empty string is scored, a large top_n is fine: {many}"
    );
    assert_eq!(many["results"].as_array().unwrap().len(), 2);
}

#[test]
fn ties_keep_request_order() {
    let server = start(&[]);
    let (_, resp) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": "q", "documents": ["same", "other", "same", "same"]}),
    );
    let order: Vec<u64> = resp["results"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["document"]["text"] == "same")
        .map(|r| r["index"].as_u64().unwrap())
        .collect();
    assert_eq!(order, vec![0, 2, 3]);
}

#[test]
fn a_thousand_documents_are_batched_not_refused() {
    let server = start(&["--max-batch-size", "32"]);
    let docs: Vec<String> = (0..1000)
        .map(|i| format!("document {i} {}", "x ".repeat(i % 50)))
        .collect();
    let (status, resp) = server.post(
        "/v1/rerank",
        &json!({"model": RERANKER, "query": "document 7", "documents": docs, "top_n": 3}),
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(resp["results"].as_array().unwrap().len(), 3);
}

#[test]
fn rerank_errors_name_the_field() {
    let server = start(&["--max-rerank-documents", "3"]);
    let cases = [
        (
            json!({"query": "q", "documents": ["a"]}),
            json!(["body", "model"]),
            "missing",
        ),
        (
            json!({"model": RERANKER, "documents": ["a"]}),
            json!(["body", "query"]),
            "missing",
        ),
        (
            json!({"model": RERANKER, "query": "q"}),
            json!(["body", "documents"]),
            "missing",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": []}),
            json!(["body", "documents"]),
            "too_short",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": "a"}),
            json!(["body", "documents"]),
            "list_type",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": ["a", 1]}),
            json!(["body", "documents", 1]),
            "string_type",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": [{"id": "x"}]}),
            json!(["body", "documents", 0, "text"]),
            "missing",
        ),
        (
            json!({"model": RERANKER, "query": 5, "documents": ["a"]}),
            json!(["body", "query"]),
            "string_type",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": ["a"], "top_n": 0}),
            json!(["body", "top_n"]),
            "greater_than_equal",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": ["a"], "return_documents": "no"}),
            json!(["body", "return_documents"]),
            "bool_type",
        ),
        (
            json!({"model": RERANKER, "query": "q", "documents": ["a", "b", "c", "d"]}),
            json!(["body", "documents"]),
            "value_error",
        ),
        (
            json!({"model": MODEL, "query": "q", "documents": ["a"]}),
            json!(["body", "model"]),
            "value_error",
        ),
        (
            json!({"model": "nope", "query": "q", "documents": ["a"]}),
            json!(["body", "model"]),
            "value_error",
        ),
        (
            json!({"model": RERANKER, "query": "word ".repeat(300), "documents": ["a"]}),
            json!(["body", "query"]),
            "value_error",
        ),
    ];
    for (body, loc, kind) in cases {
        let (status, resp) = server.post("/v1/rerank", &body);
        assert_eq!(status, 422, "{body} -> {resp}");
        let (got_loc, got_kind, _) = first_error(&resp);
        assert_eq!(
            (got_loc, got_kind.as_str()),
            (loc, kind),
            "{body} -> {resp}"
        );
    }
    // and a reranker is not an embedding model
    let (status, resp) = server.post("/v1/embeddings", &json!({"model": RERANKER, "input": "x"}));
    assert_eq!(status, 422);
    assert!(first_error(&resp).2.contains("/v1/rerank"), "{resp}");
}

#[test]
fn a_reranker_is_detected_from_its_checkpoint() {
    let server = start(&[]);
    let card = server.model_card(RERANKER);
    assert_eq!(card["kind"], "reranker");
    assert_eq!(card["max_input_tokens"], 128);
}

//! POST /v1/embeddings through the real binary: every input form, field, encoding and error.

use base64::Engine;
use embedd_blackbox::*;

#[test]
fn vectors_match_sentence_transformers_over_http() {
    let server = Server::start(&[]);
    let path = workspace().join("tests/fixtures/all-MiniLM-L6-v2.embeddings.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let resp = server.embed(fixture["texts"].clone(), json!({"truncate": true}));
    let ours = vectors(&resp);
    let theirs: Vec<Vec<f32>> = fixture["embeddings"]
        .as_array()
        .unwrap()
        .iter()
        .map(floats)
        .collect();
    assert_eq!(ours.len(), theirs.len());
    let mut worst = 1.0f64;
    for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
        let c = cosine(a, b);
        worst = worst.min(c);
        assert!(c >= 0.9999, "input {i}: cosine {c}");
        assert!((norm(a) - 1.0).abs() < 1e-5, "input {i} is not unit length");
    }
    eprintln!("worst cosine over {} inputs: {worst:.7}", ours.len());
}

#[test]
fn every_input_form_gives_the_same_vectors_in_input_order() {
    let server = Server::start(&[]);
    let as_list = server.embed(json!(["first text", "second text"]), json!({}));
    let data = as_list["data"].as_array().unwrap();
    assert_eq!(as_list["object"], "list");
    assert_eq!(as_list["model"], MODEL);
    for (i, d) in data.iter().enumerate() {
        assert_eq!(d["object"], "embedding");
        assert_eq!(d["index"], i);
        assert_eq!(d["embedding"].as_array().unwrap().len(), 384);
    }
    let reference = vectors(&as_list);
    let forms = [
        json!([{"text": "first text"}, {"id": "x", "text": "second text"}]),
        json!([{"text": "first text"}, "second text"]),
    ];
    for form in forms {
        let v = vectors(&server.embed(form.clone(), json!({})));
        for (a, b) in v.iter().zip(&reference) {
            assert!(cosine(a, b) > 0.999999, "{form}");
        }
    }
    for single in [json!("first text"), json!({"text": "first text"})] {
        let v = vectors(&server.embed(single.clone(), json!({})));
        assert_eq!(v.len(), 1);
        assert!(cosine(&v[0], &reference[0]) > 0.999999, "{single}");
    }
    // Reversed order comes back reversed: data is in input order.
    let v = vectors(&server.embed(json!(["second text", "first text"]), json!({})));
    assert!(cosine(&v[0], &reference[1]) > 0.999999);
    assert!(cosine(&v[1], &reference[0]) > 0.999999);
}

#[test]
fn usage_counts_the_tokens_run() {
    let server = Server::start(&[]);
    // [CLS] hello world [SEP] = 4; [CLS] hi [SEP] = 3
    let resp = server.embed(json!(["hello world", "hi"]), json!({}));
    assert_eq!(
        resp["usage"],
        json!({"total_tokens": 7, "prompt_tokens": 7})
    );
}

#[test]
fn all_encodings_under_all_three_field_names() {
    let server = Server::start(&[]);
    let float = vectors(&server.embed(json!(["encode me"]), json!({})))[0].clone();
    for field in ["embedding_type", "encoding_type", "encoding_format"] {
        let resp = server.embed(json!(["encode me"]), json!({ field: "base64" }));
        let b64 = resp["data"][0]["embedding"]
            .as_str()
            .expect("base64 string");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64)
            .unwrap();
        let decoded: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(decoded, float, "{field}");

        let resp = server.embed(json!(["encode me"]), json!({ field: "ubinary" }));
        let packed: Vec<u8> = resp["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u8)
            .collect();
        assert_eq!(packed.len(), 384 / 8, "{field}");
        for (i, v) in float.iter().enumerate() {
            let bit = packed[i / 8] >> (7 - i % 8) & 1;
            assert_eq!(bit == 1, *v > 0.0, "{field} dim {i}");
        }

        let resp = server.embed(json!(["encode me"]), json!({ field: "binary" }));
        let signed: Vec<i64> = resp["data"][0]["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        let expected: Vec<i64> = packed.iter().map(|&b| b as i64 - 128).collect();
        assert_eq!(signed, expected, "{field}");
    }
    let resp = server.embed(
        json!(["encode me"]),
        json!({"embedding_type": ["float", "base64", "binary", "ubinary"]}),
    );
    let e = &resp["data"][0]["embedding"];
    for key in ["float", "base64", "binary", "ubinary"] {
        assert!(!e[key].is_null(), "{key} missing from {e}");
    }
    assert_eq!(floats(&e["float"]), float);
}

#[test]
fn normalized_and_dimensions_shape_the_vector() {
    let server = Server::start(&[]);
    let unit = vectors(&server.embed(json!(["shape me"]), json!({})))[0].clone();
    assert!((norm(&unit) - 1.0).abs() < 1e-5);
    let raw = vectors(&server.embed(json!(["shape me"]), json!({"normalized": false})))[0].clone();
    assert!(
        (norm(&raw) - 1.0).abs() > 1e-3,
        "mean pooling output is not unit length"
    );
    assert!(cosine(&raw, &unit) > 0.999999);

    let short = vectors(&server.embed(json!(["shape me"]), json!({"dimensions": 64})))[0].clone();
    assert_eq!(short.len(), 64);
    assert!((norm(&short) - 1.0).abs() < 1e-5);
    assert!(cosine(&short, &unit[..64]) > 0.999999);
    let short_raw = vectors(&server.embed(
        json!(["shape me"]),
        json!({"dimensions": 64, "normalized": false}),
    ))[0]
        .clone();
    assert_eq!(short_raw, raw[..64].to_vec());
    // LangChain.js sends dimensions: 1024 to every model: more than the model has is the whole vector.
    let whole = vectors(&server.embed(json!(["shape me"]), json!({"dimensions": 1024})))[0].clone();
    assert_eq!(whole.len(), 384);
}

#[test]
fn task_is_accepted_and_checked() {
    let server = Server::start(&[]);
    for task in [
        "retrieval.query",
        "retrieval.passage",
        "text-matching",
        "classification",
        "separation",
    ] {
        server.embed(json!(["a task"]), json!({ "task": task }));
    }
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x", "task": "summarize"}),
    );
    assert_eq!(status, 422);
    let (loc, kind, msg) = first_error(&body);
    assert_eq!(loc, json!(["body", "task"]));
    assert_eq!(kind, "literal_error");
    assert!(msg.contains("'retrieval.query'"), "{msg}");
}

#[test]
fn over_long_inputs_are_refused_unless_truncated() {
    let server = Server::start(&[]);
    let long = "token ".repeat(400);
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": ["short", long]}),
    );
    assert_eq!(status, 422, "{body}");
    let (loc, kind, msg) = first_error(&body);
    assert_eq!(loc, json!(["body", "input", 1]));
    assert_eq!(kind, "value_error");
    assert!(msg.contains("402 tokens") && msg.contains("256"), "{msg}");
    let resp = server.embed(json!(["short", long]), json!({"truncate": true}));
    assert_eq!(resp["data"].as_array().unwrap().len(), 2);
    assert_eq!(resp["usage"]["total_tokens"], 3 + 256);
}

/// `--auto-truncate`: a request that leaves out `truncate` (as LangChain, LlamaIndex and
/// Haystack send them) has over-long inputs cut; `truncate: false` still refuses them.
#[test]
fn auto_truncate_is_the_default_for_requests_without_truncate() {
    let server = Server::start(&["--auto-truncate"]);
    let long = "token ".repeat(400);
    let resp = server.embed(json!(["short", long]), json!({}));
    assert_eq!(resp["usage"]["total_tokens"], 3 + 256);
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": [long], "truncate": false}),
    );
    assert_eq!(status, 422, "{body}");
}

/// The server's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A 30 x 1 MB request with truncate: its growth stays under 512 MiB while it runs, and once the
/// server is idle again the memory goes back (RSS within twice the idle figure).
#[test]
fn megabyte_inputs_with_truncate_cost_what_the_model_keeps() {
    let server = Server::start(&[]);
    server.embed(json!(["warm up"]), json!({}));
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let idle = rss_kib(server.pid());
    let words = "The quick brown fox jumps over the lazy dog while the server batches requests. ";
    let text = words.repeat(1_000_000 / words.len());
    let input: Vec<&str> = (0..30).map(|_| text.as_str()).collect();
    let resp = server.embed(json!(input), json!({"truncate": true}));
    assert_eq!(vectors(&resp).len(), 30);
    // Every input cut to the model's 256 tokens.
    assert_eq!(resp["usage"]["total_tokens"], 30 * 256);
    let grown = rss_kib(server.pid()).saturating_sub(idle);
    eprintln!("RSS grew by {grown} KiB over {idle} KiB idle for a 30 MB request");
    assert!(
        grown < 512 * 1024,
        "RSS grew by {grown} KiB for a 30 MB request"
    );
    // The server returns freed memory once it has been idle for a second.
    std::thread::sleep(std::time::Duration::from_secs(3));
    let after = rss_kib(server.pid());
    eprintln!("RSS {after} KiB once idle again ({idle} KiB before)");
    assert!(
        after <= 2 * idle,
        "RSS {after} KiB once idle, {idle} KiB before"
    );
}

#[test]
fn late_chunking_embeds_inputs_in_context() {
    let server = Server::start(&[]);
    let texts = json!([
        "Berlin is the capital of Germany.",
        "Its population is 3.8 million."
    ]);
    let late = vectors(&server.embed(texts.clone(), json!({"late_chunking": true})));
    let plain = vectors(&server.embed(texts, json!({})));
    assert_eq!(late.len(), 2);
    assert!((norm(&late[1]) - 1.0).abs() < 1e-5);
    let c = cosine(&late[1], &plain[1]);
    assert!(c < 0.9999 && c > 0.3, "cosine {c}");
}

#[test]
fn concurrent_requests_each_get_their_own_vectors() {
    let server = Server::start(&["--max-batch-size", "4"]);
    let texts: Vec<String> = (0..24)
        .map(|i| format!("concurrent request number {i} {}", "pad ".repeat(i)))
        .collect();
    let expected = vectors(&server.embed(json!(texts), json!({})));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|t| {
                let server = &server;
                let texts = &texts;
                s.spawn(move || {
                    let mine: Vec<String> = texts.iter().skip(t).step_by(8).cloned().collect();
                    (t, vectors(&server.embed(json!(mine), json!({}))))
                })
            })
            .collect();
        for h in handles {
            let (t, got) = h.join().unwrap();
            for (k, v) in got.iter().enumerate() {
                let c = cosine(v, &expected[t + 8 * k]);
                assert!(c > 0.99999, "thread {t} item {k}: {c}");
            }
        }
    });
}

#[test]
fn invalid_bodies_get_fastapi_422s_naming_the_field() {
    let server = Server::start(&[]);
    let cases = [
        (json!({"input": "x"}), json!(["body", "model"]), "missing"),
        (json!({"model": MODEL}), json!(["body", "input"]), "missing"),
        (
            json!({"model": MODEL, "input": []}),
            json!(["body", "input"]),
            "too_short",
        ),
        (
            json!({"model": MODEL, "input": 42}),
            json!(["body", "input"]),
            "union_type",
        ),
        (
            json!({"model": MODEL, "input": ["ok", 7]}),
            json!(["body", "input", 1]),
            "string_type",
        ),
        (
            json!({"model": MODEL, "input": [{"txt": "x"}]}),
            json!(["body", "input", 0]),
            "missing",
        ),
        (
            json!({"model": 5, "input": "x"}),
            json!(["body", "model"]),
            "string_type",
        ),
        (
            json!({"model": "nope", "input": "x"}),
            json!(["body", "model"]),
            "value_error",
        ),
        (
            json!({"model": MODEL, "input": "x", "encoding_format": "int8"}),
            json!(["body", "encoding_format"]),
            "literal_error",
        ),
        (
            json!({"model": MODEL, "input": "x", "embedding_type": ["float", "x"]}),
            json!(["body", "embedding_type", 1]),
            "literal_error",
        ),
        (
            json!({"model": MODEL, "input": "x", "dimensions": 0}),
            json!(["body", "dimensions"]),
            "greater_than_equal",
        ),
        (
            json!({"model": MODEL, "input": "x", "dimensions": "64"}),
            json!(["body", "dimensions"]),
            "int_type",
        ),
        (
            json!({"model": MODEL, "input": "x", "normalized": "yes"}),
            json!(["body", "normalized"]),
            "bool_type",
        ),
        (
            json!({"model": MODEL, "input": "x", "truncate": 1}),
            json!(["body", "truncate"]),
            "bool_type",
        ),
        (
            json!({"model": MODEL, "input": [{"url": "https://example.com/cat.png"}]}),
            json!(["body", "input", 0]),
            "value_error",
        ),
        (
            json!({"model": MODEL, "input": ["data:image/png;base64,iVBORw0KGgo="]}),
            json!(["body", "input", 0]),
            "value_error",
        ),
        (
            json!(["not", "an", "object"]),
            json!(["body"]),
            "model_attributes_type",
        ),
    ];
    for (body, loc, kind) in cases {
        let (status, resp) = server.post("/v1/embeddings", &body);
        assert_eq!(status, 422, "{body} -> {resp}");
        let (got_loc, got_kind, msg) = first_error(&resp);
        assert_eq!(
            (got_loc, got_kind.as_str()),
            (loc, kind),
            "{body} -> {resp}"
        );
        assert!(!msg.is_empty());
    }
    let (status, resp) = server.post("/v1/embeddings", &json!({"model": "nope", "input": "x"}));
    assert_eq!(status, 422);
    assert!(
        first_error(&resp).2.contains(MODEL),
        "lists the served models: {resp}"
    );

    let (status, resp) = server.post_raw("/v1/embeddings", "{\"model\": ");
    assert_eq!(status, 422);
    let (loc, kind, _) = first_error(&resp);
    assert_eq!(kind, "json_invalid");
    assert_eq!(loc[0], "body");
}

#[test]
fn request_limits_are_4xx_with_a_detail() {
    let server = Server::start(&["--max-client-batch-size", "3", "--max-body-bytes", "2000"]);
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": ["a", "b", "c", "d"]}),
    );
    assert_eq!(status, 422, "{resp}");
    assert_eq!(first_error(&resp).0, json!(["body", "input"]));
    assert!(first_error(&resp).2.contains("at most 3"), "{resp}");

    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": "x".repeat(5000)}),
    );
    assert_eq!(status, 413);
    assert!(resp["detail"].as_str().unwrap().contains("2000"), "{resp}");
}

#[test]
fn task_selects_the_adapter_of_a_model_that_has_them() {
    // jina-embeddings-v3's layout (tests/fixtures/make_jina_v3_fixture.py): each task runs its
    // LoRA adapter with its instruction in front, as the reference does.
    let dir = workspace().join("tests/fixtures/models/tiny-jina-v3");
    let spec = format!("tiny-jina-v3={}", dir.display());
    let server = Server::start(&["--model", &spec]);
    let path = workspace().join("tests/fixtures/jina_v3.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let texts = fixture["texts"].clone();
    for case in fixture["cases"].as_array().unwrap() {
        let mut body = json!({"model": "tiny-jina-v3", "input": texts.clone()});
        if !case["task"].is_null() {
            body["task"] = case["task"].clone();
        }
        let (status, resp) = server.post("/v1/embeddings", &body);
        assert_eq!(status, 200, "{resp}");
        let theirs: Vec<Vec<f32>> = case["embeddings"]
            .as_array()
            .unwrap()
            .iter()
            .map(floats)
            .collect();
        for (i, (a, b)) in vectors(&resp).iter().zip(&theirs).enumerate() {
            let c = cosine(a, b);
            assert!(c >= 0.9999, "task {}, input {i}: cosine {c}", case["task"]);
        }
    }
    // Matryoshka: the leading dimensions, normalized again.
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "tiny-jina-v3", "input": ["a query"], "task": "retrieval.query",
                "dimensions": 32}),
    );
    assert_eq!(status, 200, "{resp}");
    let short = &vectors(&resp)[0];
    assert_eq!(short.len(), 32);
    assert!((norm(short) - 1.0).abs() < 1e-5);
    // Late chunking with a task: each window opens with the instruction.
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "tiny-jina-v3", "input": ["first chunk", "second chunk"],
                "task": "retrieval.passage", "late_chunking": true}),
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(vectors(&resp).len(), 2);
}

/// A decoder embedder over HTTP (jina-code-embeddings' layout, tests/fixtures/make_qwen2_fixture.py):
/// code tasks bring the model's prompts, last-token vectors match transformers, Matryoshka
/// `dimensions` and the 422s are those of every family.
#[test]
fn code_tasks_on_a_decoder_embedder() {
    let dir = workspace().join("tests/fixtures/models/tiny-qwen2-code");
    let spec = format!("code={}", dir.display());
    let server = Server::start(&["--model", &spec]);
    let path = workspace().join("tests/fixtures/qwen2_code.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let (query, passage) = (&fixture["cases"][3], &fixture["cases"][4]);
    for (task, text, case) in [
        ("nl2code.query", "sort a list in place", query),
        ("nl2code.passage", "xs.sort()", passage),
    ] {
        let (status, resp) = server.post(
            "/v1/embeddings",
            &json!({"model": "code", "input": [text], "task": task}),
        );
        assert_eq!(status, 200, "{resp}");
        assert_eq!(resp["usage"]["total_tokens"], case["tokens"]);
        let c = cosine(&vectors(&resp)[0], &floats(&case["vector"]));
        assert!(c >= 0.9999, "{task}: cosine {c}");
    }
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "code", "input": ["xs.sort()"], "task": "code2code.query",
                "dimensions": 16}),
    );
    assert_eq!(status, 200, "{resp}");
    assert_eq!(vectors(&resp)[0].len(), 16);
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "code", "input": ["x"], "task": "code2poetry.query"}),
    );
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["detail"][0]["loc"], json!(["body", "task"]));
}

/// EuroBERT (a bidirectional Llama-style encoder) over HTTP: mean-pooled vectors match
/// transformers, in one request with `dimensions` and late chunking (which mean pooling allows),
/// and the 422s are those of every family.
#[test]
fn a_eurobert_encoder_over_http() {
    let dir = workspace().join("tests/fixtures/models/tiny-eurobert");
    let server = Server::start(&["--model", &format!("euro={}", dir.display())]);
    let path = workspace().join("tests/fixtures/eurobert.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = fixture["cases"].as_array().unwrap();
    let texts: Vec<&str> = cases.iter().map(|c| c["text"].as_str().unwrap()).collect();
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "euro", "input": texts, "normalized": false}),
    );
    assert_eq!(status, 200, "{resp}");
    let tokens: u64 = cases.iter().map(|c| c["tokens"].as_u64().unwrap()).sum();
    assert_eq!(resp["usage"]["total_tokens"], tokens);
    for (got, case) in vectors(&resp).iter().zip(cases) {
        let c = cosine(got, &floats(&case["vector"]));
        assert!(c >= 0.9999, "{}: cosine {c}", case["tokens"]);
    }
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "euro", "input": ["first chunk", "second chunk"], "late_chunking": true,
                "dimensions": 16}),
    );
    assert_eq!(status, 200, "{resp}");
    assert!(vectors(&resp).iter().all(|v| v.len() == 16));
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "euro", "input": [{"url": "https://example.com/a.png"}]}),
    );
    assert_eq!(status, 422, "{resp}");
    assert_eq!(resp["detail"][0]["loc"], json!(["body", "input", 0]));
}

/// jina-embeddings-v5-text's layout over HTTP (tiny Qwen3 and EuroBERT bases, PEFT adapters
/// under `adapters/`): each task's vectors match PEFT's, concurrent requests of different tasks
/// share batches, no task is a passage, an unknown task is a 422 naming `task`.
#[test]
fn jina_embeddings_v5_tasks_over_http() {
    let spec = |name: &str| {
        let dir = workspace().join("tests/fixtures/models").join(name);
        format!("{name}={}", dir.display())
    };
    let (small, nano) = ("tiny-jina-v5-small", "tiny-jina-v5-nano");
    let server = Server::start(&["--model", &spec(small), "--model", &spec(nano)]);
    let path = workspace().join("tests/fixtures/jina_v5.json");
    let fixture: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (model, key) in [(small, "small"), (nano, "nano")] {
        let cases = fixture[key].as_array().unwrap();
        let responses: Vec<(Value, Value)> = std::thread::scope(|scope| {
            let handles: Vec<_> = cases
                .chunks(4)
                .map(|group| {
                    let server = &server;
                    scope.spawn(move || {
                        let texts: Vec<&str> =
                            group.iter().map(|c| c["text"].as_str().unwrap()).collect();
                        let body =
                            json!({"model": model, "input": texts, "task": group[0]["task"]});
                        let (status, resp) = server.post("/v1/embeddings", &body);
                        assert_eq!(status, 200, "{body} -> {resp}");
                        (body, resp)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for ((body, resp), group) in responses.iter().zip(cases.chunks(4)) {
            let got = vectors(resp);
            assert_eq!(got.len(), group.len(), "{body} -> {resp}");
            for (v, case) in got.iter().zip(group) {
                let c = cosine(v, &floats(&case["vector"]));
                assert!(c >= 0.9999, "{model} {}: cosine {c}", case["task"]);
            }
        }
        let body = |task: Option<&str>| {
            let mut b = json!({"model": model, "input": ["capital of France"], "dimensions": 32});
            if let Some(task) = task {
                b["task"] = json!(task);
            }
            b
        };
        let (status, passage) = server.post("/v1/embeddings", &body(Some("retrieval.passage")));
        assert_eq!(status, 200, "{passage}");
        let (_, default) = server.post("/v1/embeddings", &body(None));
        assert_eq!(vectors(&default), vectors(&passage));
        assert_eq!(vectors(&passage)[0].len(), 32);
        let (status, resp) = server.post("/v1/embeddings", &body(Some("nl2code.query")));
        assert_eq!(status, 422, "{resp}");
        assert_eq!(resp["detail"][0]["loc"], json!(["body", "task"]));
    }
}

/// `--max-request-tokens` bounds one request's model time: past it, a 422 naming `input`, for
/// plain and late-chunked requests alike; within it, served.
#[test]
fn the_request_token_budget_is_a_422_naming_the_input() {
    let server = Server::start(&["--max-request-tokens", "200"]);
    let texts: Vec<String> = (0..40)
        .map(|i| format!("sentence number {i} of a request over its budget"))
        .collect();
    for extra in [json!({}), json!({"late_chunking": true})] {
        let mut body = json!({"model": MODEL, "input": texts});
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let (status, resp) = server.post("/v1/embeddings", &body);
        assert_eq!(status, 422, "{resp}");
        let (loc, kind, msg) = first_error(&resp);
        assert_eq!(
            (loc, kind.as_str()),
            (json!(["body", "input"]), "value_error")
        );
        assert!(msg.contains("200"), "{msg}");
    }
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": texts[..5]}),
    );
    assert_eq!(status, 200, "{resp}");
}

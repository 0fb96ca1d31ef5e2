//! Health, listing, OpenAPI, auth, routing errors and start-up failures through the real binary.

use embedd_blackbox::*;

#[test]
fn health_routes_and_model_listing() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/"), (200, json!({})));
    let (status, health) = server.get("/health");
    assert_eq!(status, 200);
    assert_eq!(health["status"], "ok");
    assert_eq!(health["models"], json!([MODEL]));
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["object"], "list");
    let card = &models["data"][0];
    assert_eq!(card["id"], MODEL);
    assert_eq!(card["kind"], "embedding");
    assert_eq!(card["dimensions"], 384);
    assert_eq!(card["max_input_tokens"], 256);
    let (status, one) = server.get(&format!("/v1/models/{MODEL}"));
    assert_eq!(status, 200);
    assert_eq!(one["id"], MODEL);
    assert_eq!(one["owned_by"], "embedd");
    assert!(one["created"].as_i64().unwrap() > 1_700_000_000);
    assert_eq!(models["data"][0]["created"], one["created"]);
    let (status, missing) = server.get("/v1/models/no-such-model");
    assert_eq!(status, 404);
    assert!(missing["detail"]
        .as_str()
        .unwrap()
        .contains("no-such-model"));
    assert_eq!(server.get("/live"), (200, json!({"status": "live"})));
    assert_eq!(server.get("/ready"), (200, json!({"status": "ready"})));
}

/// `--cors-allow-origin`: preflights are answered on every route (before auth), responses carry
/// the allowed origin; other origins, and a server without the flag, get no CORS headers.
#[test]
fn cors_preflights_and_headers_follow_the_allowed_origins() {
    let server = Server::start(&[
        "--cors-allow-origin",
        "https://app.example",
        "--api-key",
        "k",
    ]);
    let preflight = server
        .client
        .request(reqwest::Method::OPTIONS, server.url("/v1/embeddings"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .header(
            "Access-Control-Request-Headers",
            "authorization,content-type",
        )
        .send()
        .unwrap();
    assert_eq!(preflight.status().as_u16(), 200);
    let allow = |r: &reqwest::blocking::Response, h: &str| {
        r.headers().get(h).map(|v| v.to_str().unwrap().to_string())
    };
    assert_eq!(
        allow(&preflight, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    assert!(allow(&preflight, "access-control-allow-methods").is_some());
    let call = server
        .client
        .post(server.url("/v1/embeddings"))
        .header("Origin", "https://app.example")
        .bearer_auth("k")
        .json(&json!({"model": MODEL, "input": ["hi"]}))
        .send()
        .unwrap();
    assert_eq!(call.status().as_u16(), 200);
    assert_eq!(
        allow(&call, "access-control-allow-origin").as_deref(),
        Some("https://app.example")
    );
    let other = server
        .client
        .get(server.url("/health"))
        .header("Origin", "https://evil.example")
        .send()
        .unwrap();
    assert_eq!(allow(&other, "access-control-allow-origin"), None);

    let closed = Server::start(&[]);
    let preflight = closed
        .client
        .request(reqwest::Method::OPTIONS, closed.url("/v1/embeddings"))
        .header("Origin", "https://app.example")
        .header("Access-Control-Request-Method", "POST")
        .send()
        .unwrap();
    assert_eq!(allow(&preflight, "access-control-allow-origin"), None);
}

/// /ready names a job store that does not answer (a PostgreSQL address nothing listens on
/// cannot even start the server: it fails at once, naming the flag).
#[test]
fn an_unreachable_job_store_stops_the_start_naming_the_flag() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let store = format!("postgres://embedd@127.0.0.1:{port}/embedd");
    let err = Server::try_start(&["--bulk-store", &store]).err().unwrap();
    assert!(err.contains("--bulk-store"), "{err}");
    let err = Server::try_start(&["--bulk-store", "mysql://x"])
        .err()
        .unwrap();
    assert!(err.contains("postgres://"), "{err}");
    let err = Server::try_start(&["--signing-key", "abcd"]).err().unwrap();
    assert!(err.contains("--signing-key"), "{err}");
}

#[test]
fn openapi_document_describes_the_served_routes() {
    let server = Server::start(&[]);
    let (status, doc) = server.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    for path in [
        "/v1/embeddings",
        "/v1/rerank",
        "/v1/multi-vector",
        "/v1/multi-embeddings",
    ] {
        assert!(doc["paths"][path]["post"].is_object(), "{path} missing");
    }
    assert_eq!(
        doc["paths"]["/v1/multi-embeddings"]["post"]["deprecated"],
        true
    );
    assert!(doc["paths"]["/"]["get"].is_object());
    let schemas = &doc["components"]["schemas"];
    for name in [
        "EmbedRequest",
        "EmbedResponse",
        "RerankRequest",
        "RerankResponse",
        "MultiVectorRequest",
        "MultiVectorResponse",
        "ValidationErrors",
        "Usage",
    ] {
        assert!(schemas[name].is_object(), "{name} missing");
    }
    let props = &schemas["EmbedRequest"]["properties"];
    for field in [
        "model",
        "input",
        "embedding_type",
        "task",
        "dimensions",
        "normalized",
        "truncate",
        "late_chunking",
    ] {
        assert!(props[field].is_object(), "EmbedRequest.{field} missing");
    }
}

#[test]
fn unknown_routes_and_methods_have_a_detail() {
    let server = Server::start(&[]);
    assert_eq!(
        server.get("/v2/nothing"),
        (404, json!({"detail": "Not Found"}))
    );
    let (status, body) = server.get("/v1/embeddings");
    assert_eq!(
        (status, body),
        (405, json!({"detail": "Method Not Allowed"}))
    );
}

#[test]
fn extractor_rejections_and_cut_bodies_have_a_json_detail() {
    use std::io::{Read, Write};
    let server = Server::start(&[]);
    let detail_of = |resp: reqwest::blocking::Response| -> (u16, Value) {
        let status = resp.status().as_u16();
        let is_json = resp.headers().get("content-type").is_some_and(|v| {
            v.to_str()
                .unwrap_or_default()
                .starts_with("application/json")
        });
        let body: Value = resp.json().unwrap_or(Value::Null);
        assert!(is_json && body["detail"].is_string(), "{status}: {body}");
        (status, body)
    };
    let upload = server.url("/v1/bulk-embeddings");
    let no_boundary = server
        .client
        .post(&upload)
        .header("content-type", "multipart/form-data")
        .body("x")
        .send()
        .unwrap();
    assert_eq!(detail_of(no_boundary).0, 400);
    let json_upload = server
        .client
        .post(&upload)
        .json(&json!({"file": "x"}))
        .send()
        .unwrap();
    assert!((400..500).contains(&detail_of(json_upload).0));
    for path in [
        "/v1/bulk-embeddings/%FF%FE",
        "/v1/bulk-embeddings/abc/result",
        "/v1/bulk-embeddings/abc/result?expires=999999999999999999999999&signature=x",
    ] {
        let resp = server.client.get(server.url(path)).send().unwrap();
        let (status, body) = detail_of(resp);
        assert!((400..500).contains(&status), "{path}: {status} {body}");
    }
    // A body shorter than its Content-Length, the sender done writing: 400, not 500.
    let address = server.base.trim_start_matches("http://").to_string();
    let mut stream = std::net::TcpStream::connect(address).unwrap();
    stream
        .write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\": ")
        .unwrap();
    stream.shutdown(std::net::Shutdown::Write).unwrap();
    let mut reply = String::new();
    let _ = stream.read_to_string(&mut reply);
    assert!(reply.starts_with("HTTP/1.1 400"), "{reply}");
    assert!(reply.contains("\"detail\""), "{reply}");
}

#[test]
fn api_keys_guard_the_api_but_not_health() {
    let server = Server::start(&["--api-key", "k1,k2"]);
    let body = json!({"model": MODEL, "input": "secret"});
    let send = |auth: Option<&str>| {
        let mut req = server.client.post(server.url("/v1/embeddings")).json(&body);
        if let Some(a) = auth {
            req = req.header("authorization", a);
        }
        let resp = req.send().unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().unwrap())
    };
    let (status, resp) = send(None);
    assert_eq!(status, 401);
    assert!(resp["detail"].is_string());
    assert_eq!(send(Some("Bearer wrong")).0, 401);
    assert_eq!(send(Some("k1")).0, 401, "the Bearer scheme is required");
    assert_eq!(send(Some("Bearer k1")).0, 200);
    assert_eq!(send(Some("Bearer k2")).0, 200);
    assert_eq!(server.get("/").0, 200);
    assert_eq!(server.get("/health").0, 200);
    assert_eq!(server.get("/v1/models").0, 401);
}

#[test]
fn an_open_server_ignores_whatever_key_clients_send() {
    let server = Server::start(&[]);
    let resp = server
        .client
        .post(server.url("/v1/embeddings"))
        .header("authorization", "Bearer None")
        .header("accept-encoding", "identity")
        .json(&json!({"model": MODEL, "input": "x", "user": "someone"}))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
}

#[test]
fn start_up_failures_name_the_model_and_file() {
    let err = Server::try_start(&["--model", "ghost=/definitely/not/here"])
        .err()
        .unwrap();
    assert!(
        err.contains("ghost") && err.contains("/definitely/not/here"),
        "{err}"
    );

    let dir = std::env::temp_dir().join(format!("embedd-broken-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::copy(
        weights_dir().join(MODEL).join("config.json"),
        dir.join("config.json"),
    )
    .unwrap();
    let spec = format!("broken={}", dir.display());
    let err = Server::try_start(&["--model", &spec]).err().unwrap();
    assert!(err.contains("tokenizer.json"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();

    let err = Server::try_start(&["--model", "not-in-catalog"])
        .err()
        .unwrap();
    assert!(err.contains("not in the catalog"), "{err}");

    let err = Server::try_start(&["--device", "cuda:0"]).err().unwrap();
    assert!(err.contains("CUDA"), "{err}");
}

#[test]
fn bf16_serves_vectors_close_to_f32_or_refuses_to_start() {
    let err = Server::try_start(&["--dtype", "fp8"]).err().unwrap();
    assert!(err.contains("unknown dtype 'fp8'"), "{err}");

    let cpu_has_bf16 = std::fs::read_to_string("/proc/cpuinfo")
        .map(|c| c.contains("avx512_bf16"))
        .unwrap_or(false);
    if !cpu_has_bf16 {
        let err = Server::try_start(&["--dtype", "bf16"]).err().unwrap();
        assert!(err.contains("AVX-512 BF16"), "{err}");
        return;
    }
    let texts = json!([
        "a cat sat on the mat",
        "quarterly revenue grew by four percent"
    ]);
    let exact = vectors(&Server::start(&[]).embed(texts.clone(), json!({})));
    let reduced = vectors(&Server::start(&["--dtype", "bf16"]).embed(texts, json!({})));
    for (a, b) in exact.iter().zip(&reduced) {
        let c = cosine(a, b);
        assert!((0.999..1.0).contains(&c), "cosine {c}");
    }
}

#[test]
fn several_models_in_one_server() {
    let dir = weights_dir().join(MODEL);
    let second = format!("minilm-copy={}", dir.display());
    let server = Server::start(&["--model", MODEL, "--model", &second]);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    assert_eq!(models["data"].as_array().unwrap().len(), 2);
    let a = vectors(&server.embed(json!(["same text"]), json!({})));
    let (status, b) = server.post(
        "/v1/embeddings",
        &json!({"model": "minilm-copy", "input": ["same text"]}),
    );
    assert_eq!(status, 200);
    assert_eq!(b["model"], "minilm-copy");
    assert!(cosine(&a[0], &vectors(&b)[0]) > 0.999999);
}

#[test]
fn sigterm_finishes_the_request_in_flight_then_exits_cleanly() {
    let mut server = Server::start(&["--max-batch-size", "8"]);
    let texts: Vec<String> = (0..600)
        .map(|i| format!("a request still running when the signal comes, number {i}"))
        .collect();
    let (status, body) = std::thread::scope(|s| {
        let request =
            s.spawn(|| server.post("/v1/embeddings", &json!({"model": MODEL, "input": texts})));
        std::thread::sleep(std::time::Duration::from_millis(300));
        std::process::Command::new("kill")
            .args(["-TERM", &server.pid().to_string()])
            .status()
            .unwrap();
        request.join().unwrap()
    });
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["data"].as_array().unwrap().len(), 600);
    assert_eq!(
        server.wait_exit(std::time::Duration::from_secs(30)),
        Some(0)
    );
}

#[test]
fn metrics_report_traffic_queues_and_models() {
    let server = Server::start(&[]);
    server.embed(json!(["count these tokens"]), json!({}));
    let (status, _) = server.post("/v1/embeddings", &json!({"model": "nope", "input": "x"}));
    assert_eq!(status, 422);
    let resp = server.client.get(server.url("/metrics")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/plain"));
    let text = resp.text().unwrap();
    for needle in [
        r#"embedd_requests_total{route="/v1/embeddings",status="200"} 1"#,
        r#"embedd_requests_total{route="/v1/embeddings",status="422"} 1"#,
        r#"embedd_request_duration_seconds_bucket{route="/v1/embeddings""#,
        r#"embedd_tokens_total{model="all-MiniLM-L6-v2",route="/v1/embeddings"} 6"#,
        r#"embedd_queue_depth{model="all-MiniLM-L6-v2"} 0"#,
        r#"embedd_batch_size_bucket{model="all-MiniLM-L6-v2""#,
        r#"embedd_batch_tokens_count{model="all-MiniLM-L6-v2"} 1"#,
        r#"embedd_bulk_jobs{status="waiting"} 0"#,
        r#"embedd_model_load_seconds{model="all-MiniLM-L6-v2"}"#,
    ] {
        assert!(text.contains(needle), "missing {needle} in:\n{text}");
    }
}

#[test]
fn the_docs_page_renders_the_openapi_document_offline() {
    let server = Server::start(&[]);
    let resp = server.client.get(server.url("/docs")).send().unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    assert!(resp.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    let html = resp.text().unwrap();
    assert!(html.contains("openapi.json"));
    // Nothing is loaded from another host: no absolute URLs in src/href attributes.
    for attr in [
        "src=\"http",
        "href=\"http",
        "src='http",
        "href='http",
        "@import",
    ] {
        assert!(!html.contains(attr), "the page must work offline: {attr}");
    }
}

#[test]
fn the_healthcheck_subcommand_probes_the_server() {
    let server = Server::start(&[]);
    let port = server.base.rsplit(':').next().unwrap().to_string();
    let ok = std::process::Command::new(binary())
        .arg("healthcheck")
        .env("EMBEDD_PORT", &port)
        .status()
        .unwrap();
    assert!(ok.success());
    drop(server);
    let down = std::process::Command::new(binary())
        .arg("healthcheck")
        .env("EMBEDD_PORT", &port)
        .status()
        .unwrap();
    assert!(!down.success());
}

/// `embedd pull NAME...`: a catalog model whose weights are local is confirmed complete, an
/// unknown name and a hub model missing from an offline cache each fail, naming themselves;
/// every name is tried.
#[test]
fn pull_fetches_or_names_what_it_cannot() {
    let hf_home = temp_dir("embedd-pull-hf");
    let out = std::process::Command::new(binary())
        .args(["pull", MODEL, "no-such-model", "jina-code-embeddings-0.5b"])
        .env("EMBEDD_WEIGHTS_DIR", weights_dir())
        .env("HF_HOME", &hf_home)
        .env("HF_HUB_OFFLINE", "1")
        .env_remove("EMBEDD_MODELS_FILE")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(stdout.contains(&format!("{MODEL}: ready")), "{stdout}");
    assert!(
        stderr.contains("no-such-model: ") && stderr.contains("not in the catalog"),
        "{stderr}"
    );
    assert!(
        stderr.contains("jina-code-embeddings-0.5b: ") && stderr.contains("config.json"),
        "{stderr}"
    );
    assert!(stderr.contains("could not pull: no-such-model, jina-code-embeddings-0.5b"));
    let ok = std::process::Command::new(binary())
        .args(["pull", MODEL])
        .env("EMBEDD_WEIGHTS_DIR", weights_dir())
        .output()
        .unwrap();
    assert!(ok.status.success());
    let _ = std::fs::remove_dir_all(hf_home);
}

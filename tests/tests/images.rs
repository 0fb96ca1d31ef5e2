//! Image inputs on /v1/embeddings through the real binary: the random-weight CLIP fixture
//! checked against transformers' vectors for every input form (URL, data URI, `{bytes}`,
//! `{image}`) mixed with text, and the fetcher's limits against a local HTTP server (redirects,
//! a slow response, an oversized one, a missing one, private addresses refused by default).

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::time::Duration;

use base64::Engine;
use embedd_blackbox::*;

fn fixture() -> Value {
    let path = workspace().join("tests/fixtures/clip.json");
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(workspace().join("tests/fixtures/images").join(name)).unwrap()
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

fn start(extra: &[&str]) -> Server {
    let dir = workspace().join("tests/fixtures/models/tiny-clip");
    let spec = format!("clip={}", dir.display());
    let mut args = vec!["--model", MODEL, "--model", &spec];
    args.extend_from_slice(extra);
    Server::start(&args)
}

/// Serves the fixture photos and a few misbehaving routes on 127.0.0.1 until the test ends.
fn image_host() -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming().take(200) {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut line = String::new();
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                if reader.read_line(&mut line).is_err() {
                    return;
                }
                loop {
                    let mut header = String::new();
                    if reader.read_line(&mut header).map_or(true, |n| n == 0) || header == "\r\n" {
                        break;
                    }
                }
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let send = |stream: &mut std::net::TcpStream,
                            status: &str,
                            headers: &str,
                            body: &[u8]| {
                    let head = format!(
                        "HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n{headers}\r\n",
                        body.len()
                    );
                    let _ = stream.write_all(head.as_bytes());
                    let _ = stream.write_all(body);
                };
                match path.as_str() {
                    "/chelsea.jpg" => send(
                        &mut stream,
                        "200 OK",
                        "content-type: image/jpeg\r\n",
                        &image("chelsea.jpg"),
                    ),
                    "/redirect" => {
                        send(&mut stream, "302 Found", "location: /chelsea.jpg\r\n", b"")
                    }
                    "/loop" => send(&mut stream, "302 Found", "location: /loop\r\n", b""),
                    "/slow" => {
                        std::thread::sleep(Duration::from_secs(4));
                        send(&mut stream, "200 OK", "", &image("chelsea.jpg"));
                    }
                    "/big" => send(&mut stream, "200 OK", "", &vec![0u8; 300_000]),
                    "/text" => send(
                        &mut stream,
                        "200 OK",
                        "content-type: text/plain\r\n",
                        b"hello",
                    ),
                    _ => send(&mut stream, "404 Not Found", "", b"no"),
                }
            });
        }
    });
    base
}

#[test]
fn every_image_form_mixed_with_text_matches_the_reference() {
    let f = fixture();
    let host = image_host();
    let server = start(&["--allow-private-image-urls"]);
    let reference = |file: &str| -> Vec<f32> {
        let case = f["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["file"] == file)
            .unwrap();
        floats(&case["vector"])
    };
    let text = &f["texts"][0];
    let input = json!([
        text["text"],
        {"url": format!("{host}/redirect")},
        format!("data:image/webp;base64,{}", b64(&image("coffee.webp"))),
        {"bytes": b64(&image("logo.png"))},
        {"image": b64(&image("camera.png"))},
        {"image": format!("{host}/chelsea.jpg")},
    ]);
    let (status, resp) = server.post("/v1/embeddings", &json!({"model": "clip", "input": input}));
    assert_eq!(status, 200, "{resp}");
    let got = vectors(&resp);
    assert_eq!(got.len(), 6);
    assert!(cosine(&got[0], &floats(&text["vector"])) >= 0.9999);
    for (i, file) in [
        (1, "chelsea.jpg"),
        (2, "coffee.webp"),
        (3, "logo.png"),
        (4, "camera.png"),
        (5, "chelsea.jpg"),
    ] {
        let c = cosine(&got[i], &reference(file));
        assert!(c >= 0.999, "input {i} ({file}): cosine {c}");
        assert!((norm(&got[i]) - 1.0).abs() < 1e-4);
    }
    // Text tokens plus 50 tokens (7 x 7 patches and the class token) per image.
    let text_tokens = text["tokens"].as_u64().unwrap();
    assert_eq!(
        resp["usage"]["total_tokens"],
        text_tokens + 5 * 50,
        "{resp}"
    );

    // Matryoshka truncation and the other output formats apply to image vectors too.
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "clip", "input": [{"bytes": b64(&image("logo.png"))}],
                "dimensions": 8, "embedding_type": ["float", "base64"]}),
    );
    assert_eq!(status, 200, "{resp}");
    let short = floats(&resp["data"][0]["embedding"]["float"]);
    assert_eq!(short.len(), 8);
    assert!((norm(&short) - 1.0).abs() < 1e-4);
}

/// jina-clip-v2's layout: `{text}` and `{image}` documents in one request, the text with its
/// task's instruction in front, Matryoshka `dimensions` for both, against the plain-torch
/// reference; a task its text tower has no instruction for is a 422 naming `task`.
#[test]
fn jina_clip_serves_text_with_its_task_and_images_in_one_request() {
    let path = workspace().join("tests/fixtures/jina_clip.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = workspace().join("tests/fixtures/models/tiny-jina-clip-v2");
    let spec = format!("jina-clip-v2={}", dir.display());
    let server = Server::start(&["--model", &spec]);
    let query = f["text_cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["task"] == "retrieval.query")
        .unwrap();
    let photo = f["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == "rocket.jpg")
        .unwrap();
    let input = json!([
        {"text": f["texts"][0]},
        {"image": b64(&image("rocket.jpg"))},
    ]);
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "jina-clip-v2", "input": input, "task": "retrieval.query"}),
    );
    assert_eq!(status, 200, "{resp}");
    let got = vectors(&resp);
    let c = cosine(&got[0], &floats(&query["embeddings"][0]));
    assert!(c >= 0.9999, "text: cosine {c}");
    let c = cosine(&got[1], &floats(&photo["vector"]));
    assert!(c >= 0.999, "image: cosine {c}");
    let tokens =
        query["token_counts"][0].as_u64().unwrap() + f["tokens_per_image"].as_u64().unwrap();
    assert_eq!(resp["usage"]["total_tokens"], tokens, "{resp}");

    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "jina-clip-v2", "input": input, "task": "retrieval.query",
                "dimensions": 16}),
    );
    assert_eq!(status, 200, "{resp}");
    for (short, full) in vectors(&resp).iter().zip(&got) {
        assert_eq!(short.len(), 16);
        assert!((norm(short) - 1.0).abs() < 1e-4);
        assert!(cosine(short, &full[..16]) > 0.9999);
    }

    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "jina-clip-v2", "input": ["a"], "task": "retrieval.passage"}),
    );
    assert_eq!(status, 422, "{resp}");
    assert!(resp.to_string().contains("task"), "{resp}");
}

/// jina-clip-v1's layout (JinaBERT text tower in the flash layout, EVA02 in 16-pixel patches): a
/// plain string and an image data URI in one request against the plain-torch reference.
#[test]
fn jina_clip_v1_serves_text_and_images_in_one_request() {
    let path = workspace().join("tests/fixtures/jina_clip_v1.json");
    let f: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let dir = workspace().join("tests/fixtures/models/tiny-jina-clip-v1");
    let server = Server::start(&["--model", &format!("jina-clip-v1={}", dir.display())]);
    let text = &f["text_cases"][0];
    let photo = f["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == "chelsea.jpg")
        .unwrap();
    let input = json!([
        f["texts"][3],
        format!("data:image/jpeg;base64,{}", b64(&image("chelsea.jpg"))),
    ]);
    let (status, resp) = server.post(
        "/v1/embeddings",
        &json!({"model": "jina-clip-v1", "input": input}),
    );
    assert_eq!(status, 200, "{resp}");
    let got = vectors(&resp);
    assert_eq!(got[0].len(), 48);
    let c = cosine(&got[0], &floats(&text["embeddings"][3]));
    assert!(c >= 0.9999, "text: cosine {c}");
    let c = cosine(&got[1], &floats(&photo["vector"]));
    assert!(c >= 0.999, "image: cosine {c}");
    let tokens =
        text["token_counts"][3].as_u64().unwrap() + f["tokens_per_image"].as_u64().unwrap();
    assert_eq!(resp["usage"]["total_tokens"], tokens, "{resp}");
}

#[test]
fn bad_images_and_failed_fetches_are_422s_naming_the_input() {
    let host = image_host();
    let server = start(&[
        "--allow-private-image-urls",
        "--image-fetch-timeout-secs",
        "1",
        "--max-image-bytes",
        "200000",
        "--max-image-pixels",
        "100000",
    ]);
    let cases = [
        (
            json!({"url": format!("{host}/missing.png")}),
            "HTTP status 404",
        ),
        (json!({"url": format!("{host}/slow")}), "longer than 1 s"),
        (
            json!({"url": format!("{host}/big")}),
            "larger than the limit",
        ),
        (json!({"url": format!("{host}/loop")}), "redirect"),
        (
            json!({"url": format!("{host}/text")}),
            "not in a supported format",
        ),
        (
            json!({"url": "ftp://example.com/x.png"}),
            "only http and https",
        ),
        (json!({"bytes": "not base64 at all!"}), "base64"),
        (
            json!({"bytes": b64(&image("logo.png")[..2000])}),
            "cannot be decoded",
        ),
        // A header claiming 25,120 x 29,813 pixels: refused before any pixel is decoded.
        (
            json!({"bytes": b64(b"GIF89a but not really")}),
            "more than the limit",
        ),
        // chelsea.jpg has 451 x 300 pixels, over the 100,000-pixel budget.
        (
            json!({"bytes": b64(&image("chelsea.jpg"))}),
            "more than the limit",
        ),
    ];
    for (input, want) in cases {
        let (status, body) = server.post(
            "/v1/embeddings",
            &json!({"model": "clip", "input": ["a cat", input.clone()]}),
        );
        assert_eq!(status, 422, "{input}: {body}");
        let (loc, _, msg) = first_error(&body);
        assert_eq!(loc, json!(["body", "input", 1]), "{input}: {body}");
        assert!(msg.contains(want), "{input}: {msg}");
    }
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": "clip", "input": ["a cat", {"bytes": b64(&image("logo.png"))}], "late_chunking": true}),
    );
    assert_eq!(status, 422, "{body}");
    // CLIP's text vector is one token's: late chunking has nothing to pool.
    assert_eq!(first_error(&body).0, json!(["body", "late_chunking"]));
    // A text model still refuses images.
    let (status, body) = server.post(
        "/v1/embeddings",
        &json!({"model": MODEL, "input": [{"bytes": b64(&image("logo.png"))}]}),
    );
    assert_eq!(status, 422, "{body}");
}

#[test]
fn private_addresses_are_refused_unless_allowed() {
    let host = image_host();
    let server = start(&[]);
    for url in [
        format!("{host}/chelsea.jpg"),
        "http://169.254.169.254/latest/meta-data/".to_string(),
        "http://localhost:1/x.png".to_string(),
    ] {
        let (status, body) = server.post(
            "/v1/embeddings",
            &json!({"model": "clip", "input": [{"url": url}]}),
        );
        assert_eq!(status, 422, "{url}: {body}");
        let (loc, _, msg) = first_error(&body);
        assert_eq!(loc, json!(["body", "input", 0]));
        assert!(msg.contains("private"), "{url}: {msg}");
    }
}

//! The OpenAI Batch API through the real binary: a JSONL file uploaded to /v1/files, a batch
//! over it, its output and error files matched by custom_id and equal to live calls; refused
//! inputs, ownership, cancelling, listing.

use std::time::{Duration, Instant};

use embedd_blackbox::*;
use reqwest::blocking::multipart::{Form, Part};

fn upload_file(server: &Server, bytes: Vec<u8>, purpose: &str, key: Option<&str>) -> (u16, Value) {
    let form = Form::new()
        .part("file", Part::bytes(bytes).file_name("requests.jsonl"))
        .text("purpose", purpose.to_string());
    let mut req = server.client.post(server.url("/v1/files")).multipart(form);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

fn request_line(custom_id: &str, body: Value) -> String {
    json!({"custom_id": custom_id, "method": "POST", "url": "/v1/embeddings", "body": body})
        .to_string()
}

fn jsonl(lines: &[String]) -> Vec<u8> {
    (lines.join("\n") + "\n").into_bytes()
}

fn create_batch(server: &Server, file_id: &str) -> (u16, Value) {
    server.post(
        "/v1/batches",
        &json!({"input_file_id": file_id, "endpoint": "/v1/embeddings",
                "completion_window": "24h", "metadata": {"run": "test"}}),
    )
}

fn poll(server: &Server, id: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let (status, batch) = server.get(&format!("/v1/batches/{id}"));
        assert_eq!(status, 200, "{batch}");
        if !["validating", "in_progress", "finalizing", "cancelling"]
            .contains(&batch["status"].as_str().unwrap())
        {
            return batch;
        }
        assert!(Instant::now() < deadline, "batch did not finish: {batch}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn content_lines(server: &Server, file_id: &str) -> Vec<Value> {
    let resp = server
        .client
        .get(server.url(&format!("/v1/files/{file_id}/content")))
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 200);
    resp.text()
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn a_batch_answers_every_line_as_the_live_route_does() {
    let server = Server::start(&["--bulk-chunk-rows", "4"]);
    let texts: Vec<String> = (0..10)
        .map(|i| format!("batch sentence number {i}"))
        .collect();
    let mut lines: Vec<String> = texts
        .iter()
        .enumerate()
        .map(|(i, t)| request_line(&format!("req-{i}"), json!({"model": MODEL, "input": t})))
        .collect();
    // A line the route refuses (an input that is neither text nor image) fails alone.
    lines.insert(
        3,
        request_line("bad", json!({"model": MODEL, "input": 12345})),
    );
    let (status, file) = upload_file(&server, jsonl(&lines), "batch", None);
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    let (status, meta) = server.get(&format!("/v1/files/{}", file["id"].as_str().unwrap()));
    assert_eq!((status, &meta["bytes"]), (200, &file["bytes"]));

    let (status, batch) = create_batch(&server, file["id"].as_str().unwrap());
    assert_eq!(status, 200, "{batch}");
    assert_eq!(batch["object"], "batch");
    assert_eq!(batch["status"], "in_progress");
    assert_eq!(batch["request_counts"]["total"], 11);
    assert_eq!(batch["metadata"]["run"], "test");
    let id = batch["id"].as_str().unwrap().to_string();

    let done = poll(&server, &id);
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": 11, "completed": 10, "failed": 1})
    );
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());

    let outputs = content_lines(&server, done["output_file_id"].as_str().unwrap());
    let ids: Vec<&str> = outputs
        .iter()
        .map(|l| l["custom_id"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..10).map(|i| format!("req-{i}")).collect();
    assert_eq!(ids, expected);
    let live = vectors(&server.embed(json!(texts), json!({})));
    for (line, want) in outputs.iter().zip(&live) {
        assert_eq!(line["response"]["status_code"], 200);
        assert!(line["error"].is_null());
        let got: Vec<f32> =
            serde_json::from_value(line["response"]["body"]["data"][0]["embedding"].clone())
                .unwrap();
        assert!(cosine(&got, want) > 0.99999, "{}", line["custom_id"]);
    }
    let errors = content_lines(&server, done["error_file_id"].as_str().unwrap());
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0]["custom_id"], "bad");
    assert_eq!(errors[0]["response"]["status_code"], 422);
    assert!(errors[0]["response"]["body"]["detail"].is_array());

    let (status, output_meta) = server.get(&format!(
        "/v1/files/{}",
        done["output_file_id"].as_str().unwrap()
    ));
    assert_eq!(status, 200);
    assert_eq!(output_meta["purpose"], "batch_output");
    assert!(output_meta["bytes"].as_u64().unwrap() > 1000);

    let (status, files) = server.get("/v1/files");
    assert_eq!(status, 200);
    assert_eq!(files["object"], "list");
    assert_eq!(files["data"][0]["id"], file["id"]);
    let (status, _) = server.get("/v1/files?limit=0");
    assert_eq!(status, 422);
    let (status, list) = server.get("/v1/batches?limit=1");
    assert_eq!(status, 200);
    assert_eq!(list["object"], "list");
    assert_eq!(list["data"][0]["id"], id.as_str());
}

#[test]
fn refused_inputs_and_other_keys_get_clear_answers() {
    let server = Server::start(&["--api-key", "key-a", "--api-key", "key-b"]);
    let good = jsonl(&[request_line("a", json!({"model": MODEL, "input": "hi"}))]);
    let (status, body) = upload_file(&server, good.clone(), "fine-tune", Some("key-a"));
    assert_eq!(status, 422, "{body}");
    assert_eq!(body["detail"][0]["loc"], json!(["body", "purpose"]));
    let (status, file) = upload_file(&server, good, "batch", Some("key-a"));
    assert_eq!(status, 200);
    let file_id = file["id"].as_str().unwrap();

    let as_key = |key: &str, path: &str, body: Value| {
        let resp = server
            .client
            .post(server.url(path))
            .bearer_auth(key)
            .json(&body)
            .send()
            .unwrap();
        (
            resp.status().as_u16(),
            resp.json::<Value>().unwrap_or(Value::Null),
        )
    };
    let request = |endpoint: &str, window: &str, file: &str| json!({"input_file_id": file, "endpoint": endpoint, "completion_window": window});
    let (status, body) = as_key(
        "key-a",
        "/v1/batches",
        request("/v1/chat/completions", "24h", file_id),
    );
    assert_eq!(
        (status, &body["detail"][0]["loc"]),
        (422, &json!(["body", "endpoint"]))
    );
    let (status, body) = as_key(
        "key-a",
        "/v1/batches",
        request("/v1/embeddings", "1h", file_id),
    );
    assert_eq!(
        (status, &body["detail"][0]["loc"]),
        (422, &json!(["body", "completion_window"]))
    );
    let (status, _) = as_key(
        "key-b",
        "/v1/batches",
        request("/v1/embeddings", "24h", file_id),
    );
    assert_eq!(status, 404, "another key's file");
    let (status, batch) = as_key(
        "key-a",
        "/v1/batches",
        request("/v1/embeddings", "24h", file_id),
    );
    assert_eq!(status, 200, "{batch}");
    let id = batch["id"].as_str().unwrap();
    let get_as = |key: &str, path: &str| {
        let resp = server
            .client
            .get(server.url(path))
            .bearer_auth(key)
            .send()
            .unwrap();
        resp.status().as_u16()
    };
    assert_eq!(get_as("key-b", &format!("/v1/batches/{id}")), 404);
    assert_eq!(get_as("key-a", &format!("/v1/batches/{id}")), 200);
    assert_eq!(get_as("key-b", &format!("/v1/files/{file_id}")), 404);

    // Bad lines: the batch exists, failed, with one error per line.
    let bad = jsonl(&[
        "not json".into(),
        request_line("x", json!({"model": "no-such-model", "input": "hi"})),
    ]);
    let (_, bad_file) = upload_file(&server, bad, "batch", Some("key-a"));
    let (status, failed) = as_key(
        "key-a",
        "/v1/batches",
        request("/v1/embeddings", "24h", bad_file["id"].as_str().unwrap()),
    );
    assert_eq!(status, 200, "{failed}");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["data"][0]["code"], "invalid_json_line");
    assert_eq!(failed["errors"]["data"][0]["line"], 1);
    let (_, unknown) = upload_file(
        &server,
        jsonl(&[request_line(
            "x",
            json!({"model": "no-such-model", "input": "hi"}),
        )]),
        "batch",
        Some("key-a"),
    );
    let (_, failed) = as_key(
        "key-a",
        "/v1/batches",
        request("/v1/embeddings", "24h", unknown["id"].as_str().unwrap()),
    );
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["errors"]["data"][0]["code"], "model_not_found");
}

#[test]
fn a_cancelled_batch_stops_and_keeps_what_it_answered() {
    // Chunks of one request, run one at a time: the batch is still running when cancelled.
    let server = Server::start(&["--bulk-chunk-rows", "1"]);
    let long = "many words in a long input ".repeat(40);
    let lines: Vec<String> = (0..400)
        .map(|i| request_line(&format!("r{i}"), json!({"model": MODEL, "input": long})))
        .collect();
    let (_, file) = upload_file(&server, jsonl(&lines), "batch", None);
    let (_, batch) = create_batch(&server, file["id"].as_str().unwrap());
    let id = batch["id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    while server.get(&format!("/v1/batches/{id}")).1["request_counts"]["completed"] == 0 {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    let (status, cancelled) = server.post(&format!("/v1/batches/{id}/cancel"), &json!({}));
    assert_eq!(status, 200, "{cancelled}");
    assert_eq!(cancelled["status"], "cancelled");
    assert!(cancelled["cancelled_at"].is_i64());
    std::thread::sleep(Duration::from_millis(500));
    let after = server.get(&format!("/v1/batches/{id}")).1;
    let completed = after["request_counts"]["completed"].as_u64().unwrap();
    assert!(completed > 0 && completed < 400, "{after}");
    let outputs = content_lines(&server, after["output_file_id"].as_str().unwrap());
    assert_eq!(outputs.len() as u64, completed);
    std::thread::sleep(Duration::from_millis(500));
    let later = server.get(&format!("/v1/batches/{id}")).1;
    assert_eq!(
        later["request_counts"], after["request_counts"],
        "nothing runs after a cancel"
    );
}

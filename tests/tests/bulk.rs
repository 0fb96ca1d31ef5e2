//! Bulk embeddings through the real binary: upload, poll, download, compare with /v1/embeddings;
//! a kill -9 mid-job and a restart; malformed uploads; ownership; signed links.

use std::time::{Duration, Instant};

use embedd_blackbox::*;
use reqwest::blocking::multipart::{Form, Part};

fn upload(
    server: &Server,
    csv: &[u8],
    model: &str,
    email: Option<&str>,
    key: Option<&str>,
) -> (u16, Value) {
    let mut form = Form::new()
        .part("file", Part::bytes(csv.to_vec()).file_name("input.csv"))
        .text("model", model.to_string());
    if let Some(e) = email {
        form = form.text("email", e.to_string());
    }
    let mut req = server
        .client
        .post(server.url("/v1/bulk-embeddings"))
        .multipart(form);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().unwrap_or(Value::Null))
}

/// Sends only the headers of a POST declaring `length` body bytes; returns the raw response.
fn declared_only_response(server: &Server, path: &str, length: u64) -> String {
    use std::io::{Read, Write};
    let addr = server.base.trim_start_matches("http://");
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: multipart/form-data; boundary=x\r\n\
         Content-Length: {length}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    let _ = stream.read_to_string(&mut response);
    response
}

fn poll_until_done(server: &Server, id: &str, timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let (status, job) = server.get(&format!("/v1/bulk-embeddings/{id}"));
        assert_eq!(status, 200, "{job}");
        if job["status"] == "completed" || job["status"] == "failed" {
            return job;
        }
        assert!(Instant::now() < deadline, "job did not finish: {job}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The result CSV as (text, vector) rows.
fn download(server: &Server, id: &str) -> Vec<(String, Vec<f32>)> {
    let (status, link) = server.post(
        &format!("/v1/bulk-embeddings/{id}/download-result"),
        &json!({}),
    );
    assert_eq!(status, 200, "{link}");
    assert_eq!(link["id"], id);
    let url = link["download_url"].as_str().unwrap();
    let body = reqwest::blocking::get(url).unwrap();
    assert_eq!(body.status().as_u16(), 200);
    let text = body.text().unwrap();
    let mut reader = csv::Reader::from_reader(text.as_bytes());
    assert_eq!(reader.headers().unwrap(), vec!["text", "embedding"]);
    reader
        .records()
        .map(|r| {
            let r = r.unwrap();
            (r[0].to_string(), serde_json::from_str(&r[1]).unwrap())
        })
        .collect()
}

fn rows_csv(n: usize) -> (Vec<String>, Vec<u8>) {
    let texts: Vec<String> = (0..n)
        .map(|i| match i % 4 {
            0 => format!("row {i}, with a comma"),
            1 => format!("row {i}\nspanning lines"),
            2 => format!("row {i} \"quoted\" words"),
            _ => format!("plain row number {i}"),
        })
        .collect();
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["text"]).unwrap();
    for t in &texts {
        writer.write_record([t]).unwrap();
    }
    (texts, writer.into_inner().unwrap())
}

#[test]
fn upload_poll_download_and_compare_with_live_embeddings() {
    let server = Server::start(&["--bulk-chunk-rows", "7"]);
    let (texts, csv) = rows_csv(40);
    let long = "word ".repeat(400);
    let mut csv = csv;
    csv.extend_from_slice(format!("{long}\n").as_bytes());
    let (status, job) = upload(&server, &csv, MODEL, Some("someone@example.com"), None);
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["status"], "waiting");
    assert_eq!(job["model_name"], MODEL);
    assert_eq!(job["file_name"], "input.csv");
    assert_eq!(job["user_id"], "anonymous");
    assert_eq!(job["user_email"], "someone@example.com");
    assert_eq!(job["total_rows"], 41);
    assert!(job["created_at"].as_str().unwrap().contains('T'));
    let id = job["_id"].as_str().unwrap().to_string();

    let done = poll_until_done(&server, &id, Duration::from_secs(120));
    assert_eq!(done["status"], "completed", "{done}");
    assert!(done["completed_at"].is_string());
    assert_eq!(done["processed_rows"], 41);
    assert_eq!(
        done["truncated_rows"], 1,
        "the over-long row is cut and counted"
    );
    assert!(done["used_token_count"].as_u64().unwrap() > 40 * 5);

    let rows = download(&server, &id);
    let mut all = texts.clone();
    all.push(long);
    assert_eq!(
        rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(),
        all,
        "every row once, in order"
    );
    let live = vectors(&server.embed(json!(all), json!({"truncate": true})));
    for (i, ((_, v), l)) in rows.iter().zip(&live).enumerate() {
        assert!(cosine(v, l) > 0.99999, "row {i}");
    }
}

#[test]
fn a_job_killed_mid_way_resumes_with_every_row_once() {
    let data = temp_dir("embedd-bulk-kill");
    let args = ["--bulk-chunk-rows", "16"];
    let (texts, csv) = rows_csv(1200);
    let mut server = Server::start_with_data(&data, &args);
    let (status, job) = upload(&server, &csv, MODEL, None, None);
    assert_eq!(status, 200, "{job}");
    let id = job["_id"].as_str().unwrap().to_string();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (_, job) = server.get(&format!("/v1/bulk-embeddings/{id}"));
        let done = job["processed_rows"].as_u64().unwrap();
        if done > 0 && job["status"] == "in-progress" {
            break;
        }
        assert_ne!(
            job["status"], "completed",
            "the job finished before it could be killed"
        );
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(20));
    }
    // SIGKILL: no chance to finish the chunk in hand.
    std::process::Command::new("kill")
        .args(["-9", &server.pid().to_string()])
        .status()
        .unwrap();
    server.wait_exit(Duration::from_secs(10));
    drop(server);

    let server = Server::start_with_data(&data, &args);
    let (_, resumed) = server.get(&format!("/v1/bulk-embeddings/{id}"));
    assert!(
        resumed["processed_rows"].as_u64().unwrap() < 1200,
        "{resumed}"
    );
    let done = poll_until_done(&server, &id, Duration::from_secs(300));
    assert_eq!(done["status"], "completed", "{done}");
    let rows = download(&server, &id);
    assert_eq!(rows.len(), 1200);
    assert_eq!(rows.iter().map(|r| r.0.clone()).collect::<Vec<_>>(), texts);
    let sample: Vec<String> = texts.iter().step_by(97).cloned().collect();
    let live = vectors(&server.embed(json!(sample), json!({})));
    for (k, l) in live.iter().enumerate() {
        assert!(cosine(&rows[k * 97].1, l) > 0.99999, "row {}", k * 97);
    }
    drop(server);
    let _ = std::fs::remove_dir_all(data);
}

#[test]
fn bad_uploads_get_clear_errors() {
    let server = Server::start(&["--max-upload-bytes", "4096"]);
    let check = |status: u16, body: &Value, loc: Value, needle: &str| {
        assert_eq!(status, 422, "{body}");
        let (got, _, msg) = first_error(body);
        assert_eq!(got, loc, "{body}");
        assert!(msg.contains(needle), "{msg}");
    };
    let (s, b) = upload(&server, b"", MODEL, None, None);
    check(s, &b, json!(["body", "file"]), "no rows");
    let (s, b) = upload(&server, b"text\n", MODEL, None, None);
    check(s, &b, json!(["body", "file"]), "no rows");
    let (s, b) = upload(
        &server,
        &[0xff, 0xfe, 0x00, 0x9f, 0x92, 0x96],
        MODEL,
        None,
        None,
    );
    check(s, &b, json!(["body", "file"]), "not UTF-8");
    let (s, b) = upload(&server, b"a\n", "nope", None, None);
    check(s, &b, json!(["body", "model"]), "not served");
    let (s, b) = upload(&server, b"a\n", MODEL, Some("not-an-email"), None);
    check(s, &b, json!(["body", "email"]), "email");
    let (s, b) = upload(&server, &vec![b'a'; 10_000], MODEL, None, None);
    assert_eq!(s, 413, "{b}");
    assert!(b["detail"].is_string());
    // A body declared far over the limit is refused from its headers, before it is sent.
    let head = declared_only_response(&server, "/v1/bulk-embeddings", 1 << 30);
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert!(head.contains("4096"), "{head}");

    let form = Form::new().text("model", MODEL);
    let resp = server
        .client
        .post(server.url("/v1/bulk-embeddings"))
        .multipart(form)
        .send()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 422);
    let body: Value = resp.json().unwrap();
    assert_eq!(first_error(&body).0, json!(["body", "file"]));
    assert_eq!(first_error(&body).1, "missing");

    let (status, body) = server.get("/v1/bulk-embeddings/000000000000000000000000");
    assert_eq!(status, 404);
    assert!(body["detail"].is_string());
}

#[test]
fn jobs_belong_to_their_key_and_links_are_signed() {
    let server = Server::start(&["--api-key", "alice,bob", "--bulk-chunk-rows", "4"]);
    let (status, job) = upload(&server, b"one\ntwo\n", MODEL, None, Some("alice"));
    assert_eq!(status, 200, "{job}");
    let id = job["_id"].as_str().unwrap().to_string();
    assert!(job["user_id"].as_str().unwrap().starts_with("key-"));
    let get = |key: &str| {
        let resp = server
            .client
            .get(server.url(&format!("/v1/bulk-embeddings/{id}")))
            .bearer_auth(key)
            .send()
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json::<Value>().unwrap())
    };
    assert_eq!(get("bob").0, 404, "another key does not see the job");
    let deadline = Instant::now() + Duration::from_secs(60);
    while get("alice").1["status"] != "completed" {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(50));
    }
    let link = server
        .client
        .post(server.url(&format!("/v1/bulk-embeddings/{id}/download-result")))
        .bearer_auth("alice")
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    let url = link["download_url"].as_str().unwrap().to_string();
    // The link's host is the server's own, whatever Host header the request carried.
    assert!(url.starts_with(&server.base), "{url}");
    let crafted = server
        .client
        .post(server.url(&format!("/v1/bulk-embeddings/{id}/download-result")))
        .bearer_auth("alice")
        .header("host", "evil.example")
        .send()
        .unwrap()
        .json::<Value>()
        .unwrap();
    let crafted = crafted["download_url"].as_str().unwrap();
    assert!(crafted.starts_with(&server.base), "{crafted}");
    // no API key needed for the signed link itself
    assert_eq!(reqwest::blocking::get(&url).unwrap().status().as_u16(), 200);
    let tampered = url.replace("signature=", "signature=00");
    assert_eq!(
        reqwest::blocking::get(&tampered).unwrap().status().as_u16(),
        403
    );
    let expired = url.split("expires=").next().unwrap().to_string() + "expires=1&signature=00";
    assert_eq!(
        reqwest::blocking::get(&expired).unwrap().status().as_u16(),
        403
    );
}

#[test]
fn downloading_before_completion_names_the_status() {
    let server = Server::start(&["--bulk-chunk-rows", "8"]);
    let (_, csv) = rows_csv(3000);
    let (_, job) = upload(&server, &csv, MODEL, None, None);
    let id = job["_id"].as_str().unwrap();
    let (status, body) = server.post(
        &format!("/v1/bulk-embeddings/{id}/download-result"),
        &json!({}),
    );
    assert_eq!(status, 409, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(
        detail.contains("waiting") || detail.contains("in-progress"),
        "{detail}"
    );
}

/// Alice's large job is uploaded first, Bob's small one after: the jobs take turns chunk by
/// chunk, so Bob's finishes while Alice's is still running; a key over its job cap gets 429.
#[test]
fn two_keys_jobs_progress_side_by_side() {
    let server = Server::start(&[
        "--api-key",
        "alice,bob",
        "--bulk-chunk-rows",
        "16",
        "--bulk-max-jobs-per-key",
        "2",
    ]);
    let job_as = |key: &str, id: &str| -> Value {
        let resp = server
            .client
            .get(server.url(&format!("/v1/bulk-embeddings/{id}")))
            .bearer_auth(key)
            .send()
            .unwrap();
        resp.json().unwrap()
    };
    let (_, large) = rows_csv(3000);
    let (_, small) = rows_csv(48);
    let (status, alice) = upload(&server, &large, MODEL, None, Some("alice"));
    assert_eq!(status, 200, "{alice}");
    let (status, bob) = upload(&server, &small, MODEL, None, Some("bob"));
    assert_eq!(status, 200, "{bob}");
    let (alice, bob) = (alice["_id"].as_str().unwrap(), bob["_id"].as_str().unwrap());
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let b = job_as("bob", bob);
        if b["status"] == "completed" {
            let a = job_as("alice", alice);
            assert_eq!(a["status"], "in-progress", "{a}");
            assert!(a["processed_rows"].as_u64().unwrap() < 3000, "{a}");
            break;
        }
        assert!(Instant::now() < deadline, "bob's job did not finish: {b}");
        std::thread::sleep(Duration::from_millis(50));
    }
    // Alice has one job running; a second is queued, a third is over the cap.
    assert_eq!(upload(&server, &small, MODEL, None, Some("alice")).0, 200);
    let (status, body) = upload(&server, &small, MODEL, None, Some("alice"));
    assert_eq!(status, 429, "{body}");
    assert!(body["detail"].as_str().unwrap().contains("limit"), "{body}");
    // Bob's jobs are his own count.
    assert_eq!(upload(&server, &small, MODEL, None, Some("bob")).0, 200);
}

//! The connection layer and admission through the real binary: half-sent headers and bodies,
//! idle connections, SIGTERM with idle connections open, the concurrent-request cap, and a flood
//! answered with 429s and Retry-After while a small request is still served.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use embedd_blackbox::*;

fn connect(server: &Server) -> TcpStream {
    let stream = TcpStream::connect(server.base.trim_start_matches("http://")).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    stream
}

/// Reads until the server closes the connection; what it sent, and how long that took.
fn read_until_closed(stream: &mut TcpStream) -> (String, Duration) {
    let started = Instant::now();
    let mut reply = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => reply.extend_from_slice(&buf[..n]),
        }
    }
    (
        String::from_utf8_lossy(&reply).into_owned(),
        started.elapsed(),
    )
}

const SHORT_TIMEOUTS: &[&str] = &[
    "--header-read-timeout-secs",
    "1",
    "--keep-alive-timeout-secs",
    "1",
    "--body-read-timeout-secs",
    "1",
];

#[test]
fn slow_and_idle_connections_are_closed_within_their_timeouts() {
    let server = Server::start(SHORT_TIMEOUTS);
    // Connected, nothing sent.
    let mut silent = connect(&server);
    // Half the headers, then nothing.
    let mut half_headers = connect(&server);
    half_headers
        .write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\n")
        .unwrap();
    // Headers and a tenth of the declared body, the connection left open.
    let mut half_body = connect(&server);
    half_body
        .write_all(b"POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"model\": ")
        .unwrap();
    // One request answered, then idle on keep-alive.
    let mut idle = connect(&server);
    idle.write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .unwrap();
    for (name, stream) in [
        ("silent", &mut silent),
        ("half headers", &mut half_headers),
        ("idle keep-alive", &mut idle),
    ] {
        let (_, took) = read_until_closed(stream);
        assert!(took < Duration::from_secs(5), "{name}: open for {took:?}");
    }
    let (reply, took) = read_until_closed(&mut half_body);
    assert!(
        took < Duration::from_secs(5),
        "half body: open for {took:?}"
    );
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(reply.contains("\"detail\""), "{reply}");
    // The server is still serving.
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn sigterm_closes_idle_connections_at_once() {
    let mut server = Server::start(&["--shutdown-grace-secs", "30"]);
    let mut idle: Vec<TcpStream> = (0..20).map(|_| connect(&server)).collect();
    for stream in &mut idle[..10] {
        stream
            .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(300));
    let started = Instant::now();
    std::process::Command::new("kill")
        .args(["-TERM", &server.pid().to_string()])
        .status()
        .unwrap();
    assert_eq!(server.wait_exit(Duration::from_secs(10)), Some(0));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "idle connections held the shutdown for {:?}",
        started.elapsed()
    );
}

#[test]
fn requests_past_the_concurrency_cap_get_429_at_once() {
    let server = Server::start(&["--max-concurrent-requests", "1"]);
    let texts: Vec<String> = (0..2000)
        .map(|i| format!("one of many sentences that keep the only permit busy, number {i}"))
        .collect();
    std::thread::scope(|s| {
        let busy =
            s.spawn(|| server.post("/v1/embeddings", &json!({"model": MODEL, "input": texts})));
        let mut refused = None;
        for _ in 0..200 {
            std::thread::sleep(Duration::from_millis(20));
            let resp = server
                .client
                .post(server.url("/v1/embeddings"))
                .json(&json!({"model": MODEL, "input": "hi"}))
                .send()
                .unwrap();
            if resp.status().as_u16() == 429 {
                let retry = resp.headers().get("retry-after").cloned();
                refused = Some((retry, resp.json::<Value>().unwrap()));
                break;
            }
        }
        let (retry, body) = refused.expect("no 429 while the only permit was held");
        assert_eq!(retry.unwrap(), "1");
        assert!(
            body["detail"].as_str().unwrap().contains("concurrent"),
            "{body}"
        );
        assert_eq!(busy.join().unwrap().0, 200);
    });
    // Health is outside the cap.
    assert_eq!(server.get("/health").0, 200);
}

#[test]
fn a_flood_gets_429_with_retry_after_while_a_small_request_is_served() {
    // Batches of 16 keep the probe's wait (the batch in flight, then its own) short on 2 cores.
    let server = Server::start(&["--max-queue-wait-secs", "1", "--max-batch-size", "16"]);
    // Throughput is measured from the first batches.
    server.embed(json!(vec!["warm up"; 64]), json!({}));
    let texts: Vec<String> = (0..256)
        .map(|i| {
            format!("a flood of long requests, each of many sentences like this one, number {i}")
        })
        .collect();
    let body = json!({"model": MODEL, "input": texts});
    let outcomes = std::sync::Mutex::new(Vec::new());
    let probe = std::thread::scope(|s| {
        for _ in 0..16 {
            s.spawn(|| {
                for _ in 0..4 {
                    let resp = server
                        .client
                        .post(server.url("/v1/embeddings"))
                        .json(&body)
                        .send()
                        .unwrap();
                    let retry = resp
                        .headers()
                        .get("retry-after")
                        .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
                    outcomes
                        .lock()
                        .unwrap()
                        .push((resp.status().as_u16(), retry));
                }
            });
        }
        std::thread::sleep(Duration::from_millis(1500));
        let started = Instant::now();
        let (status, resp) = server.post(
            "/v1/embeddings",
            &json!({"model": MODEL, "input": "a small probe"}),
        );
        assert_eq!(status, 200, "{resp}");
        started.elapsed()
    });
    let outcomes = outcomes.into_inner().unwrap();
    let refused: Vec<_> = outcomes.iter().filter(|(s, _)| *s == 429).collect();
    eprintln!(
        "flood: {} answered, {} refused; the probe took {probe:?}",
        outcomes.len() - refused.len(),
        refused.len()
    );
    assert!(!refused.is_empty(), "no 429 in {outcomes:?}");
    assert!(refused
        .iter()
        .all(|(_, retry)| retry.is_some_and(|r| (1..=60).contains(&r))));
    assert!(
        outcomes.iter().all(|(s, _)| *s == 200 || *s == 429),
        "{outcomes:?}"
    );
    assert!(
        probe < Duration::from_secs(1),
        "the small request took {probe:?} during the flood"
    );
}

/// A client that hangs up takes its queued work with it: the model's batch count stops growing
/// soon after, instead of running the whole request.
#[test]
fn a_disconnected_clients_queued_work_is_dropped() {
    let server = Server::start(&["--max-batch-size", "4"]);
    let texts: Vec<String> = (0..2000)
        .map(|i| format!("queued work that nobody will read, sentence number {i}"))
        .collect();
    let body = serde_json::to_vec(&json!({"model": MODEL, "input": texts})).unwrap();
    let batches = || -> u64 {
        let (_, health) = server.get("/health");
        health["model_health"][MODEL]["batches"].as_u64().unwrap()
    };
    let mut stream = connect(&server);
    write!(
        stream,
        "POST /v1/embeddings HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    )
    .unwrap();
    stream.write_all(&body).unwrap();
    // Let it tokenize and start running, then hang up.
    let started = Instant::now();
    while batches() < 5 && started.elapsed() < Duration::from_secs(20) {
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(stream);
    std::thread::sleep(Duration::from_millis(500));
    let after_hangup = batches();
    std::thread::sleep(Duration::from_secs(2));
    let later = batches();
    eprintln!("batches: {after_hangup} half a second after the hang-up, {later} two seconds on");
    // 1,000 batches were queued; at most the one running when the hang-up was seen may finish.
    assert!(later - after_hangup <= 1, "{after_hangup} -> {later}");
    assert!(
        later < 500,
        "{later} batches ran for a request nobody reads"
    );
}

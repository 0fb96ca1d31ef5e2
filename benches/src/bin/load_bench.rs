//! HTTP load on one route of a running `embedd`: closed-loop runs with N concurrent clients (each
//! sends its next request when the last one answers) for throughput at saturation, then an
//! open-loop run at half the best throughput found, timed from each request's scheduled start so
//! queueing counts. Prints one JSON line per run.
//!
//! With `--flood N`: N clients send `--items`-text requests back to back (waiting out each 429's
//! `Retry-After`, at most 5 s, as the OpenAI and Jina clients do) while a probe sends one
//! single-text request every 200 ms; prints the flood's answers by status (200, 429, 5xx, other)
//! and the probe's latencies.

use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use embedd_benches::{percentile, read_lines};
use serde_json::{json, Value};

#[derive(Parser, Clone)]
struct Args {
    #[arg(long)]
    url: String,
    /// `embeddings`, `rerank` or `multi-vector`.
    #[arg(long)]
    route: String,
    #[arg(long)]
    model: String,
    /// A text file, one text per line.
    #[arg(long)]
    texts: std::path::PathBuf,
    /// Texts per request (documents for rerank).
    #[arg(long, default_value_t = 1)]
    items: usize,
    #[arg(long, value_delimiter = ',', default_value = "1,8,64")]
    clients: Vec<usize>,
    /// Seconds per run.
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    /// Flood mode: this many clients instead of the saturation and half-load runs.
    #[arg(long)]
    flood: Option<usize>,
}

struct Load {
    args: Args,
    texts: Vec<String>,
    endpoint: String,
    client: reqwest::Client,
}

impl Load {
    fn body(&self, i: usize) -> Value {
        let n = self.args.items;
        let start = (i * 7) % (self.texts.len() - n + 1);
        let batch = &self.texts[start..start + n];
        match self.args.route.as_str() {
            "rerank" => json!({
                "model": self.args.model, "query": "how do search engines rank documents",
                "documents": batch, "return_documents": false
            }),
            "multi-vector" => {
                json!({"model": self.args.model, "input": batch, "input_type": "document"})
            }
            _ => json!({"model": self.args.model, "input": batch}),
        }
    }

    /// One request; its latency in ms, or `None` for a failure.
    async fn send(&self, i: usize, since: Instant) -> Option<f64> {
        let resp = self
            .client
            .post(&self.endpoint)
            .json(&self.body(i))
            .send()
            .await
            .ok()?;
        let ok = resp.status().is_success();
        resp.bytes().await.ok()?;
        ok.then(|| since.elapsed().as_secs_f64() * 1e3)
    }
}

impl Load {
    /// One request with `body`: its status (0: no answer), latency in ms, and `Retry-After`.
    async fn send_body(&self, body: &Value) -> (u16, f64, Option<u64>) {
        let since = Instant::now();
        let Ok(resp) = self.client.post(&self.endpoint).json(body).send().await else {
            return (0, since.elapsed().as_secs_f64() * 1e3, None);
        };
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse().ok());
        let _ = resp.bytes().await;
        (status, since.elapsed().as_secs_f64() * 1e3, retry)
    }
}

/// The flood: `clients` closed-loop senders of full-size requests, and the probe beside them.
async fn flood(load: Arc<Load>, clients: usize) {
    let deadline = Instant::now() + Duration::from_secs_f64(load.args.seconds);
    let senders: Vec<_> = (0..clients)
        .map(|c| {
            let load = load.clone();
            tokio::spawn(async move {
                let mut statuses = Vec::new();
                let mut i = c * 1000;
                while Instant::now() < deadline {
                    let body = load.body(i);
                    let (status, _, retry) = load.send_body(&body).await;
                    if status == 429 {
                        // As the OpenAI and Jina clients do: wait as long as the server says.
                        let wait = retry.unwrap_or(1).min(5);
                        tokio::time::sleep(Duration::from_secs(wait)).await;
                    }
                    statuses.push(status);
                    i += 1;
                }
                statuses
            })
        })
        .collect();
    let probe = {
        let load = load.clone();
        tokio::spawn(async move {
            let (mut latencies, mut failures) = (Vec::new(), 0usize);
            let body = json!({"model": load.args.model, "input": [load.texts[0].clone()]});
            while Instant::now() < deadline {
                let (status, ms, _) = load.send_body(&body).await;
                if status == 200 {
                    latencies.push(ms);
                } else {
                    failures += 1;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            (latencies, failures)
        })
    };
    let mut counts = std::collections::BTreeMap::<&str, usize>::new();
    for sender in senders {
        for status in sender.await.unwrap_or_default() {
            let class = match status {
                200 => "200",
                429 => "429",
                500..=599 => "5xx",
                _ => "other",
            };
            *counts.entry(class).or_default() += 1;
        }
    }
    let (mut latencies, failures) = probe.await.unwrap_or_default();
    latencies.sort_by(f64::total_cmp);
    println!(
        "{}",
        json!({
            "route": load.args.route, "items": load.args.items, "mode": "flood",
            "clients": clients, "seconds": load.args.seconds, "answers": counts,
            "probe_requests": latencies.len(), "probe_failures": failures,
            "probe_p50_ms": percentile(&latencies, 0.5), "probe_p99_ms": percentile(&latencies, 0.99),
            "probe_max_ms": latencies.last().copied().unwrap_or(0.0),
        })
    );
}

struct Outcome {
    latencies: Vec<f64>,
    errors: usize,
    elapsed: f64,
}

fn report(load: &Load, mode: &str, extra: Value, mut o: Outcome) {
    o.latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| percentile(&o.latencies, p);
    let rps = o.latencies.len() as f64 / o.elapsed;
    let mut line = json!({
        "route": load.args.route, "items": load.args.items, "mode": mode,
        "requests": o.latencies.len(), "errors": o.errors,
        "requests_per_s": rps, "items_per_s": rps * load.args.items as f64,
        "p50_ms": pct(0.5), "p95_ms": pct(0.95), "p99_ms": pct(0.99),
    });
    if let (Some(l), Some(e)) = (line.as_object_mut(), extra.as_object()) {
        l.extend(e.clone());
    }
    println!("{line}");
}

async fn closed_loop(load: Arc<Load>, clients: usize) -> Outcome {
    let deadline = Instant::now() + Duration::from_secs_f64(load.args.seconds);
    let start = Instant::now();
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let load = load.clone();
            tokio::spawn(async move {
                let (mut latencies, mut errors, mut i) = (Vec::new(), 0, c * 1000);
                while Instant::now() < deadline {
                    match load.send(i, Instant::now()).await {
                        Some(ms) => latencies.push(ms),
                        None => errors += 1,
                    }
                    i += 1;
                }
                (latencies, errors)
            })
        })
        .collect();
    let mut out = Outcome {
        latencies: Vec::new(),
        errors: 0,
        elapsed: 0.0,
    };
    for t in tasks {
        if let Ok((l, e)) = t.await {
            out.latencies.extend(l);
            out.errors += e;
        }
    }
    out.elapsed = start.elapsed().as_secs_f64();
    out
}

async fn open_loop(load: Arc<Load>, rate: f64) -> Outcome {
    let count = (rate * load.args.seconds).ceil().max(1.0) as usize;
    let start = tokio::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..count {
        let at = start + Duration::from_secs_f64(i as f64 / rate);
        let load = load.clone();
        tasks.spawn(async move {
            tokio::time::sleep_until(at).await;
            load.send(i, at.into_std()).await
        });
    }
    let mut out = Outcome {
        latencies: Vec::new(),
        errors: 0,
        elapsed: 0.0,
    };
    while let Some(r) = tasks.join_next().await {
        match r.ok().flatten() {
            Some(ms) => out.latencies.push(ms),
            None => out.errors += 1,
        }
    }
    out.elapsed = start.elapsed().as_secs_f64();
    out
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let texts = read_lines(&args.texts)?;
    anyhow::ensure!(
        texts.len() >= args.items,
        "need at least {} texts",
        args.items
    );
    let load = Arc::new(Load {
        endpoint: format!("{}/v1/{}", args.url.trim_end_matches('/'), args.route),
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(256)
            .build()?,
        texts,
        args: args.clone(),
    });
    // Warm-up: the first request loads caches and spins up the worker.
    load.send(0, Instant::now()).await;
    if let Some(clients) = args.flood {
        flood(load, clients).await;
        return Ok(());
    }
    let mut best = 0f64;
    for &clients in &args.clients {
        let outcome = closed_loop(load.clone(), clients).await;
        best = best.max(outcome.latencies.len() as f64 / outcome.elapsed);
        report(&load, "saturation", json!({"clients": clients}), outcome);
    }
    let rate = best / 2.0;
    let outcome = open_loop(load.clone(), rate).await;
    report(&load, "half-load", json!({"offered_per_s": rate}), outcome);
    Ok(())
}

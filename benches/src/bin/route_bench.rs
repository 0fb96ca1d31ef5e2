//! Latency and throughput of one route of a running `embedd`, sequential requests on loopback.
//!
//! `rerank`: one query x `--docs` documents per request; `multi-vector`: `--docs` documents per
//! request. Prints one JSON line: p50/p95 latency, and pairs or documents per second.

use std::time::Instant;

use clap::Parser;
use embedd_benches::{percentile, read_lines};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    /// `rerank` or `multi-vector`.
    #[arg(long)]
    route: String,
    #[arg(long)]
    model: String,
    /// A text file, one document per line.
    #[arg(long)]
    documents: std::path::PathBuf,
    #[arg(long, default_value_t = 100)]
    docs: usize,
    #[arg(long, default_value_t = 20)]
    requests: usize,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let docs = read_lines(&args.documents)?;
    anyhow::ensure!(
        docs.len() >= args.docs,
        "need at least {} documents",
        args.docs
    );
    let client = reqwest::blocking::Client::new();
    let endpoint = format!("{}/v1/{}", args.url.trim_end_matches('/'), args.route);
    let body = |i: usize| -> Value {
        let start = (i * 7) % (docs.len() - args.docs + 1);
        let batch = &docs[start..start + args.docs];
        match args.route.as_str() {
            "rerank" => {
                json!({"model": args.model, "query": "how do search engines rank documents", "documents": batch, "return_documents": false})
            }
            _ => json!({"model": args.model, "input": batch, "input_type": "document"}),
        }
    };
    let mut latencies = Vec::with_capacity(args.requests);
    let mut tokens = 0u64;
    let started = Instant::now();
    for i in 0..args.requests + 2 {
        let t = Instant::now();
        let resp: Value = client
            .post(&endpoint)
            .json(&body(i))
            .send()?
            .error_for_status()?
            .json()?;
        if i >= 2 {
            // the first two are warm-up
            latencies.push(t.elapsed().as_secs_f64() * 1000.0);
            tokens += resp["usage"]["total_tokens"].as_u64().unwrap_or(0);
        }
    }
    let total: f64 = latencies.iter().sum::<f64>() / 1000.0;
    let _ = started;
    latencies.sort_by(f64::total_cmp);
    let unit = if args.route == "rerank" {
        "pairs_per_s"
    } else {
        "documents_per_s"
    };
    println!(
        "{}",
        json!({
            "engine": format!("embedd-http-{}", args.route), "docs_per_request": args.docs,
            "p50_ms": percentile(&latencies, 0.5), "p95_ms": percentile(&latencies, 0.95),
            unit: (args.requests * args.docs) as f64 / total,
            "tokens_per_s": tokens as f64 / total,
        })
    );
    Ok(())
}

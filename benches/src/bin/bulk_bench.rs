//! Bulk job end to end against a running `embedd`: rows/s of the job, and single-sentence live
//! latency (p50/p95) when idle and while the job runs. Prints JSON lines.

use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use embedd_benches::{percentile, read_lines};
use reqwest::blocking::multipart::{Form, Part};
use serde_json::{json, Value};

#[derive(Parser)]
struct Args {
    #[arg(long)]
    url: String,
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    /// A text file, one sentence per line; rows are drawn from it in turn.
    #[arg(long)]
    sentences: std::path::PathBuf,
    #[arg(long, default_value_t = 100_000)]
    rows: usize,
    /// Live requests per latency measurement.
    #[arg(long, default_value_t = 100)]
    probes: usize,
}

fn latencies(
    client: &reqwest::blocking::Client,
    url: &str,
    model: &str,
    n: usize,
) -> anyhow::Result<(f64, f64)> {
    let mut ms = Vec::with_capacity(n);
    for i in 0..n {
        let t = Instant::now();
        client
            .post(format!("{url}/v1/embeddings"))
            .json(&json!({"model": model, "input": format!("live probe sentence number {i} while bulk runs")}))
            .send()?
            .error_for_status()?;
        ms.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((percentile(&ms, 0.5), percentile(&ms, 0.95)))
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let url = args.url.trim_end_matches('/');
    let sentences = read_lines(&args.sentences)?;
    let mut writer = csv::Writer::from_writer(Vec::new());
    writer.write_record(["text"])?;
    for i in 0..args.rows {
        writer.write_record([&sentences[i % sentences.len()]])?;
    }
    let csv = writer.into_inner()?;
    let client = reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(600))
        .build()?;

    let (idle_p50, idle_p95) = latencies(&client, url, &args.model, args.probes)?;
    let form = Form::new()
        .part("file", Part::bytes(csv).file_name("bench.csv"))
        .text("model", args.model.clone());
    let started = Instant::now();
    let job: Value = client
        .post(format!("{url}/v1/bulk-embeddings"))
        .multipart(form)
        .send()?
        .error_for_status()?
        .json()?;
    let id = job["_id"].as_str().context("job id")?.to_string();
    std::thread::sleep(Duration::from_millis(500));
    let (busy_p50, busy_p95) = latencies(&client, url, &args.model, args.probes)?;
    loop {
        let job: Value = client
            .get(format!("{url}/v1/bulk-embeddings/{id}"))
            .send()?
            .json()?;
        match job["status"].as_str() {
            Some("completed") => break,
            Some("failed") => anyhow::bail!("job failed: {job}"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "engine": "embedd-bulk", "rows": args.rows, "seconds": seconds,
            "rows_per_s": args.rows as f64 / seconds,
            "live_idle_p50_ms": idle_p50, "live_idle_p95_ms": idle_p95,
            "live_during_job_p50_ms": busy_p50, "live_during_job_p95_ms": busy_p95,
        })
    );
    Ok(())
}

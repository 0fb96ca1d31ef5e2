//! Embedding throughput, in-process (the runtime alone) and over HTTP (a running `embedd`).
//!
//! Prints one JSON line per measurement: `{"engine", "batch", "sentences_per_s", "tokens_per_s", ...}`.
//! Run it through benches/run-embeddings, which builds in release mode and puts the ONNX Runtime and
//! sentence-transformers figures beside it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use clap::Parser;
use embedd_benches::read_lines;
use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// A text file, one sentence per line.
    #[arg(long)]
    sentences: PathBuf,
    /// Model directory for the in-process runs.
    #[arg(long)]
    model_dir: Option<PathBuf>,
    /// A running server (http://host:port) for the HTTP runs.
    #[arg(long)]
    url: Option<String>,
    #[arg(long, default_value = "all-MiniLM-L6-v2")]
    model: String,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    /// Number format for the in-process runs: f32, bf16 or int8.
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// Seconds per measurement (after one warm-up pass).
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
}

struct Measurement {
    sentences: usize,
    tokens: usize,
    elapsed: Duration,
}

/// Runs `step` over consecutive slices of `batch` sentences until `seconds` have passed.
fn measure(
    sentences: &[String],
    batch: usize,
    seconds: f64,
    mut step: impl FnMut(&[String]) -> anyhow::Result<usize>,
) -> anyhow::Result<Measurement> {
    let chunks: Vec<&[String]> = sentences
        .chunks(batch)
        .filter(|c| c.len() == batch)
        .collect();
    anyhow::ensure!(!chunks.is_empty(), "fewer sentences than the batch size");
    for c in chunks.iter().take(2) {
        step(c)?; // warm-up
    }
    let (mut n, mut tokens, start) = (0, 0, Instant::now());
    let budget = Duration::from_secs_f64(seconds);
    for c in chunks.iter().cycle() {
        tokens += step(c)?;
        n += c.len();
        if start.elapsed() >= budget {
            break;
        }
    }
    Ok(Measurement {
        sentences: n,
        tokens,
        elapsed: start.elapsed(),
    })
}

fn report(engine: &str, batch: usize, m: &Measurement) {
    let s = m.elapsed.as_secs_f64();
    println!(
        "{}",
        json!({
            "engine": engine, "batch": batch,
            "sentences_per_s": m.sentences as f64 / s,
            "tokens_per_s": m.tokens as f64 / s,
            "sentences": m.sentences, "seconds": s,
        })
    );
}

fn main() -> anyhow::Result<()> {
    embedd_runtime::allocator::keep_freed_buffers();
    let args = Args::parse();
    let sentences = read_lines(&args.sentences)?;

    if let Some(dir) = &args.model_dir {
        let model = TextEmbedder::load(&EmbedderSpec {
            name: args.model.clone(),
            source: ModelSource::Local(dir.clone()),
            pooling: None,
            max_tokens: None,
            device: DeviceSpec::Cpu,
            precision: args.dtype,
            scheduler: SchedulerConfig::default(),
        })?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        for &batch in &args.batches {
            let m = measure(&sentences, batch, args.seconds, |chunk| {
                let items = model.prepare(chunk, true)?;
                let out = rt.block_on(model.embed(items))?;
                Ok(out.tokens)
            })?;
            let engine = match args.dtype {
                Precision::F32 => "embedd-inprocess".to_string(),
                other => format!("embedd-inprocess-{other}"),
            };
            report(&engine, batch, &m);
        }
    }

    if let Some(url) = &args.url {
        let client = reqwest::blocking::Client::new();
        let endpoint = format!("{}/v1/embeddings", url.trim_end_matches('/'));
        for &batch in &args.batches {
            let m = measure(&sentences, batch, args.seconds, |chunk| {
                let resp: serde_json::Value = client
                    .post(&endpoint)
                    .json(&json!({"model": args.model, "input": chunk, "truncate": true}))
                    .send()?
                    .error_for_status()?
                    .json()?;
                Ok(resp["usage"]["total_tokens"].as_u64().unwrap_or(0) as usize)
            })?;
            report("embedd-http", batch, &m);
        }
    }
    Ok(())
}

//! Embedding throughput, in-process (the runtime alone) and over HTTP (a running `embedd`).
//!
//! Prints one JSON line per measurement: `{"engine", "batch", "sentences_per_s", "tokens_per_s", ...}`.
//! In-process runs also count the model's arithmetic from the layer shapes (`gflops_per_s`, and
//! `utilization` against `--peak-gflops`, the ceiling `../shared/tools/cpu-peak` measures). Run it
//! through benches/run-embeddings, which builds in release mode and puts the ONNX Runtime and
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
    /// The machine's ceiling for this dtype in GFLOP/s, to report the share of it reached.
    #[arg(long)]
    peak_gflops: Option<f64>,
    /// Write the first `--vector-count` sentences' vectors here (a JSON array), for cosines
    /// against a reference.
    #[arg(long)]
    vectors_out: Option<PathBuf>,
    #[arg(long, default_value_t = 128)]
    vector_count: usize,
}

/// Model FLOPs of a BERT-shaped encoder from its config: per layer, the four attention
/// projections and the two feed-forward products (2·L·(4h² + 2h·f)), plus attention's scores and
/// weighted sum (4·L²·h); what a sequence of L tokens costs without padding.
struct EncoderShape {
    hidden: f64,
    intermediate: f64,
    layers: f64,
}

impl EncoderShape {
    fn read(model_dir: &std::path::Path) -> anyhow::Result<Self> {
        let config: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(model_dir.join("config.json"))?)?;
        let field = |name: &str| {
            config[name]
                .as_f64()
                .ok_or_else(|| anyhow::anyhow!("config.json has no {name}"))
        };
        Ok(Self {
            hidden: field("hidden_size")?,
            intermediate: field("intermediate_size")?,
            layers: field("num_hidden_layers")?,
        })
    }

    fn flops(&self, tokens: usize) -> f64 {
        let (l, h, f) = (tokens as f64, self.hidden, self.intermediate);
        self.layers * (2.0 * l * (4.0 * h * h + 2.0 * h * f) + 4.0 * l * l * h)
    }
}

struct Measurement {
    sentences: usize,
    tokens: usize,
    flops: f64,
    elapsed: Duration,
}

/// What one step processed: its tokens and, where known, the model FLOPs they cost.
struct Step {
    tokens: usize,
    flops: f64,
}

/// Runs `step` over consecutive slices of `batch` sentences until `seconds` have passed.
fn measure(
    sentences: &[String],
    batch: usize,
    seconds: f64,
    mut step: impl FnMut(&[String]) -> anyhow::Result<Step>,
) -> anyhow::Result<Measurement> {
    let chunks: Vec<&[String]> = sentences
        .chunks(batch)
        .filter(|c| c.len() == batch)
        .collect();
    anyhow::ensure!(!chunks.is_empty(), "fewer sentences than the batch size");
    for c in chunks.iter().take(2) {
        step(c)?; // warm-up
    }
    let (mut n, mut tokens, mut flops, start) = (0, 0, 0.0, Instant::now());
    let budget = Duration::from_secs_f64(seconds);
    for c in chunks.iter().cycle() {
        let done = step(c)?;
        tokens += done.tokens;
        flops += done.flops;
        n += c.len();
        if start.elapsed() >= budget {
            break;
        }
    }
    Ok(Measurement {
        sentences: n,
        tokens,
        flops,
        elapsed: start.elapsed(),
    })
}

fn report(engine: &str, batch: usize, m: &Measurement, peak_gflops: Option<f64>) {
    let s = m.elapsed.as_secs_f64();
    let mut line = json!({
        "engine": engine, "batch": batch,
        "sentences_per_s": m.sentences as f64 / s,
        "tokens_per_s": m.tokens as f64 / s,
        "sentences": m.sentences, "seconds": s,
    });
    if m.flops > 0.0 {
        let gflops = m.flops / s / 1e9;
        line["gflops_per_s"] = json!(gflops);
        if let Some(peak) = peak_gflops {
            line["utilization"] = json!(gflops / peak);
        }
    }
    println!("{line}");
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
        let shape = EncoderShape::read(dir)?;
        let rt = tokio::runtime::Builder::new_current_thread().build()?;
        if let Some(path) = &args.vectors_out {
            let mut vectors = Vec::new();
            for chunk in sentences[..args.vector_count.min(sentences.len())].chunks(32) {
                let items = model.prepare(chunk, true)?;
                vectors.extend(rt.block_on(model.embed(items))?.vectors);
            }
            std::fs::write(path, serde_json::to_vec(&vectors)?)?;
        }
        for &batch in &args.batches {
            let m = measure(&sentences, batch, args.seconds, |chunk| {
                let items = model.prepare(chunk, true)?;
                let flops = items.iter().map(|i| shape.flops(i.sequence.len())).sum();
                let out = rt.block_on(model.embed(items))?;
                Ok(Step {
                    tokens: out.tokens,
                    flops,
                })
            })?;
            let engine = match args.dtype {
                Precision::F32 => "embedd-inprocess".to_string(),
                other => format!("embedd-inprocess-{other}"),
            };
            report(&engine, batch, &m, args.peak_gflops);
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
                Ok(Step {
                    tokens: resp["usage"]["total_tokens"].as_u64().unwrap_or(0) as usize,
                    flops: 0.0,
                })
            })?;
            report("embedd-http", batch, &m, None);
        }
    }
    Ok(())
}

//! In-process tokens/s of one model at a given input length, and the process's peak RSS:
//! the figures for the model families (512-token inputs) and for long ALiBi and rotary inputs
//! (8192).

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model_dir: PathBuf,
    /// Tokens per input (special tokens included).
    #[arg(long, default_value_t = 512)]
    tokens: usize,
    /// Inputs per request.
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Run with this task's adapter (models with task adapters, as jina-embeddings-v3).
    #[arg(long)]
    task: Option<String>,
    /// `f32` or `bf16` (the fused kernels' reduced precision).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
}

/// A `/proc/self/status` figure in KiB: `VmHWM` (peak resident set) or `VmRSS` (current).
fn status_kib(field: &str) -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn peak_rss_kib() -> u64 {
    status_kib("VmHWM:")
}

fn main() -> anyhow::Result<()> {
    embedd_runtime::allocator::keep_freed_buffers();
    let args = Args::parse();
    let model = TextEmbedder::load(&EmbedderSpec {
        name: "bench".into(),
        source: ModelSource::Local(args.model_dir.clone()),
        pooling: None,
        max_tokens: Some(args.tokens),
        device: DeviceSpec::Cpu,
        precision: args.dtype,
        scheduler: SchedulerConfig {
            max_batch_tokens: (args.tokens * args.batch).max(16_384),
            ..SchedulerConfig::default()
        },
    })?;
    let (load_peak, loaded_rss) = (peak_rss_kib(), status_kib("VmRSS:"));
    // Reset the peak so `peak_rss_mib` is that of inference alone (Linux: "5" clears VmHWM).
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    // Plenty of words; truncation cuts each input to exactly `tokens`.
    let text = "search vector ranking tokens ".repeat(args.tokens);
    let texts = vec![text; args.batch];
    let rt = tokio::runtime::Builder::new_current_thread().build()?;
    let (mut tokens, started) = (0usize, Instant::now());
    for _ in 0..args.rounds {
        let items = model.prepare_for_task(&texts, true, args.task.as_deref())?;
        tokens += rt.block_on(model.embed(items))?.tokens;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({
            "model": args.model_dir.display().to_string(), "tokens_per_input": args.tokens,
            "batch": args.batch, "task": args.task, "dtype": args.dtype.to_string(), "tokens_per_s": tokens as f64 / seconds, "seconds": seconds,
            "rss_after_load_mib": loaded_rss / 1024, "peak_rss_during_load_mib": load_peak / 1024,
            "peak_rss_during_inference_mib": peak_rss_kib() / 1024,
        })
    );
    Ok(())
}

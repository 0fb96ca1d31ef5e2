//! In-process images/s of a text-image model's image tower at given batch sizes, on the same
//! decoded photos every engine gets; and, separately, decode + preprocess throughput.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use embedd_runtime::embedder::{EmbedderSpec, PixelItem};
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::json;

#[derive(Parser)]
struct Args {
    #[arg(long)]
    model_dir: PathBuf,
    /// Image files (JPEG, PNG, WebP...), cycled through.
    #[arg(long, num_args = 1.., required = true)]
    images: Vec<PathBuf>,
    #[arg(long, value_delimiter = ',', default_value = "1,32")]
    batches: Vec<usize>,
    #[arg(long, default_value_t = 10.0)]
    seconds: f64,
    #[arg(long, default_value = "f32")]
    dtype: Precision,
}

fn main() -> anyhow::Result<()> {
    embedd_runtime::allocator::keep_freed_buffers();
    let args = Args::parse();
    let model = TextEmbedder::load(&EmbedderSpec {
        name: "bench".into(),
        source: ModelSource::Local(args.model_dir.clone()),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision: args.dtype,
        scheduler: SchedulerConfig {
            max_batch_tokens: 1 << 20,
            max_batch_size: 1024,
            ..SchedulerConfig::default()
        },
    })?;
    anyhow::ensure!(
        model.accepts_images(),
        "{} has no image tower",
        args.model_dir.display()
    );
    let files: Vec<Vec<u8>> = args
        .images
        .iter()
        .map(std::fs::read)
        .collect::<Result<_, _>>()?;

    // Decode + preprocess alone, one thread, as the server's blocking pool runs it per request.
    let start = Instant::now();
    let mut prepared = 0usize;
    let mut items: Vec<PixelItem> = Vec::new();
    while start.elapsed().as_secs_f64() < args.seconds.min(5.0) || items.is_empty() {
        for result in model.prepare_images(&files, u64::MAX) {
            items.push(result.map_err(|e| anyhow::anyhow!("{e}"))?);
            prepared += 1;
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"engine": "embedd-preprocess", "images": prepared, "seconds": elapsed,
               "images_per_s": prepared as f64 / elapsed})
    );
    items.truncate(files.len());

    let runtime = tokio::runtime::Builder::new_current_thread().build()?;
    for &batch in &args.batches {
        let request: Vec<PixelItem> = items.iter().cycle().take(batch).cloned().collect();
        runtime.block_on(model.embed_images(request.clone()))?;
        let start = Instant::now();
        let mut done = 0usize;
        while start.elapsed().as_secs_f64() < args.seconds {
            runtime.block_on(model.embed_images(request.clone()))?;
            done += batch;
        }
        let elapsed = start.elapsed().as_secs_f64();
        println!(
            "{}",
            json!({"engine": format!("embedd-{}", args.dtype), "batch": batch, "images": done,
                   "seconds": elapsed, "images_per_s": done as f64 / elapsed})
        );
    }
    Ok(())
}

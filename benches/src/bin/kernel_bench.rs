//! GFLOP/s of the fused path's float32 matrix product (`kernels::matmul`) at the shapes of
//! all-MiniLM-L6-v2's layers, for a short sentence (25 rows), a batch of 8 (200) and of 32 (800):
//! where the small-batch gap to ONNX Runtime is, kernel by kernel.

use std::time::Instant;

use clap::Parser;
use embedd_runtime::kernels;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per shape.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
}

fn main() {
    let args = Args::parse();
    // (name, k, n): qkv, attention output, intermediate, output.
    let layers = [
        ("qkv", 384, 1152),
        ("attention-out", 384, 384),
        ("intermediate", 384, 1536),
        ("output", 1536, 384),
    ];
    for m in [25, 200, 800] {
        for (name, k, n) in layers {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let (mut calls, started) = (0u64, Instant::now());
            while started.elapsed().as_secs_f64() < args.seconds {
                std::hint::black_box(kernels::matmul(&x, m, k, &w, n));
                calls += 1;
            }
            let seconds = started.elapsed().as_secs_f64();
            let gflops = 2.0 * (m * k * n) as f64 * calls as f64 / seconds / 1e9;
            println!(
                "{}",
                json!({"rows": m, "layer": name, "k": k, "n": n, "gflop_per_s": gflops,
                       "us_per_call": seconds / calls as f64 * 1e6})
            );
        }
    }
}

//! GFLOP/s of the fused path's matrix products (`kernels::matmul` in float32, and the bfloat16
//! kernel where the CPU has AVX-512 BF16) at the shapes of
//! all-MiniLM-L6-v2's layers, for a short sentence (25 rows), a batch of 8 (200) and of 32 (800):
//! where the small-batch gap to ONNX Runtime is, kernel by kernel. `--shapes qwen3-0.6b`: the
//! decoder bench's layers (hidden 1024, [q | k | v] 4096, [gate | up] 6144) at 32 x 128 rows.

use std::time::Instant;

use clap::Parser;
use embedd_runtime::kernels;
use serde_json::json;

#[derive(Parser)]
struct Args {
    /// Seconds per shape.
    #[arg(long, default_value_t = 1.0)]
    seconds: f64,
    /// `minilm` (all-MiniLM-L6-v2's layers) or `qwen3-0.6b`.
    #[arg(long, default_value = "minilm")]
    shapes: String,
}

fn main() {
    embedd_runtime::allocator::keep_freed_buffers();
    let args = Args::parse();
    // (name, k, n): qkv, attention output, intermediate, output.
    let (layers, rows): (&[(&str, usize, usize)], &[usize]) = match args.shapes.as_str() {
        "qwen3-0.6b" => (
            &[
                ("qkv", 1024, 4096),
                ("attention-out", 2048, 1024),
                ("gate-up", 1024, 6144),
                ("down", 3072, 1024),
            ],
            &[512, 4096],
        ),
        _ => (
            &[
                ("qkv", 384, 1152),
                ("attention-out", 384, 384),
                ("intermediate", 384, 1536),
                ("output", 1536, 384),
            ],
            &[25, 200, 800],
        ),
    };
    for &m in rows {
        for &(name, k, n) in layers {
            let x: Vec<f32> = (0..m * k)
                .map(|i| ((i % 97) as f32 - 48.0) / 97.0)
                .collect();
            let w: Vec<f32> = (0..k * n)
                .map(|i| ((i % 89) as f32 - 44.0) / 89.0)
                .collect();
            let packed = kernels::bf16::available().then(|| kernels::PackedBf16::pack(&w, k, n));
            let f32_product = || kernels::matmul(&x, m, k, &w, n);
            let mut report = json!({"rows": m, "layer": name, "k": k, "n": n});
            report["f32_gflop_per_s"] = json!(gflop_per_s(args.seconds, m * k * n, f32_product));
            if kernels::PackedF32::available() {
                let packed = kernels::PackedF32::pack(&w, k, n);
                let packed_product = || packed.matmul(&x, m);
                report["f32_packed_gflop_per_s"] =
                    json!(gflop_per_s(args.seconds, m * k * n, packed_product));
            }
            if let Some(packed) = &packed {
                let bf16_product = || packed.matmul(&x, m);
                report["bf16_gflop_per_s"] =
                    json!(gflop_per_s(args.seconds, m * k * n, bf16_product));
            }
            println!("{report}");
        }
    }
}

/// Runs `product` (`multiply_adds` multiply-adds each) for `seconds`.
fn gflop_per_s(seconds: f64, multiply_adds: usize, product: impl Fn() -> Vec<f32>) -> f64 {
    let (mut calls, started) = (0u64, Instant::now());
    while started.elapsed().as_secs_f64() < seconds {
        std::hint::black_box(product());
        calls += 1;
    }
    2.0 * multiply_adds as f64 * calls as f64 / started.elapsed().as_secs_f64() / 1e9
}

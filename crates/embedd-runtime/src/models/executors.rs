//! The fused CPU kernels against candle's graph, family by family, on the fixture checkpoints:
//! the graph is the reference the fused path is held to (and what GPUs run), so each family with
//! both executors gives the same vectors on each, f32 within 1e-5 in cosine, bf16 within 1e-3.

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::batch::PackedBatch;
use crate::checkpoint::Checkpoint;
use crate::models::{load_backbone, ArchitectureConfig, Weights};
use crate::plan::ExecutionPlan;
use crate::tokenize::TokenSequence;
use crate::{DeviceSpec, ModelDir, ModelSource, Precision};

fn fixture(name: &str) -> (ModelDir, ArchitectureConfig) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(name);
    let checkpoint = Checkpoint::open(&ModelSource::Local(path), &[]).unwrap();
    (checkpoint.dir, checkpoint.config)
}

/// The plans a tower is compared under: the graph (the reference, and what GPUs run), the
/// fused f32 kernels, and the bf16 ones where the CPU has them.
fn plans() -> Vec<(&'static str, ExecutionPlan)> {
    let mut plans = vec![
        ("graph", ExecutionPlan::graph(Device::Cpu, DType::F32)),
        (
            "fused f32",
            ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::F32).unwrap(),
        ),
    ];
    if let Ok(bf16) = ExecutionPlan::resolve(DeviceSpec::Cpu, Precision::Bf16) {
        plans.push(("fused bf16", bf16));
    }
    plans
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

/// The lowest cosine to the graph a plan may give: 1e-5 off in f32, 1e-3 in bf16.
fn floor(plan_name: &str) -> f32 {
    if plan_name.contains("bf16") {
        0.999
    } else {
        0.99999
    }
}

fn assert_close(got: &[Vec<f32>], want: &[Vec<f32>], floor: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (g, w) in got.iter().zip(want) {
        let c = cosine(g, w);
        assert!(c >= floor, "{what}: cosine {c}");
    }
}

/// Both image towers (CLIP's ViT and jina-clip-v2's EVA02, whose fused path reorders the
/// rotary channels) give the graph's vectors on the fused kernels, for a batch of images
/// that differ from each other.
#[test]
fn image_towers_agree_across_executors() {
    for name in ["tiny-clip", "tiny-jina-clip-v2"] {
        let (dir, config) = fixture(name);
        let mut reference: Option<Vec<Vec<f32>>> = None;
        for (plan_name, plan) in plans() {
            let weights = Weights::open(&dir, &plan).unwrap();
            let tower = config.load_image_tower(&weights, &plan).unwrap().unwrap();
            let side = tower.image_size();
            let values: Vec<f32> = (0..3 * 3 * side * side)
                .map(|i| {
                    ((i * 7919 % 257) as f32 / 128.0 - 1.0) * (1 + i / (3 * side * side)) as f32
                })
                .collect();
            let pixels = Tensor::from_vec(values, (3, 3, side, side), &Device::Cpu).unwrap();
            let got = tower.embed(&pixels).unwrap().to_vec2::<f32>().unwrap();
            match &reference {
                None => reference = Some(got),
                Some(want) => {
                    assert_close(&got, want, floor(plan_name), &format!("{name} {plan_name}"));
                }
            }
        }
    }
}

/// `name`'s backbone under every plan of [`plans`] gives the graph's token vectors for the
/// sequences `ids`, batched together.
fn backbone_agrees_across_executors(name: &str, ids: Vec<Vec<u32>>) {
    let adapters = vec![None; ids.len()];
    adapted_backbone_agrees_across_executors(name, ids, adapters);
}

/// [`backbone_agrees_across_executors`] with each sequence's task adapter.
fn adapted_backbone_agrees_across_executors(
    name: &str,
    ids: Vec<Vec<u32>>,
    adapters: Vec<Option<usize>>,
) {
    let (dir, config) = fixture(name);
    let sequences: Vec<TokenSequence> = ids
        .into_iter()
        .map(|ids| TokenSequence {
            type_ids: vec![0; ids.len()],
            ids,
        })
        .collect();
    let batch = PackedBatch::new(sequences.iter().collect(), 0).with_adapters(adapters);
    let mut reference: Option<Vec<Vec<f32>>> = None;
    for (plan_name, plan) in plans() {
        let weights = Weights::open(&dir, &plan).unwrap();
        let backbone = load_backbone(&weights, &config, &plan).unwrap();
        let hidden = backbone.forward(&batch).unwrap();
        let got = hidden.states.to_vec2::<f32>().unwrap();
        match &reference {
            None => reference = Some(got),
            Some(want) => {
                assert_close(&got, want, floor(plan_name), &format!("{name} {plan_name}"));
            }
        }
    }
}

/// CLIP's text tower on the fused kernels (causal attention over packed rows) gives the
/// graph's token vectors, for sequences of different lengths in one batch.
#[test]
fn clip_text_tower_agrees_across_executors() {
    let ids = vec![
        vec![49406, 320, 1125, 49407],
        vec![49406, 539, 49407],
        (0..30).map(|i| 300 + i * 7).collect(),
    ];
    backbone_agrees_across_executors("tiny-clip", ids);
}

/// The Llama-style blocks (Qwen3 with per-head q/k norms, Qwen2 with q/k/v biases, both causal;
/// EuroBERT bidirectional; all with grouped key/value heads) on the fused kernels over packed rows
/// give the graph's token vectors for sequences of different lengths in one padded batch.
#[test]
fn decoders_agree_across_executors() {
    for name in ["tiny-qwen3", "tiny-qwen2-code", "tiny-eurobert"] {
        let ids = vec![
            (0..40).map(|i| (10 + i * 13) % 240).collect(),
            vec![5, 6, 7],
            vec![42],
        ];
        backbone_agrees_across_executors(name, ids);
    }
}

/// jina-embeddings-v5's stacked task adapters (rows of four different tasks, one without any)
/// give the graph's token vectors on the fused kernels, on both bases.
#[test]
fn task_adapters_agree_across_executors() {
    for name in ["tiny-jina-v5-small", "tiny-jina-v5-nano"] {
        let ids: Vec<Vec<u32>> = (0..5)
            .map(|s| (0..(7 + 9 * s)).map(|i| (5 + i * 11 + s) % 240).collect())
            .collect();
        let adapters = vec![Some(0), Some(3), None, Some(4), Some(1)];
        adapted_backbone_agrees_across_executors(name, ids, adapters);
    }
}

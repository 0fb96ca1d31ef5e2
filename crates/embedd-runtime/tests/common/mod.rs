//! What the text-image parity suites share: fixture loading, cosine, and the end-to-end check of
//! image files against a reference's preprocessing and vectors.
#![allow(dead_code)]

use std::path::PathBuf;

use embedd_runtime::embedder::{EmbedderSpec, PixelItem};
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

pub fn fixture(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap()
}

/// The architecture family a fixture checkpoint's config.json resolves to.
pub fn family_of(name: &str) -> embedd_runtime::Family {
    let source = ModelSource::Local(fixtures().join("models").join(name));
    embedd_runtime::checkpoint::Checkpoint::open(&source, &[])
        .unwrap()
        .config
        .family()
}

/// A fixture model from tests/fixtures/models, in float32 on the CPU.
pub fn model(name: &str) -> TextEmbedder {
    model_in(name, Precision::F32).unwrap()
}

/// A fixture model in `precision` on the CPU; `None` (said on stderr) for bf16 on a CPU without
/// AVX-512 BF16.
pub fn model_in(name: &str, precision: Precision) -> Option<TextEmbedder> {
    let loaded = TextEmbedder::load(&EmbedderSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision,
        scheduler: SchedulerConfig::default(),
    });
    match loaded {
        Ok(model) => Some(model),
        Err(e) if precision == Precision::Bf16 && !embedd_runtime::kernels::bf16::available() => {
            eprintln!("skipped: {e}");
            None
        }
        Err(e) => panic!("{name}: {e}"),
    }
}

/// Each synthetic image of `fixture_file` through `model`'s tower (pixels in, vector out),
/// against the reference's vector at cosine >= `floor`.
pub fn check_synthetic_images(
    model: &TextEmbedder,
    f: &Value,
    side: usize,
    tokens: usize,
    floor: f32,
) {
    let cases = f["synthetic"].as_array().unwrap();
    let items: Vec<PixelItem> = cases
        .iter()
        .map(|case| synthetic_pixels(case["k"].as_f64().unwrap() as f32, side, tokens))
        .collect();
    let out = runtime().block_on(model.embed_images(items)).unwrap();
    assert_eq!(out.tokens, cases.len() * tokens);
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = cosine(got, &vector(&case["vector"]));
        eprintln!("model only {}: cosine {c}", case["k"]);
        assert!(c >= floor, "synthetic {}: cosine {c}", case["k"]);
    }
}

pub fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).unwrap()
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

/// The fixture's synthetic pixels (`sin(0.05 (k+1) x + 0.03 y + c) * 1.5 + 0.1 k`), model only.
pub fn synthetic_pixels(k: f32, side: usize, tokens: usize) -> PixelItem {
    let mut pixels = Vec::with_capacity(3 * side * side);
    for c in 0..3 {
        for y in 0..side {
            for x in 0..side {
                let v = (0.05 * (k + 1.0) * x as f32 + 0.03 * y as f32 + c as f32).sin();
                pixels.push(v * 1.5 + 0.1 * k);
            }
        }
    }
    PixelItem { pixels, tokens }
}

/// Image files through embedd's decoding and preprocessing, then the tower, beside the
/// reference's: channel means and a sample every `stride` pixels first (JPEG decoders may
/// differ by a level here and there), then the vectors at cosine >= 0.999.
pub fn check_image_files(model: &TextEmbedder, cases: &[Value], side: usize, stride: usize) {
    let bytes: Vec<Vec<u8>> = cases
        .iter()
        .map(|c| {
            std::fs::read(fixtures().join("images").join(c["file"].as_str().unwrap())).unwrap()
        })
        .collect();
    let items: Vec<PixelItem> = model
        .prepare_images(&bytes, 50_000_000)
        .into_iter()
        .map(Result::unwrap)
        .collect();
    for (item, case) in items.iter().zip(cases) {
        let plane = side * side;
        for (c, want) in vector(&case["pixel_mean"]).iter().enumerate() {
            let mean = item.pixels[c * plane..(c + 1) * plane].iter().sum::<f32>() / plane as f32;
            assert!(
                (mean - want).abs() < 0.01,
                "{}: channel {c} mean {mean} vs {want}",
                case["file"]
            );
        }
        let sample = vector(&case["pixel_sample"]);
        let off = item
            .pixels
            .iter()
            .step_by(stride)
            .zip(&sample)
            .filter(|(a, b)| (*a - *b).abs() > 0.05)
            .count();
        assert!(
            off * 20 <= sample.len(),
            "{}: {off} of {} samples off",
            case["file"],
            sample.len()
        );
    }
    let out = runtime().block_on(model.embed_images(items)).unwrap();
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = cosine(got, &vector(&case["vector"]));
        eprintln!("end to end {}: cosine {c}", case["file"]);
        assert!(c >= 0.999, "{}: cosine {c}", case["file"]);
    }
}

/// A fixture of `cases` (text, token count, the reference's vector as the model pools it, each
/// run alone) embedded in one batch: every count equal, every vector at cosine >= 0.9999.
pub fn check_case_vectors(fixture_file: &str, model_name: &str, dimensions: usize) {
    check_case_vectors_in(fixture_file, model_name, dimensions, Precision::F32, 0.9999);
}

/// [`check_case_vectors`] in `precision`, at cosine >= `floor` (nothing to check for bf16
/// on a CPU without it).
pub fn check_case_vectors_in(
    fixture_file: &str,
    model_name: &str,
    dimensions: usize,
    precision: Precision,
    floor: f32,
) {
    let f = fixture(fixture_file);
    let Some(model) = model_in(model_name, precision) else {
        return;
    };
    assert_eq!(model.dimensions(), dimensions);
    let cases = f["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let items = model.prepare(&texts, false).unwrap();
    for (item, case) in items.iter().zip(cases) {
        assert_eq!(item.sequence.len() as u64, case["tokens"].as_u64().unwrap());
    }
    let out = runtime().block_on(model.embed(items)).unwrap();
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = cosine(got, &vector(&case["vector"]));
        eprintln!("{precision:?} {} tokens: cosine {c}", case["tokens"]);
        assert!(c >= floor, "{:?}: cosine {c}", case["text"]);
    }
}

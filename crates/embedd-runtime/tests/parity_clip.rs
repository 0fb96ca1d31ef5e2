//! CLIP (transformers' CLIPModel layout) against the transformers reference on
//! tests/fixtures/clip.json: the text tower, the image tower on pixels alone (model only), and
//! image files through embedd's own decoding and preprocessing (end to end).

use std::path::PathBuf;

use embedd_runtime::embedder::{EmbedderSpec, PixelItem};
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture() -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("clip.json")).unwrap()).unwrap()
}

fn model() -> TextEmbedder {
    TextEmbedder::load(&EmbedderSpec {
        name: "tiny-clip".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-clip")),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    })
    .unwrap()
}

fn vector(v: &Value) -> Vec<f32> {
    serde_json::from_value(v.clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (norm(a) * norm(b))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
}

#[test]
fn text_tower_matches_transformers() {
    let f = fixture();
    let model = model();
    assert!(model.accepts_images());
    assert_eq!((model.dimensions(), model.max_tokens()), (24, 77));
    let cases = f["texts"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    // The long caption is past the 77-token window: refused unless truncation is asked for.
    assert!(model.prepare(&texts, false).is_err());
    let items = model.prepare(&texts, true).unwrap();
    for (item, case) in items.iter().zip(cases) {
        assert_eq!(item.sequence.len() as u64, case["tokens"].as_u64().unwrap());
    }
    let out = runtime().block_on(model.embed(items)).unwrap();
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = cosine(got, &vector(&case["vector"]));
        assert!(c >= 0.9999, "{:?}: cosine {c}", case["text"]);
    }
}

#[test]
fn image_tower_matches_transformers_on_pixels() {
    let f = fixture();
    let model = model();
    let items: Vec<PixelItem> = f["synthetic"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let k = case["k"].as_f64().unwrap() as f32;
            let mut pixels = Vec::with_capacity(3 * 224 * 224);
            for c in 0..3 {
                for y in 0..224 {
                    for x in 0..224 {
                        let v = (0.05 * (k + 1.0) * x as f32 + 0.03 * y as f32 + c as f32).sin();
                        pixels.push(v * 1.5 + 0.1 * k);
                    }
                }
            }
            PixelItem { pixels, tokens: 50 }
        })
        .collect();
    let out = runtime().block_on(model.embed_images(items)).unwrap();
    assert_eq!(
        out.tokens, 150,
        "7 x 7 patches and the class token per image"
    );
    for (got, case) in out.vectors.iter().zip(f["synthetic"].as_array().unwrap()) {
        let c = cosine(got, &vector(&case["vector"]));
        eprintln!("model only {}: cosine {c}", case["k"]);
        assert!(c >= 0.9999, "synthetic {}: cosine {c}", case["k"]);
    }
}

#[test]
fn image_files_match_transformers_end_to_end() {
    let f = fixture();
    let model = model();
    let cases = f["images"].as_array().unwrap();
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
    // Preprocessing alone: channel means and a strided sample of the pixels, beside
    // CLIPImageProcessor's (JPEG decoders may differ by a level here and there).
    for (item, case) in items.iter().zip(cases) {
        let plane = 224 * 224;
        for (c, want) in vector(&case["pixel_mean"]).iter().enumerate() {
            let mean = item.pixels[c * plane..(c + 1) * plane].iter().sum::<f32>() / plane as f32;
            assert!(
                (mean - want).abs() < 0.01,
                "{}: channel {c} mean {mean} vs {want}",
                case["file"]
            );
        }
        let sample = vector(&case["pixel_sample"]);
        let worst = item
            .pixels
            .iter()
            .step_by(997)
            .zip(&sample)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        eprintln!(
            "pixels {}: largest sampled difference {worst}",
            case["file"]
        );
        let off = item
            .pixels
            .iter()
            .step_by(997)
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

#[test]
fn bad_image_bytes_fail_alone() {
    let model = model();
    let good = std::fs::read(fixtures().join("images/logo.png")).unwrap();
    let results = model.prepare_images(&[b"not an image".to_vec(), good.clone(), good], 100);
    assert!(results[0].is_err());
    // 200 x 200 is over a 100-pixel budget.
    assert!(results[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("more than the limit"));
}

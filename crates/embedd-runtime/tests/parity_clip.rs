//! CLIP (transformers' CLIPModel layout) against the transformers reference on
//! tests/fixtures/clip.json: the text tower, the image tower on pixels alone (model only), and
//! image files through embedd's own decoding and preprocessing (end to end).

mod common;

use common::{check_image_files, check_synthetic_images, cosine, fixture, runtime, vector};
use embedd_runtime::{Precision, TextEmbedder};

fn model() -> TextEmbedder {
    common::model("tiny-clip")
}

#[test]
fn text_tower_matches_transformers() {
    check_texts(&model(), 0.9999);
}

fn check_texts(model: &TextEmbedder, floor: f32) {
    let f = fixture("clip.json");
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
        assert!(c >= floor, "{:?}: cosine {c}", case["text"]);
    }
}

#[test]
fn image_tower_matches_transformers_on_pixels() {
    let f = fixture("clip.json");
    // 7 x 7 patches and the class token per image.
    check_synthetic_images(&model(), &f, 224, 50, 0.9999);
}

/// In bf16 (the fused kernels' reduced precision) both towers stay within 0.999.
#[test]
fn bf16_towers_stay_close_to_transformers() {
    let f = fixture("clip.json");
    let Some(model) = common::model_in("tiny-clip", Precision::Bf16) else {
        return;
    };
    check_texts(&model, 0.999);
    check_synthetic_images(&model, &f, 224, 50, 0.999);
    check_image_files(&model, f["images"].as_array().unwrap(), 224, 997);
}

#[test]
fn image_files_match_transformers_end_to_end() {
    let f = fixture("clip.json");
    let model = model();
    check_image_files(&model, f["images"].as_array().unwrap(), 224, 997);
}

#[test]
fn bad_image_bytes_fail_alone() {
    let model = model();
    let good = std::fs::read(common::fixtures().join("images/logo.png")).unwrap();
    let results = model.prepare_images(&[b"not an image".to_vec(), good.clone(), good], 100);
    assert!(results[0].is_err());
    // 200 x 200 is over a 100-pixel budget.
    assert!(results[1]
        .as_ref()
        .unwrap_err()
        .to_string()
        .contains("more than the limit"));
}

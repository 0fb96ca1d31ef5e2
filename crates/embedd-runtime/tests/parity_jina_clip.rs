//! jina-clip-v2's layout (EVA02 vision tower, jina-embeddings-v3 text tower with its LoRA
//! adapter) against the plain-torch reference of tests/fixtures/make_jina_clip_fixture.py (whose
//! EVA tower agrees with timm's): texts with and without a task, pixels alone (model only), and
//! image files through embedd's decoding and the jina processor's preprocessing (end to end).
//! jina-clip-v1's layout (EVA02 in 16-pixel patches, JinaBERT as jina-bert-flash-implementation
//! saves it) against tests/fixtures/make_jina_clip_v1_fixture.py the same way.

mod common;

use common::{check_image_files, check_synthetic_images, cosine, fixture, runtime, vector};
use embedd_runtime::{Precision, TextEmbedder};

#[test]
fn text_tower_matches_the_reference_with_and_without_a_task() {
    let model = common::model("tiny-jina-clip-v2");
    check_texts(&model, "jina_clip.json", 64, 0.9999);
    // The text tower keeps one adapter; other tasks of jina-embeddings-v3 are refused.
    assert!(model
        .prepare_for_task(&["a".to_string()], false, Some("retrieval.passage"))
        .is_err());
}

fn check_texts(model: &TextEmbedder, fixture_file: &str, dimensions: usize, floor: f32) {
    let f = fixture(fixture_file);
    assert!(model.accepts_images());
    assert_eq!((model.dimensions(), model.max_tokens()), (dimensions, 8192));
    let texts: Vec<String> = serde_json::from_value(f["texts"].clone()).unwrap();
    for case in f["text_cases"].as_array().unwrap() {
        let task = case["task"].as_str();
        let items = model.prepare_for_task(&texts, false, task).unwrap();
        let counts: Vec<u64> = serde_json::from_value(case["token_counts"].clone()).unwrap();
        let got_counts: Vec<u64> = items.iter().map(|i| i.sequence.len() as u64).collect();
        assert_eq!(got_counts, counts, "task {task:?}");
        let out = runtime().block_on(model.embed(items)).unwrap();
        for (i, (got, want)) in out
            .vectors
            .iter()
            .zip(case["embeddings"].as_array().unwrap())
            .enumerate()
        {
            let c = cosine(got, &vector(want));
            assert!(c >= floor, "task {task:?}, text {i}: cosine {c}");
        }
    }
}

#[test]
fn eva_tower_matches_the_reference_on_pixels() {
    let f = fixture("jina_clip.json");
    let model = common::model("tiny-jina-clip-v2");
    let side = f["side"].as_u64().unwrap() as usize;
    let tokens = f["tokens_per_image"].as_u64().unwrap() as usize;
    check_synthetic_images(&model, &f, side, tokens, 0.9999);
}

/// In bf16 (the fused kernels' reduced precision) both towers stay within 0.999.
#[test]
fn bf16_towers_stay_close_to_the_reference() {
    let f = fixture("jina_clip.json");
    let Some(model) = common::model_in("tiny-jina-clip-v2", Precision::Bf16) else {
        return;
    };
    let side = f["side"].as_u64().unwrap() as usize;
    let tokens = f["tokens_per_image"].as_u64().unwrap() as usize;
    check_texts(&model, "jina_clip.json", 64, 0.999);
    check_synthetic_images(&model, &f, side, tokens, 0.999);
    check_image_files(&model, f["images"].as_array().unwrap(), side, 97);
}

#[test]
fn image_files_match_the_reference_end_to_end() {
    let f = fixture("jina_clip.json");
    let model = common::model("tiny-jina-clip-v2");
    let side = f["side"].as_u64().unwrap() as usize;
    check_image_files(&model, f["images"].as_array().unwrap(), side, 97);
}

#[test]
fn jina_clip_v1_text_tower_matches_the_reference() {
    check_texts(
        &common::model("tiny-jina-clip-v1"),
        "jina_clip_v1.json",
        48,
        0.9999,
    );
}

#[test]
fn jina_clip_v1_image_tower_matches_the_reference() {
    let f = fixture("jina_clip_v1.json");
    let model = common::model("tiny-jina-clip-v1");
    let side = f["side"].as_u64().unwrap() as usize;
    let tokens = f["tokens_per_image"].as_u64().unwrap() as usize;
    check_synthetic_images(&model, &f, side, tokens, 0.9999);
    check_image_files(&model, f["images"].as_array().unwrap(), side, 97);
}

#[test]
fn jina_clip_v1_bf16_stays_close_to_the_reference() {
    let f = fixture("jina_clip_v1.json");
    let Some(model) = common::model_in("tiny-jina-clip-v1", Precision::Bf16) else {
        return;
    };
    let side = f["side"].as_u64().unwrap() as usize;
    let tokens = f["tokens_per_image"].as_u64().unwrap() as usize;
    check_texts(&model, "jina_clip_v1.json", 48, 0.999);
    check_synthetic_images(&model, &f, side, tokens, 0.999);
}

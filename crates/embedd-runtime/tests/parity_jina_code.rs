//! jina-embeddings-v2-base-code's JinaBERT variant (jina-bert-v2-qk-post-norm: LayerNorms on the
//! query and key projections, a second residual LayerNorm after attention, `up_gated_layer` /
//! `down_layer` feed-forward) against the torch reference in
//! tests/fixtures/make_jina_code_fixture.py, on a random-weight checkpoint saved with the
//! published tensor names and config keys, a 1,800-token input included.

use std::path::PathBuf;

use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::{DeviceSpec, ModelSource, Pooling, Precision, SchedulerConfig, TextEmbedder};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(scheduler: SchedulerConfig) -> TextEmbedder {
    TextEmbedder::load(&EmbedderSpec {
        name: "tiny-jina-code".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-jina-code")),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler,
    })
    .unwrap()
}

fn check(model: &TextEmbedder) {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("jina_code.json")).unwrap())
            .unwrap();
    let texts: Vec<String> = serde_json::from_value(f["texts"].clone()).unwrap();
    let items = model.prepare(&texts, false).unwrap();
    let counts: Vec<u64> = items.iter().map(|i| i.sequence.len() as u64).collect();
    let expected: Vec<u64> = serde_json::from_value(f["token_counts"].clone()).unwrap();
    assert_eq!(counts, expected);
    assert!(
        counts.iter().any(|&c| c > 1500),
        "the fixture has a long input"
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(model.embed(items)).unwrap();
    for (i, (ours, theirs)) in out
        .vectors
        .iter()
        .zip(f["embeddings"].as_array().unwrap())
        .enumerate()
    {
        let theirs: Vec<f64> = serde_json::from_value(theirs.clone()).unwrap();
        if theirs.iter().all(|v| *v == 0.0) {
            continue;
        }
        let dot: f64 = ours.iter().zip(&theirs).map(|(a, b)| *a as f64 * b).sum();
        let na = ours.iter().map(|a| (*a as f64).powi(2)).sum::<f64>().sqrt();
        let nb = theirs.iter().map(|b| b.powi(2)).sum::<f64>().sqrt();
        let c = dot / (na * nb);
        assert!(c >= 0.9999, "text {i} ({} tokens): cosine {c}", counts[i]);
    }
}

#[test]
fn the_checkpoint_has_the_published_layout() {
    let dir = fixtures().join("models/tiny-jina-code");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(config["auto_map"]["AutoModel"]
        .as_str()
        .unwrap()
        .starts_with("jinaai/jina-bert-v2-qk-post-norm"));
    assert_eq!(config["position_embedding_type"], "alibi");
    let model = load(SchedulerConfig::default());
    assert_eq!(model.max_tokens(), 8192);
    assert_eq!(model.pooling(), Pooling::Mean);
}

#[test]
fn qk_post_norm_embeddings_match_the_reference() {
    check(&load(SchedulerConfig::default()));
}

#[test]
fn qk_post_norm_embeddings_do_not_depend_on_batching() {
    check(&load(SchedulerConfig {
        max_batch_tokens: 64,
        max_batch_size: 2,
        max_queued_items: 1000,
        max_background_batch_size: 2,
    }));
}

//! T5 encoder sentence embedders (relu and gated-gelu feed-forwards) against transformers'
//! T5EncoderModel + mean pooling, on tests/fixtures/t5.json.

use std::path::PathBuf;

use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::{DeviceSpec, ModelSource, Precision, SchedulerConfig, TextEmbedder};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn check(name: &str) {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("t5.json")).unwrap())
            .unwrap();
    let model = TextEmbedder::load(&EmbedderSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        pooling: None,
        // T5 has no position table: a longer limit than sentence_bert_config's 512 is allowed.
        max_tokens: Some(2048),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    })
    .unwrap();
    assert_eq!(model.max_tokens(), 2048);
    let texts: Vec<String> = serde_json::from_value(f["texts"].clone()).unwrap();
    let items = model.prepare(&texts, false).unwrap();
    let counts: Vec<u64> = items.iter().map(|i| i.sequence.len() as u64).collect();
    assert_eq!(
        counts,
        serde_json::from_value::<Vec<u64>>(f["token_counts"].clone()).unwrap()
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let out = rt.block_on(model.embed(items)).unwrap();
    let reference: Vec<Vec<f64>> = serde_json::from_value(f["models"][name].clone()).unwrap();
    for (i, (a, b)) in out.vectors.iter().zip(&reference).enumerate() {
        let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
        let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        let nb = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
        let c = dot / (na * nb);
        assert!(
            c >= 0.9999,
            "{name} text {i} ({} tokens): cosine {c}",
            counts[i]
        );
    }
}

#[test]
fn t5_relu_encoder_matches_transformers() {
    check("tiny-t5-relu");
}

#[test]
fn t5_gated_gelu_encoder_matches_transformers() {
    check("tiny-t5-gated");
}

#[test]
fn t5_defaults_to_its_sentence_transformers_length() {
    let model = TextEmbedder::load(&EmbedderSpec {
        name: "t5".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-t5-relu")),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    })
    .unwrap();
    assert_eq!(model.max_tokens(), 512);
}

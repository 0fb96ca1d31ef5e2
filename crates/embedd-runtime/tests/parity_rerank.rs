//! Cross-encoders (BERT and XLM-RoBERTa heads, random weights saved by `transformers`) against the
//! transformers reference scores in tests/fixtures/rerank.json.

use std::path::PathBuf;

use embedd_runtime::reranker::RerankerSpec;
use embedd_runtime::{CrossEncoder, DeviceSpec, ModelSource, RuntimeError, SchedulerConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(name: &str, scheduler: SchedulerConfig) -> CrossEncoder {
    CrossEncoder::load(&RerankerSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        max_tokens: None,
        device: DeviceSpec::Cpu,
        scheduler,
    })
    .unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn ranking(scores: &[f64]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    order
}

fn check(name: &str, scheduler: SchedulerConfig) {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("rerank.json")).unwrap())
            .unwrap();
    let model = load(name, scheduler);
    let reference = &f["models"][name];
    assert_eq!(
        model.max_tokens() as u64,
        reference["max_tokens"].as_u64().unwrap()
    );
    let queries = strings(&f["queries"]);
    let documents = strings(&f["documents"]);
    assert!(queries.len() >= 20 && documents.len() >= 20);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let mut worst = 0.0f64;
    for (q, query) in queries.iter().enumerate() {
        let pairs = model.prepare(query, &documents).unwrap();
        assert!(pairs.iter().all(|p| p.len() <= model.max_tokens()));
        let ours: Vec<f64> = rt
            .block_on(model.score(pairs))
            .unwrap()
            .scores
            .iter()
            .map(|s| *s as f64)
            .collect();
        let theirs: Vec<f64> = reference["scores"][q]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        for (d, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            worst = worst.max((a - b).abs());
            assert!((a - b).abs() < 1e-4, "{name} query {q} doc {d}: {a} vs {b}");
        }
        assert_eq!(ranking(&ours), ranking(&theirs), "{name} query {q}");
    }
    eprintln!("{name}: largest score difference {worst:.2e}");
}

#[test]
fn bert_cross_encoder_matches_transformers() {
    check("tiny-bert-cross-encoder", SchedulerConfig::default());
}

#[test]
fn xlm_roberta_cross_encoder_matches_transformers() {
    check("tiny-xlm-roberta-cross-encoder", SchedulerConfig::default());
}

#[test]
fn scores_do_not_depend_on_batching() {
    let tiny = SchedulerConfig {
        max_batch_tokens: 200,
        max_batch_size: 3,
        max_queued_items: 10_000,
        max_background_batch_size: 8,
    };
    check("tiny-bert-cross-encoder", tiny);
    check("tiny-xlm-roberta-cross-encoder", tiny);
}

#[test]
fn a_query_filling_the_window_is_refused() {
    let model = load("tiny-bert-cross-encoder", SchedulerConfig::default());
    let long_query = "word ".repeat(200);
    match model.prepare(&long_query, &["doc".to_string()]) {
        Err(RuntimeError::QueryTooLong { tokens, max }) => {
            assert_eq!(max, 128);
            assert!(tokens > 128);
        }
        other => panic!("expected QueryTooLong, got {other:?}"),
    }
    // A long document is cut, the query kept whole.
    let pairs = model
        .prepare("short query", &["word ".repeat(500)])
        .unwrap();
    assert_eq!(pairs[0].len(), 128);
}

//! Cross-encoders (BERT and XLM-RoBERTa heads, random weights saved by `transformers`) against the
//! transformers reference scores in tests/fixtures/rerank.json; jina-reranker-v2's flash layout
//! (fused Wqkv, norm1/norm2, mlp.fc1/fc2, emb_ln, no model_type) against rerank_v2.json.

use std::path::PathBuf;

use embedd_runtime::reranker::RerankerSpec;
use embedd_runtime::{
    CrossEncoder, DeviceSpec, ModelSource, Precision, RuntimeError, SchedulerConfig,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load(name: &str, scheduler: SchedulerConfig) -> CrossEncoder {
    load_as(name, scheduler, Precision::F32)
}

fn load_as(name: &str, scheduler: SchedulerConfig, precision: Precision) -> CrossEncoder {
    CrossEncoder::load(&RerankerSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision,
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
    check_within(name, scheduler, Precision::F32, 1e-4, 0.0);
}

/// The fixture file that holds `name`'s reference scores.
fn fixture_of(name: &str) -> &'static str {
    if name == "tiny-jina-reranker-v2" {
        "rerank_v2.json"
    } else {
        "rerank.json"
    }
}

/// Scores within `tolerance` of the reference and the same order for every query, except that
/// documents whose reference scores are within `tie` of each other may trade places.
fn check_within(
    name: &str,
    scheduler: SchedulerConfig,
    precision: Precision,
    tolerance: f64,
    tie: f64,
) {
    let f: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join(fixture_of(name))).unwrap())
            .unwrap();
    let model = load_as(name, scheduler, precision);
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
            assert!(
                (a - b).abs() < tolerance,
                "{name} query {q} doc {d}: {a} vs {b}"
            );
        }
        if tie == 0.0 {
            assert_eq!(ranking(&ours), ranking(&theirs), "{name} query {q}");
        }
        for a in 0..ours.len() {
            for b in 0..ours.len() {
                if theirs[a] - theirs[b] > tie {
                    assert!(
                        ours[a] > ours[b],
                        "{name} query {q}: doc {a} ({}) should rank above doc {b} ({})",
                        ours[a],
                        ours[b]
                    );
                }
            }
        }
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
fn jina_reranker_v2_layout_matches_transformers() {
    check("tiny-jina-reranker-v2", SchedulerConfig::default());
}

/// The cross-encoder fixtures the reduced-precision checks run on.
const CROSS_ENCODERS: [&str; 3] = [
    "tiny-bert-cross-encoder",
    "tiny-xlm-roberta-cross-encoder",
    "tiny-jina-reranker-v2",
];

#[test]
fn bf16_keeps_the_rerank_order() {
    if !embedd_runtime::kernels::bf16::available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    for name in CROSS_ENCODERS {
        // The fixture's models have random weights, so their scores crowd together (gaps of
        // 4e-4 occur); bf16 moves these scores by up to 7e-3, so only near-ties may swap.
        check_within(
            name,
            SchedulerConfig::default(),
            Precision::Bf16,
            1e-2,
            5e-3,
        );
    }
}

#[test]
fn int8_keeps_the_rerank_order() {
    if !embedd_runtime::kernels::int8::available() {
        eprintln!("skipped: this CPU has no AVX-512 VNNI");
        return;
    }
    for name in CROSS_ENCODERS {
        // The int8 cross-encoder path end to end (calibration on pair inputs included). These
        // toy models (hidden size 32, random weights) are int8's worst case: each column's one
        // group holds its whole input and two outlier channels are all one in 16 allows, so
        // scores move by up to 2.3e-2 (bf16 7e-3) and only pairs further apart than that must
        // keep their order. The real-weight order check is parity_minilm's.
        check_within(
            name,
            SchedulerConfig::default(),
            Precision::Int8,
            3e-2,
            3e-2,
        );
    }
}

#[test]
fn scores_do_not_depend_on_batching() {
    let tiny = SchedulerConfig {
        max_batch_tokens: 200,
        max_batch_size: 3,
        max_queued_items: 10_000,
        max_background_batch_size: 8,
        max_queue_wait: None,
    };
    check("tiny-bert-cross-encoder", tiny);
    check("tiny-xlm-roberta-cross-encoder", tiny);
    check("tiny-jina-reranker-v2", tiny);
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

//! JinaBERT (ALiBi, gated GELU feed-forward) against the torch reference written from the
//! published architecture (tests/fixtures/make_jina_bert_fixture.py), on random-weight checkpoints
//! saved with the hub's tensor names and config keys, including a 4,000-token input; and
//! jina-embeddings-v2-base-code's variant (jina-bert-v2-qk-post-norm: LayerNorms on the query and
//! key projections, a second residual LayerNorm after attention, `up_gated_layer` / `down_layer`)
//! against tests/fixtures/make_jina_code_fixture.py, with a 2,000-token input; and
//! jina-embeddings-v3 (XLM-RoBERTa with rotary embeddings and per-task LoRA adapters, bfloat16
//! weights under the flash implementation's names) against tests/fixtures/make_jina_v3_fixture.py,
//! with every task and a 3,000-token input.

use std::path::PathBuf;

use embedd_runtime::embedder::EmbedderSpec;
use embedd_runtime::reranker::RerankerSpec;
use embedd_runtime::{
    CrossEncoder, DeviceSpec, ModelSource, Pooling, Precision, SchedulerConfig, TextEmbedder,
};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn fixture() -> Value {
    fixture_named("jina_bert.json")
}

fn fixture_named(name: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(name)).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn cosine(a: &[f32], b: &[f64]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * y).sum();
    let na = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb = b.iter().map(|y| y.powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn embedder(scheduler: SchedulerConfig) -> TextEmbedder {
    embedder_named("tiny-jina-bert", scheduler)
}

fn embedder_named(name: &str, scheduler: SchedulerConfig) -> TextEmbedder {
    embedder_in(name, scheduler, Precision::F32)
}

fn embedder_in(name: &str, scheduler: SchedulerConfig, precision: Precision) -> TextEmbedder {
    TextEmbedder::load(&EmbedderSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        pooling: None,
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision,
        scheduler,
    })
    .unwrap()
}

fn check_embeddings(model: &TextEmbedder) {
    check_embeddings_against(model, &fixture(), 4000);
}

/// Every vector at cosine >= 0.9999 with the fixture's, which has an input over `long` tokens.
fn check_embeddings_against(model: &TextEmbedder, f: &Value, long: u64) {
    let texts = strings(&f["texts"]);
    let items = model.prepare(&texts, false).unwrap();
    let counts: Vec<u64> = items.iter().map(|i| i.sequence.len() as u64).collect();
    let expected: Vec<u64> = serde_json::from_value(f["token_counts"].clone()).unwrap();
    assert_eq!(counts, expected);
    assert!(
        counts.iter().any(|&c| c > long),
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
        let c = cosine(ours, &theirs);
        assert!(c >= 0.9999, "text {i} ({} tokens): cosine {c}", counts[i]);
    }
}

#[test]
fn jina_bert_embeddings_match_the_reference() {
    let model = embedder(SchedulerConfig::default());
    assert_eq!(
        model.max_tokens(),
        8192,
        "ALiBi models take their configured 8192 tokens"
    );
    assert_eq!(model.pooling(), Pooling::Mean);
    assert_eq!(model.dimensions(), 48);
    check_embeddings(&model);
}

#[test]
fn padding_in_shared_batches_does_not_change_alibi_models() {
    // Short inputs padded to one another's length in one batch.
    check_embeddings(&embedder(SchedulerConfig {
        max_batch_tokens: 64,
        max_batch_size: 4,
        max_queued_items: 1000,
        max_background_batch_size: 4,
        max_queue_wait: None,
    }));
}

#[test]
fn jina_reranker_layout_scores_match_the_reference() {
    let f = fixture();
    let model = CrossEncoder::load(&RerankerSpec {
        name: "tiny-jina-reranker".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-jina-reranker")),
        max_tokens: None,
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    })
    .unwrap();
    let docs = strings(&f["documents"]);
    let pairs = model.prepare(f["query"].as_str().unwrap(), &docs).unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let scores = rt.block_on(model.score(pairs)).unwrap().scores;
    let expected: Vec<f64> = serde_json::from_value(f["scores"].clone()).unwrap();
    for (i, (a, b)) in scores.iter().zip(&expected).enumerate() {
        assert!((*a as f64 - b).abs() < 1e-4, "doc {i}: {a} vs {b}");
    }
}

#[test]
fn jina_colbert_layout_token_vectors_match_the_reference() {
    use embedd_runtime::colbert::{ColbertSpec, Side};
    use embedd_runtime::ColbertModel;
    let f = fixture();
    let model = ColbertModel::load(&ColbertSpec {
        name: "tiny-jina-colbert".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-jina-colbert")),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    })
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    for (side, texts, vectors) in [
        (Side::Query, "colbert_queries", "colbert_query_vectors"),
        (
            Side::Document,
            "colbert_documents",
            "colbert_document_vectors",
        ),
    ] {
        let items = model.prepare(&strings(&f[texts]), side).unwrap();
        let ours = rt.block_on(model.embed(items)).unwrap().vectors;
        let theirs: Vec<Vec<Vec<f64>>> = serde_json::from_value(f[vectors].clone()).unwrap();
        assert_eq!(ours.len(), theirs.len());
        for (i, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            assert_eq!(a.len(), b.len(), "{texts} {i}: token count");
            for (t, (x, y)) in a.iter().zip(b).enumerate() {
                let c = cosine(x, y);
                assert!(c >= 0.9999, "{texts} {i} token {t}: cosine {c}");
            }
        }
    }
}

const SMALL_BATCHES: SchedulerConfig = SchedulerConfig {
    max_batch_tokens: 64,
    max_batch_size: 2,
    max_queued_items: 1000,
    max_background_batch_size: 2,
    max_queue_wait: None,
};

#[test]
fn jina_code_checkpoint_has_the_published_layout() {
    let dir = fixtures().join("models/tiny-jina-code");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(config["auto_map"]["AutoModel"]
        .as_str()
        .unwrap()
        .starts_with("jinaai/jina-bert-v2-qk-post-norm"));
    assert_eq!(config["position_embedding_type"], "alibi");
    let model = embedder_named("tiny-jina-code", SchedulerConfig::default());
    assert_eq!(model.max_tokens(), 8192);
    assert_eq!(model.pooling(), Pooling::Mean);
}

#[test]
fn jina_code_embeddings_match_the_reference_in_any_batching() {
    let f = fixture_named("jina_code.json");
    for scheduler in [SchedulerConfig::default(), SMALL_BATCHES] {
        check_embeddings_against(&embedder_named("tiny-jina-code", scheduler), &f, 1500);
    }
}

/// One case of jina_v3.json: its task, its items as the model prepares them, the reference.
struct V3Case {
    task: Option<String>,
    items: Vec<embedd_runtime::embedder::EncodeItem>,
    expected: Vec<Vec<f64>>,
}

fn jina_v3_cases(model: &TextEmbedder, f: &Value) -> Vec<V3Case> {
    let texts = strings(&f["texts"]);
    f["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|case| {
            let task = case["task"].as_str().map(str::to_string);
            let items = model
                .prepare_for_task(&texts, false, task.as_deref())
                .unwrap();
            let counts: Vec<u64> = items.iter().map(|i| i.sequence.len() as u64).collect();
            let expected: Vec<u64> = serde_json::from_value(case["token_counts"].clone()).unwrap();
            assert_eq!(
                counts, expected,
                "task {task:?}: the instruction is prefixed"
            );
            V3Case {
                task,
                items,
                expected: serde_json::from_value(case["embeddings"].clone()).unwrap(),
            }
        })
        .collect()
}

fn assert_close(task: &Option<String>, ours: &[Vec<f32>], theirs: &[Vec<f64>]) {
    assert_within(0.9999, task, ours, theirs);
}

fn assert_within(min: f64, task: &Option<String>, ours: &[Vec<f32>], theirs: &[Vec<f64>]) {
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        let c = cosine(a, b);
        assert!(c >= min, "task {task:?}, text {i}: cosine {c}");
    }
}

#[test]
fn jina_v3_checkpoint_has_the_published_layout() {
    let dir = fixtures().join("models/tiny-jina-v3");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    assert!(config["auto_map"]["AutoModel"]
        .as_str()
        .unwrap()
        .ends_with("modeling_lora.XLMRobertaLoRA"));
    assert_eq!(config["position_embedding_type"], "rotary");
    assert_eq!(config["torch_dtype"], "bfloat16");
    let model = embedder_named("tiny-jina-v3", SchedulerConfig::default());
    assert_eq!(
        model.max_tokens(),
        8192,
        "8194 positions less XLM-R's offset"
    );
    assert_eq!(model.pooling(), Pooling::Mean);
    assert_eq!(
        model.tasks(),
        [
            "retrieval.query",
            "retrieval.passage",
            "separation",
            "classification",
            "text-matching"
        ]
    );
    let refused = model.prepare_for_task(&["x".to_string()], false, Some("summarization"));
    assert!(
        matches!(
            refused,
            Err(embedd_runtime::RuntimeError::UnknownTask { .. })
        ),
        "a task without an adapter is refused"
    );
}

#[test]
fn jina_v3_embeddings_match_the_reference_for_every_task() {
    let f = fixture_named("jina_v3.json");
    let model = embedder_named("tiny-jina-v3", SchedulerConfig::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    for case in jina_v3_cases(&model, &f) {
        let long = case.items.iter().any(|i| i.sequence.len() > 3000);
        assert!(long, "a long input");
        let ours = rt.block_on(model.embed(case.items)).unwrap().vectors;
        assert_close(&case.task, &ours, &case.expected);
    }
}

#[test]
fn jina_v3_tasks_mix_in_one_batch() {
    // Every task's items in one submission: batches hold rows of different adapters, and with
    // small batches, rows of different lengths padded together.
    let f = fixture_named("jina_v3.json");
    for scheduler in [SchedulerConfig::default(), SMALL_BATCHES] {
        let model = embedder_named("tiny-jina-v3", scheduler);
        let cases = jina_v3_cases(&model, &f);
        let all: Vec<_> = cases.iter().flat_map(|c| c.items.clone()).collect();
        let rt = tokio::runtime::Runtime::new().unwrap();
        let ours = rt.block_on(model.embed(all)).unwrap().vectors;
        let mut at = 0;
        for case in &cases {
            let n = case.items.len();
            assert_close(&case.task, &ours[at..at + n], &case.expected);
            at += n;
        }
    }
}

#[test]
fn jina_v3_in_bf16_keeps_cosine_0_999_for_every_task() {
    if !embedd_runtime::kernels::bf16::available() {
        eprintln!("skipped: this CPU has no AVX-512 BF16");
        return;
    }
    let f = fixture_named("jina_v3.json");
    let model = embedder_in("tiny-jina-v3", SchedulerConfig::default(), Precision::Bf16);
    let rt = tokio::runtime::Runtime::new().unwrap();
    for case in jina_v3_cases(&model, &f) {
        let ours = rt.block_on(model.embed(case.items)).unwrap().vectors;
        assert_within(0.999, &case.task, &ours, &case.expected);
    }
}

//! ColBERT (random-weight checkpoint in the colbertv2.0 layout) against the reference
//! implementation, colbert-ai's Checkpoint, on tests/fixtures/colbert.json; and jina-colbert-v2's
//! layout (flash XLM-RoBERTa with rotary positions, XLM-R special tokens, query expansion that
//! attends to its `<mask>` padding) against the plain-torch reference of
//! tests/fixtures/make_jina_colbert_v2_fixture.py, on tests/fixtures/jina_colbert_v2.json.

use std::path::PathBuf;

use embedd_runtime::colbert::{ColbertSpec, Side};
use embedd_runtime::{max_sim, ColbertModel, DeviceSpec, ModelSource, Precision, SchedulerConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load() -> ColbertModel {
    load_named("tiny-colbert", Precision::F32)
}

fn load_named(name: &str, precision: Precision) -> ColbertModel {
    ColbertModel::load(&ColbertSpec {
        name: name.into(),
        source: ModelSource::Local(fixtures().join("models").join(name)),
        device: DeviceSpec::Cpu,
        precision,
        scheduler: SchedulerConfig {
            max_batch_tokens: 256,
            max_batch_size: 4,
            max_queued_items: 1000,
            max_background_batch_size: 8,
            max_queue_wait: None,
        },
    })
    .unwrap()
}

fn fixture() -> Value {
    fixture_named("colbert.json")
}

fn fixture_named(file: &str) -> Value {
    serde_json::from_str(&std::fs::read_to_string(fixtures().join(file)).unwrap()).unwrap()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

fn matrices(v: &Value) -> Vec<Vec<Vec<f32>>> {
    serde_json::from_value(v.clone()).unwrap()
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let n = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (n(a) * n(b))
}

fn embed(model: &ColbertModel, texts: &[String], side: Side) -> Vec<Vec<Vec<f32>>> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(model.embed(model.prepare(texts, side).unwrap()))
        .unwrap()
        .vectors
}

fn compare(ours: &[Vec<Vec<f32>>], theirs: &[Vec<Vec<f32>>], what: &str) {
    let lowest = compare_within(ours, theirs, what, 0.9999);
    eprintln!("{what}: lowest cosine {lowest}");
}

/// Every token vector at least `floor` in cosine to the reference's, and unit length.
fn compare_within(ours: &[Vec<Vec<f32>>], theirs: &[Vec<Vec<f32>>], what: &str, floor: f64) -> f64 {
    assert_eq!(ours.len(), theirs.len());
    let mut lowest = 1.0f64;
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "{what} {i}: token count");
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            let c = cosine(x, y);
            assert!(c >= floor, "{what} {i} token {t}: cosine {c}");
            lowest = lowest.min(c);
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "{what} {i} token {t} not unit length"
            );
        }
    }
    lowest
}

#[test]
fn query_vectors_match_the_reference() {
    let f = fixture();
    let model = load();
    assert_eq!(model.dimensions(), 16);
    let ours = embed(&model, &strings(&f["queries"]), Side::Query);
    compare(&ours, &matrices(&f["query_vectors"]), "query");
    assert!(
        ours.iter().all(|q| q.len() == 32),
        "queries padded to query_maxlen"
    );
}

#[test]
fn document_vectors_match_the_reference() {
    let f = fixture();
    let model = load();
    let ours = embed(&model, &strings(&f["documents"]), Side::Document);
    compare(&ours, &matrices(&f["document_vectors"]), "document");
}

#[test]
fn max_sim_ranks_documents_as_the_reference_vectors_do() {
    let f = fixture();
    let model = load();
    let documents = strings(&f["documents"]);
    let doc_vectors = embed(&model, &documents, Side::Document);
    // Ranking with our vectors and with the reference vectors gives the same order.
    let reference_docs = matrices(&f["document_vectors"]);
    let reference_queries = matrices(&f["query_vectors"]);
    for (q, query) in strings(&f["queries"]).iter().enumerate() {
        let qv = embed(&model, std::slice::from_ref(query), Side::Query).remove(0);
        let rank = |qv: &[Vec<f32>], docs: &[Vec<Vec<f32>>]| {
            let mut order: Vec<(usize, f32)> =
                docs.iter().map(|d| max_sim(qv, d)).enumerate().collect();
            order.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            order.into_iter().map(|(i, _)| i).collect::<Vec<_>>()
        };
        assert_eq!(
            rank(&qv, &doc_vectors),
            rank(&reference_queries[q], &reference_docs),
            "query {q}"
        );
    }
}

#[test]
fn jina_colbert_v2_token_vectors_match_the_reference_in_f32_and_bf16() {
    let f = fixture_named("jina_colbert_v2.json");
    let queries = strings(&f["queries"]);
    let documents = strings(&f["documents"]);
    for (precision, floor) in [(Precision::F32, 0.9999), (Precision::Bf16, 0.999)] {
        let model = load_named("tiny-jina-colbert-v2", precision);
        assert_eq!(model.dimensions(), 128);
        assert!(model.settings().attend_to_mask_tokens);
        let what = format!("{precision:?}");
        let ours = embed(&model, &queries, Side::Query);
        assert!(ours.iter().all(|q| q.len() == 32), "queries padded to 32");
        let q = compare_within(&ours, &matrices(&f["query_vectors"]), "query", floor);
        let ours = embed(&model, &documents, Side::Document);
        let d = compare_within(&ours, &matrices(&f["document_vectors"]), "document", floor);
        eprintln!("{what}: lowest cosine, queries {q}, documents {d}");
        // The ~1,000-token document runs whole, and spaced punctuation is left out.
        let tokens: Vec<usize> = serde_json::from_value(f["document_tokens"].clone()).unwrap();
        assert!(tokens[6] > 1000 && ours[6].len() == tokens[6], "{tokens:?}");
        assert!(ours[5].len() < tokens[5], "punctuation kept: {tokens:?}");
    }
}

#[test]
fn markers_absent_from_the_vocabulary_fall_back_to_the_xlm_r_names() {
    // colbert-ai's default markers ([unused0]/[unused1]) are not in an XLM-R vocabulary; such a
    // metadata file still serves with jina-colbert-v2's [QueryMarker]/[DocumentMarker].
    let source = fixtures().join("models/tiny-jina-colbert-v2");
    let dir = std::env::temp_dir().join(format!("embedd-colbert-markers-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for file in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(source.join(file), dir.join(file)).unwrap();
    }
    let mut metadata: Value =
        serde_json::from_str(&std::fs::read_to_string(source.join("artifact.metadata")).unwrap())
            .unwrap();
    metadata["query_token_id"] = "[unused0]".into();
    metadata["doc_token_id"] = "[unused1]".into();
    std::fs::write(dir.join("artifact.metadata"), metadata.to_string()).unwrap();
    let spec = |source: PathBuf| ColbertSpec {
        name: "markers".into(),
        source: ModelSource::Local(source),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
        scheduler: SchedulerConfig::default(),
    };
    let fallback = ColbertModel::load(&spec(dir.clone())).unwrap();
    let named = ColbertModel::load(&spec(source)).unwrap();
    let texts = vec!["what is late interaction?".to_string()];
    for side in [Side::Query, Side::Document] {
        let a = fallback.prepare(&texts, side).unwrap();
        let b = named.prepare(&texts, side).unwrap();
        assert_eq!(a[0].sequence.ids, b[0].sequence.ids, "{side:?}");
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

//! ColBERT (random-weight checkpoint in the colbertv2.0 layout) against the reference
//! implementation, colbert-ai's Checkpoint, on tests/fixtures/colbert.json.

use std::path::PathBuf;

use embedd_runtime::colbert::{ColbertSpec, Side};
use embedd_runtime::{max_sim, ColbertModel, DeviceSpec, ModelSource, Precision, SchedulerConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn load() -> ColbertModel {
    ColbertModel::load(&ColbertSpec {
        name: "tiny-colbert".into(),
        source: ModelSource::Local(fixtures().join("models/tiny-colbert")),
        device: DeviceSpec::Cpu,
        precision: Precision::F32,
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
    serde_json::from_str(&std::fs::read_to_string(fixtures().join("colbert.json")).unwrap())
        .unwrap()
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
    assert_eq!(ours.len(), theirs.len());
    for (i, (a, b)) in ours.iter().zip(theirs).enumerate() {
        assert_eq!(a.len(), b.len(), "{what} {i}: token count");
        for (t, (x, y)) in a.iter().zip(b).enumerate() {
            let c = cosine(x, y);
            assert!(c >= 0.9999, "{what} {i} token {t}: cosine {c}");
            let norm = x.iter().map(|v| v * v).sum::<f32>().sqrt();
            assert!(
                (norm - 1.0).abs() < 1e-5,
                "{what} {i} token {t} not unit length"
            );
        }
    }
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

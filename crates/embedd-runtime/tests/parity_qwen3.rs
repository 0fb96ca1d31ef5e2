//! Qwen3 as a decoder embedder against transformers' `Qwen3Model` on tests/fixtures/qwen3.json:
//! the last token's vector of each text, batched with padding (the reference ran each alone), a
//! 638-token text included.

mod common;

use common::{cosine, fixture, runtime, vector};

#[test]
fn last_token_vectors_match_transformers() {
    common::check_case_vectors("qwen3.json", "tiny-qwen3", 64);
}

/// In bf16 (the fused kernels' reduced precision) the vectors stay within 0.999, the long text
/// included.
#[test]
fn bf16_last_token_vectors_stay_close_to_transformers() {
    common::check_case_vectors_in(
        "qwen3.json",
        "tiny-qwen3",
        64,
        embedd_runtime::Precision::Bf16,
        0.999,
    );
}

/// `task: retrieval.query` puts the checkpoint's sentence-transformers `query` prompt in front,
/// as Qwen3-Embedding expects of queries; documents get none.
#[test]
fn the_query_task_brings_the_query_prompt() {
    let f = fixture("qwen3.json");
    let model = common::model("tiny-qwen3");
    let prompted = &f["cases"][3];
    let items = model
        .prepare_for_task(
            &["what is rope".to_string()],
            false,
            Some("retrieval.query"),
        )
        .unwrap();
    assert_eq!(
        items[0].sequence.len() as u64,
        prompted["tokens"].as_u64().unwrap()
    );
    let out = runtime().block_on(model.embed(items)).unwrap();
    let c = cosine(&out.vectors[0], &vector(&prompted["vector"]));
    assert!(c >= 0.9999, "cosine {c}");
    let plain = model
        .prepare_for_task(
            &["what is rope".to_string()],
            false,
            Some("retrieval.passage"),
        )
        .unwrap();
    assert!(plain[0].sequence.len() < prompted["tokens"].as_u64().unwrap() as usize);
}

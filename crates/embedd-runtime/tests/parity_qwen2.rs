//! Qwen2 (jina-code-embeddings' layout: biased q/k/v, no q/k norm, eight query heads sharing two
//! key/value heads) against transformers' `Qwen2Model` on tests/fixtures/qwen2_code.json: the
//! last token's vector of each text, batched with padding (the reference ran each alone), a
//! 2,020-token text included; the code tasks put the checkpoint's prompts in front.

mod common;

use common::{cosine, fixture, runtime, vector};

#[test]
fn last_token_vectors_match_transformers() {
    common::check_case_vectors("qwen2_code.json", "tiny-qwen2-code", 64);
}

/// In bf16 (the fused kernels' reduced precision) the vectors stay within 0.999, the long text
/// included.
#[test]
fn bf16_last_token_vectors_stay_close_to_transformers() {
    common::check_case_vectors_in(
        "qwen2_code.json",
        "tiny-qwen2-code",
        64,
        embedd_runtime::Precision::Bf16,
        0.999,
    );
}

/// `nl2code.query` and `nl2code.passage` (and plain `retrieval.query` / `retrieval.passage`,
/// which code search maps to them) bring the checkpoint's prompts, in one batch.
#[test]
fn code_tasks_bring_their_prompts() {
    let f = fixture("qwen2_code.json");
    let model = common::model("tiny-qwen2-code");
    let (query, passage) = (&f["cases"][3], &f["cases"][4]);
    for (task, text, case) in [
        ("nl2code.query", "sort a list in place", query),
        ("retrieval.query", "sort a list in place", query),
        ("nl2code.passage", "xs.sort()", passage),
        ("retrieval.passage", "xs.sort()", passage),
    ] {
        let items = model
            .prepare_for_task(&[text.to_string()], false, Some(task))
            .unwrap();
        assert_eq!(
            items[0].sequence.len() as u64,
            case["tokens"].as_u64().unwrap(),
            "{task}"
        );
        let out = runtime().block_on(model.embed(items)).unwrap();
        let c = cosine(&out.vectors[0], &vector(&case["vector"]));
        assert!(c >= 0.9999, "{task}: cosine {c}");
    }
    let other = model
        .prepare_for_task(&["xs.sort()".to_string()], false, Some("code2nl.query"))
        .unwrap();
    assert!(other[0].sequence.len() as u64 > passage["tokens"].as_u64().unwrap());
}

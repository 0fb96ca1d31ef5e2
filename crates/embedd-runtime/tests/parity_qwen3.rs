//! Qwen3 as a decoder embedder against transformers' `Qwen3Model` on tests/fixtures/qwen3.json:
//! the last token's vector of each text, batched with padding (the reference ran each alone), a
//! 638-token text included.

mod common;

use common::{cosine, fixture, runtime, vector};

#[test]
fn last_token_vectors_match_transformers() {
    let f = fixture("qwen3.json");
    let model = common::model("tiny-qwen3");
    assert_eq!(model.dimensions(), 64);
    let cases = f["cases"].as_array().unwrap();
    let texts: Vec<String> = cases
        .iter()
        .map(|c| c["text"].as_str().unwrap().to_string())
        .collect();
    let items = model.prepare(&texts, false).unwrap();
    for (item, case) in items.iter().zip(cases) {
        assert_eq!(item.sequence.len() as u64, case["tokens"].as_u64().unwrap());
    }
    let out = runtime().block_on(model.embed(items)).unwrap();
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = cosine(got, &vector(&case["vector"]));
        eprintln!("{} tokens: cosine {c}", case["tokens"]);
        assert!(c >= 0.9999, "{:?}: cosine {c}", case["text"]);
    }
}

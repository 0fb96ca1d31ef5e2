//! EuroBERT (a bidirectional Llama-style encoder, jina-embeddings-v5-text-nano's base) against
//! transformers' `EuroBertModel` on tests/fixtures/eurobert.json: the mean of each text's token
//! vectors, batched (the reference ran each alone), a 1,502-token text included.

mod common;

use embedd_runtime::{Family, Pooling, Precision};

#[test]
fn mean_pooled_vectors_match_transformers() {
    common::check_case_vectors("eurobert.json", "tiny-eurobert", 64);
}

#[test]
fn bf16_vectors_stay_close_to_transformers() {
    common::check_case_vectors_in("eurobert.json", "tiny-eurobert", 64, Precision::Bf16, 0.999);
}

#[test]
fn the_checkpoint_resolves_to_the_encoder_with_mean_pooling() {
    let model = common::model("tiny-eurobert");
    assert_eq!(model.pooling(), Pooling::Mean);
    assert_eq!(common::family_of("tiny-eurobert"), Family::EuroBert);
}

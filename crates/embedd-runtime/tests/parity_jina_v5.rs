//! jina-embeddings-v5-text (small: Qwen3, nano: EuroBERT; each with four PEFT LoRA task adapters
//! under `adapters/<task>/`) against transformers' base models with PEFT's adapters on
//! tests/fixtures/jina_v5.json: each task's prompt ("Query: " / "Document: "), adapter and last
//! token, every task's texts in one mixed batch, in f32 and bf16.

mod common;

use embedd_runtime::{Family, Pooling, Precision};
use serde_json::Value;

/// Every case of `key` embedded in one batch whose rows run different adapters.
fn check(key: &str, model_name: &str, precision: Precision, floor: f32) {
    let f = common::fixture("jina_v5.json");
    let Some(model) = common::model_in(model_name, precision) else {
        return;
    };
    assert_eq!(model.pooling(), Pooling::LastToken);
    let cases: &Vec<Value> = f[key].as_array().unwrap();
    let mut items = Vec::new();
    for case in cases {
        let text = case["text"].as_str().unwrap().to_string();
        let mut one = model
            .prepare_for_task(&[text], false, case["task"].as_str())
            .unwrap();
        assert_eq!(
            one[0].sequence.len() as u64,
            case["tokens"].as_u64().unwrap()
        );
        items.append(&mut one);
    }
    let out = common::runtime().block_on(model.embed(items)).unwrap();
    let mut lowest = 1f32;
    for (got, case) in out.vectors.iter().zip(cases) {
        let c = common::cosine(got, &common::vector(&case["vector"]));
        eprintln!(
            "{key} {precision:?} {} {}: cosine {c}",
            case["task"], case["tokens"]
        );
        lowest = lowest.min(c);
    }
    assert!(
        lowest >= floor,
        "{key} {precision:?}: lowest cosine {lowest}"
    );
    eprintln!(
        "{key} {precision:?}: lowest cosine {lowest} over {} cases",
        cases.len()
    );
}

#[test]
fn small_matches_peft_per_task_in_one_mixed_batch() {
    check("small", "tiny-jina-v5-small", Precision::F32, 0.9999);
}

#[test]
fn nano_matches_peft_per_task_in_one_mixed_batch() {
    check("nano", "tiny-jina-v5-nano", Precision::F32, 0.9999);
}

#[test]
fn bf16_stays_close_to_peft() {
    check("small", "tiny-jina-v5-small", Precision::Bf16, 0.999);
    check("nano", "tiny-jina-v5-nano", Precision::Bf16, 0.999);
}

/// The tasks served: retrieval's adapter for queries and passages, clustering's as the API's
/// `separation`, the others by name; no task is a passage, as the model's own code defaults to
/// "document"; a task the model has no adapter for is refused.
#[test]
fn tasks_prompts_and_the_default() {
    let model = common::model("tiny-jina-v5-small");
    assert_eq!(
        model.tasks(),
        [
            "retrieval.query",
            "retrieval.passage",
            "text-matching",
            "separation",
            "classification"
        ]
    );
    let text = vec!["capital of France".to_string()];
    let query = model
        .prepare_for_task(&text, false, Some("retrieval.query"))
        .unwrap();
    let passage = model
        .prepare_for_task(&text, false, Some("retrieval.passage"))
        .unwrap();
    let default = model.prepare_for_task(&text, false, None).unwrap();
    assert_eq!(default[0].sequence.ids, passage[0].sequence.ids);
    assert_eq!(default[0].adapter, passage[0].adapter);
    assert_ne!(query[0].sequence.ids, passage[0].sequence.ids);
    assert!(model
        .prepare_for_task(&text, false, Some("clustering"))
        .is_err());
    assert_eq!(
        common::family_of("tiny-jina-v5-nano"),
        Family::JinaEmbeddingsV5
    );
}

/// A task named in `task_names` without its adapter files, or an adapter for a module the model
/// lacks, fails the load with the file named rather than serving the base weights.
#[test]
fn a_missing_or_foreign_adapter_is_refused_at_load() {
    let source = common::fixtures().join("models/tiny-jina-v5-small");
    let dir = std::env::temp_dir().join(format!("embedd-v5-adapters-{}", std::process::id()));
    let copy = |skip: &str| {
        let _ = std::fs::remove_dir_all(&dir);
        for entry in walk(&source) {
            let relative = entry.strip_prefix(&source).unwrap();
            if relative.starts_with(skip) {
                continue;
            }
            let to = dir.join(relative);
            std::fs::create_dir_all(to.parent().unwrap()).unwrap();
            std::fs::copy(&entry, to).unwrap();
        }
    };
    let load = || {
        embedd_runtime::TextEmbedder::load(&embedd_runtime::embedder::EmbedderSpec {
            name: "v5".into(),
            source: embedd_runtime::ModelSource::Local(dir.clone()),
            pooling: None,
            max_tokens: None,
            device: embedd_runtime::DeviceSpec::Cpu,
            precision: Precision::F32,
            scheduler: embedd_runtime::SchedulerConfig::default(),
        })
    };
    copy("adapters/clustering");
    let err = load()
        .err()
        .expect("loads without its clustering adapter")
        .to_string();
    assert!(err.contains("clustering"), "{err}");

    // An embedding-table adapter (PEFT's lora_embedding_A/B) is not served.
    copy("none");
    let adapter = dir.join("adapters/retrieval/adapter_model.safetensors");
    let mut tensors = candle_core::safetensors::load(&adapter, &candle_core::Device::Cpu).unwrap();
    let extra =
        candle_core::Tensor::zeros((4, 8), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap();
    tensors.insert(
        "base_model.model.embed_tokens.lora_embedding_A".into(),
        extra,
    );
    candle_core::safetensors::save(&tensors, &adapter).unwrap();
    let err = load()
        .err()
        .expect("loads with a foreign adapter tensor")
        .to_string();
    assert!(err.contains("embed_tokens"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(walk(&path));
        } else {
            files.push(path);
        }
    }
    files
}

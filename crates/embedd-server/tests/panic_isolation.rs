//! A batch that panics inside model code fails its own requests with a 500 `detail`; the model
//! goes on serving, and `/health` reports the incident. The server runs in process with a
//! backbone of the test's own that panics on one token, as a kernel assertion would.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::{DType, Device, Tensor};
use clap::Parser;
use embedd_runtime::batch::{Hidden, PackedBatch};
use embedd_runtime::embedder::EmbedderParts;
use embedd_runtime::models::{Backbone, TaskAdapters};
use embedd_runtime::{ModelSource, Pooling, SchedulerConfig, TextEmbedder, TextTokenizer};
use embedd_server::config::Config;
use embedd_server::state::{ModelRegistry, ServedModel};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tower::ServiceExt;

/// Every token's vector is all ones, except that a batch holding `poison` panics.
struct PanicsOnToken {
    poison: u32,
}

impl Backbone for PanicsOnToken {
    fn forward(&self, batch: &PackedBatch) -> candle_core::Result<Hidden> {
        let poisoned = batch.sequences.iter().any(|s| s.ids.contains(&self.poison));
        assert!(
            !poisoned,
            "kernel assertion failed: poisoned token in the batch"
        );
        let states = Tensor::ones((batch.total_tokens(), 4), DType::F32, &Device::Cpu)?;
        Ok(Hidden::new(states, batch))
    }

    fn hidden_size(&self) -> usize {
        4
    }
}

fn fixture(path: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/models")
        .join(path)
}

async fn call(router: &axum::Router, request: Request<Body>) -> (StatusCode, Value) {
    let response = router.clone().oneshot(request).await.unwrap();
    let status = response.status();
    let bytes = response.into_body().collect().await.unwrap().to_bytes();
    (status, serde_json::from_slice(&bytes).unwrap())
}

fn embed(text: &str) -> Request<Body> {
    Request::post("/v1/embeddings")
        .header("content-type", "application/json")
        .body(Body::from(
            json!({"model": "flaky", "input": [text]}).to_string(),
        ))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_batch_fails_alone_and_health_reports_it() {
    let tokenizer_file = fixture("tiny-bert-cross-encoder/tokenizer.json");
    let tokenizer = TextTokenizer::from_file(&tokenizer_file, 64).unwrap();
    let poison = tokenizer
        .encode_batch(&["boom".to_string()], false)
        .unwrap()[0]
        .ids[1];
    let model = TextEmbedder::from_parts(
        "flaky",
        ModelSource::Local(fixture("tiny-bert-cross-encoder")),
        SchedulerConfig::default(),
        EmbedderParts {
            tokenizer,
            backbone: Box::new(PanicsOnToken { poison }),
            pooling: Pooling::Mean,
            tasks: TaskAdapters::default(),
            plan: "test".into(),
            text_projection: None,
            images: None,
        },
    )
    .unwrap();
    let mut registry = ModelRegistry::default();
    registry.insert(ServedModel::Embedding(Arc::new(model)));
    let data = std::env::temp_dir().join(format!("embedd-panic-{}", std::process::id()));
    let config = Config::parse_from(["embedd", "--data-dir", data.to_str().unwrap()]);
    let state = embedd_server::state_with_models(&config, registry)
        .await
        .unwrap();
    let router = embedd_server::routes::router(state);

    let (status, body) = call(&router, embed("boom")).await;
    assert_eq!(status, StatusCode::INTERNAL_SERVER_ERROR, "{body}");
    let detail = body["detail"].as_str().unwrap();
    assert!(detail.contains("poisoned token"), "{detail}");

    let (status, body) = call(&router, embed("hello")).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let vector: Vec<f64> = serde_json::from_value(body["data"][0]["embedding"].clone()).unwrap();
    assert!(vector.iter().all(|v| (v - 0.5).abs() < 1e-6), "{vector:?}");

    let (status, health) = call(
        &router,
        Request::get("/health").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{health}");
    assert_eq!(health["status"], "ok");
    let flaky = &health["model_health"]["flaky"];
    assert_eq!(flaky["status"], "serving", "{health}");
    assert_eq!(flaky["panics"], 1, "{health}");
    assert_eq!(flaky["failed_batches"], 1, "{health}");
    assert_eq!(flaky["last_incident"]["panicked"], true, "{health}");
    assert!(flaky["last_incident"]["error"]
        .as_str()
        .unwrap()
        .contains("poisoned token"));
    let _ = std::fs::remove_dir_all(data);
}

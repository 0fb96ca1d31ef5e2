use std::path::PathBuf;

/// Everything the runtime can fail with. The server maps these to HTTP in one place.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An input is longer than the model takes and the caller did not ask for truncation.
    #[error("input {index} has {tokens} tokens, more than the model's maximum of {max}")]
    InputTooLong {
        index: usize,
        tokens: usize,
        max: usize,
    },
    /// A rerank query that leaves no room for any document in the model's window.
    #[error("the query has {tokens} tokens with the special tokens; the model's window is {max}, so no document fits beside it")]
    QueryTooLong { tokens: usize, max: usize },
    /// A task the model has no adapter for.
    #[error("the model has no adapter for task '{task}'; its tasks are: {}", known.join(", "))]
    UnknownTask { task: String, known: Vec<String> },
    /// The model is busy for longer than a request may wait; the caller should retry later.
    #[error("the model is busy ({queued} inputs queued); retry in {retry_after_secs} s")]
    Overloaded {
        queued: usize,
        retry_after_secs: u64,
    },
    #[error("the model worker has stopped")]
    WorkerStopped,
    /// Model code panicked on a batch; the batch's requests fail, the model goes on serving.
    #[error("the model failed on this batch ({0}); the model goes on serving, retry the request")]
    BatchPanicked(String),
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    #[error("model file {path}: {reason}")]
    ModelFile { path: PathBuf, reason: String },
    #[error("model config {path}: field `{field}`: {reason}")]
    ModelConfig {
        path: PathBuf,
        field: String,
        reason: String,
    },
    #[error("hub: {0}")]
    Hub(String),
    #[error("device: {0}")]
    Device(String),
    /// The requested number format cannot run this model here.
    #[error("dtype {precision}: {reason}")]
    Precision { precision: String, reason: String },
    #[error("inference: {0}")]
    Inference(#[from] candle_core::Error),
}

pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

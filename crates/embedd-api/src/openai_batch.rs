//! The OpenAI Batch API's wire types (`/v1/files`, `/v1/batches`), as the `openai` clients send
//! and read them: a JSONL file of requests becomes a batch; its output and error files hold one
//! line per request, matched by `custom_id`.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use utoipa::ToSchema;

/// `purpose` values a file may be uploaded with; only `batch` files are used.
pub const FILE_PURPOSES: [&str; 1] = ["batch"];

/// The endpoints a batch may target.
pub const BATCH_ENDPOINTS: [&str; 1] = ["/v1/embeddings"];

/// The completion windows accepted (the only one OpenAI offers).
pub const COMPLETION_WINDOWS: [&str; 1] = ["24h"];

/// A stored file: an upload, or a batch's output or error file.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FileObject {
    pub id: String,
    /// Always `file`.
    pub object: &'static str,
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    pub filename: String,
    pub purpose: String,
    /// Always `processed`: a file is usable once the upload returns.
    pub status: &'static str,
}

/// `GET /v1/files`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct FileList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<FileObject>,
    pub has_more: bool,
}

/// `POST /v1/batches`.
#[derive(Debug, Clone, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchCreate {
    pub input_file_id: String,
    /// `/v1/embeddings`.
    pub endpoint: String,
    /// `24h`.
    pub completion_window: String,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    /// Accepted and ignored (the output files live as long as the batch).
    #[serde(default)]
    pub output_expires_after: Option<Value>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Validating,
    Failed,
    InProgress,
    Finalizing,
    Completed,
    Expired,
    Cancelling,
    Cancelled,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, ToSchema)]
pub struct BatchRequestCounts {
    pub total: u64,
    pub completed: u64,
    pub failed: u64,
}

/// Why a batch's input was refused: one entry per bad line (1-based), as OpenAI reports them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct BatchLineError {
    pub code: String,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub line: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BatchErrors {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<BatchLineError>,
}

/// A batch as `GET /v1/batches/{id}` returns it.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct Batch {
    pub id: String,
    /// Always `batch`.
    pub object: &'static str,
    pub endpoint: String,
    pub errors: Option<BatchErrors>,
    pub input_file_id: String,
    pub completion_window: String,
    pub status: BatchStatus,
    pub output_file_id: Option<String>,
    pub error_file_id: Option<String>,
    pub created_at: i64,
    pub in_progress_at: Option<i64>,
    pub expires_at: Option<i64>,
    pub finalizing_at: Option<i64>,
    pub completed_at: Option<i64>,
    pub failed_at: Option<i64>,
    pub expired_at: Option<i64>,
    pub cancelling_at: Option<i64>,
    pub cancelled_at: Option<i64>,
    pub request_counts: BatchRequestCounts,
    pub metadata: Option<Map<String, Value>>,
}

/// `GET /v1/batches`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BatchList {
    /// Always `list`.
    pub object: &'static str,
    pub data: Vec<Batch>,
    pub first_id: Option<String>,
    pub last_id: Option<String>,
    pub has_more: bool,
}

/// One line of a batch's input file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct BatchRequestLine {
    pub custom_id: String,
    pub method: String,
    pub url: String,
    pub body: Map<String, Value>,
}

/// One line of a batch's output or error file.
pub fn output_line(id: &str, custom_id: &str, status_code: u16, body: Value) -> Value {
    serde_json::json!({
        "id": id,
        "custom_id": custom_id,
        "response": {
            "status_code": status_code,
            "request_id": id,
            "body": body,
        },
        "error": null,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_serializes_as_the_openai_client_reads_it() {
        let batch = Batch {
            id: "batch_1".into(),
            object: "batch",
            endpoint: "/v1/embeddings".into(),
            errors: None,
            input_file_id: "file-1".into(),
            completion_window: "24h".into(),
            status: BatchStatus::InProgress,
            output_file_id: None,
            error_file_id: None,
            created_at: 1,
            in_progress_at: Some(1),
            expires_at: Some(86401),
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: BatchRequestCounts {
                total: 3,
                completed: 1,
                failed: 0,
            },
            metadata: None,
        };
        let json = serde_json::to_value(&batch).unwrap();
        assert_eq!(json["status"], "in_progress");
        assert_eq!(json["request_counts"]["total"], 3);
        assert!(json["output_file_id"].is_null());
        let create: BatchCreate = serde_json::from_value(serde_json::json!({
            "input_file_id": "file-1", "endpoint": "/v1/embeddings",
            "completion_window": "24h", "metadata": {"k": "v"}
        }))
        .unwrap();
        assert_eq!(create.metadata.unwrap()["k"], "v");
        let line = output_line("r1", "c1", 200, serde_json::json!({"data": []}));
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["custom_id"], "c1");
    }
}

//! The bulk-embeddings contract: a CSV upload becomes a job; its status; its result link.

use serde::Serialize;
use utoipa::ToSchema;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum BulkJobStatus {
    Waiting,
    InProgress,
    Failed,
    Completed,
}

impl BulkJobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::InProgress => "in-progress",
            Self::Failed => "failed",
            Self::Completed => "completed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "waiting" => Self::Waiting,
            "in-progress" => Self::InProgress,
            "failed" => Self::Failed,
            "completed" => Self::Completed,
            _ => return None,
        })
    }
}

/// `BulkEmbeddingJobResponse`, plus the row progress embedd tracks.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct BulkJob {
    #[serde(rename = "_id")]
    pub id: String,
    pub user_id: String,
    pub model_name: String,
    pub status: BulkJobStatus,
    pub file_name: String,
    /// RFC 3339.
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_email: Option<String>,
    pub used_token_count: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Rows in the uploaded file.
    pub total_rows: u64,
    /// Rows embedded and committed so far.
    pub processed_rows: u64,
    /// Rows cut to the model's maximum length.
    pub truncated_rows: u64,
}

/// `DownloadResultResponse`.
#[derive(Debug, Clone, PartialEq, Serialize, ToSchema)]
pub struct DownloadResult {
    pub id: String,
    /// Served by embedd itself; signed, expiring, usable without the API key.
    pub download_url: String,
}

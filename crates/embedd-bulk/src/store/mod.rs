//! Job state: SQLite under the data dir by default, or a PostgreSQL database that every replica
//! shares (`--bulk-store postgres://...`). Both keep the same tables: jobs, their planned chunks
//! with leases, and when each key was last served.
//!
//! A chunk moves pending -> leased (by one worker, until its lease runs out) -> done. Its rows
//! are counted into the job only by the commit that moves it to done, and only while the
//! committing worker still holds the lease, so each row counts once whichever worker embedded it.

mod postgres;
mod sqlite;

use std::path::Path;
use std::time::Duration;

use embedd_api::{BulkJob, BulkJobStatus};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;

pub use self::postgres::PostgresStore;
pub use self::sqlite::SqliteStore;
use crate::csv_input::{ChunkPlan, CsvSummary};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("job store database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("job store database: {0}")]
    Postgres(#[from] tokio_postgres::Error),
    #[error("job store database pool: {0}")]
    Pool(String),
    #[error("job store files: {0}")]
    Io(#[from] std::io::Error),
    #[error("job store address '{0}': expected postgres://USER:PASS@HOST/DB")]
    Address(String),
    #[error("job store task: {0}")]
    Task(String),
}

/// What a job's rows are and what its result holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// `/v1/bulk-embeddings`: CSV rows in, `text,embedding` rows out.
    Csv,
    /// The OpenAI Batch API: JSONL requests in, JSONL responses (and errors) out.
    Batch,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Csv => "csv",
            Self::Batch => "batch",
        }
    }

    pub fn parse(s: &str) -> Self {
        if s == "batch" {
            Self::Batch
        } else {
            Self::Csv
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    pub job: BulkJob,
    /// How many result chunks make its result; 0 for a job finished before results were
    /// chunked, whose result is one file.
    pub chunks: u64,
    pub kind: JobKind,
    /// Rows (batch requests) whose answer was an error.
    pub failed_rows: u64,
    /// The raw status: `cancelled` besides the four `BulkJobStatus` knows.
    pub state: String,
    pub created_unix: i64,
    pub completed_unix: Option<i64>,
}

/// A job to create: its upload is already stored under `id`.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub kind: JobKind,
    pub user_id: String,
    pub model_name: String,
    pub file_name: String,
    pub user_email: Option<String>,
    pub rows: u64,
    /// The CSV column texts are read from (0 for batches).
    pub text_column: usize,
    pub chunks: Vec<ChunkPlan>,
}

impl NewJob {
    /// A `/v1/bulk-embeddings` job from its checked CSV.
    pub fn csv(
        id: String,
        user_id: String,
        model_name: String,
        file_name: String,
        user_email: Option<String>,
        summary: CsvSummary,
    ) -> Self {
        Self {
            id,
            kind: JobKind::Csv,
            user_id,
            model_name,
            file_name,
            user_email,
            rows: summary.rows,
            text_column: summary.text_column,
            chunks: summary.chunks,
        }
    }
}

/// An OpenAI batch's own fields, beside its job.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchRow {
    pub input_file_id: String,
    pub endpoint: String,
    pub completion_window: String,
    /// JSON.
    pub metadata: Option<String>,
    /// JSON: the line errors that failed the batch at creation.
    pub errors: Option<String>,
    pub cancelled_unix: Option<i64>,
}

/// A file uploaded to `/v1/files`.
#[derive(Debug, Clone, PartialEq)]
pub struct FileRow {
    pub id: String,
    pub user_id: String,
    pub purpose: String,
    pub filename: String,
    pub bytes: u64,
    pub created_unix: i64,
}

/// What a committed chunk wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ChunkOutput {
    pub tokens: u64,
    pub truncated: u64,
    /// Rows whose answer went to the error object.
    pub failed: u64,
    pub result_bytes: u64,
    pub error_bytes: u64,
}

/// A done chunk's objects' sizes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DoneChunk {
    pub index: u64,
    pub result_bytes: u64,
    pub error_bytes: u64,
}

/// A chunk a worker holds the lease of.
#[derive(Debug, Clone)]
pub struct ChunkClaim {
    pub job: BulkJob,
    pub kind: JobKind,
    pub text_column: usize,
    pub index: u64,
    pub plan: ChunkPlan,
    /// How many times this chunk has been claimed, this time included.
    pub attempt: u64,
}

/// What committing a chunk did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Commit {
    /// Its rows count; `job_completed` when they were the job's last.
    Counted { job_completed: bool },
    /// The lease ran out and another worker took the chunk (its rows count when that one
    /// commits), or the job stopped (failed or was cancelled) meanwhile.
    LeaseLost,
}

/// A result row of either database, read by column: what lets the rows become records in one
/// place for both.
pub(crate) trait StoredRow {
    type Error;
    fn int(&self, i: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, i: usize) -> Result<Option<i64>, Self::Error>;
    fn text(&self, i: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, i: usize) -> Result<Option<String>, Self::Error>;
}

/// The job columns both stores select, in the order [`job_record`] reads them.
pub(crate) const JOB_COLUMNS: &str = "id, user_id, model_name, status, file_name, created_at, \
     completed_at, user_email, used_token_count, error, total_rows, processed_rows, \
     truncated_rows, chunk_count, kind, failed_rows, created_unix, completed_unix";

/// `JOB_COLUMNS` of the jobs table under the alias `j`, then a batch's (alias `b`), in the order
/// [`batch_record`] reads them.
pub(crate) const BATCH_COLUMNS: &str = "j.id, j.user_id, j.model_name, j.status, j.file_name, \
     j.created_at, j.completed_at, j.user_email, j.used_token_count, j.error, j.total_rows, \
     j.processed_rows, j.truncated_rows, j.chunk_count, j.kind, j.failed_rows, j.created_unix, \
     j.completed_unix, b.input_file_id, b.endpoint, b.completion_window, b.metadata, b.errors, \
     b.cancelled_unix";

/// The file columns, in the order [`file_row`] reads them.
pub(crate) const FILE_COLUMNS: &str = "id, user_id, purpose, filename, bytes, created_unix";

pub(crate) fn job_record<R: StoredRow>(row: &R) -> Result<JobRecord, R::Error> {
    let count = |i| row.int(i).map(|n| n as u64);
    let state = row.text(3)?;
    Ok(JobRecord {
        job: BulkJob {
            id: row.text(0)?,
            user_id: row.text(1)?,
            model_name: row.text(2)?,
            status: BulkJobStatus::parse(&state).unwrap_or(BulkJobStatus::Failed),
            file_name: row.text(4)?,
            created_at: row.text(5)?,
            completed_at: row.opt_text(6)?,
            user_email: row.opt_text(7)?,
            used_token_count: count(8)?,
            error: row.opt_text(9)?,
            total_rows: count(10)?,
            processed_rows: count(11)?,
            truncated_rows: count(12)?,
        },
        chunks: count(13)?,
        kind: JobKind::parse(&row.text(14)?),
        failed_rows: count(15)?,
        state,
        created_unix: row.int(16)?,
        completed_unix: row.opt_int(17)?,
    })
}

pub(crate) fn batch_record<R: StoredRow>(row: &R) -> Result<(JobRecord, BatchRow), R::Error> {
    Ok((
        job_record(row)?,
        BatchRow {
            input_file_id: row.text(18)?,
            endpoint: row.text(19)?,
            completion_window: row.text(20)?,
            metadata: row.opt_text(21)?,
            errors: row.opt_text(22)?,
            cancelled_unix: row.opt_int(23)?,
        },
    ))
}

pub(crate) fn file_row<R: StoredRow>(row: &R) -> Result<FileRow, R::Error> {
    Ok(FileRow {
        id: row.text(0)?,
        user_id: row.text(1)?,
        purpose: row.text(2)?,
        filename: row.text(3)?,
        bytes: row.int(4)? as u64,
        created_unix: row.int(5)?,
    })
}

/// A chunk's `idx, result_bytes, error_bytes`.
pub(crate) fn done_chunk<R: StoredRow>(row: &R) -> Result<DoneChunk, R::Error> {
    Ok(DoneChunk {
        index: row.int(0)? as u64,
        result_bytes: row.int(1)? as u64,
        error_bytes: row.int(2)? as u64,
    })
}

/// A job id: 24 hex digits.
pub fn new_job_id() -> Result<String, StoreError> {
    let mut raw = [0u8; 12];
    getrandom::fill(&mut raw).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(hex::encode(raw))
}

pub(crate) fn now() -> (String, i64) {
    let t = OffsetDateTime::now_utc();
    (t.format(&Rfc3339).unwrap_or_default(), t.unix_timestamp())
}

pub(crate) fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub enum JobStore {
    Sqlite(SqliteStore),
    Postgres(PostgresStore),
}

/// Calls the same method on whichever store this is.
macro_rules! each {
    ($self:ident, $store:ident => $call:expr) => {
        match $self {
            JobStore::Sqlite($store) => $call,
            JobStore::Postgres($store) => $call,
        }
    };
}

impl JobStore {
    /// `--bulk-store`: a `postgres://` address, else SQLite at `data_dir/bulk/jobs.sqlite3`.
    pub async fn open(address: Option<&str>, data_dir: &Path) -> Result<Self, StoreError> {
        match address {
            Some(a) if a.starts_with("postgres://") || a.starts_with("postgresql://") => {
                Ok(Self::Postgres(PostgresStore::connect(a).await?))
            }
            Some(a) if !a.is_empty() => Err(StoreError::Address(a.to_string())),
            _ => Ok(Self::Sqlite(SqliteStore::open(&data_dir.join("bulk"))?)),
        }
    }

    /// True when replicas share this store; SQLite belongs to one process.
    pub fn is_shared(&self) -> bool {
        matches!(self, Self::Postgres(_))
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Self::Sqlite(_) => "sqlite",
            Self::Postgres(_) => "postgres",
        }
    }

    /// Records a job whose upload is stored, with its chunks: once this returns, it will run.
    pub async fn create(&self, new: NewJob) -> Result<BulkJob, StoreError> {
        each!(self, s => s.create(new).await)
    }

    pub async fn get(&self, id: &str) -> Result<Option<JobRecord>, StoreError> {
        each!(self, s => s.get(id).await)
    }

    /// How many unfinished jobs `user_id` has.
    pub async fn unfinished_of(&self, user_id: &str) -> Result<u64, StoreError> {
        each!(self, s => s.unfinished_of(user_id).await)
    }

    /// The next chunk to embed, leased to `owner` for `lease`: of the unfinished jobs' pending
    /// or expired chunks of jobs for `models`, one of the key served least recently
    /// (interrupted jobs, then older ones, first within a key).
    pub async fn claim(
        &self,
        owner: &str,
        lease: Duration,
        models: &[String],
    ) -> Result<Option<ChunkClaim>, StoreError> {
        each!(self, s => s.claim(owner, lease, models).await)
    }

    /// Extends `owner`'s lease; false when it no longer holds it or the job is no longer running.
    pub async fn renew(
        &self,
        job_id: &str,
        index: u64,
        owner: &str,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        each!(self, s => s.renew(job_id, index, owner, lease).await)
    }

    /// Marks a chunk whose result object is stored as done and counts its rows.
    pub async fn commit(
        &self,
        claim: &ChunkClaim,
        owner: &str,
        output: ChunkOutput,
    ) -> Result<Commit, StoreError> {
        each!(self, s => s.commit(claim, owner, output).await)
    }

    /// A job's done chunks, in order.
    pub async fn done_chunks(&self, id: &str) -> Result<Vec<DoneChunk>, StoreError> {
        each!(self, s => s.done_chunks(id).await)
    }

    /// Records an OpenAI batch: its job (already failed when `batch.errors` is set) and its row.
    pub async fn create_batch(&self, new: NewJob, batch: BatchRow) -> Result<(), StoreError> {
        each!(self, s => s.create_batch(new, batch).await)
    }

    pub async fn get_batch(&self, id: &str) -> Result<Option<(JobRecord, BatchRow)>, StoreError> {
        each!(self, s => s.get_batch(id).await)
    }

    /// `user_id`'s batches, newest first, those older than `after` when it is given.
    pub async fn list_batches(
        &self,
        user_id: &str,
        after: Option<&str>,
        limit: u64,
    ) -> Result<Vec<(JobRecord, BatchRow)>, StoreError> {
        each!(self, s => s.list_batches(user_id, after, limit).await)
    }

    /// Stops an unfinished batch: no chunk of it runs again, and the one in flight is dropped
    /// at its next lease renewal. False when it had already finished.
    pub async fn cancel(&self, id: &str) -> Result<bool, StoreError> {
        each!(self, s => s.cancel(id).await)
    }

    pub async fn create_file(&self, file: FileRow) -> Result<(), StoreError> {
        each!(self, s => s.create_file(file).await)
    }

    pub async fn get_file(&self, id: &str) -> Result<Option<FileRow>, StoreError> {
        each!(self, s => s.get_file(id).await)
    }

    /// `user_id`'s uploaded files, newest first.
    pub async fn list_files(&self, user_id: &str, limit: u64) -> Result<Vec<FileRow>, StoreError> {
        each!(self, s => s.list_files(user_id, limit).await)
    }

    pub async fn delete_file(&self, id: &str) -> Result<(), StoreError> {
        each!(self, s => s.delete_file(id).await)
    }

    /// Ends an unfinished job as failed with `error`.
    pub async fn fail(&self, id: &str, error: &str) -> Result<(), StoreError> {
        each!(self, s => s.fail(id, error).await)
    }

    /// Gives `owner`'s leases back (a replica stopping), so others need not wait them out.
    pub async fn release(&self, owner: &str) -> Result<(), StoreError> {
        each!(self, s => s.release(owner).await)
    }

    /// Unfinished jobs without planned chunks (uploaded by a version before chunked results).
    pub async fn unplanned(&self) -> Result<Vec<String>, StoreError> {
        each!(self, s => s.unplanned().await)
    }

    /// Plans an unplanned job's chunks; it runs again from its first row.
    pub async fn plan(&self, id: &str, summary: &CsvSummary) -> Result<(), StoreError> {
        each!(self, s => s.plan(id, summary).await)
    }

    /// Finished jobs completed before `cutoff_unix`.
    pub async fn finished_before(&self, cutoff_unix: i64) -> Result<Vec<String>, StoreError> {
        each!(self, s => s.finished_before(cutoff_unix).await)
    }

    pub async fn delete(&self, id: &str) -> Result<(), StoreError> {
        each!(self, s => s.delete(id).await)
    }

    /// Jobs by status, for metrics.
    pub async fn count_by_status(&self) -> Result<Vec<(String, u64)>, StoreError> {
        each!(self, s => s.count_by_status().await)
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), StoreError> {
        each!(self, s => s.ping().await)
    }
}

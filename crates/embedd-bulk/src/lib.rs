//! Bulk embedding jobs: an uploaded CSV becomes a job, planned as chunks of rows; workers on any
//! number of replicas claim chunks under leases, embed them, and store each chunk's rows as an
//! object; the download streams the chunks in order behind a signed, expiring link.
//!
//! State lives in SQLite and local files by default, or in PostgreSQL and S3 shared by replicas.
//! A chunk's rows count only when the worker still holding its lease commits them after its
//! object is stored, so a replica killed mid-job loses nothing and duplicates nothing: another
//! redoes its chunk once the lease runs out.

pub mod batch_input;
pub mod csv_input;
pub mod objects;
pub mod signing;
pub mod store;
pub mod worker;

pub use csv_input::{CsvError, CsvSummary};
pub use objects::{ChunkPart, JobObjects};
pub use signing::UrlSigner;
pub use store::{new_job_id, JobKind, JobStore, NewJob, StoreError};
pub use worker::{BulkWorker, RowEmbedder, WorkerConfig, RESULT_HEADER};

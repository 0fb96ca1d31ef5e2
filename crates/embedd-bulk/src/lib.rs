//! Bulk embedding jobs: an uploaded CSV becomes a job in an embedded SQLite store; a background
//! worker embeds it chunk by chunk into a result file; a signed, expiring link serves the result.
//!
//! Each chunk's rows are appended to the result file and synced before the job's row count is
//! committed, and a resumed job first cuts the file back to its committed length: a server killed
//! mid-job finishes it on restart with every row exactly once.

pub mod csv_input;
pub mod signing;
pub mod store;
pub mod worker;

pub use csv_input::{CsvError, CsvSummary};
pub use signing::UrlSigner;
pub use store::{JobStore, NewJob, StoreError};
pub use worker::{BulkWorker, RowEmbedder, WorkerConfig};

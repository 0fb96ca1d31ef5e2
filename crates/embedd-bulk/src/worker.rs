//! The background worker: runs jobs one chunk at a time, each chunk committed durably.

use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Seek, SeekFrom, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::csv_input::TextRows;
use crate::store::{JobRecord, JobStore};

/// Vectors (normalized, in row order) for one chunk, with the tokens run and rows truncated.
pub struct EmbeddedRows {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: u64,
    pub truncated: u64,
}

pub type EmbedFuture<'a> = Pin<Box<dyn Future<Output = Result<EmbeddedRows, String>> + Send + 'a>>;

/// How the worker embeds: the server provides it, at background priority.
pub trait RowEmbedder: Send + Sync + 'static {
    fn embed<'a>(&'a self, model: &'a str, texts: Vec<String>) -> EmbedFuture<'a>;
}

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Rows per committed chunk.
    pub chunk_rows: usize,
    /// Finished jobs older than this are deleted with their files.
    pub retention: Duration,
    /// How often to look for work when nothing wakes the worker.
    pub poll: Duration,
    /// The mail hook: a shell command run when a job that has an email finishes, with
    /// `EMBEDD_JOB_ID`, `EMBEDD_JOB_STATUS`, `EMBEDD_JOB_EMAIL` and `EMBEDD_JOB_ERROR` set.
    pub notify_command: Option<String>,
}

pub struct BulkWorker {
    store: Arc<JobStore>,
    embedder: Arc<dyn RowEmbedder>,
    config: WorkerConfig,
    wake: Arc<Notify>,
    stopping: Arc<AtomicBool>,
}

const HEADER: &[u8] = b"text,embedding\n";

impl BulkWorker {
    pub fn new(
        store: Arc<JobStore>,
        embedder: Arc<dyn RowEmbedder>,
        config: WorkerConfig,
        wake: Arc<Notify>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            store,
            embedder,
            config,
            wake,
            stopping,
        }
    }

    /// Runs until `stopping` is set; a job in progress stops after its current chunk commits.
    pub async fn run(self) {
        let mut last_sweep = std::time::Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(std::time::Instant::now);
        while !self.stopping.load(Ordering::Acquire) {
            if last_sweep.elapsed() > Duration::from_secs(60) {
                self.sweep();
                last_sweep = std::time::Instant::now();
            }
            match self.store.claim_next() {
                Ok(Some(job)) => {
                    let id = job.job.id.clone();
                    if let Err(error) = self.run_job(job).await {
                        tracing::warn!(job = %id, %error, "bulk job failed");
                        if let Err(e) = self.store.finish(&id, Some(&error)) {
                            tracing::error!(job = %id, error = %e, "recording a failed job");
                        }
                    }
                    self.notify(&id).await;
                }
                Ok(None) => {
                    tokio::select! {
                        _ = self.wake.notified() => {}
                        _ = tokio::time::sleep(self.config.poll) => {}
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "bulk job store");
                    tokio::time::sleep(self.config.poll).await;
                }
            }
        }
        tracing::info!("bulk worker stopped");
    }

    /// Runs the mail hook for a finished job that has an email; its failure is only logged.
    async fn notify(&self, id: &str) {
        let Some(command) = &self.config.notify_command else {
            return;
        };
        let Ok(Some(record)) = self.store.get(id) else {
            return;
        };
        let job = record.job;
        let (Some(email), true) = (
            job.user_email.as_deref(),
            matches!(
                job.status,
                embedd_api::BulkJobStatus::Completed | embedd_api::BulkJobStatus::Failed
            ),
        ) else {
            return;
        };
        let status = tokio::process::Command::new("sh")
            .arg("-c")
            .arg(command)
            .env("EMBEDD_JOB_ID", &job.id)
            .env("EMBEDD_JOB_STATUS", job.status.as_str())
            .env("EMBEDD_JOB_EMAIL", email)
            .env("EMBEDD_JOB_ERROR", job.error.as_deref().unwrap_or(""))
            .status()
            .await;
        match status {
            Ok(s) if s.success() => tracing::info!(job = %job.id, "mail hook ran"),
            Ok(s) => tracing::warn!(job = %job.id, status = %s, "mail hook failed"),
            Err(e) => tracing::warn!(job = %job.id, error = %e, "mail hook could not start"),
        }
    }

    fn sweep(&self) {
        let cutoff = time::OffsetDateTime::now_utc().unix_timestamp()
            - self.config.retention.as_secs() as i64;
        match self.store.delete_finished_before(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "deleted bulk jobs past retention"),
            Err(e) => tracing::error!(error = %e, "deleting old bulk jobs"),
        }
    }

    /// Embeds the rows after the last committed chunk; `Err` is the reason the job failed.
    async fn run_job(&self, record: JobRecord) -> Result<(), String> {
        let JobRecord { job, result_bytes } = record;
        let io = |e: std::io::Error| format!("result file: {e}");
        let input = File::open(self.store.input_path(&job.id)).map_err(io)?;
        let mut rows = TextRows::open(input, job.processed_rows).map_err(|e| e.to_string())?;
        let mut result = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.store.result_path(&job.id))
            .map_err(io)?;
        // Whatever a killed run wrote past the last commit is cut off and redone.
        result.set_len(result_bytes).map_err(io)?;
        result.seek(SeekFrom::End(0)).map_err(io)?;
        let mut written = result_bytes;
        let mut processed = job.processed_rows;
        tracing::info!(job = %job.id, model = %job.model_name, from_row = processed, "bulk job running");

        while !self.stopping.load(Ordering::Acquire) {
            let texts: Vec<String> = rows
                .by_ref()
                .take(self.config.chunk_rows)
                .collect::<Result<_, _>>()
                .map_err(|e| e.to_string())?;
            if texts.is_empty() {
                self.store
                    .finish(&job.id, None)
                    .map_err(|e| e.to_string())?;
                tracing::info!(job = %job.id, rows = processed, "bulk job completed");
                return Ok(());
            }
            let embedded = self.embedder.embed(&job.model_name, texts.clone()).await?;
            let mut buffer = Vec::new();
            if written == 0 {
                buffer.extend_from_slice(HEADER);
            }
            write_rows(&mut buffer, &texts, &embedded.vectors)?;
            result.write_all(&buffer).map_err(io)?;
            result.sync_data().map_err(io)?;
            written += buffer.len() as u64;
            processed += texts.len() as u64;
            self.store
                .commit_chunk(
                    &job.id,
                    processed,
                    written,
                    embedded.tokens,
                    embedded.truncated,
                )
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// Rows as `text,embedding`, the embedding a JSON array in one quoted field.
fn write_rows(out: &mut Vec<u8>, texts: &[String], vectors: &[Vec<f32>]) -> Result<(), String> {
    if texts.len() != vectors.len() {
        return Err(format!(
            "model returned {} vectors for {} rows",
            vectors.len(),
            texts.len()
        ));
    }
    let mut writer = csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(out);
    for (text, vector) in texts.iter().zip(vectors) {
        let json = serde_json::to_string(vector).map_err(|e| e.to_string())?;
        writer
            .write_record([text.as_str(), json.as_str()])
            .map_err(|e| e.to_string())?;
    }
    writer.flush().map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::NewJob;
    use std::sync::Mutex;

    /// Embeds a row as [its length, 1.0]; fails on the row "poison".
    struct FakeEmbedder {
        calls: Mutex<usize>,
    }

    impl RowEmbedder for FakeEmbedder {
        fn embed<'a>(&'a self, _model: &'a str, texts: Vec<String>) -> EmbedFuture<'a> {
            Box::pin(async move {
                *self.calls.lock().unwrap() += 1;
                if texts.iter().any(|t| t == "poison") {
                    return Err("cannot embed poison".to_string());
                }
                Ok(EmbeddedRows {
                    tokens: texts.len() as u64 * 3,
                    truncated: 0,
                    vectors: texts.iter().map(|t| vec![t.len() as f32, 1.0]).collect(),
                })
            })
        }
    }

    fn setup(csv: &[u8], rows: u64) -> (Arc<JobStore>, String, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!(
            "embedd-worker-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(JobStore::open(&dir).unwrap());
        let job = store
            .create(NewJob {
                user_id: "u",
                model_name: "m",
                file_name: "f.csv",
                user_email: None,
                total_rows: rows,
                upload: csv,
            })
            .unwrap();
        (store, job.id, dir)
    }

    fn worker(store: &Arc<JobStore>, stopping: Arc<AtomicBool>) -> BulkWorker {
        BulkWorker::new(
            store.clone(),
            Arc::new(FakeEmbedder {
                calls: Mutex::new(0),
            }),
            WorkerConfig {
                chunk_rows: 2,
                retention: Duration::from_secs(3600),
                poll: Duration::from_millis(10),
                notify_command: None,
            },
            Arc::new(Notify::new()),
            stopping,
        )
    }

    fn run_one(store: &Arc<JobStore>) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let w = worker(store, Arc::new(AtomicBool::new(false)));
        let job = store.claim_next().unwrap().unwrap();
        let id = job.job.id.clone();
        if let Err(e) = rt.block_on(w.run_job(job)) {
            store.finish(&id, Some(&e)).unwrap();
        }
    }

    #[test]
    fn a_job_resumes_after_a_torn_chunk_with_every_row_once() {
        let (store, id, dir) = setup(b"text\na\nbb\n\"c,c\"\ndddd\neeeee\n", 5);
        // A first run committed 2 rows, then wrote half a chunk before being killed.
        let committed = b"text,embedding\na,\"[1.0,1.0]\"\nbb,\"[2.0,1.0]\"\n";
        std::fs::write(
            store.result_path(&id),
            [&committed[..], b"\"c,c\",\"[3.0"].concat(),
        )
        .unwrap();
        store.claim_next().unwrap();
        store
            .commit_chunk(&id, 2, committed.len() as u64, 6, 0)
            .unwrap();
        run_one(&store);
        let job = store.get(&id).unwrap().unwrap().job;
        assert_eq!(job.status, embedd_api::BulkJobStatus::Completed);
        assert_eq!(job.processed_rows, 5);
        assert_eq!(job.used_token_count, 15);
        let out = std::fs::read_to_string(store.result_path(&id)).unwrap();
        let mut reader = csv::Reader::from_reader(out.as_bytes());
        let texts: Vec<String> = reader
            .records()
            .map(|r| r.unwrap()[0].to_string())
            .collect();
        assert_eq!(texts, vec!["a", "bb", "c,c", "dddd", "eeeee"]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn the_mail_hook_runs_for_finished_jobs_with_an_email() {
        let dir = std::env::temp_dir().join(format!("embedd-hook-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(JobStore::open(&dir).unwrap());
        let job = store
            .create(NewJob {
                user_id: "u",
                model_name: "m",
                file_name: "f.csv",
                user_email: Some("a@b.co"),
                total_rows: 1,
                upload: b"x\n",
            })
            .unwrap();
        let out = dir.join("hook.txt");
        let stopping = Arc::new(AtomicBool::new(false));
        let mut w = worker(&store, stopping.clone());
        w.config.notify_command = Some(format!(
            "echo \"$EMBEDD_JOB_ID $EMBEDD_JOB_STATUS $EMBEDD_JOB_EMAIL\" > {}",
            out.display()
        ));
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let run = tokio::spawn(w.run());
            for _ in 0..200 {
                if out.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stopping.store(true, Ordering::Release);
            let _ = run.await;
        });
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written.trim(), format!("{} completed a@b.co", job.id));
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn an_embedding_failure_fails_the_job_with_its_reason() {
        let (store, id, dir) = setup(b"ok\npoison\n", 2);
        run_one(&store);
        let job = store.get(&id).unwrap().unwrap().job;
        assert_eq!(job.status, embedd_api::BulkJobStatus::Failed);
        assert_eq!(job.error.as_deref(), Some("cannot embed poison"));
        std::fs::remove_dir_all(dir).unwrap();
    }
}

//! The background workers: jobs run a chunk at a time, each chunk committed durably, and the
//! next chunk goes to the key served least recently (fair share: one key's large job does not
//! hold up every other key's), `workers` chunks at once.

use std::collections::{HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::future::Future;
use std::io::{Seek, SeekFrom, Write};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

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
    /// Chunks run at once (each of a different job).
    pub workers: usize,
    /// Finished jobs older than this are deleted with their files.
    pub retention: Duration,
    /// How often to look for work when nothing wakes the worker.
    pub poll: Duration,
    /// The mail hook: a shell command run when a job that has an email finishes, with
    /// `EMBEDD_JOB_ID`, `EMBEDD_JOB_STATUS`, `EMBEDD_JOB_EMAIL` and `EMBEDD_JOB_ERROR` set.
    pub notify_command: Option<String>,
}

/// Where a running job stands: its input read up to `processed`, its result file open at the
/// last commit. Kept between chunks so a job's input is read once, not again per chunk.
struct JobCursor {
    rows: TextRows<File>,
    result: File,
    written: u64,
    processed: u64,
}

/// Which key was served when, and which jobs a worker holds now.
#[derive(Default)]
struct Schedule {
    tick: u64,
    served: HashMap<String, u64>,
    running: HashSet<String>,
    cursors: HashMap<String, JobCursor>,
}

impl Schedule {
    /// Of the unfinished jobs (interrupted ones first, then oldest first), the first of the key
    /// served least recently, among jobs no worker holds.
    fn pick(&mut self, unfinished: Vec<JobRecord>) -> Option<JobRecord> {
        let mut firsts: Vec<(u64, usize, JobRecord)> = Vec::new();
        let mut seen_users = HashSet::new();
        for (order, record) in unfinished.into_iter().enumerate() {
            if self.running.contains(&record.job.id)
                || !seen_users.insert(record.job.user_id.clone())
            {
                continue;
            }
            let served = self.served.get(&record.job.user_id).copied().unwrap_or(0);
            firsts.push((served, order, record));
        }
        let (_, _, record) = firsts
            .into_iter()
            .min_by_key(|(served, order, _)| (*served, *order))?;
        self.tick += 1;
        self.served.insert(record.job.user_id.clone(), self.tick);
        self.running.insert(record.job.id.clone());
        Some(record)
    }
}

pub struct BulkWorker {
    store: Arc<JobStore>,
    embedder: Arc<dyn RowEmbedder>,
    config: WorkerConfig,
    wake: Arc<Notify>,
    stopping: Arc<AtomicBool>,
    schedule: Mutex<Schedule>,
    last_sweep: Mutex<Option<Instant>>,
}

const HEADER: &[u8] = b"text,embedding\n";

/// What one chunk did to its job.
enum ChunkOutcome {
    Continues,
    Finished,
}

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
            schedule: Mutex::new(Schedule::default()),
            last_sweep: Mutex::new(None),
        }
    }

    fn schedule(&self) -> std::sync::MutexGuard<'_, Schedule> {
        // A panic while holding it leaves the maps usable.
        self.schedule.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs until `stopping` is set; a chunk in progress commits first.
    pub async fn run(self) {
        let this = Arc::new(self);
        let workers = (0..this.config.workers.max(1))
            .map(|_| tokio::spawn(this.clone().run_loop()))
            .collect::<Vec<_>>();
        for worker in workers {
            let _ = worker.await;
        }
        tracing::info!("bulk worker stopped");
    }

    async fn run_loop(self: Arc<Self>) {
        while !self.stopping.load(Ordering::Acquire) {
            self.sweep_now_and_then();
            match self.claim() {
                Ok(Some(job)) => self.run_chunk(job).await,
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
    }

    /// The next job to run a chunk of, marked in progress and held by this worker.
    fn claim(&self) -> Result<Option<JobRecord>, crate::store::StoreError> {
        let unfinished = self.store.unfinished()?;
        let Some(record) = self.schedule().pick(unfinished) else {
            return Ok(None);
        };
        if let Err(e) = self.store.mark_in_progress(&record.job.id) {
            self.schedule().running.remove(&record.job.id);
            return Err(e);
        }
        Ok(Some(record))
    }

    /// Runs one chunk of `record`'s job and lets go of it; a failure fails the job.
    async fn run_chunk(&self, record: JobRecord) {
        let id = record.job.id.clone();
        let outcome = self.chunk(record).await;
        let finished = match outcome {
            Ok(ChunkOutcome::Continues) => false,
            Ok(ChunkOutcome::Finished) => true,
            Err(error) => {
                tracing::warn!(job = %id, %error, "bulk job failed");
                if let Err(e) = self.store.finish(&id, Some(&error)) {
                    tracing::error!(job = %id, error = %e, "recording a failed job");
                }
                true
            }
        };
        {
            let mut schedule = self.schedule();
            schedule.running.remove(&id);
            if finished {
                schedule.cursors.remove(&id);
            }
        }
        if finished {
            self.notify(&id).await;
        }
        // Another worker may be waiting for a job this one held.
        self.wake.notify_one();
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

    /// Deletes jobs past retention, once a minute at most across the workers.
    fn sweep_now_and_then(&self) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let cutoff = time::OffsetDateTime::now_utc().unix_timestamp()
            - self.config.retention.as_secs() as i64;
        match self.store.delete_finished_before(cutoff) {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "deleted bulk jobs past retention"),
            Err(e) => tracing::error!(error = %e, "deleting old bulk jobs"),
        }
    }

    /// The job's cursor: the one kept from its last chunk, else opened at its last commit (a
    /// job new to this process, or resumed after a restart).
    fn cursor(&self, record: &JobRecord) -> Result<JobCursor, String> {
        if let Some(cursor) = self.schedule().cursors.remove(&record.job.id) {
            return Ok(cursor);
        }
        let job = &record.job;
        let io = |e: std::io::Error| format!("result file: {e}");
        let input = File::open(self.store.input_path(&job.id)).map_err(io)?;
        let rows = TextRows::open(input, job.processed_rows).map_err(|e| e.to_string())?;
        let mut result = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(self.store.result_path(&job.id))
            .map_err(io)?;
        // Whatever a killed run wrote past the last commit is cut off and redone.
        result.set_len(record.result_bytes).map_err(io)?;
        result.seek(SeekFrom::End(0)).map_err(io)?;
        tracing::info!(job = %job.id, model = %job.model_name, from_row = job.processed_rows, "bulk job running");
        Ok(JobCursor {
            rows,
            result,
            written: record.result_bytes,
            processed: job.processed_rows,
        })
    }

    /// Embeds the next chunk of rows after the last commit; `Err` is the reason the job failed.
    async fn chunk(&self, record: JobRecord) -> Result<ChunkOutcome, String> {
        let mut cursor = self.cursor(&record)?;
        let job = &record.job;
        let io = |e: std::io::Error| format!("result file: {e}");
        let texts: Vec<String> = cursor
            .rows
            .by_ref()
            .take(self.config.chunk_rows)
            .collect::<Result<_, _>>()
            .map_err(|e| e.to_string())?;
        if texts.is_empty() {
            self.store
                .finish(&job.id, None)
                .map_err(|e| e.to_string())?;
            tracing::info!(job = %job.id, rows = cursor.processed, "bulk job completed");
            return Ok(ChunkOutcome::Finished);
        }
        let embedded = self.embedder.embed(&job.model_name, texts.clone()).await?;
        let mut buffer = Vec::new();
        if cursor.written == 0 {
            buffer.extend_from_slice(HEADER);
        }
        write_rows(&mut buffer, &texts, &embedded.vectors)?;
        cursor.result.write_all(&buffer).map_err(io)?;
        cursor.result.sync_data().map_err(io)?;
        cursor.written += buffer.len() as u64;
        cursor.processed += texts.len() as u64;
        self.store
            .commit_chunk(
                &job.id,
                cursor.processed,
                cursor.written,
                embedded.tokens,
                embedded.truncated,
            )
            .map_err(|e| e.to_string())?;
        self.schedule().cursors.insert(job.id.clone(), cursor);
        Ok(ChunkOutcome::Continues)
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

    /// Embeds a row as [its length, 1.0]; fails on the row "poison". Keeps every chunk's rows.
    #[derive(Default)]
    struct FakeEmbedder {
        chunks: Mutex<Vec<Vec<String>>>,
    }

    impl RowEmbedder for FakeEmbedder {
        fn embed<'a>(&'a self, _model: &'a str, texts: Vec<String>) -> EmbedFuture<'a> {
            Box::pin(async move {
                self.chunks.lock().unwrap().push(texts.clone());
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
        worker_with(store, stopping, Arc::new(FakeEmbedder::default()))
    }

    fn worker_with(
        store: &Arc<JobStore>,
        stopping: Arc<AtomicBool>,
        embedder: Arc<FakeEmbedder>,
    ) -> BulkWorker {
        BulkWorker::new(
            store.clone(),
            embedder,
            WorkerConfig {
                chunk_rows: 2,
                workers: 1,
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
        while let Some(job) = w.claim().unwrap() {
            rt.block_on(w.run_chunk(job));
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
        store.mark_in_progress(&id).unwrap();
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

    /// Key "a" uploads 10 rows, then key "b" 2: b's rows run in the second chunk, not after
    /// all of a's; both jobs finish with every row once.
    #[test]
    fn keys_take_turns_chunk_by_chunk() {
        let dir = std::env::temp_dir().join(format!("embedd-fair-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let store = Arc::new(JobStore::open(&dir).unwrap());
        let upload_a: String = (0..10).map(|i| format!("a{i}\n")).collect();
        let new = |user, upload: &'static [u8], rows| NewJob {
            user_id: user,
            model_name: "m",
            file_name: "f.csv",
            user_email: None,
            total_rows: rows,
            upload,
        };
        let upload_a: &'static [u8] = Box::leak(upload_a.into_bytes().into_boxed_slice());
        let a = store.create(new("a", upload_a, 10)).unwrap();
        let b = store.create(new("b", b"b0\nb1\n", 2)).unwrap();
        let embedder = Arc::new(FakeEmbedder::default());
        let w = worker_with(&store, Arc::new(AtomicBool::new(false)), embedder.clone());
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        while let Some(job) = w.claim().unwrap() {
            rt.block_on(w.run_chunk(job));
        }
        let chunks = embedder.chunks.lock().unwrap().clone();
        assert_eq!(chunks[0], ["a0", "a1"]);
        assert_eq!(chunks[1], ["b0", "b1"]);
        assert_eq!(chunks[2], ["a2", "a3"]);
        assert_eq!(chunks.concat().len(), 12);
        for id in [&a.id, &b.id] {
            let job = store.get(id).unwrap().unwrap().job;
            assert_eq!(job.status, embedd_api::BulkJobStatus::Completed);
        }
        assert_eq!(store.get(&a.id).unwrap().unwrap().job.processed_rows, 10);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_held_job_is_not_picked_twice() {
        let record = |id: &str, user: &str| JobRecord {
            job: embedd_api::BulkJob {
                id: id.into(),
                user_id: user.into(),
                model_name: "m".into(),
                status: embedd_api::BulkJobStatus::Waiting,
                file_name: "f.csv".into(),
                created_at: String::new(),
                completed_at: None,
                user_email: None,
                used_token_count: 0,
                error: None,
                total_rows: 1,
                processed_rows: 0,
                truncated_rows: 0,
            },
            result_bytes: 0,
        };
        let mut schedule = Schedule::default();
        let first = schedule
            .pick(vec![record("1", "a"), record("2", "a")])
            .unwrap();
        assert_eq!(first.job.id, "1");
        // Job 1 is held: the next worker gets a's next job, and b before a once b has work.
        let second = schedule
            .pick(vec![record("1", "a"), record("2", "a")])
            .unwrap();
        assert_eq!(second.job.id, "2");
        let third = schedule
            .pick(vec![record("1", "a"), record("2", "a"), record("3", "b")])
            .unwrap();
        assert_eq!(third.job.id, "3");
        assert!(schedule
            .pick(vec![record("1", "a"), record("2", "a")])
            .is_none());
    }
}

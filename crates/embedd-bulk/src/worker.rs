//! The background workers of one replica: each claims a chunk (the next of the key served least
//! recently, across every replica sharing the store), reads only that chunk's bytes of the
//! upload, embeds them, stores the rows as the chunk's result object and commits. The lease is
//! renewed while the chunk runs; a worker that loses it (its replica stalled, or the job was
//! cancelled) drops the chunk, and a replica that dies leaves a lease that runs out, after which
//! another worker redoes that chunk.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::Notify;

use crate::batch_input::chunk_requests;
use crate::csv_input::{self, chunk_texts};
use crate::objects::JobObjects;
use crate::store::{ChunkClaim, ChunkOutput, Commit, JobKind, JobStore};

/// Requests of one batch chunk in flight at once: the scheduler batches them together.
const CONCURRENT_REQUESTS: usize = 64;

/// Times one stage of a chunk into `embedd_bulk_chunk_stage_seconds{stage}`: the coordination
/// stages (claim, read, store, commit) against the embedding itself.
fn record_stage(stage: &'static str, started: Instant) {
    metrics::histogram!("embedd_bulk_chunk_stage_seconds", "stage" => stage)
        .record(started.elapsed().as_secs_f64());
}

/// Vectors (normalized, in row order) for one chunk, with the tokens run and rows truncated.
pub struct EmbeddedRows {
    pub vectors: Vec<Vec<f32>>,
    pub tokens: u64,
    pub truncated: u64,
}

pub type EmbedFuture<'a> = Pin<Box<dyn Future<Output = Result<EmbeddedRows, String>> + Send + 'a>>;

/// A batch request's answer: its HTTP status and JSON body, as the endpoint would give it.
pub type RequestFuture<'a> = Pin<Box<dyn Future<Output = (u16, Value)> + Send + 'a>>;

/// How the worker embeds: the server provides it, at background priority.
pub trait RowEmbedder: Send + Sync + 'static {
    fn embed<'a>(&'a self, model: &'a str, texts: Vec<String>) -> EmbedFuture<'a>;
    /// Answers one batch request (`body` for `endpoint`) as the route would, as `owner`.
    fn run_request<'a>(&'a self, endpoint: &'a str, body: Map<String, Value>) -> RequestFuture<'a>;
    /// The models this replica embeds with: it claims only their jobs' chunks, so replicas
    /// serving different models can share one store.
    fn models(&self) -> Vec<String>;
}

/// The result file's first line; the chunks' rows follow it.
pub const RESULT_HEADER: &[u8] = b"text,embedding\n";

/// A chunk claimed this many times without a commit fails its job: something about it stops
/// every worker that takes it.
const MAX_ATTEMPTS: u64 = 5;

#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// Rows per planned chunk (fixed for a job when it is uploaded).
    pub chunk_rows: usize,
    /// Chunks this replica runs at once.
    pub workers: usize,
    /// How long a claimed chunk stays with its worker without a renewal.
    pub lease: Duration,
    /// Finished jobs older than this are deleted with their files.
    pub retention: Duration,
    /// How often to look for work when nothing wakes the worker.
    pub poll: Duration,
    /// The mail hook: a shell command run when a job that has an email finishes, with
    /// `EMBEDD_JOB_ID`, `EMBEDD_JOB_STATUS`, `EMBEDD_JOB_EMAIL` and `EMBEDD_JOB_ERROR` set.
    pub notify_command: Option<String>,
}

/// Why a chunk did not commit.
enum ChunkError {
    /// The job cannot go on (its rows cannot be read or embedded): it fails with this reason.
    Job(String),
    /// The store or object store did not answer; the chunk is retried when its lease runs out.
    Transient(String),
    /// Another worker holds the chunk now, or the job stopped running.
    LeaseLost,
}

pub struct BulkWorker {
    store: Arc<JobStore>,
    objects: JobObjects,
    embedder: Arc<dyn RowEmbedder>,
    config: WorkerConfig,
    /// This replica's name on its leases.
    owner: String,
    wake: Arc<Notify>,
    stopping: Arc<AtomicBool>,
    last_sweep: Mutex<Option<Instant>>,
}

/// A name no other replica has: host, process and a random part.
pub fn replica_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "host".into());
    let mut raw = [0u8; 4];
    let _ = getrandom::fill(&mut raw);
    format!("{host}-{}-{}", std::process::id(), hex::encode(raw))
}

impl BulkWorker {
    pub fn new(
        store: Arc<JobStore>,
        objects: JobObjects,
        embedder: Arc<dyn RowEmbedder>,
        config: WorkerConfig,
        wake: Arc<Notify>,
        stopping: Arc<AtomicBool>,
    ) -> Self {
        Self {
            store,
            objects,
            embedder,
            config,
            owner: replica_name(),
            wake,
            stopping,
            last_sweep: Mutex::new(None),
        }
    }

    /// Runs until `stopping` is set; chunks in progress commit first, then this replica's
    /// leases are given back.
    pub async fn run(self) {
        let this = Arc::new(self);
        this.plan_earlier_jobs().await;
        let workers = (0..this.config.workers.max(1))
            .map(|_| tokio::spawn(this.clone().run_loop()))
            .collect::<Vec<_>>();
        for worker in workers {
            let _ = worker.await;
        }
        if let Err(e) = this.store.release(&this.owner).await {
            tracing::warn!(error = %e, "giving back bulk chunk leases");
        }
        tracing::info!("bulk worker stopped");
    }

    async fn run_loop(self: Arc<Self>) {
        // The served models are fixed once the server is up.
        let models = self.embedder.models();
        while !self.stopping.load(Ordering::Acquire) {
            self.sweep_now_and_then().await;
            let claiming = Instant::now();
            match self
                .store
                .claim(&self.owner, self.config.lease, &models)
                .await
            {
                Ok(Some(claim)) => {
                    record_stage("claim", claiming);
                    self.run_chunk(claim).await
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
    }

    /// Jobs uploaded before results were chunked get their chunks planned, and run from the
    /// start into chunk objects.
    async fn plan_earlier_jobs(&self) {
        let ids = match self.store.unplanned().await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "listing bulk jobs to plan");
                return;
            }
        };
        for id in ids {
            let planned = match self.objects.input(&id).await {
                Ok(input) => csv_input::check(&input[..], self.config.chunk_rows as u64)
                    .map_err(|e| e.to_string()),
                Err(e) => Err(format!("the upload cannot be read: {e}")),
            };
            let result = match planned {
                Ok(summary) => self.store.plan(&id, &summary).await,
                Err(error) => self.store.fail(&id, &error).await,
            };
            if let Err(e) = result {
                tracing::error!(job = %id, error = %e, "planning an earlier bulk job");
            }
        }
    }

    /// Runs one claimed chunk to its commit, or lets it go.
    async fn run_chunk(&self, claim: ChunkClaim) {
        let id = claim.job.id.clone();
        let outcome = if claim.attempt > MAX_ATTEMPTS {
            Err(ChunkError::Job(format!(
                "the chunk from row {} was tried {MAX_ATTEMPTS} times without finishing",
                claim.plan.first_row
            )))
        } else {
            tokio::select! {
                outcome = self.chunk(&claim) => outcome,
                () = self.keep_lease(&claim) => Err(ChunkError::LeaseLost),
            }
        };
        let finished = match outcome {
            Ok(Commit::Counted { job_completed }) => {
                if job_completed {
                    tracing::info!(job = %id, rows = claim.job.total_rows, "bulk job completed");
                }
                job_completed
            }
            Ok(Commit::LeaseLost) | Err(ChunkError::LeaseLost) => {
                tracing::info!(job = %id, chunk = claim.index, "bulk chunk taken over or job stopped; dropped");
                false
            }
            Err(ChunkError::Transient(error)) => {
                tracing::warn!(job = %id, chunk = claim.index, %error, "bulk chunk will be retried");
                false
            }
            Err(ChunkError::Job(error)) => {
                tracing::warn!(job = %id, %error, "bulk job failed");
                if let Err(e) = self.store.fail(&id, &error).await {
                    tracing::error!(job = %id, error = %e, "recording a failed job");
                }
                true
            }
        };
        if finished {
            self.notify(&id).await;
        }
        // Another worker may be waiting for work.
        self.wake.notify_one();
    }

    /// Renews the lease a third of the way through each term; returns when it is lost.
    async fn keep_lease(&self, claim: &ChunkClaim) {
        let every = (self.config.lease / 3).max(Duration::from_millis(50));
        loop {
            tokio::time::sleep(every).await;
            match self
                .store
                .renew(&claim.job.id, claim.index, &self.owner, self.config.lease)
                .await
            {
                Ok(true) => {}
                Ok(false) => return,
                // The lease may still be good: try again at the next beat.
                Err(e) => tracing::warn!(error = %e, "renewing a bulk chunk lease"),
            }
        }
    }

    /// Reads, embeds, stores and commits one chunk.
    async fn chunk(&self, claim: &ChunkClaim) -> Result<Commit, ChunkError> {
        let job = &claim.job;
        let plan = claim.plan;
        let reading = Instant::now();
        let bytes = self
            .objects
            .input_range(&job.id, plan.byte_start..plan.byte_end)
            .await
            .map_err(|e| match e.is_not_found() {
                true => ChunkError::Job(format!("the upload is gone: {e}")),
                false => ChunkError::Transient(e.to_string()),
            })?;
        record_stage("read", reading);
        let embedding = Instant::now();
        let (rows, errors, mut output) = match claim.kind {
            JobKind::Csv => self.embed_rows(claim, &bytes).await?,
            JobKind::Batch => self.answer_requests(claim, &bytes).await?,
        };
        record_stage("embed", embedding);
        output.result_bytes = rows.len() as u64;
        output.error_bytes = errors.len() as u64;
        let storing = Instant::now();
        self.objects
            .put_chunk(&job.id, claim.index, rows)
            .await
            .map_err(|e| ChunkError::Transient(e.to_string()))?;
        if !errors.is_empty() {
            self.objects
                .put_errors(&job.id, claim.index, errors)
                .await
                .map_err(|e| ChunkError::Transient(e.to_string()))?;
        }
        record_stage("store", storing);
        let committing = Instant::now();
        let commit = self
            .store
            .commit(claim, &self.owner, output)
            .await
            .map_err(|e| ChunkError::Transient(e.to_string()));
        record_stage("commit", committing);
        commit
    }

    /// A CSV chunk: `text,embedding` rows.
    async fn embed_rows(
        &self,
        claim: &ChunkClaim,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>, ChunkOutput), ChunkError> {
        let texts = chunk_texts(bytes, &claim.plan, claim.text_column)
            .map_err(|e| ChunkError::Job(e.to_string()))?;
        let embedded = self
            .embedder
            .embed(&claim.job.model_name, texts.clone())
            .await
            .map_err(ChunkError::Job)?;
        let mut rows = Vec::new();
        write_rows(&mut rows, &texts, &embedded.vectors).map_err(ChunkError::Job)?;
        let output = ChunkOutput {
            tokens: embedded.tokens,
            truncated: embedded.truncated,
            ..ChunkOutput::default()
        };
        Ok((rows, Vec::new(), output))
    }

    /// A batch chunk: one output line per request that succeeded and one error line per
    /// request that did not, each with its `custom_id`; a request's failure fails only it.
    async fn answer_requests(
        &self,
        claim: &ChunkClaim,
        bytes: &[u8],
    ) -> Result<(Vec<u8>, Vec<u8>, ChunkOutput), ChunkError> {
        let requests = chunk_requests(bytes, &claim.plan).map_err(ChunkError::Job)?;
        let answers: Vec<_> = futures_util::stream::iter(requests)
            .map(|request| async move {
                let (status, body) = self.embedder.run_request(&request.url, request.body).await;
                (request.custom_id, status, body)
            })
            .buffered(CONCURRENT_REQUESTS)
            .collect()
            .await;
        let (mut out, mut errors) = (Vec::new(), Vec::new());
        let mut output = ChunkOutput::default();
        for (k, (custom_id, status, body)) in answers.into_iter().enumerate() {
            let id = format!(
                "batch_req_{}_{}",
                claim.job.id,
                claim.plan.first_row + k as u64
            );
            let succeeded = (200..300).contains(&status);
            if succeeded {
                output.tokens += body["usage"]["total_tokens"].as_u64().unwrap_or(0);
            } else {
                output.failed += 1;
            }
            let line = embedd_api::openai_batch::output_line(&id, &custom_id, status, body);
            let target = if succeeded { &mut out } else { &mut errors };
            serde_json::to_writer(&mut *target, &line)
                .map_err(|e| ChunkError::Job(e.to_string()))?;
            target.push(b'\n');
        }
        Ok((out, errors, output))
    }

    /// Runs the mail hook for a finished job that has an email; its failure is only logged.
    async fn notify(&self, id: &str) {
        let Some(command) = &self.config.notify_command else {
            return;
        };
        let Ok(Some(record)) = self.store.get(id).await else {
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

    /// Deletes jobs past retention, once a minute at most across this replica's workers.
    async fn sweep_now_and_then(&self) {
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(60)) {
                return;
            }
            *last = Some(Instant::now());
        }
        let cutoff = time::OffsetDateTime::now_utc().unix_timestamp()
            - self.config.retention.as_secs() as i64;
        let ids = match self.store.finished_before(cutoff).await {
            Ok(ids) => ids,
            Err(e) => {
                tracing::error!(error = %e, "listing old bulk jobs");
                return;
            }
        };
        let mut deleted = 0;
        for id in ids {
            // Objects first: a job row without objects can be deleted again, not the reverse.
            let result = match self.objects.delete_job(&id).await {
                Ok(()) => self.store.delete(&id).await.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            };
            match result {
                Ok(()) => deleted += 1,
                Err(e) => tracing::error!(job = %id, error = %e, "deleting an old bulk job"),
            }
        }
        if deleted > 0 {
            tracing::info!(jobs = deleted, "deleted bulk jobs past retention");
        }
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
    use crate::store::{new_job_id, NewJob};
    use bytes::Bytes;
    use embedd_api::BulkJobStatus;
    use futures_util::TryStreamExt;

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

        fn models(&self) -> Vec<String> {
            vec!["m".into()]
        }

        /// Answers with the input's length, or a 422 for the input "bad".
        fn run_request<'a>(
            &'a self,
            _endpoint: &'a str,
            body: Map<String, Value>,
        ) -> RequestFuture<'a> {
            Box::pin(async move {
                let input = body["input"].as_str().unwrap_or("").to_string();
                if input == "bad" {
                    return (422, serde_json::json!({"detail": "bad input"}));
                }
                let n = input.len();
                (
                    200,
                    serde_json::json!({"data": [{"embedding": [n]}], "usage": {"total_tokens": n}}),
                )
            })
        }
    }

    fn models() -> Vec<String> {
        vec!["m".into()]
    }

    struct Fixture {
        dir: std::path::PathBuf,
        store: Arc<JobStore>,
        objects: JobObjects,
        rt: tokio::runtime::Runtime,
    }

    impl Fixture {
        fn new(name: &str) -> Self {
            let dir = std::env::temp_dir().join(format!("embedd-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            let store = Arc::new(rt.block_on(JobStore::open(None, &dir)).unwrap());
            let objects = JobObjects::local(&dir.join("bulk")).unwrap();
            Self {
                dir,
                store,
                objects,
                rt,
            }
        }

        fn upload(&self, user: &str, csv: &str, email: Option<&str>) -> String {
            let id = new_job_id().unwrap();
            let summary = csv_input::check(csv.as_bytes(), 2).unwrap();
            self.rt.block_on(async {
                self.objects
                    .put_input(&id, Bytes::from(csv.as_bytes().to_vec()))
                    .await
                    .unwrap();
                self.store
                    .create(NewJob::csv(
                        id.clone(),
                        user.into(),
                        "m".into(),
                        "f.csv".into(),
                        email.map(Into::into),
                        summary,
                    ))
                    .await
                    .unwrap();
            });
            id
        }

        fn worker(&self, embedder: Arc<FakeEmbedder>) -> BulkWorker {
            BulkWorker::new(
                self.store.clone(),
                self.objects.clone(),
                embedder,
                WorkerConfig {
                    chunk_rows: 2,
                    workers: 1,
                    lease: Duration::from_secs(30),
                    retention: Duration::from_secs(3600),
                    poll: Duration::from_millis(10),
                    notify_command: None,
                },
                Arc::new(Notify::new()),
                Arc::new(AtomicBool::new(false)),
            )
        }

        /// Claims and runs chunks one at a time until none is left.
        fn drain(&self, worker: &BulkWorker) {
            self.rt.block_on(async {
                while let Some(claim) = self
                    .store
                    .claim(&worker.owner, worker.config.lease, &models())
                    .await
                    .unwrap()
                {
                    worker.run_chunk(claim).await;
                }
            });
        }

        fn job(&self, id: &str) -> embedd_api::BulkJob {
            self.rt.block_on(self.store.get(id)).unwrap().unwrap().job
        }

        fn result_texts(&self, id: &str) -> Vec<String> {
            let chunks = self
                .rt
                .block_on(self.store.get(id))
                .unwrap()
                .unwrap()
                .chunks;
            let parts: Vec<Bytes> = self
                .rt
                .block_on(async {
                    let stream = self
                        .objects
                        .result_stream(id, chunks, RESULT_HEADER)
                        .await?;
                    stream.try_collect().await
                })
                .unwrap();
            let all = parts.concat();
            csv::Reader::from_reader(&all[..])
                .records()
                .map(|r| r.unwrap()[0].to_string())
                .collect()
        }
    }

    impl Drop for Fixture {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }

    #[test]
    fn a_chunk_whose_worker_died_is_redone_and_every_row_counts_once() {
        let f = Fixture::new("lease");
        let id = f.upload("u", "text\na\nbb\n\"c,c\"\ndddd\neeeee\n", None);
        // A replica claims the first chunk with a lease that has already run out, then dies.
        let dead =
            f.rt.block_on(f.store.claim("dead-replica", Duration::ZERO, &models()))
                .unwrap()
                .unwrap();
        assert_eq!((dead.index, dead.plan.rows), (0, 2));
        let embedder = Arc::new(FakeEmbedder::default());
        let worker = f.worker(embedder.clone());
        f.drain(&worker);
        let job = f.job(&id);
        assert_eq!(job.status, BulkJobStatus::Completed);
        assert_eq!((job.processed_rows, job.used_token_count), (5, 15));
        assert_eq!(f.result_texts(&id), ["a", "bb", "c,c", "dddd", "eeeee"]);
        assert_eq!(embedder.chunks.lock().unwrap().concat().len(), 5);
        // The dead replica's late commit counts nothing: the chunk is another's now.
        let late =
            f.rt.block_on(
                f.store
                    .commit(&dead, "dead-replica", ChunkOutput::default()),
            )
            .unwrap();
        assert_eq!(late, Commit::LeaseLost);
        assert_eq!(f.job(&id).processed_rows, 5);
    }

    #[test]
    fn two_replicas_share_a_job_and_a_reopened_store_frees_dead_leases() {
        let f = Fixture::new("replicas");
        let csv: String = (0..9).map(|i| format!("row{i}\n")).collect();
        let id = f.upload("u", &csv, None);
        let (a, b) = (
            f.worker(Arc::new(FakeEmbedder::default())),
            f.worker(Arc::new(FakeEmbedder::default())),
        );
        f.rt.block_on(async {
            // A holds chunk 0 and B chunk 1 at once: claims never hand out a held chunk.
            let first = f
                .store
                .claim(&a.owner, a.config.lease, &models())
                .await
                .unwrap()
                .unwrap();
            let second = f
                .store
                .claim(&b.owner, b.config.lease, &models())
                .await
                .unwrap()
                .unwrap();
            assert_eq!((first.index, second.index), (0, 1));
            b.run_chunk(second).await;
            a.run_chunk(first).await;
        });
        f.drain(&b);
        assert_eq!(f.job(&id).status, BulkJobStatus::Completed);
        let expected: Vec<String> = (0..9).map(|i| format!("row{i}")).collect();
        assert_eq!(f.result_texts(&id), expected);

        // A process that held a lease and died: the next SQLite open makes the chunk pending.
        let other = f.upload("u", "x\ny\n", None);
        f.rt.block_on(f.store.claim("gone", Duration::from_secs(3600), &models()))
            .unwrap()
            .unwrap();
        let reopened = Arc::new(f.rt.block_on(JobStore::open(None, &f.dir)).unwrap());
        let again =
            f.rt.block_on(reopened.claim("new", Duration::from_secs(5), &models()));
        assert_eq!(again.unwrap().unwrap().job.id, other);
    }

    #[test]
    fn a_batch_answers_each_request_once_and_a_failed_one_goes_to_the_errors() {
        let f = Fixture::new("batch");
        let lines: String = ["aa", "bad", "cccc"]
            .iter()
            .map(|input| {
                format!(
                    "{{\"custom_id\":\"c-{input}\",\"method\":\"POST\",\"url\":\"/v1/embeddings\",\
                     \"body\":{{\"model\":\"m\",\"input\":\"{input}\"}}}}\n"
                )
            })
            .collect();
        let plan = crate::batch_input::check(lines.as_bytes(), "/v1/embeddings", 2).unwrap();
        let id = new_job_id().unwrap();
        f.rt.block_on(async {
            f.objects
                .put_input(&id, Bytes::from(lines.clone().into_bytes()))
                .await
                .unwrap();
            let new = NewJob {
                id: id.clone(),
                kind: JobKind::Batch,
                user_id: "u".into(),
                model_name: plan.model.clone(),
                file_name: "in.jsonl".into(),
                user_email: None,
                rows: plan.requests,
                text_column: 0,
                chunks: plan.chunks.clone(),
            };
            let batch = crate::store::BatchRow {
                input_file_id: "file-1".into(),
                endpoint: "/v1/embeddings".into(),
                completion_window: "24h".into(),
                metadata: None,
                errors: None,
                cancelled_unix: None,
            };
            f.store.create_batch(new, batch).await.unwrap();
        });
        f.drain(&f.worker(Arc::new(FakeEmbedder::default())));
        let (record, _) = f.rt.block_on(f.store.get_batch(&id)).unwrap().unwrap();
        assert_eq!(record.job.status, BulkJobStatus::Completed);
        assert_eq!((record.job.processed_rows, record.failed_rows), (3, 1));
        assert_eq!(record.job.used_token_count, 6);
        let done = f.rt.block_on(f.store.done_chunks(&id)).unwrap();
        let read = |part| -> Vec<Value> {
            // Only chunks with error lines have an errors object.
            let indices = done
                .iter()
                .filter(|c| part == crate::objects::ChunkPart::Results || c.error_bytes > 0)
                .map(|c| c.index)
                .collect();
            let parts: Vec<Bytes> =
                f.rt.block_on(async {
                    let stream = f.objects.parts_stream(&id, indices, part, b"").await?;
                    stream.try_collect().await
                })
                .unwrap();
            parts
                .concat()
                .split(|&b| b == b'\n')
                .filter(|l| !l.is_empty())
                .map(|l| serde_json::from_slice(l).unwrap())
                .collect()
        };
        let outputs = read(crate::objects::ChunkPart::Results);
        let ids: Vec<&str> = outputs
            .iter()
            .map(|l| l["custom_id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, ["c-aa", "c-cccc"]);
        assert_eq!(outputs[1]["response"]["body"]["data"][0]["embedding"][0], 4);
        let errors = read(crate::objects::ChunkPart::Errors);
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0]["custom_id"], "c-bad");
        assert_eq!(errors[0]["response"]["status_code"], 422);
    }

    #[test]
    fn a_cancelled_job_stops_being_claimed() {
        let f = Fixture::new("cancel");
        let id = f.upload("u", "a\nb\nc\n", None);
        let first =
            f.rt.block_on(f.store.claim("r", Duration::from_secs(30), &models()))
                .unwrap()
                .unwrap();
        assert!(f.rt.block_on(f.store.cancel(&id)).unwrap());
        assert!(
            !f.rt.block_on(f.store.cancel(&id)).unwrap(),
            "already stopped"
        );
        // The chunk in flight loses its lease at the next renewal; nothing else is handed out.
        let renewed = f.rt.block_on(
            f.store
                .renew(&id, first.index, "r", Duration::from_secs(30)),
        );
        assert!(!renewed.unwrap());
        let next =
            f.rt.block_on(f.store.claim("r", Duration::from_secs(30), &models()));
        assert!(next.unwrap().is_none());
    }

    #[test]
    fn a_replica_claims_only_jobs_of_models_it_serves() {
        let f = Fixture::new("models");
        f.upload("u", "x\n", None);
        let other =
            f.rt.block_on(f.store.claim("r", Duration::from_secs(5), &["n".into()]));
        assert!(other.unwrap().is_none());
        let none =
            f.rt.block_on(f.store.claim("r", Duration::from_secs(5), &[]));
        assert!(none.unwrap().is_none());
        let mine =
            f.rt.block_on(f.store.claim("r", Duration::from_secs(5), &models()));
        assert!(mine.unwrap().is_some());
    }

    #[test]
    fn the_mail_hook_runs_for_finished_jobs_with_an_email() {
        let f = Fixture::new("hook");
        let id = f.upload("u", "x\n", Some("a@b.co"));
        let out = f.dir.join("hook.txt");
        let mut w = f.worker(Arc::new(FakeEmbedder::default()));
        w.config.notify_command = Some(format!(
            "echo \"$EMBEDD_JOB_ID $EMBEDD_JOB_STATUS $EMBEDD_JOB_EMAIL\" > {}",
            out.display()
        ));
        let stopping = w.stopping.clone();
        f.rt.block_on(async {
            let run = tokio::spawn(w.run());
            for _ in 0..500 {
                if out.exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            stopping.store(true, Ordering::Release);
            let _ = run.await;
        });
        let written = std::fs::read_to_string(&out).unwrap();
        assert_eq!(written.trim(), format!("{id} completed a@b.co"));
    }

    #[test]
    fn an_embedding_failure_fails_the_job_with_its_reason() {
        let f = Fixture::new("poison");
        let id = f.upload("u", "ok\npoison\n", None);
        f.drain(&f.worker(Arc::new(FakeEmbedder::default())));
        let job = f.job(&id);
        assert_eq!(job.status, BulkJobStatus::Failed);
        assert_eq!(job.error.as_deref(), Some("cannot embed poison"));
    }

    /// Key "a" uploads 10 rows, then key "b" 2: b's rows run in the second chunk, not after
    /// all of a's; both jobs finish with every row once.
    #[test]
    fn keys_take_turns_chunk_by_chunk() {
        let f = Fixture::new("fair");
        let upload_a: String = (0..10).map(|i| format!("a{i}\n")).collect();
        let a = f.upload("a", &upload_a, None);
        let b = f.upload("b", "b0\nb1\n", None);
        let embedder = Arc::new(FakeEmbedder::default());
        f.drain(&f.worker(embedder.clone()));
        let chunks = embedder.chunks.lock().unwrap().clone();
        assert_eq!(chunks[0], ["a0", "a1"]);
        assert_eq!(chunks[1], ["b0", "b1"]);
        assert_eq!(chunks[2], ["a2", "a3"]);
        assert_eq!(chunks.concat().len(), 12);
        for id in [&a, &b] {
            assert_eq!(f.job(id).status, BulkJobStatus::Completed);
        }
        assert_eq!(f.job(&a).processed_rows, 10);
    }

    #[test]
    fn a_job_from_before_chunked_results_is_planned_and_run_from_the_start() {
        let f = Fixture::new("legacy");
        let id = f.upload("u", "p\nq\nr\n", None);
        // What the previous version left: a job without chunks, half done.
        let db = rusqlite::Connection::open(f.dir.join("bulk/jobs.sqlite3")).unwrap();
        db.execute_batch(&format!(
            "DELETE FROM chunks; UPDATE jobs SET chunk_count = 0, processed_rows = 2, \
             status = 'in-progress' WHERE id = '{id}'"
        ))
        .unwrap();
        let w = f.worker(Arc::new(FakeEmbedder::default()));
        f.rt.block_on(w.plan_earlier_jobs());
        f.drain(&w);
        assert_eq!(f.job(&id).processed_rows, 3);
        assert_eq!(f.result_texts(&id), ["p", "q", "r"]);
    }
}

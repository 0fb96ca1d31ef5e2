//! The batching scheduler every served model runs behind.
//!
//! Requests submit lists of items (token sequences). One worker thread per model keeps a pool of
//! pending items from all requests and packs them into batches: each batch is seeded by the
//! request that has waited longest since it was last served (so a new small request waits at most
//! one batch behind a large one), and items of similar length from every request join the seed
//! while the padded batch stays under a token budget (so padding stays small). A large client
//! request is thereby split across many batches and interleaved with the requests that arrive
//! while it runs. Results go back to each request in its own order. Requests whose caller went
//! away are dropped from the pool.

use std::collections::VecDeque;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::sync::oneshot;

use crate::error::{Result, RuntimeError};

/// How batches are formed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerConfig {
    /// Upper bound on `batch size x longest item` (padded tokens) per batch.
    pub max_batch_tokens: usize,
    /// Upper bound on items per batch.
    pub max_batch_size: usize,
    /// Items queued (not yet finished) across all requests before new requests are refused.
    pub max_queued_items: usize,
    /// Upper bound on items per background batch: a live request arriving while one runs waits
    /// for at most this much background work.
    pub max_background_batch_size: usize,
    /// A live request whose expected wait (from the measured throughput) is longer is refused
    /// with [`RuntimeError::Overloaded`] instead of queued; `None`: no limit.
    pub max_queue_wait: Option<Duration>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        Self {
            max_batch_tokens: 16_384,
            max_batch_size: 64,
            max_queued_items: 65_536,
            max_background_batch_size: 8,
            max_queue_wait: Some(Duration::from_secs(10)),
        }
    }
}

/// Anything the scheduler can batch: its cost is its length in tokens.
pub trait TokenCost {
    fn tokens(&self) -> usize;
}

impl TokenCost for crate::tokenize::TokenSequence {
    fn tokens(&self) -> usize {
        self.len()
    }
}

/// Live requests are always batched before background work (bulk jobs), and the two never share
/// a batch, so a running bulk job adds at most one batch of wait to a live request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Priority {
    Live,
    Background,
}

/// A batch that failed, as `/health` reports the last one.
#[derive(Debug, Clone, PartialEq)]
pub struct Incident {
    pub at: SystemTime,
    pub error: String,
    /// The model code panicked (a kernel assertion, a candle panic), rather than returning an
    /// error.
    pub panicked: bool,
}

/// Whether a model's worker is serving.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerState {
    Serving,
    /// The worker thread has ended; every request gets 503.
    Stopped,
}

/// A model's health: what its worker has run and the last batch that failed.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthReport {
    pub state: WorkerState,
    pub batches: u64,
    pub failed_batches: u64,
    pub panics: u64,
    pub last_incident: Option<Incident>,
}

#[derive(Default)]
struct HealthCounters {
    batches: AtomicU64,
    failed_batches: AtomicU64,
    panics: AtomicU64,
    last_incident: Mutex<Option<Incident>>,
}

impl HealthCounters {
    fn record_failure(&self, error: String, panicked: bool) {
        self.failed_batches.fetch_add(1, Ordering::Relaxed);
        if panicked {
            self.panics.fetch_add(1, Ordering::Relaxed);
        }
        let incident = Incident {
            at: SystemTime::now(),
            error,
            panicked,
        };
        // A poisoned lock only means a reader panicked; the slot itself is still usable.
        *self
            .last_incident
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(incident);
    }
}

/// The live work a model holds and how fast it goes, for admission by expected wait.
///
/// The worker serves live requests round-robin (the least recently served seeds each batch), so
/// it shares its throughput among them: a request of `s` tokens finishes after about
/// `s + sum(min(s_j, s))` tokens of work, over every other live request `j` with `s_j` tokens
/// left (processor sharing). A small request is thereby admitted quickly behind a flood of large
/// ones, and a large one is refused while the model is already busy for longer than the limit.
#[derive(Default)]
struct LiveLoad {
    /// Tokens not yet run, per live request.
    remaining: Mutex<std::collections::HashMap<u64, usize>>,
    next_id: AtomicU64,
    /// Tokens per second the model has run, smoothed; 0 until the first batch.
    tokens_per_second: AtomicU64,
}

impl LiveLoad {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<u64, usize>> {
        // A poisoned map only means a holder panicked; the counts are still usable.
        self.remaining
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn rate(&self) -> f64 {
        f64::from_bits(self.tokens_per_second.load(Ordering::Relaxed))
    }

    fn record_batch(&self, tokens: usize, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        if tokens == 0 || seconds <= 0.0 {
            return;
        }
        let measured = tokens as f64 / seconds;
        let old = self.rate();
        let smoothed = if old > 0.0 {
            0.7 * old + 0.3 * measured
        } else {
            measured
        };
        self.tokens_per_second
            .store(smoothed.to_bits(), Ordering::Relaxed);
    }

    /// Whether a request of `tokens` would wait within `limit`; if not, the seconds to wait
    /// before retrying.
    fn within(
        remaining: &std::collections::HashMap<u64, usize>,
        rate: f64,
        tokens: usize,
        limit: Option<Duration>,
    ) -> std::result::Result<(), u64> {
        let Some(limit) = limit.filter(|_| rate > 0.0 && !remaining.is_empty()) else {
            return Ok(());
        };
        let ahead: usize = remaining.values().map(|&r| r.min(tokens)).sum();
        let expected = (ahead + tokens) as f64 / rate;
        if expected <= limit.as_secs_f64() {
            return Ok(());
        }
        let drain = remaining.values().sum::<usize>() as f64 / rate;
        Err((drain.ceil() as u64).clamp(1, 60))
    }

    /// Registers a live request of `tokens`, or says how long to wait before retrying when its
    /// expected wait is over `limit`.
    fn admit(&self, tokens: usize, limit: Option<Duration>) -> std::result::Result<u64, u64> {
        let mut remaining = self.lock();
        Self::within(&remaining, self.rate(), tokens, limit)?;
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        remaining.insert(id, tokens);
        Ok(id)
    }

    /// Takes a batch's tokens off the requests they came from, under one lock.
    fn ran(&self, done: impl IntoIterator<Item = (u64, usize)>) {
        let mut remaining = self.lock();
        for (id, tokens) in done {
            if let Some(left) = remaining.get_mut(&id) {
                *left = left.saturating_sub(tokens);
            }
        }
    }

    fn forget(&self, id: u64) {
        self.lock().remove(&id);
    }
}

/// Runs one batch on the model; called on the worker thread only.
pub type BatchFn<I, O> = Box<dyn FnMut(&[&I]) -> Result<Vec<O>> + Send>;

type Reply<O> = oneshot::Sender<Result<Vec<O>>>;

struct Job<I, O> {
    items: Vec<I>,
    priority: Priority,
    reply: Reply<O>,
    /// The live request's entry in [`LiveLoad`]; background work has none.
    live_id: Option<u64>,
}

/// Handle to a model's worker thread. Cheap to share behind an `Arc`.
pub struct BatchScheduler<I, O> {
    sender: Option<SyncSender<Job<I, O>>>,
    queued: Arc<AtomicUsize>,
    health: Arc<HealthCounters>,
    load: Arc<LiveLoad>,
    config: SchedulerConfig,
    worker: Option<JoinHandle<()>>,
}

impl<I: TokenCost + Send + 'static, O: Send + 'static> BatchScheduler<I, O> {
    pub fn new(name: &str, config: SchedulerConfig, run: BatchFn<I, O>) -> Self {
        // The channel only hands jobs to the worker; the item budget below is the real bound.
        let (sender, receiver) = mpsc::sync_channel(1024);
        let queued = Arc::new(AtomicUsize::new(0));
        let health = Arc::new(HealthCounters::default());
        let load = Arc::new(LiveLoad::default());
        let shared = Shared {
            queued: queued.clone(),
            health: health.clone(),
            load: load.clone(),
        };
        let worker = std::thread::Builder::new()
            .name(format!("embedd-model-{name}"))
            .spawn({
                let name = name.to_string();
                move || Worker::new(name, config, run, shared).run(receiver)
            })
            .expect("spawning a thread at start-up");
        Self {
            sender: Some(sender),
            queued,
            health,
            load,
            config,
            worker: Some(worker),
        }
    }

    pub fn config(&self) -> SchedulerConfig {
        self.config
    }

    /// Items waiting or running right now.
    pub fn queued_items(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn health(&self) -> HealthReport {
        let stopped = self.worker.as_ref().is_none_or(JoinHandle::is_finished);
        HealthReport {
            state: if stopped {
                WorkerState::Stopped
            } else {
                WorkerState::Serving
            },
            batches: self.health.batches.load(Ordering::Relaxed),
            failed_batches: self.health.failed_batches.load(Ordering::Relaxed),
            panics: self.health.panics.load(Ordering::Relaxed),
            last_incident: self
                .health
                .last_incident
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .clone(),
        }
    }

    /// Whether a live request of about `tokens` would be admitted now: lets a server refuse a
    /// request before spending tokenization on it. [`Self::submit`] decides on the real count.
    pub fn check_admission(&self, tokens: usize) -> Result<()> {
        let remaining = self.load.lock();
        LiveLoad::within(
            &remaining,
            self.load.rate(),
            tokens,
            self.config.max_queue_wait,
        )
        .map_err(|retry_after_secs| RuntimeError::Overloaded {
            queued: self.queued_items(),
            retry_after_secs,
        })
    }

    /// Queues `items` and waits for their outputs, in order. Dropping the future drops the work.
    pub async fn submit(&self, items: Vec<I>) -> Result<Vec<O>> {
        self.submit_with(items, Priority::Live).await
    }

    /// [`Self::submit`] at a given priority.
    pub async fn submit_with(&self, items: Vec<I>, priority: Priority) -> Result<Vec<O>> {
        if items.is_empty() {
            return Ok(Vec::new());
        }
        let n = items.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        let refuse = |retry_after_secs: u64| {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            Err(RuntimeError::Overloaded {
                queued: before,
                retry_after_secs,
            })
        };
        if before + n > self.config.max_queued_items && before > 0 {
            return refuse(1);
        }
        let live_id = match priority {
            Priority::Live => {
                let tokens = items.iter().map(|i| i.tokens().max(1)).sum();
                match self.load.admit(tokens, self.config.max_queue_wait) {
                    Ok(id) => Some(id),
                    Err(retry_after) => return refuse(retry_after),
                }
            }
            Priority::Background => None,
        };
        let (reply, receiver) = oneshot::channel();
        let Some(sender) = self.sender.as_ref() else {
            return Err(RuntimeError::WorkerStopped);
        };
        let sent = sender.try_send(Job {
            items,
            priority,
            reply,
            live_id,
        });
        if sent.is_err() {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            if let Some(id) = live_id {
                self.load.forget(id);
            }
        }
        match sent {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                return Err(RuntimeError::Overloaded {
                    queued: before,
                    retry_after_secs: 1,
                })
            }
            Err(TrySendError::Disconnected(_)) => return Err(RuntimeError::WorkerStopped),
        }
        receiver.await.map_err(|_| RuntimeError::WorkerStopped)?
    }
}

impl<I, O> Drop for BatchScheduler<I, O> {
    fn drop(&mut self) {
        // Closing the channel lets the worker finish what it holds and exit.
        self.sender.take();
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
    }
}

struct PendingRequest<I, O> {
    items: Vec<Option<I>>,
    outputs: Vec<Option<O>>,
    /// Index of the first item not yet handed to a batch (items are taken in any order, so this is
    /// only where the search for this request's next seed starts).
    next: usize,
    unfinished: usize,
    /// The batch number that last took one of its items (0: never served).
    served_at: u64,
    priority: Priority,
    reply: Reply<O>,
    live_id: Option<u64>,
}

impl<I, O> PendingRequest<I, O> {
    /// Takes the request out of the live load, whichever way it ended.
    fn leave(&self, load: &LiveLoad) {
        if let Some(id) = self.live_id {
            load.forget(id);
        }
    }
}

/// What the scheduler handle and its worker both hold.
struct Shared {
    queued: Arc<AtomicUsize>,
    health: Arc<HealthCounters>,
    load: Arc<LiveLoad>,
}

struct Worker<I, O> {
    /// The model's name, as the batch metrics label it.
    name: String,
    config: SchedulerConfig,
    run: BatchFn<I, O>,
    queued: Arc<AtomicUsize>,
    health: Arc<HealthCounters>,
    load: Arc<LiveLoad>,
    /// In arrival order: the front request is the oldest.
    pending: VecDeque<PendingRequest<I, O>>,
    batches_run: u64,
}

impl<I: TokenCost, O> Worker<I, O> {
    fn new(name: String, config: SchedulerConfig, run: BatchFn<I, O>, shared: Shared) -> Self {
        Self {
            name,
            config,
            run,
            queued: shared.queued,
            health: shared.health,
            load: shared.load,
            pending: VecDeque::new(),
            batches_run: 0,
        }
    }

    fn run(mut self, receiver: Receiver<Job<I, O>>) {
        loop {
            if self.pending.is_empty() {
                match receiver.recv() {
                    Ok(job) => self.accept(job),
                    Err(_) => return,
                }
            }
            // Take everything that arrived meanwhile so it can share the next batch.
            loop {
                match receiver.recv_timeout(Duration::ZERO) {
                    Ok(job) => self.accept(job),
                    Err(RecvTimeoutError::Timeout) => break,
                    Err(RecvTimeoutError::Disconnected) if self.pending.is_empty() => return,
                    Err(RecvTimeoutError::Disconnected) => break,
                }
            }
            self.drop_abandoned();
            if let Some(batch) = self.next_batch() {
                self.execute(batch);
            }
        }
    }

    fn accept(&mut self, job: Job<I, O>) {
        let n = job.items.len();
        self.pending.push_back(PendingRequest {
            items: job.items.into_iter().map(Some).collect(),
            outputs: (0..n).map(|_| None).collect(),
            next: 0,
            unfinished: n,
            served_at: 0,
            priority: job.priority,
            reply: job.reply,
            live_id: job.live_id,
        });
    }

    fn drop_abandoned(&mut self) {
        let (queued, load) = (&self.queued, &self.load);
        self.pending.retain(|r| {
            let keep = !r.reply.is_closed();
            if !keep {
                queued.fetch_sub(r.unfinished, Ordering::AcqRel);
                r.leave(load);
            }
            keep
        });
    }

    /// Picks (request, item) pairs for one batch: the next item of the request served least
    /// recently (ties: the older request), then the items closest to its length while the padded
    /// size fits the budget.
    fn next_batch(&mut self) -> Option<Vec<(usize, usize)>> {
        for req in self.pending.iter_mut() {
            while req.next < req.items.len() && req.items[req.next].is_none() {
                req.next += 1;
            }
        }
        let (seed_req, seed_item) = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, req)| req.next < req.items.len())
            .min_by_key(|(r, req)| (req.priority, req.served_at, *r))
            .map(|(r, req)| (r, req.next))?;
        let priority = self.pending[seed_req].priority;
        let seed_len = self.len_of(seed_req, seed_item);
        let mut candidates: Vec<(usize, usize, usize)> = Vec::new();
        for (r, req) in self.pending.iter().enumerate() {
            if req.priority != priority {
                continue;
            }
            for (i, item) in req.items.iter().enumerate().skip(req.next) {
                if let Some(item) = item {
                    if (r, i) != (seed_req, seed_item) {
                        candidates.push((r, i, item.tokens().max(1)));
                    }
                }
            }
        }
        candidates.sort_by_key(|&(r, i, len)| (len.abs_diff(seed_len), r, i));
        let max_size = match priority {
            Priority::Live => self.config.max_batch_size,
            Priority::Background => self
                .config
                .max_background_batch_size
                .clamp(1, self.config.max_batch_size.max(1)),
        };
        let mut batch = vec![(seed_req, seed_item)];
        let mut longest = seed_len;
        for (r, i, len) in candidates {
            if batch.len() >= max_size {
                break;
            }
            let padded = (batch.len() + 1) * longest.max(len);
            if padded > self.config.max_batch_tokens {
                // Candidates are sorted by distance, so a longer one later might still fit only if
                // it is shorter than this; keep scanning for shorter items.
                continue;
            }
            longest = longest.max(len);
            batch.push((r, i));
        }
        Some(batch)
    }

    fn len_of(&self, r: usize, i: usize) -> usize {
        self.pending[r].items[i]
            .as_ref()
            .map_or(1, |it| it.tokens().max(1))
    }

    fn execute(&mut self, batch: Vec<(usize, usize)>) {
        self.batches_run += 1;
        for &(r, _) in &batch {
            self.pending[r].served_at = self.batches_run;
        }
        let items: Vec<I> = batch
            .iter()
            .filter_map(|&(r, i)| self.pending[r].items[i].take())
            .collect();
        let refs: Vec<&I> = items.iter().collect();
        let longest = refs.iter().map(|i| i.tokens()).max().unwrap_or(0);
        let tokens: Vec<usize> = refs.iter().map(|i| i.tokens().max(1)).collect();
        let started = std::time::Instant::now();
        metrics::histogram!("embedd_batch_size", "model" => self.name.clone())
            .record(refs.len() as f64);
        metrics::histogram!("embedd_batch_tokens", "model" => self.name.clone())
            .record((longest * refs.len()) as f64);
        // A panic in model code fails this batch's requests and nothing else: the worker, its
        // queue and every other request go on.
        let run = &mut self.run;
        let result = catch_unwind(AssertUnwindSafe(|| run(&refs)));
        self.health.batches.fetch_add(1, Ordering::Relaxed);
        self.load
            .record_batch(tokens.iter().sum(), started.elapsed());
        let pending = &self.pending;
        self.load.ran(
            batch
                .iter()
                .zip(&tokens)
                .filter_map(|(&(r, _), &t)| Some((pending[r].live_id?, t))),
        );
        let result = match result {
            Ok(result) => result,
            Err(payload) => {
                let msg = panic_message(payload.as_ref());
                tracing::error!(model = %self.name, panic = %msg, "a batch panicked; its requests fail, the model goes on");
                self.health.record_failure(msg.clone(), true);
                self.fail_requests(&batch, || RuntimeError::BatchPanicked(msg.clone()));
                return;
            }
        };
        match result {
            Ok(outputs) if outputs.len() == batch.len() => {
                for (&(r, i), out) in batch.iter().zip(outputs) {
                    let req = &mut self.pending[r];
                    req.outputs[i] = Some(out);
                    req.unfinished -= 1;
                }
                self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
                self.finish_completed();
            }
            Ok(outputs) => {
                let msg = format!(
                    "model returned {} outputs for {} inputs",
                    outputs.len(),
                    batch.len()
                );
                self.health.record_failure(msg.clone(), false);
                self.fail_requests(&batch, || {
                    RuntimeError::Inference(candle_core::Error::Msg(msg.clone()))
                });
            }
            Err(e) => {
                let msg = e.to_string();
                tracing::error!(error = %msg, "batch failed");
                self.health.record_failure(msg.clone(), false);
                self.fail_requests(&batch, || {
                    RuntimeError::Inference(candle_core::Error::Msg(msg.clone()))
                });
            }
        }
    }

    fn finish_completed(&mut self) {
        let mut r = 0;
        while r < self.pending.len() {
            if self.pending[r].unfinished == 0 {
                if let Some(req) = self.pending.remove(r) {
                    req.leave(&self.load);
                    let outputs = req.outputs.into_iter().flatten().collect();
                    let _ = req.reply.send(Ok(outputs));
                }
            } else {
                r += 1;
            }
        }
    }

    fn fail_requests(&mut self, batch: &[(usize, usize)], error: impl Fn() -> RuntimeError) {
        let mut failed: Vec<usize> = batch.iter().map(|&(r, _)| r).collect();
        failed.sort_unstable();
        failed.dedup();
        for r in failed.into_iter().rev() {
            if let Some(req) = self.pending.remove(r) {
                self.queued.fetch_sub(req.unfinished, Ordering::AcqRel);
                req.leave(&self.load);
                let _ = req.reply.send(Err(error()));
            }
        }
    }
}

/// The message a panic was raised with, when it carried one.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Debug, Clone, PartialEq)]
    struct Item(usize);
    impl TokenCost for Item {
        fn tokens(&self) -> usize {
            self.0
        }
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    #[test]
    fn outputs_come_back_in_request_order_under_the_budget() {
        let batches = Arc::new(Mutex::new(Vec::<Vec<usize>>::new()));
        let seen = batches.clone();
        let config = SchedulerConfig {
            max_batch_tokens: 40,
            max_batch_size: 4,
            max_queued_items: 1000,
            max_background_batch_size: 8,
            max_queue_wait: None,
        };
        let scheduler = BatchScheduler::new(
            "t",
            config,
            Box::new(move |items: &[&Item]| {
                seen.lock()
                    .unwrap()
                    .push(items.iter().map(|i| i.0).collect());
                Ok(items.iter().map(|i| i.0 * 10).collect())
            }),
        );
        let lens: Vec<usize> = vec![3, 20, 4, 19, 5, 2, 18, 1, 7];
        let out = runtime()
            .block_on(scheduler.submit(lens.iter().map(|&l| Item(l)).collect()))
            .unwrap();
        assert_eq!(out, lens.iter().map(|l| l * 10).collect::<Vec<_>>());
        for batch in batches.lock().unwrap().iter() {
            let longest = batch.iter().max().unwrap();
            assert!(batch.len() * longest <= 40 || batch.len() == 1, "{batch:?}");
            assert!(batch.len() <= 4);
        }
    }

    #[test]
    fn a_failing_batch_fails_its_request_and_the_worker_goes_on() {
        let scheduler = BatchScheduler::new(
            "t",
            SchedulerConfig::default(),
            Box::new(|items: &[&Item]| {
                if items.iter().any(|i| i.0 == 13) {
                    Err(RuntimeError::Tokenizer("unlucky".into()))
                } else {
                    Ok(items.iter().map(|i| i.0).collect())
                }
            }),
        );
        let rt = runtime();
        let err = rt.block_on(scheduler.submit(vec![Item(13)])).unwrap_err();
        assert!(err.to_string().contains("unlucky"));
        assert_eq!(
            rt.block_on(scheduler.submit(vec![Item(2)])).unwrap(),
            vec![2]
        );
        assert_eq!(scheduler.queued_items(), 0);
    }

    #[test]
    fn a_panicking_batch_fails_its_requests_and_the_worker_goes_on() {
        let scheduler = BatchScheduler::new(
            "t",
            SchedulerConfig::default(),
            Box::new(|items: &[&Item]| {
                assert!(items.iter().all(|i| i.0 != 13), "item 13 is unlucky");
                Ok(items.iter().map(|i| i.0).collect())
            }),
        );
        let rt = runtime();
        let err = rt.block_on(scheduler.submit(vec![Item(13)])).unwrap_err();
        assert!(matches!(err, RuntimeError::BatchPanicked(_)), "{err}");
        assert!(err.to_string().contains("item 13 is unlucky"), "{err}");
        assert_eq!(
            rt.block_on(scheduler.submit(vec![Item(2), Item(3)]))
                .unwrap(),
            vec![2, 3]
        );
        let health = scheduler.health();
        assert_eq!(health.state, WorkerState::Serving);
        assert_eq!((health.panics, health.failed_batches), (1, 1));
        assert!(health.batches >= 2);
        let incident = health.last_incident.unwrap();
        assert!(incident.panicked && incident.error.contains("unlucky"));
        assert_eq!(scheduler.queued_items(), 0);
    }

    #[test]
    fn a_small_request_is_not_stuck_behind_a_large_one() {
        let order = Arc::new(Mutex::new(Vec::<&'static str>::new()));
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let worker_gate = gate.clone();
        let scheduler = Arc::new(BatchScheduler::new(
            "t",
            SchedulerConfig {
                max_batch_tokens: 1000,
                max_batch_size: 4,
                max_queued_items: 1000,
                max_background_batch_size: 8,
                max_queue_wait: None,
            },
            Box::new(move |items: &[&Item]| {
                let _g = worker_gate.lock().unwrap();
                std::thread::sleep(Duration::from_millis(2));
                Ok(items.iter().map(|i| i.0).collect())
            }),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let (s, o) = (scheduler.clone(), order.clone());
        let large = rt.spawn(async move {
            s.submit((0..200).map(|_| Item(10)).collect())
                .await
                .unwrap();
            o.lock().unwrap().push("large");
        });
        while scheduler.queued_items() < 200 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let (s, o) = (scheduler.clone(), order.clone());
        let small = rt.spawn(async move {
            // Same length as the large request's items: only fairness decides who goes first.
            s.submit(vec![Item(10)]).await.unwrap();
            o.lock().unwrap().push("small");
        });
        while scheduler.queued_items() < 201 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        rt.block_on(async {
            large.await.unwrap();
            small.await.unwrap();
        });
        assert_eq!(*order.lock().unwrap(), vec!["small", "large"]);
    }

    #[test]
    fn live_work_goes_before_background_work() {
        let order = Arc::new(Mutex::new(Vec::<usize>::new()));
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let (seen, worker_gate) = (order.clone(), gate.clone());
        let batches_started = Arc::new(AtomicUsize::new(0));
        let started = batches_started.clone();
        let scheduler = Arc::new(BatchScheduler::new(
            "t",
            SchedulerConfig {
                max_batch_tokens: 1000,
                max_batch_size: 2,
                max_queued_items: 1000,
                max_background_batch_size: 8,
                max_queue_wait: None,
            },
            Box::new(move |items: &[&Item]| {
                started.fetch_add(1, Ordering::SeqCst);
                let _g = worker_gate.lock().unwrap();
                seen.lock().unwrap().extend(items.iter().map(|i| i.0));
                Ok(items.iter().map(|i| i.0).collect())
            }),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let s = scheduler.clone();
        let bulk = rt.spawn(async move {
            s.submit_with((0..10).map(|_| Item(1)).collect(), Priority::Background)
                .await
        });
        // The worker holds a background batch (waiting at the gate) before the live request comes.
        while batches_started.load(Ordering::SeqCst) == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let s = scheduler.clone();
        let live = rt.spawn(async move { s.submit(vec![Item(7), Item(7)]).await });
        while scheduler.queued_items() < 12 {
            std::thread::sleep(Duration::from_millis(1));
        }
        drop(held);
        rt.block_on(async {
            live.await.unwrap().unwrap();
            bulk.await.unwrap().unwrap();
        });
        // One background batch was already running; the live pair comes right after it, alone.
        assert_eq!(order.lock().unwrap()[..4], [1, 1, 7, 7]);
    }

    #[test]
    fn over_the_item_budget_is_refused_not_queued() {
        let gate = Arc::new(Mutex::new(()));
        let held = gate.lock().unwrap();
        let worker_gate = gate.clone();
        let scheduler = Arc::new(BatchScheduler::new(
            "t",
            SchedulerConfig {
                max_batch_tokens: 100,
                max_batch_size: 1,
                max_queued_items: 3,
                max_background_batch_size: 8,
                max_queue_wait: None,
            },
            Box::new(move |items: &[&Item]| {
                let _g = worker_gate.lock().unwrap();
                Ok(items.iter().map(|i| i.0).collect())
            }),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let s = scheduler.clone();
        let first = rt.spawn(async move { s.submit(vec![Item(1), Item(1), Item(1)]).await });
        while scheduler.queued_items() < 3 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let err = rt.block_on(scheduler.submit(vec![Item(1)])).unwrap_err();
        assert!(matches!(err, RuntimeError::Overloaded { .. }), "{err}");
        drop(held);
        assert_eq!(rt.block_on(first).unwrap().unwrap(), vec![1, 1, 1]);
    }

    /// A model that runs 10 tokens a millisecond: a request longer than the wait limit behind a
    /// busy queue is refused with a retry time, a small one is admitted and served promptly.
    #[test]
    fn admission_is_by_expected_wait_shared_round_robin() {
        let scheduler = Arc::new(BatchScheduler::new(
            "t",
            SchedulerConfig {
                max_batch_tokens: 40,
                max_batch_size: 4,
                max_queued_items: 100_000,
                max_background_batch_size: 8,
                max_queue_wait: Some(Duration::from_millis(300)),
            },
            Box::new(move |items: &[&Item]| {
                let tokens: usize = items.iter().map(|i| i.0).sum();
                std::thread::sleep(Duration::from_micros(100 * tokens as u64));
                Ok(items.iter().map(|i| i.0).collect())
            }),
        ));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Measure the throughput first; an idle model admits anything.
        rt.block_on(scheduler.submit(vec![Item(10); 8])).unwrap();
        let s = scheduler.clone();
        // About 1 s of work, admitted because nothing else waits.
        let flood = rt.spawn(async move { s.submit(vec![Item(10); 1000]).await });
        while scheduler.queued_items() < 1000 {
            std::thread::sleep(Duration::from_millis(1));
        }
        let err = rt
            .block_on(scheduler.submit(vec![Item(10); 500]))
            .unwrap_err();
        let RuntimeError::Overloaded {
            retry_after_secs, ..
        } = err
        else {
            panic!("{err}")
        };
        assert!((1..=60).contains(&retry_after_secs));
        let started = std::time::Instant::now();
        let small = rt.block_on(scheduler.submit(vec![Item(10)])).unwrap();
        assert_eq!(small, vec![10]);
        assert!(
            started.elapsed() < Duration::from_millis(300),
            "the small request waited {:?}",
            started.elapsed()
        );
        assert_eq!(rt.block_on(flood).unwrap().unwrap().len(), 1000);
        // Once the flood has drained, large requests are admitted again.
        rt.block_on(scheduler.submit(vec![Item(10); 500])).unwrap();
    }
}

//! The real supervisor and store in this process, with the worker operated by the test: the
//! test receives each leased job and answers when it likes. With a paused tokio clock
//! (`#[tokio::test(start_paused = true)]`) the supervisor's timers (rescue deadlines, retry
//! delays, the starvation bound, progress intervals) run on virtual time.
//!
//! One rule for such tests: a paused clock jumps to the next pending timer whenever every task
//! waits, and the supervisor waits for real I/O (its flush, on the store's commit thread). A
//! test that has a timer pending then (a poll interval, a timeout) has it fire early, again and
//! again. So the waits here use no tokio timer: [`Harness::next_job`] is guarded by a
//! real-time watchdog, and [`Harness::settled`] yields instead of sleeping.

use ollama_batch::backend::Backend;
use ollama_batch::config::{BackendKind, Config};
use ollama_batch::domain::{
    BatchId, BatchRecord, BatchStatus, CallResult, Endpoint, FileId, RequestKey, RequestRecord,
    Verdict,
};
use ollama_batch::live::LiveView;
use ollama_batch::store::{Store, StoredBody};
use ollama_batch::supervisor::{self, Parts, Supervisor};
use ollama_batch::worker::{Event, Job, Outcome};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// A configuration for the harness: one lane, no backend behind it.
pub fn config(dir: &std::path::Path) -> Config {
    let mut cfg = Config::for_tests(dir.into(), BackendKind::Openai, "http://127.0.0.1:9");
    cfg.concurrency = 1;
    cfg
}

/// Puts an `in_progress` batch of `lines` chat lines into the store, line i in prefix group
/// `group(i)`; its id.
pub fn put_batch(store: &Store, lines: u32, group: impl Fn(u32) -> u64) -> BatchId {
    let mut batch = BatchRecord::new(Endpoint::ChatCompletions, FileId::new(), 0, None, None);
    batch.status = BatchStatus::InProgress;
    batch.request_counts.total = lines as u64;
    store.put_batch(&batch).expect("batch");
    let keys: Vec<RequestKey> = (1..=lines)
        .map(|line| RequestKey {
            batch: batch.id,
            line,
        })
        .collect();
    let groups: Vec<(RequestKey, u64)> = keys.iter().map(|k| (*k, group(k.line))).collect();
    store.put_groups(&groups).expect("groups");
    let items: Vec<_> = keys
        .iter()
        .map(|k| {
            (
                *k,
                RequestRecord::queued(format!("c-{}", k.line)),
                StoredBody {
                    json: r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#.into(),
                    refs: vec![],
                },
            )
        })
        .collect();
    store.put_requests(&items).expect("requests");
    store.flush().expect("flush");
    batch.id
}

/// The running supervisor and the test's end of its channels.
pub struct Harness {
    pub store: Arc<Store>,
    pub jobs: mpsc::Receiver<Job>,
    pub events: mpsc::Sender<Event>,
    pub live: Arc<LiveView>,
    stop: CancellationToken,
    run: tokio::task::JoinHandle<()>,
    /// Cancelled by a plain thread after two minutes of real time: the hang guard.
    watchdog: CancellationToken,
}

/// Real time a harness test may take before its waits fail.
const REAL_LIMIT: Duration = Duration::from_secs(120);

impl Harness {
    /// Recovers what `store` holds and starts the supervisor on it.
    pub fn start(store: Arc<Store>, cfg: Config) -> Harness {
        let recovery = supervisor::recover(&store, &cfg).expect("recover");
        let (jobs_tx, jobs) = mpsc::channel(64);
        let (events, events_rx) = mpsc::channel(64);
        let stop = CancellationToken::new();
        let (sup, handle) = Supervisor::new(
            Parts {
                store: store.clone(),
                cfg: Arc::new(cfg.clone()),
                backends: vec![Backend::new(&cfg).expect("backend")],
                jobs: jobs_tx,
                events: events_rx,
                tracker: TaskTracker::new(),
                stop: stop.clone(),
                gpu: Arc::new(ollama_batch::gpu::GpuMonitor::new()),
            },
            recovery,
        );
        let watchdog = CancellationToken::new();
        let fire = watchdog.clone();
        std::thread::spawn(move || {
            std::thread::sleep(REAL_LIMIT);
            fire.cancel();
        });
        Harness {
            store,
            jobs,
            events,
            live: handle.live.clone(),
            stop,
            run: tokio::spawn(sup.run()),
            watchdog,
        }
    }

    /// The next leased job, waited for with no tokio timer pending (see the module doc).
    pub async fn next_job(&mut self) -> Job {
        tokio::select! {
            j = self.jobs.recv() => j.expect("a job"),
            _ = self.watchdog.cancelled() => panic!("no job within {REAL_LIMIT:?} of real time"),
        }
    }

    /// Waits until `check` holds, yielding to the supervisor (no tokio timer, so a paused clock
    /// stands still); fails after 30 s of real time. For what needs no time to pass.
    pub async fn settled(&self, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while !check() {
            assert!(std::time::Instant::now() < deadline, "not settled: {what}");
            tokio::task::yield_now().await;
        }
    }

    /// Tells the supervisor the job's call started (its rescue deadline counts from here).
    pub async fn started(&self, job: &Job) {
        self.events
            .send(Event::Started {
                key: job.key,
                lease: job.lease,
            })
            .await
            .expect("send");
    }

    /// Answers the job (200 with `body`).
    pub async fn answer(&self, job: &Job, body: &str) {
        self.finish(
            job,
            CallResult::Answered {
                status: 200,
                body: body.into(),
                usage: None,
            },
            Verdict::Success,
        )
        .await;
    }

    /// Ends the job with `result`, classified as `verdict`.
    pub async fn finish(&self, job: &Job, result: CallResult, verdict: Verdict) {
        self.events
            .send(Event::Finished(Outcome {
                key: job.key,
                lease: job.lease,
                attempts: job.attempts,
                result,
                verdict,
                check: Default::default(),
                reuse_key: None,
            }))
            .await
            .expect("send");
    }

    /// Stops the supervisor (in-flight leases go back to the queue).
    pub async fn stop(self) {
        self.stop.cancel();
        drop(self.jobs);
        self.run.await.expect("supervisor stops");
    }
}

//! The supervisor: the single writer of request state.
//!
//! It keeps the run's schedule in memory (per-batch ready queues in first-come first-served
//! order, a heap of retries by due time, the table of live leases) and the truth in the store.
//! Each turn of its loop:
//!
//! 1. applies the outcomes the worker handed back (each a compare-and-swap on
//!    (`Leased`, lease); a stale lease's answer is dropped),
//! 2. moves due retries to the ready queues and rescues leases whose call started more than
//!    `request_timeout + lease_margin` ago (the worker reports each start),
//! 3. leases ready requests up to the window (`2 × concurrency`): `Queued → Leased`,
//!    attempt counted,
//! 4. group-commits: one flush makes the new leases and all results since the last flush
//!    durable; only then are results counted (`request_counts`, `/status`) and leased
//!    requests handed to the worker,
//! 5. starts the finalizer for batches whose every line is durably done.
//!
//! Start-up recovery ([`recover`]) puts every request that was leased when the process died
//! back in the queue (its attempt stays counted) before anything is dispatched.

pub mod finalize;
mod turns;

use crate::backend::Backend;
use crate::config::Config;
use crate::domain::{
    BatchId, BatchStatus, CallResult, Endpoint, RequestKey, RequestState, ResultRecord, Step,
    Usage, Verdict, unix_millis, unix_now,
};
use crate::intake;
use crate::live::{self, BatchLive, LiveView, progress};
use crate::schedule::Scheduler;
use crate::store::{Expect, Store, StoreError, TransitionError};
use crate::worker::{Event, Job, Outcome};
use finalize::Target;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Messages to the supervisor from the API, the intake, probes and the finalizer.
#[derive(Debug)]
pub enum Command {
    /// The intake finished with this batch (it is `in_progress`, or `cancelling`).
    BatchReady(BatchId),
    /// The API moved this batch to `cancelling`.
    Cancel(BatchId),
    /// A probe reached the backend again.
    BackendUp(usize),
    /// The finalizer finished this batch (or found it already finished).
    Finalized(BatchId),
    /// The finalizer failed (disk full, I/O error); it is tried again after a delay.
    FinalizeFailed(BatchId, String),
}

/// How the API and the intake reach the supervisor.
#[derive(Clone)]
pub struct SupervisorHandle {
    cmds: mpsc::Sender<Command>,
    /// The published snapshot.
    pub live: Arc<LiveView>,
    /// Discrete events for `/events`.
    pub notices: live::Notices,
    /// The backends, for the intake's model check (the API never calls them).
    pub(crate) backends: Vec<Backend>,
}

impl SupervisorHandle {
    /// Sends a command; a closed supervisor (shutting down) is not an error for the caller:
    /// whatever the command was about is recovered from the store at the next start.
    pub async fn send(&self, cmd: Command) {
        if self.cmds.send(cmd).await.is_err() {
            tracing::debug!("supervisor is gone; the store keeps the state for the next start");
        }
    }
}

/// Per-batch line of the recovery report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecoveredBatch {
    /// Which batch.
    pub id: BatchId,
    /// Its status.
    pub status: BatchStatus,
    /// Lines.
    pub total: u64,
    /// Durably succeeded.
    pub done: u64,
    /// Durably failed.
    pub failed: u64,
    /// Still to run.
    pub remaining: u64,
    /// Were leased when the process stopped; back in the queue.
    pub requeued_from_in_flight: u64,
    /// Of those, failed because they used up their attempts.
    pub exhausted: u64,
}

impl std::fmt::Display for RecoveredBatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}: {} lines, {} done, {} failed, {} remaining, {} requeued from in-flight (rescued at start), {} of them failed after too many interrupted attempts",
            self.id,
            self.status.as_str(),
            self.total,
            self.done,
            self.failed,
            self.remaining,
            self.requeued_from_in_flight,
            self.exhausted,
        )
    }
}

/// What recovery found: the report, and the schedule to start from.
pub struct Recovery {
    /// One line per unfinished batch.
    pub report: Vec<RecoveredBatch>,
    /// Batches still `validating`: their intake must run again.
    pub to_validate: Vec<BatchId>,
    batches: Vec<(BatchId, Active)>,
    delayed: Vec<(u64, RequestKey)>,
}

/// Leases a lane holds at most: the call running on the backend's slot and the next one,
/// ready the moment it ends.
pub const LEASES_PER_LANE: usize = 2;

/// A batch the supervisor is running.
#[derive(Debug)]
struct Active {
    status: BatchStatus,
    endpoint: Endpoint,
    model: Option<String>,
    expires_at: Option<i64>,
    total: u64,
    succeeded: u64,
    failed: u64,
    usage: Usage,
    /// At load: every line's prefix group and whether it is done (in line order), and the
    /// lines ready to run; handed to the scheduler when the supervisor takes the batch on.
    load_groups: Vec<(u32, u64, bool)>,
    load_ready: Vec<u32>,
    retry_wait: u64,
    in_flight: u64,
    /// Set while the finalizer runs.
    finalizing: bool,
    /// Failed finalizations so far, the last error, and when to try again.
    finalize_failures: u32,
    finalize_error: Option<String>,
    finalize_after: Option<Instant>,
    /// The completion window passed: no more dispatch, finalize as expired.
    expiring: bool,
    /// Live figures: rates, ETA, tokens, retries by cause.
    progress: progress::Progress,
    /// The low-cache warning was logged for this batch.
    cache_warned: bool,
    /// Conversation mode's settings, when the batch runs in it (fixed and stored when first
    /// taken on).
    plan: Option<crate::conversation::Plan>,
}

impl Active {
    /// Whether its lines are still being sent (in progress and not expiring). Retries and
    /// requeues of a batch that is not go nowhere: finalization turns them into error lines.
    fn dispatching(&self) -> bool {
        self.status == BatchStatus::InProgress && !self.expiring
    }

    /// Its live figures now.
    fn figures(&self, now: Instant, num_ctx: Option<u32>) -> progress::Figures {
        self.progress.figures(
            now,
            self.total,
            self.succeeded + self.failed,
            self.failed,
            num_ctx,
        )
    }

    fn from_record(rec: &crate::domain::BatchRecord) -> Active {
        Active {
            status: rec.status,
            endpoint: rec.endpoint,
            model: rec.model.clone(),
            expires_at: rec.expires_at,
            total: rec.request_counts.total,
            succeeded: 0,
            failed: 0,
            usage: Usage::default(),
            load_groups: Vec::new(),
            load_ready: Vec::new(),
            retry_wait: 0,
            in_flight: 0,
            finalizing: false,
            finalize_failures: 0,
            finalize_error: None,
            finalize_after: None,
            expiring: false,
            progress: progress::Progress::new(0),
            cache_warned: false,
            plan: None,
        }
    }
}

/// Scans one batch's requests into an `Active`, putting leased requests back in the queue.
fn load_batch(
    store: &Store,
    cfg: &Config,
    rec: &crate::domain::BatchRecord,
    delayed: &mut Vec<(u64, RequestKey)>,
) -> Result<(Active, RecoveredBatch), StoreError> {
    let mut a = Active::from_record(rec);
    let mut report = RecoveredBatch {
        id: rec.id,
        status: rec.status,
        total: 0,
        done: 0,
        failed: 0,
        remaining: 0,
        requeued_from_in_flight: 0,
        exhausted: 0,
    };
    let now_ms = unix_millis();
    let mut lines = 0u64;
    let mut started = false;
    let mut fixes = Vec::new();
    let groups = store.batch_groups(rec.id)?;
    for item in store.batch_requests(rec.id) {
        let (key, mut r) = item?;
        lines += 1;
        started |= r.attempts > 0 || r.state.is_done();
        a.load_groups.push((
            key.line,
            groups.get(&key.line).copied().unwrap_or(0),
            r.state.is_done(),
        ));
        if r.state == RequestState::Leased {
            report.requeued_from_in_flight += 1;
            if r.attempts >= cfg.retry.max_attempts {
                report.exhausted += 1;
                r.state = RequestState::Failed;
                r.result = Some(ResultRecord {
                    status_code: None,
                    body: None,
                    error_code: Some("request_interrupted".into()),
                    error_message: Some(format!(
                        "the server stopped while this request was in flight, {} times (last error: {})",
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("none")
                    )),
                    usage: None,
                });
            } else {
                r.state = RequestState::Queued;
            }
            fixes.push((key, r.clone()));
        }
        match r.state {
            RequestState::Succeeded => {
                a.succeeded += 1;
                if let Some(u) = r.result.as_ref().and_then(|x| x.usage.as_ref()) {
                    a.usage.add(u);
                }
            }
            RequestState::Failed => {
                a.failed += 1;
                if let Some(u) = r.result.as_ref().and_then(|x| x.usage.as_ref()) {
                    a.usage.add(u);
                }
            }
            RequestState::Queued if r.not_before_ms > now_ms => {
                a.retry_wait += 1;
                delayed.push((r.not_before_ms, key));
            }
            RequestState::Queued | RequestState::Leased => a.load_ready.push(key.line),
        }
    }
    for (key, r) in fixes {
        store.put_request(key, &r)?;
    }
    a.plan = match store.get_plan(rec.id)? {
        Some(plan) => plan,
        None => {
            let plan = conversation_plan(cfg, rec, started);
            store.put_plan(rec.id, plan)?;
            plan
        }
    };
    a.total = a.total.max(lines);
    a.progress = progress::Progress::new(a.succeeded + a.failed);
    report.total = a.total;
    report.done = a.succeeded;
    report.failed = a.failed;
    report.remaining = a.total - a.succeeded - a.failed;
    Ok((a, report))
}

/// The mode a batch taken on for the first time runs in: its metadata's `mode`, else `--mode`;
/// conversations only for chat completions, and never for a batch whose lines already ran
/// (a store from before conversation mode).
fn conversation_plan(
    cfg: &Config,
    rec: &crate::domain::BatchRecord,
    started: bool,
) -> Option<crate::conversation::Plan> {
    use crate::config::Mode;
    let mode = rec
        .metadata
        .as_ref()
        .and_then(|m| m.get("mode"))
        .and_then(|m| Mode::parse(m))
        .unwrap_or(cfg.mode);
    if mode != Mode::Conversation || rec.endpoint != Endpoint::ChatCompletions || started {
        return None;
    }
    let num_ctx = cfg.num_ctx.unwrap_or_else(|| {
        tracing::warn!(batch = %rec.id, "conversation mode without --num-ctx (the server was restarted without it): histories are kept within 2048 tokens");
        2048
    });
    Some(crate::conversation::Plan {
        lanes: cfg.lanes() as u32,
        keep_messages: cfg.conversation_keep,
        num_ctx,
    })
}

/// Start-up recovery: reads every unfinished batch, returns leased requests to the queue and
/// builds the schedule. Runs before the API or the worker start.
pub fn recover(store: &Store, cfg: &Config) -> Result<Recovery, StoreError> {
    let mut rec = Recovery {
        report: Vec::new(),
        to_validate: Vec::new(),
        batches: Vec::new(),
        delayed: Vec::new(),
    };
    for b in store.unfinished_batches()? {
        match b.status {
            BatchStatus::Validating => rec.to_validate.push(b.id),
            _ => {
                let (a, report) = load_batch(store, cfg, &b, &mut rec.delayed)?;
                rec.report.push(report);
                rec.batches.push((b.id, a));
            }
        }
    }
    store.flush()?;
    Ok(rec)
}

struct Lease {
    lease: u32,
    /// The lane (backend slot) it runs on.
    lane: usize,
    /// Set when the worker reports the call started: start + request timeout + margin.
    /// A job still waiting for a worker slot is not rescued.
    deadline: Option<Instant>,
    /// A conversation's line: the history it was sent with.
    turn: Option<turns::Leased>,
}

/// Everything the supervisor task owns.
pub struct Supervisor {
    store: Arc<Store>,
    cfg: Arc<Config>,
    live: Arc<LiveView>,
    jobs: mpsc::Sender<Job>,
    events: mpsc::Receiver<Event>,
    cmds: mpsc::Receiver<Command>,
    /// For probes and the finalizer to report back.
    cmds_tx: mpsc::Sender<Command>,
    tracker: TaskTracker,
    stop: CancellationToken,
    /// Ordered by id = creation time: iteration order is first-come first-served.
    batches: BTreeMap<BatchId, Active>,
    /// Which ready line goes to which lane (the policy; this module keeps the state).
    sched: Scheduler,
    /// The conversations of batches in conversation mode.
    turns: turns::Turns,
    /// Leases held per lane: one running, one waiting at most.
    lane_load: Vec<usize>,
    /// The last leasing turn left a lane with room idle (the scheduler declined it).
    lanes_declined: bool,
    delayed: BinaryHeap<Reverse<(u64, RequestKey)>>,
    leased: HashMap<RequestKey, Lease>,
    /// Results written since the last flush: (batch, succeeded, usage).
    pending: Vec<(BatchId, bool, Option<Usage>)>,
    first_pending: Option<Instant>,
    /// Per backend: down (its lanes get no leases) since a call found it unreachable, until a
    /// probe reaches it.
    down: Vec<bool>,
    /// Every backend, in lane order; `lane_backend[lane]` is its index.
    backends: Vec<Backend>,
    lane_backend: Vec<usize>,
    /// A call was answered since the last publish: the backend is reachable, whatever an
    /// earlier probe said (its error is cleared).
    answered_since_publish: Vec<bool>,
    /// Set once the store cannot write: dispatch stops for good (until a restart).
    store_failure: Option<String>,
    last_rescue_scan: Instant,
    counters: live::Counters,
    gpu: Arc<crate::gpu::GpuMonitor>,
    notices: live::Notices,
    /// The last failed tries (for the dashboard), and whether they changed since the last
    /// publish.
    recent_errors: std::collections::VecDeque<live::RecentError>,
    recent_errors_changed: bool,
}

/// Channels and parts the supervisor is built from.
pub struct Parts {
    /// The store.
    pub store: Arc<Store>,
    /// The configuration.
    pub cfg: Arc<Config>,
    /// Every backend, in `--backend-url` order (the lanes' backends; model checks).
    pub backends: Vec<Backend>,
    /// To the worker.
    pub jobs: mpsc::Sender<Job>,
    /// From the worker.
    pub events: mpsc::Receiver<Event>,
    /// Tracks the tasks the supervisor starts.
    pub tracker: TaskTracker,
    /// Fires on shutdown.
    pub stop: CancellationToken,
    /// GPU memory readings, for the progress lines.
    pub gpu: Arc<crate::gpu::GpuMonitor>,
}

impl Supervisor {
    /// Builds the supervisor from the recovered schedule; returns it and the handle for others.
    pub fn new(parts: Parts, recovery: Recovery) -> (Supervisor, SupervisorHandle) {
        let (cmds_tx, cmds) = mpsc::channel(1024);
        let live = Arc::new(LiveView::default());
        let requeued: u64 = recovery
            .report
            .iter()
            .map(|r| r.requeued_from_in_flight)
            .sum();
        let lanes = parts.cfg.lanes();
        let sched = Scheduler::new(parts.cfg.scheduling, lanes, parts.cfg.group_wait_max);
        let backends = parts.backends;
        let lane_backend: Vec<usize> = parts.cfg.lane_map().into_iter().map(|l| l.0).collect();
        let mut s = Supervisor {
            store: parts.store,
            cfg: parts.cfg,
            live: live.clone(),
            jobs: parts.jobs,
            events: parts.events,
            cmds,
            cmds_tx: cmds_tx.clone(),
            tracker: parts.tracker,
            stop: parts.stop,
            batches: BTreeMap::new(),
            sched,
            turns: turns::Turns::default(),
            lane_load: vec![0; lanes],
            lanes_declined: false,
            delayed: recovery.delayed.into_iter().map(Reverse).collect(),
            leased: HashMap::new(),
            pending: Vec::new(),
            first_pending: None,
            down: vec![false; backends.len()],
            backends,
            lane_backend,
            store_failure: None,
            answered_since_publish: Vec::new(),
            last_rescue_scan: Instant::now(),
            counters: live::Counters {
                requeued_at_start: requeued,
                ..Default::default()
            },
            gpu: parts.gpu,
            notices: live::Notices::default(),
            recent_errors: std::collections::VecDeque::new(),
            recent_errors_changed: false,
        };
        for (id, a) in recovery.batches {
            s.take_on(id, a);
        }
        s.publish();
        let backends = s.backends.clone();
        let notices = s.notices.clone();
        (
            s,
            SupervisorHandle {
                cmds: cmds_tx,
                live,
                backends,
                notices,
            },
        )
    }

    /// The loop. Returns after shutdown, with every acknowledged result durable and every
    /// still-leased request back in the queue.
    pub async fn run(mut self) {
        loop {
            let wake = self.next_wake();
            tokio::select! {
                biased;
                _ = self.stop.cancelled() => break,
                Some(e) = self.events.recv() => self.on_event(e),
                Some(c) = self.cmds.recv() => self.on_command(c),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
            for _ in 0..4096 {
                match self.events.try_recv() {
                    Ok(e) => self.on_event(e),
                    Err(_) => break,
                }
            }
            while let Ok(c) = self.cmds.try_recv() {
                self.on_command(c);
            }
            self.promote_due();
            self.rescue_stale_leases();
            self.check_expiry();
            let jobs = if self.all_down() || self.store_failed() {
                Vec::new()
            } else {
                self.lease()
            };
            let due = self
                .first_pending
                .is_some_and(|t| t.elapsed() >= self.cfg.flush_interval)
                || self.pending.len() >= self.cfg.flush_every;
            if !jobs.is_empty() || due {
                self.commit().await;
            }
            for job in jobs {
                if self.jobs.send(job).await.is_err() {
                    break; // worker gone: shutting down
                }
            }
            self.start_finalizers();
            self.publish();
        }
        self.shutdown().await;
    }

    fn next_wake(&self) -> Instant {
        let now = Instant::now();
        let leasable = !self.all_down()
            && self.store_failure.is_none()
            && !self.lanes_declined
            && self.lane_load.iter().any(|&n| n < LEASES_PER_LANE)
            && self
                .sched
                .any_ready(|id| self.batches.get(&id).is_some_and(Active::dispatching));
        // Work waiting (at start-up, after an outage): no sleep. Finalizers need no wake-up:
        // every event that can make a batch final is handled in the turn it arrives.
        if leasable {
            return now;
        }
        let mut wake = now + Duration::from_secs(1);
        if let Some(t) = self.first_pending {
            wake = wake.min(t + self.cfg.flush_interval);
        }
        if let Some(Reverse((due, _))) = self.delayed.peek() {
            let ms = due.saturating_sub(unix_millis());
            wake = wake.min(now + Duration::from_millis(ms));
        }
        for t in self.batches.values().filter_map(|a| a.finalize_after) {
            wake = wake.min(t);
        }
        wake.max(now)
    }

    fn on_command(&mut self, c: Command) {
        match c {
            Command::BatchReady(id) => self.adopt(id),
            Command::Cancel(id) => {
                if let Some(a) = self.batches.get_mut(&id) {
                    a.status = BatchStatus::Cancelling;
                    self.sched.clear(id);
                    a.retry_wait = 0;
                    tracing::info!(batch = %id, in_flight = a.in_flight, "cancelling");
                }
            }
            Command::BackendUp(i) => {
                if self.down.get(i) == Some(&true) {
                    tracing::info!(
                        url = self.backends[i].url(),
                        "backend reachable again: its lanes resume"
                    );
                    self.notices.send(live::Notice::BackendUp);
                }
                if let Some(d) = self.down.get_mut(i) {
                    *d = false;
                }
                self.live.with(|l| {
                    let b = l.backend_mut(i);
                    b.reachable = Some(true);
                    b.down_since = None;
                    b.next_probe_at = None;
                    b.last_probe_at = Some(unix_now());
                    b.last_error = None;
                    l.merge_backends();
                });
            }
            Command::Finalized(id) => {
                self.sched.forget(id);
                self.turns.forget(id);
                if let Some(a) = self.batches.remove(&id) {
                    let status = self.keep_final_figures(id, &a);
                    self.notices.send(live::Notice::BatchFinished {
                        id: id.to_string(),
                        status: status.unwrap_or("unknown").into(),
                    });
                }
                self.live.with(|l| l.batches.remove(&id));
            }
            Command::FinalizeFailed(id, error) => {
                if let Some(a) = self.batches.get_mut(&id) {
                    a.finalizing = false;
                    a.finalize_failures += 1;
                    let delay = finalize_retry_delay(a.finalize_failures);
                    a.finalize_after = Some(Instant::now() + delay);
                    tracing::error!(batch = %id, %error, failures = a.finalize_failures, retry_in = ?delay, "finalization failed; it is tried again");
                    a.finalize_error = Some(error);
                }
            }
        }
    }

    /// Keeps a finished batch's figures for `GET /status/batches/{id}`: the live figures at the
    /// end, plus its status, duration and the GPU memory peak.
    fn keep_final_figures(&self, id: BatchId, a: &Active) -> Option<&'static str> {
        let f = a.figures(Instant::now(), self.cfg.num_ctx);
        let record = self.store.get_batch(id).ok().flatten();
        let v = serde_json::json!({
            "id": id.to_string(),
            "status": record.as_ref().map(|r| r.status.as_str()),
            "final": true,
            "created_at": record.as_ref().map(|r| r.created_at),
            "in_progress_at": record.as_ref().and_then(|r| r.in_progress_at),
            "finished_at": crate::domain::unix_now(),
            "duration_seconds": record
                .as_ref()
                .and_then(|r| r.in_progress_at)
                .map(|t| crate::domain::unix_now().saturating_sub(t)),
            "gpu_memory_peak_bytes": self.gpu.peak_used_bytes(),
            "progress": f,
        });
        if let Err(e) = self.store.put_batch_stats(id, &v.to_string()) {
            tracing::warn!(batch = %id, error = %e, "cannot keep the batch's final figures");
        }
        record.map(|r| r.status.as_str())
    }

    /// Takes on a batch the intake finished.
    fn adopt(&mut self, id: BatchId) {
        if self.batches.contains_key(&id) {
            return;
        }
        let rec = match self.store.get_batch(id) {
            Ok(Some(r)) if !r.status.is_terminal() && r.status != BatchStatus::Validating => r,
            Ok(_) => return,
            Err(e) => {
                tracing::error!(batch = %id, error = %e, "cannot read batch; it resumes at the next start");
                return;
            }
        };
        let mut delayed = Vec::new();
        match load_batch(&self.store, &self.cfg, &rec, &mut delayed) {
            Ok((a, _)) => {
                tracing::info!(batch = %id, lines = a.total, status = a.status.as_str(), "batch queued");
                self.delayed.extend(delayed.into_iter().map(Reverse));
                self.take_on(id, a);
            }
            Err(e) => {
                tracing::error!(batch = %id, error = %e, "cannot load batch; it resumes at the next start")
            }
        }
    }

    /// Forgets a lease (answered, rescued): its lane has room again.
    fn end_lease(&mut self, key: RequestKey) -> Option<Lease> {
        let l = self.leased.remove(&key)?;
        self.lane_load[l.lane] = self.lane_load[l.lane].saturating_sub(1);
        Some(l)
    }

    /// Adds a loaded batch: its lines' groups and ready lines go to the scheduler.
    fn take_on(&mut self, id: BatchId, mut a: Active) {
        let now = Instant::now();
        if let Some(plan) = &a.plan {
            self.sched.conversational(id, plan.lanes);
        }
        // A conversation batch registers its done lines too: line i of a group is in
        // conversation i mod lanes, whatever has run.
        for (line, group, done) in std::mem::take(&mut a.load_groups) {
            if done && a.plan.is_none() {
                continue;
            }
            self.sched.register(id, line, group);
            if done {
                self.sched.finished(id, line);
            }
        }
        for line in std::mem::take(&mut a.load_ready) {
            self.sched.push_back(id, line, now);
        }
        self.batches.insert(id, a);
    }

    fn on_event(&mut self, e: Event) {
        match e {
            Event::Started { key, lease } => {
                if let Some(l) = self.leased.get_mut(&key).filter(|l| l.lease == lease) {
                    l.deadline =
                        Some(Instant::now() + self.cfg.request_timeout + self.cfg.lease_margin);
                }
            }
            Event::Finished(o) => self.on_outcome(o),
        }
    }

    fn on_outcome(&mut self, o: Outcome) {
        let current = self.leased.get(&o.key).map(|l| l.lease);
        if current != Some(o.lease) {
            self.counters.stale_outcomes += 1;
            tracing::debug!(request = %o.key, lease = o.lease, "answer of a stale lease dropped");
            return;
        }
        let Some(Lease { lane, turn, .. }) = self.end_lease(o.key) else {
            return;
        };
        let backend_index = self.lane_backend.get(lane).copied().unwrap_or(0);
        let Some(active) = self.batches.get_mut(&o.key.batch) else {
            return;
        };
        active.in_flight = active.in_flight.saturating_sub(1);
        if matches!(o.result, CallResult::Answered { .. }) {
            if self.answered_since_publish.len() <= backend_index {
                self.answered_since_publish.resize(backend_index + 1, false);
            }
            self.answered_since_publish[backend_index] = true;
        }
        if !matches!(o.verdict, Verdict::Success | Verdict::BackendDown) {
            let is_final = matches!(o.verdict, Verdict::Permanent)
                || o.attempts >= self.cfg.retry.max_attempts;
            if self.recent_errors.len() == live::RECENT_ERRORS {
                self.recent_errors.pop_front();
            }
            self.recent_errors.push_back(live::RecentError {
                at: unix_now(),
                batch: o.key.batch.to_string(),
                line: o.key.line,
                attempt: o.attempts,
                is_final,
                error: describe(&o.result).chars().take(300).collect(),
            });
            self.recent_errors_changed = true;
        }
        match o.verdict {
            Verdict::OutOfMemory => {
                self.counters.oom += 1;
                self.notices.send(live::Notice::OutOfMemory {
                    batch: o.key.batch.to_string(),
                });
            }
            _ if o.result == CallResult::Timeout => self.counters.timeouts += 1,
            _ => {}
        }
        let step = self
            .cfg
            .retry
            .next_step(o.verdict, o.attempts, fastrand::f64());
        let expect = Expect::Leased(o.lease);
        let key = o.key;
        let applied = match step {
            Step::Succeed | Step::Fail => {
                let succeeded = step == Step::Succeed;
                let result = result_record(&o, &self.cfg);
                let usage = result.usage;
                let change = |r: &mut crate::domain::RequestRecord| {
                    r.state = if succeeded {
                        RequestState::Succeeded
                    } else {
                        RequestState::Failed
                    };
                    r.result = Some(result.clone());
                };
                // A conversation's success is stored with the history that now holds it; a
                // failure leaves the history as it was.
                let in_conversation = turn.filter(|_| succeeded).and_then(|t| {
                    let record = self.turns.after(key.batch, key.line, &t, usage.as_ref())?;
                    Some((t, record))
                });
                let r = match in_conversation {
                    Some((t, record)) => {
                        let r = self.store.transition_request_in_conversation(
                            key, expect, change, t.conv, &record,
                        );
                        if r.is_ok() {
                            let answer = result.body.as_deref().unwrap_or_default();
                            self.turns.stored(key.batch, key.line, t, answer, record);
                        }
                        r
                    }
                    None => self.store.transition_request(key, expect, change),
                };
                if r.is_ok() {
                    self.sched.finished(key.batch, key.line);
                    if self.pending.is_empty() {
                        self.first_pending = Some(Instant::now());
                    }
                    self.pending.push((key.batch, succeeded, usage));
                }
                r
            }
            Step::RetryAfter(delay) => {
                let due = unix_millis() + delay.as_millis() as u64;
                let err = describe(&o.result);
                let r = self.store.transition_request(key, expect, |r| {
                    r.state = RequestState::Queued;
                    r.not_before_ms = due;
                    r.last_error = Some(err.clone());
                });
                if r.is_ok() {
                    self.sched.waiting(key.batch, key.line);
                    self.counters.retries += 1;
                    let cause = progress::retry_cause(&o.result, o.verdict);
                    active.progress.retry(cause);
                    *self.counters.retries_by_cause.entry(cause).or_default() += 1;
                    tracing::debug!(request = %key, attempt = o.attempts, ?delay, error = %err, "retry scheduled");
                    if active.dispatching() {
                        active.retry_wait += 1;
                        self.delayed.push(Reverse((due, key)));
                    }
                }
                r
            }
            Step::RequeueFree => {
                let err = describe(&o.result);
                let r = self.store.transition_request(key, expect, |r| {
                    r.state = RequestState::Queued;
                    r.attempts = r.attempts.saturating_sub(1);
                    r.not_before_ms = 0;
                    r.last_error = Some(err.clone());
                });
                if r.is_ok() && active.dispatching() {
                    self.sched.push_front(key.batch, key.line, Instant::now());
                }
                self.backend_gone(backend_index, err);
                r
            }
        };
        match applied {
            Ok(_) => {}
            Err(TransitionError::Conflict(state)) => {
                self.counters.stale_outcomes += 1;
                tracing::warn!(request = %key, %state, "outcome fenced off by the store");
            }
            Err(e) => {
                tracing::error!(request = %key, error = %e, "cannot store an outcome; the request reruns after restart")
            }
        }
    }

    /// Whether the store has failed (disk full): then no more leases, and it is said once.
    fn store_failed(&mut self) -> bool {
        if self.store_failure.is_none()
            && let Some(e) = self.store.failure()
        {
            tracing::error!(error = %e, in_flight = self.leased.len(), "store failed: dispatch stopped; free space and restart ollama-batch (every acknowledged result is durable and the run resumes where it stopped)");
            self.store_failure = Some(e);
        }
        self.store_failure.is_some()
    }

    /// Pauses dispatch and starts probing (once per outage).
    /// Whether every backend is down (then nothing is leased).
    fn all_down(&self) -> bool {
        self.down.iter().all(|d| *d)
    }

    /// Backend `i` did not answer: its lanes pause, and a probe with backoff tells when it is
    /// back. The other backends go on.
    fn backend_gone(&mut self, i: usize, err: String) {
        if self.down.get(i) != Some(&false) {
            return;
        }
        self.down[i] = true;
        self.counters.backend_outages += 1;
        let backend = self.backends[i].clone();
        tracing::warn!(error = %err, url = backend.url(), "backend unreachable: its lanes paused, probing");
        self.notices
            .send(live::Notice::BackendDown { error: err.clone() });
        self.live.with(|l| {
            let b = l.backend_mut(i);
            b.reachable = Some(false);
            b.down_since = Some(unix_now());
            b.last_error = Some(err);
            l.merge_backends();
        });
        let live = self.live.clone();
        let tx = self.cmds_tx.clone();
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            use backon::{ExponentialBuilder, Retryable};
            let policy = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(15))
                .with_jitter()
                .without_max_times();
            let probe = (|| async { backend.probe().await }).retry(policy).notify(
                |e: &String, next: Duration| {
                    live.with(|l| {
                        let b = l.backend_mut(i);
                        b.last_probe_at = Some(unix_now());
                        b.next_probe_at = Some(unix_now() + next.as_secs() as i64);
                        b.last_error = Some(e.clone());
                        l.merge_backends();
                    });
                },
            );
            tokio::select! {
                _ = stop.cancelled() => {}
                r = probe => if r.is_ok() { let _ = tx.send(Command::BackendUp(i)).await; },
            }
        });
    }

    fn promote_due(&mut self) {
        let now = unix_millis();
        while let Some(Reverse((due, key))) = self.delayed.peek().copied() {
            if due > now {
                break;
            }
            self.delayed.pop();
            if let Some(a) = self.batches.get_mut(&key.batch)
                && a.dispatching()
            {
                a.retry_wait = a.retry_wait.saturating_sub(1);
                self.sched.push_back(key.batch, key.line, Instant::now());
            }
        }
    }

    fn rescue_stale_leases(&mut self) {
        if self.last_rescue_scan.elapsed() < Duration::from_millis(500) {
            return;
        }
        self.last_rescue_scan = Instant::now();
        let now = Instant::now();
        let stale: Vec<(RequestKey, u32)> = self
            .leased
            .iter()
            .filter(|(_, l)| l.deadline.is_some_and(|d| d <= now))
            .map(|(k, l)| (*k, l.lease))
            .collect();
        for (key, lease) in stale {
            self.end_lease(key);
            let r = self
                .store
                .transition_request(key, Expect::Leased(lease), |r| {
                    r.state = RequestState::Queued;
                    r.last_error =
                        Some("lease rescued: no answer within request timeout + margin".into());
                });
            self.counters.rescued += 1;
            tracing::warn!(request = %key, lease, "lease outlived its deadline: rescued");
            if let Some(a) = self.batches.get_mut(&key.batch) {
                a.in_flight = a.in_flight.saturating_sub(1);
                if r.is_ok() && a.dispatching() {
                    self.sched.push_back(key.batch, key.line, now);
                }
            }
        }
    }

    fn check_expiry(&mut self) {
        if !self.cfg.expire {
            return;
        }
        // `expires_at` is in whole seconds and `created_at + window` rounds the
        // creation time down, so expire only once that second has fully
        // passed: a batch never gets less than its whole window.
        let now = unix_now();
        for (id, a) in self.batches.iter_mut() {
            if a.dispatching() && a.expires_at.is_some_and(|t| t < now) {
                tracing::warn!(batch = %id, "completion window passed: expiring");
                a.expiring = true;
                self.sched.clear(*id);
                a.retry_wait = 0;
            }
        }
    }

    /// Fills every lane up to [`LEASES_PER_LANE`] leases (the call running and the next one),
    /// each with the line the scheduler picks for it; the least loaded lanes first.
    fn lease(&mut self) -> Vec<Job> {
        let mut jobs = Vec::new();
        let now = Instant::now();
        // A lane the scheduler leaves idle this turn is not asked again in it.
        let mut declined: Vec<bool> = (0..self.lane_load.len())
            .map(|l| {
                self.down
                    .get(self.lane_backend.get(l).copied().unwrap_or(0))
                    .copied()
                    .unwrap_or(false)
            })
            .collect();
        while let Some(lane) = (0..self.lane_load.len())
            .filter(|&l| !declined[l] && self.lane_load[l] < LEASES_PER_LANE)
            .min_by_key(|&l| self.lane_load[l])
        {
            let batches = &self.batches;
            let idle = self.lane_load[lane] == 0;
            let Some((id, line)) = self.sched.next(lane, now, idle, |id| {
                batches.get(&id).is_some_and(Active::dispatching)
            }) else {
                declined[lane] = true;
                continue;
            };
            let Some(a) = self.batches.get_mut(&id) else {
                continue;
            };
            let key = RequestKey { batch: id, line };
            let rec = match self.store.transition_request(key, Expect::Queued, |r| {
                r.state = RequestState::Leased;
                r.lease = r.lease.wrapping_add(1);
                r.attempts += 1;
                r.not_before_ms = 0;
            }) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(request = %key, error = %e, "cannot lease; skipped");
                    self.sched.finished(id, line);
                    continue;
                }
            };
            let body = self
                .store
                .get_body(key)
                .map_err(|e| e.to_string())
                .and_then(|b| b.ok_or_else(|| "the body is missing".to_string()))
                .and_then(|b| intake::materialize(&self.store, &b, a.model.as_deref()));
            let body = match (body, a.plan, self.sched.conversation_of(id, line)) {
                (Ok(body), Some(plan), Some(conv)) => self
                    .turns
                    .prepare(&self.store, key, conv, &plan, body)
                    .map(|(b, t)| (b, Some(t))),
                (body, _, _) => body.map(|b| (b, None)),
            };
            match body {
                Ok((body, turn)) => {
                    self.leased.insert(
                        key,
                        Lease {
                            lease: rec.lease,
                            lane,
                            deadline: None,
                            turn,
                        },
                    );
                    self.lane_load[lane] += 1;
                    a.in_flight += 1;
                    jobs.push(Job {
                        key,
                        lease: rec.lease,
                        attempts: rec.attempts,
                        endpoint: a.endpoint,
                        body,
                        lane,
                    });
                }
                Err(e) => {
                    tracing::error!(request = %key, error = %e, "stored body unusable: line failed");
                    let failed =
                        self.store
                            .transition_request(key, Expect::Leased(rec.lease), |r| {
                                r.state = RequestState::Failed;
                                r.result = Some(ResultRecord {
                                    status_code: None,
                                    body: None,
                                    error_code: Some("internal_error".into()),
                                    error_message: Some(format!(
                                        "the stored request is unusable: {e}"
                                    )),
                                    usage: None,
                                });
                            });
                    if failed.is_ok() {
                        self.sched.finished(id, line);
                        self.pending.push((key.batch, false, None));
                        self.first_pending.get_or_insert_with(Instant::now);
                    }
                }
            }
        }
        // Lanes with room that the scheduler left idle while lines are ready: wake on the next
        // event or tick, not at once (nothing changes until then).
        self.lanes_declined = declined.iter().any(|d| *d);
        jobs
    }

    /// One flush for everything written since the last; then the results count.
    async fn commit(&mut self) {
        if let Err(e) = self.store.flush_async().await {
            // Nothing is acknowledged; the next commit tries again.
            tracing::error!(error = %e, "flush failed");
            return;
        }
        self.counters.flushes += 1;
        self.counters.results += self.pending.len() as u64;
        for (batch, ok, usage) in self.pending.drain(..) {
            if let Some(a) = self.batches.get_mut(&batch) {
                if ok {
                    a.succeeded += 1;
                } else {
                    a.failed += 1;
                }
                a.progress.result(usage.as_ref());
                if ok {
                    self.counters.succeeded += 1;
                } else {
                    self.counters.failed += 1;
                }
                if let Some(u) = &usage {
                    self.counters.tokens.add(u);
                }
                if let Some(u) = usage {
                    a.usage.add(&u);
                }
            }
        }
        self.first_pending = None;
        self.log_progress();
    }

    fn start_finalizers(&mut self) {
        for (id, a) in self.batches.iter_mut() {
            if a.finalizing
                || a.in_flight > 0
                || a.finalize_after.is_some_and(|t| t > Instant::now())
            {
                continue;
            }
            let target = match a.status {
                BatchStatus::Cancelling => Target::Cancelled,
                BatchStatus::Finalizing => Target::Completed,
                BatchStatus::InProgress if a.expiring => Target::Expired,
                BatchStatus::InProgress if a.succeeded + a.failed >= a.total => {
                    let counts = crate::domain::RequestCounts {
                        total: a.total,
                        completed: a.succeeded,
                        failed: a.failed,
                    };
                    let moved = self
                        .store
                        .update_batch(*id, &[BatchStatus::InProgress], |b| {
                            b.status = BatchStatus::Finalizing;
                            b.finalizing_at = Some(unix_now());
                            b.request_counts = counts;
                        });
                    match moved {
                        Ok(_) => a.status = BatchStatus::Finalizing,
                        Err(TransitionError::Conflict(s)) if s == "cancelling" => {
                            a.status = BatchStatus::Cancelling;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(batch = %id, error = %e, "cannot start finalizing");
                            continue;
                        }
                    }
                    Target::Completed
                }
                _ => continue,
            };
            a.finalizing = true;
            let store = self.store.clone();
            let tx = self.cmds_tx.clone();
            let id = *id;
            self.tracker.spawn(async move {
                let s = store.clone();
                let r =
                    tokio::task::spawn_blocking(move || finalize::finalize(&s, id, target)).await;
                let cmd = match r {
                    Ok(Ok(_)) => Command::Finalized(id),
                    Ok(Err(e)) => Command::FinalizeFailed(id, e.to_string()),
                    Err(e) => Command::FinalizeFailed(id, format!("finalizer panicked: {e}")),
                };
                // A supervisor already gone (shutdown) leaves it to the next start's recovery.
                let _ = tx.send(cmd).await;
            });
        }
    }

    /// One INFO line per running batch every `--progress-every` results, and at most every
    /// `--progress-interval` when fewer finish: done/total, percent, rate, ETA, failed,
    /// retries, cached share, GPU memory.
    fn log_progress(&mut self) {
        let now = Instant::now();
        // Read only when a line is due: this runs after every group commit.
        let mut gpu: Option<String> = None;
        for (id, a) in self.batches.iter_mut() {
            let done = a.succeeded + a.failed;
            if !a.progress.log_due(
                now,
                done,
                self.cfg.progress_every,
                self.cfg.progress_interval,
            ) {
                continue;
            }
            a.progress.sample(now, done);
            let f = a.figures(now, self.cfg.num_ctx);
            if !a.cache_warned
                && let Some(why) = low_cache(&f, self.sched.groups(*id), self.sched.lanes())
            {
                a.cache_warned = true;
                tracing::warn!(batch = %id, cached_share = f.cached_share, "{why}");
            }
            a.progress.logged(now, done);
            let retries: u64 = f.retries.values().sum();
            tracing::info!(
                batch = %id,
                done = f.done,
                total = f.total,
                percent = f.percent,
                rate_per_s = f.requests_per_second_recent,
                eta = %f.eta_seconds.map(|s| humantime::format_duration(Duration::from_secs(s)).to_string()).unwrap_or_else(|| "unknown".into()),
                failed = f.failed,
                retries,
                cached_share = %f.cached_share.map(|c| format!("{:.1}%", c * 100.0)).unwrap_or_else(|| "unknown".into()),
                gpu_memory = %gpu.get_or_insert_with(|| self.gpu.summary()),
                "progress"
            );
        }
    }

    fn publish(&mut self) {
        let now = Instant::now();
        let num_ctx = self.cfg.num_ctx;
        for a in self.batches.values_mut() {
            a.progress.sample(now, a.succeeded + a.failed);
        }
        let batches: HashMap<BatchId, BatchLive> = self
            .batches
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    BatchLive {
                        status: Some(a.status),
                        counts: crate::domain::RequestCounts {
                            total: a.total,
                            completed: a.succeeded,
                            failed: a.failed,
                        },
                        usage: a.usage,
                        queued: self.sched.ready(*id) as u64,
                        retry_wait: a.retry_wait,
                        in_flight: a.in_flight,
                        finalize_error: a.finalize_error.clone(),
                        figures: a.figures(now, num_ctx),
                        mode: if a.plan.is_some() {
                            "conversation"
                        } else {
                            "independent"
                        },
                    },
                )
            })
            .collect();
        let counters = self.counters.clone();
        let answered: Vec<usize> = std::mem::take(&mut self.answered_since_publish)
            .into_iter()
            .enumerate()
            .filter(|(i, a)| *a && self.down.get(*i) == Some(&false))
            .map(|(i, _)| i)
            .collect();
        let errors =
            std::mem::take(&mut self.recent_errors_changed).then(|| self.recent_errors.clone());
        self.live.with(|l| {
            if let Some(e) = errors {
                l.recent_errors = e;
            }
            l.batches = batches;
            l.counters = counters;
            for &i in &answered {
                let b = l.backend_mut(i);
                b.reachable = Some(true);
                b.last_error = None;
            }
            if !answered.is_empty() {
                l.merge_backends();
            }
        });
    }

    /// Graceful stop: no new leases; in-flight calls may finish within the grace period;
    /// the rest go back to the queue with their attempt given back; everything is flushed.
    async fn shutdown(mut self) {
        let deadline = tokio::time::Instant::now() + self.cfg.shutdown_grace;
        tracing::info!(in_flight = self.leased.len(), grace = ?self.cfg.shutdown_grace, "stopping: waiting for in-flight requests");
        while !self.leased.is_empty() {
            tokio::select! {
                e = self.events.recv() => match e {
                    Some(e) => self.on_event(e),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        let left: Vec<(RequestKey, u32)> = self.leased.drain().map(|(k, l)| (k, l.lease)).collect();
        self.lane_load.iter_mut().for_each(|n| *n = 0);
        for (key, lease) in &left {
            let r = self
                .store
                .transition_request(*key, Expect::Leased(*lease), |r| {
                    r.state = RequestState::Queued;
                    r.attempts = r.attempts.saturating_sub(1);
                });
            if let Err(e) = r {
                tracing::warn!(request = %key, error = %e, "cannot requeue at shutdown; recovery requeues it");
            }
        }
        self.commit().await;
        self.publish();
        tracing::info!(requeued = left.len(), "supervisor stopped; state flushed");
    }
}

/// Answers after which a low cached share means something (each lane's first prefill of a
/// group is cold), per lane.
const CACHE_WARMUP_PER_LANE: u64 = 8;

/// When a batch's lines share prompt prefixes (far fewer groups than lines) but the backend
/// serves little of them from its cache after a warm-up: what to tell the operator.
fn low_cache(f: &progress::Figures, groups: usize, lanes: usize) -> Option<String> {
    let share = f.cached_share?;
    let lines_per_group = f.total / groups.max(1) as u64;
    if lines_per_group < 8
        || f.answers_with_cached_figure < CACHE_WARMUP_PER_LANE * lanes as u64
        || share >= 0.3
    {
        return None;
    }
    Some(format!(
        "lines share a prompt prefix ({groups} group(s) for {} lines) but only {:.1} % of prompt tokens came from the backend's cache: the usual causes are Gemma 3 (sliding-window attention) on llama.cpp without --swa-full, an Ollama version that re-processes the prompt, or a --concurrency that differs from the backend's slots (llama-server -np, OLLAMA_NUM_PARALLEL)",
        f.total,
        share * 100.0
    ))
}

/// How long to wait before finalizing again after `failures` failed tries: 1 s, doubling, at
/// most a minute.
fn finalize_retry_delay(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(6)).min(Duration::from_secs(60))
}

/// The stored result of a finished call.
fn result_record(o: &Outcome, cfg: &Config) -> ResultRecord {
    match &o.result {
        CallResult::Answered {
            status,
            body,
            usage,
        } => ResultRecord {
            status_code: Some(*status),
            body: Some(body.clone()),
            error_code: None,
            error_message: None,
            usage: *usage,
        },
        CallResult::Timeout => ResultRecord {
            status_code: None,
            body: None,
            error_code: Some("request_timeout".into()),
            error_message: Some(format!(
                "no answer within {} (attempt {} of {})",
                humantime::format_duration(cfg.request_timeout),
                o.attempts,
                cfg.retry.max_attempts
            )),
            usage: None,
        },
        CallResult::Invalid { code, message, .. } => ResultRecord {
            status_code: None,
            body: None,
            error_code: Some(code.clone()),
            error_message: Some(format!(
                "{message} (attempt {} of {})",
                o.attempts, cfg.retry.max_attempts
            )),
            usage: None,
        },
        CallResult::Transport(e) | CallResult::Unreachable(e) => ResultRecord {
            status_code: None,
            body: None,
            error_code: Some("backend_connection_error".into()),
            error_message: Some(format!(
                "{e} (attempt {} of {})",
                o.attempts, cfg.retry.max_attempts
            )),
            usage: None,
        },
    }
}

/// A one-line description of a failed call, for logs and `last_error`.
fn describe(r: &CallResult) -> String {
    match r {
        CallResult::Answered { status, body, .. } => {
            let snippet: String = body.chars().take(200).collect();
            format!("HTTP {status}: {snippet}")
        }
        CallResult::Timeout => "timed out".into(),
        CallResult::Unreachable(e) => format!("unreachable: {e}"),
        CallResult::Transport(e) => format!("connection error: {e}"),
        CallResult::Invalid { message, .. } => format!("invalid answer: {message}"),
    }
}

/// Runs a batch's intake in the background: validation, then (unless `--no-model-check`) the
/// question to the backend whether it has the batch's model, then `in_progress` (and the
/// supervisor adopts it) or `failed`. Started by the API on create and by start-up recovery.
pub fn spawn_intake(
    store: Arc<Store>,
    cfg: Arc<Config>,
    handle: SupervisorHandle,
    tracker: &TaskTracker,
    id: BatchId,
) {
    tracker.spawn(async move {
        let (s, c) = (store.clone(), cfg.clone());
        let validated = match tokio::task::spawn_blocking(move || intake::validate(&s, &c, id)).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(batch = %id, error = %e, "intake failed; it runs again at the next start");
                return;
            }
            Err(e) => {
                tracing::error!(batch = %id, error = %e, "intake panicked");
                return;
            }
        };
        let outcome = match validated {
            intake::Validated::Done(o) => Ok(o),
            intake::Validated::Valid { total, model } => {
                let missing = match (&model, cfg.model_check) {
                    // Every backend must have it: a line may run on any of them.
                    (Some(m), true) => {
                        let mut missing = None;
                        for b in &handle.backends {
                            match b.check_model(m).await {
                                crate::backend::ModelCheck::Present => {}
                                crate::backend::ModelCheck::Missing(why) => {
                                    missing = Some(why);
                                    break;
                                }
                                crate::backend::ModelCheck::Unknown(why) => {
                                    tracing::info!(batch = %id, model = %m, url = b.url(), reason = %why, "the backend cannot say whether it has the model; the batch runs");
                                }
                            }
                        }
                        missing
                    }
                    _ => None,
                };
                let s = store.clone();
                tokio::task::spawn_blocking(move || match missing {
                    Some(why) => {
                        tracing::error!(batch = %id, error = %why, "model not found: batch failed, no line sent");
                        intake::reject(
                            &s,
                            id,
                            vec![crate::domain::LineError {
                                code: "model_not_found".into(),
                                message: why,
                                param: Some("body.model".into()),
                                line: None,
                            }],
                        )
                    }
                    None => intake::accept(&s, id, total, model),
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e.to_string()))))
            }
        };
        match outcome {
            Ok(intake::IntakeOutcome::Ready(n)) => {
                tracing::info!(batch = %id, lines = n, "validated");
                handle.notices.send(live::Notice::BatchValidated {
                    id: id.to_string(),
                    lines: n,
                });
                handle.send(Command::BatchReady(id)).await;
            }
            Ok(intake::IntakeOutcome::Cancelled) => handle.send(Command::BatchReady(id)).await,
            Ok(intake::IntakeOutcome::Invalid(n)) => {
                tracing::info!(batch = %id, errors = n, "validation failed");
                handle.notices.send(live::Notice::BatchFailed {
                    id: id.to_string(),
                    errors: n,
                });
            }
            Ok(intake::IntakeOutcome::Skipped) => {}
            Err(e) => tracing::error!(batch = %id, error = %e, "intake failed; it runs again at the next start"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::{finalize_retry_delay, low_cache, progress};
    use std::time::Duration;
    use std::time::Instant;

    #[test]
    fn a_low_cached_share_is_flagged_only_when_lines_share_prefixes_after_a_warmup() {
        let mut f = progress::Progress::new(0).figures(Instant::now(), 1000, 0, 0, None);
        f.total = 1000;
        f.answers_with_cached_figure = 100;
        f.cached_share = Some(0.05);
        let why = low_cache(&f, 1, 4).expect("flagged");
        assert!(why.contains("--swa-full") && why.contains("5.0 %"), "{why}");
        assert_eq!(
            low_cache(&f, 500, 4),
            None,
            "2 lines a group: nothing to share"
        );
        f.cached_share = Some(0.8);
        assert_eq!(low_cache(&f, 1, 4), None, "the cache works");
        f.cached_share = None;
        assert_eq!(low_cache(&f, 1, 4), None, "unknown is not low");
        f.cached_share = Some(0.05);
        f.answers_with_cached_figure = 10;
        assert_eq!(low_cache(&f, 1, 4), None, "still warming up");
    }

    #[test]
    fn finalize_retries_back_off_to_a_minute() {
        let secs: Vec<u64> = (1..=9).map(|n| finalize_retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(finalize_retry_delay(u32::MAX), Duration::from_secs(60));
    }
}

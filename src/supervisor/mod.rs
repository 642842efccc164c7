//! The supervisor: the single writer of request state.
//!
//! It keeps the run's schedule in memory (per-batch ready queues through `schedule`, a heap of
//! retries by due time, the table of live leases) and the truth in the store. Each turn of its
//! loop (this file):
//!
//! 1. applies the outcomes the worker handed back (`outcome.rs`: the retry policy picks the
//!    step, one edge of the request machine applies it; a stale lease's answer is refused),
//! 2. moves due retries to the ready queues and rescues leases whose call started more than
//!    `request_timeout + lease_margin` ago (the worker reports each start),
//! 3. fills every lane up to two leases with the line the scheduler picks: `Queued → Leased`,
//!    attempt counted,
//! 4. group-commits: one flush makes the new leases and all results since the last flush
//!    durable; only then are results counted (`request_counts`, `/status`) and leased
//!    requests handed to the worker,
//! 5. starts the finalizer for batches whose every line is durably done (`finalize.rs`),
//! 6. publishes the snapshot readers see (`publish.rs`).
//!
//! The rooms: `transitions.rs` (every request state change, one function per edge),
//! `recovery.rs` (start-up recovery and loading a batch), `outcome.rs`, `outage.rs` (backends
//! that stop answering, a store that cannot write), `publish.rs`, `finalize.rs` (output, error
//! and retry files; terminal states), `turns.rs` (conversation mode's calls), `intake_task.rs`
//! (validation and the model check in the background).

mod expiry;
pub mod finalize;
mod intake_task;
mod models;
mod outage;
mod outcome;
mod publish;
mod recovery;
mod reuse;
mod transitions;
mod turns;

pub use expiry::sweep_expired;
pub use intake_task::spawn_intake;
pub use recovery::{RecoveredBatch, Recovery, recover};

use crate::backend::Backend;
use crate::config::Config;
use crate::domain::{
    BatchId, BatchStatus, Endpoint, RequestKey, ResultRecord, Usage, unix_millis, unix_now,
};
use crate::intake;
use crate::live::{self, LiveView, progress};
use crate::schedule::Scheduler;
use crate::store::Store;
use crate::worker::{Event, Job};
use recovery::load_batch;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Duration;
// The supervisor's clock is tokio's: a test can pause and advance it.
use tokio::sync::mpsc;
use tokio::time::Instant;
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
    /// Backend `.0` released its old model and loaded this one: its lanes serve it now.
    ModelReady(usize, Option<String>),
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

/// When a retry stored as due at unix ms `ms` is due on the supervisor's clock.
fn due_at(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms.saturating_sub(unix_millis()))
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
    /// At load: the batch's lines in order, as runs of consecutive lines of one prefix group
    /// and one kind (a few runs for a million lines); handed to the scheduler when the
    /// supervisor takes the batch on.
    load: Vec<LoadRun>,
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
    /// Metadata `reuse`: `Some(true)` answers lines from earlier identical requests,
    /// `Some(false)` never does; `None` follows `--reuse-results`.
    reuse: Option<bool>,
    /// Reuse keys on their way in this batch: which line answers each, who waits for it.
    claims: HashMap<[u8; 32], reuse::Claim>,
}

/// Lines `first..=last` of a batch at load: one prefix group, one kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct LoadRun {
    first: u32,
    last: u32,
    group: u64,
    kind: LoadKind,
}

/// What a line is at load.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LoadKind {
    /// Succeeded or failed.
    Done,
    /// To run now.
    Ready,
    /// Queued for a retry later (the supervisor's timer brings it back).
    Waiting,
}

/// A result written since the last flush, counted once the flush makes it durable.
#[derive(Debug)]
struct Done {
    batch: BatchId,
    ok: bool,
    usage: Option<Usage>,
    /// Answered from an earlier answer: its tokens are the batch's, not this run's work.
    reused: bool,
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
            load: Vec::new(),
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
            reuse: rec
                .metadata
                .as_ref()
                .and_then(|m| m.get(crate::domain::META_REUSE))
                .map(|v| v == "true"),
            claims: HashMap::new(),
        }
    }
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
    /// Retries by when they are due (on this clock; the store keeps the unix time).
    delayed: BinaryHeap<Reverse<(Instant, RequestKey)>>,
    leased: HashMap<RequestKey, Lease>,
    /// Results written since the last flush: (batch, succeeded, usage).
    pending: Vec<Done>,
    first_pending: Option<Instant>,
    /// Successes to remember under their reuse key (`reuse.rs`), written with the next commit
    /// or before the next lookup.
    remembered: Vec<([u8; 32], RequestKey)>,
    /// Per backend: down (its lanes get no leases) since a call found it unreachable, until a
    /// probe reaches it.
    down: Vec<bool>,
    /// Every backend, in lane order; `lane_backend[lane]` is its index.
    backends: Vec<Backend>,
    lane_backend: Vec<usize>,
    /// A call was answered since the last publish: the backend is reachable, whatever an
    /// earlier probe said (its error is cleared).
    answered_since_publish: Vec<bool>,
    /// Per backend: its answers in a row that were no API answer (`invalid_backend_answer`).
    invalid_streak: Vec<u32>,
    /// Set once the store cannot write: dispatch stops for good (until a restart).
    store_failure: Option<String>,
    /// Which model each backend serves (one at a time).
    models: models::Models,
    /// `Config::reuse_options`, made once (it is in every reuse key the loop computes).
    reuse_options: String,
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
        let n_backends = backends.len();
        let lane_backend: Vec<usize> = parts.cfg.lane_map().into_iter().map(|l| l.0).collect();
        let reuse_options = parts.cfg.reuse_options();
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
            delayed: recovery
                .delayed
                .into_iter()
                .map(|(ms, key)| Reverse((due_at(ms), key)))
                .collect(),
            leased: HashMap::new(),
            pending: Vec::new(),
            first_pending: None,
            remembered: Vec::new(),
            down: vec![false; n_backends],
            backends,
            lane_backend,
            store_failure: None,
            models: models::Models::new(n_backends),
            reuse_options,
            answered_since_publish: Vec::new(),
            invalid_streak: vec![0; n_backends],
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
                _ = tokio::time::sleep_until(wake) => {}
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
            wake = wake.min(*due);
        }
        for t in self.batches.values().filter_map(|a| a.finalize_after) {
            wake = wake.min(t);
        }
        if let Some(t) = self.models.next_deadline(self.cfg.model_switch_wait) {
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
                if let Some(s) = self.invalid_streak.get_mut(i) {
                    *s = 0;
                }
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
            Command::ModelReady(b, model) => self.model_ready(b, model),
            Command::FinalizeFailed(id, error) => {
                if let Some(a) = self.batches.get_mut(&id) {
                    a.finalizing = false;
                    a.finalize_failures += 1;
                    let delay = finalize::finalize_retry_delay(a.finalize_failures);
                    a.finalize_after = Some(Instant::now() + delay);
                    tracing::error!(batch = %id, %error, failures = a.finalize_failures, retry_in = ?delay, "finalization failed; it is tried again");
                    a.finalize_error = Some(error);
                }
            }
        }
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
                self.delayed.extend(
                    delayed
                        .into_iter()
                        .map(|(ms, key)| Reverse((due_at(ms), key))),
                );
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
        let load = std::mem::take(&mut a.load);
        for run in &load {
            let done = run.kind == LoadKind::Done;
            if done && a.plan.is_none() {
                continue;
            }
            for line in run.first..=run.last {
                self.sched.register(id, line, run.group);
                if done {
                    self.sched.finished(id, line);
                }
            }
        }
        for run in load.iter().filter(|r| r.kind == LoadKind::Ready) {
            for line in run.first..=run.last {
                self.sched.push_back(id, line, now);
            }
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

    fn promote_due(&mut self) {
        let now = Instant::now();
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
            let r = transitions::rescue(
                &self.store,
                key,
                lease,
                Some("lease rescued: no answer within request timeout + margin"),
            );
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
        self.choose_models();
        // A lane the scheduler leaves idle this turn is not asked again in it; nor is a lane of
        // a backend that is down or between two models.
        let mut declined: Vec<bool> = (0..self.lane_load.len())
            .map(|l| {
                let b = self.lane_backend.get(l).copied().unwrap_or(0);
                self.down.get(b).copied().unwrap_or(false) || self.models.switching(b)
            })
            .collect();
        let mut answered_here = 0;
        while let Some(lane) = (0..self.lane_load.len())
            .filter(|&l| !declined[l] && self.lane_load[l] < LEASES_PER_LANE)
            .min_by_key(|&l| self.lane_load[l])
        {
            let (batches, models) = (&self.batches, &self.models);
            let backend = self.lane_backend.get(lane).copied().unwrap_or(0);
            let idle = self.lane_load[lane] == 0;
            let Some((id, line)) = self.sched.next(lane, now, idle, |id| {
                batches
                    .get(&id)
                    .is_some_and(|a| a.served_by(models, backend))
            }) else {
                declined[lane] = true;
                continue;
            };
            let Some(a) = self.batches.get_mut(&id) else {
                continue;
            };
            let key = RequestKey { batch: id, line };
            let (endpoint, plan) = (a.endpoint, a.plan);
            let reuses = a.reuses(self.cfg.reuse_results);
            let body = self
                .store
                .get_body(key)
                .map_err(|e| e.to_string())
                .and_then(|b| b.ok_or_else(|| "the body is missing".to_string()))
                .and_then(|b| intake::materialize(&self.store, &b, a.model.as_deref()));
            // A reusing batch's line is looked up under its reuse key first. (Every independent
            // line's success is remembered under its key whatever the batch: the worker
            // computes it, off this loop, when the supervisor did not need it.)
            let reuse_key = match (&body, plan) {
                (Ok(b), None) if reuses => Some(self.reuse_key(endpoint, b)),
                _ => None,
            };
            if reuses && let Some(hash) = reuse_key {
                match self.look_up(id, line, hash) {
                    reuse::Lookup::Reused | reuse::Lookup::Waiting => {
                        // A batch answered from the store must not hold the loop: a group
                        // commit's worth per turn, then the turn ends (and the next starts
                        // at once).
                        answered_here += 1;
                        if answered_here >= self.cfg.flush_every {
                            break;
                        }
                        continue;
                    }
                    reuse::Lookup::Send => {}
                }
            }
            let rec = match transitions::lease(&self.store, key) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(request = %key, error = %e, "cannot lease; skipped");
                    self.sched.finished(id, line);
                    continue;
                }
            };
            let Some(a) = self.batches.get_mut(&id) else {
                continue;
            };
            let body = match (body, plan, self.sched.conversation_of(id, line)) {
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
                        reuse_key,
                        remember: plan.is_none(),
                    });
                }
                Err(e) => {
                    tracing::error!(request = %key, error = %e, "stored body unusable: line failed");
                    let failed = transitions::fail(
                        &self.store,
                        key,
                        rec.lease,
                        ResultRecord::error(
                            "internal_error",
                            format!("the stored request is unusable: {e}"),
                        ),
                    );
                    if failed.is_ok() {
                        self.sched.finished(id, line);
                        self.pending.push(Done {
                            batch: key.batch,
                            ok: false,
                            usage: None,
                            reused: false,
                        });
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
        self.remember();
        if let Err(e) = self.store.flush_async().await {
            // Nothing is acknowledged; the next commit tries again.
            tracing::error!(error = %e, "flush failed");
            return;
        }
        self.counters.flushes += 1;
        self.counters.results += self.pending.len() as u64;
        for d in self.pending.drain(..) {
            if let Some(a) = self.batches.get_mut(&d.batch) {
                if d.ok {
                    a.succeeded += 1;
                    self.counters.succeeded += 1;
                } else {
                    a.failed += 1;
                    self.counters.failed += 1;
                }
                // The batch's usage is its output's; the rates and the run's token counters
                // are the work done here (a reused answer cost nothing now).
                if !d.reused {
                    a.progress.result(d.usage.as_ref());
                    if let Some(u) = &d.usage {
                        self.counters.tokens.add(u);
                    }
                }
                if let Some(u) = d.usage {
                    a.usage.add(&u);
                }
            }
        }
        self.first_pending = None;
        self.log_progress();
    }

    /// Graceful stop: no new leases; in-flight calls may finish within the grace period;
    /// the rest go back to the queue with their attempt given back; everything is flushed.
    async fn shutdown(mut self) {
        let deadline = Instant::now() + self.cfg.shutdown_grace;
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
        if self.store.failure().is_some() {
            // Leases stay as they are: start-up recovery puts them back in the queue.
            tracing::info!(
                leased = left.len(),
                "supervisor stopped; the store had failed, recovery requeues what was in flight"
            );
            return;
        }
        for (key, lease) in &left {
            let r = transitions::give_back(&self.store, *key, *lease, None);
            if let Err(e) = r {
                tracing::warn!(request = %key, error = %e, "cannot requeue at shutdown; recovery requeues it");
            }
        }
        self.commit().await;
        self.publish();
        tracing::info!(requeued = left.len(), "supervisor stopped; state flushed");
    }
}

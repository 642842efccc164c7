//! What the supervisor publishes for readers (`/status`, `/metrics`, `/events`, the dashboard,
//! the API's batch counts): a snapshot behind a std mutex, replaced wholesale by the supervisor
//! after each commit and never held across an await, and the channel of discrete events.
//! It sits below the supervisor, so readers import it and never the supervisor's insides;
//! `progress` holds the per-batch figures the snapshot carries.

pub mod progress;

use crate::domain::{BatchId, BatchStatus, RequestCounts, Usage};
use std::collections::HashMap;
use std::sync::Mutex;

/// Progress of one unfinished batch, counting only durable results.
#[derive(Clone, Debug, Default)]
pub struct BatchLive {
    /// Status as the supervisor knows it.
    pub status: Option<BatchStatus>,
    /// Durable counts.
    pub counts: RequestCounts,
    /// Durable usage.
    pub usage: Usage,
    /// Lines waiting to be sent now.
    pub queued: u64,
    /// Lines waiting for a retry time.
    pub retry_wait: u64,
    /// Lines leased to the worker.
    pub in_flight: u64,
    /// Why the last try to write its output files failed, while it waits to try again.
    pub finalize_error: Option<String>,
    /// Rates, ETA, tokens, retries by cause.
    pub figures: progress::Figures,
    /// `independent`, or `conversation` (conversation mode).
    pub mode: &'static str,
}

/// Event counters since start.
#[derive(Clone, Debug, Default)]
pub struct Counters {
    /// Leases rescued after outliving request timeout + margin.
    pub rescued: u64,
    /// Requests found leased at start-up and put back in the queue.
    pub requeued_at_start: u64,
    /// Transient failures scheduled for another try.
    pub retries: u64,
    /// Lines put back without spending an attempt because the backend was full (429 / 503).
    pub deferred: u64,
    /// Times a backend changed the model it serves.
    pub model_switches: u64,
    /// Out-of-memory answers.
    pub oom: u64,
    /// Calls that timed out.
    pub timeouts: u64,
    /// Times the backend was found unreachable.
    pub backend_outages: u64,
    /// Answers dropped because their lease was no longer current.
    pub stale_outcomes: u64,
    /// Group commits (flushes).
    pub flushes: u64,
    /// Results made durable.
    pub results: u64,
    /// Of those, successes.
    pub succeeded: u64,
    /// Of those, failures.
    pub failed: u64,
    /// Retries by cause.
    pub retries_by_cause: std::collections::BTreeMap<&'static str, u64>,
    /// Tokens of durable answers.
    pub tokens: progress::Tokens,
    /// JSON answers checked, re-asked, rejected; lines reused.
    pub answers: progress::Answers,
}

/// Backend health as last seen.
#[derive(Clone, Debug, Default)]
pub struct BackendHealth {
    /// Whether the last probe or call reached it.
    pub reachable: Option<bool>,
    /// Unix seconds of the last probe.
    pub last_probe_at: Option<i64>,
    /// Unix seconds since which dispatch is paused because it is down.
    pub down_since: Option<i64>,
    /// Unix seconds of the next probe while down.
    pub next_probe_at: Option<i64>,
    /// The last connection error.
    pub last_error: Option<String>,
}

/// A line's failed try, kept among the last few for the dashboard.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RecentError {
    /// Unix seconds.
    pub at: i64,
    /// Which batch.
    pub batch: String,
    /// Which input line (1-based).
    pub line: u32,
    /// The try it was.
    pub attempt: u32,
    /// Whether the line failed for good (else it is retried).
    pub is_final: bool,
    /// What happened (at most 300 characters).
    pub error: String,
}

/// How many recent errors are kept.
pub const RECENT_ERRORS: usize = 20;

/// Something that happened, for `/events` (discrete events beside the snapshots).
#[derive(Clone, Debug, serde::Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Notice {
    /// A batch was created (`validating`).
    BatchCreated {
        /// Its id.
        id: String,
    },
    /// Its file was valid (and the model present): `in_progress`.
    BatchValidated {
        /// Its id.
        id: String,
        /// Lines queued.
        lines: u64,
    },
    /// It failed at validation (or the model check).
    BatchFailed {
        /// Its id.
        id: String,
        /// How many errors.
        errors: usize,
    },
    /// It reached a terminal status with its files written.
    BatchFinished {
        /// Its id.
        id: String,
        /// `completed`, `cancelled` or `expired`.
        status: String,
    },
    /// The backend became unreachable; dispatch paused.
    BackendDown {
        /// Why.
        error: String,
    },
    /// The backend answers again; dispatch resumed.
    BackendUp,
    /// An out-of-memory answer.
    OutOfMemory {
        /// The batch whose line got it.
        batch: String,
    },
}

/// The channel of [`Notice`]s: anyone may send; `/events` streams subscribe. Sending never
/// waits (a slow reader misses events and is told so).
#[derive(Clone, Debug)]
pub struct Notices(tokio::sync::broadcast::Sender<Notice>);

impl Default for Notices {
    fn default() -> Self {
        Notices(tokio::sync::broadcast::channel(256).0)
    }
}

impl Notices {
    /// Sends to whoever listens (nobody is fine).
    pub fn send(&self, n: Notice) {
        let _ = self.0.send(n);
    }

    /// A new listener.
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Notice> {
        self.0.subscribe()
    }
}

/// The published snapshot.
#[derive(Clone, Debug, Default)]
pub struct Live {
    /// The last failed tries, newest last.
    pub recent_errors: std::collections::VecDeque<RecentError>,
    /// Unfinished batches the supervisor runs.
    pub batches: HashMap<BatchId, BatchLive>,
    /// Counters.
    pub counters: Counters,
    /// Backend health: of the one backend, or of them all (reachable when one is, down when
    /// all are) when there are several.
    pub backend: BackendHealth,
    /// Each backend's health, in `--backend-url` order.
    pub backends: Vec<BackendHealth>,
    /// The model each backend serves (one at a time), in `--backend-url` order.
    pub serving: Vec<Option<String>>,
}

impl Live {
    /// Backend `i`'s health (made when first needed).
    pub fn backend_mut(&mut self, i: usize) -> &mut BackendHealth {
        if self.backends.len() <= i {
            self.backends.resize(i + 1, BackendHealth::default());
        }
        &mut self.backends[i]
    }

    /// Recomputes `backend` from `backends`.
    pub fn merge_backends(&mut self) {
        let b = &self.backends;
        if b.len() <= 1 {
            self.backend = b.first().cloned().unwrap_or_default();
            return;
        }
        let all_down = b.iter().all(|h| h.down_since.is_some());
        self.backend = BackendHealth {
            reachable: if b.iter().any(|h| h.reachable == Some(true)) {
                Some(true)
            } else if b.iter().all(|h| h.reachable == Some(false)) {
                Some(false)
            } else {
                None
            },
            last_probe_at: b.iter().filter_map(|h| h.last_probe_at).max(),
            down_since: all_down
                .then(|| b.iter().filter_map(|h| h.down_since).max())
                .flatten(),
            next_probe_at: all_down
                .then(|| b.iter().filter_map(|h| h.next_probe_at).min())
                .flatten(),
            last_error: b.iter().find_map(|h| h.last_error.clone()),
        };
    }
}

/// Shared handle on the snapshot.
#[derive(Debug, Default)]
pub struct LiveView(Mutex<Live>);

impl LiveView {
    /// Runs `f` on the snapshot.
    pub fn with<R>(&self, f: impl FnOnce(&mut Live) -> R) -> R {
        let mut g = self.0.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut g)
    }

    /// Live (counts, usage) of a running batch, if the supervisor has it.
    pub fn batch(&self, id: BatchId) -> Option<(RequestCounts, Usage)> {
        self.with(|l| l.batches.get(&id).map(|b| (b.counts, b.usage)))
    }
}

//! Start-up recovery, one room, one job (River's rescuer is the model): before the API or the
//! worker start, every unfinished batch is read back; each request that was leased when the
//! process died is rescued (back to the queue, its attempt kept) or, when it has used up its
//! attempts in processes that died, failed as `request_interrupted`; the schedule the
//! supervisor starts from is built from what is left. The same scan takes on a batch whose
//! intake finished while the server runs.

use super::{Active, LoadKind, LoadRun, transitions};
use crate::config::Config;
use crate::domain::{
    BatchId, BatchStatus, Endpoint, RequestKey, RequestState, ResultRecord, unix_millis,
};
use crate::live::progress;
use crate::store::{Store, StoreError, TransitionError};

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
    pub(super) batches: Vec<(BatchId, Active)>,
    pub(super) delayed: Vec<(u64, RequestKey)>,
}

/// Scans one batch's requests into an `Active`, putting leased requests back in the queue.
pub(super) fn load_batch(
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
    let mut groups = store.group_reader(rec.id);
    for item in store.batch_lines(rec.id) {
        let (key, mut r, usage) = item?;
        lines += 1;
        started |= r.attempts > 0 || r.state.is_done();
        let group = groups.group(key.line)?;
        if r.state == RequestState::Leased {
            report.requeued_from_in_flight += 1;
            // Counted here as it will be; moved below, after the scan.
            if r.attempts >= cfg.retry.max_attempts {
                report.exhausted += 1;
                let result = ResultRecord::error(
                    "request_interrupted",
                    format!(
                        "the server stopped while this request was in flight, {} times (last error: {})",
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("none")
                    ),
                );
                r.state = RequestState::Failed;
                fixes.push((key, r.lease, Some(result)));
            } else {
                r.state = RequestState::Queued;
                fixes.push((key, r.lease, None));
            }
        }
        let kind = match r.state {
            RequestState::Succeeded | RequestState::Failed => LoadKind::Done,
            RequestState::Queued if r.not_before_ms > now_ms => LoadKind::Waiting,
            RequestState::Queued | RequestState::Leased => LoadKind::Ready,
        };
        push_run(&mut a.load, key.line, group, kind);
        if let Some(u) = &usage {
            a.usage.add(u); // only a finished line has a result
        }
        match r.state {
            RequestState::Succeeded => a.succeeded += 1,
            RequestState::Failed => a.failed += 1,
            RequestState::Queued if r.not_before_ms > now_ms => {
                a.retry_wait += 1;
                delayed.push((r.not_before_ms, key));
            }
            RequestState::Queued | RequestState::Leased => {}
        }
    }
    for (key, lease, failed) in fixes {
        let moved = match failed {
            Some(result) => transitions::fail(store, key, lease, result),
            None => transitions::rescue(store, key, lease, None),
        };
        match moved {
            Ok(_) => {}
            Err(TransitionError::Store(e)) => return Err(e),
            // Nothing else runs yet: a record that moved under us is a bug, said, not fatal.
            Err(e) => {
                tracing::error!(request = %key, error = %e, "recovery could not move a request")
            }
        }
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

/// Adds a line to the load's runs (lines in order): it extends the last run when it follows
/// it with the same group and kind.
fn push_run(runs: &mut Vec<LoadRun>, line: u32, group: u64, kind: LoadKind) {
    match runs.last_mut() {
        Some(r) if r.group == group && r.kind == kind && r.last.checked_add(1) == Some(line) => {
            r.last = line
        }
        _ => runs.push(LoadRun {
            first: line,
            last: line,
            group,
            kind,
        }),
    }
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

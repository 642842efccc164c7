//! What the supervisor does with a call's outcome: the retry policy picks the step, one edge of
//! the request machine applies it (`transitions.rs`), and the figures, the recent errors and the
//! conversation's record follow.

use super::{Done, Lease, Supervisor, transitions};
use crate::config::Config;
use crate::domain::{CallResult, ResultRecord, Step, Verdict, unix_millis, unix_now};
use crate::live::{self, progress};
use crate::store::TransitionError;
use crate::worker::Outcome;
use std::cmp::Reverse;
use tokio::time::Instant;

/// Answers in a row from one backend that are no API answer at all, after which that backend
/// is paused and probed like an unreachable one.
pub(super) const INVALID_ANSWERS_IN_A_ROW: u32 = 3;

impl Supervisor {
    pub(super) fn on_outcome(&mut self, o: Outcome) {
        let current = self.leased.get(&o.key).map(|l| l.lease);
        if current != Some(o.lease) {
            self.counters.stale_outcomes += 1;
            tracing::debug!(request = %o.key, lease = o.lease, "answer of a stale lease dropped");
            return;
        }
        let Some(Lease { lane, turn, .. }) = self.end_lease(o.key) else {
            return;
        };
        if self.store_failed() {
            // Nothing can be stored any more (and reading the store may no longer return): the
            // line runs again after the restart, like any result not yet durable.
            if let Some(a) = self.batches.get_mut(&o.key.batch) {
                a.in_flight = a.in_flight.saturating_sub(1);
            }
            return;
        }
        let backend_index = self.lane_backend.get(lane).copied().unwrap_or(0);
        let Some(active) = self.batches.get_mut(&o.key.batch) else {
            return;
        };
        active.in_flight = active.in_flight.saturating_sub(1);
        active.progress.answers.add(&o.check);
        self.counters.answers.add(&o.check);
        if o.result.answered() {
            if self.answered_since_publish.len() <= backend_index {
                self.answered_since_publish.resize(backend_index + 1, false);
            }
            self.answered_since_publish[backend_index] = true;
        }
        if !matches!(o.verdict, Verdict::Success | Verdict::BackendDown) {
            // A full backend (429 / 503) never ends a line: the attempt is given back.
            let is_final = matches!(o.verdict, Verdict::Permanent)
                || (o.verdict != Verdict::Overloaded && o.attempts >= self.cfg.retry.max_attempts);
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
        // Health from answers, not only probes: a backend whose answers keep being no API
        // answer at all (an HTML page from a misconfigured proxy, another service on the port)
        // is paused like an unreachable one, and this line goes back without spending its
        // attempt, to the healthy backends if there are others.
        let garbage = matches!(&o.result, CallResult::Invalid { code, .. } if code == "invalid_backend_answer");
        if garbage {
            self.invalid_streak[backend_index] += 1;
        } else if o.result.answered() {
            self.invalid_streak[backend_index] = 0;
        }
        let unhealthy = garbage
            && self.invalid_streak[backend_index] >= INVALID_ANSWERS_IN_A_ROW
            && self.down.get(backend_index) == Some(&false);
        let step = if unhealthy {
            Step::RequeueFree
        } else {
            self.cfg
                .retry
                .next_step(o.verdict, o.attempts, fastrand::f64())
        };
        let key = o.key;
        let applied = match step {
            Step::Succeed | Step::Fail => {
                let succeeded = step == Step::Succeed;
                let result = result_record(&o, &self.cfg);
                let usage = result.usage;
                // A conversation's success is stored with the history that now holds it; a
                // failure leaves the history as it was.
                let in_conversation = turn.filter(|_| succeeded).and_then(|t| {
                    let record = self.turns.after(key.batch, key.line, &t, usage.as_ref())?;
                    Some((t, record))
                });
                let r = transitions::settle(
                    &self.store,
                    key,
                    o.lease,
                    succeeded,
                    result.clone(),
                    in_conversation.as_ref().map(|(t, record)| (t.conv, record)),
                );
                if r.is_ok() {
                    if let Some((t, record)) = in_conversation {
                        let answer = result.body.as_deref().unwrap_or_default();
                        self.turns.stored(key.batch, key.line, t, answer, record);
                    }
                    self.sched.finished(key.batch, key.line);
                    if self.pending.is_empty() {
                        self.first_pending = Some(Instant::now());
                    }
                    self.pending.push(Done {
                        batch: key.batch,
                        ok: succeeded,
                        usage,
                        reused: false,
                    });
                    match o.reuse_key {
                        Some(hash) if succeeded => self.answered(key, hash, &result),
                        Some(hash) => self.not_answered(key, hash),
                        None => {}
                    }
                }
                r
            }
            Step::RetryAfter(delay) => {
                let due = unix_millis() + delay.as_millis() as u64;
                let due_here = Instant::now() + delay;
                let err = describe(&o.result);
                let r = transitions::retry(&self.store, key, o.lease, due, err.clone());
                if r.is_ok() {
                    self.sched.waiting(key.batch, key.line);
                    self.counters.retries += 1;
                    let cause = progress::retry_cause(&o.result, o.verdict);
                    active.progress.retry(cause);
                    *self.counters.retries_by_cause.entry(cause).or_default() += 1;
                    tracing::debug!(request = %key, attempt = o.attempts, ?delay, error = %err, "retry scheduled");
                    if active.dispatching() {
                        active.retry_wait += 1;
                        self.delayed.push(Reverse((due_here, key)));
                    }
                }
                r
            }
            Step::Defer(default) => {
                // The backend is full: the line waits what it advised (or the first retry's
                // ceiling), with its attempt given back; the worker has lowered the limit.
                let delay = match &o.result {
                    CallResult::Busy {
                        retry_after: Some(d),
                        ..
                    } => *d,
                    _ => default,
                };
                let due = unix_millis() + delay.as_millis() as u64;
                let due_here = Instant::now() + delay;
                let err = describe(&o.result);
                let r = transitions::defer(&self.store, key, o.lease, due, err);
                if r.is_ok() {
                    self.sched.waiting(key.batch, key.line);
                    self.counters.deferred += 1;
                    if active.dispatching() {
                        active.retry_wait += 1;
                        self.delayed.push(Reverse((due_here, key)));
                    }
                }
                r
            }
            Step::RequeueFree => {
                let err = if unhealthy {
                    format!(
                        "{INVALID_ANSWERS_IN_A_ROW} answers in a row were not API answers (a proxy's error page? another service on this address?): {}",
                        describe(&o.result)
                    )
                } else {
                    describe(&o.result)
                };
                let r = transitions::give_back(&self.store, key, o.lease, Some(err.clone()));
                if r.is_ok() && active.dispatching() {
                    self.sched.push_front(key.batch, key.line, Instant::now());
                }
                self.backend_gone(backend_index, err);
                r
            }
        };
        match applied {
            Ok(_) => {}
            Err(TransitionError::Refused(refused)) => {
                self.counters.stale_outcomes += 1;
                tracing::warn!(request = %key, %refused, "outcome fenced off by the store");
            }
            Err(e) => {
                tracing::error!(request = %key, error = %e, "cannot store an outcome; the request reruns after restart")
            }
        }
    }
}

/// The stored result of a finished call.
fn result_record(o: &Outcome, cfg: &Config) -> ResultRecord {
    let tries = format!("(attempt {} of {})", o.attempts, cfg.retry.max_attempts);
    match &o.result {
        CallResult::Answered {
            status,
            body,
            usage,
        } => ResultRecord::answer(*status, body.clone(), *usage),
        CallResult::Timeout => ResultRecord::error(
            "request_timeout",
            format!(
                "no answer within {} {tries}",
                humantime::format_duration(cfg.request_timeout)
            ),
        ),
        CallResult::Invalid { code, message, .. } => {
            ResultRecord::error(code, format!("{message} {tries}"))
        }
        CallResult::Busy { status, body, .. } => ResultRecord::answer(*status, body.clone(), None),
        CallResult::Rejected {
            code,
            message,
            status,
            body,
            usage,
        } => ResultRecord {
            status_code: Some(*status),
            body: Some(body.clone()),
            error_code: Some(code.clone()),
            error_message: Some(message.clone()),
            usage: *usage,
        },
        CallResult::Transport(e) | CallResult::Unreachable(e) => {
            ResultRecord::error("backend_connection_error", format!("{e} {tries}"))
        }
    }
}

/// A one-line description of a failed call, for logs and `last_error`.
pub(super) fn describe(r: &CallResult) -> String {
    match r {
        CallResult::Answered { status, body, .. } => {
            let snippet: String = body.chars().take(200).collect();
            format!("HTTP {status}: {snippet}")
        }
        CallResult::Timeout => "timed out".into(),
        CallResult::Unreachable(e) => format!("unreachable: {e}"),
        CallResult::Transport(e) => format!("connection error: {e}"),
        CallResult::Invalid { message, .. } => format!("invalid answer: {message}"),
        CallResult::Rejected { code, message, .. } => format!("{code}: {message}"),
        CallResult::Busy {
            status,
            body,
            retry_after,
        } => {
            let snippet: String = body.chars().take(200).collect();
            match retry_after {
                Some(d) => format!(
                    "HTTP {status} (full; Retry-After {}s): {snippet}",
                    d.as_secs()
                ),
                None => format!("HTTP {status} (full): {snippet}"),
            }
        }
    }
}

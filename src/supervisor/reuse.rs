//! Never paying twice for an answer. Every success of an independent line is remembered under
//! its reuse key (`answer::reuse_key`: endpoint, backend options, canonical body). A line of a
//! batch that reuses answers (metadata `"reuse": "true"`, or `--reuse-results` unless the
//! batch says `"false"`) is looked up before it is leased:
//!
//! - an earlier success under its key answers it from the store (`Queued → Succeeded`, no call,
//!   no attempt);
//! - an identical line of the same batch already on its way (the key's *claim*) makes it wait
//!   for that answer instead of being sent too: when the claimer succeeds, every waiter is
//!   answered from it; when it fails for good, the waiters go back to the queue and run on
//!   their own.
//!
//! Waiters are only in memory: after a restart they are queued lines like any other, and the
//! lookup answers them once their claimer's success is durable.

use super::{Active, Done, Supervisor, transitions};
use crate::domain::{BatchId, Endpoint, RequestKey, RequestState, ResultRecord};
use serde_json::Value;
use tokio::time::Instant;

/// A key being answered in a batch: by which line, and the identical lines waiting for it.
#[derive(Debug, Default)]
pub(super) struct Claim {
    owner: u32,
    waiting: Vec<u32>,
}

/// What to do with a line about to be leased.
pub(super) enum Lookup {
    /// Answered from the store: nothing to send.
    Reused,
    /// Waits for an identical line's answer: nothing to send now.
    Waiting,
    /// Send it.
    Send,
}

impl Active {
    /// Whether this batch's lines are answered from earlier answers.
    pub(super) fn reuses(&self, server_default: bool) -> bool {
        self.plan.is_none() && self.reuse.unwrap_or(server_default)
    }
}

impl Supervisor {
    /// The reuse key of a line of `endpoint` with this body (as it is sent).
    pub(super) fn reuse_key(&self, endpoint: Endpoint, body: &Value) -> [u8; 32] {
        crate::answer::reuse_key(endpoint, &self.reuse_options, body)
    }

    /// Looks `line` of batch `id` (reuse key `hash`) up before it is leased.
    pub(super) fn look_up(&mut self, id: BatchId, line: u32, hash: [u8; 32]) -> Lookup {
        let key = RequestKey { batch: id, line };
        self.remember();
        match self.store.answered_by(&hash) {
            Ok(Some((by, rec))) if by != key && rec.state == RequestState::Succeeded => {
                if let Some(result) = rec.result
                    && self.answer_from(key, result)
                {
                    return Lookup::Reused;
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(request = %key, error = %e, "cannot look the answer up; the line is sent")
            }
        }
        let Some(a) = self.batches.get_mut(&id) else {
            return Lookup::Send;
        };
        match a.claims.get_mut(&hash) {
            Some(c) if c.owner != line => {
                c.waiting.push(line);
                Lookup::Waiting
            }
            Some(_) => Lookup::Send,
            None => {
                a.claims.insert(
                    hash,
                    Claim {
                        owner: line,
                        waiting: Vec::new(),
                    },
                );
                Lookup::Send
            }
        }
    }

    /// Writes the successes remembered since the last write into the store's answers log:
    /// at each commit (durable with it) and before a lookup (which must see them).
    pub(super) fn remember(&mut self) {
        if self.remembered.is_empty() {
            return;
        }
        if let Err(e) = self.store.remember_answers(&self.remembered) {
            tracing::warn!(answers = self.remembered.len(), error = %e, "cannot remember answers for reuse");
        }
        self.remembered.clear();
    }

    /// Settles `key` with an identical request's answer; whether it was.
    fn answer_from(&mut self, key: RequestKey, result: ResultRecord) -> bool {
        let usage = result.usage;
        match transitions::reuse(&self.store, key, result) {
            Ok(_) => {
                self.sched.finished(key.batch, key.line);
                self.first_pending.get_or_insert_with(Instant::now);
                self.pending.push(Done {
                    batch: key.batch,
                    ok: true,
                    usage,
                    reused: true,
                });
                if let Some(a) = self.batches.get_mut(&key.batch) {
                    a.progress.answers.reused += 1;
                }
                self.counters.answers.reused += 1;
                true
            }
            Err(e) => {
                tracing::warn!(request = %key, error = %e, "cannot answer from an earlier answer; the line is sent");
                false
            }
        }
    }

    /// `key` (reuse key `hash`) succeeded with `result`: remembered for later batches (written
    /// with the next commit), and the identical lines waiting for it are answered.
    pub(super) fn answered(&mut self, key: RequestKey, hash: [u8; 32], result: &ResultRecord) {
        self.remembered.push((hash, key));
        for line in self.release_claim(key, hash) {
            let waiter = RequestKey {
                batch: key.batch,
                line,
            };
            if !self.answer_from(waiter, result.clone()) {
                self.sched.push_front(key.batch, line, Instant::now());
            }
        }
    }

    /// `key` (reuse key `hash`) failed for good: its waiters go back to the queue.
    pub(super) fn not_answered(&mut self, key: RequestKey, hash: [u8; 32]) {
        let now = Instant::now();
        let dispatching = self
            .batches
            .get(&key.batch)
            .is_some_and(Active::dispatching);
        for line in self.release_claim(key, hash) {
            if dispatching {
                self.sched.push_front(key.batch, line, now);
            }
        }
    }

    /// Ends `key`'s claim on `hash`: the lines that waited for it.
    fn release_claim(&mut self, key: RequestKey, hash: [u8; 32]) -> Vec<u32> {
        let Some(a) = self.batches.get_mut(&key.batch) else {
            return Vec::new();
        };
        match a.claims.get(&hash) {
            Some(c) if c.owner == key.line => a
                .claims
                .remove(&hash)
                .map(|c| c.waiting)
                .unwrap_or_default(),
            _ => Vec::new(),
        }
    }
}

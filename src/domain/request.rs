//! The request record and its state machine.
//!
//! ```text
//!            lease (supervisor, lease+1, attempts+1)
//!  Queued ─────────────────────────────────────────▶ Leased
//!    ▲  ◀── transient failure: retry at not_before ──┤
//!    │  ◀── backend unreachable / shutdown (attempt given back)
//!    │  ◀── backend full (429 / 503): not before a time (attempt given back)
//!    │  ◀── restart or rescue (attempt kept)          │
//!    │                                                ├── success ──▶ Succeeded
//!    │                                                └── permanent failure or attempts
//!    │                                                    exhausted ──▶ Failed
//!    └── reuse: an identical request's stored answer (no call, no attempt) ──▶ Succeeded
//! ```
//! Each arrow is one [`Transition`]; [`RequestRecord::apply`] is the machine: it refuses every
//! edge the drawing does not have, and every edge from `Leased` under another lease number (an
//! answer that arrives after its lease was rescued is dropped). The store applies transitions
//! as compare-and-swaps and accepts nothing else; `supervisor/transitions.rs` is the one place
//! that asks for them.

use serde::{Deserialize, Serialize};

/// Where one line is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestState {
    /// Waiting to be sent (possibly not before `not_before_ms`).
    Queued,
    /// Handed to the worker under lease number `lease`.
    Leased,
    /// The backend answered 2xx; the answer is stored.
    Succeeded,
    /// Permanently failed; the backend's answer or our error is stored.
    Failed,
}

impl RequestState {
    /// Done lines are never sent again.
    pub fn is_done(&self) -> bool {
        matches!(self, RequestState::Succeeded | RequestState::Failed)
    }
}

/// Token usage of one answer, or summed over a batch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Usage {
    /// Prompt tokens (including cached ones).
    pub input_tokens: u64,
    /// Prompt tokens served from the backend's prefix cache, when the backend says.
    pub cached_tokens: Option<u64>,
    /// Generated tokens.
    pub output_tokens: u64,
}

impl Usage {
    /// Adds another usage in. Cached tokens stay unknown only while every part is unknown.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cached_tokens = match (self.cached_tokens, other.cached_tokens) {
            (None, None) => None,
            (a, b) => Some(a.unwrap_or(0) + b.unwrap_or(0)),
        };
    }
}

/// What is kept of a finished line: enough to write its output or error line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultRecord {
    /// HTTP status of the backend's answer, or `None` when there was no answer.
    pub status_code: Option<u16>,
    /// The answer's body as JSON text (OpenAI-shaped), when there was an answer.
    pub body: Option<String>,
    /// Our error code (`request_timeout`, …) when there was no answer.
    pub error_code: Option<String>,
    /// Our error message, with the attempt count.
    pub error_message: Option<String>,
    /// Token usage, when the answer had it.
    pub usage: Option<Usage>,
}

/// Everything stored about one line except its body (stored once, separately).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The caller's id for the line.
    pub custom_id: String,
    /// See the module doc.
    pub state: RequestState,
    /// Tries counted against `--max-attempts`; a lease counts one before the call is sent, so a
    /// request that crashes the process still uses up its attempts.
    pub attempts: u32,
    /// Fencing token: incremented on every lease, never reset.
    pub lease: u32,
    /// A queued retry is not sent before this time (unix ms); 0 = at once.
    pub not_before_ms: u64,
    /// The last transient error, for the final message and for operators.
    pub last_error: Option<String>,
    /// Set once the line is done.
    pub result: Option<ResultRecord>,
}

impl RequestRecord {
    /// A freshly queued line.
    pub fn queued(custom_id: String) -> Self {
        RequestRecord {
            custom_id,
            state: RequestState::Queued,
            attempts: 0,
            lease: 0,
            not_before_ms: 0,
            last_error: None,
            result: None,
        }
    }
}

/// One edge of the request state machine, with what it writes.
#[derive(Clone, Debug, PartialEq)]
pub enum Transition {
    /// `Queued → Leased`: a new lease number, one more attempt.
    Lease,
    /// `Leased → Succeeded` (`succeeded`) or `Leased → Failed`: the call's result is kept.
    Settle {
        /// The lease it settles.
        lease: u32,
        /// Whether the line succeeded.
        succeeded: bool,
        /// The result.
        result: ResultRecord,
    },
    /// `Leased → Queued` after a transient failure: not before `due_ms`, the attempt counted.
    Retry {
        /// The lease it ends.
        lease: u32,
        /// Unix ms before which it is not sent again.
        due_ms: u64,
        /// The failure, for operators and the final message.
        error: String,
    },
    /// `Leased → Queued` with the attempt given back (the backend was unreachable, or a
    /// graceful shutdown ended the call).
    GiveBack {
        /// The lease it ends.
        lease: u32,
        /// Why, when there is something to say.
        error: Option<String>,
    },
    /// `Leased → Queued` not before `due_ms`, with the attempt given back (the backend answered
    /// that it is full: 429 / 503).
    Defer {
        /// The lease it ends.
        lease: u32,
        /// Unix ms before which it is not sent again.
        due_ms: u64,
        /// The answer, for operators.
        error: String,
    },
    /// `Leased → Queued` with the attempt kept (a lease past its deadline, or one held by a
    /// process that died).
    Rescue {
        /// The lease it ends.
        lease: u32,
        /// Why, when there is something to say (after a restart the last error is kept).
        error: Option<String>,
    },
    /// `Leased → Failed` without an answer (the stored body is unusable, or the line was in
    /// flight in every process that ran it).
    Fail {
        /// The lease it ends.
        lease: u32,
        /// Our error.
        result: ResultRecord,
    },
    /// `Queued → Succeeded` without a call: the answer of an identical request, already
    /// answered successfully (a batch that reuses answers).
    Reuse {
        /// The answer, as it was stored.
        result: ResultRecord,
    },
}

/// A transition the machine does not allow from where the record is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    /// The edge asked for.
    pub edge: &'static str,
    /// Where the record is.
    pub state: RequestState,
    /// Its lease number.
    pub lease: u32,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} refused: the record is {:?} under lease {}",
            self.edge, self.state, self.lease
        )
    }
}

impl Transition {
    /// Its name (for messages and tests).
    pub fn name(&self) -> &'static str {
        match self {
            Transition::Lease => "lease",
            Transition::Settle { .. } => "settle",
            Transition::Retry { .. } => "retry",
            Transition::GiveBack { .. } => "give_back",
            Transition::Defer { .. } => "defer",
            Transition::Rescue { .. } => "rescue",
            Transition::Fail { .. } => "fail",
            Transition::Reuse { .. } => "reuse",
        }
    }

    /// The result it writes, for the edges that end a line.
    pub fn result(&self) -> Option<&ResultRecord> {
        match self {
            Transition::Settle { result, .. }
            | Transition::Fail { result, .. }
            | Transition::Reuse { result } => Some(result),
            _ => None,
        }
    }

    /// Where it starts, and under which lease (`None`: a queued record has no live lease).
    pub fn from(&self) -> (RequestState, Option<u32>) {
        match self {
            Transition::Lease | Transition::Reuse { .. } => (RequestState::Queued, None),
            Transition::Settle { lease, .. }
            | Transition::Retry { lease, .. }
            | Transition::GiveBack { lease, .. }
            | Transition::Defer { lease, .. }
            | Transition::Rescue { lease, .. }
            | Transition::Fail { lease, .. } => (RequestState::Leased, Some(*lease)),
        }
    }

    /// Where it ends.
    pub fn to(&self) -> RequestState {
        match self {
            Transition::Lease => RequestState::Leased,
            Transition::Settle {
                succeeded: true, ..
            }
            | Transition::Reuse { .. } => RequestState::Succeeded,
            Transition::Settle { .. } | Transition::Fail { .. } => RequestState::Failed,
            Transition::Retry { .. }
            | Transition::GiveBack { .. }
            | Transition::Defer { .. }
            | Transition::Rescue { .. } => RequestState::Queued,
        }
    }
}

impl RequestRecord {
    /// Takes the edge `t` if the record is where it starts (under its lease); otherwise
    /// changes nothing and says where the record is.
    pub fn apply(&mut self, t: &Transition) -> Result<(), Refused> {
        let (state, lease) = t.from();
        if self.state != state || lease.is_some_and(|l| l != self.lease) {
            return Err(Refused {
                edge: t.name(),
                state: self.state,
                lease: self.lease,
            });
        }
        self.state = t.to();
        match t {
            Transition::Lease => {
                self.lease = self.lease.wrapping_add(1);
                self.attempts += 1;
                self.not_before_ms = 0;
            }
            Transition::Settle { result, .. }
            | Transition::Fail { result, .. }
            | Transition::Reuse { result } => {
                self.result = Some(result.clone());
            }
            Transition::Retry { due_ms, error, .. } => {
                self.not_before_ms = *due_ms;
                self.last_error = Some(error.clone());
            }
            Transition::GiveBack { error, .. } => {
                self.attempts = self.attempts.saturating_sub(1);
                self.not_before_ms = 0;
                if let Some(e) = error {
                    self.last_error = Some(e.clone());
                }
            }
            Transition::Rescue { error, .. } => {
                if let Some(e) = error {
                    self.last_error = Some(e.clone());
                }
            }
            Transition::Defer { due_ms, error, .. } => {
                self.attempts = self.attempts.saturating_sub(1);
                self.not_before_ms = *due_ms;
                self.last_error = Some(error.clone());
            }
        }
        Ok(())
    }
}

impl ResultRecord {
    /// The backend's answer as it came: its HTTP status, body and token counts.
    pub fn answer(status: u16, body: String, usage: Option<Usage>) -> ResultRecord {
        ResultRecord {
            status_code: Some(status),
            body: Some(body),
            error_code: None,
            error_message: None,
            usage,
        }
    }

    /// The result of a line that ended without an answer: our error code and message.
    pub fn error(code: &str, message: impl Into<String>) -> ResultRecord {
        ResultRecord {
            status_code: None,
            body: None,
            error_code: Some(code.to_string()),
            error_message: Some(message.into()),
            usage: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [RequestState; 4] = [
        RequestState::Queued,
        RequestState::Leased,
        RequestState::Succeeded,
        RequestState::Failed,
    ];

    /// Every edge, under lease `lease`.
    fn edges(lease: u32) -> Vec<Transition> {
        vec![
            Transition::Lease,
            Transition::Settle {
                lease,
                succeeded: true,
                result: ResultRecord::error("x", "y"),
            },
            Transition::Settle {
                lease,
                succeeded: false,
                result: ResultRecord::error("x", "y"),
            },
            Transition::Retry {
                lease,
                due_ms: 99,
                error: "e".into(),
            },
            Transition::GiveBack { lease, error: None },
            Transition::Defer {
                lease,
                due_ms: 7,
                error: "429".into(),
            },
            Transition::Rescue {
                lease,
                error: Some("r".into()),
            },
            Transition::Fail {
                lease,
                result: ResultRecord::error("internal_error", "z"),
            },
            Transition::Reuse {
                result: ResultRecord::error("x", "y"),
            },
        ]
    }

    /// The drawing in the module doc, as (from, edge, to).
    const DRAWN: [(RequestState, &str, RequestState); 9] = [
        (RequestState::Queued, "lease", RequestState::Leased),
        (RequestState::Leased, "settle", RequestState::Succeeded),
        (RequestState::Leased, "settle", RequestState::Failed),
        (RequestState::Leased, "retry", RequestState::Queued),
        (RequestState::Leased, "give_back", RequestState::Queued),
        (RequestState::Leased, "defer", RequestState::Queued),
        (RequestState::Leased, "rescue", RequestState::Queued),
        (RequestState::Leased, "fail", RequestState::Failed),
        (RequestState::Queued, "reuse", RequestState::Succeeded),
    ];

    #[test]
    fn every_drawn_edge_is_taken_and_every_other_one_refused() {
        let mut taken = Vec::new();
        for state in STATES {
            for lease_matches in [true, false] {
                for t in edges(if lease_matches { 7 } else { 8 }) {
                    let mut rec = RequestRecord::queued("c".into());
                    rec.state = state;
                    rec.lease = 7;
                    rec.attempts = 3;
                    let before = rec.clone();
                    let drawn = DRAWN
                        .iter()
                        .any(|(f, e, to)| *f == state && *e == t.name() && *to == t.to());
                    // Lease and reuse start from Queued, where no lease is checked.
                    let allowed = drawn
                        && (lease_matches
                            || matches!(t, Transition::Lease | Transition::Reuse { .. }));
                    match rec.apply(&t) {
                        Ok(()) => {
                            assert!(allowed, "{state:?} --{}--> allowed", t.name());
                            assert_eq!(rec.state, t.to());
                            taken.push((state, t.name(), t.to()));
                        }
                        Err(refused) => {
                            assert!(!allowed, "{state:?} --{}--> refused", t.name());
                            assert_eq!(rec, before, "a refused edge changes nothing");
                            assert_eq!(refused.state, state);
                        }
                    }
                }
            }
        }
        for edge in DRAWN {
            assert!(taken.contains(&edge), "{edge:?} never taken");
        }
    }

    #[test]
    fn each_edge_writes_what_it_says() {
        let mut rec = RequestRecord::queued("c".into());
        rec.apply(&Transition::Lease).expect("lease");
        assert_eq!((rec.lease, rec.attempts), (1, 1));
        rec.apply(&Transition::Retry {
            lease: 1,
            due_ms: 5,
            error: "HTTP 503".into(),
        })
        .expect("retry");
        assert_eq!((rec.attempts, rec.not_before_ms), (1, 5), "attempt kept");
        rec.apply(&Transition::Lease).expect("lease again");
        assert_eq!((rec.lease, rec.attempts, rec.not_before_ms), (2, 2, 0));
        rec.apply(&Transition::GiveBack {
            lease: 2,
            error: Some("unreachable".into()),
        })
        .expect("give back");
        assert_eq!(rec.attempts, 1, "attempt given back");
        rec.apply(&Transition::Lease).expect("lease");
        rec.apply(&Transition::Rescue {
            lease: 3,
            error: Some("rescued".into()),
        })
        .expect("rescue");
        assert_eq!(rec.attempts, 2, "attempt kept");
        assert_eq!(rec.last_error.as_deref(), Some("rescued"));
        rec.apply(&Transition::Lease).expect("lease");
        let result = ResultRecord::error("internal_error", "unusable");
        rec.apply(&Transition::Fail {
            lease: 4,
            result: result.clone(),
        })
        .expect("fail");
        assert_eq!(rec.state, RequestState::Failed);
        assert_eq!(rec.result, Some(result));
    }
}

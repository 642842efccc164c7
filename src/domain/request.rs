//! The request record and its state machine.
//!
//! ```text
//!            lease (supervisor, lease+1, attempts+1)
//!  Queued ─────────────────────────────────────────▶ Leased
//!    ▲  ◀── transient failure: retry at not_before ──┤
//!    │  ◀── backend unreachable / shutdown (attempt given back)
//!    │  ◀── restart or rescue (attempt kept)          │
//!    │                                                ├── success ──▶ Succeeded
//!    │                                                └── permanent failure or attempts
//!    │                                                    exhausted ──▶ Failed
//! ```
//! Only the supervisor changes a request, and every change from `Leased` is a compare-and-swap
//! on (`Leased`, `lease`): an answer that arrives after its lease was rescued is dropped.

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

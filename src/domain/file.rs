//! The record of a stored file (an upload, or a batch's output or error file).

use crate::domain::FileId;
use serde::{Deserialize, Serialize};

/// A stored file's metadata (the bytes are on disk at [`Store::file_path`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileRecord {
    /// Its id.
    pub id: FileId,
    /// Size in bytes.
    pub bytes: u64,
    /// Unix seconds.
    pub created_at: i64,
    /// The uploaded name, or `batch_…_output.jsonl` for ours.
    pub filename: String,
    /// `batch`, `batch_output`, …
    pub purpose: String,
    /// Unix seconds, or `None`.
    pub expires_at: Option<i64>,
}

impl FileRecord {
    /// Whether it has expired at `now` (unix seconds): gone for clients, deleted by the sweep.
    pub fn is_expired(&self, now: i64) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }
}

/// One event to hand to one receiver (a batch webhook, or the `--on-finish-cmd` program),
/// written with the batch's terminal transition and removed once delivered or given up.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Delivery {
    /// The event's id (`evt_…`): the same for every receiver and every attempt
    /// (`webhook-id`, on which receivers deduplicate).
    pub event_id: String,
    /// `batch.completed`, `batch.failed`, `batch.cancelled` or `batch.expired`.
    pub kind: String,
    /// The batch (`batch_…`).
    pub batch: String,
    /// The event body, exactly as it is signed and sent.
    pub body: String,
    /// Where to: a URL, or [`Delivery::COMMAND`].
    pub to: String,
    /// Unix seconds the event was made (deliveries stop `--webhook-retry-for` after it).
    pub created_at: i64,
    /// Attempts so far.
    pub attempts: u32,
    /// Unix ms before which it is not tried again.
    pub next_at_ms: u64,
    /// The last failure.
    pub last_error: Option<String>,
}

impl Delivery {
    /// The receiver that is the `--on-finish-cmd` program.
    pub const COMMAND: &'static str = "on-finish-cmd";
}

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

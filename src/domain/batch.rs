//! The batch record and its state machine.
//!
//! ```text
//! validating ──valid──▶ in_progress ──all lines done──▶ finalizing ──files written──▶ completed
//! validating ──invalid──▶ failed
//! in_progress ──window passed (--expire)──▶ expired
//! validating | in_progress ──cancel──▶ cancelling ──in-flight lines finished──▶ cancelled
//! ```
//! Owners: the intake moves `validating` on; the API moves to `cancelling`; the supervisor moves
//! `in_progress` to `finalizing`; the finalizer writes the terminal states. Every move is a
//! compare-and-swap on the status the owner expects (`Store::update_batch`).

use super::ids::{BatchId, FileId};
use super::request::Usage;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where a batch is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BatchStatus {
    /// The input file is being checked and expanded into queued requests.
    Validating,
    /// The input file was invalid; `errors` says why. Terminal.
    Failed,
    /// Requests are being run.
    InProgress,
    /// Every line is done; the output and error files are being written.
    Finalizing,
    /// Output and error files are published. Terminal.
    Completed,
    /// The completion window passed first. Terminal.
    Expired,
    /// Cancel was asked; in-flight lines are finishing.
    Cancelling,
    /// Cancelled, with the partial output published. Terminal.
    Cancelled,
}

impl BatchStatus {
    /// Every status, in the order of the OpenAI documentation.
    pub const ALL: [BatchStatus; 8] = [
        BatchStatus::Validating,
        BatchStatus::Failed,
        BatchStatus::InProgress,
        BatchStatus::Finalizing,
        BatchStatus::Completed,
        BatchStatus::Expired,
        BatchStatus::Cancelling,
        BatchStatus::Cancelled,
    ];

    /// The name in the OpenAI API.
    pub fn as_str(&self) -> &'static str {
        match self {
            BatchStatus::Validating => "validating",
            BatchStatus::Failed => "failed",
            BatchStatus::InProgress => "in_progress",
            BatchStatus::Finalizing => "finalizing",
            BatchStatus::Completed => "completed",
            BatchStatus::Expired => "expired",
            BatchStatus::Cancelling => "cancelling",
            BatchStatus::Cancelled => "cancelled",
        }
    }
    /// No transition leaves a terminal state.
    pub fn is_terminal(&self) -> bool {
        matches!(
            self,
            BatchStatus::Failed
                | BatchStatus::Completed
                | BatchStatus::Expired
                | BatchStatus::Cancelled
        )
    }
}

/// The endpoints this server runs. Others are refused at batch creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Endpoint {
    /// `/v1/chat/completions`
    ChatCompletions,
    /// `/v1/embeddings`
    Embeddings,
    /// `/v1/completions`
    Completions,
    /// `/v1/responses`: each line is translated into a chat call at validation, and each answer
    /// back into a Response object (`wire::responses`).
    Responses,
}

/// The batch metadata key that asks for earlier answers to be reused (`"true"` / `"false"`).
pub const META_REUSE: &str = "reuse";

impl Endpoint {
    /// Parses the `endpoint` parameter / the `url` of an input line.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "/v1/chat/completions" => Some(Endpoint::ChatCompletions),
            "/v1/embeddings" => Some(Endpoint::Embeddings),
            "/v1/completions" => Some(Endpoint::Completions),
            "/v1/responses" => Some(Endpoint::Responses),
            _ => None,
        }
    }
    /// The path, as OpenAI writes it.
    pub fn as_str(&self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "/v1/chat/completions",
            Endpoint::Embeddings => "/v1/embeddings",
            Endpoint::Completions => "/v1/completions",
            Endpoint::Responses => "/v1/responses",
        }
    }

    /// The API a line of this endpoint is sent to a backend as: a Responses line as a chat
    /// completion (translated at validation); the others as themselves.
    pub fn called_as(self) -> Endpoint {
        match self {
            Endpoint::Responses => Endpoint::ChatCompletions,
            e => e,
        }
    }
}

/// One validation error, with the 1-based input line it concerns.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LineError {
    /// Machine-readable code (`invalid_json`, `duplicate_custom_id`, …).
    pub code: String,
    /// What is wrong, for a person.
    pub message: String,
    /// The offending parameter, if one.
    pub param: Option<String>,
    /// The 1-based line, or `None` for an error about the whole file.
    pub line: Option<u32>,
}

/// `request_counts` of the OpenAI batch object.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestCounts {
    /// Lines in the batch.
    pub total: u64,
    /// Lines whose answer is durably stored as a success.
    pub completed: u64,
    /// Lines durably stored as failed.
    pub failed: u64,
}

/// Everything stored about one batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BatchRecord {
    /// Its id.
    pub id: BatchId,
    /// What every line calls.
    pub endpoint: Endpoint,
    /// The uploaded JSONL file.
    pub input_file_id: FileId,
    /// As given (`24h`).
    pub completion_window: String,
    /// Where it is (see the module doc).
    pub status: BatchStatus,
    /// Validation errors (empty unless `failed`).
    pub errors: Vec<LineError>,
    /// Published output file, or `None` when nothing succeeded.
    pub output_file_id: Option<FileId>,
    /// Published error file, or `None` when nothing failed.
    pub error_file_id: Option<FileId>,
    /// Unix seconds.
    pub created_at: i64,
    /// Unix seconds, only with `--expire`.
    pub expires_at: Option<i64>,
    /// Unix seconds of each transition, when it happened.
    pub in_progress_at: Option<i64>,
    #[allow(missing_docs)]
    pub finalizing_at: Option<i64>,
    #[allow(missing_docs)]
    pub completed_at: Option<i64>,
    #[allow(missing_docs)]
    pub failed_at: Option<i64>,
    #[allow(missing_docs)]
    pub expired_at: Option<i64>,
    #[allow(missing_docs)]
    pub cancelling_at: Option<i64>,
    #[allow(missing_docs)]
    pub cancelled_at: Option<i64>,
    /// Counts as of the last time the record was written; live counts come from the supervisor.
    pub request_counts: RequestCounts,
    /// As given.
    pub metadata: Option<BTreeMap<String, String>>,
    /// The model that runs the batch (after `--model` / `--model-map`).
    pub model: Option<String>,
    /// Token usage summed over the lines (written at finalization; live from the supervisor).
    pub usage: Usage,
}

impl BatchRecord {
    /// A new batch in `validating`, as `POST /v1/batches` creates it.
    pub fn new(
        endpoint: Endpoint,
        input_file_id: FileId,
        created_at: i64,
        expires_at: Option<i64>,
        metadata: Option<BTreeMap<String, String>>,
    ) -> BatchRecord {
        BatchRecord {
            id: BatchId::new(),
            endpoint,
            input_file_id,
            completion_window: "24h".into(),
            status: BatchStatus::Validating,
            errors: Vec::new(),
            output_file_id: None,
            error_file_id: None,
            created_at,
            expires_at,
            in_progress_at: None,
            finalizing_at: None,
            completed_at: None,
            failed_at: None,
            expired_at: None,
            cancelling_at: None,
            cancelled_at: None,
            request_counts: RequestCounts::default(),
            metadata,
            model: None,
            usage: Usage::default(),
        }
    }
}

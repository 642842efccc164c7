//! The finalizer: writes a batch's output and error files in input order and moves the batch
//! to its terminal state. It owns `finalizing → completed`, `cancelling → cancelled` and
//! `in_progress → expired`. The other file made from a batch's lines, a retry batch's input
//! ([`write_retry_file`]), is written here too, the same way.
//!
//! Idempotent: file ids are derived from the batch id, files are written to a scratch name,
//! fsynced and renamed into place, and the terminal transition is a compare-and-swap on the
//! status it expects, so a finalization interrupted by a crash is simply run again.

use super::Command;
use crate::domain::FileRecord;
use crate::domain::{BatchId, BatchStatus, RequestState, ResultRecord, Usage, unix_now};
use crate::store::{Store, StoreError, TransitionError};
use crate::webhook::Receivers;
use crate::wire::output_line;
use std::time::Duration;
use tokio::time::Instant;

/// Which terminal state to reach.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// From `finalizing`.
    Completed,
    /// From `cancelling`; unrun lines get `batch_cancelled`.
    Cancelled,
    /// From `in_progress`; unrun lines get `batch_expired`.
    Expired,
}

/// Writes the files and the terminal state. Returns `Ok(false)` when the batch was not in
/// the expected state (someone else finished it).
pub fn finalize(
    store: &Store,
    batch_id: BatchId,
    target: Target,
    retention: Option<Duration>,
    receivers: &Receivers,
) -> Result<bool, StoreError> {
    let expect = match target {
        Target::Completed => BatchStatus::Finalizing,
        Target::Cancelled => BatchStatus::Cancelling,
        Target::Expired => BatchStatus::InProgress,
    };
    let Some(batch) = store.get_batch(batch_id)? else {
        return Ok(false);
    };
    if batch.status != expect {
        return Ok(false);
    }
    let (unrun_code, unrun_message) = match target {
        Target::Completed => ("internal_error", "the request was never run"),
        Target::Cancelled => (
            "batch_cancelled",
            "the batch was cancelled before this request ran",
        ),
        Target::Expired => ("batch_expired", "the batch expired before this request ran"),
    };
    let out_id = batch_id.output_file();
    let err_id = batch_id.error_file();
    let mut out = store.atomic_file(out_id);
    let mut errs = store.atomic_file(err_id);
    let (mut total, mut completed, mut failed) = (0u64, 0u64, 0u64);
    let mut usage = Usage::default();
    for item in store.batch_requests(batch_id) {
        let (key, rec) = item?;
        total += 1;
        match (rec.state, &rec.result) {
            (RequestState::Succeeded, Some(result)) => {
                completed += 1;
                if let Some(u) = &result.usage {
                    usage.add(u);
                }
                out.write_line(&output_line(key, &rec.custom_id, result))?;
            }
            (RequestState::Failed, Some(result)) => {
                failed += 1;
                if let Some(u) = &result.usage {
                    usage.add(u);
                }
                errs.write_line(&output_line(key, &rec.custom_id, result))?;
            }
            _ => {
                let result = ResultRecord::error(unrun_code, unrun_message);
                errs.write_line(&output_line(key, &rec.custom_id, &result))?;
            }
        }
    }
    let now = unix_now();
    // The batch's `output_expires_after`, else `--file-retention`, from the files' creation.
    let expires_at = store
        .output_expiry(batch_id)?
        .or(retention.map(|d| d.as_secs()))
        .map(|secs| now.saturating_add(i64::try_from(secs).unwrap_or(i64::MAX)));
    let mut published = [None, None];
    for (slot, (sink, id, kind)) in [(out, out_id, "output"), (errs, err_id, "error")]
        .into_iter()
        .enumerate()
    {
        let (lines, bytes) = (sink.lines(), sink.bytes());
        if sink.publish()? {
            store.put_file(&FileRecord {
                id,
                bytes,
                created_at: now,
                filename: format!("{batch_id}_{kind}.jsonl"),
                purpose: "batch_output".into(),
                expires_at,
            })?;
            published[slot] = Some(id);
            tracing::debug!(batch = %batch_id, kind, lines, "file published");
        }
    }
    store.flush()?;
    // The terminal state and its webhook events in one transaction.
    let result = store.update_batch_notifying(
        batch_id,
        &[expect],
        |b| {
            b.status = match target {
                Target::Completed => BatchStatus::Completed,
                Target::Cancelled => BatchStatus::Cancelled,
                Target::Expired => BatchStatus::Expired,
            };
            match target {
                Target::Completed => b.completed_at = Some(now),
                Target::Cancelled => b.cancelled_at = Some(now),
                Target::Expired => b.expired_at = Some(now),
            }
            b.output_file_id = published[0];
            b.error_file_id = published[1];
            b.request_counts.total = b.request_counts.total.max(total);
            b.request_counts.completed = completed;
            b.request_counts.failed = failed;
            b.usage = usage;
        },
        |b| receivers.outbox(b),
    );
    store.flush()?;
    match result {
        Ok(b) => {
            tracing::info!(batch = %batch_id, status = b.status.as_str(), completed, failed, "batch finished");
            Ok(true)
        }
        Err(TransitionError::BatchIs(_)) | Err(TransitionError::NotFound) => Ok(false),
        Err(TransitionError::Refused(r)) => {
            Err(StoreError::Io(std::io::Error::other(r.to_string())))
        }
        Err(TransitionError::Store(e)) => Err(e),
    }
}

/// Writes the original lines (custom_id, method, url, body with its shared contents restored)
/// of every request of `batch` that did not succeed, in input order, as the file `file_id`
/// (atomically, as every published file). Returns its size, or `None` (and no file) when every
/// line succeeded. For `POST /batches/{id}/retry`.
pub fn write_retry_file(
    store: &Store,
    batch: BatchId,
    endpoint: crate::domain::Endpoint,
    file_id: crate::domain::FileId,
) -> Result<Option<u64>, StoreError> {
    let mut out = store.atomic_file(file_id);
    for item in store.batch_requests(batch) {
        let (key, rec) = item?;
        if rec.state == RequestState::Succeeded {
            continue;
        }
        let Some(stored) = store.get_body(key)? else {
            continue;
        };
        let body =
            crate::intake::materialize(store, &stored, None).map_err(|e| StoreError::Codec {
                what: "body",
                detail: e,
            })?;
        let line = serde_json::json!({
            "custom_id": rec.custom_id,
            "method": "POST",
            "url": endpoint.as_str(),
            "body": body,
        })
        .to_string();
        out.write_line(&line)?;
    }
    let bytes = out.bytes();
    Ok(out.publish()?.then_some(bytes))
}

impl super::Supervisor {
    pub(super) fn start_finalizers(&mut self) {
        if self.store.failure().is_some() {
            return;
        }
        for (id, a) in self.batches.iter_mut() {
            if a.finalizing
                || a.in_flight > 0
                || a.finalize_after.is_some_and(|t| t > Instant::now())
            {
                continue;
            }
            let target = match a.status {
                BatchStatus::Cancelling => Target::Cancelled,
                BatchStatus::Finalizing => Target::Completed,
                BatchStatus::InProgress if a.expiring => Target::Expired,
                BatchStatus::InProgress if a.succeeded + a.failed >= a.total => {
                    let counts = crate::domain::RequestCounts {
                        total: a.total,
                        completed: a.succeeded,
                        failed: a.failed,
                    };
                    let moved = self
                        .store
                        .update_batch(*id, &[BatchStatus::InProgress], |b| {
                            b.status = BatchStatus::Finalizing;
                            b.finalizing_at = Some(unix_now());
                            b.request_counts = counts;
                        });
                    match moved {
                        Ok(_) => a.status = BatchStatus::Finalizing,
                        Err(TransitionError::BatchIs(BatchStatus::Cancelling)) => {
                            a.status = BatchStatus::Cancelling;
                            continue;
                        }
                        Err(e) => {
                            tracing::error!(batch = %id, error = %e, "cannot start finalizing");
                            continue;
                        }
                    }
                    Target::Completed
                }
                _ => continue,
            };
            a.finalizing = true;
            let store = self.store.clone();
            let tx = self.cmds_tx.clone();
            let id = *id;
            let retention = self.cfg.file_retention;
            let receivers = Receivers::of(&self.cfg);
            self.tracker.spawn(async move {
                let s = store.clone();
                let r = tokio::task::spawn_blocking(move || {
                    finalize(&s, id, target, retention, &receivers)
                })
                .await;
                let cmd = match r {
                    Ok(Ok(_)) => Command::Finalized(id),
                    Ok(Err(e)) => Command::FinalizeFailed(id, e.to_string()),
                    Err(e) => Command::FinalizeFailed(id, format!("finalizer panicked: {e}")),
                };
                // A supervisor already gone (shutdown) leaves it to the next start's recovery.
                let _ = tx.send(cmd).await;
            });
        }
    }
}

/// How long to wait before finalizing again after `failures` failed tries: 1 s, doubling, at
/// most a minute.
pub(super) fn finalize_retry_delay(failures: u32) -> Duration {
    crate::domain::outcome::doubling(Duration::from_secs(1), Duration::from_secs(60), failures)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{BatchRecord, Endpoint, FileId, RequestKey, RequestRecord};
    use crate::store::StoredBody;

    #[test]
    fn finalize_retries_back_off_to_a_minute() {
        let secs: Vec<u64> = (1..=9)
            .map(|n| super::finalize_retry_delay(n).as_secs())
            .collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 60, 60, 60]);
        assert_eq!(
            super::finalize_retry_delay(u32::MAX),
            std::time::Duration::from_secs(60)
        );
    }

    #[test]
    fn finalization_interrupted_before_its_last_step_runs_again_to_the_same_files() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let mut batch = BatchRecord::new(Endpoint::ChatCompletions, FileId::new(), 0, None, None);
        batch.status = BatchStatus::Finalizing;
        batch.request_counts.total = 3;
        store.put_batch(&batch).expect("batch");
        let body = StoredBody {
            json: "{}".into(),
            refs: vec![],
        };
        let keys: Vec<RequestKey> = (1..=3)
            .map(|line| RequestKey {
                batch: batch.id,
                line,
            })
            .collect();
        let items: Vec<_> = keys
            .iter()
            .map(|k| {
                (
                    *k,
                    RequestRecord::queued(format!("c-{}", k.line)),
                    body.clone(),
                )
            })
            .collect();
        store.put_requests(&items).expect("requests");
        for (i, k) in keys.iter().enumerate() {
            let lease = super::super::transitions::lease(&store, *k)
                .expect("lease")
                .lease;
            let result = ResultRecord::answer(
                if i < 2 { 200 } else { 400 },
                format!("{{\"n\":{i}}}"),
                None,
            );
            super::super::transitions::settle(&store, *k, lease, i < 2, result, None)
                .expect("done");
        }
        assert!(
            finalize(
                &store,
                batch.id,
                Target::Completed,
                None,
                &Receivers::default()
            )
            .expect("first run")
        );
        let first = std::fs::read(store.file_path(batch.id.output_file())).expect("output");
        // A crash after the files but before the terminal state: the batch is still finalizing.
        store
            .update_batch(batch.id, &[BatchStatus::Completed], |b| {
                b.status = BatchStatus::Finalizing
            })
            .expect("rewind");
        assert!(
            finalize(
                &store,
                batch.id,
                Target::Completed,
                None,
                &Receivers::default()
            )
            .expect("second run")
        );
        let again = std::fs::read(store.file_path(batch.id.output_file())).expect("output");
        assert_eq!(first, again, "same file, same bytes");
        let done = store.get_batch(batch.id).expect("get").expect("some");
        assert_eq!(done.status, BatchStatus::Completed);
        assert_eq!(done.output_file_id, Some(batch.id.output_file()));
        assert_eq!(done.error_file_id, Some(batch.id.error_file()));
        assert_eq!(
            (done.request_counts.completed, done.request_counts.failed),
            (2, 1)
        );
        assert_eq!(String::from_utf8(first).expect("utf8").lines().count(), 2);
        // Once completed, it is not finalized again.
        assert!(
            !finalize(
                &store,
                batch.id,
                Target::Completed,
                None,
                &Receivers::default()
            )
            .expect("third run")
        );
    }
}

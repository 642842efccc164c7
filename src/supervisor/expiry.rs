//! Files that expired (`expires_after` on upload, `output_expires_after` on a batch,
//! `--file-retention`) are deleted, record and bytes, by a sweep that runs at start and every
//! `--expiry-sweep-interval`: the expiry time is in each file's record, so a restart neither
//! forgets nor postpones it. A file an unfinished batch still reads (its input) is kept until
//! the batch ends. Clients see an expired file as gone at once (404), sweep or not.

use crate::domain::FileId;
use crate::store::{Store, StoreError};
use std::collections::HashSet;

/// Deletes every file expired at `now` (unix seconds) that no unfinished batch needs; how many.
pub fn sweep_expired(store: &Store, now: i64) -> Result<usize, StoreError> {
    // A store that failed is not read (its reads can spin for ever).
    if store.failure().is_some() {
        return Ok(0);
    }
    let expired = store.expired_files(now)?;
    if expired.is_empty() {
        return Ok(0);
    }
    let needed: HashSet<FileId> = store
        .unfinished_batches()?
        .iter()
        .map(|b| b.input_file_id)
        .collect();
    let mut deleted = 0;
    for f in expired {
        if needed.contains(&f.id) {
            tracing::debug!(file = %f.id, "expired, kept while its batch runs");
            continue;
        }
        if store.delete_file(f.id)? {
            deleted += 1;
            tracing::info!(file = %f.id, filename = %f.filename, expired_at = f.expires_at, "expired file deleted");
        }
    }
    if deleted > 0 {
        store.flush()?;
    }
    Ok(deleted)
}

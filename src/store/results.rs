//! Results kept out of sled: one append-only file per batch, `results/<batch>`, holding each
//! line's [`ResultRecord`](crate::domain::ResultRecord) (bincode) back to back. The line's
//! record holds where its result is ([`ResultAt`]): offset, length and the token counts (so
//! that a restart totals usage without reading the answers).
//!
//! Why: sled 0.34 keeps what is written into its pages resident far past its cache (a 100,000-
//! line batch with 2 KB answers peaked at 226 MB with the answers in the records;
//! docs/benchmarks.md). Answers are written once and read when the batch is finalized, by a
//! reuse lookup or by a later turn of a conversation: a plain file is the right place.
//!
//! Order, which is what makes a result durable with its record: the bytes are written with
//! `pwrite` (no user-space buffer) *before* the record that points at them is written into
//! sled, so whatever record a crash leaves in sled points at bytes already in the kernel's page
//! cache. The guarantee is the store's: against a crash of the process (`docs/guarantees.md`).
//! Bytes whose record never got written (a crash between the two, a transition refused, a
//! write that failed half-way) are never pointed at; the next append may overwrite a torn tail.

use super::StoreError;
use crate::domain::{BatchId, Usage};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

/// Where a line's result is in its batch's results file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ResultAt {
    /// First byte.
    pub offset: u64,
    /// Length in bytes.
    pub len: u32,
    /// The result's token counts (copied, so that a restart needs no read of the answer).
    pub usage: Option<Usage>,
}

/// An open results file: the handle and where the next result goes.
struct Open {
    file: File,
    end: Mutex<u64>,
}

/// Handles kept open at most (a finished batch's file is opened again when read).
const KEEP_OPEN: usize = 64;

/// The results files under one state directory.
pub(super) struct Results {
    dir: PathBuf,
    open: Mutex<HashMap<BatchId, Arc<Open>>>,
}

impl Results {
    /// The results files in `dir` (created if missing).
    pub(super) fn new(dir: PathBuf) -> std::io::Result<Results> {
        std::fs::create_dir_all(&dir)?;
        Ok(Results {
            dir,
            open: Mutex::new(HashMap::new()),
        })
    }

    fn path(&self, batch: BatchId) -> PathBuf {
        self.dir.join(batch.0.simple().to_string())
    }

    fn handle(&self, batch: BatchId) -> Result<Arc<Open>, StoreError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(h) = open.get(&batch) {
            return Ok(h.clone());
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(self.path(batch))?;
        let end = file.metadata()?.len();
        let h = Arc::new(Open {
            file,
            end: Mutex::new(end),
        });
        if open.len() >= KEEP_OPEN {
            // Only handles nobody holds: two handles of one file would each keep their own end.
            open.retain(|_, h| Arc::strong_count(h) > 1);
        }
        open.insert(batch, h.clone());
        Ok(h)
    }

    /// Appends one encoded result; returns its offset. Only after this returns may a record
    /// point at it.
    pub(super) fn append(&self, batch: BatchId, bytes: &[u8]) -> Result<u64, StoreError> {
        let h = self.handle(batch)?;
        let mut end = h.end.lock().unwrap_or_else(|p| p.into_inner());
        let at = *end;
        // On an error nothing moves: the next append writes over what this one left.
        h.file.write_all_at(bytes, at)?;
        *end = at + bytes.len() as u64;
        Ok(at)
    }

    /// The bytes a record points at.
    pub(super) fn read(&self, batch: BatchId, at: &ResultAt) -> Result<Vec<u8>, StoreError> {
        let h = self.handle(batch)?;
        let mut buf = vec![0u8; at.len as usize];
        h.file.read_exact_at(&mut buf, at.offset).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                StoreError::Codec {
                    what: "result",
                    detail: format!(
                        "results/{} ends before byte {}",
                        batch.0.simple(),
                        at.offset + u64::from(at.len)
                    ),
                }
            } else {
                StoreError::Io(e)
            }
        })?;
        Ok(buf)
    }

    /// Deletes a batch's results file (none: nothing to do).
    pub(super) fn delete(&self, batch: BatchId) -> Result<(), StoreError> {
        self.open
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&batch);
        match std::fs::remove_file(self.path(batch)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

//! The only code that touches sled. It owns the trees, the key and value encodings and the
//! fenced transitions; it never decides anything (retries, order, states are the supervisor's).
//!
//! Trees (keys are big-endian so that key order is creation order / input order):
//!
//! | tree       | key                          | value                                  |
//! |------------|------------------------------|----------------------------------------|
//! | `files`    | file uuid (16 B)             | [`FileRecord`]                         |
//! | `batches`  | batch uuid (16 B)            | [`BatchRecord`]                        |
//! | `request_chunks` | batch uuid + chunk u32 (20 B) | the [`RequestRecord`](crate::domain::RequestRecord)s (state, attempts, lease, where the result is) of 64 lines ([`chunks`], [`requests`]) |
//! | `requests` | batch uuid + line u32 (20 B) | stores before chunks: one [`RequestRecord`](crate::domain::RequestRecord) per line, result inside (read and moved, no longer written) |
//! | `body_chunks` | batch uuid + chunk u32 (20 B) | the [`StoredBody`]s (line bodies, shared parts by hash) of 64 lines ([`chunks`]) |
//! | `group_chunks` | same as `body_chunks`     | the prefix groups of those lines, as runs |
//! | `bodies`   | same as `requests`           | stores before chunks: one [`StoredBody`] per line (read, no longer written) |
//! | `blobs`    | sha-256 (32 B)               | shared content (a system prompt), stored once |
//! | `groups`   | same as `requests`           | stores before chunks: the line's prefix group (u64, big-endian); absent in stores made before groups: group 0 |
//! | `stats`    | batch uuid (16 B)            | a finished batch's final figures (JSON)  |
//! | `conversations` | batch uuid (16 B)       | a batch's mode: its conversation [`Plan`], or none (independent lines) |
//! | `conversations` | batch ‖ group u64 ‖ conversation u32 (28 B) | the conversation's [`ConvRecord`], written with the result of its last success |
//! | `expiry`   | batch uuid (16 B)            | its `output_expires_after` seconds (u64, big-endian), when it named one |
//! | `webhooks` | delivery id u64 (8 B)        | a [`Delivery`] still to make (an event for one receiver), written with its batch's terminal transition |
//! | `answers`  | the reuse key's first 2 bytes | a bucket: (reuse key: sha-256, 32 B ‖ the line, batch ‖ line, 20 B, whose success answered it) per answer; the answer itself stays in that line's record. Stores before buckets: one 32-byte key per answer (read, no longer written) ([`answers`]) |
//! | `answers`  | `log` (3 B)                  | the offset in `answers.log` up to which the log is in the buckets (u64, big-endian) ([`answers`]) |
//!
//! File bytes live beside the database under `files/`, named by the file's uuid; each batch's
//! results under `results/`, named by the batch's uuid ([`results`]: append-only, written
//! before the record that points at them); the answers remembered since the last reuse lookup
//! in `answers.log` ([`answers`]).
//!
//! Durability: a write is durable after [`Store::flush`] / [`Store::flush_async`] returns (the
//! commit thread also flushes every 500 ms on its own). Callers decide when to flush; see
//! `docs/guarantees.md`.
//!
//! **The flush rule** (sled issue #1308: concurrent `flush_async` calls deadlock sled 0.34.7,
//! its last release): no code calls sled's `flush` / `flush_async` except the one commit
//! thread in [`commit`]. `Store::flush` and `Store::flush_async` register with it and wait;
//! it runs one flush for everyone waiting (group commit). sled's own background flusher is
//! off, so at most one flush runs at any time.

mod answers;
pub mod chunks;
mod commit;
pub mod files;
mod requests;
mod results;

use crate::conversation::{Plan, Record as ConvRecord};
use crate::domain::{
    BatchId, BatchRecord, BatchStatus, Delivery, FileId, FileRecord, Refused, RequestKey,
};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use std::path::{Path, PathBuf};

/// A line's body with its large shared strings taken out and stored once in `blobs`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StoredBody {
    /// The body as JSON text, with each referenced message content replaced by `""`.
    pub json: String,
    /// (index into `messages`, sha-256 of the content stored in `blobs`).
    pub refs: Vec<(u32, [u8; 32])>,
}

/// The prefix groups of one batch's lines, read a chunk at a time ([`Store::group_reader`]).
pub struct GroupReader<'a> {
    store: &'a Store,
    batch: BatchId,
    /// The chunk read last: its number and runs (`None`: a store from before chunks).
    chunk: Option<(u32, Option<chunks::Runs>)>,
}

impl GroupReader<'_> {
    /// The group of `line` (0 for a line stored without one, before groups existed).
    pub fn group(&mut self, line: u32) -> Result<u64, StoreError> {
        let n = line / chunks::CHUNK_LINES;
        if self.chunk.as_ref().is_none_or(|(at, _)| *at != n) {
            let runs = match self
                .store
                .group_chunks
                .get(chunks::chunk_key(self.batch, line))?
            {
                Some(v) => Some(decode("group chunk", &v)?),
                None => None,
            };
            self.chunk = Some((n, runs));
        }
        match &self.chunk {
            Some((_, Some(runs))) => Ok(chunks::group_in(runs, chunks::slot(line))),
            // A store from before chunks: one group per key, or none.
            _ => {
                let key = RequestKey {
                    batch: self.batch,
                    line,
                };
                Ok(self
                    .store
                    .groups
                    .get(key.to_bytes())?
                    .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0))
            }
        }
    }
}

/// What can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another process holds the state directory.
    #[error(
        "another ollama-batch is using {0} (sled holds a lock on it); stop it or pass a different --state"
    )]
    InUse(PathBuf),
    /// The state directory cannot be created, opened or read.
    #[error(
        "cannot use the state directory {path}: {source} (check --state and its permissions and free space)"
    )]
    Open {
        /// The path that failed.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// sled failed.
    #[error("store: {0}")]
    Sled(#[from] sled::Error),
    /// A stored value did not decode: a bug or a corrupted store.
    #[error("store: cannot decode a stored {what}: {detail}")]
    Codec {
        /// Which kind of record.
        what: &'static str,
        /// The decoder's message.
        detail: String,
    },
    /// File I/O under the state directory failed.
    #[error("store: {0}")]
    Io(#[from] std::io::Error),
}

/// Why a fenced transition did not happen.
#[derive(Debug, thiserror::Error)]
pub enum TransitionError {
    /// No such record.
    #[error("not found")]
    NotFound,
    /// The batch is not in a status the caller expected (the fence held): it is this one.
    #[error("conflict: the batch is {}", .0.as_str())]
    BatchIs(BatchStatus),
    /// The request state machine refused the edge (the record is elsewhere, or under another
    /// lease): nothing changed.
    #[error("conflict: {0}")]
    Refused(Refused),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl StoreError {
    /// Whether the disk is full (ENOSPC), however deep in the error it is.
    pub fn is_disk_full(&self) -> bool {
        match self {
            StoreError::Io(e) | StoreError::Open { source: e, .. } => is_enospc(e),
            StoreError::Sled(sled::Error::Io(e)) => is_enospc(e),
            _ => self.to_string().contains("No space left on device"),
        }
    }
}

/// Whether an I/O error is ENOSPC.
pub fn is_enospc(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::StorageFull || e.raw_os_error() == Some(28)
}

impl From<sled::Error> for TransitionError {
    fn from(e: sled::Error) -> Self {
        TransitionError::Store(StoreError::Sled(e))
    }
}

/// The key of a conversation's record: batch ‖ group ‖ number, big-endian.
fn conv_key(batch: BatchId, (group, n): (u64, u32)) -> [u8; 28] {
    let mut k = [0u8; 28];
    k[..16].copy_from_slice(batch.0.as_bytes());
    k[16..24].copy_from_slice(&group.to_be_bytes());
    k[24..].copy_from_slice(&n.to_be_bytes());
    k
}

/// Bytes the files directly in `dir` take (0 if it cannot be read).
fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum::<u64>()
        })
        .unwrap_or(0)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail; an error here would be a bug in a type.
    bincode::serde::encode_to_vec(value, bincode::config::standard())
        .expect("records encode infallibly")
}

fn decode<T: DeserializeOwned>(what: &'static str, bytes: &[u8]) -> Result<T, StoreError> {
    bincode::serde::decode_from_slice(bytes, bincode::config::standard())
        .map(|(v, _)| v)
        .map_err(|e| StoreError::Codec {
            what,
            detail: e.to_string(),
        })
}

/// The durable queue and file catalogue.
pub struct Store {
    db: sled::Db,
    files: sled::Tree,
    batches: sled::Tree,
    requests: sled::Tree,
    request_chunks: sled::Tree,
    bodies: sled::Tree,
    body_chunks: sled::Tree,
    blobs: sled::Tree,
    stats: sled::Tree,
    groups: sled::Tree,
    group_chunks: sled::Tree,
    conversations: sled::Tree,
    answers: sled::Tree,
    answer_log: answers::Log,
    expiry: sled::Tree,
    webhooks: sled::Tree,
    results: results::Results,
    dir: PathBuf,
    committer: commit::Committer,
}

impl Store {
    /// Opens (or creates) the store in `dir`. `cache_bytes` bounds sled's page cache.
    pub fn open(dir: &Path, cache_bytes: u64) -> Result<Store, StoreError> {
        let at = |path: PathBuf| move |source: std::io::Error| StoreError::Open { path, source };
        std::fs::create_dir_all(dir.join("files")).map_err(at(dir.join("files")))?;
        let db = sled::Config::new()
            .path(dir.join("db"))
            .cache_capacity(cache_bytes)
            .flush_every_ms(None)
            .open()
            .map_err(|e| {
                let text = e.to_string();
                if text.contains("WouldBlock") || text.contains("could not acquire lock") {
                    StoreError::InUse(dir.to_path_buf())
                } else if let sled::Error::Io(io) = e {
                    StoreError::Open {
                        path: dir.join("db"),
                        source: io,
                    }
                } else {
                    StoreError::Sled(e)
                }
            })?;
        // Scratch files of uploads or finalizations that a crash interrupted: nothing refers
        // to them (records are written only after the rename), and nothing writes while the
        // store is being opened.
        for entry in std::fs::read_dir(dir.join("files"))
            .map_err(at(dir.join("files")))?
            .flatten()
        {
            if entry.path().extension().is_some_and(|e| e == "part") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let answers = db.open_tree("answers")?;
        let answer_log = answers::Log::open(&dir.join("answers.log"), &db, &answers)?;
        Ok(Store {
            files: db.open_tree("files")?,
            batches: db.open_tree("batches")?,
            requests: db.open_tree("requests")?,
            request_chunks: db.open_tree("request_chunks")?,
            bodies: db.open_tree("bodies")?,
            body_chunks: db.open_tree("body_chunks")?,
            blobs: db.open_tree("blobs")?,
            stats: db.open_tree("stats")?,
            groups: db.open_tree("groups")?,
            group_chunks: db.open_tree("group_chunks")?,
            conversations: db.open_tree("conversations")?,
            answers,
            answer_log,
            expiry: db.open_tree("expiry")?,
            webhooks: db.open_tree("webhooks")?,
            results: results::Results::new(dir.join("results")).map_err(at(dir.join("results")))?,
            dir: dir.to_path_buf(),
            committer: commit::Committer::start(db.clone())?,
            db,
        })
    }

    /// The state directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Makes every write so far durable against a process crash.
    /// Blocks: never call it on the async runtime (use [`Store::flush_async`] there).
    pub fn flush(&self) -> Result<(), StoreError> {
        self.committer.flush()?;
        Ok(())
    }

    /// [`Store::flush`] without blocking the runtime.
    pub async fn flush_async(&self) -> Result<(), StoreError> {
        self.committer.flush_async().await?;
        Ok(())
    }

    /// Why the store can no longer write, once a flush has failed (disk full, I/O error). sled
    /// keeps such an error for good: the process must be restarted (after freeing space) to
    /// write again; whatever was acknowledged before is durable and resumes then.
    pub fn failure(&self) -> Option<String> {
        self.committer
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Bytes the database, the results, the stored files and the answers log take on disk.
    pub fn size_on_disk(&self) -> u64 {
        self.db.size_on_disk().unwrap_or(0)
            + dir_size(&self.dir.join("results"))
            + dir_size(&self.dir.join("files"))
            + std::fs::metadata(self.dir.join("answers.log")).map_or(0, |m| m.len())
    }

    // ---- files ----------------------------------------------------------------------------

    /// Where a file's bytes live.
    pub fn file_path(&self, id: FileId) -> PathBuf {
        self.dir.join("files").join(id.0.simple().to_string())
    }

    /// A file to be published as `id` (written at its scratch path until then).
    pub fn atomic_file(&self, id: FileId) -> files::AtomicFile {
        files::AtomicFile::new(self.file_path(id), self.scratch_path(id))
    }

    /// A scratch path in the same directory (so that a rename publishes it atomically).
    pub fn scratch_path(&self, id: FileId) -> PathBuf {
        self.dir
            .join("files")
            .join(format!("{}.part", id.0.simple()))
    }

    /// Records a file whose bytes are already at [`Store::file_path`].
    pub fn put_file(&self, rec: &FileRecord) -> Result<(), StoreError> {
        self.files.insert(rec.id.0.as_bytes(), encode(rec))?;
        Ok(())
    }

    /// A file's record.
    pub fn get_file(&self, id: FileId) -> Result<Option<FileRecord>, StoreError> {
        match self.files.get(id.0.as_bytes())? {
            Some(v) => Ok(Some(decode("file", &v)?)),
            None => Ok(None),
        }
    }

    /// Files in id (= creation) order, `desc` newest first, strictly after the cursor
    /// `after`, filtered by purpose; at most `limit`. Returns the page and whether more follow.
    pub fn list_files(
        &self,
        purpose: Option<&str>,
        after: Option<FileId>,
        limit: usize,
        desc: bool,
    ) -> Result<(Vec<FileRecord>, bool), StoreError> {
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> =
            match (after, desc) {
                (Some(a), true) => Box::new(self.files.range(..a.0.as_bytes().to_vec()).rev()),
                (Some(a), false) => {
                    let start = a.0.as_bytes().to_vec();
                    Box::new(
                        self.files
                            .range(start.clone()..)
                            .skip_while(move |r| matches!(r, Ok((k, _)) if k.as_ref() == start)),
                    )
                }
                (None, true) => Box::new(self.files.iter().rev()),
                (None, false) => Box::new(self.files.iter()),
            };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item?;
            let rec: FileRecord = decode("file", &v)?;
            if purpose.is_some_and(|p| p != rec.purpose) {
                continue;
            }
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(rec);
        }
        Ok((out, false))
    }

    /// Removes a file's record and bytes. Returns false if there was no such file.
    pub fn delete_file(&self, id: FileId) -> Result<bool, StoreError> {
        let existed = self.files.remove(id.0.as_bytes())?.is_some();
        if existed {
            match std::fs::remove_file(self.file_path(id)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(existed)
    }

    // ---- batches --------------------------------------------------------------------------

    /// Stores a new batch.
    pub fn put_batch(&self, rec: &BatchRecord) -> Result<(), StoreError> {
        self.batches.insert(rec.id.0.as_bytes(), encode(rec))?;
        Ok(())
    }

    /// A batch's record.
    pub fn get_batch(&self, id: BatchId) -> Result<Option<BatchRecord>, StoreError> {
        match self.batches.get(id.0.as_bytes())? {
            Some(v) => Ok(Some(decode("batch", &v)?)),
            None => Ok(None),
        }
    }

    /// Batches newest first, strictly older than `after`; at most `limit`, and whether more follow.
    pub fn list_batches(
        &self,
        after: Option<BatchId>,
        limit: usize,
    ) -> Result<(Vec<BatchRecord>, bool), StoreError> {
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match after {
            Some(a) => Box::new(self.batches.range(..a.0.as_bytes().to_vec()).rev()),
            None => Box::new(self.batches.iter().rev()),
        };
        let mut out = Vec::new();
        for item in iter {
            let (_, v) = item?;
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(decode("batch", &v)?);
        }
        Ok((out, false))
    }

    /// Every batch not in a terminal state, oldest first (start-up recovery).
    pub fn unfinished_batches(&self) -> Result<Vec<BatchRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.batches.iter() {
            let (_, v) = item?;
            let rec: BatchRecord = decode("batch", &v)?;
            if !rec.status.is_terminal() {
                out.push(rec);
            }
        }
        Ok(out)
    }

    /// Fenced batch transition: applies `change` only if the batch's status is one of `expect`,
    /// as one compare-and-swap. Returns the new record.
    pub fn update_batch(
        &self,
        id: BatchId,
        expect: &[BatchStatus],
        mut change: impl FnMut(&mut BatchRecord),
    ) -> Result<BatchRecord, TransitionError> {
        let key = id.0.as_bytes();
        loop {
            let old = self.batches.get(key)?.ok_or(TransitionError::NotFound)?;
            let mut rec: BatchRecord = decode("batch", &old)?;
            if !expect.contains(&rec.status) {
                return Err(TransitionError::BatchIs(rec.status));
            }
            change(&mut rec);
            if self
                .batches
                .compare_and_swap(key, Some(&old), Some(encode(&rec)))?
                .is_ok()
            {
                return Ok(rec);
            }
        }
    }

    // ---- prefix groups (request records: requests.rs) ----------------------------------

    /// Writes the prefix groups of intake lines, in line order, by the chunk (before their
    /// records: a record is never without its group).
    pub fn put_groups(&self, items: &[(RequestKey, u64)]) -> Result<(), StoreError> {
        for (k, same) in chunks::by_chunk(items, |item| item.0) {
            let mut runs: chunks::Runs = match self.group_chunks.get(k)? {
                Some(v) => decode("group chunk", &v)?,
                None => Vec::new(),
            };
            for (key, group) in same {
                chunks::push_group(&mut runs, chunks::slot(key.line), *group);
            }
            self.group_chunks.insert(k, encode(&runs))?;
        }
        Ok(())
    }

    /// Reads the prefix groups of a batch's lines, a chunk at a time.
    pub fn group_reader(&self, batch: BatchId) -> GroupReader<'_> {
        GroupReader {
            store: self,
            batch,
            chunk: None,
        }
    }

    /// A batch's conversation plan: `Some(None)` when it was fixed as independent lines,
    /// `None` when it was never fixed.
    pub fn get_plan(&self, batch: BatchId) -> Result<Option<Option<Plan>>, StoreError> {
        match self.conversations.get(batch.0.as_bytes())? {
            Some(v) => Ok(Some(decode("conversation plan", &v)?)),
            None => Ok(None),
        }
    }

    /// Fixes a batch's mode: a conversation plan, or `None` for independent lines.
    pub fn put_plan(&self, batch: BatchId, plan: Option<Plan>) -> Result<(), StoreError> {
        self.conversations
            .insert(batch.0.as_bytes(), encode(&plan))?;
        Ok(())
    }

    /// A conversation's record (`None` before its first success).
    pub fn get_conversation(
        &self,
        batch: BatchId,
        conversation: (u64, u32),
    ) -> Result<Option<ConvRecord>, StoreError> {
        match self.conversations.get(conv_key(batch, conversation))? {
            Some(v) => Ok(Some(decode("conversation", &v)?)),
            None => Ok(None),
        }
    }

    /// A line's stored body.
    pub fn get_body(&self, key: RequestKey) -> Result<Option<StoredBody>, StoreError> {
        if let Some(chunk) = self
            .body_chunks
            .get(chunks::chunk_key(key.batch, key.line))?
        {
            return chunks::slot_in(&chunk, chunks::slot(key.line))
                .map(|b| decode("body", b))
                .transpose();
        }
        // A store from before chunks: one body per key.
        match self.bodies.get(key.to_bytes())? {
            Some(v) => Ok(Some(decode("body", &v)?)),
            None => Ok(None),
        }
    }

    // ---- stats ----------------------------------------------------------------------------

    /// Keeps a finished batch's final figures (rates, tokens, duration, GPU peak) as JSON.
    pub fn put_batch_stats(&self, id: BatchId, json: &str) -> Result<(), StoreError> {
        self.stats.insert(id.0.as_bytes(), json.as_bytes())?;
        Ok(())
    }

    /// A finished batch's final figures, if kept.
    pub fn get_batch_stats(&self, id: BatchId) -> Result<Option<String>, StoreError> {
        Ok(self
            .stats
            .get(id.0.as_bytes())?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    /// [`Store::update_batch`] and the deliveries `outbox` makes of the moved record, in one
    /// transaction: an event is never lost between a terminal transition and its delivery.
    pub fn update_batch_notifying(
        &self,
        id: BatchId,
        expect: &[BatchStatus],
        change: impl Fn(&mut BatchRecord),
        outbox: impl Fn(&BatchRecord) -> Vec<Delivery>,
    ) -> Result<BatchRecord, TransitionError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let key = id.0.as_bytes();
        let r = (&self.batches, &self.webhooks).transaction(|(batches, hooks)| {
            let old = batches
                .get(key)?
                .ok_or(Abort::Abort(TransitionError::NotFound))?;
            let mut rec: BatchRecord =
                decode("batch", &old).map_err(|e| Abort::Abort(TransitionError::Store(e)))?;
            if !expect.contains(&rec.status) {
                return Err(Abort::Abort(TransitionError::BatchIs(rec.status)));
            }
            change(&mut rec);
            batches.insert(key, encode(&rec))?;
            for d in outbox(&rec) {
                let n = hooks.generate_id()?;
                hooks.insert(&n.to_be_bytes()[..], encode(&d))?;
            }
            Ok(rec)
        });
        match r {
            Ok(rec) => Ok(rec),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }

    // ---- webhook deliveries ---------------------------------------------------------------

    /// Every delivery still to make, by id.
    pub fn deliveries(&self) -> Result<Vec<(u64, Delivery)>, StoreError> {
        let mut out = Vec::new();
        for item in self.webhooks.iter() {
            let (k, v) = item?;
            let Ok(id) = <[u8; 8]>::try_from(&k[..]) else {
                continue;
            };
            out.push((u64::from_be_bytes(id), decode("delivery", &v)?));
        }
        Ok(out)
    }

    /// Rewrites a delivery (another attempt scheduled).
    pub fn put_delivery(&self, id: u64, d: &Delivery) -> Result<(), StoreError> {
        self.webhooks.insert(id.to_be_bytes(), encode(d))?;
        Ok(())
    }

    /// Forgets a delivery (made, or given up).
    pub fn remove_delivery(&self, id: u64) -> Result<(), StoreError> {
        self.webhooks.remove(id.to_be_bytes())?;
        Ok(())
    }

    // ---- file expiry ----------------------------------------------------------------------

    /// Keeps a batch's `output_expires_after` (seconds after its output files are made).
    pub fn put_output_expiry(&self, batch: BatchId, seconds: u64) -> Result<(), StoreError> {
        self.expiry
            .insert(batch.0.as_bytes(), &seconds.to_be_bytes()[..])?;
        Ok(())
    }

    /// A batch's `output_expires_after`, when it named one.
    pub fn output_expiry(&self, batch: BatchId) -> Result<Option<u64>, StoreError> {
        Ok(self
            .expiry
            .get(batch.0.as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map(u64::from_be_bytes))
    }

    /// Files whose `expires_at` is at or before `now` (unix seconds).
    pub fn expired_files(&self, now: i64) -> Result<Vec<FileRecord>, StoreError> {
        let mut out = Vec::new();
        for item in self.files.iter() {
            let (_, v) = item?;
            let rec: FileRecord = decode("file", &v)?;
            if rec.is_expired(now) {
                out.push(rec);
            }
        }
        Ok(out)
    }

    // ---- blobs ----------------------------------------------------------------------------

    /// Stores shared content under its hash unless it is already there.
    pub fn put_blob(&self, hash: &[u8; 32], content: &[u8]) -> Result<(), StoreError> {
        if !self.blobs.contains_key(hash)? {
            self.blobs.insert(hash, content)?;
        }
        Ok(())
    }

    /// Shared content by hash.
    pub fn get_blob(&self, hash: &[u8; 32]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.blobs.get(hash)?.map(|v| v.to_vec()))
    }

    /// How many shared contents are stored (operators and tests).
    pub fn blob_count(&self) -> usize {
        self.blobs.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RequestRecord, RequestState, Transition};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path(), 8 << 20).expect("open");
        (dir, s)
    }

    fn body(n: u32) -> StoredBody {
        StoredBody {
            json: format!("{{\"n\":{n}}}"),
            refs: vec![],
        }
    }

    #[test]
    fn bodies_and_groups_are_read_back_by_the_line_across_chunks_and_calls() {
        let (_d, s) = store();
        let batch = BatchId::new();
        let other = BatchId::new();
        // Lines 1..=200 with gaps (every 7th line is blank: no record), written in calls
        // that end inside chunks; groups change every 50 lines.
        let lines: Vec<u32> = (1..=200).filter(|l| l % 7 != 0).collect();
        let group = |l: u32| u64::from(l / 50) + 10;
        for part in lines.chunks(37) {
            let keys: Vec<RequestKey> = part
                .iter()
                .map(|&line| RequestKey { batch, line })
                .collect();
            s.put_groups(&keys.iter().map(|k| (*k, group(k.line))).collect::<Vec<_>>())
                .expect("groups");
            let items: Vec<_> = keys
                .iter()
                .map(|k| {
                    (
                        *k,
                        RequestRecord::queued(format!("c{}", k.line)),
                        body(k.line),
                    )
                })
                .collect();
            s.put_requests(&items).expect("requests");
        }
        s.put_requests(&[(
            RequestKey {
                batch: other,
                line: 1,
            },
            RequestRecord::queued("x".into()),
            body(999),
        )])
        .expect("other");
        let mut groups = s.group_reader(batch);
        for &line in &lines {
            let key = RequestKey { batch, line };
            assert_eq!(
                s.get_body(key).expect("get"),
                Some(body(line)),
                "line {line}"
            );
            assert_eq!(
                groups.group(line).expect("group"),
                group(line),
                "line {line}"
            );
        }
        assert_eq!(
            s.get_body(RequestKey { batch, line: 7 }).expect("get"),
            None,
            "a blank line"
        );
        assert_eq!(
            s.get_body(RequestKey {
                batch: other,
                line: 1
            })
            .expect("get"),
            Some(body(999))
        );
        assert_eq!(s.batch_requests(batch).count(), lines.len());
        s.delete_requests(batch).expect("delete");
        assert_eq!(
            s.get_body(RequestKey { batch, line: 1 }).expect("get"),
            None
        );
        assert_eq!(s.group_reader(batch).group(1).expect("group"), 0);
        assert_eq!(
            s.get_body(RequestKey {
                batch: other,
                line: 1
            })
            .expect("get"),
            Some(body(999))
        );
    }

    #[test]
    fn a_store_from_before_chunks_is_read_by_the_key() {
        // Bodies and groups one per key, as stores before chunks wrote them.
        let (_d, s) = store();
        let key = RequestKey {
            batch: BatchId::new(),
            line: 3,
        };
        s.bodies
            .insert(key.to_bytes(), encode(&body(3)))
            .expect("body");
        s.groups
            .insert(key.to_bytes(), &42u64.to_be_bytes())
            .expect("group");
        s.requests
            .insert(key.to_bytes(), encode(&RequestRecord::queued("c".into())))
            .expect("rec");
        assert_eq!(s.get_body(key).expect("get"), Some(body(3)));
        let mut groups = s.group_reader(key.batch);
        assert_eq!(groups.group(3).expect("group"), 42);
        assert_eq!(groups.group(4).expect("group"), 0, "a line without a group");
    }

    #[test]
    fn stale_lease_cannot_complete_a_rescued_request() {
        let (_d, s) = store();
        let key = RequestKey {
            batch: BatchId::new(),
            line: 1,
        };
        let body = StoredBody {
            json: "{}".into(),
            refs: vec![],
        };
        s.put_requests(&[(key, RequestRecord::queued("a".into()), body)])
            .expect("put");
        let leased = s
            .transition_request(key, &Transition::Lease)
            .expect("lease");
        assert_eq!(leased.lease, 1);
        // Rescue: back to the queue, then leased again under lease 2.
        s.transition_request(
            key,
            &Transition::Rescue {
                lease: 1,
                error: Some("rescued".into()),
            },
        )
        .expect("rescue");
        s.transition_request(key, &Transition::Lease)
            .expect("re-lease");
        // The late answer of lease 1 is fenced off.
        let late = s.transition_request(
            key,
            &Transition::Settle {
                lease: 1,
                succeeded: true,
                result: crate::domain::ResultRecord::error("x", "late"),
            },
        );
        assert!(matches!(late, Err(TransitionError::Refused(_))), "{late:?}");
        assert_eq!(
            s.get_request(key).expect("get").expect("some").state,
            RequestState::Leased
        );
    }

    #[test]
    fn a_state_directory_that_cannot_be_used_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let file = dir.path().join("not-a-dir");
        std::fs::write(&file, b"x").expect("file");
        let e = Store::open(&file, 8 << 20)
            .err()
            .expect("must fail")
            .to_string();
        assert!(e.contains(&file.display().to_string()), "{e}");
        assert!(e.contains("--state"), "{e}");
    }

    #[test]
    fn second_opener_is_told_the_directory_is_in_use() {
        let (dir, _s) = store();
        match Store::open(dir.path(), 8 << 20) {
            Err(StoreError::InUse(_)) => {}
            Err(e) => panic!("wrong error: {e}"),
            Ok(_) => panic!("second open succeeded"),
        }
    }
}

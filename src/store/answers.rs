//! Answers by reuse key: which line's success answered a request (`supervisor/reuse.rs`).
//!
//! Two places:
//!
//! - **the log**, `answers.log` beside the database: what was remembered, appended in bulk (one
//!   write per group commit, the entries in the order they were remembered). Every success is
//!   remembered whether or not any batch will ever reuse it (a later reusing batch looks
//!   earlier batches' answers up), so this write must cost next to nothing. A plain file, like
//!   the results files, for the same reason: sled keeps what is read from or written into its
//!   pages resident far past its cache, and a merge reads the whole log.
//! - **the index**, sled's `answers` tree, which the lookups read: 65,536 buckets by the reuse
//!   key's first two bytes (one key per answer cost a 1,000,000-line run 38 MB of sled's
//!   per-page bookkeeping). The log is moved into it before a lookup, bucket by bucket, so that
//!   a bucket is rewritten once per lookup round instead of once per answer: writing a random
//!   ~800-byte bucket for every success cost a 1,000,000-line run a third of its speed and
//!   ~25 MB (docs/benchmarks.md). The log's offset up to which it is in the index is kept in
//!   the same tree ([`MERGED`]), written after the buckets.
//!
//! An entry is the reuse key (sha-256, 32 B) ‖ the request key of the line (batch ‖ line,
//! 20 B); the answer itself stays in that line's record. A later answer to the same key
//! replaces the earlier one. Stores from before buckets kept one 32-byte key per answer in
//! `answers`: still read, no longer written.
//!
//! Crashes: the log is written with `pwrite` before the flush of the commit whose results it
//! names, so it survives a crash of the process whenever they do; an entry whose line's success
//! did not survive points at a line that is not `Succeeded`, which a lookup ignores. A crash
//! during an append leaves a torn entry at the end: the log's length is rounded down to whole
//! entries at start and the next append writes over it. A crash during a merge leaves
//! [`MERGED`] where it was, and the next merge moves the same entries again, which gives the
//! same buckets. The log is emptied at start when everything in it is in the index.

use super::{Store, StoreError};
use crate::domain::{RequestKey, RequestRecord};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

/// An entry: reuse key (32 B) ‖ request key (20 B).
pub(super) const ENTRY: usize = 52;

/// The key, in `answers`, of the log's offset up to which it is in the buckets (u64,
/// big-endian). No bucket (2 bytes) nor key from before buckets (32 bytes) has this length.
const MERGED: &[u8] = b"log";

/// The most log entries a merge holds in memory at once (52 B each: ~3.4 MB). A longer log
/// is moved in several passes, each over a range of buckets.
const MERGE_WINDOW: usize = 1 << 16;

/// Log bytes read at a time (whole entries).
const READ_BYTES: usize = ENTRY * 1260;

/// Buckets: the reuse key's first two bytes.
const BUCKETS: u64 = 1 << 16;

fn bucket_of(entry: &[u8]) -> u16 {
    u16::from_be_bytes([entry[0], entry[1]])
}

/// The answers log: its file, where the next entry goes, and up to where it is in the index.
pub(super) struct Log {
    state: Mutex<LogState>,
}

struct LogState {
    file: File,
    end: u64,
    merged: u64,
}

impl Log {
    /// Opens (or creates) the log at `path`; `answers` is the index. Before anything else uses
    /// the store (no flush may run beside the one made here: `commit.rs`).
    pub(super) fn open(
        path: &Path,
        db: &sled::Db,
        answers: &sled::Tree,
    ) -> Result<Log, StoreError> {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        // A torn entry at the end (a crash during an append) is written over.
        let end = file.metadata()?.len() / ENTRY as u64 * ENTRY as u64;
        let merged = answers
            .get(MERGED)?
            .and_then(|v| <[u8; 8]>::try_from(&v[..]).ok())
            .map_or(0, u64::from_be_bytes);
        let mut state = LogState { file, end, merged };
        if merged >= end && (end > 0 || merged > 0) {
            // Everything in the index: start the log again. The offset is durable at 0 before
            // the file is emptied (a crash between the two moves the log again: same buckets).
            answers.insert(MERGED, &0u64.to_be_bytes())?;
            db.flush()?;
            state.file.set_len(0)?;
            state.end = 0;
            state.merged = 0;
        }
        Ok(Log {
            state: Mutex::new(state),
        })
    }

    fn lock(&self) -> MutexGuard<'_, LogState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl LogState {
    /// Calls `f` with every entry between `from` and `to`, in log order.
    fn each(&self, from: u64, to: u64, mut f: impl FnMut(&[u8])) -> Result<(), StoreError> {
        let mut buf = vec![0u8; READ_BYTES];
        let mut at = from;
        while at < to {
            let n = (to - at).min(READ_BYTES as u64) as usize;
            self.file.read_exact_at(&mut buf[..n], at)?;
            buf[..n].chunks_exact(ENTRY).for_each(&mut f);
            at += n as u64;
        }
        Ok(())
    }
}

impl Store {
    /// Remembers that each line answered the request whose reuse key is beside it, in the
    /// order given (a later answer to the same key wins). One append, durable against a crash
    /// of the process when this returns (before the commit's flush that follows).
    pub fn remember_answers(&self, answers: &[([u8; 32], RequestKey)]) -> Result<(), StoreError> {
        if answers.is_empty() {
            return Ok(());
        }
        let mut v = Vec::with_capacity(answers.len() * ENTRY);
        for (hash, key) in answers {
            v.extend_from_slice(hash);
            v.extend_from_slice(&key.to_bytes());
        }
        let mut log = self.answer_log.lock();
        // On an error nothing moves: the next append writes over what this one left.
        log.file.write_all_at(&v, log.end)?;
        log.end += v.len() as u64;
        Ok(())
    }

    /// The line that answered the request whose reuse key is `hash`, and its record as it is
    /// now; `None` when no line did (or its batch is gone).
    pub fn answered_by(
        &self,
        hash: &[u8; 32],
    ) -> Result<Option<(RequestKey, RequestRecord)>, StoreError> {
        self.merge_answer_log()?;
        let in_bucket = self.answers.get(&hash[..2])?.and_then(|b| {
            b.chunks_exact(ENTRY)
                .find(|e| e[..32] == hash[..])
                .and_then(|e| RequestKey::from_bytes(&e[32..]))
        });
        let key = match in_bucket {
            Some(key) => Some(key),
            // A store from before buckets: one key per answer.
            None => self
                .answers
                .get(hash)?
                .and_then(|k| RequestKey::from_bytes(&k)),
        };
        let Some(key) = key else {
            return Ok(None);
        };
        Ok(self.get_request(key)?.map(|r| (key, r)))
    }

    /// Moves what the log holds beyond [`MERGED`] into the buckets.
    fn merge_answer_log(&self) -> Result<(), StoreError> {
        self.merge_answer_log_within(MERGE_WINDOW)
    }

    /// [`Store::merge_answer_log`] holding at most about `window` entries at once.
    fn merge_answer_log_within(&self, window: usize) -> Result<(), StoreError> {
        let mut log = self.answer_log.lock();
        let (from, to) = (log.merged, log.end);
        if from >= to {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let total = ((to - from) / ENTRY as u64) as usize;
        // One pass when the log fits the window (the usual case: the answers of one round of
        // lookups); otherwise one pass per range of buckets that fits it, about.
        let passes = total.div_ceil(window.max(1)).max(1) as u64;
        let mut entries: Vec<[u8; ENTRY]> = Vec::new();
        for p in 0..passes {
            let range = p * BUCKETS / passes..(p + 1) * BUCKETS / passes;
            entries.clear();
            log.each(from, to, |e| {
                if range.contains(&u64::from(bucket_of(e))) {
                    entries.push(entry(e));
                }
            })?;
            // By bucket, in log order within one (the sort is stable).
            entries.sort_by_key(|e| bucket_of(e));
            for group in entries.chunk_by(|a, b| bucket_of(a) == bucket_of(b)) {
                self.merge_bucket(group)?;
            }
        }
        self.answers.insert(MERGED, &to.to_be_bytes())?;
        log.merged = to;
        // The first lookup after a long run that reused nothing moves the whole run's answers:
        // say what held the loop.
        let took_ms = started.elapsed().as_millis() as u64;
        if passes > 1 {
            tracing::info!(
                answers = total,
                passes,
                took_ms,
                "answers moved into the reuse index"
            );
        } else {
            tracing::debug!(
                answers = total,
                took_ms,
                "answers moved into the reuse index"
            );
        }
        Ok(())
    }

    /// Adds `group` (entries of one bucket, in log order) to its bucket: for each reuse key,
    /// the last entry wins over the group's earlier ones and the bucket's.
    fn merge_bucket(&self, group: &[[u8; ENTRY]]) -> Result<(), StoreError> {
        // The last entry of each reuse key, in log order: sorted by key, then position.
        let mut by_key: Vec<usize> = (0..group.len()).collect();
        by_key.sort_by(|&a, &b| group[a][..32].cmp(&group[b][..32]).then(a.cmp(&b)));
        let mut last: Vec<usize> = by_key
            .chunk_by(|&a, &b| group[a][..32] == group[b][..32])
            .filter_map(|same| same.last().copied())
            .collect();
        let replaced: Vec<&[u8]> = last.iter().map(|&i| &group[i][..32]).collect();
        last.sort_unstable();
        let newest: Vec<&[u8; ENTRY]> = last.iter().map(|&i| &group[i]).collect();
        let bucket = [group[0][0], group[0][1]];
        self.answers.update_and_fetch(bucket, |old| {
            let old = old.unwrap_or_default();
            let mut v = Vec::with_capacity(old.len() + newest.len() * ENTRY);
            for e in old.chunks_exact(ENTRY) {
                if replaced.binary_search(&&e[..32]).is_err() {
                    v.extend_from_slice(e);
                }
            }
            for e in &newest {
                v.extend_from_slice(&e[..]);
            }
            Some(v)
        })?;
        Ok(())
    }
}

/// An entry of the log (`chunks_exact(ENTRY)` gives exactly `ENTRY` bytes).
fn entry(e: &[u8]) -> [u8; ENTRY] {
    let mut a = [0u8; ENTRY];
    a.copy_from_slice(e);
    a
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::BatchId;
    use std::collections::HashMap;

    fn store(dir: &std::path::Path) -> Store {
        Store::open(dir, 8 << 20).expect("open")
    }

    /// A reuse key whose bucket is `(a, b)`, told apart by `c`.
    fn h(a: u8, b: u8, c: u8) -> [u8; 32] {
        let mut x = [0u8; 32];
        x[0] = a;
        x[1] = b;
        x[31] = c;
        x
    }

    fn queued(s: &Store, keys: impl IntoIterator<Item = RequestKey>) {
        let items: Vec<_> = keys
            .into_iter()
            .map(|k| {
                (
                    k,
                    RequestRecord::queued(format!("c{}", k.line)),
                    super::super::StoredBody {
                        json: "{}".into(),
                        refs: vec![],
                    },
                )
            })
            .collect();
        s.put_requests(&items).expect("put");
    }

    /// Every bucket (not the log's offset), in key order.
    fn all_buckets(s: &Store) -> Vec<(sled::IVec, sled::IVec)> {
        s.answers
            .iter()
            .map(|r| r.expect("read"))
            .filter(|(k, _)| k.len() == 2)
            .collect()
    }

    /// Entries in the log not yet in the index.
    fn unmerged(s: &Store) -> u64 {
        let log = s.answer_log.lock();
        (log.end - log.merged) / ENTRY as u64
    }

    fn by(s: &Store, x: [u8; 32]) -> Option<u32> {
        s.answered_by(&x).expect("look up").map(|(k, _)| k.line)
    }

    #[test]
    fn answers_are_found_by_their_whole_key_and_the_last_one_wins() {
        let d = tempfile::tempdir().expect("tempdir");
        let s = store(d.path());
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        queued(&s, (1..=6).map(key));
        // Three keys in one bucket, one in another; key (1,0,1) answered twice in one append.
        s.remember_answers(&[
            (h(1, 0, 1), key(1)),
            (h(1, 0, 2), key(2)),
            (h(2, 0, 1), key(3)),
            (h(1, 0, 1), key(4)),
        ])
        .expect("remember");
        assert_eq!(by(&s, h(1, 0, 1)), Some(4));
        assert_eq!(by(&s, h(1, 0, 2)), Some(2));
        assert_eq!(by(&s, h(2, 0, 1)), Some(3));
        assert_eq!(by(&s, h(1, 0, 3)), None, "same bucket, another key");
        assert_eq!(unmerged(&s), 0, "a lookup moves the log");
        // A later append replaces an answer already in its bucket, and keeps the others.
        s.remember_answers(&[(h(1, 0, 2), key(5))])
            .expect("remember");
        assert_eq!(by(&s, h(1, 0, 2)), Some(5));
        assert_eq!(by(&s, h(1, 0, 1)), Some(4));
        assert_eq!(
            s.answers.get([1, 0]).expect("get").map(|b| b.len()),
            Some(2 * ENTRY),
            "one entry per reuse key"
        );
        // A store from before buckets kept one 32-byte key per answer.
        s.answers
            .insert(h(7, 7, 7), &key(6).to_bytes()[..])
            .expect("legacy");
        assert_eq!(by(&s, h(7, 7, 7)), Some(6));
    }

    #[test]
    fn a_log_longer_than_the_window_is_moved_in_passes_and_equals_one_pass() {
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        // 600 answers over 40 buckets spread across the whole bucket range: 200 keys, each
        // answered 3 times in different appends (the last must win, in passes too).
        let answers: Vec<([u8; 32], RequestKey)> = (0..600u32)
            .map(|i| {
                let b = (i % 40) as u8;
                (h(b.wrapping_mul(6), b, (i / 40 % 5) as u8), key(i + 1))
            })
            .collect();
        let mut want = HashMap::new();
        for (x, k) in &answers {
            want.insert(*x, k.line);
        }
        let mut buckets = Vec::new();
        for window in [usize::MAX, 7] {
            let d = tempfile::tempdir().expect("tempdir");
            let s = store(d.path());
            queued(&s, (1..=600).map(key));
            for part in answers.chunks(23) {
                s.remember_answers(part).expect("remember");
            }
            s.merge_answer_log_within(window).expect("merge");
            assert_eq!(unmerged(&s), 0);
            for (x, line) in &want {
                assert_eq!(by(&s, *x), Some(*line), "window {window}");
            }
            buckets.push(all_buckets(&s));
        }
        assert_eq!(want.len(), 200);
        assert_eq!(buckets[0].len(), 40);
        assert_eq!(
            buckets[0], buckets[1],
            "passes give the buckets one pass gives"
        );
    }

    #[test]
    fn a_merge_interrupted_part_way_is_done_again_to_the_same_buckets() {
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        let first: Vec<_> = (0..50u32)
            .map(|i| (h((i % 5) as u8, 0, i as u8), key(i + 1)))
            .collect();
        let second: Vec<_> = (0..50u32)
            .map(|i| (h((i % 5) as u8, 0, (i / 2) as u8), key(i + 51)))
            .collect();
        let run = |interrupt: bool| {
            let d = tempfile::tempdir().expect("tempdir");
            let s = store(d.path());
            queued(&s, (1..=100).map(key));
            s.remember_answers(&first).expect("remember");
            s.merge_answer_log().expect("merge");
            s.remember_answers(&second).expect("remember");
            if interrupt {
                // What a crash after some buckets were written leaves: those buckets
                // updated, the log still whole.
                let some: Vec<[u8; ENTRY]> = second[..20]
                    .iter()
                    .filter(|(x, _)| x[0] == 2)
                    .map(|(x, k)| {
                        let mut e = [0u8; ENTRY];
                        e[..32].copy_from_slice(x);
                        e[32..].copy_from_slice(&k.to_bytes());
                        e
                    })
                    .collect();
                s.merge_bucket(&some).expect("part");
            }
            s.merge_answer_log().expect("merge");
            all_buckets(&s)
        };
        assert_eq!(run(true), run(false));
    }

    #[test]
    fn the_log_survives_a_reopen_and_is_emptied_once_it_is_in_the_index() {
        let d = tempfile::tempdir().expect("tempdir");
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        let log_len = || {
            std::fs::metadata(d.path().join("answers.log"))
                .expect("log")
                .len()
        };
        {
            let s = store(d.path());
            queued(&s, (1..=3).map(key));
            s.remember_answers(&[(h(3, 3, 3), key(1))])
                .expect("remember");
            s.flush().expect("flush");
        }
        {
            let s = store(d.path());
            assert_eq!(unmerged(&s), 1, "still only in the log");
            assert_eq!(by(&s, h(3, 3, 3)), Some(1));
            s.flush().expect("flush");
        }
        assert_eq!(log_len(), ENTRY as u64);
        let s = store(d.path());
        assert_eq!(log_len(), 0, "emptied at start: all of it was in the index");
        assert_eq!(by(&s, h(3, 3, 3)), Some(1));
        // Appends start again at 0 and are not taken for entries already moved.
        s.remember_answers(&[(h(4, 4, 4), key(2))])
            .expect("remember");
        assert_eq!(unmerged(&s), 1);
        assert_eq!(by(&s, h(4, 4, 4)), Some(2));
    }

    #[test]
    fn a_torn_entry_at_the_end_of_the_log_is_written_over() {
        let d = tempfile::tempdir().expect("tempdir");
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        {
            let s = store(d.path());
            queued(&s, (1..=3).map(key));
            s.remember_answers(&[(h(5, 5, 5), key(1))])
                .expect("remember");
            s.flush().expect("flush");
        }
        // What a crash in the middle of an append leaves: part of an entry.
        let path = d.path().join("answers.log");
        let mut bytes = std::fs::read(&path).expect("read");
        bytes.extend_from_slice(&[0xAB; 30]);
        std::fs::write(&path, &bytes).expect("write");
        let s = store(d.path());
        assert_eq!(unmerged(&s), 1);
        s.remember_answers(&[(h(6, 6, 6), key(2))])
            .expect("remember");
        assert_eq!(
            std::fs::metadata(&path).expect("log").len(),
            2 * ENTRY as u64
        );
        assert_eq!(by(&s, h(5, 5, 5)), Some(1));
        assert_eq!(by(&s, h(6, 6, 6)), Some(2));
    }
}

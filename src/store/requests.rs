//! Request records: 64 to a sled value in `request_chunks` ([`chunks`]), each result in its
//! batch's results file ([`results`]); the fenced transitions of the request state machine.
//!
//! Stores written before chunks kept one full record per line (result inside) in `requests`:
//! a batch is in one layout or the other, and both are read and moved the same way.

use super::chunks;
use super::results::ResultAt;
use super::{Store, StoreError, StoredBody, TransitionError, conv_key, decode, encode};
use crate::conversation::Record as ConvRecord;
use crate::domain::{
    BatchId, RequestKey, RequestRecord, RequestState, ResultRecord, Transition, Usage,
};
use serde::{Deserialize, Serialize};

/// A request record as a chunk keeps it: the result is where [`ResultAt`] says.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Stored {
    custom_id: String,
    state: RequestState,
    attempts: u32,
    lease: u32,
    not_before_ms: u64,
    last_error: Option<String>,
    result: Option<ResultAt>,
}

impl Stored {
    /// `rec` with its result at `at` (its own result is not kept).
    fn new(rec: &RequestRecord, at: Option<ResultAt>) -> Stored {
        Stored {
            custom_id: rec.custom_id.clone(),
            state: rec.state,
            attempts: rec.attempts,
            lease: rec.lease,
            not_before_ms: rec.not_before_ms,
            last_error: rec.last_error.clone(),
            result: at,
        }
    }

    /// The record without its result, and where the result is.
    fn split(self) -> (RequestRecord, Option<ResultAt>) {
        (
            RequestRecord {
                custom_id: self.custom_id,
                state: self.state,
                attempts: self.attempts,
                lease: self.lease,
                not_before_ms: self.not_before_ms,
                last_error: self.last_error,
                result: None,
            },
            self.result,
        )
    }
}

/// A line's result as read from a chunk or a record from before chunks.
enum Held {
    /// In the results file.
    At(ResultAt),
    /// In the record (stores from before chunks).
    Inline(ResultRecord),
}

impl Held {
    fn usage(&self) -> Option<Usage> {
        match self {
            Held::At(at) => at.usage,
            Held::Inline(r) => r.usage,
        }
    }
}

/// One line as scanned: its key, its record without the result, and the result's place.
type Scanned = (RequestKey, RequestRecord, Option<Held>);

/// A record as a chunk keeps it, without its result, and where the result is.
fn from_chunk(bytes: &[u8]) -> Result<(RequestRecord, Option<Held>), StoreError> {
    let (rec, at) = decode::<Stored>("request", bytes)?.split();
    Ok((rec, at.map(Held::At)))
}

/// A record from before chunks, without its result, and the result it held.
fn from_legacy(bytes: &[u8]) -> Result<(RequestRecord, Option<Held>), StoreError> {
    let mut rec: RequestRecord = decode("request", bytes)?;
    let r = rec.result.take().map(Held::Inline);
    Ok((rec, r))
}

fn codec(what: &'static str) -> impl Fn() -> StoreError {
    move || StoreError::Codec {
        what,
        detail: "truncated".into(),
    }
}

/// Reads of a chunk a scan adds, beyond the range's own, so that what it reads does not stay
/// in memory: sled 0.34's LRU (256 shards) looks at a shard's accesses only once 64 of them
/// have queued, and a range reads each leaf (8 to 16 chunks) once, so a scan of a
/// 1,000,000-line batch (~1,300 leaves, ~5 reads a shard) evicted nothing and left ~30 MB of
/// chunks resident at finalization (docs/benchmarks.md). With these, each leaf a scan passes
/// brings its shard 64 accesses or more, and the LRU evicts as the scan goes. A read of a
/// resident page is a few hundred nanoseconds.
const SCAN_TOUCHES: usize = 8;

/// Reads `key` [`SCAN_TOUCHES`] times (see there). What they return was just read by the
/// scan, which reports errors; these reads are only for the LRU.
fn touch(tree: &sled::Tree, key: &[u8]) {
    for _ in 0..SCAN_TOUCHES {
        let _ = tree.get(key);
    }
}

/// The lines of one chunk after line `after`, in line order.
fn chunk_lines(
    batch: BatchId,
    key: &[u8],
    value: &[u8],
    after: u32,
) -> Vec<Result<Scanned, StoreError>> {
    let Some(n) = RequestKey::from_bytes(key).map(|k| k.line) else {
        return vec![Err(codec("request chunk key")())];
    };
    let Some(entries) = chunks::decode_slots(value) else {
        return vec![Err(codec("request chunk")())];
    };
    entries
        .into_iter()
        .map(|(slot, bytes)| (n * chunks::CHUNK_LINES + u32::from(slot), bytes))
        .filter(|(line, _)| *line > after)
        .map(|(line, bytes)| {
            let (rec, held) = from_chunk(bytes)?;
            Ok((RequestKey { batch, line }, rec, held))
        })
        .collect()
}

impl Store {
    /// Writes intake records (in line order) and their bodies by the chunk ([`chunks`]), the
    /// bodies before the records (a request record never exists without its body).
    pub fn put_requests(
        &self,
        items: &[(RequestKey, RequestRecord, StoredBody)],
    ) -> Result<(), StoreError> {
        // One insert at a time, not a `sled::Batch`: sled 0.34 keeps a batch's values resident
        // far past its cache (a 200,000-line intake peaked at 367 MB with batches, 172 MB
        // without; docs/benchmarks.md). Nothing needs the chunk to be atomic: an interrupted
        // intake starts again from its first line, deleting what it had queued.
        for (k, same) in chunks::by_chunk(items, |item| item.0) {
            let batch = same[0].0.batch;
            let bodies: Vec<(u8, Vec<u8>)> = same
                .iter()
                .map(|(key, _, body)| (chunks::slot(key.line), encode(body)))
                .collect();
            let mut records = Vec::with_capacity(same.len());
            for (key, rec, _) in same {
                let at = match &rec.result {
                    Some(r) => Some(self.put_result(batch, r)?),
                    None => None,
                };
                records.push((chunks::slot(key.line), encode(&Stored::new(rec, at))));
            }
            // A chunk begun by the previous call (its lines straddle two calls).
            for (tree, new, what) in [
                (&self.body_chunks, bodies, "body chunk"),
                (&self.request_chunks, records, "request chunk"),
            ] {
                let new: Vec<(u8, &[u8])> = new.iter().map(|(s, b)| (*s, &b[..])).collect();
                let old = tree.get(k)?;
                let value = chunks::merge_slots(old.as_deref(), &new).ok_or_else(codec(what))?;
                tree.insert(k, value)?;
            }
        }
        Ok(())
    }

    /// Appends a result to its batch's results file.
    fn put_result(&self, batch: BatchId, r: &ResultRecord) -> Result<ResultAt, StoreError> {
        let bytes = encode(r);
        // A result that cannot be written (disk full) fails the store as a failed flush does:
        // the record stays where it was (its line runs again after a restart) and dispatch stops,
        // instead of every later answer being lost the same way.
        let offset = self.results.append(batch, &bytes).inspect_err(|e| {
            self.committer.fail(e.to_string());
        })?;
        Ok(ResultAt {
            offset,
            // A result is one answer of at most the backend's answer limit: far under 4 GiB.
            len: u32::try_from(bytes.len()).map_err(|_| StoreError::Codec {
                what: "result",
                detail: format!("{} bytes", bytes.len()),
            })?,
            usage: r.usage,
        })
    }

    fn read_result(&self, batch: BatchId, held: Held) -> Result<ResultRecord, StoreError> {
        match held {
            Held::Inline(r) => Ok(r),
            Held::At(at) => decode("result", &self.results.read(batch, &at)?),
        }
    }

    /// Removes every request, body and result of a batch (a failed validation, or a re-run
    /// intake).
    pub fn delete_requests(&self, batch: BatchId) -> Result<(), StoreError> {
        for tree in [
            &self.request_chunks,
            &self.requests,
            &self.bodies,
            &self.groups,
            &self.body_chunks,
            &self.group_chunks,
            &self.conversations,
        ] {
            let mut b = sled::Batch::default();
            for item in tree.scan_prefix(batch.0.as_bytes()) {
                let (k, _) = item?;
                b.remove(k);
            }
            tree.apply_batch(b)?;
        }
        self.results.delete(batch)
    }

    /// One request's record, its result included.
    pub fn get_request(&self, key: RequestKey) -> Result<Option<RequestRecord>, StoreError> {
        let found = self.record_at(key)?;
        let held = match (found.place, found.value) {
            (Place::Chunk, Some(chunk)) => chunks::slot_in(&chunk, chunks::slot(key.line))
                .map(from_chunk)
                .transpose()?,
            (Place::Key, Some(v)) => Some(from_legacy(&v)?),
            (_, None) => None,
        };
        match held {
            Some((mut rec, r)) => {
                rec.result = r.map(|h| self.read_result(key.batch, h)).transpose()?;
                Ok(Some(rec))
            }
            None => Ok(None),
        }
    }

    /// The lines of a batch after line `after`, in line order, each result where it is.
    fn scan(
        &self,
        batch: BatchId,
        after: u32,
    ) -> Box<dyn Iterator<Item = Result<Scanned, StoreError>> + '_> {
        if after == u32::MAX {
            return Box::new(std::iter::empty());
        }
        let first = after + 1;
        let range = |tree: &sled::Tree, from: [u8; 20]| {
            tree.range(
                from..=RequestKey {
                    batch,
                    line: u32::MAX,
                }
                .to_bytes(),
            )
        };
        let chunked = match self.request_chunks.scan_prefix(batch.0.as_bytes()).next() {
            Some(Err(e)) => return Box::new(std::iter::once(Err(e.into()))),
            Some(Ok(_)) => true,
            None => false,
        };
        if chunked {
            Box::new(
                range(&self.request_chunks, chunks::chunk_key(batch, first)).flat_map(
                    move |item| match item {
                        Ok((k, v)) => {
                            touch(&self.request_chunks, &k);
                            chunk_lines(batch, &k, &v, after)
                        }
                        Err(e) => vec![Err(e.into())],
                    },
                ),
            )
        } else {
            // A store from before chunks: one record per key.
            Box::new(
                range(&self.requests, RequestKey { batch, line: first }.to_bytes()).map(|item| {
                    let (k, v) = item?;
                    let key = RequestKey::from_bytes(&k).ok_or_else(codec("request key"))?;
                    let (rec, held) = from_legacy(&v)?;
                    Ok((key, rec, held))
                }),
            )
        }
    }

    /// The requests of a batch after line `after`, in line order (`after` 0: all of them),
    /// their results read.
    pub fn batch_requests_after(
        &self,
        batch: BatchId,
        after: u32,
    ) -> impl Iterator<Item = Result<(RequestKey, RequestRecord), StoreError>> + '_ {
        self.scan(batch, after).map(move |item| {
            let (key, mut rec, held) = item?;
            rec.result = held.map(|h| self.read_result(batch, h)).transpose()?;
            Ok((key, rec))
        })
    }

    /// Every request of a batch in line order (lines are numbered from 1), results read.
    pub fn batch_requests(
        &self,
        batch: BatchId,
    ) -> impl Iterator<Item = Result<(RequestKey, RequestRecord), StoreError>> + '_ {
        self.batch_requests_after(batch, 0)
    }

    /// Every request of a batch in line order without reading the results: each record's
    /// `result` is `None`, and the result's token counts come beside it (a restart's scan).
    pub fn batch_lines(
        &self,
        batch: BatchId,
    ) -> impl Iterator<Item = Result<(RequestKey, RequestRecord, Option<Usage>), StoreError>> + '_
    {
        self.scan(batch, 0).map(|item| {
            let (key, rec, held) = item?;
            Ok((key, rec, held.and_then(|h| h.usage())))
        })
    }

    /// Applies one edge of the request state machine ([`Transition`]) as one compare-and-swap:
    /// the record changes only if it is where the edge starts (`Queued`, or `Leased` under
    /// that exact lease); otherwise `Refused`, and nothing changes. Returns the new record.
    /// The supervisor's `transitions.rs` is the only caller.
    ///
    /// An edge that ends the line appends its result to the results file first; if the edge is
    /// refused, those bytes are never pointed at.
    pub fn transition_request(
        &self,
        key: RequestKey,
        t: &Transition,
    ) -> Result<RequestRecord, TransitionError> {
        let Located {
            place,
            tree,
            key: k,
            value,
        } = self.record_at(key)?;
        let mut old = value.ok_or(TransitionError::NotFound)?;
        let at = self.result_of(place, key.batch, t)?;
        loop {
            let (rec, new) = moved(place, &old, key, t, &at)?;
            match tree.compare_and_swap(k, Some(&old), Some(new))? {
                Ok(()) => return Ok(rec),
                // Another line of the chunk moved meanwhile: again, from what is there now.
                Err(e) => old = e.current.ok_or(TransitionError::NotFound)?,
            }
        }
    }

    /// Where `key`'s record is: its chunk, or (a store from before chunks) its own key in
    /// `requests`.
    fn record_at(&self, key: RequestKey) -> Result<Located<'_>, StoreError> {
        let ck = chunks::chunk_key(key.batch, key.line);
        if let Some(v) = self.request_chunks.get(ck)? {
            return Ok(Located {
                place: Place::Chunk,
                tree: &self.request_chunks,
                key: ck,
                value: Some(v),
            });
        }
        let k = key.to_bytes();
        Ok(Located {
            place: Place::Key,
            tree: &self.requests,
            key: k,
            value: self.requests.get(k)?,
        })
    }

    /// Where an edge's result goes (written now), if it has one and the record is in a chunk
    /// (a record from before chunks keeps its result inside).
    fn result_of(
        &self,
        place: Place,
        batch: BatchId,
        t: &Transition,
    ) -> Result<Option<ResultAt>, StoreError> {
        match (place, t.result()) {
            (Place::Chunk, Some(r)) => Ok(Some(self.put_result(batch, r)?)),
            _ => Ok(None),
        }
    }

    /// [`Store::transition_request`] and a conversation's record in one transaction: a line of a
    /// conversation succeeds together with the history that now holds it.
    pub fn transition_request_in_conversation(
        &self,
        key: RequestKey,
        t: &Transition,
        conversation: (u64, u32),
        record: &ConvRecord,
    ) -> Result<RequestRecord, TransitionError> {
        use sled::Transactional;
        use sled::transaction::{ConflictableTransactionError as Abort, TransactionError};
        let Located {
            place,
            tree,
            key: k,
            ..
        } = self.record_at(key)?;
        let at = self.result_of(place, key.batch, t)?;
        let conv = conv_key(key.batch, conversation);
        let value = encode(record);
        let r = (tree, &self.conversations).transaction(|(reqs, convs)| {
            let old = reqs
                .get(k)?
                .ok_or(Abort::Abort(TransitionError::NotFound))?;
            let (rec, new) = moved(place, &old, key, t, &at).map_err(Abort::Abort)?;
            reqs.insert(&k[..], new)?;
            convs.insert(&conv[..], value.clone())?;
            Ok(rec)
        });
        match r {
            Ok(rec) => Ok(rec),
            Err(TransactionError::Abort(e)) => Err(e),
            Err(TransactionError::Storage(e)) => Err(e.into()),
        }
    }
}

/// A line's record where it is stored.
struct Located<'a> {
    place: Place,
    tree: &'a sled::Tree,
    /// Its key in `tree`.
    key: [u8; 20],
    /// The value there now (the chunk, or the record).
    value: Option<sled::IVec>,
}

/// Where a line's record is stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Place {
    /// In its 64-line chunk (`request_chunks`), its result in the results file.
    Chunk,
    /// Under its own key (`requests`), result inside: a store from before chunks.
    Key,
}

/// The record of `key` after edge `t`, and the value that holds it now: the chunk `old` with
/// the line's entry replaced (its result, if the edge has one, written at `at`), or, for a
/// record from before chunks, the record itself.
fn moved(
    place: Place,
    old: &[u8],
    key: RequestKey,
    t: &Transition,
    at: &Option<ResultAt>,
) -> Result<(RequestRecord, Vec<u8>), TransitionError> {
    if place == Place::Key {
        let mut rec: RequestRecord = decode("request", old)?;
        rec.apply(t).map_err(TransitionError::Refused)?;
        let new = encode(&rec);
        return Ok((rec, new));
    }
    let slot = chunks::slot(key.line);
    let bytes = chunks::slot_in(old, slot).ok_or(TransitionError::NotFound)?;
    let (mut rec, before) = decode::<Stored>("request", bytes)?.split();
    rec.apply(t).map_err(TransitionError::Refused)?;
    // Only the edges that end a line carry a result, and a line ends once: `before` is `None`
    // whenever `apply` let an edge through (no edge leaves a finished line).
    let stored = Stored::new(&rec, at.clone().or(before));
    let new = chunks::merge_slots(Some(old), &[(slot, &encode(&stored))])
        .ok_or_else(codec("request chunk"))?;
    // Its result is the one the edge carried (`apply` set it), as the caller expects.
    Ok((rec, new))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::RequestState;

    fn open(dir: &std::path::Path) -> Store {
        Store::open(dir, 8 << 20).expect("open")
    }

    fn body() -> StoredBody {
        StoredBody {
            json: "{}".into(),
            refs: vec![],
        }
    }

    fn answer(line: u32) -> ResultRecord {
        ResultRecord::answer(
            200,
            format!("{{\"answer\":\"{}\"}}", "x".repeat(line as usize)),
            Some(Usage {
                input_tokens: u64::from(line),
                cached_tokens: None,
                output_tokens: 1,
            }),
        )
    }

    /// Leases `key` and ends it: succeeded with `answer(line)` on even lines, failed on odd.
    fn finish(s: &Store, key: RequestKey) {
        let leased = s
            .transition_request(key, &Transition::Lease)
            .expect("lease");
        let t = Transition::Settle {
            lease: leased.lease,
            succeeded: key.line % 2 == 0,
            result: answer(key.line),
        };
        let done = s.transition_request(key, &t).expect("settle");
        assert_eq!(
            done.result,
            Some(answer(key.line)),
            "the edge's result is returned"
        );
    }

    #[test]
    fn records_share_chunks_move_alone_and_their_results_come_back_from_the_results_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        // Lines 1..=150 with every 10th missing, written in calls that end inside chunks.
        let lines: Vec<u32> = (1..=150).filter(|l| l % 10 != 0).collect();
        {
            let s = open(dir.path());
            for part in lines.chunks(29) {
                let items: Vec<_> = part
                    .iter()
                    .map(|&l| (key(l), RequestRecord::queued(format!("c{l}")), body()))
                    .collect();
                s.put_requests(&items).expect("put");
            }
            assert!(
                s.request_chunks.len() < 4 && s.requests.is_empty(),
                "one key per chunk"
            );
            // Every third line ends, the rest stay queued; one stays leased.
            for &l in lines.iter().filter(|l| *l % 3 == 0) {
                finish(&s, key(l));
            }
            s.transition_request(key(1), &Transition::Lease)
                .expect("lease");
            // A refused edge writes nothing into the record (its result is never pointed at).
            let late = s.transition_request(
                key(3),
                &Transition::Settle {
                    lease: 1,
                    succeeded: true,
                    result: ResultRecord::error("late", "x"),
                },
            );
            assert!(matches!(late, Err(TransitionError::Refused(_))), "{late:?}");
            s.flush().expect("flush");
        }
        // Reopened: everything is read back from disk.
        let s = open(dir.path());
        let expected = |l: u32| -> (RequestState, Option<ResultRecord>) {
            match l {
                1 => (RequestState::Leased, None),
                l if l % 3 != 0 => (RequestState::Queued, None),
                l if l % 2 == 0 => (RequestState::Succeeded, Some(answer(l))),
                l => (RequestState::Failed, Some(answer(l))),
            }
        };
        for &l in &lines {
            let rec = s.get_request(key(l)).expect("get").expect("some");
            assert_eq!((rec.state, rec.result), expected(l), "line {l}");
            assert_eq!(rec.custom_id, format!("c{l}"));
        }
        assert_eq!(s.get_request(key(10)).expect("get"), None, "a missing line");
        let all: Vec<(u32, RequestState, Option<ResultRecord>)> = s
            .batch_requests(batch)
            .map(|i| i.expect("scan"))
            .map(|(k, r)| (k.line, r.state, r.result))
            .collect();
        let want: Vec<_> = lines
            .iter()
            .map(|&l| {
                let (st, r) = expected(l);
                (l, st, r)
            })
            .collect();
        assert_eq!(all, want);
        // From the middle of a chunk.
        let after: Vec<u32> = s
            .batch_requests_after(batch, 70)
            .map(|i| i.expect("scan").0.line)
            .collect();
        assert_eq!(
            after,
            lines
                .iter()
                .copied()
                .filter(|l| *l > 70)
                .collect::<Vec<_>>()
        );
        assert_eq!(s.batch_requests_after(batch, u32::MAX).count(), 0);
        // The restart's scan: no result read, its usage beside the record.
        for item in s.batch_lines(batch) {
            let (k, rec, usage) = item.expect("scan");
            assert_eq!(rec.result, None);
            assert_eq!(
                usage,
                expected(k.line).1.and_then(|r| r.usage),
                "line {}",
                k.line
            );
        }
        let file = dir
            .path()
            .join("results")
            .join(batch.0.simple().to_string());
        assert!(file.exists());
        s.delete_requests(batch).expect("delete");
        assert!(!file.exists(), "the results go with the batch");
        assert_eq!(s.batch_requests(batch).count(), 0);
    }

    #[test]
    fn a_record_that_points_past_its_results_file_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        let key = RequestKey {
            batch: BatchId::new(),
            line: 1,
        };
        s.put_requests(&[(key, RequestRecord::queued("c".into()), body())])
            .expect("put");
        finish(&s, RequestKey { line: 1, ..key });
        let file = dir
            .path()
            .join("results")
            .join(key.batch.0.simple().to_string());
        std::fs::OpenOptions::new()
            .write(true)
            .open(&file)
            .and_then(|f| f.set_len(3))
            .expect("truncate");
        let e = s.get_request(key).expect_err("truncated").to_string();
        assert!(e.contains("results/"), "{e}");
    }

    #[test]
    fn records_from_before_chunks_are_read_and_moved_with_their_results_inside() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        let batch = BatchId::new();
        let key = |line| RequestKey { batch, line };
        let mut done = RequestRecord::queued("a".into());
        done.state = RequestState::Succeeded;
        done.result = Some(answer(2));
        s.requests
            .insert(key(1).to_bytes(), encode(&done))
            .expect("legacy");
        for l in [2, 3] {
            s.requests
                .insert(
                    key(l).to_bytes(),
                    encode(&RequestRecord::queued(format!("c{l}"))),
                )
                .expect("legacy");
        }
        assert_eq!(
            s.get_request(key(1)).expect("get").and_then(|r| r.result),
            Some(answer(2))
        );
        finish(&s, key(2));
        let leased = s
            .transition_request(key(3), &Transition::Lease)
            .expect("lease");
        let conv = crate::conversation::Record::default();
        s.transition_request_in_conversation(
            key(3),
            &Transition::Settle {
                lease: leased.lease,
                succeeded: true,
                result: answer(3),
            },
            (0, 1),
            &conv,
        )
        .expect("settle in a conversation");
        let all: Vec<_> = s
            .batch_requests(batch)
            .map(|i| i.expect("scan"))
            .map(|(k, r)| (k.line, r.result))
            .collect();
        assert_eq!(
            all,
            vec![
                (1, Some(answer(2))),
                (2, Some(answer(2))),
                (3, Some(answer(3)))
            ]
        );
        let usage: Vec<_> = s.batch_lines(batch).map(|i| i.expect("scan").2).collect();
        assert_eq!(
            usage,
            vec![answer(2).usage, answer(2).usage, answer(3).usage]
        );
        assert!(s.request_chunks.is_empty(), "nothing moved to chunks");
        assert!(s.get_conversation(batch, (0, 1)).expect("get").is_some());
    }

    #[test]
    fn a_conversation_turn_in_a_chunk_succeeds_with_its_history() {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = open(dir.path());
        let batch = BatchId::new();
        let key = RequestKey { batch, line: 5 };
        s.put_requests(&[(key, RequestRecord::queued("t".into()), body())])
            .expect("put");
        let leased = s
            .transition_request(key, &Transition::Lease)
            .expect("lease");
        let conv = crate::conversation::Record {
            turns: 1,
            ..Default::default()
        };
        let settle = Transition::Settle {
            lease: leased.lease,
            succeeded: true,
            result: answer(5),
        };
        s.transition_request_in_conversation(key, &settle, (7, 2), &conv)
            .expect("settle");
        assert_eq!(
            s.get_request(key).expect("get").and_then(|r| r.result),
            Some(answer(5))
        );
        assert_eq!(
            s.get_conversation(batch, (7, 2))
                .expect("get")
                .map(|c| c.turns),
            Some(1)
        );
        // A second settle of the same lease is refused and changes neither.
        let again = s.transition_request_in_conversation(
            key,
            &settle,
            (7, 2),
            &crate::conversation::Record::default(),
        );
        assert!(
            matches!(again, Err(TransitionError::Refused(_))),
            "{again:?}"
        );
        assert_eq!(
            s.get_conversation(batch, (7, 2))
                .expect("get")
                .map(|c| c.turns),
            Some(1)
        );
    }
}

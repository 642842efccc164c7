//! Intake: turns an uploaded JSONL file into queued requests.
//!
//! Owns the transitions `validating → in_progress` and `validating → failed`. One streaming
//! pass over the file validates every line (all of OpenAI's rules, every bad line reported
//! with its 1-based number) and, while no error has been seen, writes each line as a queued
//! [`RequestRecord`] plus its body. Repeated custom_ids are found after the pass, from a
//! 16-byte hash and line number per line (the lines under a shared hash are read again to
//! compare the ids themselves). Long message contents that many lines share (a system
//! prompt, a rubric) are stored once in the `blobs` tree under their SHA-256 and referenced.
//! After this, nothing reads the uploaded file again.
//!
//! Re-running the intake of a batch (after a crash during validation) starts from a clean
//! slate: it first deletes whatever requests an earlier run wrote.
//!
//! The rooms: this file owns the batch's transitions and the pass over the file; `rules.rs`
//! holds the pure rules of one line; `codec.rs` stores a body (shared contents by hash, the
//! prefix group) and rebuilds it for dispatch.

mod codec;
mod rules;

pub use codec::{SHARED_CONTENT_MIN, materialize};
use codec::{SharedContents, store_body};
pub(crate) use rules::check_line;
use rules::{clip, err, read_line_bounded};

use crate::config::Config;
use crate::domain::{
    BatchId, BatchRecord, BatchStatus, LineError, RequestKey, RequestRecord, unix_now,
};
use crate::store::{Store, StoreError, TransitionError};
use std::io::BufReader;

/// Records written to sled per write batch.
const WRITE_CHUNK: usize = 1024;

/// How an intake ended.
#[derive(Debug, PartialEq)]
pub enum IntakeOutcome {
    /// The batch is `in_progress` with this many lines queued.
    Ready(u64),
    /// The file was invalid; the batch is `failed`.
    Invalid(usize),
    /// The batch was cancelled while validating (the supervisor finishes it).
    Cancelled,
    /// The batch was no longer `validating` for another reason (nothing done).
    Skipped,
}

/// What validation found, before the batch moves on.
#[derive(Debug, PartialEq)]
pub enum Validated {
    /// Every line is valid and queued (the batch is still `validating`): `total` lines, all on
    /// `model` (after `--model` / `--model-map`).
    Valid {
        /// Lines queued.
        total: u64,
        /// The model they run on.
        model: Option<String>,
    },
    /// Already finished (invalid, cancelled, skipped): nothing more to do.
    Done(IntakeOutcome),
}

/// The streaming pass: every line checked and, if all are valid, queued. An invalid file
/// fails the batch here; a valid one stays `validating` until [`accept`] or [`reject`].
pub fn validate(store: &Store, cfg: &Config, batch_id: BatchId) -> Result<Validated, StoreError> {
    let Some(batch) = store.get_batch(batch_id)? else {
        return Ok(Validated::Done(IntakeOutcome::Skipped));
    };
    match batch.status {
        BatchStatus::Validating => {}
        // Cancelled before the intake started: the supervisor finalizes it as cancelled.
        BatchStatus::Cancelling => return Ok(Validated::Done(IntakeOutcome::Cancelled)),
        _ => return Ok(Validated::Done(IntakeOutcome::Skipped)),
    }
    store.delete_requests(batch_id)?;
    let (errors, total, model) = match expand(store, cfg, &batch) {
        Ok(r) => r,
        Err(ExpandError::Store(e)) => return Err(e),
        Err(ExpandError::Cancelled) => {
            // Cancelled while validating: nothing of it was queued, so it ends with a total
            // of 0 and no error file (guarantees.md). The supervisor finalizes it.
            store.delete_requests(batch_id)?;
            store.flush()?;
            return Ok(Validated::Done(IntakeOutcome::Cancelled));
        }
        Err(ExpandError::File(message)) => (
            vec![LineError {
                code: "invalid_file".into(),
                message,
                param: Some("input_file_id".into()),
                line: None,
            }],
            0,
            None,
        ),
    };
    let mut errors = errors;
    if errors.is_empty() && total == 0 {
        errors.push(LineError {
            code: "empty_file".into(),
            message: "the input file has no requests".into(),
            param: Some("input_file_id".into()),
            line: None,
        });
    }
    if !errors.is_empty() {
        return reject(store, cfg, batch_id, errors).map(Validated::Done);
    }
    store.flush()?;
    Ok(Validated::Valid {
        total,
        model: model.map(|m| cfg.map_model(&m)),
    })
}

/// `validating → failed` with these errors; the queued lines are deleted.
pub fn reject(
    store: &Store,
    cfg: &Config,
    batch_id: BatchId,
    errors: Vec<LineError>,
) -> Result<IntakeOutcome, StoreError> {
    store.delete_requests(batch_id)?;
    let n = errors.len();
    let receivers = crate::webhook::Receivers::of(cfg);
    // `failed` and its webhook events in one transaction.
    let result = store.update_batch_notifying(
        batch_id,
        &[BatchStatus::Validating],
        |b| {
            b.status = BatchStatus::Failed;
            b.failed_at = Some(unix_now());
            b.errors = errors.clone();
        },
        |b| receivers.outbox(b),
    );
    store.flush()?;
    finish(result, IntakeOutcome::Invalid(n))
}

/// `validating → in_progress`: the batch's `total` lines run on `model`.
pub fn accept(
    store: &Store,
    batch_id: BatchId,
    total: u64,
    model: Option<String>,
) -> Result<IntakeOutcome, StoreError> {
    let result = store.update_batch(batch_id, &[BatchStatus::Validating], |b| {
        b.status = BatchStatus::InProgress;
        b.in_progress_at = Some(unix_now());
        b.request_counts.total = total;
        b.model = model.clone();
    });
    store.flush()?;
    finish(result, IntakeOutcome::Ready(total))
}

fn finish(
    result: Result<BatchRecord, TransitionError>,
    ok: IntakeOutcome,
) -> Result<IntakeOutcome, StoreError> {
    match result {
        Ok(_) => Ok(ok),
        Err(TransitionError::BatchIs(BatchStatus::Cancelling)) => Ok(IntakeOutcome::Cancelled),
        // Another status, or gone (a request's `Refused` cannot come from a batch's move).
        Err(
            TransitionError::BatchIs(_) | TransitionError::NotFound | TransitionError::Refused(_),
        ) => Ok(IntakeOutcome::Skipped),
        Err(TransitionError::Store(e)) => Err(e),
    }
}

enum ExpandError {
    Store(StoreError),
    File(String),
    /// The batch was cancelled while its file was being read.
    Cancelled,
}

impl From<StoreError> for ExpandError {
    fn from(e: StoreError) -> Self {
        ExpandError::Store(e)
    }
}

/// The streaming pass. Returns (errors, lines queued, the file's model).
fn expand(
    store: &Store,
    cfg: &Config,
    batch: &BatchRecord,
) -> Result<(Vec<LineError>, u64, Option<String>), ExpandError> {
    let path = store.file_path(batch.input_file_id);
    let file = std::fs::File::open(&path).map_err(|e| {
        ExpandError::File(format!(
            "cannot read input file {}: {e}",
            batch.input_file_id
        ))
    })?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let endpoint = batch.endpoint;
    let mut errors: Vec<LineError> = Vec::new();
    let schemas = crate::answer::Schemas::default();
    let mut unlisted = 0usize;
    // Each line's custom_id as a 64-bit hash (8 bytes a line, not the ids themselves):
    // duplicates are found and checked against the ids after the pass.
    let mut ids = Ids::new(id_hash);
    let mut model: Option<(String, u32)> = None;
    let mut shared = SharedContents::default();
    let mut pending = Vec::with_capacity(WRITE_CHUNK);
    let mut groups: Vec<(RequestKey, u64)> = Vec::with_capacity(WRITE_CHUNK);
    let mut buf = Vec::new();
    let mut line_no: u32 = 0;
    let mut total = 0u64;
    let mut push_err = |errors: &mut Vec<LineError>, e: LineError| {
        if errors.len() < cfg.max_listed_errors {
            errors.push(e);
        } else {
            unlisted += 1;
        }
    };
    while let Some(too_long) = read_line_bounded(&mut reader, &mut buf, cfg.max_line_bytes)
        .map_err(|e| ExpandError::File(format!("cannot read input file: {e}")))?
    {
        line_no = line_no.saturating_add(1);
        // A cancel during validation stops it: no point reading (and queueing) the rest.
        if line_no % WRITE_CHUNK as u32 == 0
            && store
                .get_batch(batch.id)?
                .is_some_and(|b| b.status == BatchStatus::Cancelling)
        {
            return Err(ExpandError::Cancelled);
        }
        if too_long {
            push_err(
                &mut errors,
                err(
                    line_no,
                    "line_too_long",
                    None,
                    format!("line {line_no} is longer than {} bytes", cfg.max_line_bytes),
                ),
            );
            continue;
        }
        if buf.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        let (custom_id, line_model, body) = match check_line(line_no, &buf, endpoint, cfg.backend) {
            Ok(parts) => parts,
            Err(e) => {
                push_err(&mut errors, e);
                continue;
            }
        };
        // A schema the answers will be checked against must be one (compiled once per distinct
        // schema): refused now, not at 3 a.m.
        if let Some(crate::answer::Wanted::Schema(s)) = crate::answer::wanted(endpoint, &body)
            && let Err(e) = schemas.get(s)
        {
            push_err(
                &mut errors,
                err(
                    line_no,
                    "invalid_value",
                    Some("body.response_format.json_schema.schema"),
                    format!("line {line_no}: body.response_format.json_schema.schema: {e}"),
                ),
            );
            continue;
        }
        match &model {
            None => model = Some((line_model, line_no)),
            Some((m, first)) if *m != line_model => {
                push_err(
                    &mut errors,
                    err(
                        line_no,
                        "mismatched_model",
                        Some("body.model"),
                        format!(
                            "line {line_no}: model '{}' differs from '{}' on line {first}; a batch runs one model",
                            clip(&line_model),
                            clip(m)
                        ),
                    ),
                );
                continue;
            }
            Some(_) => {}
        }
        ids.push(line_no, &custom_id);
        total += 1;
        if !errors.is_empty() {
            continue; // keep validating, stop writing
        }
        let (stored, group) = store_body(store, &mut shared, body)?;
        let key = RequestKey {
            batch: batch.id,
            line: line_no,
        };
        pending.push((key, RequestRecord::queued(custom_id), stored));
        groups.push((key, group));
        if pending.len() == WRITE_CHUNK {
            store.put_groups(&groups)?;
            store.put_requests(&pending)?;
            pending.clear();
            groups.clear();
        }
    }
    if !pending.is_empty() && errors.is_empty() {
        store.put_groups(&groups)?;
        store.put_requests(&pending)?;
    }
    let dups = duplicate_ids(&path, cfg, endpoint, ids)?;
    if !dups.is_empty() {
        errors.extend(dups);
        errors.sort_by_key(|e| e.line);
        let listed = cfg.max_listed_errors;
        unlisted += errors.len().saturating_sub(listed);
        errors.truncate(listed);
    }
    if unlisted > 0 {
        errors.push(LineError {
            code: "too_many_errors".into(),
            message: format!("{unlisted} more invalid lines are not listed"),
            param: None,
            line: None,
        });
    }
    Ok((errors, total, model.map(|(m, _)| m)))
}

/// A custom_id's 64-bit hash (SipHash with fixed keys: the same within a pass).
fn id_hash(id: &str) -> u64 {
    use std::hash::{Hash, Hasher};
    #[allow(deprecated)]
    let mut h = std::hash::SipHasher::new();
    id.hash(&mut h);
    h.finish()
}

/// The custom_ids of a file's counted lines, in 8 bytes and a bit a line: each id's hash, and
/// which line numbers were counted (a line refused for another reason, or blank, has no id
/// here).
struct Ids {
    hashes: Vec<u64>,
    /// Bit `n` (line numbers from 1): line `n` was counted.
    counted: Vec<u64>,
    hash: fn(&str) -> u64,
}

impl Ids {
    fn new(hash: fn(&str) -> u64) -> Ids {
        Ids {
            hashes: Vec::new(),
            counted: Vec::new(),
            hash,
        }
    }

    fn push(&mut self, line: u32, custom_id: &str) {
        self.hashes.push((self.hash)(custom_id));
        let (word, bit) = (line as usize / 64, line % 64);
        if self.counted.len() <= word {
            self.counted.resize(word + 1, 0);
        }
        self.counted[word] |= 1 << bit;
    }

    fn counted(&self, line: u32) -> bool {
        self.counted
            .get(line as usize / 64)
            .is_some_and(|w| w & (1 << (line % 64)) != 0)
    }
}

/// The `duplicate_custom_id` errors of a file, from the hashes of its ids: when two counted
/// lines share a hash, the file is read again and the ids of the lines with such a hash are
/// compared, so a hash collision is never taken for a duplicate. Every repeat after an id's
/// first line is an error. A file without a shared hash (every valid file, but for a
/// collision) is read once.
fn duplicate_ids(
    path: &std::path::Path,
    cfg: &Config,
    endpoint: crate::domain::Endpoint,
    mut ids: Ids,
) -> Result<Vec<LineError>, ExpandError> {
    ids.hashes.sort_unstable();
    let shared: Vec<u64> = ids
        .hashes
        .chunk_by(|a, b| a == b)
        .filter(|same| same.len() > 1)
        .map(|same| same[0])
        .collect();
    ids.hashes = Vec::new();
    if shared.is_empty() {
        return Ok(Vec::new());
    }
    let file = std::fs::File::open(path)
        .map_err(|e| ExpandError::File(format!("cannot read input file: {e}")))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut buf = Vec::new();
    let mut seen: std::collections::HashSet<String> = std::collections::HashSet::new();
    let mut out = Vec::new();
    let mut line_no: u32 = 0;
    while let Some(too_long) = read_line_bounded(&mut reader, &mut buf, cfg.max_line_bytes)
        .map_err(|e| ExpandError::File(format!("cannot read input file: {e}")))?
    {
        line_no = line_no.saturating_add(1);
        if !ids.counted(line_no) {
            continue;
        }
        // It passed these checks in the first pass; a file that changed under us is refused.
        let changed = || ExpandError::File("the input file changed while it was read".into());
        if too_long {
            return Err(changed());
        }
        let (custom_id, _, _) =
            check_line(line_no, &buf, endpoint, cfg.backend).map_err(|_| changed())?;
        if shared.binary_search(&(ids.hash)(&custom_id)).is_err() {
            continue;
        }
        if !seen.insert(custom_id.clone()) {
            out.push(err(
                line_no,
                "duplicate_custom_id",
                Some("custom_id"),
                format!(
                    "line {line_no}: custom_id '{}' is used more than once",
                    clip(&custom_id)
                ),
            ));
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::BackendKind;
    use crate::domain::FileRecord;
    use crate::domain::{Endpoint, FileId};

    #[test]
    fn batch_cancelled_before_its_intake_is_handed_on() {
        // Regression: the intake skipped a batch cancelled before it started, so nobody
        // finalized it and it stayed `cancelling` forever.
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path(), 8 << 20).expect("open");
        let cfg = Config::for_tests(dir.path().into(), BackendKind::Openai, "http://127.0.0.1:1");
        let file = FileId::new();
        std::fs::write(store.file_path(file), b"{}\n").expect("write");
        store
            .put_file(&FileRecord {
                id: file,
                bytes: 3,
                created_at: 0,
                filename: "in.jsonl".into(),
                purpose: "batch".into(),
                expires_at: None,
            })
            .expect("file");
        let mut batch = BatchRecord::new(Endpoint::ChatCompletions, file, 0, None, None);
        batch.status = BatchStatus::Cancelling;
        store.put_batch(&batch).expect("batch");
        assert_eq!(
            validate(&store, &cfg, batch.id).expect("intake"),
            Validated::Done(IntakeOutcome::Cancelled)
        );
    }

    #[test]
    fn duplicates_are_ids_compared_not_hashes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg = Config::for_tests(dir.path().into(), BackendKind::Openai, "http://127.0.0.1:1");
        let line = |id: &str| {
            format!(
                r#"{{"custom_id":"{id}","method":"POST","url":"/v1/chat/completions","body":{{"model":"m","messages":[{{"role":"user","content":"hi"}}]}}}}"#
            )
        };
        let path = dir.path().join("in.jsonl");
        let lines = [
            line("a"),
            line("b"),
            String::new(),
            line("a"),
            line("c"),
            line("a"),
        ];
        std::fs::write(&path, lines.join("\n")).expect("write");
        let chat = Endpoint::ChatCompletions;
        // "b" and "c" (lines 2 and 5) share a hash as if they collided: not duplicates.
        fn colliding(id: &str) -> u64 {
            if id == "c" { id_hash("b") } else { id_hash(id) }
        }
        let counted = |lines: &[(u32, &str)]| {
            let mut ids = Ids::new(colliding);
            for (line, id) in lines {
                ids.push(*line, id);
            }
            ids
        };
        let ids = counted(&[(1, "a"), (2, "b"), (4, "a"), (5, "c"), (6, "a")]);
        let Ok(errors) = duplicate_ids(&path, &cfg, chat, ids) else {
            panic!("second pass failed")
        };
        let found: Vec<(Option<u32>, &str)> =
            errors.iter().map(|e| (e.line, e.code.as_str())).collect();
        assert_eq!(
            found,
            vec![
                (Some(4), "duplicate_custom_id"),
                (Some(6), "duplicate_custom_id")
            ]
        );
        assert!(
            errors[0].message.contains("custom_id 'a'"),
            "{}",
            errors[0].message
        );
        // Only "b" and "c" share a hash (line 4, a repeat of "a", was not counted): read
        // again, compared, no error.
        let collided = counted(&[(1, "a"), (2, "b"), (5, "c")]);
        assert!(matches!(duplicate_ids(&path, &cfg, chat, collided), Ok(e) if e.is_empty()));
        // A line not counted in the first pass (refused for another reason) is not reported
        // as a repeat: line 4 repeats "a", but only lines 1 and 6 were counted.
        let Ok(errors) = duplicate_ids(&path, &cfg, chat, counted(&[(1, "a"), (6, "a")])) else {
            panic!("second pass failed")
        };
        assert_eq!(
            errors.iter().map(|e| e.line).collect::<Vec<_>>(),
            vec![Some(6)]
        );
    }

    #[test]
    fn bounded_reader_skips_long_lines_and_keeps_numbers() {
        let data = b"short\r\n0123456789ABC\nlast";
        let mut r = BufReader::with_capacity(4, &data[..]);
        let mut buf = Vec::new();
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).expect("io"),
            Some(false)
        );
        assert_eq!(buf, b"short");
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).expect("io"),
            Some(true)
        );
        assert!(buf.is_empty());
        assert_eq!(
            read_line_bounded(&mut r, &mut buf, 8).expect("io"),
            Some(false)
        );
        assert_eq!(buf, b"last");
        assert_eq!(read_line_bounded(&mut r, &mut buf, 8).expect("io"), None);
    }

    #[test]
    fn line_rules() {
        let chat = Endpoint::ChatCompletions;
        let ok = br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"role":"user","content":"hi"}]}}"#;
        assert!(check_line(1, ok, chat, BackendKind::Openai).is_ok());
        let mut bom = b"\xEF\xBB\xBF".to_vec();
        bom.extend_from_slice(ok);
        assert!(
            check_line(1, &bom, chat, BackendKind::Openai).is_ok(),
            "a BOM on line 1 is not JSON's business"
        );
        let huge_url = format!(
            r#"{{"custom_id":"a","method":"POST","url":"{}","body":{{"model":"m"}}}}"#,
            "u".repeat(1 << 20)
        );
        let cases: &[(&[u8], &str, Option<&str>)] = &[
            (b"not json", "invalid_json_line", None),
            (b"[1,2]", "invalid_request", None),
            (br#"{"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#, "missing_required_parameter", Some("custom_id")),
            (br#"{"custom_id":7,"method":"POST","url":"/v1/chat/completions","body":{"model":"m"}}"#, "invalid_type", Some("custom_id")),
            (br#"{"custom_id":"a","method":"GET","url":"/v1/chat/completions","body":{"model":"m"}}"#, "invalid_method", Some("method")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m"}}"#, "invalid_url", Some("url")),
            (huge_url.as_bytes(), "invalid_url", Some("url")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":"x"}"#, "invalid_type", Some("body")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":["m"]}}"#, "invalid_type", Some("body.model")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","stream":true}}"#, "invalid_value", Some("body.stream")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","message":[{"role":"user","content":"hi"}]}}"#, "missing_required_parameter", Some("body.messages")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":"hi"}}"#, "invalid_type", Some("body.messages")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[]}}"#, "invalid_value", Some("body.messages")),
            (br#"{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{"model":"m","messages":[{"content":"hi"}]}}"#, "missing_required_parameter", Some("body.messages[0].role")),
            (b"\xff\xfe{}", "invalid_json_line", None),
        ];
        for (line, code, param) in cases {
            let e = check_line(7, line, chat, BackendKind::Openai).expect_err("must fail");
            assert_eq!(
                e.code,
                *code,
                "{}",
                String::from_utf8_lossy(&line[..line.len().min(200)])
            );
            assert_eq!(e.param.as_deref(), *param);
            assert_eq!(e.line, Some(7));
            assert!(
                e.message.len() < 300,
                "error messages never copy large values: {} bytes",
                e.message.len()
            );
        }
        let emb = br#"{"custom_id":"a","method":"POST","url":"/v1/embeddings","body":{"model":"m","inputs":"x"}}"#;
        let e = check_line(1, emb, Endpoint::Embeddings, BackendKind::Openai).expect_err("input");
        assert_eq!(e.param.as_deref(), Some("body.input"));
    }

    #[test]
    fn what_ollama_cannot_do_fails_at_validation() {
        let chat = Endpoint::ChatCompletions;
        let line = |body: &str| {
            format!(
                r#"{{"custom_id":"a","method":"POST","url":"/v1/chat/completions","body":{body}}}"#
            )
        };
        for (body, needle) in [
            (
                r#"{"model":"m","n":3,"messages":[{"role":"user","content":"hi"}]}"#,
                "n must be 1",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"https://example.com/cat.png"}}]}]}"#,
                "data URLs",
            ),
            (
                r#"{"model":"m","messages":[{"role":"user","content":[{"type":"input_audio","input_audio":{}}]}]}"#,
                "not supported",
            ),
        ] {
            let l = line(body);
            let e = check_line(1, l.as_bytes(), chat, BackendKind::Ollama).expect_err(body);
            assert_eq!(e.code, "unsupported_parameter");
            assert!(e.message.contains(needle), "{}", e.message);
            // The same line is fine for an OpenAI-compatible server.
            assert!(check_line(1, l.as_bytes(), chat, BackendKind::Openai).is_ok());
        }
        let ok = line(
            r#"{"model":"m","n":1,"messages":[{"role":"developer","content":"rubric"},{"role":"user","content":"hi"}]}"#,
        );
        assert!(check_line(1, ok.as_bytes(), chat, BackendKind::Ollama).is_ok());
    }
}

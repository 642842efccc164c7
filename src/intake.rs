//! Intake: turns an uploaded JSONL file into queued requests.
//!
//! Owns the transitions `validating → in_progress` and `validating → failed`. One streaming
//! pass over the file validates every line (all of OpenAI's rules, every bad line reported
//! with its 1-based number) and, while no error has been seen, writes each line as a queued
//! [`RequestRecord`] plus its body. Long message contents that many lines share (a system
//! prompt, a rubric) are stored once in the `blobs` tree under their SHA-256 and referenced.
//! After this, nothing reads the uploaded file again.
//!
//! Re-running the intake of a batch (after a crash during validation) starts from a clean
//! slate: it first deletes whatever requests an earlier run wrote.

use crate::config::{BackendKind, Config};
use crate::domain::{
    BatchId, BatchRecord, BatchStatus, Endpoint, LineError, RequestKey, RequestRecord, unix_now,
};
use crate::store::{Store, StoreError, StoredBody, TransitionError};
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::io::{BufRead, BufReader};

/// Message contents at least this long are stored once, by hash.
pub const SHARED_CONTENT_MIN: usize = 256;
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

/// Reads one line of at most `max` bytes into `buf` (without the newline). Returns `None` at
/// end of file, else whether the line was too long (then `buf` is empty and the rest of the
/// line was skipped without being kept in memory).
fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(any.then_some(too_long));
        }
        any = true;
        let (chunk, consumed, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
                buf.shrink_to(64 << 10);
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(consumed);
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(too_long));
        }
    }
}

/// A validation error for line `line`.
fn err(line: u32, code: &str, param: Option<&str>, message: String) -> LineError {
    LineError {
        code: code.into(),
        message,
        param: param.map(str::to_string),
        line: Some(line),
    }
}

/// Characters of a value quoted in a validation error: an error never copies a large value (a
/// 32 MiB url would otherwise be stored in the batch and sent on every GET).
const QUOTED: usize = 64;

/// A value as a validation error quotes it.
fn clip(s: &str) -> String {
    crate::domain::clip(s, QUOTED)
}

/// JSON's name for a value's type, for "must be a string, got a number".
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A missing field and a field of the wrong type get different errors.
fn field_error(line_no: u32, param: &str, v: Option<&Value>, want: &str) -> LineError {
    match v {
        None => err(
            line_no,
            "missing_required_parameter",
            Some(param),
            format!("line {line_no}: {param} is missing (it must be {want})"),
        ),
        Some(v) => err(
            line_no,
            "invalid_type",
            Some(param),
            format!(
                "line {line_no}: {param} must be {want}, got {}",
                type_name(v)
            ),
        ),
    }
}

/// What the body of each endpoint must carry (so that a typo such as `"message"` fails at
/// validation instead of reaching the backend, which may answer an empty 200).
fn check_body(line_no: u32, endpoint: Endpoint, body: &Value) -> Result<(), LineError> {
    match endpoint {
        Endpoint::ChatCompletions => {
            let ms = body.get("messages");
            let Some(list) = ms.and_then(Value::as_array) else {
                return Err(field_error(
                    line_no,
                    "body.messages",
                    ms,
                    "an array of messages",
                ));
            };
            if list.is_empty() {
                return Err(err(
                    line_no,
                    "invalid_value",
                    Some("body.messages"),
                    format!("line {line_no}: body.messages must not be empty"),
                ));
            }
            for (i, m) in list.iter().enumerate() {
                let role = m.get("role");
                if !role.is_some_and(Value::is_string) {
                    let param = format!("body.messages[{i}].role");
                    return Err(if m.is_object() {
                        field_error(line_no, &param, role, "a string")
                    } else {
                        field_error(
                            line_no,
                            &format!("body.messages[{i}]"),
                            Some(m),
                            "an object",
                        )
                    });
                }
            }
            Ok(())
        }
        Endpoint::Embeddings => match body.get("input") {
            Some(Value::String(_)) => Ok(()),
            Some(Value::Array(a)) if !a.is_empty() => Ok(()),
            Some(Value::Array(_)) => Err(err(
                line_no,
                "invalid_value",
                Some("body.input"),
                format!("line {line_no}: body.input must not be empty"),
            )),
            other => Err(field_error(
                line_no,
                "body.input",
                other,
                "a string or an array",
            )),
        },
        Endpoint::Completions => match body.get("prompt") {
            Some(Value::String(_) | Value::Array(_)) => Ok(()),
            other => Err(field_error(
                line_no,
                "body.prompt",
                other,
                "a string or an array",
            )),
        },
    }
}

/// The rules of one line that need no other line. Returns the line's custom_id, model and body.
pub(crate) fn check_line(
    line_no: u32,
    bytes: &[u8],
    endpoint: Endpoint,
    backend: BackendKind,
) -> Result<(String, String, Value), LineError> {
    // A byte-order mark (Windows editors write one) is not part of the JSON.
    let bytes = if line_no == 1 {
        bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
    } else {
        bytes
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        err(
            line_no,
            "invalid_json_line",
            None,
            format!("line {line_no} is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err(err(
            line_no,
            "invalid_request",
            None,
            format!(
                "line {line_no} must be a JSON object, got {}",
                type_name(&v)
            ),
        ));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(err(
                line_no,
                "invalid_value",
                Some("custom_id"),
                format!("line {line_no}: custom_id must not be empty"),
            ));
        }
        other => {
            return Err(field_error(
                line_no,
                "custom_id",
                other,
                "a non-empty string",
            ));
        }
    };
    match obj.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        Some(Value::String(m)) => {
            return Err(err(
                line_no,
                "invalid_method",
                Some("method"),
                format!("line {line_no}: method must be \"POST\", got '{}'", clip(m)),
            ));
        }
        other => return Err(field_error(line_no, "method", other, "\"POST\"")),
    }
    match obj.get("url") {
        Some(Value::String(u)) if u == endpoint.as_str() => {}
        Some(Value::String(u)) => {
            return Err(err(
                line_no,
                "invalid_url",
                Some("url"),
                format!(
                    "line {line_no}: url '{}' does not match the batch endpoint '{}'",
                    clip(u),
                    endpoint.as_str()
                ),
            ));
        }
        other => return Err(field_error(line_no, "url", other, "a string")),
    }
    let body = match obj.remove("body") {
        Some(b @ Value::Object(_)) => b,
        other => {
            return Err(field_error(
                line_no,
                "body",
                other.as_ref(),
                "a JSON object",
            ));
        }
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) => {
            return Err(err(
                line_no,
                "invalid_value",
                Some("body.model"),
                format!("line {line_no}: body.model must not be empty"),
            ));
        }
        other => {
            return Err(field_error(
                line_no,
                "body.model",
                other,
                "a non-empty string",
            ));
        }
    };
    if body.get("stream") == Some(&Value::Bool(true)) {
        return Err(err(
            line_no,
            "invalid_value",
            Some("body.stream"),
            format!("line {line_no}: stream: true is not supported in a batch"),
        ));
    }
    check_body(line_no, endpoint, &body)?;
    crate::backend::check_line(backend, endpoint, &body).map_err(|reason| {
        err(
            line_no,
            "unsupported_parameter",
            Some("body"),
            format!("line {line_no}: {reason}"),
        )
    })?;
    Ok((custom_id, model, body))
}

/// Remembers the last few shared contents so a repeated system prompt is compared, not hashed
/// and written again, on every line.
#[derive(Default)]
struct SharedContents {
    recent: Vec<(String, [u8; 32])>,
}

impl SharedContents {
    fn hash_of(&mut self, store: &Store, content: String) -> Result<[u8; 32], StoreError> {
        if let Some((_, h)) = self.recent.iter().find(|(c, _)| *c == content) {
            return Ok(*h);
        }
        let h: [u8; 32] = Sha256::digest(content.as_bytes()).into();
        store.put_blob(&h, content.as_bytes())?;
        if self.recent.len() == 8 {
            self.recent.remove(0);
        }
        self.recent.push((content, h));
        Ok(h)
    }
}

/// Takes long message contents out of a chat body and into `blobs`; returns the stored body
/// and the line's prefix group: a hash of the model and the leading system/developer messages
/// (lines with the same group share the prompt prefix a model server can cache).
fn store_body(
    store: &Store,
    shared: &mut SharedContents,
    mut body: Value,
) -> Result<(StoredBody, u64), StoreError> {
    use std::hash::{Hash, Hasher};
    // SipHash with fixed keys: the same group in every process (the value is stored anyway).
    let mut group = std::collections::hash_map::DefaultHasher::new();
    body.get("model")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .hash(&mut group);
    let mut leading = true;
    let mut refs = Vec::new();
    if let Some(messages) = body.get_mut("messages").and_then(Value::as_array_mut) {
        for (i, m) in messages.iter_mut().enumerate() {
            leading = leading
                && matches!(
                    m.get("role").and_then(Value::as_str),
                    Some("system" | "developer")
                );
            if let Some(content) = m.get_mut("content")
                && content
                    .as_str()
                    .is_some_and(|s| s.len() >= SHARED_CONTENT_MIN)
            {
                let Value::String(text) = content.take() else {
                    continue;
                };
                *content = Value::String(String::new());
                let h = shared.hash_of(store, text)?;
                if leading {
                    h.hash(&mut group);
                }
                refs.push((i as u32, h));
            } else if leading {
                m.to_string().hash(&mut group);
            }
        }
    }
    Ok((
        StoredBody {
            json: body.to_string(),
            refs,
        },
        group.finish(),
    ))
}

/// Rebuilds a line's body for dispatch: shared contents put back, the model mapped.
pub fn materialize(
    store: &Store,
    stored: &StoredBody,
    model: Option<&str>,
) -> Result<Value, String> {
    let mut body: Value =
        serde_json::from_str(&stored.json).map_err(|e| format!("stored body is not JSON: {e}"))?;
    for (idx, hash) in &stored.refs {
        let blob = store
            .get_blob(hash)
            .map_err(|e| e.to_string())?
            .ok_or("a shared content is missing from the store")?;
        let text = String::from_utf8(blob).map_err(|_| "a shared content is not UTF-8")?;
        if let Some(m) = body
            .get_mut("messages")
            .and_then(|ms| ms.get_mut(*idx as usize))
        {
            m["content"] = Value::String(text);
        }
    }
    if let Some(model) = model {
        body["model"] = Value::String(model.to_string());
    }
    Ok(body)
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
        return reject(store, batch_id, errors).map(Validated::Done);
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
    batch_id: BatchId,
    errors: Vec<LineError>,
) -> Result<IntakeOutcome, StoreError> {
    store.delete_requests(batch_id)?;
    let n = errors.len();
    let result = store.update_batch(batch_id, &[BatchStatus::Validating], |b| {
        b.status = BatchStatus::Failed;
        b.failed_at = Some(unix_now());
        b.errors = errors.clone();
    });
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
    let mut unlisted = 0usize;
    let mut seen: HashSet<String> = HashSet::new();
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
        if !seen.insert(custom_id.clone()) {
            push_err(
                &mut errors,
                err(
                    line_no,
                    "duplicate_custom_id",
                    Some("custom_id"),
                    format!(
                        "line {line_no}: custom_id '{}' is used more than once",
                        clip(&custom_id)
                    ),
                ),
            );
            continue;
        }
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

//! `/v1/files`: upload (streamed to disk), list, retrieve, delete, content.

use super::{ApiError, AppState};
use crate::domain::FileRecord;
use crate::domain::{BatchStatus, FileId, unix_now};
use crate::wire::{file_object, list_page};
use axum::Json;
use axum::body::Body;
use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Multipart, Path, Query, State, multipart::MultipartRejection};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::PathBuf;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

/// Purposes accepted at upload.
const PURPOSES: &[&str] = &[
    "batch",
    "assistants",
    "fine-tune",
    "vision",
    "user_data",
    "evals",
];

/// Removes a scratch file unless the upload succeeded.
struct Scratch(Option<PathBuf>);

impl Drop for Scratch {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn multipart_error(e: axum::extract::multipart::MultipartError) -> ApiError {
    if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::too_large(format!("the upload is too large: {}", e.body_text()))
    } else {
        ApiError::bad(None, format!("malformed multipart body: {}", e.body_text()))
    }
}

/// The next chunk of a field, or 408 when the client sends nothing for `idle`: a stalled
/// upload must not hold its connection and scratch file for ever.
async fn next_chunk(
    field: &mut axum::extract::multipart::Field<'_>,
    idle: Duration,
) -> Result<Option<axum::body::Bytes>, ApiError> {
    match tokio::time::timeout(idle, field.chunk()).await {
        Ok(r) => r.map_err(multipart_error),
        Err(_) => Err(ApiError::timeout(format!(
            "the upload stalled: nothing received for {} (--client-timeout)",
            humantime::format_duration(idle)
        ))),
    }
}

/// Reads a small text field (at most 1 KiB).
async fn small_text(
    field: &mut axum::extract::multipart::Field<'_>,
    name: &'static str,
    idle: Duration,
) -> Result<String, ApiError> {
    let mut buf = Vec::new();
    while let Some(chunk) = next_chunk(field, idle).await? {
        buf.extend_from_slice(&chunk);
        if buf.len() > 1024 {
            return Err(ApiError::bad(Some(name), format!("'{name}' is too long")));
        }
    }
    String::from_utf8(buf).map_err(|_| ApiError::bad(Some(name), format!("'{name}' is not UTF-8")))
}

/// Reads and discards up to `cap` more bytes of an over-large upload, so that the client, which
/// is still sending, gets to read the 413 instead of a reset connection (most clients, the
/// openai SDKs among them, read the answer only after sending the whole body). Past the budget
/// (the limit again, at least 64 MiB) the connection is closed. Returns the budget left.
async fn drain_field(
    field: &mut axum::extract::multipart::Field<'_>,
    mut cap: u64,
    idle: Duration,
) -> u64 {
    while let Ok(Ok(Some(chunk))) = tokio::time::timeout(idle, field.chunk()).await {
        cap = cap.saturating_sub(chunk.len() as u64);
        if cap == 0 {
            break;
        }
    }
    cap
}

/// [`drain_field`] for every remaining field.
async fn drain_rest(mp: &mut Multipart, mut cap: u64, idle: Duration) {
    while cap > 0 {
        match tokio::time::timeout(idle, mp.next_field()).await {
            Ok(Ok(Some(mut f))) => cap = drain_field(&mut f, cap, idle).await,
            _ => break,
        }
    }
}

/// Copies a field into `out` (or discards it) while it stays within `limit` bytes. Returns the
/// bytes copied, or `None` as soon as the field passes the limit (the rest is left unread).
async fn copy_field(
    field: &mut axum::extract::multipart::Field<'_>,
    mut out: Option<&mut tokio::fs::File>,
    limit: u64,
    idle: Duration,
) -> Result<Option<u64>, ApiError> {
    let mut seen: u64 = 0;
    while let Some(chunk) = next_chunk(field, idle).await? {
        seen += chunk.len() as u64;
        if seen > limit {
            return Ok(None);
        }
        if let Some(out) = out.as_mut() {
            out.write_all(&chunk).await.map_err(ApiError::io)?;
        }
    }
    Ok(Some(seen))
}

fn too_large(limit: u64) -> ApiError {
    ApiError::too_large(format!(
        "the file is larger than the limit of {limit} bytes (--max-file-size)"
    ))
}

/// `POST /v1/files`. The route has no framework body limit: the file field and any unknown
/// field are counted here against `--max-file-size`, `purpose` against 1 KiB.
///
/// The whole upload runs in a tracked task of its own: a client that sends its file and closes
/// the connection at once (a script that does not wait for the answer, a killed client) makes
/// hyper drop the request's future, and the upload used to go with it. A complete body is
/// stored; one cut off mid-way is discarded.
pub async fn upload(
    State(st): State<AppState>,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let s = st.clone();
    super::detached(&st, async move { receive(s, headers, mp).await }).await
}

async fn receive(
    st: AppState,
    headers: HeaderMap,
    mp: Result<Multipart, MultipartRejection>,
) -> Result<Json<Value>, ApiError> {
    let limit = st.cfg.max_file_size;
    let idle = st.cfg.client_timeout;
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let waits_for_continue = headers
        .get(header::EXPECT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if waits_for_continue && declared.is_some_and(|n| n > limit.saturating_add(1 << 20)) {
        // The client has not sent the body yet and will not: answer before reading it.
        return Err(too_large(limit));
    }
    let mut mp = mp.map_err(|e| {
        ApiError::bad(
            None,
            format!("expected a multipart/form-data body with 'file' and 'purpose': {e}"),
        )
    })?;
    let id = FileId::new();
    let scratch_path = st.store.scratch_path(id);
    let mut scratch = Scratch(None);
    let mut purpose: Option<String> = None;
    let (mut anchor, mut seconds): (Option<String>, Option<String>) = (None, None);
    let mut file: Option<(String, u64)> = None;
    // Set when a field passes the limit: how much more of the body may still be drained.
    let mut over_limit: Option<u64> = None;
    loop {
        let next = tokio::time::timeout(idle, mp.next_field())
            .await
            .map_err(|_| {
                ApiError::timeout("the upload stalled between form fields (--client-timeout)")
            })?;
        let Some(mut field) = next.map_err(multipart_error)? else {
            break;
        };
        let copied = match field.name() {
            Some("purpose") => {
                purpose = Some(small_text(&mut field, "purpose", idle).await?);
                continue;
            }
            // The openai SDKs send `expires_after={"anchor", "seconds"}` as these two fields.
            Some("expires_after[anchor]") => {
                anchor = Some(small_text(&mut field, "expires_after[anchor]", idle).await?);
                continue;
            }
            Some("expires_after[seconds]") => {
                seconds = Some(small_text(&mut field, "expires_after[seconds]", idle).await?);
                continue;
            }
            Some("file") if file.is_none() => {
                let filename = field
                    .file_name()
                    .map(|n| n.chars().filter(|c| !c.is_control()).take(255).collect())
                    .unwrap_or_else(|| "upload.jsonl".to_string());
                let mut out = tokio::fs::File::create(&scratch_path)
                    .await
                    .map_err(ApiError::io)?;
                scratch.0 = Some(scratch_path.clone());
                let copied = copy_field(&mut field, Some(&mut out), limit, idle).await?;
                if let Some(written) = copied {
                    out.sync_all().await.map_err(ApiError::io)?;
                    file = Some((filename, written));
                }
                copied
            }
            // Unknown fields are read and ignored, within the same limit as a file.
            _ => copy_field(&mut field, None, limit, idle).await?,
        };
        if copied.is_none() {
            over_limit = Some(drain_field(&mut field, limit.max(64 << 20), idle).await);
            break;
        }
    }
    if let Some(budget) = over_limit {
        drain_rest(&mut mp, budget, idle).await;
        return Err(too_large(limit));
    }
    let purpose = purpose
        .ok_or_else(|| ApiError::bad(Some("purpose"), "missing required parameter: 'purpose'"))?;
    if !PURPOSES.contains(&purpose.as_str()) {
        return Err(ApiError::bad(
            Some("purpose"),
            format!(
                "invalid purpose '{purpose}': expected one of {}",
                PURPOSES.join(", ")
            ),
        ));
    }
    let (filename, bytes) =
        file.ok_or_else(|| ApiError::bad(Some("file"), "missing required parameter: 'file'"))?;
    let expires_after = match (&anchor, &seconds) {
        (None, None) => None,
        _ => Some(expires_after(
            anchor.as_deref(),
            seconds.as_deref(),
            "expires_after",
            st.cfg.min_expiry_seconds,
        )?),
    };
    // The whole body is in: publishing the file finishes even if the client goes away now.
    scratch.0 = None;
    let s = st.clone();
    let rec = super::detached(&st, async move {
        let mut scratch = Scratch(Some(scratch_path.clone()));
        let (from, to) = (scratch_path.clone(), s.store.file_path(id));
        tokio::task::spawn_blocking(move || crate::store::files::publish(&from, &to))
            .await
            .map_err(|e| ApiError::io(std::io::Error::other(e.to_string())))?
            .map_err(ApiError::io)?;
        scratch.0 = None;
        let now = unix_now();
        let rec = FileRecord {
            id,
            bytes,
            created_at: now,
            filename,
            purpose,
            expires_at: expiry_of(&s, expires_after, now),
        };
        s.store.put_file(&rec)?;
        s.store.flush_async().await?;
        tracing::info!(file = %id, bytes, "file uploaded");
        Ok(rec)
    })
    .await?;
    Ok(Json(file_object(&rec)))
}

/// OpenAI's `expires_after` / `output_expires_after`: anchor `created_at` (the file's own
/// creation), `seconds` from `min` (3600) to 2592000 (30 days). The seconds, or a 400 naming
/// `param`.
pub(super) fn expires_after(
    anchor: Option<&str>,
    seconds: Option<&str>,
    param: &str,
    min: u64,
) -> Result<u64, ApiError> {
    const MAX: u64 = 2_592_000;
    let (anchor_param, seconds_param) = if param == "expires_after" {
        ("expires_after.anchor", "expires_after.seconds")
    } else {
        (
            "output_expires_after.anchor",
            "output_expires_after.seconds",
        )
    };
    // What was sent, quoted and clipped, for the message.
    let got = |v: Option<&str>| {
        v.map_or("nothing".into(), |v| {
            format!("'{}'", crate::domain::clip(v, 40))
        })
    };
    if anchor != Some("created_at") {
        return Err(ApiError::bad(
            Some(anchor_param),
            format!("{param}.anchor must be 'created_at', got {}", got(anchor)),
        ));
    }
    match seconds.and_then(|s| s.trim().parse::<u64>().ok()) {
        Some(n) if (min..=MAX).contains(&n) => Ok(n),
        _ => Err(ApiError::bad(
            Some(seconds_param),
            format!(
                "{param}.seconds must be an integer from {min} (an hour) to {MAX} (30 days), got {}",
                got(seconds)
            ),
        )),
    }
}

/// When a file made now expires: `seconds` after now, else `--file-retention` after now, else
/// never.
pub(super) fn expiry_of(st: &AppState, seconds: Option<u64>, now: i64) -> Option<i64> {
    seconds
        .or(st.cfg.file_retention.map(|d| d.as_secs()))
        .map(|s| now.saturating_add(i64::try_from(s).unwrap_or(i64::MAX)))
}

/// Parses a file id from the path; anything malformed is simply not found.
fn file_id(path: Result<Path<String>, PathRejection>) -> Result<FileId, ApiError> {
    let raw = path.map(|Path(s)| s).unwrap_or_default();
    FileId::parse(&raw).ok_or_else(|| ApiError::not_found("File", &raw, "file_id"))
}

/// A file that exists and has not expired (an expired file is gone for clients at once, even
/// before the sweep deletes its bytes).
async fn load(st: &AppState, id: FileId) -> Result<FileRecord, ApiError> {
    st.store
        .get_file(id)?
        .filter(|f| !f.is_expired(unix_now()))
        .ok_or_else(|| ApiError::not_found("File", &id.to_string(), "file_id"))
}

/// `GET /v1/files/{id}`
pub async fn retrieve(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = file_id(path)?;
    Ok(Json(file_object(&load(&st, id).await?)))
}

/// `DELETE /v1/files/{id}`. A file that a batch is still validating from cannot be deleted.
pub async fn delete(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = file_id(path)?;
    load(&st, id).await?;
    let in_use = st
        .store
        .unfinished_batches()?
        .into_iter()
        .any(|b| b.input_file_id == id && b.status == BatchStatus::Validating);
    if in_use {
        return Err(ApiError::conflict(format!(
            "file {id} is being validated by a batch; delete it after validation"
        )));
    }
    st.store.delete_file(id)?;
    st.store.flush_async().await?;
    Ok(Json(
        json!({"id": id.to_string(), "object": "file", "deleted": true}),
    ))
}

/// `GET /v1/files/{id}/content`: the bytes, streamed from disk.
pub async fn content(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Response, ApiError> {
    let id = file_id(path)?;
    let rec = load(&st, id).await?;
    let f = tokio::fs::File::open(st.store.file_path(id))
        .await
        .map_err(|_| ApiError::not_found("File", &id.to_string(), "file_id"))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(f, 256 << 10));
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::CONTENT_LENGTH, rec.bytes.to_string()),
        ],
        body,
    )
        .into_response())
}

/// Query of `GET /v1/files`.
#[derive(Deserialize)]
pub struct ListQuery {
    purpose: Option<String>,
    limit: Option<i64>,
    after: Option<String>,
    order: Option<String>,
}

/// `GET /v1/files`
pub async fn list(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(None, format!("invalid query: {e}")))?;
    let limit = q.limit.unwrap_or(10_000);
    if !(1..=10_000).contains(&limit) {
        return Err(ApiError::bad(
            Some("limit"),
            "limit must be between 1 and 10000",
        ));
    }
    let desc = match q.order.as_deref() {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(_) => {
            return Err(ApiError::bad(
                Some("order"),
                "order must be 'asc' or 'desc'",
            ));
        }
    };
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            FileId::parse(a)
                .ok_or_else(|| ApiError::bad(Some("after"), format!("invalid cursor '{a}'")))?,
        ),
    };
    let (files, more) = st
        .store
        .list_files(q.purpose.as_deref(), after, limit as usize, desc)?;
    // An expired file is gone for clients, swept or not.
    let now = unix_now();
    Ok(Json(list_page(
        files
            .iter()
            .filter(|f| !f.is_expired(now))
            .map(file_object)
            .collect(),
        more,
    )))
}

//! `/v1/batches`: create (then the intake runs in the background), list, retrieve, cancel.

use super::{ApiError, AppState};
use crate::domain::{BatchId, BatchRecord, BatchStatus, Endpoint, unix_now};
use crate::store::TransitionError;
use crate::supervisor::{Command, spawn_intake};
use crate::wire::{batch_object, list_page};
use axum::Json;
use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use serde::Deserialize;
use serde_json::Value;
use std::collections::BTreeMap;

fn render(st: &AppState, b: &BatchRecord) -> Value {
    let live = if b.status.is_terminal() {
        None
    } else {
        st.supervisor.live.batch(b.id)
    };
    batch_object(b, live)
}

fn metadata(v: Option<&Value>) -> Result<Option<BTreeMap<String, String>>, ApiError> {
    let bad = |m: String| ApiError::bad(Some("metadata"), m);
    match v {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Object(map)) => {
            if map.len() > 16 {
                return Err(bad("metadata may have at most 16 pairs".into()));
            }
            let mut out = BTreeMap::new();
            for (k, v) in map {
                if k.chars().count() > 64 {
                    return Err(bad(format!(
                        "metadata key '{k}' is longer than 64 characters"
                    )));
                }
                let Value::String(s) = v else {
                    return Err(bad(format!("metadata value of '{k}' must be a string")));
                };
                if s.chars().count() > 512 {
                    return Err(bad(format!(
                        "metadata value of '{k}' is longer than 512 characters"
                    )));
                }
                out.insert(k.clone(), s.clone());
            }
            Ok(Some(out))
        }
        Some(_) => Err(bad("metadata must be an object of strings".into())),
    }
}

/// A required string parameter of a create: missing, or of another type, said as such.
fn string_param<'a>(
    obj: &'a serde_json::Map<String, Value>,
    name: &'static str,
) -> Result<&'a str, ApiError> {
    match obj.get(name) {
        Some(Value::String(s)) => Ok(s),
        None | Some(Value::Null) => Err(ApiError::bad(
            Some(name),
            format!("missing required parameter: '{name}'"),
        )),
        Some(other) => Err(ApiError::bad(
            Some(name),
            format!(
                "invalid type for '{name}': expected a string, got {}",
                match other {
                    Value::Bool(_) => "a boolean",
                    Value::Number(_) => "a number",
                    Value::Array(_) => "an array",
                    _ => "an object",
                }
            ),
        )),
    }
}

/// `POST /v1/batches`
pub async fn create(
    State(st): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::too_large("the request body is too large")
        } else {
            ApiError::bad(None, format!("cannot read the request body: {e}"))
        }
    })?;
    // A JSON content type: a web page can send `text/plain` across sites without asking.
    let json = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| c.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .is_some_and(|t| t == "application/json" || t.ends_with("+json"));
    if !json {
        return Err(ApiError::unsupported_media_type(
            "the request body must be JSON, sent with 'Content-Type: application/json'",
        ));
    }
    let v: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad(None, format!("the request body is not valid JSON: {e}")))?;
    let Value::Object(obj) = v else {
        return Err(ApiError::bad(
            None,
            "the request body must be a JSON object",
        ));
    };
    let input = string_param(&obj, "input_file_id")?;
    let endpoint_raw = string_param(&obj, "endpoint")?;
    let endpoint = Endpoint::parse(endpoint_raw).ok_or_else(|| {
        ApiError::bad(
            Some("endpoint"),
            format!(
                "unsupported endpoint '{endpoint_raw}': this server runs /v1/responses, /v1/chat/completions, /v1/embeddings and /v1/completions"
            ),
        )
    })?;
    let window = string_param(&obj, "completion_window")?;
    if window != "24h" {
        return Err(ApiError::bad(
            Some("completion_window"),
            format!("completion_window must be '24h', got '{window}'"),
        ));
    }
    let metadata = metadata(obj.get("metadata"))?;
    if let Some(mode) = metadata.as_ref().and_then(|m| m.get("mode")) {
        check_mode(&st.cfg, endpoint, mode)?;
    }
    if let Some(url) = metadata
        .as_ref()
        .and_then(|m| m.get(crate::webhook::META_WEBHOOK_URL))
    {
        if !st.cfg.webhook_allow_metadata {
            return Err(ApiError::bad(
                Some("metadata.webhook_url"),
                "this server does not call addresses a batch names (start it with --webhook-allow-metadata and --webhook-secret to allow metadata webhook_url)",
            ));
        }
        crate::config::check_receiver_url(url)
            .map_err(|e| ApiError::bad(Some("metadata.webhook_url"), e))?;
    }
    if let Some(reuse) = metadata
        .as_ref()
        .and_then(|m| m.get(crate::domain::META_REUSE))
        .filter(|v| !matches!(v.as_str(), "true" | "false"))
    {
        return Err(ApiError::bad(
            Some("metadata.reuse"),
            format!(
                "metadata reuse must be 'true' or 'false', got '{}'",
                crate::domain::clip(reuse, 40)
            ),
        ));
    }
    let output_expiry = match obj.get("output_expires_after") {
        None | Some(Value::Null) => None,
        Some(Value::Object(e)) => Some(super::files::expires_after(
            e.get("anchor").and_then(Value::as_str),
            e.get("seconds")
                .map(|s| match s {
                    Value::String(t) => t.clone(),
                    other => other.to_string(),
                })
                .as_deref(),
            "output_expires_after",
            st.cfg.min_expiry_seconds,
        )?),
        Some(_) => {
            return Err(ApiError::bad(
                Some("output_expires_after"),
                "output_expires_after must be an object: {\"anchor\": \"created_at\", \"seconds\": N}",
            ));
        }
    };
    let file_id = crate::domain::FileId::parse(input)
        .ok_or_else(|| ApiError::not_found("File", input, "input_file_id"))?;
    let file = st
        .store
        .get_file(file_id)?
        .filter(|f| !f.is_expired(unix_now()))
        .ok_or_else(|| ApiError::not_found("File", input, "input_file_id"))?;
    if file.purpose != "batch" {
        return Err(ApiError::bad(
            Some("input_file_id"),
            format!(
                "file {input} has purpose '{}'; a batch input needs purpose 'batch'",
                file.purpose
            ),
        ));
    }
    let rec = start_batch(&st, endpoint, file_id, metadata, output_expiry).await?;
    Ok(Json(batch_object(&rec, None)))
}

/// A batch's metadata `mode` (an extension: `independent` or `conversation`; the openai SDKs pass
/// metadata through) must name a mode this server can run for the endpoint.
fn check_mode(cfg: &crate::config::Config, endpoint: Endpoint, mode: &str) -> Result<(), ApiError> {
    let bad = |m: String| ApiError::bad(Some("metadata.mode"), m);
    match crate::config::Mode::parse(mode) {
        None => Err(bad(format!(
            "metadata mode must be 'independent' or 'conversation', got '{}'",
            crate::domain::clip(mode, 40)
        ))),
        Some(crate::config::Mode::Conversation) if endpoint != Endpoint::ChatCompletions => {
            Err(bad(format!(
                "conversation mode runs chat completions only; this batch's endpoint is {}",
                endpoint.as_str()
            )))
        }
        Some(crate::config::Mode::Conversation) if cfg.num_ctx.is_none() => Err(bad(
            "conversation mode needs the server started with --num-ctx (the context of one call), to keep each conversation's history within it".into(),
        )),
        Some(_) => Ok(()),
    }
}

/// Writes a new batch (`validating`) on an input file and starts its intake. From the first
/// write on, the batch exists: its intake starts whether or not the client is still there.
async fn start_batch(
    st: &AppState,
    endpoint: Endpoint,
    file_id: crate::domain::FileId,
    metadata: Option<BTreeMap<String, String>>,
    output_expiry: Option<u64>,
) -> Result<BatchRecord, ApiError> {
    let now = unix_now();
    let rec = BatchRecord::new(
        endpoint,
        file_id,
        now,
        st.cfg
            .expire
            .then_some(now + st.cfg.completion_window.as_secs() as i64),
        metadata,
    );
    let s = st.clone();
    super::detached(st, async move {
        // Before the batch: a batch never exists without the expiry it was created with.
        if let Some(secs) = output_expiry {
            s.store.put_output_expiry(rec.id, secs)?;
        }
        s.store.put_batch(&rec)?;
        s.store.flush_async().await?;
        tracing::info!(batch = %rec.id, file = %file_id, endpoint = endpoint.as_str(), "batch created");
        s.supervisor
            .notices
            .send(crate::live::Notice::BatchCreated {
                id: rec.id.to_string(),
            });
        spawn_intake(
            s.store.clone(),
            s.cfg.clone(),
            s.supervisor.clone(),
            &s.tracker,
            rec.id,
        );
        Ok(rec)
    })
    .await
}

/// `POST /batches/{id}/retry` (an extension, outside `/v1`): a new batch of exactly the lines of
/// a finished batch that did not succeed (failed, expired, cancelled, never run), with their
/// original bodies, in input order. Its metadata says `retry_of`. 409 when the batch is not
/// finished or has no such line.
pub async fn retry(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = batch_id(path)?;
    let b = load(&st, id)?;
    if !matches!(
        b.status,
        BatchStatus::Completed | BatchStatus::Cancelled | BatchStatus::Expired
    ) {
        return Err(ApiError::conflict(format!(
            "Cannot retry a batch with status '{}': only completed, cancelled or expired batches have lines to retry.",
            b.status.as_str()
        )));
    }
    // One retry at a time: a second retry of a batch that already has one gets that one (two
    // clicks, or two scripts, make one batch).
    let held = st.retries.clone().lock_owned().await;
    if let Some(existing) = retry_of(&st, id)? {
        return Ok(Json(batch_object(&existing, None)));
    }
    // The file, its record and the new batch are made together even if the client leaves.
    let s = st.clone();
    let new = super::detached(&st, async move {
        let _held = held;
        let file_id = crate::domain::FileId::new();
        let store = s.store.clone();
        let written = tokio::task::spawn_blocking(move || {
            crate::supervisor::finalize::write_retry_file(&store, id, b.endpoint, file_id)
        })
        .await
        .map_err(ApiError::internal)??;
        let Some(bytes) = written else {
            return Err(ApiError::conflict(format!(
                "batch {id} has no failed, expired or cancelled lines to retry"
            )));
        };
        let rec = crate::domain::FileRecord {
            id: file_id,
            bytes,
            created_at: unix_now(),
            filename: format!("{id}_retry.jsonl"),
            purpose: "batch".into(),
            expires_at: None,
        };
        s.store.put_file(&rec)?;
        let mut metadata = b.metadata.clone().unwrap_or_default();
        // What described the original input does not describe this one (another file): a
        // client that finds batches by its input's hash (`run`) must not take the retry for
        // the original.
        for key in RETRY_DROPS {
            metadata.remove(*key);
        }
        metadata.insert("retry_of".into(), id.to_string());
        start_batch(&s, b.endpoint, file_id, Some(metadata), None).await
    })
    .await?;
    Ok(Json(batch_object(&new, None)))
}

/// Metadata of the original that a retry batch does not copy: `run`'s description of its input.
const RETRY_DROPS: &[&str] = &["input_sha256", "input_name"];

/// The retry batch already made of batch `id`, if any (newest first).
fn retry_of(st: &AppState, id: BatchId) -> Result<Option<BatchRecord>, ApiError> {
    let wanted = id.to_string();
    let mut after = None;
    loop {
        let (page, more) = st.store.list_batches(after, 500)?;
        if let Some(b) = page.iter().find(|b| {
            b.metadata
                .as_ref()
                .and_then(|m| m.get("retry_of"))
                .is_some_and(|r| *r == wanted)
        }) {
            return Ok(Some(b.clone()));
        }
        match page.last() {
            Some(last) if more => after = Some(last.id),
            _ => return Ok(None),
        }
    }
}

/// The next chunk (about 256 KiB) of `/results` lines after line `after`, and the line to
/// resume after (`None`: the batch's lines are all read).
fn results_chunk(
    store: &crate::store::Store,
    id: BatchId,
    after: u32,
    want_ok: bool,
    want_failed: bool,
) -> Result<(String, Option<u32>), crate::store::StoreError> {
    let mut chunk = String::new();
    for item in store.batch_requests_after(id, after) {
        let (key, rec) = item?;
        let wanted = match rec.state {
            crate::domain::RequestState::Succeeded => want_ok,
            crate::domain::RequestState::Failed => want_failed,
            _ => false,
        };
        if let Some(result) = rec.result.as_ref().filter(|_| wanted) {
            chunk.push_str(&crate::wire::output_line(key, &rec.custom_id, result));
            chunk.push('\n');
        }
        if chunk.len() >= 256 << 10 {
            return Ok((chunk, Some(key.line)));
        }
    }
    Ok((chunk, None))
}

/// A batch's record, or 404.
fn load(st: &AppState, id: BatchId) -> Result<BatchRecord, ApiError> {
    st.store
        .get_batch(id)?
        .ok_or_else(|| ApiError::not_found("Batch", &id.to_string(), "batch_id"))
}

fn batch_id(path: Result<Path<String>, PathRejection>) -> Result<BatchId, ApiError> {
    let raw = path.map(|Path(s)| s).unwrap_or_default();
    BatchId::parse(&raw).ok_or_else(|| ApiError::not_found("Batch", &raw, "batch_id"))
}

/// `GET /v1/batches/{id}`
pub async fn retrieve(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = batch_id(path)?;
    let b = load(&st, id)?;
    Ok(Json(render(&st, &b)))
}

/// `POST /v1/batches/{id}/cancel`. Cancelling a batch that is already cancelling or
/// cancelled answers the batch as it is; a finished batch is a 409.
pub async fn cancel(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
) -> Result<Json<Value>, ApiError> {
    let id = batch_id(path)?;
    // The move to `cancelling` and telling the supervisor happen together or not at all, even
    // if the client goes away.
    let s = st.clone();
    let moved = super::detached(&st, async move {
        let moved = s.store.update_batch(
            id,
            &[BatchStatus::Validating, BatchStatus::InProgress],
            |b| {
                b.status = BatchStatus::Cancelling;
                b.cancelling_at = Some(unix_now());
            },
        );
        if moved.is_ok() {
            s.store.flush_async().await?;
            s.supervisor.send(Command::Cancel(id)).await;
            tracing::info!(batch = %id, "cancel requested");
        }
        Ok(moved)
    })
    .await?;
    match moved {
        Ok(b) => Ok(Json(render(&st, &b))),
        Err(TransitionError::NotFound) => {
            Err(ApiError::not_found("Batch", &id.to_string(), "batch_id"))
        }
        Err(TransitionError::BatchIs(status)) => {
            if matches!(status, BatchStatus::Cancelling | BatchStatus::Cancelled) {
                let b = load(&st, id)?;
                return Ok(Json(render(&st, &b)));
            }
            Err(ApiError::conflict(format!(
                "Cannot cancel a batch with status '{}'.",
                status.as_str()
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// Query of `GET /v1/batches`.
#[derive(Deserialize)]
pub struct ListQuery {
    limit: Option<i64>,
    after: Option<String>,
}

/// `GET /v1/batches`: newest first; the page after the last is an empty list.
pub async fn list(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad(None, format!("invalid query: {e}")))?;
    let limit = q.limit.unwrap_or(20);
    if !(1..=100).contains(&limit) {
        return Err(ApiError::bad(
            Some("limit"),
            "limit must be between 1 and 100",
        ));
    }
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            BatchId::parse(a)
                .ok_or_else(|| ApiError::bad(Some("after"), format!("invalid cursor '{a}'")))?,
        ),
    };
    let (batches, more) = st.store.list_batches(after, limit as usize)?;
    Ok(Json(list_page(
        batches.iter().map(|b| render(&st, b)).collect(),
        more,
    )))
}

/// Query of `GET /batches/{id}/results`.
#[derive(Deserialize)]
pub struct ResultsQuery {
    status: Option<String>,
}

/// `GET /batches/{id}/results` (an extension, outside `/v1`): the lines of a batch that are
/// done so far, in input order, in the output / error file line format, streamed; works while
/// the batch runs (a long run is not all-or-nothing). `?status=succeeded|failed|all` (default
/// all). A result shows as soon as it is written, at most `--flush-interval` before it is
/// durable.
pub async fn results(
    State(st): State<AppState>,
    path: Result<Path<String>, PathRejection>,
    q: Result<Query<ResultsQuery>, QueryRejection>,
) -> Result<axum::response::Response, ApiError> {
    use axum::response::IntoResponse;
    let id = batch_id(path)?;
    let Query(q) = q.map_err(|e| ApiError::bad(None, format!("invalid query: {e}")))?;
    let (want_ok, want_failed) = match q.status.as_deref() {
        None | Some("all") => (true, true),
        Some("succeeded") => (true, false),
        Some("failed") => (false, true),
        Some(other) => {
            return Err(ApiError::bad(
                Some("status"),
                format!(
                    "status must be succeeded, failed or all, got '{}'",
                    other.chars().take(32).collect::<String>()
                ),
            ));
        }
    };
    load(&st, id)?;
    // One chunk at a time, each read on the blocking pool in one short step and resumed from
    // the last line sent: a reader that is slow, or stops reading, holds no thread while it
    // waits (hundreds of them used to take every blocking thread, and with them /status and
    // validation).
    let store = st.store.clone();
    let stream = futures_util::stream::unfold(Some(0u32), move |cursor| {
        let store = store.clone();
        async move {
            let after = cursor?;
            let step = tokio::task::spawn_blocking(move || {
                results_chunk(&store, id, after, want_ok, want_failed)
            })
            .await;
            match step {
                Ok(Ok((chunk, next))) if !chunk.is_empty() => {
                    Some((Ok::<axum::body::Bytes, std::io::Error>(chunk.into()), next))
                }
                Ok(Ok(_)) => None,
                Ok(Err(e)) => Some((Err(std::io::Error::other(e.to_string())), None)),
                Err(e) => Some((Err(std::io::Error::other(e.to_string())), None)),
            }
        }
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/jsonl")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}

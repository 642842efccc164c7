//! `/health` and `/status`: the operator's view.

use super::AppState;
use crate::domain::BatchStatus;
use crate::live::Live;
use crate::store::Store;
use axum::Json;
use axum::extract::State;
use serde_json::{Value, json};
use std::collections::BTreeMap;

/// `GET /health`: 200 once the server is up (it only listens after recovery); 503 once the
/// store can no longer write (disk full): a process manager's health check then knows that a
/// restart (after freeing space) is needed.
pub async fn health(State(st): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    match st.store.failure() {
        None => Json(json!({"status": "ok"})).into_response(),
        Some(error) => (
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "store_failed", "error": error})),
        )
            .into_response(),
    }
}

/// What the batch records say (one small record per batch, not the requests): how many
/// batches are in each status (every status present, 0 included), and the lines of terminal
/// batches that succeeded and failed.
struct BatchTally {
    by_status: BTreeMap<&'static str, u64>,
    succeeded: u64,
    failed: u64,
}

impl BatchTally {
    fn empty() -> BatchTally {
        BatchTally {
            by_status: BatchStatus::ALL.iter().map(|s| (s.as_str(), 0)).collect(),
            succeeded: 0,
            failed: 0,
        }
    }
}

fn tally_batches(store: &Store) -> Result<BatchTally, crate::store::StoreError> {
    let (all, _) = store.list_batches(None, usize::MAX)?;
    let mut t = BatchTally::empty();
    for b in &all {
        *t.by_status.entry(b.status.as_str()).or_default() += 1;
        if b.status.is_terminal() {
            t.succeeded += b.request_counts.completed;
            t.failed += b.request_counts.failed;
        }
    }
    Ok(t)
}

/// `/status`'s `finished`: terminal batches by status (those present), their lines that
/// succeeded and failed.
fn finished(store: &Store) -> Value {
    let t = match tally_batches(store) {
        Ok(t) => t,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read batches for /status");
            return Value::Null;
        }
    };
    let by_status: BTreeMap<&'static str, u64> = BatchStatus::ALL
        .iter()
        .filter(|s| s.is_terminal())
        .map(|s| (s.as_str(), t.by_status[s.as_str()]))
        .filter(|(_, n)| *n > 0)
        .collect();
    json!({
        "batches": by_status,
        "requests": {"succeeded": t.succeeded, "failed": t.failed},
    })
}

/// Lines of the unfinished batches by state, summed over the batches.
fn request_totals(live: &Live) -> [(&'static str, u64); 6] {
    let mut t = [
        ("queued", 0),
        ("retry_wait", 0),
        ("in_flight", 0),
        ("succeeded", 0),
        ("failed", 0),
        ("remaining", 0),
    ];
    for b in live.batches.values() {
        let c = &b.counts;
        let values = [
            b.queued,
            b.retry_wait,
            b.in_flight,
            c.completed,
            c.failed,
            c.total.saturating_sub(c.completed + c.failed),
        ];
        for (slot, v) in t.iter_mut().zip(values) {
            slot.1 += v;
        }
    }
    t
}

/// `GET /status/batches/{id}`: a batch's figures (rates, ETA, tokens and cached share, retries
/// by cause, largest prompt): live while it runs, its final figures (with duration and GPU
/// memory peak) once it finished. Outside `/v1`: not an OpenAI endpoint.
pub async fn batch_figures(
    State(st): State<AppState>,
    path: Result<axum::extract::Path<String>, axum::extract::rejection::PathRejection>,
) -> Result<Json<Value>, super::ApiError> {
    let raw = path.map(|axum::extract::Path(s)| s).unwrap_or_default();
    let id = crate::domain::BatchId::parse(&raw)
        .ok_or_else(|| super::ApiError::not_found("Batch", &raw, "batch_id"))?;
    let live = st.supervisor.live.with(|l| l.batches.get(&id).cloned());
    if let Some(b) = live {
        return Ok(Json(json!({
            "id": id.to_string(),
            "status": b.status.map(|s| s.as_str()),
            "final": false,
            "gpu_memory_peak_bytes": st.gpu.peak_used_bytes(),
            "progress": b.figures,
        })));
    }
    let store = st.store.clone();
    let kept = tokio::task::spawn_blocking(move || store.get_batch_stats(id))
        .await
        .map_err(super::ApiError::internal)??;
    match kept.map(|t| serde_json::from_str::<Value>(&t)) {
        Some(Ok(v)) => Ok(Json(v)),
        Some(Err(e)) => Err(super::ApiError::internal(e)),
        None => Err(super::ApiError::not_found(
            "Batch figures",
            &id.to_string(),
            "batch_id",
        )),
    }
}

/// `GET /metrics`: Prometheus / OpenMetrics text (see `crate::metrics`).
pub async fn metrics(State(st): State<AppState>) -> axum::response::Response {
    use axum::response::IntoResponse;
    let live = st.supervisor.live.with(|l| l.clone());
    let (limit, in_flight) = st.limits();
    // `remaining` overlaps the other states: a sum over `state` must make sense.
    let requests: Vec<(&'static str, u64)> = request_totals(&live)
        .into_iter()
        .filter(|(k, _)| *k != "remaining")
        .collect();
    let store = st.store.clone();
    let failed = st.store.failure().is_some();
    let (size, tally) = tokio::task::spawn_blocking(move || {
        if failed {
            // Not read once it failed (see `status`).
            return (
                0,
                Err(crate::store::StoreError::Io(std::io::Error::other(
                    "the store failed",
                ))),
            );
        }
        (store.size_on_disk(), tally_batches(&store))
    })
    .await
    .map_err(|e| e.to_string())
    .and_then(|(size, t)| t.map(|t| (size, t)).map_err(|e| e.to_string()))
    .unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot read batches for /metrics");
        (0, BatchTally::empty())
    });
    let batches: Vec<(&'static str, u64)> = tally.by_status.into_iter().collect();
    let gpu = st.gpu.view();
    let backends_up: Vec<(String, Option<bool>)> = st
        .cfg
        .backends
        .iter()
        .enumerate()
        .map(|(i, (url, _))| {
            (
                crate::domain::redact_urls(url),
                live.backends.get(i).and_then(|h| h.reachable),
            )
        })
        .collect();
    use std::sync::atomic::Ordering::Relaxed;
    let text = st.metrics.render(&crate::metrics::Scrape {
        requests: &requests,
        batches: &batches,
        counters: &live.counters,
        backends_up: &backends_up,
        in_flight: in_flight as u64,
        concurrency_limit: limit as u64,
        gpu: &gpu,
        store_bytes: size,
        webhook_deliveries: &[
            ("delivered", st.webhooks.delivered.load(Relaxed)),
            ("retried", st.webhooks.retried.load(Relaxed)),
            ("failed", st.webhooks.failed.load(Relaxed)),
        ],
        webhook_pending: st.webhooks.pending.load(Relaxed),
    });
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// The part of `/status` that needs no store read: unfinished batches with their figures,
/// request totals, concurrency, backend, counters, recent errors, GPU. `/events` streams it.
pub fn live_snapshot(st: &AppState) -> Value {
    let live = st.supervisor.live.with(|l| l.clone());
    let (limit, in_flight) = st.limits();
    let totals: BTreeMap<&'static str, u64> = request_totals(&live).into_iter().collect();
    let mut batches: Vec<Value> = live
        .batches
        .iter()
        .map(|(id, b)| {
            json!({
                "id": id.to_string(),
                "status": b.status.map(|s| s.as_str()),
                "mode": b.mode,
                "total": b.counts.total,
                "completed": b.counts.completed,
                "failed": b.counts.failed,
                "queued": b.queued,
                "retry_wait": b.retry_wait,
                "in_flight": b.in_flight,
                "finalize_error": b.finalize_error,
                "progress": b.figures,
            })
        })
        .collect();
    batches.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    let c = &live.counters;
    json!({
        "state_dir": st.store.dir().display().to_string(),
        "store_error": st.store.failure(),
        "requests": totals,
        "batches": batches,
        "in_flight": in_flight,
        "concurrency": {"max": st.cfg.lanes(), "current": limit},
        "backend": {
            "kind": st.cfg.backend.as_str(),
            "url": crate::domain::redact_urls(&st.cfg.backend_url),
            "model": st.cfg.model,
            "reachable": live.backend.reachable,
            "last_probe_at": live.backend.last_probe_at,
            "down_since": live.backend.down_since,
            "next_probe_at": live.backend.next_probe_at,
            "last_error": live.backend.last_error,
        },
        "backends": st.cfg.backends.iter().zip(st.cfg.slots()).zip(&st.limiters).enumerate().map(|(i, (((url, _), slots), limiter))| {
            let h = live.backends.get(i).cloned().unwrap_or_default();
            let (limit, in_flight) = limiter.snapshot();
            json!({"url": crate::domain::redact_urls(url), "slots": slots, "concurrency_limit": limit, "in_flight": in_flight,
                   "model": live.serving.get(i).cloned().flatten(),
                   "reachable": h.reachable, "last_probe_at": h.last_probe_at, "down_since": h.down_since,
                   "next_probe_at": h.next_probe_at, "last_error": h.last_error})
        }).collect::<Vec<_>>(),
        "counters": {
            "rescued": c.rescued,
            "requeued_at_start": c.requeued_at_start,
            "retries": c.retries,
            "deferred": c.deferred,
            "model_switches": c.model_switches,
            "retries_by_cause": c.retries_by_cause,
            "oom": c.oom,
            "timeouts": c.timeouts,
            "backend_outages": c.backend_outages,
            "stale_outcomes": c.stale_outcomes,
            "flushes": c.flushes,
            "results": c.results,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "prompt_tokens": c.tokens.prompt,
            "completion_tokens": c.tokens.completion,
            "cached_tokens": c.tokens.cached,
            "answers_without_cached_figure": c.tokens.without_cached_figure,
            "answers": c.answers,
        },
        "webhooks": st.webhooks.view(&st.cfg.webhook_urls),
        "recent_errors": live.recent_errors,
        "gpu": st.gpu.view(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// `GET /status`: [`live_snapshot`] plus what needs the store (size on disk, finished batches).
pub async fn status(State(st): State<AppState>) -> Json<Value> {
    let mut v = live_snapshot(&st);
    v["uptime_s"] = json!(st.started.elapsed().as_secs());
    // A store that failed is not read: after an I/O error sled's reads can spin for ever on a
    // page that never loads. The snapshot says what is known, and `store_error` why. Reads of
    // the store, `blobs` counted by iteration, run on the blocking pool, never on the
    // runtime's workers, and are waited for 2 s at most: a store that fails while they run
    // (sled meets the full disk before a flush says so) may never answer them, and /status
    // must still answer, with what is known.
    let read = if st.store.failure().is_some() {
        None
    } else {
        let store = st.store.clone();
        let read = tokio::task::spawn_blocking(move || {
            (store.size_on_disk(), store.blob_count(), finished(&store))
        });
        match tokio::time::timeout(std::time::Duration::from_secs(2), read).await {
            Ok(Ok(figures)) => Some(figures),
            _ => None,
        }
    };
    let (size, blobs, finished) = match read {
        Some((size, blobs, finished)) => (json!(size), json!(blobs), finished),
        None => (Value::Null, Value::Null, Value::Null),
    };
    v["store_size_bytes"] = size;
    v["shared_contents"] = blobs;
    v["finished"] = finished;
    Json(v)
}

//! `/health` and `/status`: the operator's view.

use super::AppState;
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

/// Batches in a terminal state: how many of each, and their lines that succeeded and failed.
/// Read from the batch records (one small record per batch), not from the requests.
fn finished(store: &Store) -> Value {
    let all = match store.list_batches(None, usize::MAX) {
        Ok((all, _)) => all,
        Err(e) => {
            tracing::warn!(error = %e, "cannot read batches for /status");
            return Value::Null;
        }
    };
    let mut by_status: BTreeMap<&'static str, u64> = BTreeMap::new();
    let (mut succeeded, mut failed) = (0u64, 0u64);
    for b in all.iter().filter(|b| b.status.is_terminal()) {
        *by_status.entry(b.status.as_str()).or_default() += 1;
        succeeded += b.request_counts.completed;
        failed += b.request_counts.failed;
    }
    json!({
        "batches": by_status,
        "requests": {"succeeded": succeeded, "failed": failed},
    })
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
    let (limit, in_flight) = st.limiter.snapshot();
    let mut requests: BTreeMap<&'static str, u64> = [
        ("queued", 0),
        ("retry_wait", 0),
        ("in_flight", 0),
        ("succeeded", 0),
        ("failed", 0),
    ]
    .into_iter()
    .collect();
    let mut by_status: BTreeMap<&'static str, u64> = crate::domain::BatchStatus::ALL
        .iter()
        .map(|s| (s.as_str(), 0))
        .collect();
    for b in live.batches.values() {
        *requests.entry("queued").or_default() += b.queued;
        *requests.entry("retry_wait").or_default() += b.retry_wait;
        *requests.entry("in_flight").or_default() += b.in_flight;
        *requests.entry("succeeded").or_default() += b.counts.completed;
        *requests.entry("failed").or_default() += b.counts.failed;
    }
    let store = st.store.clone();
    let (size, all) = tokio::task::spawn_blocking(move || {
        (
            store.size_on_disk(),
            store
                .list_batches(None, usize::MAX)
                .map(|(b, _)| b)
                .unwrap_or_default(),
        )
    })
    .await
    .unwrap_or_default();
    for b in &all {
        *by_status.entry(b.status.as_str()).or_default() += 1;
    }
    let requests: Vec<(&'static str, u64)> = requests.into_iter().collect();
    let batches: Vec<(&'static str, u64)> = by_status.into_iter().collect();
    let gpu = st.gpu.view();
    let text = st.metrics.render(&crate::metrics::Scrape {
        requests: &requests,
        batches: &batches,
        counters: &live.counters,
        backend_up: live.backend.reachable,
        in_flight: in_flight as u64,
        concurrency_limit: limit as u64,
        gpu: &gpu,
        store_bytes: size,
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
    let (limit, in_flight) = st.limiter.snapshot();
    let mut totals = json!({"queued": 0u64, "retry_wait": 0u64, "in_flight": 0u64, "succeeded": 0u64, "failed": 0u64, "remaining": 0u64});
    let mut batches: Vec<Value> = live
        .batches
        .iter()
        .map(|(id, b)| {
            for (k, v) in [
                ("queued", b.queued),
                ("retry_wait", b.retry_wait),
                ("in_flight", b.in_flight),
                ("succeeded", b.counts.completed),
                ("failed", b.counts.failed),
                (
                    "remaining",
                    b.counts
                        .total
                        .saturating_sub(b.counts.completed + b.counts.failed),
                ),
            ] {
                totals[k] = json!(totals[k].as_u64().unwrap_or(0) + v);
            }
            json!({
                "id": id.to_string(),
                "status": b.status.map(|s| s.as_str()),
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
        "concurrency": {"max": st.cfg.concurrency, "current": limit},
        "backend": {
            "kind": st.cfg.backend.as_str(),
            "url": st.cfg.backend_url,
            "model": st.cfg.model,
            "reachable": live.backend.reachable,
            "last_probe_at": live.backend.last_probe_at,
            "down_since": live.backend.down_since,
            "next_probe_at": live.backend.next_probe_at,
            "last_error": live.backend.last_error,
        },
        "counters": {
            "rescued": c.rescued,
            "requeued_at_start": c.requeued_at_start,
            "retries": c.retries,
            "retries_by_cause": c.retries_by_cause,
            "oom": c.oom,
            "timeouts": c.timeouts,
            "backend_outages": c.backend_outages,
            "stale_outcomes": c.stale_outcomes,
            "flushes": c.flushes,
            "results": c.results,
            "succeeded": c.succeeded,
            "failed": c.failed,
            "prompt_tokens": c.prompt_tokens,
            "completion_tokens": c.completion_tokens,
            "cached_tokens": c.cached_tokens,
            "answers_without_cached_figure": c.answers_without_cached_figure,
        },
        "recent_errors": live.recent_errors,
        "gpu": st.gpu.view(),
        "version": env!("CARGO_PKG_VERSION"),
    })
}

/// `GET /status`: [`live_snapshot`] plus what needs the store (size on disk, finished batches).
pub async fn status(State(st): State<AppState>) -> Json<Value> {
    let mut v = live_snapshot(&st);
    let store = st.store.clone();
    let (size, finished) =
        tokio::task::spawn_blocking(move || (store.size_on_disk(), finished(&store)))
            .await
            .unwrap_or((0, Value::Null));
    v["uptime_s"] = json!(st.started.elapsed().as_secs());
    v["store_size_bytes"] = json!(size);
    v["shared_contents"] = json!(st.store.blob_count());
    v["finished"] = finished;
    Json(v)
}

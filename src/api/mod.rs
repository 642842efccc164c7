//! The HTTP API (axum): OpenAI's Files and Batches endpoints, `/health` and `/status`.
//!
//! Handlers validate input and call the store; the only other thing they may do is tell the
//! supervisor about a new or cancelled batch. They never call the worker or the backend.
//! Every non-2xx answer is OpenAI's error object, including the framework's own rejections
//! (unknown route, wrong method, malformed multipart, body too large).

mod batches;
mod dashboard;
mod events;
mod files;
mod guard;
pub mod status;

use crate::config::Config;
use crate::store::{Store, StoreError, TransitionError};
use crate::supervisor::SupervisorHandle;
use crate::wire::error_body;
use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use std::sync::Arc;
use std::time::Instant;
use tokio_util::task::TaskTracker;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    /// The store.
    pub store: Arc<Store>,
    /// The configuration.
    pub cfg: Arc<Config>,
    /// The supervisor.
    pub supervisor: SupervisorHandle,
    /// Tracks intake tasks so that shutdown waits for them.
    pub tracker: TaskTracker,
    /// When the server started.
    pub started: Instant,
    /// Each backend's concurrency limiter (read for `/status`).
    pub limiters: Vec<Arc<crate::worker::Limiter>>,
    /// GPU memory readings (or why there are none).
    pub gpu: Arc<crate::gpu::GpuMonitor>,
    /// What `/metrics` reports beyond the snapshot.
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Fires on shutdown (ends `/events` streams).
    pub stop: tokio_util::sync::CancellationToken,
    /// Held while a retry batch is made: two retries of one batch at once make one batch.
    pub retries: Arc<tokio::sync::Mutex<()>>,
    /// The webhook deliverer's figures.
    pub webhooks: Arc<crate::webhook::Stats>,
}

impl AppState {
    /// (current limit, calls in flight) over every backend.
    pub fn limits(&self) -> (usize, usize) {
        self.limiters
            .iter()
            .map(|l| l.snapshot())
            .fold((0, 0), |a, b| (a.0 + b.0, a.1 + b.1))
    }
}

/// Runs a handler's writes to completion even if the client goes away mid-request (a timeout, a
/// Ctrl-C, a retrying SDK): axum drops a handler's future when its connection closes, which
/// left a batch written but never handed to its intake, or a cancel never told to the
/// supervisor. Tracked, so that shutdown waits for it.
pub(crate) async fn detached<T: Send + 'static>(
    st: &AppState,
    work: impl std::future::Future<Output = Result<T, ApiError>> + Send + 'static,
) -> Result<T, ApiError> {
    st.tracker
        .spawn(work)
        .await
        .map_err(|e| ApiError::internal(format!("a request's task failed: {e}")))?
}

/// An error answered as OpenAI's error object.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    /// 400 naming the parameter.
    pub fn bad(param: Option<&'static str>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            kind: "invalid_request_error",
            param,
        }
    }
    /// 404 for an object that does not exist.
    pub fn not_found(what: &str, id: &str, param: &'static str) -> Self {
        ApiError {
            status: StatusCode::NOT_FOUND,
            message: format!("No such {what} object: {id}"),
            kind: "invalid_request_error",
            param: Some(param),
        }
    }
    /// 409 for a request the object's state does not allow.
    pub fn conflict(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::CONFLICT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }
    /// 415: the body is not of the type the route reads.
    pub fn unsupported_media_type(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNSUPPORTED_MEDIA_TYPE,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }
    /// 413.
    pub fn too_large(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::PAYLOAD_TOO_LARGE,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }
    /// 500: a bug or a failing disk; logged.
    pub fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!(error = %e, "internal error answering a request");
        ApiError {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: format!("internal error: {e}"),
            kind: "server_error",
            param: None,
        }
    }

    /// 507: the disk holding the state directory is full. Nothing acknowledged is lost.
    pub fn disk_full() -> Self {
        tracing::error!("a request failed: the disk holding the state directory is full");
        ApiError {
            status: StatusCode::INSUFFICIENT_STORAGE,
            message: "the disk holding the state directory is full: free some space (if the store itself could not write, restart ollama-batch afterwards; nothing acknowledged is lost)".into(),
            kind: "server_error",
            param: None,
        }
    }
    /// 401: no or a wrong API key.
    pub fn unauthorized(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }
    /// 408: the client stopped sending.
    pub fn timeout(message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::REQUEST_TIMEOUT,
            message: message.into(),
            kind: "invalid_request_error",
            param: None,
        }
    }
    /// An I/O error of a file under the state directory: 507 when the disk is full.
    pub fn io(e: std::io::Error) -> Self {
        if crate::store::is_enospc(&e) {
            ApiError::disk_full()
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        if e.is_disk_full() {
            ApiError::disk_full()
        } else {
            ApiError::internal(e)
        }
    }
}

impl From<TransitionError> for ApiError {
    fn from(e: TransitionError) -> Self {
        match e {
            TransitionError::Store(e) => e.into(),
            e => ApiError::internal(e),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = error_body(&self.message, self.kind, self.param, None);
        (self.status, axum::Json(body)).into_response()
    }
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "Unknown request URL. See the OpenAI Batch API for the supported routes.".into(),
        kind: "invalid_request_error",
        param: None,
    }
}

async fn method_not_allowed() -> ApiError {
    ApiError {
        status: StatusCode::METHOD_NOT_ALLOWED,
        message: "Method not allowed on this URL.".into(),
        kind: "invalid_request_error",
        param: None,
    }
}

/// Whether `presented` is one of `keys`, in time that does not depend on where they differ:
/// both sides are hashed (so lengths leak nothing) and every key is compared in full.
fn key_matches(presented: &str, keys: &[crate::config::Secret]) -> bool {
    use sha2::{Digest, Sha256};
    let p = Sha256::digest(presented.as_bytes());
    let mut any = 0u8;
    for k in keys {
        let h = Sha256::digest(k.expose().as_bytes());
        let diff = p
            .iter()
            .zip(h.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b));
        any |= (diff == 0) as u8;
    }
    any == 1
}

/// With `--api-key`: every route but `/health` needs `Authorization: Bearer <key>`.
async fn require_key(
    axum::extract::State(st): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let path = req.uri().path();
    // The dashboard's files carry no data; the page sends the key with its calls.
    let public = path == "/health" || path == "/" || path.starts_with("/dashboard/");
    if st.cfg.api_keys.is_empty() || public {
        return next.run(req).await;
    }
    // A browser cannot set a header on an EventSource or a download link: GETs may carry the
    // key as `?access_token=`.
    let from_query = (req.method() == axum::http::Method::GET)
        .then(|| {
            axum::extract::Query::<std::collections::HashMap<String, String>>::try_from_uri(
                req.uri(),
            )
            .ok()
            .and_then(|axum::extract::Query(mut q)| q.remove("access_token"))
        })
        .flatten();
    let presented = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|v| v.trim().to_string())
        .or(from_query);
    let presented = presented.as_deref();
    match presented {
        Some(k) if key_matches(k, &st.cfg.api_keys) => next.run(req).await,
        Some(_) => ApiError::unauthorized(
            "Incorrect API key provided. This server was started with --api-key; send one of those keys as 'Authorization: Bearer <key>'.",
        )
        .into_response(),
        None => ApiError::unauthorized(
            "You didn't provide an API key. This server was started with --api-key; send 'Authorization: Bearer <key>'.",
        )
        .into_response(),
    }
}

/// Once the store has failed (a flush hit a full disk or an I/O error; sled keeps such an
/// error for good), nothing reaches it: writes answer 507 (disk full) or 503 at once, reads
/// 503 (after such an error sled's reads can spin for ever on a page that never loads, taking a
/// runtime worker and the graceful stop with them). `/health`, `/status`, `/metrics`, `/events`
/// and the dashboard answer from the published snapshot and say why.
async fn store_gate(
    axum::extract::State(st): axum::extract::State<AppState>,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let Some(error) = st.store.failure() else {
        return next.run(req).await;
    };
    let path = req.uri().path();
    let reader = matches!(path, "/health" | "/status" | "/metrics" | "/events" | "/")
        || path.starts_with("/dashboard/");
    if reader {
        return next.run(req).await;
    }
    let write = req.method() != axum::http::Method::GET;
    if write && error.contains("No space left") {
        return ApiError::disk_full().into_response();
    }
    ApiError {
        status: StatusCode::SERVICE_UNAVAILABLE,
        message: format!(
            "the store failed ({error}): nothing can be read or written until ollama-batch is restarted (free space first if the disk is full); everything acknowledged before is durable"
        ),
        kind: "server_error",
        param: None,
    }
    .into_response()
}

/// The router. The upload route has no framework body limit (the handler counts bytes against
/// `--max-file-size` itself, so that it can answer 413 cleanly); every other route keeps
/// axum's 2 MB.
pub fn router(state: AppState) -> Router {
    let auth = axum::middleware::from_fn_with_state(state.clone(), require_key);
    let browsers = axum::middleware::from_fn_with_state(state.clone(), guard::browsers);
    let gate = axum::middleware::from_fn_with_state(state.clone(), store_gate);
    Router::new()
        .route(
            "/v1/files",
            post(files::upload)
                .layer(DefaultBodyLimit::disable())
                .get(files::list),
        )
        .route("/v1/files/{id}", get(files::retrieve).delete(files::delete))
        .route("/v1/files/{id}/content", get(files::content))
        .route("/v1/batches", post(batches::create).get(batches::list))
        .route("/v1/batches/{id}", get(batches::retrieve))
        .route("/v1/batches/{id}/cancel", post(batches::cancel))
        .route("/health", get(status::health))
        .route("/status", get(status::status))
        .route("/metrics", get(status::metrics))
        .route("/events", get(events::events))
        .route("/", get(dashboard::index))
        .route("/dashboard/{file}", get(dashboard::asset))
        .route("/status/batches/{id}", get(status::batch_figures))
        .route("/batches/{id}/retry", post(batches::retry))
        .route("/batches/{id}/results", get(batches::results))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(gate)
        .layer(auth)
        .layer(browsers)
        .with_state(state)
}

#[cfg(test)]
mod tests {
    use super::key_matches;

    #[test]
    fn keys_match_only_exactly() {
        let keys: Vec<crate::config::Secret> = ["sk-a", "sk-longer-key"]
            .iter()
            .map(|k| k.parse().expect("key"))
            .collect();
        assert!(key_matches("sk-a", &keys));
        assert!(key_matches("sk-longer-key", &keys));
        for wrong in ["", "sk-", "sk-b", "sk-a ", "sk-longer-ke", "SK-A"] {
            assert!(!key_matches(wrong, &keys), "{wrong:?}");
        }
        assert!(!key_matches("sk-a", &[]));
    }
}

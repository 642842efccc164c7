//! The seam to the model server. One [`Backend`] value calls either Ollama's native API or an
//! OpenAI-compatible server over HTTP and turns whatever happened into a [`CallResult`] with an
//! OpenAI-shaped body. It never touches the store and never retries: retrying is the
//! supervisor's decision.

mod ollama;
mod openai;

use crate::config::{BackendKind, Config};
use crate::domain::{CallResult, Endpoint};
use serde_json::Value;
use std::time::Duration;

/// A configured client for one model server.
#[derive(Clone)]
pub struct Backend {
    kind: BackendKind,
    base: String,
    http: reqwest::Client,
    /// Ollama runner options sent identically on every call.
    num_ctx: Option<u32>,
    keep_alive: Value,
}

impl Backend {
    /// Builds the HTTP client: `timeout` is the whole call's deadline (a read timeout would
    /// fire on healthy long generations, which send nothing until the end); idle pooled
    /// connections are dropped after 15 s so a backend that closes them sooner does not hand
    /// us dead ones.
    pub fn new(cfg: &Config) -> Result<Backend, String> {
        let http = reqwest::Client::builder()
            .timeout(cfg.request_timeout)
            .connect_timeout(Duration::from_secs(5).min(cfg.request_timeout))
            .pool_idle_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Backend {
            kind: cfg.backend,
            base: cfg.backend_url.clone(),
            http,
            num_ctx: cfg.num_ctx,
            keep_alive: cfg.keep_alive.clone(),
        })
    }

    /// `ollama` or `openai`.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The base URL.
    pub fn url(&self) -> &str {
        &self.base
    }

    /// Runs one request. `body` is the line's body with the model already mapped.
    pub async fn call(&self, endpoint: Endpoint, body: Value) -> CallResult {
        match self.kind {
            BackendKind::Ollama => ollama::call(self, endpoint, body).await,
            BackendKind::Openai => openai::call(self, endpoint, body).await,
        }
    }

    /// A cheap liveness check: `GET /api/tags` (Ollama) or `GET /v1/models`.
    pub async fn probe(&self) -> Result<(), String> {
        let path = match self.kind {
            BackendKind::Ollama => "/api/tags",
            BackendKind::Openai => "/v1/models",
        };
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(format!("{} answered {}", path, resp.status()))
        }
    }

    /// POSTs JSON and reads the whole answer: `Ok((status, body text))` or the transport
    /// failure already classified.
    async fn post(&self, path: &str, body: &Value) -> Result<(u16, String), CallResult> {
        let resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .json(body)
            .send()
            .await
            .map_err(transport_failure)?;
        let status = resp.status().as_u16();
        let text = resp.text().await.map_err(transport_failure)?;
        Ok((status, text))
    }
}

/// Sorts a reqwest failure into backend down / timeout / broken connection. A failure to
/// connect (refused, or a connect timeout on a dead host) comes first: nothing was sent, so it
/// must not cost the request an attempt.
fn transport_failure(e: reqwest::Error) -> CallResult {
    if e.is_connect() {
        CallResult::Unreachable(error_chain(&e))
    } else if e.is_timeout() {
        CallResult::Timeout
    } else {
        CallResult::Transport(error_chain(&e))
    }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// An OpenAI error envelope for a backend answer that was not one.
fn wrap_error(status: u16, message: &str) -> String {
    let kind = match status {
        400 | 422 => "invalid_request_error",
        401 | 403 => "authentication_error",
        404 => "not_found_error",
        429 | 503 => "rate_limit_error",
        _ => "server_error",
    };
    let lower = message.to_ascii_lowercase();
    let code =
        if lower.contains("context") && (lower.contains("exceed") || lower.contains("too long")) {
            Some("context_length_exceeded")
        } else if status == 404 && lower.contains("not found") {
            Some("model_not_found")
        } else {
            None
        };
    crate::wire::error_body(message, kind, None, code).to_string()
}

//! The seam to the model server. One [`Backend`] value calls either Ollama's native API or an
//! OpenAI-compatible server over HTTP and turns whatever happened into a [`CallResult`] with an
//! OpenAI-shaped body. It never touches the store and never retries: retrying is the
//! supervisor's decision.

pub(crate) mod ollama;
pub(crate) mod openai;

use crate::config::{BackendKind, Config};
use crate::domain::{CallResult, Endpoint};
use serde_json::Value;
use std::time::Duration;

/// Whether a line's body can be sent to a backend of this kind; the reason when not. The intake
/// runs it on every line, so that an untranslatable batch fails at validation.
pub fn check_line(kind: BackendKind, endpoint: Endpoint, body: &Value) -> Result<(), String> {
    match kind {
        BackendKind::Ollama => ollama::check(endpoint, body),
        BackendKind::Openai => Ok(()),
    }
}

/// What asking the backend about a model found.
#[derive(Debug, PartialEq)]
pub enum ModelCheck {
    /// The backend has it (or serves whatever model is asked for).
    Present,
    /// The backend says it does not have it; the text says how to get it.
    Missing(String),
    /// The backend cannot tell (no model list, an error, unreachable): the batch is not blocked.
    Unknown(String),
}

/// A configured client for one model server.
#[derive(Clone)]
pub struct Backend {
    kind: BackendKind,
    /// The URL requests go to (credentials included, when the URL has them).
    base: String,
    /// The URL as it is shown (logs, `/status`, errors): without credentials.
    shown: String,
    http: reqwest::Client,
    /// Ollama runner options sent identically on every call.
    num_ctx: Option<u32>,
    /// Ollama's `shift` (context shift), identical on every call: off unless --context-shift.
    shift: bool,
    keep_alive: Value,
    /// Answers larger than this are refused (`--max-answer-size`).
    max_answer: u64,
    /// Models this Ollama has been asked to load (and loaded), and the lock that makes the
    /// lanes wait for the one load in progress.
    warmed: std::sync::Arc<tokio::sync::Mutex<std::collections::HashSet<String>>>,
    /// The deadline of that load call (`--load-timeout`).
    load_timeout: Duration,
    /// Slots to pin with llama.cpp's `id_slot` (0: none): set at start from `--slot-affinity`
    /// and the backend's `/props`.
    slots: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

impl Backend {
    /// Builds the HTTP client: `timeout` is the whole call's deadline (a read timeout would
    /// fire on healthy long generations, which send nothing until the end); idle pooled
    /// connections are dropped after 15 s so a backend that closes them sooner does not hand
    /// us dead ones.
    pub fn new(cfg: &Config) -> Result<Backend, String> {
        Backend::for_url(cfg, &cfg.backend_url)
    }

    /// [`Backend::new`] for one of several backends, at `url`.
    pub fn for_url(cfg: &Config, url: &str) -> Result<Backend, String> {
        let mut b = Backend::connect(
            cfg.backend,
            url,
            cfg.backend_api_key.as_ref(),
            cfg.ca_pem.as_deref(),
            cfg.request_timeout,
        )?;
        b.num_ctx = cfg.num_ctx;
        b.shift = cfg.context_shift;
        b.load_timeout = cfg.load_timeout;
        b.keep_alive = cfg.keep_alive.clone();
        b.max_answer = cfg.max_answer_bytes;
        Ok(b)
    }

    /// A client of the model server of `kind` at `url` (no trailing slash), with the backend
    /// key when there is one and `timeout` as each call's deadline; no `num_ctx`, Ollama's
    /// `keep_alive` -1, answers up to 64 MiB. Every subcommand that reaches a model server
    /// (`serve`, `run`, `bench`, `calibrate`) builds its client here.
    pub fn connect(
        kind: BackendKind,
        url: &str,
        api_key: Option<&crate::config::Secret>,
        ca_pem: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Backend, String> {
        let mut headers = reqwest::header::HeaderMap::new();
        if let Some(key) = api_key {
            let mut v = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", key.expose()))
                .map_err(|_| {
                    "--backend-api-key contains characters not allowed in a header".to_string()
                })?;
            v.set_sensitive(true);
            headers.insert(reqwest::header::AUTHORIZATION, v);
        }
        let http = http_client(ca_pem)?
            .default_headers(headers)
            .timeout(timeout)
            .connect_timeout(Duration::from_secs(5).min(timeout))
            .pool_idle_timeout(Duration::from_secs(15))
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Backend {
            kind,
            base: url.trim_end_matches('/').to_string(),
            shown: crate::domain::redact_urls(url.trim_end_matches('/')),
            http,
            num_ctx: None,
            shift: false,
            warmed: Default::default(),
            load_timeout: Duration::from_secs(15 * 60),
            keep_alive: Value::from(-1),
            max_answer: 64 << 20,
            slots: Default::default(),
        })
    }

    /// The same server with Ollama's `num_ctx` set to `n` on every call (`calibrate` measures
    /// one context after another; a running server keeps one).
    pub fn with_num_ctx(&self, n: Option<u32>) -> Backend {
        Backend {
            num_ctx: n,
            ..self.clone()
        }
    }

    /// The same server with Ollama's `keep_alive` set to `v` on every call.
    pub fn with_keep_alive(&self, v: Value) -> Backend {
        Backend {
            keep_alive: v,
            ..self.clone()
        }
    }

    /// Loads `model` on an Ollama backend before its first call, once: one `/api/generate` with
    /// an empty prompt (which only loads the model) and the runner options every call sends,
    /// under `--load-timeout` instead of `--request-timeout`. Ollama abandons a load whose client
    /// has gone (ollama/ollama v0.33 `server/sched.go`: the runner is started and awaited with
    /// the request's context, `llama.Load(req.ctx, …)` and `WaitUntilRunning(req.ctx)`, and a
    /// failed wait expires it), so a cold 12B model that takes longer to load than a call may
    /// take would otherwise never load: every call would time out and take the load with it.
    /// A failed load is logged and the calls go ahead (and fail or retry as calls do).
    pub async fn warm_up(&self, model: &str) {
        if self.kind != BackendKind::Ollama {
            return;
        }
        let mut warmed = self.warmed.lock().await;
        if warmed.contains(model) {
            return;
        }
        let body = ollama::load_request(self, model);
        let started = std::time::Instant::now();
        let r = self
            .http
            .post(format!("{}/api/generate", self.base))
            .json(&body)
            .timeout(self.load_timeout)
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(url = %self.shown, model, seconds = started.elapsed().as_secs_f64(), "model loaded");
                warmed.insert(model.to_string());
            }
            Ok(resp) => {
                let status = resp.status();
                let text = resp.text().await.unwrap_or_default();
                tracing::warn!(url = %self.shown, model, %status, answer = %crate::domain::clip(&text, 200), "loading the model failed; calls go ahead");
            }
            Err(e) => {
                tracing::warn!(url = %self.shown, model, error = %self.explain(&e), "loading the model failed; calls go ahead");
            }
        }
    }

    /// Releases `model` on an Ollama backend (`keep_alive: 0`: unloaded at once), before another
    /// model is loaded; it is loaded again (see [`Backend::warm_up`]) when it is next needed.
    /// Nothing for other backends (a server that serves one model, or a router that decides).
    pub async fn release_model(&self, model: &str) {
        if self.kind != BackendKind::Ollama {
            return;
        }
        self.warmed.lock().await.remove(model);
        let r = self
            .http
            .post(format!("{}/api/generate", self.base))
            .json(&serde_json::json!({"model": model, "keep_alive": 0}))
            .timeout(Duration::from_secs(60))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(url = %self.shown, model, "model released");
            }
            Ok(resp) => {
                tracing::warn!(url = %self.shown, model, status = %resp.status(), "releasing the model failed; Ollama unloads it when it needs the room");
            }
            Err(e) => {
                tracing::warn!(url = %self.shown, model, error = %self.explain(&e), "releasing the model failed; Ollama unloads it when it needs the room");
            }
        }
    }

    /// Pins calls to slots 0..n with `id_slot` from now on (0: no pinning).
    pub fn set_slots(&self, n: usize) {
        self.slots.store(n, std::sync::atomic::Ordering::Relaxed);
    }

    /// The slots calls are pinned to (0: none).
    pub fn slots(&self) -> usize {
        self.slots.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// llama.cpp's `GET /props` `total_slots`, when the backend is llama.cpp.
    pub async fn llama_slots(&self) -> Option<usize> {
        self.llama_props().await.map(|p| p.1)
    }

    /// llama.cpp's `GET /props`: (context per slot, slots), when the backend is llama.cpp.
    pub async fn llama_props(&self) -> Option<(u32, usize)> {
        if self.kind != BackendKind::Openai {
            return None;
        }
        let v = self.get_json("/props", Duration::from_secs(5)).await.ok()?;
        let slots = v["total_slots"].as_u64()? as usize;
        let n_ctx = v["default_generation_settings"]["n_ctx"]
            .as_u64()
            .map_or(0, |n| n.min(u32::MAX as u64) as u32);
        Some((n_ctx, slots))
    }

    /// Ollama's `POST /api/show`: the model's largest context (`<arch>.context_length`), when
    /// it says.
    pub async fn model_max_ctx(&self, model: &str) -> Option<u32> {
        if self.kind != BackendKind::Ollama {
            return None;
        }
        let v: Value = self
            .http
            .post(format!("{}/api/show", self.base))
            .json(&serde_json::json!({"model": model}))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        v["model_info"].as_object()?.iter().find_map(|(k, v)| {
            k.ends_with(".context_length")
                .then(|| v.as_u64())
                .flatten()
                .map(|n| n.min(u32::MAX as u64) as u32)
        })
    }

    /// Runs one request on `lane`: with slot pinning on (llama.cpp), as `id_slot` = lane.
    pub async fn call_on(&self, endpoint: Endpoint, body: &Value, lane: usize) -> CallResult {
        let slots = self.slots();
        if self.kind == BackendKind::Openai
            && lane < slots
            && endpoint != Endpoint::Embeddings
            && let Some(obj) = body.as_object()
        {
            let mut pinned = obj.clone();
            pinned.insert("id_slot".into(), Value::from(lane));
            return self.call(endpoint, &Value::Object(pinned)).await;
        }
        self.call(endpoint, body).await
    }

    /// `ollama` or `openai`.
    pub fn kind(&self) -> BackendKind {
        self.kind
    }

    /// The base URL as it may be shown (without credentials).
    pub fn url(&self) -> &str {
        &self.shown
    }

    /// Runs one request. `body` is the line's body with the model already mapped.
    pub async fn call(&self, endpoint: Endpoint, body: &Value) -> CallResult {
        match self.kind {
            BackendKind::Ollama => ollama::call(self, endpoint, body).await,
            BackendKind::Openai => openai::call(self, endpoint, body).await,
        }
    }

    /// `GET path` with its own deadline: the answer when it is a 2xx, else the failure in words
    /// (transport errors explained, or the status).
    async fn get(&self, path: &str, deadline: Duration) -> Result<reqwest::Response, String> {
        let resp = self
            .http
            .get(format!("{}{}", self.base, path))
            .timeout(deadline)
            .send()
            .await
            .map_err(|e| self.explain(&e))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(format!("{}{} answered {}", self.shown, path, resp.status()))
        }
    }

    /// [`Backend::get`] of a JSON document.
    async fn get_json(&self, path: &str, deadline: Duration) -> Result<Value, String> {
        self.get(path, deadline)
            .await?
            .json()
            .await
            .map_err(|e| crate::domain::redact_urls(&format!("{}{}: {e}", self.shown, path)))
    }

    /// At start, for an https backend: a certificate it cannot trust is a configuration error
    /// (it will not fix itself), said at once instead of pausing the queue for ever. Any other
    /// failure (down, slow) is left to the probes.
    pub async fn check_certificate(&self) -> Result<(), String> {
        if !self.base.starts_with("https://") {
            return Ok(());
        }
        match self.probe().await {
            Err(e) if e.contains("TLS certificate") => Err(e),
            _ => Ok(()),
        }
    }

    /// A cheap liveness check: `GET /api/tags` (Ollama) or `GET /v1/models`. The error says
    /// why in words (connection refused, timed out, DNS, TLS) with a hint for the common case.
    pub async fn probe(&self) -> Result<(), String> {
        let path = match self.kind {
            BackendKind::Ollama => "/api/tags",
            BackendKind::Openai => "/v1/models",
        };
        // The answer must be the model list itself: a misconfigured proxy answers 200 with an
        // HTML page to everything, and that is no model server.
        let resp = self.get(path, Duration::from_secs(10)).await?;
        let v: Value = resp.json().await.map_err(|_| {
            format!(
                "{}{path} answered, but not with its model list (not JSON): is this the model server, or a proxy's page?",
                self.shown
            )
        })?;
        let list = match self.kind {
            BackendKind::Ollama => v.get("models"),
            BackendKind::Openai => v.get("data"),
        };
        if list.is_some_and(Value::is_array) {
            Ok(())
        } else {
            Err(format!(
                "{}{path} answered JSON that is not a model list: is this the model server?",
                self.shown
            ))
        }
    }

    /// Ollama's `GET /api/ps`: the loaded models and where they live.
    pub async fn ollama_ps(&self) -> Result<Vec<crate::gpu::LoadedModel>, String> {
        let v = self.get_json("/api/ps", Duration::from_secs(10)).await?;
        Ok(crate::gpu::parse_ps(&v))
    }

    /// Asks the backend whether it has `model`: Ollama `POST /api/show`; an OpenAI-compatible
    /// server `GET /v1/models` (a llama.cpp server that serves one model answers whatever model
    /// a request names, so it is never blocked).
    pub async fn check_model(&self, model: &str) -> ModelCheck {
        match self.kind {
            BackendKind::Ollama => {
                let r = self
                    .http
                    .post(format!("{}/api/show", self.base))
                    .json(&serde_json::json!({"model": model}))
                    .timeout(Duration::from_secs(30))
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => ModelCheck::Present,
                    Ok(r) if r.status() == reqwest::StatusCode::NOT_FOUND => {
                        ModelCheck::Missing(format!(
                            "model '{model}' is not available on the Ollama server at {}: run `ollama pull {model}` there (or name another model with --model / --model-map)",
                            self.shown
                        ))
                    }
                    Ok(r) => ModelCheck::Unknown(format!("/api/show answered {}", r.status())),
                    Err(e) => ModelCheck::Unknown(self.explain(&e)),
                }
            }
            BackendKind::Openai => match self.get_json("/v1/models", Duration::from_secs(30)).await
            {
                Ok(v) => models_list_check(&v, model, &self.shown),
                Err(e) => ModelCheck::Unknown(e),
            },
        }
    }

    /// POSTs JSON and reads the whole answer, at most `--max-answer-size` bytes: `Ok((status,
    /// body text, its Retry-After))` or the failure already classified.
    async fn post(
        &self,
        path: &str,
        body: &Value,
    ) -> Result<(u16, String, Option<Duration>), CallResult> {
        let mut resp = self
            .http
            .post(format!("{}{}", self.base, path))
            .json(body)
            .send()
            .await
            .map_err(|e| self.transport_failure(e))?;
        let status = resp.status().as_u16();
        let retry_after = resp
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| crate::domain::outcome::retry_after(v, std::time::SystemTime::now()));
        let too_large = |n: u64| CallResult::Invalid {
            code: "answer_too_large".into(),
            message: format!(
                "the backend's answer is larger than {} bytes (--max-answer-size): {n} bytes or more",
                self.max_answer
            ),
            retry: false,
        };
        if let Some(n) = resp.content_length().filter(|n| *n > self.max_answer) {
            return Err(too_large(n));
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport_failure(e))? {
            if (buf.len() + chunk.len()) as u64 > self.max_answer {
                return Err(too_large((buf.len() + chunk.len()) as u64));
            }
            buf.extend_from_slice(&chunk);
        }
        let text = match String::from_utf8(buf) {
            Ok(t) => t,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        };
        Ok((status, text, retry_after))
    }

    /// Sorts a reqwest failure into backend down / timeout / broken connection. A failure to
    /// connect (refused, or a connect timeout on a dead host) comes first: nothing was sent, so
    /// it must not cost the request an attempt.
    fn transport_failure(&self, e: reqwest::Error) -> CallResult {
        if e.is_connect() {
            CallResult::Unreachable(self.explain(&e))
        } else if e.is_timeout() {
            CallResult::Timeout
        } else {
            CallResult::Transport(self.explain(&e))
        }
    }

    /// A transport error in words: what happened, where, the usual cause, then the details.
    pub fn explain(&self, e: &reqwest::Error) -> String {
        crate::domain::redact_urls(&explain(self.kind, &self.shown, e))
    }
}

/// An HTTP client builder that speaks https (rustls with ring; the system's roots through the
/// platform verifier, and the `--ca-cert` authorities beside them): the one way every HTTP
/// client of the server (model servers, webhook receivers) and the client subcommands is made.
pub fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::ClientBuilder, String> {
    // The process's one TLS provider; a second install is refused, which is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = reqwest::Client::builder();
    if let Some(pem) = ca_pem {
        for cert in reqwest::Certificate::from_pem_bundle(pem)
            .map_err(|e| format!("--ca-cert: not a PEM certificate file: {e}"))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    Ok(b)
}

/// The model check on a `/v1/models` list.
fn models_list_check(v: &Value, model: &str, base: &str) -> ModelCheck {
    let Some(list) = v["data"].as_array().filter(|l| !l.is_empty()) else {
        return ModelCheck::Unknown("/v1/models lists no models".into());
    };
    let ids: Vec<&str> = list.iter().filter_map(|m| m["id"].as_str()).collect();
    // llama.cpp's server (one model, no router) serves any model name a request gives.
    if list.len() == 1 && list[0]["owned_by"] == "llamacpp" {
        return ModelCheck::Present;
    }
    if ids.contains(&model) {
        ModelCheck::Present
    } else {
        let shown: Vec<&str> = ids.iter().take(10).copied().collect();
        ModelCheck::Missing(format!(
            "model '{model}' is not served by {base} (it lists: {}): load it there, or name a listed model with --model / --model-map",
            shown.join(", ")
        ))
    }
}

/// See [`Backend::explain`].
fn explain(kind: BackendKind, base: &str, e: &reqwest::Error) -> String {
    let chain = error_chain(e);
    let lower = chain.to_ascii_lowercase();
    let mut io_kind = None;
    let mut src: Option<&dyn std::error::Error> = std::error::Error::source(e);
    while let Some(s) = src {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            io_kind = Some(io.kind());
        }
        src = s.source();
    }
    let hint_server = match kind {
        BackendKind::Ollama => "is `ollama serve` running, and on this address (--backend-url)?",
        BackendKind::Openai => {
            "is the model server (llama-server, vllm serve, LM Studio, …) running, and on this address (--backend-url)?"
        }
    };
    let what = if io_kind == Some(std::io::ErrorKind::ConnectionRefused)
        || lower.contains("connection refused")
    {
        format!("connection refused by {base}: {hint_server}")
    } else if lower.contains("dns error") || lower.contains("failed to lookup address") {
        format!("cannot resolve the host name of {base} (DNS): check --backend-url")
    } else if lower.contains("certificate") || lower.contains("unknownissuer") {
        format!(
            "the TLS certificate of {base} is not trusted ({}): if a private CA signed it, pass that CA's certificate with --ca-cert FILE; else check the host name in --backend-url",
            certificate_problem(&chain)
        )
    } else if lower.contains("tls") || lower.contains("ssl") || lower.contains("handshake") {
        format!(
            "TLS failed with {base}: check the scheme of --backend-url (https:// to a server that speaks plain http?)"
        )
    } else if e.is_timeout() && e.is_connect() {
        format!("connecting to {base} timed out: the host does not answer; {hint_server}")
    } else if e.is_timeout() {
        format!("{base} did not answer in time (--request-timeout)")
    } else if io_kind == Some(std::io::ErrorKind::ConnectionReset)
        || lower.contains("connection reset")
    {
        format!("{base} reset the connection (did the model server crash or restart?)")
    } else if e.is_connect() {
        format!("cannot connect to {base}: {hint_server}")
    } else {
        format!("the connection to {base} failed")
    };
    format!("{what} ({chain})")
}

/// The certificate problem rustls named, in words.
fn certificate_problem(chain: &str) -> &'static str {
    let lower = chain.to_ascii_lowercase();
    if lower.contains("unknownissuer") {
        "signed by an unknown authority"
    } else if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        "issued for another host name"
    } else if lower.contains("expired") {
        "expired"
    } else if lower.contains("selfsigned") || lower.contains("self-signed") {
        "self-signed"
    } else {
        "invalid peer certificate"
    }
}

/// An error and its sources, in one line (`a: b: c`).
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        src = inner.source();
    }
    s
}

/// The answer text itself when it has no line breaks, else the same JSON re-serialized on one
/// line: an answer embedded in a JSONL file must not span lines.
pub(crate) fn compact(text: &str, parsed: &Value) -> String {
    if text.contains(['\n', '\r']) {
        parsed.to_string()
    } else {
        text.to_string()
    }
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

//! Command-line flags (each also readable from `OLLAMA_BATCH_<FLAG>`) and the validated
//! configuration built from them. Cross-field rules are checked here, once, at start-up.

use crate::domain::RetryPolicy;
use clap::{Args, Parser, ValueEnum};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Which kind of model server runs the requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum BackendKind {
    /// Ollama's native API (`/api/chat`, `/api/embed`, `/api/generate`).
    Ollama,
    /// Any OpenAI-compatible server (llama.cpp, vLLM, LM Studio, SGLang).
    Openai,
}

impl BackendKind {
    /// Its name on the command line.
    pub fn as_str(&self) -> &'static str {
        match self {
            BackendKind::Ollama => "ollama",
            BackendKind::Openai => "openai",
        }
    }
}

/// A key that must never be printed: its `Debug` and `Display` say `[redacted]`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The key itself (to compare or send, never to log).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::fmt::Display for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("[redacted]")
    }
}

impl std::str::FromStr for Secret {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.is_empty() {
            return Err("an API key must not be empty".into());
        }
        if t.chars().any(|c| c.is_control() || c == ' ') {
            return Err("an API key must not contain spaces or control characters".into());
        }
        Ok(Secret(t.to_string()))
    }
}

/// The most parallel calls to one model server (`--concurrency`, `URL#SLOTS`): each is a lane
/// with its own bookkeeping; far past any GPU server's slots, and a typo (`4000000000`) is a
/// clear error instead of an allocation that aborts.
pub const MAX_SLOTS: usize = 4096;

/// The model server flags, declared once and flattened into every subcommand that reaches a
/// model server (`serve`, `resume`, `run`, `bench`, `calibrate`), so that `URL#SLOTS`, comma
/// lists and the environment variables mean the same everywhere.
#[derive(Args, Debug, Clone)]
pub struct BackendArgs {
    /// Kind of model server.
    #[arg(
        long,
        env = "OLLAMA_BATCH_BACKEND",
        value_enum,
        default_value = "ollama"
    )]
    pub backend: BackendKind,
    /// Base URL of the model server. Repeat it (comma-separated in the env var) to spread one
    /// queue over several servers of the same kind, each with `--concurrency` slots or its own
    /// count as `URL#SLOTS` (e.g. one Ollama per GPU); a server that is down or runs out of
    /// memory pauses or shrinks alone.
    #[arg(
        long,
        env = "OLLAMA_BATCH_BACKEND_URL",
        default_value = "http://127.0.0.1:11434",
        value_delimiter = ',',
        value_name = "URL[#SLOTS]"
    )]
    pub backend_url: Vec<String>,
    /// Send `Authorization: Bearer <key>` to the backend (vLLM --api-key, a gateway).
    #[arg(
        long,
        env = "OLLAMA_BATCH_BACKEND_API_KEY",
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub backend_api_key: Option<Secret>,
    /// Trust the certificate authorities in this PEM file, beside the system's, for https model
    /// servers and webhook receivers (a private CA, a self-signed gateway).
    #[arg(long, env = "OLLAMA_BATCH_CA_CERT", value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
}

impl BackendArgs {
    /// The `--ca-cert` file's PEM, checked to hold at least one certificate; `None` without it.
    pub fn ca_pem(&self) -> Result<Option<Vec<u8>>, String> {
        let Some(path) = &self.ca_cert else {
            return Ok(None);
        };
        let pem = std::fs::read(path)
            .map_err(|e| format!("cannot read --ca-cert {}: {e}", path.display()))?;
        match reqwest::Certificate::from_pem_bundle(&pem) {
            Ok(certs) if !certs.is_empty() => Ok(Some(pem)),
            Ok(_) => Err(format!(
                "--ca-cert {}: no certificate in it (a PEM file with -----BEGIN CERTIFICATE----- blocks)",
                path.display()
            )),
            Err(e) => Err(format!(
                "--ca-cert {}: not a PEM certificate file: {e}",
                path.display()
            )),
        }
    }

    /// Every backend: (base URL without a trailing slash, its slots when `#SLOTS` gave them),
    /// in order; or why the flags are wrong.
    pub fn urls(&self) -> Result<Vec<(String, Option<usize>)>, String> {
        let mut backends: Vec<(String, Option<usize>)> = Vec::new();
        for raw in &self.backend_url {
            let (url, slots) = match raw.rsplit_once('#') {
                Some((u, n)) => (
                    u,
                    Some(
                        n.parse::<usize>()
                            .ok()
                            .filter(|n| (1..=MAX_SLOTS).contains(n))
                            .ok_or_else(|| {
                                format!(
                                    "--backend-url {raw}: the slots after '#' must be a count from 1 to {MAX_SLOTS}"
                                )
                            })?,
                    ),
                ),
                None => (raw.as_str(), None),
            };
            let url = url.trim_end_matches('/').to_string();
            let scheme = if url.starts_with("https://") {
                "https://"
            } else {
                "http://"
            };
            if !url.starts_with(scheme) || url.len() <= scheme.len() {
                return Err(format!(
                    "--backend-url must start with http:// or https://, got '{raw}'"
                ));
            }
            if url.contains(['?', '#']) {
                return Err(format!(
                    "--backend-url {}: a query string or fragment is not part of a server's base URL (ollama-batch adds each API path itself)",
                    crate::domain::redact_urls(&url)
                ));
            }
            if url.ends_with("/v1") || url.ends_with("/api") {
                return Err(format!(
                    "--backend-url {}: give the server's base URL without /v1 or /api (ollama-batch adds each API path itself: {}/v1/chat/completions would be called as …/v1/v1/…)",
                    crate::domain::redact_urls(&url),
                    crate::domain::redact_urls(
                        url.trim_end_matches("/v1").trim_end_matches("/api")
                    )
                ));
            }
            if backends.iter().any(|(u, _)| *u == url) {
                return Err(format!("--backend-url {url} is given twice"));
            }
            backends.push((url, slots));
        }
        if backends.is_empty() {
            return Err("--backend-url: at least one model server is needed".into());
        }
        Ok(backends)
    }
}

/// Log format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object a line.
    Json,
}

/// Flags of `serve` and `resume`.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the chosen address is logged).
    #[arg(long, env = "OLLAMA_BATCH_LISTEN", default_value = "127.0.0.1:4080")]
    pub listen: SocketAddr,
    /// State directory (database and files).
    #[arg(long, env = "OLLAMA_BATCH_STATE", default_value = "./state")]
    pub state: PathBuf,
    /// The model server(s).
    #[command(flatten)]
    pub backend: BackendArgs,
    /// Run every request on this model, whatever its line says.
    #[arg(long, env = "OLLAMA_BATCH_MODEL")]
    pub model: Option<String>,
    /// Run lines that name model FROM on model TO (repeatable; comma-separated in the env var).
    #[arg(
        long = "model-map",
        env = "OLLAMA_BATCH_MODEL_MAP",
        value_delimiter = ',',
        value_name = "FROM=TO"
    )]
    pub model_map: Vec<String>,
    /// Requests in flight to the backend at most.
    #[arg(long, env = "OLLAMA_BATCH_CONCURRENCY", default_value_t = 4)]
    pub concurrency: usize,
    /// Deadline of one backend call (humantime: 500ms, 30s, 10m).
    #[arg(long, env = "OLLAMA_BATCH_REQUEST_TIMEOUT", default_value = "10m")]
    pub request_timeout: humantime::Duration,
    /// Ollama: `options.num_ctx` sent on every call (identical on every call, so no reloads).
    #[arg(long, env = "OLLAMA_BATCH_NUM_CTX")]
    pub num_ctx: Option<u32>,
    /// Ollama: let a generation that fills `num_ctx` go on by discarding the oldest tokens
    /// (Ollama's context shift, its default). Off (ours), such an answer ends as `length`:
    /// shifting drops the start of the shared prompt without a sign in the answer.
    #[arg(long, env = "OLLAMA_BATCH_CONTEXT_SHIFT")]
    pub context_shift: bool,
    /// Ollama: how long loading a model may take. Before the first call of a model the worker
    /// loads it with one call under this deadline (Ollama abandons a load whose caller left,
    /// so a load longer than --request-timeout would otherwise never finish).
    #[arg(long, env = "OLLAMA_BATCH_LOAD_TIMEOUT", default_value = "15m")]
    pub load_timeout: humantime::Duration,
    /// Ollama: `keep_alive` sent on every call (-1 keeps the model loaded).
    #[arg(
        long,
        env = "OLLAMA_BATCH_KEEP_ALIVE",
        default_value = "-1",
        allow_hyphen_values = true
    )]
    pub keep_alive: String,
    /// Largest accepted upload (e.g. 2GiB, 500MB, 1048576); larger uploads get 413.
    #[arg(long, env = "OLLAMA_BATCH_MAX_FILE_SIZE", default_value = "2GiB")]
    pub max_file_size: String,
    /// Enforce the 24h completion window as OpenAI does (off: a local GPU finishes what it started).
    #[arg(long, env = "OLLAMA_BATCH_EXPIRE")]
    pub expire: bool,
    /// Ceiling of the first retry delay (full jitter below it).
    #[arg(long, env = "OLLAMA_BATCH_RETRY_INITIAL", default_value = "1s")]
    pub retry_initial: humantime::Duration,
    /// Ceiling of any retry delay.
    #[arg(long, env = "OLLAMA_BATCH_RETRY_MAX", default_value = "5m")]
    pub retry_max: humantime::Duration,
    /// Tries per line in all, the first included.
    #[arg(long, env = "OLLAMA_BATCH_MAX_ATTEMPTS", default_value_t = 8)]
    pub max_attempts: u32,
    /// A JSON answer (`response_format` json_schema / json_object) that does not validate is
    /// asked again, naming what was wrong, at most this many times (0: never); a re-ask does
    /// not spend an attempt.
    #[arg(long, env = "OLLAMA_BATCH_REASK", default_value_t = 2)]
    pub reask: u32,
    /// Answer every line already answered successfully by an earlier batch on this state
    /// directory (same endpoint, model, body and backend options) from the store, without a
    /// call, as a batch with metadata `"reuse": "true"` does.
    #[arg(long, env = "OLLAMA_BATCH_REUSE_RESULTS")]
    pub reuse_results: bool,
    /// On SIGTERM/SIGINT, how long in-flight requests may finish before they are requeued.
    #[arg(long, env = "OLLAMA_BATCH_SHUTDOWN_GRACE", default_value = "30s")]
    pub shutdown_grace: humantime::Duration,
    /// Group commit: flush after this many finished lines at the latest.
    #[arg(long, env = "OLLAMA_BATCH_FLUSH_EVERY", default_value_t = 512)]
    pub flush_every: usize,
    /// Group commit: flush this long after the first unflushed result at the latest.
    #[arg(long, env = "OLLAMA_BATCH_FLUSH_INTERVAL", default_value = "20ms")]
    pub flush_interval: humantime::Duration,
    /// A call running longer than request-timeout plus this margin has its lease rescued
    /// (requeued; its late answer, if any, is dropped).
    #[arg(long, env = "OLLAMA_BATCH_LEASE_MARGIN", default_value = "60s")]
    pub lease_margin: humantime::Duration,
    /// sled page cache.
    #[arg(long, env = "OLLAMA_BATCH_CACHE_SIZE", default_value = DEFAULT_CACHE_SIZE)]
    pub cache_size: String,
    /// Require `Authorization: Bearer <key>` on every endpoint except /health (repeatable for
    /// several keys; comma-separated in the env var). Without it anyone who reaches the port can
    /// read every result.
    #[arg(
        long = "api-key",
        env = "OLLAMA_BATCH_API_KEY",
        value_delimiter = ',',
        hide_env_values = true,
        value_name = "KEY"
    )]
    pub api_key: Vec<Secret>,
    /// A host name this server also answers to on a loopback address, and whose pages may
    /// write to it (a reverse proxy's name; repeatable, comma-separated in the env var). Others
    /// are refused, so that web pages cannot reach the server (DNS rebinding, cross-site
    /// requests).
    #[arg(
        long = "allowed-host",
        env = "OLLAMA_BATCH_ALLOWED_HOST",
        value_delimiter = ',',
        value_name = "NAME"
    )]
    pub allowed_host: Vec<String>,
    /// Largest backend answer accepted; a larger one fails its line (`answer_too_large`).
    #[arg(long, env = "OLLAMA_BATCH_MAX_ANSWER_SIZE", default_value = "64MiB")]
    pub max_answer_size: String,
    /// Do not ask the backend whether a batch's model exists before running it.
    #[arg(long, env = "OLLAMA_BATCH_NO_MODEL_CHECK")]
    pub no_model_check: bool,
    /// A client that sends nothing for this long (request headers, an upload's body) is cut off.
    #[arg(long, env = "OLLAMA_BATCH_CLIENT_TIMEOUT", default_value = "60s")]
    pub client_timeout: humantime::Duration,
    /// Log a progress line per running batch every N finished lines...
    #[arg(long, env = "OLLAMA_BATCH_PROGRESS_EVERY", default_value_t = 100)]
    pub progress_every: u64,
    /// ...and at least this often while lines finish more slowly.
    #[arg(long, env = "OLLAMA_BATCH_PROGRESS_INTERVAL", default_value = "30s")]
    pub progress_interval: humantime::Duration,
    /// Delete uploads and output / error files this long after they were made, when they name
    /// no expiry of their own (`expires_after`, `output_expires_after`). Default: keep them.
    #[arg(long, env = "OLLAMA_BATCH_FILE_RETENTION", value_name = "DURATION")]
    pub file_retention: Option<humantime::Duration>,
    /// A backend serves one model at a time: another model's ready work waits at most this
    /// long before the backend switches to it (its calls finish, the old model is released,
    /// the new one loaded). Its own work runs dry first otherwise.
    #[arg(long, env = "OLLAMA_BATCH_MODEL_SWITCH_WAIT", default_value = "10m")]
    pub model_switch_wait: humantime::Duration,
    /// POST a signed event (Standard Webhooks, as OpenAI's batch webhooks) to this URL when a
    /// batch completes, fails, is cancelled or expires (repeatable; comma-separated in the env
    /// var). Needs --webhook-secret.
    #[arg(
        long = "webhook-url",
        env = "OLLAMA_BATCH_WEBHOOK_URL",
        value_delimiter = ',',
        value_name = "URL"
    )]
    pub webhook_url: Vec<String>,
    /// The signing secret, `whsec_<base64>` (the receiver verifies with the same one, e.g. the
    /// openai SDK's `client.webhooks.unwrap`). Never printed.
    #[arg(
        long,
        env = "OLLAMA_BATCH_WEBHOOK_SECRET",
        hide_env_values = true,
        value_name = "whsec_…"
    )]
    pub webhook_secret: Option<Secret>,
    /// Go on delivering an event that is not acknowledged (2xx) for this long, with exponential
    /// backoff and jitter.
    #[arg(long, env = "OLLAMA_BATCH_WEBHOOK_RETRY_FOR", default_value = "72h")]
    pub webhook_retry_for: humantime::Duration,
    /// Let a batch name its own receiver in metadata (`webhook_url`). Off: a client must not be
    /// able to make the server call arbitrary addresses.
    #[arg(long, env = "OLLAMA_BATCH_WEBHOOK_ALLOW_METADATA")]
    pub webhook_allow_metadata: bool,
    /// Run this program for each finished batch, with OLLAMA_BATCH_ID, OLLAMA_BATCH_STATUS,
    /// OLLAMA_BATCH_TOTAL, OLLAMA_BATCH_COMPLETED and OLLAMA_BATCH_FAILED in its environment
    /// (a desktop notification, a mail). Its failure is logged, never fatal.
    #[arg(long, env = "OLLAMA_BATCH_ON_FINISH_CMD", value_name = "PROGRAM")]
    pub on_finish_cmd: Option<PathBuf>,
    /// The first retry delay of a webhook delivery (lower only for tests).
    #[arg(long, hide = true, default_value = "5s")]
    pub webhook_retry_initial: humantime::Duration,
    /// The shortest expiry accepted, in seconds (OpenAI: 3600; lower only for tests).
    #[arg(long, hide = true, default_value_t = 3600)]
    pub min_expiry_seconds: u64,
    /// How often expired files are looked for (lower only for tests).
    #[arg(long, hide = true, default_value = "60s")]
    pub expiry_sweep_interval: humantime::Duration,
    /// Which ready line goes to which backend slot: `affine` keeps each slot on one prefix
    /// group (lines sharing a system prompt) so its prompt cache is reused; `fifo` sends lines
    /// in input order.
    #[arg(
        long,
        env = "OLLAMA_BATCH_SCHEDULING",
        value_enum,
        default_value = "affine"
    )]
    pub scheduling: Scheduling,
    /// `affine`: a group of lines no slot has served for this long is taken by the next free
    /// slot (a small batch behind a large one still makes progress).
    #[arg(long, env = "OLLAMA_BATCH_GROUP_WAIT_MAX", default_value = "30s")]
    pub group_wait_max: humantime::Duration,
    /// Send llama.cpp `id_slot` so each line runs on the slot the scheduler chose: `auto` when
    /// the backend's `/props` reports slots (llama.cpp), `on`, or `off`.
    #[arg(
        long,
        env = "OLLAMA_BATCH_SLOT_AFFINITY",
        value_enum,
        default_value = "auto"
    )]
    pub slot_affinity: SlotAffinity,
    /// How a batch whose metadata names no `mode` runs: `independent` (each line alone) or
    /// `conversation` (the lines of a prefix group as `--concurrency` growing chats, each
    /// answer kept as context for the next line; needs `--num-ctx`). See docs/operations.md.
    #[arg(
        long,
        env = "OLLAMA_BATCH_MODE",
        value_enum,
        default_value = "independent"
    )]
    pub mode: Mode,
    /// Conversation mode: the messages a history keeps when it is cut back (after the system
    /// prompt; it grows to 2.5 times this, or to the context budget, before a cut).
    #[arg(long, env = "OLLAMA_BATCH_CONVERSATION_KEEP", default_value_t = 40)]
    pub conversation_keep: u32,
    /// Log format.
    #[arg(
        long,
        env = "OLLAMA_BATCH_LOG_FORMAT",
        value_enum,
        default_value = "text"
    )]
    pub log_format: LogFormat,
}

impl ServeArgs {
    /// `serve`'s flags alone, from an argument list whose first item is the program name
    /// (tests and embedding; the command line itself is `cli`).
    pub fn parse_flags<I, T>(argv: I) -> ServeArgs
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        #[derive(Parser)]
        struct Flags {
            #[command(flatten)]
            serve: ServeArgs,
        }
        Flags::parse_from(argv).serve
    }
}

/// `--scheduling`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Scheduling {
    /// Each slot keeps to one prefix group.
    Affine,
    /// Input order, oldest batch first.
    Fifo,
}

/// `--mode`, and a batch's metadata `mode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Every line on its own.
    Independent,
    /// The lines of a prefix group as growing conversations.
    Conversation,
}

impl Mode {
    /// The metadata value naming it.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Independent => "independent",
            Mode::Conversation => "conversation",
        }
    }

    /// The mode a metadata value names.
    pub fn parse(s: &str) -> Option<Mode> {
        [Mode::Independent, Mode::Conversation]
            .into_iter()
            .find(|m| m.as_str() == s)
    }
}

/// `--slot-affinity`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SlotAffinity {
    /// When the backend reports slots (llama.cpp `/props`).
    Auto,
    /// Always (OpenAI-compatible backends only).
    On,
    /// Never.
    Off,
}

/// The validated configuration every component is built from.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// State directory.
    pub state_dir: PathBuf,
    /// Backend kind.
    pub backend: BackendKind,
    /// The first backend's base URL, without a trailing slash (model checks, `/api/ps`).
    pub backend_url: String,
    /// Every backend: (base URL without a trailing slash, its slots when `#SLOTS` gave them;
    /// else `concurrency`). Lanes are numbered through them in this order.
    pub backends: Vec<(String, Option<usize>)>,
    /// Forced model.
    pub model: Option<String>,
    /// FROM → TO.
    pub model_map: HashMap<String, String>,
    /// Max requests in flight.
    pub concurrency: usize,
    /// Deadline of one call.
    pub request_timeout: Duration,
    /// Ollama num_ctx.
    pub num_ctx: Option<u32>,
    /// Ollama `shift` on every call.
    pub context_shift: bool,
    /// Deadline of the call that loads a model (Ollama).
    pub load_timeout: Duration,
    /// Ollama keep_alive (a number of seconds or a duration string).
    pub keep_alive: serde_json::Value,
    /// Upload cap in bytes.
    pub max_file_size: u64,
    /// Enforce the completion window.
    pub expire: bool,
    /// Length of the completion window (`24h`, the only value OpenAI accepts; shorter only in
    /// tests).
    pub completion_window: Duration,
    /// Retry policy.
    pub retry: RetryPolicy,
    /// Re-asks of a JSON answer that does not validate, at most.
    pub reask: u32,
    /// Every batch reuses earlier answers (`--reuse-results`).
    pub reuse_results: bool,
    /// Shutdown grace.
    pub shutdown_grace: Duration,
    /// Group commit size.
    pub flush_every: usize,
    /// Group commit delay.
    pub flush_interval: Duration,
    /// Lease rescue deadline = request_timeout + lease_margin.
    pub lease_margin: Duration,
    /// sled cache bytes.
    pub cache_bytes: u64,
    /// Longest accepted input line.
    pub max_line_bytes: usize,
    /// Validation errors listed at most (the rest are counted).
    pub max_listed_errors: usize,
    /// Accepted API keys (empty: no authentication).
    pub api_keys: Vec<Secret>,
    /// Key sent to the backend.
    pub backend_api_key: Option<Secret>,
    /// `--ca-cert`: PEM of certificate authorities trusted beside the system's.
    pub ca_pem: Option<Vec<u8>>,
    /// `--allowed-host` names, lower-cased.
    pub allowed_hosts: Vec<String>,
    /// Largest backend answer in bytes.
    pub max_answer_bytes: u64,
    /// Ask the backend for the model before a batch runs.
    pub model_check: bool,
    /// Idle limit for a client's request headers and upload body.
    pub client_timeout: Duration,
    /// Progress line every N results.
    pub progress_every: u64,
    /// Progress line at least this often.
    pub progress_interval: Duration,
    /// Default lifetime of files that name none (`--file-retention`; `None`: kept).
    pub file_retention: Option<Duration>,
    /// Shortest expiry accepted, seconds.
    pub min_expiry_seconds: u64,
    /// How long another model's work waits before a backend switches to it.
    pub model_switch_wait: Duration,
    /// Webhook receivers for every batch.
    pub webhook_urls: Vec<String>,
    /// The webhook signing key (the base64-decoded part of `whsec_…`).
    pub webhook_key: Option<Secret>,
    /// How long an event is delivered for.
    pub webhook_retry_for: Duration,
    /// First retry delay of a delivery.
    pub webhook_retry_initial: Duration,
    /// Batches may name their own receiver.
    pub webhook_allow_metadata: bool,
    /// Program run per finished batch.
    pub on_finish_cmd: Option<PathBuf>,
    /// Period of the expired-file sweep.
    pub expiry_sweep_interval: Duration,
    /// The scheduling policy.
    pub scheduling: crate::schedule::Policy,
    /// Starvation bound of the affine policy.
    pub group_wait_max: Duration,
    /// Whether to send `id_slot`.
    pub slot_affinity: SlotAffinity,
    /// The mode of a batch whose metadata names none.
    pub mode: Mode,
    /// Conversation mode: messages kept after a cut.
    pub conversation_keep: u32,
}

/// `--cache-size` unless given (the benchmarks measure the default with it).
pub const DEFAULT_CACHE_SIZE: &str = "4MiB";

/// Parses `2GiB`, `500MB`, `64k`, `1048576`.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("invalid size '{s}': expected e.g. 2GiB, 500MB or 1048576"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" => 1_000,
        "kib" => 1 << 10,
        "m" | "mb" => 1_000_000,
        "mib" => 1 << 20,
        "g" | "gb" => 1_000_000_000,
        "gib" => 1 << 30,
        "t" | "tb" => 1_000_000_000_000,
        "tib" => 1 << 40,
        other => return Err(format!("invalid size unit '{other}' in '{s}'")),
    };
    Ok((n * mult as f64) as u64)
}

/// A webhook receiver's URL: http(s), a host, no credentials shown anywhere (they are sent).
pub fn check_receiver_url(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .filter(|r| !r.is_empty() && !r.starts_with('/'))
        .ok_or_else(|| {
            format!(
                "webhook URL '{}' must start with http:// or https:// and name a host",
                crate::domain::redact_urls(url)
            )
        })?;
    if rest.contains(char::is_whitespace) {
        return Err(format!(
            "webhook URL '{}' contains white space",
            crate::domain::redact_urls(url)
        ));
    }
    Ok(url.to_string())
}

/// The signing key of a `whsec_<base64>` secret (Standard Webhooks), base64 again (the bytes
/// are decoded where they are used).
fn webhook_key(secret: &str) -> Result<String, String> {
    use base64::Engine;
    let b64 = secret.strip_prefix("whsec_").ok_or(
        "--webhook-secret must look like whsec_<base64> (as OpenAI's and Standard Webhooks' secrets do)",
    )?;
    match base64::engine::general_purpose::STANDARD.decode(b64) {
        Ok(k) if k.len() >= 16 => Ok(b64.to_string()),
        Ok(_) => Err("--webhook-secret: the key after whsec_ must be at least 16 bytes".into()),
        Err(_) => Err("--webhook-secret: the part after whsec_ is not base64".into()),
    }
}

impl Config {
    /// Checks the flags and builds the configuration.
    pub fn from_args(a: &ServeArgs) -> Result<Config, String> {
        if a.concurrency == 0 {
            return Err("--concurrency must be at least 1".into());
        }
        if a.concurrency > MAX_SLOTS {
            return Err(format!(
                "--concurrency {} is more than {MAX_SLOTS} requests at once to one server",
                a.concurrency
            ));
        }
        if a.max_attempts == 0 {
            return Err("--max-attempts must be at least 1".into());
        }
        if a.flush_every == 0 {
            return Err("--flush-every must be at least 1".into());
        }
        let retry = RetryPolicy {
            initial: a.retry_initial.into(),
            max: a.retry_max.into(),
            max_attempts: a.max_attempts,
        };
        if retry.initial > retry.max {
            return Err("--retry-initial must not exceed --retry-max".into());
        }
        let request_timeout: Duration = a.request_timeout.into();
        if request_timeout.is_zero() {
            return Err("--request-timeout must be positive".into());
        }
        let backends = a.backend.urls()?;
        let url = backends[0].0.clone();
        let mut model_map = HashMap::new();
        for pair in &a.model_map {
            let (from, to) = pair
                .split_once('=')
                .filter(|(f, t)| !f.is_empty() && !t.is_empty())
                .ok_or_else(|| format!("--model-map expects FROM=TO, got '{pair}'"))?;
            model_map.insert(from.to_string(), to.to_string());
        }
        let keep_alive = match a.keep_alive.parse::<i64>() {
            Ok(n) => serde_json::Value::from(n),
            Err(_) => serde_json::Value::from(a.keep_alive.clone()),
        };
        let max_file_size =
            parse_size(&a.max_file_size).map_err(|e| format!("--max-file-size: {e}"))?;
        if max_file_size == 0 {
            return Err("--max-file-size must be more than 0 bytes".into());
        }
        let max_answer_bytes =
            parse_size(&a.max_answer_size).map_err(|e| format!("--max-answer-size: {e}"))?;
        if max_answer_bytes < 1024 {
            return Err("--max-answer-size must be at least 1KiB".into());
        }
        if a.num_ctx.is_some_and(|n| n < 256) {
            return Err(
                "--num-ctx must be at least 256 tokens (it is the context of every call)".into(),
            );
        }
        if a.mode == Mode::Conversation && a.num_ctx.is_none() {
            return Err("--mode conversation needs --num-ctx: the history is cut to stay within the context of one call".into());
        }
        if a.conversation_keep < 2 {
            return Err("--conversation-keep must be at least 2 (a turn and its answer)".into());
        }
        let client_timeout: Duration = a.client_timeout.into();
        if client_timeout.is_zero() {
            return Err("--client-timeout must be positive".into());
        }
        Ok(Config {
            listen: a.listen,
            state_dir: a.state.clone(),
            backend: a.backend.backend,
            backend_url: url,
            backends,
            model: a.model.clone(),
            model_map,
            concurrency: a.concurrency,
            request_timeout,
            num_ctx: a.num_ctx,
            context_shift: a.context_shift,
            load_timeout: a.load_timeout.into(),
            keep_alive,
            max_file_size,
            expire: a.expire,
            completion_window: Duration::from_secs(24 * 3600),
            retry,
            reask: a.reask,
            reuse_results: a.reuse_results,
            shutdown_grace: a.shutdown_grace.into(),
            flush_every: a.flush_every,
            flush_interval: a.flush_interval.into(),
            lease_margin: a.lease_margin.into(),
            cache_bytes: parse_size(&a.cache_size).map_err(|e| format!("--cache-size: {e}"))?,
            max_line_bytes: 32 << 20,
            max_listed_errors: 1000,
            api_keys: a.api_key.clone(),
            backend_api_key: a.backend.backend_api_key.clone(),
            ca_pem: a.backend.ca_pem()?,
            allowed_hosts: a
                .allowed_host
                .iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            max_answer_bytes,
            model_check: !a.no_model_check,
            client_timeout,
            progress_every: a.progress_every.max(1),
            progress_interval: a.progress_interval.into(),
            file_retention: a.file_retention.map(Into::into),
            min_expiry_seconds: a.min_expiry_seconds.max(1),
            model_switch_wait: a.model_switch_wait.into(),
            webhook_urls: a
                .webhook_url
                .iter()
                .map(|u| check_receiver_url(u.trim()))
                .collect::<Result<_, _>>()?,
            webhook_key: match (
                &a.webhook_secret,
                a.webhook_url.is_empty() && !a.webhook_allow_metadata,
            ) {
                (Some(s), _) => Some(Secret(webhook_key(s.expose())?)),
                (None, true) => None,
                (None, false) => {
                    return Err("--webhook-url (and --webhook-allow-metadata) need --webhook-secret whsec_…: receivers verify each event with it".into());
                }
            },
            webhook_retry_for: a.webhook_retry_for.into(),
            webhook_retry_initial: Duration::from(a.webhook_retry_initial)
                .max(Duration::from_millis(1)),
            webhook_allow_metadata: a.webhook_allow_metadata,
            on_finish_cmd: a.on_finish_cmd.clone(),
            expiry_sweep_interval: Duration::from(a.expiry_sweep_interval)
                .max(Duration::from_millis(10)),
            scheduling: match a.scheduling {
                Scheduling::Affine => crate::schedule::Policy::Affine,
                Scheduling::Fifo => crate::schedule::Policy::Fifo,
            },
            group_wait_max: a.group_wait_max.into(),
            slot_affinity: a.slot_affinity,
            mode: a.mode,
            conversation_keep: a.conversation_keep,
        })
    }

    /// What the backend is told beside a line's body, as part of its reuse key: the same body
    /// under another backend kind, `--num-ctx` or context shift is another request.
    pub fn reuse_options(&self) -> String {
        format!(
            "{} num_ctx={:?} shift={}",
            self.backend.as_str(),
            self.num_ctx,
            self.context_shift
        )
    }

    /// Each backend's slots, in lane order: `#SLOTS`, else `--concurrency`.
    pub fn slots(&self) -> Vec<usize> {
        self.backends
            .iter()
            .map(|(_, n)| n.unwrap_or(self.concurrency))
            .collect()
    }

    /// Per lane, in order: (its backend's index, its slot on that backend).
    pub fn lane_map(&self) -> Vec<(usize, usize)> {
        self.slots()
            .into_iter()
            .enumerate()
            .flat_map(|(b, n)| (0..n).map(move |slot| (b, slot)))
            .collect()
    }

    /// Lanes in all: every backend's slots.
    pub fn lanes(&self) -> usize {
        self.slots().iter().sum::<usize>().max(1)
    }

    /// Requests leased at most at once: twice the concurrency, so the worker has the next
    /// requests at hand when calls finish. Bounds what a crash can make run again.
    pub fn lease_window(&self) -> usize {
        self.lanes() * 2
    }

    /// The model a line naming `model` runs on.
    pub fn map_model(&self, model: &str) -> String {
        if let Some(m) = &self.model {
            return m.clone();
        }
        self.model_map
            .get(model)
            .cloned()
            .unwrap_or_else(|| model.to_string())
    }

    /// A configuration for tests and embedding: the defaults of `serve` with this state
    /// directory and backend.
    pub fn for_tests(state_dir: PathBuf, backend: BackendKind, backend_url: &str) -> Config {
        let mut args = ServeArgs::parse_flags([
            "ollama-batch",
            "--listen",
            "127.0.0.1:0",
            "--backend-url",
            backend_url,
            "--backend",
            backend.as_str(),
        ]);
        args.state = state_dir;
        Config::from_args(&args).expect("default flags are valid")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_flag_overrides_the_map_and_the_map_overrides_the_line() {
        let mut cfg = Config::for_tests("/tmp/x".into(), BackendKind::Ollama, "http://x:1");
        cfg.model_map
            .insert("gpt-4o-mini".into(), "gemma3:12b".into());
        assert_eq!(cfg.map_model("gpt-4o-mini"), "gemma3:12b");
        assert_eq!(cfg.map_model("llama3"), "llama3");
        cfg.model = Some("qwen3:8b".into());
        assert_eq!(cfg.map_model("gpt-4o-mini"), "qwen3:8b");
    }

    #[test]
    fn bad_flags_are_refused_with_a_message() {
        let parse = |extra: &[&str]| {
            let mut argv = vec!["ollama-batch"];
            argv.extend_from_slice(extra);
            Config::from_args(&ServeArgs::parse_flags(argv))
        };
        assert!(parse(&[]).is_ok());
        for (args, needle) in [
            (&["--concurrency", "0"][..], "--concurrency"),
            (&["--max-attempts", "0"][..], "--max-attempts"),
            (
                &["--retry-initial", "10m", "--retry-max", "1s"][..],
                "--retry-initial",
            ),
            (&["--backend-url", "localhost:11434"][..], "--backend-url"),
            (&["--model-map", "nonsense"][..], "--model-map"),
            (&["--max-file-size", "huge"][..], "--max-file-size"),
            (&["--max-file-size", "0"][..], "--max-file-size"),
            (&["--max-answer-size", "10"][..], "--max-answer-size"),
            (&["--ca-cert", "/nonexistent/ca.pem"][..], "--ca-cert"),
            (&["--client-timeout", "0s"][..], "--client-timeout"),
            (&["--backend-url", "http://a:1#0"][..], "slots"),
            (&["--backend-url", "http://a:1/v1"][..], "without /v1"),
            (&["--backend-url", "http://a:1/?x=1"][..], "query string"),
            (
                &["--backend-url", "http://a:1#4294967296"][..],
                "from 1 to 4096",
            ),
            (&["--concurrency", "4294967296"][..], "more than 4096"),
            (&["--num-ctx", "0"][..], "--num-ctx"),
            (&["--backend-url", "http://a:1#many"][..], "slots"),
            (
                &[
                    "--backend-url",
                    "http://a:1",
                    "--backend-url",
                    "http://a:1/",
                ][..],
                "twice",
            ),
        ] {
            let err = parse(args).expect_err("must be refused");
            assert!(err.contains(needle), "{err}");
        }
    }

    #[test]
    fn keys_are_never_printed() {
        let a = ServeArgs::parse_flags([
            "ollama-batch",
            "--api-key",
            "sk-one,sk-two",
            "--backend-api-key",
            "sk-backend",
        ]);
        let cfg = Config::from_args(&a).expect("valid");
        assert_eq!(cfg.api_keys.len(), 2);
        assert_eq!(cfg.api_keys[1].expose(), "sk-two");
        let shown = format!("{cfg:?} {a:?}");
        assert!(!shown.contains("sk-"), "{shown}");
    }

    #[test]
    fn several_backends_each_with_slots_make_the_lanes() {
        let a = ServeArgs::parse_flags([
            "ollama-batch",
            "--concurrency",
            "3",
            "--backend-url",
            "http://gpu0:11434/,http://gpu1:11434#2",
            "--backend-url",
            "http://gpu2:11434#5",
        ]);
        let cfg = Config::from_args(&a).expect("valid");
        assert_eq!(cfg.backend_url, "http://gpu0:11434");
        assert_eq!(
            cfg.slots(),
            vec![3, 2, 5],
            "--concurrency for the one without #"
        );
        assert_eq!(cfg.lanes(), 10);
        let map = cfg.lane_map();
        assert_eq!(map.len(), 10);
        assert_eq!(map[..5], [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]);
        assert_eq!(map[9], (2, 4));
        assert_eq!(cfg.lease_window(), 20);
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("2GiB"), Ok(2 << 30));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert!(parse_size("lots").is_err());
        assert!(parse_size("3 parsecs").is_err());
    }
}

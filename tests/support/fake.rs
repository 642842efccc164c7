//! A fake model server speaking just enough HTTP/1.1 (keep-alive, Content-Length bodies) over
//! a raw TCP socket. Raw TCP lets a test reset a connection, hang without answering, or stop
//! listening and come back on the same port, which is what real backends do.
//!
//! Every answer echoes the request's last user message, so a test can check that each answer
//! belongs to its own request. Faults are decided per (user message, attempt), deterministically.

use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, watch};

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Shape {
    Ollama,
    OpenAi,
}

impl Shape {
    /// The `--backend` that speaks to a fake of this shape.
    pub fn kind(self) -> ollama_batch::config::BackendKind {
        match self {
            Shape::Ollama => ollama_batch::config::BackendKind::Ollama,
            Shape::OpenAi => ollama_batch::config::BackendKind::Openai,
        }
    }
}

/// A model's answer chosen by the test: from the request (in the backend's own shape), the
/// answer text and whether it was cut off at the token limit.
#[derive(Clone)]
pub struct Script(pub Arc<Answerer>);

/// See [`Script`].
pub type Answerer = dyn Fn(&Value) -> (String, bool) + Send + Sync;

impl std::fmt::Debug for Script {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Script")
    }
}

/// What the fake does; change it while it runs.
#[derive(Clone, Debug, Default)]
pub struct Behaviour {
    /// The answer text comes from this function instead of the echo.
    pub script: Option<Script>,
    /// A gateway in front of model servers: (calls it takes at once, `Retry-After` seconds);
    /// a call beyond them is answered 429 with that header (`None`: no header).
    pub gateway: Option<(usize, Option<u64>)>,
    /// Delay before each answer.
    pub delay: Duration,
    /// The first N attempts of every request answer 500 "CUDA error: out of memory".
    pub oom_first: u32,
    /// The out-of-memory message of those answers instead (another GPU's wording).
    pub oom_message: Option<String>,
    /// The status of those answers instead of 500.
    pub oom_status: Option<u16>,
    /// Per-mille of calls that hang (never answer).
    pub hang_permille: u32,
    /// Per-mille of calls whose connection is reset.
    pub reset_permille: u32,
    /// Per-mille of calls answered 503 "server busy".
    pub busy_permille: u32,
    /// Answer every call with this status and Ollama/OpenAI-shaped error text.
    pub fail_all: Option<(u16, String)>,
    /// Models the fake says it does not have (Ollama `/api/show` 404; left out of `/v1/models`).
    pub missing_models: Vec<String>,
    /// `/v1/models` lists these (empty: an empty list, which blocks nothing).
    pub listed_models: Vec<String>,
    /// Instead of a normal answer, answer 200 with this exact body text (a hostile backend).
    pub raw_answer: Option<String>,
    /// Answer every request, probes included, 200 with an HTML page (a misconfigured proxy).
    pub html: bool,
    /// Ollama's model loading: the first generating call of a model first loads it for this
    /// long, and the load is abandoned if that call's client leaves before it is done (as
    /// Ollama's scheduler does); a loaded model stays loaded.
    pub load_time: Option<Duration>,
    /// Answers are pretty-printed over many lines.
    pub pretty: bool,
    /// A user message containing this text is refused with 400 (a line that fails for good).
    pub refuse_marker: Option<String>,
    /// Ollama's memory, modelled: (bytes at load, bytes per token of `num_ctx`, GPU bytes). A
    /// chat at `num_ctx` loads the model at base + per_token × num_ctx (reported by
    /// `/api/ps`); past the GPU's bytes it fails with CUDA out of memory.
    pub memory: Option<(u64, u64, u64)>,
    /// `/api/show` reports this `context_length` in `model_info`.
    pub context_length: Option<u64>,
    /// Calls answered at once, as a server's slots (the rest wait their turn).
    pub slots: Option<usize>,
    /// The context really used is at most this, whatever `num_ctx` says (a server-side cap):
    /// longer prompts are cut to it.
    pub ctx_cap: Option<u64>,
    /// llama.cpp's slots, modelled: this many slots, each keeping the last prompt it ran. A
    /// call runs on the slot `id_slot` names, else on the idle slot whose cached prompt shares
    /// the longest prefix with it (llama.cpp's choice); its cached tokens are that common
    /// prefix (4 characters a token). `/props` reports the slots.
    pub slot_cache: Option<usize>,
    /// Every answer ends with a number no other call got: a line run again answers differently.
    pub unique_answers: bool,
    /// A slot's context (llama.cpp `-c / -np`): a call whose prompt tokens plus its
    /// `max_tokens` pass it is refused 400 `exceed_context_size_error`.
    pub context_limit: Option<u64>,
}

#[derive(Default)]
pub struct Stats {
    /// Calls per user message (all attempts, all outcomes).
    pub calls: Mutex<HashMap<String, u32>>,
    /// Calls answered 200 per user message.
    pub successes: Mutex<HashMap<String, u32>>,
    /// User messages in the order the calls arrived.
    pub order: Mutex<Vec<String>>,
    /// Every request body received (only when `keep_bodies`).
    pub bodies: Mutex<Vec<Value>>,
    pub total: AtomicU64,
    /// Models loaded (`load_time`), and loads abandoned because their client left.
    pub loaded: Mutex<std::collections::HashSet<String>>,
    /// Models unloaded (`keep_alive: 0`), in order.
    pub unloads: Mutex<Vec<String>>,
    pub loads_done: AtomicU64,
    pub loads_abandoned: AtomicU64,
    /// Faults served, by kind.
    pub ooms: AtomicU64,
    pub hangs: AtomicU64,
    pub resets: AtomicU64,
    pub busy: AtomicU64,
    /// `/api/show` calls (model checks).
    pub shows: AtomicU64,
    /// Prompt tokens in all, and those not served from a slot's cache (`slot_cache`).
    pub prompt_tokens: AtomicU64,
    pub prefilled: AtomicU64,
    /// Calls that named a slot (`id_slot`).
    pub pinned: AtomicU64,
    /// Calls refused for passing `context_limit`, and the largest prompt seen (tokens).
    pub over_context: AtomicU64,
    pub max_prompt: AtomicU64,
    /// Calls being answered now (the gateway's count), the most at once, and the 429s given.
    pub in_flight: AtomicU64,
    pub max_in_flight: AtomicU64,
    pub too_many: AtomicU64,
    /// The Authorization header of the last request, if any.
    pub last_auth: Mutex<Option<String>>,
}

pub struct Fake {
    pub shape: Shape,
    pub addr: std::net::SocketAddr,
    pub behaviour: Arc<Mutex<Behaviour>>,
    pub stats: Arc<Stats>,
    pub keep_bodies: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    /// The same as `down`, for waiting on.
    down_watch: Arc<watch::Sender<bool>>,
    up_again: Arc<Notify>,
    /// Open (true): calls are answered. Closed: calls are taken in and counted, then wait.
    gate: Arc<watch::Sender<bool>>,
    /// The slots of `Behaviour::slots`: (count, semaphore).
    slot_gate: SlotGate,
    /// The model loaded (`memory`): (name, size in bytes, num_ctx).
    loaded: Arc<Mutex<Option<(String, u64, u64)>>>,
    /// `slot_cache`: each slot's last prompt.
    slot_texts: SlotTexts,
}

/// The slots of `Behaviour::slot_cache`: each slot's last prompt, locked while a call runs on it.
type SlotTexts = Arc<Mutex<Vec<Arc<tokio::sync::Mutex<String>>>>>;

/// The slots of `Behaviour::slots`: (count, semaphore), made when first needed.
type SlotGate = Arc<Mutex<Option<(usize, Arc<tokio::sync::Semaphore>)>>>;

fn h(s: &str, attempt: u32, salt: u64) -> u32 {
    // FNV-1a: deterministic across runs.
    let mut x: u64 = 0xcbf29ce484222325 ^ salt;
    for b in s.bytes().chain(attempt.to_le_bytes()) {
        x ^= b as u64;
        x = x.wrapping_mul(0x100000001b3);
    }
    (x % 1000) as u32
}

impl Fake {
    pub async fn start(shape: Shape) -> Fake {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind fake");
        let addr = listener.local_addr().expect("addr");
        let fake = Fake {
            shape,
            addr,
            behaviour: Arc::new(Mutex::new(Behaviour::default())),
            stats: Arc::new(Stats::default()),
            keep_bodies: Arc::new(AtomicBool::new(false)),
            down: Arc::new(AtomicBool::new(false)),
            down_watch: Arc::new(watch::channel(false).0),
            up_again: Arc::new(Notify::new()),
            gate: Arc::new(watch::channel(true).0),
            slot_gate: Arc::new(Mutex::new(None)),
            loaded: Arc::new(Mutex::new(None)),
            slot_texts: Arc::new(Mutex::new(Vec::new())),
        };
        fake.serve(listener);
        fake
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn set(&self, f: impl FnOnce(&mut Behaviour)) {
        f(&mut self.behaviour.lock().expect("lock"));
    }

    /// Stops listening (connections are refused), drops open connections and resets the
    /// calls it is answering, as a crashed server does.
    pub fn go_down(&self) {
        self.down.store(true, Ordering::SeqCst);
        self.down_watch.send_replace(true);
    }

    /// Listens again on the same port.
    pub fn come_up(&self) {
        self.down.store(false, Ordering::SeqCst);
        self.down_watch.send_replace(false);
        self.up_again.notify_waiters();
    }

    /// Calls from now on are received (and counted, in order) but not answered until `release`.
    pub fn hold(&self) {
        self.gate.send_replace(false);
    }

    /// Answers the held calls and every later one.
    pub fn release(&self) {
        self.gate.send_replace(true);
    }

    pub fn calls_of(&self, user: &str) -> u32 {
        *self
            .stats
            .calls
            .lock()
            .expect("lock")
            .get(user)
            .unwrap_or(&0)
    }

    pub fn total_calls(&self) -> u64 {
        self.stats.total.load(Ordering::SeqCst)
    }

    fn serve(&self, first: TcpListener) {
        let addr = self.addr;
        let down = self.down.clone();
        let up_again = self.up_again.clone();
        let down_watch = self.down_watch.clone();
        let ctx = Ctx {
            shape: self.shape,
            behaviour: self.behaviour.clone(),
            stats: self.stats.clone(),
            keep_bodies: self.keep_bodies.clone(),
            down: self.down.clone(),
            down_watch: self.down_watch.clone(),
            gate: self.gate.clone(),
            slot_gate: self.slot_gate.clone(),
            loaded: self.loaded.clone(),
            slot_texts: self.slot_texts.clone(),
        };
        tokio::spawn(async move {
            let mut listener = Some(first);
            loop {
                if down.load(Ordering::SeqCst) {
                    listener = None; // closed: connections are refused
                    let notified = up_again.notified();
                    if down.load(Ordering::SeqCst) {
                        notified.await;
                    }
                    continue;
                }
                let l = match listener.take() {
                    Some(l) => l,
                    None => match TcpListener::bind(addr).await {
                        Ok(l) => l,
                        Err(_) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            continue;
                        }
                    },
                };
                // Going down closes the listening socket at once: new connections are refused.
                let mut down_now = down_watch.subscribe();
                let accepted = tokio::select! {
                    a = l.accept() => Some(a),
                    _ = down_now.wait_for(|d| *d) => None,
                };
                listener = Some(l);
                if let Some(Ok((sock, _))) = accepted {
                    let ctx = ctx.clone();
                    tokio::spawn(async move { ctx.connection(sock).await });
                }
            }
        });
    }
}

/// An HTTP/1.1 answer with a JSON body, head and body in one piece: written in one write (a
/// head and a body in two small writes meet Nagle's algorithm and the client's delayed ACK,
/// 40 ms a call).
fn http_answer(status: u16, headers: &[(String, String)], body: &str) -> String {
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    format!(
        "HTTP/1.1 {status} X\r\nContent-Type: application/json\r\n{extra}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
}

#[derive(Clone)]
struct Ctx {
    shape: Shape,
    behaviour: Arc<Mutex<Behaviour>>,
    stats: Arc<Stats>,
    keep_bodies: Arc<AtomicBool>,
    down: Arc<AtomicBool>,
    down_watch: Arc<watch::Sender<bool>>,
    gate: Arc<watch::Sender<bool>>,
    slot_gate: SlotGate,
    loaded: Arc<Mutex<Option<(String, u64, u64)>>>,
    slot_texts: SlotTexts,
}

enum Reply {
    Json(u16, Value),
    /// JSON with extra headers.
    JsonWith(u16, Value, Vec<(String, String)>),
    Raw(u16, String),
    Hang,
    Reset,
}

impl Ctx {
    async fn connection(&self, mut sock: TcpStream) {
        let mut buf: Vec<u8> = Vec::new();
        loop {
            // Read the head.
            let head_end = loop {
                if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    break i + 4;
                }
                let mut chunk = [0u8; 8192];
                // Going down closes idle connections at once, as a crashed server's do.
                let n = tokio::select! {
                    r = sock.read(&mut chunk) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
                    _ = self.went_down() => return,
                };
                buf.extend_from_slice(&chunk[..n]);
            };
            let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
            let mut lines = head.lines();
            let request_line = lines.next().unwrap_or_default().to_string();
            *self.stats.last_auth.lock().expect("lock") = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("authorization"))
                .map(|(_, v)| v.trim().to_string());
            let len: usize = lines
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                let mut chunk = [0u8; 65536];
                match sock.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                }
            }
            let body = buf[head_end..head_end + len].to_vec();
            buf.drain(..head_end + len);
            if self.down.load(Ordering::SeqCst) {
                return;
            }
            let mut parts = request_line.split_whitespace();
            let method = parts.next().unwrap_or_default().to_string();
            let path = parts.next().unwrap_or_default().to_string();
            // Loading the model first, if it is not loaded: abandoned if the client leaves.
            let load_time = self.behaviour.lock().expect("lock").load_time;
            if let Some(load) = load_time
                && matches!(path.as_str(), "/api/chat" | "/api/generate")
            {
                let model = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .and_then(|v| v["model"].as_str().map(str::to_string))
                    .unwrap_or_default();
                let loaded = self.stats.loaded.lock().expect("lock").contains(&model);
                if !loaded {
                    let done = tokio::time::sleep(load);
                    tokio::pin!(done);
                    loop {
                        let mut chunk = [0u8; 4096];
                        tokio::select! {
                            _ = &mut done => break,
                            r = sock.read(&mut chunk) => match r {
                                Ok(0) | Err(_) => {
                                    self.stats.loads_abandoned.fetch_add(1, Ordering::SeqCst);
                                    return;
                                }
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            },
                        }
                    }
                    self.stats.loads_done.fetch_add(1, Ordering::SeqCst);
                    self.stats.loaded.lock().expect("lock").insert(model);
                }
            }
            // Ollama's load request (an empty prompt): it only loads the model, answered as
            // Ollama does, and is not one of the calls the tests count.
            let parsed = serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null);
            let load_only =
                path == "/api/generate" && parsed["prompt"] == "" && parsed.get("images").is_none();
            // Ollama's unload request: no prompt, keep_alive 0.
            if path == "/api/generate"
                && parsed.get("prompt").is_none()
                && parsed["keep_alive"] == 0
            {
                let model = parsed["model"].as_str().unwrap_or_default().to_string();
                self.stats.loaded.lock().expect("lock").remove(&model);
                self.stats.unloads.lock().expect("lock").push(model.clone());
                let text =
                    json!({"model": model, "created_at": "2026-12-06T00:00:00Z", "response": "",
                                  "done": true, "done_reason": "unload"})
                    .to_string();
                if sock
                    .write_all(http_answer(200, &[], &text).as_bytes())
                    .await
                    .is_err()
                {
                    return;
                }
                continue;
            }
            // Going down mid-call is a crash: the connection is reset, no answer comes.
            let reply = if load_only && !self.down.load(Ordering::SeqCst) {
                let model = serde_json::from_slice::<Value>(&body)
                    .ok()
                    .map(|v| v["model"].clone())
                    .unwrap_or(Value::Null);
                Reply::Json(
                    200,
                    json!({"model": model, "created_at": "2026-12-06T00:00:00Z", "response": "",
                           "done": true, "done_reason": "load"}),
                )
            } else {
                tokio::select! {
                    r = self.handle(&method, &path, &body) => r,
                    _ = self.went_down() => Reply::Reset,
                }
            };
            let pretty = self.behaviour.lock().expect("lock").pretty;
            let reply = match reply {
                Reply::Json(status, v) if pretty => {
                    Reply::Raw(status, serde_json::to_string_pretty(&v).unwrap_or_default())
                }
                r => r,
            };
            match reply {
                Reply::JsonWith(status, v, headers) => {
                    if sock
                        .write_all(http_answer(status, &headers, &v.to_string()).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Reply::Json(status, v) => {
                    if sock
                        .write_all(http_answer(status, &[], &v.to_string()).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Reply::Raw(status, text) => {
                    if sock
                        .write_all(http_answer(status, &[], &text).as_bytes())
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Reply::Hang => {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                    return;
                }
                Reply::Reset => {
                    // Linger 0 makes the close an immediate RST (it never blocks, unlike the
                    // case the deprecation warns about).
                    #[allow(deprecated)]
                    let _ = sock.set_linger(Some(Duration::ZERO));
                    return; // dropping with linger 0 sends RST
                }
            }
        }
    }

    /// Ends when the fake goes down (at once if it is down).
    async fn went_down(&self) {
        let _ = self.down_watch.subscribe().wait_for(|d| *d).await;
    }

    async fn handle(&self, method: &str, path: &str, body: &[u8]) -> Reply {
        let b = self.behaviour.lock().expect("lock").clone();
        if b.html {
            self.stats.total.fetch_add(1, Ordering::SeqCst);
            return Reply::Raw(
                200,
                "<html><body><h1>Welcome to nginx!</h1></body></html>".into(),
            );
        }
        if method == "GET" {
            return match path {
                "/api/tags" => Reply::Json(200, json!({"models": []})),
                "/props" if b.slot_cache.is_some() => Reply::Json(
                    200,
                    json!({"total_slots": b.slot_cache, "default_generation_settings": {"n_ctx": 8192}}),
                ),
                "/api/ps" => {
                    let models: Vec<Value> = self
                        .loaded
                        .lock()
                        .expect("lock")
                        .iter()
                        .map(|(name, size, ctx)| {
                            let vram = b.memory.map_or(*size, |m| (*size).min(m.2));
                            json!({"name": name, "model": name, "size": size,
                                   "size_vram": vram, "context_length": ctx})
                        })
                        .collect();
                    Reply::Json(200, json!({"models": models}))
                }
                "/v1/models" => {
                    let data: Vec<Value> = b
                        .listed_models
                        .iter()
                        .filter(|m| !b.missing_models.contains(m))
                        .map(|m| json!({"id": m, "object": "model", "owned_by": "fake"}))
                        .collect();
                    Reply::Json(200, json!({"object": "list", "data": data}))
                }
                _ => Reply::Json(404, json!({"error": "not found"})),
            };
        }
        let req: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
        if path == "/tokenize" {
            // llama.cpp's tokenizer, faked: one token per 4 characters (rounded up).
            let n = req["content"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .count()
                .div_ceil(4);
            return Reply::Json(200, json!({"tokens": (0..n).collect::<Vec<_>>()}));
        }
        if path == "/api/show" {
            self.stats.shows.fetch_add(1, Ordering::SeqCst);
            let model = req["model"].as_str().unwrap_or_default();
            return if b.missing_models.iter().any(|m| m == model) {
                Reply::Json(404, json!({"error": format!("model '{model}' not found")}))
            } else {
                let info = match b.context_length {
                    Some(n) => json!({"fake.context_length": n}),
                    None => json!({}),
                };
                Reply::Json(
                    200,
                    json!({"details": {"family": "fake"}, "model_info": info}),
                )
            };
        }
        if self.keep_bodies.load(Ordering::SeqCst) {
            self.stats.bodies.lock().expect("lock").push(req.clone());
        }
        let user = req["messages"]
            .as_array()
            .and_then(|m| m.last())
            .and_then(|m| m["content"].as_str())
            .or_else(|| req["input"].as_str())
            .or_else(|| req["prompt"].as_str())
            .unwrap_or_default()
            .to_string();
        let attempt = {
            let mut calls = self.stats.calls.lock().expect("lock");
            let c = calls.entry(user.clone()).or_insert(0);
            *c += 1;
            *c
        };
        let call_number = self.stats.total.fetch_add(1, Ordering::SeqCst);
        self.stats.order.lock().expect("lock").push(user.clone());
        // The gateway counts the calls it is answering; one past its capacity gets a 429.
        struct Leaving<'a>(&'a AtomicU64);
        impl Drop for Leaving<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::SeqCst);
            }
        }
        let now_in = self.stats.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        let _leaving = Leaving(&self.stats.in_flight);
        if let Some((cap, retry_after)) = b.gateway {
            if now_in > cap as u64 {
                self.stats.too_many.fetch_add(1, Ordering::SeqCst);
                let headers = retry_after
                    .map(|s| vec![("Retry-After".to_string(), s.to_string())])
                    .unwrap_or_default();
                return Reply::JsonWith(
                    429,
                    json!({"error": {"message": "Too many requests: the gateway is full", "type": "rate_limit_error", "param": null, "code": "rate_limit_exceeded"}}),
                    headers,
                );
            }
            self.stats.max_in_flight.fetch_max(now_in, Ordering::SeqCst);
        }
        // The sender lives as long as the fake, so this only ends when the gate opens.
        let _ = self.gate.subscribe().wait_for(|open| *open).await;
        let slot = match b.slots {
            Some(n) => {
                let sem = {
                    let mut g = self.slot_gate.lock().expect("lock");
                    if g.as_ref().map(|(c, _)| *c) != Some(n) {
                        *g = Some((n, Arc::new(tokio::sync::Semaphore::new(n))));
                    }
                    g.as_ref().map(|(_, s)| s.clone())
                };
                match sem {
                    Some(s) => s.acquire_owned().await.ok(),
                    None => None,
                }
            }
            None => None,
        };
        // llama.cpp's slot cache: pick the slot, hold it for the call, count what was cached.
        let mut cache_figures = None;
        let _slot_guard = match b.slot_cache {
            Some(n) => {
                let text: String = req["messages"]
                    .as_array()
                    .map(|ms| {
                        ms.iter()
                            .map(|m| {
                                format!(
                                    "{}:{}\n",
                                    m["role"].as_str().unwrap_or_default(),
                                    m["content"].as_str().unwrap_or_default()
                                )
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                let slots = {
                    let mut g = self.slot_texts.lock().expect("lock");
                    if g.len() != n {
                        *g = (0..n)
                            .map(|_| Arc::new(tokio::sync::Mutex::new(String::new())))
                            .collect();
                    }
                    g.clone()
                };
                let common =
                    |a: &str, b: &str| a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
                let mut guard = match req["id_slot"].as_u64() {
                    Some(i) => {
                        self.stats.pinned.fetch_add(1, Ordering::SeqCst);
                        slots[i as usize % n].clone().lock_owned().await
                    }
                    None => {
                        // The idle slot with the longest common prefix; all busy: wait for the
                        // best one.
                        let mut best: Option<(usize, tokio::sync::OwnedMutexGuard<String>)> = None;
                        for s in &slots {
                            if let Ok(g) = s.clone().try_lock_owned() {
                                let c = common(&g, &text);
                                if best.as_ref().is_none_or(|(bc, _)| c > *bc) {
                                    best = Some((c, g));
                                }
                            }
                        }
                        match best {
                            Some((_, g)) => g,
                            None => {
                                let i = (0..n)
                                    .max_by_key(|&i| {
                                        slots[i].try_lock().map(|g| common(&g, &text)).unwrap_or(0)
                                    })
                                    .unwrap_or(0);
                                slots[i].clone().lock_owned().await
                            }
                        }
                    }
                };
                let tokens = (text.len() as u64).div_ceil(4);
                let cached = (common(&guard, &text) as u64 / 4).min(tokens.saturating_sub(1));
                *guard = text;
                self.stats.prompt_tokens.fetch_add(tokens, Ordering::SeqCst);
                self.stats
                    .prefilled
                    .fetch_add(tokens - cached, Ordering::SeqCst);
                cache_figures = Some((tokens, cached));
                Some(guard)
            }
            None => None,
        };
        let num_ctx = req["options"]["num_ctx"].as_u64().unwrap_or(2048);
        if let (Some((base, per, gpu)), Shape::Ollama) = (b.memory, self.shape) {
            let size = base + per * num_ctx;
            if size > gpu {
                *self.loaded.lock().expect("lock") = None;
                return Reply::Json(
                    500,
                    json!({"error": "llama runner process has terminated: cudaMalloc failed: out of memory"}),
                );
            }
            let model = req["model"].as_str().unwrap_or_default().to_string();
            *self.loaded.lock().expect("lock") = Some((model, size, num_ctx));
        }
        if !b.delay.is_zero() {
            tokio::time::sleep(b.delay).await;
        }
        let err = |status: u16, msg: &str| match self.shape {
            Shape::Ollama => Reply::Json(status, json!({"error": msg})),
            Shape::OpenAi => Reply::Json(
                status,
                json!({"error": {"message": msg, "type": "server_error", "param": null, "code": null}}),
            ),
        };
        if let Some((status, msg)) = &b.fail_all {
            return err(*status, msg);
        }
        if let Some(m) = &b.refuse_marker
            && user.contains(m.as_str())
        {
            return err(400, "invalid request: the fake refuses this line");
        }
        if attempt <= b.oom_first {
            self.stats.ooms.fetch_add(1, Ordering::SeqCst);
            return err(
                b.oom_status.unwrap_or(500),
                b.oom_message
                    .as_deref()
                    .unwrap_or("llama runner process has terminated: CUDA error: out of memory"),
            );
        }
        if h(&user, attempt, 1) < b.hang_permille {
            self.stats.hangs.fetch_add(1, Ordering::SeqCst);
            return Reply::Hang;
        }
        if h(&user, attempt, 2) < b.reset_permille {
            self.stats.resets.fetch_add(1, Ordering::SeqCst);
            return Reply::Reset;
        }
        if h(&user, attempt, 3) < b.busy_permille {
            self.stats.busy.fetch_add(1, Ordering::SeqCst);
            return err(
                503,
                "server busy, please try again. maximum pending requests exceeded",
            );
        }
        let whole_prompt = req.to_string().len() as u64 / 4;
        self.stats
            .max_prompt
            .fetch_max(whole_prompt, Ordering::SeqCst);
        if let Some(limit) = b.context_limit
            && whole_prompt + req["max_tokens"].as_u64().unwrap_or(0) > limit
        {
            self.stats.over_context.fetch_add(1, Ordering::SeqCst);
            return Reply::Json(
                400,
                json!({"error": {"code": 400, "type": "exceed_context_size_error",
                                 "message": format!("the request exceeds the available context size ({whole_prompt} tokens, context {limit}), try increasing it")}}),
            );
        }
        *self
            .stats
            .successes
            .lock()
            .expect("lock")
            .entry(user.clone())
            .or_insert(0) += 1;
        if let Some(raw) = &b.raw_answer {
            return Reply::Raw(200, raw.clone());
        }
        let (answer, cut) = match &b.script {
            Some(Script(f)) => f(&req),
            None if b.unique_answers => (format!("echo:{user} #{call_number}"), false),
            None => (format!("echo:{user}"), false),
        };
        let (finish, done) = if cut {
            ("length", "length")
        } else {
            ("stop", "stop")
        };
        let mut prompt_tokens = whole_prompt;
        let mut cached_tokens = 2;
        if let Some((t, c)) = cache_figures {
            (prompt_tokens, cached_tokens) = (t, c);
        }
        if b.memory.is_some() {
            // Ollama cuts a prompt longer than the context.
            prompt_tokens = prompt_tokens.min(num_ctx.min(b.ctx_cap.unwrap_or(u64::MAX)));
        }
        drop(slot);
        match (self.shape, path) {
            (Shape::Ollama, "/api/chat") => Reply::Json(
                200,
                json!({"model": req["model"], "created_at": "2026-11-27T00:00:00Z",
                       "message": {"role": "assistant", "content": answer},
                       "done": true, "done_reason": done,
                       "prompt_eval_count": prompt_tokens, "eval_count": 3}),
            ),
            (Shape::Ollama, "/api/embed") => Reply::Json(
                200,
                json!({"model": req["model"], "embeddings": [[0.1, 0.2, user.len() as f64]],
                       "prompt_eval_count": 4}),
            ),
            (Shape::Ollama, "/api/generate") => Reply::Json(
                200,
                json!({"model": req["model"], "response": answer, "done": true,
                       "done_reason": done, "prompt_eval_count": prompt_tokens, "eval_count": 3}),
            ),
            (Shape::OpenAi, "/v1/chat/completions") => Reply::Json(
                200,
                json!({"id": "chatcmpl-fake", "object": "chat.completion", "created": 1,
                       "model": req["model"],
                       "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                    "finish_reason": finish, "logprobs": null}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3,
                                 "total_tokens": prompt_tokens + 3,
                                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}}),
            ),
            (Shape::OpenAi, "/v1/embeddings") => Reply::Json(
                200,
                json!({"object": "list", "model": req["model"],
                       "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2]}],
                       "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
            ),
            (Shape::OpenAi, "/v1/completions") => Reply::Json(
                200,
                json!({"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": req["model"],
                       "choices": [{"index": 0, "text": answer, "finish_reason": finish, "logprobs": null}],
                       "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 3, "total_tokens": prompt_tokens + 3}}),
            ),
            _ => err(404, &format!("no route {path}")),
        }
    }
}

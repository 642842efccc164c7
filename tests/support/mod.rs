//! Shared test helpers: a fake model server over real HTTP (raw TCP, so that it can reset
//! connections, hang, and go down and come back), the server under test on port 0, and a small
//! OpenAI-API client.
#![allow(dead_code)]

pub mod browser;
pub mod fake;
pub mod harness;
pub mod process;

use ollama_batch::config::{BackendKind, Config};
use ollama_batch::server::{self, Running};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How the `custom_id`s of a batch's output and error lines compare with the lines it had.
#[derive(Debug, Default, PartialEq)]
pub struct Tally {
    /// Expected, in neither file.
    pub lost: Vec<String>,
    /// In the files more than once.
    pub duplicated: Vec<String>,
    /// In the files, not expected.
    pub unknown: Vec<String>,
}

/// Counts the `custom_id`s of `lines` (the output and error files together) against
/// `expected`.
pub fn tally<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
    expected: impl IntoIterator<Item = String>,
) -> Tally {
    let mut counts: std::collections::BTreeMap<String, usize> = Default::default();
    for l in lines {
        let id = l["custom_id"]
            .as_str()
            .unwrap_or("<no custom_id>")
            .to_string();
        *counts.entry(id).or_default() += 1;
    }
    let expected: std::collections::BTreeSet<String> = expected.into_iter().collect();
    Tally {
        lost: expected
            .iter()
            .filter(|id| !counts.contains_key(*id))
            .cloned()
            .collect(),
        duplicated: counts
            .iter()
            .filter(|(_, c)| **c > 1)
            .map(|(id, _)| id.clone())
            .collect(),
        unknown: counts
            .keys()
            .filter(|id| !expected.contains(*id))
            .cloned()
            .collect(),
    }
}

/// Every expected line is in the output and error files together exactly once, and nothing
/// else is: the suite's one exactly-once check.
pub fn assert_exactly_once<'a>(
    lines: impl IntoIterator<Item = &'a Value>,
    expected: impl IntoIterator<Item = String>,
) {
    let t = tally(lines, expected);
    assert_eq!(t, Tally::default(), "not exactly once");
}

/// `c-1` … `c-n`: the custom ids of `chat_file(n, …)`.
pub fn ids(n: usize) -> impl Iterator<Item = String> {
    (1..=n).map(|i| format!("c-{i}"))
}

/// Checks `check` every 10 ms until it holds (on tokio's clock: virtual under a paused clock);
/// fails the test naming `what` after `within`. The one poll-until-deadline of the suite.
pub async fn until(what: &str, within: Duration, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// [`until`] for a check that is itself asynchronous: its value once it has one.
pub async fn until_some<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut check: impl FnMut() -> F,
) -> T {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "not within {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The server under test, in-process, on a loopback port 0.
pub struct TestServer {
    pub base: String,
    pub running: Option<Running>,
    pub dir: PathBuf,
}

impl TestServer {
    pub async fn start(cfg: Config) -> TestServer {
        let dir = cfg.state_dir.clone();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let running = server::start(cfg, listener).await.expect("server starts");
        TestServer {
            base: format!("http://{}", running.addr),
            running: Some(running),
            dir,
        }
    }

    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
            r.wait().await.expect("clean stop");
        }
    }
}

/// A configuration with fast retries for tests.
pub fn config(dir: &Path, kind: BackendKind, backend_url: &str) -> Config {
    let mut cfg = Config::for_tests(dir.to_path_buf(), kind, backend_url);
    cfg.retry.initial = Duration::from_millis(10);
    cfg.retry.max = Duration::from_millis(100);
    cfg.flush_interval = Duration::from_millis(5);
    cfg.shutdown_grace = Duration::from_secs(5);
    cfg.cache_bytes = 16 << 20;
    cfg
}

/// The server under test against `fake`: a fresh state directory (kept alive by the returned
/// guard), the test configuration for the fake's shape, changed by `tweak`.
pub async fn server_with(
    fake: &fake::Fake,
    tweak: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), fake.shape.kind(), &fake.url());
    tweak(&mut cfg);
    let server = TestServer::start(cfg).await;
    (dir, server)
}

/// An HTTP client builder for the tests: the crate's own (it installs the process's TLS
/// provider, without which reqwest built with `rustls-no-provider` panics).
pub fn http() -> reqwest::ClientBuilder {
    ollama_batch::backend::http_client(None).expect("an HTTP client")
}

/// A plain HTTP client for the OpenAI API of the server under test.
pub struct Api {
    pub base: String,
    pub http: reqwest::Client,
}

impl Api {
    pub fn new(base: &str) -> Api {
        Api {
            base: base.to_string(),
            http: http().build().expect("client"),
        }
    }

    pub async fn upload(&self, name: &str, bytes: Vec<u8>, purpose: &str) -> (u16, Value) {
        let form = reqwest::multipart::Form::new()
            .text("purpose", purpose.to_string())
            .part(
                "file",
                reqwest::multipart::Part::bytes(bytes).file_name(name.to_string()),
            );
        let r = self
            .http
            .post(format!("{}/v1/files", self.base))
            .multipart(form)
            .send()
            .await
            .expect("upload sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("upload answer is JSON"))
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let (status, text) = self.get_text(path).await;
        let v = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("GET {path}: answer is not JSON ({e}): {text:?}"));
        (status, v)
    }

    pub async fn get_text(&self, path: &str) -> (u16, String) {
        let r = self
            .http
            .get(format!("{}{}", self.base, path))
            .send()
            .await
            .expect("get sent");
        let status = r.status().as_u16();
        (status, r.text().await.expect("body"))
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self
            .http
            .post(format!("{}{}", self.base, path))
            .json(&body)
            .send()
            .await
            .expect("post sent");
        let status = r.status().as_u16();
        (status, r.json().await.expect("answer is JSON"))
    }

    pub async fn create_batch(&self, file_id: &str, endpoint: &str) -> Value {
        self.create_batch_with(file_id, endpoint, Value::Null).await
    }

    /// [`Api::create_batch`] with `metadata` (null: none).
    pub async fn create_batch_with(&self, file_id: &str, endpoint: &str, metadata: Value) -> Value {
        let (status, b) = self
            .post(
                "/v1/batches",
                json!({"input_file_id": file_id, "endpoint": endpoint, "completion_window": "24h",
                       "metadata": metadata}),
            )
            .await;
        assert_eq!(status, 200, "create batch: {b}");
        b
    }

    /// Uploads `bytes`, creates a batch on `endpoint` and returns the created batch object.
    pub async fn submit(&self, bytes: Vec<u8>, endpoint: &str) -> Value {
        self.submit_with(bytes, endpoint, Value::Null).await
    }

    /// [`Api::submit`] with `metadata` (null: none).
    pub async fn submit_with(&self, bytes: Vec<u8>, endpoint: &str, metadata: Value) -> Value {
        let (status, file) = self.upload("input.jsonl", bytes, "batch").await;
        assert_eq!(status, 200, "upload: {file}");
        self.create_batch_with(file["id"].as_str().expect("file id"), endpoint, metadata)
            .await
    }

    /// [`Api::submit`], returning only the new batch's id.
    pub async fn submit_id(&self, bytes: Vec<u8>, endpoint: &str) -> String {
        let b = self.submit(bytes, endpoint).await;
        b["id"].as_str().expect("batch id").to_string()
    }

    /// Runs `n` chat lines (`c-1` … `c-n`, system prompt "s") on `model` to a terminal status;
    /// the final batch object.
    pub async fn run_chat(&self, n: usize, model: &str, within: Duration) -> Value {
        self.run_file(chat_file(n, model, "s"), "/v1/chat/completions", within)
            .await
    }

    /// [`Api::submit`], then waits for a terminal status and returns the final batch object.
    pub async fn run_file(&self, bytes: Vec<u8>, endpoint: &str, within: Duration) -> Value {
        let b = self.submit(bytes, endpoint).await;
        self.wait_terminal(b["id"].as_str().expect("batch id"), within)
            .await
    }

    /// GETs `path` (every 5 ms) until `done(answer)` holds; fails the test after `within`.
    async fn poll(
        &self,
        path: &str,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + within;
        loop {
            let (status, v) = self.get(path).await;
            assert_eq!(status, 200, "{v}");
            if done(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{path}: not {what} within {within:?}: {v}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// Polls a batch until `done(batch)` holds; fails the test after `within`.
    pub async fn wait_for(
        &self,
        batch_id: &str,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll(&format!("/v1/batches/{batch_id}"), within, what, done)
            .await
    }

    /// Polls `/status` until `done(status)` holds; fails the test after `within`.
    pub async fn wait_status(
        &self,
        within: Duration,
        what: &str,
        done: impl Fn(&Value) -> bool,
    ) -> Value {
        self.poll("/status", within, what, done).await
    }

    /// Polls a batch until it is `in_progress`.
    pub async fn wait_in_progress(&self, batch_id: &str, within: Duration) -> Value {
        self.wait_for(batch_id, within, "in_progress", |b| {
            b["status"] == "in_progress"
        })
        .await
    }

    /// Polls a batch until it reaches a terminal status.
    pub async fn wait_terminal(&self, batch_id: &str, within: Duration) -> Value {
        self.wait_for(batch_id, within, "finished", |b| {
            matches!(
                b["status"].as_str(),
                Some("completed" | "failed" | "cancelled" | "expired")
            )
        })
        .await
    }

    /// Polls a batch until at least `n` lines are durably completed.
    pub async fn wait_completed(&self, batch_id: &str, n: u64, within: Duration) -> Value {
        self.wait_for(batch_id, within, &format!("{n} lines done"), |b| {
            b["request_counts"]["completed"].as_u64().unwrap_or(0) >= n
        })
        .await
    }

    /// `/metrics`, parsed ([`parse_metrics`]).
    pub async fn metrics(&self) -> Scrape {
        let (status, text) = self.get_text("/metrics").await;
        assert_eq!(status, 200, "{text}");
        parse_metrics(&text)
    }

    /// The lines of a file's content, parsed.
    pub async fn lines(&self, file_id: &Value) -> Vec<Value> {
        let Some(id) = file_id.as_str() else {
            return Vec::new();
        };
        let (status, text) = self.get_text(&format!("/v1/files/{id}/content")).await;
        assert_eq!(status, 200, "{text}");
        text.lines()
            .map(|l| serde_json::from_str(l).expect("output line is JSON"))
            .collect()
    }
}

/// (metric name, labels) → value.
pub type Scrape = std::collections::BTreeMap<(String, Vec<(String, String)>), f64>;

/// A parsed scrape: (name, labels) → value. Comment lines are checked for shape, every sample
/// line must parse.
pub fn parse_metrics(text: &str) -> Scrape {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix('#') {
            let kw = rest.split_whitespace().next().unwrap_or_default();
            assert!(
                matches!(kw, "HELP" | "TYPE" | "UNIT" | "EOF"),
                "bad comment: {line}"
            );
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("no value: {line}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value: {line}"));
        let (name, labels) = match series.split_once('{') {
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("bad labels: {line}"));
                let labels: Vec<(String, String)> = l
                    .split(',')
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once('=')
                            .unwrap_or_else(|| panic!("bad label: {line}"));
                        (k.to_string(), v.trim_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
            None => (series.to_string(), Vec::new()),
        };
        assert!(name.starts_with("obatch_"), "one prefix: {line}");
        out.insert((name, labels), value);
    }
    out
}

/// One series of a scrape, by name and labels.
pub fn metric(m: &Scrape, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let key = (
        name.to_string(),
        labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect::<Vec<_>>(),
    );
    m.get(&key).copied()
}

/// A chat line whose user message names its custom_id, so that each answer can be traced back
/// to its request.
pub fn chat_line(custom_id: &str, model: &str, system: &str) -> String {
    json!({
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {
            "model": model,
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": format!("score {custom_id}")}
            ],
            "max_tokens": 8
        }
    })
    .to_string()
}

/// A JSONL file of `n` chat lines `c-1` … `c-n`.
pub fn chat_file(n: usize, model: &str, system: &str) -> Vec<u8> {
    let mut s = String::new();
    for i in 1..=n {
        s.push_str(&chat_line(&format!("c-{i}"), model, system));
        s.push('\n');
    }
    s.into_bytes()
}

/// `c-1` … `c-n` chat lines without a system prompt, each user message `score c-i` and `pad`
/// more characters: unique, long bodies whose answers (the fakes echo the user message) are
/// as long. For tests that need the store, or the results, to be large.
pub fn padded_chat_file(n: usize, pad: usize) -> Vec<u8> {
    let filler = "x".repeat(pad);
    let mut s = String::new();
    for i in 1..=n {
        let line = json!({"custom_id": format!("c-{i}"), "method": "POST",
            "url": "/v1/chat/completions", "body": {"model": "m", "messages": [
                {"role": "user", "content": format!("score c-{i} {filler}")}]}});
        s.push_str(&line.to_string());
        s.push('\n');
    }
    s.into_bytes()
}

/// Path of the binary under test.
pub fn binary() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_ollama-batch"))
}

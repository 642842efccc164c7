//! `ollama-batch run`, as a real process: the whole job against the fake backend, with the
//! engine in the process or on a separate server, interrupted with SIGINT and run again.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use crate::support::until;
use crate::support::{Api, TestServer, binary, config};
use serde_json::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A `run` process whose stdout and stderr go to files in `dir`.
struct RunProc {
    child: Child,
    out: PathBuf,
    err: PathBuf,
}

impl Drop for RunProc {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl RunProc {
    fn start(dir: &Path, tag: &str, args: &[&str]) -> RunProc {
        let out = dir.join(format!("{tag}.stdout"));
        let err = dir.join(format!("{tag}.stderr"));
        let child = Command::new(binary())
            .arg("run")
            .args(args)
            .env_remove("OLLAMA_BATCH_SERVER")
            .stdout(Stdio::from(std::fs::File::create(&out).expect("stdout")))
            .stderr(Stdio::from(std::fs::File::create(&err).expect("stderr")))
            .spawn()
            .expect("spawn run");
        RunProc { child, out, err }
    }

    /// Waits for the exit: (code, stdout, stderr).
    fn finish(mut self, within: Duration) -> (i32, String, String) {
        let status = wait_exit(&mut self.child, within);
        let out = std::fs::read_to_string(&self.out).unwrap_or_default();
        let err = std::fs::read_to_string(&self.err).unwrap_or_default();
        (status.code().unwrap_or(-1), out, err)
    }
}

/// The flags of an in-process engine on `state` against the fake.
fn engine_flags(state: &Path, fake: &Fake) -> Vec<String> {
    [
        "--listen",
        "127.0.0.1:0",
        "--backend",
        "openai",
        "--backend-url",
        &fake.url(),
        "--state",
        state.to_str().expect("path"),
        "--flush-interval",
        "5ms",
        "--retry-initial",
        "10ms",
        "--retry-max",
        "50ms",
        "--shutdown-grace",
        "5s",
        "--poll",
        "100ms",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A server on the state directory a `run` left, against the fake: to look at what it holds.
async fn server_on(state: &Path, fake: &Fake) -> TestServer {
    TestServer::start(config(
        state,
        ollama_batch::config::BackendKind::Openai,
        &fake.url(),
    ))
    .await
}

fn refs(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

/// Reads a JSONL file into custom_id → record.
fn by_id(path: &Path) -> HashMap<String, Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut m = HashMap::new();
    for line in text.lines() {
        let v: Value = serde_json::from_str(line).expect("a JSON line");
        let id = v["custom_id"].as_str().expect("custom_id").to_string();
        assert!(m.insert(id.clone(), v).is_none(), "{id} twice in {path:?}");
    }
    m
}

/// The user message of line `i` of [`input`].
fn user(i: usize) -> String {
    format!("candidate {i}")
}

/// `n` chat lines; those whose index is in `refused` carry the fake's refuse marker.
fn input(n: usize, refused: &[usize]) -> String {
    (0..n)
        .map(|i| {
            let mut u = user(i);
            if refused.contains(&i) {
                u.push_str(" REFUSE");
            }
            let v = serde_json::json!({"custom_id": format!("c{i}"), "method": "POST",
                "url": "/v1/chat/completions",
                "body": {"model": "m", "messages": [{"role": "system", "content": "rubric"},
                                                      {"role": "user", "content": u}]}});
            format!("{v}\n")
        })
        .collect()
}

/// Files uploaded for batch use (outputs and error files are `batch_output`).
async fn inputs(api: &Api) -> usize {
    let (_, files) = api.get("/v1/files").await;
    files["data"]
        .as_array()
        .expect("a list")
        .iter()
        .filter(|f| f["purpose"] == "batch")
        .count()
}

/// Waits until the fake has answered at least `n` calls.
async fn wait_calls(fake: &Fake, n: u64, within: Duration) {
    until(&format!("the fake answers {n} calls"), within, || {
        fake.total_calls() >= n
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_no_server_does_the_whole_job_a_rerun_downloads_again_and_retry_follows() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.refuse_marker = Some("REFUSE".into()));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = dir.path().join("job.jsonl");
    let refused = [3usize, 17, 29];
    std::fs::write(&file, input(40, &refused)).expect("input");
    let mut args = vec![file.to_str().expect("path").to_string()];
    args.extend(engine_flags(&state, &fake));

    let (code, out, err) =
        RunProc::start(dir.path(), "first", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(
        code, 3,
        "some lines failed: exit 3\nstdout:{out}\nstderr:{err}"
    );
    assert!(err.contains("engine running in this process"), "{err}");
    assert!(err.contains("uploading job.jsonl (40 lines"), "{err}");
    assert!(out.contains("completed: 37 succeeded, 3 failed"), "{out}");
    // Not a terminal: plain progress lines, no bar, no escape codes.
    assert!(err.contains("completed: 40/40 (100.0%), 3 failed"), "{err}");
    assert!(!err.contains('\u{1b}'), "{err}");
    let output = by_id(&dir.path().join("job.output.jsonl"));
    let errors = by_id(&dir.path().join("job.errors.jsonl"));
    assert_eq!(output.len() + errors.len(), 40);
    for i in 0..40 {
        let id = format!("c{i}");
        if refused.contains(&i) {
            let e = &errors[&id];
            assert_eq!(e["response"]["status_code"], 400, "{e}");
            assert!(!output.contains_key(&id));
        } else {
            let o = &output[&id];
            assert_eq!(o["response"]["status_code"], 200, "{o}");
            assert_eq!(
                o["response"]["body"]["choices"][0]["message"]["content"],
                format!("echo:{}", user(i)),
                "{id} carries its own answer"
            );
        }
    }
    let calls = fake.total_calls();

    // The same command again: the same batch, downloaded again; nothing uploaded or run.
    std::fs::remove_file(dir.path().join("job.output.jsonl")).expect("rm");
    let (code, out2, err) =
        RunProc::start(dir.path(), "second", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("re-attaching to batch_"), "{err}");
    assert!(!err.contains("uploading"), "{err}");
    assert_eq!(out2.lines().next(), out.lines().next(), "the same batch");
    assert_eq!(by_id(&dir.path().join("job.output.jsonl")), output);
    assert_eq!(fake.total_calls(), calls, "nothing ran again");

    // One input file on the server, and one batch.
    let mut srv = server_on(&state, &fake).await;
    let api = Api::new(&srv.base);
    assert_eq!(inputs(&api).await, 1, "one upload");
    let (_, batches) = api.get("/v1/batches").await;
    assert_eq!(
        batches["data"].as_array().map(Vec::len),
        Some(1),
        "{batches}"
    );
    srv.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_exit_codes_say_success_and_bad_input() {
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let good = dir.path().join("good.jsonl");
    std::fs::write(&good, input(5, &[])).expect("input");
    let out_dir = dir.path().join("results");
    let mut args = vec![
        good.to_str().expect("path").to_string(),
        "--out".into(),
        out_dir.to_str().expect("path").into(),
    ];
    args.extend(engine_flags(&state, &fake));
    let (code, out, err) =
        RunProc::start(dir.path(), "good", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(by_id(&out_dir.join("good.output.jsonl")).len(), 5);
    assert_eq!(
        std::fs::read_to_string(out_dir.join("good.errors.jsonl")).expect("errors"),
        ""
    );

    // A line the server refuses at validation: the batch fails, nothing runs, exit 1.
    let bad = dir.path().join("bad.jsonl");
    let mut text = input(3, &[]);
    text.push_str("{\"custom_id\":\"x\",\"method\":\"POST\",\"url\":\"/v1/chat/completions\",\"body\":{\"model\":\"m\"}}\n");
    std::fs::write(&bad, text).expect("input");
    let mut args = vec![bad.to_str().expect("path").to_string()];
    args.extend(engine_flags(&state, &fake));
    let (code, _, err) =
        RunProc::start(dir.path(), "bad", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("failed validation") && err.contains("line 4"),
        "{err}"
    );

    // Not a Batch API file at all: a plain message before anything starts.
    let junk = dir.path().join("junk.jsonl");
    std::fs::write(&junk, "hello\n").expect("junk");
    let mut args = vec![junk.to_str().expect("path").to_string()];
    args.extend(engine_flags(&state, &fake));
    let (code, _, err) =
        RunProc::start(dir.path(), "junk", &refs(&args)).finish(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("the first line is not JSON"), "{err}");

    // --server pointing nowhere.
    let (code, _, err) = RunProc::start(
        dir.path(),
        "nowhere",
        &[
            good.to_str().expect("path"),
            "--server",
            "http://127.0.0.1:9",
        ],
    )
    .finish(Duration::from_secs(30));
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no ollama-batch server answers"), "{err}");
}

/// A server process against a slow fake and `n` lines in `<name>.jsonl`; `run --server` is
/// started on them with `extra` flags and sent SIGINT once the backend has taken 6 calls.
/// Returns what it needs to go on: (fake, dir, server, the run's arguments, its exit code,
/// stdout, stderr).
struct Interrupted {
    fake: Fake,
    dir: tempfile::TempDir,
    server: process::Proc,
    args: Vec<String>,
    code: i32,
    out: String,
    err: String,
}

async fn interrupt_run_on_a_server(name: &str, n: usize, extra: &[&str]) -> Interrupted {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(40));
    let dir = tempfile::tempdir().expect("tempdir");
    let server = process::spawn(&dir.path().join("state"), &fake.url(), 2, &[]);
    let file = dir.path().join(format!("{name}.jsonl"));
    std::fs::write(&file, input(n, &[])).expect("input");
    let mut args: Vec<String> = vec![
        file.to_str().expect("path").into(),
        "--server".into(),
        server.addr.clone(),
        "--poll".into(),
        "100ms".into(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let first = RunProc::start(dir.path(), name, &refs(&args));
    wait_calls(&fake, 6, Duration::from_secs(30)).await;
    signal(&first.child, "-INT");
    let (code, out, err) = first.finish(Duration::from_secs(30));
    Interrupted {
        fake,
        dir,
        server,
        args,
        code,
        out,
        err,
    }
}

/// SIGINT while a separate server runs the batch: `run` detaches (the batch goes on), the
/// same command re-attaches, and every line ran exactly once from a single upload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_interrupted_detaches_and_the_same_command_reattaches() {
    let n = 60;
    let Interrupted {
        fake,
        dir,
        server,
        args,
        code,
        err,
        ..
    } = interrupt_run_on_a_server("scores", n, &[]).await;
    assert_eq!(code, 130, "{err}");
    assert!(
        err.contains("detached: batch_") && err.contains("keeps running"),
        "{err}"
    );
    assert!(
        fake.total_calls() < n as u64,
        "interrupted before the end ({} calls)",
        fake.total_calls()
    );

    let (code, out, err) =
        RunProc::start(dir.path(), "second", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("re-attaching to batch_"), "{err}");
    assert!(!err.contains("uploading"), "{err}");
    let output = by_id(&dir.path().join("scores.output.jsonl"));
    assert_eq!(output.len(), n);
    for i in 0..n {
        assert_eq!(fake.calls_of(&user(i)), 1, "line {i} ran exactly once");
    }
    let api = Api::new(&server.addr);
    assert_eq!(inputs(&api).await, 1, "one upload");
}

/// SIGINT with the engine in the process (a CSV input): the engine stops, the batch stays in
/// the state directory, and the same command resumes it to the end, every line once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_process_interrupted_resumes_with_the_same_command() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(40));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let csv = dir.path().join("people.csv");
    let (ok, _, err) = {
        let o = Command::new(binary())
            .args([
                "csv-to-batch",
                csv.to_str().expect("path"),
                "--sample",
                "50",
            ])
            .output()
            .expect("runs");
        (
            o.status.success(),
            String::new(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    assert!(ok, "{err}");
    let rubric = dir.path().join("rubric.md");
    std::fs::write(&rubric, "Score 0-10 as JSON {\"score\": n}.").expect("rubric");
    let mut args = vec![
        csv.to_str().expect("path").to_string(),
        "--model".into(),
        "m".into(),
        "--system".into(),
        rubric.to_str().expect("path").into(),
        "--concurrency".into(),
        "2".into(),
    ];
    args.extend(engine_flags(&state, &fake));
    let first = RunProc::start(dir.path(), "first", &refs(&args));
    wait_calls(&fake, 6, Duration::from_secs(30)).await;
    signal(&first.child, "-INT");
    let (code, _, err) = first.finish(Duration::from_secs(20));
    assert_eq!(code, 130, "{err}");
    assert!(err.contains("50 rows read, 50 lines written"), "{err}");
    assert!(
        err.contains("resumes when you run the same command again"),
        "{err}"
    );
    let after_first = fake.total_calls();
    assert!(
        after_first < 50,
        "interrupted before the end ({after_first})"
    );

    let (code, out, err) =
        RunProc::start(dir.path(), "second", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{out}{err}");
    assert!(err.contains("re-attaching to batch_"), "{err}");
    let output = by_id(&dir.path().join("people.output.jsonl"));
    assert_eq!(output.len(), 50);
    let successes = fake.stats.successes.lock().expect("lock").clone();
    assert_eq!(successes.len(), 50, "every row reached the backend");
    assert!(
        successes.values().all(|&n| n == 1),
        "every line answered exactly once: {successes:?}"
    );
    // The answers belong to their rows: the CSV's candidate ids are the custom_ids.
    for (id, rec) in &output {
        let content = rec["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        assert!(content.starts_with("echo:"), "{content}");
        assert!(id.starts_with("cand-"), "{id}");
    }
}

/// `--cancel-on-interrupt`: SIGINT cancels the batch instead of detaching; what finished is
/// downloaded, the rest is in the error file as cancelled, and the exit says interrupted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_with_cancel_on_interrupt_cancels_and_downloads_what_finished() {
    let n = 80;
    let Interrupted {
        fake,
        dir,
        server: _server,
        code,
        out,
        err,
        ..
    } = interrupt_run_on_a_server("cut", n, &["--cancel-on-interrupt"]).await;
    assert_eq!(code, 130, "{out}{err}");
    assert!(err.contains("interrupted: cancelling batch_"), "{err}");
    assert!(out.contains(" cancelled: "), "{out}");
    let output = by_id(&dir.path().join("cut.output.jsonl"));
    let errors = by_id(&dir.path().join("cut.errors.jsonl"));
    assert_eq!(
        output.len() + errors.len(),
        n,
        "every line is in one file or the other"
    );
    assert!(
        !output.is_empty() && !errors.is_empty(),
        "{} done, {} not",
        output.len(),
        errors.len()
    );
    for e in errors.values() {
        assert_eq!(e["error"]["code"], "batch_cancelled", "{e}");
    }
    for id in output.keys() {
        let i: usize = id[1..].parse().expect("index");
        assert_eq!(fake.calls_of(&user(i)), 1, "{id} ran once");
    }
}

/// In a terminal (a pty from util-linux's `script`), `run` draws a progress bar with rate and
/// ETA instead of plain lines. Skipped with the reason where `script` is missing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_a_terminal_draws_a_progress_bar() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("skipped: util-linux `script` (a pty) is not installed");
        return;
    }
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(20));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = dir.path().join("tty.jsonl");
    std::fs::write(&file, input(120, &[])).expect("input");
    let mut cmd = vec![
        binary().to_str().expect("path").to_string(),
        "run".into(),
        file.to_str().expect("path").into(),
    ];
    cmd.extend(engine_flags(&state, &fake));
    cmd.extend(["--concurrency".to_string(), "2".to_string()]);
    let line = cmd
        .iter()
        .map(|a| format!("'{a}'"))
        .collect::<Vec<_>>()
        .join(" ");
    let typescript = dir.path().join("typescript");
    let out = tokio::task::spawn_blocking(move || {
        Command::new("script")
            .args(["-q", "-e", "-c", &line])
            .arg(&typescript)
            .env("COLUMNS", "120")
            .env_remove("OLLAMA_BATCH_SERVER")
            .stdin(Stdio::null())
            .output()
            .expect("script runs")
    })
    .await
    .expect("join");
    let screen = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{screen}");
    // The bar: brackets of '=' with counts, rate and ETA, redrawn in place.
    assert!(screen.contains("/120 ("), "{screen}");
    assert!(screen.contains("/s ETA"), "{screen}");
    assert!(screen.contains("[="), "{screen}");
    assert!(
        screen.contains("120/120 (100%)"),
        "the bar ends full: {screen}"
    );
    assert!(
        !screen.contains("in_progress: "),
        "no plain progress lines in a terminal"
    );
    assert!(
        screen.contains("completed: 120 succeeded, 0 failed"),
        "{screen}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_conversation_mode_asks_for_it_and_is_a_different_batch() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.keep_bodies
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = dir.path().join("job.jsonl");
    std::fs::write(&file, input(12, &[])).expect("input");
    let mut args = vec![file.to_str().expect("path").to_string()];
    args.extend(engine_flags(&state, &fake));
    args.extend(["--concurrency", "2"].map(String::from));
    let (code, _, err) =
        RunProc::start(dir.path(), "plain", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    args.extend(["--mode", "conversation", "--num-ctx", "4096"].map(String::from));
    let (code, _, err) =
        RunProc::start(dir.path(), "conv", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("re-attaching"),
        "another mode is another batch: {err}"
    );
    let output = by_id(&dir.path().join("job.output.jsonl"));
    assert_eq!(output.len(), 12);
    // The second run's calls carry their conversation's history: line i after line i - 2.
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    assert_eq!(bodies.len(), 24);
    for (i, b) in bodies[12..].iter().enumerate() {
        let ms = b["messages"].as_array().expect("messages");
        let own = ms.last().and_then(|m| m["content"].as_str()).unwrap_or("");
        let line: usize = own
            .strip_prefix("candidate ")
            .and_then(|n| n.parse().ok())
            .expect("a line");
        assert_eq!(
            ms.len(),
            2 + 2 * (line / 2),
            "call {i}, line {line}: {ms:?}"
        );
    }
    let mut srv = server_on(&state, &fake).await;
    let api = Api::new(&srv.base);
    let (_, batches) = api.get("/v1/batches").await;
    let modes: Vec<Value> = batches["data"]
        .as_array()
        .expect("batches")
        .iter()
        .map(|b| b["metadata"]["mode"].clone())
        .collect();
    assert_eq!(
        modes,
        vec![Value::from("conversation"), Value::Null],
        "newest first"
    );
    srv.stop().await;
}

/// Issue 18, defect 3: `run X` after `retry` re-attached to the retry batch (it copied the
/// input's hash) and replaced `X.output.jsonl` with the retry's lines. Now the same `run X`
/// finds its own batch, a file of another batch's results is never replaced without a word,
/// and two retries of one batch at once make one batch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_after_retry_finds_its_own_batch_and_keeps_its_results() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.refuse_marker = Some("REFUSE".into()));
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let file = dir.path().join("job.jsonl");
    std::fs::write(&file, input(16, &[2, 9])).expect("input");
    let engine = engine_flags(&state, &fake);
    let mut args = vec![file.to_str().expect("path").to_string()];
    args.extend(engine.clone());
    let (code, out, err) =
        RunProc::start(dir.path(), "first", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 3, "{out}{err}");
    let original = out
        .split_whitespace()
        .next()
        .expect("the batch id first")
        .to_string();
    let results = dir.path().join("job.output.jsonl");
    assert_eq!(by_id(&results).len(), 14);

    // `retry` as the README says: a new batch of the 2 failed lines (they fail again).
    let retry = Command::new(binary())
        .args(["retry", &original])
        .args(engine.iter().take_while(|a| *a != "--poll"))
        .env_remove("OLLAMA_BATCH_SERVER")
        .output()
        .expect("retry runs");
    let retry_out = String::from_utf8_lossy(&retry.stdout).into_owned();
    let retry_id = retry_out
        .lines()
        .last()
        .unwrap_or_default()
        .trim()
        .to_string();
    assert!(
        retry_id.starts_with("batch_") && retry_id != original,
        "{retry_out}{}",
        String::from_utf8_lossy(&retry.stderr)
    );
    let mut follow = vec![
        retry_id.clone(),
        "--out".into(),
        dir.path().to_str().expect("path").into(),
    ];
    follow.extend(engine.clone());
    let (code, _, err) =
        RunProc::start(dir.path(), "follow", &refs(&follow)).finish(Duration::from_secs(60));
    assert_eq!(code, 3, "the 2 lines fail again: {err}");
    assert_eq!(
        by_id(&dir.path().join(format!("{retry_id}.errors.jsonl"))).len(),
        2
    );

    // The same `run job.jsonl` again: the original batch, its 14 results kept.
    let (code, out, err) =
        RunProc::start(dir.path(), "again", &refs(&args)).finish(Duration::from_secs(60));
    assert_eq!(code, 3, "{out}{err}");
    assert!(
        err.contains(&format!("re-attaching to {original}")),
        "{err}"
    );
    assert_eq!(by_id(&results).len(), 14, "results kept");

    // Two retries of the original at once: one batch, the one already made.
    let mut srv = server_on(&state, &fake).await;
    let api = Api::new(&srv.base);
    let path = format!("/batches/{original}/retry");
    let (a, b) = tokio::join!(api.post(&path, Value::Null), api.post(&path, Value::Null));
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    assert_eq!(a.1["id"], b.1["id"]);
    assert_eq!(a.1["id"], retry_id.as_str(), "the retry already made");
    assert!(a.1["metadata"]["input_sha256"].is_null(), "{}", a.1);
    assert_eq!(a.1["metadata"]["retry_of"], original.as_str());
    srv.stop().await;

    // A file of another batch's results is not replaced: running the retry batch by id with
    // its files pointed at job's, they go beside them.
    std::fs::copy(
        &results,
        dir.path().join(format!("{retry_id}.output.jsonl")),
    )
    .expect("copy");
    let (code, _, err) =
        RunProc::start(dir.path(), "beside", &refs(&follow)).finish(Duration::from_secs(60));
    assert_eq!(code, 3, "{err}");
    assert!(err.contains("holds another batch's results: kept"), "{err}");
    assert_eq!(
        by_id(&dir.path().join(format!("{retry_id}.output.jsonl"))).len(),
        14,
        "kept"
    );
}

/// The README's first command, as written, on a copy of the shipped example: against a fake
/// Ollama (the only change: `OLLAMA_BATCH_BACKEND_URL`), whose answers are schema-valid, fenced
/// now and then, and now and then missing a field at first (re-asked).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_first_command_runs_the_shipped_example_as_written() {
    use crate::support::fake::Script;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README");
    let command = readme
        .lines()
        .find(|l| l.starts_with("cargo run --release -- run "))
        .expect("the README's first command");
    let args: Vec<&str> = command
        .split('#')
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip_while(|a| *a != "--")
        .skip(1)
        .collect();
    assert_eq!(args.first(), Some(&"run"), "{command}");
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::create_dir_all(dir.path().join("docs/example")).expect("mkdir");
    std::fs::create_dir_all(dir.path().join("state")).expect("mkdir");
    for f in ["candidates.csv", "rubric.md", "answer.schema.json"] {
        std::fs::copy(
            root.join("docs/example").join(f),
            dir.path().join("docs/example").join(f),
        )
        .expect("copy the example");
    }
    let schema: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("docs/example/answer.schema.json")).expect("schema"),
    )
    .expect("JSON");
    let fake = Fake::start(Shape::Ollama).await;
    fake.keep_bodies
        .store(true, std::sync::atomic::Ordering::SeqCst);
    fake.set(|b| {
        b.script = Some(Script(std::sync::Arc::new(|req: &Value| {
            let msgs = req["messages"].as_array().cloned().unwrap_or_default();
            let user = msgs
                .iter()
                .find(|m| m["role"] == "user")
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_string();
            let n: u32 = user.bytes().map(u32::from).sum();
            let reask = msgs.last().is_some_and(|m| m["role"] == "user")
                && msgs.iter().filter(|m| m["role"] == "user").count() > 1;
            let answer = r#"{"score": 8, "recommendation": "Yes", "reasoning": "Long platform experience."}"#;
            let text = if n % 7 == 0 && !reask {
                r#"{"score": 8, "recommendation": "Yes"}"#.to_string()
            } else if n % 5 == 0 {
                format!("```json\n{answer}\n```")
            } else {
                answer.to_string()
            };
            (text, false)
        })));
    });
    let out = Command::new(binary())
        .args(&args)
        .current_dir(dir.path())
        .env_remove("OLLAMA_BATCH_SERVER")
        .env("OLLAMA_BATCH_BACKEND_URL", fake.url())
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let output = std::fs::read_to_string(dir.path().join("state/candidates.output.jsonl"))
        .expect("the output file in state/");
    let lines: Vec<Value> = output
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 200);
    let validator = ollama_batch::answer::compile(&schema).expect("the shipped schema is one");
    for l in &lines {
        let content = l["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        let v: Value = serde_json::from_str(content).expect("bare JSON");
        assert!(validator.is_valid(&v), "{content}");
    }
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    let reasks = bodies
        .iter()
        .filter(|b| b["messages"].as_array().is_some_and(|m| m.len() > 3))
        .count();
    assert!(reasks > 0, "some answers were re-asked");
    assert_eq!(
        bodies.len(),
        200 + reasks,
        "one call per line, plus the re-asks"
    );
    assert!(
        bodies.iter().all(|b| b["format"] == schema),
        "Ollama's grammar is the schema"
    );
    assert!(
        bodies.iter().all(|b| b["messages"][0]["content"]
            .as_str()
            .is_some_and(|s| s.starts_with("You are a senior technical recruiter"))),
        "the rubric is the system message"
    );
}

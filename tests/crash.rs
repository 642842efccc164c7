//! Durability by killing a real process: SIGKILL at random moments, SIGTERM, a second signal.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, Proc, signal, wait_exit};
use crate::support::until;
use crate::support::{Api, binary, chat_file};
use crate::support::{ids, tally};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const CONCURRENCY: usize = 8;

fn spawn(state: &Path, backend: &str, extra: &[&str]) -> Proc {
    process::spawn(state, backend, CONCURRENCY, extra)
}

/// Exactly-once check over the output and error files (every answer the fake's echo of its
/// own line). Returns (lost, duplicated).
async fn exactly_once(api: &Api, done: &Value, n: usize) -> (usize, usize) {
    let mut lines = api.lines(&done["output_file_id"]).await;
    lines.extend(api.lines(&done["error_file_id"]).await);
    for l in &lines {
        if let Some(content) = l["response"]["body"]["choices"][0]["message"]["content"].as_str() {
            assert_eq!(
                content,
                format!("echo:score {}", l["custom_id"].as_str().unwrap_or(""))
            );
        }
    }
    let t = tally(&lines, ids(n));
    assert!(t.unknown.is_empty(), "{t:?}");
    (t.lost.len(), t.duplicated.len())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_loses_nothing_and_duplicates_nothing() {
    let kills: usize = std::env::var("CRASH_ITERATIONS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6);
    let n: usize = std::env::var("CRASH_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1500);
    let seed = std::env::var("CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..));
    println!("crash test: {kills} kills, {n} lines, CRASH_SEED={seed}");
    let mut rng = fastrand::Rng::with_seed(seed);
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(2));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");

    // A kill during an upload leaves no partial file visible.
    let mut p = spawn(&state, &fake.url(), &[]);
    let api = Api::new(&p.addr);
    let big = chat_file(20_000, "m", &"rubric ".repeat(100));
    let big_len = big.len();
    // The upload may fail (connection reset by the kill) or succeed: both are fine.
    let upload = tokio::spawn(async move {
        let form = reqwest::multipart::Form::new()
            .text("purpose", "batch")
            .part(
                "file",
                reqwest::multipart::Part::bytes(big).file_name("big.jsonl"),
            );
        api.http
            .post(format!("{}/v1/files", api.base))
            .multipart(form)
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(rng.u64(5..60))).await;
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
    let _ = upload.await; // fails or succeeds depending on the moment
    let mut p = spawn(&state, &fake.url(), &[]);
    let mut api = Api::new(&p.addr);
    let (_, files) = api.get("/v1/files").await;
    for f in files["data"].as_array().expect("files") {
        assert_eq!(
            f["bytes"], big_len as u64,
            "a partial upload became visible: {f}"
        );
    }

    // The batch: killed right after create (validation), then at random moments while it
    // runs. Validation starts over after a kill, so each later kill first waits for the
    // batch to be dispatching again: otherwise most kills could land in validation.
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    let mut kills_with_work_in_flight = 0;
    for k in 0..kills {
        if k > 0 {
            api.wait_for(&id, Duration::from_secs(60), "in_progress", |b| {
                b["status"] != "validating"
            })
            .await;
            let pause = rng.u64(20..250);
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        p.child.kill().expect("kill");
        p.child.wait().expect("wait");
        let calls = fake.total_calls();
        p = spawn(&state, &fake.url(), &[]);
        api = Api::new(&p.addr);
        let (status, b) = api.get(&format!("/v1/batches/{id}")).await;
        assert_eq!(status, 200, "the created batch survived the kill: {b}");
        if p.requeued_at_start() > 0 {
            kills_with_work_in_flight += 1;
        }
        println!(
            "kill {k}: backend calls so far {calls}; after restart {} ({} done); report: {:?}",
            b["status"], b["request_counts"]["completed"], p.report
        );
    }
    // The kills did hit the dispatch phase (leases are durable before a call is sent, so a
    // kill there leaves requests to requeue at start).
    println!("kills that found requests in flight: {kills_with_work_in_flight}");
    if kills > 1 {
        assert!(
            kills_with_work_in_flight > 0,
            "no kill landed while requests were in flight"
        );
    }
    // One more kill if we can catch the batch while its files are being written.
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut caught_finalizing = false;
    loop {
        let (_, cur) = api.get(&format!("/v1/batches/{id}")).await;
        match cur["status"].as_str() {
            Some("finalizing") => {
                p.child.kill().expect("kill");
                p.child.wait().expect("wait");
                p = spawn(&state, &fake.url(), &[]);
                api = Api::new(&p.addr);
                caught_finalizing = true;
                break;
            }
            Some("in_progress") if Instant::now() < deadline => {}
            _ => break,
        }
    }
    println!("killed during finalization: {caught_finalizing}");
    let done = api.wait_terminal(&id, Duration::from_secs(300)).await;
    assert_eq!(done["status"], "completed", "{done}");
    let (lost, duplicated) = exactly_once(&api, &done, n).await;
    let redone = (fake.total_calls() as usize).saturating_sub(n);
    // Work sent again after a kill is at most what was leased at the kill: the window of
    // 2 × concurrency (results not yet flushed are still leased in the store).
    let bound = (kills + usize::from(caught_finalizing)) * 2 * CONCURRENCY;
    println!(
        "crash test result: kills={kills} lines={n} lost={lost} duplicated={duplicated} redone={redone} bound={bound}"
    );
    assert_eq!(lost, 0);
    assert_eq!(duplicated, 0);
    assert_eq!(done["request_counts"]["completed"], n as u64);
    assert!(redone <= bound, "redone {redone} > bound {bound}");
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_requests_finish_and_resume_completes() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(200));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = spawn(&state, &fake.url(), &[]);
    let api = Api::new(&p.addr);
    let n = 60;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    api.wait_completed(&id, 8, Duration::from_secs(20)).await;
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(20));
    assert!(status.success(), "graceful stop exits 0: {status:?}");
    let calls_at_stop = fake.total_calls();

    let mut p = spawn(&state, &fake.url(), &[]);
    let report = p.report.join("\n");
    assert!(report.contains(&id), "{report}");
    assert!(report.contains(", 0 requeued from in-flight"), "{report}");
    let api = Api::new(&p.addr);
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    let (lost, duplicated) = exactly_once(&api, &done, n).await;
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(
        fake.total_calls(),
        n as u64,
        "nothing ran twice (calls at stop: {calls_at_stop})"
    );
    signal(&p.child, "-INT");
    assert!(wait_exit(&mut p.child, Duration::from_secs(20)).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_signal_exits_at_once_and_nothing_is_lost() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_secs(30));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = spawn(&state, &fake.url(), &["--shutdown-grace", "60s"]);
    let api = Api::new(&p.addr);
    let id = api
        .submit_id(chat_file(10, "m", "s"), "/v1/chat/completions")
        .await;
    until("a call is dispatched", Duration::from_secs(20), || {
        fake.total_calls() > 0
    })
    .await;
    signal(&p.child, "-TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        p.child.try_wait().expect("try_wait").is_none(),
        "waits for in-flight calls"
    );
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(5));
    assert!(!status.success(), "second signal: immediate, non-zero exit");

    fake.set(|b| b.delay = Duration::ZERO);
    let mut p = spawn(&state, &fake.url(), &[]);
    assert!(p.report.join("\n").contains(&id));
    let api = Api::new(&p.addr);
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(exactly_once(&api, &done, 10).await, (0, 0));
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_process_on_the_same_state_exits_with_a_clear_message() {
    let fake = Fake::start(Shape::OpenAi).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = spawn(&state, &fake.url(), &[]);
    let out = Command::new(binary())
        .args(["serve", "--listen", "127.0.0.1:0"])
        .arg("--state")
        .arg(&state)
        .output()
        .expect("second process runs");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("another ollama-batch is using"), "{err}");
    p.child.kill().expect("kill");
    p.child.wait().expect("wait");
}

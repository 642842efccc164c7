//! Many simultaneous API writes against a real server process: every request answers, every
//! batch finishes, `/health` stays fast, and SIGTERM still exits cleanly. This is the test of
//! the sled `flush_async` wedge (sled issue #1308): before every flush went through one
//! owner, 100 parallel creates left most of them (and then the whole server) hanging.
//!
//! `STRESS_ROUNDS=20 cargo test --release --test main stress -- --nocapture` loops it.

use crate::support::chat_file;
use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use serde_json::{Value, json};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const CREATES: usize = 100;
const UPLOADS: usize = 50;
const CANCELS: usize = 50;
/// A request that takes longer than this counts as hung.
const ANSWER_WITHIN: Duration = Duration::from_secs(30);

fn client() -> reqwest::Client {
    crate::support::http()
        .timeout(ANSWER_WITHIN)
        .build()
        .expect("client")
}

async fn upload(http: &reqwest::Client, base: &str, bytes: Vec<u8>) -> Result<String, String> {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("in.jsonl"),
        );
    let r = http
        .post(format!("{base}/v1/files"))
        .multipart(form)
        .send()
        .await
        .map_err(|e| format!("upload: {e}"))?;
    let status = r.status();
    let v: Value = r.json().await.map_err(|e| format!("upload body: {e}"))?;
    if status != 200 {
        return Err(format!("upload answered {status}: {v}"));
    }
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

async fn post(http: &reqwest::Client, url: String, body: Value) -> Result<(u16, Value), String> {
    let r = http
        .post(&url)
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("POST {url}: {e}"))?;
    let status = r.status().as_u16();
    let v = r
        .json()
        .await
        .map_err(|e| format!("POST {url} body: {e}"))?;
    Ok((status, v))
}

async fn create(http: &reqwest::Client, base: &str, file: &str) -> Result<String, String> {
    let (status, v) = post(
        http,
        format!("{base}/v1/batches"),
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    )
    .await?;
    if status != 200 {
        return Err(format!("create answered {status}: {v}"));
    }
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

async fn one_round(round: usize) {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(3));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = process::spawn(&state, &fake.url(), 8, &["--shutdown-grace", "10s"]);
    let base = p.addr.clone();
    let http = client();

    // /health is polled throughout; its slowest answer is kept.
    let stop_health = Arc::new(AtomicBool::new(false));
    let health = {
        let (http, base, stop) = (http.clone(), base.clone(), stop_health.clone());
        tokio::spawn(async move {
            let mut worst = Duration::ZERO;
            let mut polls = 0u32;
            while !stop.load(Ordering::SeqCst) {
                let t = Instant::now();
                let r = http
                    .get(format!("{base}/health"))
                    .timeout(Duration::from_secs(5))
                    .send()
                    .await;
                assert!(
                    r.as_ref().is_ok_and(|r| r.status() == 200),
                    "/health failed: {r:?}"
                );
                worst = worst.max(t.elapsed());
                polls += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (worst, polls)
        })
    };

    let shared = upload(&http, &base, chat_file(4, "m", "rubric"))
        .await
        .expect("first upload");
    // 100 creates on one file and 50 uploads, all at once.
    let creates: Vec<_> = (0..CREATES)
        .map(|_| {
            let (http, base, file) = (http.clone(), base.clone(), shared.clone());
            tokio::spawn(async move { create(&http, &base, &file).await })
        })
        .collect();
    let uploads: Vec<_> = (0..UPLOADS)
        .map(|i| {
            let (http, base) = (http.clone(), base.clone());
            let bytes = chat_file(3 + i % 4, "m", &format!("rubric {i}"));
            tokio::spawn(async move { upload(&http, &base, bytes).await })
        })
        .collect();
    let mut batches = Vec::new();
    for c in creates {
        batches.push(c.await.expect("task").expect("every create answers 200"));
    }
    let mut files = Vec::new();
    for u in uploads {
        files.push(u.await.expect("task").expect("every upload answers 200"));
    }
    // 50 cancels at once, while batches from the uploaded files are being created.
    let cancels: Vec<_> = batches[..CANCELS]
        .iter()
        .map(|id| {
            let (http, url) = (http.clone(), format!("{base}/v1/batches/{id}/cancel"));
            tokio::spawn(async move { post(&http, url, json!({})).await })
        })
        .collect();
    let more: Vec<_> = files
        .iter()
        .map(|f| {
            let (http, base, file) = (http.clone(), base.clone(), f.clone());
            tokio::spawn(async move { create(&http, &base, &file).await })
        })
        .collect();
    for c in cancels {
        let (status, v) = c.await.expect("task").expect("every cancel answers");
        // 409 only for a batch that finished before its cancel arrived.
        assert!(
            status == 200
                || (status == 409
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("completed") || m.contains("finalizing"))),
            "cancel answered {status}: {v}"
        );
    }
    for m in more {
        batches.push(m.await.expect("task").expect("every create answers 200"));
    }

    // Every batch ends: completed, or cancelled.
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &batches {
        loop {
            let r = http
                .get(format!("{base}/v1/batches/{id}"))
                .send()
                .await
                .expect("retrieve answers");
            let b: Value = r.json().await.expect("batch JSON");
            match b["status"].as_str() {
                Some("completed") => {
                    assert_eq!(b["request_counts"]["failed"], 0, "{b}");
                    break;
                }
                Some("cancelled") => break,
                Some("failed" | "expired") => panic!("batch ended badly: {b}"),
                _ => {}
            }
            assert!(Instant::now() < deadline, "batch did not finish: {b}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    stop_health.store(true, Ordering::SeqCst);
    let (worst, polls) = health.await.expect("health task");
    // Fast: a wedge makes it hang (30 s and more); 2 s allows a debug build sharing 2 cores
    // with the rest of the suite.
    assert!(
        worst < Duration::from_secs(2),
        "/health took {worst:?} at worst"
    );

    let t = Instant::now();
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(20));
    assert!(status.success(), "SIGTERM exit: {status}");
    println!(
        "stress round {round}: {} batches ({CREATES} creates on one file, {UPLOADS} uploads, {CANCELS} cancels) all answered and finished; /health worst {worst:?} over {polls} polls; SIGTERM exit 0 in {:?}",
        batches.len(),
        t.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn parallel_creates_uploads_and_cancels_all_answer_and_finish() {
    let rounds: usize = std::env::var("STRESS_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1);
    for round in 1..=rounds {
        one_round(round).await;
    }
}

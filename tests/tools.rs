//! `calibrate` and `bench`, as real processes against the fake backend.

use crate::support::binary;
use crate::support::fake::{Fake, Shape};
use crate::support::process::{signal, wait_exit};
use crate::support::until;
use serde_json::Value;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const GIB: u64 = 1 << 30;
const KIB: u64 = 1 << 10;

/// Runs `calibrate` against `fake` with `extra` flags: (exit code, stdout, stderr, JSON report).
fn calibrate(fake: &Fake, dir: &std::path::Path, extra: &[&str]) -> (i32, String, String, Value) {
    let json = dir.join("calibration.json");
    let out = Command::new(binary())
        .args(["calibrate", "--backend", "ollama", "--model", "gemma3:12b"])
        .args(["--backend-url", &fake.url(), "--parallel", "1,2,4"])
        .arg("--json")
        .arg(&json)
        .args(extra)
        .output()
        .expect("runs");
    let report = std::fs::read_to_string(&json)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or(Value::Null);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
        report,
    )
}

/// A fake Ollama whose model needs 4 GiB plus 256 KiB per token of context, on a GPU of
/// `gpu` bytes, with 2 slots.
async fn ollama(gpu: u64) -> Fake {
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| {
        b.memory = Some((4 * GIB, 256 * KIB, gpu));
        b.context_length = Some(131072);
        b.slots = Some(2);
        b.delay = Duration::from_millis(300);
    });
    fake
}

fn steps(report: &Value) -> Vec<Value> {
    report["steps"].as_array().cloned().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_stops_at_the_first_oom_and_recommends_what_fit() {
    let fake = ollama(16 * GIB).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out, err, report) = calibrate(&fake, dir.path(), &[]);
    assert_eq!(code, 0, "{out}{err}");
    // 4 GiB + 256 KiB × 65536 = 20 GiB > 16 GiB: the load at 65536 fails; 32768 (12 GiB) fit.
    assert!(
        out.contains("recommended: --num-ctx 32768 --concurrency 2"),
        "2 slots: 4 parallel requests are no faster than 2\n{out}"
    );
    assert_eq!(report["recommendation"]["num_ctx"], 32768, "{report:#}");
    assert_eq!(report["recommendation"]["concurrency"], 2);
    assert_eq!(report["stopped"], "first failure at num_ctx 65536");
    let steps = steps(&report);
    let last = steps.last().expect("steps");
    assert_eq!(
        (last["num_ctx"].as_u64(), last["outcome"].as_str()),
        (Some(65536), Some("oom"))
    );
    assert!(
        last["detail"]
            .as_str()
            .is_some_and(|d| d.contains("out of memory"))
    );
    // Contexts doubled from 2048; each measured its model size from /api/ps and was filled.
    let ctxs: Vec<u64> = steps
        .iter()
        .filter(|s| s["parallel"] == 1)
        .map(|s| s["num_ctx"].as_u64().unwrap_or(0))
        .collect();
    assert_eq!(ctxs, vec![2048, 4096, 8192, 16384, 32768]);
    for s in steps.iter().filter(|s| s["outcome"] == "ok") {
        let ctx = s["num_ctx"].as_u64().expect("ctx");
        assert_eq!(
            s["model_size_bytes"].as_u64(),
            Some(4 * GIB + 256 * KIB * ctx),
            "{s}"
        );
        if s["parallel"].as_u64() > Some(0) {
            let (sent, seen) = (
                s["prompt_tokens_sent"].as_u64().expect("sent"),
                s["prompt_tokens_seen"].as_u64().expect("seen"),
            );
            assert!(
                sent as f64 > 0.85 * ctx as f64,
                "the prompt fills the context: {s}"
            );
            assert!(
                (seen as f64 - sent as f64).abs() < 0.1 * sent as f64,
                "sized by the measured ratio: {s}"
            );
        }
    }
    assert!(
        report["tokens_per_char"]
            .as_f64()
            .is_some_and(|r| r > 0.2 && r < 0.35),
        "{report}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_stops_past_the_memory_margin_and_on_truncation() {
    if std::path::Path::new("/dev/nvidia0").exists() {
        eprintln!(
            "skipped: a real GPU is present, so NVML's readings (not --gpu-memory) set the margin"
        );
        return;
    }
    // The GPU has room (64 GiB), but the user says 16 GiB: 90 % is 14.4 GiB, so 65536 (20 GiB)
    // is over the margin.
    let fake = ollama(64 * GIB).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (code, out, err, report) = calibrate(
        &fake,
        dir.path(),
        &["--gpu-memory", "16GiB", "--parallel", "1"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(report["recommendation"]["num_ctx"], 32768, "{report:#}");
    let last = steps(&report).pop().expect("steps");
    assert_eq!(last["outcome"], "over_margin", "{last}");
    assert!(out.contains("past the 90 % margin"), "{out}");

    // A server that uses at most 8192 tokens whatever num_ctx says: truncation is seen.
    fake.set(|b| b.ctx_cap = Some(8192));
    let (code, out, err, report) = calibrate(
        &fake,
        dir.path(),
        &["--parallel", "1", "--max-ctx", "32768"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let last = steps(&report).pop().expect("steps");
    assert_eq!(
        (last["num_ctx"].as_u64(), last["outcome"].as_str()),
        (Some(16384), Some("truncated")),
        "{report:#}"
    );
    assert_eq!(report["recommendation"]["num_ctx"], 8192);
}

/// `calibrate` reads the model server flags as `serve` does (one declaration, one backend
/// client): `URL#SLOTS` and comma lists from `OLLAMA_BATCH_BACKEND_URL` used to end in
/// "the first request failed: 404".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_reads_the_backend_url_from_the_environment_as_serve_does() {
    let fake = ollama(16 * GIB).await;
    fake.set(|b| b.delay = Duration::from_millis(20));
    let dir = tempfile::tempdir().expect("tempdir");
    for (env, says) in [
        (format!("{}#4", fake.url()), None),
        (
            format!("{}#4,http://127.0.0.1:9", fake.url()),
            Some("2 model servers given: calibrating the first"),
        ),
    ] {
        let before = fake.total_calls();
        let json = dir.path().join("c.json");
        let out = Command::new(binary())
            .args(["calibrate", "--model", "gemma3:12b", "--parallel", "1"])
            .args(["--max-ctx", "4096", "--json"])
            .arg(&json)
            .env("OLLAMA_BATCH_BACKEND_URL", &env)
            .env("OLLAMA_BATCH_BACKEND", "ollama")
            .output()
            .expect("runs");
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert_eq!(out.status.code(), Some(0), "{env}: {stdout}{stderr}");
        assert!(
            stdout.contains("recommended: --num-ctx 4096 --concurrency 1"),
            "{stdout}"
        );
        let report: Value =
            serde_json::from_str(&std::fs::read_to_string(&json).expect("report")).expect("json");
        assert_eq!(report["backend_url"], fake.url(), "without #SLOTS");
        assert!(fake.total_calls() > before + 3, "the fake was measured");
        if let Some(says) = says {
            assert!(stderr.contains(says), "{stderr}");
        }
    }
    // The same refusals as serve.
    let out = Command::new(binary())
        .args(["calibrate", "--model", "m", "--backend-url", "http://a:1#0"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("must be a count from 1 to 4096"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calibrate_stops_cleanly_on_ctrl_c_and_keeps_what_it_measured() {
    let fake = ollama(64 * GIB).await;
    fake.set(|b| b.delay = Duration::from_millis(700));
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("c.json");
    let mut child = Command::new(binary())
        .args([
            "calibrate",
            "--backend",
            "ollama",
            "--model",
            "m",
            "--parallel",
            "1",
        ])
        .args(["--backend-url", &fake.url()])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    // The probe, the load at 2048 and its step: then interrupt during the next.
    until("calibrate makes progress", Duration::from_secs(30), || {
        fake.total_calls() >= 4
    })
    .await;
    let sent = Instant::now();
    signal(&child, "-INT");
    let status = wait_exit(&mut child, Duration::from_secs(10));
    assert_eq!(status.code(), Some(130));
    assert!(
        sent.elapsed() < Duration::from_millis(600),
        "it did not wait for the step: {:?}",
        sent.elapsed()
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("written")).expect("json");
    assert_eq!(report["stopped"], "interrupted (Ctrl-C)");
    assert!(!steps(&report).is_empty(), "{report:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_runs_each_size_through_the_server_and_extrapolates() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(60));
    let dir = tempfile::tempdir().expect("tempdir");
    let json = dir.path().join("bench.json");
    let out = Command::new(binary())
        .args([
            "bench",
            "--sizes",
            "8,24",
            "--extrapolate",
            "170000",
            "--model",
            "m",
        ])
        .args([
            "--backend",
            "openai",
            "--backend-url",
            &fake.url(),
            "--concurrency",
            "4",
        ])
        .args(["--flush-interval", "5ms"])
        .arg("--json")
        .arg(&json)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    let scratch = std::env::temp_dir().join(format!("ollama-batch-bench-{}", out.id()));
    let out = out.wait_with_output().expect("exits");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    assert_eq!(
        fake.total_calls(),
        32,
        "every line went to the backend once"
    );
    let report: Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json")).expect("json");
    let sizes = report["sizes"].as_array().expect("sizes");
    assert_eq!(sizes.len(), 2);
    for (row, n) in sizes.iter().zip([8u64, 24]) {
        assert_eq!(row["lines"], n);
        assert_eq!(row["failed"], 0);
        let rps = row["requests_per_s"].as_f64().expect("rps");
        let wall = row["wall_s"].as_f64().expect("wall");
        assert!((rps * wall - n as f64).abs() < 1e-6, "{row}");
        // 4 calls of 60 ms at a time: at most 4 / 0.06 = 67 lines/s.
        assert!(rps > 0.0 && rps < 67.0, "{row}");
        let (p50, p95) = (
            row["latency_p50_s"].as_f64().expect("p50"),
            row["latency_p95_s"].as_f64().expect("p95"),
        );
        assert!(
            (0.05..=0.25).contains(&p50) && p50 <= p95,
            "calls take 60 ms: {row}"
        );
        // The fake reports 2 cached tokens per answer.
        let share = row["cached_share"].as_f64().expect("cached share");
        assert!(share > 0.0 && share < 0.05, "{row}");
        assert!(
            row["tokens_per_s"].as_f64().expect("tok/s") > rps * 300.0,
            "a rubric-sized prompt a line: {row}"
        );
    }
    let last_rps = sizes[1]["requests_per_s"].as_f64().expect("rps");
    let secs = report["extrapolated"]["seconds"].as_u64().expect("seconds");
    assert_eq!(secs, (170000.0 / last_rps).ceil() as u64);
    assert!(stdout.contains("170000 lines: about "), "{stdout}");
    assert!(
        stderr.contains(&scratch.display().to_string()),
        "the engine ran on its scratch state: {stderr}"
    );
    assert!(!scratch.exists(), "the scratch state is removed");
}

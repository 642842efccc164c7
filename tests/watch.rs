//! Watching a run: live figures in `/status`, the final figures of a finished batch, and the
//! progress lines in a real server process's log.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use crate::support::{Api, chat_file, metric, parse_metrics, server_with};
use serde_json::Value;
use std::time::{Duration, Instant};

/// Sums a usage field over an output file's lines.
fn usage_sum(lines: &[Value], field: &str) -> u64 {
    lines
        .iter()
        .map(|l| l["response"]["body"]["usage"][field].as_u64().unwrap_or(0))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_figures_move_and_agree_with_the_output() {
    for shape in [Shape::Ollama, Shape::OpenAi] {
        let fake = Fake::start(shape).await;
        fake.set(|b| b.delay = Duration::from_millis(20));
        let (_d, mut server) = server_with(&fake, |c| {
            c.concurrency = 2;
            c.num_ctx = Some(4096);
        })
        .await;
        let api = Api::new(&server.base);
        let n = 600u64;
        let id = api
            .submit_id(chat_file(n as usize, "m", "rubric"), "/v1/chat/completions")
            .await;
        // Poll /status while it runs.
        let mut seen: Vec<Value> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let (_, st) = api.get("/status").await;
            if let Some(b) = st["batches"]
                .as_array()
                .and_then(|bs| bs.iter().find(|b| b["id"] == id.as_str()))
            {
                seen.push(b["progress"].clone());
            }
            let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
            if b["status"] == "completed" {
                break;
            }
            assert!(Instant::now() < deadline, "batch did not finish: {b}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(seen.len() >= 10, "{} snapshots", seen.len());
        let dones: Vec<u64> = seen
            .iter()
            .map(|p| p["done"].as_u64().expect("done"))
            .collect();
        assert!(
            dones.windows(2).all(|w| w[0] <= w[1]),
            "done never goes back: {dones:?}"
        );
        assert!(dones.last() > dones.first(), "done moves: {dones:?}");
        // A rate and an ETA appear while it runs, and the ETA shrinks toward the end.
        let etas: Vec<u64> = seen
            .iter()
            .filter_map(|p| p["eta_seconds"].as_u64())
            .collect();
        assert!(etas.len() >= 3, "ETA seen {} times: {seen:?}", etas.len());
        assert!(etas.last() < etas.first(), "ETA falls: {etas:?}");
        let rates: Vec<f64> = seen
            .iter()
            .filter_map(|p| p["requests_per_second_recent"].as_f64())
            .collect();
        assert!(
            rates.iter().all(|r| *r > 0.0) && !rates.is_empty(),
            "{rates:?}"
        );
        // ETA ≈ remaining / rate wherever both are shown.
        for p in &seen {
            if let (Some(eta), Some(rate)) = (
                p["eta_seconds"].as_u64(),
                p["requests_per_second_recent"].as_f64(),
            ) {
                let expect = p["remaining"].as_u64().expect("remaining") as f64 / rate;
                assert!((eta as f64 - expect).abs() <= 1.0 + expect * 0.02, "{p}");
            }
        }

        // The final figures agree with the output file.
        let done = api.wait_terminal(&id, Duration::from_secs(10)).await;
        let out = api.lines(&done["output_file_id"]).await;
        assert_eq!(out.len() as u64, n);
        let (code, f) = api.get(&format!("/status/batches/{id}")).await;
        assert_eq!(code, 200, "{f}");
        assert_eq!(f["final"], true);
        assert_eq!(f["status"], "completed");
        let p = &f["progress"];
        assert_eq!(p["done"], n);
        assert_eq!(p["remaining"], 0);
        assert_eq!(p["prompt_tokens"], usage_sum(&out, "prompt_tokens"), "{f}");
        assert_eq!(
            p["completion_tokens"],
            usage_sum(&out, "completion_tokens"),
            "{f}"
        );
        assert_eq!(
            p["max_prompt_tokens"],
            out.iter()
                .map(|l| l["response"]["body"]["usage"]["prompt_tokens"]
                    .as_u64()
                    .unwrap_or(0))
                .max()
                .unwrap_or(0)
        );
        assert_eq!(p["num_ctx"], 4096);
        assert!(
            f["gpu_memory_peak_bytes"].is_null(),
            "no GPU here: unknown, not 0: {f}"
        );
        match shape {
            // The fake Ollama does not report cached tokens: unknown, never 0 %.
            Shape::Ollama => {
                assert_eq!(p["answers_without_cached_figure"], n, "{f}");
                assert!(p["cached_share"].is_null(), "{f}");
                // The batch object must say 0 (OpenAI's schema), and says that 0 means unknown.
                let d = &done["usage"]["input_tokens_details"];
                assert_eq!(d["cached_tokens_reported"], false, "{done}");
            }
            Shape::OpenAi => {
                let cached: u64 = out
                    .iter()
                    .map(|l| {
                        l["response"]["body"]["usage"]["prompt_tokens_details"]["cached_tokens"]
                            .as_u64()
                            .expect("cached")
                    })
                    .sum();
                assert_eq!(p["cached_tokens"], cached);
                assert_eq!(p["answers_with_cached_figure"], n);
                let share = cached as f64 / usage_sum(&out, "prompt_tokens") as f64;
                assert!(
                    (p["cached_share"].as_f64().expect("share") - share).abs() < 1e-3,
                    "{f}"
                );
            }
        }
        let (code, _) = api.get("/status/batches/batch_nope").await;
        assert_eq!(code, 404);
        server.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_lines_appear_in_the_log_of_a_real_process() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(10));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = process::spawn(
        &state,
        &fake.url(),
        2,
        &["--progress-every", "50", "--log-format", "json"],
    );
    let api = Api::new(&p.addr);
    let done = api.run_chat(300, "m", Duration::from_secs(60)).await;
    assert_eq!(done["status"], "completed");
    signal(&p.child, "-TERM");
    wait_exit(&mut p.child, Duration::from_secs(15));
    let log = std::fs::read_to_string(state.with_extension("log")).expect("log");
    let progress: Vec<Value> = log
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == "progress")
        .collect();
    assert!(
        progress.len() >= 4,
        "{} progress lines in:\n{log}",
        progress.len()
    );
    let dones: Vec<u64> = progress
        .iter()
        .map(|v| v["fields"]["done"].as_u64().expect("done"))
        .collect();
    assert!(
        dones.windows(2).all(|w| w[1] >= w[0] + 50),
        "one line per 50 results: {dones:?}"
    );
    for v in &progress {
        let f = &v["fields"];
        assert_eq!(f["total"], 300, "{v}");
        assert!(
            f["percent"].is_number() && f["eta"].is_string() && f["retries"].is_number(),
            "{v}"
        );
        // Without a GPU: said in a word, not the 150-character NVML error on every line (it
        // is logged once at start and shown in /status).
        if !std::path::Path::new("/dev/nvidia0").exists() {
            assert_eq!(f["gpu_memory"], "unavailable", "{v}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_move_during_a_run_and_agree_with_the_output_at_the_end() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| {
        b.delay = Duration::from_millis(5);
        b.busy_permille = 50;
    });
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 2).await;
    let api = Api::new(&server.base);
    let n = 400u64;
    let id = api
        .submit_id(chat_file(n as usize, "m", "rubric"), "/v1/chat/completions")
        .await;
    let mut mid = Vec::new();
    loop {
        let (code, text) = api.get_text("/metrics").await;
        assert_eq!(code, 200);
        let m = parse_metrics(&text);
        mid.push(
            metric(
                &m,
                "obatch_requests_finished_total",
                &[("outcome", "succeeded")],
            )
            .expect("finished series"),
        );
        let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
        if b["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        mid.windows(2).all(|w| w[0] <= w[1]),
        "a counter never goes back: {mid:?}"
    );
    assert!(
        mid.iter().any(|v| *v > 0.0 && *v < n as f64),
        "seen mid-run: {mid:?}"
    );
    let done = api.wait_terminal(&id, Duration::from_secs(10)).await;
    let out = api.lines(&done["output_file_id"]).await;
    let (_, text) = api.get_text("/metrics").await;
    let m = parse_metrics(&text);
    assert_eq!(
        metric(
            &m,
            "obatch_requests_finished_total",
            &[("outcome", "succeeded")]
        ),
        Some(out.len() as f64)
    );
    assert_eq!(
        metric(
            &m,
            "obatch_requests_finished_total",
            &[("outcome", "failed")]
        ),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "obatch_batches", &[("status", "completed")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "obatch_batches", &[("status", "validating")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "obatch_prompt_tokens_total", &[]),
        Some(usage_sum(&out, "prompt_tokens") as f64)
    );
    assert_eq!(
        metric(&m, "obatch_completion_tokens_total", &[]),
        Some(usage_sum(&out, "completion_tokens") as f64)
    );
    // The fake Ollama reports no cached figure: counted apart, never as 0 cached.
    assert_eq!(
        metric(&m, "obatch_answers_without_cached_figure_total", &[]),
        Some(n as f64)
    );
    let busy = fake.stats.busy.load(std::sync::atomic::Ordering::SeqCst) as f64;
    assert!(busy > 0.0);
    // A busy 503 puts the line back without a retry (no attempt spent): deferred.
    assert_eq!(
        metric(&m, "obatch_retries_total", &[("cause", "http_5xx")]),
        Some(0.0)
    );
    assert_eq!(
        metric(&m, "obatch_requests_deferred_total", &[]),
        Some(busy)
    );
    assert_eq!(
        metric(&m, "obatch_retries_total", &[("cause", "oom")]),
        Some(0.0),
        "every cause exists from the start"
    );
    assert_eq!(
        metric(
            &m,
            "obatch_backend_request_duration_seconds_count",
            &[("outcome", "success")]
        ),
        Some(n as f64)
    );
    assert_eq!(
        metric(
            &m,
            "obatch_backend_request_duration_seconds_count",
            &[("outcome", "overloaded")]
        ),
        Some(busy)
    );
    assert_eq!(
        metric(
            &m,
            "obatch_backend_request_duration_seconds_bucket",
            &[("le", "600.0"), ("outcome", "success")]
        ),
        Some(n as f64)
    );
    assert_eq!(
        metric(&m, "obatch_backend_up", &[("backend", fake.url().as_str())]),
        Some(1.0)
    );
    assert_eq!(
        metric(&m, "obatch_backend_concurrency_limit", &[]),
        Some(2.0)
    );
    assert_eq!(metric(&m, "obatch_gpu_info_available", &[]), Some(0.0));
    assert!(
        !m.keys().any(|(k, _)| k.starts_with("obatch_gpu_memory")),
        "no GPU: no zero readings"
    );
    assert!(metric(&m, "obatch_store_size_bytes", &[]).is_some_and(|b| b > 0.0));
    // No per-batch or per-line labels anywhere.
    for (name, labels) in m.keys() {
        for (k, _) in labels {
            assert!(
                [
                    "state", "status", "outcome", "cause", "gpu", "le", "version", "backend"
                ]
                .contains(&k.as_str()),
                "{name}: label {k}"
            );
        }
    }
    server.stop().await;
}

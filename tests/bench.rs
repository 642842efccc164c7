//! Throughput benchmark (ignored by default; `scripts/bench-throughput.sh` runs it in release
//! mode): requests per second through the durable queue against a backend that answers at
//! once, at concurrency 1, 8 and 64, with the number of group commits (flushes).

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, TestServer, chat_file, config};
use ollama_batch::config::BackendKind;
use std::time::{Duration, Instant};

/// `BENCH_LINES`, or `default`.
fn bench_lines(default: usize) -> usize {
    std::env::var("BENCH_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A server at `concurrency` against `fake` with `n` chat lines submitted and validated (the
/// timing starts at dispatch, not at validation). Returns the state directory's guard, the
/// server, its client and the batch id.
async fn validated_batch(
    fake: &Fake,
    concurrency: usize,
    n: usize,
) -> (tempfile::TempDir, TestServer, Api, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &fake.url());
    cfg.concurrency = concurrency;
    cfg.flush_interval = Duration::from_millis(20);
    cfg.cache_bytes = 64 << 20;
    let server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    api.wait_for(&id, Duration::from_secs(600), "validated", |b| {
        b["status"] != "validating"
    })
    .await;
    (dir, server, api, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-throughput.sh"]
async fn bench_throughput() {
    let n = bench_lines(20_000);
    let fake = Fake::start(Shape::OpenAi).await;
    println!();
    println!("| concurrency | lines | seconds | requests/s | flushes | results per flush |");
    println!("|---|---|---|---|---|---|");
    for concurrency in [1usize, 8, 64] {
        let (_dir, mut server, api, id) = validated_batch(&fake, concurrency, n).await;
        let (_, before) = api.get("/status").await;
        let t0 = Instant::now();
        let done = api.wait_terminal(&id, Duration::from_secs(600)).await;
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
        let (_, after) = api.get("/status").await;
        let flushes = after["counters"]["flushes"].as_u64().unwrap_or(0)
            - before["counters"]["flushes"].as_u64().unwrap_or(0);
        println!(
            "| {concurrency} | {n} | {secs:.2} | {:.0} | {flushes} | {:.1} |",
            n as f64 / secs,
            n as f64 / flushes.max(1) as f64
        );
        server.stop().await;
    }
}

/// p50 / p99 / max of a list of durations, in ms.
fn quantiles(mut v: Vec<Duration>) -> (f64, f64, f64) {
    v.sort();
    let at = |q: f64| v[((v.len() as f64 - 1.0) * q).round() as usize].as_secs_f64() * 1000.0;
    (at(0.5), at(0.99), at(1.0))
}

/// `/status` and `/metrics` latency while a 50,000-line batch runs at full speed (concurrency
/// 64 against a backend that answers at once): `scripts/bench-status.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-status.sh"]
async fn bench_status_latency() {
    let n = bench_lines(50_000);
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, mut server, api, id) = validated_batch(&fake, 64, n).await;
    let t0 = Instant::now();
    let (mut status, mut metrics) = (Vec::new(), Vec::new());
    loop {
        for (path, into) in [("/status", &mut status), ("/metrics", &mut metrics)] {
            let t = Instant::now();
            let (code, _) = api.get_text(path).await;
            into.push(t.elapsed());
            assert_eq!(code, 200);
        }
        let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
        if b["status"] == "completed" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!();
    println!("| endpoint | samples | p50 ms | p99 ms | max ms | during |");
    println!("|---|---|---|---|---|---|");
    for (name, v) in [("/status", status), ("/metrics", metrics)] {
        let count = v.len();
        let (p50, p99, max) = quantiles(v);
        println!(
            "| {name} | {count} | {p50:.2} | {p99:.2} | {max:.2} | {n} lines in {secs:.1} s ({:.0}/s) |",
            n as f64 / secs
        );
    }
    server.stop().await;
}

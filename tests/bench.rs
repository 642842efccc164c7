//! Throughput benchmark (ignored by default; `scripts/bench-throughput.sh` runs it in release
//! mode): requests per second through the durable queue against a backend that answers at
//! once, at concurrency 1, 8 and 64, with the number of group commits (flushes).

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, TestServer, chat_file, config};
use ollama_batch::config::{BackendKind, Config};
use std::time::{Duration, Instant};

/// `BENCH_LINES`, or `default`.
fn bench_lines(default: usize) -> usize {
    std::env::var("BENCH_LINES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

/// A server at `concurrency` against `fake` with `n` chat lines submitted and validated (the
/// timing starts at dispatch, not at validation), its store cache the one `serve` has by
/// default. Returns the state directory's guard, the server, its client and the batch id.
async fn validated_batch(
    fake: &Fake,
    concurrency: usize,
    n: usize,
) -> (tempfile::TempDir, TestServer, Api, String) {
    let cache = ollama_batch::config::parse_size(ollama_batch::config::DEFAULT_CACHE_SIZE)
        .expect("the default cache size");
    validated(&fake.url(), chat_file(n, "m", "s"), |cfg| {
        cfg.concurrency = concurrency;
        cfg.cache_bytes = cache;
    })
    .await
}

/// A server against `backend`, flushing every 20 ms, set up further by `configure`, with
/// `file` submitted and validated.
async fn validated(
    backend: &str,
    file: Vec<u8>,
    configure: impl FnOnce(&mut Config),
) -> (tempfile::TempDir, TestServer, Api, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, backend);
    cfg.flush_interval = Duration::from_millis(20);
    configure(&mut cfg);
    let server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let id = api.submit_id(file, "/v1/chat/completions").await;
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

/// Runs the binary under `/usr/bin/time`: (exit code, seconds, peak RSS in MiB, stderr).
fn timed(args: &[&str]) -> (i32, f64, f64, String) {
    let out = std::process::Command::new("/usr/bin/time")
        .args(["-f", "TIMED %e %M"])
        .arg(crate::support::binary())
        .args(args)
        .env_remove("OLLAMA_BATCH_SERVER")
        .output()
        .expect("/usr/bin/time runs");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let line = err
        .lines()
        .rfind(|l| l.starts_with("TIMED "))
        .unwrap_or_else(|| panic!("no timing in: {err}"));
    let mut parts = line.split_whitespace().skip(1);
    let secs: f64 = parts.next().and_then(|s| s.parse().ok()).expect("seconds");
    let kib: f64 = parts.next().and_then(|s| s.parse().ok()).expect("KiB");
    (out.status.code().unwrap_or(-1), secs, kib / 1024.0, err)
}

/// The whole job at full size (ignored by default; `scripts/bench-run.sh` runs it in release
/// mode): `csv-to-batch --sample 170000`, then `run` on the CSV with the built-in rubric against
/// the fake backend (which answers at once), the engine in the process; wall time and peak
/// memory of each step.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-run.sh"]
async fn bench_run_whole_job() {
    let n = bench_lines(170_000);
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("candidates.csv");
    let rubric = dir.path().join("rubric.md");
    std::fs::write(&rubric, ollama_batch::client::bench::RUBRIC).expect("rubric");
    let p = |p: &std::path::Path| p.to_str().expect("path").to_string();
    let (code, sample_s, sample_mib, err) = tokio::task::spawn_blocking({
        let csv = p(&csv);
        let n = n.to_string();
        move || timed(&["csv-to-batch", &csv, "--sample", &n])
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{err}");
    let (code, conv_s, conv_mib, err) = tokio::task::spawn_blocking({
        let (csv, rubric) = (p(&csv), p(&rubric));
        let out = p(&dir.path().join("candidates.jsonl"));
        move || {
            timed(&[
                "csv-to-batch",
                &csv,
                "-o",
                &out,
                "--model",
                "m",
                "--system",
                &rubric,
            ])
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{err}");
    let jsonl_mib = std::fs::metadata(dir.path().join("candidates.jsonl"))
        .expect("jsonl")
        .len() as f64
        / (1u64 << 20) as f64;
    let url = fake.url();
    let state = p(&dir.path().join("state"));
    let (code, run_s, run_mib, err) = tokio::task::spawn_blocking({
        let (csv, rubric) = (p(&csv), p(&rubric));
        move || {
            timed(&[
                "run",
                &csv,
                "--model",
                "m",
                "--system",
                &rubric,
                "--backend",
                "openai",
                "--backend-url",
                &url,
                "--concurrency",
                "16",
                "--listen",
                "127.0.0.1:0",
                "--state",
                &state,
                "--print-every",
                "10s",
            ])
        }
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{err}");
    let lines = std::fs::read_to_string(dir.path().join("candidates.output.jsonl"))
        .expect("output")
        .lines()
        .count();
    assert_eq!(lines, n);
    println!();
    println!("| step | lines | seconds | peak memory (RSS) |");
    println!("|---|---|---|---|");
    println!("| `csv-to-batch --sample {n}` | {n} | {sample_s:.2} | {sample_mib:.0} MiB |");
    println!(
        "| `csv-to-batch` (built-in rubric; JSONL {jsonl_mib:.0} MiB) | {n} | {conv_s:.2} | {conv_mib:.0} MiB |"
    );
    println!(
        "| `run` on the CSV, engine in-process, fake backend, concurrency 16 | {n} | {run_s:.1} | {run_mib:.0} MiB |"
    );
}

/// Throughput with every answer checked against a JSON schema (ignored by default; run by
/// `scripts/bench-schema.sh`): the same batch with and without `response_format` against a
/// backend that answers at once with a valid JSON answer, at concurrency 8 and 64. Uses only
/// what the commit before the schema check had too, so the two can be alternated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-schema.sh"]
async fn bench_throughput_schema() {
    use serde_json::json;
    let n = bench_lines(20_000);
    let fake = Fake::start(Shape::OpenAi).await;
    let answer = json!({"id": "chatcmpl-b", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "finish_reason": "stop",
                     "message": {"role": "assistant",
                                 "content": "{\"score\": 7, \"recommendation\": \"Yes\", \"reasoning\": \"Long platform experience.\"}"}}],
        "usage": {"prompt_tokens": 40, "completion_tokens": 20, "total_tokens": 60}});
    fake.set(|b| b.raw_answer = Some(answer.to_string()));
    let schema = json!({"type": "object", "required": ["score", "recommendation", "reasoning"],
        "additionalProperties": false,
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                       "recommendation": {"enum": ["Strong Yes", "Yes", "Maybe", "No", "Strong No"]},
                       "reasoning": {"type": "string", "minLength": 1, "maxLength": 600}}});
    println!();
    println!("| lines ask for | concurrency | lines | seconds | requests/s |");
    println!("|---|---|---|---|---|");
    for concurrency in [8usize, 64] {
        for with_schema in [false, true] {
            let mut file = String::new();
            for i in 1..=n {
                let mut body = json!({"model": "m", "max_tokens": 300, "messages": [
                    {"role": "system", "content": "rubric"},
                    {"role": "user", "content": format!("score c-{i}")}]});
                if with_schema {
                    body["response_format"] = json!({"type": "json_schema",
                        "json_schema": {"name": "answer", "strict": true, "schema": schema}});
                }
                file.push_str(
                    &json!({"custom_id": format!("c-{i}"), "method": "POST",
                    "url": "/v1/chat/completions", "body": body})
                    .to_string(),
                );
                file.push('\n');
            }
            let (_dir, mut server, api, id) = validated(&fake.url(), file.into_bytes(), |cfg| {
                cfg.concurrency = concurrency;
                cfg.cache_bytes = 64 << 20;
            })
            .await;
            let t0 = Instant::now();
            let done = api.wait_terminal(&id, Duration::from_secs(600)).await;
            let secs = t0.elapsed().as_secs_f64();
            assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
            println!(
                "| {} | {concurrency} | {n} | {secs:.2} | {:.0} |",
                if with_schema {
                    "a JSON schema"
                } else {
                    "nothing"
                },
                n as f64 / secs
            );
            server.stop().await;
        }
    }
}

/// CPU seconds this process has used (user + system), from /proc.
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command's closing parenthesis: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map(|x| x.1).unwrap_or_default();
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// One coordinator in front of many model servers (ignored by default; run by
/// `scripts/bench-scaling.sh`): `BENCH_BACKENDS` (32) simulated servers × 8 slots, each call
/// taking 200 ms, so the ideal is backends × 8 / 0.2 s requests a second (1,280 for 32). The
/// fakes run in this process, so the CPU figure is the coordinator's and theirs together.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-scaling.sh"]
async fn bench_many_backends() {
    let backends: usize = std::env::var("BENCH_BACKENDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let n = bench_lines(20_000);
    let mut fakes = Vec::new();
    for _ in 0..backends {
        let f = Fake::start(Shape::OpenAi).await;
        f.set(|b| {
            b.delay = Duration::from_millis(200);
            b.slots = Some(8);
        });
        fakes.push(f);
    }
    let (_dir, mut server, api, id) = validated(&fakes[0].url(), chat_file(n, "m", "s"), |cfg| {
        cfg.backends = fakes.iter().map(|f| (f.url(), Some(8))).collect();
        cfg.cache_bytes = 64 << 20;
        cfg.request_timeout = Duration::from_secs(60);
    })
    .await;
    api.wait_for(&id, Duration::from_secs(600), "validated", |b| {
        b["status"] != "validating"
    })
    .await;
    let (cpu0, t0) = (cpu_seconds(), Instant::now());
    let done = api.wait_terminal(&id, Duration::from_secs(900)).await;
    let secs = t0.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu0;
    assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
    let ideal = backends as f64 * 8.0 / 0.2;
    let (_, status) = api.get("/status").await;
    let calls: u64 = fakes.iter().map(|f| f.total_calls()).sum();
    let busiest = fakes.iter().map(|f| f.total_calls()).max().unwrap_or(0);
    let idlest = fakes.iter().map(|f| f.total_calls()).min().unwrap_or(0);
    println!();
    println!(
        "| backends × slots | lines | seconds | requests/s | ideal | of ideal | CPU (cores) | store |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {backends} × 8 | {n} | {secs:.1} | {:.0} | {ideal:.0} | {:.1} % | {:.2} | {} MB |",
        n as f64 / secs,
        100.0 * n as f64 / secs / ideal,
        cpu / secs,
        status["store_size_bytes"].as_u64().unwrap_or(0) >> 20
    );
    println!("calls {calls}; per backend {idlest} … {busiest}");
    server.stop().await;
}

/// Peak resident memory (kB) of process `pid`, from /proc.
fn peak_rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Memory of `serve` (a separate process, release) for batches of `BENCH_SIZES` lines
/// (100000,500000,1000000 by default) against an instant backend at concurrency 64, each line with a
/// 300-character system prompt, or with `BENCH_PAD=N` a unique N-character user message (the
/// fake's answers as long) (ignored by default; run by `scripts/bench-memory.sh`): peak RSS,
/// intake rate, the time from a restart with the batch queued to its first dispatch; then the
/// same lines again in a batch that reuses answers (all answered from the store, no call):
/// its rate and the peak RSS while it runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: run scripts/bench-memory.sh"]
async fn bench_memory() {
    use crate::support::process::{self, signal, wait_exit};
    let sizes: Vec<usize> = std::env::var("BENCH_SIZES")
        .unwrap_or_else(|_| "100000,500000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let fake = Fake::start(Shape::OpenAi).await;
    println!();
    println!(
        "| lines | peak RSS of serve | of it, intake | intake (lines/s) | run (requests/s) | restart to first dispatch | again, reused (lines/s) | peak RSS then |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let system = "You score candidates against this rubric. ".repeat(7);
    for n in sizes {
        let dir = tempfile::tempdir().expect("tempdir");
        let state = dir.path().join("state");
        let mut server = process::spawn(&state, &fake.url(), 64, &[]);
        let api = Api::new(&server.addr);
        let lines = || match std::env::var("BENCH_PAD").ok().and_then(|p| p.parse().ok()) {
            Some(pad) => crate::support::padded_chat_file(n, pad),
            None => chat_file(n, "m", &system),
        };
        let (_, file) = api.upload("in.jsonl", lines(), "batch").await;
        let t0 = Instant::now();
        let b = api
            .create_batch(file["id"].as_str().expect("file"), "/v1/chat/completions")
            .await;
        let id = b["id"].as_str().expect("id").to_string();
        fake.hold();
        api.wait_in_progress(&id, Duration::from_secs(900)).await;
        let intake = n as f64 / t0.elapsed().as_secs_f64();
        let intake_peak = peak_rss_kb(server.child.id());
        // Restart with the whole batch queued: the time to the first call.
        signal(&server.child, "-KILL");
        wait_exit(&mut server.child, Duration::from_secs(10));
        let before = fake.total_calls();
        let t1 = Instant::now();
        let server2 = process::spawn(&state, &fake.url(), 64, &[]);
        until_first_call(&fake, before).await;
        let restart = t1.elapsed();
        fake.release();
        let api = Api::new(&server2.addr);
        let t2 = Instant::now();
        let done = api.wait_terminal(&id, Duration::from_secs(1800)).await;
        let rate = n as f64 / t2.elapsed().as_secs_f64();
        assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
        let peak = peak_rss_kb(server2.child.id()).max(intake_peak);
        // The same lines again, reusing answers: the first lookup moves the run's whole
        // answers log into the index, then every line is answered from the store. The peak
        // is measured from here (writing 5 to clear_refs resets VmHWM).
        let pid = server2.child.id();
        std::fs::write(format!("/proc/{pid}/clear_refs"), "5").expect("reset the peak");
        let (_, again) = api.upload("again.jsonl", lines(), "batch").await;
        let calls = fake.total_calls();
        let t3 = Instant::now();
        let b = api
            .create_batch_with(
                again["id"].as_str().expect("file"),
                "/v1/chat/completions",
                serde_json::json!({"reuse": "true"}),
            )
            .await;
        let again_id = b["id"].as_str().expect("id");
        let done = api.wait_terminal(again_id, Duration::from_secs(1800)).await;
        let reuse_rate = n as f64 / t3.elapsed().as_secs_f64();
        assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
        assert_eq!(
            fake.total_calls(),
            calls,
            "every line answered from the store"
        );
        println!(
            "| {n} | {} MB | {} MB | {intake:.0} | {rate:.0} | {:.2} s | {reuse_rate:.0} | {} MB |",
            peak / 1024,
            intake_peak / 1024,
            restart.as_secs_f64(),
            peak_rss_kb(pid) / 1024
        );
    }
}

/// Waits for the fake's first call after `before` calls.
async fn until_first_call(fake: &Fake, before: u64) {
    let t = Instant::now();
    while fake.total_calls() <= before {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "no call after the restart"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

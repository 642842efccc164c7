//! `ollama-batch bench --sizes 100,1000,10000`: synthetic batches of those sizes through the
//! real path (HTTP upload, queue, worker, backend, output file), one after another, and per
//! size: requests/s, tokens/s, cached share, p50/p95 backend call latency, GPU memory peak; and
//! the duration of N lines extrapolated from the largest size's rate (`--extrapolate 170000`).
//!
//! The lines are the job's shape: `csv-to-batch`'s synthetic candidates under a shared rubric
//! (a built-in one, or `--system FILE`). Without `--server` the engine runs in this process on a
//! scratch state directory, removed at the end.

use super::csv_to_batch::{self, RequestShape};
use super::engine::Engine;
use super::http::Server;
use super::note;
use crate::config::ServeArgs;
use clap::Args;
use serde::Serialize;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Flags of `bench`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Example:\n  \
ollama-batch bench --model gemma3:12b --num-ctx 8192 --concurrency 4 --sizes 100,1000 --extrapolate 170000\n\n\
--model (required) is the model the lines name. Without --server the engine runs in this \
process on a scratch state directory, removed at the end, and a free loopback port: --state \
and --listen are not used. Latency percentiles are interpolated within the buckets of the \
server's /metrics histogram; the GPU peak needs NVML.")]
pub struct BenchArgs {
    /// Batch sizes to run, one after another.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "100,1000",
        value_name = "N,N,…"
    )]
    pub sizes: Vec<u64>,
    /// Also estimate how long this many lines take, at the largest size's rate.
    #[arg(long, value_name = "N")]
    pub extrapolate: Option<u64>,
    /// The rubric (system prompt) every line carries. Default: a built-in one of about 200
    /// words, like a real scoring rubric.
    #[arg(long, value_name = "FILE")]
    pub system: Option<PathBuf>,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 64)]
    pub max_tokens: u32,
    /// Use the ollama-batch server at this URL instead of an engine in this process.
    #[arg(long, env = "OLLAMA_BATCH_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// The engine run in this process (without --server): --state and --listen are ignored
    /// (a scratch directory and a free loopback port are used); --model is the model to bench.
    #[command(flatten, next_help_heading = "The engine (without --server; as serve)")]
    pub serve: ServeArgs,
}

/// A rubric of the job's size and kind (about 1,300 characters).
pub const RUBRIC: &str = "You are an experienced technical recruiter scoring candidates for a senior \
software engineer role on a small team that builds data-intensive backend services.\n\n\
Score each candidate from 0 to 10 against this rubric:\n\
- Relevant experience (0-3): years building and operating production backend systems; \
ownership of services end to end; on-call experience.\n\
- Technical depth (0-3): distributed systems, databases, performance work, reliability; \
evidence of designing systems rather than only implementing tickets.\n\
- Impact (0-2): measurable results, shipped products, led projects or mentored others.\n\
- Communication (0-1): clear writing, documentation, cross-team work.\n\
- Fit (0-1): interest in the domain, location and availability as stated.\n\n\
Be strict: a 7 is a strong candidate, a 9 or 10 is rare. Do not reward keywords without \
evidence. Missing information counts as absent, not as average. Judge each candidate on \
their own profile only; do not compare with other candidates.\n\n\
Answer with a JSON object only, no other text: {\"score\": <integer 0-10>, \
\"recommendation\": \"Strong Yes\" | \"Yes\" | \"Maybe\" | \"No\" | \"Strong No\", \
\"reason\": \"<one sentence>\"}";

/// One size's figures.
#[derive(Debug, Serialize)]
pub struct Row {
    /// Lines in the batch.
    pub lines: u64,
    /// The batch.
    pub batch_id: String,
    /// Lines that failed.
    pub failed: u64,
    /// From create to completed.
    pub wall_s: f64,
    /// Lines per second over the wall time.
    pub requests_per_s: f64,
    /// Prompt + completion tokens per second.
    pub tokens_per_s: f64,
    /// Prompt tokens per second.
    pub prompt_tokens_per_s: f64,
    /// Completion tokens per second.
    pub completion_tokens_per_s: f64,
    /// Cached ÷ prompt tokens over the lines that reported it; `None` when none did.
    pub cached_share: Option<f64>,
    /// Median backend call, seconds (interpolated within the /metrics histogram's buckets).
    pub latency_p50_s: Option<f64>,
    /// 95th percentile backend call, seconds (same).
    pub latency_p95_s: Option<f64>,
    /// The GPU memory peak the server has seen (NVML), bytes; `None` without NVML.
    pub gpu_memory_peak_bytes: Option<u64>,
}

/// The cumulative bucket counts of successful backend calls from `/metrics`: (le, count).
fn buckets(metrics: &str) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for line in metrics.lines() {
        if !line.contains("backend_request_duration_seconds_bucket")
            || !line.contains("outcome=\"success\"")
        {
            continue;
        }
        let Some(le) = line.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else {
            continue;
        };
        let le = if le == "+Inf" {
            f64::INFINITY
        } else {
            match le.parse() {
                Ok(v) => v,
                Err(_) => continue,
            }
        };
        if let Some(n) = line.rsplit(' ').next().and_then(|n| n.parse::<f64>().ok()) {
            out.push((le, n));
        }
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

/// The q-quantile of the calls between two scrapes, interpolated linearly within the bucket
/// it falls in (as Prometheus' `histogram_quantile`).
pub fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|&(le, n)| {
            let b = before
                .iter()
                .find(|(l, _)| *l == le)
                .map(|x| x.1)
                .unwrap_or(0.0);
            (le, n - b)
        })
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut prev = (0.0, 0.0);
    for &(le, n) in &delta {
        if n >= rank {
            if le.is_infinite() {
                return Some(prev.0);
            }
            let in_bucket = n - prev.1;
            let frac = if in_bucket > 0.0 {
                (rank - prev.1) / in_bucket
            } else {
                1.0
            };
            return Some(prev.0 + (le - prev.0) * frac);
        }
        prev = (le, n);
    }
    None
}

async fn scrape(server: &Server) -> Vec<(f64, f64)> {
    server
        .text("/metrics")
        .await
        .map(|t| buckets(&t))
        .unwrap_or_default()
}

/// Makes the input of one size: synthetic candidates under the rubric.
fn input(dir: &Path, n: u64, args: &BenchArgs, model: &str) -> Result<PathBuf, String> {
    let csv = dir.join(format!("bench-{n}.csv"));
    let _ = std::fs::remove_file(&csv);
    csv_to_batch::write_sample(&csv, n)?;
    let rubric = match &args.system {
        Some(p) => p.clone(),
        None => {
            let p = dir.join("rubric.md");
            std::fs::write(&p, RUBRIC).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
            p
        }
    };
    let shape = RequestShape {
        system: Some(rubric),
        max_tokens: Some(args.max_tokens),
        temperature: Some(0.0),
        ..RequestShape::default()
    };
    let jsonl = dir.join(format!("bench-{n}.jsonl"));
    let mut f = std::fs::File::create(&jsonl)
        .map_err(|e| format!("cannot write {}: {e}", jsonl.display()))?;
    csv_to_batch::convert(&csv, &shape, model, &mut f)?;
    Ok(jsonl)
}

async fn one_size(
    server: &Server,
    dir: &Path,
    n: u64,
    args: &BenchArgs,
    model: &str,
) -> Result<Row, String> {
    let path = input(dir, n, args, model)?;
    let before = scrape(server).await;
    let file_id = server.upload(&path, &format!("bench-{n}.jsonl")).await?;
    let started = Instant::now();
    let b = server
        .create_batch(
            &file_id,
            "/v1/chat/completions",
            serde_json::json!({"ollama_batch_bench": n.to_string()}),
        )
        .await?;
    let id = b["id"].as_str().unwrap_or_default().to_string();
    let b = loop {
        let b = server.batch(&id).await?;
        if matches!(
            b["status"].as_str(),
            Some("completed" | "failed" | "expired" | "cancelled")
        ) {
            break b;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let wall = started.elapsed().as_secs_f64().max(1e-6);
    if b["status"] != "completed" {
        return Err(format!(
            "bench batch {id} ended {}: {}",
            b["status"],
            b["errors"]["data"][0]["message"]
                .as_str()
                .unwrap_or_default()
        ));
    }
    let after = scrape(server).await;
    let fig = server
        .json_get(&format!("/status/batches/{}", super::http::segment(&id)))
        .await
        .unwrap_or_default();
    let p = &fig["progress"];
    let prompt = p["prompt_tokens"].as_u64().unwrap_or(0) as f64;
    let completion = p["completion_tokens"].as_u64().unwrap_or(0) as f64;
    Ok(Row {
        lines: n,
        batch_id: id,
        failed: b["request_counts"]["failed"].as_u64().unwrap_or(0),
        wall_s: wall,
        requests_per_s: n as f64 / wall,
        tokens_per_s: (prompt + completion) / wall,
        prompt_tokens_per_s: prompt / wall,
        completion_tokens_per_s: completion / wall,
        cached_share: p["cached_share"].as_f64(),
        latency_p50_s: quantile(&before, &after, 0.5),
        latency_p95_s: quantile(&before, &after, 0.95),
        gpu_memory_peak_bytes: fig["gpu_memory_peak_bytes"].as_u64(),
    })
}

fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:>8} {:>9} {:>8} {:>9} {:>11} {:>8} {:>9} {:>9} {:>10} {:>7}\n",
        "lines",
        "wall",
        "req/s",
        "tok/s",
        "prompt t/s",
        "cached",
        "p50",
        "p95",
        "GPU peak",
        "failed"
    );
    let secs = |v: Option<f64>| v.map(|x| format!("{x:.3}s")).unwrap_or("-".into());
    for r in rows {
        s.push_str(&format!(
            "{:>8} {:>8.1}s {:>8.2} {:>9.0} {:>11.0} {:>8} {:>9} {:>9} {:>10} {:>7}\n",
            r.lines,
            r.wall_s,
            r.requests_per_s,
            r.tokens_per_s,
            r.prompt_tokens_per_s,
            r.cached_share
                .map(|c| format!("{:.1}%", c * 100.0))
                .unwrap_or("n/a".into()),
            secs(r.latency_p50_s),
            secs(r.latency_p95_s),
            r.gpu_memory_peak_bytes
                .map(|b| format!("{:.2}GiB", b as f64 / (1u64 << 30) as f64))
                .unwrap_or("-".into()),
            r.failed
        ));
    }
    s
}

/// Runs the benchmark; the exit code.
pub async fn bench(args: &BenchArgs) -> u8 {
    let interrupted = CancellationToken::new();
    if let Err(e) = super::term::watch_interrupts(interrupted.clone()) {
        note(&format!("ollama-batch: {e}"));
        return 1;
    }
    let Some(model) = args.serve.model.clone() else {
        note("ollama-batch: --model is required (the model to bench)");
        return 1;
    };
    if args.sizes.is_empty() || args.sizes.contains(&0) {
        note("ollama-batch: --sizes takes batch sizes of 1 or more");
        return 1;
    }
    let scratch = std::env::temp_dir().join(format!("ollama-batch-bench-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&scratch);
    if let Err(e) = std::fs::create_dir_all(&scratch) {
        note(&format!(
            "ollama-batch: cannot create {}: {e}",
            scratch.display()
        ));
        return 1;
    }
    let mut serve = args.serve.clone();
    serve.state = scratch.join("state");
    serve.listen = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
    let result = async {
        let engine = Engine::connect(args.server.as_deref(), &serve, &note).await?;
        let mut rows = Vec::new();
        let mut failure = None;
        for &n in &args.sizes {
            note(&format!("bench: {n} lines…"));
            let r = tokio::select! {
                r = one_size(&engine.server, &scratch, n, args, &model) => r,
                _ = interrupted.cancelled() => Err("interrupted".to_string()),
            };
            match r {
                Ok(row) => rows.push(row),
                Err(e) => {
                    failure = Some(e);
                    break;
                }
            }
        }
        engine.stop().await?;
        match failure {
            Some(e) if rows.is_empty() => Err(e),
            Some(e) => {
                note(&format!("ollama-batch: stopped early: {e}"));
                Ok(rows)
            }
            None => Ok(rows),
        }
    }
    .await;
    let _ = std::fs::remove_dir_all(&scratch);
    let rows = match result {
        Ok(rows) => rows,
        Err(e) => {
            note(&format!("ollama-batch: {e}"));
            return if interrupted.is_cancelled() { 130 } else { 1 };
        }
    };
    let mut out = std::io::stdout().lock();
    let _ = write!(out, "{}", table(&rows));
    let _ = writeln!(
        out,
        "latency: backend calls, interpolated within the /metrics histogram's buckets"
    );
    let extrapolated = match (args.extrapolate, rows.last()) {
        (Some(n), Some(last)) if last.requests_per_s > 0.0 => {
            let secs = (n as f64 / last.requests_per_s).ceil() as u64;
            let _ = writeln!(
                out,
                "{n} lines: about {} at {:.2} requests/s (the {}-line batch's rate); pass --rate {:.2} to csv-to-batch for its estimate",
                humantime::format_duration(Duration::from_secs(secs)),
                last.requests_per_s,
                last.lines,
                last.requests_per_s
            );
            Some(
                serde_json::json!({"lines": n, "seconds": secs, "requests_per_s": last.requests_per_s}),
            )
        }
        _ => None,
    };
    if let Some(path) = &args.json {
        let v = serde_json::json!({"model": model, "backend": args.serve.backend.backend.as_str(),
            "backend_url": crate::domain::redact_urls(&args.serve.backend.backend_url.join(",")), "measured_at": crate::domain::unix_now(),
            "sizes": rows, "extrapolated": extrapolated});
        let bytes = serde_json::to_vec_pretty(&v).unwrap_or_default();
        if let Err(e) = std::fs::write(path, bytes) {
            note(&format!(
                "ollama-batch: cannot write {}: {e}",
                path.display()
            ));
            return 1;
        }
    }
    if interrupted.is_cancelled() { 130 } else { 0 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_within_buckets_of_the_difference() {
        let before = vec![(0.1, 10.0), (0.5, 10.0), (1.0, 10.0), (f64::INFINITY, 10.0)];
        // 100 new calls: 50 in (0.1, 0.5], 50 in (0.5, 1.0].
        let after = vec![
            (0.1, 10.0),
            (0.5, 60.0),
            (1.0, 110.0),
            (f64::INFINITY, 110.0),
        ];
        let p50 = quantile(&before, &after, 0.5).expect("p50");
        assert!((p50 - 0.5).abs() < 1e-9, "{p50}");
        let p95 = quantile(&before, &after, 0.95).expect("p95");
        assert!((p95 - 0.95).abs() < 1e-9, "{p95}");
        assert_eq!(quantile(&after, &after, 0.5), None, "no new calls");
        let metrics = "x_backend_request_duration_seconds_bucket{outcome=\"success\",le=\"0.5\"} 7\n\
                       x_backend_request_duration_seconds_bucket{outcome=\"oom\",le=\"0.5\"} 3\n\
                       x_backend_request_duration_seconds_bucket{outcome=\"success\",le=\"+Inf\"} 9\n";
        assert_eq!(buckets(metrics), vec![(0.5, 7.0), (f64::INFINITY, 9.0)]);
    }
}

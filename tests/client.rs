//! The client subcommands, run as real processes.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, binary, server_with};
use serde_json::Value;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(binary()).args(args).output().expect("runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_to_batch_handles_quoting_unicode_empty_cells_and_bad_ids() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("c.csv");
    std::fs::write(
        &csv,
        "\u{feff}candidate_id,name,years,notes\n\
         c1,\"Okafor, Efua\",7,\"said \"\"hi\"\"\nthen left\"\n\
         c2,Chloé Müller 李,,\n\
         ,No Id,3,x\n\
         c1,Dup,4,y\n\
         c3,  Spaces  ,0,\n",
    )
    .expect("csv");
    let rubric = dir.path().join("rubric.md");
    std::fs::write(&rubric, "Score 0-10.\n").expect("rubric");
    let schema = dir.path().join("schema.json");
    std::fs::write(
        &schema,
        r#"{"type":"object","properties":{"score":{"type":"integer"}}}"#,
    )
    .expect("schema");
    let out = dir.path().join("c.jsonl");
    let (ok, _, err) = run(&[
        "csv-to-batch",
        csv.to_str().expect("path"),
        "-o",
        out.to_str().expect("path"),
        "--model",
        "gemma3:12b",
        "--system",
        rubric.to_str().expect("path"),
        "--max-tokens",
        "20",
        "--temperature",
        "0",
        "--json-schema",
        schema.to_str().expect("path"),
    ]);
    assert!(ok, "{err}");
    assert!(
        err.contains("5 rows read, 3 lines written, 2 skipped"),
        "{err}"
    );
    assert!(err.contains("1 without an id (rows 3)"), "{err}");
    assert!(
        err.contains("1 with an id seen before") && err.contains("row 4: 'c1'"),
        "{err}"
    );
    assert!(err.contains("prompt tokens: about"), "{err}");
    let lines: Vec<Value> = std::fs::read_to_string(&out)
        .expect("out")
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert_eq!(lines.len(), 3);
    let ids: Vec<&str> = lines
        .iter()
        .map(|l| l["custom_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["c1", "c2", "c3"]);
    let first = &lines[0];
    assert_eq!(first["url"], "/v1/chat/completions");
    assert_eq!(first["body"]["model"], "gemma3:12b");
    assert_eq!(first["body"]["max_tokens"], 20);
    assert_eq!(first["body"]["temperature"], 0.0);
    assert_eq!(first["body"]["messages"][0]["content"], "Score 0-10.\n");
    assert_eq!(
        first["body"]["messages"][1]["content"],
        "name: Okafor, Efua\nyears: 7\nnotes: said \"hi\"\nthen left"
    );
    assert_eq!(
        first["body"]["response_format"]["json_schema"]["schema"]["properties"]["score"]["type"],
        "integer"
    );
    // Empty cells are left out; unicode kept; values trimmed.
    assert_eq!(
        lines[1]["body"]["messages"][1]["content"],
        "name: Chloé Müller 李"
    );
    assert_eq!(
        lines[2]["body"]["messages"][1]["content"],
        "name: Spaces\nyears: 0"
    );

    // A template, to stdout.
    let (ok, stdout, err) = run(&[
        "csv-to-batch",
        csv.to_str().expect("path"),
        "--model",
        "m",
        "--template",
        "Candidate {name} ({years} years)\\n{{notes}}: {notes}",
    ]);
    assert!(ok, "{err}");
    let l: Value = serde_json::from_str(stdout.lines().next().expect("line")).expect("json");
    assert_eq!(
        l["body"]["messages"][0]["content"],
        "Candidate Okafor, Efua (7 years)\n{notes}: said \"hi\"\nthen left"
    );
    // Mistakes get a plain message and a non-zero exit.
    let (ok, _, err) = run(&[
        "csv-to-batch",
        csv.to_str().expect("path"),
        "--model",
        "m",
        "--template",
        "{nme}",
    ]);
    assert!(
        !ok && err.contains("no column 'nme'") && err.contains("candidate_id, name, years, notes"),
        "{err}"
    );
    let (ok, _, err) = run(&["csv-to-batch", "/nonexistent.csv", "--model", "m"]);
    assert!(!ok && err.contains("cannot read /nonexistent.csv"), "{err}");
    let (ok, _, err) = run(&[
        "csv-to-batch",
        csv.to_str().expect("path"),
        "--model",
        "m",
        "--id-column",
        "nope",
    ]);
    assert!(!ok && err.contains("--id-column"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sample_csv_becomes_a_batch_the_server_runs() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("sample.csv");
    let n: usize = std::env::var("SAMPLE_ROWS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(5_000);
    let (ok, _, err) = run(&[
        "csv-to-batch",
        "--sample",
        &n.to_string(),
        csv.to_str().expect("path"),
    ]);
    assert!(ok, "{err}");
    // It does not overwrite.
    let (ok, _, err) = run(&["csv-to-batch", "--sample", "3", csv.to_str().expect("path")]);
    assert!(!ok && err.contains("exists"), "{err}");
    let out = dir.path().join("sample.jsonl");
    let t = Instant::now();
    let (ok, _, err) = run(&[
        "csv-to-batch",
        csv.to_str().expect("path"),
        "-o",
        out.to_str().expect("path"),
        "--model",
        "m",
        "--rate",
        "2.5",
    ]);
    println!("csv-to-batch: {n} rows in {:?}", t.elapsed());
    assert!(ok, "{err}");
    assert!(
        err.contains(&format!("{n} rows read, {n} lines written, 0 skipped")),
        "{err}"
    );
    assert!(err.contains("duration: about"), "{err}");
    let bytes = std::fs::read(&out).expect("jsonl");
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 8).await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(bytes, "/v1/chat/completions", Duration::from_secs(120))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], n as u64);
    server.stop().await;
}

/// An output line as the server writes it, with a chat answer.
fn out_line(id: &str, content: &str, prompt: u64) -> String {
    serde_json::json!({"id": format!("batch_req_{id}"), "custom_id": id, "response": {"status_code": 200, "request_id": "r",
        "body": {"choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
                 "usage": {"prompt_tokens": prompt, "completion_tokens": 5, "total_tokens": prompt + 5}}}, "error": null})
    .to_string()
}

#[test]
fn analyze_reports_statistics_that_match_an_independent_computation() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Scores as JSON, as fenced JSON, as bare numbers; garbage; a categorical field.
    let scores: Vec<f64> = vec![7.0, 3.0, 9.0, 5.5, 8.0, 1.0, 10.0, 6.0];
    let mut lines = Vec::new();
    for (i, s) in scores.iter().enumerate() {
        let content = match i % 3 {
            0 => format!(
                "{{\"score\": {s}, \"verdict\": \"{}\"}}",
                if *s >= 6.0 { "Yes" } else { "No" }
            ),
            1 => format!(
                "Sure!\n```json\n{{\"score\": {s}, \"verdict\": \"{}\"}}\n```",
                if *s >= 6.0 { "Yes" } else { "No" }
            ),
            _ => format!("{s}"),
        };
        lines.push(out_line(&format!("c{i}"), &content, 100 + i as u64));
    }
    lines.push(out_line("g1", "I cannot score this candidate.", 50));
    lines.push(out_line("g2", "{broken json", 50));
    let output = dir.path().join("out.jsonl");
    std::fs::write(&output, lines.join("\n")).expect("out");
    let errors = dir.path().join("err.jsonl");
    std::fs::write(
        &errors,
        [
            r#"{"id":"x","custom_id":"e1","response":null,"error":{"code":"request_timeout","message":"no answer"}}"#,
            r#"{"id":"y","custom_id":"e2","response":{"status_code":400,"request_id":"r","body":{"error":{"message":"too long","type":"invalid_request_error","code":"context_length_exceeded"}}},"error":null}"#,
            r#"{"id":"z","custom_id":"e3","response":null,"error":{"code":"request_timeout","message":"no answer"}}"#,
        ]
        .join("\n"),
    )
    .expect("err");
    let csv = dir.path().join("scores.csv");
    let (ok, stdout, err) = run(&[
        "analyze",
        output.to_str().expect("p"),
        "--errors",
        errors.to_str().expect("p"),
        "--field",
        "score",
        "--csv",
        csv.to_str().expect("p"),
    ]);
    assert!(ok, "{err}");
    // Independent figures.
    let n = scores.len();
    let mean = scores.iter().sum::<f64>() / n as f64;
    let mut sorted = scores.clone();
    sorted.sort_by(|a, b| a.total_cmp(b));
    let median = (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0;
    let prompt: u64 = (0..n as u64).map(|i| 100 + i).sum::<u64>() + 100;
    assert!(
        stdout.contains("lines: 13 (10 succeeded, 3 failed)"),
        "{stdout}"
    );
    assert!(stdout.contains("failed request_timeout: 2"), "{stdout}");
    assert!(
        stdout.contains("failed context_length_exceeded: 1"),
        "{stdout}"
    );
    assert!(stdout.contains("answers that did not parse: 2"), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "count {n} min 1 max 10 mean {mean:.3} median {median}"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("tokens: {prompt} prompt, 50 completion")),
        "{stdout}"
    );
    assert!(stdout.contains("cached share unknown"), "{stdout}");
    // The CSV: one row per custom_id, parsed fields as columns.
    let text = std::fs::read_to_string(&csv).expect("csv");
    let mut rows = text.lines();
    assert_eq!(
        rows.next(),
        Some("custom_id,value,score,verdict,status,error,prompt_tokens,completion_tokens")
    );
    let all: Vec<&str> = text.lines().collect();
    assert_eq!(all.len(), 1 + 13);
    assert!(all.contains(&"c0,,7,Yes,succeeded,,100,5"), "{text}");
    assert!(all.contains(&"c2,9,,,succeeded,,102,5"), "{text}");
    assert!(
        all.contains(&"e2,,,,failed,context_length_exceeded,0,0"),
        "{text}"
    );
    // Categories.
    let (ok, stdout, _) = run(&["analyze", output.to_str().expect("p"), "--field", "verdict"]);
    assert!(ok);
    let yes = scores
        .iter()
        .enumerate()
        .filter(|(i, s)| i % 3 != 2 && **s >= 6.0)
        .count();
    assert!(stdout.contains(&format!("  Yes: {yes}")), "{stdout}");
    let (ok, _, err) = run(&["analyze", "/nope.jsonl"]);
    assert!(!ok && err.contains("cannot read /nope.jsonl"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn csv_to_batch_counts_prompt_tokens_with_the_backends_tokenizer() {
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("s.csv");
    let (ok, _, err) = run(&["csv-to-batch", csv.to_str().expect("p"), "--sample", "150"]);
    assert!(ok, "{err}");
    let rubric = dir.path().join("rubric.md");
    std::fs::write(
        &rubric,
        "Score the candidate from 0 to 10; answer in JSON. Ünïcode counts as characters.",
    )
    .expect("rubric");
    let out = dir.path().join("s.jsonl");
    let url = fake.url();
    let (ok, _, err) = tokio::task::spawn_blocking(move || {
        run(&[
            "csv-to-batch",
            csv.to_str().expect("p"),
            "-o",
            out.to_str().expect("p"),
            "--model",
            "m",
            "--system",
            rubric.to_str().expect("p"),
            "--tokenizer-url",
            &url,
        ])
    })
    .await
    .expect("join");
    assert!(ok, "{err}");
    // Independently: the fake's count (characters ÷ 4, rounded up) of every message written.
    let text = std::fs::read_to_string(dir.path().join("s.jsonl")).expect("jsonl");
    let expected: usize = text
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("line");
            v["body"]["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .map(|m| {
                    m["content"]
                        .as_str()
                        .expect("content")
                        .chars()
                        .count()
                        .div_ceil(4)
                })
                .sum::<usize>()
        })
        .sum();
    assert!(
        err.contains(&format!("prompt tokens: about {expected} (counted by the backend's tokenizer on the system prompt and 150 rows")),
        "expected {expected}: {err}"
    );
    // A server without /tokenize: a clear error, not a guess.
    let (ok, _, err) = run(&[
        "csv-to-batch",
        dir.path().join("s.csv").to_str().expect("p"),
        "-o",
        "/dev/null",
        "--model",
        "m",
        "--tokenizer-url",
        "http://127.0.0.1:9",
    ]);
    assert!(
        !ok && err.contains("--tokenizer-url: cannot reach"),
        "{err}"
    );
}

#[test]
fn analyze_plots_the_histogram_and_lines_finished_over_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 120 answers over 120 s: scores 0..=9 evenly, so every bin of the histogram has 12.
    let lines: Vec<String> = (0..120)
        .map(|i| {
            let mut v: Value = serde_json::from_str(&out_line(
                &format!("c{i}"),
                &format!("{{\"score\": {}}}", i % 10),
                10,
            ))
            .expect("json");
            v["response"]["body"]["created"] = serde_json::json!(1_800_000_000 + i);
            v.to_string()
        })
        .collect();
    let output = dir.path().join("out.jsonl");
    std::fs::write(&output, lines.join("\n")).expect("out");
    let svg = dir.path().join("plot.svg");
    let (ok, stdout, err) = run(&[
        "analyze",
        output.to_str().expect("p"),
        "--field",
        "score",
        "--plot",
        svg.to_str().expect("p"),
    ]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains("plot: histogram and throughput over time in"),
        "{stdout}"
    );
    let text = std::fs::read_to_string(&svg).expect("svg");
    assert!(text.starts_with("<svg"), "{}", &text[..80.min(text.len())]);
    assert!(
        text.contains("&apos;score&apos;: distribution") || text.contains("'score': distribution"),
        "the caption"
    );
    assert!(
        text.contains("lines finished per 2 s"),
        "a span of 119 s in about 40 steps: 2 s each"
    );
    // Ten bars of equal height: the bars are the blue rectangles.
    let bars: Vec<&str> = text
        .split("<rect")
        .skip(1)
        .filter(|r| r.contains("fill=\"#0000FF\""))
        .collect();
    assert_eq!(bars.len(), 10, "{text}");
    let heights: std::collections::BTreeSet<String> = bars
        .iter()
        .filter_map(|r| {
            r.split("height=\"")
                .nth(1)?
                .split('"')
                .next()
                .map(str::to_string)
        })
        .collect();
    assert_eq!(heights.len(), 1, "every bin holds 12 answers: {heights:?}");
    // The throughput curve: one point per 2 s step over 0..=119 s.
    let points = text
        .split("<polyline")
        .find(|p| p.contains("stroke=\"#FF0000\""))
        .and_then(|p| p.split("points=\"").nth(1))
        .and_then(|p| p.split('"').next())
        .expect("a polyline");
    assert_eq!(points.split_whitespace().count(), 60, "{points}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_makes_a_batch_of_exactly_the_lines_that_did_not_succeed() {
    let fake = Fake::start(Shape::OpenAi).await;
    // Connection resets spend the one attempt (a busy 503 no longer does: it is deferred).
    fake.set(|b| b.reset_permille = 300);
    let (_d, mut server) = server_with(&fake, |c| c.retry.max_attempts = 1).await;
    let api = Api::new(&server.base);
    let n = 40;
    let input = crate::support::chat_file(n, "m", &"long shared rubric ".repeat(20));
    let original: std::collections::HashMap<String, Value> = String::from_utf8(input.clone())
        .expect("utf8")
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).expect("json");
            (v["custom_id"].as_str().expect("id").to_string(), v)
        })
        .collect();
    let done = api
        .run_file(input, "/v1/chat/completions", Duration::from_secs(30))
        .await;
    let failed: Vec<String> = api
        .lines(&done["error_file_id"])
        .await
        .iter()
        .map(|l| l["custom_id"].as_str().expect("id").to_string())
        .collect();
    assert!(
        !failed.is_empty() && failed.len() < n,
        "{} failed",
        failed.len()
    );
    let id = done["id"].as_str().expect("id").to_string();
    // The backend is healthy again (before the retry batch starts running).
    fake.set(|b| b.reset_permille = 0);
    let base = server.base.clone();
    let (ok, stdout, err) =
        tokio::task::spawn_blocking(move || run(&["retry", &id, "--server", &base]))
            .await
            .expect("retry runs");
    assert!(ok, "{err}");
    let new_id = stdout.lines().last().expect("id line").to_string();
    let (_, b) = api.get(&format!("/v1/batches/{new_id}")).await;
    assert_eq!(b["metadata"]["retry_of"], done["id"], "{b}");
    // Its input is exactly the failed lines, with their original bodies (the shared rubric put
    // back), in input order.
    let (_, text) = api
        .get_text(&format!(
            "/v1/files/{}/content",
            b["input_file_id"].as_str().expect("file")
        ))
        .await;
    let retried: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect();
    let ids: Vec<&str> = retried
        .iter()
        .map(|l| l["custom_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, failed.iter().map(String::as_str).collect::<Vec<_>>());
    for l in &retried {
        assert_eq!(l, &original[l["custom_id"].as_str().expect("id")]);
    }
    let second = api.wait_terminal(&new_id, Duration::from_secs(30)).await;
    assert_eq!(second["status"], "completed");
    assert_eq!(second["request_counts"]["completed"], failed.len() as u64);
    // Nothing left to retry: a clear refusal and a non-zero exit.
    let base = server.base.clone();
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || run(&["retry", &new_id, "--server", &base]))
            .await
            .expect("retry runs");
    assert!(
        !ok && err.contains("no failed, expired or cancelled lines"),
        "{err}"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_so_far_stream_in_input_order_while_the_batch_runs() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 2).await;
    let api = Api::new(&server.base);
    let n = 300;
    let id = api
        .submit_id(
            crate::support::chat_file(n, "m", "s"),
            "/v1/chat/completions",
        )
        .await;
    api.wait_completed(&id, 30, Duration::from_secs(20)).await;
    fake.hold();
    let (code, text) = api.get_text(&format!("/batches/{id}/results")).await;
    assert_eq!(code, 200, "{text}");
    let lines: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("JSON line"))
        .collect();
    assert!(
        lines.len() >= 30 && lines.len() < n,
        "{} lines so far",
        lines.len()
    );
    let numbers: Vec<usize> = lines
        .iter()
        .map(|l| {
            let id = l["custom_id"].as_str().expect("id");
            assert_eq!(
                l["response"]["body"]["choices"][0]["message"]["content"],
                format!("echo:score {id}")
            );
            id.trim_start_matches("c-").parse().expect("number")
        })
        .collect();
    assert!(
        numbers.windows(2).all(|w| w[0] < w[1]),
        "input order: {numbers:?}"
    );
    let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(b["status"], "in_progress", "read while it runs");
    let (_, failed) = api
        .get_text(&format!("/batches/{id}/results?status=failed"))
        .await;
    assert!(failed.is_empty(), "{failed}");
    let (code, _) = api
        .get_text(&format!("/batches/{id}/results?status=maybe"))
        .await;
    assert_eq!(code, 400);
    fake.release();
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    let out_id = done["output_file_id"].as_str().expect("output");
    let (_, file) = api.get_text(&format!("/v1/files/{out_id}/content")).await;
    let (_, all) = api
        .get_text(&format!("/batches/{id}/results?status=succeeded"))
        .await;
    assert_eq!(all, file, "at the end, the results are the output file");
    server.stop().await;
}

/// `csv-to-batch CSV --model m -o OUT EXTRA…`: (success, stdout, stderr).
fn to_jsonl(csv: &Path, out: &Path, extra: &[&str]) -> (bool, String, String) {
    let mut args = vec![
        "csv-to-batch",
        csv.to_str().expect("path"),
        "--model",
        "m",
        "-o",
        out.to_str().expect("path"),
    ];
    args.extend_from_slice(extra);
    run(&args)
}

/// Issue 18, defects 4 and 5 and the CSV rough edges: csv-to-batch never destroys or swallows
/// its input, and says what is wrong with a file it cannot convert faithfully.
#[test]
fn csv_to_batch_refuses_to_overwrite_its_input_or_swallow_rows() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("in.csv");
    let text = "candidate_id,name\nc1,Ann\nc2,Bo\n";
    std::fs::write(&csv, text).expect("csv");
    let link = dir.path().join("link.csv");
    std::os::unix::fs::symlink(&csv, &link).expect("symlink");
    let dotted = dir.path().join(".").join("in.csv");
    for output in [&csv, &dotted, &link] {
        let (ok, _, err) = to_jsonl(&csv, output, &[]);
        assert!(!ok, "-o {} must be refused", output.display());
        assert!(err.contains("is the input file itself"), "{err}");
        assert_eq!(
            std::fs::read_to_string(&csv).expect("csv"),
            text,
            "input intact"
        );
    }

    // An unterminated quote: refused, naming the line where it opened; no output file.
    let out = dir.path().join("out.jsonl");
    std::fs::write(
        &csv,
        "candidate_id,name,notes\nc1,Ann,fine\nc2,Bo,\"unclosed\nc3,Cy,x\nc4,Di,y\n",
    )
    .expect("csv");
    let (ok, _, err) = to_jsonl(&csv, &out, &[]);
    assert!(!ok, "{err}");
    assert!(
        err.contains("the quote opened on line 3 is never closed"),
        "{err}"
    );
    assert!(!out.exists(), "nothing written");
    // A quoted field with doubled quotes and a newline is fine.
    std::fs::write(
        &csv,
        "candidate_id,notes\nc1,\"said \"\"hi\"\"\nthen left\"\nc2,\"\"\"\"\n",
    )
    .expect("csv");
    let (ok, _, err) = to_jsonl(&csv, &out, &[]);
    assert!(ok, "{err}");
    assert_eq!(
        std::fs::read_to_string(&out).expect("out").lines().count(),
        2
    );

    // An error leaves an earlier output as it was (written through a temporary file).
    let before = std::fs::read(&out).expect("out");
    for (content, says) in [
        ("candidate_id;name\nc1;Ann\n", "looks ';'-separated"),
        ("candidate_id,name,name\nc1,Ann,B\n", "named twice"),
        (
            "candidate_id,name\nc1,Ann\nc2,Bo,extra,more\nc3,Cy\n",
            "1 row(s) have more fields than the header's 2 (row 2)",
        ),
    ] {
        std::fs::write(&csv, content).expect("csv");
        let (ok, _, err) = to_jsonl(&csv, &out, &[]);
        assert!(!ok, "{content}: {err}");
        assert!(err.contains(says), "{content}: {err}");
        assert_eq!(std::fs::read(&out).expect("out"), before, "output kept");
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .expect("dir")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // An answer schema that is not a JSON Schema object is refused.
    std::fs::write(&csv, "candidate_id,name\nc1,Ann\n").expect("csv");
    let schema = dir.path().join("schema.json");
    std::fs::write(&schema, "[1, 2]").expect("schema");
    let (ok, _, err) = to_jsonl(&csv, &out, &["--json-schema", schema.to_str().expect("p")]);
    assert!(!ok && err.contains("not a JSON Schema object"), "{err}");

    // Short rows and a first row that looks like data are converted, and said.
    std::fs::write(
        &csv,
        "c1,ann@example.com,7\nc2,bo@example.com\nc3,cy@example.com,2\n",
    )
    .expect("csv");
    let (ok, _, err) = to_jsonl(&csv, &out, &[]);
    assert!(ok, "{err}");
    assert!(err.contains("may not be a header"), "{err}");
    assert!(
        err.contains("1 with fewer fields than the header (row 1)"),
        "{err}"
    );
}

/// Issue 18, defect 10: an id is one path segment in every client URL (`retry
/// "../v1/batches/ID/cancel?"` used to cancel batch ID), and `analyze` given an errors file
/// counts its lines as failed (it reported them as succeeded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_ids_stay_ids_and_analyze_reads_an_errors_file_as_failures() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| {
        b.delay = Duration::from_millis(200);
        b.refuse_marker = Some("c-1".into());
    });
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 1).await;
    let api = Api::new(&server.base);
    let id = api
        .submit_id(
            crate::support::chat_file(20, "m", "s"),
            "/v1/chat/completions",
        )
        .await;
    api.wait_in_progress(&id, Duration::from_secs(20)).await;
    let base = server.base.clone();
    let hostile = format!("../v1/batches/{id}/cancel?");
    let (ok, _, err) =
        tokio::task::spawn_blocking(move || run(&["retry", &hostile, "--server", &base]))
            .await
            .expect("retry runs");
    assert!(!ok, "{err}");
    let (_, b) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(b["status"], "in_progress", "not cancelled: {b}");

    fake.set(|b| b.delay = Duration::ZERO);
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let errors = dir.path().join("errors.jsonl");
    let (_, text) = api
        .get_text(&format!(
            "/v1/files/{}/content",
            done["error_file_id"].as_str().expect("errors")
        ))
        .await;
    std::fs::write(&errors, &text).expect("write");
    let failed = text.lines().count();
    assert!(failed >= 1, "{done}");
    let (ok, stdout, err) = run(&["analyze", errors.to_str().expect("p")]);
    assert!(ok, "{err}");
    assert!(
        stdout.contains(&format!("lines: {failed} (0 succeeded, {failed} failed")),
        "{stdout}"
    );
    assert!(stdout.contains("looks like an errors file"), "{stdout}");
    server.stop().await;
}

/// `-o` naming a device or a symlink: the device is written, not replaced by a file (writing
/// through a temporary file and a rename once turned /dev/null into a regular file), and a
/// symlink still points where it did.
#[test]
fn csv_to_batch_writes_through_devices_and_symlinks() {
    let dir = tempfile::tempdir().expect("tempdir");
    let csv = dir.path().join("in.csv");
    std::fs::write(&csv, "candidate_id,name\nc1,Ann\n").expect("csv");
    let (ok, _, err) = to_jsonl(&csv, Path::new("/dev/null"), &[]);
    assert!(ok, "{err}");
    use std::os::unix::fs::FileTypeExt;
    let null = std::fs::metadata("/dev/null").expect("/dev/null");
    assert!(
        null.file_type().is_char_device(),
        "/dev/null is still a device"
    );
    let real = dir.path().join("real.jsonl");
    std::fs::write(&real, "old\n").expect("old");
    let link = dir.path().join("link.jsonl");
    std::os::unix::fs::symlink(&real, &link).expect("symlink");
    let (ok, _, err) = to_jsonl(&csv, &link, &[]);
    assert!(ok, "{err}");
    assert!(
        std::fs::symlink_metadata(&link)
            .expect("link")
            .file_type()
            .is_symlink()
    );
    assert!(
        std::fs::read_to_string(&real)
            .expect("real")
            .contains("\"custom_id\":\"c1\"")
    );
}

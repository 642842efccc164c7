//! The client subcommands, run as real processes.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, binary, server_with};
use serde_json::Value;
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

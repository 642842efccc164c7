//! JSON answers checked before they count: fences removed, answers that do not validate
//! re-asked with what was wrong, answers that never validate or were cut off named in the error
//! file, lines that ask for no JSON untouched; the counters where people look. Both backends,
//! the fake over real HTTP.

use crate::support::fake::{Fake, Script, Shape};
use crate::support::{Api, metric, server_with};
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

fn schema() -> Value {
    json!({"type": "object", "required": ["score", "reason"], "additionalProperties": false,
           "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                          "reason": {"type": "string"}}})
}

/// The line's own text (its first user message, or a completion's prompt up to the first
/// answer appended by a re-ask), in the backend's request shape.
fn line_text(req: &Value) -> String {
    req["messages"]
        .as_array()
        .and_then(|m| m.iter().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .or_else(|| req["prompt"].as_str())
        .unwrap_or_default()
        .split('|')
        .next()
        .unwrap_or_default()
        .to_string()
}

/// Whether this call is a re-ask (the request carries the earlier answer and the errors).
fn is_reask(req: &Value) -> bool {
    match req["messages"].as_array() {
        // A line has one user message; a re-ask adds the answer and a second one.
        Some(m) => m.iter().filter(|x| x["role"] == "user").count() > 1,
        None => req["prompt"]
            .as_str()
            .is_some_and(|p| p.contains("Answer again")),
    }
}

/// The model, scripted by the kind of line (the user message's text before `:`).
fn model() -> Script {
    Script(Arc::new(|req: &Value| {
        let text = line_text(req);
        let kind = text.split(':').next().unwrap_or_default();
        let reask = is_reask(req);
        let (a, cut) = match kind {
            "fenced" => (
                "Here you are:\n```json\n{\"score\": 7, \"reason\": \"fine\"}\n```",
                false,
            ),
            "missing" if !reask => ("{\"score\": 7}", false),
            "missing" => ("{\"score\": 7, \"reason\": \"now complete\"}", false),
            "never" => ("{\"score\": \"excellent\", \"reason\": \"x\"}", false),
            "cut" => ("{\"score\": 7, \"reas", true),
            "plain" => ("```json\n{}\n```", false),
            "object" => ("```\n{\"a\": 1}\n```", false),
            _ => ("{\"score\": 5, \"reason\": \"ok\"}", false),
        };
        (a.to_string(), cut)
    }))
}

/// A fake backend of `shape` answering as [`model`], keeping every request it gets.
async fn scripted(shape: Shape) -> Fake {
    let fake = Fake::start(shape).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| b.script = Some(model()));
    fake
}

/// A line of `kind` (`n`-th of it) asking for `format` (`None`: no JSON asked).
fn line(kind: &str, n: u32, format: Option<Value>) -> String {
    let mut body = json!({"model": "m", "max_tokens": 64,
        "messages": [{"role": "user", "content": format!("{kind}: rate candidate {n}")}]});
    if let Some(f) = format {
        body["response_format"] = f;
    }
    json!({"custom_id": format!("{kind}-{n}"), "method": "POST", "url": "/v1/chat/completions",
           "body": body})
    .to_string()
}

fn with_schema() -> Option<Value> {
    Some(
        json!({"type": "json_schema", "json_schema": {"name": "score", "strict": true,
                                                         "schema": schema()}}),
    )
}

/// The calls the fake received, by line (the user message's text).
fn calls_by_line(fake: &Fake) -> HashMap<String, Vec<Value>> {
    let mut by: HashMap<String, Vec<Value>> = HashMap::new();
    for b in fake.stats.bodies.lock().expect("lock").iter() {
        by.entry(line_text(b)).or_default().push(b.clone());
    }
    by
}

/// The answer text of an output line's body.
fn content(line: &Value) -> &str {
    line["response"]["body"]["choices"][0]["message"]["content"]
        .as_str()
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_answers_are_checked_reasked_and_named_on_both_backends() {
    for shape in [Shape::Ollama, Shape::OpenAi] {
        let fake = scripted(shape).await;
        let (_dir, server) = server_with(&fake, |_| {}).await;
        let api = Api::new(&server.base);
        let mut file = String::new();
        for n in 1..=2 {
            for kind in ["fenced", "missing", "never", "cut", "valid"] {
                file.push_str(&line(kind, n, with_schema()));
                file.push('\n');
            }
            file.push_str(&line("plain", n, None));
            file.push('\n');
        }
        file.push_str(&line("object", 1, Some(json!({"type": "json_object"}))));
        file.push('\n');
        let batch = api
            .run_file(
                file.into_bytes(),
                "/v1/chat/completions",
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(batch["status"], "completed", "{shape:?}: {batch}");
        assert_eq!(batch["request_counts"]["total"], 13);
        assert_eq!(
            batch["request_counts"]["failed"], 4,
            "{shape:?}: never ×2, cut ×2"
        );
        let out = api.lines(&batch["output_file_id"]).await;
        let errors = api.lines(&batch["error_file_id"]).await;
        let by_id = |lines: &[Value]| -> HashMap<String, Value> {
            lines
                .iter()
                .map(|l| {
                    (
                        l["custom_id"].as_str().unwrap_or_default().to_string(),
                        l.clone(),
                    )
                })
                .collect()
        };
        let (out, errors) = (by_id(&out), by_id(&errors));
        let calls = calls_by_line(&fake);
        let calls_of = |kind: &str, n: u32| {
            calls
                .get(&format!("{kind}: rate candidate {n}"))
                .map_or(0, Vec::len)
        };
        for n in 1..=2 {
            // Fenced: the output is the bare JSON, one call.
            let o = &out[&format!("fenced-{n}")];
            assert_eq!(
                content(o),
                "{\"score\": 7, \"reason\": \"fine\"}",
                "{shape:?}"
            );
            let parsed: Value = serde_json::from_str(content(o)).expect("bare JSON");
            assert_eq!(parsed["score"], 7);
            assert_eq!(calls_of("fenced", n), 1, "{shape:?}");
            // Missing a required field: re-asked once, naming it; then it succeeds.
            let o = &out[&format!("missing-{n}")];
            assert_eq!(
                serde_json::from_str::<Value>(content(o)).expect("JSON")["reason"],
                "now complete"
            );
            assert_eq!(calls_of("missing", n), 2, "{shape:?}: exactly two calls");
            let reask = &calls[&format!("missing: rate candidate {n}")][1];
            let msgs = reask["messages"].as_array().expect("chat");
            assert_eq!(
                msgs.len(),
                3,
                "{shape:?}: the line, its answer, the re-ask: {reask}"
            );
            assert_eq!(msgs[1]["role"], "assistant");
            assert_eq!(msgs[1]["content"], "{\"score\": 7}");
            let said = msgs[2]["content"].as_str().expect("text");
            assert!(said.contains("\"reason\" is a required property"), "{said}");
            if shape == Shape::Ollama {
                assert_eq!(
                    reask["format"],
                    schema(),
                    "the grammar goes with the re-ask too"
                );
            }
            // Never valid: 1 + --reask (2) calls, then invalid_answer with the last answer and
            // the validator's errors.
            let e = &errors[&format!("never-{n}")];
            assert_eq!(calls_of("never", n), 3, "{shape:?}");
            assert_eq!(e["error"]["code"], "invalid_answer", "{e}");
            let m = e["error"]["message"].as_str().expect("message");
            assert!(
                m.contains("`/score`: \"excellent\" is not of type \"integer\""),
                "{m}"
            );
            assert!(m.contains("after 2 re-ask"), "{m}");
            assert_eq!(
                content(e),
                "{\"score\": \"excellent\", \"reason\": \"x\"}",
                "{e}"
            );
            assert!(!out.contains_key(&format!("never-{n}")));
            // Cut off: one call, answer_truncated, says to raise max_tokens.
            let e = &errors[&format!("cut-{n}")];
            assert_eq!(
                calls_of("cut", n),
                1,
                "{shape:?}: a re-ask would be cut off again"
            );
            assert_eq!(e["error"]["code"], "answer_truncated", "{e}");
            assert!(
                e["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("max_tokens")),
                "{e}"
            );
            // Valid at once: one call, kept as it came.
            assert_eq!(calls_of("valid", n), 1);
            assert_eq!(
                content(&out[&format!("valid-{n}")]),
                "{\"score\": 5, \"reason\": \"ok\"}"
            );
            // No JSON asked: untouched, fence and all.
            assert_eq!(
                content(&out[&format!("plain-{n}")]),
                "```json\n{}\n```",
                "{shape:?}"
            );
            assert_eq!(calls_of("plain", n), 1);
        }
        assert_eq!(content(&out["object-1"]), "{\"a\": 1}", "json_object: bare");
        let total: usize = calls.values().map(Vec::len).sum();
        assert_eq!(total, 2 * (1 + 2 + 3 + 1 + 1 + 1) + 1, "{shape:?}");
        // The counters equal what was counted here: checked = every line that asked for JSON
        // (10 + 1), fenced 2 + 1, re-asks 2×1 + 2×2, invalid 2, truncated 2.
        let want = json!({"checked": 11, "fenced": 3, "reasks": 6, "invalid": 2,
                          "truncated": 2, "reused": 0});
        let (_, status) = api.get("/status").await;
        assert_eq!(status["counters"]["answers"], want, "{shape:?}");
        let id = batch["id"].as_str().expect("id");
        let (code, figures) = api.get(&format!("/status/batches/{id}")).await;
        assert_eq!(code, 200, "{figures}");
        assert_eq!(figures["progress"]["answers"], want, "{figures}");
        // `analyze` on the files as they came: the new codes, and a bar per integer score.
        let files = tempfile::tempdir().expect("tempdir");
        let (o, e) = (files.path().join("o.jsonl"), files.path().join("e.jsonl"));
        for (path, id) in [
            (&o, &batch["output_file_id"]),
            (&e, &batch["error_file_id"]),
        ] {
            let (_, text) = api
                .get_text(&format!("/v1/files/{}/content", id.as_str().expect("file")))
                .await;
            std::fs::write(path, text).expect("write");
        }
        let report = std::process::Command::new(crate::support::binary())
            .arg("analyze")
            .arg(&o)
            .arg("--errors")
            .arg(&e)
            .args(["--field", "score"])
            .output()
            .expect("analyze");
        let stdout = String::from_utf8_lossy(&report.stdout);
        assert!(report.status.success(), "{stdout}");
        assert!(
            stdout.contains("lines: 13 (9 succeeded, 4 failed)"),
            "{stdout}"
        );
        assert!(
            stdout.contains("failed invalid_answer: 2 (the answer never matched"),
            "{stdout}"
        );
        assert!(
            stdout.contains("failed answer_truncated: 2 (cut off at max_tokens"),
            "{stdout}"
        );
        assert!(
            stdout.contains("never-1: the answer does not match"),
            "{stdout}"
        );
        // Scores 7 (fenced ×2, missing ×2) and 5 (valid ×2): bars for 5, 6 and 7.
        let bars: Vec<Vec<&str>> = stdout
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .filter(|w| {
                w.len() >= 2 && ["5", "6", "7"].contains(&w[0]) && w[1].parse::<u32>().is_ok()
            })
            .collect();
        assert_eq!(bars.len(), 3, "{stdout}");
        assert_eq!((bars[0][0], bars[0][1]), ("5", "2"), "{stdout}");
        assert_eq!((bars[1][0], bars[1][1]), ("6", "0"), "{stdout}");
        assert_eq!((bars[2][0], bars[2][1]), ("7", "4"), "{stdout}");
        let m = api.metrics().await;
        for (outcome, n) in [
            ("checked", 11.0),
            ("fenced", 3.0),
            ("reasked", 6.0),
            ("invalid", 2.0),
            ("truncated", 2.0),
        ] {
            assert_eq!(
                metric(&m, "obatch_answers_total", &[("outcome", outcome)]),
                Some(n),
                "{shape:?} {outcome}"
            );
        }
    }
}

/// `/v1/completions` too: the prompt goes on with the answer and what was wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_are_checked_and_reasked_through_the_prompt() {
    for shape in [Shape::Ollama, Shape::OpenAi] {
        let fake = scripted(shape).await;
        let (_dir, server) = server_with(&fake, |cfg| cfg.reask = 1).await;
        let api = Api::new(&server.base);
        let mut file = String::new();
        for kind in ["missing", "never", "fenced"] {
            file.push_str(
                &json!({"custom_id": kind, "method": "POST", "url": "/v1/completions",
                        "body": {"model": "m", "prompt": format!("{kind}: rate|"),
                                 "response_format": with_schema()}})
                .to_string(),
            );
            file.push('\n');
        }
        let batch = api
            .run_file(
                file.into_bytes(),
                "/v1/completions",
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(batch["request_counts"]["failed"], 1, "{shape:?}: {batch}");
        let out = api.lines(&batch["output_file_id"]).await;
        let text = |id: &str| {
            out.iter()
                .find(|l| l["custom_id"] == id)
                .and_then(|l| l["response"]["body"]["choices"][0]["text"].as_str())
                .map(str::to_string)
        };
        assert_eq!(
            text("missing").as_deref(),
            Some("{\"score\": 7, \"reason\": \"now complete\"}")
        );
        assert_eq!(
            text("fenced").as_deref(),
            Some("{\"score\": 7, \"reason\": \"fine\"}")
        );
        let errors = api.lines(&batch["error_file_id"]).await;
        assert_eq!(errors[0]["custom_id"], "never");
        assert_eq!(errors[0]["error"]["code"], "invalid_answer");
        let calls = calls_by_line(&fake);
        assert_eq!(calls["never: rate"].len(), 2, "{shape:?}: 1 + --reask 1");
        let reask = calls["missing: rate"][1]["prompt"]
            .as_str()
            .expect("prompt")
            .to_string();
        assert!(
            reask.starts_with("missing: rate|{\"score\": 7}")
                && reask.contains("\"reason\" is a required property"),
            "{reask}"
        );
    }
}

/// A schema that is not one, or that points outside itself, is refused at validation with its
/// line: no call is made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_schemas_are_refused_at_validation_with_the_line() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let mut file = String::new();
    file.push_str(&line("valid", 1, with_schema()));
    file.push('\n');
    file.push_str(&line(
        "valid",
        2,
        Some(json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"type": "integer", "minimum": "one"}}})),
    ));
    file.push('\n');
    file.push_str(&line(
        "valid",
        3,
        Some(json!({"type": "json_schema", "json_schema": {"name": "s", "schema": {"$ref": "https://example.com/score.json"}}})),
    ));
    file.push('\n');
    let batch = api
        .run_file(
            file.into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(batch["status"], "failed", "{batch}");
    let errs = batch["errors"]["data"].as_array().expect("errors");
    assert_eq!(errs.len(), 2, "{batch}");
    assert_eq!(errs[0]["line"], 2);
    assert!(
        errs[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("not a valid JSON Schema")),
        "{batch}"
    );
    assert_eq!(errs[1]["line"], 3);
    assert!(
        errs[1]["message"]
            .as_str()
            .is_some_and(|m| m.contains("remote `$ref`s are not fetched")),
        "{batch}"
    );
    assert_eq!(fake.total_calls(), 0);
}

/// The answer text of each output line, by custom id.
fn answers_by_id(lines: &[Value]) -> HashMap<String, String> {
    lines
        .iter()
        .map(|l| {
            (
                l["custom_id"].as_str().unwrap_or_default().to_string(),
                content(l).to_string(),
            )
        })
        .collect()
}

/// Never paying twice: 300 lines answered by one server process, which is then killed
/// (SIGKILL); a second process runs the same 300 lines plus 100 new ones with `"reuse":
/// "true"` and calls the backend exactly 100 times; identical lines in one batch make one call;
/// a changed `max_tokens` is another request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answered_lines_are_reused_across_a_kill_and_never_sent_twice() {
    use crate::support::process::{self, signal, wait_exit};
    use crate::support::{assert_exactly_once, chat_file, ids};
    let fake = Fake::start(Shape::OpenAi).await;
    // Each call's answer is its own (a number no other call gets): a reused answer is told
    // from a fresh one.
    fake.set(|b| b.unique_answers = true);
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    let mut first = process::spawn(&state, &fake.url(), 4, &[]);
    let api = Api::new(&first.addr);
    let a = api
        .run_file(
            chat_file(300, "m", "rubric"),
            "/v1/chat/completions",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(a["request_counts"]["completed"], 300, "{a}");
    let before = answers_by_id(&api.lines(&a["output_file_id"]).await);
    assert_eq!(fake.total_calls(), 300);
    signal(&first.child, "-KILL");
    wait_exit(&mut first.child, Duration::from_secs(10));

    let second = process::spawn(&state, &fake.url(), 4, &[]);
    let api = Api::new(&second.addr);
    let b = api
        .submit_with(
            chat_file(400, "m", "rubric"),
            "/v1/chat/completions",
            json!({"reuse": "true"}),
        )
        .await;
    let b = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(
        fake.total_calls(),
        400,
        "exactly the 100 new lines were sent"
    );
    let out = api.lines(&b["output_file_id"]).await;
    assert_exactly_once(&out, ids(400));
    let after = answers_by_id(&out);
    for (id, answer) in &before {
        assert_eq!(&after[id], answer, "{id}: the stored answer, not a new one");
    }
    let (_, figures) = api
        .get(&format!(
            "/status/batches/{}",
            b["id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(figures["progress"]["answers"]["reused"], 300, "{figures}");
    assert_eq!(
        metric(
            &api.metrics().await,
            "obatch_answers_total",
            &[("outcome", "reused")]
        ),
        Some(300.0)
    );
    // The output line is the stored answer with its usage; ids are the new batch's own.
    let ids_a: std::collections::HashSet<String> = api
        .lines(&a["output_file_id"])
        .await
        .iter()
        .map(|l| l["id"].as_str().unwrap_or_default().to_string())
        .collect();
    assert!(
        out.iter()
            .all(|l| !ids_a.contains(l["id"].as_str().unwrap_or_default()))
    );
    assert!(out.iter().all(|l| {
        l["response"]["body"]["usage"]["prompt_tokens"]
            .as_u64()
            .is_some()
    }));

    // One batch: five identical new lines (one call), c-1 with another max_tokens (a call of
    // its own), and c-2 as it was (reused).
    let same = |id: &str| {
        json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
               "body": {"model": "m", "messages": [{"role": "system", "content": "rubric"},
                                                  {"role": "user", "content": "the same question"}],
                        "max_tokens": 8}})
        .to_string()
    };
    let mut file: Vec<String> = (1..=5).map(|i| same(&format!("same-{i}"))).collect();
    let mut changed: Value =
        serde_json::from_str(&crate::support::chat_line("c-1", "m", "rubric")).expect("line");
    changed["custom_id"] = json!("c-1-longer");
    changed["body"]["max_tokens"] = json!(64);
    file.push(changed.to_string());
    let mut kept: Value =
        serde_json::from_str(&crate::support::chat_line("c-2", "m", "rubric")).expect("line");
    kept["custom_id"] = json!("c-2-again");
    file.push(kept.to_string());
    let c = api
        .submit_with(
            (file.join("\n") + "\n").into_bytes(),
            "/v1/chat/completions",
            json!({"reuse": "true"}),
        )
        .await;
    let c = api
        .wait_terminal(c["id"].as_str().expect("id"), Duration::from_secs(60))
        .await;
    assert_eq!(c["request_counts"]["completed"], 7, "{c}");
    assert_eq!(
        fake.total_calls(),
        402,
        "one call for the five, one for the changed max_tokens"
    );
    let out = answers_by_id(&api.lines(&c["output_file_id"]).await);
    let first_same = &out["same-1"];
    assert!(
        (2..=5).all(|i| &out[&format!("same-{i}")] == first_same),
        "{out:?}"
    );
    assert_ne!(
        out["c-1-longer"], before["c-1"],
        "another max_tokens is another request"
    );
    assert_eq!(out["c-2-again"], before["c-2"]);
    // Without the metadata nothing is reused.
    let d = api
        .run_file(
            chat_file(3, "m", "rubric"),
            "/v1/chat/completions",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(d["request_counts"]["completed"], 3);
    assert_eq!(fake.total_calls(), 405);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reuse_metadata_other_than_true_or_false_is_refused() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (_, file) = api
        .upload("in.jsonl", crate::support::chat_file(1, "m", "s"), "batch")
        .await;
    let (status, err) = api
        .post(
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"reuse": "yes"}}),
        )
        .await;
    assert_eq!(status, 400, "{err}");
    assert_eq!(err["error"]["param"], "metadata.reuse");
}

/// Conversation mode: a re-ask is made with the conversation's history, but its turns never
/// enter the kept history; the next turn carries the line and its valid answer only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reask_turns_never_enter_a_conversations_history() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| {
        b.script = Some(Script(Arc::new(|req: &Value| {
            let msgs = req["messages"].as_array().cloned().unwrap_or_default();
            let last = msgs
                .last()
                .and_then(|m| m["content"].as_str())
                .unwrap_or_default()
                .to_string();
            let text = if last.starts_with("first") {
                "{\"score\": 7}".to_string() // missing "reason": re-asked
            } else if last.starts_with("Your answer") {
                "{\"score\": 7, \"reason\": \"after the re-ask\"}".to_string()
            } else {
                "{\"score\": 3, \"reason\": \"second\"}".to_string()
            };
            (text, false)
        })));
    });
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.concurrency = 1;
        cfg.backends = vec![(cfg.backend_url.clone(), Some(1))];
        cfg.num_ctx = Some(8192);
    })
    .await;
    let api = Api::new(&server.base);
    let mut file = String::new();
    for (id, text) in [("a", "first candidate"), ("b", "second candidate")] {
        file.push_str(
            &json!({"custom_id": id, "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "system", "content": "rubric"},
                                                       {"role": "user", "content": text}],
                             "response_format": with_schema()}})
            .to_string(),
        );
        file.push('\n');
    }
    let b = api
        .submit_with(
            file.into_bytes(),
            "/v1/chat/completions",
            json!({"mode": "conversation"}),
        )
        .await;
    let b = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(b["request_counts"]["completed"], 2, "{b}");
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    assert_eq!(bodies.len(), 3, "a, its re-ask, b");
    let roles = |b: &Value| -> Vec<String> {
        b["messages"]
            .as_array()
            .map(|m| {
                m.iter()
                    .map(|x| {
                        format!(
                            "{}:{}",
                            x["role"].as_str().unwrap_or(""),
                            x["content"]
                                .as_str()
                                .unwrap_or("")
                                .chars()
                                .take(12)
                                .collect::<String>()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(
        roles(&bodies[1]).len(),
        4,
        "the re-ask: system, a, answer, what was wrong"
    );
    assert_eq!(
        roles(&bodies[2]),
        vec![
            "system:rubric".to_string(),
            "user:first candid".into(),
            "assistant:{\"score\": 7,".into(),
            "user:second candi".into()
        ],
        "b carries a and its valid answer, not the re-ask"
    );
    assert_eq!(
        bodies[2]["messages"][2]["content"],
        "{\"score\": 7, \"reason\": \"after the re-ask\"}"
    );
}

/// `/v1/responses` lines: `text.format` json_schema gets the same check and re-ask as chat, the
/// answer comes back as a Response; what cannot run locally, and a line whose `url` is another
/// endpoint, are refused at validation with their line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn responses_lines_are_checked_and_what_cannot_run_is_refused_by_line() {
    for shape in [Shape::Ollama, Shape::OpenAi] {
        let fake = scripted(shape).await;
        let (_dir, server) = server_with(&fake, |_| {}).await;
        let api = Api::new(&server.base);
        let line = |id: &str, text: &str| {
            json!({"custom_id": id, "method": "POST", "url": "/v1/responses",
                   "body": {"model": "m", "instructions": "Rate.", "input": text,
                            "text": {"format": {"type": "json_schema", "name": "score",
                                                "strict": true, "schema": schema()}}}})
            .to_string()
        };
        let file = format!(
            "{}\n{}\n",
            line("a", "missing: rate candidate 1"),
            line("b", "fenced: rate candidate 2")
        );
        let done = api
            .run_file(file.into_bytes(), "/v1/responses", Duration::from_secs(30))
            .await;
        assert_eq!(done["request_counts"]["completed"], 2, "{shape:?}: {done}");
        let out = api.lines(&done["output_file_id"]).await;
        let text = |id: &str| {
            out.iter()
                .find(|l| l["custom_id"] == id)
                .map(|l| l["response"]["body"]["output"][0]["content"][0]["text"].clone())
        };
        assert_eq!(
            text("a"),
            Some(json!("{\"score\": 7, \"reason\": \"now complete\"}")),
            "{shape:?}: re-asked once, then valid"
        );
        assert_eq!(
            text("b"),
            Some(json!("{\"score\": 7, \"reason\": \"fine\"}"))
        );
        assert!(
            out.iter()
                .all(|l| l["response"]["body"]["object"] == "response")
        );
        assert_eq!(calls_by_line(&fake)["missing: rate candidate 1"].len(), 2);
        // The instructions went as the system message; the echo did not go at all.
        let bodies = fake.stats.bodies.lock().expect("lock").clone();
        assert!(
            bodies.iter().all(|b| b["messages"][0]["content"] == "Rate."
                && b.get("ollama_batch_response").is_none()),
            "{bodies:?}"
        );
    }
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let ok = json!({"custom_id": "ok", "method": "POST", "url": "/v1/responses",
                    "body": {"model": "m", "input": "hi"}});
    let mut bad = Vec::new();
    for (id, body) in [
        (
            "tools",
            json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
        ),
        (
            "prev",
            json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
        ),
        (
            "bg",
            json!({"model": "m", "input": "x", "background": true}),
        ),
        ("store", json!({"model": "m", "input": "x", "store": true})),
        (
            "file",
            json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "file-1"}]}]}),
        ),
    ] {
        bad.push(json!({"custom_id": id, "method": "POST", "url": "/v1/responses", "body": body}));
    }
    bad.push(
        json!({"custom_id": "url", "method": "POST", "url": "/v1/chat/completions",
                    "body": {"model": "m", "messages": [{"role": "user", "content": "x"}]}}),
    );
    let file: String = std::iter::once(&ok)
        .chain(bad.iter())
        .map(|l| format!("{l}\n"))
        .collect();
    let done = api
        .run_file(file.into_bytes(), "/v1/responses", Duration::from_secs(30))
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    let errs = done["errors"]["data"].as_array().expect("errors");
    let got: Vec<(u64, String)> = errs
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().unwrap_or(0),
                e["param"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (2, "body.tools".to_string()),
            (3, "body.previous_response_id".into()),
            (4, "body.background".into()),
            (5, "body.store".into()),
            (6, "body.input[0].content[0].type".into()),
            (7, "url".into()),
        ],
        "{done}"
    );
    assert!(errs.iter().all(|e| {
        e["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("line "))
    }));
    assert_eq!(fake.total_calls(), 0);
}

/// `--reask 0` turns re-asks off: an answer that does not validate ends as `invalid_answer`
/// after its one call; a fence is still removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reask_zero_names_an_invalid_answer_after_one_call() {
    let fake = scripted(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |cfg| cfg.reask = 0).await;
    let api = Api::new(&server.base);
    let file = format!(
        "{}\n{}\n",
        line("missing", 1, with_schema()),
        line("fenced", 1, with_schema())
    );
    let done = api
        .run_file(
            file.into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["request_counts"]["failed"], 1, "{done}");
    let errors = api.lines(&done["error_file_id"]).await;
    assert_eq!(errors[0]["custom_id"], "missing-1");
    assert_eq!(errors[0]["error"]["code"], "invalid_answer");
    assert!(
        errors[0]["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("after 0 re-ask")),
        "{errors:?}"
    );
    let out = api.lines(&done["output_file_id"]).await;
    assert_eq!(content(&out[0]), "{\"score\": 7, \"reason\": \"fine\"}");
    assert_eq!(fake.total_calls(), 2, "one call each");
}

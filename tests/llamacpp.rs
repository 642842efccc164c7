//! Opt-in: a real llama.cpp `llama-server` serving the tiny test model
//! (`scripts/llama-server.sh` builds and starts one). Ignored by default, with the reason shown
//! by `cargo test`; run it with `OLLAMA_BATCH_LLAMA_URL=… cargo test --test main llamacpp --
//! --ignored`. Checks real tokenization and usage numbers, prefix
//! caching of the shared system prompt, and a context overflow landing in the error file
//! without retries.

use crate::support::{Api, TestServer, chat_line, config};
use ollama_batch::config::BackendKind;
use serde_json::Value;
use std::time::Duration;

/// One real server for all of these tests: they take turns (two batches at once would share its
/// four slots and their caches, which the cache test measures).
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The real server's URL (`OLLAMA_BATCH_LLAMA_URL`).
fn real_url() -> String {
    std::env::var("OLLAMA_BATCH_LLAMA_URL")
        .expect("set OLLAMA_BATCH_LLAMA_URL to a running llama-server (scripts/llama-server.sh)")
}

/// ollama-batch on a fresh state directory against the real server: its 4 slots, a minute a
/// call, changed by `tweak`.
async fn on_the_real_server(
    tweak: impl FnOnce(&mut ollama_batch::config::Config),
) -> (tempfile::TempDir, TestServer) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &real_url());
    cfg.concurrency = 4;
    cfg.request_timeout = Duration::from_secs(60);
    tweak(&mut cfg);
    (dir, TestServer::start(cfg).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real llama.cpp server: scripts/llama-server.sh, then OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 and --ignored"]
async fn real_llama_cpp_server_runs_a_batch() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let (_dir, mut server) = on_the_real_server(|_| {}).await;
    let api = Api::new(&server.base);
    let system = "You score candidates from 1 to 10 against a long rubric. ".repeat(40);
    let n = 40;
    let mut jsonl = String::new();
    for i in 1..=n {
        jsonl.push_str(&chat_line(&format!("c-{i}"), "tiny", &system));
        jsonl.push('\n');
    }
    // One line far past a 2,048-token slot: a context overflow.
    jsonl.push_str(&chat_line("too-long", "tiny", &"overflow ".repeat(6000)));
    jsonl.push('\n');
    let done = api
        .run_file(
            jsonl.into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(300),
        )
        .await;
    println!("{done}");
    assert_eq!(done["status"], "completed");
    assert_eq!(done["request_counts"]["completed"], n);
    assert_eq!(done["request_counts"]["failed"], 1);
    let out = api.lines(&done["output_file_id"]).await;
    assert_eq!(out.len(), n as usize);
    for l in &out {
        let body = &l["response"]["body"];
        assert!(
            body["usage"]["prompt_tokens"].as_u64().unwrap_or(0) > 100,
            "{l}"
        );
        assert!(body["choices"][0]["message"]["content"].is_string(), "{l}");
    }
    let cached = done["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "usage: input {} (cached {cached}), output {}",
        done["usage"]["input_tokens"], done["usage"]["output_tokens"]
    );
    assert!(
        cached > 0,
        "the shared system prompt is served from the prefix cache"
    );
    let errs = api.lines(&done["error_file_id"]).await;
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0]["custom_id"], "too-long");
    assert_eq!(errs[0]["response"]["status_code"], 400, "{}", errs[0]);
    assert_ne!(errs[0]["response"]["body"]["error"], Value::Null);
    let (_, status) = api.get("/status").await;
    assert_eq!(
        status["counters"]["retries"], 0,
        "a context overflow is not retried"
    );
    server.stop().await;
}

/// 8 rubrics, 120 lines shuffled, through the default (slot-affine) policy on the real server:
/// at least 85 % of prompt tokens come from the slots' caches (with `--cache-ram 0` or not; the
/// bare client's share on the same file is printed beside it). The server needs `-np 4`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real llama.cpp server: scripts/llama-server.sh, then OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 and --ignored"]
async fn real_llama_cpp_server_caches_shuffled_prefix_groups() {
    let _turn = ONE_AT_A_TIME.lock().await;
    let url = real_url();
    let rubric = |g: usize| {
        format!("Rubric {g}. ")
            + &format!("Criterion {g}: weigh the evidence with care and score strictly. ")
                .repeat(80)
    };
    let mut lines: Vec<(usize, usize)> = (0..120).map(|i| (i % 8, i)).collect();
    fastrand::Rng::with_seed(8).shuffle(&mut lines);
    let bodies: Vec<Value> = lines
        .iter()
        .map(|(g, i)| {
            serde_json::json!({"model": "tiny", "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "system", "content": rubric(*g)},
                             {"role": "user", "content": format!("Candidate {i}: a profile.")}]})
        })
        .collect();
    let mut jsonl = String::new();
    for (n, b) in bodies.iter().enumerate() {
        jsonl.push_str(
            &serde_json::json!({"custom_id": format!("l{n}"), "method": "POST",
            "url": "/v1/chat/completions", "body": b})
            .to_string(),
        );
        jsonl.push('\n');
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &url);
    cfg.concurrency = 4;
    cfg.request_timeout = Duration::from_secs(120);
    let mut server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(
            jsonl.into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(600),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], 120, "{done}");
    let share = |u: &Value| {
        u["input_tokens_details"]["cached_tokens"]
            .as_f64()
            .unwrap_or(0.0)
            / u["input_tokens"].as_f64().unwrap_or(1.0)
    };
    let ours = share(&done["usage"]);
    server.stop().await;
    // The bare client: the same bodies in file order, 4 at a time, straight to the server.
    let http = crate::support::http().build().expect("client");
    let (mut prompt, mut cached) = (0u64, 0u64);
    for chunk in bodies.chunks(4) {
        let answers = futures_util::future::join_all(chunk.iter().map(|b| {
            http.post(format!("{url}/v1/chat/completions"))
                .json(b)
                .send()
        }))
        .await;
        for a in answers {
            let v: Value = a.expect("answer").json().await.expect("json");
            prompt += v["usage"]["prompt_tokens"].as_u64().unwrap_or(0);
            cached += v["usage"]["prompt_tokens_details"]["cached_tokens"]
                .as_u64()
                .unwrap_or(0);
        }
    }
    println!(
        "cached share: slot-affine {:.1} %, bare client in file order {:.1} %",
        ours * 100.0,
        cached as f64 * 100.0 / prompt.max(1) as f64
    );
    assert!(
        ours >= 0.85,
        "slot-affine cached share {:.1} %",
        ours * 100.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real llama.cpp server: scripts/llama-server.sh, then OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 and --ignored"]
async fn real_llama_cpp_server_keeps_conversations_within_the_context() {
    let _turn = ONE_AT_A_TIME.lock().await;
    // llama-server -np 4 -c 8192: 2,048 tokens a slot.
    let (_dir, mut server) = on_the_real_server(|c| c.num_ctx = Some(2048)).await;
    let api = Api::new(&server.base);
    let system = "You score candidates from 1 to 10 against a rubric. ".repeat(12);
    let n = 80;
    let mut jsonl = String::new();
    for i in 1..=n {
        let v = serde_json::json!({"custom_id": format!("c-{i}"), "method": "POST",
            "url": "/v1/chat/completions", "body": {"model": "tiny", "max_tokens": 8,
            "messages": [{"role": "system", "content": system},
                         {"role": "user", "content": format!("Candidate {i}: {}", "built storage engines and led teams; ".repeat(10))}]}});
        jsonl.push_str(&format!("{v}\n"));
    }
    let b = api
        .submit_with(
            jsonl.into_bytes(),
            "/v1/chat/completions",
            serde_json::json!({"mode": "conversation"}),
        )
        .await;
    let done = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(300))
        .await;
    println!("{done}");
    assert_eq!(done["status"], "completed");
    assert_eq!(
        done["request_counts"]["completed"],
        n,
        "no call passed the slot's context: {}",
        api.lines(&done["error_file_id"])
            .await
            .first()
            .cloned()
            .unwrap_or_default()
    );
    // Line i is in conversation (i - 1) mod 4: its prompts grow turn by turn and drop at a cut.
    let out = api.lines(&done["output_file_id"]).await;
    let prompt = |i: usize| {
        out.iter()
            .find(|l| l["custom_id"] == format!("c-{i}").as_str())
            .and_then(|l| l["response"]["body"]["usage"]["prompt_tokens"].as_u64())
            .expect("usage")
    };
    let mut grew = 0;
    let mut cuts = 0;
    for lane in 0..4 {
        let seq: Vec<u64> = (1..=n as usize)
            .filter(|i| (i - 1) % 4 == lane)
            .map(prompt)
            .collect();
        println!("conversation {lane}: prompt tokens {seq:?}");
        assert!(seq.iter().all(|p| *p <= 2048));
        grew += seq.windows(2).filter(|w| w[1] > w[0]).count();
        cuts += seq.windows(2).filter(|w| w[1] < w[0]).count();
    }
    assert!(grew > 40, "the histories grew");
    assert!(cuts > 0, "and were cut to stay within 2,048 tokens");
    let cached = done["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .unwrap_or(0);
    let input = done["usage"]["input_tokens"].as_u64().unwrap_or(1);
    println!("cached {cached} of {input}");
    assert!(
        cached * 2 > input,
        "each turn reuses the previous one from the slot"
    );
    server.stop().await;
}

/// A `json_schema` response format on the real server, which turns it into constrained
/// decoding: every answer is valid (checked here against the schema again), re-asked, or named
/// in the error file (`invalid_answer`, `answer_truncated`); the same lines without the format
/// give no JSON at all (the random model's word pieces), so the constraint came from the
/// schema. Prints the counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real llama.cpp server: scripts/llama-server.sh, then OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 and --ignored"]
async fn real_llama_cpp_server_answers_to_a_json_schema() {
    use serde_json::json;
    let _turn = ONE_AT_A_TIME.lock().await;
    let max_tokens: u64 = std::env::var("OLLAMA_BATCH_LLAMA_MAX_TOKENS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    // llama.cpp builds the grammar from the chat template's generation prompt: with the tiny
    // model (no ChatML special tokens in its vocabulary) the chat endpoint refuses every
    // grammar ("Failed to initialize samplers"). Said and skipped, never passed.
    let probe: Value = crate::support::http()
        .build()
        .expect("client")
        .post(format!("{}/v1/chat/completions", real_url()))
        .json(
            &json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}],
                      "response_format": {"type": "json_object"}}),
        )
        .send()
        .await
        .expect("the real server answers")
        .json()
        .await
        .unwrap_or_default();
    if let Some(e) = probe["error"]["message"].as_str() {
        println!(
            "skipped: this llama-server cannot constrain chat answers with its model ({e}); serve the Gemma 3 model instead (../shared/models/README.md): MODEL=gemma-3-270m-q4_k_m.gguf scripts/llama-server.sh --swa-full --chat-template-file scripts/gemma3-base-template.jinja"
        );
        return;
    }
    let (_dir, server) = on_the_real_server(|_| {}).await;
    let api = Api::new(&server.base);
    let schema = json!({"type": "object", "required": ["score", "recommendation", "reasoning"],
        "additionalProperties": false,
        "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                       "recommendation": {"enum": ["Strong Yes", "Yes", "Maybe", "No", "Strong No"]},
                       "reasoning": {"type": "string", "maxLength": 60}}});
    let n = 40;
    let file = |with_schema: bool| {
        let mut s = String::new();
        for i in 1..=n {
            let mut body = json!({"model": "tiny", "max_tokens": max_tokens, "messages": [
                {"role": "system", "content": "Score the candidate from 1 to 10. Answer in JSON."},
                {"role": "user", "content": format!("candidate {i}: ten years of Rust")}]});
            if with_schema {
                body["response_format"] = json!({"type": "json_schema",
                    "json_schema": {"name": "answer", "strict": true, "schema": schema}});
            }
            s.push_str(
                &json!({"custom_id": format!("c-{i}"), "method": "POST",
                "url": "/v1/chat/completions", "body": body})
                .to_string(),
            );
            s.push('\n');
        }
        s.into_bytes()
    };
    let done = api
        .run_file(file(true), "/v1/chat/completions", Duration::from_secs(300))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let out = api.lines(&done["output_file_id"]).await;
    let errors = api.lines(&done["error_file_id"]).await;
    crate::support::assert_exactly_once(out.iter().chain(&errors), crate::support::ids(n));
    let validator = ollama_batch::answer::compile(&schema).expect("schema");
    for l in &out {
        let text = l["response"]["body"]["choices"][0]["message"]["content"]
            .as_str()
            .expect("content");
        let v: Value = serde_json::from_str(text).expect("an output answer is bare JSON");
        assert!(validator.is_valid(&v), "{text}");
    }
    for e in &errors {
        assert!(
            matches!(
                e["error"]["code"].as_str(),
                Some("invalid_answer" | "answer_truncated")
            ),
            "{e}"
        );
    }
    let (_, status) = api.get("/status").await;
    let a = &status["counters"]["answers"];
    println!(
        "json_schema on llama.cpp, max_tokens {max_tokens}: {n} lines, {} valid, {} re-asks, {} invalid_answer, {} answer_truncated ({} checked, {} fenced)",
        out.len(),
        a["reasks"],
        a["invalid"],
        a["truncated"],
        a["checked"],
        a["fenced"]
    );
    assert_eq!(a["checked"].as_u64(), Some(n as u64), "{a}");
    assert_eq!(
        a["invalid"].as_u64().unwrap_or(0) + a["truncated"].as_u64().unwrap_or(0),
        errors.len() as u64
    );
    // The control: without the format the model's answers are not JSON.
    let plain = api
        .run_file(
            file(false),
            "/v1/chat/completions",
            Duration::from_secs(300),
        )
        .await;
    let plain_out = api.lines(&plain["output_file_id"]).await;
    let json_answers = plain_out
        .iter()
        .filter(|l| {
            l["response"]["body"]["choices"][0]["message"]["content"]
                .as_str()
                .and_then(|t| serde_json::from_str::<Value>(t).ok())
                .is_some_and(|v| validator.is_valid(&v))
        })
        .count();
    println!(
        "without the format: {json_answers} of {} answers valid",
        plain_out.len()
    );
    assert_eq!(
        json_answers, 0,
        "the schema, not chance, made the answers valid"
    );
}

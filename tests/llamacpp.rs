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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs a real llama.cpp server: scripts/llama-server.sh, then OLLAMA_BATCH_LLAMA_URL=http://127.0.0.1:18080 and --ignored"]
async fn real_llama_cpp_server_runs_a_batch() {
    let url = std::env::var("OLLAMA_BATCH_LLAMA_URL")
        .expect("set OLLAMA_BATCH_LLAMA_URL to a running llama-server (scripts/llama-server.sh)");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &url);
    cfg.concurrency = 4;
    cfg.request_timeout = Duration::from_secs(60);
    let mut server = TestServer::start(cfg).await;
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

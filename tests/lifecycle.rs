//! The whole lifecycle, run as one conformance suite against an Ollama-shaped and an
//! OpenAI-shaped backend.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, chat_file, server_with};
use crate::support::{assert_exactly_once, ids};
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::Duration;

const BATCH_FIELDS: &[&str] = &[
    "id",
    "object",
    "endpoint",
    "errors",
    "input_file_id",
    "completion_window",
    "status",
    "output_file_id",
    "error_file_id",
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
    "request_counts",
    "metadata",
    "model",
    "usage",
];

async fn chat_batch_completes_with_each_answer_on_its_own_line(shape: Shape) {
    let fake = Fake::start(shape).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.model_map
            .insert("gpt-4o-mini".into(), "gemma3:12b".into());
        cfg.num_ctx = Some(8192);
    })
    .await;
    let api = Api::new(&server.base);

    let system = "Score the candidate against this rubric. ".repeat(30);
    let n = 60;
    let (status, file) = api
        .upload("in.jsonl", chat_file(n, "gpt-4o-mini", &system), "batch")
        .await;
    assert_eq!(status, 200, "{file}");
    assert_eq!(file["object"], "file");
    assert_eq!(file["purpose"], "batch");
    assert_eq!(file["status"], "processed");
    let file_id = file["id"].as_str().expect("file id");

    let created = api.create_batch(file_id, "/v1/chat/completions").await;
    for f in BATCH_FIELDS {
        assert!(created.get(*f).is_some(), "field {f} missing: {created}");
    }
    assert_eq!(created["status"], "validating");
    assert_eq!(created["expires_at"], Value::Null, "no --expire: no expiry");

    let done = api
        .wait_terminal(created["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
    );
    assert_eq!(done["error_file_id"], Value::Null);
    assert_eq!(done["model"], "gemma3:12b");
    assert!(
        done["usage"]["input_tokens"].as_u64().unwrap_or(0) > 0,
        "{done}"
    );
    assert_eq!(done["usage"]["output_tokens"], 3 * n as u64);
    for ts in ["in_progress_at", "finalizing_at", "completed_at"] {
        assert!(done[ts].as_i64().is_some(), "{ts} unset: {done}");
    }

    let lines = api.lines(&done["output_file_id"]).await;
    assert_exactly_once(&lines, ids(n));
    for (i, line) in lines.iter().enumerate() {
        let cid = line["custom_id"].as_str().expect("custom_id");
        assert_eq!(cid, format!("c-{}", i + 1), "written in input order");
        assert_eq!(line["response"]["status_code"], 200);
        assert_eq!(line["error"], Value::Null);
        assert!(line["id"].as_str().expect("id").starts_with("batch_req_"));
        assert!(
            line["response"]["request_id"]
                .as_str()
                .expect("rid")
                .starts_with("req_")
        );
        let body = &line["response"]["body"];
        assert_eq!(body["object"], "chat.completion");
        assert_eq!(
            body["choices"][0]["message"]["content"],
            format!("echo:score {cid}"),
            "answer belongs to its own request"
        );
    }
    let (_, out_file) = api
        .get(&format!(
            "/v1/files/{}",
            done["output_file_id"].as_str().expect("id")
        ))
        .await;
    assert_eq!(out_file["purpose"], "batch_output");

    // What the backend received: the mapped model, the shared system prompt restored whole,
    // and for Ollama the native options that keep the model loaded and never truncate.
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    assert_eq!(bodies.len(), n);
    for b in &bodies {
        assert_eq!(b["model"], "gemma3:12b");
        assert_eq!(b["messages"][0]["content"], system);
        if shape == Shape::Ollama {
            assert_eq!(b["stream"], false);
            assert_eq!(b["truncate"], false);
            assert_eq!(b["keep_alive"], -1);
            assert_eq!(b["options"]["num_ctx"], 8192);
            assert_eq!(b["options"]["num_predict"], 8);
        } else {
            assert_eq!(b["max_tokens"], 8);
        }
    }
    // The shared system prompt is stored once; the finished batch is in the operator's view.
    // The supervisor lets go of a batch just after the finalizer recorded it completed: poll.
    let status = api
        .wait_status(Duration::from_secs(10), "the finished batch let go", |s| {
            s["batches"] == json!([])
        })
        .await;
    assert_eq!(status["shared_contents"], 1, "{status}");
    assert_eq!(
        status["finished"],
        json!({"batches": {"completed": 1}, "requests": {"succeeded": n, "failed": 0}}),
        "{status}"
    );
    assert_eq!(status["batches"], json!([]), "{status}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_chat_batch_completes_with_each_answer_on_its_own_line() {
    chat_batch_completes_with_each_answer_on_its_own_line(Shape::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_chat_batch_completes_with_each_answer_on_its_own_line() {
    chat_batch_completes_with_each_answer_on_its_own_line(Shape::OpenAi).await;
}

/// A small batch on `endpoint`; `line_body(i)` is line i's body; `check(i, answer)` checks the
/// i-th answer.
async fn endpoint_batch_completes(
    shape: Shape,
    endpoint: &str,
    line_body: impl Fn(usize) -> Value,
    check: impl Fn(usize, &Value),
) {
    let fake = Fake::start(shape).await;
    let (_dir, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let jsonl: String = (1..=4)
        .map(|i| {
            json!({"custom_id": format!("x-{i}"), "method": "POST", "url": endpoint,
                   "body": line_body(i)})
            .to_string()
                + "\n"
        })
        .collect();
    let done = api
        .run_file(jsonl.into_bytes(), endpoint, Duration::from_secs(20))
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    let lines = api.lines(&done["output_file_id"]).await;
    assert_eq!(lines.len(), 4);
    for (i, l) in lines.iter().enumerate() {
        check(i + 1, &l["response"]["body"]);
    }
    server.stop().await;
}

async fn embeddings_batch_completes(shape: Shape) {
    endpoint_batch_completes(
        shape,
        "/v1/embeddings",
        |i| json!({"model": "nomic-embed-text", "input": format!("text {i}")}),
        |_, body| {
            assert_eq!(body["object"], "list");
            assert_eq!(body["data"][0]["object"], "embedding");
            assert!(body["data"][0]["embedding"].is_array());
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_embeddings_batch_completes() {
    embeddings_batch_completes(Shape::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_embeddings_batch_completes() {
    embeddings_batch_completes(Shape::OpenAi).await;
}

async fn completions_batch_completes(shape: Shape) {
    endpoint_batch_completes(
        shape,
        "/v1/completions",
        |i| json!({"model": "m", "prompt": format!("prompt {i}"), "max_tokens": 4}),
        |i, body| {
            assert_eq!(body["object"], "text_completion");
            assert_eq!(body["choices"][0]["text"], format!("echo:prompt {i}"));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_completions_batch_completes() {
    completions_batch_completes(Shape::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_completions_batch_completes() {
    completions_batch_completes(Shape::OpenAi).await;
}

async fn backend_errors_land_in_the_error_file(shape: Shape) {
    let fake = Fake::start(shape).await;
    fake.set(|b| b.fail_all = Some((404, "model \"nope\" not found, try pulling it first".into())));
    let (_dir, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let done = api.run_chat(4, "nope", Duration::from_secs(20)).await;
    assert_eq!(
        done["status"], "completed",
        "an all-failed batch still completes"
    );
    assert_eq!(done["output_file_id"], Value::Null);
    assert_eq!(
        done["request_counts"],
        json!({"total": 4, "completed": 0, "failed": 4})
    );
    let errs = api.lines(&done["error_file_id"]).await;
    assert_eq!(errs.len(), 4);
    for e in &errs {
        assert_eq!(e["response"]["status_code"], 404);
        assert!(
            e["response"]["body"]["error"]["message"]
                .as_str()
                .expect("message")
                .contains("not found")
        );
        assert_eq!(e["error"], Value::Null);
    }
    assert_eq!(
        fake.total_calls(),
        4,
        "a 404 model is permanent: no retries"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_backend_errors_land_in_the_error_file() {
    backend_errors_land_in_the_error_file(Shape::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_backend_errors_land_in_the_error_file() {
    backend_errors_land_in_the_error_file(Shape::OpenAi).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_run_first_come_first_served() {
    let concurrency = 2;
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(2));
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.concurrency = concurrency;
    })
    .await;
    let api = Api::new(&server.base);
    let file_of = |prefix: &str| {
        (1..=30)
            .map(|i| crate::support::chat_line(&format!("{prefix}-{i}"), "m", "s") + "\n")
            .collect::<String>()
            .into_bytes()
    };
    // Hold the backend so that both batches are queued, with all of a's lines still to run,
    // before anything is answered: the order below is then the supervisor's choice alone.
    fake.hold();
    let a_id = api.submit_id(file_of("a"), "/v1/chat/completions").await;
    api.wait_in_progress(&a_id, Duration::from_secs(30)).await;
    let b_id = api.submit_id(file_of("b"), "/v1/chat/completions").await;
    api.wait_in_progress(&b_id, Duration::from_secs(30)).await;
    let (_, a_now) = api.get(&format!("/v1/batches/{a_id}")).await;
    assert_eq!(a_now["request_counts"]["completed"], 0, "{a_now}");
    fake.release();
    for id in [&a_id, &b_id] {
        let done = api.wait_terminal(id, Duration::from_secs(30)).await;
        assert_eq!(done["status"], "completed", "{done}");
    }
    let order = fake.stats.order.lock().expect("lock").clone();
    assert_eq!(order.len(), 60);
    let first_b = order
        .iter()
        .position(|u| u.starts_with("score b-"))
        .expect("b ran");
    // Lines are leased oldest batch first, one call per free slot. The first line of b takes
    // a slot only once no line of a is waiting, so at most the calls already in flight
    // (concurrency - 1 besides it) can reach the backend after it.
    let a_after_b = order[first_b..]
        .iter()
        .filter(|u| u.starts_with("score a-"))
        .count();
    assert!(
        a_after_b < concurrency,
        "{a_after_b} lines of the first batch reached the backend after the second batch started: {order:?}"
    );
    server.stop().await;
}

//! One model at a time per backend: batches of two models created together run model by
//! model (a switch per model run, each with the old model released), and another model's batch
//! starts once it has waited `--model-switch-wait`.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, chat_file, server_with, until_some};
use serde_json::Value;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The models of the calls the fake answered, in order.
fn models_called(fake: &Fake) -> Vec<String> {
    fake.stats
        .bodies
        .lock()
        .expect("lock")
        .iter()
        .map(|b| b["model"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn changes(models: &[String]) -> usize {
    models.windows(2).filter(|w| w[0] != w[1]).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn interleaved_batches_of_two_models_run_model_by_model() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| b.delay = Duration::from_millis(5));
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.concurrency = 4;
        cfg.backends = vec![(cfg.backend_url.clone(), None)];
    })
    .await;
    let api = Api::new(&server.base);
    let mut ids = Vec::new();
    for model in ["gemma3:12b", "llama3.2:3b", "gemma3:12b", "llama3.2:3b"] {
        let b = api
            .submit(chat_file(60, model, "s"), "/v1/chat/completions")
            .await;
        ids.push(b["id"].as_str().expect("id").to_string());
    }
    for id in &ids {
        let done = api.wait_terminal(id, Duration::from_secs(60)).await;
        assert_eq!(done["request_counts"]["completed"], 60, "{done}");
    }
    let called = models_called(&fake);
    assert_eq!(called.len(), 240);
    let n = changes(&called);
    let (_, status) = api.get("/status").await;
    println!(
        "model changes seen by the backend: {n}; unloads {:?}",
        fake.stats.unloads.lock().expect("lock")
    );
    assert!(
        n <= 3,
        "at most one switch per model run, A B A B at worst: {n}"
    );
    assert_eq!(
        status["counters"]["model_switches"].as_u64(),
        Some(n as u64),
        "{status}"
    );
    // Each switch released the model it left (Ollama keep_alive 0).
    let unloads = fake.stats.unloads.lock().expect("lock").clone();
    assert_eq!(unloads.len(), n, "{unloads:?}");
    let mut from = called[0].clone();
    let mut left = Vec::new();
    for m in &called {
        if *m != from {
            left.push(from.clone());
            from = m.clone();
        }
    }
    assert_eq!(unloads, left);
    assert_eq!(
        status["backends"][0]["model"].as_str(),
        called.last().map(String::as_str)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_models_batch_starts_after_the_switch_wait() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.keep_bodies.store(true, Ordering::SeqCst);
    fake.set(|b| b.delay = Duration::from_millis(25));
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.concurrency = 2;
        cfg.backends = vec![(cfg.backend_url.clone(), None)];
        cfg.model_switch_wait = Duration::from_secs(1);
    })
    .await;
    let api = Api::new(&server.base);
    // A long batch of one model (about 6 s at 2 × 25 ms a call)…
    let a = api
        .submit(chat_file(500, "gemma3:12b", "s"), "/v1/chat/completions")
        .await;
    let a = a["id"].as_str().expect("id").to_string();
    until_some("A runs", Duration::from_secs(20), || {
        let fake = &fake;
        async move { (fake.total_calls() > 10).then_some(()) }
    })
    .await;
    // …and a short one of another model.
    let b = api
        .submit(chat_file(5, "llama3.2:3b", "s"), "/v1/chat/completions")
        .await;
    let b = b["id"].as_str().expect("id").to_string();
    api.wait_in_progress(&b, Duration::from_secs(10)).await;
    let ready = Instant::now();
    until_some("B's first call", Duration::from_secs(20), || {
        let fake = &fake;
        async move {
            models_called(fake)
                .iter()
                .any(|m| m == "llama3.2:3b")
                .then_some(())
        }
    })
    .await;
    let waited = ready.elapsed();
    let done_b = api.wait_terminal(&b, Duration::from_secs(20)).await;
    assert_eq!(done_b["request_counts"]["completed"], 5);
    let (_, a_now) = api.get(&format!("/v1/batches/{a}")).await;
    println!(
        "B waited {waited:?} for the switch; A at {}",
        a_now["request_counts"]
    );
    assert!(
        waited >= Duration::from_millis(900),
        "B waited the switch wait: {waited:?}"
    );
    assert!(
        waited < Duration::from_secs(5),
        "and not for A's end: {waited:?}"
    );
    assert_eq!(
        a_now["status"], "in_progress",
        "B ran before A finished: {a_now}"
    );
    let done_a = api.wait_terminal(&a, Duration::from_secs(60)).await;
    assert_eq!(done_a["request_counts"]["completed"], 500);
    let called = models_called(&fake);
    assert_eq!(changes(&called), 2, "A, B, A");
    let _: Value = done_a;
}

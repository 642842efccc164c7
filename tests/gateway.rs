//! A gateway that pushes back: it takes 4 calls at once and answers 429 (with `Retry-After`)
//! beyond them. Every line succeeds with `--max-attempts 3` (a 429 spends no attempt), the
//! concurrency limit settles near 4, and 429s stay at most 10 % of the calls.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, chat_file, metric, server_with};
use std::sync::atomic::Ordering;
use std::time::Duration;

async fn through_a_full_gateway(retry_after: Option<u64>) {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| {
        b.gateway = Some((4, retry_after));
        b.delay = Duration::from_millis(10);
    });
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.concurrency = 16;
        cfg.backends = vec![(cfg.backend_url.clone(), None)];
        cfg.retry.max_attempts = 3;
        // Without Retry-After the line waits the first retry's ceiling.
        cfg.retry.initial = Duration::from_millis(200);
        cfg.retry.max = Duration::from_secs(2);
    })
    .await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(
            chat_file(800, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(120),
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        (
            done["request_counts"]["completed"].as_u64(),
            done["request_counts"]["failed"].as_u64()
        ),
        (Some(800), Some(0)),
        "every line succeeds: {done}"
    );
    let calls = fake.total_calls();
    let too_many = fake.stats.too_many.load(Ordering::SeqCst);
    let (_, status) = api.get("/status").await;
    let limit = status["backends"][0]["concurrency_limit"]
        .as_u64()
        .unwrap_or(0);
    println!(
        "gateway (Retry-After {retry_after:?}): {calls} calls, {too_many} answered 429 ({:.1} %), concurrency limit at the end {limit}, deferred {}",
        100.0 * too_many as f64 / calls as f64,
        status["counters"]["deferred"]
    );
    assert!(too_many > 0, "the gateway pushed back");
    assert!(
        too_many * 10 <= calls,
        "429s at most 10 % of calls: {too_many} of {calls}"
    );
    assert!(
        (2..=6).contains(&limit),
        "the limit settles near the gateway's 4: {limit}"
    );
    assert_eq!(status["counters"]["deferred"].as_u64(), Some(too_many));
    assert_eq!(
        metric(&api.metrics().await, "obatch_requests_deferred_total", &[]),
        Some(too_many as f64)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_answers_429_with_retry_after_gets_every_line() {
    through_a_full_gateway(Some(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_that_answers_429_without_retry_after_gets_every_line() {
    through_a_full_gateway(None).await;
}

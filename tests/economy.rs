//! The token economy: slot-affine scheduling against a fake llama.cpp whose slots each keep a
//! prompt cache (a call reuses the prefix it shares with the slot's last prompt), over real
//! HTTP.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, TestServer, config};
use ollama_batch::config::{BackendKind, SlotAffinity};
use ollama_batch::schedule::Policy;
use serde_json::{Value, json};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A rubric of about 2,000 characters for group `g` (groups differ from the first character).
fn rubric(g: usize) -> String {
    let mut s = format!("{g} Rubric number {g}. ");
    while s.len() < 2000 {
        s.push_str(&format!("Criterion {g}-{}: judge carefully. ", s.len()));
    }
    s
}

/// `per_group` lines for each of `groups` rubrics, shuffled (seeded): (file, the lines' texts
/// as the fake sees them).
fn shuffled(groups: usize, per_group: usize, seed: u64) -> (Vec<u8>, Vec<(usize, String)>) {
    let mut lines: Vec<(usize, String)> = (0..groups)
        .flat_map(|g| {
            (0..per_group).map(move |i| (g, format!("Candidate {g}/{i}: profile text here.")))
        })
        .collect();
    fastrand::Rng::with_seed(seed).shuffle(&mut lines);
    let mut file = String::new();
    for (n, (g, user)) in lines.iter().enumerate() {
        let v = json!({"custom_id": format!("l{n}"), "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": "m", "max_tokens": 4, "messages": [
                {"role": "system", "content": rubric(*g)}, {"role": "user", "content": user}]}});
        file.push_str(&format!("{v}\n"));
    }
    (file.into_bytes(), lines)
}

/// The fake's prompt text of a line (as it tokenizes it: 4 characters a token).
fn text(g: usize, user: &str) -> String {
    format!("system:{}\nuser:{user}\n", rubric(g))
}

/// The least any scheduler can prefill: every group's shared prefix once, and every line's own
/// part.
fn minimum(lines: &[(usize, String)], groups: usize) -> u64 {
    let prefix = |g: usize| format!("system:{}\nuser:", rubric(g));
    let own: u64 = lines
        .iter()
        .map(|(g, u)| (text(*g, u).len() - prefix(*g).len()) as u64 / 4)
        .sum();
    own + (0..groups).map(|g| prefix(g).len() as u64 / 4).sum::<u64>()
}

/// Runs `file` on a fresh server with `policy` against a fresh fake with 4 cached slots;
/// returns (tokens prefilled, calls that named a slot, the batch at the end).
async fn run(file: Vec<u8>, policy: Policy, affinity: SlotAffinity) -> (u64, u64, Value) {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| {
        b.slot_cache = Some(4);
        b.delay = Duration::from_millis(2);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &fake.url());
    cfg.concurrency = 4;
    cfg.scheduling = policy;
    cfg.slot_affinity = affinity;
    let mut server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(file, "/v1/chat/completions", Duration::from_secs(120))
        .await;
    server.stop().await;
    (
        fake.stats.prefilled.load(Ordering::SeqCst),
        fake.stats.pinned.load(Ordering::SeqCst),
        done,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_shuffled_groups_prefill_near_the_minimum_and_far_below_input_order() {
    let (file, lines) = shuffled(8, 40, 7);
    let min = minimum(&lines, 8);
    let (affine, pinned, done) = run(file.clone(), Policy::Affine, SlotAffinity::Auto).await;
    assert_eq!(done["request_counts"]["completed"], 320, "{done}");
    assert_eq!(
        pinned, 320,
        "every call named its slot (/props said 4 slots)"
    );
    let (fifo, unpinned, _) = run(file, Policy::Fifo, SlotAffinity::Off).await;
    assert_eq!(unpinned, 0);
    println!("prefilled: minimum {min}, slot-affine {affine}, input order {fifo}");
    assert!(
        affine as f64 <= 1.2 * min as f64,
        "slot-affine prefilled {affine}, the minimum is {min}"
    );
    assert!(
        fifo >= 3 * affine,
        "input order prefilled {fifo}, slot-affine {affine}"
    );
    // The batch's usage says how much came from the cache.
    let cached = done["usage"]["input_tokens_details"]["cached_tokens"]
        .as_u64()
        .expect("cached tokens");
    let input = done["usage"]["input_tokens"]
        .as_u64()
        .expect("input tokens");
    assert_eq!(
        input - cached,
        affine,
        "the batch's figures are the backend's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_group_prefills_its_prefix_once_per_slot() {
    let (file, lines) = shuffled(1, 200, 1);
    let min = minimum(&lines, 1);
    let prefix = format!("system:{}\nuser:", rubric(0)).len() as u64 / 4;
    let (affine, _, done) = run(file, Policy::Affine, SlotAffinity::Auto).await;
    assert_eq!(done["request_counts"]["completed"], 200, "{done}");
    // Each of the 4 slots prefills the rubric once: at most 3 more than the minimum.
    assert!(
        affine <= min + 3 * prefix,
        "prefilled {affine}, minimum {min}, prefix {prefix}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_batch_behind_a_large_one_finishes_while_the_large_one_runs() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| {
        b.slot_cache = Some(4);
        b.delay = Duration::from_millis(5);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &fake.url());
    cfg.concurrency = 4;
    cfg.group_wait_max = Duration::from_millis(300);
    let mut server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let (large, _) = shuffled(2, 1000, 3);
    let large_id = api.submit_id(large, "/v1/chat/completions").await;
    api.wait_in_progress(&large_id, Duration::from_secs(60))
        .await;
    let (small, _) = shuffled(1, 10, 4);
    let started = Instant::now();
    let small_id = api.submit_id(small, "/v1/chat/completions").await;
    let small_done = api
        .wait_completed(&small_id, 10, Duration::from_secs(60))
        .await;
    let (_, large_now) = api.get(&format!("/v1/batches/{large_id}")).await;
    assert_eq!(
        large_now["status"],
        "in_progress",
        "the small batch finished in {:?}, before the large one: {small_done}",
        started.elapsed()
    );
    let done = large_now["request_counts"]["completed"]
        .as_u64()
        .unwrap_or(0);
    assert!(done < 2000, "{large_now}");
    api.wait_completed(&large_id, 2000, Duration::from_secs(120))
        .await;
    server.stop().await;
}

/// Issue 18: the affine policy ran a batch of fewer than ~16 lines on one slot while the others
/// idled (a retry batch is exactly that). A group that small gains nothing from one slot's
/// cache: its lines now spread over the idle slots. 4 lines of 2 s on 4 slots: all four are
/// sent at once, and the batch takes about 2 s (it took about 8 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_small_batch_spreads_over_the_idle_slots() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| {
        b.slot_cache = Some(4);
        b.delay = Duration::from_secs(2);
    });
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = config(dir.path(), BackendKind::Openai, &fake.url());
    cfg.concurrency = 4;
    let mut server = TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let (small, _) = shuffled(1, 4, 7);
    let started = Instant::now();
    let id = api.submit_id(small, "/v1/chat/completions").await;
    // All four calls arrive while the first is still running.
    crate::support::until(
        "4 calls in flight at once",
        Duration::from_millis(1900),
        || fake.total_calls() >= 4,
    )
    .await;
    let done = api.wait_completed(&id, 4, Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 4, "{done}");
    println!(
        "small batch: 4 lines of 2 s on 4 slots took {:.1} s",
        started.elapsed().as_secs_f64()
    );
    server.stop().await;
}

//! Faults of the model server (out-of-memory, hangs, resets, busy answers, outages, timeouts)
//! and of the disk the output files go to.

use crate::support::fake::{Fake, Shape};
use crate::support::until;
use crate::support::{Api, chat_file, server_with};
use crate::support::{assert_exactly_once, ids};
use ollama_batch::domain::{BatchId, RequestState};
use ollama_batch::store::Store;
use serde_json::{Value, json};
use std::time::Duration;

fn assert_all_answered(lines: &[Value], n: usize) {
    assert_exactly_once(lines, ids(n));
    for l in lines {
        let cid = l["custom_id"].as_str().expect("cid");
        assert_eq!(
            l["response"]["body"]["choices"][0]["message"]["content"],
            format!("echo:score {cid}")
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oom_hangs_resets_and_busy_answers_still_complete_every_line() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| {
        b.oom_first = 2;
        b.hang_permille = 50;
        b.reset_permille = 50;
        b.busy_permille = 50;
    });
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.concurrency = 8;
        // Hangs end by this timeout; answered calls (the fake answers at once) stay far
        // below it even on a loaded machine, so the retry count below is exact.
        cfg.request_timeout = Duration::from_millis(400);
    })
    .await;
    let api = Api::new(&server.base);
    let n = 2000;
    let done = api.run_chat(n, "m", Duration::from_secs(240)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
    );
    assert_eq!(done["error_file_id"], Value::Null);
    assert_all_answered(&api.lines(&done["output_file_id"]).await, n);
    // Every kind of fault was really served, and the server saw each one.
    let served = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::SeqCst);
    let st = &fake.stats;
    let (ooms, hangs, resets, busy) = (
        served(&st.ooms),
        served(&st.hangs),
        served(&st.resets),
        served(&st.busy),
    );
    println!("faults served: oom {ooms}, hang {hangs}, reset {resets}, busy {busy}");
    assert_eq!(ooms, 2 * n as u64);
    assert!(hangs > 0 && resets > 0 && busy > 0);
    let (_, status) = api.get("/status").await;
    let c = &status["counters"];
    assert_eq!(c["oom"], ooms, "{status}");
    assert!(c["timeouts"].as_u64().unwrap_or(0) >= hangs, "{status}");
    // Every fault cost exactly one retry and nothing else did (no line ran out of attempts);
    // a busy 503 is no failure of the line: deferred, without spending an attempt.
    assert_eq!(c["retries"], ooms + hangs + resets, "{status}");
    assert_eq!(c["deferred"], busy, "{status}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_memory_lowers_concurrency() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| {
        b.fail_all = Some((500, "CUDA error: out of memory".into()));
        b.delay = Duration::from_millis(20);
    });
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.concurrency = 8;
        cfg.retry.max_attempts = 3;
    })
    .await;
    let api = Api::new(&server.base);
    let done = api.run_chat(20, "m", Duration::from_secs(60)).await;
    assert_eq!(done["request_counts"]["failed"], 20);
    let errs = api.lines(&done["error_file_id"]).await;
    assert_eq!(
        errs[0]["response"]["status_code"], 500,
        "the backend's answer is kept"
    );
    let (_, status) = api.get("/status").await;
    assert_eq!(status["concurrency"]["max"], 8);
    assert_eq!(status["concurrency"]["current"], 1, "{status}");
    assert_eq!(status["counters"]["oom"], 60);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exhausted_timeouts_say_request_timeout_and_the_attempt_count() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.hang_permille = 1000);
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.request_timeout = Duration::from_millis(100);
        cfg.retry.max_attempts = 2;
    })
    .await;
    let api = Api::new(&server.base);
    let done = api.run_chat(3, "m", Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed");
    assert_eq!(done["output_file_id"], Value::Null);
    let errs = api.lines(&done["error_file_id"]).await;
    assert_eq!(errs.len(), 3);
    for e in &errs {
        assert_eq!(e["response"], Value::Null);
        assert_eq!(e["error"]["code"], "request_timeout");
        let msg = e["error"]["message"].as_str().expect("message");
        assert!(msg.contains("attempt 2 of 2"), "{msg}");
    }
    assert_eq!(fake.calls_of("score c-1"), 2);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_outage_pauses_dispatch_and_costs_no_attempt() {
    let outage = Duration::from_secs(
        std::env::var("OUTAGE_SECS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(3),
    );
    let fake = Fake::start(Shape::OpenAi).await;
    fake.go_down();
    let (dir, mut server) = server_with(&fake, |cfg| {
        cfg.retry.max_attempts = 1; // any burned attempt would fail a line
    })
    .await;
    let api = Api::new(&server.base);
    let n = 50;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    wait_backend_down(&api).await;
    tokio::time::sleep(outage).await;
    let (_, s) = api.get("/status").await;
    assert!(s["backend"]["next_probe_at"].as_i64().is_some(), "{s}");
    let (_, cur) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(cur["status"], "in_progress");
    assert_eq!(cur["request_counts"]["failed"], 0);
    fake.come_up();
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0})
    );
    let (_, s) = api.get("/status").await;
    assert_eq!(s["counters"]["backend_outages"], 1, "{s}");
    assert_eq!(s["counters"]["retries"], 0, "{s}");
    assert_eq!(s["backend"]["down_since"], Value::Null);
    server.stop().await;
    // Every line was tried exactly once, as far as the store counts.
    for (key, attempts) in attempts_of_succeeded_lines(dir.path(), &id) {
        assert_eq!(attempts, 1, "{key} burned an attempt during the outage");
    }
}

/// Waits until `/status` says the backend is down (and unreachable).
async fn wait_backend_down(api: &Api) {
    let s = api
        .wait_status(Duration::from_secs(10), "showing the outage", |s| {
            s["backend"]["down_since"].is_i64()
        })
        .await;
    assert_eq!(s["backend"]["reachable"], false, "{s}");
}

/// Opens the stopped server's store: each line of the batch, which must have succeeded, with
/// the attempts it took.
fn attempts_of_succeeded_lines(dir: &std::path::Path, batch_id: &str) -> Vec<(String, u32)> {
    let store = Store::open(dir, 8 << 20).expect("open store");
    let batch = BatchId::parse(batch_id).expect("id");
    store
        .batch_requests(batch)
        .map(|item| {
            let (key, rec) = item.expect("record");
            assert_eq!(rec.state, RequestState::Succeeded, "{key}");
            (key.to_string(), rec.attempts)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_crash_mid_run_costs_only_the_calls_in_flight_one_attempt() {
    let concurrency = 4;
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| b.delay = Duration::from_millis(30));
    let (dir, mut server) = server_with(&fake, |cfg| {
        cfg.concurrency = concurrency;
        // The calls cut off by the crash use one; nothing may use a second.
        cfg.retry.max_attempts = 2;
    })
    .await;
    let api = Api::new(&server.base);
    let n = 60;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    api.wait_completed(&id, 8, Duration::from_secs(20)).await;
    fake.go_down(); // the calls it is answering are reset, new connections refused
    wait_backend_down(&api).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (_, cur) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(cur["request_counts"]["failed"], 0, "{cur}");
    fake.come_up();
    let done = api.wait_terminal(&id, Duration::from_secs(60)).await;
    assert_eq!(
        done["request_counts"],
        json!({"total": n, "completed": n, "failed": 0}),
        "{done}"
    );
    assert_all_answered(&api.lines(&done["output_file_id"]).await, n);
    let (_, s) = api.get("/status").await;
    assert_eq!(s["counters"]["backend_outages"], 1, "{s}");
    server.stop().await;
    let mut second_tries = 0;
    for (key, attempts) in attempts_of_succeeded_lines(dir.path(), &id) {
        assert!(attempts <= 2, "{key}: {attempts} attempts");
        if attempts == 2 {
            second_tries += 1;
        }
    }
    // The calls in flight at the crash (always `concurrency` of them: each takes 30 ms) each
    // cost an attempt. Another leased request can lose one by racing the crash on a
    // connection the backend is closing; nothing leased during the outage can.
    let window = 2 * concurrency;
    println!("lines that needed a second try: {second_tries}");
    assert!(
        (concurrency..=window).contains(&second_tries),
        "between {concurrency} and {window} lines (those leased at the crash) try twice: {second_tries}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_batch_keeps_done_lines_and_expires_the_rest() {
    let fake = Fake::start(Shape::OpenAi).await;
    // At concurrency 1 the 60 lines need at least 6 s; the window is 2 s, and
    // the server gives it in full (it expires once `expires_at`, a whole
    // second, has passed), so lines finish within it wherever in a second the
    // batch was created, and the rest expire.
    fake.set(|b| b.delay = Duration::from_millis(100));
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.expire = true;
        cfg.completion_window = Duration::from_secs(2);
        cfg.concurrency = 1;
    })
    .await;
    let api = Api::new(&server.base);
    let n = 60;
    let done = api.run_chat(n, "m", Duration::from_secs(30)).await;
    assert_eq!(done["status"], "expired", "{done}");
    // Expired only after the whole window: past `expires_at`, not at it.
    assert!(
        done["expired_at"].as_i64() > done["expires_at"].as_i64(),
        "{done}"
    );
    assert_eq!(
        done["expires_at"].as_i64(),
        done["created_at"].as_i64().map(|c| c + 2)
    );
    let out = api.lines(&done["output_file_id"]).await;
    let errs = api.lines(&done["error_file_id"]).await;
    assert!(!out.is_empty() && !errs.is_empty(), "{done}");
    assert_exactly_once(out.iter().chain(errs.iter()), ids(n));
    for e in &errs {
        assert_eq!(e["error"]["code"], "batch_expired", "{e}");
    }
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn output_files_that_cannot_be_written_are_retried_without_a_restart() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.hold();
    let (dir, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let n = 10;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    api.wait_in_progress(&id, Duration::from_secs(20)).await;
    // The files directory becomes a plain file: writing the output fails, even for root.
    let files = dir.path().join("files");
    let away = dir.path().join("files.away");
    std::fs::rename(&files, &away).expect("move files away");
    std::fs::write(&files, b"not a directory").expect("block files");
    fake.release();
    let s = api
        .wait_status(
            Duration::from_secs(20),
            "showing a finalization failure",
            |s| s["batches"][0]["finalize_error"].is_string(),
        )
        .await;
    assert_eq!(s["batches"][0]["status"], "finalizing", "{s}");
    println!(
        "finalization failed as arranged: {}",
        s["batches"][0]["finalize_error"]
    );
    let (_, cur) = api.get(&format!("/v1/batches/{id}")).await;
    assert_eq!(cur["status"], "finalizing", "{cur}");
    // The disk is fixed: the same process finishes the batch, every line once.
    std::fs::remove_file(&files).expect("unblock");
    std::fs::rename(&away, &files).expect("move files back");
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["error_file_id"], Value::Null, "{done}");
    assert_all_answered(&api.lines(&done["output_file_id"]).await, n);
    server.stop().await;
}

/// Two backends (`--backend-url A#2 --backend-url B#2`): one queue feeds both; when B goes
/// down its lanes pause alone and A finishes the batch; `/status` lists each backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_backends_share_the_work_and_one_going_down_does_not_stop_the_other() {
    let a = Fake::start(Shape::OpenAi).await;
    let b = Fake::start(Shape::OpenAi).await;
    for f in [&a, &b] {
        f.set(|x| x.delay = Duration::from_millis(5));
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = crate::support::config(
        dir.path(),
        ollama_batch::config::BackendKind::Openai,
        &a.url(),
    );
    cfg.backends = vec![(a.url(), Some(2)), (b.url(), Some(2))];
    let mut server = crate::support::TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let n = 400;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    until("both backends get work", Duration::from_secs(30), || {
        a.total_calls() >= 20 && b.total_calls() >= 20
    })
    .await;
    b.go_down();
    let before = a.total_calls();
    // B is seen down, A is not, and the batch goes on through A.
    let s = api
        .wait_status(Duration::from_secs(30), "B seen down", |s| {
            s["backends"][1]["reachable"] == false
        })
        .await;
    assert_eq!(s["backends"].as_array().map(Vec::len), Some(2), "{s}");
    assert_eq!(s["backends"][1]["url"], b.url());
    assert!(s["backends"][1]["down_since"].is_i64(), "{s}");
    assert!(s["backends"][0]["down_since"].is_null(), "{s}");
    assert_eq!(s["backend"]["reachable"], true, "one backend answers: {s}");
    api.wait_completed(&id, n as u64, Duration::from_secs(60))
        .await;
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert!(a.total_calls() > before, "A went on alone");
    assert_all_answered(&api.lines(&done["output_file_id"]).await, n);
    let (_, s) = api.get("/status").await;
    assert_eq!(s["counters"]["backend_outages"], 1, "{s}");
    // B comes back: a probe notices.
    b.come_up();
    api.wait_status(Duration::from_secs(30), "B seen back", |s| {
        s["backends"][1]["reachable"] == true && s["backends"][1]["down_since"].is_null()
    })
    .await;
    server.stop().await;
}

/// Issue 18, defects 11 and 12 (in part), against the fake Ollama over real HTTP: every
/// generating call says `shift: false` and `truncate: false` (`/api/generate` too), an answer
/// Ollama stopped early (`done: false`) is not a success and is not paid for again, and an
/// out-of-memory in another GPU's words (ROCm's `hipMalloc failed`) is an out-of-memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ollama_calls_never_shift_or_truncate_and_an_unfinished_answer_is_not_a_success() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.keep_bodies
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let (_d, mut server) = server_with(&fake, |c| c.num_ctx = Some(4096)).await;
    let api = Api::new(&server.base);
    let done = api.run_chat(4, "m", Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 4, "{done}");
    let completions: String = (1..=3)
        .map(|i| {
            format!(
                "{}\n",
                json!({"custom_id": format!("g-{i}"), "method": "POST", "url": "/v1/completions",
                       "body": {"model": "m", "prompt": format!("say {i}")}})
            )
        })
        .collect();
    let done = api
        .run_file(
            completions.into_bytes(),
            "/v1/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    let bodies = fake.stats.bodies.lock().expect("lock").clone();
    let generating: Vec<&Value> = bodies
        .iter()
        .filter(|b| b.get("messages").is_some() || b.get("prompt").is_some())
        .collect();
    assert_eq!(generating.len(), 7, "{bodies:?}");
    for b in generating {
        assert_eq!(b["think"], false, "no reasoning asked for: {b}");
        assert_eq!(b["shift"], false, "{b}");
        assert_eq!(b["truncate"], false, "{b}");
        assert_eq!(b["options"]["num_ctx"], 4096, "{b}");
    }

    // Ollama's token-repeat guard: 200, `done: false`, no done_reason, no counts.
    fake.set(|b| {
        b.raw_answer = Some(
            r#"{"model":"m","message":{"role":"assistant","content":"the the the the"},"done":false}"#
                .into(),
        )
    });
    let before = fake.total_calls();
    let done = api.run_chat(2, "m", Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["failed"], 2, "{done}");
    assert_eq!(fake.total_calls() - before, 2, "not sent again");
    for e in api.lines(&done["error_file_id"]).await {
        assert_eq!(e["error"]["code"], "answer_incomplete", "{e}");
    }

    // Another GPU's out-of-memory wording (Ollama's list, llm/status.go): counted as one.
    fake.set(|b| {
        b.raw_answer = None;
        b.oom_first = 1;
        b.oom_message = Some("llama runner process has terminated: hipMalloc failed".into());
    });
    let fresh: String = (1..=3)
        .map(|i| {
            format!(
                "{}\n",
                crate::support::chat_line(&format!("rocm-{i}"), "m", "s")
            )
        })
        .collect();
    let done = api
        .run_file(
            fresh.into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    let (_, status) = api.get("/status").await;
    assert!(
        status["counters"]["oom"].as_u64() >= Some(1),
        "{}",
        status["counters"]
    );

    // A runner that died, answered by /api/embed with 400: retried, not a failed line.
    fake.set(|b| {
        b.oom_first = 1;
        b.oom_status = Some(400);
        b.oom_message = Some("llama-server process has terminated: exit status 2".into());
    });
    let embed: String = (1..=3)
        .map(|i| {
            format!(
                "{}\n",
                json!({"custom_id": format!("e-{i}"), "method": "POST", "url": "/v1/embeddings",
                       "body": {"model": "m", "input": format!("text {i}")}})
            )
        })
        .collect();
    let done = api
        .run_file(
            embed.into_bytes(),
            "/v1/embeddings",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    server.stop().await;
}

/// Issue 18, defect 6: a backend that answers 200 with garbage (an HTML page from a
/// misconfigured proxy) passed the probe and the model check; beside a good backend about
/// 20 % of lines failed while `/status` showed both reachable with no error. Now its answers
/// pause it like an unreachable backend (its probe, which wants the model list, keeps it
/// paused), its lines go to the good one without spending attempts, and `/status` and
/// `/metrics` say which backend is down and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_answers_garbage_is_paused_and_the_other_does_the_work() {
    let good = Fake::start(Shape::OpenAi).await;
    let bad = Fake::start(Shape::OpenAi).await;
    good.set(|b| b.delay = Duration::from_millis(5));
    bad.set(|b| b.html = true);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = crate::support::config(
        dir.path(),
        ollama_batch::config::BackendKind::Openai,
        &good.url(),
    );
    cfg.backends = vec![(good.url(), Some(2)), (bad.url(), Some(2))];
    cfg.retry.max_attempts = 3;
    let mut server = crate::support::TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let n = 200;
    let done = api
        .run_file(
            chat_file(n, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(60),
        )
        .await;
    assert_eq!(done["request_counts"]["completed"], n as u64, "{done}");
    assert_eq!(done["request_counts"]["failed"], 0, "{done}");
    assert_all_answered(&api.lines(&done["output_file_id"]).await, n);
    assert!(
        bad.total_calls() < 20,
        "the bad backend got {} calls",
        bad.total_calls()
    );
    let (_, s) = api.get("/status").await;
    let b = &s["backends"][1];
    assert_eq!(b["url"], bad.url());
    assert_eq!(b["reachable"], false, "{s}");
    assert!(b["down_since"].is_i64(), "{s}");
    assert!(
        b["last_error"].as_str().is_some_and(|e| e.contains("not API answers")
            || e.contains("not with its model list")),
        "{s}"
    );
    assert_eq!(s["backends"][0]["reachable"], true, "{s}");
    let (_, m) = api.get_text("/metrics").await;
    assert!(
        m.contains(&format!("obatch_backend_up{{backend=\"{}\"}} 0", bad.url())),
        "{m}"
    );
    assert!(
        m.contains(&format!(
            "obatch_backend_up{{backend=\"{}\"}} 1",
            good.url()
        )),
        "{m}"
    );
    server.stop().await;
}

/// Credentials in a backend URL reach the backend and appear nowhere else: not in `/status`,
/// `/metrics`, the dashboard's data or an error message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_credentials_are_never_shown() {
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let with = fake.url().replace("http://", "http://operator:s3cret-pw@");
    let cfg = crate::support::config(dir.path(), ollama_batch::config::BackendKind::Openai, &with);
    let mut server = crate::support::TestServer::start(cfg).await;
    let api = Api::new(&server.base);
    let done = api.run_chat(3, "m", Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    fake.go_down();
    let _ = api
        .submit_id(chat_file(2, "m", "s"), "/v1/chat/completions")
        .await;
    let s = api
        .wait_status(Duration::from_secs(30), "the backend seen down", |s| {
            s["backend"]["reachable"] == false
        })
        .await;
    let (_, m) = api.get_text("/metrics").await;
    for shown in [s.to_string(), m] {
        assert!(!shown.contains("s3cret-pw"), "{shown}");
        assert!(!shown.contains("operator"), "{shown}");
    }
    assert_eq!(s["backends"][0]["url"], fake.url());
    fake.come_up();
    server.stop().await;
}

/// Issue 18, defect 12 (the warm-up): a cold model that takes longer to load than
/// --request-timeout never loaded, because Ollama abandons a load whose client left and every
/// call timed out. Now the first call of a model waits for one load call under --load-timeout,
/// the other lanes wait with it, and the batch runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_slower_to_load_than_a_call_is_loaded_once_before_the_calls() {
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| b.load_time = Some(Duration::from_secs(3)));
    let (_d, mut server) = server_with(&fake, |c| {
        c.concurrency = 2;
        c.request_timeout = Duration::from_secs(1);
        c.retry.max_attempts = 2;
    })
    .await;
    let api = Api::new(&server.base);
    let done = api.run_chat(4, "m", Duration::from_secs(60)).await;
    assert_eq!(done["request_counts"]["completed"], 4, "{done}");
    assert_eq!(
        fake.stats
            .loads_done
            .load(std::sync::atomic::Ordering::SeqCst),
        1
    );
    assert_eq!(
        fake.stats
            .loads_abandoned
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "no load was left half-done"
    );
    server.stop().await;
}

//! Batch webhooks, received by a server in the test process: `batch.completed` and
//! `batch.cancelled` arrive and the official openai SDK's `webhooks.unwrap` verifies them (a
//! wrong secret does not); a receiver that answers 500 twice gets the event on the third
//! delivery; an event whose batch ended while the receiver was down, with the server killed
//! (SIGKILL) before it could deliver, arrives after the restart; `--on-finish-cmd` runs.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use crate::support::{Api, chat_file, metric, server_with, until_some};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const WRONG: &str = "whsec_c2VjcmV0IG9mIHNvbWVib2R5IGVsc2U=";

/// One POST the receiver got: its webhook headers and body, and what it answered.
#[derive(Clone, Debug)]
struct Received {
    headers: Value,
    body: String,
    answered: u16,
}

/// A webhook receiver: answers 500 to its first `fail_first` posts, 200 after.
#[derive(Clone)]
struct Receiver {
    addr: SocketAddr,
    got: Arc<Mutex<Vec<Received>>>,
}

impl Receiver {
    async fn on(listener: tokio::net::TcpListener, fail_first: u32) -> Receiver {
        let addr = listener.local_addr().expect("addr");
        let got: Arc<Mutex<Vec<Received>>> = Default::default();
        let failures = Arc::new(AtomicU32::new(fail_first));
        let (g, f) = (got.clone(), failures.clone());
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: String| {
                let (g, f) = (g.clone(), f.clone());
                async move {
                    let answered = if f
                        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                        .is_ok()
                    {
                        500
                    } else {
                        200
                    };
                    let h = |k: &str| headers.get(k).and_then(|v| v.to_str().ok()).unwrap_or("");
                    g.lock().expect("lock").push(Received {
                        headers: json!({"webhook-id": h("webhook-id"),
                                        "webhook-timestamp": h("webhook-timestamp"),
                                        "webhook-signature": h("webhook-signature"),
                                        "content-type": h("content-type")}),
                        body,
                        answered,
                    });
                    axum::http::StatusCode::from_u16(answered).expect("status")
                }
            }),
        );
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Receiver { addr, got }
    }

    fn url(&self) -> String {
        format!("http://{}/hook", self.addr)
    }

    /// The posts it answered 200, once `n` of them have arrived.
    async fn delivered(&self, n: usize) -> Vec<Received> {
        until_some(
            &format!("{n} webhook(s) delivered"),
            Duration::from_secs(30),
            || {
                let ok: Vec<Received> = self
                    .got
                    .lock()
                    .expect("lock")
                    .iter()
                    .filter(|r| r.answered == 200)
                    .cloned()
                    .collect();
                async move { (ok.len() >= n).then_some(ok) }
            },
        )
        .await
    }
}

/// What the openai SDK's `webhooks.unwrap` makes of each delivery under `secret` (`None`: no
/// Python with the SDK here; the reason is printed).
fn sdk_unwrap(secret: &str, events: &[Received]) -> Option<Vec<String>> {
    let py = crate::sdk::python()?;
    let input = json!({"secret": secret, "events": events.iter()
        .map(|e| json!({"body": e.body, "headers": e.headers})).collect::<Vec<_>>()});
    let mut child = std::process::Command::new(py)
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/webhook_verify.py"
        ))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python");
    use std::io::Write;
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("python runs");
    assert!(out.status.success(), "{out:?}");
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

fn skipped_sdk() {
    use std::io::Write;
    let _ = writeln!(
        std::io::stderr(),
        "SKIPPED: verifying webhooks with the openai SDK needs a Python with the `openai` package (set OLLAMA_BATCH_TEST_PYTHON; .ci/run installs one)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completed_and_cancelled_batches_are_signed_events_the_sdk_verifies() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    // The first two posts fail: the first event arrives on its third delivery.
    let receiver = Receiver::on(listener, 2).await;
    let fake = Fake::start(Shape::OpenAi).await;
    let url = receiver.url();
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.webhook_urls = vec![url];
        cfg.webhook_key = Some(SECRET.trim_start_matches("whsec_").parse().expect("key"));
        cfg.webhook_retry_initial = Duration::from_millis(50);
    })
    .await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(
            chat_file(3, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["status"], "completed");
    let first = receiver.delivered(1).await;
    let all = receiver.got.lock().expect("lock").clone();
    assert_eq!(
        all.iter().map(|r| r.answered).collect::<Vec<_>>(),
        vec![500, 500, 200],
        "two failures, then the third delivery"
    );
    let id = &first[0].headers["webhook-id"];
    assert!(
        all.iter().all(|r| &r.headers["webhook-id"] == id),
        "one event, one id"
    );
    let event: Value = serde_json::from_str(&first[0].body).expect("JSON");
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["object"], "event");
    assert_eq!(event["data"]["id"], done["id"]);
    assert_eq!(&event["id"], id);

    // A cancelled batch.
    fake.hold();
    let b = api
        .submit(chat_file(20, "m", "s"), "/v1/chat/completions")
        .await;
    let bid = b["id"].as_str().expect("id").to_string();
    api.wait_in_progress(&bid, Duration::from_secs(10)).await;
    let (code, _) = api
        .post(&format!("/v1/batches/{bid}/cancel"), json!({}))
        .await;
    assert_eq!(code, 200);
    fake.release();
    let cancelled = api.wait_terminal(&bid, Duration::from_secs(30)).await;
    assert_eq!(cancelled["status"], "cancelled");
    let delivered = receiver.delivered(2).await;
    let second: Value = serde_json::from_str(&delivered[1].body).expect("JSON");
    assert_eq!(second["type"], "batch.cancelled");
    assert_eq!(second["data"]["id"], bid.as_str());

    let (_, status) = api.get("/status").await;
    let w = &status["webhooks"];
    assert_eq!(
        (
            w["delivered"].as_u64(),
            w["retried"].as_u64(),
            w["failed"].as_u64()
        ),
        (Some(2), Some(2), Some(0)),
        "{w}"
    );
    assert_eq!(
        metric(
            &api.metrics().await,
            "obatch_webhook_deliveries_total",
            &[("outcome", "delivered")]
        ),
        Some(2.0)
    );

    // The official SDK verifies both; under a wrong secret neither verifies.
    match sdk_unwrap(SECRET, &delivered) {
        Some(lines) => {
            assert_eq!(
                lines,
                vec![
                    format!("batch.completed {}", done["id"].as_str().expect("id")),
                    format!("batch.cancelled {bid}"),
                ]
            );
            let wrong = sdk_unwrap(WRONG, &delivered).expect("python");
            assert!(wrong.iter().all(|l| l.starts_with("INVALID")), "{wrong:?}");
        }
        None => skipped_sdk(),
    }

    // A batch may not name its own receiver unless the server allows it.
    let (_, file) = api
        .upload("in.jsonl", chat_file(1, "m", "s"), "batch")
        .await;
    let (code, err) = api
        .post(
            "/v1/batches",
            json!({"input_file_id": file["id"], "endpoint": "/v1/chat/completions",
                   "completion_window": "24h", "metadata": {"webhook_url": "http://169.254.169.254/"}}),
        )
        .await;
    assert_eq!(
        (code, err["error"]["param"].as_str()),
        (400, Some("metadata.webhook_url")),
        "{err}"
    );
}

/// The receiver is down when the batch ends; the server is killed before it can deliver; the
/// receiver comes up and the server is started again: the event arrives, and the
/// `--on-finish-cmd` program ran with the batch's figures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_survives_a_sigkill_while_its_receiver_is_down() {
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // A port nobody listens on (yet).
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr").port()
    };
    let script = dir.path().join("finished.sh");
    let marks = dir.path().join("marks");
    std::fs::create_dir(&marks).expect("mkdir");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\nenv | grep '^OLLAMA_BATCH_' | sort > {}/$OLLAMA_BATCH_ID\n",
            marks.display()
        ),
    )
    .expect("script");
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    }
    let url = format!("http://127.0.0.1:{port}/hook");
    let flags = [
        "--webhook-url",
        url.as_str(),
        "--webhook-secret",
        SECRET,
        "--webhook-retry-initial",
        "100ms",
        "--on-finish-cmd",
        script.to_str().expect("path"),
    ];
    let mut first = process::spawn(&state, &fake.url(), 4, &flags);
    let api = Api::new(&first.addr);
    let done = api
        .run_file(
            chat_file(5, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    let bid = done["id"].as_str().expect("id").to_string();
    // The receiver is down: at least one failed attempt, nothing delivered.
    until_some("a failed delivery", Duration::from_secs(30), || {
        let api = &api;
        async move {
            let (_, s) = api.get("/status").await;
            (s["webhooks"]["retried"].as_u64().unwrap_or(0) >= 1).then_some(())
        }
    })
    .await;
    let mark = marks.join(&bid);
    until_some("--on-finish-cmd ran", Duration::from_secs(30), || {
        let m = mark.clone();
        async move {
            std::fs::read_to_string(&m)
                .ok()
                .filter(|t| t.contains("OLLAMA_BATCH_STATUS"))
        }
    })
    .await;
    let env = std::fs::read_to_string(&mark).expect("mark");
    for want in [
        format!("OLLAMA_BATCH_ID={bid}"),
        "OLLAMA_BATCH_STATUS=completed".to_string(),
        "OLLAMA_BATCH_COMPLETED=5".to_string(),
        "OLLAMA_BATCH_FAILED=0".to_string(),
        "OLLAMA_BATCH_TOTAL=5".to_string(),
    ] {
        assert!(env.lines().any(|l| l == want), "{want} in\n{env}");
    }
    signal(&first.child, "-KILL");
    wait_exit(&mut first.child, Duration::from_secs(10));

    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .expect("the receiver's port");
    let receiver = Receiver::on(listener, 0).await;
    let _second = process::spawn(&state, &fake.url(), 4, &flags);
    let got = receiver.delivered(1).await;
    let event: Value = serde_json::from_str(&got[0].body).expect("JSON");
    assert_eq!(event["type"], "batch.completed");
    assert_eq!(event["data"]["id"], bid.as_str());
    match sdk_unwrap(SECRET, &got) {
        Some(lines) => assert_eq!(lines, vec![format!("batch.completed {bid}")]),
        None => skipped_sdk(),
    }
}

/// An `--on-finish-cmd` that fails is logged and counted, never retried and never fatal: the
/// next batch runs and its program is run too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_on_finish_cmd_is_counted_and_nothing_else() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.on_finish_cmd = Some("/bin/false".into());
    })
    .await;
    let api = Api::new(&server.base);
    for round in 1..=2u64 {
        let done = api
            .run_file(
                chat_file(3, "m", "s"),
                "/v1/chat/completions",
                Duration::from_secs(30),
            )
            .await;
        assert_eq!(done["status"], "completed");
        let status = until_some("the program ran", Duration::from_secs(30), || {
            let api = &api;
            async move {
                let (_, s) = api.get("/status").await;
                // `pending` is counted at the deliverer's next look (every 200 ms).
                (s["webhooks"]["failed"].as_u64() == Some(round)
                    && s["webhooks"]["pending"].as_u64() == Some(0))
                .then_some(s)
            }
        })
        .await;
        let w = &status["webhooks"];
        assert_eq!(
            (w["pending"].as_u64(), w["retried"].as_u64()),
            (Some(0), Some(0)),
            "{w}"
        );
        assert!(
            w["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("/bin/false exited")),
            "{w}"
        );
    }
}

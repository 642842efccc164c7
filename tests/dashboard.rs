//! The dashboard in a real browser: Debian's headless Chromium loads `GET /` during a run and
//! the DOM it renders must show the batch, with progress that moves between two loads. The
//! server's `/events` stream also gets its own test here: snapshots and the finished event,
//! and a SIGTERM with a stream open still exits in time.

use crate::support::browser::{Browser, chromium};
use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use crate::support::{Api, chat_file, server_with};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The batch rows the page shows: [id, status, done, total].
const ROWS: &str = "[...document.querySelectorAll('tr[data-batch-id]')].map(r => [r.dataset.batchId, r.dataset.status, Number(r.dataset.done), Number(r.dataset.total)])";

fn row_of(rows: &serde_json::Value, id: &str) -> Option<(String, u64, u64)> {
    rows.as_array()?.iter().find(|r| r[0] == id).map(|r| {
        (
            r[1].as_str().unwrap_or_default().to_string(),
            r[2].as_u64().unwrap_or(0),
            r[3].as_u64().unwrap_or(0),
        )
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_the_batch_and_its_progress_in_a_real_browser() {
    if chromium().is_none() {
        println!(
            "SKIPPED: dashboard browser test: Debian's chromium is not installed (.ci/run installs it)"
        );
        return;
    }
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(40));
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 2).await;
    let api = Api::new(&server.base);
    let n = 400u64;
    let id = api
        .submit_id(chat_file(n as usize, "m", "rubric"), "/v1/chat/completions")
        .await;
    api.wait_completed(&id, 10, Duration::from_secs(20)).await;
    let url = format!("{}/", server.base);
    let idc = id.clone();
    tokio::task::spawn_blocking(move || {
        let mut b = Browser::open(&url);
        b.wait_for("document.body.dataset.ready", Duration::from_secs(20), |v| v == "1");
        let rows = b.wait_for(ROWS, Duration::from_secs(10), |v| row_of(v, &idc).is_some());
        let (status, first, total) = row_of(&rows, &idc).expect("row");
        assert_eq!(status, "in_progress");
        assert_eq!(total, n);
        // The same page, without a reload, follows the run over /events.
        let rows = b.wait_for(ROWS, Duration::from_secs(30), |v| {
            row_of(v, &idc).is_some_and(|(_, done, _)| done > first + 20)
        });
        let (_, later, _) = row_of(&rows, &idc).expect("row");
        assert!(later <= n);
        // The progress bar is drawn (inline styles are refused by the page's CSP; the bar's
        // width is set through the CSSOM).
        let width = b.eval(&format!(
            "parseFloat(getComputedStyle(document.querySelector('tr[data-batch-id=\"{idc}\"] .bar .done')).width)"
        ));
        assert!(width.as_f64().is_some_and(|w| w > 0.0), "bar width {width}");
        let text = b
            .eval("document.body.innerText")
            .as_str()
            .unwrap_or_default()
            .to_lowercase();
        assert!(text.contains("gpu memory\nunavailable\nnvml cannot be loaded"), "GPU said unavailable, and why: {text}");
        assert!(text.contains("up · openai"), "backend health shown: {text}");
        assert_eq!(b.eval("document.getElementById('beacon').textContent"), "live");
        // It ends completed, with its download links.
        let rows = b.wait_for(ROWS, Duration::from_secs(60), |v| {
            row_of(v, &idc).is_some_and(|(s, _, _)| s == "completed")
        });
        assert_eq!(row_of(&rows, &idc).map(|r| r.1), Some(n));
        let links = b.wait_for(
            "[...document.querySelectorAll('a[download]')].map(a => a.textContent)",
            Duration::from_secs(15),
            |v| v.as_array().is_some_and(|a| !a.is_empty()),
        );
        assert_eq!(links, serde_json::json!(["output"]));
    })
    .await
    .expect("browser checks");
    server.stop().await;
}

/// Regenerates docs/dashboard.png (a screenshot mid-run): `scripts/dashboard-screenshot.sh`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes docs/dashboard.png; run by scripts/dashboard-screenshot.sh"]
async fn dashboard_screenshot() {
    assert!(chromium().is_some(), "install Debian's chromium first");
    let fake = Fake::start(Shape::Ollama).await;
    fake.set(|b| {
        b.delay = Duration::from_millis(30);
        b.busy_permille = 20;
    });
    let (_d, mut server) = server_with(&fake, |c| {
        c.concurrency = 4;
        c.num_ctx = Some(8192);
    })
    .await;
    let api = Api::new(&server.base);
    for (n, system) in [(300, "old rubric"), (3, "x")] {
        let done = api
            .run_file(
                chat_file(n, "gemma3:12b", system),
                "/v1/chat/completions",
                Duration::from_secs(60),
            )
            .await;
        assert_eq!(done["status"], "completed");
    }
    let id = api
        .submit_id(
            chat_file(5000, "gemma3:12b", "rubric"),
            "/v1/chat/completions",
        )
        .await;
    api.wait_completed(&id, 600, Duration::from_secs(120)).await;
    let out = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("docs/dashboard.png");
    let url = format!("{}/", server.base);
    tokio::task::spawn_blocking(move || {
        let mut b = Browser::open(&url);
        b.wait_for(
            "document.body.dataset.ready",
            Duration::from_secs(20),
            |v| v == "1",
        );
        // Let the chart gather a few snapshots.
        std::thread::sleep(Duration::from_secs(12));
        b.screenshot(&out);
    })
    .await
    .expect("screenshot");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_stream_snapshots_and_the_finish_and_end_on_sigterm() {
    let fake = Fake::start(Shape::OpenAi).await;
    // 300 lines of 30 ms on 2 lanes: a run of about 4.5 s, so that several snapshots (at most
    // one a second) fall within it.
    fake.set(|b| b.delay = Duration::from_millis(30));
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = process::spawn(&state, &fake.url(), 2, &["--shutdown-grace", "5s"]);
    let api = Api::new(&p.addr);
    let mut resp = api
        .http
        .get(format!("{}/events", p.addr))
        .send()
        .await
        .expect("events");
    assert_eq!(resp.status(), 200);
    assert!(
        resp.headers()["content-type"]
            .to_str()
            .unwrap_or_default()
            .starts_with("text/event-stream")
    );
    let id = api
        .submit_id(chat_file(300, "m", "s"), "/v1/chat/completions")
        .await;
    // Read events until the batch's finished event.
    let mut buf = String::new();
    let mut snapshots = Vec::new();
    let mut kinds = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    'read: loop {
        let chunk = tokio::time::timeout(Duration::from_secs(20), resp.chunk())
            .await
            .expect("an event within 20 s")
            .expect("stream")
            .expect("stream open");
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let kind = block
                .lines()
                .find_map(|l| l.strip_prefix("event: "))
                .unwrap_or("message")
                .to_string();
            let data: String = block
                .lines()
                .filter_map(|l| l.strip_prefix("data: "))
                .collect();
            if kind == "status" {
                let v: serde_json::Value = serde_json::from_str(&data).expect("snapshot JSON");
                snapshots.push(v);
            }
            kinds.push(kind.clone());
            if kind == "batch_finished" {
                let v: serde_json::Value = serde_json::from_str(&data).expect("event JSON");
                assert_eq!(v["id"], id.as_str());
                assert_eq!(v["status"], "completed");
                break 'read;
            }
        }
        assert!(Instant::now() < deadline, "no finished event: {kinds:?}");
    }
    assert!(kinds.contains(&"batch_created".to_string()), "{kinds:?}");
    assert!(kinds.contains(&"batch_validated".to_string()), "{kinds:?}");
    let running: Vec<u64> = snapshots
        .iter()
        .filter_map(|s| {
            s["batches"]
                .as_array()?
                .iter()
                .find(|b| b["id"] == id.as_str())?["completed"]
                .as_u64()
        })
        .collect();
    assert!(running.len() >= 2, "snapshots during the run: {running:?}");
    assert!(
        running.windows(2).all(|w| w[0] <= w[1]) && running.last() > running.first(),
        "{running:?}"
    );
    // Snapshots come at most once a second.
    let times: Vec<i64> = snapshots.iter().filter_map(|s| s["at"].as_i64()).collect();
    assert!(
        times.len() as i64 <= times.last().unwrap_or(&0) - times.first().unwrap_or(&0) + 2,
        "{times:?}"
    );
    // An open stream does not hold up the stop.
    let t = Instant::now();
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(15));
    assert!(status.success(), "{status}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "stop took {:?}",
        t.elapsed()
    );
    // The stream ended cleanly.
    let end = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match resp.chunk().await {
                Ok(Some(_)) => continue,
                other => return other.is_ok(),
            }
        }
    })
    .await;
    assert!(end.is_ok(), "the stream did not end");
}

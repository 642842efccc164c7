//! The supervisor's timers on a paused tokio clock: the real supervisor and store, the worker
//! operated by the test (`support::harness`), and time advanced by the runtime instead of
//! waited for. Each test uses the real default durations (minutes), which no test could wait.

use crate::support::harness::{self, Harness};
use crate::support::until;
use ollama_batch::domain::{BatchStatus, CallResult, RequestState, Verdict, unix_millis};
use ollama_batch::store::Store;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

fn store() -> (tempfile::TempDir, Arc<Store>) {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = Arc::new(Store::open(dir.path(), 8 << 20).expect("open"));
    (dir, store)
}

/// A call that started and never answered is rescued at request timeout + margin (10 min +
/// 60 s by default), not before; re-leased under a new lease; the late answer of the old lease
/// is refused; a job still waiting for a slot is never rescued.
#[tokio::test(start_paused = true)]
async fn a_stuck_call_is_rescued_at_its_deadline_and_its_late_answer_refused() {
    let (dir, store) = store();
    let cfg = harness::config(dir.path());
    assert_eq!(
        (cfg.request_timeout, cfg.lease_margin),
        (Duration::from_secs(600), Duration::from_secs(60)),
        "the defaults"
    );
    let batch = harness::put_batch(&store, 1, |_| 0);
    let mut h = Harness::start(store.clone(), cfg);
    let first = h.next_job().await;
    assert_eq!((first.lease, first.attempts), (1, 1));
    // Not started (waiting for a slot): not rescued, however long.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    assert_eq!(h.live.with(|l| l.counters.rescued), 0);
    h.started(&first).await;
    let started = Instant::now();
    tokio::time::sleep(Duration::from_secs(659)).await;
    assert_eq!(
        h.live.with(|l| l.counters.rescued),
        0,
        "before the deadline"
    );
    let second = h.next_job().await;
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(660) && waited <= Duration::from_secs(662),
        "rescued after {waited:?}"
    );
    assert_eq!(h.live.with(|l| l.counters.rescued), 1);
    assert_eq!(
        (second.key, second.lease, second.attempts),
        (first.key, 2, 2)
    );
    // The late answer of lease 1: refused by the machine, counted, nothing stored.
    h.answer(&first, r#"{"by":1}"#).await;
    until(
        "the stale answer is counted",
        Duration::from_secs(5),
        || h.live.with(|l| l.counters.stale_outcomes) == 1,
    )
    .await;
    let rec = store.get_request(first.key).expect("get").expect("some");
    assert_eq!((rec.state, rec.lease), (RequestState::Leased, 2));
    h.started(&second).await;
    h.answer(&second, r#"{"by":2}"#).await;
    until("the batch completes", Duration::from_secs(30), || {
        store
            .get_batch(batch)
            .ok()
            .flatten()
            .is_some_and(|b| b.status == BatchStatus::Completed)
    })
    .await;
    let out = std::fs::read_to_string(store.file_path(batch.output_file())).expect("output");
    assert_eq!(out.lines().count(), 1);
    assert!(out.contains(r#"{"by":2}"#), "{out}");
    h.stop().await;
}

/// A transient failure is sent again exactly when its stored delay says (full jitter below
/// `initial · 2^(n-1)`): not before, and not a tick later.
#[tokio::test(start_paused = true)]
async fn a_retry_is_sent_again_when_its_stored_delay_has_passed() {
    let (dir, store) = store();
    let mut cfg = harness::config(dir.path());
    cfg.retry.initial = Duration::from_secs(600);
    cfg.retry.max = Duration::from_secs(3600);
    harness::put_batch(&store, 1, |_| 0);
    let mut h = Harness::start(store.clone(), cfg);
    let mut job = h.next_job().await;
    for attempt in 1..=3u32 {
        assert_eq!(job.attempts, attempt);
        h.started(&job).await;
        let unavailable = CallResult::Answered {
            status: 503,
            body: r#"{"error":"busy"}"#.into(),
            usage: None,
        };
        let sent = unix_millis();
        h.finish(&job, unavailable, Verdict::Transient).await;
        // The delay the store now holds (unix ms: a restart would keep it).
        let key = job.key;
        let stored = || {
            store
                .get_request(key)
                .ok()
                .flatten()
                .filter(|r| r.state == RequestState::Queued && r.not_before_ms > 0)
        };
        h.settled("the retry is stored", || stored().is_some())
            .await;
        let delay = stored()
            .map(|r| Duration::from_millis(r.not_before_ms.saturating_sub(sent)))
            .expect("stored");
        let ceiling = Duration::from_secs(600 << (attempt - 1)).min(Duration::from_secs(3600));
        assert!(
            delay <= ceiling,
            "attempt {attempt}: {delay:?} > {ceiling:?}"
        );
        let at = Instant::now();
        let next = h.next_job().await;
        let waited = at.elapsed();
        assert!(
            waited + Duration::from_millis(100) >= delay
                && waited <= delay + Duration::from_millis(100),
            "attempt {attempt}: stored delay {delay:?}, sent again after {waited:?}"
        );
        assert_eq!(next.attempts, attempt + 1);
        job = next;
    }
    h.stop().await;
}

/// A prefix group that no lane serves is taken by the next free lane after --group-wait-max
/// (30 s by default), while the lane's own group still has work: a small batch behind a large
/// one is not starved.
#[tokio::test(start_paused = true)]
async fn a_starved_group_is_taken_after_group_wait_max() {
    let (dir, store) = store();
    let cfg = harness::config(dir.path());
    assert_eq!(cfg.group_wait_max, Duration::from_secs(30), "the default");
    let large = harness::put_batch(&store, 200, |_| 1);
    let small = harness::put_batch(&store, 1, |_| 2);
    let mut h = Harness::start(store.clone(), cfg);
    let start = Instant::now();
    let mut large_done = 0;
    // The lane holds two leases: the call running and the next. Holding both before sleeping
    // means the supervisor has sent all it can (and is not flushing) while the clock moves.
    let mut running = h.next_job().await;
    let taken_after = loop {
        let next = h.next_job().await;
        if running.key.batch == small {
            break start.elapsed();
        }
        assert_eq!(running.key.batch, large);
        h.started(&running).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        h.answer(&running, "{}").await;
        large_done += 1;
        if next.key.batch == small {
            break start.elapsed();
        }
        running = next;
    };
    assert!(
        taken_after >= Duration::from_secs(30) && taken_after <= Duration::from_secs(33),
        "the small batch's line was leased after {taken_after:?}"
    );
    assert!(
        (28..=33).contains(&large_done),
        "the lane kept to its group until then: {large_done} answered"
    );
    h.stop().await;
}

/// While lines finish more slowly than --progress-every, one progress line is logged per
/// --progress-interval (30 s by default), and none while nothing finishes.
#[tokio::test(start_paused = true)]
async fn progress_lines_come_once_per_interval_while_lines_finish() {
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            if let Ok(mut v) = self.0.lock() {
                v.extend_from_slice(b);
            }
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let logs = Captured::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .with_max_level(tracing::Level::INFO)
        .finish();
    // This runtime has one thread: every task of the supervisor logs here.
    let _guard = tracing::subscriber::set_default(subscriber);
    let progress_lines = || {
        let text = logs.0.lock().map(|v| v.clone()).unwrap_or_default();
        String::from_utf8_lossy(&text)
            .lines()
            .filter(|l| l.contains(" progress "))
            .count()
    };

    let (dir, store) = store();
    let cfg = harness::config(dir.path());
    assert_eq!(
        (cfg.progress_every, cfg.progress_interval),
        (100, Duration::from_secs(30)),
        "the defaults"
    );
    harness::put_batch(&store, 40, |_| 0);
    let mut h = Harness::start(store.clone(), cfg);
    // One line finished every 5 s for 100 s: lines at 30, 60 and 90 s. The lane's second lease
    // is held before each sleep (see the starvation test).
    let mut running = h.next_job().await;
    for _ in 0..20 {
        let next = h.next_job().await;
        h.started(&running).await;
        tokio::time::sleep(Duration::from_secs(5)).await;
        h.answer(&running, "{}").await;
        running = next;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(progress_lines(), 3, "one per 30 s over 100 s");
    // Nothing finishes for 10 minutes: no line.
    let _held = h.next_job().await;
    let _also = running;
    tokio::time::sleep(Duration::from_secs(600)).await;
    assert_eq!(progress_lines(), 3, "nothing finished, nothing logged");
    h.stop().await;
}

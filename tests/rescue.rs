//! Lease rescue and the stale-answer fence, with the real supervisor and store and a worker
//! operated by hand: a call that started and never answered is rescued after request timeout +
//! margin, re-leased under a new lease, and the late answer of the old lease is dropped.

use ollama_batch::backend::Backend;
use ollama_batch::config::{BackendKind, Config};
use ollama_batch::domain::{
    BatchRecord, BatchStatus, CallResult, Endpoint, FileId, RequestKey, RequestRecord, Verdict,
};
use ollama_batch::store::{Store, StoredBody};
use ollama_batch::supervisor::{self, Parts, Supervisor};
use ollama_batch::worker::{Event, Outcome};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn answer(key: RequestKey, lease: u32, from: u32) -> Event {
    Event::Finished(Outcome {
        key,
        lease,
        attempts: lease,
        result: CallResult::Answered {
            status: 200,
            body: format!(r#"{{"answered_by_lease":{from}}}"#),
            usage: None,
        },
        verdict: Verdict::Success,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stuck_call_is_rescued_and_its_late_answer_is_dropped() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cfg = Config::for_tests(dir.path().into(), BackendKind::Openai, "http://127.0.0.1:9");
    cfg.request_timeout = Duration::from_millis(50);
    cfg.lease_margin = Duration::ZERO;
    cfg.concurrency = 1;
    let store = Arc::new(Store::open(dir.path(), 8 << 20).expect("open"));
    let mut batch = BatchRecord::new(Endpoint::ChatCompletions, FileId::new(), 0, None, None);
    batch.status = BatchStatus::InProgress;
    batch.request_counts.total = 1;
    store.put_batch(&batch).expect("batch");
    let key = RequestKey {
        batch: batch.id,
        line: 1,
    };
    let body = StoredBody {
        json: r#"{"model":"m","messages":[]}"#.into(),
        refs: vec![],
    };
    store
        .put_requests(&[(key, RequestRecord::queued("only".into()), body)])
        .expect("request");

    let recovery = supervisor::recover(&store, &cfg).expect("recover");
    let (jobs_tx, mut jobs) = mpsc::channel(8);
    let (events, events_rx) = mpsc::channel(8);
    let stop = CancellationToken::new();
    let (sup, handle) = Supervisor::new(
        Parts {
            store: store.clone(),
            cfg: Arc::new(cfg.clone()),
            backends: vec![Backend::new(&cfg).expect("backend")],
            jobs: jobs_tx,
            events: events_rx,
            tracker: TaskTracker::new(),
            stop: stop.clone(),
            gpu: Arc::new(ollama_batch::gpu::GpuMonitor::new()),
        },
        recovery,
    );
    let run = tokio::spawn(sup.run());

    let first = jobs.recv().await.expect("first lease");
    assert_eq!((first.key, first.lease, first.attempts), (key, 1, 1));
    // A job that never started (still waiting for a slot) is not rescued, however long it waits.
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(handle.live.with(|l| l.counters.rescued), 0);
    events
        .send(Event::Started { key, lease: 1 })
        .await
        .expect("send");
    until("the started call is rescued", || {
        handle.live.with(|l| l.counters.rescued) == 1
    })
    .await;
    let second = jobs.recv().await.expect("re-lease after rescue");
    assert_eq!((second.key, second.lease, second.attempts), (key, 2, 2));

    // The late answer of lease 1 arrives: dropped.
    events.send(answer(key, 1, 1)).await.expect("send");
    until("the stale answer is counted", || {
        handle.live.with(|l| l.counters.stale_outcomes) == 1
    })
    .await;
    assert_eq!(
        store.get_request(key).expect("get").expect("some").lease,
        2,
        "still leased under lease 2"
    );
    events
        .send(Event::Started { key, lease: 2 })
        .await
        .expect("send");
    events.send(answer(key, 2, 2)).await.expect("send");
    until("the batch completes", || {
        store
            .get_batch(batch.id)
            .ok()
            .flatten()
            .is_some_and(|b| b.status == BatchStatus::Completed)
    })
    .await;
    let out = std::fs::read_to_string(store.file_path(batch.id.output_file())).expect("output");
    assert_eq!(out.lines().count(), 1);
    assert!(out.contains(r#""answered_by_lease":2"#), "{out}");
    stop.cancel();
    run.await.expect("supervisor stops");
}

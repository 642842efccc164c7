//! Defects found by a hostile review, each with the test that reproduced it.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, Log, signal, wait_exit};
use crate::support::{Api, chat_file};
use std::time::Duration;

/// Defect 2: every log write fails (stderr is a pipe nobody reads: `| head`, a tee that died).
/// Before: tracing-subscriber's fallback `eprintln!` panicked in every log call; an upload was
/// stored but never answered, a batch stayed `validating`, SIGTERM was ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_log_pipe_changes_nothing() {
    let fake = Fake::start(Shape::OpenAi).await;
    let tmp = tempfile::tempdir().expect("tempdir");
    let state = tmp.path().join("state");
    let mut p = process::spawn_with(&state, &fake.url(), 4, &[], Log::Broken);
    let api = Api::new(&p.addr);
    let done = api
        .run_file(
            chat_file(20, "m", "rubric"),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(done["request_counts"]["completed"], 20, "{done}");
    signal(&p.child, "-TERM");
    let status = wait_exit(&mut p.child, Duration::from_secs(15));
    assert!(status.success(), "exit after SIGTERM: {status}");
}

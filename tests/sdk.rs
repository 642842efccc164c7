//! The official `openai` Python SDK against the server, for both backend shapes. Skipped, with
//! the reason printed, when no Python with `openai` is found (`.ci/run` installs one and points
//! `OLLAMA_BATCH_TEST_PYTHON` at it).

use crate::support::fake::{Fake, Shape};
use crate::support::server_with;
use std::process::Command;

/// The Python to run the SDK with: `OLLAMA_BATCH_TEST_PYTHON` (which must work: a run that
/// names one never skips), else `python3` if it has the package, else none (skip).
pub(crate) fn python() -> Option<String> {
    let named = std::env::var("OLLAMA_BATCH_TEST_PYTHON").ok();
    let py = named.clone().unwrap_or_else(|| "python3".into());
    let ok = Command::new(&py)
        .args(["-c", "import openai"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        ok || named.is_none(),
        "OLLAMA_BATCH_TEST_PYTHON={py} cannot import openai"
    );
    ok.then_some(py)
}

async fn sdk_round_trip(shape: Shape) {
    let Some(py) = python() else {
        // Written to stderr directly: libtest captures only the print macros, so the reason
        // shows in every run, not only with --nocapture.
        use std::io::Write;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED: the openai SDK test needs a Python with the `openai` package \
             (set OLLAMA_BATCH_TEST_PYTHON; .ci/run installs one)"
        );
        return;
    };
    let fake = Fake::start(shape).await;
    let (_dir, mut server) = server_with(&fake, |cfg| {
        cfg.model_map
            .insert("gpt-4o-mini".into(), "gemma3:12b".into());
    })
    .await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/sdk_e2e.py");
    let base = server.base.clone();
    let out = tokio::task::spawn_blocking(move || {
        Command::new(py).arg(script).arg(base).arg("40").output()
    })
    .await
    .expect("join")
    .expect("python runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "SDK script failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("SDK OK"), "{stdout}");
    println!("{}", stdout.trim());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_runs_a_batch_against_an_ollama_backend() {
    sdk_round_trip(Shape::Ollama).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn openai_python_sdk_runs_a_batch_against_an_openai_compatible_backend() {
    sdk_round_trip(Shape::OpenAi).await;
}

//! File expiry: `output_expires_after` on a batch and `expires_after` on an upload, validated as
//! OpenAI does; expired files answer 404 and are deleted from disk by the sweep, after a SIGKILL
//! and restart too; a file a running batch still reads is kept until the batch ends.

use crate::support::fake::{Fake, Shape};
use crate::support::process::{self, signal, wait_exit};
use crate::support::{Api, chat_file, server_with, until};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where the server keeps a file's bytes.
fn bytes_of(state: &Path, file_id: &Value) -> PathBuf {
    let id =
        ollama_batch::domain::FileId::parse(file_id.as_str().expect("file id")).expect("a file id");
    state.join("files").join(id.0.simple().to_string())
}

async fn upload_expiring(api: &Api, bytes: Vec<u8>, seconds: &str) -> (u16, Value) {
    let form = reqwest::multipart::Form::new()
        .text("purpose", "batch")
        .text("expires_after[anchor]", "created_at")
        .text("expires_after[seconds]", seconds.to_string())
        .part(
            "file",
            reqwest::multipart::Part::bytes(bytes).file_name("in.jsonl"),
        );
    let r = api
        .http
        .post(format!("{}/v1/files", api.base))
        .multipart(form)
        .send()
        .await
        .expect("upload");
    (r.status().as_u16(), r.json().await.expect("JSON"))
}

async fn create(api: &Api, file: &Value, expiry: Value) -> (u16, Value) {
    api.post(
        "/v1/batches",
        json!({"input_file_id": file, "endpoint": "/v1/chat/completions",
               "completion_window": "24h", "output_expires_after": expiry}),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_is_validated_as_openai_does_and_dates_the_files() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.refuse_marker = Some("c-2".into()));
    let (_dir, server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (_, file) = api
        .upload("in.jsonl", chat_file(3, "m", "s"), "batch")
        .await;
    assert_eq!(
        file["expires_at"],
        Value::Null,
        "no expiry named, no --file-retention: kept"
    );
    for (bad, param) in [
        (
            json!({"anchor": "created_at", "seconds": 3599}),
            "output_expires_after.seconds",
        ),
        (
            json!({"anchor": "created_at", "seconds": 2_592_001}),
            "output_expires_after.seconds",
        ),
        (
            json!({"anchor": "created_at", "seconds": "soon"}),
            "output_expires_after.seconds",
        ),
        (
            json!({"anchor": "now", "seconds": 3600}),
            "output_expires_after.anchor",
        ),
        (json!({"seconds": 3600}), "output_expires_after.anchor"),
        (json!(3600), "output_expires_after"),
    ] {
        let (status, err) = create(&api, &file["id"], bad.clone()).await;
        assert_eq!(status, 400, "{bad}: {err}");
        assert_eq!(err["error"]["param"], param, "{bad}: {err}");
    }
    let (status, b) = create(
        &api,
        &file["id"],
        json!({"anchor": "created_at", "seconds": 7200}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    let b = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    for which in ["output_file_id", "error_file_id"] {
        let (_, f) = api
            .get(&format!("/v1/files/{}", b[which].as_str().expect("file")))
            .await;
        assert_eq!(
            f["expires_at"].as_i64(),
            f["created_at"].as_i64().map(|t| t + 7200),
            "{which}: {f}"
        );
    }
    let (status, up) = upload_expiring(&api, chat_file(1, "m", "s"), "3600").await;
    assert_eq!(status, 200, "{up}");
    assert_eq!(
        up["expires_at"].as_i64(),
        up["created_at"].as_i64().map(|t| t + 3600)
    );
    let (status, err) = upload_expiring(&api, chat_file(1, "m", "s"), "10").await;
    assert_eq!(
        (status, err["error"]["param"].as_str()),
        (400, Some("expires_after.seconds")),
        "{err}"
    );
}

/// Short lifetimes (the minimum lowered by the hidden flag): the outputs of a finished batch
/// expire, the server is killed before the sweep could run, and after the restart they answer
/// 404 and their bytes are gone; an input that expires while its batch runs stays on disk until
/// the batch ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_files_are_gone_after_a_restart_and_kept_while_a_batch_needs_them() {
    let fake = Fake::start(Shape::OpenAi).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let state = dir.path().join("state");
    // A sweep an hour apart: the first process never sweeps after its start.
    let slow_sweep = ["--min-expiry-seconds", "1", "--expiry-sweep-interval", "1h"];
    let mut first = process::spawn(&state, &fake.url(), 4, &slow_sweep);
    let api = Api::new(&first.addr);
    let (_, file) = api
        .upload("in.jsonl", chat_file(5, "m", "s"), "batch")
        .await;
    let (status, b) = create(
        &api,
        &file["id"],
        json!({"anchor": "created_at", "seconds": 2}),
    )
    .await;
    assert_eq!(status, 200, "{b}");
    let b = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(30))
        .await;
    let out = b["output_file_id"].clone();
    assert_eq!(api.lines(&out).await.len(), 5);
    let on_disk = bytes_of(&state, &out);
    assert!(on_disk.exists());
    // Expired (2 s): 404 at once, though no sweep ran; the bytes are still there.
    until("the output expires", Duration::from_secs(10), || {
        std::fs::metadata(&on_disk).is_ok()
            && ollama_batch::domain::unix_now() > b["completed_at"].as_i64().unwrap_or(0) + 2
    })
    .await;
    let (code, _) = api
        .get(&format!("/v1/files/{}", out.as_str().expect("id")))
        .await;
    assert_eq!(code, 404);
    let (code, _) = api
        .get_text(&format!("/v1/files/{}/content", out.as_str().expect("id")))
        .await;
    assert_eq!(code, 404);
    assert!(on_disk.exists(), "not swept yet");
    signal(&first.child, "-KILL");
    wait_exit(&mut first.child, Duration::from_secs(10));

    // After the restart the sweep (at start, then every 100 ms) deletes the bytes.
    let fast_sweep = [
        "--min-expiry-seconds",
        "1",
        "--expiry-sweep-interval",
        "100ms",
    ];
    let second = process::spawn(&state, &fake.url(), 4, &fast_sweep);
    let api = Api::new(&second.addr);
    until(
        "the expired output is deleted after the restart",
        Duration::from_secs(10),
        || !on_disk.exists(),
    )
    .await;
    let (code, _) = api
        .get(&format!("/v1/files/{}", out.as_str().expect("id")))
        .await;
    assert_eq!(code, 404);

    // An input expiring while its batch runs is kept until the batch ends.
    fake.hold();
    let (_, input) = upload_expiring(&api, chat_file(3, "m", "s"), "1").await;
    let (status, b) = create(&api, &input["id"], Value::Null).await;
    assert_eq!(status, 200, "{b}");
    let id = b["id"].as_str().expect("id").to_string();
    api.wait_in_progress(&id, Duration::from_secs(10)).await;
    let input_bytes = bytes_of(&state, &input["id"]);
    let expires = input["expires_at"].as_i64().expect("expires_at");
    until("the input expires", Duration::from_secs(10), || {
        ollama_batch::domain::unix_now() > expires
    })
    .await;
    // Several sweeps run past the expiry while the batch is held.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(input_bytes.exists(), "a file a running batch reads is kept");
    fake.release();
    let done = api.wait_terminal(&id, Duration::from_secs(30)).await;
    assert_eq!(done["request_counts"]["completed"], 3, "{done}");
    until(
        "the input is deleted once its batch ended",
        Duration::from_secs(10),
        || !input_bytes.exists(),
    )
    .await;
}

/// `--file-retention` dates every file that names no expiry: uploads and a batch's outputs; a
/// file that names one keeps its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_retention_dates_files_that_name_no_expiry() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_dir, server) = server_with(&fake, |cfg| {
        cfg.file_retention = Some(Duration::from_secs(7 * 24 * 3600));
    })
    .await;
    let api = Api::new(&server.base);
    let week = 7 * 24 * 3600;
    let (_, file) = api
        .upload("in.jsonl", chat_file(2, "m", "s"), "batch")
        .await;
    assert_eq!(
        file["expires_at"].as_i64(),
        file["created_at"].as_i64().map(|t| t + week)
    );
    let (_, own) = upload_expiring(&api, chat_file(1, "m", "s"), "3600").await;
    assert_eq!(
        own["expires_at"].as_i64(),
        own["created_at"].as_i64().map(|t| t + 3600)
    );
    let done = api
        .run_file(
            chat_file(2, "m", "s"),
            "/v1/chat/completions",
            Duration::from_secs(30),
        )
        .await;
    let (_, out) = api
        .get(&format!(
            "/v1/files/{}",
            done["output_file_id"].as_str().expect("file")
        ))
        .await;
    assert_eq!(
        out["expires_at"].as_i64(),
        out["created_at"].as_i64().map(|t| t + week),
        "{out}"
    );
}

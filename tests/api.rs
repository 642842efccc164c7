//! The HTTP contract: validation with line numbers, cancel, pagination, and hostile input.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, chat_file, chat_line, server_with};
use crate::support::{assert_exactly_once, ids};
use serde_json::{Value, json};
use std::time::Duration;

fn assert_error_object(status: u16, expected: u16, body: &Value) {
    assert_eq!(status, expected, "{body}");
    let e = &body["error"];
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(e["type"].as_str().is_some(), "{body}");
    assert!(
        e.get("param").is_some() && e.get("code").is_some(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_file_fails_the_batch_with_every_bad_line_numbered() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let good = |id: &str| chat_line(id, "m", "s");
    let lines = [
        good("a"),                                                      // 1
        "not json".to_string(),                                         // 2
        String::new(),                                                  // 3 blank: skipped
        good("a"),                                                      // 4 duplicate
        json!({"custom_id": "b", "method": "GET", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(), // 5
        json!({"custom_id": "c", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m"}}).to_string(), // 6
        chat_line("d", "other-model", "s"),                             // 7
        json!({"custom_id": "e", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m", "stream": true}}).to_string(), // 8
        json!({"custom_id": "", "method": "POST", "url": "/v1/chat/completions", "body": {"model": "m"}}).to_string(), // 9
        good("f"),                                                      // 10
    ];
    let done = api
        .run_file(
            lines.join("\n").into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(done["status"], "failed");
    assert!(done["failed_at"].as_i64().is_some());
    let errors = done["errors"]["data"].as_array().expect("errors");
    let by_line: Vec<(u64, &str)> = errors
        .iter()
        .map(|e| {
            (
                e["line"].as_u64().expect("line"),
                e["code"].as_str().expect("code"),
            )
        })
        .collect();
    assert_eq!(
        by_line,
        vec![
            (2, "invalid_json_line"),
            (4, "duplicate_custom_id"),
            (5, "invalid_method"),
            (6, "invalid_url"),
            (7, "mismatched_model"),
            (8, "invalid_value"),
            // present but empty: invalid, not missing
            (9, "invalid_value"),
        ]
    );
    assert_eq!(fake.total_calls(), 0, "nothing runs from an invalid file");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_file_fails_the_batch() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let done = api
        .run_file(
            b"\n\n".to_vec(),
            "/v1/chat/completions",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["errors"]["data"][0]["code"], "empty_file");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_finishes_in_flight_lines_and_cancels_the_rest() {
    let fake = Fake::start(Shape::OpenAi).await;
    fake.set(|b| b.delay = Duration::from_millis(150));
    let (_d, mut server) = server_with(&fake, |c| c.concurrency = 2).await;
    let api = Api::new(&server.base);
    let n = 30;
    let id = api
        .submit_id(chat_file(n, "m", "s"), "/v1/chat/completions")
        .await;
    // Wait until some lines are done, then hold the backend (calls already answering finish,
    // new ones wait) so that lines are still in flight and unstarted when the cancel lands.
    api.wait_completed(&id, 2, Duration::from_secs(20)).await;
    fake.hold();
    let (status, c) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{c}");
    assert_eq!(c["status"], "cancelling", "lines are still in flight: {c}");
    assert!(c["cancelling_at"].as_i64().is_some());
    fake.release();
    let done = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert!(done["cancelled_at"].as_i64().is_some());
    let out = api.lines(&done["output_file_id"]).await;
    let errs = api.lines(&done["error_file_id"]).await;
    assert!(
        !out.is_empty() && !errs.is_empty(),
        "partial output and cancelled lines"
    );
    assert_exactly_once(out.iter().chain(errs.iter()), ids(n));
    for e in &errs {
        assert_eq!(e["error"]["code"], "batch_cancelled", "{e}");
        assert_eq!(e["response"], Value::Null);
    }
    assert_eq!(done["request_counts"]["completed"], out.len() as u64);
    assert!(
        (fake.total_calls() as usize) < n,
        "unstarted lines never ran"
    );

    // Cancelling again answers the batch; cancelling a completed batch is a conflict.
    let (status, again) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(again["status"], "cancelled");
    fake.set(|b| b.delay = Duration::ZERO);
    let b2 = api
        .submit(chat_file(2, "m", "s"), "/v1/chat/completions")
        .await;
    let id2 = b2["id"].as_str().expect("id");
    api.wait_terminal(id2, Duration::from_secs(20)).await;
    let (status, body) = api
        .post(&format!("/v1/batches/{id2}/cancel"), json!({}))
        .await;
    assert_error_object(status, 409, &body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batches_list_pages_newest_first_and_ends_with_an_empty_page() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (_, file) = api
        .upload("in.jsonl", chat_file(1, "m", "s"), "batch")
        .await;
    let fid = file["id"].as_str().expect("id");
    let mut created = Vec::new();
    for _ in 0..5 {
        created.push(api.create_batch(fid, "/v1/chat/completions").await["id"].clone());
    }
    created.reverse(); // newest first
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let path = match &after {
            Some(a) => format!("/v1/batches?limit=2&after={a}"),
            None => "/v1/batches?limit=2".to_string(),
        };
        let (status, page) = api.get(&path).await;
        assert_eq!(status, 200, "{page}");
        assert_eq!(page["object"], "list");
        let data = page["data"].as_array().expect("data");
        pages += 1;
        if data.is_empty() {
            assert_eq!(page["has_more"], false);
            assert_eq!(page["last_id"], Value::Null);
            break;
        }
        seen.extend(data.iter().map(|b| b["id"].clone()));
        assert_eq!(page["first_id"], data[0]["id"]);
        assert_eq!(page["last_id"], data[data.len() - 1]["id"]);
        assert_eq!(page["has_more"], seen.len() < 5, "{page}");
        after = page["last_id"].as_str().map(str::to_string);
        assert!(pages < 10, "paging does not end");
    }
    assert_eq!(seen, created);
    let (status, body) = api.get("/v1/batches?limit=0").await;
    assert_error_object(status, 400, &body);
    let (status, body) = api.get("/v1/batches?limit=101").await;
    assert_error_object(status, 400, &body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn files_list_retrieve_and_delete() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (_, a) = api.upload("a.jsonl", b"{}".to_vec(), "batch").await;
    let (_, b) = api.upload("b.txt", b"hello".to_vec(), "user_data").await;
    let (_, page) = api.get("/v1/files").await;
    let ids: Vec<&Value> = page["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|f| &f["id"])
        .collect();
    assert_eq!(ids, vec![&b["id"], &a["id"]], "newest first");
    let (_, page) = api.get("/v1/files?purpose=batch").await;
    assert_eq!(page["data"].as_array().expect("data").len(), 1);
    let (_, page) = api.get("/v1/files?order=asc&limit=1").await;
    assert_eq!(page["data"][0]["id"], a["id"]);
    assert_eq!(page["has_more"], true);
    let bid = b["id"].as_str().expect("id");
    let (status, text) = api.get_text(&format!("/v1/files/{bid}/content")).await;
    assert_eq!((status, text.as_str()), (200, "hello"));
    let r = api
        .http
        .delete(format!("{}/v1/files/{bid}", api.base))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status().as_u16(), 200);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v, json!({"id": bid, "object": "file", "deleted": true}));
    let (status, body) = api.get(&format!("/v1/files/{bid}")).await;
    assert_error_object(status, 404, &body);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_error_objects_and_the_server_keeps_serving() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |c| c.max_file_size = 1 << 20).await;
    let api = Api::new(&server.base);
    let http = &api.http;
    let base = &api.base;

    // Raw requests: (method, path, content-type, body, expected status).
    let cases: Vec<(&str, String, &str, Vec<u8>, u16)> = vec![
        ("POST", "/v1/files".into(), "application/json", b"{}".to_vec(), 400),
        ("POST", "/v1/files".into(), "multipart/form-data; boundary=X", b"garbage".to_vec(), 400),
        ("POST", "/v1/files".into(), "multipart/form-data", b"--X\r\n".to_vec(), 400),
        ("POST", "/v1/batches".into(), "application/json", b"not json".to_vec(), 400),
        ("POST", "/v1/batches".into(), "application/json", b"[1]".to_vec(), 400),
        ("POST", "/v1/batches".into(), "application/json", br#"{"endpoint":"/v1/chat/completions","completion_window":"24h"}"#.to_vec(), 400),
        ("POST", "/v1/batches".into(), "application/json", br#"{"input_file_id":"file-nope","endpoint":"/v1/chat/completions","completion_window":"24h"}"#.to_vec(), 404),
        ("POST", "/v1/batches".into(), "application/json", b"\xff\xfe\x00binary".to_vec(), 400),
        ("GET", "/v1/files/%2e%2e%2f%2e%2e%2fetc%2fpasswd".into(), "", vec![], 404),
        ("GET", "/v1/files/..%2F..%2Fdb/content".into(), "", vec![], 404),
        ("GET", "/v1/files/file-00000000000000000000000000000000/content".into(), "", vec![], 404),
        ("GET", "/v1/batches/batch_%00".into(), "", vec![], 404),
        ("POST", "/v1/batches/batch_nope/cancel".into(), "", vec![], 404),
        ("GET", "/v1/nope".into(), "", vec![], 404),
        ("DELETE", "/v1/batches".into(), "", vec![], 405),
        ("GET", "/v1/files?limit=abc".into(), "", vec![], 400),
    ];
    for (method, path, ctype, body, expected) in cases {
        let mut rb = http.request(method.parse().expect("method"), format!("{base}{path}"));
        if !ctype.is_empty() {
            rb = rb.header("content-type", ctype);
        }
        let r = rb.body(body).send().await.expect("sent");
        let status = r.status().as_u16();
        let text = r.text().await.expect("body");
        let v: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{method} {path}: not JSON: {text:?}"));
        assert_error_object(status, expected, &v);
    }

    // Multipart without purpose / with an unknown purpose / without a file.
    let form = reqwest::multipart::Form::new().part(
        "file",
        reqwest::multipart::Part::bytes(b"{}".to_vec()).file_name("x.jsonl"),
    );
    let r = http
        .post(format!("{base}/v1/files"))
        .multipart(form)
        .send()
        .await
        .expect("sent");
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    assert_error_object(s, 400, &v);
    assert_eq!(v["error"]["param"], "purpose");
    let (s, v) = api.upload("x.jsonl", b"{}".to_vec(), "nonsense").await;
    assert_error_object(s, 400, &v);
    let form = reqwest::multipart::Form::new().text("purpose", "batch");
    let r = http
        .post(format!("{base}/v1/files"))
        .multipart(form)
        .send()
        .await
        .expect("sent");
    let s = r.status().as_u16();
    let v: Value = r.json().await.expect("json");
    assert_error_object(s, 400, &v);
    assert_eq!(v["error"]["param"], "file");

    // Too large: 413 with an error object, not a dropped connection, whether the body is a
    // little or several times over the limit.
    for size in [(1 << 20) + 1, 2 << 20, 8 << 20] {
        for _ in 0..3 {
            let (s, v) = api.upload("big.jsonl", vec![b'x'; size], "batch").await;
            assert_error_object(s, 413, &v);
        }
    }
    // A client that waits for `100 Continue` is told before it sends the body.
    let mut sock = tokio::net::TcpStream::connect(base.trim_start_matches("http://"))
        .await
        .expect("connect");
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    sock.write_all(
        b"POST /v1/files HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary=B\r\n\
          Content-Length: 9000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await
    .expect("write head");
    let mut head = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(10), sock.read(&mut head))
        .await
        .expect("answered without the body")
        .expect("read");
    let text = String::from_utf8_lossy(&head[..n]);
    assert!(text.starts_with("HTTP/1.1 413"), "{text}");

    // Batch parameters.
    let (_, file) = api
        .upload("ok.jsonl", chat_file(1, "m", "s"), "batch")
        .await;
    let fid = file["id"].as_str().expect("id");
    for (body, param) in [
        (
            // An endpoint OpenAI batches take that no local model server has (/v1/responses
            // runs here since the Responses API issue).
            json!({"input_file_id": fid, "endpoint": "/v1/moderations", "completion_window": "24h"}),
            "endpoint",
        ),
        (
            json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "1h"}),
            "completion_window",
        ),
        (
            json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "metadata": {"k": "v".repeat(513)}}),
            "metadata",
        ),
        (
            json!({"input_file_id": fid, "endpoint": "/v1/chat/completions", "completion_window": "24h",
                "metadata": (0..17).map(|i| (format!("k{i}"), json!("v"))).collect::<serde_json::Map<_, _>>()}),
            "metadata",
        ),
    ] {
        let (s, v) = api.post("/v1/batches", body).await;
        assert_error_object(s, 400, &v);
        assert_eq!(v["error"]["param"], param, "{v}");
    }

    // Garbage files upload fine (a file is bytes) and fail as batches, naming their lines.
    let mut garbage: Vec<u8> = (0..4096u32).map(|i| (i * 7919 % 251) as u8).collect();
    garbage.extend_from_slice(b"\n\xc3\x28 invalid utf-8\n");
    let mut huge = chat_line("ok-1", "m", "s").into_bytes();
    huge.push(b'\n');
    huge.extend(std::iter::repeat_n(b'a', 10 << 20)); // a 10 MB line, line 2
    huge.push(b'\n');
    let (s, gf) = api.upload("garbage.bin", garbage, "batch").await;
    assert_eq!(s, 200, "{gf}");
    let b = api
        .create_batch(gf["id"].as_str().expect("id"), "/v1/chat/completions")
        .await;
    let done = api
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(20))
        .await;
    assert_eq!(done["status"], "failed");
    let lines: Vec<u64> = done["errors"]["data"]
        .as_array()
        .expect("errors")
        .iter()
        .filter_map(|e| e["line"].as_u64())
        .collect();
    assert!(lines.contains(&1) && lines.contains(&2), "{done}");

    // Still serving.
    let (s, v) = api.get("/health").await;
    assert_eq!((s, v), (200, json!({"status": "ok"})));
    server.stop().await;

    // A 10 MB line on a server that accepts the upload: a failed batch naming the line.
    let (_d2, mut server2) = server_with(&fake, |c| c.max_line_bytes = 4 << 20).await;
    let api2 = Api::new(&server2.base);
    let (s, hf) = api2.upload("huge.jsonl", huge, "batch").await;
    assert_eq!(s, 200, "{hf}");
    let b = api2
        .create_batch(hf["id"].as_str().expect("id"), "/v1/chat/completions")
        .await;
    let done = api2
        .wait_terminal(b["id"].as_str().expect("id"), Duration::from_secs(20))
        .await;
    assert_eq!(done["status"], "failed");
    assert_eq!(done["errors"]["data"][0]["line"], 2);
    assert_eq!(done["errors"]["data"][0]["code"], "line_too_long");
    let (s, _) = api2.get("/health").await;
    assert_eq!(s, 200);
    server2.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_cancelled_right_after_create_ends_cancelled() {
    // The race this exercises (cancel before the intake reads the batch) is hit only
    // sometimes from outside; `intake::tests::batch_cancelled_before_its_intake_is_handed_on`
    // pins it deterministically.
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (_, file) = api
        .upload("in.jsonl", chat_file(2000, "m", "s"), "batch")
        .await;
    let fid = file["id"].as_str().expect("id");
    for _ in 0..5 {
        let b = api.create_batch(fid, "/v1/chat/completions").await;
        let id = b["id"].as_str().expect("id");
        let (status, c) = api
            .post(&format!("/v1/batches/{id}/cancel"), json!({}))
            .await;
        assert_eq!(status, 200, "{c}");
        let done = api.wait_terminal(id, Duration::from_secs(20)).await;
        assert_eq!(done["status"], "cancelled", "{done}");
    }
    server.stop().await;
}

/// Issue 18, defect 10: a cancel just after the create of a large file went on validating the
/// whole file and ended with every line as a `batch_cancelled` error line. guarantees.md says
/// a batch cancelled while validating ends with a total of 0: now validation stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_during_validation_stops_it_and_leaves_no_lines() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let n = 60_000;
    let (_, file) = api
        .upload("big.jsonl", chat_file(n, "m", "s"), "batch")
        .await;
    let fid = file["id"].as_str().expect("id");
    let b = api.create_batch(fid, "/v1/chat/completions").await;
    let id = b["id"].as_str().expect("id");
    let (status, c) = api
        .post(&format!("/v1/batches/{id}/cancel"), json!({}))
        .await;
    assert_eq!(status, 200, "{c}");
    let done = api.wait_terminal(id, Duration::from_secs(60)).await;
    assert_eq!(done["status"], "cancelled", "{done}");
    assert_eq!(done["request_counts"]["total"], 0, "{done}");
    assert!(done["error_file_id"].is_null(), "{done}");
    assert!(done["output_file_id"].is_null(), "{done}");
    assert_eq!(fake.total_calls(), 0);
    server.stop().await;
}

/// Issue 18's rough edges: a create parameter of the wrong type is said to be of the wrong
/// type (it was reported as missing), and a line whose answer schema is not a JSON Schema
/// object fails validation (it was sent to the backend).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_types_are_named_and_a_schema_must_be_an_object() {
    let fake = Fake::start(Shape::OpenAi).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);
    let (code, e) = api
        .post(
            "/v1/batches",
            json!({"input_file_id": 123, "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
        )
        .await;
    assert_eq!(code, 400, "{e}");
    assert_eq!(e["error"]["param"], "input_file_id");
    assert!(
        e["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("invalid type") && m.contains("a number")),
        "{e}"
    );
    let line = json!({"custom_id": "a", "method": "POST", "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}],
                 "response_format": {"type": "json_schema",
                                     "json_schema": {"name": "x", "schema": "an integer"}}}});
    let done = api
        .run_file(
            format!("{line}\n").into_bytes(),
            "/v1/chat/completions",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(done["status"], "failed", "{done}");
    assert_eq!(
        done["errors"]["data"][0]["param"], "body.response_format.json_schema.schema",
        "{done}"
    );
    assert_eq!(fake.total_calls(), 0);
    server.stop().await;
}

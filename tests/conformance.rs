//! Conformance to OpenAI's published schema (openai/openai-openapi `openapi.json`, component
//! schemas vendored in tests/data by scripts/vendor-openai-schemas.py): every object the API
//! returns, and the output-line bodies the Ollama backend produces, validate against them.
//! OpenAI's own API answers `null` for unset optional fields, so `null` is accepted wherever a
//! property is not required; nothing else is relaxed.

use crate::support::fake::{Fake, Shape};
use crate::support::{Api, chat_file, server_with};
use serde_json::{Value, json};
use std::time::Duration;

/// The vendored schemas, with `null` allowed for every property a schema does not require.
fn schemas() -> Value {
    let text = include_str!("data/openai-schemas.json");
    let mut v: Value = serde_json::from_str(text).expect("vendored schemas are JSON");
    allow_null_when_optional(&mut v);
    v
}

fn allow_null_when_optional(v: &mut Value) {
    match v {
        Value::Object(map) => {
            let required: Vec<String> = map
                .get("required")
                .and_then(Value::as_array)
                .map(|r| {
                    r.iter()
                        .filter_map(|s| s.as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if let Some(Value::Object(props)) = map.get_mut("properties") {
                for (name, schema) in props.iter_mut() {
                    allow_null_when_optional(schema);
                    if !required.contains(name) {
                        let orig = schema.take();
                        *schema = json!({"anyOf": [orig, {"type": "null"}]});
                    }
                }
            }
            for (k, child) in map.iter_mut() {
                if k != "properties" {
                    allow_null_when_optional(child);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(allow_null_when_optional),
        _ => {}
    }
}

struct Schemas(Value);

impl Schemas {
    /// Fails the test with every violation when `instance` is not a valid `name`.
    fn check(&self, name: &str, instance: &Value) {
        let schema = json!({
            "$ref": format!("#/components/schemas/{name}"),
            "components": self.0["components"],
        });
        let validator = jsonschema::validator_for(&schema).expect("schema compiles");
        let errors: Vec<String> = validator
            .iter_errors(instance)
            .map(|e| format!("{} at {}", e, e.instance_path()))
            .collect();
        assert!(
            errors.is_empty(),
            "{name} does not conform:\n{}\n{instance:#}",
            errors.join("\n")
        );
    }
}

#[test]
fn the_checker_can_fail() {
    // A checker that accepts anything would make every conformance test pass.
    let s = Schemas(schemas());
    let bad = json!({"id": "file-x", "object": "file", "bytes": "12", "created_at": 1, "filename": "a", "purpose": "batch"});
    let schema =
        json!({"$ref": "#/components/schemas/OpenAIFile", "components": s.0["components"]});
    let v = jsonschema::validator_for(&schema).expect("compiles");
    assert!(!v.is_valid(&bad), "bytes as a string must be refused");
    let no_refusal = json!({"role": "assistant", "content": "x"});
    let schema = json!({"$ref": "#/components/schemas/ChatCompletionResponseMessage", "components": s.0["components"]});
    let v = jsonschema::validator_for(&schema).expect("compiles");
    assert!(
        !v.is_valid(&no_refusal),
        "a message without refusal must be refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_api_object_and_ollama_answer_conforms() {
    let s = Schemas(schemas());
    let fake = Fake::start(Shape::Ollama).await;
    let (_d, mut server) = server_with(&fake, |_| {}).await;
    let api = Api::new(&server.base);

    let (code, file) = api
        .upload("in.jsonl", chat_file(3, "m", "s"), "batch")
        .await;
    assert_eq!(code, 200);
    s.check("OpenAIFile", &file);
    let fid = file["id"].as_str().expect("id").to_string();
    let (_, f) = api.get(&format!("/v1/files/{fid}")).await;
    s.check("OpenAIFile", &f);
    let (_, list) = api.get("/v1/files").await;
    s.check("ListFilesResponse", &list);

    let created = api.create_batch(&fid, "/v1/chat/completions").await;
    s.check("Batch", &created);
    let id = created["id"].as_str().expect("id").to_string();
    let done = api.wait_terminal(&id, Duration::from_secs(20)).await;
    assert_eq!(done["status"], "completed");
    s.check("Batch", &done);
    for l in api.lines(&done["output_file_id"]).await {
        s.check("CreateChatCompletionResponse", &l["response"]["body"]);
    }
    let (_, list) = api.get("/v1/batches?limit=1").await;
    s.check("ListBatchesResponse", &list);

    // Tool calls and log probabilities, translated from Ollama's shapes.
    fake.set(|b| {
        b.raw_answer = Some(
            json!({"model": "m", "created_at": "2026-11-27T00:00:00Z",
                "message": {"role": "assistant", "content": "",
                    "tool_calls": [{"function": {"name": "score", "arguments": {"score": 7}}}]},
                "logprobs": [{"token": "a", "logprob": -0.25, "bytes": [97],
                    "top_logprobs": [{"token": "a", "logprob": -0.25, "bytes": [97]}]}],
                "done": true, "done_reason": "stop", "prompt_eval_count": 12, "eval_count": 3})
            .to_string(),
        )
    });
    let done = api.run_chat(1, "m", Duration::from_secs(20)).await;
    let lines = api.lines(&done["output_file_id"]).await;
    let body = &lines[0]["response"]["body"];
    assert_eq!(body["choices"][0]["finish_reason"], "tool_calls", "{body}");
    assert_eq!(
        body["choices"][0]["logprobs"]["content"][0]["token"], "a",
        "{body}"
    );
    s.check("CreateChatCompletionResponse", body);
    fake.set(|b| b.raw_answer = None);

    for (endpoint, line, schema) in [
        (
            "/v1/completions",
            json!({"custom_id": "c", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "hi"}}),
            "CreateCompletionResponse",
        ),
        (
            "/v1/embeddings",
            json!({"custom_id": "e", "method": "POST", "url": "/v1/embeddings", "body": {"model": "m", "input": "hi"}}),
            "CreateEmbeddingResponse",
        ),
        (
            "/v1/responses",
            json!({"custom_id": "r", "method": "POST", "url": "/v1/responses", "body": {"model": "m",
                "instructions": "Be brief.", "input": "hi", "max_output_tokens": 8, "metadata": {"k": "v"}}}),
            "Response",
        ),
        (
            "/v1/responses",
            json!({"custom_id": "r2", "method": "POST", "url": "/v1/responses", "body": {"model": "m",
                "input": [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]}],
                "text": {"format": {"type": "json_object"}}}}),
            "Response",
        ),
    ] {
        let done = api
            .run_file(
                format!("{line}\n").into_bytes(),
                endpoint,
                Duration::from_secs(20),
            )
            .await;
        assert_eq!(done["status"], "completed", "{done}");
        for l in api.lines(&done["output_file_id"]).await {
            s.check(schema, &l["response"]["body"]);
        }
    }

    // A failed batch carries its errors.
    let failed = api
        .run_file(
            b"not json\n".to_vec(),
            "/v1/chat/completions",
            Duration::from_secs(20),
        )
        .await;
    assert_eq!(failed["status"], "failed");
    s.check("Batch", &failed);

    // Cancel, delete, and errors.
    fake.hold();
    let b = api
        .submit(chat_file(5, "m", "s"), "/v1/chat/completions")
        .await;
    let bid = b["id"].as_str().expect("id");
    api.wait_in_progress(bid, Duration::from_secs(20)).await;
    let (code, cancelling) = api
        .post(&format!("/v1/batches/{bid}/cancel"), json!({}))
        .await;
    assert_eq!(code, 200);
    s.check("Batch", &cancelling);
    fake.release();
    let cancelled = api.wait_terminal(bid, Duration::from_secs(20)).await;
    s.check("Batch", &cancelled);
    let r = api
        .http
        .delete(format!("{}/v1/files/{fid}", api.base))
        .send()
        .await
        .expect("delete");
    let deleted: Value = r.json().await.expect("json");
    s.check("DeleteFileResponse", &deleted);
    for (code, err) in [
        api.get("/v1/files/file-nope").await,
        api.get("/v1/batches/batch_nope").await,
        api.post("/v1/batches", json!({"endpoint": "/v1/chat/completions"}))
            .await,
        api.post(
            &format!("/v1/batches/{}/cancel", done["id"].as_str().expect("id")),
            json!({}),
        )
        .await,
        api.get("/v1/nothing-here").await,
    ] {
        assert!(code >= 400, "{err}");
        s.check("ErrorResponse", &err);
    }
    server.stop().await;
}

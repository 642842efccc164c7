//! Ollama's native API. The OpenAI body is translated (`/api/chat`, `/api/embed`,
//! `/api/generate`) with `stream: false`, `truncate: false` (an overflow is an error, never a
//! silently shortened prompt), the configured `keep_alive`, and identical runner options on
//! every call (`num_ctx`), so Ollama never reloads the model between requests. The answer is
//! translated back into OpenAI's shapes.

use super::{Backend, wrap_error};
use crate::domain::{CallResult, Endpoint, Usage};
use serde_json::{Map, Value, json};

pub(super) async fn call(backend: &Backend, endpoint: Endpoint, body: Value) -> CallResult {
    let (path, request) = match endpoint {
        Endpoint::ChatCompletions => ("/api/chat", chat_request(backend, &body)),
        Endpoint::Embeddings => ("/api/embed", embed_request(backend, &body)),
        Endpoint::Completions => ("/api/generate", generate_request(backend, &body)),
    };
    let (status, text) = match backend.post(path, &request).await {
        Ok(answer) => answer,
        Err(failure) => return failure,
    };
    let parsed: Option<Value> = serde_json::from_str(&text).ok();
    // Ollama reports errors as {"error": "<string>"}, sometimes even after a 200.
    let error_text = parsed.as_ref().and_then(|v| v.get("error")).map(|e| {
        e.as_str()
            .map(str::to_string)
            .unwrap_or_else(|| e.to_string())
    });
    if !(200..300).contains(&status) || error_text.is_some() {
        let status = if (200..300).contains(&status) {
            500
        } else {
            status
        };
        let message = error_text.unwrap_or_else(|| text.trim().to_string());
        return CallResult::Answered {
            status,
            body: wrap_error(status, &message),
            usage: None,
        };
    }
    let Some(answer) = parsed else {
        return CallResult::Transport(format!(
            "Ollama answered {status} with a body that is not JSON ({} bytes)",
            text.len()
        ));
    };
    let model = body["model"].as_str().unwrap_or_default();
    let (openai, usage) = match endpoint {
        Endpoint::ChatCompletions => chat_response(&answer, model),
        Endpoint::Embeddings => embed_response(&answer, model),
        Endpoint::Completions => generate_response(&answer, model),
    };
    CallResult::Answered {
        status,
        body: openai.to_string(),
        usage: Some(usage),
    }
}

/// OpenAI sampling parameters → Ollama `options`, plus the fixed runner options.
fn options(backend: &Backend, body: &Value) -> Value {
    let mut o = Map::new();
    if let Some(n) = backend.num_ctx {
        o.insert("num_ctx".into(), json!(n));
    }
    let max = body
        .get("max_completion_tokens")
        .filter(|v| !v.is_null())
        .or_else(|| body.get("max_tokens"));
    if let Some(m) = max.filter(|v| !v.is_null()) {
        o.insert("num_predict".into(), m.clone());
    }
    for (from, to) in [
        ("temperature", "temperature"),
        ("top_p", "top_p"),
        ("seed", "seed"),
        ("frequency_penalty", "frequency_penalty"),
        ("presence_penalty", "presence_penalty"),
        ("top_k", "top_k"),
        ("min_p", "min_p"),
        ("repeat_penalty", "repeat_penalty"),
    ] {
        if let Some(v) = body.get(from).filter(|v| !v.is_null()) {
            o.insert(to.into(), v.clone());
        }
    }
    match body.get("stop") {
        Some(Value::String(s)) => {
            o.insert("stop".into(), json!([s]));
        }
        Some(v @ Value::Array(_)) => {
            o.insert("stop".into(), v.clone());
        }
        _ => {}
    }
    Value::Object(o)
}

fn base_request(backend: &Backend, body: &Value) -> Map<String, Value> {
    let mut r = Map::new();
    r.insert("model".into(), body["model"].clone());
    r.insert("stream".into(), json!(false));
    r.insert("keep_alive".into(), backend.keep_alive.clone());
    r.insert("options".into(), options(backend, body));
    r
}

/// OpenAI message → Ollama message: text parts joined, `image_url` data URLs → `images`.
fn message(m: &Value) -> Value {
    let mut out = Map::new();
    out.insert("role".into(), m["role"].clone());
    let mut images = Vec::new();
    let content = match &m["content"] {
        Value::String(s) => s.clone(),
        Value::Array(parts) => {
            let mut text = String::new();
            for p in parts {
                match p["type"].as_str() {
                    Some("text") => text.push_str(p["text"].as_str().unwrap_or_default()),
                    Some("image_url") => {
                        let url = p["image_url"]["url"]
                            .as_str()
                            .or_else(|| p["image_url"].as_str())
                            .unwrap_or_default();
                        let data = url.split_once(";base64,").map(|(_, d)| d).unwrap_or(url);
                        images.push(json!(data));
                    }
                    _ => {}
                }
            }
            text
        }
        _ => String::new(),
    };
    out.insert("content".into(), json!(content));
    if !images.is_empty() {
        out.insert("images".into(), Value::Array(images));
    }
    for key in ["tool_calls", "tool_name", "name"] {
        if let Some(v) = m.get(key).filter(|v| !v.is_null()) {
            out.insert(key.into(), v.clone());
        }
    }
    Value::Object(out)
}

fn chat_request(backend: &Backend, body: &Value) -> Value {
    let mut r = base_request(backend, body);
    let messages = body["messages"]
        .as_array()
        .map(|ms| ms.iter().map(message).collect::<Vec<_>>())
        .unwrap_or_default();
    r.insert("messages".into(), Value::Array(messages));
    r.insert("truncate".into(), json!(false));
    match body["response_format"]["type"].as_str() {
        Some("json_object") => {
            r.insert("format".into(), json!("json"));
        }
        Some("json_schema") => {
            let schema = &body["response_format"]["json_schema"]["schema"];
            r.insert(
                "format".into(),
                if schema.is_null() {
                    json!("json")
                } else {
                    schema.clone()
                },
            );
        }
        _ => {}
    }
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        r.insert("tools".into(), tools.clone());
    }
    Value::Object(r)
}

fn embed_request(backend: &Backend, body: &Value) -> Value {
    let mut r = base_request(backend, body);
    r.remove("stream");
    r.insert("input".into(), body["input"].clone());
    r.insert("truncate".into(), json!(false));
    if let Some(d) = body.get("dimensions").filter(|v| !v.is_null()) {
        r.insert("dimensions".into(), d.clone());
    }
    Value::Object(r)
}

fn generate_request(backend: &Backend, body: &Value) -> Value {
    let mut r = base_request(backend, body);
    r.insert("prompt".into(), body["prompt"].clone());
    if let Some(s) = body.get("suffix").filter(|v| !v.is_null()) {
        r.insert("suffix".into(), s.clone());
    }
    Value::Object(r)
}

fn usage(answer: &Value) -> Usage {
    Usage {
        input_tokens: answer["prompt_eval_count"].as_u64().unwrap_or(0),
        // Absent means unknown, not zero.
        cached_tokens: answer["prompt_eval_cached_count"].as_u64(),
        output_tokens: answer["eval_count"].as_u64().unwrap_or(0),
    }
}

fn usage_json(u: &Usage) -> Value {
    let mut v = json!({
        "prompt_tokens": u.input_tokens,
        "completion_tokens": u.output_tokens,
        "total_tokens": u.input_tokens + u.output_tokens,
    });
    if let Some(c) = u.cached_tokens {
        v["prompt_tokens_details"] = json!({"cached_tokens": c});
    }
    v
}

fn finish_reason(answer: &Value) -> &'static str {
    match answer["done_reason"].as_str() {
        Some("length") => "length",
        _ if answer["message"]["tool_calls"].is_array() => "tool_calls",
        _ => "stop",
    }
}

fn chat_response(answer: &Value, model: &str) -> (Value, Usage) {
    let u = usage(answer);
    let mut msg = json!({
        "role": "assistant",
        "content": answer["message"]["content"].as_str().unwrap_or_default(),
    });
    if let Some(calls) = answer["message"]["tool_calls"].as_array() {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": format!("call_{i}"),
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"],
                        "arguments": c["function"]["arguments"].to_string(),
                    }
                })
            })
            .collect();
        msg["tool_calls"] = Value::Array(calls);
    }
    let v = json!({
        "id": format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "chat.completion",
        "created": crate::domain::unix_now(),
        "model": answer["model"].as_str().unwrap_or(model),
        "choices": [{
            "index": 0,
            "message": msg,
            "logprobs": null,
            "finish_reason": finish_reason(answer),
        }],
        "usage": usage_json(&u),
    });
    (v, u)
}

fn embed_response(answer: &Value, model: &str) -> (Value, Usage) {
    let u = usage(answer);
    let data: Vec<Value> = answer["embeddings"]
        .as_array()
        .map(|es| {
            es.iter()
                .enumerate()
                .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
                .collect()
        })
        .unwrap_or_default();
    let v = json!({
        "object": "list",
        "data": data,
        "model": answer["model"].as_str().unwrap_or(model),
        "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
    });
    (v, u)
}

fn generate_response(answer: &Value, model: &str) -> (Value, Usage) {
    let u = usage(answer);
    let v = json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": crate::domain::unix_now(),
        "model": answer["model"].as_str().unwrap_or(model),
        "choices": [{
            "index": 0,
            "text": answer["response"].as_str().unwrap_or_default(),
            "logprobs": null,
            "finish_reason": finish_reason(answer),
        }],
        "usage": usage_json(&u),
    });
    (v, u)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BackendKind, Config};

    fn backend() -> Backend {
        let mut cfg = Config::for_tests("/tmp/x".into(), BackendKind::Ollama, "http://127.0.0.1:1");
        cfg.num_ctx = Some(8192);
        Backend::new(&cfg).expect("backend")
    }

    #[test]
    fn chat_body_maps_to_native_api() {
        let body = json!({
            "model": "gemma3:12b",
            "messages": [
                {"role": "system", "content": "rubric"},
                {"role": "user", "content": [{"type": "text", "text": "hi"},
                  {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}
            ],
            "max_tokens": 10, "temperature": 0.2, "stop": "END",
            "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "object"}}}
        });
        let r = chat_request(&backend(), &body);
        assert_eq!(r["stream"], false);
        assert_eq!(r["truncate"], false);
        assert_eq!(r["keep_alive"], -1);
        assert_eq!(r["options"]["num_ctx"], 8192);
        assert_eq!(r["options"]["num_predict"], 10);
        assert_eq!(r["options"]["temperature"], 0.2);
        assert_eq!(r["options"]["stop"], json!(["END"]));
        assert_eq!(r["format"], json!({"type": "object"}));
        assert_eq!(r["messages"][1]["content"], "hi");
        assert_eq!(r["messages"][1]["images"], json!(["AAAA"]));
    }

    #[test]
    fn chat_answer_maps_to_openai_shape() {
        let answer = json!({
            "model": "gemma3:12b", "message": {"role": "assistant", "content": "7"},
            "done": true, "done_reason": "length", "prompt_eval_count": 120, "eval_count": 3
        });
        let (v, u) = chat_response(&answer, "gemma3:12b");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "7");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], 120);
        assert!(v["usage"].get("prompt_tokens_details").is_none());
        assert_eq!(u.cached_tokens, None);
        let with_cache = json!({"message": {"content": ""}, "prompt_eval_count": 10,
            "prompt_eval_cached_count": 8, "eval_count": 1});
        let (v, u) = chat_response(&with_cache, "m");
        assert_eq!(u.cached_tokens, Some(8));
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
    }
}

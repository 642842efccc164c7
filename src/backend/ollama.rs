//! Ollama's native API. The OpenAI body is translated (`/api/chat`, `/api/embed`,
//! `/api/generate`) with `stream: false`, `truncate: false` (an overflow is an error, never a
//! silently shortened prompt), `shift: false` (a generation that fills the context ends as
//! `length` instead of going on without the rubric; see [`context_rules`]), the configured
//! `keep_alive`, and identical runner options on every call (`num_ctx`, `shift`), so Ollama
//! never reloads the model between requests. The answer is translated back into OpenAI's
//! shapes.

use super::{Backend, wrap_error};
use crate::domain::clip;
use crate::domain::{CallResult, Endpoint, Usage};
use serde_json::{Map, Value, json};
use std::collections::HashMap;

pub(super) async fn call(backend: &Backend, endpoint: Endpoint, body: &Value) -> CallResult {
    let request = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => chat_request(backend, body),
        Endpoint::Embeddings => Ok(embed_request(backend, body)),
        Endpoint::Completions => Ok(generate_request(backend, body)),
    };
    let request = match request {
        Ok(r) => r,
        Err(message) => {
            return CallResult::Invalid {
                code: "unsupported_parameter".into(),
                message,
                retry: false,
            };
        }
    };
    let path = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => "/api/chat",
        Endpoint::Embeddings => "/api/embed",
        Endpoint::Completions => "/api/generate",
    };
    match backend.post(path, &request).await {
        Ok((status, text, retry_after)) => {
            let model = body["model"].as_str().unwrap_or_default();
            crate::domain::outcome::busy_or(interpret(endpoint, status, &text, model), retry_after)
        }
        Err(failure) => failure,
    }
}

/// What an Ollama answer (`status`, body `text`) means, translated into OpenAI's shapes. Pure,
/// so that it is tested (and fuzzed) without a server.
pub(crate) fn interpret(endpoint: Endpoint, status: u16, text: &str, model: &str) -> CallResult {
    let parsed: Option<Value> = serde_json::from_str(text).ok();
    // Ollama reports errors as {"error": "<string>"}, sometimes even after a 200.
    let error_text = parsed
        .as_ref()
        .and_then(|v| v.get("error"))
        .filter(|e| !e.is_null())
        .map(|e| {
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
    let invalid = |message: String| CallResult::Invalid {
        code: "invalid_backend_answer".into(),
        message,
        retry: true,
    };
    let Some(answer) = parsed else {
        return invalid(format!(
            "Ollama answered {status} with a body that is not JSON ({} bytes)",
            text.len()
        ));
    };
    // A generation that Ollama stopped early says `done: false` (its token-repeat guard,
    // `llm/llama_server.go` v0.33: a token repeated more than 30 times ends the prediction
    // with no final response, no `done_reason` and no token counts). That is not an answer.
    if endpoint != Endpoint::Embeddings && answer.get("done") == Some(&Value::Bool(false)) {
        return CallResult::Invalid {
            code: "answer_incomplete".into(),
            message: "Ollama stopped the generation before it was done (done: false, no done_reason: its guard against a token repeated over and over); the partial answer is not kept".into(),
            retry: false,
        };
    }
    let translated = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => chat_response(&answer, model),
        Endpoint::Embeddings => embed_response(&answer, model),
        Endpoint::Completions => generate_response(&answer, model),
    };
    match translated {
        Ok((openai, usage)) => CallResult::Answered {
            status,
            body: openai.to_string(),
            usage: Some(usage),
        },
        Err(e) => invalid(format!("Ollama answered {status} {e}")),
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

/// OpenAI message → Ollama message: text parts joined, `image_url` data URLs → `images`,
/// `developer` → `system` (Ollama knows no developer role), tool-call `arguments` (a JSON
/// string in OpenAI's shape) → an object, a `tool` message's `tool_call_id` → the `tool_name`
/// of the call it answers. What cannot be translated is refused with the reason.
fn message(i: usize, m: &Value, tool_names: &HashMap<String, String>) -> Result<Value, String> {
    let Some(obj) = m.as_object() else {
        return Err(format!("messages[{i}] must be an object"));
    };
    let mut out = Map::new();
    let role = match obj.get("role").and_then(Value::as_str) {
        Some("developer") => "system",
        Some(r) => r,
        None => return Err(format!("messages[{i}].role must be a string")),
    };
    out.insert("role".into(), json!(role));
    let mut images = Vec::new();
    let content = match obj.get("content").unwrap_or(&Value::Null) {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
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
                        match url.split_once(";base64,") {
                            Some((head, data)) if head.starts_with("data:") => {
                                images.push(json!(data))
                            }
                            _ => {
                                return Err(format!(
                                    "messages[{i}]: the Ollama backend takes images only as data URLs (data:image/png;base64,...); it does not download '{}'",
                                    clip(url, 80)
                                ));
                            }
                        }
                    }
                    other => {
                        return Err(format!(
                            "messages[{i}]: content part type {} is not supported by the Ollama backend (text and image_url are)",
                            other
                                .map(|t| format!("'{}'", clip(t, 40)))
                                .unwrap_or_else(|| "(missing)".into())
                        ));
                    }
                }
            }
            text
        }
        _ => {
            return Err(format!(
                "messages[{i}].content must be a string or an array of parts"
            ));
        }
    };
    out.insert("content".into(), json!(content));
    if !images.is_empty() {
        out.insert("images".into(), Value::Array(images));
    }
    if let Some(calls) = obj.get("tool_calls").and_then(Value::as_array) {
        let calls: Vec<Value> = calls
            .iter()
            .map(|c| {
                let args = &c["function"]["arguments"];
                let args = match args {
                    Value::String(s) => {
                        serde_json::from_str::<Value>(s).unwrap_or_else(|_| args.clone())
                    }
                    other => other.clone(),
                };
                json!({"function": {"name": c["function"]["name"], "arguments": args}})
            })
            .collect();
        out.insert("tool_calls".into(), Value::Array(calls));
    }
    if role == "tool" {
        let name = obj.get("name").and_then(Value::as_str).or_else(|| {
            obj.get("tool_call_id")
                .and_then(Value::as_str)
                .and_then(|id| tool_names.get(id).map(String::as_str))
        });
        if let Some(n) = name {
            out.insert("tool_name".into(), json!(n));
        }
    }
    if let Some(n) = obj.get("tool_name").filter(|v| !v.is_null()) {
        out.insert("tool_name".into(), n.clone());
    }
    Ok(Value::Object(out))
}

/// The chat parameters the Ollama backend cannot honour, refused rather than dropped.
fn check_chat_params(body: &Value) -> Result<(), String> {
    if let Some(n) = body.get("n").filter(|v| !v.is_null())
        && n.as_u64() != Some(1)
    {
        return Err("n must be 1 with the Ollama backend (it returns one choice per request); send the line n times with different custom_ids instead".into());
    }
    if body.get("audio").is_some_and(|v| !v.is_null())
        || body["modalities"]
            .as_array()
            .is_some_and(|m| m.iter().any(|x| x != "text"))
    {
        return Err("audio output is not supported by the Ollama backend".into());
    }
    Ok(())
}

/// The Ollama messages of a chat body (also the validator's check at intake).
fn messages(body: &Value) -> Result<Vec<Value>, String> {
    check_chat_params(body)?;
    let Some(ms) = body["messages"].as_array() else {
        return Err("messages must be an array".into());
    };
    let mut tool_names = HashMap::new();
    let mut out = Vec::with_capacity(ms.len());
    for (i, m) in ms.iter().enumerate() {
        if let Some(calls) = m["tool_calls"].as_array() {
            for c in calls {
                if let (Some(id), Some(name)) = (c["id"].as_str(), c["function"]["name"].as_str()) {
                    tool_names.insert(id.to_string(), name.to_string());
                }
            }
        }
        out.push(message(i, m, &tool_names)?);
    }
    Ok(out)
}

/// Whether a line's body can be translated for Ollama; the reason when not. The intake runs
/// this on every line, so such a batch fails at validation instead of line by line.
pub(crate) fn check(endpoint: Endpoint, body: &Value) -> Result<(), String> {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => messages(body).map(|_| ()),
        Endpoint::Embeddings | Endpoint::Completions => Ok(()),
    }
}

/// What every generating call (`/api/chat`, `/api/generate`) says about the context:
/// - `truncate: false`: a prompt longer than `num_ctx` is an error, not cut to its first few
///   tokens plus its tail (ollama/ollama v0.33 `server/routes.go`: both routes truncate unless
///   told not to);
/// - `shift` (false unless `--context-shift`): Ollama's context shift is on by default
///   (`resolveContextShift` in `server/sched.go`), and with it a generation that reaches
///   `num_ctx` discards the oldest tokens, the start of the shared rubric, and goes on with no
///   sign in the answer. Off, it stops with `done_reason: length` (`llm/llama_server.go`),
///   which is named as such. Shift is a launch attribute of the runner there (a request with
///   another value reloads the model, `needsReload` in `server/sched.go`), so it is the same on
///   every call, like `num_ctx`. (`/api/embed` takes no `shift`: an embedding model runs with
///   Ollama's default.)
fn context_rules(backend: &Backend, r: &mut Map<String, Value>) {
    r.insert("truncate".into(), json!(false));
    r.insert("shift".into(), json!(backend.shift));
}

/// Ollama's `think` for a line: its `reasoning_effort` (`low`, `medium`, `high` as the level;
/// `none` / `minimal` off), else `false`. A thinking model thinks unless told not to
/// (ollama/ollama v0.33 `server/routes.go`: `think` defaults to true when the model has the
/// capability), and its reasoning then takes the `max_tokens` meant for the answer; `false` is
/// accepted by every model (only `true` is refused by one that cannot think).
fn think(body: &Value) -> Value {
    match body.get("reasoning_effort").and_then(Value::as_str) {
        Some(level @ ("low" | "medium" | "high")) => json!(level),
        _ => json!(false),
    }
}

/// OpenAI's `response_format` as Ollama's `format` (a grammar for the answer): `"json"` for
/// any JSON object, the schema itself for `json_schema`.
fn format(body: &Value) -> Option<Value> {
    match body["response_format"]["type"].as_str() {
        Some("json_object") => Some(json!("json")),
        Some("json_schema") => {
            let schema = &body["response_format"]["json_schema"]["schema"];
            Some(if schema.is_null() {
                json!("json")
            } else {
                schema.clone()
            })
        }
        _ => None,
    }
}

fn chat_request(backend: &Backend, body: &Value) -> Result<Value, String> {
    let mut r = base_request(backend, body);
    r.insert("messages".into(), Value::Array(messages(body)?));
    context_rules(backend, &mut r);
    r.insert("think".into(), think(body));
    if let Some(f) = format(body) {
        r.insert("format".into(), f);
    }
    if let Some(tools) = body.get("tools").filter(|v| !v.is_null()) {
        r.insert("tools".into(), tools.clone());
    }
    // Ollama 0.12.11+ returns log probabilities; older versions ignore the request.
    if body["logprobs"] == json!(true) {
        r.insert("logprobs".into(), json!(true));
        if let Some(k) = body.get("top_logprobs").filter(|v| !v.is_null()) {
            r.insert("top_logprobs".into(), k.clone());
        }
    }
    Ok(Value::Object(r))
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

/// The load call of `model` ([`Backend::warm_up`]): an empty prompt with the options every call
/// sends, so that the runner it loads is the one the calls use.
pub(super) fn load_request(backend: &Backend, model: &str) -> Value {
    let mut r = base_request(backend, &json!({"model": model}));
    r.insert("prompt".into(), json!(""));
    context_rules(backend, &mut r);
    Value::Object(r)
}

fn generate_request(backend: &Backend, body: &Value) -> Value {
    let mut r = base_request(backend, body);
    r.insert("prompt".into(), body["prompt"].clone());
    context_rules(backend, &mut r);
    r.insert("think".into(), think(body));
    if let Some(s) = body.get("suffix").filter(|v| !v.is_null()) {
        r.insert("suffix".into(), s.clone());
    }
    if let Some(f) = format(body) {
        r.insert("format".into(), f);
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

/// Ollama's `logprobs` (token, logprob, bytes, top_logprobs) → OpenAI's `logprobs.content`.
fn logprobs(answer: &Value) -> Value {
    let Some(items) = answer["logprobs"].as_array() else {
        return Value::Null;
    };
    let entry = |t: &Value| {
        json!({
            "token": t["token"].as_str().unwrap_or_default(),
            "logprob": t["logprob"].as_f64().unwrap_or(0.0),
            "bytes": t.get("bytes").filter(|b| b.is_array()).cloned().unwrap_or(Value::Null),
        })
    };
    let content: Vec<Value> = items
        .iter()
        .map(|t| {
            let mut e = entry(t);
            e["top_logprobs"] = Value::Array(
                t["top_logprobs"]
                    .as_array()
                    .map(|ts| ts.iter().map(entry).collect())
                    .unwrap_or_default(),
            );
            e
        })
        .collect();
    json!({"content": content, "refusal": null})
}

fn chat_response(answer: &Value, model: &str) -> Result<(Value, Usage), String> {
    let u = usage(answer);
    let message = &answer["message"];
    let calls = message["tool_calls"].as_array().filter(|c| !c.is_empty());
    let content = match &message["content"] {
        Value::String(s) => s.clone(),
        _ if calls.is_some() => String::new(),
        _ if message.is_object() => return Err("with a message that has no content".into()),
        _ => {
            return Err("without a message (an empty 'messages' list only loads the model)".into());
        }
    };
    let mut msg = json!({
        "role": "assistant",
        "content": content,
        "refusal": null,
    });
    // A thinking model's reasoning is kept, as OpenAI-compatible servers name it.
    if let Some(t) = message["thinking"].as_str().filter(|t| !t.is_empty()) {
        msg["reasoning_content"] = json!(t);
    }
    if let Some(calls) = calls {
        let calls: Vec<Value> = calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                json!({
                    "id": format!("call_{i}"),
                    "type": "function",
                    "function": {
                        "name": c["function"]["name"].as_str().unwrap_or_default(),
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
            "logprobs": logprobs(answer),
            "finish_reason": finish_reason(answer),
        }],
        "usage": usage_json(&u),
    });
    Ok((v, u))
}

fn embed_response(answer: &Value, model: &str) -> Result<(Value, Usage), String> {
    let u = usage(answer);
    let Some(es) = answer["embeddings"].as_array().filter(|e| !e.is_empty()) else {
        return Err("without embeddings".into());
    };
    let data: Vec<Value> = es
        .iter()
        .enumerate()
        .map(|(i, e)| json!({"object": "embedding", "index": i, "embedding": e}))
        .collect();
    let v = json!({
        "object": "list",
        "data": data,
        "model": answer["model"].as_str().unwrap_or(model),
        "usage": {"prompt_tokens": u.input_tokens, "total_tokens": u.input_tokens},
    });
    Ok((v, u))
}

fn generate_response(answer: &Value, model: &str) -> Result<(Value, Usage), String> {
    let u = usage(answer);
    let Some(text) = answer["response"].as_str() else {
        return Err("without a response".into());
    };
    let v = json!({
        "id": format!("cmpl-{}", uuid::Uuid::new_v4().simple()),
        "object": "text_completion",
        "created": crate::domain::unix_now(),
        "model": answer["model"].as_str().unwrap_or(model),
        "choices": [{
            "index": 0,
            "text": text,
            "logprobs": null,
            "finish_reason": finish_reason(answer),
        }],
        "usage": usage_json(&u),
    });
    Ok((v, u))
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
    fn thinking_is_off_unless_asked_and_kept_when_it_comes_back() {
        let b = backend();
        let plain = json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]});
        assert_eq!(chat_request(&b, &plain).expect("ok")["think"], false);
        for (effort, want) in [
            ("high", json!("high")),
            ("low", json!("low")),
            ("none", json!(false)),
        ] {
            let mut body = plain.clone();
            body["reasoning_effort"] = json!(effort);
            assert_eq!(
                chat_request(&b, &body).expect("ok")["think"],
                want,
                "{effort}"
            );
        }
        assert_eq!(
            generate_request(&b, &json!({"model": "m", "prompt": "x"}))["think"],
            false
        );
        let answer = json!({"model": "m", "done": true, "done_reason": "stop",
            "message": {"role": "assistant", "content": "7", "thinking": "the rubric says…"},
            "prompt_eval_count": 3, "eval_count": 9});
        let (v, _) = chat_response(&answer, "m").expect("answer");
        assert_eq!(
            v["choices"][0]["message"]["reasoning_content"],
            "the rubric says…"
        );
        assert_eq!(v["choices"][0]["message"]["content"], "7");
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
        let r = chat_request(&backend(), &body).expect("translates");
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
        let (v, u) = chat_response(&answer, "gemma3:12b").expect("answer");
        assert_eq!(v["object"], "chat.completion");
        assert_eq!(v["choices"][0]["message"]["content"], "7");
        assert_eq!(v["choices"][0]["finish_reason"], "length");
        assert_eq!(v["usage"]["prompt_tokens"], 120);
        assert!(v["usage"].get("prompt_tokens_details").is_none());
        assert_eq!(u.cached_tokens, None);
        let with_cache = json!({"message": {"content": ""}, "prompt_eval_count": 10,
            "prompt_eval_cached_count": 8, "eval_count": 1});
        let (v, u) = chat_response(&with_cache, "m").expect("answer");
        assert_eq!(u.cached_tokens, Some(8));
        assert_eq!(v["usage"]["prompt_tokens_details"]["cached_tokens"], 8);
    }
}

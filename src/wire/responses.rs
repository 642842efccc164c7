//! `/v1/responses` lines, run by translation. At validation a Responses body becomes a chat
//! body ([`to_chat`]): `instructions` the leading system message (so that shared instructions are
//! stored once and make a prefix group, as a system prompt does), `input` the messages,
//! `max_output_tokens` → `max_tokens`, `text.format` → `response_format`; what cannot run
//! locally is refused with the parameter that asks for it. The fields a Response echoes ride
//! along under [`ECHO`], which the worker takes off before the call. An answer comes back as a
//! Response object ([`to_response`]), as OpenAI's Batch API writes it in an output line.

use serde_json::{Map, Value, json};

/// The key of a translated body that carries what the Response echoes (never sent).
pub const ECHO: &str = "ollama_batch_response";

/// What cannot be translated: (the parameter, why).
pub type Refusal = (String, String);

fn refuse(param: impl Into<String>, why: impl Into<String>) -> Refusal {
    (param.into(), why.into())
}

/// The text of a message's `content`: a string, or a list of `input_text` / `output_text`
/// parts (joined); `param` names it in a refusal.
fn content_text(content: &Value, param: &str) -> Result<String, Refusal> {
    match content {
        Value::String(s) => Ok(s.clone()),
        Value::Array(parts) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match p.get("type").and_then(Value::as_str) {
                    Some("input_text" | "output_text" | "text") => {
                        let Some(t) = p.get("text").and_then(Value::as_str) else {
                            return Err(refuse(
                                format!("{param}[{j}].text"),
                                "a text part needs its text (a string)",
                            ));
                        };
                        text.push_str(t);
                    }
                    Some(other) => {
                        return Err(refuse(
                            format!("{param}[{j}].type"),
                            format!(
                                "'{}' input cannot run here (images, files and audio are not sent to a local model server); only input_text parts",
                                crate::domain::clip(other, 40)
                            ),
                        ));
                    }
                    None => {
                        return Err(refuse(
                            format!("{param}[{j}].type"),
                            "each content part needs a type (input_text)",
                        ));
                    }
                }
            }
            Ok(text)
        }
        _ => Err(refuse(
            param.to_string(),
            "must be a string or a list of input_text parts",
        )),
    }
}

/// Translates a Responses request body into a chat completion body (see the module doc).
pub fn to_chat(body: &Value) -> Result<Value, Refusal> {
    let Some(obj) = body.as_object() else {
        return Err(refuse("body", "must be a JSON object"));
    };
    // What needs OpenAI's servers (stored responses, tools it runs, files it holds) or a
    // stream, refused by name.
    for (key, what) in [
        (
            "previous_response_id",
            "a stored earlier response (previous_response_id)",
        ),
        ("conversation", "a stored conversation"),
        ("prompt", "a stored prompt template"),
    ] {
        if obj.get(key).is_some_and(|v| !v.is_null()) {
            return Err(refuse(
                format!("body.{key}"),
                format!(
                    "{what} cannot run here: nothing is stored by OpenAI for this server to read"
                ),
            ));
        }
    }
    if obj
        .get("tools")
        .is_some_and(|t| t.as_array().is_none_or(|a| !a.is_empty()))
    {
        return Err(refuse(
            "body.tools",
            "tools cannot run in a /v1/responses batch here (use /v1/chat/completions with tools, which the model server runs)",
        ));
    }
    if obj.get("background") == Some(&Value::Bool(true)) {
        return Err(refuse(
            "body.background",
            "background: true is not supported in a batch (a batch already runs in the background)",
        ));
    }
    if obj.get("store") == Some(&Value::Bool(true)) {
        return Err(refuse(
            "body.store",
            "store: true cannot be honoured: responses are not kept for retrieval (the batch's output file holds them)",
        ));
    }
    let mut messages: Vec<Value> = Vec::new();
    match obj.get("instructions") {
        None | Some(Value::Null) => {}
        Some(Value::String(s)) => messages.push(json!({"role": "system", "content": s})),
        Some(_) => return Err(refuse("body.instructions", "must be a string")),
    }
    match obj.get("input") {
        Some(Value::String(s)) => messages.push(json!({"role": "user", "content": s})),
        Some(Value::Array(items)) if !items.is_empty() => {
            for (i, item) in items.iter().enumerate() {
                let param = format!("body.input[{i}]");
                match item.get("type").and_then(Value::as_str) {
                    None | Some("message") => {}
                    Some(other) => {
                        return Err(refuse(
                            format!("{param}.type"),
                            format!(
                                "'{}' items cannot run here; only messages (role and content)",
                                crate::domain::clip(other, 40)
                            ),
                        ));
                    }
                }
                let role = match item.get("role").and_then(Value::as_str) {
                    Some(r @ ("user" | "assistant" | "system" | "developer")) => r,
                    _ => {
                        return Err(refuse(
                            format!("{param}.role"),
                            "must be user, assistant, system or developer",
                        ));
                    }
                };
                let Some(content) = item.get("content") else {
                    return Err(refuse(format!("{param}.content"), "is missing"));
                };
                let text = content_text(content, &format!("{param}.content"))?;
                messages.push(json!({"role": role, "content": text}));
            }
        }
        Some(Value::Array(_)) => return Err(refuse("body.input", "must not be empty")),
        Some(_) => {
            return Err(refuse(
                "body.input",
                "must be a string or a list of messages",
            ));
        }
        None => return Err(refuse("body.input", "is missing")),
    }
    let mut chat = Map::new();
    chat.insert(
        "model".into(),
        obj.get("model").cloned().unwrap_or(Value::Null),
    );
    chat.insert("messages".into(), Value::Array(messages));
    if let Some(n) = obj.get("max_output_tokens").filter(|v| !v.is_null()) {
        if n.as_u64().is_none_or(|n| n == 0) {
            return Err(refuse(
                "body.max_output_tokens",
                "must be a positive integer",
            ));
        }
        chat.insert("max_tokens".into(), n.clone());
    }
    for key in ["temperature", "top_p"] {
        if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
            if !v.is_number() {
                return Err(refuse(format!("body.{key}"), "must be a number"));
            }
            chat.insert(key.into(), v.clone());
        }
    }
    if let Some(effort) = obj
        .get("reasoning")
        .and_then(|r| r.get("effort"))
        .and_then(Value::as_str)
    {
        chat.insert("reasoning_effort".into(), json!(effort));
    }
    match obj.get("text").and_then(|t| t.get("format")) {
        None | Some(Value::Null) => {}
        Some(f) => match f.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("json_object") => {
                chat.insert("response_format".into(), json!({"type": "json_object"}));
            }
            Some("json_schema") => {
                let Some(schema) = f.get("schema").filter(|s| s.is_object()) else {
                    return Err(refuse(
                        "body.text.format.schema",
                        "a json_schema format needs its schema (a JSON Schema object)",
                    ));
                };
                let mut js = json!({"name": f.get("name").cloned().unwrap_or(json!("answer")),
                                    "schema": schema});
                if let Some(strict) = f.get("strict").filter(|v| !v.is_null()) {
                    js["strict"] = strict.clone();
                }
                chat.insert(
                    "response_format".into(),
                    json!({"type": "json_schema", "json_schema": js}),
                );
            }
            _ => {
                return Err(refuse(
                    "body.text.format.type",
                    "must be text, json_object or json_schema",
                ));
            }
        },
    }
    let echo: Map<String, Value> = [
        "instructions",
        "max_output_tokens",
        "temperature",
        "top_p",
        "text",
        "metadata",
    ]
    .into_iter()
    .filter_map(|k| obj.get(k).map(|v| (k.to_string(), v.clone())))
    .collect();
    chat.insert(ECHO.into(), Value::Object(echo));
    Ok(Value::Object(chat))
}

/// A chat completion answer as the Response object of the request whose echoed fields are
/// `echo` ([`ECHO`] of the translated body).
pub fn to_response(chat: &Value, echo: &Value) -> Value {
    let choice = &chat["choices"][0];
    let text = choice["message"]["content"].as_str().unwrap_or_default();
    let cut = choice["finish_reason"] == "length";
    let u = &chat["usage"];
    let input = u["prompt_tokens"].as_u64().unwrap_or(0);
    let output = u["completion_tokens"].as_u64().unwrap_or(0);
    let created = chat["created"]
        .as_i64()
        .unwrap_or_else(crate::domain::unix_now);
    let id = uuid::Uuid::now_v7().simple().to_string();
    let field = |k: &str| echo.get(k).cloned().unwrap_or(Value::Null);
    json!({
        "id": format!("resp_{id}"),
        "object": "response",
        "created_at": created,
        "status": if cut { "incomplete" } else { "completed" },
        "completed_at": if cut { Value::Null } else { json!(created) },
        "error": null,
        "incomplete_details": if cut { json!({"reason": "max_output_tokens"}) } else { Value::Null },
        "instructions": field("instructions"),
        "max_output_tokens": field("max_output_tokens"),
        "model": chat["model"],
        "output": [{
            "type": "message",
            "id": format!("msg_{id}"),
            "status": if cut { "incomplete" } else { "completed" },
            "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        }],
        "parallel_tool_calls": false,
        "temperature": field("temperature"),
        "text": echo.get("text").cloned().unwrap_or_else(|| json!({"format": {"type": "text"}})),
        "tool_choice": "none",
        "tools": [],
        "top_p": field("top_p"),
        "metadata": echo.get("metadata").filter(|m| !m.is_null()).cloned().unwrap_or_else(|| json!({})),
        "usage": {
            "input_tokens": input,
            "input_tokens_details": {
                "cached_tokens": u["prompt_tokens_details"]["cached_tokens"].as_u64().unwrap_or(0),
                "cache_write_tokens": 0
            },
            "output_tokens": output,
            "output_tokens_details": {
                "reasoning_tokens": u["completion_tokens_details"]["reasoning_tokens"].as_u64().unwrap_or(0)
            },
            "total_tokens": u["total_tokens"].as_u64().unwrap_or(input + output)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_responses_request_becomes_a_chat_request() {
        let r = json!({"model": "m", "instructions": "Score it.", "max_output_tokens": 50,
            "temperature": 0, "metadata": {"k": "v"},
            "input": [{"role": "user", "content": [{"type": "input_text", "text": "cand "},
                                                  {"type": "input_text", "text": "7"}]}],
            "text": {"format": {"type": "json_schema", "name": "s", "strict": true,
                                "schema": {"type": "object"}}}});
        let c = to_chat(&r).expect("translates");
        assert_eq!(
            c["messages"],
            json!([{"role": "system", "content": "Score it."},
                   {"role": "user", "content": "cand 7"}])
        );
        assert_eq!(c["max_tokens"], 50);
        assert_eq!(c["temperature"], 0);
        assert_eq!(
            c["response_format"],
            json!({"type": "json_schema", "json_schema": {"name": "s", "strict": true,
                                                          "schema": {"type": "object"}}})
        );
        assert_eq!(c[ECHO]["metadata"], json!({"k": "v"}));
        let s = to_chat(&json!({"model": "m", "input": "hi"})).expect("a string input");
        assert_eq!(s["messages"], json!([{"role": "user", "content": "hi"}]));
        for (bad, param) in [
            (
                json!({"model": "m", "input": "x", "previous_response_id": "resp_1"}),
                "body.previous_response_id",
            ),
            (
                json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]}),
                "body.tools",
            ),
            (
                json!({"model": "m", "input": "x", "background": true}),
                "body.background",
            ),
            (
                json!({"model": "m", "input": "x", "store": true}),
                "body.store",
            ),
            (
                json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}),
                "body.input[0].content[0].type",
            ),
            (
                json!({"model": "m", "input": [{"type": "function_call_output", "output": "x"}]}),
                "body.input[0].type",
            ),
            (json!({"model": "m"}), "body.input"),
        ] {
            let (p, _) = to_chat(&bad).expect_err("refused");
            assert_eq!(p, param, "{bad}");
        }
    }

    #[test]
    fn a_chat_answer_becomes_a_response() {
        let chat = json!({"id": "chatcmpl-1", "object": "chat.completion", "created": 7, "model": "m",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "hello"},
                         "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 10, "completion_tokens": 2, "total_tokens": 12,
                      "prompt_tokens_details": {"cached_tokens": 8}}});
        let r = to_response(&chat, &json!({"max_output_tokens": 5}));
        assert_eq!(r["object"], "response");
        assert_eq!(r["status"], "completed");
        assert_eq!(r["output"][0]["content"][0]["text"], "hello");
        assert_eq!(r["usage"]["input_tokens_details"]["cached_tokens"], 8);
        assert_eq!(r["usage"]["total_tokens"], 12);
        assert_eq!(r["max_output_tokens"], 5);
        let mut cut = chat.clone();
        cut["choices"][0]["finish_reason"] = json!("length");
        let r = to_response(&cut, &json!({}));
        assert_eq!(
            (
                r["status"].as_str(),
                r["incomplete_details"]["reason"].as_str()
            ),
            (Some("incomplete"), Some("max_output_tokens"))
        );
    }
}

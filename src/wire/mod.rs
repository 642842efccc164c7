//! The OpenAI JSON shapes: file and batch objects, list pages, the error envelope, and the
//! output / error lines. Every field of the batch object is always present (null when unknown).

pub mod responses;
use crate::domain::FileRecord;
use crate::domain::{BatchRecord, RequestCounts, RequestKey, ResultRecord, Usage};
use serde::Serialize;
use serde_json::{Value, json, value::RawValue};

/// The file object.
pub fn file_object(f: &FileRecord) -> Value {
    json!({
        "id": f.id.to_string(),
        "object": "file",
        "bytes": f.bytes,
        "created_at": f.created_at,
        "filename": f.filename,
        "purpose": f.purpose,
        "status": "processed",
        "expires_at": f.expires_at,
        "status_details": null,
    })
}

/// The usage object of a batch. OpenAI's schema requires an integer `cached_tokens`; when no
/// answer of the batch said how many tokens were cached, it is 0 and the extension field
/// `cached_tokens_reported: false` says that the 0 means unknown.
pub fn usage_object(u: &Usage) -> Value {
    let details = match u.cached_tokens {
        Some(c) => json!({"cached_tokens": c}),
        None => json!({"cached_tokens": 0, "cached_tokens_reported": false}),
    };
    json!({
        "input_tokens": u.input_tokens,
        "input_tokens_details": details,
        "output_tokens": u.output_tokens,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u.input_tokens + u.output_tokens,
    })
}

/// The batch object. `live` overrides the stored counts and usage while the batch runs.
pub fn batch_object(b: &BatchRecord, live: Option<(RequestCounts, Usage)>) -> Value {
    let (counts, usage) = live.unwrap_or((b.request_counts, b.usage));
    let errors = if b.errors.is_empty() {
        Value::Null
    } else {
        json!({
            "object": "list",
            "data": b.errors.iter().map(|e| json!({
                "code": e.code, "message": e.message, "param": e.param, "line": e.line,
            })).collect::<Vec<_>>(),
        })
    };
    json!({
        "id": b.id.to_string(),
        "object": "batch",
        "endpoint": b.endpoint.as_str(),
        "errors": errors,
        "input_file_id": b.input_file_id.to_string(),
        "completion_window": b.completion_window,
        "status": b.status.as_str(),
        "output_file_id": b.output_file_id.map(|f| f.to_string()),
        "error_file_id": b.error_file_id.map(|f| f.to_string()),
        "created_at": b.created_at,
        "in_progress_at": b.in_progress_at,
        "expires_at": b.expires_at,
        "finalizing_at": b.finalizing_at,
        "completed_at": b.completed_at,
        "failed_at": b.failed_at,
        "expired_at": b.expired_at,
        "cancelling_at": b.cancelling_at,
        "cancelled_at": b.cancelled_at,
        "request_counts": {"total": counts.total, "completed": counts.completed, "failed": counts.failed},
        "metadata": b.metadata,
        "model": b.model,
        "usage": usage_object(&usage),
    })
}

/// A cursor page: `{object:"list", data, first_id, last_id, has_more}`.
pub fn list_page(data: Vec<Value>, has_more: bool) -> Value {
    let id_of = |v: Option<&Value>| v.and_then(|v| v.get("id")).cloned().unwrap_or(Value::Null);
    json!({
        "object": "list",
        "first_id": id_of(data.first()),
        "last_id": id_of(data.last()),
        "has_more": has_more,
        "data": data,
    })
}

/// OpenAI's error envelope.
pub fn error_body(message: &str, kind: &str, param: Option<&str>, code: Option<&str>) -> Value {
    json!({"error": {"message": message, "type": kind, "param": param, "code": code}})
}

#[derive(Serialize)]
struct ResponsePart<'a> {
    status_code: u16,
    request_id: String,
    body: &'a RawValue,
}

#[derive(Serialize)]
struct ErrorPart<'a> {
    code: &'a str,
    message: &'a str,
}

#[derive(Serialize)]
struct OutputLine<'a> {
    id: String,
    custom_id: &'a str,
    response: Option<ResponsePart<'a>>,
    error: Option<ErrorPart<'a>>,
}

/// One line of an output or error file (without the newline). The backend's body is embedded
/// as it was stored; a body that is not JSON (never stored by us, but a corrupt store could hold
/// one) is embedded as a JSON string.
pub fn output_line(key: RequestKey, custom_id: &str, result: &ResultRecord) -> String {
    let raw: Option<Box<RawValue>> = result.body.as_deref().map(|b| {
        // A line break inside the body would split the JSONL record: re-serialize compactly
        // (answers are compacted when they arrive; this covers records stored before that).
        let text = if b.contains(['\n', '\r']) {
            serde_json::from_str::<serde_json::Value>(b)
                .map(|v| v.to_string())
                .unwrap_or_else(|_| b.to_string())
        } else {
            b.to_string()
        };
        RawValue::from_string(text).unwrap_or_else(|_| {
            let quoted = serde_json::to_string(b).unwrap_or_else(|_| "null".into());
            RawValue::from_string(quoted).unwrap_or_default()
        })
    });
    let response = match (result.status_code, raw.as_deref()) {
        (Some(status_code), Some(body)) => Some(ResponsePart {
            status_code,
            request_id: key.request_id(),
            body,
        }),
        _ => None,
    };
    // An answer that came but cannot count (`invalid_answer`, `answer_truncated`) has both: the
    // answer as it came, and why it is in the error file.
    let error = if response.is_none() || result.error_code.is_some() {
        Some(ErrorPart {
            code: result.error_code.as_deref().unwrap_or("internal_error"),
            message: result.error_message.as_deref().unwrap_or(""),
        })
    } else {
        None
    };
    let line = OutputLine {
        id: key.output_id(),
        custom_id,
        response,
        error,
    };
    serde_json::to_string(&line).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::BatchId;

    #[test]
    fn output_lines_match_the_contract() {
        let key = RequestKey {
            batch: BatchId::new(),
            line: 3,
        };
        let ok = ResultRecord::answer(200, r#"{"id":"x","choices":[]}"#.into(), None);
        let v: Value = serde_json::from_str(&output_line(key, "c-3", &ok)).expect("json");
        assert_eq!(v["custom_id"], "c-3");
        assert_eq!(v["response"]["status_code"], 200);
        assert_eq!(v["response"]["body"]["id"], "x");
        assert!(v["error"].is_null());
        assert!(v["id"].as_str().expect("id").starts_with("batch_req_"));

        let timeout = ResultRecord::error("request_timeout", "timed out after 8 attempts");
        let v: Value = serde_json::from_str(&output_line(key, "c-3", &timeout)).expect("json");
        assert!(v["response"].is_null());
        assert_eq!(v["error"]["code"], "request_timeout");
    }
}

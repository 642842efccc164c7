//! The pure rules of one input line: everything OpenAI checks (and what the configured
//! backend cannot run), each failure a [`LineError`] naming the 1-based line and the parameter.
//! No store, no I/O beyond reading a line from a buffered reader.

use crate::config::BackendKind;
use crate::domain::{Endpoint, LineError};
use serde_json::Value;
use std::io::BufRead;

/// Reads one line of at most `max` bytes into `buf` (without the newline). Returns `None` at
/// end of file, else whether the line was too long (then `buf` is empty and the rest of the
/// line was skipped without being kept in memory).
pub(super) fn read_line_bounded(
    r: &mut impl BufRead,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Option<bool>> {
    buf.clear();
    let mut too_long = false;
    let mut any = false;
    loop {
        let avail = r.fill_buf()?;
        if avail.is_empty() {
            return Ok(any.then_some(too_long));
        }
        any = true;
        let (chunk, consumed, done) = match avail.iter().position(|&b| b == b'\n') {
            Some(i) => (&avail[..i], i + 1, true),
            None => (avail, avail.len(), false),
        };
        if !too_long {
            if buf.len() + chunk.len() > max {
                too_long = true;
                buf.clear();
                buf.shrink_to(64 << 10);
            } else {
                buf.extend_from_slice(chunk);
            }
        }
        r.consume(consumed);
        if done {
            if buf.last() == Some(&b'\r') {
                buf.pop();
            }
            return Ok(Some(too_long));
        }
    }
}

/// A validation error for line `line`.
pub(super) fn err(line: u32, code: &str, param: Option<&str>, message: String) -> LineError {
    LineError {
        code: code.into(),
        message,
        param: param.map(str::to_string),
        line: Some(line),
    }
}

/// Characters of a value quoted in a validation error: an error never copies a large value (a
/// 32 MiB url would otherwise be stored in the batch and sent on every GET).
const QUOTED: usize = 64;

/// A value as a validation error quotes it.
pub(super) fn clip(s: &str) -> String {
    crate::domain::clip(s, QUOTED)
}

/// JSON's name for a value's type, for "must be a string, got a number".
fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// A missing field and a field of the wrong type get different errors.
fn field_error(line_no: u32, param: &str, v: Option<&Value>, want: &str) -> LineError {
    match v {
        None => err(
            line_no,
            "missing_required_parameter",
            Some(param),
            format!("line {line_no}: {param} is missing (it must be {want})"),
        ),
        Some(v) => err(
            line_no,
            "invalid_type",
            Some(param),
            format!(
                "line {line_no}: {param} must be {want}, got {}",
                type_name(v)
            ),
        ),
    }
}

/// What the body of each endpoint must carry (so that a typo such as `"message"` fails at
/// validation instead of reaching the backend, which may answer an empty 200).
fn check_body(line_no: u32, endpoint: Endpoint, body: &Value) -> Result<(), LineError> {
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => {
            let ms = body.get("messages");
            let Some(list) = ms.and_then(Value::as_array) else {
                return Err(field_error(
                    line_no,
                    "body.messages",
                    ms,
                    "an array of messages",
                ));
            };
            if list.is_empty() {
                return Err(err(
                    line_no,
                    "invalid_value",
                    Some("body.messages"),
                    format!("line {line_no}: body.messages must not be empty"),
                ));
            }
            for (i, m) in list.iter().enumerate() {
                let role = m.get("role");
                if !role.is_some_and(Value::is_string) {
                    let param = format!("body.messages[{i}].role");
                    return Err(if m.is_object() {
                        field_error(line_no, &param, role, "a string")
                    } else {
                        field_error(
                            line_no,
                            &format!("body.messages[{i}]"),
                            Some(m),
                            "an object",
                        )
                    });
                }
            }
            // A schema for the answer must be a JSON Schema object (a string or a list is sent
            // on to the backend, which fails every line or ignores it).
            let schema = body.pointer("/response_format/json_schema/schema");
            if body
                .pointer("/response_format/type")
                .and_then(Value::as_str)
                == Some("json_schema")
                && let Some(s) = schema.filter(|s| !s.is_object())
            {
                return Err(field_error(
                    line_no,
                    "body.response_format.json_schema.schema",
                    Some(s),
                    "a JSON Schema object",
                ));
            }
            Ok(())
        }
        // An empty input (or an empty string in a list) is answered by Ollama with 200 and no
        // embedding: refused here, not discovered per line.
        Endpoint::Embeddings => match body.get("input") {
            Some(Value::String(s)) if !s.is_empty() => Ok(()),
            Some(Value::Array(a)) if !a.is_empty() && !a.iter().any(|v| v.as_str() == Some("")) => {
                Ok(())
            }
            Some(Value::String(_) | Value::Array(_)) => Err(err(
                line_no,
                "invalid_value",
                Some("body.input"),
                format!("line {line_no}: body.input must not be empty"),
            )),
            other => Err(field_error(
                line_no,
                "body.input",
                other,
                "a string or an array",
            )),
        },
        Endpoint::Completions => match body.get("prompt") {
            Some(Value::String(_) | Value::Array(_)) => Ok(()),
            other => Err(field_error(
                line_no,
                "body.prompt",
                other,
                "a string or an array",
            )),
        },
    }
}

/// The rules of one line that need no other line. Returns the line's custom_id, model and body.
pub(crate) fn check_line(
    line_no: u32,
    bytes: &[u8],
    endpoint: Endpoint,
    backend: BackendKind,
) -> Result<(String, String, Value), LineError> {
    // A byte-order mark (Windows editors write one) is not part of the JSON.
    let bytes = if line_no == 1 {
        bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes)
    } else {
        bytes
    };
    let v: Value = serde_json::from_slice(bytes).map_err(|e| {
        err(
            line_no,
            "invalid_json_line",
            None,
            format!("line {line_no} is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(mut obj) = v else {
        return Err(err(
            line_no,
            "invalid_request",
            None,
            format!(
                "line {line_no} must be a JSON object, got {}",
                type_name(&v)
            ),
        ));
    };
    let custom_id = match obj.get("custom_id") {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::String(_)) => {
            return Err(err(
                line_no,
                "invalid_value",
                Some("custom_id"),
                format!("line {line_no}: custom_id must not be empty"),
            ));
        }
        other => {
            return Err(field_error(
                line_no,
                "custom_id",
                other,
                "a non-empty string",
            ));
        }
    };
    match obj.get("method") {
        Some(Value::String(m)) if m == "POST" => {}
        Some(Value::String(m)) => {
            return Err(err(
                line_no,
                "invalid_method",
                Some("method"),
                format!("line {line_no}: method must be \"POST\", got '{}'", clip(m)),
            ));
        }
        other => return Err(field_error(line_no, "method", other, "\"POST\"")),
    }
    match obj.get("url") {
        Some(Value::String(u)) if u == endpoint.as_str() => {}
        Some(Value::String(u)) => {
            return Err(err(
                line_no,
                "invalid_url",
                Some("url"),
                format!(
                    "line {line_no}: url '{}' does not match the batch endpoint '{}'",
                    clip(u),
                    endpoint.as_str()
                ),
            ));
        }
        other => return Err(field_error(line_no, "url", other, "a string")),
    }
    let body = match obj.remove("body") {
        Some(b @ Value::Object(_)) => b,
        other => {
            return Err(field_error(
                line_no,
                "body",
                other.as_ref(),
                "a JSON object",
            ));
        }
    };
    let model = match body.get("model") {
        Some(Value::String(m)) if !m.is_empty() => m.clone(),
        Some(Value::String(_)) => {
            return Err(err(
                line_no,
                "invalid_value",
                Some("body.model"),
                format!("line {line_no}: body.model must not be empty"),
            ));
        }
        other => {
            return Err(field_error(
                line_no,
                "body.model",
                other,
                "a non-empty string",
            ));
        }
    };
    if body.get("stream") == Some(&Value::Bool(true)) {
        return Err(err(
            line_no,
            "invalid_value",
            Some("body.stream"),
            format!("line {line_no}: stream: true is not supported in a batch"),
        ));
    }
    // A Responses line runs as a chat call: translated here, checked as one.
    let body = if endpoint == Endpoint::Responses {
        crate::wire::responses::to_chat(&body).map_err(|(param, why)| {
            err(
                line_no,
                "unsupported_parameter",
                Some(&param),
                format!("line {line_no}: {param} {why}"),
            )
        })?
    } else {
        body
    };
    let endpoint = endpoint.called_as();
    check_body(line_no, endpoint, &body)?;
    crate::backend::check_line(backend, endpoint, &body).map_err(|reason| {
        err(
            line_no,
            "unsupported_parameter",
            Some("body"),
            format!("line {line_no}: {reason}"),
        )
    })?;
    Ok((custom_id, model, body))
}

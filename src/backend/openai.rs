//! OpenAI-compatible servers (llama.cpp, vLLM, LM Studio, SGLang, Ollama's `/v1`): the line's
//! body goes as it is; the answer body is kept as it is.

use super::{Backend, wrap_error};
use crate::domain::{CallResult, Endpoint, Usage};
use serde_json::Value;

pub(super) async fn call(backend: &Backend, endpoint: Endpoint, body: Value) -> CallResult {
    let (status, text) = match backend.post(endpoint.as_str(), &body).await {
        Ok(answer) => answer,
        Err(failure) => return failure,
    };
    match serde_json::from_str::<Value>(&text) {
        Ok(v) if (200..300).contains(&status) => CallResult::Answered {
            status,
            usage: Some(usage_of(&v)),
            body: text,
        },
        Ok(_) => CallResult::Answered {
            status,
            body: text,
            usage: None,
        },
        // A 2xx that is not JSON is a broken answer, worth another try.
        Err(_) if (200..300).contains(&status) => CallResult::Transport(format!(
            "backend answered {status} with a body that is not JSON ({} bytes)",
            text.len()
        )),
        Err(_) => CallResult::Answered {
            status,
            body: wrap_error(status, text.trim()),
            usage: None,
        },
    }
}

/// Usage from an OpenAI answer; cached tokens from `prompt_tokens_details.cached_tokens`, or
/// from llama.cpp's `timings.cache_n` on builds that do not report the former.
pub(crate) fn usage_of(v: &Value) -> Usage {
    let u = &v["usage"];
    let cached = u["prompt_tokens_details"]["cached_tokens"]
        .as_u64()
        .or_else(|| v["timings"]["cache_n"].as_u64());
    Usage {
        input_tokens: u["prompt_tokens"].as_u64().unwrap_or(0),
        cached_tokens: cached,
        output_tokens: u["completion_tokens"].as_u64().unwrap_or(0),
    }
}

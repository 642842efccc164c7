//! OpenAI-compatible servers (llama.cpp, vLLM, LM Studio, SGLang, Ollama's `/v1`): the line's
//! body goes as it is; the answer is kept as it is, except that a pretty-printed answer is
//! compacted (a line break inside it would split the JSONL record) and an answer that is not
//! an answer (no `choices` / `data`, or an `{"error": …}` with a 200) is not a success.

use super::{Backend, compact, wrap_error};
use crate::domain::{CallResult, Endpoint, Usage};
use serde_json::Value;

pub(super) async fn call(backend: &Backend, endpoint: Endpoint, body: &Value) -> CallResult {
    match backend.post(endpoint.as_str(), body).await {
        Ok((status, text, retry_after)) => {
            crate::domain::outcome::busy_or(interpret(endpoint, status, &text), retry_after)
        }
        Err(failure) => failure,
    }
}

/// What an answer (`status`, body `text`) of an OpenAI-compatible server means. Pure, so that
/// it is tested (and fuzzed) without a server.
pub(crate) fn interpret(endpoint: Endpoint, status: u16, text: &str) -> CallResult {
    let ok = (200..300).contains(&status);
    let parsed = serde_json::from_str::<Value>(text);
    match parsed {
        Ok(v) if ok => {
            let expected = match endpoint {
                Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses => {
                    "choices"
                }
                Endpoint::Embeddings => "data",
            };
            if v[expected].as_array().is_none_or(|a| a.is_empty()) {
                // Some gateways answer an error with a 200.
                if let Some(e) = v.get("error").filter(|e| !e.is_null()) {
                    let message = e
                        .as_str()
                        .or_else(|| e["message"].as_str())
                        .map(str::to_string)
                        .unwrap_or_else(|| e.to_string());
                    return CallResult::Answered {
                        status: 502,
                        body: wrap_error(502, &message),
                        usage: None,
                    };
                }
                return CallResult::Invalid {
                    code: "invalid_backend_answer".into(),
                    message: format!(
                        "the backend answered {status} without '{expected}' ({} bytes)",
                        text.len()
                    ),
                    retry: true,
                };
            }
            CallResult::Answered {
                status,
                usage: Some(usage_of(&v)),
                body: compact(text, &v),
            }
        }
        Ok(v) => CallResult::Answered {
            status,
            body: compact(text, &v),
            usage: None,
        },
        // A 2xx that is not JSON is a broken answer, worth another try.
        Err(_) if ok => CallResult::Invalid {
            code: "invalid_backend_answer".into(),
            message: format!(
                "the backend answered {status} with a body that is not JSON ({} bytes)",
                text.len()
            ),
            retry: true,
        },
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::outcome::{Verdict, classify};

    #[test]
    fn pretty_printed_answers_become_one_line() {
        let pretty = "{\n  \"id\": \"x\",\n  \"choices\": [\n    {\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"a\\nb\"}}\n  ]\n}\n";
        let CallResult::Answered { status, body, .. } =
            interpret(Endpoint::ChatCompletions, 200, pretty)
        else {
            panic!("not answered")
        };
        assert_eq!(status, 200);
        assert!(!body.contains('\n'), "{body}");
        let v: Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["choices"][0]["message"]["content"], "a\nb");
    }

    #[test]
    fn a_200_without_an_answer_is_not_a_success() {
        for (endpoint, text) in [
            (Endpoint::ChatCompletions, r#"{"id":"x"}"#),
            (Endpoint::ChatCompletions, r#"{"choices":[]}"#),
            (Endpoint::Embeddings, r#"{"object":"list"}"#),
            (Endpoint::Completions, "not json"),
        ] {
            let r = interpret(endpoint, 200, text);
            assert!(
                matches!(r, CallResult::Invalid { retry: true, .. }),
                "{text}: {r:?}"
            );
            assert_eq!(classify(&r), Verdict::Transient);
        }
        let r = interpret(
            Endpoint::ChatCompletions,
            200,
            r#"{"error":{"message":"upstream exploded"}}"#,
        );
        let CallResult::Answered { status, body, .. } = &r else {
            panic!("{r:?}")
        };
        assert_eq!(*status, 502);
        assert!(body.contains("upstream exploded"), "{body}");
        assert_eq!(classify(&r), Verdict::Transient);
    }
}

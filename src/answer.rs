//! Answers that were asked to be JSON: what a line asks for (`response_format` `json_schema` or
//! `json_object`), the check of an answer against it (a Markdown fence removed first), the
//! validator's errors in words a model can act on, and the re-ask that names them. Pure apart
//! from a cache of compiled schemas; the worker runs it on every answer, the intake compiles
//! every schema once at validation.
//!
//! Schemas are compiled with `jsonschema` built without its HTTP and file resolvers: a remote
//! `$ref` is never fetched; it is refused at validation.

use crate::domain::Endpoint;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

/// Validator errors named in a re-ask or an error line, at most.
const ERRORS_SHOWN: usize = 8;
/// Each error's text, at most (characters).
const ERROR_CHARS: usize = 300;

/// What a line asks its answer to be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Wanted<'a> {
    /// Any JSON object (`json_object`, or `json_schema` without a schema).
    Object,
    /// A JSON value valid under this schema.
    Schema(&'a Value),
}

/// What the line's body asks for, if anything: `response_format` on chat and completions
/// (llama.cpp, vLLM and Ollama's translation honour it on both).
pub fn wanted(endpoint: Endpoint, body: &Value) -> Option<Wanted<'_>> {
    if endpoint == Endpoint::Embeddings {
        return None;
    }
    let rf = body.get("response_format")?;
    match rf.get("type").and_then(Value::as_str)? {
        "json_object" => Some(Wanted::Object),
        "json_schema" => match rf.pointer("/json_schema/schema") {
            Some(s) if s.is_object() => Some(Wanted::Schema(s)),
            _ => Some(Wanted::Object),
        },
        _ => None,
    }
}

/// Compiles a schema: the validator, or why the schema is not one (not a valid schema under its
/// draft's meta-schema, or a `$ref` to a document that is not inside it).
pub fn compile(schema: &Value) -> Result<jsonschema::Validator, String> {
    jsonschema::options()
        .build(schema)
        .map_err(|e| {
            let text = e.to_string();
            if text.contains("retrieving it failed")
                || text.contains("Retrieval is disabled")
                || text.contains("resolver is required")
            {
                format!(
                    "the schema refers to another document ({text}): remote `$ref`s are not fetched; put the definition inside the schema (`$defs`)"
                )
            } else {
                format!("not a valid JSON Schema: {text}")
            }
        })
}

/// A schema compiled, or why it is not one.
type Compiled = Result<Arc<jsonschema::Validator>, String>;

/// A schema and what compiling it gave.
type Cached = (Value, Compiled);

/// Compiled schemas, found again by a hash of the schema and compared in full (no text is
/// built per call): a 170,000-line batch with one schema compiles it once.
#[derive(Default, Clone)]
pub struct Schemas {
    cache: Arc<Mutex<HashMap<u64, Vec<Cached>>>>,
}

impl Schemas {
    /// The validator of `schema` (compiled the first time it is seen).
    pub fn get(&self, schema: &Value) -> Compiled {
        let h = {
            let mut sink = HashSink(std::collections::hash_map::DefaultHasher::new());
            canonical(schema, &mut sink);
            std::hash::Hasher::finish(&sink.0)
        };
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, v)) = cache
            .get(&h)
            .and_then(|l| l.iter().find(|(s, _)| s == schema))
        {
            return v.clone();
        }
        // A bounded cache: a server that sees many distinct schemas recompiles, never grows.
        if cache.len() >= 256 {
            cache.clear();
        }
        let v = compile(schema).map(Arc::new);
        cache
            .entry(h)
            .or_default()
            .push((schema.clone(), v.clone()));
        v
    }
}

/// The answer text of an OpenAI-shaped answer body, and whether it was cut off at the token
/// limit. `None` when the body carries no text answer (a tool call, an unknown shape).
pub fn answer_text(endpoint: Endpoint, body: &Value) -> Option<(&str, bool)> {
    let choice = body.get("choices")?.get(0)?;
    let text = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => {
            choice.pointer("/message/content")?.as_str()?
        }
        Endpoint::Completions => choice.get("text")?.as_str()?,
        Endpoint::Embeddings => return None,
    };
    let cut = choice.get("finish_reason").and_then(Value::as_str) == Some("length");
    Some((text, cut))
}

/// The JSON inside a Markdown code fence (```` ```json … ``` ````, with or without a language
/// tag, with or without words around it), when the text has one.
pub fn strip_fence(text: &str) -> Option<&str> {
    let start = text.find("```")?;
    let after = &text[start + 3..];
    // The rest of the opening line is the language tag.
    let body_start = after.find('\n').map(|i| i + 1)?;
    let inner = &after[body_start..];
    let end = inner.rfind("```")?;
    Some(inner[..end].trim())
}

/// What the check found.
#[derive(Debug, PartialEq)]
pub enum Checked {
    /// Valid. `bare`: the JSON text when a fence had to be removed to find it.
    Valid {
        /// The bare JSON text, when the answer was fenced.
        bare: Option<String>,
    },
    /// Not valid: the errors, each naming where (`/score`: …).
    Invalid(Vec<String>),
}

/// Checks an answer text against what was wanted (the schema's validator when there is one).
pub fn check(text: &str, wanted: Wanted<'_>, validator: Option<&jsonschema::Validator>) -> Checked {
    let trimmed = text.trim();
    let (value, bare) = match serde_json::from_str::<Value>(trimmed) {
        Ok(v) => (v, None),
        Err(e) => match strip_fence(trimmed).map(|t| (t, serde_json::from_str::<Value>(t))) {
            Some((t, Ok(v))) => (v, Some(t.to_string())),
            _ => {
                return Checked::Invalid(vec![format!(
                    "the answer is not JSON ({e}); it must be only the JSON value, with no other text"
                )]);
            }
        },
    };
    let errors: Vec<String> = match (wanted, validator) {
        (Wanted::Schema(_), Some(v)) => v
            .iter_errors(&value)
            .take(ERRORS_SHOWN)
            .map(|e| {
                let path = e.instance_path().to_string();
                let at = if path.is_empty() { "/".into() } else { path };
                crate::domain::clip(&format!("`{at}`: {e}"), ERROR_CHARS)
            })
            .collect(),
        _ if !value.is_object() => vec!["`/`: the answer must be a JSON object".into()],
        _ => vec![],
    };
    if errors.is_empty() {
        Checked::Valid { bare }
    } else {
        Checked::Invalid(errors)
    }
}

/// The user message of a re-ask: what was wrong, and what to do.
pub fn reask_message(errors: &[String]) -> String {
    let mut m = String::from("Your answer was not valid JSON for the required format:\n");
    for e in errors {
        m.push_str("- ");
        m.push_str(e);
        m.push('\n');
    }
    m.push_str("Answer again with only the corrected JSON, no other text and no code fence.");
    m
}

/// The request of a re-ask: the same request with the model's answer and a message naming what
/// was wrong appended (chat: an assistant and a user message; completions: the prompt goes on
/// with them). `None` when the body cannot carry them (a prompt that is not a string).
pub fn reask_body(
    endpoint: Endpoint,
    body: &Value,
    answer: &str,
    errors: &[String],
) -> Option<Value> {
    let mut b = body.clone();
    let message = reask_message(errors);
    match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => {
            let list = b.get_mut("messages")?.as_array_mut()?;
            list.push(json!({"role": "assistant", "content": answer}));
            list.push(json!({"role": "user", "content": message}));
        }
        Endpoint::Completions => {
            let prompt = b.get("prompt")?.as_str()?;
            let more = format!("{prompt}{answer}\n\n{message}\n\n");
            b["prompt"] = Value::String(more);
        }
        Endpoint::Embeddings => return None,
    }
    Some(b)
}

/// The answer body with its text replaced by `bare` (the JSON without its fence).
pub fn with_text(endpoint: Endpoint, body: &mut Value, bare: &str) {
    let slot = match endpoint {
        Endpoint::ChatCompletions | Endpoint::Responses => {
            body.pointer_mut("/choices/0/message/content")
        }
        Endpoint::Completions => body.pointer_mut("/choices/0/text"),
        Endpoint::Embeddings => None,
    };
    if let Some(s) = slot {
        *s = Value::String(bare.to_string());
    }
}

/// The key under which a successful answer is found again: SHA-256 over the endpoint, what the
/// backend is told beside the body (its kind, `num_ctx`, context shift) and the body as sent
/// (model mapped, shared contents restored) in canonical JSON (object keys sorted, no spaces).
/// Two lines with the same key ask the same thing of the same model in the same way.
pub fn reuse_key(endpoint: Endpoint, options: &str, body: &Value) -> [u8; 32] {
    use sha2::Digest as _;
    let mut sink = HashSink(sha2::Sha256::new());
    sink.put(b"reuse-v1\0");
    sink.put(endpoint.as_str().as_bytes());
    sink.put(b"\0");
    sink.put(options.as_bytes());
    sink.put(b"\0");
    canonical(body, &mut sink);
    sink.0.finalize().into()
}

/// A hash canonical JSON can be fed into: SHA-256 (reuse keys, stored) or SipHash (the schema
/// cache, in memory).
trait Feed {
    fn feed(&mut self, b: &[u8]);
}

impl Feed for sha2::Sha256 {
    fn feed(&mut self, b: &[u8]) {
        sha2::Digest::update(self, b);
    }
}

impl Feed for std::collections::hash_map::DefaultHasher {
    fn feed(&mut self, b: &[u8]) {
        std::hash::Hasher::write(self, b);
    }
}

/// Feeds what is written into the hash (no copy of the canonical text is kept).
struct HashSink<H: Feed>(H);

impl<H: Feed> HashSink<H> {
    fn put(&mut self, b: &[u8]) {
        self.0.feed(b);
    }
}

impl<H: Feed> std::io::Write for HashSink<H> {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.put(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// `v` as canonical JSON into the hash: object keys in byte order, whatever order the line had
/// them in; strings and numbers as serde_json writes them.
fn canonical<H: Feed>(v: &Value, out: &mut HashSink<H>) {
    match v {
        Value::Object(m) => {
            let mut keys: Vec<&String> = m.keys().collect();
            keys.sort_unstable();
            out.put(b"{");
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                // Writing into a hash cannot fail.
                let _ = serde_json::to_writer(&mut *out, k);
                out.put(b":");
                canonical(&m[k], out);
            }
            out.put(b"}");
        }
        Value::Array(a) => {
            out.put(b"[");
            for (i, x) in a.iter().enumerate() {
                if i > 0 {
                    out.put(b",");
                }
                canonical(x, out);
            }
            out.put(b"]");
        }
        other => {
            let _ = serde_json::to_writer(&mut *out, other);
        }
    }
}

/// What the checks of one line's calls came to, for the figures.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The answer was checked (the line asked for JSON and an answer came).
    pub checked: bool,
    /// A fence was removed from the answer kept.
    pub fenced: bool,
    /// Re-asks made.
    pub reasks: u32,
    /// It ended as `invalid_answer`.
    pub invalid: bool,
    /// It ended as `answer_truncated`.
    pub truncated: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        json!({"type": "object", "required": ["score", "reason"],
               "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                              "reason": {"type": "string"}}})
    }

    #[test]
    fn fences_are_removed_and_errors_name_their_path() {
        let s = schema();
        let v = compile(&s).expect("compiles");
        let fenced = "Here it is:\n```json\n{\"score\": 7, \"reason\": \"ok\"}\n```\n";
        assert_eq!(
            check(fenced, Wanted::Schema(&s), Some(&v)),
            Checked::Valid {
                bare: Some("{\"score\": 7, \"reason\": \"ok\"}".into())
            }
        );
        assert_eq!(
            check(
                "{\"score\": 7, \"reason\": \"ok\"}",
                Wanted::Schema(&s),
                Some(&v)
            ),
            Checked::Valid { bare: None }
        );
        let Checked::Invalid(errs) = check(
            "{\"score\": \"excellent\", \"reason\": \"ok\"}",
            Wanted::Schema(&s),
            Some(&v),
        ) else {
            panic!("must be invalid")
        };
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert!(
            errs[0].starts_with("`/score`: \"excellent\" is not of type \"integer\""),
            "{errs:?}"
        );
        let Checked::Invalid(errs) = check("{\"score\": 3}", Wanted::Schema(&s), Some(&v)) else {
            panic!("must be invalid")
        };
        assert!(
            errs[0].contains("\"reason\" is a required property"),
            "{errs:?}"
        );
        assert!(matches!(
            check("[1]", Wanted::Object, None),
            Checked::Invalid(_)
        ));
        assert!(matches!(
            check("{\"score\": 7", Wanted::Object, None),
            Checked::Invalid(e) if e[0].starts_with("the answer is not JSON")
        ));
    }

    /// The check alone: 170,000 small answers against the example's schema (release:
    /// `scripts/bench-schema.sh`).
    #[test]
    #[ignore = "benchmark: run scripts/bench-schema.sh"]
    fn bench_check_170000_answers() {
        let s = json!({"type": "object", "required": ["score", "recommendation", "reasoning"],
            "additionalProperties": false,
            "properties": {"score": {"type": "integer", "minimum": 1, "maximum": 10},
                           "recommendation": {"enum": ["Strong Yes", "Yes", "Maybe", "No", "Strong No"]},
                           "reasoning": {"type": "string", "minLength": 1, "maxLength": 600}}});
        let body = json!({"choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant",
            "content": "```json\n{\"score\": 7, \"recommendation\": \"Yes\", \"reasoning\": \"Eleven years on payment platforms; led the Kafka migration.\"}\n```"}}]});
        let text = body.to_string();
        let schemas = Schemas::default();
        let t0 = std::time::Instant::now();
        let mut valid = 0;
        for _ in 0..170_000 {
            // As the worker does: parse the answer body, find the text, check it.
            let parsed: Value = serde_json::from_str(&text).expect("json");
            let (answer, _) = answer_text(Endpoint::ChatCompletions, &parsed).expect("text");
            let v = schemas.get(&s).expect("schema");
            if matches!(
                check(answer, Wanted::Schema(&s), Some(&v)),
                Checked::Valid { .. }
            ) {
                valid += 1;
            }
        }
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(valid, 170_000);
        println!(
            "answers checked: 170000 fenced answers (parse, fence, schema) in {secs:.3} s: {:.2} µs each",
            secs * 1e6 / 170_000.0
        );
    }

    #[test]
    fn bad_and_remote_schemas_are_refused() {
        let e = compile(&json!({"type": 12})).expect_err("not a schema");
        assert!(e.starts_with("not a valid JSON Schema"), "{e}");
        let e = compile(&json!({"$ref": "https://example.com/s.json"})).expect_err("remote");
        assert!(e.contains("remote `$ref`s are not fetched"), "{e}");
        compile(&json!({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"}))
            .expect("a local $ref is fine");
    }

    #[test]
    fn the_reuse_key_ignores_key_order_and_sees_every_value() {
        let a =
            json!({"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]});
        let b: Value = serde_json::from_str(
            r#"{"messages":[{"content":"x","role":"user"}],"max_tokens":8,"model":"m"}"#,
        )
        .expect("json");
        let k = |v: &Value| reuse_key(Endpoint::ChatCompletions, "ollama", v);
        assert_eq!(k(&a), k(&b));
        let mut c = a.clone();
        c["max_tokens"] = json!(9);
        assert_ne!(k(&a), k(&c));
        assert_ne!(
            k(&a),
            reuse_key(Endpoint::ChatCompletions, "ollama num_ctx=8192", &a)
        );
        assert_ne!(k(&a), reuse_key(Endpoint::Completions, "ollama", &a));
    }

    #[test]
    fn a_reask_carries_the_answer_and_the_errors() {
        let body = json!({"model": "m", "messages": [{"role": "user", "content": "rate"}]});
        let errs = vec!["`/score`: missing".to_string()];
        let r = reask_body(Endpoint::ChatCompletions, &body, "{}", &errs).expect("chat");
        let m = r["messages"].as_array().expect("list");
        assert_eq!(m.len(), 3);
        assert_eq!(m[1], json!({"role": "assistant", "content": "{}"}));
        assert!(
            m[2]["content"]
                .as_str()
                .is_some_and(|c| c.contains("`/score`: missing"))
        );
        let p = json!({"model": "m", "prompt": "Rate: "});
        let r = reask_body(Endpoint::Completions, &p, "{}", &errs).expect("completions");
        assert!(
            r["prompt"]
                .as_str()
                .is_some_and(|s| s.starts_with("Rate: {}") && s.contains("`/score`"))
        );
    }
}

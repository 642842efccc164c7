//! Property tests: arbitrary bytes and arbitrary JSON fed to the intake's line validator and to
//! the backend answer parsers. None may panic; every result is bounded by its input (no
//! unbounded memory: an error never copies a large value, an answer never grows beyond a
//! small factor of what the backend sent); every answer that becomes an output line is one
//! line of JSON.

use crate::backend::{ollama, openai};
use crate::config::BackendKind;
use crate::domain::outcome::{classify, error_message};
use crate::domain::{CallResult, Endpoint, RequestKey, ResultRecord};
use crate::intake::check_line;
use proptest::prelude::*;
use serde_json::{Value, json};

fn endpoint() -> impl Strategy<Value = Endpoint> {
    prop_oneof![
        Just(Endpoint::ChatCompletions),
        Just(Endpoint::Embeddings),
        Just(Endpoint::Completions),
    ]
}

fn kind() -> impl Strategy<Value = BackendKind> {
    prop_oneof![Just(BackendKind::Ollama), Just(BackendKind::Openai)]
}

/// Any JSON value, a few levels deep, with the keys our parsers look at mixed into the
/// arbitrary ones so that the interesting paths are reached.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("custom_id".to_string()),
        Just("method".to_string()),
        Just("url".to_string()),
        Just("body".to_string()),
        Just("model".to_string()),
        Just("messages".to_string()),
        Just("role".to_string()),
        Just("content".to_string()),
        Just("message".to_string()),
        Just("choices".to_string()),
        Just("data".to_string()),
        Just("error".to_string()),
        Just("embeddings".to_string()),
        Just("response".to_string()),
        Just("tool_calls".to_string()),
        Just("usage".to_string()),
        Just("logprobs".to_string()),
        Just("n".to_string()),
        Just("image_url".to_string()),
        Just("type".to_string()),
        ".{0,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(|f| json!(f)),
        prop_oneof![
            Just("POST".to_string()),
            Just("/v1/chat/completions".to_string()),
            Just("user".to_string()),
            Just("developer".to_string()),
            Just("text".to_string()),
            Just("data:image/png;base64,AAAA".to_string()),
            ".{0,24}",
        ]
        .prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// The size an output of an input of `n` bytes may have at most.
fn bound(n: usize) -> usize {
    8 * n + 4096
}

fn check_answer(r: &CallResult, text_len: usize) {
    let _ = classify(r);
    match r {
        CallResult::Answered { body, .. } => {
            assert!(body.len() <= bound(text_len), "{} > bound", body.len());
            assert!(!body.contains('\n'), "an answer body spans lines: {body}");
            let v: Value = serde_json::from_str(body).expect("an answered body is JSON");
            let _ = error_message(body);
            // It becomes exactly one output line.
            let key = RequestKey {
                batch: crate::domain::BatchId::new(),
                line: 1,
            };
            let line =
                crate::wire::output_line(key, "c", &ResultRecord::answer(200, body.clone(), None));
            assert!(!line.contains('\n'));
            serde_json::from_str::<Value>(&line).expect("an output line is JSON");
            drop(v);
        }
        CallResult::Invalid { message, .. } => assert!(message.len() < 1024, "{message}"),
        other => panic!("a parser produced {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn the_validator_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512), e in endpoint(), k in kind()) {
        match check_line(1, &bytes, e, k) {
            Ok((custom_id, model, _)) => {
                prop_assert!(!custom_id.is_empty() && !model.is_empty());
            }
            Err(err) => prop_assert!(err.message.len() < 400, "{}", err.message),
        }
    }

    #[test]
    fn the_validator_takes_any_json(v in json_value(), e in endpoint(), k in kind()) {
        let text = v.to_string();
        if let Err(err) = check_line(2, text.as_bytes(), e, k) {
            prop_assert!(err.message.len() < 400, "{}", err.message);
            prop_assert_eq!(err.line, Some(2));
        }
    }

    #[test]
    fn the_validator_takes_any_line_shaped_json(body in json_value(), e in endpoint(), k in kind(), long in ".{0,300}") {
        let line = json!({"custom_id": long, "method": "POST", "url": e.as_str(), "body": body});
        if let Err(err) = check_line(3, line.to_string().as_bytes(), e, k) {
            prop_assert!(err.message.len() < 400, "{}", err.message);
        }
    }

    #[test]
    fn answer_parsers_take_any_text(text in ".{0,512}", status in 100u16..600, e in endpoint()) {
        check_answer(&ollama::interpret(e, status, &text, "m"), text.len());
        check_answer(&openai::interpret(e, status, &text), text.len());
    }

    #[test]
    fn answer_parsers_take_any_json(v in json_value(), status in prop_oneof![Just(200u16), Just(400), Just(500), 100u16..600], e in endpoint(), pretty in any::<bool>()) {
        let text = if pretty { serde_json::to_string_pretty(&v).unwrap_or_default() } else { v.to_string() };
        check_answer(&ollama::interpret(e, status, &text, "m"), text.len());
        check_answer(&openai::interpret(e, status, &text), text.len());
    }

    #[test]
    fn ollama_translation_takes_any_body(body in json_value(), e in endpoint()) {
        // Refused or translated; never a panic.
        let _ = ollama::check(e, &body);
    }
}

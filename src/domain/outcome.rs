//! What a backend call came to, what that means, and what happens next: pure functions, so the
//! retry policy is tested without a clock or a network. The worker produces a [`CallResult`];
//! [`classify`] turns it into a [`Verdict`]; [`RetryPolicy::next_step`] turns (verdict, attempt)
//! into the [`Step`] the supervisor applies.

use super::request::Usage;
use std::time::Duration;

/// The raw result of one call to the backend.
#[derive(Clone, Debug, PartialEq)]
pub enum CallResult {
    /// The backend answered with this status and (OpenAI-shaped JSON) body.
    Answered {
        /// HTTP status.
        status: u16,
        /// JSON text.
        body: String,
        /// Usage parsed from a 2xx body.
        usage: Option<Usage>,
    },
    /// No answer within `--request-timeout`.
    Timeout,
    /// The connection could not be made (refused, no route): the backend is down.
    Unreachable(String),
    /// The connection broke (reset, incomplete message, unreadable body).
    Transport(String),
    /// The backend answered 2xx, but not with an answer: not JSON, no message, `{"error": …}`,
    /// or larger than `--max-answer-size`. `retry` says whether another try may help.
    Invalid {
        /// The error code of the line if it fails (`invalid_backend_answer`, `answer_too_large`).
        code: String,
        /// What was wrong.
        message: String,
        /// Worth another try (a broken answer) or not (an answer that is too large).
        retry: bool,
    },
    /// The backend (or a gateway in front of several) is full: 429, or 503 without an
    /// out-of-memory message. Not the line's failure: it goes back, without spending an
    /// attempt, after `retry_after` (the answer's `Retry-After`) or a short wait.
    Busy {
        /// 429 or 503.
        status: u16,
        /// The answer (OpenAI-shaped error JSON).
        body: String,
        /// The answer's `Retry-After`, when it had one.
        retry_after: Option<std::time::Duration>,
    },
    /// The backend answered 2xx with an answer that cannot count: it does not validate against
    /// the line's JSON format after the re-asks (`invalid_answer`), or it was cut off at the
    /// token limit (`answer_truncated`). Kept with the answer; not retried.
    Rejected {
        /// `invalid_answer` or `answer_truncated`.
        code: String,
        /// What was wrong (the validator's errors), and what to do.
        message: String,
        /// HTTP status of the last answer.
        status: u16,
        /// The last answer (OpenAI-shaped JSON text).
        body: String,
        /// Its usage.
        usage: Option<Usage>,
    },
}

impl CallResult {
    /// Whether the backend answered at all (a 2xx, an error status or a rejected answer): it is
    /// there and speaks the API.
    pub fn answered(&self) -> bool {
        matches!(
            self,
            CallResult::Answered { .. } | CallResult::Rejected { .. } | CallResult::Busy { .. }
        )
    }
}

/// What a call result means for the request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Keep the answer as a success.
    Success,
    /// The request itself is wrong (400, 404 model not found, 422, context overflow): record the
    /// answer as failed at once.
    Permanent,
    /// Worth another try after a delay (timeout, reset, 5xx, 429, busy).
    Transient,
    /// The backend ran out of memory: retry later, and with fewer requests in flight.
    OutOfMemory,
    /// The backend is not there: retry without burning an attempt once it is back.
    BackendDown,
    /// The backend is full (429 / 503): fewer calls at once, and the line back after the
    /// advised delay without burning an attempt.
    Overloaded,
}

/// Substrings by which Ollama and llama.cpp report out-of-memory: Ollama's own list
/// (`outOfMemorySubstrings` in ollama/ollama `llm/status.go`, v0.33: CUDA, ROCm, Vulkan, Metal
/// and MLX wordings), lower-cased. The one classifier: the worker, the retry policy and
/// `calibrate` all ask [`is_oom_text`].
const OOM_MARKERS: &[&str] = &[
    "out of memory",
    "out of device memory",
    "cudamalloc failed",
    "hipmalloc failed",
    "failed to allocate",
    "allocation failed",
    "not enough memory",
    "insufficient memory",
    "vk_error_out_of_device_memory",
    "erroroutofmemory",
];

/// True when an error text says out-of-memory.
pub fn is_oom_text(text: &str) -> bool {
    let lower = text.to_ascii_lowercase();
    OOM_MARKERS.iter().any(|m| lower.contains(m))
}

/// The message of an error body: OpenAI's `error.message`, Ollama's `error` string, or the
/// text itself when it is not JSON.
pub fn error_message(body: &str) -> String {
    match serde_json::from_str::<serde_json::Value>(body) {
        Ok(v) => match &v["error"] {
            serde_json::Value::String(s) => s.clone(),
            e => e["message"].as_str().unwrap_or_default().to_string(),
        },
        Err(_) => body.to_string(),
    }
}

/// Whether an error answer is an out-of-memory: a server error (5xx) whose error *message*
/// says so. A 4xx, or text elsewhere in the body (a 400 that echoes the user's prompt), is not.
fn is_oom_answer(status: u16, body: &str) -> bool {
    (500..=599).contains(&status) && is_oom_text(&error_message(body))
}

/// Words by which Ollama says its model runner died (ollama/ollama v0.33 `llm/llama_server.go`:
/// "llama-server process has terminated", "… no longer running"; older versions: "llama runner
/// process has terminated", "model runner has unexpectedly stopped"). Whatever the status (the
/// embeddings route answers such a failure with 400), the line is not at fault: retried with
/// backoff while Ollama restarts the runner.
const RUNNER_DIED: &[&str] = &[
    "process has terminated",
    "process no longer running",
    "runner has unexpectedly stopped",
];

/// Words of failures that come out the same however often the line is sent (retrying only
/// reloads the model): a wrongly typed option (`api/types.go`: `option "…" must be of type …`,
/// answered 500), a model Ollama cannot load (`server/sched.go`: "this model may be
/// incompatible with your version of Ollama").
const DETERMINISTIC: &[&str] = &["must be of type", "may be incompatible"];

fn message_has(body: &str, words: &[&str]) -> bool {
    let m = error_message(body).to_ascii_lowercase();
    words.iter().any(|w| m.contains(w))
}

/// The `Retry-After` of an answer: seconds, or an HTTP date (from `now`); at most an hour.
pub fn retry_after(value: &str, now: std::time::SystemTime) -> Option<Duration> {
    let v = value.trim();
    let d = match v.parse::<u64>() {
        Ok(secs) => Duration::from_secs(secs),
        Err(_) => httpdate::parse_http_date(v)
            .ok()?
            .duration_since(now)
            .unwrap_or(Duration::ZERO),
    };
    Some(d.min(Duration::from_secs(3600)))
}

/// A 429, or a 503 that is not out of memory, becomes [`CallResult::Busy`] (with the answer's
/// `Retry-After`); any other result stays as it is.
pub fn busy_or(result: CallResult, retry_after: Option<Duration>) -> CallResult {
    match result {
        CallResult::Answered { status, body, .. }
            if status == 429 || (status == 503 && !is_oom_answer(status, &body)) =>
        {
            CallResult::Busy {
                status,
                body,
                retry_after,
            }
        }
        other => other,
    }
}

/// Classifies one call result.
pub fn classify(result: &CallResult) -> Verdict {
    match result {
        CallResult::Answered { status, body, .. } => match *status {
            200..=299 => Verdict::Success,
            s if is_oom_answer(s, body) => Verdict::OutOfMemory,
            _ if message_has(body, DETERMINISTIC) => Verdict::Permanent,
            _ if message_has(body, RUNNER_DIED) => Verdict::Transient,
            408 | 409 | 425 | 429 => Verdict::Transient,
            // 499 is Ollama's "client canceled": not the request's fault.
            499 => Verdict::Transient,
            500..=599 => Verdict::Transient,
            _ => Verdict::Permanent,
        },
        CallResult::Timeout | CallResult::Transport(_) => Verdict::Transient,
        CallResult::Invalid { retry: true, .. } => Verdict::Transient,
        CallResult::Invalid { retry: false, .. } => Verdict::Permanent,
        CallResult::Rejected { .. } => Verdict::Permanent,
        CallResult::Busy { .. } => Verdict::Overloaded,
        CallResult::Unreachable(_) => Verdict::BackendDown,
    }
}

/// The next state of a request whose call ended with a verdict.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Store the answer as a success.
    Succeed,
    /// Store as failed: permanent, or attempts exhausted.
    Fail,
    /// Queue again, not before `delay` from now; the attempt stays counted.
    RetryAfter(Duration),
    /// Queue again at once and give the attempt back (the backend was down).
    RequeueFree,
    /// Queue again, not before `delay` from now, and give the attempt back (the backend was
    /// full).
    Defer(Duration),
}

/// The one backoff formula: `initial · 2^(n-1)` after the `n`-th failure (n ≥ 1), at most
/// `max`. Line retries draw their delay below it (full jitter); a failed finalization waits it.
pub fn doubling(initial: Duration, max: Duration, n: u32) -> Duration {
    let exp = n.saturating_sub(1).min(30);
    initial.saturating_mul(1u32 << exp).min(max)
}

/// Retry settings (`--retry-initial`, `--retry-max`, `--max-attempts`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    /// The ceiling of the first retry's delay.
    pub initial: Duration,
    /// The ceiling of any delay.
    pub max: Duration,
    /// Tries in all, the first one included.
    pub max_attempts: u32,
}

impl RetryPolicy {
    /// The ceiling of the delay after `attempts` tries: [`doubling`] from `initial` to `max`.
    pub fn ceiling(&self, attempts: u32) -> Duration {
        doubling(self.initial, self.max, attempts)
    }

    /// Full jitter: a delay drawn uniformly from `[0, ceiling]`; `unit` is a random number in
    /// `[0, 1)` supplied by the caller so that this stays pure.
    pub fn delay(&self, attempts: u32, unit: f64) -> Duration {
        self.ceiling(attempts).mul_f64(unit.clamp(0.0, 1.0))
    }

    /// What to do after a call made on try number `attempts` (1-based) ended with `verdict`.
    pub fn next_step(&self, verdict: Verdict, attempts: u32, unit: f64) -> Step {
        match verdict {
            Verdict::Success => Step::Succeed,
            Verdict::Permanent => Step::Fail,
            Verdict::BackendDown => Step::RequeueFree,
            // The wait is the answer's `Retry-After` when it had one (the supervisor's), else
            // the first retry's ceiling.
            Verdict::Overloaded => Step::Defer(self.initial),
            Verdict::Transient | Verdict::OutOfMemory => {
                if attempts >= self.max_attempts {
                    Step::Fail
                } else {
                    Step::RetryAfter(self.delay(attempts, unit))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_an_http_date_and_429_503_are_busy() {
        let now = std::time::UNIX_EPOCH + Duration::from_secs(1_445_412_400);
        assert_eq!(retry_after(" 7 ", now), Some(Duration::from_secs(7)));
        // 2015-10-21 07:28:00 GMT is 80 s after `now`.
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now),
            Some(Duration::from_secs(80))
        );
        assert_eq!(
            retry_after("Wed, 21 Oct 2015 07:00:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past: at once"
        );
        assert_eq!(retry_after("999999", now), Some(Duration::from_secs(3600)));
        assert_eq!(retry_after("soon", now), None);
        let answered = |status: u16, msg: &str| CallResult::Answered {
            status,
            body: serde_json::json!({"error": msg}).to_string(),
            usage: None,
        };
        let busy = busy_or(answered(429, "slow down"), Some(Duration::from_secs(2)));
        assert_eq!(classify(&busy), Verdict::Overloaded);
        assert!(
            matches!(busy, CallResult::Busy { retry_after: Some(d), .. } if d == Duration::from_secs(2))
        );
        assert_eq!(
            classify(&busy_or(answered(503, "busy"), None)),
            Verdict::Overloaded
        );
        assert_eq!(
            classify(&busy_or(answered(503, "CUDA error: out of memory"), None)),
            Verdict::OutOfMemory,
            "a 503 that says out of memory is one"
        );
        assert_eq!(
            classify(&busy_or(answered(500, "x"), None)),
            Verdict::Transient
        );
    }

    fn ollama_error(status: u16, error: &str) -> CallResult {
        CallResult::Answered {
            status,
            body: serde_json::json!({ "error": error }).to_string(),
            usage: None,
        }
    }

    /// Ollama's own words (v0.33): a dead runner is worth a retry whatever the status, a
    /// failure that repeats itself is not, and an out-of-memory in any GPU's words is one.
    #[test]
    fn ollama_failures_are_sorted_by_what_a_retry_can_change() {
        for (status, error, want) in [
            (
                400,
                "llama-server process has terminated: exit status 2",
                Verdict::Transient,
            ),
            (
                500,
                "llama-server process no longer running: signal: killed",
                Verdict::Transient,
            ),
            (
                500,
                "model runner has unexpectedly stopped, this may be due to resource limitations",
                Verdict::Transient,
            ),
            (
                500,
                "option \"num_ctx\" must be of type integer",
                Verdict::Permanent,
            ),
            (
                500,
                "exit status 2: this model may be incompatible with your version of Ollama. If you previously pulled this model, try updating it by running `ollama pull m`",
                Verdict::Permanent,
            ),
            (
                500,
                "llama-server process has terminated: hipMalloc failed: out of memory",
                Verdict::OutOfMemory,
            ),
            (500, "vk_error_out_of_device_memory", Verdict::OutOfMemory),
            (400, "invalid input", Verdict::Permanent),
            (500, "something else", Verdict::Transient),
        ] {
            assert_eq!(
                classify(&ollama_error(status, error)),
                want,
                "{status} {error}"
            );
        }
    }

    fn answered(status: u16, body: &str) -> CallResult {
        CallResult::Answered {
            status,
            body: body.into(),
            usage: None,
        }
    }

    #[test]
    fn classifies_backend_answers() {
        assert_eq!(classify(&answered(200, "{}")), Verdict::Success);
        assert_eq!(classify(&answered(400, "{}")), Verdict::Permanent);
        assert_eq!(
            classify(&answered(
                404,
                r#"{"error":"model \"x\" not found, try pulling it first"}"#
            )),
            Verdict::Permanent
        );
        assert_eq!(classify(&answered(422, "{}")), Verdict::Permanent);
        assert_eq!(classify(&answered(429, "{}")), Verdict::Transient);
        assert_eq!(
            classify(&answered(
                503,
                r#"{"error":"server busy, please try again."}"#
            )),
            Verdict::Transient
        );
        assert_eq!(
            classify(&answered(
                500,
                r#"{"error":"llama runner process has terminated: CUDA error: out of memory"}"#
            )),
            Verdict::OutOfMemory
        );
        // A 400 that echoes the user's text is not an OOM; neither is a 4xx saying so.
        assert_eq!(
            classify(&answered(
                400,
                r#"{"error":{"message":"prompt 'my laptop ran out of memory' is invalid","type":"invalid_request_error"}}"#
            )),
            Verdict::Permanent
        );
        assert_eq!(
            classify(&answered(
                500,
                r#"{"error":{"message":"template failed","echo":"out of memory"}}"#
            )),
            Verdict::Transient
        );
        assert_eq!(classify(&CallResult::Timeout), Verdict::Transient);
        assert_eq!(
            classify(&CallResult::Transport("reset".into())),
            Verdict::Transient
        );
        assert_eq!(
            classify(&CallResult::Unreachable("refused".into())),
            Verdict::BackendDown
        );
    }

    #[test]
    fn backoff_doubles_to_the_cap_with_full_jitter() {
        let p = RetryPolicy {
            initial: Duration::from_secs(1),
            max: Duration::from_secs(300),
            max_attempts: 8,
        };
        assert_eq!(p.ceiling(1), Duration::from_secs(1));
        assert_eq!(p.ceiling(2), Duration::from_secs(2));
        assert_eq!(p.ceiling(4), Duration::from_secs(8));
        assert_eq!(p.ceiling(20), Duration::from_secs(300));
        assert_eq!(p.ceiling(u32::MAX), Duration::from_secs(300));
        assert_eq!(p.delay(3, 0.0), Duration::ZERO);
        assert_eq!(p.delay(3, 0.5), Duration::from_secs(2));
        assert!(p.delay(3, 0.999) < Duration::from_secs(4));
    }

    #[test]
    fn exhausted_attempts_fail_and_outages_cost_nothing() {
        let p = RetryPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_secs(1),
            max_attempts: 3,
        };
        assert!(matches!(
            p.next_step(Verdict::Transient, 2, 0.5),
            Step::RetryAfter(_)
        ));
        assert_eq!(p.next_step(Verdict::Transient, 3, 0.5), Step::Fail);
        assert_eq!(p.next_step(Verdict::OutOfMemory, 3, 0.5), Step::Fail);
        assert_eq!(
            p.next_step(Verdict::BackendDown, 99, 0.5),
            Step::RequeueFree
        );
        assert_eq!(p.next_step(Verdict::Permanent, 1, 0.5), Step::Fail);
        assert_eq!(p.next_step(Verdict::Success, 1, 0.5), Step::Succeed);
    }
}

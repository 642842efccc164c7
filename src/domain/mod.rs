//! The vocabulary of the queue: typed ids, the batch and request records with their state
//! machines, and the pure functions that classify a backend outcome and pick the next state.
//!
//! Nothing in here does I/O. The store persists these records; the supervisor decides
//! transitions with the functions below; the API renders them through `wire`.

pub mod batch;
pub mod file;
pub mod ids;
pub mod outcome;
pub mod request;

pub use batch::{BatchRecord, BatchStatus, Endpoint, LineError, META_REUSE, RequestCounts};
pub use file::{Delivery, FileRecord};
pub use ids::{BatchId, FileId, RequestKey};
pub use outcome::{CallResult, RetryPolicy, Step, Verdict};
pub use request::{Refused, RequestRecord, RequestState, ResultRecord, Transition, Usage};

/// Seconds since the Unix epoch, the unit of every timestamp in the OpenAI objects.
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Milliseconds since the Unix epoch: retry times are stored in this unit so that a restart
/// neither resets nor skips a backoff.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// At most `n` characters of `s`, with `…` when cut: an error message quotes a value through
/// this, so that it never copies a large one.
pub fn clip(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let mut t: String = s.chars().take(n).collect();
        t.push('…');
        t
    }
}

/// How many of a chat body's messages are its shared prefix: the leading system and developer
/// messages. Lines with the same model and prefix form a prefix group (the scheduler keeps a
/// slot's prompt cache on one), and in conversation mode the prefix is the system prompt every
/// call starts with.
pub fn prefix_len(messages: &[serde_json::Value]) -> usize {
    messages
        .iter()
        .take_while(|m| {
            matches!(
                m.get("role").and_then(serde_json::Value::as_str),
                Some("system" | "developer")
            )
        })
        .count()
}

/// `text` with the credentials of every URL in it removed (`http://user:pw@host` →
/// `http://host`): a backend URL may carry them, and no log line, `/status`, metric or error
/// message may.
pub fn redact_urls(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find("://") {
        out.push_str(&rest[..i + 3]);
        rest = &rest[i + 3..];
        let end = rest
            .find(['/', ' ', ')', '"', '\'', '>', '\n', ','])
            .unwrap_or(rest.len());
        if let Some(at) = rest[..end].rfind('@') {
            rest = &rest[at + 1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod redact_tests {
    use super::redact_urls;

    #[test]
    fn credentials_leave_every_url() {
        assert_eq!(redact_urls("http://u:p@h:1/v1"), "http://h:1/v1");
        assert_eq!(
            redact_urls("error sending request for url (http://me:s3cret@gpu:11434/api/chat)"),
            "error sending request for url (http://gpu:11434/api/chat)"
        );
        assert_eq!(
            redact_urls("http://h:1 and https://a@b/c"),
            "http://h:1 and https://b/c"
        );
        assert_eq!(redact_urls("no url, an@address"), "no url, an@address");
    }
}

//! Live figures of one batch, kept by the supervisor from what it already sees (durable results
//! as they are committed, retries as they are scheduled): no store reads. Rates come from a
//! window of per-second samples over the last minute; the ETA is the remaining lines over the
//! recent rate, and `None` until that rate means something.

use crate::domain::{CallResult, Usage, Verdict};
use serde::Serialize;
use std::collections::{BTreeMap, VecDeque};
use std::time::Duration;
// tokio's clock (the supervisor's): a test can pause and advance it.
use tokio::time::Instant;

/// The span the recent rate is measured over.
pub const WINDOW: Duration = Duration::from_secs(60);
/// The recent rate (and so the ETA) needs at least this many results in the window...
const MIN_RESULTS_FOR_ETA: u64 = 5;
/// ...over at least this long.
const MIN_SPAN_FOR_ETA: Duration = Duration::from_secs(3);

/// Every cause [`retry_cause`] gives.
pub const RETRY_CAUSES: [&str; 7] = [
    "timeout",
    "connect",
    "connection_error",
    "invalid_answer",
    "http_429",
    "http_5xx",
    "oom",
];

/// Why a line was scheduled for another try (a small fixed set: safe as a metric label).
pub fn retry_cause(result: &CallResult, verdict: Verdict) -> &'static str {
    if verdict == Verdict::OutOfMemory {
        return "oom";
    }
    match result {
        CallResult::Timeout => "timeout",
        CallResult::Unreachable(_) => "connect",
        CallResult::Transport(_) => "connection_error",
        CallResult::Invalid { .. } | CallResult::Rejected { .. } => "invalid_answer",
        CallResult::Answered { status: 429, .. } | CallResult::Busy { status: 429, .. } => {
            "http_429"
        }
        CallResult::Busy { .. } => "http_5xx",
        // Any other answer that is retried is a server-side failure.
        CallResult::Answered { .. } => "http_5xx",
    }
}

/// Token sums over answers, with the answers that did and did not report a cached figure kept
/// apart (unknown is never 0). Kept per batch here and over the whole run in the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Tokens {
    /// Prompt tokens.
    pub prompt: u64,
    /// Completion tokens.
    pub completion: u64,
    /// Cached prompt tokens, over the answers that reported a figure.
    pub cached: u64,
    /// Answers that reported a cached figure.
    pub with_cached_figure: u64,
    /// Answers that did not.
    pub without_cached_figure: u64,
    /// Prompt tokens of the answers that reported a cached figure.
    pub prompt_with_cached_figure: u64,
    /// The largest prompt.
    pub max_prompt: u64,
}

impl Tokens {
    /// Counts one answer's usage.
    pub fn add(&mut self, u: &Usage) {
        self.prompt += u.input_tokens;
        self.completion += u.output_tokens;
        self.max_prompt = self.max_prompt.max(u.input_tokens);
        match u.cached_tokens {
            Some(c) => {
                self.cached += c;
                self.with_cached_figure += 1;
                self.prompt_with_cached_figure += u.input_tokens;
            }
            None => self.without_cached_figure += 1,
        }
    }
}

/// What the checks of JSON answers came to, and the lines answered from earlier answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Answers {
    /// Answers checked against the line's JSON format.
    pub checked: u64,
    /// Of those, answers whose Markdown fence was removed.
    pub fenced: u64,
    /// Re-asks sent (calls beyond the first, each naming what was wrong).
    pub reasks: u64,
    /// Lines ended as `invalid_answer`.
    pub invalid: u64,
    /// Lines ended as `answer_truncated`.
    pub truncated: u64,
    /// Lines answered from an earlier identical request, without a call.
    pub reused: u64,
}

impl Answers {
    /// Counts one call's check.
    pub fn add(&mut self, r: &crate::answer::Report) {
        self.checked += u64::from(r.checked);
        self.fenced += u64::from(r.fenced);
        self.reasks += u64::from(r.reasks);
        self.invalid += u64::from(r.invalid);
        self.truncated += u64::from(r.truncated);
    }
}

#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    done: u64,
    prompt: u64,
    completion: u64,
}

/// The running figures of one batch.
#[derive(Debug)]
pub struct Progress {
    adopted: Instant,
    /// Lines already done when this process took the batch on (a resumed run).
    done_at_adopt: u64,
    samples: VecDeque<Sample>,
    /// Tokens of the results committed in this process.
    tokens: Tokens,
    retries: BTreeMap<&'static str, u64>,
    /// JSON answers checked, re-asked, rejected; lines reused.
    pub answers: Answers,
    /// When the last progress line was logged, and at how many lines.
    logged_at: Instant,
    logged_done: u64,
}

/// What `/status`, the log and the per-batch export show of a batch.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct Figures {
    /// Lines in all.
    pub total: u64,
    /// Lines durably done (succeeded + failed).
    pub done: u64,
    /// Of those, failed.
    pub failed: u64,
    /// Lines still to run.
    pub remaining: u64,
    /// done / total, 0–100.
    pub percent: f64,
    /// Lines per second over the last minute (`None` until there is a minute's worth, or a
    /// few seconds with enough results).
    pub requests_per_second_recent: Option<f64>,
    /// Lines per second since this process took the batch on.
    pub requests_per_second_since_start: Option<f64>,
    /// Prompt tokens per second over the last minute.
    pub prompt_tokens_per_second_recent: Option<f64>,
    /// Completion tokens per second over the last minute.
    pub completion_tokens_per_second_recent: Option<f64>,
    /// Seconds left at the recent rate; `None` until the rate means something.
    pub eta_seconds: Option<u64>,
    /// Prompt tokens of the answers committed by this process.
    pub prompt_tokens: u64,
    /// Completion tokens of those answers.
    pub completion_tokens: u64,
    /// Cached prompt tokens, over the answers that reported a cached figure.
    pub cached_tokens: u64,
    /// Answers that reported a cached figure.
    pub answers_with_cached_figure: u64,
    /// Answers that did not say how many tokens were cached (unknown, never counted as 0).
    pub answers_without_cached_figure: u64,
    /// cached ÷ prompt tokens over the answers that reported; `None` when none did.
    pub cached_share: Option<f64>,
    /// Prompt tokens the backend had to process (prompt − cached), over the answers that
    /// reported a cached figure; `None` when none did.
    pub prefilled_tokens: Option<u64>,
    /// Retries scheduled, by cause.
    pub retries: BTreeMap<&'static str, u64>,
    /// JSON answers checked, fenced, re-asked, invalid, truncated; lines reused (this process).
    pub answers: Answers,
    /// The largest prompt (tokens) seen so far, and `--num-ctx` when it is set.
    pub max_prompt_tokens: u64,
    /// `--num-ctx`, to compare the largest prompt with.
    pub num_ctx: Option<u32>,
    /// Seconds since this process took the batch on.
    pub running_seconds: u64,
}

impl Progress {
    /// Starts the figures of a batch with `done` lines already done.
    pub fn new(done: u64) -> Progress {
        let now = Instant::now();
        Progress {
            adopted: now,
            done_at_adopt: done,
            samples: VecDeque::from([Sample {
                at: now,
                done,
                prompt: 0,
                completion: 0,
            }]),
            tokens: Tokens::default(),
            retries: BTreeMap::new(),
            answers: Answers::default(),
            logged_at: now,
            logged_done: done,
        }
    }

    /// A durable result (success or final failure) with its usage, if the answer had one.
    pub fn result(&mut self, usage: Option<&Usage>) {
        if let Some(u) = usage {
            self.tokens.add(u);
        }
    }

    /// Whether a progress line is due at `done` lines: `every` lines since the last one, or
    /// `interval` since it while lines still finish.
    pub fn log_due(&self, now: Instant, done: u64, every: u64, interval: Duration) -> bool {
        done.saturating_sub(self.logged_done) >= every
            || (done != self.logged_done && now.duration_since(self.logged_at) >= interval)
    }

    /// A progress line was logged at `done` lines.
    pub fn logged(&mut self, now: Instant, done: u64) {
        self.logged_at = now;
        self.logged_done = done;
    }

    /// A retry scheduled for this cause.
    pub fn retry(&mut self, cause: &'static str) {
        *self.retries.entry(cause).or_default() += 1;
    }

    /// Records where the batch stands now (`done` lines); keeps one sample a second over the
    /// window.
    pub fn sample(&mut self, now: Instant, done: u64) {
        let s = Sample {
            at: now,
            done,
            prompt: self.tokens.prompt,
            completion: self.tokens.completion,
        };
        let len = self.samples.len();
        match self.samples.back_mut() {
            // Within a second of the last sample, the last one takes the newest figures (the
            // starting sample is never overwritten).
            Some(last) if len > 1 && now.duration_since(last.at) < Duration::from_secs(1) => {
                *last = s;
            }
            _ => self.samples.push_back(s),
        }
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|second| now.duration_since(second.at) >= WINDOW)
        {
            self.samples.pop_front();
        }
    }

    /// The figures now, for a batch of `total` lines with `done` (`failed` of them) done.
    pub fn figures(
        &self,
        now: Instant,
        total: u64,
        done: u64,
        failed: u64,
        num_ctx: Option<u32>,
    ) -> Figures {
        let remaining = total.saturating_sub(done);
        let first = self.samples.front().copied();
        let (recent, prompt_rate, completion_rate) = match first {
            Some(f) => {
                let span = now.duration_since(f.at);
                let n = done.saturating_sub(f.done);
                if span >= MIN_SPAN_FOR_ETA && (n >= MIN_RESULTS_FOR_ETA || span >= WINDOW) {
                    let secs = span.as_secs_f64();
                    (
                        Some(n as f64 / secs),
                        Some(self.tokens.prompt.saturating_sub(f.prompt) as f64 / secs),
                        Some(self.tokens.completion.saturating_sub(f.completion) as f64 / secs),
                    )
                } else {
                    (None, None, None)
                }
            }
            None => (None, None, None),
        };
        let running = now.duration_since(self.adopted);
        let since_start = (running >= MIN_SPAN_FOR_ETA)
            .then(|| done.saturating_sub(self.done_at_adopt) as f64 / running.as_secs_f64());
        let eta_seconds = match recent {
            _ if remaining == 0 => Some(0),
            Some(r) if r > 0.0 => Some((remaining as f64 / r).ceil() as u64),
            _ => None,
        };
        let t = &self.tokens;
        // Over the answers that said how many tokens were cached (how many did not is beside
        // it); unknown when none did, never 0 %.
        let cached_share = (t.with_cached_figure > 0 && t.prompt_with_cached_figure > 0)
            .then(|| round4(t.cached as f64 / t.prompt_with_cached_figure as f64));
        let prefilled_tokens = (t.with_cached_figure > 0)
            .then(|| t.prompt_with_cached_figure.saturating_sub(t.cached));
        Figures {
            total,
            done,
            failed,
            remaining,
            percent: if total == 0 {
                100.0
            } else {
                (done as f64 * 1000.0 / total as f64).round() / 10.0
            },
            requests_per_second_recent: recent.map(round2),
            requests_per_second_since_start: since_start.map(round2),
            prompt_tokens_per_second_recent: prompt_rate.map(round2),
            completion_tokens_per_second_recent: completion_rate.map(round2),
            eta_seconds,
            prompt_tokens: t.prompt,
            completion_tokens: t.completion,
            cached_tokens: t.cached,
            answers_with_cached_figure: t.with_cached_figure,
            answers_without_cached_figure: t.without_cached_figure,
            cached_share,
            prefilled_tokens,
            retries: self.retries.clone(),
            answers: self.answers,
            max_prompt_tokens: t.max_prompt,
            num_ctx,
            running_seconds: running.as_secs(),
        }
    }
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

fn round4(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn usage(prompt: u64, cached: Option<u64>) -> Usage {
        Usage {
            input_tokens: prompt,
            cached_tokens: cached,
            output_tokens: 2,
        }
    }

    #[test]
    fn rate_and_eta_appear_once_meaningful_and_follow_the_recent_window() {
        let t0 = Instant::now();
        let mut p = Progress::new(0);
        // Nothing yet: no rate, no ETA.
        let f = p.figures(t0, 1000, 0, 0, None);
        assert_eq!((f.requests_per_second_recent, f.eta_seconds), (None, None));
        // 10 lines a second for 10 seconds.
        for s in 1..=10u64 {
            for _ in 0..10 {
                p.result(Some(&usage(100, None)));
            }
            p.sample(t0 + Duration::from_secs(s), s * 10);
        }
        let now = t0 + Duration::from_secs(10);
        let f = p.figures(now, 1000, 100, 3, Some(8192));
        assert_eq!(f.requests_per_second_recent, Some(10.0));
        assert_eq!(f.eta_seconds, Some(90));
        assert_eq!(f.remaining, 900);
        assert_eq!(f.percent, 10.0);
        assert_eq!(f.prompt_tokens_per_second_recent, Some(1000.0));
        assert_eq!(f.max_prompt_tokens, 100);
        assert_eq!(f.num_ctx, Some(8192));
        // No answer reported a cached figure: unknown, not 0 %.
        assert_eq!(f.cached_share, None);
        assert_eq!(f.answers_without_cached_figure, 100);
        // The run slows to 1 line a second for two minutes: the recent rate follows.
        for s in 11..=130u64 {
            p.sample(t0 + Duration::from_secs(s), 100 + (s - 10));
        }
        let f = p.figures(t0 + Duration::from_secs(130), 1000, 220, 3, None);
        let r = f.requests_per_second_recent.expect("rate");
        assert!((0.9..=1.1).contains(&r), "{r}");
        assert!(
            f.eta_seconds.is_some_and(|e| (700..=870).contains(&e)),
            "{f:?}"
        );
    }

    #[test]
    fn cached_share_is_over_the_answers_that_reported_and_unknown_when_none_did() {
        let mut p = Progress::new(0);
        p.result(Some(&usage(100, None)));
        let f = p.figures(Instant::now(), 3, 1, 0, None);
        assert_eq!(f.cached_share, None, "nobody reported: unknown, never 0 %");
        assert_eq!(f.prefilled_tokens, None);
        p.result(Some(&usage(100, Some(80))));
        p.result(Some(&usage(100, Some(90))));
        let f = p.figures(Instant::now(), 3, 3, 0, None);
        // Over the two that reported (the one that did not is counted beside it).
        assert_eq!(f.cached_share, Some(0.85));
        assert_eq!(f.prefilled_tokens, Some(30));
        assert_eq!(f.answers_with_cached_figure, 2);
        assert_eq!(f.answers_without_cached_figure, 1);
        assert_eq!(f.eta_seconds, Some(0));
    }

    #[test]
    fn retry_causes_are_a_small_fixed_set() {
        assert_eq!(
            retry_cause(&CallResult::Timeout, Verdict::Transient),
            "timeout"
        );
        let busy = CallResult::Answered {
            status: 503,
            body: String::new(),
            usage: None,
        };
        assert_eq!(retry_cause(&busy, Verdict::Transient), "http_5xx");
        assert_eq!(retry_cause(&busy, Verdict::OutOfMemory), "oom");
    }
}

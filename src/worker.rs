//! The one GPU worker: runs leased requests against the backend, at most `limit` at a time,
//! and hands back classified outcomes. It never touches the store and never decides a
//! request's next state (that is the supervisor's), with one exception that is about load,
//! not about requests: an out-of-memory answer halves its own concurrency limit, and a run
//! of successes raises it again by one toward `--concurrency`.

use crate::answer::{self, Checked, Report, Schemas, Wanted};
use crate::backend::Backend;
use crate::domain::outcome::classify;
use crate::domain::{CallResult, Endpoint, RequestKey, Verdict};
use crate::wire::responses;
use serde_json::Value;
use std::sync::{Arc, Mutex};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Consecutive successes after which the limit grows by one.
pub const RECOVERY_STREAK: u32 = 16;

/// A leased request to run.
#[derive(Debug)]
pub struct Job {
    /// Which line.
    pub key: RequestKey,
    /// The lease it runs under (echoed back so the supervisor can fence).
    pub lease: u32,
    /// The try number this call is (1-based).
    pub attempts: u32,
    /// Which API.
    pub endpoint: Endpoint,
    /// The body, model mapped, shared contents restored.
    pub body: Value,
    /// The lane (backend slot) it runs on: at most one call per lane at a time.
    pub lane: usize,
    /// Its reuse key, when the supervisor already computed it (a batch that reuses answers).
    pub reuse_key: Option<[u8; 32]>,
    /// An independent line: its success is remembered under its reuse key (computed here when
    /// the supervisor did not).
    pub remember: bool,
}

/// What the worker tells the supervisor.
#[derive(Debug)]
pub enum Event {
    /// The call of this lease was sent now (its rescue deadline counts from here, not from
    /// the lease: a job may wait for a free slot first).
    Started {
        /// Which line.
        key: RequestKey,
        /// Under which lease.
        lease: u32,
    },
    /// The call ended.
    Finished(Outcome),
}

/// What came of a job.
#[derive(Debug)]
pub struct Outcome {
    /// Which line.
    pub key: RequestKey,
    /// The lease it ran under.
    pub lease: u32,
    /// The try number it was.
    pub attempts: u32,
    /// What the backend did.
    pub result: CallResult,
    /// What that means.
    pub verdict: Verdict,
    /// What the check of a JSON answer found (and re-asks made).
    pub check: Report,
    /// The line's reuse key (an independent line's), under which a success is remembered.
    pub reuse_key: Option<[u8; 32]>,
}

/// How JSON answers are checked: the compiled schemas, and how often an answer that does not
/// validate is asked again (`--reask`).
#[derive(Clone, Default)]
pub struct Answers {
    /// Compiled schemas, shared by every call.
    pub schemas: Schemas,
    /// Re-asks at most.
    pub reask: u32,
    /// The backend options in every reuse key (`Config::reuse_options`).
    pub reuse_options: String,
}

/// Runs one line's call on `slot`, and when the line asks for JSON checks the answer: a fence
/// is removed, an answer that does not validate is asked again with what was wrong (at most
/// `rules.reask` times; `restarted` runs before each re-ask, so that the lease's deadline counts
/// from it), an answer cut off at the token limit is rejected. A line that asks for no JSON is
/// sent and returned as it is.
pub async fn call_checked<F, Fut>(
    backend: &Backend,
    endpoint: Endpoint,
    body: Value,
    slot: usize,
    rules: &Answers,
    restarted: F,
) -> (CallResult, Report)
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut report = Report::default();
    let Some(wanted) = answer::wanted(endpoint, &body) else {
        return (backend.call_on(endpoint, &body, slot).await, report);
    };
    let validator = match wanted {
        Wanted::Schema(s) => match rules.schemas.get(s) {
            Ok(v) => Some(v),
            // Refused at validation; a line stored before that check fails here, without a call.
            Err(e) => {
                let result = CallResult::Invalid {
                    code: "invalid_schema".into(),
                    message: format!("response_format.json_schema.schema: {e}"),
                    retry: false,
                };
                return (result, report);
            }
        },
        Wanted::Object => None,
    };
    // The line's own body is sent first; a re-ask sends its own (built from the line's).
    let mut reask: Option<Value> = None;
    loop {
        let result = backend
            .call_on(endpoint, reask.as_ref().unwrap_or(&body), slot)
            .await;
        let CallResult::Answered {
            status: status @ 200..=299,
            body: text,
            usage,
        } = &result
        else {
            return (result, report);
        };
        let Ok(mut parsed) = serde_json::from_str::<Value>(text) else {
            return (result, report);
        };
        let Some((answer, cut)) = answer::answer_text(endpoint, &parsed) else {
            // A tool call, or no text: nothing to check.
            return (result, report);
        };
        report.checked = true;
        let rejected = |code: &str, message: String| CallResult::Rejected {
            code: code.into(),
            message,
            status: *status,
            body: text.clone(),
            usage: *usage,
        };
        if cut {
            report.truncated = true;
            let tokens = usage.map_or(String::new(), |u| {
                format!(" after {} tokens", u.output_tokens)
            });
            let message = format!(
                "the answer was cut off at the token limit (finish_reason: length){tokens}: raise max_tokens (or --num-ctx) for this line; a re-ask would be cut off again"
            );
            return (rejected("answer_truncated", message), report);
        }
        match answer::check(answer, wanted, validator.as_deref()) {
            Checked::Valid { bare: None } => return (result, report),
            Checked::Valid { bare: Some(bare) } => {
                report.fenced = true;
                answer::with_text(endpoint, &mut parsed, &bare);
                let result = CallResult::Answered {
                    status: *status,
                    body: parsed.to_string(),
                    usage: *usage,
                };
                return (result, report);
            }
            Checked::Invalid(errors) => {
                let next = (report.reasks < rules.reask)
                    .then(|| answer::reask_body(endpoint, &body, answer, &errors))
                    .flatten();
                if let Some(next) = next {
                    report.reasks += 1;
                    tracing::debug!(reask = report.reasks, errors = %errors.join("; "), "answer does not validate: asked again");
                    restarted().await;
                    reask = Some(next);
                    continue;
                }
                report.invalid = true;
                let message = format!(
                    "the answer does not match the line's response_format after {} re-ask(s): {}",
                    report.reasks,
                    errors.join("; ")
                );
                return (rejected("invalid_answer", message), report);
            }
        }
    }
}

/// A chat answer (kept or rejected) of a Responses line as its Response object; failures as
/// they are.
fn as_response(result: CallResult, echo: &Value) -> CallResult {
    let convert = |body: &str| {
        serde_json::from_str::<Value>(body)
            .map(|chat| responses::to_response(&chat, echo).to_string())
            .unwrap_or_else(|_| body.to_string())
    };
    match result {
        CallResult::Answered {
            status: status @ 200..=299,
            body,
            usage,
        } => CallResult::Answered {
            status,
            body: convert(&body),
            usage,
        },
        CallResult::Rejected {
            code,
            message,
            status,
            body,
            usage,
        } => CallResult::Rejected {
            code,
            message,
            status,
            body: convert(&body),
            usage,
        },
        other => other,
    }
}

#[derive(Debug)]
struct LimiterState {
    limit: usize,
    in_flight: usize,
    streak: u32,
    /// Bumped on every decrease: out-of-memory answers of calls started before the last
    /// decrease do not halve again (one burst of OOMs halves once).
    generation: u64,
}

/// Adaptive concurrency limit (AIMD: halved on out-of-memory and on 429 / 503 "full" answers,
/// once per burst; one more after a run of successes).
#[derive(Debug)]
pub struct Limiter {
    max: usize,
    state: Mutex<LimiterState>,
}

impl Limiter {
    /// A limiter starting at `max`.
    pub fn new(max: usize) -> Self {
        Limiter {
            max,
            state: Mutex::new(LimiterState {
                limit: max,
                in_flight: 0,
                streak: 0,
                generation: 0,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LimiterState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Frees a slot and adapts the limit to the verdict of the call started in `generation`.
    pub fn release(&self, generation: u64, verdict: Verdict) {
        {
            let mut s = self.lock();
            s.in_flight = s.in_flight.saturating_sub(1);
            match verdict {
                Verdict::OutOfMemory | Verdict::Overloaded if generation == s.generation => {
                    s.limit = (s.limit / 2).max(1);
                    s.generation += 1;
                    s.streak = 0;
                    if verdict == Verdict::OutOfMemory {
                        tracing::warn!(
                            limit = s.limit,
                            "backend out of memory: concurrency halved"
                        );
                    } else {
                        tracing::info!(
                            limit = s.limit,
                            "backend full (429/503): concurrency halved"
                        );
                    }
                }
                Verdict::OutOfMemory | Verdict::Overloaded => s.streak = 0,
                Verdict::Success => {
                    s.streak += 1;
                    if s.streak >= RECOVERY_STREAK && s.limit < self.max {
                        s.limit += 1;
                        s.streak = 0;
                        tracing::info!(limit = s.limit, "concurrency raised after successes");
                    }
                }
                _ => {}
            }
        }
    }

    /// Takes a slot if one is free: the generation the call starts in.
    pub fn try_acquire(&self) -> Option<u64> {
        let mut s = self.lock();
        (s.in_flight < s.limit).then(|| {
            s.in_flight += 1;
            s.generation
        })
    }

    /// (current limit, calls in flight).
    pub fn snapshot(&self) -> (usize, usize) {
        let s = self.lock();
        (s.limit, s.in_flight)
    }
}

/// One lane: the backend it calls, that backend's limiter, and its slot there.
#[derive(Clone)]
pub struct Lane {
    /// The backend.
    pub backend: Backend,
    /// The backend's concurrency limiter (shared by its lanes).
    pub limiter: Arc<Limiter>,
    /// The slot on that backend (`id_slot` for llama.cpp).
    pub slot: usize,
}

/// Starts the worker over `lanes`. It takes jobs from `jobs` until `stop` fires or the channel
/// closes; calls already running finish (their events still go to `events`).
pub fn spawn(
    lanes_of: Vec<Lane>,
    answers: Answers,
    metrics: Arc<crate::metrics::Metrics>,
    mut jobs: mpsc::Receiver<Job>,
    events: mpsc::Sender<Event>,
    tracker: &TaskTracker,
    stop: CancellationToken,
) {
    let calls = tracker.clone();
    tracker.spawn(async move {
        // Per lane (backend slot): the jobs waiting for it, and whether a call runs on it.
        let lanes = lanes_of.len().max(1);
        let mut parked: Vec<std::collections::VecDeque<Job>> =
            (0..lanes).map(|_| Default::default()).collect();
        let mut busy = vec![false; lanes];
        let (freed_tx, mut freed_rx) = mpsc::unbounded_channel::<usize>();
        loop {
            // Start what can start: each free lane with a job waiting, while its backend's
            // limit allows.
            for lane in 0..lanes {
                if busy[lane] || parked[lane].is_empty() {
                    continue;
                }
                let Some(on) = lanes_of.get(lane).cloned() else {
                    continue;
                };
                let Some(job) = parked[lane].pop_front() else {
                    continue;
                };
                let Some(generation) = on.limiter.try_acquire() else {
                    // At the limit (lowered after out-of-memory answers): wait for a call to end.
                    parked[lane].push_front(job);
                    continue;
                };
                busy[lane] = true;
                let (backend, limiter, slot) = (on.backend, on.limiter, on.slot);
                let events = events.clone();
                let metrics = metrics.clone();
                let answers = answers.clone();
                let freed = freed_tx.clone();
                calls.spawn(async move {
                    // The first call of a model on an Ollama backend waits for one load call,
                    // with its own long deadline (see `Backend::warm_up`); the other lanes wait
                    // for it too, then fan out. The rescue deadline counts from after it.
                    if job.endpoint != Endpoint::Embeddings
                        && let Some(model) = job.body["model"].as_str()
                    {
                        backend.warm_up(model).await;
                    }
                    // The supervisor may already be gone at shutdown: nothing to do then.
                    let _ = events
                        .send(Event::Started {
                            key: job.key,
                            lease: job.lease,
                        })
                        .await;
                    let started = std::time::Instant::now();
                    let (key, lease) = (job.key, job.lease);
                    // The key of the body as the line asks it (before any re-ask), hashed here
                    // on the worker's threads rather than in the supervisor's loop.
                    let reuse_key = job.reuse_key.or_else(|| {
                        job.remember.then(|| {
                            answer::reuse_key(job.endpoint, &answers.reuse_options, &job.body)
                        })
                    });
                    let restarted = || {
                        let events = events.clone();
                        async move {
                            let _ = events.send(Event::Started { key, lease }).await;
                        }
                    };
                    // A Responses line is a chat call; what its Response echoes is not sent.
                    let mut body = job.body;
                    let echo = (job.endpoint == Endpoint::Responses)
                        .then(|| body.as_object_mut()?.remove(responses::ECHO))
                        .flatten();
                    let (result, check) = call_checked(
                        &backend,
                        job.endpoint.called_as(),
                        body,
                        slot,
                        &answers,
                        restarted,
                    )
                    .await;
                    let result = match &echo {
                        Some(echo) => as_response(result, echo),
                        None => result,
                    };
                    let verdict = classify(&result);
                    metrics.observe_call(
                        started.elapsed().as_secs_f64(),
                        match verdict {
                            Verdict::Success => "success",
                            Verdict::Permanent => "permanent",
                            Verdict::Transient => "transient",
                            Verdict::OutOfMemory => "oom",
                            Verdict::BackendDown => "backend_down",
                            Verdict::Overloaded => "overloaded",
                        },
                    );
                    limiter.release(generation, verdict);
                    let _ = freed.send(lane);
                    let _ = events
                        .send(Event::Finished(Outcome {
                            key: job.key,
                            lease: job.lease,
                            attempts: job.attempts,
                            result,
                            verdict,
                            check,
                            reuse_key,
                        }))
                        .await;
                });
            }
            tokio::select! {
                _ = stop.cancelled() => break,
                job = jobs.recv() => match job {
                    Some(j) => {
                        let lane = j.lane.min(lanes - 1);
                        parked[lane].push_back(j);
                    }
                    None => break,
                },
                Some(lane) = freed_rx.recv() => busy[lane] = false,
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_oom_burst_halves_once_and_successes_recover() {
        let l = Limiter::new(8);
        let mut gens = Vec::new();
        for _ in 0..8 {
            gens.push(l.try_acquire().expect("a free slot"));
        }
        for g in gens {
            l.release(g, Verdict::OutOfMemory);
        }
        assert_eq!(l.snapshot(), (4, 0));
        for _ in 0..3 {
            let g = l.try_acquire().expect("a free slot");
            l.release(g, Verdict::OutOfMemory);
        }
        assert_eq!(l.snapshot().0, 1, "never below 1, halves per generation");
        let g = l.try_acquire().expect("a free slot");
        l.release(g, Verdict::OutOfMemory);
        assert_eq!(l.snapshot().0, 1);
        for _ in 0..RECOVERY_STREAK {
            let g = l.try_acquire().expect("a free slot");
            l.release(g, Verdict::Success);
        }
        assert_eq!(l.snapshot().0, 2);
    }
}

//! `GET /metrics`: Prometheus / OpenMetrics text, built with `prometheus-client`.
//!
//! Almost everything is read at scrape time from what the server already keeps (the
//! supervisor's snapshot, the limiter, the GPU monitor, the batch records): nothing on the
//! request path but one histogram observation per backend call. A registry is built per scrape
//! (per server, so tests with several servers in one process never share series). Names have
//! one prefix (`obatch_`), base units (`_seconds`, `_bytes`), counters end in `_total`, and
//! labels come only from small fixed sets (`state`, `status`, `outcome`, `cause`, `gpu`):
//! never a batch id or a custom_id.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::sync::atomic::AtomicU64;

type Labels = Vec<(String, String)>;

/// Buckets of the backend call duration, from 50 ms to the default request timeout (10 min).
pub const CALL_BUCKETS: [f64; 14] = [
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

/// Call outcomes (the histogram's label).
pub const OUTCOMES: [&str; 6] = [
    "success",
    "permanent",
    "transient",
    "oom",
    "backend_down",
    "overloaded",
];

fn new_call_histogram() -> Histogram {
    Histogram::new(CALL_BUCKETS)
}

/// What is observed on the request path; everything else is read at scrape time.
pub struct Metrics {
    calls: Family<Labels, Histogram, fn() -> Histogram>,
    started: i64,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Empty metrics; every outcome's histogram exists from the start (a series that appears
    /// late loses its first `increase()`).
    pub fn new() -> Metrics {
        let calls: Family<Labels, Histogram, fn() -> Histogram> =
            Family::new_with_constructor(new_call_histogram);
        for o in OUTCOMES {
            let _ = calls.get_or_create(&vec![("outcome".into(), o.into())]);
        }
        Metrics {
            calls,
            started: crate::domain::unix_now(),
        }
    }

    /// One backend call took `seconds` and ended as `outcome` (one of [`OUTCOMES`]).
    pub fn observe_call(&self, seconds: f64, outcome: &'static str) {
        self.calls
            .get_or_create(&vec![("outcome".into(), outcome.into())])
            .observe(seconds);
    }
}

/// Everything a scrape reports, gathered by the handler.
pub struct Scrape<'a> {
    /// Lines of unfinished batches by state (queued, retry_wait, in_flight, succeeded, failed).
    pub requests: &'a [(&'static str, u64)],
    /// Batches by status.
    pub batches: &'a [(&'static str, u64)],
    /// The supervisor's counters.
    pub counters: &'a crate::live::Counters,
    /// Per backend, as shown (no credentials): whether it answered its last call or probe
    /// (`None` before the first).
    pub backends_up: &'a [(String, Option<bool>)],
    /// Calls in flight and the current concurrency limit.
    pub in_flight: u64,
    /// Current limit.
    pub concurrency_limit: u64,
    /// GPU memory.
    pub gpu: &'a crate::gpu::GpuView,
    /// Bytes of the state directory.
    pub store_bytes: u64,
    /// Webhook deliveries since start by outcome (`delivered`, `retried`, `failed`).
    pub webhook_deliveries: &'a [(&'static str, u64)],
    /// Webhook deliveries waiting in the store.
    pub webhook_pending: u64,
}

fn gauge(r: &mut Registry, name: &str, help: &str, unit: Option<Unit>, v: i64) {
    let g: Gauge = Gauge::default();
    g.set(v);
    match unit {
        Some(u) => r.register_with_unit(name, help, u, g),
        None => r.register(name, help, g),
    }
}

fn counter(r: &mut Registry, name: &str, help: &str, v: u64) {
    let c: Counter<u64, AtomicU64> = Counter::default();
    c.inc_by(v);
    r.register(name, help, c);
}

fn gauge_family(
    r: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
    label: &str,
    values: &[(String, i64)],
) {
    let f: Family<Labels, Gauge> = Family::default();
    for (l, v) in values {
        f.get_or_create(&vec![(label.to_string(), l.clone())])
            .set(*v);
    }
    match unit {
        Some(u) => r.register_with_unit(name, help, u, f),
        None => r.register(name, help, f),
    }
}

fn counter_family(r: &mut Registry, name: &str, help: &str, label: &str, values: &[(String, u64)]) {
    let f: Family<Labels, Counter<u64, AtomicU64>> = Family::default();
    for (l, v) in values {
        f.get_or_create(&vec![(label.to_string(), l.clone())])
            .inc_by(*v);
    }
    r.register(name, help, f);
}

impl Metrics {
    /// The text a scrape answers (OpenMetrics, which Prometheus reads).
    pub fn render(&self, s: &Scrape<'_>) -> String {
        let mut r = Registry::with_prefix("obatch");
        let c = s.counters;
        let info: Family<Labels, Gauge> = Family::default();
        info.get_or_create(&vec![("version".into(), env!("CARGO_PKG_VERSION").into())])
            .set(1);
        r.register("build_info", "ollama-batch build information", info);
        gauge(
            &mut r,
            "start_time",
            "When this process started (Unix time)",
            Some(Unit::Seconds),
            self.started,
        );
        let own = |xs: &[(&'static str, u64)]| -> Vec<(String, i64)> {
            xs.iter().map(|(k, v)| (k.to_string(), *v as i64)).collect()
        };
        gauge_family(
            &mut r,
            "requests",
            "Lines of unfinished batches by state",
            None,
            "state",
            &own(s.requests),
        );
        gauge_family(
            &mut r,
            "batches",
            "Batches by status",
            None,
            "status",
            &own(s.batches),
        );
        counter_family(
            &mut r,
            "requests_finished",
            "Lines whose result became durable since start, by outcome",
            "outcome",
            &[
                ("succeeded".into(), c.succeeded),
                ("failed".into(), c.failed),
            ],
        );
        let causes: Vec<(String, u64)> = crate::live::progress::RETRY_CAUSES
            .iter()
            .map(|k| {
                (
                    k.to_string(),
                    c.retries_by_cause.get(k).copied().unwrap_or(0),
                )
            })
            .collect();
        counter_family(
            &mut r,
            "retries",
            "Retries scheduled since start, by cause",
            "cause",
            &causes,
        );
        counter_family(
            &mut r,
            "webhook_deliveries",
            "Webhook deliveries since start: made (2xx), attempts scheduled again, given up",
            "outcome",
            &s.webhook_deliveries
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect::<Vec<_>>(),
        );
        gauge(
            &mut r,
            "webhook_pending",
            "Webhook deliveries waiting in the store",
            None,
            s.webhook_pending as i64,
        );
        let a = &c.answers;
        counter_family(
            &mut r,
            "answers",
            "JSON answers since start: checked against their format, fence removed, re-asks sent, lines ended invalid or truncated, lines reused from earlier answers",
            "outcome",
            &[
                ("checked".into(), a.checked),
                ("fenced".into(), a.fenced),
                ("reasked".into(), a.reasks),
                ("invalid".into(), a.invalid),
                ("truncated".into(), a.truncated),
                ("reused".into(), a.reused),
            ],
        );
        counter(
            &mut r,
            "model_switches",
            "Times a backend changed the model it serves (one model at a time per backend)",
            c.model_switches,
        );
        counter(
            &mut r,
            "requests_deferred",
            "Lines put back without spending an attempt because the backend was full (429 / 503)",
            c.deferred,
        );
        counter(
            &mut r,
            "requests_rescued",
            "Leases rescued after outliving request timeout + margin",
            c.rescued,
        );
        counter(
            &mut r,
            "requests_requeued_at_start",
            "Lines found in flight at start-up and put back in the queue",
            c.requeued_at_start,
        );
        counter(
            &mut r,
            "backend_outages",
            "Times the backend was found unreachable",
            c.backend_outages,
        );
        counter(&mut r, "backend_oom", "Out-of-memory answers", c.oom);
        counter(
            &mut r,
            "prompt_tokens",
            "Prompt tokens of durable answers since start",
            c.tokens.prompt,
        );
        counter(
            &mut r,
            "completion_tokens",
            "Completion tokens of durable answers since start",
            c.tokens.completion,
        );
        counter(
            &mut r,
            "cached_prompt_tokens",
            "Cached prompt tokens, over the answers that reported a figure",
            c.tokens.cached,
        );
        counter(
            &mut r,
            "answers_without_cached_figure",
            "Answers that did not say how many prompt tokens were cached (unknown, not 0)",
            c.tokens.without_cached_figure,
        );
        let up: Vec<(String, i64)> = s
            .backends_up
            .iter()
            .filter_map(|(url, up)| up.map(|u| (url.clone(), u as i64)))
            .collect();
        if !up.is_empty() {
            gauge_family(
                &mut r,
                "backend_up",
                "1 when the backend answered its last call or probe with a real answer, per backend (its URL without credentials)",
                None,
                "backend",
                &up,
            );
        }
        gauge(
            &mut r,
            "backend_in_flight_requests",
            "Calls to the backend in flight",
            None,
            s.in_flight as i64,
        );
        gauge(
            &mut r,
            "backend_concurrency_limit",
            "Current limit of calls in flight (lowered after out-of-memory)",
            None,
            s.concurrency_limit as i64,
        );
        r.register_with_unit(
            "backend_request_duration",
            "Duration of backend calls, by outcome",
            Unit::Seconds,
            self.calls.clone(),
        );
        gauge(
            &mut r,
            "gpu_info_available",
            "1 when GPU memory readings exist (0: the gpu series are absent, not 0 bytes)",
            None,
            s.gpu.available as i64,
        );
        if s.gpu.available {
            let used: Vec<(String, i64)> = s
                .gpu
                .devices
                .iter()
                .map(|d| (d.index.to_string(), d.used_bytes as i64))
                .collect();
            let total: Vec<(String, i64)> = s
                .gpu
                .devices
                .iter()
                .map(|d| (d.index.to_string(), d.total_bytes as i64))
                .collect();
            gauge_family(
                &mut r,
                "gpu_memory_used",
                "GPU memory used",
                Some(Unit::Bytes),
                "gpu",
                &used,
            );
            gauge_family(
                &mut r,
                "gpu_memory_total",
                "GPU memory in all",
                Some(Unit::Bytes),
                "gpu",
                &total,
            );
        }
        gauge(
            &mut r,
            "store_size",
            "Bytes the state directory takes",
            Some(Unit::Bytes),
            s.store_bytes as i64,
        );
        let mut out = String::new();
        if let Err(e) = encode(&mut out, &r) {
            tracing::warn!(error = %e, "cannot encode metrics");
        }
        out
    }
}

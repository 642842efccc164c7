//! Batch webhooks, as OpenAI sends them: on each terminal transition of a batch, an event
//! `{"id": "evt_…", "object": "event", "type": "batch.completed", "created_at": …, "data":
//! {"id": "batch_…"}}` for every receiver (`--webhook-url`, a batch's metadata `webhook_url`
//! with `--webhook-allow-metadata`, and the `--on-finish-cmd` program) is written to the store
//! **in the same transaction as the transition** ([`Receivers::outbox`], through
//! `Store::update_batch_notifying`), then delivered at least once by [`spawn`]: signed per
//! Standard Webhooks (`webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<base64
//! HMAC-SHA256 of "id.timestamp.body">`), retried with exponential backoff and full jitter for
//! `--webhook-retry-for`, 2xx being success. Deliveries run in their own tasks: a receiver
//! that is down never slows the queue. A delivery survives a crash (it is in the store until it
//! is made); one that was under way when the process died is made again (at least once:
//! receivers deduplicate on `webhook-id`).

use crate::config::Config;
use crate::domain::{BatchRecord, BatchStatus, Delivery, unix_millis, unix_now};
use crate::store::Store;
use serde_json::json;
use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// The batch metadata key naming a batch's own receiver (with `--webhook-allow-metadata`).
pub const META_WEBHOOK_URL: &str = "webhook_url";

/// How often the deliverer looks for deliveries that are due.
const POLL: Duration = Duration::from_millis(200);
/// Deliveries under way at once, at most.
const PARALLEL: usize = 8;
/// The longest wait between two attempts.
const MAX_DELAY: Duration = Duration::from_secs(3600);
/// One attempt's deadline.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);

/// The event type of a terminal status.
pub fn event_type(status: BatchStatus) -> Option<&'static str> {
    match status {
        BatchStatus::Completed => Some("batch.completed"),
        BatchStatus::Failed => Some("batch.failed"),
        BatchStatus::Cancelled => Some("batch.cancelled"),
        BatchStatus::Expired => Some("batch.expired"),
        _ => None,
    }
}

/// Who is told when a batch ends.
#[derive(Clone, Debug, Default)]
pub struct Receivers {
    urls: Vec<String>,
    allow_metadata: bool,
    command: bool,
}

impl Receivers {
    /// The receivers the configuration names.
    pub fn of(cfg: &Config) -> Receivers {
        Receivers {
            urls: cfg.webhook_urls.clone(),
            allow_metadata: cfg.webhook_allow_metadata && cfg.webhook_key.is_some(),
            command: cfg.on_finish_cmd.is_some(),
        }
    }

    /// The deliveries of `rec`'s terminal transition (none when it is not terminal, or nobody
    /// listens): one event, one delivery per receiver.
    pub fn outbox(&self, rec: &BatchRecord) -> Vec<Delivery> {
        let Some(kind) = event_type(rec.status) else {
            return Vec::new();
        };
        let mut to: Vec<String> = self.urls.clone();
        if self.allow_metadata
            && let Some(u) = rec.metadata.as_ref().and_then(|m| m.get(META_WEBHOOK_URL))
            && !to.contains(u)
        {
            to.push(u.clone());
        }
        if self.command {
            to.push(Delivery::COMMAND.to_string());
        }
        if to.is_empty() {
            return Vec::new();
        }
        let now = unix_now();
        let event_id = format!("evt_{}", uuid::Uuid::now_v7().simple());
        let body = json!({"id": event_id, "object": "event", "type": kind, "created_at": now,
                          "data": {"id": rec.id.to_string()}})
        .to_string();
        to.into_iter()
            .map(|to| Delivery {
                event_id: event_id.clone(),
                kind: kind.to_string(),
                batch: rec.id.to_string(),
                body: body.clone(),
                to,
                created_at: now,
                attempts: 0,
                next_at_ms: 0,
                last_error: None,
            })
            .collect()
    }
}

/// HMAC-SHA256 (RFC 2104) of `msg` under `key`.
fn hmac_sha256(key: &[u8], msg: &[&[u8]]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut k = [0u8; 64];
    if key.len() > 64 {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    for m in msg {
        inner.update(m);
    }
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().into()
}

/// The `webhook-signature` of an event: `v1,<base64 HMAC-SHA256(key, "id.timestamp.body")>`,
/// `key` being the base64 part of the `whsec_` secret.
pub fn signature(key_b64: &str, id: &str, timestamp: i64, body: &str) -> Option<String> {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let key = b64.decode(key_b64).ok()?;
    let ts = timestamp.to_string();
    let mac = hmac_sha256(
        &key,
        &[id.as_bytes(), b".", ts.as_bytes(), b".", body.as_bytes()],
    );
    Some(format!("v1,{}", b64.encode(mac)))
}

/// What `/status` and `/metrics` show of the deliveries (since start, but `pending`).
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries waiting in the store (made at the last look).
    pub pending: AtomicU64,
    /// Made (2xx, or the program ran).
    pub delivered: AtomicU64,
    /// Attempts that failed and were scheduled again.
    pub retried: AtomicU64,
    /// Given up after `--webhook-retry-for`.
    pub failed: AtomicU64,
    /// The last failure, for operators.
    pub last_error: Mutex<Option<String>>,
}

impl Stats {
    fn failure(&self, e: String) {
        if let Ok(mut l) = self.last_error.lock() {
            *l = Some(e);
        }
    }

    /// The figures as JSON (`/status`).
    pub fn view(&self, receivers: &[String]) -> serde_json::Value {
        json!({
            "receivers": receivers.iter().map(|u| crate::domain::redact_urls(u)).collect::<Vec<_>>(),
            "pending": self.pending.load(Ordering::Relaxed),
            "delivered": self.delivered.load(Ordering::Relaxed),
            "retried": self.retried.load(Ordering::Relaxed),
            "failed": self.failed.load(Ordering::Relaxed),
            "last_error": self.last_error.lock().ok().and_then(|l| l.clone()),
        })
    }
}

/// What the deliverer needs.
#[derive(Clone)]
struct Deliverer {
    store: Arc<Store>,
    key: Option<String>,
    retry_for: Duration,
    retry_initial: Duration,
    command: Option<std::path::PathBuf>,
    http: reqwest::Client,
    stats: Arc<Stats>,
}

/// Starts delivering: every [`POLL`], the deliveries that are due go out, each in its own task,
/// at most [`PARALLEL`] at once. Returns the figures it keeps.
pub fn spawn(
    store: Arc<Store>,
    cfg: &Config,
    tracker: &TaskTracker,
    stop: CancellationToken,
) -> Result<Arc<Stats>, String> {
    let stats = Arc::new(Stats::default());
    let http = crate::backend::http_client(cfg.ca_pem.as_deref())?
        .timeout(ATTEMPT_TIMEOUT)
        .connect_timeout(Duration::from_secs(10))
        .user_agent(concat!("ollama-batch/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
    let d = Deliverer {
        store,
        key: cfg.webhook_key.as_ref().map(|k| k.expose().to_string()),
        retry_for: cfg.webhook_retry_for,
        retry_initial: cfg.webhook_retry_initial,
        command: cfg.on_finish_cmd.clone(),
        http,
        stats: stats.clone(),
    };
    let tasks = tracker.clone();
    tracker.spawn(async move {
        let under_way: Arc<Mutex<HashSet<u64>>> = Default::default();
        loop {
            let due = {
                let store = d.store.clone();
                tokio::task::spawn_blocking(move || {
                    if store.failure().is_some() {
                        return Vec::new();
                    }
                    store.deliveries().unwrap_or_default()
                })
                .await
                .unwrap_or_default()
            };
            d.stats.pending.store(due.len() as u64, Ordering::Relaxed);
            let now = unix_millis();
            for (id, delivery) in due {
                if delivery.next_at_ms > now {
                    continue;
                }
                {
                    let Ok(mut u) = under_way.lock() else { break };
                    if u.len() >= PARALLEL || !u.insert(id) {
                        continue;
                    }
                }
                let (d, under_way) = (d.clone(), under_way.clone());
                tasks.spawn(async move {
                    d.deliver(id, delivery).await;
                    if let Ok(mut u) = under_way.lock() {
                        u.remove(&id);
                    }
                });
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    });
    Ok(stats)
}

impl Deliverer {
    /// One attempt of one delivery, and what follows from it (forgotten, or scheduled again).
    async fn deliver(&self, id: u64, mut d: Delivery) {
        let outcome = if d.to == Delivery::COMMAND {
            self.run_command(&d).await
        } else {
            self.post(&d).await
        };
        d.attempts += 1;
        let store = self.store.clone();
        let write = match outcome {
            Ok(()) => {
                self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                tracing::info!(event = %d.event_id, kind = %d.kind, batch = %d.batch, to = %crate::domain::redact_urls(&d.to), attempts = d.attempts, "webhook delivered");
                Write::Remove
            }
            // The program's failure is logged, never retried (it may have done half its job).
            Err(e) if d.to == Delivery::COMMAND => {
                self.stats.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(event = %d.event_id, batch = %d.batch, error = %e, "--on-finish-cmd failed");
                self.stats.failure(e);
                Write::Remove
            }
            Err(e) => {
                let age =
                    Duration::from_secs(unix_now().saturating_sub(d.created_at).max(0) as u64);
                self.stats.failure(e.clone());
                if age >= self.retry_for {
                    self.stats.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(event = %d.event_id, kind = %d.kind, batch = %d.batch, to = %crate::domain::redact_urls(&d.to), attempts = d.attempts, error = %e, "webhook given up after --webhook-retry-for");
                    Write::Remove
                } else {
                    self.stats.retried.fetch_add(1, Ordering::Relaxed);
                    let ceiling =
                        crate::domain::outcome::doubling(self.retry_initial, MAX_DELAY, d.attempts);
                    // Full jitter, at least a tenth of the ceiling (no busy loop at 0).
                    let delay = ceiling.mul_f64(0.1 + 0.9 * fastrand::f64());
                    d.next_at_ms = unix_millis() + delay.as_millis() as u64;
                    d.last_error = Some(e.clone());
                    tracing::warn!(event = %d.event_id, to = %crate::domain::redact_urls(&d.to), attempts = d.attempts, retry_in = ?delay, error = %e, "webhook not delivered; tried again later");
                    Write::Again(Box::new(d))
                }
            }
        };
        let r = tokio::task::spawn_blocking(move || {
            match write {
                Write::Remove => store.remove_delivery(id)?,
                Write::Again(d) => store.put_delivery(id, &d)?,
            }
            store.flush()
        })
        .await;
        if let Ok(Err(e)) = r {
            tracing::warn!(error = %e, "cannot record a webhook delivery; it may be made again");
        }
    }

    /// POSTs the event, signed; `Ok` on a 2xx.
    async fn post(&self, d: &Delivery) -> Result<(), String> {
        let ts = unix_now();
        let Some(sig) = self
            .key
            .as_deref()
            .and_then(|k| signature(k, &d.event_id, ts, &d.body))
        else {
            return Err("no --webhook-secret to sign the event with".into());
        };
        let r = self
            .http
            .post(&d.to)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header("webhook-id", &d.event_id)
            .header("webhook-timestamp", ts.to_string())
            .header("webhook-signature", sig)
            .body(d.body.clone())
            .send()
            .await
            .map_err(|e| {
                crate::domain::redact_urls(&format!(
                    "{}: {}",
                    d.to,
                    crate::backend::error_chain(&e)
                ))
            })?;
        let status = r.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "{} answered {status}",
                crate::domain::redact_urls(&d.to)
            ))
        }
    }

    /// Runs `--on-finish-cmd` with the batch's figures in its environment; `Ok` when it exits 0.
    async fn run_command(&self, d: &Delivery) -> Result<(), String> {
        let Some(program) = &self.command else {
            return Err("no --on-finish-cmd".into());
        };
        let batch = crate::domain::BatchId::parse(&d.batch)
            .and_then(|id| self.store.get_batch(id).ok().flatten());
        let mut cmd = tokio::process::Command::new(program);
        cmd.env("OLLAMA_BATCH_ID", &d.batch)
            .env("OLLAMA_BATCH_EVENT", &d.kind)
            .stdin(std::process::Stdio::null())
            .kill_on_drop(true);
        if let Some(b) = &batch {
            cmd.env("OLLAMA_BATCH_STATUS", b.status.as_str())
                .env("OLLAMA_BATCH_TOTAL", b.request_counts.total.to_string())
                .env(
                    "OLLAMA_BATCH_COMPLETED",
                    b.request_counts.completed.to_string(),
                )
                .env("OLLAMA_BATCH_FAILED", b.request_counts.failed.to_string());
        }
        let status = tokio::time::timeout(Duration::from_secs(600), cmd.status())
            .await
            .map_err(|_| format!("{} ran for more than 10 minutes", program.display()))?
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if status.success() {
            Ok(())
        } else {
            Err(format!("{} exited with {status}", program.display()))
        }
    }
}

/// What a finished attempt writes.
enum Write {
    Remove,
    Again(Box<Delivery>),
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Standard Webhooks specification's own example (standard-webhooks/spec, "Verifying
    /// webhook authenticity").
    #[test]
    fn signatures_match_the_specifications_example() {
        let sig = signature(
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            r#"{"test": 2432232314}"#,
        );
        assert_eq!(
            sig.as_deref(),
            Some("v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=")
        );
    }
}

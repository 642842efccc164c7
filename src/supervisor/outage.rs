//! Backends that stop answering, and a store that can no longer write: a backend found
//! unreachable pauses its own lanes and is probed with backoff until it answers (the other
//! backends go on); a failed store stops dispatch for good, said once.

use super::{Command, Supervisor};
use crate::domain::unix_now;
use crate::live;
use std::time::Duration;

impl Supervisor {
    /// Whether the store has failed (disk full): then no more leases, and it is said once.
    pub(super) fn store_failed(&mut self) -> bool {
        if self.store_failure.is_none()
            && let Some(e) = self.store.failure()
        {
            tracing::error!(error = %e, in_flight = self.leased.len(), "store failed: dispatch stopped; free space and restart ollama-batch (every acknowledged result is durable and the run resumes where it stopped)");
            self.store_failure = Some(e);
        }
        self.store_failure.is_some()
    }

    /// Pauses dispatch and starts probing (once per outage).
    /// Whether every backend is down (then nothing is leased).
    pub(super) fn all_down(&self) -> bool {
        self.down.iter().all(|d| *d)
    }

    /// Backend `i` did not answer: its lanes pause, and a probe with backoff tells when it is
    /// back. The other backends go on.
    pub(super) fn backend_gone(&mut self, i: usize, err: String) {
        if self.down.get(i) != Some(&false) {
            return;
        }
        self.down[i] = true;
        self.counters.backend_outages += 1;
        let backend = self.backends[i].clone();
        tracing::warn!(error = %err, url = backend.url(), "backend unreachable: its lanes paused, probing");
        self.notices
            .send(live::Notice::BackendDown { error: err.clone() });
        self.live.with(|l| {
            let b = l.backend_mut(i);
            b.reachable = Some(false);
            b.down_since = Some(unix_now());
            b.last_error = Some(err);
            l.merge_backends();
        });
        let live = self.live.clone();
        let tx = self.cmds_tx.clone();
        let stop = self.stop.clone();
        self.tracker.spawn(async move {
            use backon::{ExponentialBuilder, Retryable};
            let policy = ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(250))
                .with_max_delay(Duration::from_secs(15))
                .with_jitter()
                .without_max_times();
            let probe = (|| async { backend.probe().await }).retry(policy).notify(
                |e: &String, next: Duration| {
                    live.with(|l| {
                        let b = l.backend_mut(i);
                        b.last_probe_at = Some(unix_now());
                        b.next_probe_at = Some(unix_now() + next.as_secs() as i64);
                        b.last_error = Some(e.clone());
                        l.merge_backends();
                    });
                },
            );
            tokio::select! {
                _ = stop.cancelled() => {}
                r = probe => if r.is_ok() { let _ = tx.send(Command::BackendUp(i)).await; },
            }
        });
    }
}

//! What the supervisor shows: the snapshot readers see (`live`), published after every turn,
//! the progress lines in the log, the low-cache warning, and a finished batch's final figures.

use super::{Active, Supervisor};
use crate::domain::BatchId;
use crate::live::{BatchLive, progress};
use std::collections::HashMap;
use std::time::Duration;
use tokio::time::Instant;

impl Supervisor {
    /// Keeps a finished batch's figures for `GET /status/batches/{id}`: the live figures at the
    /// end, plus its status, duration and the GPU memory peak.
    pub(super) fn keep_final_figures(&self, id: BatchId, a: &Active) -> Option<&'static str> {
        let f = a.figures(Instant::now(), self.cfg.num_ctx);
        let record = self.store.get_batch(id).ok().flatten();
        let v = serde_json::json!({
            "id": id.to_string(),
            "status": record.as_ref().map(|r| r.status.as_str()),
            "final": true,
            "created_at": record.as_ref().map(|r| r.created_at),
            "in_progress_at": record.as_ref().and_then(|r| r.in_progress_at),
            "finished_at": crate::domain::unix_now(),
            "duration_seconds": record
                .as_ref()
                .and_then(|r| r.in_progress_at)
                .map(|t| crate::domain::unix_now().saturating_sub(t)),
            "gpu_memory_peak_bytes": self.gpu.peak_used_bytes(),
            "progress": f,
        });
        if let Err(e) = self.store.put_batch_stats(id, &v.to_string()) {
            tracing::warn!(batch = %id, error = %e, "cannot keep the batch's final figures");
        }
        record.map(|r| r.status.as_str())
    }

    /// One INFO line per running batch every `--progress-every` results, and at most every
    /// `--progress-interval` when fewer finish: done/total, percent, rate, ETA, failed,
    /// retries, cached share, GPU memory.
    pub(super) fn log_progress(&mut self) {
        let now = Instant::now();
        // Read only when a line is due: this runs after every group commit.
        let mut gpu: Option<String> = None;
        for (id, a) in self.batches.iter_mut() {
            let done = a.succeeded + a.failed;
            if !a.progress.log_due(
                now,
                done,
                self.cfg.progress_every,
                self.cfg.progress_interval,
            ) {
                continue;
            }
            a.progress.sample(now, done);
            let f = a.figures(now, self.cfg.num_ctx);
            if !a.cache_warned
                && let Some(why) = low_cache(&f, self.sched.groups(*id), self.sched.lanes())
            {
                a.cache_warned = true;
                tracing::warn!(batch = %id, cached_share = f.cached_share, "{why}");
            }
            a.progress.logged(now, done);
            let retries: u64 = f.retries.values().sum();
            tracing::info!(
                batch = %id,
                done = f.done,
                total = f.total,
                percent = f.percent,
                rate_per_s = f.requests_per_second_recent,
                eta = %f.eta_seconds.map(|s| humantime::format_duration(Duration::from_secs(s)).to_string()).unwrap_or_else(|| "unknown".into()),
                failed = f.failed,
                retries,
                reasks = f.answers.reasks,
                invalid_answers = f.answers.invalid,
                truncated_answers = f.answers.truncated,
                reused = f.answers.reused,
                cached_share = %f.cached_share.map(|c| format!("{:.1}%", c * 100.0)).unwrap_or_else(|| "unknown".into()),
                gpu_memory = %gpu.get_or_insert_with(|| self.gpu.summary()),
                "progress"
            );
        }
    }

    pub(super) fn publish(&mut self) {
        let now = Instant::now();
        let num_ctx = self.cfg.num_ctx;
        for a in self.batches.values_mut() {
            a.progress.sample(now, a.succeeded + a.failed);
        }
        let batches: HashMap<BatchId, BatchLive> = self
            .batches
            .iter()
            .map(|(id, a)| {
                (
                    *id,
                    BatchLive {
                        status: Some(a.status),
                        counts: crate::domain::RequestCounts {
                            total: a.total,
                            completed: a.succeeded,
                            failed: a.failed,
                        },
                        usage: a.usage,
                        queued: self.sched.ready(*id) as u64,
                        retry_wait: a.retry_wait,
                        in_flight: a.in_flight,
                        finalize_error: a.finalize_error.clone(),
                        figures: a.figures(now, num_ctx),
                        mode: if a.plan.is_some() {
                            "conversation"
                        } else {
                            "independent"
                        },
                    },
                )
            })
            .collect();
        let counters = self.counters.clone();
        let answered: Vec<usize> = std::mem::take(&mut self.answered_since_publish)
            .into_iter()
            .enumerate()
            .filter(|(i, a)| *a && self.down.get(*i) == Some(&false))
            .map(|(i, _)| i)
            .collect();
        let errors =
            std::mem::take(&mut self.recent_errors_changed).then(|| self.recent_errors.clone());
        let serving = self.models.serving();
        self.live.with(|l| {
            if let Some(e) = errors {
                l.recent_errors = e;
            }
            l.batches = batches;
            l.counters = counters;
            l.serving = serving;
            for &i in &answered {
                let b = l.backend_mut(i);
                b.reachable = Some(true);
                b.last_error = None;
            }
            if !answered.is_empty() {
                l.merge_backends();
            }
        });
    }
}

/// Answers after which a low cached share means something (each lane's first prefill of a
/// group is cold), per lane.
const CACHE_WARMUP_PER_LANE: u64 = 8;

/// When a batch's lines share prompt prefixes (far fewer groups than lines) but the backend
/// serves little of them from its cache after a warm-up: what to tell the operator.
pub(super) fn low_cache(f: &progress::Figures, groups: usize, lanes: usize) -> Option<String> {
    let share = f.cached_share?;
    let lines_per_group = f.total / groups.max(1) as u64;
    if lines_per_group < 8
        || f.answers_with_cached_figure < CACHE_WARMUP_PER_LANE * lanes as u64
        || share >= 0.3
    {
        return None;
    }
    Some(format!(
        "lines share a prompt prefix ({groups} group(s) for {} lines) but only {:.1} % of prompt tokens came from the backend's cache: the usual causes are Gemma 3 (sliding-window attention) on llama.cpp without --swa-full, an Ollama version that re-processes the prompt, or a --concurrency that differs from the backend's slots (llama-server -np, OLLAMA_NUM_PARALLEL)",
        f.total,
        share * 100.0
    ))
}

#[cfg(test)]
mod tests {
    use super::{low_cache, progress};
    use tokio::time::Instant;

    #[test]
    fn a_low_cached_share_is_flagged_only_when_lines_share_prefixes_after_a_warmup() {
        let mut f = progress::Progress::new(0).figures(Instant::now(), 1000, 0, 0, None);
        f.total = 1000;
        f.answers_with_cached_figure = 100;
        f.cached_share = Some(0.05);
        let why = low_cache(&f, 1, 4).expect("flagged");
        assert!(why.contains("--swa-full") && why.contains("5.0 %"), "{why}");
        assert_eq!(
            low_cache(&f, 500, 4),
            None,
            "2 lines a group: nothing to share"
        );
        f.cached_share = Some(0.8);
        assert_eq!(low_cache(&f, 1, 4), None, "the cache works");
        f.cached_share = None;
        assert_eq!(low_cache(&f, 1, 4), None, "unknown is not low");
        f.cached_share = Some(0.05);
        f.answers_with_cached_figure = 10;
        assert_eq!(low_cache(&f, 1, 4), None, "still warming up");
    }
}

//! One model at a time per backend. A backend's lanes serve one model (the model of its
//! batches, after `--model` / `--model-map`) until that model's queued work runs dry, or until
//! another model's ready work has waited `--model-switch-wait` (the starvation guard between
//! models; the scheduler's group guard works within a model). Then the backend takes no new
//! leases, its calls in flight finish, the old model is released (Ollama: `keep_alive: 0`) and
//! the new one loaded (Ollama: an empty request), and its lanes serve the new model's batches.
//! With several backends, each decides alone: different models may run on different backends
//! at once. Without this, batches of two models created together made a 16 GB card unload
//! and load a 12B model every few calls.

use super::{Active, Command, Supervisor};
use std::collections::HashMap;
use tokio::time::Instant;

/// A batch's model, as lanes compare it (`None`: the batch names none, e.g. before intake).
pub(super) type Model = Option<String>;

/// Per backend: what it serves, and where it is going.
#[derive(Debug, Default)]
pub(super) struct Models {
    /// Per backend: the model its lanes serve; `None` before the first work.
    serving: Vec<Option<Model>>,
    /// Per backend: the model it is switching to, and whether the release and load started.
    switching: Vec<Option<(Model, bool)>>,
    /// Since when each model that no backend serves has had ready work.
    waiting_since: HashMap<Model, Instant>,
}

impl Models {
    /// For `backends` backends.
    pub(super) fn new(backends: usize) -> Models {
        Models {
            serving: vec![None; backends],
            switching: vec![None; backends],
            waiting_since: HashMap::new(),
        }
    }

    /// Whether backend `b`'s lanes may take a line of a batch of `model` now.
    pub(super) fn serves(&self, b: usize, model: &Model) -> bool {
        self.switching.get(b).is_none_or(Option::is_none)
            && self.serving.get(b).and_then(Option::as_ref) == Some(model)
    }

    /// Whether backend `b` is between two models (its lanes take nothing).
    pub(super) fn switching(&self, b: usize) -> bool {
        self.switching.get(b).is_some_and(Option::is_some)
    }

    /// The model backend `b` serves (for `/status`).
    pub(super) fn serving(&self) -> Vec<Option<String>> {
        self.serving.iter().map(|m| m.clone().flatten()).collect()
    }

    /// The earliest time a waiting model's wait ends (the loop wakes for it).
    pub(super) fn next_deadline(&self, wait: std::time::Duration) -> Option<Instant> {
        self.waiting_since.values().min().map(|t| *t + wait)
    }
}

impl Supervisor {
    /// Decides, for every backend, which model its lanes serve this turn; starts the switches
    /// that are due.
    pub(super) fn choose_models(&mut self) {
        let now = Instant::now();
        // Models with queued work, oldest batch first; and whether each has lines ready now.
        let mut work: Vec<(Model, bool)> = Vec::new();
        for (id, a) in &self.batches {
            if !a.dispatching() {
                continue;
            }
            let ready = self.sched.ready(*id) > 0;
            if !(ready || a.retry_wait > 0 || a.in_flight > 0) {
                continue;
            }
            match work.iter_mut().find(|(m, _)| *m == a.model) {
                Some(w) => w.1 |= ready,
                None => work.push((a.model.clone(), ready)),
            }
        }
        let m = &mut self.models;
        // A model with ready lines that no backend serves or is switching to is waiting.
        let covered = |m: &Models, model: &Model| {
            m.serving.iter().any(|s| s.as_ref() == Some(model))
                || m.switching
                    .iter()
                    .any(|s| s.as_ref().map(|x| &x.0) == Some(model))
        };
        let waiting: Vec<Model> = work
            .iter()
            .filter(|(model, ready)| *ready && !covered(m, model))
            .map(|(model, _)| model.clone())
            .collect();
        m.waiting_since.retain(|model, _| waiting.contains(model));
        for model in waiting {
            m.waiting_since.entry(model).or_insert(now);
        }
        for b in 0..m.serving.len() {
            if m.switching[b].is_some() {
                continue;
            }
            let next = match &m.serving[b] {
                // The first work decides what a backend serves: no switch.
                None => {
                    if let Some((model, _)) = work.first() {
                        m.serving[b] = Some(model.clone());
                    }
                    None
                }
                Some(current) => {
                    let has_work = work.iter().any(|(model, _)| model == current);
                    if !has_work {
                        // Dry: the oldest batch's model that this backend does not serve.
                        work.iter()
                            .find(|(model, ready)| *ready && model != current)
                            .map(|(model, _)| model.clone())
                    } else {
                        // Another model waited long enough: the one waiting longest.
                        m.waiting_since
                            .iter()
                            .filter(|(_, since)| {
                                now.duration_since(**since) >= self.cfg.model_switch_wait
                            })
                            .min_by_key(|(_, since)| **since)
                            .map(|(model, _)| model.clone())
                    }
                }
            };
            if let Some(to) = next {
                tracing::info!(
                    backend = self.backends.get(b).map(|x| x.url()).unwrap_or_default(),
                    from = ?m.serving[b].clone().flatten(),
                    to = ?to,
                    "switching model: calls in flight finish, then the model is changed"
                );
                m.waiting_since.remove(&to);
                m.switching[b] = Some((to, false));
            }
        }
        // A switching backend whose calls have all ended: release the old model, load the new.
        for b in 0..self.models.switching.len() {
            let Some((to, started)) = self.models.switching[b].clone() else {
                continue;
            };
            let busy = self
                .lane_backend
                .iter()
                .zip(&self.lane_load)
                .any(|(backend, load)| *backend == b && *load > 0);
            if started || busy {
                continue;
            }
            self.models.switching[b] = Some((to.clone(), true));
            let from = self.models.serving[b].clone().flatten();
            let Some(backend) = self.backends.get(b).cloned() else {
                continue;
            };
            let cmds = self.cmds_tx.clone();
            self.tracker.spawn(async move {
                if let Some(old) = &from {
                    backend.release_model(old).await;
                }
                if let Some(new) = &to {
                    backend.warm_up(new).await;
                }
                let _ = cmds.send(Command::ModelReady(b, to)).await;
            });
        }
    }

    /// Backend `b` now serves `model` (its switch is done).
    pub(super) fn model_ready(&mut self, b: usize, model: Model) {
        if let Some(s) = self.models.switching.get_mut(b) {
            *s = None;
        }
        if let Some(s) = self.models.serving.get_mut(b) {
            *s = Some(model.clone());
        }
        self.counters.model_switches += 1;
        tracing::info!(backend = self.backends.get(b).map(|x| x.url()).unwrap_or_default(), model = ?model, "model switched");
    }
}

impl Active {
    /// Whether lanes of backend `b` may take this batch's lines now.
    pub(super) fn served_by(&self, models: &Models, b: usize) -> bool {
        self.dispatching() && models.serves(b, &self.model)
    }
}

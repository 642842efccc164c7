//! The intake's background task: validation (blocking, off the runtime), then the model check
//! against every backend, then `in_progress` (and the supervisor is told) or `failed`. Started
//! by the API on create and by start-up recovery for batches still validating.

use super::{Command, SupervisorHandle};
use crate::config::Config;
use crate::domain::BatchId;
use crate::intake;
use crate::live;
use crate::store::{Store, StoreError};
use std::sync::Arc;
use tokio_util::task::TaskTracker;

/// Runs a batch's intake in the background: validation, then (unless `--no-model-check`) the
/// question to the backend whether it has the batch's model, then `in_progress` (and the
/// supervisor adopts it) or `failed`. Started by the API on create and by start-up recovery.
pub fn spawn_intake(
    store: Arc<Store>,
    cfg: Arc<Config>,
    handle: SupervisorHandle,
    tracker: &TaskTracker,
    id: BatchId,
) {
    tracker.spawn(async move {
        let (s, c) = (store.clone(), cfg.clone());
        let validated = match tokio::task::spawn_blocking(move || intake::validate(&s, &c, id)).await
        {
            Ok(Ok(v)) => v,
            Ok(Err(e)) => {
                tracing::error!(batch = %id, error = %e, "intake failed; it runs again at the next start");
                return;
            }
            Err(e) => {
                tracing::error!(batch = %id, error = %e, "intake panicked");
                return;
            }
        };
        let outcome = match validated {
            intake::Validated::Done(o) => Ok(o),
            intake::Validated::Valid { total, model } => {
                let missing = match (&model, cfg.model_check) {
                    // Every backend must have it: a line may run on any of them.
                    (Some(m), true) => {
                        let mut missing = None;
                        for b in &handle.backends {
                            match b.check_model(m).await {
                                crate::backend::ModelCheck::Present => {}
                                crate::backend::ModelCheck::Missing(why) => {
                                    missing = Some(why);
                                    break;
                                }
                                crate::backend::ModelCheck::Unknown(why) => {
                                    tracing::info!(batch = %id, model = %m, url = b.url(), reason = %why, "the backend cannot say whether it has the model; the batch runs");
                                }
                            }
                        }
                        missing
                    }
                    _ => None,
                };
                let s = store.clone();
                tokio::task::spawn_blocking(move || match missing {
                    Some(why) => {
                        tracing::error!(batch = %id, error = %why, "model not found: batch failed, no line sent");
                        intake::reject(
                            &s,
                            &cfg,
                            id,
                            vec![crate::domain::LineError {
                                code: "model_not_found".into(),
                                message: why,
                                param: Some("body.model".into()),
                                line: None,
                            }],
                        )
                    }
                    None => intake::accept(&s, id, total, model),
                })
                .await
                .unwrap_or_else(|e| Err(StoreError::Io(std::io::Error::other(e.to_string()))))
            }
        };
        match outcome {
            Ok(intake::IntakeOutcome::Ready(n)) => {
                tracing::info!(batch = %id, lines = n, "validated");
                handle.notices.send(live::Notice::BatchValidated {
                    id: id.to_string(),
                    lines: n,
                });
                handle.send(Command::BatchReady(id)).await;
            }
            Ok(intake::IntakeOutcome::Cancelled) => handle.send(Command::BatchReady(id)).await,
            Ok(intake::IntakeOutcome::Invalid(n)) => {
                tracing::info!(batch = %id, errors = n, "validation failed");
                handle.notices.send(live::Notice::BatchFailed {
                    id: id.to_string(),
                    errors: n,
                });
            }
            Ok(intake::IntakeOutcome::Skipped) => {}
            Err(e) => tracing::error!(batch = %id, error = %e, "intake failed; it runs again at the next start"),
        }
    });
}

//! `ollama-batch retry BATCH_ID`: asks the server (over HTTP, `POST /batches/{id}/retry`) for a
//! new batch of exactly the lines of a finished batch that did not succeed, and prints the new
//! batch's id as the last line of standard output. Without `--server`, a server already on
//! `--listen` is used, or the engine is started on `--state` just long enough to make the batch
//! (which then waits there for `run` or `serve`).

use super::engine::Engine;
use super::note;
use crate::config::ServeArgs;
use clap::Args;

/// Flags of `retry`.
#[derive(Args, Debug, Clone)]
#[command(after_help = "Then follow the new batch and download its files:\n  \
ollama-batch run <new batch id> [--server URL | the engine flags of the first run]")]
pub struct RetryArgs {
    /// The finished batch whose failed, expired or cancelled lines run again.
    pub batch_id: String,
    /// The ollama-batch server that ran it (default: the one on --listen, or the engine on
    /// --state in this process).
    #[arg(long, env = "OLLAMA_BATCH_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// The engine run in this process (without --server).
    #[command(flatten, next_help_heading = "The engine (without --server; as serve)")]
    pub serve: ServeArgs,
}

/// Runs it: `Ok((input file id, new batch id))`, or the error in words.
pub async fn retry(args: &RetryArgs) -> Result<(String, String), String> {
    let engine = Engine::connect(args.server.as_deref(), &args.serve, &note).await?;
    let made = engine.server.retry(&args.batch_id).await;
    engine.stop().await?;
    let v = made?;
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let file = v["input_file_id"].as_str().unwrap_or_default().to_string();
    Ok((file, id))
}

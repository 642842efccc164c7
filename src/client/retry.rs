//! `ollama-batch retry BATCH_ID`: asks a running server (over HTTP, `POST /batches/{id}/retry`)
//! for a new batch of exactly the lines of a finished batch that did not succeed, and prints the
//! new batch's id as the last line of standard output.

use clap::Args;

/// Flags of `retry`.
#[derive(Args, Debug, Clone)]
pub struct RetryArgs {
    /// The finished batch whose failed, expired or cancelled lines run again.
    pub batch_id: String,
    /// The server.
    #[arg(
        long,
        env = "OLLAMA_BATCH_SERVER",
        default_value = "http://127.0.0.1:4080"
    )]
    pub server: String,
    /// Its API key, if it was started with one.
    #[arg(long, env = "OLLAMA_BATCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<crate::config::Secret>,
}

/// Runs it: `Ok((input file id, new batch id))`, or the error in words.
pub async fn retry(args: &RetryArgs) -> Result<(String, String), String> {
    let server = super::http::Server::new(&args.server, args.api_key.clone())?;
    let v = server.retry(&args.batch_id).await?;
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let file = v["input_file_id"].as_str().unwrap_or_default().to_string();
    Ok((file, id))
}

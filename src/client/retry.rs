//! `ollama-batch retry BATCH_ID`: asks a running server (over HTTP, `POST /batches/{id}/retry`)
//! for a new batch of exactly the lines of a finished batch that did not succeed, and prints the
//! new batch's id as the last line of standard output.

use clap::Args;
use serde_json::Value;

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

/// Runs it: `Ok((lines, new batch id))`, or the error in words.
pub async fn retry(args: &RetryArgs) -> Result<(String, String), String> {
    let url = format!(
        "{}/batches/{}/retry",
        args.server.trim_end_matches('/'),
        args.batch_id
    );
    let mut req = reqwest::Client::new().post(&url);
    if let Some(k) = &args.api_key {
        req = req.bearer_auth(k.expose());
    }
    let r = req.send().await.map_err(|e| {
        format!(
            "cannot reach the server at {}: {e} (is `ollama-batch serve` running there? --server)",
            args.server
        )
    })?;
    let status = r.status();
    let v: Value = r
        .json()
        .await
        .map_err(|e| format!("the server's answer is not JSON: {e}"))?;
    if !status.is_success() {
        return Err(format!(
            "{} ({status})",
            v["error"]["message"]
                .as_str()
                .unwrap_or("the server refused")
        ));
    }
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let file = v["input_file_id"].as_str().unwrap_or_default().to_string();
    Ok((file, id))
}

//! Where a client subcommand finds its server: `--server URL`, a server already answering on
//! `--listen`, or the same engine `serve` runs, started in this process on the state directory
//! and stopped when the command ends. The client talks to it over HTTP in every case.

use super::http::Server;
use crate::config::{Config, ServeArgs};
use crate::server::{self, Running};

/// The server a command talks to, and the engine it started, if it started one.
pub struct Engine {
    /// The server's HTTP API.
    pub server: Server,
    /// The engine started in this process (stopped by [`Engine::stop`]).
    pub local: Option<Running>,
}

impl Engine {
    /// Connects to `url`, or to a server already on `serve.listen`, or starts one. `note`
    /// receives what was chosen, in words.
    pub async fn connect(
        url: Option<&str>,
        serve: &ServeArgs,
        note: &dyn Fn(&str),
    ) -> Result<Engine, String> {
        let key = serve.api_key.first().cloned();
        if let Some(url) = url {
            let server = Server::new(url, key)?;
            if !server.healthy().await {
                return Err(format!(
                    "no ollama-batch server answers at {url} (is `ollama-batch serve` running there? without --server the engine runs in this process)"
                ));
            }
            return Ok(Engine {
                server,
                local: None,
            });
        }
        if serve.listen.port() != 0 {
            let existing = Server::new(&format!("http://{}", serve.listen), key.clone())?;
            if existing.healthy().await {
                note(&format!(
                    "using the server already running at http://{} (its own flags apply; pass --listen 127.0.0.1:0 to run the engine here instead)",
                    serve.listen
                ));
                return Ok(Engine {
                    server: existing,
                    local: None,
                });
            }
        }
        let cfg = Config::from_args(serve)?;
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e} (--listen)", cfg.listen))?;
        let state = cfg.state_dir.clone();
        let running = server::start(cfg, listener).await.map_err(|e| {
            let e = e.to_string();
            if e.contains("lock") || e.contains("Resource temporarily unavailable") {
                format!(
                    "{e}\nanother process is using the state directory {} (an `ollama-batch serve`? then pass --server URL)",
                    state.display()
                )
            } else {
                e
            }
        })?;
        let base = format!("http://{}", running.addr);
        note(&format!(
            "engine running in this process on {} (backend {} at {}); dashboard: {base}/",
            state.display(),
            serve.backend.backend.as_str(),
            crate::domain::redact_urls(&serve.backend.backend_url.join(", "))
        ));
        Ok(Engine {
            server: Server::new(&base, key)?,
            local: Some(running),
        })
    }

    /// Stops the engine started here, if any: in-flight calls get `--shutdown-grace`, then are
    /// requeued; everything acknowledged is already durable.
    pub async fn stop(self) -> Result<(), String> {
        if let Some(running) = self.local {
            running.stop();
            running.wait().await.map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

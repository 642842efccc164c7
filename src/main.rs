//! The `ollama-batch` binary: parse flags, set up logs, run, pick the exit code.

use clap::Parser;
use futures_util::StreamExt;
use ollama_batch::config::{Cli, Command, Config, LogFormat, ServeArgs};
use ollama_batch::server;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::process::ExitCode;

fn init_logs(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

async fn run(args: ServeArgs, print_report: bool) -> anyhow::Result<()> {
    let cfg = Config::from_args(&args).map_err(anyhow::Error::msg)?;
    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", cfg.listen))?;
    let running = server::start(cfg, listener).await?;
    if print_report {
        if running.report.is_empty() && running.revalidating == 0 {
            println!("recovery: no unfinished batches");
        }
        for line in &running.report {
            println!("recovery: {line}");
        }
        if running.revalidating > 0 {
            println!(
                "recovery: {} batch(es) were validating; validation restarts",
                running.revalidating
            );
        }
        println!("listening on {}", running.addr);
    }
    // First SIGTERM/SIGINT: graceful stop. Second: exit at once (safe: every acknowledged
    // result is already durable).
    let mut signals = signal_hook_tokio::Signals::new([SIGTERM, SIGINT])?;
    let stop = running.stop_token();
    tokio::spawn(async move {
        let mut seen = 0;
        while let Some(sig) = signals.next().await {
            seen += 1;
            if seen == 1 {
                tracing::info!(
                    signal = sig,
                    "stopping gracefully (send again to exit at once)"
                );
                stop.cancel();
            } else {
                tracing::warn!(signal = sig, "second signal: exiting now");
                std::process::exit(130);
            }
        }
    });
    running.wait().await?;
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (args, report) = match cli.command {
        Command::Serve(a) => (a, false),
        Command::Resume(a) => (a, true),
    };
    init_logs(args.log_format);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ollama-batch: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args, report)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ollama-batch: {e:#}");
            ExitCode::FAILURE
        }
    }
}

//! The `ollama-batch` binary: parse flags, set up logs, run, pick the exit code.

use clap::Parser;
use futures_util::StreamExt;
use ollama_batch::cli::{Cli, Command};
use ollama_batch::client::{note, say};
use ollama_batch::config::{Config, LogFormat, ServeArgs};
use ollama_batch::server;
use signal_hook::consts::{SIGINT, SIGTERM};
use std::process::ExitCode;

/// The log's destination: stderr, where a failed write (a closed pipe, `| head`, a tee that
/// died, a full disk) is dropped instead of reported. tracing-subscriber reports a failed write
/// with `eprintln!`, which panics when stderr itself is the problem; a panic in a log call
/// would take down whatever task logged (an upload's answer, an intake, the signal handler).
struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Around `run`'s progress bar, if one is on screen.
        ollama_batch::client::term::write_stderr(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        let _ = std::io::stderr().flush();
        Ok(())
    }
}

/// Prints an error on stderr, ignoring a closed stderr.
fn complain(line: &str) {
    note(&format!("ollama-batch: {line}"));
}

/// Logs at `default` (unless RUST_LOG says otherwise).
fn init_logs(format: LogFormat, default: &str) {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| LogWriter)
        .log_internal_errors(false)
        // Colour only for a person at a terminal: no escape codes in log files.
        .with_ansi(std::io::stderr().is_terminal());
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
            say("recovery: no unfinished batches");
        }
        for line in &running.report {
            say(&format!("recovery: {line}"));
        }
        if running.revalidating > 0 {
            say(&format!(
                "recovery: {} batch(es) were validating; validation restarts",
                running.revalidating
            ));
        }
        say(&format!("listening on {}", running.addr));
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

/// `csv-to-batch`: no server, no runtime.
fn csv_to_batch(args: ollama_batch::client::csv_to_batch::CsvArgs) -> ExitCode {
    use ollama_batch::client::csv_to_batch::{convert, summary, write_sample};
    if let Some(n) = args.sample {
        return match write_sample(&args.csv, n) {
            Ok(()) => {
                complain(&format!(
                    "wrote {n} synthetic candidates to {}",
                    args.csv.display()
                ));
                ExitCode::SUCCESS
            }
            Err(e) => {
                complain(&e);
                ExitCode::FAILURE
            }
        };
    }
    let Some(model) = args.model.as_deref() else {
        complain("--model is required (the model each line names)");
        return ExitCode::FAILURE;
    };
    let result = match &args.output {
        Some(path) => {
            ollama_batch::client::csv_to_batch::convert_to_file(&args.csv, &args.shape, model, path)
        }
        None => convert(&args.csv, &args.shape, model, &mut std::io::stdout().lock()),
    };
    match result {
        Ok(report) => {
            let counted = match &args.tokenizer_url {
                Some(url) => match runtime().and_then(|rt| {
                    rt.block_on(ollama_batch::client::csv_to_batch::count_tokens(
                        url, &report,
                    ))
                }) {
                    Ok(n) => Some(n),
                    Err(e) => {
                        complain(&e);
                        return ExitCode::FAILURE;
                    }
                },
                None => None,
            };
            note(&summary(&report, counted));
            note(&ollama_batch::client::csv_to_batch::duration(
                report.written,
                args.rate,
            ));
            ExitCode::SUCCESS
        }
        Err(e) => {
            complain(&e);
            ExitCode::FAILURE
        }
    }
}

/// Runs a client command on a multi-threaded runtime (it may start the engine); its exit code.
fn block_on(f: impl std::future::Future<Output = u8>) -> ExitCode {
    match tokio::runtime::Runtime::new() {
        Ok(rt) => ExitCode::from(rt.block_on(f)),
        Err(e) => {
            complain(&format!("cannot start the runtime: {e}"));
            ExitCode::FAILURE
        }
    }
}

/// A one-thread runtime for a client command.
fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))
}

/// glibc's allocator, set for a process that runs for hours (mallopt(3)); a setting given in
/// the environment (`MALLOC_ARENA_MAX`, `MALLOC_MMAP_THRESHOLD_`, or `GLIBC_TUNABLES`) wins.
///
/// - **Arenas: two.** glibc gives each thread that allocates its own heap ("arena", up to 8
///   per core) and keeps what is freed in each: a long run's memory grew with the cores, not
///   with the work (docs/benchmarks.md).
/// - **Blocks of 128 KiB and more are mapped, always.** glibc raises that threshold each time
///   such a block is freed, after which sled's 512 KiB log buffers, one after another for the
///   whole run, are cut from the heap among small blocks that live on, and the heap cannot
///   shrink: a 1,000,000-line run peaked at 125–185 MB in a third of the runs instead of
///   70–80 MB. A fixed threshold returns each buffer to the system when it is freed.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn tune_malloc() {
    use std::ffi::c_int;
    const M_MMAP_THRESHOLD: c_int = -3;
    const M_ARENA_MAX: c_int = -8;
    unsafe extern "C" {
        fn mallopt(param: c_int, value: c_int) -> c_int;
    }
    let unset =
        |var: &str| std::env::var_os(var).is_none() && std::env::var_os("GLIBC_TUNABLES").is_none();
    // SAFETY: called first thing in main, before any other thread exists; mallopt only sets
    // limits that later allocations follow.
    unsafe {
        if unset("MALLOC_ARENA_MAX") {
            mallopt(M_ARENA_MAX, 2);
        }
        if unset("MALLOC_MMAP_THRESHOLD_") {
            mallopt(M_MMAP_THRESHOLD, 128 * 1024);
        }
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn tune_malloc() {}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    let (args, report) = match cli.command {
        Command::Serve(a) => (a, false),
        Command::Resume(a) => (a, true),
        Command::CsvToBatch(a) => return csv_to_batch(a),
        Command::Run(a) => {
            init_logs(a.serve.log_format, "warn");
            return block_on(async move { ollama_batch::client::run::run(&a).await });
        }
        Command::Bench(a) => {
            init_logs(a.serve.log_format, "warn");
            return block_on(async move { ollama_batch::client::bench::bench(&a).await });
        }
        Command::Calibrate(a) => {
            return block_on(async move { ollama_batch::client::calibrate::calibrate(&a).await });
        }
        Command::Retry(a) => {
            init_logs(a.serve.log_format, "warn");
            return block_on(async move {
                match ollama_batch::client::retry::retry(&a).await {
                    Ok((file, id)) => {
                        complain(&format!(
                            "new batch of the lines of {} that did not succeed (input file {file}):",
                            a.batch_id
                        ));
                        say(&id);
                        0
                    }
                    Err(e) => {
                        complain(&e);
                        1
                    }
                }
            });
        }
        Command::Analyze(a) => {
            return match ollama_batch::client::analyze::analyze(&a, &mut std::io::stdout().lock()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    complain(&e);
                    ExitCode::FAILURE
                }
            };
        }
    };
    init_logs(args.log_format, "info");
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            complain(&format!("cannot start the runtime: {e}"));
            return ExitCode::FAILURE;
        }
    };
    let code = match rt.block_on(run(args, report)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            complain(&format!("{e:#}"));
            ExitCode::FAILURE
        }
    };
    // Dropping the runtime would wait for every blocking task; one that never returns (after an
    // I/O error sled's reads can spin on a page that never loads) would keep the stopped
    // server alive, spinning, for ever. Such a task is abandoned after 5 s.
    rt.shutdown_timeout(std::time::Duration::from_secs(5));
    code
}

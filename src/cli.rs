//! The command line: every subcommand and its flags, at the top of the crate (only `main.rs`
//! reads it). The server's own flags and validated configuration are in `config`; the client
//! subcommands' flags are in their modules of `client`.

use crate::client;
use crate::config::ServeArgs;
use clap::{Parser, Subcommand};

/// A durable, OpenAI-compatible Batch API server for a local model server.
#[derive(Parser, Debug)]
#[command(name = "ollama-batch", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Serve the Batch API and run queued work (recovers unfinished batches first).
    Serve(ServeArgs),
    /// Print a recovery report for each unfinished batch, then serve as `serve` does.
    Resume(ServeArgs),
    /// Turn a CSV of candidates into a Batch API input file (JSONL), one chat request per row;
    /// or, with --sample N, write a synthetic candidates CSV.
    CsvToBatch(client::csv_to_batch::CsvArgs),
    /// The whole job in one command: upload a JSONL (or a CSV), run it with a progress bar,
    /// download `<name>.output.jsonl` and `<name>.errors.jsonl`. Re-runnable; Ctrl-C safe;
    /// starts the engine in this process unless --server is given.
    Run(Box<client::run::RunArgs>),
    /// Measure which context length and how many parallel requests fit this GPU and model
    /// (memory, rates, truncation, OOM), and recommend --num-ctx and --concurrency.
    Calibrate(client::calibrate::CalibrateArgs),
    /// Run synthetic batches of the given sizes through the real path and report requests/s,
    /// tokens/s, cached share, latency, GPU memory, and the duration of N lines.
    Bench(Box<client::bench::BenchArgs>),
    /// Report on a batch's output: successes and failures, a field's distribution, answers
    /// that did not parse, tokens; optionally a CSV of every line.
    Analyze(client::analyze::AnalyzeArgs),
    /// Make a new batch of the failed, expired and cancelled lines of a finished batch (on the
    /// server, or the engine on --state); prints the new batch's id as the last line.
    Retry(client::retry::RetryArgs),
}

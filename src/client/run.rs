//! `ollama-batch run FILE`: the whole job in one command. Uploads the input (a Batch API JSONL
//! file, or a CSV turned into one as `csv-to-batch` does), creates the batch, shows its progress,
//! and downloads `<name>.output.jsonl` and `<name>.errors.jsonl` when it ends.
//!
//! Re-runnable: the batch records the SHA-256 of its input in its metadata, and running the
//! same command again re-attaches to that batch (a finished one is just downloaded again)
//! instead of uploading the file twice. Ctrl-C detaches (or, with `--cancel-on-interrupt`,
//! cancels). Without `--server`, the engine runs in this process on the state directory, so a
//! crash or Ctrl-C followed by the same command resumes where it stopped.

use super::csv_to_batch::{self, RequestShape};
use super::engine::Engine;
use super::http::Server;
use super::term::{self, note, say, watch_interrupts};
use crate::config::ServeArgs;
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;

/// Exit code: every line succeeded.
pub const EXIT_OK: u8 = 0;
/// Exit code: an error (bad input, no server, a batch that failed validation).
pub const EXIT_ERROR: u8 = 1;
/// Exit code: the batch ended but some lines failed, expired or were cancelled.
pub const EXIT_SOME_FAILED: u8 = 3;
/// Exit code: interrupted (Ctrl-C or SIGTERM): detached, or cancelled with
/// `--cancel-on-interrupt`.
pub use super::term::EXIT_INTERRUPTED;

/// The metadata key holding the SHA-256 of a batch's input file.
pub const META_SHA256: &str = "input_sha256";
/// The metadata key holding the input's file name.
pub const META_NAME: &str = "input_name";

/// Flags of `run`.
#[derive(Args, Debug, Clone)]
#[command(
    after_help = "Exit status: 0 every line succeeded; 3 the batch ended with lines that \
failed, expired or were cancelled (their errors are in <name>.errors.jsonl); 130 interrupted \
(the batch was detached, or cancelled with --cancel-on-interrupt); 1 any other error.\n\n\
Run the same command again to re-attach to the batch made from the same input (or, once it \
ended, to download its results again)."
)]
pub struct RunArgs {
    /// The input: a Batch API JSONL file, or a CSV (`.csv`) turned into one as `csv-to-batch`
    /// does (the line model is --model). Or a batch id (`batch_…`, e.g. the one `retry`
    /// printed): follow that batch and download its files as `<id>.output.jsonl` /
    /// `<id>.errors.jsonl`.
    pub file: PathBuf,
    /// Use the ollama-batch server at this URL instead of the engine in this process (then the
    /// engine flags below are that server's business, but for --api-key: the key sent to it).
    #[arg(long, env = "OLLAMA_BATCH_SERVER", value_name = "URL")]
    pub server: Option<String>,
    /// Write `<name>.output.jsonl` and `<name>.errors.jsonl` here (default: beside the input).
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// On Ctrl-C, cancel the batch (and download what finished) instead of detaching from it.
    #[arg(long)]
    pub cancel_on_interrupt: bool,
    /// Answer every line that an earlier batch on the server's state directory already
    /// answered (same request, model and backend options) from the store, without a call
    /// (the batch's metadata `"reuse": "true"`).
    #[arg(long)]
    pub reuse: bool,
    /// How often to ask the server how the batch is doing.
    #[arg(long, default_value = "1s", value_name = "DURATION")]
    pub poll: humantime::Duration,
    /// When standard error is not a terminal (a log file, nohup): one progress line this often.
    #[arg(long, default_value = "30s", value_name = "DURATION")]
    pub print_every: humantime::Duration,
    /// How a CSV's rows become requests.
    #[command(flatten, next_help_heading = "A CSV input (as csv-to-batch)")]
    pub shape: RequestShape,
    /// The engine run in this process (without --server).
    #[command(flatten, next_help_heading = "The engine (without --server; as serve)")]
    pub serve: ServeArgs,
}

/// The input as uploaded: a JSONL file on disk, its hash, endpoint and line count.
struct Input {
    path: PathBuf,
    /// A JSONL made from a CSV, removed when done.
    scratch: Option<PathBuf>,
    name: String,
    sha256: String,
    endpoint: String,
    lines: u64,
    bytes: u64,
    /// `--mode conversation`: the batch asks for it in its metadata (so a `--server` runs it
    /// so too), and its hash differs from the same input's in independent mode.
    conversation: bool,
    /// `--reuse`: the batch asks for earlier answers in its metadata.
    reuse: bool,
}

impl Drop for Input {
    fn drop(&mut self) {
        if let Some(p) = &self.scratch {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn is_csv(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("csv"))
}

/// Reads (or, for a CSV, writes then reads) the JSONL: its SHA-256, endpoint and lines.
fn prepare(args: &RunArgs) -> Result<Input, String> {
    let name = args
        .file
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("input")
        .to_string();
    let (path, scratch) = if is_csv(&args.file) {
        let model = args.serve.model.clone().ok_or(
            "a CSV input needs --model (the model every line names, as csv-to-batch's --model)",
        )?;
        let scratch = std::env::temp_dir().join(format!(
            "ollama-batch-{}-{}.jsonl",
            std::process::id(),
            name
        ));
        let mut f = std::fs::File::create(&scratch)
            .map_err(|e| format!("cannot write {}: {e}", scratch.display()))?;
        let report = csv_to_batch::convert(&args.file, &args.shape, &model, &mut f);
        let report = match report {
            Ok(r) => r,
            Err(e) => {
                let _ = std::fs::remove_file(&scratch);
                return Err(e);
            }
        };
        note(&csv_to_batch::summary(&report, None));
        (scratch.clone(), Some(scratch))
    } else {
        (args.file.clone(), None)
    };
    let mut input = Input {
        path,
        scratch,
        name,
        sha256: String::new(),
        endpoint: String::new(),
        lines: 0,
        bytes: 0,
        conversation: args.serve.mode == crate::config::Mode::Conversation,
        reuse: args.reuse,
    };
    let file = std::fs::File::open(&input.path)
        .map_err(|e| format!("cannot read {}: {e}", input.path.display()))?;
    let mut reader = std::io::BufReader::with_capacity(1 << 20, file);
    let mut hasher = Sha256::new();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| format!("cannot read {}: {e}", input.path.display()))?;
        if n == 0 {
            break;
        }
        hasher.update(&line);
        input.bytes += n as u64;
        if line.iter().all(|b| b.is_ascii_whitespace()) {
            continue;
        }
        input.lines += 1;
        if input.endpoint.is_empty() {
            let v: Value = serde_json::from_slice(&line).map_err(|e| {
                format!(
                    "{}: the first line is not JSON ({e}); run takes a Batch API JSONL file or a .csv",
                    args.file.display()
                )
            })?;
            input.endpoint = v["url"]
                .as_str()
                .ok_or_else(|| {
                    format!(
                        "{}: the first line has no \"url\" (e.g. /v1/chat/completions)",
                        args.file.display()
                    )
                })?
                .to_string();
        }
    }
    if input.lines == 0 {
        return Err(format!("{}: no requests in it", args.file.display()));
    }
    if input.conversation {
        hasher.update(b"\0mode=conversation");
    }
    input.sha256 = format!("{:x}", hasher.finalize());
    Ok(input)
}

/// A batch object's `request_counts`.
#[derive(Clone, Copy)]
struct Counts {
    total: u64,
    succeeded: u64,
    failed: u64,
}

impl Counts {
    fn of(b: &Value) -> Counts {
        let c = &b["request_counts"];
        Counts {
            total: c["total"].as_u64().unwrap_or(0),
            succeeded: c["completed"].as_u64().unwrap_or(0),
            failed: c["failed"].as_u64().unwrap_or(0),
        }
    }

    /// Lines that ended, well or not.
    fn done(&self) -> u64 {
        self.succeeded + self.failed
    }
}

/// The progress display: an indicatif bar on a terminal, plain lines elsewhere.
struct Ui {
    bar: Option<ProgressBar>,
    every: Duration,
    last_line: Option<Instant>,
    /// When counting started and how many lines were done then (for the rate of plain lines).
    origin: Option<(Instant, u64)>,
    sized: bool,
}

impl Ui {
    fn new(every: Duration) -> Ui {
        use std::io::IsTerminal;
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new_spinner();
            bar.enable_steady_tick(Duration::from_millis(120));
            term::show_bar(&bar);
            bar
        });
        Ui {
            bar,
            every,
            last_line: None,
            origin: None,
            sized: false,
        }
    }

    fn update(&mut self, b: &Value) {
        let status = b["status"].as_str().unwrap_or("?");
        let counts = Counts::of(b);
        let (total, failed, done) = (counts.total, counts.failed, counts.done());
        let now = Instant::now();
        if total > 0 && self.origin.is_none() {
            self.origin = Some((now, done));
        }
        let msg = match (status, failed) {
            ("in_progress", 0) => String::new(),
            ("in_progress", f) => format!("{f} failed"),
            (s, 0) => s.to_string(),
            (s, f) => format!("{s}, {f} failed"),
        };
        if let Some(bar) = &self.bar {
            if total > 0 && !self.sized {
                self.sized = true;
                bar.set_style(
                    ProgressStyle::with_template(
                        "{spinner} [{elapsed_precise}] [{wide_bar}] {pos}/{len} ({percent}%) {rate} ETA {eta} {msg}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .with_key(
                        "rate",
                        |s: &indicatif::ProgressState, w: &mut dyn std::fmt::Write| {
                            let _ = write!(w, "{:.1}/s", s.per_sec());
                        },
                    )
                    .progress_chars("=> "),
                );
                bar.set_length(total);
                bar.set_position(done);
                bar.reset_eta();
            }
            bar.set_position(done);
            bar.set_message(msg);
            return;
        }
        let due = self
            .last_line
            .is_none_or(|t| now.duration_since(t) >= self.every);
        if due {
            self.last_line = Some(now);
            note(&self.line(status, counts, now));
        }
    }

    fn line(&self, status: &str, counts: Counts, now: Instant) -> String {
        let (total, failed, done) = (counts.total, counts.failed, counts.done());
        if total == 0 {
            return format!("{status}…");
        }
        let mut s = format!(
            "{status}: {done}/{total} ({:.1}%)",
            done as f64 * 100.0 / total as f64
        );
        if failed > 0 {
            s.push_str(&format!(", {failed} failed"));
        }
        if let Some((t0, d0)) = self.origin {
            let secs = now.duration_since(t0).as_secs_f64();
            if secs >= 1.0 && done > d0 {
                let rate = (done - d0) as f64 / secs;
                let eta = Duration::from_secs(((total - done) as f64 / rate).ceil() as u64);
                s.push_str(&format!(
                    ", {rate:.1}/s, ETA {}",
                    humantime::format_duration(eta)
                ));
            }
        }
        s
    }

    /// The bar, no longer drawn around log lines.
    fn take_bar(&mut self) -> Option<ProgressBar> {
        term::hide_bar();
        self.bar.take()
    }

    /// The last word: a finished bar stays on screen; plain output gets a final line.
    fn finish(&mut self, b: &Value) {
        match self.take_bar() {
            Some(bar) => bar.finish(),
            None => {
                let status = b["status"].as_str().unwrap_or("?");
                note(&self.line(status, Counts::of(b), Instant::now()));
            }
        }
    }

    /// Takes the bar off the screen and says where the batch stood (detaching).
    fn abandon(&mut self, b: &Value) {
        if let Some(bar) = self.take_bar() {
            bar.finish_and_clear();
        }
        let c = Counts::of(b);
        note(&format!(
            "stopped following at {}/{} done{}",
            c.done(),
            c.total,
            if c.failed > 0 {
                format!(", {} failed", c.failed)
            } else {
                String::new()
            }
        ));
    }
}

fn terminal(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "expired" | "cancelled")
}

/// The command line as typed, to tell the user how to re-attach.
fn same_command() -> String {
    std::env::args()
        .map(|a| {
            if a.is_empty()
                || a.contains(|c: char| c.is_whitespace() || "'\"$\\`!*?;&|<>(){}".contains(c))
            {
                format!("'{}'", a.replace('\'', "'\\''"))
            } else {
                a
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Finds the batch made from this input, or uploads it and makes one.
async fn attach_or_create(
    server: &Server,
    input: &Input,
    interrupted: &CancellationToken,
) -> Result<Option<Value>, String> {
    if let Some(b) = server.find_batch(META_SHA256, &input.sha256).await? {
        let id = b["id"].as_str().unwrap_or_default();
        let status = b["status"].as_str().unwrap_or_default();
        match status {
            "validating" | "in_progress" | "finalizing" | "completed" => {
                note(&format!(
                    "re-attaching to {id} ({status}), made earlier from this same input (sha256 {}…); nothing is uploaded again",
                    &input.sha256[..12]
                ));
                return Ok(Some(b));
            }
            _ => note(&format!(
                "an earlier batch from this input, {id}, ended {status}; starting a new one (`ollama-batch retry {id}` would run only its unfinished lines)"
            )),
        }
    }
    note(&format!(
        "uploading {} ({} lines, {})…",
        input.name,
        input.lines,
        human_bytes(input.bytes)
    ));
    let upload = server.upload(&input.path, &input.name);
    let file_id = tokio::select! {
        r = upload => r?,
        _ = interrupted.cancelled() => return Ok(None),
    };
    let mut metadata = json!({META_SHA256: input.sha256, META_NAME: input.name});
    if input.conversation {
        metadata["mode"] = json!("conversation");
    }
    if input.reuse {
        metadata[crate::domain::META_REUSE] = json!("true");
    }
    let b = server
        .create_batch(&file_id, &input.endpoint, metadata)
        .await?;
    note(&format!(
        "batch {} created (input file {file_id})",
        b["id"].as_str().unwrap_or_default()
    ));
    Ok(Some(b))
}

fn human_bytes(n: u64) -> String {
    match n {
        n if n >= 1 << 30 => format!("{:.1} GiB", n as f64 / (1u64 << 30) as f64),
        n if n >= 1 << 20 => format!("{:.1} MiB", n as f64 / (1u64 << 20) as f64),
        n if n >= 1 << 10 => format!("{:.1} KiB", n as f64 / 1024.0),
        n => format!("{n} B"),
    }
}

/// Follows the batch to its end (or an interrupt), then downloads its files.
async fn drive(
    engine: &Engine,
    args: &RunArgs,
    input: Option<&Input>,
    interrupted: &CancellationToken,
) -> Result<u8, String> {
    let server = &engine.server;
    let b = match input {
        Some(input) => attach_or_create(server, input, interrupted).await?,
        None => {
            let id = args.file.to_string_lossy();
            let b = server.batch(&id).await.map_err(|e| {
                format!("{e}\n(`run {id}` follows a batch of the server; no file of that name exists either)")
            })?;
            note(&format!(
                "following {id} ({})",
                b["status"].as_str().unwrap_or_default()
            ));
            Some(b)
        }
    };
    let Some(mut b) = b else {
        note("interrupted before a batch was made");
        return Ok(EXIT_INTERRUPTED);
    };
    let id = b["id"].as_str().unwrap_or_default().to_string();
    let mut ui = Ui::new(*args.print_every);
    let mut cancelled_by_us = false;
    let mut unreachable_since: Option<Instant> = None;
    loop {
        let status = b["status"].as_str().unwrap_or_default().to_string();
        ui.update(&b);
        if terminal(&status) {
            ui.finish(&b);
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(*args.poll) => {}
            _ = interrupted.cancelled(), if !cancelled_by_us => {
                if args.cancel_on_interrupt {
                    note(&format!("interrupted: cancelling {id} (lines in flight finish first)…"));
                    server.cancel(&id).await?;
                    cancelled_by_us = true;
                } else {
                    ui.abandon(&b);
                    if engine.local.is_some() {
                        note(&format!(
                            "interrupted: stopping the engine; {id} is kept in {} and resumes when you run the same command again:\n  {}",
                            args.serve.state.display(),
                            same_command()
                        ));
                    } else {
                        note(&format!(
                            "detached: {id} keeps running on {}; to re-attach, run the same command again:\n  {}",
                            server.base(),
                            same_command()
                        ));
                    }
                    return Ok(EXIT_INTERRUPTED);
                }
            }
        }
        match server.batch(&id).await {
            Ok(next) => {
                b = next;
                unreachable_since = None;
            }
            Err(e) => {
                // A server that restarts is back in seconds; one gone for a minute is an error.
                let since = *unreachable_since.get_or_insert_with(Instant::now);
                if since.elapsed() > Duration::from_secs(60) {
                    ui.abandon(&b);
                    return Err(e);
                }
            }
        }
    }
    let out_dir = match &args.out {
        Some(d) => d.clone(),
        None if input.is_none() => PathBuf::from("."),
        None => args
            .file
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_default(),
    };
    let out_dir = if out_dir.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out_dir
    };
    std::fs::create_dir_all(&out_dir)
        .map_err(|e| format!("cannot create {}: {e}", out_dir.display()))?;
    let stem = args
        .file
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("batch");
    let status = b["status"].as_str().unwrap_or_default().to_string();
    let Counts {
        total,
        succeeded: ok,
        failed,
    } = Counts::of(&b);
    if status == "failed" {
        let errors: Vec<String> = b["errors"]["data"]
            .as_array()
            .map(|a| {
                a.iter()
                    .take(10)
                    .map(|e| {
                        format!(
                            "  line {}: {}",
                            e["line"]
                                .as_u64()
                                .map(|l| l.to_string())
                                .unwrap_or("-".into()),
                            e["message"].as_str().unwrap_or_default()
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        return Err(format!(
            "batch {id} failed validation; nothing ran:\n{}",
            errors.join("\n")
        ));
    }
    let output = out_dir.join(format!("{stem}.output.jsonl"));
    let errors = out_dir.join(format!("{stem}.errors.jsonl"));
    let mut output = output;
    let mut errors = errors;
    for (field, path) in [
        ("output_file_id", &mut output),
        ("error_file_id", &mut errors),
    ] {
        *path = own_file(path, &id);
        match b[field].as_str() {
            Some(fid) => {
                server.download(fid, path).await?;
            }
            None => std::fs::write(&*path, b"")
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?,
        }
    }
    let not_done = total.saturating_sub(ok + failed);
    let mut summary = format!("{id} {status}: {ok} succeeded, {failed} failed");
    if not_done > 0 {
        summary.push_str(&format!(", {not_done} not run"));
    }
    say(&summary);
    say(&format!("output: {}", output.display()));
    say(&format!("errors: {}", errors.display()));
    Ok(if cancelled_by_us {
        EXIT_INTERRUPTED
    } else if status == "completed" && failed == 0 && not_done == 0 {
        EXIT_OK
    } else {
        EXIT_SOME_FAILED
    })
}

/// Where batch `id`'s file goes: `path`, unless `path` already holds another batch's lines
/// (each line's `id`, `batch_req_<batch>…`, names the batch it came from). Those are kept, and
/// this batch's go beside them as `<name>.<id>.<kind>.jsonl`, with a note: a file of results
/// is never replaced by another batch's without a word (a retry's, say).
fn own_file(path: &Path, id: &str) -> PathBuf {
    let Ok(f) = std::fs::File::open(path) else {
        return path.to_path_buf();
    };
    let mut first = String::new();
    let _ = std::io::BufReader::new(f).read_line(&mut first);
    let theirs = serde_json::from_str::<Value>(&first)
        .ok()
        .and_then(|v| v["id"].as_str().map(str::to_string));
    let uuid = id.trim_start_matches("batch_");
    match theirs {
        Some(line_id) if !line_id.contains(uuid) => {
            let name = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let stem = name.strip_suffix(".jsonl").unwrap_or(&name);
            let alt = path.with_file_name(match stem.rsplit_once('.') {
                Some((base, kind)) => format!("{base}.{id}.{kind}.jsonl"),
                None => format!("{stem}.{id}.jsonl"),
            });
            note(&format!(
                "{} holds another batch's results: kept; {id}'s go to {}",
                path.display(),
                alt.display()
            ));
            alt
        }
        _ => path.to_path_buf(),
    }
}

/// Runs it; the exit code.
pub async fn run(args: &RunArgs) -> u8 {
    let interrupted = CancellationToken::new();
    if let Err(e) = watch_interrupts(interrupted.clone()) {
        note(&format!("ollama-batch: {e}"));
        return EXIT_ERROR;
    }
    // `run batch_…` (no such file): follow a batch already on the server, e.g. one `retry` made.
    let follow = !args.file.exists()
        && args
            .file
            .to_str()
            .is_some_and(|s| s.starts_with("batch_") && !s.contains('/'));
    let input = if follow {
        None
    } else {
        match prepare(args) {
            Ok(i) => Some(i),
            Err(e) => {
                note(&format!("ollama-batch: {e}"));
                return EXIT_ERROR;
            }
        }
    };
    let engine = tokio::select! {
        e = Engine::connect(args.server.as_deref(), &args.serve, &note) => e,
        _ = interrupted.cancelled() => return EXIT_INTERRUPTED,
    };
    let engine = match engine {
        Ok(e) => e,
        Err(e) => {
            note(&format!("ollama-batch: {e}"));
            return EXIT_ERROR;
        }
    };
    let code = match drive(&engine, args, input.as_ref(), &interrupted).await {
        Ok(code) => code,
        Err(e) => {
            note(&format!("ollama-batch: {e}"));
            EXIT_ERROR
        }
    };
    if let Err(e) = engine.stop().await {
        note(&format!("ollama-batch: stopping the engine: {e}"));
        return EXIT_ERROR;
    }
    code
}

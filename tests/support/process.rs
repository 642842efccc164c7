//! The real binary as a child process: started with `resume` (which prints its recovery
//! report and its address on stdout), signalled, and waited for with a deadline.

use super::binary;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running server process.
pub struct Proc {
    pub child: Child,
    pub addr: String,
    pub report: Vec<String>,
}

impl Proc {
    /// The requests its recovery report says it put back in the queue from in-flight.
    pub fn requeued_at_start(&self) -> u64 {
        self.report
            .iter()
            .filter_map(|l| {
                let head = l.split(" requeued from in-flight").next()?;
                if head.len() == l.len() {
                    return None;
                }
                head.rsplit(' ').next()?.parse::<u64>().ok()
            })
            .sum()
    }
}

impl Drop for Proc {
    /// A test that fails (panics) must not leave its server running.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Where the child's stderr (the log) goes.
pub enum Log {
    /// Appended to `<state>.log`.
    File,
    /// Appended to this file.
    At(std::path::PathBuf),
    /// A pipe whose reading end is closed at once: every log write fails (EPIPE).
    Broken,
}

/// Starts `ollama-batch resume` on `state` against an OpenAI-shaped backend at `backend`,
/// with fast retries, and waits (30 s at most) for it to listen.
pub fn spawn(state: &Path, backend: &str, concurrency: usize, extra: &[&str]) -> Proc {
    spawn_with(state, backend, concurrency, extra, Log::File)
}

/// [`spawn`] with a choice of log destination.
pub fn spawn_with(
    state: &Path,
    backend: &str,
    concurrency: usize,
    extra: &[&str],
    log: Log,
) -> Proc {
    let file = |path: std::path::PathBuf| {
        Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .expect("log file"),
        )
    };
    let stderr = match log {
        Log::File => file(state.with_extension("log")),
        Log::At(path) => file(path),
        Log::Broken => Stdio::piped(),
    };
    let mut child = Command::new(binary())
        .args(["resume", "--listen", "127.0.0.1:0", "--backend", "openai"])
        .arg("--state")
        .arg(state)
        .args(["--backend-url", backend])
        .args(["--concurrency", &concurrency.to_string()])
        .args([
            "--flush-interval",
            "5ms",
            "--retry-initial",
            "10ms",
            "--retry-max",
            "100ms",
        ])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("spawn ollama-batch");
    // Closing our end of the stderr pipe makes every later write of the child fail.
    drop(child.stderr.take());
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut report = Vec::new();
    loop {
        match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(line) => {
                if let Some(addr) = line.strip_prefix("listening on ") {
                    return Proc {
                        child,
                        addr: format!("http://{addr}"),
                        report,
                    };
                }
                report.push(line);
            }
            Err(e) => {
                let _ = child.kill();
                let status = child.wait();
                let log = std::fs::read_to_string(state.with_extension("log")).unwrap_or_default();
                panic!("server did not start ({e}, {status:?}); log:\n{log}");
            }
        }
    }
}

/// Sends a signal (`-TERM`, `-KILL`, `-INT`) with kill(1).
pub fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .expect("kill runs")
        .success();
    assert!(ok, "kill {sig} failed");
}

/// Waits for the child to exit; fails the test after `within` (killing the child first).
pub fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return s;
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("process did not exit within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

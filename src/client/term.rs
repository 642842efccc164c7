//! The terminal, for every client subcommand: lines on stdout and stderr that never panic on a
//! closed pipe, the one progress bar that log lines and notes are written around, and Ctrl-C.

use indicatif::ProgressBar;
use std::io::Write;
use std::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// Exit status after an interrupt (Ctrl-C): 128 + SIGINT.
pub const EXIT_INTERRUPTED: u8 = 130;

/// The progress bar on screen, if any: log lines and notes are written around it.
static BAR: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// From now on, stderr writes are made around `bar`.
pub fn show_bar(bar: &ProgressBar) {
    if let Ok(mut b) = BAR.lock() {
        *b = Some(bar.clone());
    }
}

/// The bar is no longer drawn: stderr writes go straight out.
pub fn hide_bar() {
    if let Ok(mut b) = BAR.lock() {
        *b = None;
    }
}

/// Writes to standard error without tearing the progress bar (it is hidden for the write);
/// a failed write is dropped.
pub fn write_stderr(buf: &[u8]) {
    let bar = BAR.lock().ok().and_then(|b| b.clone());
    let write = || {
        let mut e = std::io::stderr().lock();
        let _ = e.write_all(buf);
        let _ = e.flush();
    };
    match bar {
        Some(bar) => bar.suspend(write),
        None => write(),
    }
}

/// Prints a line on standard output; a closed stdout is ignored (never a panic, as `println!`
/// would).
pub fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints a line on standard error, around the progress bar if one is drawn; a failed write
/// is dropped.
pub fn note(line: &str) {
    write_stderr(format!("{line}\n").as_bytes());
}

/// Watches SIGINT and SIGTERM: the first cancels `token`, a second exits at once (safe: every
/// acknowledged result is durable, and the batch resumes on the next run).
pub fn watch_interrupts(token: CancellationToken) -> Result<(), String> {
    use futures_util::StreamExt;
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook_tokio::Signals::new([SIGINT, SIGTERM])
        .map_err(|e| format!("cannot watch signals: {e}"))?;
    tokio::spawn(async move {
        let mut seen = 0;
        while signals.next().await.is_some() {
            seen += 1;
            if seen == 1 {
                token.cancel();
            } else {
                note("second interrupt: exiting now (everything acknowledged is saved)");
                std::process::exit(i32::from(EXIT_INTERRUPTED));
            }
        }
    });
    Ok(())
}

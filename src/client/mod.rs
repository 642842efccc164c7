//! The client layer: subcommands that prepare and analyse work for the server. They use the
//! server only as any client does, over HTTP; the server knows nothing of them.

pub mod analyze;
pub mod bench;
pub mod calibrate;
pub mod csv_to_batch;
pub mod engine;
pub mod http;
pub mod plot;
pub mod retry;
pub mod run;

/// Prints a line on standard output; a closed stdout is ignored (never a panic, as `println!`
/// would).
pub fn say(line: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

/// Prints a line on standard error, around `run`'s progress bar if one is drawn; a failed write
/// is dropped.
pub fn note(line: &str) {
    run::write_stderr(format!("{line}\n").as_bytes());
}

//! Every file the server publishes under `files/` (an upload, a batch's output and error files,
//! a retry batch's input) is written the same way: to a scratch name, fsynced, renamed into
//! place, and the directory fsynced, so that after a crash the file is there whole or not at
//! all, and a file that was announced stays.

use std::io::Write;
use std::path::{Path, PathBuf};

/// A file being written to its scratch name; [`AtomicFile::publish`] puts it in place. The
/// scratch file is created on the first line, so a file with no line is never published.
pub struct AtomicFile {
    path: PathBuf,
    scratch: PathBuf,
    out: Option<std::io::BufWriter<std::fs::File>>,
    lines: u64,
    bytes: u64,
}

impl AtomicFile {
    /// A file that will be published at `path`, written at `scratch` until then.
    pub fn new(path: PathBuf, scratch: PathBuf) -> AtomicFile {
        AtomicFile {
            path,
            scratch,
            out: None,
            lines: 0,
            bytes: 0,
        }
    }

    /// Appends one line (the newline is added).
    pub fn write_line(&mut self, line: &str) -> std::io::Result<()> {
        if self.out.is_none() {
            let f = std::fs::File::create(&self.scratch)?;
            self.out = Some(std::io::BufWriter::with_capacity(1 << 20, f));
        }
        if let Some(out) = self.out.as_mut() {
            out.write_all(line.as_bytes())?;
            out.write_all(b"\n")?;
        }
        self.lines += 1;
        self.bytes += line.len() as u64 + 1;
        Ok(())
    }

    /// Lines written so far.
    pub fn lines(&self) -> u64 {
        self.lines
    }

    /// Bytes written so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Publishes the file: flush, fsync, rename, fsync the directory. `Ok(false)` (and no
    /// file) when no line was written.
    pub fn publish(self) -> std::io::Result<bool> {
        let Some(out) = self.out else {
            return Ok(false);
        };
        let f = out.into_inner().map_err(|e| e.into_error())?;
        f.sync_all()?;
        drop(f);
        publish(&self.scratch, &self.path)?;
        Ok(true)
    }
}

/// Puts a scratch file that is already written and fsynced in place: rename, then fsync the
/// directory so that the rename itself survives a crash.
pub fn publish(scratch: &Path, path: &Path) -> std::io::Result<()> {
    std::fs::rename(scratch, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

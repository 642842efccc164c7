//! Typed ids. OpenAI's prefixes (`batch_`, `file-`, `batch_req_`, `req_`) are rendered here and
//! nowhere else. Ids are UUIDv7, so their byte order is creation order: the store lists and
//! schedules by key order without a separate index.

use serde::{Deserialize, Serialize};
use std::fmt;
use uuid::Uuid;

/// A batch, rendered `batch_<32 hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BatchId(pub Uuid);

/// A stored file (input, output or error file), rendered `file-<32 hex>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct FileId(pub Uuid);

/// One input line of one batch: the unit of work. Lines are 1-based, as in error reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestKey {
    /// The batch the line belongs to.
    pub batch: BatchId,
    /// The 1-based line number in the input file (blank lines keep their numbers).
    pub line: u32,
}

fn parse_hex_uuid(s: &str) -> Option<Uuid> {
    if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Uuid::try_parse(s).ok()
}

impl BatchId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        BatchId(Uuid::now_v7())
    }
    /// Parses `batch_<32 hex>`; anything else (including path tricks) is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        s.strip_prefix("batch_")
            .and_then(parse_hex_uuid)
            .map(BatchId)
    }
    /// The file that receives this batch's successful lines. Derived, not random, so that a
    /// finalization interrupted by a crash rewrites the same file instead of leaving an orphan.
    pub fn output_file(&self) -> FileId {
        FileId(Uuid::from_u128(self.0.as_u128() ^ 0x0f))
    }
    /// The file that receives this batch's failed, cancelled or expired lines (see `output_file`).
    pub fn error_file(&self) -> FileId {
        FileId(Uuid::from_u128(self.0.as_u128() ^ 0xf0))
    }
}

impl Default for BatchId {
    fn default() -> Self {
        Self::new()
    }
}

impl FileId {
    /// A new, time-ordered id.
    pub fn new() -> Self {
        FileId(Uuid::now_v7())
    }
    /// Parses `file-<32 hex>`; anything else is `None`.
    pub fn parse(s: &str) -> Option<Self> {
        s.strip_prefix("file-").and_then(parse_hex_uuid).map(FileId)
    }
}

impl Default for FileId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for BatchId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "batch_{}", self.0.simple())
    }
}

impl fmt::Display for FileId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file-{}", self.0.simple())
    }
}

impl RequestKey {
    /// Store key: 16 bytes of batch id then the big-endian line, so a batch's lines are one
    /// contiguous range in input order.
    pub fn to_bytes(&self) -> [u8; 20] {
        let mut k = [0u8; 20];
        k[..16].copy_from_slice(self.batch.0.as_bytes());
        k[16..].copy_from_slice(&self.line.to_be_bytes());
        k
    }
    /// Inverse of `to_bytes`.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() != 20 {
            return None;
        }
        let batch = BatchId(Uuid::from_slice(&b[..16]).ok()?);
        let line = u32::from_be_bytes(b[16..20].try_into().ok()?);
        Some(RequestKey { batch, line })
    }
    /// `batch_req_…`: the id of the line in the output and error files. Stable across
    /// re-finalization.
    pub fn output_id(&self) -> String {
        format!("batch_req_{}{:08x}", self.batch.0.simple(), self.line)
    }
    /// `req_…`: the `request_id` inside an output line's `response`.
    pub fn request_id(&self) -> String {
        format!("req_{}{:08x}", self.batch.0.simple(), self.line)
    }
}

impl fmt::Display for RequestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}#{}", self.batch, self.line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_reject_tricks() {
        let b = BatchId::new();
        assert_eq!(BatchId::parse(&b.to_string()), Some(b));
        let f = FileId::new();
        assert_eq!(FileId::parse(&f.to_string()), Some(f));
        for bad in [
            "",
            "batch_",
            "batch_../../etc/passwd",
            "file-xyz",
            "batch_0123",
        ] {
            assert_eq!(BatchId::parse(bad), None, "{bad}");
            assert_eq!(FileId::parse(bad), None, "{bad}");
        }
        let k = RequestKey { batch: b, line: 77 };
        assert_eq!(RequestKey::from_bytes(&k.to_bytes()), Some(k));
        assert_ne!(b.output_file(), b.error_file());
    }

    #[test]
    fn later_ids_sort_after_earlier_ones() {
        let a = BatchId::new();
        let b = BatchId::new();
        assert!(a < b);
        assert!(a.0.as_bytes() < b.0.as_bytes());
    }
}

//! Lines stored by the chunk: a batch's lines are kept [`CHUNK_LINES`] lines to a sled value
//! instead of one value per line: their bodies and prefix groups (written once), and their
//! request records (rewritten, under compare-and-swap, at each transition of one of them).
//!
//! Why: sled 0.34 splits a leaf at 16 entries and keeps in memory, for every page it has ever
//! written, the page's table entry and the log position of each of its fragments, resident or
//! not: a few hundred bytes per page, so tens of bytes per key, for as long as the process runs.
//! Four keys per line made a 1,000,000-line batch cost ~100 MB of such bookkeeping
//! (docs/benchmarks.md). No key is written per line now. A request record in a chunk is small:
//! its result lives in the batch's results file ([`super::results`]), so that rewriting a chunk
//! costs about 64 × 40 bytes, not 64 answers.
//!
//! A chunk's key is the batch ‖ the chunk number (`line / CHUNK_LINES`, big-endian), the same
//! 20-byte shape as a request key. A line's *slot* is `line % CHUNK_LINES`; lines need not be
//! dense (blank lines take a number and no slot).
//!
//! - Slotted chunk (bodies, request records): `n: u8`, then `n` × (`slot: u8`, `end: u32`
//!   little-endian), then the encoded entries back to back; entry *i* is
//!   `bytes[end(i-1)..end(i)]`. One entry is read without decoding the others.
//! - Group chunk: runs `(first slot, group)`, the group of a slot being that of the last run
//!   that starts at or before it.

use crate::domain::{BatchId, RequestKey};

/// A group chunk: (first slot, group) runs.
pub type Runs = Vec<(u8, u64)>;

/// Lines per chunk.
pub const CHUNK_LINES: u32 = 64;

/// The chunk a line is in, as its key.
pub fn chunk_key(batch: BatchId, line: u32) -> [u8; 20] {
    RequestKey {
        batch,
        line: line / CHUNK_LINES,
    }
    .to_bytes()
}

/// `items` (in line order; `key` gives an item's line) split by the chunk their lines are in,
/// each part with its chunk's key.
pub fn by_chunk<T>(
    items: &[T],
    key: impl Fn(&T) -> RequestKey + Copy,
) -> impl Iterator<Item = ([u8; 20], &[T])> {
    let chunk = move |item: &T| {
        let k = key(item);
        chunk_key(k.batch, k.line)
    };
    items
        .chunk_by(move |a, b| chunk(a) == chunk(b))
        .map(move |same| (chunk(&same[0]), same))
}

/// A line's slot in its chunk.
pub fn slot(line: u32) -> u8 {
    // CHUNK_LINES is 64: the remainder always fits.
    (line % CHUNK_LINES) as u8
}

/// Encodes a slotted chunk from (slot, encoded entry) in slot order.
pub fn encode_slots(entries: &[(u8, &[u8])]) -> Vec<u8> {
    let n = entries.len();
    let data: usize = entries.iter().map(|(_, b)| b.len()).sum();
    let mut out = Vec::with_capacity(1 + 5 * n + data);
    out.push(n as u8);
    // At most 64 bodies of at most 32 MiB each (the intake's line limit): under 4 GiB.
    let mut end = 0u32;
    for (slot, body) in entries {
        end += body.len() as u32;
        out.push(*slot);
        out.extend_from_slice(&end.to_le_bytes());
    }
    for (_, body) in entries {
        out.extend_from_slice(body);
    }
    out
}

/// The (slot, encoded entry) entries of a slotted chunk; `None` if it is not one.
pub fn decode_slots(value: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let n = usize::from(*value.first()?);
    let header = value.get(1..1 + 5 * n)?;
    let data = &value[1 + 5 * n..];
    let mut out = Vec::with_capacity(n);
    let mut start = 0usize;
    for e in header.chunks_exact(5) {
        let end = u32::from_le_bytes([e[1], e[2], e[3], e[4]]) as usize;
        out.push((e[0], data.get(start..end)?));
        start = end;
    }
    Some(out)
}

/// The encoded entry in `slot` of a slotted chunk, if the chunk has it.
pub fn slot_in(value: &[u8], slot: u8) -> Option<&[u8]> {
    let n = usize::from(*value.first()?);
    let header = value.get(1..1 + 5 * n)?;
    let data = &value[1 + 5 * n..];
    let mut start = 0usize;
    for e in header.chunks_exact(5) {
        let end = u32::from_le_bytes([e[1], e[2], e[3], e[4]]) as usize;
        if e[0] == slot {
            return data.get(start..end);
        }
        start = end;
    }
    None
}

/// A slotted chunk holding `new` and, of `old` (a chunk begun earlier), the slots `new` does
/// not have; `None` if `old` is not a slotted chunk.
pub fn merge_slots(old: Option<&[u8]>, new: &[(u8, &[u8])]) -> Option<Vec<u8>> {
    let mut entries: Vec<(u8, &[u8])> = new.to_vec();
    if let Some(old) = old {
        entries.extend(
            decode_slots(old)?
                .into_iter()
                .filter(|(s, _)| !new.iter().any(|(n, _)| n == s)),
        );
        entries.sort_by_key(|(s, _)| *s);
    }
    Some(encode_slots(&entries))
}

/// Adds `(slot, group)` in slot order to a chunk's runs.
pub fn push_group(runs: &mut Runs, slot: u8, group: u64) {
    if runs.last().is_none_or(|&(_, g)| g != group) {
        runs.push((slot, group));
    }
}

/// The group of `slot` in a chunk's runs (0 before the first run).
pub fn group_in(runs: &[(u8, u64)], slot: u8) -> u64 {
    runs.iter()
        .take_while(|(first, _)| *first <= slot)
        .last()
        .map(|&(_, g)| g)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_is_read_back_from_its_slot_alone() {
        let a = b"first".to_vec();
        let b: Vec<u8> = Vec::new();
        let c = vec![7u8; 300];
        let v = encode_slots(&[(0, &a), (5, &b), (63, &c)]);
        assert_eq!(slot_in(&v, 0), Some(&a[..]));
        assert_eq!(slot_in(&v, 5), Some(&b[..]));
        assert_eq!(slot_in(&v, 63), Some(&c[..]));
        assert_eq!(slot_in(&v, 1), None, "a slot with no line");
        assert_eq!(
            decode_slots(&v),
            Some(vec![(0, &a[..]), (5, &b[..]), (63, &c[..])])
        );
        assert_eq!(decode_slots(&[]), None);
        assert_eq!(decode_slots(&[3, 0]), None, "a truncated header");
        assert_eq!(
            slot_in(&[1, 0, 9, 0, 0, 0], 0),
            None,
            "an end past the data"
        );
    }

    #[test]
    fn groups_are_kept_as_runs() {
        let mut runs = Vec::new();
        for (slot, g) in [(1, 7), (2, 7), (3, 9), (10, 9), (11, 7)] {
            push_group(&mut runs, slot, g);
        }
        assert_eq!(runs, vec![(1, 7), (3, 9), (11, 7)]);
        assert_eq!(group_in(&runs, 2), 7);
        assert_eq!(group_in(&runs, 3), 9);
        assert_eq!(group_in(&runs, 10), 9);
        assert_eq!(group_in(&runs, 63), 7);
        assert_eq!(group_in(&runs, 0), 0);
    }

    #[test]
    fn a_line_is_in_the_chunk_of_its_number() {
        let b = BatchId(uuid::Uuid::from_u128(5));
        assert_eq!(chunk_key(b, 63), chunk_key(b, 0));
        assert_ne!(chunk_key(b, 64), chunk_key(b, 63));
        assert_eq!((slot(64), slot(127)), (0, 63));
    }
}

//! Where a chunk's records came from, so that a record re-sent after a crash or a time-out can be
//! recognised downstream and written once.
//!
//! tron-agent adds two options to every chunk: `tron_source` (a string naming the host and the
//! file identity) and `tron_positions` (binary: the byte offset each record starts at, then the
//! end of the last record). Record `i` covers `[positions[i], positions[i + 1])`; consecutive
//! chunks of a file tile it without gaps, so the ranges a reader has seen merge into a few
//! intervals. Other Forward peers ignore options they do not know; chunks without them are
//! delivered as before, just without this identity.
//!
//! `tron_positions` is LEB128 varints: the first offset, then each difference from the previous
//! one (about two bytes per 200-byte line). It is taken from the frame as bytes, never as a
//! MessagePack value tree, so a large chunk of short lines costs its wire size and no more.

use crate::error::{malformed, DecodeError};

pub const SOURCE_OPTION: &str = "tron_source";
pub const POSITIONS_OPTION: &str = "tron_positions";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Origin {
    pub source: String,
    /// Where each record starts, then where the last one ends: one more than the records.
    pub positions: Vec<u64>,
}

impl Origin {
    /// The byte range record `i` covers in its source.
    pub fn range(&self, i: usize) -> (u64, u64) {
        (self.positions[i], self.positions[i + 1])
    }

    pub(crate) fn decode(source: String, bytes: &[u8], records: usize) -> Result<Origin, DecodeError> {
        let mut positions = Vec::with_capacity(records + 1);
        let mut rest = bytes;
        let mut previous = 0u64;
        while !rest.is_empty() {
            let (delta, used) = read_varint(rest)
                .ok_or_else(|| malformed(format!("{POSITIONS_OPTION}: a varint cut short or too long")))?;
            rest = &rest[used..];
            previous = if positions.is_empty() {
                delta
            } else {
                previous.checked_add(delta).ok_or_else(|| malformed(format!("{POSITIONS_OPTION}: offset overflows")))?
            };
            positions.push(previous);
        }
        if positions.len() != records + 1 {
            return Err(malformed(format!(
                "{POSITIONS_OPTION} holds {} positions for {records} records (expected {})",
                positions.len(),
                records + 1
            )));
        }
        Ok(Origin { source, positions })
    }
}

/// Appends positions as `tron_positions` expects them.
#[derive(Debug, Default)]
pub(crate) struct PositionWriter {
    pub bytes: Vec<u8>,
    last: Option<u64>,
}

impl PositionWriter {
    /// `position` must not be below the previous one (records are appended in file order).
    pub fn push(&mut self, position: u64) {
        let value = match self.last {
            None => position,
            Some(last) => {
                assert!(position >= last, "positions go forward: {position} after {last}");
                position - last
            }
        };
        self.last = Some(position);
        write_varint(&mut self.bytes, value);
    }

    pub fn is_empty(&self) -> bool {
        self.last.is_none()
    }
}

fn write_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn read_varint(bytes: &[u8]) -> Option<(u64, usize)> {
    let mut value = 0u64;
    for (i, b) in bytes.iter().enumerate().take(10) {
        value |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((value, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_round_trip_and_must_match_the_record_count() {
        let mut w = PositionWriter::default();
        for p in [1_000_000_007u64, 1_000_000_007, 1_000_000_300, 1_000_090_000, u64::MAX / 2] {
            w.push(p);
        }
        let o = Origin::decode("h/1".into(), &w.bytes, 4).unwrap();
        assert_eq!(o.positions, [1_000_000_007, 1_000_000_007, 1_000_000_300, 1_000_090_000, u64::MAX / 2]);
        assert_eq!(o.range(2), (1_000_000_300, 1_000_090_000));
        let err = Origin::decode("h/1".into(), &w.bytes, 3).unwrap_err().to_string();
        assert!(err.contains("tron_positions holds 5 positions for 3 records (expected 4)"), "{err}");
        let err = Origin::decode("h/1".into(), &w.bytes, 5).unwrap_err().to_string();
        assert!(err.contains("holds 5 positions for 5 records (expected 6)"), "{err}");
        assert!(Origin::decode("h/1".into(), &[0x80, 0x80], 1).is_err());
        assert!(Origin::decode("h/1".into(), &[0xff; 11], 0).is_err());
    }

    #[test]
    fn about_two_bytes_per_typical_line() {
        let mut w = PositionWriter::default();
        for i in 0..1000u64 {
            w.push((1 << 30) + i * 216);
        }
        assert!(w.bytes.len() < 2010, "{}", w.bytes.len());
    }
}

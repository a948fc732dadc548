//! Finds where the next MessagePack value ends without decoding it, so the codec knows whether
//! a whole frame has arrived, and can refuse an oversized one as soon as its header says so.

use crate::error::{DecodeError, Limits};

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Scan {
    /// The value occupies `buf[..end]`.
    Complete(usize),
    /// More bytes are needed; the buffer must hold at least this many before a rescan can succeed.
    Incomplete(usize),
}

/// Scans one value from the start of `buf`. Fails as soon as the value is known to be larger
/// than `limits.max_frame_bytes`.
pub(crate) fn value_len(buf: &[u8], limits: &Limits) -> Result<Scan, DecodeError> {
    let limit = limits.max_frame_bytes;
    let mut pos = 0usize;
    // Values still to skip; arrays and maps add their elements. u64 so a hostile array32 count
    // cannot overflow it, and nothing is allocated per claimed element.
    let mut remaining: u64 = 1;
    while remaining > 0 {
        let Some(&marker) = buf.get(pos) else {
            return Ok(Scan::Incomplete(pos + 1));
        };
        let (header, body, children): (usize, usize, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0, 0),
            0x80..=0x8f => (1, 0, 2 * (marker & 0x0f) as u64),
            0x90..=0x9f => (1, 0, (marker & 0x0f) as u64),
            0xa0..=0xbf => (1, (marker & 0x1f) as usize, 0),
            0xc1 => return Err(DecodeError::Msgpack(format!("reserved byte 0xc1 at offset {pos}"))),
            0xc4 | 0xd9 => (2, be(buf, pos + 1, 1)?, 0),
            0xc5 | 0xda => (3, be(buf, pos + 1, 2)?, 0),
            0xc6 | 0xdb => (5, be(buf, pos + 1, 4)?, 0),
            0xc7 => (3, be(buf, pos + 1, 1)?, 0),
            0xc8 => (4, be(buf, pos + 1, 2)?, 0),
            0xc9 => (6, be(buf, pos + 1, 4)?, 0),
            0xca => (5, 0, 0),
            0xcb => (9, 0, 0),
            0xcc | 0xd0 => (2, 0, 0),
            0xcd | 0xd1 => (3, 0, 0),
            0xce | 0xd2 => (5, 0, 0),
            0xcf | 0xd3 => (9, 0, 0),
            0xd4 => (3, 0, 0),
            0xd5 => (4, 0, 0),
            0xd6 => (6, 0, 0),
            0xd7 => (10, 0, 0),
            0xd8 => (18, 0, 0),
            0xdc => (3, 0, be(buf, pos + 1, 2)? as u64),
            0xdd => (5, 0, be(buf, pos + 1, 4)? as u64),
            0xde => (3, 0, 2 * be(buf, pos + 1, 2)? as u64),
            0xdf => (5, 0, 2 * be(buf, pos + 1, 4)? as u64),
        };
        let end = pos + header + body;
        if end > limit {
            return Err(DecodeError::FrameTooLarge { size: end, limit });
        }
        if end > buf.len() {
            return Ok(Scan::Incomplete(end));
        }
        pos = end;
        remaining = remaining - 1 + children;
    }
    Ok(Scan::Complete(pos))
}

/// Reads a big-endian length; a header cut short surfaces as `Incomplete` via the caller's
/// bounds check, so here it reads as 0 and the caller asks for more bytes.
fn be(buf: &[u8], at: usize, n: usize) -> Result<usize, DecodeError> {
    let Some(bytes) = buf.get(at..at + n) else {
        return Ok(0);
    };
    Ok(bytes.iter().fold(0usize, |acc, b| (acc << 8) | *b as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(v: &rmpv::Value) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, v).unwrap();
        out
    }

    #[test]
    fn complete_values_report_their_length() {
        let v = rmpv::Value::Array(vec![
            "tag".into(),
            rmpv::Value::Binary(vec![1; 300]),
            rmpv::Value::Map(vec![("k".into(), 1.into())]),
        ]);
        let mut bytes = encoded(&v);
        let len = bytes.len();
        bytes.extend_from_slice(&[0x90, 0x91]);
        assert_eq!(value_len(&bytes, &Limits::default()).unwrap(), Scan::Complete(len));
    }

    #[test]
    fn every_prefix_is_incomplete() {
        let v = rmpv::Value::Array(vec!["t".into(), rmpv::Value::Binary(vec![7; 70_000]), rmpv::Value::Nil]);
        let bytes = encoded(&v);
        for cut in [0, 1, 2, 3, 5, 6, 100, bytes.len() - 1] {
            match value_len(&bytes[..cut], &Limits::default()).unwrap() {
                Scan::Incomplete(need) => assert!(need > cut, "cut {cut} need {need}"),
                other => panic!("cut {cut}: {other:?}"),
            }
        }
    }

    #[test]
    fn oversized_header_fails_before_the_body_arrives() {
        let limits = Limits { max_frame_bytes: 1000, ..Limits::default() };
        // array of 2: fixstr "t", bin32 claiming 1 MiB
        let bytes = [0x92, 0xa1, b't', 0xc6, 0x00, 0x10, 0x00, 0x00];
        let err = value_len(&bytes, &limits).unwrap_err();
        assert!(matches!(err, DecodeError::FrameTooLarge { limit: 1000, .. }), "{err}");
        assert!(err.to_string().contains("max_frame_bytes=1000"));
    }

    #[test]
    fn huge_array_claim_allocates_nothing() {
        let bytes = [0xdd, 0xff, 0xff, 0xff, 0xff, 0xc0];
        assert!(matches!(value_len(&bytes, &Limits::default()).unwrap(), Scan::Incomplete(_)));
    }
}

//! The Kafka headers the relay writes and the sink reads: one place, so the two daemons cannot
//! drift apart.
//!
//! Every record carries one header, [`RECORD`], whose value says everything the sink needs
//! beside the payload: `{event_time_ns} {tag_len}:{tag}` and, for records from a client that says
//! where they came from (tron-agent does), ` {start}-{end} {source}`. Example:
//! `1733300000123456789 7:app.log 0-215 web-1/8a7c…`. One header instead of four: librdkafka
//! allocates every header of every consumed message, and four of them were 15 % of the sink's
//! CPU (bench/RESULTS.md). The tag is length-prefixed and the source is last, so neither needs
//! escaping. Records written by relays before this header carry the four older headers
//! ([`TAG`], [`EVENT_TIME_NS`], [`SOURCE`], [`RANGE`]); the sink still reads them.
//!
//! A record that came with an origin (every tron-agent record) carries the same text in its
//! **key** instead, after [`KEY_PREFIX`], and no header at all, unless the relay's key is taken
//! (`kafka.key_field`) or its partitioner is configured (`kafka.properties.partitioner`). Why:
//! librdkafka parses and allocates a consumed message's headers on first access, 7-8 % of the
//! CSV sink's CPU, and builds a header list for every produced one; a key is a pointer into the
//! fetched batch. The relay's partitioner ([`partition_key`]) still partitions such a record by
//! its source alone, so a file's records stay in the partition they always went to.

use std::io::Write;

/// The one header of every record: see the module's documentation.
pub const RECORD: &str = "tron";
/// Older relays: the Forward tag of the chunk the record came in.
pub const TAG: &str = "tag";
/// Older relays: the record's event time, nanoseconds since the epoch, as decimal text.
pub const EVENT_TIME_NS: &str = "event_time_ns";
/// Older relays: where the record came from (`{host}/{file identity}`).
pub const SOURCE: &str = "tron_source";
/// Older relays: the record's byte range in its source, `{start}-{end}`, with [`SOURCE`].
pub const RANGE: &str = "tron_range";
/// Marks a relay's watermark message: its value is `{"tron_watermarks": {host: [watermark_ms,
/// reported_ms]}}`, one per partition of a topic, and it is not a record.
pub const WATERMARKS: &str = "tron_watermarks";

/// Starts the key of a record whose [`RecordMeta`] is its key (see the module's documentation).
/// A word no key of a field or of another producer starts with by chance.
pub const KEY_PREFIX: &[u8] = b"tron:";

/// What a record's partition is chosen from: the source of a key that is a [`RecordMeta`] with an
/// origin (as when the source itself was the key), otherwise the key as it is; None for no key.
pub fn partition_key(key: Option<&[u8]>) -> Option<&[u8]> {
    let key = key?;
    match RecordMeta::decode_key(key) {
        Some(meta) => meta.origin.map(|o| o.source.as_bytes()),
        None => Some(key),
    }
}

/// Where a record came from: its source (`{host}/{file identity}`) and its byte range there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Origin<'a> {
    pub source: &'a str,
    pub start: u64,
    pub end: u64,
}

impl<'a> Origin<'a> {
    /// None when the range ends before it starts.
    fn new(source: &'a str, (start, end): (u64, u64)) -> Option<Self> {
        (start <= end).then_some(Origin { source, start, end })
    }

    /// From the [`SOURCE`] and [`RANGE`] headers of records written by older relays; None if
    /// either is absent or malformed (such a record is written, never dropped).
    pub fn from_old_headers(source: Option<&'a [u8]>, range: Option<&[u8]>) -> Option<Self> {
        let source = std::str::from_utf8(source?).ok()?;
        Origin::new(source, parse_range(range?)?)
    }
}

/// `{start}-{end}`, as the older [`RANGE`] header writes a record's range.
fn parse_range(range: &[u8]) -> Option<(u64, u64)> {
    let (start, end) = leading_number(range, b'-')?;
    Some((start, number(end)?))
}

/// What the [`RECORD`] header says of a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordMeta<'a> {
    pub event_time_ns: i64,
    pub tag: &'a str,
    pub origin: Option<Origin<'a>>,
}

impl<'a> RecordMeta<'a> {
    /// Writes the header's value into `out` (cleared first).
    pub fn encode(&self, out: &mut Vec<u8>) {
        out.clear();
        self.append_to(out);
    }

    /// Writes the record's key into `out` (cleared first): [`KEY_PREFIX`], then what the header
    /// would say.
    pub fn encode_key(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(KEY_PREFIX);
        self.append_to(out);
    }

    /// What a key written by [`RecordMeta::encode_key`] says; None for any other key (a
    /// `kafka.key_field` value, another producer's key).
    pub fn decode_key(key: &'a [u8]) -> Option<Self> {
        RecordMeta::decode(key.strip_prefix(KEY_PREFIX)?)
    }

    fn append_to(&self, out: &mut Vec<u8>) {
        write!(out, "{} {}:", self.event_time_ns, self.tag.len()).expect("writing to a Vec");
        out.extend_from_slice(self.tag.as_bytes());
        if let Some(o) = &self.origin {
            write!(out, " {}-{} ", o.start, o.end).expect("writing to a Vec");
            out.extend_from_slice(o.source.as_bytes());
        }
    }

    /// None when `value` is not such a header (the record is then written without an event
    /// time, tag or origin, never dropped). An origin whose range ends before it starts is
    /// no origin.
    ///
    /// Read byte by byte, as `encode` writes it: it runs for every record the sink consumes, and
    /// `split_once` and `str::parse` over the text were 2 % of an NDJSON sink's CPU.
    pub fn decode(value: &'a [u8]) -> Option<Self> {
        let (negative, digits) = match value.strip_prefix(b"-") {
            Some(rest) => (true, rest),
            None => (false, value),
        };
        let (magnitude, rest) = leading_number(digits, b' ')?;
        let event_time_ns =
            if negative { 0i64.checked_sub_unsigned(magnitude)? } else { i64::try_from(magnitude).ok()? };
        let (tag_len, rest) = leading_number(rest, b':')?;
        let tag_len = usize::try_from(tag_len).ok()?;
        let tag = std::str::from_utf8(rest.get(..tag_len)?).ok()?;
        let rest = &rest[tag_len..];
        let origin = match rest.split_first() {
            None => None,
            Some((b' ', rest)) => {
                let (start, rest) = leading_number(rest, b'-')?;
                let (end, source) = leading_number(rest, b' ')?;
                Origin::new(std::str::from_utf8(source).ok()?, (start, end))
            }
            Some(_) => return None,
        };
        Some(RecordMeta { event_time_ns, tag, origin })
    }
}

/// The decimal number at the start of `b` (at least one digit, nothing else) up to `end`, and
/// what follows `end`; None on anything else or on overflow.
///
/// One pass: up to 19 digits cannot overflow a u64, so only longer numbers are read again with
/// checks (a check per digit, in a second pass, was 2-3 % of the sink's CPU).
fn leading_number(b: &[u8], end: u8) -> Option<(u64, &[u8])> {
    const SAFE_DIGITS: usize = 19;
    let mut n = 0u64;
    for (at, &c) in b.iter().enumerate() {
        let digit = c.wrapping_sub(b'0');
        if digit > 9 {
            if at == 0 || c != end {
                return None;
            }
            let n = if at <= SAFE_DIGITS { n } else { number(&b[..at])? };
            return Some((n, &b[at + 1..]));
        }
        n = n.wrapping_mul(10).wrapping_add(u64::from(digit));
    }
    None
}

/// `digits` (at least one, nothing else) as a number; None on anything else or on overflow.
fn number(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &c| {
        if !c.is_ascii_digit() {
            return None;
        }
        n.checked_mul(10)?.checked_add(u64::from(c - b'0'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(meta: RecordMeta<'_>) -> String {
        let mut out = Vec::new();
        meta.encode(&mut out);
        assert_eq!(RecordMeta::decode(&out), Some(meta));
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn a_record_header_says_time_tag_and_origin_in_one_value() {
        let origin = Origin { source: "web-1/8a7c", start: 0, end: 215 };
        let meta = RecordMeta { event_time_ns: 1_733_300_000_123_456_789, tag: "app.log", origin: Some(origin) };
        assert_eq!(round_trip(meta), "1733300000123456789 7:app.log 0-215 web-1/8a7c");
        let meta = RecordMeta { event_time_ns: -5, tag: "docker.web", origin: None };
        assert_eq!(round_trip(meta), "-5 10:docker.web");
    }

    #[test]
    fn a_key_says_the_same_after_its_prefix_and_partitions_by_the_source_alone() {
        let origin = Origin { source: "web-1/8a7c", start: 0, end: 215 };
        let meta = RecordMeta { event_time_ns: 1_733_300_000_123_456_789, tag: "app.log", origin: Some(origin) };
        let mut key = Vec::new();
        meta.encode_key(&mut key);
        assert_eq!(key, b"tron:1733300000123456789 7:app.log 0-215 web-1/8a7c");
        assert_eq!(RecordMeta::decode_key(&key), Some(meta));
        assert_eq!(partition_key(Some(&key)), Some(&b"web-1/8a7c"[..]));
        // Not ours: a header's value without the prefix, a field's value, no key.
        assert_eq!(RecordMeta::decode_key(b"1733300000123456789 7:app.log"), None);
        assert_eq!(partition_key(Some(b"user-42")), Some(&b"user-42"[..]));
        assert_eq!(partition_key(Some(b"tron:garbage")), Some(&b"tron:garbage"[..]));
        assert_eq!(partition_key(None), None);
        let no_origin = RecordMeta { event_time_ns: 1, tag: "docker.web", origin: None };
        no_origin.encode_key(&mut key);
        assert_eq!(partition_key(Some(&key)), None);
    }

    #[test]
    fn tags_and_sources_with_separators_in_them_round_trip() {
        let origin = Origin { source: "host a/x 1-2 y", start: 7, end: 7 };
        round_trip(RecordMeta { event_time_ns: 1, tag: "a 3:b c-d", origin: Some(origin) });
        round_trip(RecordMeta { event_time_ns: 1, tag: "", origin: None });
        round_trip(RecordMeta {
            event_time_ns: 1, tag: "é ü", origin: Some(Origin { source: "", start: 0, end: 1 })
        });
    }

    /// The text-based reading this replaced: the byte reader must agree with it.
    fn reference(value: &[u8]) -> Option<RecordMeta<'_>> {
        let value = std::str::from_utf8(value).ok()?;
        let (time, rest) = value.split_once(' ')?;
        let (tag_len, rest) = rest.split_once(':')?;
        let tag_len: usize = tag_len.parse().ok()?;
        let tag = rest.get(..tag_len)?;
        let rest = &rest[tag_len..];
        let origin = match rest.strip_prefix(' ') {
            None if rest.is_empty() => None,
            None => return None,
            Some(rest) => {
                let (range, source) = rest.split_once(' ')?;
                let (start, end) = range.split_once('-')?;
                Origin::new(source, (start.parse().ok()?, end.parse().ok()?))
            }
        };
        Some(RecordMeta { event_time_ns: time.parse().ok()?, tag, origin })
    }

    #[test]
    fn every_mutation_of_a_header_is_read_as_the_text_reading_did() {
        // Each byte replaced by each of the separators, digits, a sign, a high byte, or
        // deleted; where `str::parse` would take a '+' (never written), the new reader is
        // stricter and both are allowed to differ only by refusing.
        let values = ["1733300000123456789 7:app.log 0-215 web-1/8a7c", "-5 10:docker.web", "9223372036854775807 0:"];
        let alphabet: [&[u8]; 11] =
            [b" ", b":", b"-", b"0", b"9", b"+", b"x", b"\xff", b"", b"99999999999", b"\xc3\xa9"];
        for value in values {
            let v = value.as_bytes();
            for at in 0..v.len() {
                for insert in alphabet {
                    let mutated = [&v[..at], insert, &v[at + 1..]].concat();
                    let (ours, theirs) = (RecordMeta::decode(&mutated), reference(&mutated));
                    if mutated.contains(&b'+') && ours.is_none() {
                        continue;
                    }
                    assert_eq!(ours, theirs, "{:?}", String::from_utf8_lossy(&mutated));
                }
            }
        }
        assert_eq!(RecordMeta::decode(b"-9223372036854775808 0:").unwrap().event_time_ns, i64::MIN);
        assert_eq!(RecordMeta::decode(b"9223372036854775808 0:"), None, "overflow");
        // The origin's numbers at the edge of a u64, and one past it.
        let edge = RecordMeta::decode(b"1 0: 0-18446744073709551615 s").unwrap().origin.unwrap();
        assert_eq!((edge.start, edge.end), (0, u64::MAX));
        assert_eq!(RecordMeta::decode(b"1 0: 0-18446744073709551616 s"), None, "overflow");
        assert_eq!(RecordMeta::decode(b"1 0: 0-00000000000000000000000000001 s").unwrap().origin.unwrap().end, 1);
    }

    #[test]
    fn malformed_values_are_no_header() {
        for bad in ["", "12", "12 x:a", "12 9:short", "x 1:a", "12 1:ab", "12 1:a 5", "12 1:a 5-x s", "12 1:a\u{0}"] {
            assert_eq!(RecordMeta::decode(bad.as_bytes()), None, "{bad:?}");
        }
        let backwards = RecordMeta::decode(b"12 1:a 9-3 src").unwrap();
        assert_eq!(backwards.origin, None, "a range that ends before it starts is no origin");
        assert_eq!(RecordMeta::decode(&[b'1', b' ', b'1', b':', 0xff]), None, "not UTF-8");
    }
}

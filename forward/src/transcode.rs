//! Forward entries straight from MessagePack to the JSON bytes Kafka carries, without a value
//! tree per record: every record's JSON is appended to one buffer per chunk. Elements are counted
//! as they are read, so a chunk that claims millions of tiny map pairs is refused by count (a
//! bound on work and memory) rather than discovered by the allocator.
//!
//! The JSON is what [`crate::json::to_json`] produces for the same value, except that map keys
//! keep the client's order (a tree sorted them), and a non-string key is the JSON text of its
//! value (`1` → `"1"`, nil → `"null"`).

use crate::error::{malformed, DecodeError, Limits};
use crate::time::EventTime;
use base64::Engine as _;
use std::ops::Range;

/// Nesting deeper than this is refused: recursion must not be driven by the peer.
const MAX_DEPTH: usize = 128;

/// The records of one chunk: their JSON, back to back in `json`.
#[derive(Debug, Default)]
pub struct Records {
    pub json: Vec<u8>,
    pub records: Vec<Record>,
    /// MessagePack elements read (every value, key and array item), for cost accounting.
    pub elements: usize,
    /// Where the records came from, when the client said ([`crate::origin`]).
    pub origin: Option<crate::Origin>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Record {
    pub time: EventTime,
    /// This record's JSON object in [`Records::json`].
    pub json: Range<usize>,
}

impl Records {
    pub fn get(&self, i: usize) -> &[u8] {
        &self.json[self.records[i].json.clone()]
    }
}

/// Appends every entry of a PackedForward stream (`[time, record]` after `[time, record]`) to
/// `out`. Fails on the first malformed entry, or as soon as the entries, the elements read
/// (across the calls that share `out`) or the JSON produced pass their limit.
pub fn packed_entries(mut bytes: &[u8], limits: &Limits, out: &mut Records) -> Result<(), DecodeError> {
    while !bytes.is_empty() {
        if out.records.len() == limits.max_entries_per_chunk {
            return Err(DecodeError::TooManyEntries {
                count: out.records.len() + 1,
                limit: limits.max_entries_per_chunk,
            });
        }
        let mut r = Reader { buf: bytes, pos: 0, elements: out.elements, max_elements: limits.max_elements_per_chunk };
        r.entry(out)?;
        out.elements = r.elements;
        if out.json.len() > limits.max_decoded_bytes {
            return Err(DecodeError::DecodedTooLarge { limit: limits.max_decoded_bytes });
        }
        bytes = &bytes[r.pos..];
    }
    Ok(())
}

struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    elements: usize,
    max_elements: usize,
}

enum Head<'a> {
    Nil,
    Bool(bool),
    Uint(u64),
    Int(i64),
    F32(f32),
    F64(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Array(usize),
    Map(usize),
    Ext(i8, &'a [u8]),
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self.pos.checked_add(n).filter(|e| *e <= self.buf.len());
        let end = end.ok_or_else(|| DecodeError::Msgpack(format!("value cut short at byte {}", self.pos)))?;
        let bytes = &self.buf[self.pos..end];
        self.pos = end;
        Ok(bytes)
    }

    fn uint(&mut self, n: usize) -> Result<u64, DecodeError> {
        Ok(self.take(n)?.iter().fold(0u64, |acc, b| (acc << 8) | *b as u64))
    }

    fn head(&mut self) -> Result<Head<'a>, DecodeError> {
        self.elements += 1;
        if self.elements > self.max_elements {
            return Err(DecodeError::TooManyElements { limit: self.max_elements });
        }
        let marker = self.take(1)?[0];
        Ok(match marker {
            0x00..=0x7f => Head::Uint(marker as u64),
            0xe0..=0xff => Head::Int(marker as i8 as i64),
            0x80..=0x8f => Head::Map((marker & 0x0f) as usize),
            0x90..=0x9f => Head::Array((marker & 0x0f) as usize),
            0xa0..=0xbf => Head::Str(self.take((marker & 0x1f) as usize)?),
            0xc0 => Head::Nil,
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4 | 0xd9 => {
                let n = self.uint(1)? as usize;
                bytes_head(marker, self.take(n)?)
            }
            0xc5 | 0xda => {
                let n = self.uint(2)? as usize;
                bytes_head(marker, self.take(n)?)
            }
            0xc6 | 0xdb => {
                let n = self.uint(4)? as usize;
                bytes_head(marker, self.take(n)?)
            }
            0xc7..=0xc9 => {
                let n = self.uint(1 << (marker - 0xc7))? as usize;
                let t = self.take(1)?[0] as i8;
                Head::Ext(t, self.take(n)?)
            }
            0xca => Head::F32(f32::from_bits(self.uint(4)? as u32)),
            0xcb => Head::F64(f64::from_bits(self.uint(8)?)),
            0xcc => Head::Uint(self.uint(1)?),
            0xcd => Head::Uint(self.uint(2)?),
            0xce => Head::Uint(self.uint(4)?),
            0xcf => Head::Uint(self.uint(8)?),
            0xd0 => Head::Int(self.uint(1)? as u8 as i8 as i64),
            0xd1 => Head::Int(self.uint(2)? as u16 as i16 as i64),
            0xd2 => Head::Int(self.uint(4)? as u32 as i32 as i64),
            0xd3 => Head::Int(self.uint(8)? as i64),
            0xd4..=0xd8 => {
                let t = self.take(1)?[0] as i8;
                Head::Ext(t, self.take(1 << (marker - 0xd4))?)
            }
            0xdc => Head::Array(self.uint(2)? as usize),
            0xdd => Head::Array(self.uint(4)? as usize),
            0xde => Head::Map(self.uint(2)? as usize),
            0xdf => Head::Map(self.uint(4)? as usize),
            0xc1 => return Err(DecodeError::Msgpack(format!("reserved byte 0xc1 at offset {}", self.pos - 1))),
        })
    }

    /// One `[time, record]` (or `[[time, metadata], record]`) entry.
    fn entry(&mut self, out: &mut Records) -> Result<(), DecodeError> {
        match self.head()? {
            Head::Array(2) => {}
            Head::Array(n) => return Err(malformed(format!("an entry must be [time, record], got {n} elements"))),
            _ => return Err(malformed("an entry must be [time, record]")),
        }
        let time = match self.head()? {
            Head::Array(2) => {
                let time = self.time()?;
                self.skip(0)?; // fluent-bit's metadata map: not carried to Kafka
                time
            }
            head => time_of(head)?,
        };
        let start = out.json.len();
        match self.head()? {
            Head::Map(n) => self.map(n, &mut out.json, 0)?,
            _ => {
                out.json.truncate(start);
                return Err(malformed("a record must be a map"));
            }
        }
        out.records.push(Record { time, json: start..out.json.len() });
        Ok(())
    }

    fn time(&mut self) -> Result<EventTime, DecodeError> {
        let head = self.head()?;
        time_of(head)
    }

    fn map(&mut self, pairs: usize, out: &mut Vec<u8>, depth: usize) -> Result<(), DecodeError> {
        out.push(b'{');
        for i in 0..pairs {
            if i > 0 {
                out.push(b',');
            }
            match self.head()? {
                Head::Str(s) | Head::Bin(s) => write_str(out, s),
                other => {
                    let mut text = Vec::new();
                    self.value(other, &mut text, depth + 1)?;
                    write_str(out, &text);
                }
            }
            out.push(b':');
            let head = self.head()?;
            self.value(head, out, depth + 1)?;
        }
        out.push(b'}');
        Ok(())
    }

    fn value(&mut self, head: Head<'a>, out: &mut Vec<u8>, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!("values nested deeper than {MAX_DEPTH}")));
        }
        match head {
            Head::Nil => out.extend_from_slice(b"null"),
            Head::Bool(b) => out.extend_from_slice(if b { b"true" } else { b"false" }),
            Head::Uint(u) => write_number(out, u),
            Head::Int(i) => write_number(out, i),
            Head::F32(f) => write_float(out, f as f64),
            Head::F64(f) => write_float(out, f),
            Head::Str(s) | Head::Bin(s) => write_str(out, s),
            Head::Array(n) => {
                out.push(b'[');
                for i in 0..n {
                    if i > 0 {
                        out.push(b',');
                    }
                    let head = self.head()?;
                    self.value(head, out, depth + 1)?;
                }
                out.push(b']');
            }
            Head::Map(n) => self.map(n, out, depth)?,
            Head::Ext(t, data) => {
                out.extend_from_slice(b"{\"ext\":");
                write_number(out, t);
                out.extend_from_slice(b",\"base64\":\"");
                out.extend_from_slice(base64::engine::general_purpose::STANDARD.encode(data).as_bytes());
                out.extend_from_slice(b"\"}");
            }
        }
        Ok(())
    }

    /// Skips one value (counted like any other).
    fn skip(&mut self, depth: usize) -> Result<(), DecodeError> {
        if depth > MAX_DEPTH {
            return Err(malformed(format!("values nested deeper than {MAX_DEPTH}")));
        }
        match self.head()? {
            Head::Array(n) => (0..n).try_for_each(|_| self.skip(depth + 1)),
            Head::Map(n) => (0..2 * n).try_for_each(|_| self.skip(depth + 1)),
            _ => Ok(()),
        }
    }
}

fn bytes_head(marker: u8, bytes: &[u8]) -> Head<'_> {
    match marker {
        0xc4..=0xc6 => Head::Bin(bytes),
        _ => Head::Str(bytes),
    }
}

fn time_of(head: Head<'_>) -> Result<EventTime, DecodeError> {
    match head {
        Head::Uint(u) => Ok(EventTime::new(u.min(u32::MAX as u64) as u32, 0)),
        Head::Int(i) => Ok(EventTime::new(i.clamp(0, u32::MAX as i64) as u32, 0)),
        Head::F32(f) => Ok(EventTime::from_float(f as f64)),
        Head::F64(f) => Ok(EventTime::from_float(f)),
        Head::Ext(t, data) => EventTime::from_ext(t, data),
        _ => Err(malformed("time must be an integer or EventTime")),
    }
}

/// A JSON string; bytes that are not UTF-8 are replaced (as `to_json` does).
fn write_str(out: &mut Vec<u8>, bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    serde_json::to_writer(&mut *out, text.as_ref()).expect("writing to a Vec cannot fail");
}

fn write_number(out: &mut Vec<u8>, n: impl serde::Serialize) {
    serde_json::to_writer(&mut *out, &n).expect("writing to a Vec cannot fail");
}

fn write_float(out: &mut Vec<u8>, f: f64) {
    match serde_json::Number::from_f64(f) {
        Some(n) => serde_json::to_writer(&mut *out, &n).expect("writing to a Vec cannot fail"),
        None => out.extend_from_slice(b"null"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn elements(n: usize) -> Limits {
        Limits { max_elements_per_chunk: n, ..Limits::default() }
    }

    fn packed(entries: &[Value]) -> Vec<u8> {
        let mut out = Vec::new();
        for e in entries {
            rmpv::encode::write_value(&mut out, e).unwrap();
        }
        out
    }

    fn ext_time(s: u32, ns: u32) -> Value {
        let mut d = s.to_be_bytes().to_vec();
        d.extend_from_slice(&ns.to_be_bytes());
        Value::Ext(0, d)
    }

    #[test]
    fn records_become_the_json_a_tree_would_give() {
        let record = Value::Map(vec![
            ("msg".into(), "hé \"quoted\"\n".into()),
            ("n".into(), Value::from(-3)),
            ("big".into(), Value::from(u64::MAX)),
            ("f".into(), Value::F64(1.5)),
            ("nan".into(), Value::F64(f64::NAN)),
            ("raw".into(), Value::Binary(vec![b'o', b'k', 0xff])),
            ("list".into(), Value::Array(vec![Value::Nil, Value::Boolean(true), Value::Map(vec![])])),
            ("e".into(), Value::Ext(5, vec![1, 2, 3])),
            (Value::from(7), "int key".into()),
        ]);
        let bytes = packed(&[
            Value::Array(vec![ext_time(1_700_000_000, 5), record.clone()]),
            Value::Array(vec![Value::Array(vec![Value::from(1_700_000_001), Value::Map(vec![])]), record.clone()]),
        ]);
        let mut out = Records::default();
        packed_entries(&bytes, &elements(1000), &mut out).unwrap();
        assert_eq!(out.records.len(), 2);
        assert_eq!(out.records[0].time, EventTime::new(1_700_000_000, 5));
        assert_eq!(out.records[1].time, EventTime::new(1_700_000_001, 0));
        let mut expected = crate::json::to_json(&record);
        // A non-string key is its JSON text.
        let map = expected.as_object_mut().unwrap();
        let v = map.remove("7").unwrap();
        map.insert("7".into(), v);
        for i in 0..2 {
            let got: serde_json::Value = serde_json::from_slice(out.get(i)).unwrap();
            assert_eq!(got, expected);
        }
        assert!(std::str::from_utf8(out.get(0)).unwrap().starts_with("{\"msg\":"), "client order kept");
    }

    #[test]
    fn times_are_integers_floats_or_event_time_exts() {
        assert_eq!(time_of(Head::Uint(5)).unwrap(), EventTime::new(5, 0));
        assert_eq!(time_of(Head::F64(1.5)).unwrap(), EventTime::new(1, 500_000_000));
        let ext = EventTime::new(7, 9).to_ext_payload();
        assert_eq!(time_of(Head::Ext(0, &ext)).unwrap(), EventTime::new(7, 9));
        assert!(time_of(Head::Ext(1, &[0; 8])).is_err());
        assert!(time_of(Head::Str(b"x")).is_err());
    }

    #[test]
    fn millions_of_claimed_elements_are_refused_by_count() {
        // An entry whose record claims 2^32-1 pairs, and a few real ones.
        let mut bytes = vec![0x92, 0x01, 0xdf, 0xff, 0xff, 0xff, 0xff];
        bytes.extend(std::iter::repeat_n([0x01u8, 0x02], 600).flatten());
        let err = packed_entries(&bytes, &elements(1000), &mut Records::default()).unwrap_err();
        assert!(matches!(err, DecodeError::TooManyElements { limit: 1000 }), "{err}");
    }

    #[test]
    fn deep_nesting_and_truncation_fail_cleanly() {
        let mut bytes = vec![0x92, 0x01, 0x81, 0xa1, b'k'];
        bytes.extend(std::iter::repeat_n(0x91u8, 10_000));
        bytes.push(0xc0);
        let err = packed_entries(&bytes, &elements(1_000_000), &mut Records::default()).unwrap_err();
        assert!(err.to_string().contains("nested deeper"), "{err}");
        let whole = packed(&[Value::Array(vec![Value::from(1), Value::Map(vec![("k".into(), "v".into())])])]);
        for cut in 1..whole.len() {
            assert!(packed_entries(&whole[..cut], &elements(1000), &mut Records::default()).is_err(), "cut {cut}");
        }
        assert!(
            packed_entries(&[0x92, 0x01, 0x91, 0x01], &elements(1000), &mut Records::default()).is_err(),
            "record not a map"
        );
    }
}

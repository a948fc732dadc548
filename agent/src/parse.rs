//! A line becomes a record: raw text or a JSON object, an event time, and the added fields.

use crate::config::{FieldsConfig, Parser, SourceConfig};
use forward::msgpack::{is_name, WatchedValue};
use forward::EventTime;
use serde_json::{Map, Value};

/// How a time field is read; parsed from the configuration's `time_format`.
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum TimeFormat {
    #[default]
    Rfc3339,
    /// Epoch in units of 10^-scale seconds: 0 = s, 3 = ms, 6 = µs, 9 = ns.
    Epoch(u32),
    Strftime(String),
}

impl TryFrom<String> for TimeFormat {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        TimeFormat::parse(&s)
    }
}

impl TimeFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "rfc3339" => TimeFormat::Rfc3339,
            "unix" => TimeFormat::Epoch(0),
            "unix_ms" => TimeFormat::Epoch(3),
            "unix_us" => TimeFormat::Epoch(6),
            "unix_ns" => TimeFormat::Epoch(9),
            p if p.contains('%') => TimeFormat::Strftime(p.to_string()),
            other => {
                return Err(format!(
                    "unknown time format {other:?}: use rfc3339, unix, unix_ms, unix_us, unix_ns or a strftime pattern"
                ))
            }
        })
    }

    /// Nanoseconds since the epoch, or None when the value does not fit the format.
    pub fn to_nanos(&self, v: &WatchedValue) -> Option<i64> {
        match v {
            WatchedValue::Str(s) => self.nanos_of_text(s),
            WatchedValue::Other(Value::Number(n)) => self.nanos_of_number(n),
            WatchedValue::Other(_) => None,
        }
    }

    fn nanos_of_text(&self, s: &str) -> Option<i64> {
        match self {
            TimeFormat::Rfc3339 => crate::rfc3339::to_nanos(s),
            TimeFormat::Epoch(_) => self.nanos_of_number(&serde_json::from_str(s).ok()?),
            TimeFormat::Strftime(p) => {
                if let Ok(t) = chrono::DateTime::parse_from_str(s, p) {
                    return t.timestamp_nanos_opt();
                }
                chrono::NaiveDateTime::parse_from_str(s, p).ok()?.and_utc().timestamp_nanos_opt()
            }
        }
    }

    fn nanos_of_number(&self, n: &serde_json::Number) -> Option<i64> {
        let TimeFormat::Epoch(scale) = self else {
            return None;
        };
        let factor = 10i64.pow(9 - scale);
        match n.as_i64() {
            Some(i) => i.checked_mul(factor),
            None => n.as_f64().map(|f| (f * factor as f64) as i64),
        }
    }
}

/// Per-source settings prepared once.
#[derive(Debug)]
pub struct SourceSettings {
    pub name: String,
    pub tag: String,
    pub parser: Parser,
    pub max_line_bytes: usize,
    pub time_field: Option<String>,
    pub time_format: TimeFormat,
    /// Start-of-record pattern and flush time-out.
    pub multiline: Option<(regex::bytes::Regex, std::time::Duration)>,
}

impl SourceSettings {
    pub fn new(cfg: &SourceConfig) -> Self {
        SourceSettings {
            name: cfg.name.clone(),
            tag: cfg.tag.clone(),
            parser: cfg.parser,
            max_line_bytes: cfg.max_line_bytes,
            time_field: cfg.time_field.clone(),
            time_format: cfg.time_format.clone(),
            multiline: cfg.multiline.as_ref().map(|m| (m.start.0.clone(), m.flush_timeout)),
        }
    }
}

/// What the added fields need to know about the file a line came from.
pub struct Origin<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub file_id: u64,
}

/// The fields the agent adds to every record of one file, by name: `None` when switched off.
pub struct Added<'a> {
    host: Option<(&'a str, &'a str)>,
    file: Option<(&'a str, &'a str)>,
    id: Option<&'a str>,
    /// The pairs every record of the file gets alike (host and file), encoded once: escaping
    /// them again for each record was 3 % of the archive's CPU. As JSON, each with its leading
    /// comma; and as MessagePack.
    same_json: Vec<u8>,
    same_msgpack: Vec<u8>,
    /// The id's key, encoded once likewise: as JSON with its leading comma, colon and the id's
    /// opening quote (an id is hex digits, which need no escaping); as MessagePack.
    id_json_key: Vec<u8>,
    id_msgpack_key: Vec<u8>,
}

impl<'a> Added<'a> {
    pub fn new(fields: &'a FieldsConfig, origin: &Origin<'a>) -> Self {
        let named = |name: &'a String| (!name.is_empty()).then_some(name.as_str());
        let mut added = Added {
            host: named(&fields.host).map(|k| (k, origin.host)),
            file: named(&fields.file).map(|k| (k, origin.path)),
            id: named(&fields.id),
            same_json: Vec::new(),
            same_msgpack: Vec::new(),
            id_json_key: Vec::new(),
            id_msgpack_key: Vec::new(),
        };
        if let Some(key) = added.id {
            added.id_json_key.push(b',');
            serde_json::to_writer(&mut added.id_json_key, key).expect("vec");
            added.id_json_key.extend_from_slice(b":\"");
            rmp::encode::write_str(&mut added.id_msgpack_key, key).expect("vec");
        }
        for (k, v) in [added.host, added.file].into_iter().flatten() {
            write_json_pair(&mut added.same_json, k, v);
            rmp::encode::write_str(&mut added.same_msgpack, k).expect("vec");
            rmp::encode::write_str(&mut added.same_msgpack, v).expect("vec");
        }
        added
    }

    /// The added pairs of a record whose id is `id`, as JSON after its own fields.
    fn write_json(&self, id: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.same_json);
        if self.id.is_some() {
            debug_assert!(id.bytes().all(|c| c.is_ascii_hexdigit()), "an id needs no escaping");
            out.extend_from_slice(&self.id_json_key);
            out.extend_from_slice(id.as_bytes());
            out.push(b'"');
        }
    }

    /// The added pairs of a record whose id is `id`, as MessagePack after its own pairs.
    fn write_msgpack(&self, id: &str, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.same_msgpack);
        if self.id.is_some() {
            out.extend_from_slice(&self.id_msgpack_key);
            rmp::encode::write_str(out, id).expect("vec");
        }
    }

    fn names(&self) -> impl Iterator<Item = &'a str> {
        [self.host.map(|h| h.0), self.file.map(|f| f.0), self.id].into_iter().flatten()
    }

    fn pairs<'r>(&self, id: &'r str) -> impl Iterator<Item = (&'a str, &'r str)>
    where
        'a: 'r,
    {
        [self.host, self.file, self.id.map(|k| (k, id))].into_iter().flatten()
    }
}

/// A record's fields in the form that costs least to encode: most lines are JSON objects, which
/// are checked once and then copied (archive) or transcoded (Forward) from their text, with no
/// tree of values built per line.
///
/// The bytes of the first three lie in the buffer of the read the line came from
/// ([`crate::shared_reads::Lines`]): one buffer per read, where an allocation per line (two for
/// both destinations) and its free were 5 % of the agent's CPU.
#[derive(Debug)]
pub enum Fields {
    /// A JSON object line that names none of the added fields, and its number of pairs; the
    /// added fields follow its own.
    Json(Span, u32),
    /// The same, already transcoded in the pass that checked it: the MessagePack of its pairs
    /// (no map header) and their number.
    Packed(Span, u32),
    /// Both of the above for one line ([`Form::Both`]): its text, the MessagePack of its pairs,
    /// and their number.
    Both(Span, Span, u32),
    /// A line kept as text under "message" (raw parser, or a line that is not a JSON object).
    Message(String),
    /// A JSON object that names an added field, with the added values already in it: they win,
    /// as they always have.
    Map(Map<String, Value>),
}

/// Where a record's bytes lie in the buffer of its read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    start: usize,
    end: usize,
}

impl Span {
    /// What has been written to `bytes` since it was `start` long.
    fn since(start: usize, bytes: &[u8]) -> Span {
        Span { start, end: bytes.len() }
    }

    fn of(self, bytes: &[u8]) -> &[u8] {
        &bytes[self.start..self.end]
    }
}

/// What every line of one read is parsed with.
pub struct LineContext<'a> {
    pub src: &'a SourceSettings,
    pub added: &'a Added<'a>,
    pub origin: &'a Origin<'a>,
    /// The event time of a line without one (or with one that does not parse).
    pub now_ns: i64,
    pub form: Form,
}

#[derive(Debug)]
pub struct Record {
    pub time: EventTime,
    pub fields: Fields,
    /// [`record_id`] of the line, when ids are added.
    pub id: Option<RecordId>,
}

impl Record {
    /// The record as one MessagePack map: a Forward entry's record. `bytes`: the buffer of the
    /// read it came from.
    pub fn write_msgpack(&self, bytes: &[u8], added: &Added, out: &mut Vec<u8>) {
        let id = self.id.as_ref().map(RecordId::as_str).unwrap_or_default();
        let extra = added.pairs(id).count() as u32;
        match &self.fields {
            Fields::Map(map) => return forward::msgpack::write_json_map(out, map),
            Fields::Json(text, pairs) => {
                forward::msgpack::write_json_object_text_of_len(out, text.of(bytes), *pairs, extra)
                    .expect("the line was checked to be one JSON object")
            }
            Fields::Packed(packed, pairs) | Fields::Both(_, packed, pairs) => {
                rmp::encode::write_map_len(out, pairs + extra).expect("vec");
                out.extend_from_slice(packed.of(bytes));
            }
            Fields::Message(text) => {
                rmp::encode::write_map_len(out, 1 + extra).expect("vec");
                rmp::encode::write_str(out, "message").expect("vec");
                rmp::encode::write_str(out, text).expect("vec");
            }
        }
        added.write_msgpack(id, out);
    }

    /// The record as one JSON object, `_time` (RFC 3339, ns) first, then the line's fields in
    /// their order and as written, then the added ones; with the newline: the archive's form.
    /// `bytes`: the buffer of the read it came from.
    pub fn write_json_line(&self, bytes: &[u8], added: &Added, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"_time\":\"");
        write_rfc3339_nanos(out, self.time.unix_nanos());
        out.push(b'"');
        let id = self.id.as_ref().map(RecordId::as_str).unwrap_or_default();
        match &self.fields {
            Fields::Map(map) => {
                let text = serde_json::to_vec(map).expect("JSON maps serialize");
                if text.len() > 2 {
                    out.push(b',');
                    out.extend_from_slice(&text[1..text.len() - 1]);
                }
                out.extend_from_slice(b"}\n");
                return;
            }
            Fields::Packed(..) => unreachable!("records for the archive are read as JSON text"),
            Fields::Json(text, _) | Fields::Both(text, _, _) => {
                let inner = object_inner(text.of(bytes));
                if !inner.is_empty() {
                    out.push(b',');
                    out.extend_from_slice(inner);
                }
            }
            Fields::Message(text) => {
                out.extend_from_slice(b",\"message\":");
                serde_json::to_writer(&mut *out, text).expect("vec");
            }
        }
        added.write_json(id, out);
        out.extend_from_slice(b"}\n");
    }
}

/// `,"key":"value"`, both escaped as JSON strings.
fn write_json_pair(out: &mut Vec<u8>, key: &str, value: &str) {
    out.push(b',');
    serde_json::to_writer(&mut *out, key).expect("vec");
    out.push(b':');
    serde_json::to_writer(&mut *out, value).expect("vec");
}

/// `2026-11-22T03:04:05.123456789Z`, as chrono's `to_rfc3339_opts(Nanos, true)` writes it for
/// years 0–9999, without building a string per record (the archive writes one per line).
fn write_rfc3339_nanos(out: &mut Vec<u8>, unix_nanos: i64) {
    use chrono::{Datelike, Timelike};
    // Lines in a row are mostly of the same second: its date and time are worked out once
    // (chrono's calendar arithmetic for each line was 1.5 % of the archive's CPU).
    thread_local!(static LAST_SECOND: std::cell::Cell<Option<(i64, [u8; 19])>> = const { std::cell::Cell::new(None) });
    let (second, nanos) = (unix_nanos.div_euclid(1_000_000_000), unix_nanos.rem_euclid(1_000_000_000) as u32);
    let prefix = match LAST_SECOND.get() {
        Some((last, prefix)) if last == second => prefix,
        _ => {
            let t = chrono::DateTime::from_timestamp_nanos(unix_nanos);
            if !(0..=9999).contains(&t.year()) {
                out.extend_from_slice(t.to_rfc3339_opts(chrono::SecondsFormat::Nanos, true).as_bytes());
                return;
            }
            let mut prefix = Vec::with_capacity(19);
            push_digits(&mut prefix, t.year() as u32, 4);
            for (separator, n) in
                [(b'-', t.month()), (b'-', t.day()), (b'T', t.hour()), (b':', t.minute()), (b':', t.second())]
            {
                prefix.push(separator);
                push_digits(&mut prefix, n, 2);
            }
            let prefix: [u8; 19] = prefix.try_into().expect("19 bytes");
            LAST_SECOND.set(Some((second, prefix)));
            prefix
        }
    };
    out.extend_from_slice(&prefix);
    out.push(b'.');
    push_digits(out, nanos, 9); // a timestamp is never a leap second
    out.push(b'Z');
}

/// The last `width` (at most 9) decimal digits of `n`, zero-padded.
fn push_digits(out: &mut Vec<u8>, mut n: u32, width: usize) {
    let mut buf = [b'0'; 9];
    for d in buf[..width].iter_mut().rev() {
        *d = b'0' + (n % 10) as u8;
        n /= 10;
    }
    out.extend_from_slice(&buf[..width]);
}

/// What is between the braces of a checked JSON object, without the surrounding white space.
fn object_inner(text: &[u8]) -> &[u8] {
    let trimmed = text.trim_ascii();
    trimmed[1..trimmed.len() - 1].trim_ascii()
}

/// The form a destination writes records in, so a JSON line is read once into it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Form {
    /// MessagePack (Forward): a JSON line is transcoded in the pass that checks it.
    MessagePack,
    /// JSON text (the archive): a JSON line is checked and kept as written.
    JsonText,
    /// Both, for lines read once for every destination ([`crate::shared_reads`]): a JSON line is
    /// transcoded in the pass that checks it and also kept as written.
    Both,
}

/// Parses a line read at `offset` into a record; what the record keeps of the line is appended
/// to `bytes`, the buffer of the read.
pub fn parse_line(line: &[u8], offset: u64, cx: &LineContext, bytes: &mut Vec<u8>) -> Record {
    let LineContext { src, added, origin, now_ns, form } = *cx;
    let mut time = None;
    let start = bytes.len();
    let fields = match (src.parser, form) {
        (Parser::Json, Form::MessagePack | Form::Both) => {
            if form == Form::Both {
                bytes.extend_from_slice(line);
            }
            let text = Span::since(start, bytes);
            let reserved = |key: &str| added.names().any(|n| is_name(key, n));
            let time_field = src.time_field.as_deref();
            // The fast path first; serde_json, the reference, when it is unsure.
            let pairs = match crate::json_msgpack::object_pairs(line, bytes, time_field, reserved) {
                Some(seen) => Ok(seen),
                None => {
                    bytes.truncate(text.end);
                    forward::msgpack::write_json_object_pairs(bytes, line, time_field, reserved)
                }
            };
            match pairs {
                Ok(seen) if !seen.names_reserved => {
                    time = seen.watched;
                    let packed = Span::since(text.end, bytes);
                    if form == Form::Both {
                        Fields::Both(text, packed, seen.pairs)
                    } else {
                        Fields::Packed(packed, seen.pairs)
                    }
                }
                Ok(seen) => {
                    bytes.truncate(start);
                    time = seen.watched;
                    with_added_values(line)
                }
                Err(_) => {
                    bytes.truncate(start); // partial pairs
                    metrics::counter!("tron_agent_json_parse_errors_total", "source" => src.name.clone()).increment(1);
                    Fields::Message(text_of(line))
                }
            }
        }
        // Checked as a whole first: skipping a value does not check its UTF-8.
        (Parser::Json, Form::JsonText) => {
            match std::str::from_utf8(line).map(|text| scan_object(text, src.time_field.as_deref(), added)) {
                Ok(Ok(scan)) if !scan.names_added => {
                    time = scan.time;
                    bytes.extend_from_slice(line);
                    Fields::Json(Span::since(start, bytes), scan.pairs)
                }
                Ok(Ok(scan)) => {
                    time = scan.time;
                    with_added_values(line)
                }
                Ok(Err(_)) | Err(_) => {
                    metrics::counter!("tron_agent_json_parse_errors_total", "source" => src.name.clone()).increment(1);
                    Fields::Message(text_of(line))
                }
            }
        }
        (Parser::Raw, _) => Fields::Message(text_of(line)),
    };
    let time_ns = time
        .and_then(|v| {
            let parsed = src.time_format.to_nanos(&v);
            if parsed.is_none() {
                metrics::counter!("tron_agent_time_parse_errors_total", "source" => src.name.clone()).increment(1);
            }
            parsed
        })
        .unwrap_or(now_ns);
    let id = added.id.map(|_| record_id(origin.host, origin.file_id, offset));
    let fields = match fields {
        Fields::Map(mut map) => {
            for (k, v) in added.pairs(id.as_ref().map(RecordId::as_str).unwrap_or_default()) {
                map.insert(k.to_string(), Value::String(v.to_string()));
            }
            Fields::Map(map)
        }
        other => other,
    };
    Record { time: EventTime::from_unix_nanos(time_ns), fields, id }
}

/// Rare: the line names a field the agent adds. Built as a map so the added value replaces the
/// line's, as it always has.
fn with_added_values(line: &[u8]) -> Fields {
    match serde_json::from_slice::<Value>(line) {
        Ok(Value::Object(map)) => Fields::Map(map),
        _ => unreachable!("checked to be one JSON object"),
    }
}

/// One pass over a JSON line: is it one object, what is its time field (the last one, if named
/// twice), does it name a field the agent adds. Values are skipped, not built.
struct Scan<'t> {
    time: Option<WatchedValue<'t>>,
    names_added: bool,
    pairs: u32,
}

fn scan_object<'t>(line: &'t str, time_field: Option<&str>, added: &Added) -> Result<Scan<'t>, serde_json::Error> {
    match scan_object_fast(line, time_field, added) {
        Some(scan) => Ok(scan),
        None => scan_object_by_serde(line, time_field, added),
    }
}

/// [`scan_object`] by [`tron_service::json_scan`]: `None` when it is unsure (an escaped key, a
/// `\u` escape, a time value serde_json would refuse), and then serde_json answers.
fn scan_object_fast<'t>(line: &'t str, time_field: Option<&str>, added: &Added) -> Option<Scan<'t>> {
    let mut scan = Scan { time: None, names_added: false, pairs: 0 };
    let mut time_text = None;
    tron_service::json_scan::top_level(line, |key, value, _| {
        scan.pairs += 1;
        scan.names_added |= added.names().any(|n| is_name(key, n));
        if time_field.is_some_and(|field| is_name(key, field)) {
            time_text = Some(value); // the last one, if named twice
        }
    })?;
    if let Some(value) = time_text {
        scan.time = Some(crate::json_msgpack::watched_value(value)?);
    }
    Some(scan)
}

fn scan_object_by_serde<'t>(
    line: &'t str,
    time_field: Option<&str>,
    added: &Added,
) -> Result<Scan<'t>, serde_json::Error> {
    use serde::de::{Deserializer as _, IgnoredAny, MapAccess, Visitor};
    struct ScanVisitor<'s> {
        time_field: Option<&'s str>,
        added: &'s Added<'s>,
    }
    impl<'de> Visitor<'de> for ScanVisitor<'_> {
        type Value = Scan<'de>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Scan<'de>, A::Error> {
            let mut scan = Scan { time: None, names_added: false, pairs: 0 };
            while let Some(key) = map.next_key::<tron_service::json_key::JsonKey<'de>>()? {
                scan.pairs += 1;
                let key = &*key.0;
                scan.names_added |= self.added.names().any(|n| is_name(key, n));
                if self.time_field.is_some_and(|field| is_name(key, field)) {
                    scan.time = Some(map.next_value::<WatchedValue>()?);
                } else {
                    map.next_value::<IgnoredAny>()?;
                }
            }
            Ok(scan)
        }
    }
    let mut de = serde_json::Deserializer::from_str(line);
    let scan = de.deserialize_map(ScanVisitor { time_field, added })?;
    de.end()?;
    Ok(scan)
}

/// A line's id: 32 lowercase hex digits, kept inline so that a record carries it without an
/// allocation of its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordId([u8; 32]);

impl RecordId {
    pub fn as_str(&self) -> &str {
        // SAFETY: only [`record_id`] makes one, of hex digits from `HEX_PAIRS`, which are ASCII.
        unsafe { std::str::from_utf8_unchecked(&self.0) }
    }
}

impl std::fmt::Display for RecordId {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Deterministic 128-bit id of (host, file identity, byte offset): the same line re-sent after a
/// crash carries the same id, so downstream can recognise it.
pub fn record_id(host: &str, file_id: u64, offset: u64) -> RecordId {
    // The key is the host, a zero byte, then file identity and offset big-endian. Built on the
    // stack for every host name DNS allows: this runs once per line.
    const ON_STACK: usize = 256;
    let len = host.len() + 17;
    let (mut stack, mut heap) = ([0u8; ON_STACK], Vec::new());
    let key: &mut [u8] = if len <= ON_STACK {
        &mut stack[..len]
    } else {
        heap.resize(len, 0);
        &mut heap
    };
    let (name, rest) = key.split_at_mut(host.len());
    name.copy_from_slice(host.as_bytes());
    rest[0] = 0;
    rest[1..9].copy_from_slice(&file_id.to_be_bytes());
    rest[9..].copy_from_slice(&offset.to_be_bytes());
    let mut text = [0u8; 32];
    for (digits, byte) in text.chunks_exact_mut(2).zip(xxhash_rust::xxh3::xxh3_128(key).to_be_bytes()) {
        digits.copy_from_slice(&HEX_PAIRS[byte as usize]);
    }
    RecordId(text)
}

/// The two lowercase hex digits of every byte: an id is written a table load per byte (the `hex`
/// crate's encoder, two lookups and a length check per byte, was 1.6-2.3 % of the agent's CPU
/// sending to one destination).
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut pairs = [[0u8; 2]; 256];
    let mut byte = 0;
    while byte < 256 {
        pairs[byte] = [DIGITS[byte >> 4], DIGITS[byte & 15]];
        byte += 1;
    }
    pairs
};

/// Lines are text; bytes that are not UTF-8 are kept as `\xNN` escapes (and counted) rather
/// than replaced, so the original can be recovered.
fn text_of(line: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(line) {
        return s.to_string();
    }
    metrics::counter!("tron_agent_invalid_utf8_lines_total").increment(1);
    let mut out = String::with_capacity(line.len() + 16);
    for chunk in line.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(parser: Parser, time_field: Option<&str>, fmt: &str) -> SourceSettings {
        SourceSettings {
            name: "s".into(),
            tag: "t".into(),
            parser,
            max_line_bytes: 1024,
            time_field: time_field.map(str::to_owned),
            time_format: TimeFormat::parse(fmt).unwrap(),
            multiline: None,
        }
    }

    fn origin() -> Origin<'static> {
        Origin { host: "h1", path: "/var/log/a.log", file_id: 42 }
    }

    /// Parses a line and returns what each destination would write of it, as JSON values: the
    /// archive's line and the Forward record (decoded back from MessagePack).
    fn parse(
        line: &[u8],
        offset: u64,
        src: &SourceSettings,
        fields: &FieldsConfig,
        now_ns: i64,
    ) -> (Record, Value, Value) {
        let origin = origin();
        let added = Added::new(fields, &origin);
        let cx = |form| LineContext { src, added: &added, origin: &origin, now_ns, form };
        // Each form is parsed into a buffer that already holds other lines' bytes, as a read's
        // does; what a record keeps is appended, and a line kept some other way leaves nothing.
        let read_buffer = |form| {
            let mut bytes = b"bytes of earlier lines".to_vec();
            let record = parse_line(line, offset, &cx(form), &mut bytes);
            assert_eq!(&bytes[..22], b"bytes of earlier lines");
            if matches!(record.fields, Fields::Message(_) | Fields::Map(_)) {
                assert_eq!(bytes.len(), 22, "{form:?} {}", String::from_utf8_lossy(line));
            }
            (record, bytes)
        };
        let (record, bytes) = read_buffer(Form::JsonText);
        let mut json = Vec::new();
        record.write_json_line(&bytes, &added, &mut json);
        assert_eq!(json.pop(), Some(b'\n'));
        let archived: Value =
            serde_json::from_slice(&json).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json)));
        // Forward reads the line straight into MessagePack; the text form transcodes on writing:
        // both give the same record, at the same time.
        let mut packed = Vec::new();
        record.write_msgpack(&bytes, &added, &mut packed);
        let (transcoded, transcoded_bytes) = read_buffer(Form::MessagePack);
        assert_eq!(transcoded.time, record.time);
        let mut packed_once = Vec::new();
        transcoded.write_msgpack(&transcoded_bytes, &added, &mut packed_once);
        assert_eq!(packed_once, packed, "{}", String::from_utf8_lossy(line));
        // Read once for both destinations, the line gives each exactly what it gives alone.
        let (both, both_bytes) = read_buffer(Form::Both);
        assert_eq!(both.time, record.time);
        let (mut both_packed, mut both_json) = (Vec::new(), Vec::new());
        both.write_msgpack(&both_bytes, &added, &mut both_packed);
        both.write_json_line(&both_bytes, &added, &mut both_json);
        assert_eq!(both_packed, packed, "{}", String::from_utf8_lossy(line));
        assert_eq!(both_json.strip_suffix(b"\n"), Some(&json[..]), "{}", String::from_utf8_lossy(line));
        let forwarded = forward::json::to_json(&rmpv::decode::read_value(&mut &packed[..]).unwrap());
        (record, archived, forwarded)
    }

    #[test]
    fn json_line_with_rfc3339_time() {
        let (r, archived, forwarded) = parse(
            br#"{"time":"2026-11-22T03:04:05.123456789Z","msg":"x"}"#,
            100,
            &src(Parser::Json, Some("time"), "rfc3339"),
            &FieldsConfig::default(),
            7,
        );
        assert_eq!(r.time, EventTime::new(1795316645, 123456789));
        assert!(matches!(r.fields, Fields::Json(_, 2)));
        let expected = serde_json::json!({"time": "2026-11-22T03:04:05.123456789Z", "msg": "x", "host": "h1",
            "file": "/var/log/a.log", "_id": record_id("h1", 42, 100).as_str()});
        assert_eq!(forwarded, expected);
        let mut with_time = expected.clone();
        with_time["_time"] = "2026-11-22T03:04:05.123456789Z".into();
        assert_eq!(archived, with_time);
    }

    #[test]
    fn added_names_that_need_escaping_are_escaped_in_both_forms() {
        // The added keys are encoded once per file (the id's too): a name with a quote or a
        // backslash must still come out as that name, in the archive's JSON and in Forward's.
        let fields = FieldsConfig { host: "h\"ost".into(), file: "fi\\le".into(), id: "i\"d".into() };
        let (_, archived, forwarded) = parse(br#"{"msg":"x"}"#, 5, &src(Parser::Json, None, "rfc3339"), &fields, 7);
        for record in [&archived, &forwarded] {
            assert_eq!(record["h\"ost"], "h1", "{record}");
            assert_eq!(record["fi\\le"], "/var/log/a.log", "{record}");
            assert_eq!(record["i\"d"], record_id("h1", 42, 5).as_str(), "{record}");
            assert_eq!(record["msg"], "x", "{record}");
        }
    }

    #[test]
    fn the_archive_keeps_a_json_line_as_written_with_the_added_fields_after_it() {
        let origin = origin();
        let fields = FieldsConfig::default();
        let added = Added::new(&fields, &origin);
        let src = src(Parser::Json, None, "rfc3339");
        let cx = LineContext { src: &src, added: &added, origin: &origin, now_ns: 0, form: Form::JsonText };
        let mut bytes = Vec::new();
        let r = parse_line(br#" {"b":1.50, "a":"\u00e9"} "#, 0, &cx, &mut bytes);
        let mut out = Vec::new();
        r.write_json_line(&bytes, &added, &mut out);
        let expected = format!(
            "{{\"_time\":\"1970-01-01T00:00:00.000000000Z\",\"b\":1.50, \"a\":\"\\u00e9\",\"host\":\"h1\",\"file\":\"/var/log/a.log\",\"_id\":\"{}\"}}\n",
            record_id("h1", 42, 0)
        );
        assert_eq!(String::from_utf8(out).unwrap(), expected);
    }

    #[test]
    fn a_line_naming_an_added_field_gets_the_added_value() {
        let (r, archived, forwarded) = parse(
            br#"{"host":"spoofed","msg":"x"}"#,
            0,
            &src(Parser::Json, None, "rfc3339"),
            &FieldsConfig::default(),
            0,
        );
        assert!(matches!(r.fields, Fields::Map(_)));
        assert_eq!((&archived["host"], &forwarded["host"]), (&"h1".into(), &"h1".into()));
        assert_eq!(forwarded.as_object().unwrap().len(), 4);
    }

    #[test]
    fn unparsable_json_is_kept_as_message_with_read_time() {
        for line in [&b"not json"[..], b"[1,2]", b"{\"a\":1} trailing", b"{\"a\":\"\xff\"}"] {
            let (r, archived, forwarded) =
                parse(line, 0, &src(Parser::Json, Some("time"), "rfc3339"), &FieldsConfig::default(), 5_000_000_000);
            assert_eq!(r.time, EventTime::new(5, 0));
            assert_eq!(archived["message"], forwarded["message"]);
            assert_eq!(forwarded.as_object().unwrap().len(), 4, "{forwarded}");
        }
    }

    #[test]
    fn epoch_and_strftime_formats() {
        let ms = TimeFormat::parse("unix_ms").unwrap();
        let number = |n: Value| WatchedValue::Other(n);
        assert_eq!(ms.to_nanos(&number(1500.into())), Some(1_500_000_000));
        assert_eq!(ms.to_nanos(&WatchedValue::Str("1500".into())), Some(1_500_000_000));
        assert_eq!(TimeFormat::parse("unix").unwrap().to_nanos(&number(1.25.into())), Some(1_250_000_000));
        let f = TimeFormat::parse("%d/%b/%Y:%H:%M:%S %z").unwrap();
        assert_eq!(
            f.to_nanos(&WatchedValue::Str("10/Oct/2000:13:55:36 -0700".into())),
            Some(971211336 * 1_000_000_000)
        );
        assert_eq!(f.to_nanos(&number(1500.into())), None);
        assert_eq!(ms.to_nanos(&number(Value::Bool(true))), None);
        assert!(TimeFormat::parse("weird").is_err());
    }

    #[test]
    fn the_time_field_is_found_among_nested_values_and_escaped_keys() {
        let (r, ..) = parse(
            br#"{"n":{"ts":1},"a":[{"ts":2}],"\u0074s":3000}"#,
            0,
            &src(Parser::Json, Some("ts"), "unix_ms"),
            &FieldsConfig::default(),
            0,
        );
        assert_eq!(r.time, EventTime::new(3, 0));
    }

    #[test]
    fn invalid_utf8_is_escaped_not_lost() {
        let (_, archived, forwarded) =
            parse(b"ok \xff\xfe end", 0, &src(Parser::Raw, None, "rfc3339"), &FieldsConfig::default(), 0);
        assert_eq!(archived["message"], "ok \\xff\\xfe end");
        assert_eq!(forwarded["message"], "ok \\xff\\xfe end");
    }

    #[test]
    fn added_fields_can_be_renamed_or_switched_off() {
        let fields = FieldsConfig { host: "".into(), file: "path".into(), id: "".into() };
        let (r, archived, forwarded) = parse(b"x", 0, &src(Parser::Raw, None, "rfc3339"), &fields, 0);
        assert_eq!(forwarded.as_object().unwrap().keys().collect::<Vec<_>>(), ["message", "path"]);
        assert_eq!(archived.as_object().unwrap().keys().collect::<Vec<_>>(), ["_time", "message", "path"]);
        assert_eq!(r.id, None);
    }

    #[test]
    fn archive_times_are_written_as_chrono_writes_them() {
        for ns in [
            0,
            1,
            999_999_999,
            1_795_316_645_123_456_789,
            // Lines of one second in a row: the second's date and time are reused.
            1_795_316_645_000_000_000,
            1_795_316_645_999_999_999,
            1_795_316_646_000_000_000,
            -1_000_000_000,
            -999_999_999,
            -1,
            -86_400_000_000_001,
            253_402_300_799_999_999,
            i64::MAX,
            i64::MIN,
        ] {
            let mut out = Vec::new();
            write_rfc3339_nanos(&mut out, ns);
            let expected =
                chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::Nanos, true);
            assert_eq!(String::from_utf8(out).unwrap(), expected, "{ns}");
        }
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(record_id("h", 1, 2), record_id("h", 1, 2));
        assert_ne!(record_id("h", 1, 2), record_id("h", 1, 3));
        assert_ne!(record_id("h", 1, 2), record_id("g", 1, 2));
        assert_eq!(record_id("h", 1, 2).as_str().len(), 32);
    }

    #[test]
    fn ids_are_the_ones_every_earlier_release_gave_the_same_line() {
        // The sink drops a re-sent line by its id: an agent upgraded mid-file must give the lines
        // it sends again the ids they had. A host name longer than the key kept on the stack too.
        assert_eq!(record_id("h1", 42, 100).as_str(), "97d26857ac85c721cccb9a923b026f80");
        assert_eq!(record_id(&"x".repeat(300), u64::MAX, 7).as_str(), "cd6baf78c1fc412ea2b76da8b2ca704e");
    }
}

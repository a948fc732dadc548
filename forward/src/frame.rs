use crate::error::{malformed, DecodeError, Limits};
use crate::handshake::Ping;
use crate::time::{kind, EventTime};
use rmpv::Value;
use std::io::Read;

/// One decoded top-level value sent by a client.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    /// A bare nil: the client checks the connection is alive. No reply.
    Heartbeat,
    /// Events in any of the four modes.
    Events(EventBatch),
    /// The client's answer to our HELO.
    Ping(Ping),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Message,
    Forward,
    PackedForward,
    CompressedPackedForward,
}

/// The option map that may close a frame.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Options {
    /// Number of entries the client says it sent.
    pub size: Option<u64>,
    /// The client's chunk id, kept as its MessagePack encoding so the ack echoes it exactly.
    pub chunk: Option<Vec<u8>>,
    pub compressed: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Entry {
    pub time: EventTime,
    /// Always a map: the event's fields.
    pub record: Value,
    /// Newer fluent-bit sends `[[EventTime, {metadata}], record]`; the metadata is kept here.
    pub metadata: Option<Value>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub tag: String,
    pub mode: Mode,
    pub entries: Vec<Entry>,
    pub options: Options,
    /// Bytes the frame occupied on the wire.
    pub wire_bytes: usize,
}

impl EventBatch {
    /// The ack to send once every entry is safe, if the client asked for one.
    pub fn ack(&self) -> Option<Vec<u8>> {
        self.options.chunk.as_deref().map(encode_ack)
    }

    /// Sum of the entries' decoded sizes, an estimate of what holding them costs.
    pub fn decoded_bytes(&self) -> usize {
        self.entries.iter().map(|e| approx_size(&e.record) + 16).sum()
    }
}

/// `{"ack": <chunk>}` with the chunk's original MessagePack bytes.
pub fn encode_ack(chunk_msgpack: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(5 + chunk_msgpack.len());
    out.push(0x81);
    out.extend_from_slice(&[0xa3, b'a', b'c', b'k']);
    out.extend_from_slice(chunk_msgpack);
    out
}

/// Decodes one complete top-level value (as delimited by the scanner).
pub(crate) fn parse_frame(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    let value = read_one(bytes)?;
    let items = match value {
        Value::Nil => return Ok(Frame::Heartbeat),
        Value::Array(items) => items,
        other => return Err(malformed(format!("a frame must be an array or nil, got {}", kind(&other)))),
    };
    if items.len() == 6 && items[0].as_str() == Some("PING") {
        return Ping::from_items(items).map(Frame::Ping);
    }
    parse_events(items, bytes.len(), limits).map(Frame::Events)
}

fn parse_events(mut items: Vec<Value>, wire_bytes: usize, limits: &Limits) -> Result<EventBatch, DecodeError> {
    if !(2..=4).contains(&items.len()) {
        return Err(malformed(format!("an event frame has 2 to 4 elements, got {}", items.len())));
    }
    let tag = match &items[0] {
        Value::String(s) => s.as_str().ok_or_else(|| malformed("tag is not valid UTF-8"))?.to_owned(),
        other => return Err(malformed(format!("tag must be a string, got {}", kind(other)))),
    };
    let is_forward = matches!(&items[1], Value::Array(a) if a.first().is_none_or(Value::is_array));
    let is_packed = matches!(&items[1], Value::Binary(_) | Value::String(_));
    if is_forward || is_packed {
        if items.len() > 3 {
            return Err(malformed(format!("Forward/PackedForward frames have 2 or 3 elements, got {}", items.len())));
        }
        let options = match items.get(2) {
            Some(v) => parse_options(v)?,
            None => Options::default(),
        };
        let (mode, entries) = if is_forward {
            let Value::Array(list) = std::mem::replace(&mut items[1], Value::Nil) else { unreachable!() };
            if list.len() > limits.max_entries_per_chunk {
                return Err(DecodeError::TooManyEntries { count: list.len(), limit: limits.max_entries_per_chunk });
            }
            (Mode::Forward, list.into_iter().map(parse_entry).collect::<Result<Vec<_>, _>>()?)
        } else {
            let packed = match std::mem::replace(&mut items[1], Value::Nil) {
                Value::Binary(b) => b,
                Value::String(s) => s.into_bytes(),
                _ => unreachable!(),
            };
            match options.compressed.as_deref() {
                Some("gzip") => (Mode::CompressedPackedForward, parse_packed(&gunzip(&packed, limits)?, limits)?),
                None | Some("text") => (Mode::PackedForward, parse_packed(&packed, limits)?),
                Some(other) => return Err(DecodeError::UnsupportedCompression(other.to_owned())),
            }
        };
        return Ok(EventBatch { tag, mode, entries, options, wire_bytes });
    }
    if items.len() < 3 {
        return Err(malformed("a Message frame is [tag, time, record] or [tag, time, record, options]"));
    }
    let options = match items.get(3) {
        Some(v) => parse_options(v)?,
        None => Options::default(),
    };
    let record = std::mem::replace(&mut items[2], Value::Nil);
    let time = std::mem::replace(&mut items[1], Value::Nil);
    let entry = parse_entry(Value::Array(vec![time, record]))?;
    Ok(EventBatch { tag, mode: Mode::Message, entries: vec![entry], options, wire_bytes })
}

fn parse_entry(v: Value) -> Result<Entry, DecodeError> {
    let Value::Array(mut pair) = v else {
        return Err(malformed(format!("an entry must be [time, record], got {}", kind(&v))));
    };
    if pair.len() != 2 {
        return Err(malformed(format!("an entry must be [time, record], got {} elements", pair.len())));
    }
    let record = pair.pop().expect("2 elements");
    if !record.is_map() {
        return Err(malformed(format!("a record must be a map, got {}", kind(&record))));
    }
    let (time, metadata) = match pair.pop().expect("1 element") {
        Value::Array(mut t) if t.len() == 2 => {
            let metadata = t.pop().expect("2 elements");
            (EventTime::from_value(&t[0])?, Some(metadata))
        }
        t => (EventTime::from_value(&t)?, None),
    };
    Ok(Entry { time, record, metadata })
}

fn parse_packed(mut bytes: &[u8], limits: &Limits) -> Result<Vec<Entry>, DecodeError> {
    let mut entries = Vec::new();
    while !bytes.is_empty() {
        if entries.len() == limits.max_entries_per_chunk {
            return Err(DecodeError::TooManyEntries { count: entries.len() + 1, limit: limits.max_entries_per_chunk });
        }
        let v = rmpv::decode::read_value(&mut bytes)
            .map_err(|e| DecodeError::Msgpack(format!("in packed entries: {e}")))?;
        entries.push(parse_entry(v)?);
    }
    Ok(entries)
}

fn parse_options(v: &Value) -> Result<Options, DecodeError> {
    let Value::Map(pairs) = v else {
        return match v {
            Value::Nil => Ok(Options::default()),
            other => Err(malformed(format!("options must be a map, got {}", kind(other)))),
        };
    };
    let mut options = Options::default();
    for (k, v) in pairs {
        match k.as_str() {
            Some("size") => options.size = v.as_u64(),
            Some("chunk") => {
                let mut raw = Vec::new();
                rmpv::encode::write_value(&mut raw, v).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
                options.chunk = Some(raw);
            }
            Some("compressed") => options.compressed = v.as_str().map(str::to_owned),
            _ => {}
        }
    }
    Ok(options)
}

/// Inflates every gzip member (fluent-bit may concatenate several), refusing to go past the
/// decompressed limit so a gzip bomb costs at most `max_decompressed_bytes`.
fn gunzip(data: &[u8], limits: &Limits) -> Result<Vec<u8>, DecodeError> {
    let limit = limits.max_decompressed_bytes;
    let mut out = Vec::with_capacity((data.len() * 4).min(limit));
    flate2::read::MultiGzDecoder::new(data).take(limit as u64 + 1).read_to_end(&mut out).map_err(DecodeError::Gzip)?;
    if out.len() > limit {
        return Err(DecodeError::DecompressedTooLarge { size: out.len(), limit });
    }
    Ok(out)
}

fn read_one(mut bytes: &[u8]) -> Result<Value, DecodeError> {
    let v = rmpv::decode::read_value(&mut bytes).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
    if !bytes.is_empty() {
        return Err(DecodeError::Msgpack(format!("{} trailing bytes after the frame", bytes.len())));
    }
    Ok(v)
}

fn approx_size(v: &Value) -> usize {
    match v {
        Value::String(s) => s.as_bytes().len() + 8,
        Value::Binary(b) => b.len() + 8,
        Value::Array(a) => a.iter().map(approx_size).sum::<usize>() + 8,
        Value::Map(m) => m.iter().map(|(k, v)| approx_size(k) + approx_size(v)).sum::<usize>() + 8,
        _ => 9,
    }
}

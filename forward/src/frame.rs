use crate::error::{malformed, DecodeError, Limits};
use crate::handshake::Ping;
use crate::origin::{Origin, POSITIONS_OPTION, SOURCE_OPTION};
use crate::transcode::{self, Records};
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
    /// `tron_source` ([`crate::origin`]).
    pub source: Option<String>,
    /// `tron_positions`, as sent: decoded once the record count is known.
    pub positions: Option<Vec<u8>>,
}

/// A frame's events, not decoded yet: the entries as one PackedForward stream (`[time, record]`
/// after `[time, record]`, whatever mode the client used), compressed (gzip or zstd) or not.
/// Decoding ([`EventBatch::decode`]) is left to the caller, so it can bound how many decodes run
/// at once and charge what they produce before handing it on.
#[derive(Debug, Clone, PartialEq)]
pub struct EventBatch {
    pub tag: String,
    pub mode: Mode,
    pub options: Options,
    entries: Vec<u8>,
    /// Entries the frame header announced (Forward and Message modes; packed streams say nothing).
    announced: Option<usize>,
}

impl EventBatch {
    /// The ack to send once every entry is safe, if the client asked for one.
    pub fn ack(&self) -> Option<Vec<u8>> {
        self.options.chunk.as_deref().map(encode_ack)
    }

    /// Inflates (CompressedPackedForward) and transcodes every entry to JSON, within `limits`.
    pub fn decode(&self, limits: &Limits) -> Result<Records, DecodeError> {
        let inflated;
        let packed = if self.mode == Mode::CompressedPackedForward {
            inflated = match self.options.compressed.as_deref() {
                Some("zstd") => crate::zstd::decompress(&self.entries, limits.max_decompressed_bytes)?,
                _ => gunzip(&self.entries, limits)?,
            };
            &inflated[..]
        } else {
            &self.entries[..]
        };
        let mut records = Records::default();
        transcode::packed_entries(packed, limits, &mut records)?;
        if let Some(n) = self.announced.filter(|n| *n != records.records.len()) {
            return Err(malformed(format!("the frame announced {n} entries and holds {}", records.records.len())));
        }
        if let (Some(source), Some(positions)) = (&self.options.source, &self.options.positions) {
            records.origin = Some(Origin::decode(source.clone(), positions, records.records.len())?);
        }
        Ok(records)
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

/// Decodes one complete top-level value (as delimited by the scanner). Event frames are only
/// taken apart (tag, entries, options), never decoded into values here.
pub(crate) fn parse_frame(bytes: &[u8], limits: &Limits) -> Result<Frame, DecodeError> {
    if bytes == [0xc0] {
        return Ok(Frame::Heartbeat);
    }
    let mut at = Cursor { bytes, pos: 0, limits };
    let items = at
        .array_len()
        .ok_or_else(|| malformed(format!("a frame must be an array or nil, got {}", marker_kind(bytes[0]))))?;
    if items == 6 && at.peek_str() == Some(b"PING") {
        if bytes.len() > MAX_SMALL_VALUE {
            return Err(malformed(format!("a PING of {} bytes", bytes.len())));
        }
        let Value::Array(items) = read_one(bytes)? else { unreachable!("an array header was read") };
        return Ping::from_items(items).map(Frame::Ping);
    }
    if !(2..=4).contains(&items) {
        return Err(malformed(format!("an event frame has 2 to 4 elements, got {items}")));
    }
    let tag = match at.str_bytes() {
        Some(Ok(t)) => std::str::from_utf8(t).map_err(|_| malformed("tag is not valid UTF-8"))?.to_owned(),
        Some(Err(e)) => return Err(e),
        None => return Err(malformed(format!("tag must be a string, got {}", marker_kind(bytes[at.pos])))),
    };
    let second = *bytes.get(at.pos).ok_or_else(|| malformed("a frame without entries"))?;
    let (mode, entries, announced) = if let Some(n) = at.array_len() {
        // Forward: an array of entries; its items, back to back, are a packed stream.
        if items > 3 {
            return Err(malformed(format!("Forward/PackedForward frames have 2 or 3 elements, got {items}")));
        }
        if n > limits.max_entries_per_chunk {
            return Err(DecodeError::TooManyEntries { count: n, limit: limits.max_entries_per_chunk });
        }
        let from = at.pos;
        for _ in 0..n {
            at.skip()?;
        }
        (Mode::Forward, bytes[from..at.pos].to_vec(), Some(n))
    } else if is_bytes_marker(second) {
        if items > 3 {
            return Err(malformed(format!("Forward/PackedForward frames have 2 or 3 elements, got {items}")));
        }
        let packed = match at.str_bytes().or_else(|| at.bin_bytes()) {
            Some(Ok(b)) => b.to_vec(),
            Some(Err(e)) => return Err(e),
            None => unreachable!("a str or bin marker"),
        };
        (Mode::PackedForward, packed, None)
    } else {
        // Message: [tag, time, record(, options)]; as a packed stream: one [time, record] entry.
        if items < 3 {
            return Err(malformed("a Message frame is [tag, time, record] or [tag, time, record, options]"));
        }
        let from = at.pos;
        at.skip()?;
        at.skip()?;
        let mut entry = Vec::with_capacity(1 + at.pos - from);
        entry.push(0x92);
        entry.extend_from_slice(&bytes[from..at.pos]);
        (Mode::Message, entry, Some(1))
    };
    let options = if at.pos < bytes.len() { parse_options(&mut at)? } else { Options::default() };
    if at.pos != bytes.len() {
        return Err(DecodeError::Msgpack(format!("{} trailing bytes after the frame", bytes.len() - at.pos)));
    }
    let mode = match (mode, options.compressed.as_deref()) {
        (Mode::PackedForward, Some("gzip" | "zstd")) => Mode::CompressedPackedForward,
        (Mode::PackedForward, None | Some("text")) => Mode::PackedForward,
        (Mode::PackedForward, Some(other)) => return Err(DecodeError::UnsupportedCompression(other.to_owned())),
        (mode, _) => mode,
    };
    Ok(Frame::Events(EventBatch { tag, mode, options, entries, announced }))
}

/// PING frames and options maps are decoded into values; they are never larger than this.
const MAX_SMALL_VALUE: usize = 64 << 10;

/// Reads the headers of a frame whose extent the scanner already checked.
struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    limits: &'a Limits,
}

impl<'a> Cursor<'a> {
    fn be(&self, at: usize, n: usize) -> Option<usize> {
        let b = self.bytes.get(at..at + n)?;
        Some(b.iter().fold(0usize, |acc, x| (acc << 8) | *x as usize))
    }

    /// A map header at the cursor: consumes it and returns the number of pairs.
    fn map_len(&mut self) -> Option<usize> {
        self.container_len(0x80, 0xde)
    }

    /// An array header at the cursor: consumes it and returns the length.
    fn array_len(&mut self) -> Option<usize> {
        self.container_len(0x90, 0xdc)
    }

    /// A map or array header (`fix`: its fix marker with length 0; `m16`: its 16-bit marker, the
    /// 32-bit one follows it): consumes it and returns the length.
    fn container_len(&mut self, fix: u8, m16: u8) -> Option<usize> {
        let m = *self.bytes.get(self.pos)?;
        let (len, header) = match m {
            _ if m & 0xf0 == fix => ((m & 0x0f) as usize, 1),
            _ if m == m16 => (self.be(self.pos + 1, 2)?, 3),
            _ if m == m16 + 1 => (self.be(self.pos + 1, 4)?, 5),
            _ => return None,
        };
        self.pos += header;
        Some(len)
    }

    fn sized(&mut self, header: usize, len: Option<usize>) -> Option<Result<&'a [u8], DecodeError>> {
        let len = len?;
        let from = self.pos + header;
        match self.bytes.get(from..from + len) {
            Some(b) => {
                self.pos = from + len;
                Some(Ok(b))
            }
            None => Some(Err(DecodeError::Msgpack(format!("value cut short at byte {}", self.pos)))),
        }
    }

    fn str_bytes(&mut self) -> Option<Result<&'a [u8], DecodeError>> {
        let m = *self.bytes.get(self.pos)?;
        match m {
            0xa0..=0xbf => self.sized(1, Some((m & 0x1f) as usize)),
            0xd9 => self.sized(2, self.be(self.pos + 1, 1)),
            0xda => self.sized(3, self.be(self.pos + 1, 2)),
            0xdb => self.sized(5, self.be(self.pos + 1, 4)),
            _ => None,
        }
    }

    fn bin_bytes(&mut self) -> Option<Result<&'a [u8], DecodeError>> {
        let m = *self.bytes.get(self.pos)?;
        match m {
            0xc4 => self.sized(2, self.be(self.pos + 1, 1)),
            0xc5 => self.sized(3, self.be(self.pos + 1, 2)),
            0xc6 => self.sized(5, self.be(self.pos + 1, 4)),
            _ => None,
        }
    }

    fn peek_str(&self) -> Option<&'a [u8]> {
        let mut probe = Cursor { bytes: self.bytes, pos: self.pos, limits: self.limits };
        probe.str_bytes()?.ok()
    }

    /// Steps over one whole value.
    fn skip(&mut self) -> Result<(), DecodeError> {
        match crate::scan::value_len(&self.bytes[self.pos..], self.limits)? {
            crate::scan::Scan::Complete(n) => {
                self.pos += n;
                Ok(())
            }
            crate::scan::Scan::Incomplete(_) => {
                Err(DecodeError::Msgpack(format!("value cut short at byte {}", self.pos)))
            }
        }
    }
}

fn is_bytes_marker(m: u8) -> bool {
    matches!(m, 0xa0..=0xbf | 0xd9..=0xdb | 0xc4..=0xc6)
}

fn marker_kind(m: u8) -> &'static str {
    match m {
        0xc0 => "nil",
        0xc2 | 0xc3 => "bool",
        0x00..=0x7f | 0xe0..=0xff | 0xcc..=0xd3 => "integer",
        0xca | 0xcb => "float",
        0xa0..=0xbf | 0xd9..=0xdb => "string",
        0xc4..=0xc6 => "binary",
        0x90..=0x9f | 0xdc | 0xdd => "array",
        0x80..=0x8f | 0xde | 0xdf => "map",
        _ => "ext",
    }
}

/// Walks the options map in place: the values we use are small and decoded one by one (each
/// within [`MAX_SMALL_VALUE`]), `tron_positions` is taken as bytes, anything else is stepped over.
fn parse_options(at: &mut Cursor<'_>) -> Result<Options, DecodeError> {
    let mut options = Options::default();
    let marker = at.bytes[at.pos];
    if marker == 0xc0 {
        at.pos += 1;
        return Ok(options);
    }
    let pairs = at.map_len().ok_or_else(|| malformed(format!("options must be a map, got {}", marker_kind(marker))))?;
    for _ in 0..pairs {
        let key = match at.str_bytes() {
            Some(Ok(k)) => Some(k),
            Some(Err(e)) => return Err(e),
            None => {
                at.skip()?;
                None
            }
        };
        if key == Some(POSITIONS_OPTION.as_bytes()) {
            match at.bin_bytes() {
                Some(Ok(b)) => options.positions = Some(b.to_vec()),
                Some(Err(e)) => return Err(e),
                None => return Err(malformed(format!("{POSITIONS_OPTION} must be binary"))),
            }
            continue;
        }
        let from = at.pos;
        at.skip()?;
        let known = [&b"size"[..], b"chunk", b"compressed", SOURCE_OPTION.as_bytes()];
        let Some(key) = key.filter(|k| known.contains(k)) else { continue };
        if at.pos - from > MAX_SMALL_VALUE {
            return Err(malformed(format!("option {:?} of {} bytes", String::from_utf8_lossy(key), at.pos - from)));
        }
        let v = read_one(&at.bytes[from..at.pos])?;
        match key {
            b"size" => options.size = v.as_u64(),
            b"chunk" => options.chunk = Some(at.bytes[from..at.pos].to_vec()),
            b"compressed" => options.compressed = v.as_str().map(str::to_owned),
            _ => options.source = v.as_str().map(str::to_owned),
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

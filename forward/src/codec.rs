use crate::error::{malformed, DecodeError, Limits};
use crate::frame::{parse_frame, Frame};
use crate::handshake::{Helo, Pong};
use crate::scan::{value_len, Scan};
use crate::time::kind;
use bytes::BytesMut;
use rmpv::Value;
use tokio_util::codec::{Decoder, Encoder};

/// The server side of a connection: decodes client frames; replies (HELO, PONG, acks) are
/// already-encoded bytes.
#[derive(Debug, Default)]
pub struct ServerCodec {
    limits: Limits,
    /// Bytes the buffer must hold before a rescan can find a whole frame.
    need: usize,
    /// Before the shared-key handshake completes only a PING (or a heartbeat) is accepted, judged
    /// from its first bytes: an unauthenticated peer never gets a frame decompressed or decoded.
    awaiting_ping: bool,
}

/// A PING frame starts with these bytes: an array of 6 whose first element is the string "PING".
const PING_PREFIX: &[u8] = b"\x96\xa4PING";
/// A PING carries a hostname, a salt, two hex digests and a user name: never near this size.
const MAX_PING_BYTES: usize = 16 << 10;

impl ServerCodec {
    pub fn new(limits: Limits) -> Self {
        ServerCodec { limits, need: 0, awaiting_ping: false }
    }

    /// A codec for a connection that must authenticate first: until [`ServerCodec::authenticated`]
    /// any frame but a PING or a heartbeat fails with [`DecodeError::BeforeHandshake`] after at
    /// most its first six bytes.
    pub fn awaiting_ping(limits: Limits) -> Self {
        ServerCodec { limits, need: 0, awaiting_ping: true }
    }

    /// Bytes the buffer must hold before the next decode can find a whole frame (0: unknown).
    pub fn need(&self) -> usize {
        self.need
    }

    pub fn authenticated(&mut self) {
        self.awaiting_ping = false;
    }

    fn check_pre_auth(&self, src: &[u8]) -> Result<bool, DecodeError> {
        if src.first() == Some(&0xc0) {
            return Ok(true); // a heartbeat
        }
        let seen = src.len().min(PING_PREFIX.len());
        if src[..seen] != PING_PREFIX[..seen] {
            return Err(DecodeError::BeforeHandshake);
        }
        Ok(seen == PING_PREFIX.len())
    }
}

/// Splits off the next whole top-level value, if it has arrived.
fn next_value(src: &mut BytesMut, need: &mut usize, limits: &Limits) -> Result<Option<BytesMut>, DecodeError> {
    if src.is_empty() || src.len() < *need {
        return Ok(None);
    }
    match value_len(src, limits)? {
        Scan::Incomplete(n) => {
            // No reserve here: the relay's reader charges a buffer's growth to its receive pool
            // before allocating (relay/src/receive.rs).
            *need = n;
            Ok(None)
        }
        Scan::Complete(n) => {
            *need = 0;
            Ok(Some(src.split_to(n)))
        }
    }
}

impl Decoder for ServerCodec {
    type Item = Frame;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Frame>, DecodeError> {
        if self.awaiting_ping {
            if src.is_empty() || !self.check_pre_auth(src)? {
                return Ok(None);
            }
            let limits = Limits { max_frame_bytes: MAX_PING_BYTES.min(self.limits.max_frame_bytes), ..self.limits };
            return match next_value(src, &mut self.need, &limits)? {
                Some(bytes) => parse_frame(&bytes, &limits).map(Some),
                None => Ok(None),
            };
        }
        match next_value(src, &mut self.need, &self.limits)? {
            Some(bytes) => parse_frame(&bytes, &self.limits).map(Some),
            None => Ok(None),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for ServerCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(item.as_ref());
        Ok(())
    }
}

/// What a server sends to a client.
#[derive(Debug, Clone, PartialEq)]
pub enum ServerMessage {
    Helo(Helo),
    Pong(Pong),
    /// The chunk id, as its MessagePack encoding.
    Ack(Vec<u8>),
}

/// The client side of a connection: decodes server replies; frames to send are pre-encoded
/// (see [`crate::ChunkBuilder`] and [`crate::handshake::Ping::encode`]).
#[derive(Debug, Default)]
pub struct ClientCodec {
    limits: Limits,
    need: usize,
}

impl ClientCodec {
    pub fn new() -> Self {
        // Server replies are tiny; a megabyte is generous and bounds a misbehaving server.
        ClientCodec { limits: Limits { max_frame_bytes: 1 << 20, ..Limits::default() }, need: 0 }
    }
}

impl Decoder for ClientCodec {
    type Item = ServerMessage;
    type Error = DecodeError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<ServerMessage>, DecodeError> {
        let Some(bytes) = next_value(src, &mut self.need, &self.limits)? else {
            return Ok(None);
        };
        let value = rmpv::decode::read_value(&mut &bytes[..]).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
        match &value {
            Value::Array(items) if items.first().and_then(Value::as_str) == Some("HELO") => {
                Helo::from_value(value).map(ServerMessage::Helo).map(Some)
            }
            Value::Array(items) if items.first().and_then(Value::as_str) == Some("PONG") => {
                Pong::from_value(value).map(ServerMessage::Pong).map(Some)
            }
            Value::Map(pairs) => {
                let ack = pairs
                    .iter()
                    .find(|(k, _)| k.as_str() == Some("ack"))
                    .ok_or_else(|| malformed("a reply map without \"ack\""))?;
                let mut raw = Vec::new();
                rmpv::encode::write_value(&mut raw, &ack.1).map_err(|e| DecodeError::Msgpack(e.to_string()))?;
                Ok(Some(ServerMessage::Ack(raw)))
            }
            other => Err(malformed(format!("unexpected reply from server: {}", kind(other)))),
        }
    }
}

impl<T: AsRef<[u8]>> Encoder<T> for ClientCodec {
    type Error = std::io::Error;
    fn encode(&mut self, item: T, dst: &mut BytesMut) -> Result<(), std::io::Error> {
        dst.extend_from_slice(item.as_ref());
        Ok(())
    }
}

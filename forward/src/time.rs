use crate::error::{malformed, DecodeError};
use rmpv::Value;

/// Forward protocol time: seconds and nanoseconds since the Unix epoch (ext type 0 on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct EventTime {
    pub seconds: u32,
    pub nanoseconds: u32,
}

pub(crate) const EVENT_TIME_EXT: i8 = 0;

impl EventTime {
    pub fn new(seconds: u32, nanoseconds: u32) -> Self {
        EventTime { seconds, nanoseconds }
    }

    /// Clamps to the range EventTime can carry (1970 to 2106).
    pub fn from_unix_nanos(nanos: i64) -> Self {
        let nanos = nanos.max(0) as u64;
        let seconds = (nanos / 1_000_000_000).min(u32::MAX as u64) as u32;
        EventTime { seconds, nanoseconds: (nanos % 1_000_000_000) as u32 }
    }

    pub fn unix_nanos(&self) -> i64 {
        self.seconds as i64 * 1_000_000_000 + self.nanoseconds as i64
    }

    pub fn unix_millis(&self) -> i64 {
        self.seconds as i64 * 1000 + (self.nanoseconds / 1_000_000) as i64
    }

    /// The 8 payload bytes of the ext 0 encoding: u32 BE seconds, u32 BE nanoseconds.
    pub fn to_ext_payload(&self) -> [u8; 8] {
        let mut out = [0u8; 8];
        out[..4].copy_from_slice(&self.seconds.to_be_bytes());
        out[4..].copy_from_slice(&self.nanoseconds.to_be_bytes());
        out
    }

    /// An ext value as EventTime (type 0, 8 bytes: seconds and nanoseconds, big-endian).
    pub(crate) fn from_ext(ext_type: i8, data: &[u8]) -> Result<Self, DecodeError> {
        match (ext_type, <[u8; 8]>::try_from(data)) {
            (EVENT_TIME_EXT, Ok(b)) => Ok(EventTime::new(
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]),
                u32::from_be_bytes([b[4], b[5], b[6], b[7]]),
            )),
            _ => Err(malformed(format!(
                "time is ext type {ext_type} with {} bytes; EventTime is ext type 0 with 8 bytes",
                data.len()
            ))),
        }
    }

    /// Seconds as a float, as some loggers send them.
    pub(crate) fn from_float(f: f64) -> Self {
        if !f.is_finite() || f <= 0.0 {
            return EventTime::default();
        }
        EventTime::from_unix_nanos((f * 1e9) as i64)
    }
}

pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Nil => "nil",
        Value::Boolean(_) => "boolean",
        Value::Integer(_) => "integer",
        Value::F32(_) | Value::F64(_) => "float",
        Value::String(_) => "string",
        Value::Binary(_) => "binary",
        Value::Array(_) => "array",
        Value::Map(_) => "map",
        Value::Ext(..) => "ext",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nanos_round_trip() {
        let t = EventTime::from_unix_nanos(1_700_000_000_123_456_789);
        assert_eq!(t, EventTime::new(1_700_000_000, 123_456_789));
        assert_eq!(t.unix_nanos(), 1_700_000_000_123_456_789);
        assert_eq!(t.unix_millis(), 1_700_000_000_123);
    }
}

//! Names of the Kafka headers the relay writes and the sink reads: one place, so the two
//! daemons cannot drift apart.

/// The Forward tag of the chunk the record came in.
pub const TAG: &str = "tag";
/// The record's event time, nanoseconds since the epoch, as decimal text.
pub const EVENT_TIME_NS: &str = "event_time_ns";
/// Where the record came from (`{host}/{file identity}`), when the client said (tron-agent does).
pub const SOURCE: &str = "tron_source";
/// The record's byte range in its source, `{start}-{end}`, with [`SOURCE`].
pub const RANGE: &str = "tron_range";
/// Marks a relay's watermark message: its value is `{"tron_watermarks": {host: [watermark_ms,
/// reported_ms]}}`, one per partition of a topic, and it is not a record.
pub const WATERMARKS: &str = "tron_watermarks";

//! Fluentd Forward protocol v1, as a codec over bytes.
//!
//! Nothing here touches sockets, clocks or Kafka: the server side ([`ServerCodec`]) turns bytes
//! into [`Frame`]s and replies into bytes, the client side ([`ClientCodec`]) does the reverse,
//! and [`ChunkBuilder`] packs entries into a CompressedPackedForward chunk. That keeps every mode
//! of the protocol testable with byte vectors and fuzzable.

mod chunk;
mod codec;
mod error;
mod frame;
pub mod gzip;
pub mod handshake;
pub mod igzip;
pub mod json;
pub mod msgpack;
pub mod origin;
mod pool;
mod scan;
mod time;
pub mod transcode;
pub mod zstd;

pub use chunk::ChunkBuilder;
pub use codec::{ClientCodec, ServerCodec, ServerMessage};
pub use error::{DecodeError, Limits};
pub use frame::{encode_ack, EventBatch, Frame, Mode, Options};
pub use origin::Origin;
pub use time::EventTime;
pub use transcode::{Record, Records};

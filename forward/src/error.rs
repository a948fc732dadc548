use thiserror::Error;

/// Bounds on what one peer may make us hold in memory. Every limit is checked before the bytes
/// it guards are allocated, so a hostile frame costs at most the limit, never more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest encoded frame (one top-level MessagePack value) accepted.
    pub max_frame_bytes: usize,
    /// Largest size a compressed chunk may inflate to.
    pub max_decompressed_bytes: usize,
    /// Most entries one frame may carry.
    pub max_entries_per_chunk: usize,
    /// Most MessagePack elements (values, keys, items) one chunk may hold: what decoding costs
    /// grows with it, not with the bytes (a byte each for millions of tiny map pairs).
    pub max_elements_per_chunk: usize,
    /// Largest JSON one chunk's records may make.
    pub max_decoded_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_frame_bytes: 16 * 1024 * 1024,
            max_decompressed_bytes: 64 * 1024 * 1024,
            max_entries_per_chunk: 1_000_000,
            max_elements_per_chunk: 4_000_000,
            max_decoded_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, Error)]
pub enum DecodeError {
    #[error("frame of at least {size} bytes exceeds max_frame_bytes={limit} by {}", size - limit)]
    FrameTooLarge { size: usize, limit: usize },
    #[error("chunk inflates to more than max_decompressed_bytes={limit} (read {size} bytes before stopping)")]
    DecompressedTooLarge { size: usize, limit: usize },
    #[error("chunk carries {count} entries, more than max_entries_per_chunk={limit} by {}", count - limit)]
    TooManyEntries { count: usize, limit: usize },
    #[error("chunk holds more than max_elements_per_chunk={limit} MessagePack elements (values, keys and items)")]
    TooManyElements { limit: usize },
    #[error("chunk's records make more than max_decoded_bytes={limit} bytes of JSON")]
    DecodedTooLarge { limit: usize },
    #[error("invalid MessagePack: {0}")]
    Msgpack(String),
    #[error("malformed frame: {0}")]
    Malformed(String),
    #[error("unsupported compression {0:?} (\"gzip\" and \"zstd\" are read)")]
    UnsupportedCompression(String),
    #[error("gzip: {0}")]
    Gzip(std::io::Error),
    #[error("zstd: {0}")]
    Zstd(&'static str),
    #[error("an event frame (or anything but PING) before the shared-key handshake completed")]
    BeforeHandshake,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl DecodeError {
    /// A short, stable name for metrics labels.
    pub fn reason(&self) -> &'static str {
        match self {
            DecodeError::FrameTooLarge { .. } => "frame_too_large",
            DecodeError::DecompressedTooLarge { .. } => "decompressed_too_large",
            DecodeError::TooManyEntries { .. } => "too_many_entries",
            DecodeError::TooManyElements { .. } => "too_many_elements",
            DecodeError::DecodedTooLarge { .. } => "decoded_too_large",
            DecodeError::Msgpack(_) => "invalid_msgpack",
            DecodeError::Malformed(_) => "malformed_frame",
            DecodeError::UnsupportedCompression(_) => "unsupported_compression",
            DecodeError::Gzip(_) => "invalid_gzip",
            DecodeError::Zstd(_) => "invalid_zstd",
            DecodeError::BeforeHandshake => "before_handshake",
            DecodeError::Io(_) => "io",
        }
    }
}

pub(crate) fn malformed(what: impl Into<String>) -> DecodeError {
    DecodeError::Malformed(what.into())
}

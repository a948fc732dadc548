//! Where records go: the `Destination` trait the shipping loop drives, what a batch covers, and
//! the retry loop that sends a sealed batch until it is delivered.

use crate::config::BatchConfig;
use crate::parse::{Added, Form, Record};
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tron_service::backoff::Backoff;
use tron_service::Health;

/// What a gzip encoder holds from its first byte: deflate window, hash chains and LZ buffer,
/// 412,820 bytes at every level with flate2 1.1 on zlib-rs (the unit test below counts them),
/// and the input it gathers before compressing (`forward::gzip::GATHER`).
pub const GZIP_ENCODER_BYTES: usize = (404 << 10) + forward::gzip::GATHER;

/// What a batch covers; destinations name objects and chunks from it.
#[derive(Debug, Clone)]
pub struct BatchMeta {
    pub file_id: u64,
    pub path: String,
    pub tag: String,
    pub first_offset: u64,
    pub end_offset: u64,
    /// Hours since the epoch of the batch's records (when the destination splits by hour).
    pub hour: i64,
    pub records: u64,
    pub raw_bytes: usize,
    /// Earliest event time (ns) among the records; i64::MAX while there are none.
    pub min_time_ns: i64,
}

impl BatchMeta {
    /// A batch of no records yet, from `offset` of a file.
    pub fn starting_at(file_id: u64, path: &str, tag: &str, offset: u64, hour: i64) -> Self {
        BatchMeta {
            file_id,
            path: path.to_string(),
            tag: tag.to_string(),
            first_offset: offset,
            end_offset: offset,
            hour,
            records: 0,
            raw_bytes: 0,
            min_time_ns: i64::MAX,
        }
    }

    /// Counts a record of event hour `hour` and time `time_ns`, read from `bytes` of the file.
    pub fn add_record(&mut self, hour: i64, time_ns: i64, bytes: usize) {
        if self.records == 0 {
            self.hour = hour;
        }
        self.records += 1;
        self.raw_bytes += bytes;
        self.min_time_ns = self.min_time_ns.min(time_ns);
    }
}

/// Why a batch was not delivered this time (it is sent again); `reason()` labels
/// `tron_agent_send_retries_total`.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SendError {
    /// No connection: refused, timed out, TLS or the shared-key handshake failed.
    #[error("{0}")]
    Unreachable(String),
    /// The connection broke, or the peer answered nonsense, before the ack.
    #[error("{0}")]
    ConnectionLost(String),
    #[error("no ack within {0:?}")]
    AckTimeout(Duration),
    /// The object store (S3, or the local directory) refused or failed the write.
    #[error("{0}")]
    Store(String),
}

impl SendError {
    /// Every `reason()`, to export each at 0 from the start (a rate over a counter that does not
    /// exist yet is no data, not 0, on a dashboard).
    pub const REASONS: &'static [&'static str] = &["unreachable", "connection_lost", "ack_timeout", "store"];

    pub fn reason(&self) -> &'static str {
        match self {
            SendError::Unreachable(_) => "unreachable",
            SendError::ConnectionLost(_) => "connection_lost",
            SendError::AckTimeout(_) => "ack_timeout",
            SendError::Store(_) => "store",
        }
    }
}

/// A place records are shipped to.
pub trait Destination: Send + Sync + 'static {
    type Builder: Send + 'static;
    type Sealed: Send + Sync + 'static;

    fn name(&self) -> &'static str;
    fn batch_config(&self) -> &BatchConfig;
    /// Whether a batch must hold records of a single event hour.
    fn split_by_hour(&self) -> bool;
    /// The form this destination writes records in: lines are parsed straight into it.
    fn record_form(&self) -> Form;
    fn builder(&self) -> Self::Builder;
    /// Memory an open batch holds before its first record. Both destinations compress records as
    /// they arrive; with thousands of files that state, not the records, would fill memory, so
    /// it is charged to `max_buffer_bytes`.
    fn open_batch_bytes(&self) -> usize {
        GZIP_ENCODER_BYTES
    }
    /// `position`: where the record's range in the file starts. Ranges tile the file: a record
    /// covers the empty lines before it, a batch's last record ends at the batch's end offset.
    /// `added`: the fields the agent adds to the records of this batch's file.
    /// `bytes`: the buffer of the read the record came from, where its bytes lie.
    fn push(&self, builder: &mut Self::Builder, record: &Record, bytes: &[u8], added: &Added, position: u64);
    fn seal(&self, builder: Self::Builder, meta: &BatchMeta) -> Self::Sealed;
    /// Delivers one sealed batch. Called again with the same batch until it succeeds, so it must
    /// be idempotent where the destination allows (same object key, same chunk id).
    fn send(
        self: Arc<Self>,
        sealed: Arc<Self::Sealed>,
        meta: Arc<BatchMeta>,
    ) -> impl Future<Output = Result<(), SendError>> + Send;
    /// A delivered batch nobody else holds, for the destination to reuse its memory.
    fn recycle(&self, _sealed: Self::Sealed) {}
    /// How often this destination wants the agent's low watermark, if at all.
    fn watermark_interval(&self) -> Option<Duration> {
        None
    }
    /// Reports "every line with an event time before `watermark_ms` is delivered", and with
    /// `drained`, "I am stopping with every line read and delivered" (the last report before a
    /// clean stop). Resolves once the report is acknowledged or given up.
    fn send_watermark(self: Arc<Self>, _watermark_ms: i64, _drained: bool) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Sends `sealed` until it is delivered, backing off (with jitter) between attempts, reporting
/// the destination down while it fails and up again once it succeeds. Returns false, without
/// delivering, when nobody waits for the outcome any more (`done` closed: the shipper is gone).
pub async fn send_until_delivered<D: Destination, T>(
    dest: &Arc<D>,
    sealed: Arc<D::Sealed>,
    meta: Arc<BatchMeta>,
    health: &Health,
    done: &tokio::sync::mpsc::UnboundedSender<T>,
) -> bool {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(30));
    let mut failures = 0u32;
    loop {
        match dest.clone().send(sealed.clone(), meta.clone()).await {
            Ok(()) => {
                metrics::counter!("tron_agent_records_sent_total", "destination" => dest.name())
                    .increment(meta.records);
                metrics::counter!("tron_agent_batches_sent_total", "destination" => dest.name()).increment(1);
                if failures > 0 {
                    health.up(dest.name());
                }
                if let Ok(sealed) = Arc::try_unwrap(sealed) {
                    dest.recycle(sealed);
                }
                return true;
            }
            Err(e) => {
                failures += 1;
                metrics::counter!("tron_agent_send_retries_total", "destination" => dest.name(), "reason" => e.reason())
                    .increment(1);
                if failures == 1 || failures.is_power_of_two() {
                    tracing::warn!(destination = dest.name(), path = %meta.path, first_offset = meta.first_offset, attempt = failures, error = %e, "send failed; will retry");
                }
                health.down(dest.name(), e.to_string());
                if done.is_closed() {
                    return false;
                }
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::GZIP_ENCODER_BYTES;
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::cell::Cell;
    use std::io::Write;

    /// Counts the bytes this thread holds, so the test sees only its own encoder's.
    struct Counting;
    thread_local! {
        static HELD: Cell<isize> = const { Cell::new(0) };
    }
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let _ = HELD.try_with(|h| h.set(h.get() + layout.size() as isize));
            System.alloc(layout)
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            let _ = HELD.try_with(|h| h.set(h.get() - layout.size() as isize));
            System.dealloc(ptr, layout)
        }
    }
    #[global_allocator]
    static COUNTING: Counting = Counting;

    #[test]
    fn the_charge_for_an_open_batch_covers_what_its_encoder_holds() {
        for level in 0..=9 {
            let before = HELD.with(Cell::get);
            // What forward::gzip::GzipVec holds when its pool has no state at this level: a
            // deflate state and the bytes it gathers (not GzipVec itself, whose state may come
            // from the pool another test filled).
            let mut gz = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::new(level));
            gz.write_all(b"{}").unwrap();
            let gathered = Vec::<u8>::with_capacity(forward::gzip::GATHER);
            let held = (HELD.with(Cell::get) - before) as usize;
            assert!(held <= GZIP_ENCODER_BYTES, "level {level}: {held} bytes over the {GZIP_ENCODER_BYTES} charged");
            // Not a wild over-charge either: it decides how many files fit in max_buffer_bytes.
            assert!(held > GZIP_ENCODER_BYTES / 2, "level {level}: {held} bytes, the charge is {GZIP_ENCODER_BYTES}");
            drop((gz, gathered));
        }
    }
}

//! The loop that drives one destination: reads every tracked file from this destination's own
//! position, cuts batches, sends them (retrying until they succeed), and moves the checkpoint
//! only over batches that succeeded, in file order.
//!
//! Memory is bounded by `max_buffer_bytes` (records in open, in-flight and retrying batches, plus
//! each open batch's compressor): when it is reached the loop stops reading, and the file on disk
//! is the buffer. Open batches alone filling it (thousands of files) are sent early, oldest first.

use crate::checkpoint::Checkpointer;
use crate::config::{BatchConfig, FieldsConfig};
use crate::discover::{Registry, TrackedFile};
use crate::multiline::{self, Held, Span};
use crate::parse::{parse_line, Added, Origin, Record};
use crate::reader::read_lines;
use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tron_service::systemd::Heartbeat;
use tron_service::{Health, Shutdown};

const HOUR_NS: i64 = 3_600_000_000_000;

/// What a gzip encoder holds from its first byte: deflate window, hash chains and LZ buffer,
/// 412,820 bytes at every level with flate2 1.1 on zlib-rs (the unit test below counts them).
pub const GZIP_ENCODER_BYTES: usize = 404 << 10;

/// What a batch covers; destinations name objects and chunks from it.
#[derive(Debug, Clone)]
pub struct BatchMeta {
    pub fingerprint: u64,
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

/// A place records are shipped to.
pub trait Destination: Send + Sync + 'static {
    type Builder: Send + 'static;
    type Sealed: Send + Sync + 'static;

    fn name(&self) -> &'static str;
    fn batch_config(&self) -> &BatchConfig;
    /// Whether a batch must hold records of a single event hour.
    fn split_by_hour(&self) -> bool;
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
    fn push(&self, builder: &mut Self::Builder, record: &Record, added: &Added, position: u64);
    fn seal(&self, builder: Self::Builder, meta: &BatchMeta) -> Self::Sealed;
    /// Delivers one sealed batch. Called again with the same batch until it succeeds, so it must
    /// be idempotent where the destination allows (same object key, same chunk id).
    fn send(
        self: Arc<Self>,
        sealed: Arc<Self::Sealed>,
        meta: Arc<BatchMeta>,
    ) -> impl Future<Output = Result<(), String>> + Send;
    /// How often this destination wants the agent's low watermark, if at all.
    fn watermark_interval(&self) -> Option<Duration> {
        None
    }
    /// Reports "every line with an event time before `watermark_ms` is delivered".
    fn send_watermark(self: Arc<Self>, _watermark_ms: i64) -> impl Future<Output = ()> + Send {
        async {}
    }
}

struct OpenBatch<B> {
    builder: B,
    meta: BatchMeta,
    started: Instant,
}

struct Cursor<B> {
    file: Arc<TrackedFile>,
    /// Next byte to read.
    read: u64,
    /// Delivered up to here.
    acked: u64,
    /// Sealed batches by first offset.
    sealed: BTreeMap<u64, SealedRange>,
    open: Option<OpenBatch<B>>,
    /// A multiline record read but held back until it is known to be complete.
    held: Option<Held>,
}

struct SealedRange {
    end: u64,
    delivered: bool,
    /// Earliest event time (ns) of its records, for the low watermark.
    min_time_ns: i64,
}

struct Done {
    fingerprint: u64,
    first_offset: u64,
    cost: usize,
}

pub struct Shipper<D: Destination> {
    dest: Arc<D>,
    index: usize,
    registry: Arc<Registry>,
    checkpoints: Checkpointer,
    fields: FieldsConfig,
    host: String,
    health: Health,
    cursors: HashMap<u64, Cursor<D::Builder>>,
    buffered: usize,
    inflight: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    buf: Vec<u8>,
    checkpoint_interval: Duration,
}

impl<D: Destination> Shipper<D> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        dest: Arc<D>,
        index: usize,
        registry: Arc<Registry>,
        checkpoints: Checkpointer,
        fields: FieldsConfig,
        host: String,
        health: Health,
        checkpoint_interval: Duration,
    ) -> Self {
        let (done_tx, done_rx) = mpsc::unbounded_channel();
        Shipper {
            dest,
            index,
            registry,
            checkpoints,
            fields,
            host,
            health,
            cursors: HashMap::new(),
            buffered: 0,
            inflight: 0,
            done_tx,
            done_rx,
            buf: Vec::new(),
            checkpoint_interval,
        }
    }

    pub async fn run(mut self, shutdown: Shutdown, drain_timeout: Duration, beat: Heartbeat) {
        let mut wake = self.registry.subscribe();
        let mut tick = tokio::time::interval(Duration::from_millis(200));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_save = Instant::now();
        let mut last_watermark = Instant::now();
        let stop = shutdown.token();
        while !stop.is_cancelled() {
            beat.beat();
            self.collect_done();
            self.sync_files();
            tokio::task::block_in_place(|| self.read_all());
            if last_save.elapsed() >= self.checkpoint_interval {
                self.save_checkpoint();
                last_save = Instant::now();
            }
            if self.dest.watermark_interval().is_some_and(|every| last_watermark.elapsed() >= every) {
                last_watermark = Instant::now();
                if let Some(watermark_ms) = tokio::task::block_in_place(|| self.low_watermark_ms()) {
                    metrics::gauge!("tron_agent_low_watermark_seconds", "destination" => self.dest.name())
                        .set(watermark_ms as f64 / 1000.0);
                    tokio::spawn(self.dest.clone().send_watermark(watermark_ms));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {},
                _ = wake.changed() => {},
                Some(done) = self.done_rx.recv() => self.complete(done),
                _ = tick.tick() => {},
            }
        }
        self.drain(drain_timeout).await;
    }

    /// On shutdown: send what is open, wait for outstanding batches, save the checkpoint.
    async fn drain(&mut self, timeout: Duration) {
        let fps: Vec<u64> = self.cursors.keys().copied().collect();
        for fp in fps {
            self.seal(fp);
        }
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inflight > 0 {
            match tokio::time::timeout_at(deadline, self.done_rx.recv()).await {
                Ok(Some(done)) => self.complete(done),
                _ => break,
            }
        }
        self.advance_all();
        if self.inflight > 0 {
            tracing::warn!(
                destination = self.dest.name(),
                batches = self.inflight,
                "drain time-out: unsent batches will be re-read after restart"
            );
        }
        self.save_checkpoint();
        tracing::info!(destination = self.dest.name(), "drained");
    }

    fn collect_done(&mut self) {
        while let Ok(done) = self.done_rx.try_recv() {
            self.complete(done);
        }
        self.advance_all();
    }

    fn complete(&mut self, done: Done) {
        self.inflight -= 1;
        self.buffered -= done.cost;
        if let Some(c) = self.cursors.get_mut(&done.fingerprint) {
            if let Some(entry) = c.sealed.get_mut(&done.first_offset) {
                entry.delivered = true;
            }
        }
    }

    fn advance_all(&mut self) {
        for (fp, c) in self.cursors.iter_mut() {
            let before = c.acked;
            while let Some(entry) = c.sealed.first_entry() {
                if !entry.get().delivered {
                    break;
                }
                c.acked = entry.get().end;
                entry.remove();
            }
            if c.acked != before || self.checkpoints.get(*fp).is_none() {
                c.file.acked[self.index].store(c.acked, Ordering::SeqCst);
                self.checkpoints.set(*fp, c.acked, &c.file.path());
            }
        }
        let lag: u64 = self.cursors.values().map(|c| c.file.size().saturating_sub(c.acked)).sum();
        metrics::gauge!("tron_agent_destination_lag_bytes", "destination" => self.dest.name()).set(lag as f64);
    }

    /// Adds cursors for new files and forgets files the registry closed.
    fn sync_files(&mut self) {
        for tf in self.registry.snapshot() {
            if self.cursors.contains_key(&tf.fingerprint) {
                continue;
            }
            let size = tf.size();
            let start = match self.checkpoints.get(tf.fingerprint) {
                // A checkpoint past the end means the file was truncated while we were down.
                Some(offset) if offset <= size => offset,
                Some(_) => 0,
                None => tf.start_offset,
            };
            tf.acked[self.index].store(start, Ordering::SeqCst);
            self.checkpoints.set(tf.fingerprint, start, &tf.path());
            self.cursors.insert(
                tf.fingerprint,
                Cursor { file: tf, read: start, acked: start, sealed: BTreeMap::new(), open: None, held: None },
            );
        }
        let registry = &self.registry;
        let checkpoints = &mut self.checkpoints;
        self.cursors.retain(|fp, c| {
            let keep = registry.contains(*fp) || !c.sealed.is_empty() || c.open.is_some();
            if !keep {
                checkpoints.remove(*fp);
            }
            keep
        });
    }

    fn read_all(&mut self) {
        let cfg = self.dest.batch_config().clone();
        let fps: Vec<u64> = self.cursors.keys().copied().collect();
        for fp in fps {
            loop {
                self.relieve_pressure(&cfg);
                if self.buffered >= cfg.max_buffer_bytes || self.inflight >= cfg.max_inflight {
                    break;
                }
                if self.read_some(fp, &cfg) == 0 {
                    break;
                }
            }
            let due = match &self.cursors[&fp].open {
                Some(open) => open.started.elapsed() >= cfg.max_age,
                None => false,
            };
            if due {
                self.seal(fp);
            }
        }
    }

    /// When open batches fill the buffer, nothing more could be read until one reaches its age;
    /// send the oldest instead, so memory stays within the budget and files keep moving.
    fn relieve_pressure(&mut self, cfg: &BatchConfig) {
        while self.buffered >= cfg.max_buffer_bytes && self.inflight < cfg.max_inflight {
            let oldest = self.cursors.iter().filter_map(|(fp, c)| c.open.as_ref().map(|o| (o.started, *fp))).min();
            let Some((_, fp)) = oldest else { break };
            self.seal(fp);
            metrics::counter!("tron_agent_batches_sealed_early_total", "destination" => self.dest.name()).increment(1);
        }
    }

    /// Reads up to one batch worth of lines from a file; returns bytes consumed.
    fn read_some(&mut self, fp: u64, cfg: &BatchConfig) -> usize {
        let cursor = self.cursors.get_mut(&fp).expect("cursor exists");
        let file = cursor.file.clone();
        if file.gone.load(Ordering::SeqCst) {
            return 0;
        }
        let open_bytes = cursor.open.as_ref().map_or(0, |o| o.meta.raw_bytes);
        let budget = cfg.max_bytes.saturating_sub(open_bytes).max(1);
        let path = file.path();
        // Owned copies: the loop below seals batches, which needs `self` mutably.
        let (host, fields) = (self.host.clone(), self.fields.clone());
        let origin = Origin { host: &host, path: &path, fingerprint: fp };
        let added = Added::new(&fields, &origin);
        let now_ns = tron_service::clock::now_ns();
        // (record, end offset, line length); None for an empty line, which only moves the offset.
        let mut lines: Vec<(Option<Record>, u64, usize)> = Vec::new();
        let mut raw: Vec<Span> = Vec::new();
        let read_from = cursor.read;
        let src = file.source.clone();
        let handle = file.handle();
        // Most files have nothing new on most passes: one fstat instead of reading their head.
        if handle.metadata().is_ok_and(|m| m.len() <= read_from) {
            return 0;
        }
        if !self.registry.is_intact(&file, &handle) {
            return 0; // replaced under us (copytruncate); the next scan sorts out what it is now
        }
        let outcome = read_lines(
            &handle,
            cursor.read,
            budget,
            src.max_line_bytes,
            file.finished.load(Ordering::SeqCst),
            &mut self.buf,
            |offset, line, end| {
                if src.multiline.is_some() {
                    raw.push(Span { offset, text: line.to_vec(), end });
                } else if !line.is_empty() {
                    lines.push((Some(parse_line(line, offset, &src, &added, &origin, now_ns)), end, line.len()));
                } else {
                    lines.push((None, end, 0));
                }
            },
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(path = %path, error = %e, "read failed");
                return 0;
            }
        };
        if !self.registry.is_intact(&file, &handle) {
            return 0; // truncated while we read: what we read may be new content; drop it
        }
        if outcome.splits > 0 {
            metrics::counter!("tron_agent_lines_split_total", "source" => src.name.clone()).increment(outcome.splits);
        }
        if outcome.bytes_read == 0 {
            return 0;
        }
        let mut consumed_end = outcome.next_offset;
        if let Some((start, flush)) = &src.multiline {
            let (mut records, open) = multiline::group(raw, start, src.max_line_bytes);
            if let Some(open) = open {
                let cursor = self.cursors.get_mut(&fp).expect("cursor exists");
                let held = match cursor.held {
                    Some(h) if h.offset == open.offset && h.end == open.end => h,
                    _ => Held { offset: open.offset, end: open.end, since: Instant::now() },
                };
                // Complete when nothing more can follow, when it alone fills the read window, or
                // when the file has not grown for the flush time-out.
                let window_full = records.is_empty() && outcome.bytes_read >= budget;
                if file.finished.load(Ordering::SeqCst) || window_full || held.since.elapsed() >= *flush {
                    cursor.held = None;
                    records.push(open);
                } else {
                    cursor.held = Some(held);
                    consumed_end = open.offset;
                }
            }
            for r in records {
                let record = parse_line(&r.text, r.offset, &src, &added, &origin, now_ns);
                lines.push((Some(record), r.end, r.text.len()));
            }
            if consumed_end == read_from {
                return 0;
            }
        }
        metrics::counter!("tron_agent_lines_read_total", "destination" => self.dest.name())
            .increment(lines.len() as u64);
        metrics::counter!("tron_agent_bytes_read_total", "destination" => self.dest.name())
            .increment(outcome.bytes_read as u64);
        let split_hours = self.dest.split_by_hour();
        for (record, end, len) in lines {
            let hour = record.as_ref().map_or(0, |r| r.time.unix_nanos().div_euclid(HOUR_NS));
            let cursor = self.cursors.get_mut(&fp).expect("cursor exists");
            let needs_new = match &cursor.open {
                Some(open) => split_hours && record.is_some() && open.meta.records > 0 && open.meta.hour != hour,
                None => false,
            };
            if needs_new {
                self.seal(fp);
            }
            let cursor = self.cursors.get_mut(&fp).expect("cursor exists");
            let start = cursor.read;
            if cursor.open.is_none() {
                self.buffered += self.dest.open_batch_bytes();
                cursor.open = Some(OpenBatch {
                    builder: self.dest.builder(),
                    meta: BatchMeta {
                        fingerprint: fp,
                        path: path.clone(),
                        tag: src.tag.clone(),
                        first_offset: start,
                        end_offset: start,
                        hour,
                        records: 0,
                        raw_bytes: 0,
                        min_time_ns: i64::MAX,
                    },
                    started: Instant::now(),
                });
            }
            let open = cursor.open.as_mut().expect("opened above");
            if let Some(record) = record {
                if open.meta.records == 0 {
                    open.meta.hour = hour;
                }
                self.dest.push(&mut open.builder, &record, &added, open.meta.end_offset);
                open.meta.records += 1;
                open.meta.raw_bytes += len + 1;
                open.meta.min_time_ns = open.meta.min_time_ns.min(record.time.unix_nanos());
                self.buffered += len + 1;
            }
            open.meta.end_offset = end;
            cursor.read = end;
            if open.meta.raw_bytes >= cfg.max_bytes {
                self.seal(fp);
            }
        }
        debug_assert_eq!(self.cursors[&fp].read, consumed_end);
        (consumed_end - read_from) as usize
    }

    /// Closes the open batch of a file and starts sending it.
    fn seal(&mut self, fp: u64) {
        let Some(cursor) = self.cursors.get_mut(&fp) else {
            return;
        };
        let Some(open) = cursor.open.take() else {
            return;
        };
        // Sealing frees the compressor; the records stay charged until the batch is delivered.
        self.buffered -= self.dest.open_batch_bytes();
        let meta = open.meta;
        if meta.records == 0 {
            // Only empty lines: nothing to send, but the range is done.
            cursor.sealed.insert(
                meta.first_offset,
                SealedRange { end: meta.end_offset, delivered: true, min_time_ns: i64::MAX },
            );
            return;
        }
        let range = SealedRange { end: meta.end_offset, delivered: false, min_time_ns: meta.min_time_ns };
        cursor.sealed.insert(meta.first_offset, range);
        let sealed = Arc::new(self.dest.seal(open.builder, &meta));
        let meta = Arc::new(meta);
        self.inflight += 1;
        let dest = self.dest.clone();
        let done = self.done_tx.clone();
        let health = self.health.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_millis(100);
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
                        let _ = done.send(Done {
                            fingerprint: meta.fingerprint,
                            first_offset: meta.first_offset,
                            cost: meta.raw_bytes,
                        });
                        return;
                    }
                    Err(e) => {
                        failures += 1;
                        metrics::counter!("tron_agent_send_retries_total", "destination" => dest.name()).increment(1);
                        if failures == 1 || failures.is_power_of_two() {
                            tracing::warn!(destination = dest.name(), path = %meta.path, first_offset = meta.first_offset, attempt = failures, error = %e, "send failed; will retry");
                        }
                        health.down(dest.name(), e);
                        if done.is_closed() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(30));
                    }
                }
            }
        });
    }

    /// "Every line of mine with an event time before this is delivered": the earliest event time
    /// among records not yet delivered (in sealed or open batches) and the first line not yet
    /// read of every file, or now when everything is delivered. None when a file's next line
    /// cannot be read: an unreadable file holds the watermark where it was.
    fn low_watermark_ms(&self) -> Option<i64> {
        let mut low = tron_service::clock::now_ns();
        for (fp, c) in &self.cursors {
            for range in c.sealed.values().filter(|r| !r.delivered) {
                low = low.min(range.min_time_ns);
            }
            if let Some(open) = &c.open {
                low = low.min(open.meta.min_time_ns);
            }
            if !c.file.gone.load(Ordering::SeqCst) && c.file.size() > c.read {
                low = low.min(self.next_line_time(*fp, c)?.unwrap_or(i64::MAX));
            }
        }
        Some(low.div_euclid(1_000_000))
    }

    /// The event time of the line at a cursor's read position: Some(None) while that line is not
    /// complete yet (it cannot hold the watermark back), None when it cannot be read.
    fn next_line_time(&self, fp: u64, c: &Cursor<D::Builder>) -> Option<Option<i64>> {
        use std::os::unix::fs::FileExt;
        let mut head = vec![0u8; 64 << 10];
        let n = c.file.handle().read_at(&mut head, c.read).ok()?;
        let Some(end) = head[..n].iter().position(|b| *b == b'\n') else {
            // A line longer than the peek: its time is in its first bytes for JSON lines with
            // the time first, not in general; hold the watermark where it was.
            return if n == head.len() { None } else { Some(None) };
        };
        let path = c.file.path();
        let origin = Origin { host: &self.host, path: &path, fingerprint: fp };
        let now_ns = tron_service::clock::now_ns();
        let added = Added::new(&self.fields, &origin);
        let record = parse_line(&head[..end], c.read, &c.file.source, &added, &origin, now_ns);
        Some(Some(record.time.unix_nanos()))
    }

    fn save_checkpoint(&mut self) {
        if let Err(e) = self.checkpoints.save_if_dirty() {
            tracing::error!(destination = self.dest.name(), error = %e, "cannot save checkpoint");
            metrics::counter!("tron_agent_checkpoint_errors_total").increment(1);
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
            let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(level));
            gz.write_all(b"{}").unwrap();
            let held = (HELD.with(Cell::get) - before) as usize;
            assert!(held <= GZIP_ENCODER_BYTES, "level {level}: {held} bytes over the {GZIP_ENCODER_BYTES} charged");
            // Not a wild over-charge either: it decides how many files fit in max_buffer_bytes.
            assert!(held > GZIP_ENCODER_BYTES / 2, "level {level}: {held} bytes, the charge is {GZIP_ENCODER_BYTES}");
            drop(gz);
        }
    }
}

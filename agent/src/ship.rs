//! The loop that drives one destination: reads every tracked file from this destination's own
//! position, cuts batches, sends them (retrying until they succeed), and moves the checkpoint
//! only over batches that succeeded, in file order.
//!
//! Memory is bounded by `max_buffer_bytes` (records in open, in-flight and retrying batches, each
//! open batch's compressor, and lines read but not yet in a batch): when it is reached the loop
//! stops reading, and the file on disk is the buffer. Open batches alone filling it (thousands of
//! files) are sent early, oldest first. A read may cover more than a batch (see `cursor::Pending`);
//! its lines go into batches only while fewer than `max_inflight` are in flight.

use crate::checkpoint::Checkpointer;
use crate::config::{BatchConfig, FieldsConfig};
use crate::cursor::{Cursor, OpenBatch, Pending};
use crate::destination::{send_until_delivered, BatchMeta, Destination};
use crate::discover::{Registry, TrackedFile};
use crate::multiline::{self, Decision, Span};
use crate::parse::{parse_line, Added, Form, LineContext, Origin};
use crate::reader::read_lines;
use crate::shared_reads::{Block, Claim, Lines, SharedReads};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tron_service::systemd::Heartbeat;
use tron_service::{Health, Shutdown};

const HOUR_NS: i64 = 3_600_000_000_000;

/// A file that grew this recently is being written: its next line may carry an event time as
/// old as its last one (a backlog, a lagging writer, an application clock behind ours), so the
/// low watermark does not claim more than that line's time. Quiet for longer, its next line is
/// assumed to be new (a late one is what `finalize.lateness` is for).
const WRITING_WINDOW: Duration = Duration::from_secs(30);

/// How long a clean stop waits for the relay to acknowledge the "drained" report.
const DRAINED_REPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// The shortest time between two reading passes over every file.
const MIN_PASS_INTERVAL: Duration = Duration::from_millis(50);

struct Done {
    file_id: u64,
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
    /// Bytes of the files read (or taken from another destination) and not yet in a batch.
    read_ahead: usize,
    inflight: usize,
    done_tx: mpsc::UnboundedSender<Done>,
    done_rx: mpsc::UnboundedReceiver<Done>,
    buf: Vec<u8>,
    checkpoint_interval: Duration,
    lag_measured: Instant,
    checkpoints_pruned: bool,
    /// Lines read by another destination, and ours for them (None: the only destination).
    shared: Option<Arc<SharedReads>>,
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
        shared: Option<Arc<SharedReads>>,
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
            read_ahead: 0,
            inflight: 0,
            done_tx,
            done_rx,
            buf: Vec::new(),
            checkpoint_interval,
            lag_measured: Instant::now().checked_sub(Duration::from_secs(1)).unwrap_or_else(Instant::now),
            checkpoints_pruned: false,
            shared,
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
            let pass_started = tokio::time::Instant::now();
            beat.beat();
            self.collect_done();
            self.sync_files();
            let held_back = tokio::task::block_in_place(|| self.read_all());
            if last_save.elapsed() >= self.checkpoint_interval {
                self.save_checkpoint();
                last_save = Instant::now();
            }
            if self.dest.watermark_interval().is_some_and(|every| last_watermark.elapsed() >= every) {
                last_watermark = Instant::now();
                if let Some(watermark_ms) = tokio::task::block_in_place(|| self.low_watermark_ms()) {
                    metrics::gauge!("tron_agent_low_watermark_seconds", "destination" => self.dest.name())
                        .set(watermark_ms as f64 / 1000.0);
                    tokio::spawn(self.dest.clone().send_watermark(watermark_ms, false));
                }
            }
            tokio::select! {
                _ = stop.cancelled() => {},
                _ = wake.changed() => {},
                Some(done) = self.done_rx.recv() => self.complete(done),
                _ = tick.tick() => {},
            }
            // A pass costs an fstat per file and a batch per busy file; with many busy files,
            // inotify events and acks would otherwise start one per write. Lines wait at most
            // this much longer; less after a pass the in-flight limit cut short, where each
            // delivery makes room.
            let gap = if held_back { MIN_PASS_INTERVAL / 5 } else { MIN_PASS_INTERVAL };
            tokio::select! {
                _ = stop.cancelled() => {},
                _ = tokio::time::sleep_until(pass_started + gap) => {},
            }
        }
        self.drain(drain_timeout).await;
    }

    /// On shutdown: send what is open, wait for outstanding batches, save the checkpoint.
    async fn drain(&mut self, timeout: Duration) {
        let ids: Vec<u64> = self.cursors.keys().copied().collect();
        for id in ids {
            self.seal(id);
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
        if self.dest.watermark_interval().is_some() {
            self.report_drained().await;
        }
        tracing::info!(destination = self.dest.name(), "drained");
    }

    /// The last watermark report before a clean stop says "drained" when every line of every
    /// file is read and delivered (sizes taken now, not at the last pass): then the sink need
    /// not hold hours for this host once it has stayed silent for `host_timeout`
    /// (docs/completeness.md). With anything unread or unacknowledged, no report: the host holds
    /// hours until it is back.
    async fn report_drained(&mut self) {
        let everything_delivered = self.inflight == 0
            && self.cursors.values().all(|c| {
                let size = c.file.handle().metadata().map(|m| m.len()).unwrap_or(u64::MAX);
                c.undelivered_min_time_ns() == i64::MAX && size <= c.read
            });
        if !everything_delivered {
            tracing::info!(
                destination = self.dest.name(),
                "stopping with lines not yet delivered: not reporting drained"
            );
            return;
        }
        // The watermark as the periodic reports compute it: a file written within the last
        // `WRITING_WINDOW` still holds it at its last line, so a host that is only restarting
        // holds the hours its writers are in while it is away (within `host_timeout`).
        let Some(watermark_ms) = tokio::task::block_in_place(|| self.low_watermark_ms()) else {
            return;
        };
        // Bounded: a relay that went away after the last ack must not hold the stop up for a
        // whole ack time-out (without the report the host holds hours, as if killed).
        let report = self.dest.clone().send_watermark(watermark_ms, true);
        if tokio::time::timeout(DRAINED_REPORT_TIMEOUT, report).await.is_err() {
            tracing::warn!(destination = self.dest.name(), "the drained report was not acknowledged in time");
        }
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
        if let Some(c) = self.cursors.get_mut(&done.file_id) {
            c.ranges.delivered(done.first_offset);
        }
    }

    fn advance_all(&mut self) {
        for (id, c) in self.cursors.iter_mut() {
            if c.ranges.advance() {
                c.file.set_acked(self.index, c.ranges.acked());
                self.checkpoints.set(*id, c.ranges.acked(), &c.file.path());
            }
        }
        // One fstat per file: once a second is enough for a gauge (every pass, it was a tenth of
        // the agent's CPU with 100 busy files).
        if self.lag_measured.elapsed() >= Duration::from_secs(1) {
            self.lag_measured = Instant::now();
            let lag: u64 = self.cursors.values().map(|c| c.file.size().saturating_sub(c.ranges.acked())).sum();
            metrics::gauge!("tron_agent_destination_lag_bytes", "destination" => self.dest.name()).set(lag as f64);
        }
    }

    /// Adds cursors for new files and forgets files the registry closed.
    fn sync_files(&mut self) {
        for tf in self.registry.snapshot() {
            if self.cursors.contains_key(&tf.id) {
                continue;
            }
            let size = tf.size();
            let start = match self.checkpoints.get(tf.id) {
                // A checkpoint past the end means the file was truncated while we were down.
                Some(offset) if offset <= size => offset,
                Some(_) => 0,
                None => tf.start_offset,
            };
            tf.set_acked(self.index, start);
            self.checkpoints.set(tf.id, start, &tf.path());
            self.cursors.insert(tf.id, Cursor::new(tf, start));
        }
        if !self.checkpoints_pruned {
            // The first scan found again every file of the previous run it could; checkpoints of
            // the others (gone, counted as lost there) would otherwise stay for ever.
            self.checkpoints_pruned = true;
            let cursors = &self.cursors;
            self.checkpoints.retain(|id| cursors.contains_key(&id));
        }
        let registry = &self.registry;
        let checkpoints = &mut self.checkpoints;
        self.cursors.retain(|id, c| {
            let keep = registry.contains(*id) || !c.is_settled();
            if !keep {
                checkpoints.remove(*id);
            }
            keep
        });
    }

    /// One pass over every file; true when it stopped short for the memory budget or the
    /// in-flight limit (more may be waiting as soon as a batch is delivered).
    fn read_all(&mut self) -> bool {
        let cfg = self.dest.batch_config().clone();
        let ids: Vec<u64> = self.cursors.keys().copied().collect();
        let mut held_back = false;
        for id in ids {
            loop {
                self.relieve_pressure(&cfg);
                // Lines already read go into batches without charging the buffer again.
                let reads_more = self.cursors[&id].pending.is_none();
                let full = reads_more && self.buffered + self.read_ahead >= cfg.max_buffer_bytes;
                if full || self.inflight >= cfg.max_inflight {
                    held_back = true;
                    break;
                }
                if self.read_some(id, &cfg) == 0 {
                    break;
                }
            }
            if self.cursors[&id].open_for(cfg.max_age) {
                self.seal(id);
            }
        }
        held_back
    }

    /// When open batches fill the buffer, nothing more could be read until one reaches its age;
    /// send the oldest instead, so memory stays within the budget and files keep moving.
    fn relieve_pressure(&mut self, cfg: &BatchConfig) {
        while self.buffered + self.read_ahead >= cfg.max_buffer_bytes && self.inflight < cfg.max_inflight {
            let oldest = self.cursors.iter().filter_map(|(id, c)| c.open.as_ref().map(|o| (o.started, *id))).min();
            let Some((_, id)) = oldest else { break };
            self.seal(id);
            metrics::counter!("tron_agent_batches_sealed_early_total", "destination" => self.dest.name()).increment(1);
        }
    }

    /// Adds lines of a file to batches, reading more when none are pending, until a sealed batch
    /// reaches the in-flight limit; returns bytes of the file consumed (0: nothing to add).
    fn read_some(&mut self, id: u64, cfg: &BatchConfig) -> usize {
        if self.cursors[&id].pending.is_none() {
            let Some(pending) = self.read_ahead_of(id, cfg) else { return 0 };
            self.read_ahead += pending.bytes_left();
            self.cursors.get_mut(&id).expect("cursor exists").pending = Some(pending);
        }
        let cursor = self.cursors.get_mut(&id).expect("cursor exists");
        let mut pending = cursor.pending.take().expect("pending lines");
        let file = cursor.file.clone();
        let path = file.path();
        let src = file.source.clone();
        let (host, fields) = (self.host.clone(), self.fields.clone());
        let origin = Origin { host: &host, path: &path, file_id: id };
        let added = Added::new(&fields, &origin);
        let split_hours = self.dest.split_by_hour();
        let mut consumed = 0;
        // One look-up of the cursor per read, again only after sealing: a look-up per line (by
        // SipHash) was 2 % of the agent's CPU sending to one destination.
        let mut cursor = self.cursors.get_mut(&id).expect("cursor exists");
        // Lines already read stay deliverable even if the file is given up or gone meanwhile.
        while self.inflight < cfg.max_inflight {
            let Some(((record, end, len), bytes, covered)) = pending.take_line() else { break };
            let (end, len) = (*end, *len);
            consumed += covered;
            let hour = record.as_ref().map_or(0, |r| r.time.unix_nanos().div_euclid(HOUR_NS));
            if record.is_some() && cursor.needs_new_batch(hour, split_hours) {
                self.seal(id);
                cursor = self.cursors.get_mut(&id).expect("cursor exists");
            }
            if let Some(record) = record {
                cursor.last_time_ns = Some(record.time.unix_nanos());
            }
            let (open, opened) = cursor.open_batch(|start| {
                OpenBatch::new(self.dest.builder(), BatchMeta::starting_at(id, &path, &src.tag, start, hour))
            });
            if opened {
                self.buffered += self.dest.open_batch_bytes();
            }
            if let Some(record) = record {
                self.dest.push(&mut open.builder, record, bytes, &added, open.meta.end_offset);
                open.meta.add_record(hour, record.time.unix_nanos(), len + 1);
                self.buffered += len + 1;
            }
            open.meta.end_offset = end;
            let full = open.meta.raw_bytes >= cfg.max_bytes;
            cursor.read = end;
            if full {
                self.seal(id);
                cursor = self.cursors.get_mut(&id).expect("cursor exists");
            }
        }
        if pending.is_done() {
            // A read may cover bytes and hold no line (a multiline read of blank lines only).
            consumed += pending.bytes_left();
            cursor.read = pending.end();
        } else {
            cursor.pending = Some(pending);
        }
        self.read_ahead -= consumed;
        consumed
    }

    /// The next lines of a file for this destination: another destination's read of them, or
    /// its own. None when there is nothing new (or the file cannot be read).
    fn read_ahead_of(&mut self, id: u64, cfg: &BatchConfig) -> Option<Pending> {
        let cursor = &self.cursors[&id];
        let file = cursor.file.clone();
        if file.is_gone() || file.is_given_up(self.index) {
            return None;
        }
        let open_bytes = cursor.open.as_ref().map_or(0, |o| o.meta.raw_bytes);
        let budget = cfg.max_bytes.saturating_sub(open_bytes).max(1);
        let read_from = cursor.read;
        // Most files have nothing new on most passes: one fstat instead of reading their head
        // (or asking the other destinations).
        if file.handle().metadata().is_ok_and(|m| m.len() <= read_from) {
            return None;
        }
        let path = file.path();
        let (host, fields) = (self.host.clone(), self.fields.clone());
        let origin = Origin { host: &host, path: &path, file_id: id };
        let added = Added::new(&fields, &origin);
        // Multiline records may be held back across reads (their end is not known yet), so those
        // sources are read by each destination itself.
        let shared = self.shared.clone().filter(|_| file.source.multiline.is_none());
        let claim = shared.as_ref().map_or(Claim::ReadAlone, |s| s.claim(self.index, id, read_from));
        // Shared or not, reads end on the grid every destination reads in (batches still seal at
        // their own size as the lines are added), so destinations that fell out of step can meet
        // again at the same offset.
        let budget = if shared.is_some() { SharedReads::read_budget(read_from) } else { budget };
        let block = match claim {
            Claim::Take(block) => block,
            Claim::ReadForAll => {
                let read = self.read_and_parse(id, &file, Form::Both, budget, &added, &origin);
                let read = read.map(|(lines, end, bytes_read)| Block { lines: Arc::new(lines), end, bytes_read });
                if let Some(shared) = &shared {
                    shared.offer(id, read_from, read.clone());
                }
                read?
            }
            Claim::ReadAlone => {
                let (lines, end, bytes_read) =
                    self.read_and_parse(id, &file, self.dest.record_form(), budget, &added, &origin)?;
                Block { lines: Arc::new(lines), end, bytes_read }
            }
        };
        metrics::counter!("tron_agent_lines_read_total", "destination" => self.dest.name())
            .increment(block.lines.lines.len() as u64);
        metrics::counter!("tron_agent_bytes_read_total", "destination" => self.dest.name())
            .increment(block.bytes_read as u64);
        Some(Pending::new(block.lines, read_from, block.end))
    }

    /// Reads up to `budget` bytes of lines of a file from its cursor and parses them into `form`:
    /// (lines, where the read ends, bytes read); None when there is nothing to take (no new
    /// complete line, a read error, the file replaced or truncated under us).
    fn read_and_parse(
        &mut self,
        id: u64,
        file: &TrackedFile,
        form: Form,
        budget: usize,
        added: &Added,
        origin: &Origin,
    ) -> Option<(Lines, u64, usize)> {
        let now_ns = tron_service::clock::now_ns();
        let mut read = Lines::new();
        let mut raw: Vec<Span> = Vec::new();
        let read_from = self.cursors[&id].read;
        let src = file.source.clone();
        let cx = LineContext { src: &src, added, origin, now_ns, form };
        let handle = file.handle();
        if !file.is_intact(&handle) {
            return None; // replaced under us (copytruncate); the next scan sorts out what it is now
        }
        let outcome = read_lines(
            &handle,
            read_from,
            budget,
            src.max_line_bytes,
            file.is_finished(),
            &mut self.buf,
            |offset, line, end| {
                if src.multiline.is_some() {
                    raw.push(Span { offset, text: line.to_vec(), end });
                } else if !line.is_empty() {
                    read.lines.push((Some(parse_line(line, offset, &cx, &mut read.bytes)), end, line.len()));
                } else {
                    read.lines.push((None, end, 0));
                }
            },
        );
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                tracing::warn!(path = %origin.path, error = %e, "read failed");
                return None;
            }
        };
        if !file.confirm_read(&handle, read_from, &self.buf[..outcome.bytes_read]) {
            return None; // truncated while we read: what we read may be new content; drop it
        }
        if outcome.splits > 0 {
            metrics::counter!("tron_agent_lines_split_total", "source" => src.name.clone()).increment(outcome.splits);
        }
        if outcome.bytes_read == 0 {
            return None;
        }
        let mut consumed_end = outcome.next_offset;
        if let Some((start, flush)) = &src.multiline {
            let (mut records, open) = multiline::group(raw, start, src.max_line_bytes);
            if let Some(open) = open {
                let fills_window = records.is_empty() && outcome.bytes_read >= budget;
                let finished = file.is_finished();
                let cursor = self.cursors.get_mut(&id).expect("cursor exists");
                match multiline::settle(open, cursor.held.take(), finished, fills_window, *flush) {
                    Decision::Complete(open) => records.push(open),
                    Decision::Hold(held) => {
                        consumed_end = held.offset;
                        cursor.held = Some(held);
                    }
                }
            }
            for r in records {
                let record = parse_line(&r.text, r.offset, &cx, &mut read.bytes);
                read.lines.push((Some(record), r.end, r.text.len()));
            }
            if consumed_end == read_from {
                return None;
            }
        }
        Some((read, consumed_end, outcome.bytes_read))
    }

    /// Closes the open batch of a file and starts sending it.
    fn seal(&mut self, id: u64) {
        let Some(cursor) = self.cursors.get_mut(&id) else {
            return;
        };
        let Some(open) = cursor.open.take() else {
            return;
        };
        // Sealing frees the compressor; the records stay charged until the batch is delivered.
        self.buffered -= self.dest.open_batch_bytes();
        let meta = open.meta;
        cursor.ranges.sealed(&meta);
        if meta.records == 0 {
            return; // only empty lines: nothing to send, but the range is done
        }
        let sealed = Arc::new(self.dest.seal(open.builder, &meta));
        let meta = Arc::new(meta);
        self.inflight += 1;
        let dest = self.dest.clone();
        let done = self.done_tx.clone();
        let health = self.health.clone();
        tokio::spawn(async move {
            if send_until_delivered(&dest, sealed, meta.clone(), &health, &done).await {
                let _ =
                    done.send(Done { file_id: meta.file_id, first_offset: meta.first_offset, cost: meta.raw_bytes });
            }
        });
    }

    /// "Every line of mine with an event time before this is delivered": the earliest event time
    /// among records not yet delivered (in sealed or open batches) and the first line not yet
    /// read of every file, and for a file still being written (grew in the last
    /// [`WRITING_WINDOW`]) the time of the last line read from it; now when every file is
    /// delivered and quiet. None when a file's next line cannot be read: an unreadable file
    /// holds the watermark where it was.
    fn low_watermark_ms(&self) -> Option<i64> {
        let mut low = tron_service::clock::now_ns();
        for (id, c) in &self.cursors {
            low = low.min(c.undelivered_min_time_ns());
            if let Some(last) = c.last_time_ns.filter(|_| c.file.quiet_for() < WRITING_WINDOW) {
                low = low.min(last);
            }
            if !c.file.is_gone() && c.file.size() > c.read {
                low = low.min(self.next_line_time(*id, c)?.unwrap_or(i64::MAX));
            }
        }
        Some(low.div_euclid(1_000_000))
    }

    /// The event time of the line at a cursor's read position: Some(None) while that line is not
    /// complete yet (it cannot hold the watermark back), None when it cannot be read.
    fn next_line_time(&self, id: u64, c: &Cursor<D::Builder>) -> Option<Option<i64>> {
        use std::os::unix::fs::FileExt;
        let mut head = vec![0u8; 64 << 10];
        let n = c.file.handle().read_at(&mut head, c.read).ok()?;
        let Some(end) = head[..n].iter().position(|b| *b == b'\n') else {
            // A line longer than the peek: its time is in its first bytes for JSON lines with
            // the time first, not in general; hold the watermark where it was.
            return if n == head.len() { None } else { Some(None) };
        };
        let path = c.file.path();
        let origin = Origin { host: &self.host, path: &path, file_id: id };
        let now_ns = tron_service::clock::now_ns();
        let added = Added::new(&self.fields, &origin);
        let cx = LineContext { src: &c.file.source, added: &added, origin: &origin, now_ns, form: Form::JsonText };
        let record = parse_line(&head[..end], c.read, &cx, &mut Vec::new());
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
    use super::*;
    use crate::config::{FilesConfig, SourceConfig};
    use crate::destination::SendError;
    use crate::parse::Record;
    use std::sync::Mutex;

    /// Delivers every batch, but the first attempt of every second batch fails, so batches
    /// complete out of file order.
    struct Flaky {
        cfg: BatchConfig,
        /// First offsets in the order of their first attempt.
        attempted: Mutex<Vec<u64>>,
        delivered: Mutex<Vec<(u64, u64)>>,
        retries: std::sync::atomic::AtomicUsize,
    }

    impl Flaky {
        /// The end of the file prefix covered by delivered batches.
        fn delivered_prefix(&self) -> u64 {
            let mut ranges = self.delivered.lock().unwrap().clone();
            ranges.sort();
            ranges.iter().fold(0, |covered, &(first, end)| if first == covered { end } else { covered })
        }
    }

    impl Destination for Flaky {
        type Builder = ();
        type Sealed = ();
        fn name(&self) -> &'static str {
            "flaky"
        }
        fn batch_config(&self) -> &BatchConfig {
            &self.cfg
        }
        fn split_by_hour(&self) -> bool {
            false
        }
        fn builder(&self) {}
        fn open_batch_bytes(&self) -> usize {
            1000
        }
        fn push(&self, _: &mut (), _: &Record, _: &[u8], _: &Added, _: u64) {}
        fn record_form(&self) -> Form {
            Form::JsonText
        }
        fn seal(&self, _: (), _: &BatchMeta) {}
        async fn send(self: Arc<Self>, _: Arc<()>, meta: Arc<BatchMeta>) -> Result<(), SendError> {
            let first_attempt_of_odd = {
                let mut attempted = self.attempted.lock().unwrap();
                let first = !attempted.contains(&meta.first_offset);
                if first {
                    attempted.push(meta.first_offset);
                }
                first && attempted.len().is_multiple_of(2)
            };
            if first_attempt_of_odd {
                self.retries.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(SendError::Unreachable("refused once".into()));
            }
            self.delivered.lock().unwrap().push((meta.first_offset, meta.end_offset));
            Ok(())
        }
    }

    /// Ships a 140 kB file in 8 kB batches to a destination that refuses every second batch once;
    /// checks after every pass that the checkpoint stays within what was delivered and that no
    /// more than `max_inflight` batches are in flight; drains at the end.
    async fn ship_everything(max_inflight: usize, shared: Option<Arc<SharedReads>>) -> (Arc<Flaky>, Shipper<Flaky>) {
        let logs = tempfile::tempdir().unwrap();
        let text: String = (0..2000).map(|i| format!("{{\"seq\":{i},\"msg\":\"{}\"}}\n", "x".repeat(50))).collect();
        std::fs::write(logs.path().join("app.log"), &text).unwrap();
        let source: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "app", "tag": "app", "include": [format!("{}/*.log", logs.path().display())]
        }))
        .unwrap();
        let state = tempfile::tempdir().unwrap();
        let table = crate::file_table::FileTable::open(state.path()).unwrap();
        let registry = Registry::new(
            &[source],
            FilesConfig::default(),
            state.path(),
            vec!["flaky"],
            table,
            Default::default(),
            None,
        );
        registry.scan();
        let checkpoints = Checkpointer::open(state.path(), "flaky").unwrap();
        let cfg = BatchConfig { max_bytes: 8 << 10, max_age: Duration::ZERO, max_inflight, max_buffer_bytes: 1 << 20 };
        let dest = Arc::new(Flaky {
            cfg,
            attempted: Mutex::default(),
            delivered: Mutex::default(),
            retries: Default::default(),
        });
        let mut shipper = Shipper::new(
            dest.clone(),
            0,
            registry,
            checkpoints,
            FieldsConfig::default(),
            "host".into(),
            Health::new(),
            Duration::from_secs(1),
            shared,
        );
        shipper.sync_files();
        let id = *shipper.cursors.keys().next().expect("the file is tracked");
        let size = text.len() as u64;
        let deadline = Instant::now() + Duration::from_secs(30);
        while shipper.checkpoints.get(id) != Some(size) {
            assert!(Instant::now() < deadline, "not everything delivered");
            shipper.read_all();
            assert!(shipper.inflight <= max_inflight, "{} batches in flight", shipper.inflight);
            if let Ok(Some(done)) = tokio::time::timeout(Duration::from_millis(100), shipper.done_rx.recv()).await {
                shipper.complete(done);
            }
            shipper.advance_all();
            let acked = shipper.checkpoints.get(id).unwrap();
            assert!(acked <= dest.delivered_prefix(), "checkpoint {acked} past the delivered prefix");
        }
        shipper.drain(Duration::from_secs(5)).await;
        (dest, shipper)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_moves_only_over_delivered_batches_and_the_memory_charge_returns_to_zero() {
        let (dest, shipper) = ship_everything(4, None).await;
        assert_eq!((shipper.buffered, shipper.read_ahead, shipper.inflight), (0, 0, 0), "every charge given back");
        assert!(dest.retries.load(std::sync::atomic::Ordering::SeqCst) > 0, "no batch completed out of order");
        assert!(dest.delivered.lock().unwrap().len() > 10);
    }

    /// A read shared with another destination covers up to 1 MiB: the whole file here, 17 batches
    /// of this destination. They are still sealed one at a time.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_read_larger_than_a_batch_keeps_the_in_flight_limit() {
        let (dest, shipper) = ship_everything(1, SharedReads::for_destinations(2)).await;
        assert_eq!((shipper.buffered, shipper.read_ahead, shipper.inflight), (0, 0, 0), "every charge given back");
        assert!(dest.delivered.lock().unwrap().len() > 10);
    }
}

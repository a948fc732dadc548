//! One Kafka partition's staging and cuts.
//!
//! Records are appended to one gzip staging file per event hour (and per quarantine reason). A
//! cut closes every staging file of the partition at one offset, so the committed offset is
//! always a clean boundary: all records below it are in uploaded objects, none above it are. Each
//! cut is recorded (state `pending`) before its objects are uploaded, and a replay honours it;
//! together with object names taken from first offsets this puts every record in exactly one
//! object across crashes and rebalances. Every state write goes through the owner's [`Claim`], so
//! an instance that lost the partition is fenced before it uploads anything.

use crate::config::{Column, DedupeConfig, Format, QuarantineConfig, RollConfig};
use crate::dedupe::{Position, Verdict, Written};
use crate::format::{RowSink, RowSource};
use crate::layout::Layout;
use crate::state::{Claim, HostMark, PartitionState, PendingCut};
use crate::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub const HOUR_MS: i64 = 3_600_000;
const HOUR_NS: i64 = HOUR_MS * 1_000_000;

/// Custom metadata keys of uploaded objects, read back by the finalizer.
pub mod meta_key {
    pub const ROWS: &str = "tron-rows";
    pub const PARTITION: &str = "tron-partition";
    pub const FIRST_OFFSET: &str = "tron-first-offset";
    pub const LAST_OFFSET: &str = "tron-last-offset";
    pub const MIN_TIME: &str = "tron-min-time";
    pub const MAX_TIME: &str = "tron-max-time";
    pub const QUARANTINE_REASON: &str = "tron-quarantine-reason";
}

/// Staging files are named per incarnation of a partition in this process, so a revoked
/// partition's files and the files of its re-assignment never share a name.
static INCARNATIONS: AtomicU64 = AtomicU64::new(0);

pub struct Output<'a> {
    pub store: &'a Store,
    pub prefix: &'a str,
    pub layout: &'a Layout,
    pub format: Format,
    pub columns: &'a [Column],
    pub gzip_level: u32,
    pub staging: &'a Path,
    pub quarantine: &'a QuarantineConfig,
    pub dedupe: &'a DedupeConfig,
    pub request_timeout: Duration,
    pub instance: &'a str,
    /// The consume loop's heartbeat, kept beating while a store call waits (bounded by
    /// `request_timeout`), so a GCS stall does not get the sink killed by the watchdog.
    pub beat: Option<tron_service::systemd::Heartbeat>,
}

impl Output<'_> {
    async fn timed<T>(&self, what: &str, f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
        let call = tokio::time::timeout(self.request_timeout, f);
        let answer = match &self.beat {
            Some(beat) => beat.while_waiting(call).await,
            None => call.await,
        };
        answer.map_err(|_| {
            anyhow::anyhow!("{what}: no answer within {:?} (output.request_timeout)", self.request_timeout)
        })?
    }
}

/// Why a record is not in its hour's directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Reason {
    /// Event time older than `quarantine.max_past` before the Kafka timestamp.
    TooOld,
    /// Event time more than `quarantine.max_future` after the Kafka timestamp.
    TooNew,
    /// Neither an event time nor a Kafka timestamp.
    NoTime,
}

impl Reason {
    pub fn as_str(&self) -> &'static str {
        match self {
            Reason::TooOld => "too_old",
            Reason::TooNew => "too_new",
            Reason::NoTime => "no_time",
        }
    }
}

/// How long a host that stopped reporting stays in a partition's state (and agent traffic counts
/// as recent): within it, its last report still holds hours back when every host is silent.
pub const HOSTS_KEPT_MS: i64 = 24 * HOUR_MS;

/// The first hour whose object count a partition still keeps, given the newest Kafka timestamp
/// it committed. A record lands in hour H only if its event time is at most
/// `quarantine.max_past` before its Kafka timestamp (else it is quarantined), and Kafka
/// timestamps in a partition only move forward (give or take an hour of skew between relays):
/// so no record for an earlier hour can come, and its count is no longer needed to revise its
/// manifest. Counted from event times instead, one agent back after four days had its rows
/// uploaded but its hour's count pruned in the same write, and the hour was never revised.
pub fn hours_kept_from(newest_kafka_ms: i64, q: &QuarantineConfig) -> i64 {
    (newest_kafka_ms - q.max_past.as_millis() as i64 - HOUR_MS).div_euclid(HOUR_MS)
}

/// Where a record is staged: its event hour, or quarantine (by reason and Kafka-timestamp hour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Bucket {
    Hour(i64),
    Quarantine(Reason, i64),
}

/// A message as the partition needs it.
pub struct Incoming<'a> {
    pub offset: i64,
    /// From the record header (`tron_service::headers`), when the producer set one.
    pub event_time_ns: Option<i64>,
    /// The Kafka record timestamp (ms), when there is one.
    pub kafka_time_ms: Option<i64>,
    pub tag: &'a str,
    pub raw: &'a [u8],
    /// Its source and byte range there, when the producer (tron-agent via the relay) said.
    pub position: Option<Position<'a>>,
    /// A relay's watermark message (header `tron_watermarks`), not a record.
    pub is_watermark: bool,
}

impl Incoming<'_> {
    /// The bucket and the event time (ns) a row shows. Decided from the record alone, so a replay
    /// decides the same.
    pub fn classify(&self, q: &QuarantineConfig) -> (Bucket, i64) {
        let kafka_ns = self.kafka_time_ms.map(|ms| ms.saturating_mul(1_000_000));
        let Some(event_ns) = self.event_time_ns.or(kafka_ns) else {
            return (Bucket::Quarantine(Reason::NoTime, 0), 0);
        };
        if let Some(reference) = kafka_ns {
            let kafka_hour = reference.div_euclid(HOUR_NS);
            if event_ns < reference.saturating_sub(q.max_past.as_nanos() as i64) {
                return (Bucket::Quarantine(Reason::TooOld, kafka_hour), event_ns);
            }
            if event_ns > reference.saturating_add(q.max_future.as_nanos() as i64) {
                return (Bucket::Quarantine(Reason::TooNew, kafka_hour), event_ns);
            }
        }
        (Bucket::Hour(event_ns.div_euclid(HOUR_NS)), event_ns)
    }
}

/// The staging directory failed (full, unwritable): the partition is given up and re-read from
/// Kafka later; nothing of it is committed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct StagingError(pub String);

struct Staged {
    sink: RowSink,
    file: StagedFile,
}

struct StagedFile {
    path: PathBuf,
    first_offset: i64,
    last_offset: i64,
    rows: u64,
    min_ns: i64,
    max_ns: i64,
}

pub struct Partition {
    pub topic: String,
    pub partition: i32,
    /// The assignment this object belongs to (see the consumer's `GroupContext`).
    pub epoch: u64,
    incarnation: u64,
    state: PartitionState,
    claim: Claim,
    /// Source ranges written or staged (the state holds those below the committed offset).
    written: Written,
    /// Host watermarks read since the last cut; they join the state when the cut commits.
    hosts_read: BTreeMap<String, HostMark>,
    /// Records with / without source positions read since the last cut.
    tracked_read: bool,
    untracked_read: bool,
    /// During a replay: the cut the crashed owner had started; no other cut may come first.
    forced_cut: Option<i64>,
    /// A message was handed to `append` since the partition was opened. Until then the
    /// consumer's position may still be the one from before the seek to `committed` (librdkafka
    /// applies a seek asynchronously) and says nothing about what this `Partition` has read.
    read_since_open: bool,
    staged: BTreeMap<Bucket, Staged>,
    /// Files of a cut that is under way (finished, maybe partly uploaded). They stay until the
    /// commit succeeds, so a retried cut uploads them again instead of committing past them.
    sealed: Vec<(Bucket, StagedFile)>,
    records_since_cut: u64,
    bytes_since_cut: u64,
    first_staged_at: Option<Instant>,
    /// Max event time staged in hour buckets (quarantined records never move the watermark).
    staged_max_ns: i64,
    /// Newest Kafka timestamp (ms) read: joins the state's `newest_kafka_ms` at the next cut.
    read_kafka_ms: i64,
    /// Hosts whose records were read with no report of theirs known, with the Kafka time of the
    /// first: they join the state's `hosts_unreported` at the next cut.
    unreported_read: BTreeMap<String, i64>,
    /// The host of the last record read, once checked: records come in runs of one source, so
    /// the check is one string comparison per record.
    last_host: String,
    next_offset: i64,
    pub last_message_at: Instant,
    last_cut_at: Instant,
    state_written_at: Instant,
    /// `tron_sink_records_consumed_total` for this topic: a handle, since a lookup by name and
    /// labels for every record was a few percent of the sink's CPU.
    pub consumed: metrics::Counter,
}

impl Partition {
    /// Claims the partition (fencing any previous owner) and opens it at `committed`: the group's
    /// committed offset, or the first offset consumed if none.
    pub async fn open(
        out: &Output<'_>,
        topic: &str,
        partition: i32,
        committed: i64,
        epoch: u64,
    ) -> anyhow::Result<Self> {
        let mut forced_cut = None;
        let (state, claim) = out
            .timed(
                "claiming the partition state",
                Claim::take(out.store, out.prefix, topic, partition, out.instance, |previous| {
                    // The state is written before the group's offset (see `cut`): a state ahead of
                    // the group means a crash (or a revocation) came between the two, and the
                    // cut it counts is in objects.
                    let committed = committed.max(previous.committed);
                    let pending = match &previous.pending {
                        // The previous owner recorded this cut and may have uploaded part of it.
                        Some(p @ PendingCut { from, cut }) if *from == committed && *cut > committed => Some(p.clone()),
                        _ => None,
                    };
                    PartitionState { committed, pending, caught_up: false, ..previous }
                }),
            )
            .await?;
        if state.committed > committed {
            tracing::info!(
                topic,
                partition,
                group_offset = committed,
                state_offset = state.committed,
                "the group's offset is behind the partition state (a stop between the state write and the offset commit); going on from the state's"
            );
        }
        let committed = state.committed;
        if let Some(PendingCut { cut, .. }) = &state.pending {
            tracing::info!(
                topic,
                partition,
                committed,
                cut,
                "replaying an interrupted cut; cutting at the same offset"
            );
            forced_cut = Some(*cut);
        }
        let long_ago = Instant::now() - Duration::from_secs(3600);
        Ok(Partition {
            topic: topic.to_string(),
            partition,
            epoch,
            incarnation: INCARNATIONS.fetch_add(1, Ordering::Relaxed),
            written: state.written.clone(),
            hosts_read: BTreeMap::new(),
            tracked_read: false,
            untracked_read: false,
            state,
            claim,
            forced_cut,
            read_since_open: false,
            staged: BTreeMap::new(),
            sealed: Vec::new(),
            records_since_cut: 0,
            bytes_since_cut: 0,
            first_staged_at: None,
            staged_max_ns: i64::MIN,
            read_kafka_ms: 0,
            unreported_read: BTreeMap::new(),
            last_host: String::new(),
            next_offset: committed,
            last_message_at: Instant::now(),
            last_cut_at: long_ago,
            state_written_at: long_ago,
            consumed: metrics::counter!("tron_sink_records_consumed_total", "topic" => topic.to_string()),
        })
    }

    pub fn committed(&self) -> i64 {
        self.state.committed
    }

    /// The offset after the last record appended (or the committed offset).
    pub fn next_offset(&self) -> i64 {
        self.next_offset
    }

    /// Whether the consumer's position can speak for this partition (see `read_since_open`):
    /// the heartbeat uses it to see past transaction markers at the partition's end.
    pub fn position_trusted(&self) -> bool {
        self.read_since_open
    }

    /// Every `every`, and at once when the stored state says "caught up" but a message came
    /// after it was written: the finalizer reads the stored state, and until the next heartbeat
    /// it would count this partition as holding nothing more while records it has not seen are
    /// staged (up to `finalize.interval` in which another partition can pass the hour).
    pub fn heartbeat_due(&self, every: Duration) -> bool {
        self.state_written_at.elapsed() >= every
            || (self.state.caught_up && self.last_message_at > self.state_written_at)
    }

    /// Replaying a cut and nothing read for `quiet`: the re-read the replay waits for may never
    /// have started (librdkafka can drop a seek around a pause/resume), so the caller seeks again.
    pub fn replay_stalled(&self, quiet: Duration) -> bool {
        self.forced_cut.is_some() && self.last_message_at.elapsed() >= quiet
    }

    /// A seek was issued for a stalled replay: wait `quiet` again before the next one.
    pub fn reseeked(&mut self) {
        self.last_message_at = Instant::now();
    }

    /// The cut a replay must make before this offset is appended, if any.
    pub fn forced_cut_before(&self, offset: i64) -> Option<i64> {
        self.forced_cut.filter(|cut| offset >= *cut)
    }

    /// Stages one message. `now`: when the burst it came in began (a clock read per message was
    /// 1 % of the sink's CPU; idleness is measured in seconds).
    pub fn append(&mut self, out: &Output<'_>, msg: &Incoming<'_>, now: Instant) -> anyhow::Result<()> {
        self.read_since_open = true;
        if msg.offset < self.next_offset {
            return Ok(()); // already staged, or below the committed offset (already in an object)
        }
        if msg.is_watermark {
            // Not a message for idleness: a partition that only gets watermarks is caught up.
            self.read_watermarks(msg);
            self.pass_over(msg.offset);
            return Ok(());
        }
        self.last_message_at = now;
        self.read_kafka_ms = self.read_kafka_ms.max(msg.kafka_time_ms.unwrap_or(0));
        match msg.position {
            None => self.untracked_read = true,
            Some(position) => {
                self.tracked_read = true;
                self.note_host(position.source, msg.kafka_time_ms.unwrap_or(0));
                if self.written.admit(position, msg.kafka_time_ms.unwrap_or(0)) == Verdict::Duplicate {
                    metrics::counter!("tron_sink_duplicates_dropped_total", "topic" => self.topic.clone()).increment(1);
                    self.pass_over(msg.offset);
                    return Ok(());
                }
            }
        }
        let (bucket, time_ns) = msg.classify(out.quarantine);
        if let Bucket::Quarantine(reason, _) = bucket {
            metrics::counter!("tron_sink_records_quarantined_total", "topic" => self.topic.clone(), "reason" => reason.as_str())
                .increment(1);
        }
        if !self.staged.contains_key(&bucket) {
            let name = format!(
                "{}-{}-{:020}-{}.{}.gz",
                self.topic,
                self.partition,
                msg.offset,
                self.incarnation,
                out.format.ext()
            );
            let path = out.staging.join(name);
            let sink = RowSink::create(&path, out.format, out.gzip_level, out.columns)
                .map_err(|e| StagingError(format!("{}: cannot create staging file: {e}", path.display())))?;
            let file = StagedFile {
                path,
                first_offset: msg.offset,
                last_offset: msg.offset,
                rows: 0,
                min_ns: i64::MAX,
                max_ns: i64::MIN,
            };
            self.staged.insert(bucket, Staged { sink, file });
        }
        let Staged { sink, file: staged } = self.staged.get_mut(&bucket).expect("inserted above");
        let src = RowSource {
            topic: &self.topic,
            partition: self.partition,
            offset: msg.offset,
            tag: msg.tag,
            time_ns,
            raw: msg.raw,
        };
        let size = sink
            .write(&src)
            .map_err(|e| StagingError(format!("{}: cannot write staging file: {e}", staged.path.display())))?;
        staged.last_offset = msg.offset;
        staged.rows += 1;
        staged.min_ns = staged.min_ns.min(time_ns);
        staged.max_ns = staged.max_ns.max(time_ns);
        self.records_since_cut += 1;
        self.bytes_since_cut += size as u64;
        if let Bucket::Hour(_) = bucket {
            self.staged_max_ns = self.staged_max_ns.max(time_ns);
        }
        self.first_staged_at.get_or_insert_with(Instant::now);
        self.next_offset = msg.offset + 1;
        Ok(())
    }

    /// Notes the host of a record's source (`{host}/{file identity}`) when no report of it is known.
    fn note_host(&mut self, source: &str, kafka_ms: i64) {
        let host = source.rsplit_once('/').map_or(source, |(host, _)| host);
        if host == self.last_host {
            return;
        }
        if !self.state.hosts.contains_key(host) && !self.hosts_read.contains_key(host) {
            let first = self.unreported_read.entry(host.to_string()).or_insert(kafka_ms);
            *first = (*first).min(kafka_ms);
        }
        host.clone_into(&mut self.last_host);
    }

    /// A message read that stages nothing (a watermark message, a duplicate): the next cut commits
    /// past it, at the latest `roll.max_age` from now.
    fn pass_over(&mut self, offset: i64) {
        self.first_staged_at.get_or_insert_with(Instant::now);
        self.next_offset = offset + 1;
    }

    fn read_watermarks(&mut self, msg: &Incoming<'_>) {
        /// `[watermark_ms, reported_ms]`, and a third element `1` when the host reported that it
        /// stopped drained (relays older than that write two).
        #[derive(serde::Deserialize)]
        struct Message {
            tron_watermarks: BTreeMap<String, Vec<i64>>,
        }
        match serde_json::from_slice::<Message>(msg.raw) {
            Ok(m) => {
                for (host, entry) in m.tron_watermarks {
                    let [watermark_ms, reported_ms, ref rest @ ..] = entry[..] else {
                        tracing::warn!(topic = %self.topic, partition = self.partition, offset = msg.offset, host, "watermark entry is not [watermark_ms, reported_ms, ..]; skipped");
                        continue;
                    };
                    let drained = rest.first() == Some(&1);
                    HostMark::merge(&mut self.hosts_read, &host, HostMark { watermark_ms, reported_ms, drained });
                }
            }
            Err(e) => {
                tracing::warn!(topic = %self.topic, partition = self.partition, offset = msg.offset, error = %e, "unreadable watermark message; skipped")
            }
        }
    }

    /// Where to cut now, if anywhere. During a replay only the recorded cut counts, and only once
    /// every message below it has been read again. The recorded cut is always one past a message
    /// the previous owner read (`next_offset` only moves on messages), so that message comes
    /// again; the consumer's position is not consulted: right after the seek to `committed` it
    /// can still be the old one, and a replayed cut committed on it once lost [committed, cut).
    pub fn cut_due(&self, roll: &RollConfig, lateness: Duration) -> Option<i64> {
        self.cut_due_when(roll, lateness, true)
    }

    /// [`cut_due`](Self::cut_due) for the message just appended: only what a record can make
    /// due (size, the hour passed, a replayed cut reached). The timers (`max_age`, `idle_after`)
    /// are checked after every burst of messages instead: three clock reads per message were 4 %
    /// of the sink's CPU.
    pub fn cut_due_on_arrival(&self, roll: &RollConfig, lateness: Duration) -> Option<i64> {
        self.cut_due_when(roll, lateness, false)
    }

    fn cut_due_when(&self, roll: &RollConfig, lateness: Duration, timers: bool) -> Option<i64> {
        if let Some(cut) = self.forced_cut {
            return (self.next_offset >= cut).then_some(cut);
        }
        // Nothing staged but records read (duplicates, all dropped): an idle cut commits past them.
        let read_past_committed = self.next_offset > self.state.committed;
        if self.staged.is_empty() && !read_past_committed {
            return None;
        }
        let full = self.records_since_cut >= roll.max_records || self.bytes_since_cut >= roll.max_bytes;
        let old = timers && self.first_staged_at.is_some_and(|t| t.elapsed() >= roll.max_age);
        let idle = timers && self.last_message_at.elapsed() >= roll.idle_after;
        let oldest_hour = self.staged.keys().find_map(|b| match b {
            Bucket::Hour(h) => Some(*h),
            Bucket::Quarantine(..) => None,
        });
        let hour_passed = oldest_hour
            .is_some_and(|h| self.staged_max_ns >= (h + 1) * HOUR_NS + lateness.as_nanos() as i64)
            && self.last_cut_at.elapsed() >= roll.min_interval;
        (full || old || idle || hour_passed).then_some(self.next_offset)
    }

    /// On shutdown everything staged is cut, unless a replayed cut is still ahead (then the
    /// staged records are dropped and replayed again next time).
    pub fn cut_for_shutdown(&self) -> Option<i64> {
        (self.has_staged() && self.forced_cut.is_none()).then_some(self.next_offset)
    }

    /// Uploads every staged file as one cut ending before `cut`, writes the state that counts it
    /// (committed offset, hour counts, dedupe ranges, host watermarks), then commits `cut` to the
    /// group via `commit`. On error nothing past the committed offset is committed; the caller
    /// retries (upload errors) or gives the partition up ([`StagingError`],
    /// [`Fenced`](crate::store::Fenced)).
    ///
    /// The state is written before the group's offset because the state is the only record of
    /// what the cut counted: a crash after the offset commit and before the state write lost the
    /// cut's hour counts (its hour was never finalized) and its dedupe ranges. A crash after the
    /// state write and before the offset commit only leaves the group's offset behind, and
    /// [`Partition::open`] takes the state's.
    pub async fn cut(
        &mut self,
        out: &Output<'_>,
        cut: i64,
        commit: impl FnOnce(i64) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        // A retry after the state was written (the offset commit failed) only commits again.
        if self.state.committed < cut {
            self.finish_staged()?;
            self.record_and_upload(out, cut).await?;
            let after = self.state_after(out, cut);
            out.timed("writing the partition state", self.claim.write(out.store, &after)).await?;
            self.state_written_at = Instant::now();
            self.cut_written(after, cut);
        }
        // Only now may the group move past these records.
        commit(cut)
    }

    /// Finishes one staged file at a time: a file that cannot be finished stays staged, so the
    /// cut can never go on with part of its files.
    fn finish_staged(&mut self) -> anyhow::Result<()> {
        while let Some((bucket, Staged { sink, file })) = self.staged.pop_first() {
            if let Err(e) = sink.finish() {
                let message = format!("{}: cannot finish staging file: {e}", file.path.display());
                self.sealed.push((bucket, file));
                return Err(StagingError(message).into());
            }
            self.sealed.push((bucket, file));
        }
        Ok(())
    }

    /// Records the cut as pending, then uploads its objects.
    async fn record_and_upload(&mut self, out: &Output<'_>, cut: i64) -> anyhow::Result<()> {
        let from = self.state.committed;
        // 1. Record the cut before any object of it exists (and learn whether we still own it).
        self.state.pending = Some(PendingCut { from, cut });
        out.timed("recording the cut", self.claim.write(out.store, &self.state)).await?;
        // 2. Upload. Names depend only on (topic, partition, first offset): a replay overwrites.
        let started = Instant::now();
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        for (bucket, s) in &self.sealed {
            let key = self.object_key(out, *bucket, s.first_offset);
            let body = std::fs::read(&s.path).map_err(|e| StagingError(format!("{}: {e}", s.path.display())))?;
            let bytes = body.len() as u64;
            let mut metadata = HashMap::from([
                (meta_key::ROWS.to_string(), s.rows.to_string()),
                (meta_key::PARTITION.to_string(), self.partition.to_string()),
                (meta_key::FIRST_OFFSET.to_string(), s.first_offset.to_string()),
                (meta_key::LAST_OFFSET.to_string(), s.last_offset.to_string()),
                (meta_key::MIN_TIME.to_string(), crate::format::rfc3339_micros(s.min_ns)),
                (meta_key::MAX_TIME.to_string(), crate::format::rfc3339_micros(s.max_ns)),
            ]);
            if let Bucket::Quarantine(reason, _) = bucket {
                metadata.insert(meta_key::QUARANTINE_REASON.to_string(), reason.as_str().to_string());
            }
            out.timed(&format!("upload {key}"), out.store.put(&key, body, content_type(out.format), metadata)).await?;
            metrics::counter!("tron_sink_objects_uploaded_total", "topic" => self.topic.clone()).increment(1);
            metrics::counter!("tron_sink_records_uploaded_total", "topic" => self.topic.clone()).increment(s.rows);
            metrics::counter!("tron_sink_bytes_uploaded_total", "topic" => self.topic.clone()).increment(bytes);
            if let Bucket::Hour(_) = bucket {
                metrics::histogram!("tron_sink_event_to_object_seconds")
                    .record((now_ns - s.min_ns).max(0) as f64 / 1e9);
            }
        }
        metrics::histogram!("tron_sink_upload_duration_seconds").record(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// The partition state once the cut at `cut` is in objects: nothing in `self` changes, so a
    /// state write that fails leaves the cut to be retried as it was.
    fn state_after(&self, out: &Output<'_>, cut: i64) -> PartitionState {
        let mut after = self.state.clone();
        for (bucket, _) in &self.sealed {
            if let Bucket::Hour(hour) = bucket {
                *after.hours.entry(*hour).or_default() += 1;
            }
        }
        after.committed = cut;
        after.pending = None;
        after.caught_up = false;
        let now_ms = chrono::Utc::now().timestamp_millis();
        after.as_of_ms = now_ms;
        let mut written = self.written.clone();
        written.expire(out.dedupe.forget_after.as_millis() as i64);
        after.written = written;
        // Watermark messages below the cut speak for records that are now all in objects.
        for (host, mark) in &self.hosts_read {
            HostMark::merge(&mut after.hosts, host, *mark);
        }
        after.hosts.retain(|_, m| m.reported_ms >= now_ms - HOSTS_KEPT_MS);
        for (host, first) in &self.unreported_read {
            let kept = after.hosts_unreported.entry(host.clone()).or_insert(*first);
            *kept = (*kept).min(*first);
        }
        // Kept for a day of Kafka time: long past `host_timeout`, after which the finalizer stops
        // waiting for such a host anyway.
        let (hosts, horizon) = (&after.hosts, self.read_kafka_ms.max(after.newest_kafka_ms) - HOSTS_KEPT_MS);
        after.hosts_unreported.retain(|host, first| !hosts.contains_key(host) && *first >= horizon);
        if self.tracked_read {
            after.tracked_seen_ms = now_ms;
        }
        if self.untracked_read {
            after.untracked_seen_ms = now_ms;
        }
        if self.staged_max_ns != i64::MIN {
            after.watermark_ms = after.watermark_ms.max(self.staged_max_ns / 1_000_000);
        }
        after.newest_kafka_ms = after.newest_kafka_ms.max(self.read_kafka_ms);
        after.hours.retain(|h, _| *h >= hours_kept_from(after.newest_kafka_ms, out.quarantine));
        after
    }

    /// The cut's state is written: it becomes this partition's, and the cut's staging goes.
    fn cut_written(&mut self, after: PartitionState, cut: i64) {
        let finished = std::mem::take(&mut self.sealed);
        metrics::counter!("tron_sink_cuts_total", "topic" => self.topic.clone()).increment(1);
        tracing::debug!(topic = %self.topic, partition = self.partition, from = self.state.committed, cut, objects = finished.len(), rows = finished.iter().map(|(_, s)| s.rows).sum::<u64>(), "cut written");
        self.written = after.written.clone();
        self.state = after;
        self.hosts_read.clear();
        self.unreported_read.clear();
        self.tracked_read = false;
        self.untracked_read = false;
        metrics::gauge!("tron_sink_dedupe_sources", "topic" => self.topic.clone(), "partition" => self.partition.to_string())
            .set(self.written.sources() as f64);
        self.forced_cut = None;
        self.records_since_cut = 0;
        self.bytes_since_cut = 0;
        self.first_staged_at = None;
        self.staged_max_ns = i64::MIN;
        self.next_offset = self.next_offset.max(cut);
        self.last_cut_at = Instant::now();
        for (_, s) in finished {
            let _ = std::fs::remove_file(&s.path);
        }
    }

    fn object_key(&self, out: &Output<'_>, bucket: Bucket, first_offset: i64) -> String {
        let name = format!("{}-{}-{first_offset:020}.{}.gz", self.topic, self.partition, out.format.ext());
        match bucket {
            Bucket::Hour(hour) => format!("{}{name}", out.layout.hour_dir(&self.topic, hour)),
            Bucket::Quarantine(reason, hour) => {
                let t = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default();
                let dir = format!(
                    "_tron/quarantine/{}/reason={}/{}/",
                    self.topic,
                    reason.as_str(),
                    t.format("dt=%Y-%m-%d/hr=%H")
                );
                crate::join_key(out.prefix, &format!("{dir}{name}"))
            }
        }
    }

    /// Publishes progress for the finalizer. Caught up means the consumer
    /// has read to the partition's end (`at_end`), nothing is staged or waiting to be replayed,
    /// and no message came for `idle_after` (so nothing fetched is still on its way to us). The
    /// caller throttles it with [`Partition::heartbeat_due`].
    pub async fn heartbeat(&mut self, out: &Output<'_>, roll: &RollConfig, at_end: bool) -> anyhow::Result<()> {
        let caught_up = at_end && self.quiet(roll);
        self.write_progress(out, caught_up).await
    }

    /// Nothing staged, no replay ahead and nothing read for `roll.idle_after`: only then can the
    /// partition be caught up, so only then is its end worth asking the broker for.
    pub fn quiet(&self, roll: &RollConfig) -> bool {
        self.staged.is_empty() && self.forced_cut.is_none() && self.last_message_at.elapsed() >= roll.idle_after
    }

    async fn write_progress(&mut self, out: &Output<'_>, caught_up: bool) -> anyhow::Result<()> {
        self.state.caught_up = caught_up;
        self.state.as_of_ms = chrono::Utc::now().timestamp_millis();
        out.timed("writing the partition state", self.claim.write(out.store, &self.state)).await?;
        self.state_written_at = Instant::now();
        Ok(())
    }

    /// Drops staged data (on revoke, or when the partition is given up): whoever owns it next
    /// re-reads it from the committed offset.
    pub fn discard(self) {
        for (_, Staged { sink, file }) in self.staged {
            drop(sink);
            let _ = std::fs::remove_file(&file.path);
        }
        for (_, file) in self.sealed {
            let _ = std::fs::remove_file(&file.path);
        }
    }

    pub fn has_staged(&self) -> bool {
        !self.staged.is_empty()
    }
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Csv => "text/csv",
        Format::Tsv => "text/tab-separated-values",
        Format::Ndjson => "application/x-ndjson",
    }
}

#[cfg(test)]
mod tests;

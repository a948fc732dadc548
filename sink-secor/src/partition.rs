//! One Kafka partition's staging and cuts.
//!
//! Records are appended to one gzip staging file per event hour. A cut closes every staging
//! file of the partition at one offset, so the committed offset is always a clean boundary: all
//! records below it are in uploaded objects, none above it are. Each cut is recorded (state
//! `pending`) before its objects are uploaded, and a replay honours it; together with object names
//! taken from first offsets this puts every record in exactly one object across crashes and
//! rebalances.

use crate::config::{Column, Format, RollConfig};
use crate::format::{RowSink, RowSource};
use crate::layout::Layout;
use crate::state::{self, PartitionState, PendingCut};
use crate::store::Store;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const HOUR_MS: i64 = 3_600_000;

pub struct Output<'a> {
    pub store: &'a Store,
    pub prefix: &'a str,
    pub layout: &'a Layout,
    pub format: Format,
    pub columns: &'a [Column],
    pub gzip_level: u32,
    pub staging: &'a Path,
}

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
    state: PartitionState,
    /// During a replay: the cut the crashed owner had started; no other cut may come first.
    forced_cut: Option<i64>,
    staged: BTreeMap<i64, Staged>,
    /// Files of a cut that is under way (finished, maybe partly uploaded). They stay until the
    /// commit succeeds, so a retried cut uploads them again instead of committing past them.
    sealed: Vec<(i64, StagedFile)>,
    records_since_cut: u64,
    bytes_since_cut: u64,
    first_staged_at: Option<Instant>,
    staged_max_ns: i64,
    next_offset: i64,
    pub last_message_at: Instant,
    state_written_at: Instant,
}

/// A message as the partition needs it.
pub struct Incoming<'a> {
    pub offset: i64,
    pub time_ns: i64,
    pub tag: &'a str,
    pub raw: &'a [u8],
}

impl Partition {
    /// `committed`: the group's committed offset, or the first offset consumed if none.
    pub async fn open(out: &Output<'_>, topic: &str, partition: i32, committed: i64) -> anyhow::Result<Self> {
        let previous = state::read(out.store, out.prefix, topic, partition).await?.unwrap_or_default();
        let forced_cut = match &previous.pending {
            Some(PendingCut { from, cut }) if *from == committed && *cut > committed => {
                tracing::info!(
                    topic,
                    partition,
                    committed,
                    cut,
                    "replaying an interrupted cut; cutting at the same offset"
                );
                Some(*cut)
            }
            _ => None,
        };
        let state = PartitionState { committed, pending: None, ..previous };
        Ok(Partition {
            topic: topic.to_string(),
            partition,
            state,
            forced_cut,
            staged: BTreeMap::new(),
            sealed: Vec::new(),
            records_since_cut: 0,
            bytes_since_cut: 0,
            first_staged_at: None,
            staged_max_ns: i64::MIN,
            next_offset: committed,
            last_message_at: Instant::now(),
            state_written_at: Instant::now() - Duration::from_secs(3600),
        })
    }

    pub fn committed(&self) -> i64 {
        self.state.committed
    }

    /// The cut a replay must make before this offset is appended, if any.
    pub fn forced_cut_before(&self, offset: i64) -> Option<i64> {
        self.forced_cut.filter(|cut| offset >= *cut)
    }

    pub fn append(&mut self, out: &Output<'_>, msg: &Incoming<'_>) -> anyhow::Result<()> {
        self.last_message_at = Instant::now();
        if msg.offset < self.state.committed {
            return Ok(()); // already in an object
        }
        let hour = msg.time_ns.div_euclid(HOUR_MS * 1_000_000);
        if !self.staged.contains_key(&hour) {
            let name = format!("{}-{}-{:020}.{}.gz", self.topic, self.partition, msg.offset, out.format.ext());
            let path = out.staging.join(name);
            let sink = RowSink::create(&path, out.format, out.gzip_level)
                .map_err(|e| anyhow::anyhow!("{}: cannot create staging file: {e}", path.display()))?;
            let file = StagedFile {
                path,
                first_offset: msg.offset,
                last_offset: msg.offset,
                rows: 0,
                min_ns: i64::MAX,
                max_ns: i64::MIN,
            };
            self.staged.insert(hour, Staged { sink, file });
        }
        let Staged { sink, file: staged } = self.staged.get_mut(&hour).expect("inserted above");
        let record: serde_json::Value = serde_json::from_slice(msg.raw).unwrap_or(serde_json::Value::Null);
        let src = RowSource {
            topic: &self.topic,
            partition: self.partition,
            offset: msg.offset,
            tag: msg.tag,
            time_ns: msg.time_ns,
            raw: msg.raw,
            record: &record,
        };
        let size = sink
            .write(out.columns, &src)
            .map_err(|e| anyhow::anyhow!("{}: cannot write staging file: {e}", staged.path.display()))?;
        staged.last_offset = msg.offset;
        staged.rows += 1;
        staged.min_ns = staged.min_ns.min(msg.time_ns);
        staged.max_ns = staged.max_ns.max(msg.time_ns);
        self.records_since_cut += 1;
        self.bytes_since_cut += size as u64;
        self.staged_max_ns = self.staged_max_ns.max(msg.time_ns);
        self.first_staged_at.get_or_insert_with(Instant::now);
        self.next_offset = msg.offset + 1;
        Ok(())
    }

    /// Where to cut now, if anywhere. During a replay only the recorded cut counts.
    pub fn cut_due(&self, roll: &RollConfig, lateness: Duration) -> Option<i64> {
        let idle = self.last_message_at.elapsed() >= roll.idle_after;
        if let Some(cut) = self.forced_cut {
            // Offsets may have gaps (transaction markers): once idle, nothing below the cut is left.
            return (self.next_offset >= cut || (idle && self.has_staged())).then_some(cut);
        }
        if self.staged.is_empty() {
            return None;
        }
        let oldest_hour_end_ns = (self.staged.keys().next().expect("non-empty") + 1) * HOUR_MS * 1_000_000;
        let hour_passed = self.staged_max_ns >= oldest_hour_end_ns + lateness.as_nanos() as i64;
        let full = self.records_since_cut >= roll.max_records || self.bytes_since_cut >= roll.max_bytes;
        let old = self.first_staged_at.is_some_and(|t| t.elapsed() >= roll.max_age);
        (full || old || idle || hour_passed).then_some(self.next_offset)
    }

    /// On shutdown everything staged is cut, unless a replayed cut is still ahead (then the
    /// staged records are dropped and replayed again next time).
    pub fn cut_for_shutdown(&self) -> Option<i64> {
        (self.has_staged() && self.forced_cut.is_none()).then_some(self.next_offset)
    }

    /// Uploads every staged file as one cut ending before `cut`, then commits `cut` via `commit`.
    pub async fn cut(
        &mut self,
        out: &Output<'_>,
        cut: i64,
        commit: impl FnOnce(i64) -> anyhow::Result<()>,
    ) -> anyhow::Result<()> {
        let from = self.state.committed;
        for (hour, Staged { sink, file }) in std::mem::take(&mut self.staged) {
            sink.finish().map_err(|e| anyhow::anyhow!("{}: cannot finish staging file: {e}", file.path.display()))?;
            self.sealed.push((hour, file));
        }
        // 1. Record the cut before any object of it exists.
        self.state.pending = Some(PendingCut { from, cut });
        state::write(out.store, out.prefix, &self.topic, self.partition, &self.state).await?;
        // 2. Upload. Names depend only on (topic, partition, first offset): a replay overwrites.
        let started = Instant::now();
        let now_ns = chrono::Utc::now().timestamp_nanos_opt().unwrap_or(0);
        for (hour, s) in &self.sealed {
            let key = object_key(out.layout, &self.topic, *hour, self.partition, s.first_offset, out.format);
            let body = std::fs::read(&s.path).map_err(|e| anyhow::anyhow!("{}: {e}", s.path.display()))?;
            let bytes = body.len() as u64;
            let metadata = HashMap::from([
                ("tron-rows".to_string(), s.rows.to_string()),
                ("tron-partition".to_string(), self.partition.to_string()),
                ("tron-first-offset".to_string(), s.first_offset.to_string()),
                ("tron-last-offset".to_string(), s.last_offset.to_string()),
                ("tron-min-time".to_string(), crate::format::rfc3339_micros(s.min_ns)),
                ("tron-max-time".to_string(), crate::format::rfc3339_micros(s.max_ns)),
            ]);
            out.store.put(&key, body, content_type(out.format), metadata).await?;
            metrics::counter!("tron_sink_objects_uploaded_total", "topic" => self.topic.clone()).increment(1);
            metrics::counter!("tron_sink_records_uploaded_total", "topic" => self.topic.clone()).increment(s.rows);
            metrics::counter!("tron_sink_bytes_uploaded_total", "topic" => self.topic.clone()).increment(bytes);
            metrics::histogram!("tron_sink_event_to_object_seconds").record((now_ns - s.min_ns).max(0) as f64 / 1e9);
        }
        metrics::histogram!("tron_sink_upload_duration_seconds").record(started.elapsed().as_secs_f64());
        // 3. Commit: only now may the group move past these records.
        commit(cut)?;
        // 4. Clear the intent and advance the watermark.
        let finished = std::mem::take(&mut self.sealed);
        for (hour, _) in &finished {
            *self.state.hours.entry(*hour).or_default() += 1;
        }
        self.state.committed = cut;
        self.state.pending = None;
        if self.staged_max_ns != i64::MIN {
            self.state.watermark_ms = self.state.watermark_ms.max(self.staged_max_ns / 1_000_000);
        }
        self.forced_cut = None;
        self.records_since_cut = 0;
        self.bytes_since_cut = 0;
        self.first_staged_at = None;
        self.staged_max_ns = i64::MIN;
        self.next_offset = self.next_offset.max(cut);
        self.write_progress(out).await?;
        for (_, s) in finished {
            let _ = std::fs::remove_file(&s.path);
        }
        Ok(())
    }

    /// Publishes progress for the finalizer: caught up when nothing is staged and the partition
    /// has been idle. Throttled to `every`.
    pub async fn heartbeat(&mut self, out: &Output<'_>, roll: &RollConfig, every: Duration) -> anyhow::Result<()> {
        if self.state_written_at.elapsed() < every {
            return Ok(());
        }
        self.write_progress_if(out, self.staged.is_empty() && self.last_message_at.elapsed() >= roll.idle_after).await
    }

    async fn write_progress(&mut self, out: &Output<'_>) -> anyhow::Result<()> {
        let caught_up = self.staged.is_empty() && self.last_message_at.elapsed() >= Duration::from_secs(1);
        self.write_progress_if(out, caught_up).await
    }

    async fn write_progress_if(&mut self, out: &Output<'_>, caught_up: bool) -> anyhow::Result<()> {
        self.state.caught_up = caught_up;
        self.state.as_of_ms = chrono::Utc::now().timestamp_millis();
        let keep_from = self.state.watermark_ms / HOUR_MS - 72;
        self.state.hours.retain(|h, _| *h >= keep_from);
        state::write(out.store, out.prefix, &self.topic, self.partition, &self.state).await?;
        self.state_written_at = Instant::now();
        Ok(())
    }

    /// Drops staged data (on revoke): the new owner re-reads it from the committed offset.
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

pub fn object_key(
    layout: &Layout,
    topic: &str,
    hour: i64,
    partition: i32,
    first_offset: i64,
    format: Format,
) -> String {
    format!("{}{topic}-{partition}-{first_offset:020}.{}.gz", layout.hour_dir(topic, hour), format.ext())
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Csv => "text/csv",
        Format::Tsv => "text/tab-separated-values",
        Format::Ndjson => "application/x-ndjson",
    }
}

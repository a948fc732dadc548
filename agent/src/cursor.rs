//! One file as one destination sees it: how far it has read, the batches sealed from it and which
//! of them are delivered, the batch being filled, and a multiline record held back.
//!
//! Batches complete out of order (several are in flight at once) but the checkpoint may only move
//! over a delivered prefix of the file: [`Ranges`] keeps that rule in one place.
//!
//! A read may cover more than a batch (a block shared with the other destinations is up to
//! 1 MiB, and a read crossing an hour closes a batch midway): the lines not yet added to a batch
//! wait in [`Pending`], so batches stop at the in-flight limit whatever the read covered.

use crate::destination::BatchMeta;
use crate::discover::TrackedFile;
use crate::multiline::Held;
use crate::shared_reads::{Line, Lines};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The batch a file's lines are being added to.
pub struct OpenBatch<B> {
    pub builder: B,
    pub meta: BatchMeta,
    pub started: Instant,
}

impl<B> OpenBatch<B> {
    pub fn new(builder: B, meta: BatchMeta) -> Self {
        OpenBatch { builder, meta, started: Instant::now() }
    }
}

pub struct Cursor<B> {
    pub file: Arc<TrackedFile>,
    /// Next byte to read.
    pub read: u64,
    pub ranges: Ranges,
    pub open: Option<OpenBatch<B>>,
    /// A multiline record read but held back until it is known to be complete.
    pub held: Option<Held>,
    /// Event time (ns) of the last record read: while the file is being written, its next
    /// lines are assumed no older than this, not "now" (`Shipper::low_watermark_ms`).
    pub last_time_ns: Option<i64>,
    /// Lines read from `read` on but not yet added to a batch.
    pub pending: Option<Pending>,
}

/// Lines read ahead of the batches: `lines[next..]`, the file from `at` on.
pub struct Pending {
    lines: Arc<Lines>,
    next: usize,
    at: u64,
    /// Where the read ended: the cursor's `read` once every line is taken.
    end: u64,
}

impl Pending {
    /// `lines` as read from `start` to `end` (or taken from another destination that read there).
    pub fn new(lines: Arc<Lines>, start: u64, end: u64) -> Self {
        Pending { lines, next: 0, at: start, end }
    }

    pub fn end(&self) -> u64 {
        self.end
    }

    /// The next line, the buffer its record's bytes lie in, and the bytes of the file it covers.
    pub fn take_line(&mut self) -> Option<(&Line, &[u8], usize)> {
        let Lines { lines, bytes } = &*self.lines;
        let line = lines.get(self.next)?;
        self.next += 1;
        // The last line takes what the read covered past it (nothing, normally).
        let to = if self.next == lines.len() { self.end.max(line.1) } else { line.1 };
        let covered = to.saturating_sub(self.at) as usize;
        self.at = to;
        Some((line, bytes, covered))
    }

    pub fn is_done(&self) -> bool {
        self.next >= self.lines.lines.len()
    }

    /// Bytes of the file the lines not yet taken cover (charged to the destination's buffer).
    pub fn bytes_left(&self) -> usize {
        self.end.saturating_sub(self.at) as usize
    }
}

impl<B> Cursor<B> {
    /// A cursor that reads, and counts as delivered, from `start`.
    pub fn new(file: Arc<TrackedFile>, start: u64) -> Self {
        Cursor {
            file,
            read: start,
            ranges: Ranges::new(start),
            open: None,
            held: None,
            last_time_ns: None,
            pending: None,
        }
    }

    /// The batch being filled, opened with `open` (given the offset it starts at, the read
    /// position) when there is none; true when it was opened now.
    pub fn open_batch(&mut self, open: impl FnOnce(u64) -> OpenBatch<B>) -> (&mut OpenBatch<B>, bool) {
        let opened = self.open.is_none();
        let read = self.read;
        (self.open.get_or_insert_with(|| open(read)), opened)
    }

    /// Nothing sealed waits for delivery, nothing is being filled, nothing read waits for a batch.
    pub fn is_settled(&self) -> bool {
        self.ranges.is_empty() && self.open.is_none() && self.pending.is_none()
    }

    /// Whether a record of event hour `hour` must go into a new batch (the open one holds records
    /// of another hour and the destination keeps hours apart).
    pub fn needs_new_batch(&self, hour: i64, split_by_hour: bool) -> bool {
        self.open.as_ref().is_some_and(|open| split_by_hour && open.meta.records > 0 && open.meta.hour != hour)
    }

    /// Whether the open batch has been open for `max_age`.
    pub fn open_for(&self, max_age: Duration) -> bool {
        self.open.as_ref().is_some_and(|open| open.started.elapsed() >= max_age)
    }

    /// Earliest event time (ns) of the records read and not delivered; i64::MAX when none.
    pub fn undelivered_min_time_ns(&self) -> i64 {
        let open = self.open.as_ref().map_or(i64::MAX, |o| o.meta.min_time_ns);
        open.min(self.ranges.undelivered_min_time_ns())
    }
}

struct SealedRange {
    end: u64,
    delivered: bool,
    /// Earliest event time (ns) of its records, for the low watermark.
    min_time_ns: i64,
}

/// The batches sealed from one file, by first offset, and the end of their delivered prefix.
pub struct Ranges {
    acked: u64,
    sealed: BTreeMap<u64, SealedRange>,
}

impl Ranges {
    pub fn new(acked: u64) -> Self {
        Ranges { acked, sealed: BTreeMap::new() }
    }

    /// Delivered up to here: every byte before it is in a delivered batch.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    pub fn is_empty(&self) -> bool {
        self.sealed.is_empty()
    }

    /// A batch was sealed; one without records (only empty lines) is done as it is.
    pub fn sealed(&mut self, meta: &BatchMeta) {
        let delivered = meta.records == 0;
        let min_time_ns = if delivered { i64::MAX } else { meta.min_time_ns };
        self.sealed.insert(meta.first_offset, SealedRange { end: meta.end_offset, delivered, min_time_ns });
    }

    pub fn delivered(&mut self, first_offset: u64) {
        if let Some(range) = self.sealed.get_mut(&first_offset) {
            range.delivered = true;
        }
    }

    /// Moves `acked` over the delivered batches at the front; true when it moved.
    pub fn advance(&mut self) -> bool {
        let before = self.acked;
        while let Some(entry) = self.sealed.first_entry() {
            if !entry.get().delivered {
                break;
            }
            self.acked = entry.get().end;
            entry.remove();
        }
        self.acked != before
    }

    fn undelivered_min_time_ns(&self) -> i64 {
        self.sealed.values().filter(|r| !r.delivered).map(|r| r.min_time_ns).min().unwrap_or(i64::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(first_offset: u64, end_offset: u64, records: u64, min_time_ns: i64) -> BatchMeta {
        BatchMeta {
            file_id: 1,
            path: "/var/log/app.log".into(),
            tag: "app".into(),
            first_offset,
            end_offset,
            hour: 0,
            records,
            raw_bytes: (end_offset - first_offset) as usize,
            min_time_ns,
        }
    }

    #[test]
    fn acked_moves_only_over_a_delivered_prefix() {
        let mut ranges = Ranges::new(100);
        ranges.sealed(&batch(100, 200, 5, 30));
        ranges.sealed(&batch(200, 300, 5, 10));
        ranges.sealed(&batch(300, 400, 5, 20));
        ranges.delivered(300);
        ranges.delivered(200);
        assert!(!ranges.advance(), "the first batch is not delivered: nothing moves");
        assert_eq!(ranges.acked(), 100);
        assert_eq!(ranges.undelivered_min_time_ns(), 30);
        ranges.delivered(100);
        assert!(ranges.advance());
        assert_eq!(ranges.acked(), 400);
        assert!(ranges.is_empty());
        assert_eq!(ranges.undelivered_min_time_ns(), i64::MAX);
    }

    #[test]
    fn a_batch_of_empty_lines_is_done_when_sealed() {
        let mut ranges = Ranges::new(0);
        ranges.sealed(&batch(0, 3, 0, i64::MAX));
        ranges.sealed(&batch(3, 50, 2, 7));
        assert!(ranges.advance());
        assert_eq!(ranges.acked(), 3);
        assert_eq!(ranges.undelivered_min_time_ns(), 7);
    }

    #[test]
    fn a_report_for_an_unknown_batch_changes_nothing() {
        let mut ranges = Ranges::new(0);
        ranges.sealed(&batch(0, 10, 1, 1));
        ranges.delivered(5);
        assert!(!ranges.advance());
        assert_eq!(ranges.acked(), 0);
    }
}

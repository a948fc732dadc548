//! Drops records already written. tron-agent re-sends what it cannot prove delivered: after a
//! crash it re-reads from its last saved checkpoint, after an ack time-out it re-sends the chunk,
//! and either way the relay writes the records to Kafka again. Every such record carries its
//! source (host and file identity) and its byte range there (Kafka headers, see
//! `tron_service::headers`), and the relay keys it by source, so all copies of a record land in
//! the same partition. Per partition we keep, for every source, the byte ranges already staged
//! or written; a record inside them is a duplicate and is dropped.
//!
//! The ranges are part of the partition state and move with it exactly like the committed
//! offset: the state written with a pending cut still holds the ranges as of the committed
//! offset, so a replayed cut decides the same records are new and writes the same objects.
//!
//! A re-sent chunk may arrive after later ones (a time-out), and re-reading after a crash may cut
//! batches differently, so this is a set of ranges, not a high-water mark. Consecutive records of
//! a file tile it, so the set of a source is one range in the normal case. It stays small:
//! ranges merge, at most [`MAX_RANGES_PER_SOURCE`] are kept per source (the lowest are
//! forgotten: a later copy of a record in them would be written again, no record is ever dropped
//! for it), and a source not seen for `dedupe.forget_after` (by Kafka timestamps, so a replay
//! forgets the same) is forgotten.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Ranges kept per source; a source fragmented beyond this (records of one file spread over
/// partitions by `kafka.key_field` on the relay) forgets its lowest ranges.
pub const MAX_RANGES_PER_SOURCE: usize = 64;

/// Where a record came from: its source and byte range there (the relay's record header).
pub type Position<'a> = tron_service::headers::Origin<'a>;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Written {
    /// Source → what of it is written.
    #[serde(default)]
    sources: BTreeMap<String, SourceRanges>,
    /// Newest Kafka timestamp (ms) seen: sources expire relative to it, not to the wall clock.
    #[serde(default)]
    newest_ms: i64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct SourceRanges {
    /// Kafka timestamp (ms) of the newest record of this source.
    last_ms: i64,
    /// Sorted, disjoint, non-adjacent `[start, end)` byte ranges.
    ranges: Vec<[u64; 2]>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    New,
    Duplicate,
}

impl Written {
    /// Whether the record at `pos` was written already; if not, it counts as written from now.
    pub fn admit(&mut self, pos: Position<'_>, kafka_ms: i64) -> Verdict {
        self.newest_ms = self.newest_ms.max(kafka_ms);
        let entry = match self.sources.get_mut(pos.source) {
            Some(e) => e,
            None => self.sources.entry(pos.source.to_string()).or_default(),
        };
        entry.last_ms = entry.last_ms.max(kafka_ms);
        let ranges = &mut entry.ranges;
        // The first range that ends at or after `start` is the only one that can contain it,
        // and the first that can merge with it.
        let first = ranges.partition_point(|r| r[1] < pos.start);
        if ranges.get(first).is_some_and(|r| r[0] <= pos.start && pos.end <= r[1]) {
            return Verdict::Duplicate;
        }
        let mut merged = [pos.start, pos.end];
        let mut last = first;
        while last < ranges.len() && ranges[last][0] <= pos.end {
            merged = [merged[0].min(ranges[last][0]), merged[1].max(ranges[last][1])];
            last += 1;
        }
        ranges.splice(first..last, [merged]);
        if ranges.len() > MAX_RANGES_PER_SOURCE {
            ranges.remove(0);
            metrics::counter!("tron_sink_dedupe_ranges_forgotten_total").increment(1);
        }
        Verdict::New
    }

    /// Forgets sources with no record within `keep_ms` of the newest Kafka timestamp seen.
    pub fn expire(&mut self, keep_ms: i64) {
        let horizon = self.newest_ms.saturating_sub(keep_ms);
        self.sources.retain(|_, s| s.last_ms >= horizon);
    }

    pub fn sources(&self) -> usize {
        self.sources.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(source: &str, start: u64, end: u64) -> Position<'_> {
        Position { source, start, end }
    }

    #[test]
    fn a_record_inside_what_was_written_is_a_duplicate() {
        let mut w = Written::default();
        assert_eq!(w.admit(at("h/1", 0, 10), 1), Verdict::New);
        assert_eq!(w.admit(at("h/1", 10, 25), 1), Verdict::New);
        assert_eq!(w.admit(at("h/1", 0, 10), 1), Verdict::Duplicate);
        assert_eq!(w.admit(at("h/1", 10, 25), 1), Verdict::Duplicate);
        assert_eq!(w.admit(at("h/2", 0, 10), 1), Verdict::New, "another source");
        assert_eq!(w.sources["h/1"].ranges, [[0, 25]], "adjacent ranges merge");
    }

    #[test]
    fn a_chunk_re_sent_after_later_ones_fills_its_gap_once() {
        let mut w = Written::default();
        w.admit(at("s", 0, 100), 1);
        w.admit(at("s", 200, 300), 1); // chunk 2 delivered, chunk 1 [100, 200) timed out
        assert_eq!(w.sources["s"].ranges, [[0, 100], [200, 300]]);
        assert_eq!(w.admit(at("s", 250, 300), 1), Verdict::Duplicate);
        assert_eq!(w.admit(at("s", 100, 150), 1), Verdict::New);
        assert_eq!(w.admit(at("s", 150, 200), 1), Verdict::New);
        assert_eq!(w.admit(at("s", 100, 150), 1), Verdict::Duplicate);
        assert_eq!(w.sources["s"].ranges, [[0, 300]]);
    }

    #[test]
    fn a_partial_overlap_is_written_never_dropped() {
        // A multiline record flushed early, then read whole after a restart: not the same record.
        let mut w = Written::default();
        w.admit(at("s", 0, 50), 1);
        assert_eq!(w.admit(at("s", 0, 80), 1), Verdict::New);
        assert_eq!(w.sources["s"].ranges, [[0, 80]]);
    }

    #[test]
    fn fragments_beyond_the_cap_forget_the_lowest_ranges() {
        let mut w = Written::default();
        for i in 0..(MAX_RANGES_PER_SOURCE as u64 + 5) {
            w.admit(at("s", i * 10, i * 10 + 5), 1);
        }
        assert_eq!(w.sources["s"].ranges.len(), MAX_RANGES_PER_SOURCE);
        assert_eq!(w.admit(at("s", 0, 5), 1), Verdict::New, "forgotten: written again rather than lost");
    }

    #[test]
    fn sources_expire_by_kafka_time() {
        let mut w = Written::default();
        w.admit(at("old", 0, 1), 1_000);
        w.admit(at("new", 0, 1), 90_000_000);
        w.expire(86_400_000);
        assert_eq!(w.sources.keys().collect::<Vec<_>>(), ["new"]);
    }

    #[test]
    fn old_headers_parse_strictly() {
        assert_eq!(Position::from_old_headers(Some(b"h/1"), Some(b"5-9")), Some(at("h/1", 5, 9)));
        for range in [&b"9-5"[..], b"5", b"a-9", b"-1-2"] {
            assert_eq!(Position::from_old_headers(Some(b"h/1"), Some(range)), None, "{range:?}");
        }
        assert_eq!(Position::from_old_headers(None, Some(b"5-9")), None);
    }

    /// The figure docs/exactly-once.md quotes: state per partition with 1,000 sources.
    #[test]
    fn state_size_with_a_thousand_sources() {
        let mut w = Written::default();
        for i in 0..1000u64 {
            let source =
                format!("app-server-{:04}.prod.example.com/{:016x}", i % 250, i.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            w.admit(at(&source, 1 << 20, (1 << 20) + 1_234_567), 1_779_000_000_000);
        }
        let bytes = serde_json::to_vec(&w).unwrap().len();
        println!("state of 1,000 sources: {bytes} bytes of JSON");
        assert!(bytes < 120_000, "{bytes}");
    }
}

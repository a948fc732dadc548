//! One hour's comparison: every `_id` seen in the archive and in GCS, counted per side, and what
//! follows from the counts (missing each way, duplicates, event → object latency).
//!
//! Memory is one entry per distinct id of the hour: a 16-byte key and a 24-byte value in a hash
//! table at most 7/8 full, about 48 bytes per id (10 million rows an hour: ~480 MB).

use serde::Serialize;
use std::collections::{BTreeMap, HashMap};

#[derive(Clone, Copy)]
struct Seen {
    archive: u32,
    gcs: u32,
    /// Event time (ms) as either side wrote it; `i64::MIN` when neither said.
    event_ms: i64,
    /// When the first GCS object holding it was written (ms); `i64::MAX` when not in GCS.
    in_gcs_ms: i64,
}

#[derive(Default)]
pub struct Tally {
    ids: HashMap<u128, Seen>,
    pub archive_rows: u64,
    pub gcs_rows: u64,
    pub archive_objects: u64,
    pub gcs_objects: u64,
    /// Rows that carry no id (clients other than tron-agent): counted, not compared.
    pub archive_rows_without_id: u64,
    pub gcs_rows_without_id: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Archive,
    Gcs,
}

/// Event time → the GCS object holding the row, over the hour's distinct ids in GCS.
#[derive(Debug, Serialize, PartialEq, Eq, Clone, Copy)]
pub struct Latency {
    pub p50_ms: i64,
    pub p99_ms: i64,
    pub max_ms: i64,
    pub ids: u64,
}

#[derive(Debug, Serialize, Clone)]
pub struct HourReport {
    pub topic: String,
    pub hour: String,
    pub archive_objects: u64,
    pub gcs_objects: u64,
    pub archive_rows: u64,
    pub gcs_rows: u64,
    pub archive_ids: u64,
    pub gcs_ids: u64,
    /// Ids in the archive and not in GCS: lines the warehouse does not have.
    pub missing_in_gcs: u64,
    /// Of those, the ones a relay dead-lettered (`--dead-letters`), by the relay's reason.
    pub missing_in_gcs_dead_lettered: BTreeMap<String, u64>,
    /// Ids in GCS and not in the archive.
    pub missing_in_archive: u64,
    /// Rows beyond the first of their id.
    pub gcs_duplicate_rows: u64,
    pub archive_duplicate_rows: u64,
    pub archive_rows_without_id: u64,
    pub gcs_rows_without_id: u64,
    /// Whether `_SUCCESS` was there when the hour was read.
    pub success: bool,
    pub latency: Option<Latency>,
}

impl HourReport {
    /// What makes the audit exit 1: a line missing on either side, or a row twice in GCS.
    pub fn failed(&self) -> bool {
        self.missing_in_gcs > 0 || self.missing_in_archive > 0 || self.gcs_duplicate_rows > 0
    }
}

impl Tally {
    /// One row; `id` as written (tron-agent's ids are 32 hex digits and are kept exactly; any
    /// other text is hashed to 128 bits).
    pub fn row(&mut self, side: Side, id: Option<&str>, event_ms: Option<i64>, object_ms: Option<i64>) {
        match side {
            Side::Archive => self.archive_rows += 1,
            Side::Gcs => self.gcs_rows += 1,
        }
        let Some(id) = id.filter(|id| !id.is_empty()) else {
            match side {
                Side::Archive => self.archive_rows_without_id += 1,
                Side::Gcs => self.gcs_rows_without_id += 1,
            }
            return;
        };
        let seen =
            self.ids.entry(id_key(id)).or_insert(Seen { archive: 0, gcs: 0, event_ms: i64::MIN, in_gcs_ms: i64::MAX });
        if let Some(t) = event_ms {
            if seen.event_ms == i64::MIN {
                seen.event_ms = t;
            }
        }
        match side {
            Side::Archive => seen.archive = seen.archive.saturating_add(1),
            Side::Gcs => {
                seen.gcs = seen.gcs.saturating_add(1);
                if let Some(t) = object_ms {
                    seen.in_gcs_ms = seen.in_gcs_ms.min(t);
                }
            }
        }
    }

    /// The hour's verdict; `dead_letters` are the relays' dead-lettered records (id → reason),
    /// which explain some of what is missing in GCS.
    pub fn report(self, topic: &str, hour: i64, success: bool, dead_letters: &DeadLetters) -> HourReport {
        let (mut archive_ids, mut gcs_ids, mut missing_in_gcs, mut missing_in_archive) = (0, 0, 0, 0);
        let mut missing_in_gcs_dead_lettered: BTreeMap<String, u64> = BTreeMap::new();
        let mut latencies = Vec::new();
        for (id, seen) in &self.ids {
            archive_ids += u64::from(seen.archive > 0);
            gcs_ids += u64::from(seen.gcs > 0);
            missing_in_gcs += u64::from(seen.archive > 0 && seen.gcs == 0);
            if seen.archive > 0 && seen.gcs == 0 {
                if let Some(reason) = dead_letters.reasons.get(id) {
                    *missing_in_gcs_dead_lettered.entry(reason.clone()).or_default() += 1;
                }
            }
            missing_in_archive += u64::from(seen.gcs > 0 && seen.archive == 0);
            if seen.gcs > 0 && seen.event_ms != i64::MIN && seen.in_gcs_ms != i64::MAX {
                // A clock ahead of the store's makes this negative; it counts as no delay.
                latencies.push((seen.in_gcs_ms - seen.event_ms).max(0));
            }
        }
        HourReport {
            topic: topic.to_string(),
            hour: crate::layout::format_hour(hour),
            archive_objects: self.archive_objects,
            gcs_objects: self.gcs_objects,
            archive_rows: self.archive_rows,
            gcs_rows: self.gcs_rows,
            archive_ids,
            gcs_ids,
            missing_in_gcs,
            missing_in_gcs_dead_lettered,
            missing_in_archive,
            gcs_duplicate_rows: self.gcs_rows - self.gcs_rows_without_id - gcs_ids,
            archive_duplicate_rows: self.archive_rows - self.archive_rows_without_id - archive_ids,
            archive_rows_without_id: self.archive_rows_without_id,
            gcs_rows_without_id: self.gcs_rows_without_id,
            success,
            latency: latency(latencies),
        }
    }
}

/// Records the relays could never write to Kafka (their `dead_letter.path` files, one JSON line
/// each: `{"reason", "tag", "topic", "peer", "event_time_ns", "record"}`), by line id.
#[derive(Default)]
pub struct DeadLetters {
    reasons: HashMap<u128, String>,
}

impl DeadLetters {
    /// Reads dead-letter files; a line that is not a dead-letter record is an error naming the
    /// file and the line. Records without an id (clients other than tron-agent) are skipped.
    pub fn read(paths: &[std::path::PathBuf], id_field: &str) -> anyhow::Result<Self> {
        let mut reasons = HashMap::new();
        for path in paths {
            let text =
                std::fs::read_to_string(path).map_err(|e| anyhow::anyhow!("--dead-letters {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
                let v: serde_json::Value = serde_json::from_str(line).map_err(|e| {
                    anyhow::anyhow!("--dead-letters {} line {}: not a dead-letter record: {e}", path.display(), n + 1)
                })?;
                let reason = v["reason"].as_str().ok_or_else(|| {
                    anyhow::anyhow!("--dead-letters {} line {}: no \"reason\"", path.display(), n + 1)
                })?;
                if let Some(id) = v["record"].get(id_field).and_then(|i| i.as_str()) {
                    reasons.insert(id_key(id), reason.to_string());
                }
            }
        }
        Ok(DeadLetters { reasons })
    }
}

fn id_key(id: &str) -> u128 {
    if id.len() == 32 {
        if let Ok(v) = u128::from_str_radix(id, 16) {
            return v;
        }
    }
    xxhash_rust::xxh3::xxh3_128(id.as_bytes())
}

/// Nearest-rank percentiles: the smallest value with at least p% of the values at or below it.
fn latency(mut ms: Vec<i64>) -> Option<Latency> {
    if ms.is_empty() {
        return None;
    }
    ms.sort_unstable();
    let rank = |p: f64| ms[((p / 100.0 * ms.len() as f64).ceil() as usize).clamp(1, ms.len()) - 1];
    Some(Latency {
        p50_ms: rank(50.0),
        p99_ms: rank(99.0),
        max_ms: *ms.last().expect("not empty"),
        ids: ms.len() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: [&str; 4] = [
        "0000000000000000000000000000000a",
        "0000000000000000000000000000000b",
        "0000000000000000000000000000000c",
        "not-an-agent-id",
    ];

    #[test]
    fn counts_missing_and_duplicates_each_way() {
        let mut t = Tally::default();
        for id in &ID[..3] {
            t.row(Side::Archive, Some(id), Some(0), None);
        }
        t.row(Side::Archive, Some(ID[0]), Some(0), None); // the archive has a line twice
        t.row(Side::Gcs, Some(ID[0]), None, Some(5));
        t.row(Side::Gcs, Some(ID[0]), None, Some(9)); // and GCS has it twice
        t.row(Side::Gcs, Some(ID[3]), None, Some(5)); // only in GCS
        t.row(Side::Gcs, None, None, Some(5)); // no id: counted, not compared
        let dead = DeadLetters { reasons: HashMap::from([(id_key(ID[1]), "Message size too large".to_string())]) };
        let r = t.report("t", 494_187, true, &dead);
        assert_eq!((r.archive_rows, r.gcs_rows), (4, 4));
        assert_eq!((r.archive_ids, r.gcs_ids), (3, 2));
        assert_eq!((r.missing_in_gcs, r.missing_in_archive), (2, 1));
        assert_eq!(r.missing_in_gcs_dead_lettered, BTreeMap::from([("Message size too large".to_string(), 1)]));
        assert_eq!((r.archive_duplicate_rows, r.gcs_duplicate_rows, r.gcs_rows_without_id), (1, 1, 1));
        assert!(r.failed());
        // Only ID[0] has an event time and a GCS object: its first copy, 5 ms after the event.
        assert_eq!(r.latency, Some(Latency { p50_ms: 5, p99_ms: 5, max_ms: 5, ids: 1 }));
        assert_eq!(r.hour, "2026-05-18T03");
    }

    #[test]
    fn percentiles_are_nearest_rank() {
        // 1..=200 ms: p50 is the 100th value, p99 the 198th.
        let l = latency((1..=200).rev().collect()).unwrap();
        assert_eq!(l, Latency { p50_ms: 100, p99_ms: 198, max_ms: 200, ids: 200 });
        assert_eq!(latency(vec![7]).unwrap(), Latency { p50_ms: 7, p99_ms: 7, max_ms: 7, ids: 1 });
        assert_eq!(latency(vec![]), None);
    }

    #[test]
    fn a_clean_hour_passes() {
        let mut t = Tally::default();
        for id in &ID {
            t.row(Side::Archive, Some(id), Some(1_000), None);
            t.row(Side::Gcs, Some(id), None, Some(61_000));
        }
        let r = t.report("t", 0, true, &DeadLetters::default());
        assert!(!r.failed(), "{r:?}");
        assert_eq!(r.latency.unwrap().p99_ms, 60_000);
    }
}

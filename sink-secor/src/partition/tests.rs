//! Cut boundaries, replays, quarantine, pacing and the fence, against a directory store.

use super::*;
use crate::config::{Column, ColumnSource, Format, QuarantineConfig, RollConfig};
use crate::dedupe::Position;
use crate::layout::{Layout, DEFAULT_TEMPLATE};
use crate::store::{Fenced, Store};
use std::cell::Cell;

const HOUR: i64 = 3_600_000_000_000;
/// 2026-05-18T03:00Z in ns.
const T0: i64 = 494_187 * HOUR;

struct Fixture {
    _dir: tempfile::TempDir,
    store: Store,
    layout: Layout,
    staging: PathBuf,
    columns: Vec<Column>,
    quarantine: QuarantineConfig,
    dedupe: crate::config::DedupeConfig,
}

impl Fixture {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let staging = dir.path().join("staging");
        std::fs::create_dir_all(&staging).unwrap();
        let store = Store::Dir(dir.path().join("bucket"));
        Fixture {
            store,
            layout: Layout::new("", DEFAULT_TEMPLATE, &Default::default()),
            staging,
            columns: vec![Column {
                name: "seq".into(),
                source: ColumnSource::Field("seq".into()),
                kind: "INTEGER".into(),
            }],
            quarantine: QuarantineConfig::default(),
            dedupe: Default::default(),
            _dir: dir,
        }
    }

    fn out<'a>(&'a self, instance: &'a str) -> Output<'a> {
        Output {
            store: &self.store,
            prefix: "",
            layout: &self.layout,
            format: Format::Csv,
            columns: &self.columns,
            gzip_level: 1,
            staging: &self.staging,
            quarantine: &self.quarantine,
            dedupe: &self.dedupe,
            request_timeout: Duration::from_secs(10),
            instance,
            beat: None,
        }
    }

    /// Every uploaded data object: name → rows.
    async fn objects(&self) -> BTreeMap<String, Vec<String>> {
        let mut out = BTreeMap::new();
        for o in self.store.list("").await.unwrap() {
            if o.name.starts_with("_tron/state") {
                continue;
            }
            let gz = self.store.get(&o.name).await.unwrap().unwrap();
            let mut text = String::new();
            use std::io::Read;
            flate2::read::GzDecoder::new(&gz[..]).read_to_string(&mut text).unwrap();
            out.insert(o.name, text.lines().map(str::to_string).collect());
        }
        out
    }
}

fn raw(seq: i64) -> Vec<u8> {
    format!("{{\"seq\":{seq}}}").into_bytes()
}

fn msg(offset: i64, event_ns: i64, raw: &[u8]) -> Incoming<'_> {
    Incoming {
        offset,
        event_time_ns: Some(event_ns),
        kafka_time_ms: Some(event_ns / 1_000_000),
        tag: "t",
        raw,
        position: None,
        is_watermark: false,
    }
}

/// A record line `seq` of source "h/1", each line 10 bytes.
fn from_file(offset: i64, seq: i64, raw: &[u8]) -> Incoming<'_> {
    let start = seq as u64 * 10;
    Incoming { position: Some(Position { source: "h/1", start, end: start + 10 }), ..msg(offset, T0, raw) }
}

fn roll() -> RollConfig {
    RollConfig { idle_after: Duration::from_secs(3600), max_age: Duration::from_secs(3600), ..RollConfig::default() }
}

fn no_commit(_: i64) -> anyhow::Result<()> {
    Ok(())
}

/// Cuts at `cut` with a commit that succeeds; returns the offset committed.
async fn cut_and_commit(p: &mut Partition, out: &Output<'_>, cut: i64) -> i64 {
    let committed = Cell::new(-1);
    p.cut(out, cut, |o| {
        committed.set(o);
        Ok(())
    })
    .await
    .unwrap();
    committed.get()
}

/// An owner that records the cut and uploads its objects, then dies before the state write.
async fn upload_and_die(p: &mut Partition, out: &Output<'_>, cut: i64) {
    p.finish_staged().unwrap();
    p.record_and_upload(out, cut).await.unwrap();
    for (_, file) in std::mem::take(&mut p.sealed) {
        let _ = std::fs::remove_file(&file.path);
    }
}

#[tokio::test]
async fn a_cut_uploads_each_hour_once_and_commits_its_end() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    for i in 0..4 {
        let r = raw(i);
        p.append(&out, &msg(i, T0 + i * HOUR / 2, &r), Instant::now()).unwrap();
    }
    assert_eq!(cut_and_commit(&mut p, &out, 4).await, 4);
    let objects = f.objects().await;
    assert_eq!(
        objects.iter().map(|(k, v)| (k.as_str(), v.len())).collect::<Vec<_>>(),
        [
            ("t/dt=2026-05-18/hr=03/t-0-00000000000000000000.csv.gz", 2),
            ("t/dt=2026-05-18/hr=04/t-0-00000000000000000002.csv.gz", 2)
        ]
    );
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!((state.committed, state.pending, state.hours.len()), (4, None, 2));
}

#[tokio::test]
async fn a_replayed_cut_waits_for_every_record_below_it_not_for_idleness() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut a = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    for i in 0..6 {
        let r = raw(i);
        a.append(&out, &msg(i, T0, &r), Instant::now()).unwrap();
    }
    // The owner records the cut at 6, uploads it and dies before writing the state.
    upload_and_die(&mut a, &out, 6).await;
    let out_b = f.out("b");
    let mut b = Partition::open(&out_b, "t", 0, 0, 2).await.unwrap();
    let idle = RollConfig { idle_after: Duration::ZERO, ..roll() };
    assert_eq!(b.cut_due(&idle, Duration::ZERO), None);
    for i in 0..3 {
        let r = raw(i);
        b.append(&out_b, &msg(i, T0, &r), Instant::now()).unwrap();
    }
    // Idle, half of [0, 6) staged: no cut, whatever the idleness.
    assert_eq!(b.cut_due(&idle, Duration::ZERO), None);
    for i in 3..6 {
        let r = raw(i);
        b.append(&out_b, &msg(i, T0, &r), Instant::now()).unwrap();
    }
    assert_eq!(b.cut_due(&idle, Duration::ZERO), Some(6));
    b.cut(&out_b, 6, no_commit).await.unwrap();
    let objects = f.objects().await;
    assert_eq!(objects.len(), 1, "the replay rewrote the same object: {objects:?}");
    assert_eq!(objects.values().next().unwrap().len(), 6);
}

#[tokio::test]
async fn records_re_sent_by_an_agent_are_dropped_across_cuts_and_replays() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut a = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    // Lines 0..4, then the agent crashes and re-sends lines 2..6 (offsets 4..8).
    for (offset, seq) in [(0, 0), (1, 1), (2, 2), (3, 3)] {
        let r = raw(seq);
        a.append(&out, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    a.cut(&out, 4, no_commit).await.unwrap();
    for (offset, seq) in [(4, 2), (5, 3), (6, 4), (7, 5)] {
        let r = raw(seq);
        a.append(&out, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    // The owner records the cut at 8, uploads it and dies before writing the state.
    upload_and_die(&mut a, &out, 8).await;
    // The next owner replays [4, 8) from the state as of offset 4: the same two rows are new.
    let out_b = f.out("b");
    let mut b = Partition::open(&out_b, "t", 0, 4, 2).await.unwrap();
    for (offset, seq) in [(4, 2), (5, 3), (6, 4), (7, 5)] {
        let r = raw(seq);
        b.append(&out_b, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    b.cut(&out_b, 8, no_commit).await.unwrap();
    // Only duplicates after that: nothing to upload, but an idle cut commits past them.
    let r = raw(5);
    b.append(&out_b, &from_file(8, 5, &r), Instant::now()).unwrap();
    let idle = RollConfig { idle_after: Duration::ZERO, ..roll() };
    assert_eq!(b.cut_due(&idle, Duration::ZERO), Some(9));
    b.cut(&out_b, 9, no_commit).await.unwrap();
    let rows: Vec<String> = f.objects().await.into_values().flatten().filter(|r| r != "seq").collect();
    assert_eq!(rows, ["0", "1", "2", "3", "4", "5"]);
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!((state.committed, state.written.sources()), (9, 1));
}

#[tokio::test]
async fn a_revoked_and_reassigned_partition_never_shares_staging_files() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut old = Partition::open(&out, "t", 1, 0, 1).await.unwrap();
    let mut new = Partition::open(&out, "t", 1, 0, 2).await.unwrap();
    let r = raw(0);
    old.append(&out, &msg(0, T0, &r), Instant::now()).unwrap();
    new.append(&out, &msg(0, T0, &r), Instant::now()).unwrap();
    old.discard(); // the revoked incarnation deletes its files
    new.cut(&out, 1, no_commit).await.unwrap();
    assert_eq!(f.objects().await.values().map(Vec::len).sum::<usize>(), 1);
}

#[tokio::test]
async fn an_owner_that_lost_the_partition_is_fenced_before_it_uploads() {
    let f = Fixture::new();
    let (out_a, out_b) = (f.out("a"), f.out("b"));
    let mut zombie = Partition::open(&out_a, "t", 0, 0, 1).await.unwrap();
    for i in 0..5 {
        let r = raw(i);
        zombie.append(&out_a, &msg(i, T0, &r), Instant::now()).unwrap();
    }
    // The group moved the partition: the new owner claims it, cuts [0, 3) and commits.
    let mut owner = Partition::open(&out_b, "t", 0, 0, 1).await.unwrap();
    for i in 0..3 {
        let r = raw(i);
        owner.append(&out_b, &msg(i, T0, &r), Instant::now()).unwrap();
    }
    owner.cut(&out_b, 3, no_commit).await.unwrap();
    let before = f.objects().await;
    // The zombie wakes up and cuts [0, 5): refused before any object is written.
    let committed = Cell::new(false);
    let err = zombie
        .cut(&out_a, 5, |_| {
            committed.set(true);
            Ok(())
        })
        .await
        .unwrap_err();
    assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
    assert!(!committed.get());
    assert_eq!(f.objects().await, before, "no object of the zombie landed");
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!((state.owner.instance.as_str(), state.committed), ("b", 3));
}

#[tokio::test]
async fn odd_event_times_are_quarantined_and_never_move_the_watermark() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    let year_2100 = 4_102_444_800_000_000_000i64;
    let cases = [(T0, Some(T0 / 1_000_000)), (year_2100, Some(T0 / 1_000_000)), (0, Some(T0 / 1_000_000))];
    for (i, (event, kafka)) in cases.iter().enumerate() {
        let r = raw(i as i64);
        p.append(
            &out,
            &Incoming {
                offset: i as i64,
                event_time_ns: Some(*event),
                kafka_time_ms: *kafka,
                tag: "t",
                raw: &r,
                position: None,
                is_watermark: false,
            },
            Instant::now(),
        )
        .unwrap();
    }
    let r = raw(3);
    p.append(
        &out,
        &Incoming {
            offset: 3,
            event_time_ns: None,
            kafka_time_ms: None,
            tag: "t",
            raw: &r,
            position: None,
            is_watermark: false,
        },
        Instant::now(),
    )
    .unwrap();
    p.cut(&out, 4, no_commit).await.unwrap();
    let names: Vec<String> = f.objects().await.into_keys().collect();
    assert_eq!(
        names,
        [
            "_tron/quarantine/t/reason=no_time/dt=1970-01-01/hr=00/t-0-00000000000000000003.csv.gz",
            "_tron/quarantine/t/reason=too_new/dt=2026-05-18/hr=03/t-0-00000000000000000001.csv.gz",
            "_tron/quarantine/t/reason=too_old/dt=2026-05-18/hr=03/t-0-00000000000000000002.csv.gz",
            "t/dt=2026-05-18/hr=03/t-0-00000000000000000000.csv.gz",
        ]
    );
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!(state.watermark_ms, T0 / 1_000_000);
    assert_eq!(state.hours.keys().copied().collect::<Vec<_>>(), [T0 / HOUR]);
}

#[tokio::test]
async fn an_old_hour_interleaved_with_the_current_one_cuts_at_most_once_per_min_interval() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    let paced = RollConfig { min_interval: Duration::from_secs(3600), ..roll() };
    let mut cuts = 0;
    for i in 0..40 {
        let event = if i % 2 == 0 { T0 } else { T0 + 3 * HOUR };
        let r = raw(i);
        p.append(&out, &msg(i, event, &r), Instant::now()).unwrap();
        if let Some(cut) = p.cut_due(&paced, Duration::ZERO) {
            p.cut(&out, cut, no_commit).await.unwrap();
            cuts += 1;
        }
    }
    assert_eq!(cuts, 1, "the first switch cuts; the next ones wait for min_interval");
    let unpaced = RollConfig { min_interval: Duration::ZERO, ..roll() };
    assert!(p.cut_due(&unpaced, Duration::ZERO).is_some());
}

#[tokio::test]
async fn a_stop_between_the_state_write_and_the_offset_commit_loses_neither_hour_counts_nor_dedupe_ranges() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut a = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    for (offset, seq) in [(0, 0), (1, 1), (2, 2)] {
        let r = raw(seq);
        a.append(&out, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    // The state is written, then the process dies before the group's offset moves.
    a.cut(&out, 3, |_| anyhow::bail!("killed before the offset commit")).await.unwrap_err();
    drop(a);
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!((state.committed, state.pending, state.hours.len()), (3, None, 1));
    // The next owner finds the group at offset 0 and goes on from the state's 3: the hour still
    // counts its object, and lines 0..3 re-sent by the agent are duplicates.
    let out_b = f.out("b");
    let mut b = Partition::open(&out_b, "t", 0, 0, 2).await.unwrap();
    assert_eq!(b.committed(), 3);
    for (offset, seq) in [(0, 0), (1, 1), (2, 2)] {
        let r = raw(seq);
        b.append(&out_b, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    assert!(!b.has_staged(), "below the state's offset: already in an object");
    for (offset, seq) in [(3, 1), (4, 2), (5, 3)] {
        let r = raw(seq);
        b.append(&out_b, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    assert_eq!(cut_and_commit(&mut b, &out_b, 6).await, 6);
    let rows: Vec<String> = f.objects().await.into_values().flatten().filter(|r| r != "seq").collect();
    assert_eq!(rows, ["0", "1", "2", "3"], "each line once");
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!(state.hours.values().sum::<u64>(), 2, "both objects of the hour counted");
}

#[tokio::test]
async fn a_retried_commit_after_the_state_write_only_commits() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    let r = raw(0);
    p.append(&out, &msg(0, T0, &r), Instant::now()).unwrap();
    p.cut(&out, 1, |_| anyhow::bail!("broker away")).await.unwrap_err();
    let state_key = crate::state::key("", "t", 0);
    let written = f.store.get(&state_key).await.unwrap();
    assert_eq!(cut_and_commit(&mut p, &out, 1).await, 1);
    assert_eq!(f.store.get(&state_key).await.unwrap(), written, "no second write");
    assert_eq!(f.objects().await.len(), 1);
}

#[tokio::test]
async fn an_hour_days_old_keeps_its_count_while_its_records_can_still_arrive() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    // Current traffic, then an agent back after four days: Kafka stamps its lines now.
    let now = T0 + 100 * HOUR;
    let r = raw(0);
    p.append(&out, &msg(0, now, &r), Instant::now()).unwrap();
    let four_days_ago = now - 96 * HOUR;
    let late = Incoming { kafka_time_ms: Some(now / 1_000_000), ..msg(1, four_days_ago, &r) };
    p.append(&out, &late, Instant::now()).unwrap();
    p.cut(&out, 2, no_commit).await.unwrap();
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    let late_hour = four_days_ago / HOUR;
    assert_eq!(state.hours.get(&late_hour), Some(&1), "{:?}", state.hours);
    // Past quarantine.max_past (7 days) of Kafka time, no record can land in it: pruned.
    let much_later = now + 8 * 24 * HOUR;
    p.append(&out, &msg(2, much_later, &r), Instant::now()).unwrap();
    p.cut(&out, 3, no_commit).await.unwrap();
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!(state.hours.keys().copied().collect::<Vec<_>>(), [much_later / HOUR]);
}

#[tokio::test]
async fn a_host_with_records_and_no_report_yet_is_kept_until_its_first_report() {
    let f = Fixture::new();
    let out = f.out("a");
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    for (offset, seq) in [(0, 0), (1, 1)] {
        let r = raw(seq);
        p.append(&out, &from_file(offset, seq, &r), Instant::now()).unwrap();
    }
    assert_eq!(cut_and_commit(&mut p, &out, 2).await, 2);
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert_eq!(state.hosts_unreported.keys().collect::<Vec<_>>(), ["h"], "the host of source h/1");
    let now = chrono::Utc::now().timestamp_millis();
    let report = format!(r#"{{"tron_watermarks": {{"h": [{now}, {now}]}}}}"#).into_bytes();
    p.append(&out, &Incoming { is_watermark: true, ..msg(2, T0, &report) }, Instant::now()).unwrap();
    assert_eq!(cut_and_commit(&mut p, &out, 3).await, 3);
    let state = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert!(state.hosts_unreported.is_empty() && state.hosts.contains_key("h"), "{state:?}");
}

#[tokio::test]
async fn a_stored_caught_up_is_withdrawn_at_the_first_message_after_it() {
    let f = Fixture::new();
    let out = f.out("a");
    let roll = RollConfig { idle_after: Duration::ZERO, ..roll() };
    let every = Duration::from_secs(3600);
    let mut p = Partition::open(&out, "t", 0, 0, 1).await.unwrap();
    p.heartbeat(&out, &roll, true).await.unwrap();
    let stored = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert!(stored.caught_up);
    assert!(!p.heartbeat_due(every), "nothing came: the next heartbeat waits its interval");
    let r = raw(1);
    p.append(&out, &msg(0, T0, &r), Instant::now()).unwrap();
    assert!(p.heartbeat_due(every), "a message came after the caught-up state: it must be withdrawn now");
    p.heartbeat(&out, &roll, true).await.unwrap();
    let stored = crate::state::read(&f.store, "", "t", 0).await.unwrap().unwrap();
    assert!(!stored.caught_up, "a partition with a staged record reported caught up");
    assert!(!p.heartbeat_due(every), "withdrawn once: back to the interval");
}

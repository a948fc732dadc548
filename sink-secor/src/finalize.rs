//! Marks an hour complete and writes `_manifest.json` (objects, rows, bytes, event-time range,
//! offset ranges, how the hour was decided) and `_SUCCESS`. Objects that arrive later add a new
//! manifest revision and count as late.
//!
//! Two rules (docs/completeness.md):
//! - **Watermarks** (tron-agent traffic): every agent that reported within `host_timeout` has, on
//!   every partition, a committed watermark past the hour's end plus lateness: each of its lines
//!   of the hour is then in an object. Agents that stopped reporting no longer block and are
//!   listed as stale.
//! - **Event time** (clients without watermarks: Fluent Bit, fluent-logger, Docker): every
//!   partition's highest committed event time is past the hour's end plus lateness, or it was
//!   caught up after that time. A guess that breaks when sources are not in step, so it applies
//!   only where such clients sent records recently; when both kinds did, both rules must hold.

use crate::config::FinalizeConfig;
use crate::layout::Layout;
use crate::partition::{meta_key, HOUR_MS};
use crate::state::{self, PartitionState};
use crate::store::Store;
use serde_json::json;
use std::collections::BTreeSet;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

/// How late the oldest hour still waiting is, for the "hour not finalized on time" alert: its
/// start (0 when none waits) and the seconds past its due time, hour end + `lateness` (0 when
/// none is due yet).
fn export_oldest_waiting(topic: &str, oldest: Option<i64>, lateness_ms: i64, now_ms: i64) {
    let (start_s, overdue_s) = oldest_waiting(oldest, lateness_ms, now_ms);
    metrics::gauge!("tron_sink_oldest_waiting_hour_timestamp_seconds", "topic" => topic.to_string())
        .set(start_s as f64);
    metrics::gauge!("tron_sink_hour_overdue_seconds", "topic" => topic.to_string()).set(overdue_s as f64);
}

/// (start of the oldest waiting hour, seconds it is past hour end + lateness), both in seconds.
fn oldest_waiting(oldest: Option<i64>, lateness_ms: i64, now_ms: i64) -> (i64, i64) {
    match oldest {
        Some(hour) => (hour * HOUR_MS / 1000, (now_ms - (hour + 1) * HOUR_MS - lateness_ms).max(0) / 1000),
        None => (0, 0),
    }
}

#[derive(Default)]
pub struct Finalizer {
    /// (topic, hour) → objects known when last finalized, to skip unchanged hours.
    done: HashMap<(String, i64), u64>,
    /// Topics whose every agent is silent (logged when it starts and ends).
    all_silent: BTreeSet<String>,
}

/// One hour as `tron-sink-secor hours` shows it.
#[derive(Debug, serde::Serialize)]
pub struct HourStatus {
    pub hour: String,
    /// Objects uploaded for the hour so far (from the partitions' states).
    pub objects: u64,
    /// Rows, from the manifest once the hour is finalized.
    pub rows: Option<u64>,
    pub finalized: bool,
    /// The manifest's `completeness` when finalized, else what the rules say now.
    pub decision: serde_json::Value,
    /// Hosts holding the hour back: (host, its last watermark, when it last reported), RFC 3339.
    pub holding: Vec<(String, String, String)>,
}

/// Every hour the partitions' states still count, finalized or not, oldest first.
pub async fn hours(
    store: &Store,
    prefix: &str,
    layout: &Layout,
    topic: &str,
    cfg: &FinalizeConfig,
) -> anyhow::Result<Vec<HourStatus>> {
    let mut states = Vec::new();
    while let Some(s) = state::read(store, prefix, topic, states.len() as i32).await? {
        states.push(s);
    }
    anyhow::ensure!(
        !states.is_empty(),
        "no partition state for topic {topic:?} under {prefix:?}: is the sink running?"
    );
    let mut hours: BTreeMap<i64, u64> = BTreeMap::new();
    for s in &states {
        for (h, n) in &s.hours {
            *hours.entry(*h).or_default() += n;
        }
    }
    let rules = Rules::of(&states, chrono::Utc::now().timestamp_millis(), cfg.host_timeout);
    let time = |ms: i64| {
        chrono::DateTime::from_timestamp_millis(ms)
            .unwrap_or_default()
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    };
    let mut out = Vec::new();
    for (hour, objects) in hours {
        let deadline = (hour + 1) * HOUR_MS + cfg.lateness.as_millis() as i64;
        let dir = layout.hour_dir(topic, hour);
        let manifest: Option<Manifest> =
            store.get(&format!("{dir}_manifest.json")).await?.and_then(|b| serde_json::from_slice(&b).ok());
        let finalized = store.get(&format!("{dir}_SUCCESS")).await?.is_some();
        let decision = match (&manifest, rules.complete(&states, deadline)) {
            (Some(m), _) if finalized => m.completeness.clone(),
            (_, Some(d)) => d,
            (_, None) => json!({"rule": "waiting", "all_hosts_silent": rules.all_silent}),
        };
        let holding = if finalized {
            Vec::new()
        } else {
            rules
                .holding(&states, deadline)
                .into_iter()
                .map(|h| {
                    let marks = states.iter().filter_map(|s| s.hosts.get(&h));
                    let w = marks.clone().map(|m| m.watermark_ms).min();
                    let r = marks.map(|m| m.reported_ms).max();
                    // A host known only from its records has not reported yet.
                    let (w, r) = (w.map_or("no report yet".to_string(), time), r.map_or("-".to_string(), time));
                    (h, w, r)
                })
                .collect()
        };
        let label = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default().format("%Y-%m-%dT%H");
        let rows = manifest.as_ref().map(|m| m.rows);
        out.push(HourStatus { hour: label.to_string(), objects, rows, finalized, decision, holding });
    }
    Ok(out)
}

impl Finalizer {
    pub async fn run_once(
        &mut self,
        store: &Store,
        prefix: &str,
        layout: &Layout,
        topic: &str,
        partitions: i32,
        cfg: &FinalizeConfig,
    ) -> anyhow::Result<()> {
        let mut states: Vec<PartitionState> = Vec::with_capacity(partitions as usize);
        for p in 0..partitions {
            match state::read(store, prefix, topic, p).await? {
                Some(s) => states.push(s),
                None => return Ok(()), // a partition nobody has reported on yet holds every hour back
            }
        }
        let mut hours: BTreeMap<i64, u64> = BTreeMap::new();
        for s in &states {
            for (h, n) in &s.hours {
                *hours.entry(*h).or_default() += n;
            }
        }
        let lateness_ms = cfg.lateness.as_millis() as i64;
        let rules = Rules::of(&states, chrono::Utc::now().timestamp_millis(), cfg.host_timeout);
        let (mut waiting, mut holding) = (0u64, BTreeSet::new());
        let mut oldest_waiting: Option<i64> = None;
        for (hour, uploaded) in hours {
            if self.done.get(&(topic.to_string(), hour)) == Some(&uploaded) {
                continue;
            }
            let deadline = (hour + 1) * HOUR_MS + lateness_ms;
            let Some(decision) = rules.complete(&states, deadline) else {
                waiting += 1;
                oldest_waiting.get_or_insert(hour);
                holding.extend(rules.holding(&states, deadline));
                continue;
            };
            if self.finalize_hour(store, layout, topic, hour, uploaded, decision).await? {
                self.done.insert((topic.to_string(), hour), uploaded);
            }
        }
        metrics::gauge!("tron_sink_hours_waiting", "topic" => topic.to_string()).set(waiting as f64);
        export_oldest_waiting(topic, oldest_waiting, lateness_ms, chrono::Utc::now().timestamp_millis());
        metrics::gauge!("tron_sink_hosts_holding_hours", "topic" => topic.to_string()).set(holding.len() as f64);
        metrics::gauge!("tron_sink_all_hosts_silent", "topic" => topic.to_string()).set(if rules.all_silent {
            1.0
        } else {
            0.0
        });
        if rules.all_silent != self.all_silent.contains(topic) {
            if rules.all_silent {
                self.all_silent.insert(topic.to_string());
                tracing::warn!(topic, hosts = ?rules.required, "no agent has reported within finalize.host_timeout: hours wait for their last reports (relay or relay -> Kafka outage?)");
            } else {
                self.all_silent.remove(topic);
                tracing::info!(topic, "agents report again");
            }
        }
        Ok(())
    }

    /// Returns false when the listing does not yet show every uploaded object.
    async fn finalize_hour(
        &self,
        store: &Store,
        layout: &Layout,
        topic: &str,
        hour: i64,
        uploaded: u64,
        decision: serde_json::Value,
    ) -> anyhow::Result<bool> {
        let dir = layout.hour_dir(topic, hour);
        let listed = store.list(&dir).await?;
        let objects: Vec<_> = listed.iter().filter(|o| !o.name[dir.len()..].starts_with('_')).collect();
        if (objects.len() as u64) < uploaded.min(1) {
            return Ok(false);
        }
        let manifest_key = format!("{dir}_manifest.json");
        let previous: Option<Manifest> = store.get(&manifest_key).await?.and_then(|b| serde_json::from_slice(&b).ok());
        let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
        let previous_names: Vec<String> =
            previous.as_ref().map(|m| m.objects.iter().map(|o| o.name.clone()).collect()).unwrap_or_default();
        if previous.is_some() && previous_names.iter().map(String::as_str).eq(names.iter().copied()) {
            return Ok(true);
        }
        let revision = previous.as_ref().map_or(0, |m| m.revision) + 1;
        let meta = |o: &crate::store::Listed, k: &str| o.metadata.get(k).cloned().unwrap_or_default();
        let mut rows = 0u64;
        let mut bytes = 0u64;
        let mut offsets: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let (mut min_t, mut max_t) = (String::new(), String::new());
        let entries: Vec<ManifestObject> = objects
            .iter()
            .map(|o| {
                let r: u64 = meta(o, meta_key::ROWS).parse().unwrap_or(0);
                rows += r;
                bytes += o.size;
                let (first, last): (i64, i64) = (
                    meta(o, meta_key::FIRST_OFFSET).parse().unwrap_or(-1),
                    meta(o, meta_key::LAST_OFFSET).parse().unwrap_or(-1),
                );
                let range = offsets.entry(meta(o, meta_key::PARTITION)).or_insert((first, last));
                range.0 = range.0.min(first);
                range.1 = range.1.max(last);
                let (lo, hi) = (meta(o, meta_key::MIN_TIME), meta(o, meta_key::MAX_TIME));
                if min_t.is_empty() || (!lo.is_empty() && lo < min_t) {
                    min_t = lo.clone();
                }
                if hi > max_t {
                    max_t = hi.clone();
                }
                ManifestObject {
                    name: o.name.clone(),
                    rows: r,
                    bytes: o.size,
                    partition: meta(o, meta_key::PARTITION),
                    first_offset: first,
                    last_offset: last,
                    min_event_time: lo,
                    max_event_time: hi,
                }
            })
            .collect();
        let manifest = Manifest {
            topic: topic.to_string(),
            hour: chrono::DateTime::from_timestamp(hour * 3600, 0)
                .unwrap_or_default()
                .format("%Y-%m-%dT%H")
                .to_string(),
            revision,
            objects: entries,
            rows,
            bytes,
            min_event_time: min_t,
            max_event_time: max_t,
            partitions: offsets
                .into_iter()
                .map(|(p, (first_offset, last_offset))| (p, OffsetRange { first_offset, last_offset }))
                .collect(),
            finalized_at: chrono::Utc::now().to_rfc3339(),
            completeness: decision,
        };
        store
            .put(
                &manifest_key,
                serde_json::to_vec_pretty(&manifest).expect("json"),
                "application/json",
                Default::default(),
            )
            .await?;
        let success_key = format!("{dir}_SUCCESS");
        if store.get(&success_key).await?.is_none() {
            store.put(&success_key, Vec::new(), "text/plain", Default::default()).await?;
        }
        let delay = chrono::Utc::now().timestamp_millis() - (hour + 1) * HOUR_MS;
        if revision == 1 {
            metrics::counter!("tron_sink_hours_finalized_total", "topic" => topic.to_string()).increment(1);
            metrics::histogram!("tron_sink_hour_end_to_success_seconds").record(delay.max(0) as f64 / 1000.0);
            tracing::info!(topic, hour = %manifest.hour, rows, objects = names.len(), "hour complete: _SUCCESS written");
        } else {
            let late = names.len().saturating_sub(previous_names.len());
            metrics::counter!("tron_sink_late_objects_total", "topic" => topic.to_string()).increment(late as u64);
            tracing::info!(topic, hour = %manifest.hour, revision, late_objects = late, "late records: manifest revised");
        }
        Ok(true)
    }
}

/// Which completeness rules apply to a topic now, from its partitions' states.
struct Rules {
    /// Agents each of which must be past the hour everywhere: those that reported within
    /// `host_timeout`, or, when none did, every agent known that did not stop drained
    /// (`all_silent`).
    required: BTreeSet<String>,
    /// Silent for `host_timeout` while others report: retired, rows they send later revise.
    stale: BTreeSet<String>,
    /// Silent for `host_timeout` after a last report that said they stopped cleanly with
    /// everything delivered: they hold no hour back, like an idle agent that keeps reporting
    /// "now". The wait of `host_timeout` first lets an agent that is only restarting report again.
    drained: BTreeSet<String>,
    /// Hosts whose records are in objects but whose first report has not come, first seen within
    /// `host_timeout`: an agent that just started (or just came back with a new name). Every hour
    /// waits for them; later they count as silent hosts.
    awaited: BTreeSet<String>,
    /// No agent reported within `host_timeout` although agents that did not drain are known: a
    /// silence of the relays, of relay → Kafka or of the whole fleet. Hours wait for the agents'
    /// last reports instead of falling back to event times: a silence is not a departure.
    all_silent: bool,
    watermarks: bool,
    event_time: bool,
    now_ms: i64,
}

impl Rules {
    fn of(states: &[PartitionState], now_ms: i64, host_timeout: Duration) -> Rules {
        let horizon = now_ms - host_timeout.as_millis() as i64;
        // Each host's freshest report across partitions says whether it is fresh or drained.
        let mut latest: BTreeMap<&str, crate::state::HostMark> = BTreeMap::new();
        for (host, mark) in states.iter().flat_map(|s| &s.hosts) {
            let entry = latest.entry(host).or_insert(*mark);
            if mark.reported_ms > entry.reported_ms {
                *entry = *mark;
            }
        }
        let (mut fresh, mut drained, mut silent) = (BTreeSet::new(), BTreeSet::new(), BTreeSet::new());
        // Hosts known only from their records: awaited while their first record is recent, then
        // silent like any host that stopped reporting (retired while others report, held when
        // every host is silent: a relay outage can come before a new host's first report).
        let mut first_records: BTreeMap<&str, i64> = BTreeMap::new();
        for (host, first) in states.iter().flat_map(|s| &s.hosts_unreported) {
            if !latest.contains_key(host.as_str()) {
                let earliest = first_records.entry(host).or_insert(*first);
                *earliest = (*earliest).min(*first);
            }
        }
        let mut awaited = BTreeSet::new();
        for (host, first) in first_records {
            let set = if first >= horizon { &mut awaited } else { &mut silent };
            set.insert(host.to_string());
        }
        for (host, mark) in latest {
            let set = match () {
                _ if mark.reported_ms >= horizon => &mut fresh,
                _ if mark.drained => &mut drained,
                _ => &mut silent,
            };
            set.insert(host.to_string());
        }
        let all_silent = fresh.is_empty() && !silent.is_empty();
        // A host silent while others report is retired after host_timeout (listed as stale);
        // when every host is silent, none is, except those that said they drained.
        let (required, stale) = if all_silent { (silent, BTreeSet::new()) } else { (fresh, silent) };
        // Agent records (with source positions) seen within the day hosts are kept for: their
        // hosts' reports decide, even when none has arrived yet or all have stopped.
        let tracked = all_silent
            || !required.is_empty()
            || !drained.is_empty()
            || states.iter().any(|s| s.tracked_seen_ms >= now_ms - crate::partition::HOSTS_KEPT_MS);
        let untracked = states.iter().any(|s| s.untracked_seen_ms >= horizon);
        // Agent records seen but no report yet (just started): wait for the watermarks rather
        // than guess; with no agent known and no recent traffic at all, the event-time rule
        // decides as before.
        Rules {
            required,
            stale,
            drained,
            awaited,
            all_silent,
            watermarks: tracked,
            event_time: untracked || !tracked,
            now_ms,
        }
    }

    /// How hour's `deadline` (its end plus lateness) was decided, or None while it is not done.
    fn complete(&self, states: &[PartitionState], deadline: i64) -> Option<serde_json::Value> {
        if self.watermarks {
            let past = |s: &PartitionState| {
                self.required.iter().all(|h| s.hosts.get(h).is_some_and(|m| m.watermark_ms >= deadline))
            };
            // No host known yet: wait for the first reports. Only drained hosts: they speak for
            // "now", so the hour must be over by the clock.
            let nobody = self.required.is_empty() && self.drained.is_empty();
            let drained_past = self.drained.is_empty() || deadline <= self.now_ms;
            if nobody || !drained_past || !self.awaited.is_empty() || !states.iter().all(past) {
                return None;
            }
        }
        if self.event_time
            && !states.iter().all(|s| s.watermark_ms >= deadline || (s.caught_up && s.as_of_ms >= deadline))
        {
            return None;
        }
        let rule = match (self.watermarks, self.event_time) {
            (true, true) => "watermarks+event_time",
            (true, false) => "watermarks",
            _ => "event_time",
        };
        let mut decision = json!({"rule": rule, "hosts_complete": self.required, "hosts_stale": self.stale});
        if !self.drained.is_empty() {
            decision["hosts_drained"] = json!(self.drained);
        }
        if self.all_silent {
            decision["all_hosts_silent"] = json!(true);
        }
        Some(decision)
    }

    /// The hosts holding an hour back: required hosts not yet past its deadline everywhere.
    fn holding(&self, states: &[PartitionState], deadline: i64) -> Vec<String> {
        let behind = |h: &&String| !states.iter().all(|s| s.hosts.get(*h).is_some_and(|m| m.watermark_ms >= deadline));
        self.required.iter().filter(behind).chain(&self.awaited).cloned().collect()
    }
}

/// `_manifest.json`: what an hour's directory holds, from the objects' metadata (docs/bigquery.md).
/// Fields a manifest from an older version lacks read as empty, so its revision still counts.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct Manifest {
    topic: String,
    /// UTC, `YYYY-MM-DDTHH`.
    hour: String,
    /// 1 with `_SUCCESS`; each late object rewrites the manifest with the next revision.
    revision: u64,
    objects: Vec<ManifestObject>,
    rows: u64,
    bytes: u64,
    min_event_time: String,
    max_event_time: String,
    /// Per partition, the offsets the hour's objects span.
    partitions: BTreeMap<String, OffsetRange>,
    finalized_at: String,
    /// Which rule declared the hour complete, and its evidence.
    completeness: serde_json::Value,
}

#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
#[serde(default)]
struct ManifestObject {
    name: String,
    rows: u64,
    bytes: u64,
    partition: String,
    first_offset: i64,
    last_offset: i64,
    min_event_time: String,
    max_event_time: String,
}

#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct OffsetRange {
    first_offset: i64,
    last_offset: i64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::HostMark;

    const NOW: i64 = 1_779_000_000_000;

    fn partition(hosts: &[(&str, i64, i64)], tracked: bool, untracked: bool) -> PartitionState {
        let mut s = PartitionState::default();
        for (h, w, r) in hosts {
            s.hosts.insert(h.to_string(), HostMark { watermark_ms: *w, reported_ms: *r, drained: false });
        }
        s.tracked_seen_ms = if tracked { NOW } else { 0 };
        s.untracked_seen_ms = if untracked { NOW } else { 0 };
        s
    }

    #[test]
    fn an_hour_waits_for_every_fresh_agent_on_every_partition() {
        let timeout = Duration::from_secs(600);
        let d = NOW - 1000;
        let states =
            [partition(&[("a", d, NOW), ("b", d, NOW)], true, false), partition(&[("a", d, NOW)], true, false)];
        assert_eq!(Rules::of(&states, NOW, timeout).complete(&states, d), None, "b not known on partition 1 yet");
        let states = [
            partition(&[("a", d, NOW), ("b", d - 1, NOW)], true, false),
            partition(&[("a", d, NOW), ("b", d, NOW)], true, false),
        ];
        assert_eq!(Rules::of(&states, NOW, timeout).complete(&states, d), None, "b behind on partition 0");
        // b stopped reporting long ago: it no longer holds the hour, and the manifest says so.
        let stale = NOW - 700_000;
        let states = [
            partition(&[("a", d, NOW), ("b", 0, stale)], true, false),
            partition(&[("a", d, NOW), ("b", 0, stale)], true, false),
        ];
        let decision = Rules::of(&states, NOW, timeout).complete(&states, d).unwrap();
        assert_eq!(decision, json!({"rule": "watermarks", "hosts_complete": ["a"], "hosts_stale": ["b"]}));
    }

    #[test]
    fn when_every_host_is_silent_hours_wait_for_their_last_reports_not_for_event_times() {
        let timeout = Duration::from_secs(600);
        let silent_since = NOW - 3_600_000; // an hour-long relay outage
        let deadline = NOW - 1_800_000;
        let mut p = partition(&[("a", deadline - 1, silent_since), ("b", NOW, silent_since)], false, false);
        p.watermark_ms = NOW; // event times and "caught up" would say done
        p.caught_up = true;
        p.as_of_ms = NOW;
        let rules = Rules::of(std::slice::from_ref(&p), NOW, timeout);
        assert_eq!(
            rules.complete(std::slice::from_ref(&p), deadline),
            None,
            "a's last report is before the hour's end"
        );
        assert_eq!(rules.holding(std::slice::from_ref(&p), deadline), ["a"]);
        p.hosts.get_mut("a").unwrap().watermark_ms = deadline;
        let decision = Rules::of(std::slice::from_ref(&p), NOW, timeout).complete(&[p], deadline).unwrap();
        assert_eq!(
            decision,
            json!({"rule": "watermarks", "hosts_complete": ["a", "b"], "hosts_stale": [], "all_hosts_silent": true})
        );
    }

    #[test]
    fn a_host_that_stopped_drained_holds_nothing_once_silent_for_host_timeout_even_when_all_are_silent() {
        let timeout = Duration::from_secs(600);
        let stopped = NOW - 3_600_000; // the whole fleet stopped cleanly an hour ago
        let deadline = NOW - 1_800_000; // an hour that ended after the stop
        let drained = |h: &str| {
            let mut p = partition(&[(h, stopped, stopped)], true, false);
            p.hosts.get_mut(h).unwrap().drained = true;
            p
        };
        let p = drained("a");
        let rules = Rules::of(std::slice::from_ref(&p), NOW, timeout);
        assert!(!rules.all_silent, "a drained fleet is not an outage");
        let decision = rules.complete(std::slice::from_ref(&p), deadline).expect("not held by a drained host");
        assert_eq!(
            decision,
            json!({"rule": "watermarks", "hosts_complete": [], "hosts_stale": [], "hosts_drained": ["a"]})
        );
        assert_eq!(rules.complete(std::slice::from_ref(&p), NOW + 1), None, "an hour not over by the clock waits");
        // A host that went silent without saying it drained still holds the hour: a silence is
        // not a departure.
        let mut q = drained("a");
        q.hosts.insert("b".into(), HostMark { watermark_ms: stopped, reported_ms: stopped, drained: false });
        let rules = Rules::of(std::slice::from_ref(&q), NOW, timeout);
        assert!(rules.all_silent);
        assert_eq!(rules.complete(std::slice::from_ref(&q), deadline), None);
        assert_eq!(rules.holding(std::slice::from_ref(&q), deadline), ["b"]);
        // Drained but heard from within host_timeout (an agent restarting): still holds.
        let recent = NOW - 60_000;
        let mut r = partition(&[("a", recent, recent)], true, false);
        r.hosts.get_mut("a").unwrap().drained = true;
        let rules = Rules::of(std::slice::from_ref(&r), NOW, timeout);
        assert_eq!(rules.complete(std::slice::from_ref(&r), recent + 1), None);
        assert_eq!(rules.holding(std::slice::from_ref(&r), recent + 1), ["a"]);
        // A fresher report on another partition (it came back) wins over the drained one.
        let back = partition(&[("a", stopped, NOW)], true, false);
        let rules = Rules::of(&[drained("a"), back.clone()], NOW, timeout);
        assert!(rules.drained.is_empty());
        assert_eq!(rules.complete(&[drained("a"), back], deadline), None);
    }

    #[test]
    fn a_host_whose_records_came_before_its_first_report_holds_every_hour_for_host_timeout() {
        let timeout = Duration::from_secs(600);
        let d = NOW - 1000;
        // "a" has reported past the hour; "new" has records in objects but no report yet.
        let mut p = partition(&[("a", NOW, NOW)], true, false);
        p.hosts_unreported.insert("new".into(), NOW - 5_000);
        let rules = Rules::of(std::slice::from_ref(&p), NOW, timeout);
        assert_eq!(rules.complete(std::slice::from_ref(&p), d), None);
        assert_eq!(rules.holding(std::slice::from_ref(&p), d), ["new"]);
        // Its first report ends the wait (even where an older state still lists it unreported).
        let mut reported = p.clone();
        reported.hosts.insert("new".into(), HostMark { watermark_ms: NOW, reported_ms: NOW, drained: false });
        let rules = Rules::of(std::slice::from_ref(&reported), NOW, timeout);
        assert!(rules.complete(std::slice::from_ref(&reported), d).is_some());
        // One that never reports (watermarks off) is retired like a silent host while others report…
        p.hosts_unreported.insert("new".into(), NOW - 700_000);
        let decision = Rules::of(std::slice::from_ref(&p), NOW, timeout).complete(std::slice::from_ref(&p), d);
        assert_eq!(decision.unwrap()["hosts_stale"], json!(["new"]));
        // …and held when nobody reports (a relay outage before its first report reached the sink).
        let mut only = partition(&[], true, false);
        only.hosts_unreported.insert("new".into(), NOW - 700_000);
        let rules = Rules::of(std::slice::from_ref(&only), NOW, timeout);
        assert!(rules.all_silent);
        assert_eq!(rules.complete(std::slice::from_ref(&only), d), None);
        assert_eq!(rules.holding(std::slice::from_ref(&only), d), ["new"]);
    }

    #[test]
    fn agent_records_without_a_report_yet_hold_the_hour_and_other_clients_use_event_time() {
        let timeout = Duration::from_secs(600);
        let mut early = partition(&[], true, false);
        early.watermark_ms = NOW; // event times far past the hour: the old rule would fire
        assert_eq!(Rules::of(&[early.clone()], NOW, timeout).complete(&[early], NOW - 5000), None);
        let mut plain = partition(&[], false, true);
        plain.watermark_ms = NOW;
        let decision = Rules::of(&[plain.clone()], NOW, timeout).complete(&[plain.clone()], NOW - 5000).unwrap();
        assert_eq!(decision["rule"], "event_time");
        // Both kinds of client: both rules.
        let mut both = partition(&[("a", NOW, NOW)], true, true);
        both.watermark_ms = NOW - 6000;
        assert_eq!(Rules::of(&[both.clone()], NOW, timeout).complete(&[both.clone()], NOW - 5000), None);
        both.watermark_ms = NOW;
        assert_eq!(
            Rules::of(&[both.clone()], NOW, timeout).complete(&[both], NOW - 5000).unwrap()["rule"],
            "watermarks+event_time"
        );
    }

    /// An object of the hour as the sink uploads it: its rows and ranges in metadata.
    async fn upload(store: &Store, dir: &str, name: &str, partition: &str, offsets: (i64, i64), rows: u64) {
        let metadata = HashMap::from([
            (meta_key::ROWS.to_string(), rows.to_string()),
            (meta_key::PARTITION.to_string(), partition.to_string()),
            (meta_key::FIRST_OFFSET.to_string(), offsets.0.to_string()),
            (meta_key::LAST_OFFSET.to_string(), offsets.1.to_string()),
            (meta_key::MIN_TIME.to_string(), "2026-05-18T03:00:00Z".to_string()),
            (meta_key::MAX_TIME.to_string(), format!("2026-05-18T03:{:02}:00Z", offsets.1 % 60)),
        ]);
        store.put(&format!("{dir}{name}"), b"row\n".to_vec(), "text/csv", metadata).await.unwrap();
    }

    async fn manifest(store: &Store, dir: &str) -> Manifest {
        serde_json::from_slice(&store.get(&format!("{dir}_manifest.json")).await.unwrap().expect("a manifest")).unwrap()
    }

    #[tokio::test]
    async fn the_manifest_is_built_from_the_objects_metadata_and_a_late_object_revises_it() {
        let root = tempfile::tempdir().unwrap();
        let store = Store::Dir(root.path().to_path_buf());
        let layout = Layout::new("", crate::layout::DEFAULT_TEMPLATE, &Default::default());
        let hour = 494_187; // 2026-05-18T03
        let dir = layout.hour_dir("logs", hour);
        upload(&store, &dir, "a.csv.gz", "0", (0, 9), 10).await;
        upload(&store, &dir, "b.csv.gz", "1", (100, 119), 20).await;
        let finalizer = Finalizer::default();
        let decision = json!({"rule": "watermarks"});
        assert!(finalizer.finalize_hour(&store, &layout, "logs", hour, 2, decision.clone()).await.unwrap());
        let first = manifest(&store, &dir).await;
        assert_eq!((first.revision, first.rows, first.objects.len()), (1, 30, 2));
        assert_eq!(first.hour, "2026-05-18T03");
        assert_eq!((first.partitions["1"].first_offset, first.partitions["1"].last_offset), (100, 119));
        assert_eq!(first.completeness, decision);
        assert!(store.get(&format!("{dir}_SUCCESS")).await.unwrap().is_some());
        // Unchanged listing: nothing rewritten.
        assert!(finalizer.finalize_hour(&store, &layout, "logs", hour, 2, decision.clone()).await.unwrap());
        assert_eq!(manifest(&store, &dir).await.revision, 1);
        // A late object: revision 2 with its rows and its partition's wider range.
        upload(&store, &dir, "c.csv.gz", "0", (10, 14), 5).await;
        assert!(finalizer.finalize_hour(&store, &layout, "logs", hour, 3, decision).await.unwrap());
        let revised = manifest(&store, &dir).await;
        assert_eq!((revised.revision, revised.rows, revised.objects.len()), (2, 35, 3));
        assert_eq!((revised.partitions["0"].first_offset, revised.partitions["0"].last_offset), (0, 14));
    }

    #[test]
    fn the_oldest_waiting_hour_is_overdue_only_past_its_end_plus_lateness() {
        let hour = 490_000; // hours since the epoch
        let end_ms = (hour + 1) * HOUR_MS;
        assert_eq!(oldest_waiting(None, 300_000, end_ms), (0, 0));
        assert_eq!(oldest_waiting(Some(hour), 300_000, end_ms + 299_000), (hour * 3600, 0));
        assert_eq!(oldest_waiting(Some(hour), 300_000, end_ms + 300_000 + 901_000), (hour * 3600, 901));
    }
}

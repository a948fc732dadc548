//! Marks an hour complete: when every partition of the topic has passed the hour's end plus the
//! allowed lateness (its committed watermark is past it, or it was caught up after that time),
//! the hour's prefix gets `_manifest.json` (objects, rows, bytes, event-time range, offset ranges)
//! and `_SUCCESS`. Objects that arrive later add a new manifest revision and count as late.

use crate::layout::Layout;
use crate::partition::{meta_key, HOUR_MS};
use crate::state::{self, PartitionState};
use crate::store::Store;
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

#[derive(Default)]
pub struct Finalizer {
    /// (topic, hour) → objects known when last finalized, to skip unchanged hours.
    done: HashMap<(String, i64), u64>,
}

impl Finalizer {
    pub async fn run_once(
        &mut self,
        store: &Store,
        prefix: &str,
        layout: &Layout,
        topic: &str,
        partitions: i32,
        lateness: Duration,
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
        let lateness_ms = lateness.as_millis() as i64;
        for (hour, uploaded) in hours {
            if self.done.get(&(topic.to_string(), hour)) == Some(&uploaded) {
                continue;
            }
            let deadline = (hour + 1) * HOUR_MS + lateness_ms;
            let passed = states.iter().all(|s| s.watermark_ms >= deadline || (s.caught_up && s.as_of_ms >= deadline));
            if !passed {
                continue;
            }
            if self.finalize_hour(store, layout, topic, hour, uploaded).await? {
                self.done.insert((topic.to_string(), hour), uploaded);
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
    ) -> anyhow::Result<bool> {
        let dir = layout.hour_dir(topic, hour);
        let listed = store.list(&dir).await?;
        let objects: Vec<_> = listed.iter().filter(|o| !o.name[dir.len()..].starts_with('_')).collect();
        if (objects.len() as u64) < uploaded.min(1) {
            return Ok(false);
        }
        let manifest_key = format!("{dir}_manifest.json");
        let previous: Option<serde_json::Value> =
            store.get(&manifest_key).await?.and_then(|b| serde_json::from_slice(&b).ok());
        let names: Vec<&str> = objects.iter().map(|o| o.name.as_str()).collect();
        let previous_names: Vec<String> = previous
            .as_ref()
            .and_then(|m| m["objects"].as_array())
            .map(|a| a.iter().filter_map(|o| o["name"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        if previous.is_some() && previous_names.iter().map(String::as_str).eq(names.iter().copied()) {
            return Ok(true);
        }
        let revision = previous.as_ref().and_then(|m| m["revision"].as_u64()).unwrap_or(0) + 1;
        let meta = |o: &crate::store::Listed, k: &str| o.metadata.get(k).cloned().unwrap_or_default();
        let mut rows = 0u64;
        let mut bytes = 0u64;
        let mut offsets: BTreeMap<String, (i64, i64)> = BTreeMap::new();
        let (mut min_t, mut max_t) = (String::new(), String::new());
        let entries: Vec<serde_json::Value> = objects
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
                json!({"name": o.name, "rows": r, "bytes": o.size, "partition": meta(o, meta_key::PARTITION),
                       "first_offset": first, "last_offset": last, "min_event_time": lo, "max_event_time": hi})
            })
            .collect();
        let manifest = json!({
            "topic": topic,
            "hour": chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default().format("%Y-%m-%dT%H").to_string(),
            "revision": revision,
            "objects": entries,
            "rows": rows,
            "bytes": bytes,
            "min_event_time": min_t,
            "max_event_time": max_t,
            "partitions": offsets.into_iter().map(|(p, (a, b))| (p, json!({"first_offset": a, "last_offset": b}))).collect::<serde_json::Map<_, _>>(),
            "finalized_at": chrono::Utc::now().to_rfc3339(),
        });
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
            tracing::info!(topic, hour = %manifest["hour"], rows, objects = names.len(), "hour complete: _SUCCESS written");
        } else {
            let late = names.len().saturating_sub(previous_names.len());
            metrics::counter!("tron_sink_late_objects_total", "topic" => topic.to_string()).increment(late as u64);
            tracing::info!(topic, hour = %manifest["hour"], revision, late_objects = late, "late records: manifest revised");
        }
        Ok(true)
    }
}

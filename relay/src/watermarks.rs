//! Agents' low watermarks ("every line of mine with an event time before W is in Kafka"), kept
//! per host and written to **every partition** of the topics each host's tags route to, so the
//! sink learns them in order with the records: a watermark message in a partition comes after
//! every record it speaks for, because the agent computed it from chunks Kafka had already
//! acknowledged.
//!
//! One message per partition per interval carries every host's latest watermark (not one per
//! agent per partition, which would swamp Kafka with a large fleet): the cost is
//! `partitions × (hosts × ~40 bytes)` every `watermark_interval` per relay (docs/completeness.md).
//! Each host's entry says when this relay last heard from it (`reported_ms`, the relay's clock),
//! so the sink prefers the freshest report when a host moved between relays, and stops waiting
//! for a host that stopped reporting.

use crate::kafka::Kafka;
use crate::peer_names::ReportHosts;
use crate::route::Router;
use forward::Records;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::Duration;
use tron_service::clock::now_ms;
use tron_service::Shutdown;

/// The reserved tag agents send their reports on; nothing sent on it is written as a record.
pub const WATERMARK_TAG: &str = "tron.watermark";

/// A host not heard from for this long is no longer written (the sink has long stopped waiting).
const FORGET_AFTER: Duration = Duration::from_secs(24 * 3600);

/// Hosts in one watermark message: about 45 bytes each, so 5,000 make ~225 KB, a quarter of
/// Kafka's default `message.max.bytes` even with 100-character host names.
const HOSTS_PER_MESSAGE: usize = 5_000;

#[derive(Default)]
pub struct Watermarks {
    hosts: Mutex<HashMap<String, Mark>>,
}

struct Mark {
    watermark_ms: i64,
    reported_ms: i64,
    drained: bool,
    topics: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Report {
    host: String,
    watermark_ms: i64,
    tags: Vec<String>,
    /// The agent's last report before a clean stop with everything read and delivered: once
    /// silent for `finalize.host_timeout`, the sink lets the host hold no hour back.
    #[serde(default)]
    drained: bool,
}

impl Watermarks {
    /// Takes the reports of one chunk on [`WATERMARK_TAG`]; errors name what was wrong.
    /// Err (nothing of the chunk kept): a record that is not a report, or a report for a host
    /// the connection may not speak for (`tls.reports_only_for_certificate_names`).
    pub fn report(&self, records: &Records, router: &Router, allowed: &ReportHosts) -> Result<(), String> {
        let mut reports = Vec::with_capacity(records.records.len());
        for i in 0..records.records.len() {
            let report: Report = serde_json::from_slice(records.get(i))
                .map_err(|e| format!("a {WATERMARK_TAG} record must be {{host, watermark_ms, tags}}: {e}"))?;
            if !allowed.allows(&report.host) {
                metrics::counter!("tron_relay_watermark_reports_refused_total").increment(1);
                return Err(format!(
                    "a report for host {:?}, which the client certificate or user name does not name (allowed: {allowed:?})",
                    report.host
                ));
            }
            reports.push(report);
        }
        for report in reports {
            let mut topics: Vec<String> = report.tags.iter().map(|t| router.topic(t).to_string()).collect();
            topics.sort();
            topics.dedup();
            let mark =
                Mark { watermark_ms: report.watermark_ms, reported_ms: now_ms(), drained: report.drained, topics };
            if report.drained {
                tracing::info!(host = %report.host, watermark_ms = report.watermark_ms, "agent stopped drained");
            }
            self.hosts.lock().expect("watermarks lock").insert(report.host, mark);
        }
        metrics::counter!("tron_relay_watermark_reports_total").increment(records.records.len() as u64);
        Ok(())
    }

    /// (topic, message) for every message each partition of the topic gets now: the topic's
    /// hosts in groups of at most [`HOSTS_PER_MESSAGE`], so a message stays far below Kafka's
    /// `message.max.bytes` (1 MB) at any fleet size; the sink merges them host by host.
    fn messages(&self) -> Vec<(String, Vec<u8>)> {
        let horizon = now_ms() - FORGET_AFTER.as_millis() as i64;
        let mut hosts = self.hosts.lock().expect("watermarks lock");
        hosts.retain(|_, m| m.reported_ms >= horizon);
        let mut by_topic: BTreeMap<String, Vec<serde_json::Map<String, serde_json::Value>>> = BTreeMap::new();
        for (host, mark) in hosts.iter() {
            for topic in &mark.topics {
                let groups = by_topic.entry(topic.clone()).or_default();
                if groups.last().is_none_or(|g| g.len() >= HOSTS_PER_MESSAGE) {
                    groups.push(serde_json::Map::new());
                }
                let group = groups.last_mut().expect("pushed");
                // A third element only for a drained host: sinks older than it read two.
                let entry = if mark.drained {
                    serde_json::json!([mark.watermark_ms, mark.reported_ms, 1])
                } else {
                    serde_json::json!([mark.watermark_ms, mark.reported_ms])
                };
                group.insert(host.clone(), entry);
            }
        }
        by_topic
            .into_iter()
            .flat_map(|(topic, groups)| {
                groups.into_iter().map(move |hosts| {
                    let body = serde_json::to_vec(&serde_json::json!({ "tron_watermarks": hosts })).expect("json");
                    (topic.clone(), body)
                })
            })
            .collect()
    }

    /// Writes the watermarks every `every` until shutdown.
    pub async fn run(&self, kafka: &Kafka, every: Duration, shutdown: Shutdown) {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tick.tick() => {}
            }
            for (topic, message) in self.messages() {
                match kafka.produce_to_every_partition(&topic, &message).await {
                    Ok(partitions) => {
                        metrics::counter!("tron_relay_watermark_messages_total").increment(partitions as u64)
                    }
                    Err(e) => tracing::warn!(%topic, error = %e, "cannot write watermarks; retrying next interval"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fleet_of_20000_hosts_is_written_in_messages_far_below_a_megabyte() {
        let w = Watermarks::default();
        {
            let mut hosts = w.hosts.lock().unwrap();
            for i in 0..20_000 {
                let name = format!("app-server-{i:05}.eu-west-1.compute.internal.example.com");
                let mark = Mark {
                    watermark_ms: 1_779_000_000_000,
                    reported_ms: now_ms(),
                    drained: i % 2 == 0,
                    topics: vec!["logs".into()],
                };
                hosts.insert(name, mark);
            }
        }
        let messages = w.messages();
        assert_eq!(messages.len(), 4);
        let mut seen = 0;
        for (topic, body) in &messages {
            assert_eq!(topic, "logs");
            assert!(body.len() < 512 << 10, "{} bytes", body.len());
            let v: serde_json::Value = serde_json::from_slice(body).unwrap();
            seen += v["tron_watermarks"].as_object().unwrap().len();
        }
        assert_eq!(seen, 20_000, "every host in exactly one message");
    }
}

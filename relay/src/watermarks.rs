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

#[derive(Default)]
pub struct Watermarks {
    hosts: Mutex<HashMap<String, Mark>>,
}

struct Mark {
    watermark_ms: i64,
    reported_ms: i64,
    topics: Vec<String>,
}

#[derive(serde::Deserialize)]
struct Report {
    host: String,
    watermark_ms: i64,
    tags: Vec<String>,
}

impl Watermarks {
    /// Takes the reports of one chunk on [`WATERMARK_TAG`]; errors name what was wrong.
    pub fn report(&self, records: &Records, router: &Router) -> Result<(), String> {
        for i in 0..records.records.len() {
            let report: Report = serde_json::from_slice(records.get(i))
                .map_err(|e| format!("a {WATERMARK_TAG} record must be {{host, watermark_ms, tags}}: {e}"))?;
            let mut topics: Vec<String> = report.tags.iter().map(|t| router.topic(t).to_string()).collect();
            topics.sort();
            topics.dedup();
            let mark = Mark { watermark_ms: report.watermark_ms, reported_ms: now_ms(), topics };
            self.hosts.lock().expect("watermarks lock").insert(report.host, mark);
        }
        metrics::counter!("tron_relay_watermark_reports_total").increment(records.records.len() as u64);
        Ok(())
    }

    /// Topic → the message every partition of it gets now.
    fn messages(&self) -> BTreeMap<String, Vec<u8>> {
        let horizon = now_ms() - FORGET_AFTER.as_millis() as i64;
        let mut hosts = self.hosts.lock().expect("watermarks lock");
        hosts.retain(|_, m| m.reported_ms >= horizon);
        let mut by_topic: BTreeMap<String, serde_json::Map<String, serde_json::Value>> = BTreeMap::new();
        for (host, mark) in hosts.iter() {
            for topic in &mark.topics {
                by_topic
                    .entry(topic.clone())
                    .or_default()
                    .insert(host.clone(), serde_json::json!([mark.watermark_ms, mark.reported_ms]));
            }
        }
        by_topic
            .into_iter()
            .map(|(topic, hosts)| {
                (topic, serde_json::to_vec(&serde_json::json!({ "tron_watermarks": hosts })).expect("json"))
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

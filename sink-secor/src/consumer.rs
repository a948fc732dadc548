//! The consume loop: messages go to their partition's staging; cuts are uploaded and committed in
//! this same task, so a cut and a rebalance never interleave.

use crate::config::SinkConfig;
use crate::finalize::Finalizer;
use crate::partition::{Incoming, Output, Partition};
use crate::store::Store;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::RDKafkaErrorCode;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tron_service::systemd::Heartbeat;
use tron_service::{Health, Shutdown};

/// Records which partitions this instance owns, as librdkafka reports rebalances.
#[derive(Default)]
pub struct GroupContext {
    /// Owned partitions and when they were assigned.
    owned: Mutex<HashMap<(String, i32), Instant>>,
    revoked: Mutex<Vec<(String, i32)>>,
}

impl ClientContext for GroupContext {}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut owned = self.owned.lock().expect("owned lock");
            let mut revoked = self.revoked.lock().expect("revoked lock");
            for e in tpl.elements() {
                owned.remove(&(e.topic().to_string(), e.partition()));
                revoked.push((e.topic().to_string(), e.partition()));
            }
            tracing::info!(partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut owned = self.owned.lock().expect("owned lock");
            for e in tpl.elements() {
                owned.insert((e.topic().to_string(), e.partition()), Instant::now());
            }
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

pub fn create(cfg: &SinkConfig) -> anyhow::Result<GroupConsumer> {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", &cfg.kafka.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000");
    for (k, v) in &cfg.kafka.properties {
        client.set(k, v);
    }
    let consumer: GroupConsumer = client.create_with_context(GroupContext::default())?;
    let topics: Vec<&str> = cfg.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

pub async fn run(
    cfg: &SinkConfig,
    consumer: GroupConsumer,
    store: Store,
    health: Health,
    shutdown: Shutdown,
    beat: Heartbeat,
) -> anyhow::Result<()> {
    let (_, prefix) = cfg.split_url();
    let layout = cfg.layout();
    let out = Output {
        store: &store,
        prefix: &prefix,
        layout: &layout,
        format: cfg.output.format,
        columns: &cfg.output.columns,
        gzip_level: cfg.output.gzip_level,
        staging: &cfg.staging_dir,
    };
    let mut partitions: HashMap<(String, i32), Partition> = HashMap::new();
    let mut finalizer = Finalizer::default();
    let mut last_finalize = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    let lateness = cfg.finalize.lateness;
    loop {
        beat.beat();
        tokio::select! {
            _ = shutdown.wait() => break,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    health.up("kafka");
                    handle(&consumer, &out, cfg, &mut partitions, &m, &beat).await?;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "consume error");
                    health.down("kafka", e.to_string());
                    metrics::counter!("tron_sink_consume_errors_total").increment(1);
                }
            },
            _ = tick.tick() => {},
        }
        drop_revoked(&consumer, &mut partitions);
        open_idle_partitions(&consumer, &out, cfg, &mut partitions).await?;
        for p in partitions.values_mut() {
            if let Some(cut) = p.cut_due(&cfg.roll, lateness) {
                cut_and_commit(&consumer, &out, p, cut, &beat).await?;
            }
            p.heartbeat(&out, &cfg.roll, cfg.finalize.interval).await?;
        }
        if last_finalize.elapsed() >= cfg.finalize.interval {
            last_finalize = Instant::now();
            finalize(&consumer, &store, &prefix, cfg, &mut finalizer).await;
        }
    }
    // Drain: upload and commit what is staged, so a restart starts clean.
    tracing::info!(partitions = partitions.len(), "shutting down: uploading staged records");
    drop_revoked(&consumer, &mut partitions);
    for p in partitions.values_mut() {
        if let Some(cut) = p.cut_for_shutdown() {
            cut_and_commit(&consumer, &out, p, cut, &beat).await?;
        }
    }
    finalize(&consumer, &store, &prefix, cfg, &mut finalizer).await;
    Ok(())
}

async fn handle(
    consumer: &GroupConsumer,
    out: &Output<'_>,
    cfg: &SinkConfig,
    partitions: &mut HashMap<(String, i32), Partition>,
    m: &BorrowedMessage<'_>,
    beat: &Heartbeat,
) -> anyhow::Result<()> {
    let key = (m.topic().to_string(), m.partition());
    if !consumer.context().owned.lock().expect("owned lock").contains_key(&key) {
        return Ok(()); // fetched before a revoke; the new owner reads it
    }
    if !partitions.contains_key(&key) {
        let committed = committed_offset(consumer, &key.0, key.1).unwrap_or(m.offset());
        let p = Partition::open(out, &key.0, key.1, committed).await?;
        partitions.insert(key.clone(), p);
    }
    let p = partitions.get_mut(&key).expect("inserted above");
    if let Some(cut) = p.forced_cut_before(m.offset()) {
        cut_and_commit(consumer, out, p, cut, beat).await?;
    }
    let mut tag = "";
    let mut time_ns = m.timestamp().to_millis().unwrap_or(0) * 1_000_000;
    if let Some(headers) = m.headers() {
        for h in headers.iter() {
            match (h.key, h.value) {
                ("tag", Some(v)) => tag = std::str::from_utf8(v).unwrap_or(""),
                ("event_time_ns", Some(v)) => {
                    if let Some(ns) = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok()) {
                        time_ns = ns;
                    }
                }
                _ => {}
            }
        }
    }
    let incoming = Incoming { offset: m.offset(), time_ns, tag, raw: m.payload().unwrap_or_default() };
    p.append(out, &incoming)?;
    metrics::counter!("tron_sink_records_consumed_total", "topic" => key.0.clone()).increment(1);
    // Size, hour-passed and replayed cuts are due as soon as the record that triggers them lands.
    if let Some(cut) = p.cut_due(&cfg.roll, cfg.finalize.lateness) {
        cut_and_commit(consumer, out, p, cut, beat).await?;
    }
    Ok(())
}

/// Retries until the cut lands: skipping it would break exactly-once. Each attempt counts as a
/// turn of the main loop, so a long store outage does not look like a wedged process.
async fn cut_and_commit(
    consumer: &GroupConsumer,
    out: &Output<'_>,
    p: &mut Partition,
    cut: i64,
    beat: &Heartbeat,
) -> anyhow::Result<()> {
    let (topic, partition) = (p.topic.clone(), p.partition);
    let mut backoff = Duration::from_millis(200);
    loop {
        beat.beat();
        let result = p
            .cut(out, cut, |offset| {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&topic, partition, Offset::Offset(offset))?;
                tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))?;
                Ok(())
            })
            .await;
        match result {
            Ok(()) => return Ok(()),
            Err(e) if lost_membership(&e) => {
                // The group no longer counts this instance as the owner (a broker restart, a
                // session time-out): retrying the commit cannot succeed, and waiting here would
                // keep the consumer from rejoining. Give the partition up as on a revoke and rewind
                // to the committed offset; the cut's intent makes whoever owns it next replay
                // the same objects.
                tracing::warn!(%topic, partition, cut, error = %format!("{e:#}"), "commit refused: group membership lost; re-reading from the committed offset");
                metrics::counter!("tron_sink_membership_lost_total").increment(1);
                let rewind = p.committed();
                let _ = tokio::task::block_in_place(|| {
                    consumer.seek(&topic, partition, Offset::Offset(rewind), Duration::from_secs(10))
                });
                consumer.context().revoked.lock().expect("revoked lock").push((topic.clone(), partition));
                return Ok(());
            }
            Err(e) => {
                metrics::counter!("tron_sink_cut_retries_total").increment(1);
                tracing::warn!(%topic, partition, cut, error = %format!("{e:#}"), "cut failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Commit errors that mean this instance is no longer a member of the group's current generation.
fn lost_membership(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|c| c.downcast_ref::<rdkafka::error::KafkaError>()).any(|k| {
        matches!(
            k.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::UnknownMemberId
                    | RDKafkaErrorCode::IllegalGeneration
                    | RDKafkaErrorCode::RebalanceInProgress
                    | RDKafkaErrorCode::FencedInstanceId
            )
        )
    })
}

/// A partition that has had no message since it was assigned still reports progress (caught up),
/// so an idle partition does not hold back the finalizer.
async fn open_idle_partitions(
    consumer: &GroupConsumer,
    out: &Output<'_>,
    cfg: &SinkConfig,
    partitions: &mut HashMap<(String, i32), Partition>,
) -> anyhow::Result<()> {
    let idle: Vec<(String, i32)> = consumer
        .context()
        .owned
        .lock()
        .expect("owned lock")
        .iter()
        .filter(|(key, since)| since.elapsed() >= cfg.roll.idle_after && !partitions.contains_key(*key))
        .map(|(key, _)| key.clone())
        .collect();
    for (topic, partition) in idle {
        let committed = match committed_offset(consumer, &topic, partition) {
            Some(o) => o,
            None => {
                tokio::task::block_in_place(|| consumer.fetch_watermarks(&topic, partition, Duration::from_secs(10)))
                    .map(|(low, _)| low)
                    .unwrap_or(0)
            }
        };
        let p = Partition::open(out, &topic, partition, committed).await?;
        partitions.insert((topic, partition), p);
    }
    Ok(())
}

fn committed_offset(consumer: &GroupConsumer, topic: &str, partition: i32) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = tokio::task::block_in_place(|| consumer.committed_offsets(tpl, Duration::from_secs(10))).ok()?;
    match committed.find_partition(topic, partition)?.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    }
}

fn drop_revoked(consumer: &GroupConsumer, partitions: &mut HashMap<(String, i32), Partition>) {
    let revoked: Vec<_> = std::mem::take(&mut *consumer.context().revoked.lock().expect("revoked lock"));
    for key in revoked {
        if let Some(p) = partitions.remove(&key) {
            tracing::info!(topic = %key.0, partition = key.1, committed = p.committed(), "revoked: discarding staged records; the new owner re-reads them");
            p.discard();
        }
    }
}

/// The owner of a topic's partition 0 finalizes that topic's hours, so one instance does it.
async fn finalize(consumer: &GroupConsumer, store: &Store, prefix: &str, cfg: &SinkConfig, finalizer: &mut Finalizer) {
    for topic in &cfg.kafka.topics {
        if !consumer.context().owned.lock().expect("owned lock").contains_key(&(topic.clone(), 0)) {
            continue;
        }
        let count = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32));
        let Some(count) = count.filter(|c| *c > 0) else {
            continue;
        };
        if let Err(e) = finalizer.run_once(store, prefix, &cfg.layout(), topic, count, cfg.finalize.lateness).await {
            tracing::warn!(%topic, error = %format!("{e:#}"), "finalizer pass failed; will retry");
        }
    }
}

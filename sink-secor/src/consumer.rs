//! The consume loop: messages go to their partition's staging; cuts are uploaded and committed in
//! this same task, so a cut and a rebalance never interleave in our own state.
//!
//! While a cut uploads, the loop keeps polling the consumer, so a slow store never pushes the
//! instance out of the group (`max.poll.interval.ms`): rebalance callbacks run, and messages that
//! arrive are held and handled after the cut (past `HELD_BYTES_LIMIT` every partition is paused,
//! which makes librdkafka stop fetching). Each assignment of a partition gets an epoch; a message
//! or a `Partition` of an older epoch is never mixed with a newer one.

use crate::config::{KafkaConfig, SinkConfig};
use crate::finalize::Finalizer;
use crate::partition::{Incoming, Output, Partition, StagingError};
use crate::store::{Fenced, Store};
use futures::{FutureExt, StreamExt};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, StreamConsumer};
use rdkafka::error::{KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message, OwnedMessage};
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};
use tron_service::backoff::Backoff;
use tron_service::headers::{self, Origin, RecordMeta};
use tron_service::systemd::Heartbeat;
use tron_service::{Health, Shutdown};

/// A topic partition.
pub type Tp = (String, i32);
/// Maps keyed by partition, looked up several times per message: foldhash instead of SipHash,
/// whose hashing of the topic names was 5 % of the sink's CPU (keys are our own topics, not
/// attacker-chosen, so hash flooding is not a concern).
type TpMap<V> = HashMap<Tp, V, foldhash::fast::RandomState>;

/// Messages held while a cut uploads, before every partition is paused.
const HELD_BYTES_LIMIT: usize = 16 << 20;
/// A partition given up after a staging failure, or fenced by another instance, is left alone
/// this long before it is re-read from its committed offset.
const HOLD_OFF: Duration = Duration::from_secs(15);
/// SIGTERM: the last cuts may take this long in all.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
/// Most messages handled between two rounds of per-partition checks (cuts by age, heartbeats,
/// idle partitions): at 100,000 records/s a round still comes every few milliseconds.
const BURST: usize = 512;

/// A partition given up and left alone for a while.
struct HeldOff {
    epoch: u64,
    until: Instant,
    /// Where its objects end: re-reading starts here when the group has no committed offset yet.
    committed: i64,
}

#[derive(Clone, Copy)]
struct Assignment {
    since: Instant,
    epoch: u64,
}

/// Records which partitions this instance owns, as librdkafka reports rebalances.
#[derive(Default)]
pub struct GroupContext {
    owned: Mutex<TpMap<Assignment>>,
    revoked: Mutex<Vec<Tp>>,
    /// Set after a revocation is pushed to `revoked`: the loop checks it once per message
    /// without taking the lock.
    revocations_pending: AtomicBool,
    epochs: AtomicU64,
    /// Bumped whenever `owned` changes, so the loop can keep the epoch of the partition it is
    /// reading between messages without taking the lock for each (about 1 % of the CPU).
    changes: AtomicU64,
}

impl GroupContext {
    fn epoch_of(&self, tp: &Tp) -> Option<u64> {
        self.owned.lock().expect("owned lock").get(tp).map(|a| a.epoch)
    }

    fn changes(&self) -> u64 {
        self.changes.load(Ordering::Acquire)
    }

    fn owned(&self) -> Vec<(Tp, Assignment)> {
        self.owned.lock().expect("owned lock").iter().map(|(k, a)| (k.clone(), *a)).collect()
    }
}

impl ClientContext for GroupContext {
    /// librdkafka's statistics (every `statistics.interval.ms`): the consumer lag of each owned
    /// partition, the figure an operator watches to see the sink falling behind. Partitions
    /// whose lag librdkafka does not know yet (-1) are left out rather than shown as 0.
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || p.consumer_lag < 0 || self.epoch_of(&(topic.clone(), *partition)).is_none() {
                    continue;
                }
                metrics::gauge!("tron_sink_consumer_lag_records", "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(p.consumer_lag as f64);
            }
        }
    }
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, _: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(tpl) = rebalance {
            let mut owned = self.owned.lock().expect("owned lock");
            let mut revoked = self.revoked.lock().expect("revoked lock");
            for e in tpl.elements() {
                owned.remove(&(e.topic().to_string(), e.partition()));
                revoked.push((e.topic().to_string(), e.partition()));
            }
            self.changes.fetch_add(1, Ordering::Release);
            self.revocations_pending.store(true, Ordering::Release);
            tracing::info!(partitions = tpl.count(), "partitions revoked");
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(tpl) = rebalance {
            let mut owned = self.owned.lock().expect("owned lock");
            for e in tpl.elements() {
                let epoch = self.epochs.fetch_add(1, Ordering::Relaxed) + 1;
                owned.insert((e.topic().to_string(), e.partition()), Assignment { since: Instant::now(), epoch });
            }
            self.changes.fetch_add(1, Ordering::Release);
            // librdkafka keeps a partition paused across a rebalance that gives it back to this
            // instance (librdkafka#1849); a partition paused while held off would never resume,
            // since the hold-off ended with the revocation.
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "resuming newly assigned partitions");
            }
            tracing::info!(partitions = tpl.count(), "partitions assigned");
        }
    }
}

type GroupConsumer = StreamConsumer<GroupContext>;

/// The consumer's librdkafka configuration: our settings, then `kafka.properties` over them.
pub fn client_config(cfg: &KafkaConfig) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("group.id", &cfg.group_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .set("session.timeout.ms", "10000")
        .set("heartbeat.interval.ms", "1000")
        // Feeds `tron_sink_consumer_lag_records` (GroupContext::stats).
        .set("statistics.interval.ms", "15000")
        // Memory: librdkafka's defaults let one fetch response bring 50 MiB of compressed
        // batches, each decompressed into its own buffer (the relay's LZ4 batches of log lines
        // decompress 5-10x): 230 MiB resident in the bench. A 2 MiB fetch and a 16 MiB queue
        // hold it near 110 MiB for 85,000 records/s; docs/capacity.md has the trade-off.
        // Either can be changed in `kafka.properties`.
        .set("fetch.max.bytes", "2097152")
        .set("queued.max.messages.kbytes", "16384");
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client
}

/// Our keys behind the librdkafka properties [`client_config`] sets, for errors.
pub const TYPED_KEYS: tron_service::kafka::TypedKeys =
    &[("bootstrap.servers", "kafka.brokers"), ("group.id", "kafka.group_id")];

pub fn create(cfg: &SinkConfig) -> anyhow::Result<GroupConsumer> {
    let client = client_config(&cfg.kafka);
    let consumer: GroupConsumer = client.create_with_context(GroupContext::default())?;
    let topics: Vec<&str> = cfg.kafka.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;
    Ok(consumer)
}

/// How a failed cut ends.
enum CutFailure {
    /// Another instance claimed the partition: give it up, touch nothing more.
    Fenced(anyhow::Error),
    /// The group no longer counts this instance as a member: give every partition up.
    LostMembership(anyhow::Error),
    /// The staging directory failed: give the partition up and re-read it later.
    Staging(anyhow::Error),
    /// The store failed (or did not answer): retry.
    Store(anyhow::Error),
}

impl From<anyhow::Error> for CutFailure {
    fn from(e: anyhow::Error) -> Self {
        if e.downcast_ref::<Fenced>().is_some() {
            CutFailure::Fenced(e)
        } else if lost_membership(&e) {
            CutFailure::LostMembership(e)
        } else if e.downcast_ref::<StagingError>().is_some() {
            CutFailure::Staging(e)
        } else {
            CutFailure::Store(e)
        }
    }
}

/// Store failures over time: what `/health` says about GCS, and logs that do not flood.
struct StoreHealth {
    failing_since: Option<Instant>,
    last_logged: Option<Instant>,
    unhealthy_after: Duration,
}

impl StoreHealth {
    fn ok(&mut self, health: &Health) {
        if self.failing_since.take().is_some() {
            tracing::info!("object store writes succeed again");
        }
        health.up("gcs");
    }

    /// `started`: when the failed request began (a request that hung counts from its start).
    fn failed(&mut self, health: &Health, started: Instant, what: &str, e: &anyhow::Error) {
        let since = *self.failing_since.get_or_insert(started);
        let permanent = crate::store::is_permanent(e);
        if permanent || since.elapsed() >= self.unhealthy_after {
            let kind = if permanent { "permanent error" } else { "failing" };
            health.down("gcs", format!("{kind} for {}s: {e:#}", since.elapsed().as_secs()));
        }
        if self.last_logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(60)) || !permanent {
            self.last_logged = Some(Instant::now());
            tracing::warn!(permanent, failing_for_s = since.elapsed().as_secs(), error = %format!("{e:#}"), "{what} failed; retrying");
        }
    }
}

/// Everything the loop owns besides the consumer and the output.
struct Loop<'a> {
    cfg: &'a SinkConfig,
    consumer: &'a GroupConsumer,
    out: Output<'a>,
    health: Health,
    shutdown: Shutdown,
    beat: Heartbeat,
    partitions: TpMap<Partition>,
    /// Messages that arrived during a cut, with the assignment epoch they were fetched under.
    held: VecDeque<(OwnedMessage, u64)>,
    held_bytes: usize,
    paused: bool,
    /// Partitions given up (fenced, or staging failed) and left alone until the instant, for the
    /// assignment epoch they were given up in.
    held_off: TpMap<HeldOff>,
    /// Committed offsets of owned partitions not opened yet, by assignment epoch: fetched for all
    /// of them in one request (each request costs a broker round trip, 500 ms on Tansu).
    committed_cache: TpMap<(u64, Option<i64>)>,
    /// Partitions rewound to their committed offset because their first record came after it,
    /// by assignment epoch: once per assignment, so a real gap (a transaction marker, records
    /// removed by retention) is accepted the second time.
    rewound: TpMap<u64>,
    store_health: StoreHealth,
    partition_counts: PartitionCounts,
    /// The key of the message being handled, kept between messages for its allocation.
    current_tp: Tp,
    /// The assignment epoch of `current_tp` (None: not owned) as of `GroupContext::changes`.
    current_epoch: Option<(u64, Option<u64>)>,
    /// Whether the last poll returned an error, so the next message marks Kafka healthy again;
    /// otherwise the health map is left alone (its lock and lookup per message were 1 %).
    kafka_failed: bool,
    /// When the messages being handled now began to be handled (held ones, or a burst): the
    /// time of their arrival for idleness, read once instead of once per message.
    burst_at: Instant,
}

/// Each topic's number of partitions, for the finalizer: asked of the broker once a minute, not on
/// every pass (a metadata request waits behind the consumer's fetch, see `heartbeat`).
#[derive(Default)]
struct PartitionCounts(HashMap<String, (Instant, i32)>);

impl PartitionCounts {
    const MAX_AGE: Duration = Duration::from_secs(60);

    fn get(&mut self, consumer: &GroupConsumer, topic: &str) -> Option<i32> {
        if let Some((at, count)) = self.0.get(topic) {
            if at.elapsed() < Self::MAX_AGE {
                return Some(*count);
            }
        }
        let count = tokio::task::block_in_place(|| consumer.fetch_metadata(Some(topic), Duration::from_secs(10)))
            .ok()
            .and_then(|m| m.topics().first().map(|t| t.partitions().len() as i32))
            .filter(|c| *c > 0)?;
        self.0.insert(topic.to_string(), (Instant::now(), count));
        Some(count)
    }
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
    let instance = instance_name();
    tracing::info!(%instance, "instance name (written as the owner of claimed partitions)");
    let mut l = Loop {
        cfg,
        consumer: &consumer,
        out: Output {
            store: &store,
            prefix: &prefix,
            layout: &layout,
            format: cfg.output.format,
            columns: &cfg.output.columns,
            gzip_level: cfg.output.gzip_level,
            staging: &cfg.staging_dir,
            quarantine: &cfg.quarantine,
            dedupe: &cfg.dedupe,
            request_timeout: cfg.output.request_timeout,
            instance: &instance,
            beat: Some(beat.clone()),
        },
        health,
        shutdown,
        beat,
        partitions: TpMap::default(),
        held: VecDeque::new(),
        held_bytes: 0,
        paused: false,
        held_off: TpMap::default(),
        committed_cache: TpMap::default(),
        rewound: TpMap::default(),
        store_health: StoreHealth {
            failing_since: None,
            last_logged: None,
            unhealthy_after: cfg.output.unhealthy_after,
        },
        partition_counts: PartitionCounts::default(),
        current_tp: Tp::default(),
        current_epoch: None,
        kafka_failed: false,
        burst_at: Instant::now(),
    };
    let mut finalizer = Finalizer::default();
    let mut last_finalize = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    // One stream for the whole run: `recv()` registers and unregisters a waker under a mutex
    // for every message (1-2 % of the CPU).
    let mut messages = consumer.stream();
    loop {
        l.beat.beat();
        l.burst_at = Instant::now();
        l.handle_held().await;
        tokio::select! {
            _ = l.shutdown.wait() => break,
            Some(msg) = messages.next() => {
                l.burst_at = Instant::now();
                l.received(msg).await;
                // Messages librdkafka has already fetched are handled in one go: the checks
                // below (revocations, idle partitions, cuts and heartbeats of every partition)
                // cost more than a record, and once per message they were a third of the CPU.
                // A cut during the burst holds newer messages back (`held`): the burst ends so
                // they are handled first, in order.
                for _ in 1..BURST {
                    if !l.held.is_empty() || l.paused || l.shutdown.is_triggered() {
                        break;
                    }
                    // Polled once: a message already queued, or none. (A zero time-out did the
                    // same with a clock read per message.)
                    match messages.next().now_or_never() {
                        Some(Some(msg)) => l.received(msg).await,
                        _ => break,
                    }
                }
            }
            _ = tick.tick() => {},
        }
        l.apply_revocations();
        l.release_held_off();
        l.open_idle_partitions().await;
        let keys: Vec<Tp> = l.partitions.keys().cloned().collect();
        for tp in keys {
            l.reseek_stalled_replay(&tp);
            l.cut_if_due(&tp).await;
            l.heartbeat(&tp).await;
        }
        if last_finalize.elapsed() >= cfg.finalize.interval {
            last_finalize = Instant::now();
            finalize(&mut l, &mut finalizer).await;
        }
    }
    // Drain: upload and commit what is staged, so a restart starts clean. Bounded: a store that
    // does not answer must not keep the process from stopping (the data is still in Kafka).
    tracing::info!(partitions = l.partitions.len(), "shutting down: uploading staged records");
    let drained = tokio::time::timeout(DRAIN_LIMIT, async {
        l.apply_revocations();
        let keys: Vec<Tp> = l.partitions.keys().cloned().collect();
        for tp in keys {
            if let Some(cut) = l.partitions.get(&tp).and_then(Partition::cut_for_shutdown) {
                l.run_cut(&tp, cut).await;
            }
        }
        finalize(&mut l, &mut finalizer).await;
    })
    .await;
    if drained.is_err() {
        tracing::warn!(limit = ?DRAIN_LIMIT, "shutdown: staged records not all uploaded in time; they will be re-read from Kafka");
    }
    Ok(())
}

impl Loop<'_> {
    fn context(&self) -> &GroupContext {
        self.consumer.context()
    }

    async fn handle_held(&mut self) {
        while let Some((m, epoch)) = self.held.pop_front() {
            self.held_bytes = self.held_bytes.saturating_sub(m.payload().map_or(0, <[u8]>::len));
            let tp: Tp = (m.topic().to_string(), m.partition());
            // Held during a cut: the assignment it was fetched under may have ended since.
            if self.context().epoch_of(&tp) == Some(epoch) {
                self.handle(&m, &tp, epoch).await;
            }
        }
        if self.paused {
            self.paused = false;
            let resume = self.owned_tpl(|tp| !self.held_off.contains_key(tp));
            if let Err(e) = self.consumer.resume(&resume) {
                tracing::warn!(error = %e, "resuming partitions after a cut");
            }
        }
    }

    /// A message (or error) just taken from the consumer.
    async fn received(&mut self, msg: KafkaResult<BorrowedMessage<'_>>) {
        match msg {
            Ok(m) => {
                if self.kafka_failed {
                    self.kafka_failed = false;
                    self.health.up("kafka");
                }
                // The key is rebuilt in place: one allocation per message was 2-3 % of the CPU.
                let mut tp = std::mem::take(&mut self.current_tp);
                let mut same_tp = true;
                if tp.0 != m.topic() {
                    tp.0.clear();
                    tp.0.push_str(m.topic());
                    same_tp = false;
                }
                same_tp &= tp.1 == m.partition();
                tp.1 = m.partition();
                // Read once: assignments change only in rebalance callbacks, which run inside
                // the consumer's poll, not while this message is handled; and read again only
                // when the partition or the assignments changed since the last message.
                let changes = self.context().changes();
                let epoch = match self.current_epoch {
                    Some((seen, epoch)) if same_tp && seen == changes => epoch,
                    _ => {
                        let epoch = self.context().epoch_of(&tp);
                        self.current_epoch = Some((changes, epoch));
                        epoch
                    }
                };
                if let Some(epoch) = epoch {
                    self.handle(&m, &tp, epoch).await;
                } // else fetched under an assignment that has since ended; its next owner reads it
                self.current_tp = tp;
            }
            Err(e) => {
                tracing::warn!(error = %e, "consume error");
                self.kafka_failed = true;
                self.health.down("kafka", e.to_string());
                metrics::counter!("tron_sink_consume_errors_total").increment(1);
            }
        }
    }

    /// `epoch`: the assignment of `tp` the message was fetched under, still the current one.
    ///
    /// A record for a partition already open under this assignment (all but the first of each
    /// assignment) looks the partition up twice: once to see that it is open, once to append.
    /// The checks that each took a lookup of their own (stale, open, replayed cut, append, cut
    /// due) were 3-5 % of an NDJSON sink's CPU, hashing and comparing the topic each time.
    async fn handle<M: Message>(&mut self, m: &M, tp: &Tp, epoch: u64) {
        self.apply_revocations();
        if self.held_off.get(tp).is_some_and(|h| h.epoch == epoch) {
            return;
        }
        let forced_cut = match self.partitions.get(tp) {
            Some(p) if p.epoch == epoch => p.forced_cut_before(m.offset()),
            _ => {
                if !self.open_partition(m, tp, epoch).await {
                    return;
                }
                self.partitions.get(tp).and_then(|p| p.forced_cut_before(m.offset()))
            }
        };
        if let Some(cut) = forced_cut {
            if !self.run_cut(tp, cut).await {
                return;
            }
        }
        match self.append_to_open(tp, m) {
            Ok(None) => {}
            // Size, hour-passed and replayed cuts are due as soon as the record that triggers
            // them lands; the timers are checked after each burst (`run`).
            Ok(Some(cut)) => {
                self.run_cut(tp, cut).await;
            }
            Err(e) => {
                tracing::error!(topic = %tp.0, partition = tp.1, error = %format!("{e:#}"), "staging failed; giving the partition up and re-reading it later");
                self.health.down("staging", format!("{e:#}"));
                metrics::counter!("tron_sink_staging_errors_total").increment(1);
                let p = self.partitions.remove(tp).expect("present");
                self.discard_and_hold_off(tp, p);
            }
        }
    }

    /// Stages the record in its partition, when that is open; returns the cut it makes due.
    fn append_to_open<M: Message>(&mut self, tp: &Tp, m: &M) -> anyhow::Result<Option<i64>> {
        let incoming = incoming(m);
        let Some(p) = self.partitions.get_mut(tp) else { return Ok(None) };
        p.append(&self.out, &incoming, self.burst_at)?;
        p.consumed.increment(1);
        Ok(p.cut_due_on_arrival(&self.cfg.roll, self.cfg.finalize.lateness))
    }

    /// Opens `tp` for the assignment `epoch` (a partition open under an earlier one is discarded
    /// first), from the group's committed offset; returns whether it is open now. It is not when
    /// the offset cannot be fetched or the partition cannot be opened (then it is held off), or
    /// when the record is past the committed offset the first time (then it is re-read from there).
    async fn open_partition<M: Message>(&mut self, m: &M, tp: &Tp, epoch: u64) -> bool {
        if let Some(stale) = self.partitions.remove(tp) {
            stale.discard();
        }
        let committed = match self.committed(tp, epoch) {
            Ok(committed) => committed.unwrap_or(m.offset()),
            Err(e) => {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot fetch the committed offset; not reading the partition until it can be fetched");
                metrics::counter!("tron_sink_offset_fetch_errors_total").increment(1);
                self.hold_off(tp, epoch, m.offset());
                return false;
            }
        };
        if m.offset() > committed && self.rewound.insert(tp.clone(), epoch) != Some(epoch) {
            // librdkafka may go on from its own fetch position when a rebalance gives a
            // partition back to this instance (librdkafka#1802), and a message held from
            // before a seek can come first: staging from here would skip the records in
            // between, and the next cut would commit past them.
            tracing::info!(topic = %tp.0, partition = tp.1, committed, first = m.offset(), "first record is past the committed offset; re-reading from the committed offset");
            metrics::counter!("tron_sink_rewinds_total", "topic" => tp.0.clone()).increment(1);
            self.seek(tp, committed);
            return false;
        }
        if m.offset() > committed {
            // Re-read from the committed offset and still past it: those offsets hold nothing
            // this consumer can read (removed by retention and reset past, a failed seek, or a
            // transaction marker from a transactional producer). Never silent.
            let skipped = m.offset() - committed;
            tracing::warn!(topic = %tp.0, partition = tp.1, committed, first = m.offset(), skipped, "offset gap: reading resumes past the committed offset; records there, if any, were never written (retention shorter than an outage?)");
            metrics::counter!("tron_sink_offset_gaps_total", "topic" => tp.0.clone()).increment(1);
            metrics::counter!("tron_sink_offset_gap_offsets_total", "topic" => tp.0.clone()).increment(skipped as u64);
        }
        match Partition::open(&self.out, &tp.0, tp.1, committed, epoch).await {
            Ok(p) => {
                self.catch_up_group_offset(tp, committed, &p);
                self.partitions.insert(tp.clone(), p);
            }
            Err(e) => {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %format!("{e:#}"), "cannot open the partition; re-reading it later");
                self.hold_off(tp, epoch, committed);
                return false;
            }
        }
        true
    }

    /// A partition opened past the group's offset (its state was written, the offset commit was
    /// not): commits the state's offset, so lag and the next assignment start where the objects
    /// end. A failure is only logged: the next cut commits past it anyway, and records below it
    /// are skipped on reading.
    fn catch_up_group_offset(&self, tp: &Tp, group_offset: i64, p: &Partition) {
        if p.committed() <= group_offset {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        let result = tpl
            .add_partition_offset(&tp.0, tp.1, Offset::Offset(p.committed()))
            .map_err(anyhow::Error::from)
            .and_then(|()| Ok(tokio::task::block_in_place(|| self.consumer.commit(&tpl, CommitMode::Sync))?));
        match result {
            Ok(()) => metrics::counter!("tron_sink_group_offset_catch_ups_total", "topic" => tp.0.clone()).increment(1),
            Err(e) => {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %format!("{e:#}"), "cannot commit the partition state's offset; the next cut will")
            }
        }
    }

    /// A replayed cut waits for the records below it to be read again; if none come, the seek
    /// that should have brought them is issued again (appending skips what was already read).
    fn reseek_stalled_replay(&mut self, tp: &Tp) {
        let Some(p) = self.partitions.get_mut(tp) else { return };
        if !p.replay_stalled(self.cfg.roll.idle_after) {
            return;
        }
        p.reseeked();
        let offset = p.next_offset();
        tracing::info!(topic = %tp.0, partition = tp.1, offset, "replayed cut still waiting for its records; seeking again");
        self.seek(tp, offset);
    }

    async fn cut_if_due(&mut self, tp: &Tp) {
        let Some(p) = self.partitions.get(tp) else { return };
        if let Some(cut) = p.cut_due(&self.cfg.roll, self.cfg.finalize.lateness) {
            self.run_cut(tp, cut).await;
        }
    }

    /// Cuts and commits, retrying store failures until the cut lands (skipping it would break
    /// exactly-once), while polling the consumer. Returns whether the partition is still ours.
    async fn run_cut(&mut self, tp: &Tp, cut: i64) -> bool {
        let Some(mut p) = self.partitions.remove(tp) else { return false };
        let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(30));
        loop {
            self.beat.beat();
            let started = Instant::now();
            let consumer = self.consumer;
            let commit = |offset: i64| -> anyhow::Result<()> {
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition_offset(&tp.0, tp.1, Offset::Offset(offset))?;
                tokio::task::block_in_place(|| consumer.commit(&tpl, CommitMode::Sync))?;
                Ok(())
            };
            let attempt = p.cut(&self.out, cut, commit);
            let result = poll_while(consumer, &mut self.held, &mut self.held_bytes, &mut self.paused, attempt).await;
            let failure = match result {
                Ok(()) => {
                    self.store_health.ok(&self.health);
                    self.health.up("staging");
                    self.partitions.insert(tp.clone(), p);
                    return true;
                }
                Err(e) => CutFailure::from(e),
            };
            match failure {
                CutFailure::Fenced(e) => {
                    tracing::warn!(topic = %tp.0, partition = tp.1, cut, error = %format!("{e:#}"), "fenced: another instance owns this partition now; giving it up without committing");
                    metrics::counter!("tron_sink_fenced_total").increment(1);
                    self.discard_and_hold_off(tp, p);
                    return false;
                }
                CutFailure::LostMembership(e) => {
                    // A broker restart or a session time-out: retrying the commit cannot succeed,
                    // and waiting would keep the consumer from rejoining. Every partition is given
                    // up and rewound; each cut's recorded intent makes its next owner replay it.
                    tracing::warn!(topic = %tp.0, partition = tp.1, cut, error = %format!("{e:#}"), "commit refused: group membership lost; giving every partition up");
                    metrics::counter!("tron_sink_membership_lost_total").increment(1);
                    self.give_up(p);
                    let all: Vec<Tp> = self.partitions.keys().cloned().collect();
                    for other in all {
                        let p = self.partitions.remove(&other).expect("listed");
                        self.give_up(p);
                    }
                    return false;
                }
                CutFailure::Staging(e) => {
                    tracing::error!(topic = %tp.0, partition = tp.1, cut, error = %format!("{e:#}"), "staging failed; giving the partition up and re-reading it later");
                    self.health.down("staging", format!("{e:#}"));
                    metrics::counter!("tron_sink_staging_errors_total").increment(1);
                    self.discard_and_hold_off(tp, p);
                    return false;
                }
                CutFailure::Store(e) => {
                    metrics::counter!("tron_sink_cut_retries_total").increment(1);
                    let what = format!("cut of {}/{} at {cut}", tp.0, tp.1);
                    self.store_health.failed(&self.health, started, &what, &e);
                    if self.shutdown.is_triggered() || self.context().epoch_of(tp) != Some(p.epoch) {
                        // Stopping, or revoked meanwhile: nothing was committed, Kafka keeps it.
                        p.discard();
                        return false;
                    }
                    let pause = tokio::time::sleep(backoff.next_delay());
                    let shutdown = self.shutdown.clone();
                    let wait = async move {
                        tokio::select! { _ = pause => {}, _ = shutdown.wait() => {} }
                    };
                    poll_while(self.consumer, &mut self.held, &mut self.held_bytes, &mut self.paused, wait).await;
                }
            }
        }
    }

    /// Drops a partition's staging and, if it is still assigned, rewinds the consumer to the
    /// committed offset so its next `Partition` starts where the objects end.
    fn give_up(&mut self, p: Partition) {
        let (tp, committed, epoch) = ((p.topic.clone(), p.partition), p.committed(), p.epoch);
        p.discard();
        if self.context().epoch_of(&tp) == Some(epoch) {
            self.seek(&tp, committed);
        }
    }

    /// Drops a given-up partition's staging and leaves it alone for `HOLD_OFF`.
    fn discard_and_hold_off(&mut self, tp: &Tp, p: Partition) {
        let (committed, epoch) = (p.committed(), p.epoch);
        p.discard();
        self.hold_off(tp, epoch, committed);
    }

    /// Leaves a partition alone for `HOLD_OFF` (paused), then re-reads it from `committed`.
    fn hold_off(&mut self, tp: &Tp, epoch: u64, committed: i64) {
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition(&tp.0, tp.1);
        let _ = self.consumer.pause(&tpl);
        self.seek(tp, committed);
        self.held_off.insert(tp.clone(), HeldOff { epoch, until: Instant::now() + HOLD_OFF, committed });
    }

    fn release_held_off(&mut self) {
        let due: Vec<Tp> =
            self.held_off.iter().filter(|(_, h)| Instant::now() >= h.until).map(|(tp, _)| tp.clone()).collect();
        for tp in due {
            let held = self.held_off.remove(&tp).expect("listed");
            if self.context().epoch_of(&tp).is_some() {
                // Resume first, then seek: librdkafka may drop a seek on a paused partition, and
                // the fetch would go on from past the records that were given up. A partition
                // that never had a commit goes back to where its given-up staging began.
                let mut tpl = TopicPartitionList::new();
                tpl.add_partition(&tp.0, tp.1);
                let _ = self.consumer.resume(&tpl);
                // Only where to fetch from: the partition is opened (and its committed offset
                // asked again) at its next message.
                let committed = committed_offset(self.consumer, &tp.0, tp.1).ok().flatten().unwrap_or(held.committed);
                self.seek(&tp, committed);
                tracing::info!(topic = %tp.0, partition = tp.1, committed, "re-reading a partition that was given up");
            }
        }
    }

    /// The group's committed offset for a partition about to be opened under `epoch` (`Ok(None)`:
    /// none; `Err`: the broker could not be asked).
    fn committed(&mut self, tp: &Tp, epoch: u64) -> Result<Option<i64>, String> {
        if let Some((cached_epoch, offset)) = self.committed_cache.remove(tp) {
            if cached_epoch == epoch {
                return Ok(offset);
            }
        }
        let unopened: Vec<(Tp, u64)> = self
            .context()
            .owned()
            .into_iter()
            .filter(|(t, _)| !self.partitions.contains_key(t))
            .map(|(t, a)| (t, a.epoch))
            .collect();
        let mut tpl = TopicPartitionList::new();
        for (t, _) in &unopened {
            tpl.add_partition(&t.0, t.1);
        }
        let committed = tokio::task::block_in_place(|| self.consumer.committed_offsets(tpl, Duration::from_secs(10)));
        let Ok(committed) = committed else {
            return committed_offset(self.consumer, &tp.0, tp.1);
        };
        for (t, e) in unopened {
            // A partition the answer lacks, or answers with an error, is asked again on its own.
            let Some(entry) = committed.find_partition(&t.0, t.1).filter(|e| e.error().is_ok()) else {
                continue;
            };
            let offset = match entry.offset() {
                Offset::Offset(o) => Some(o),
                _ => None,
            };
            self.committed_cache.insert(t, (e, offset));
        }
        match self.committed_cache.remove(tp) {
            Some((e, offset)) if e == epoch => Ok(offset),
            _ => committed_offset(self.consumer, &tp.0, tp.1),
        }
    }

    /// Every seek also drops the messages held for the partition: they were fetched before it.
    fn seek(&mut self, tp: &Tp, offset: i64) {
        let before = self.held.len();
        self.held.retain(|(m, _)| (m.topic(), m.partition()) != (tp.0.as_str(), tp.1));
        if self.held.len() != before {
            self.held_bytes = self.held.iter().map(|(m, _)| m.payload().map_or(0, <[u8]>::len)).sum();
        }
        let result = tokio::task::block_in_place(|| {
            self.consumer.seek(&tp.0, tp.1, Offset::Offset(offset), Duration::from_secs(10))
        });
        if let Err(e) = result {
            tracing::debug!(topic = %tp.0, partition = tp.1, offset, error = %e, "seek");
        }
    }

    fn owned_tpl(&self, keep: impl Fn(&Tp) -> bool) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        for (tp, _) in self.context().owned() {
            if keep(&tp) {
                tpl.add_partition(&tp.0, tp.1);
            }
        }
        tpl
    }

    fn position(&self, tp: &Tp) -> Option<i64> {
        let positions = self.consumer.position().ok()?;
        match positions.find_partition(&tp.0, tp.1)?.offset() {
            Offset::Offset(o) => Some(o),
            _ => None,
        }
    }

    /// Revocations are applied before any further message is handled.
    fn apply_revocations(&mut self) {
        if !self.context().revocations_pending.swap(false, Ordering::Acquire) {
            return;
        }
        let revoked: Vec<_> = std::mem::take(&mut *self.context().revoked.lock().expect("revoked lock"));
        for tp in revoked {
            self.held_off.remove(&tp);
            self.committed_cache.remove(&tp);
            self.rewound.remove(&tp);
            if let Some(p) = self.partitions.remove(&tp) {
                tracing::info!(topic = %tp.0, partition = tp.1, committed = p.committed(), "revoked: discarding staged records; the new owner re-reads them");
                p.discard();
            }
        }
    }

    /// A partition that has had no message since it was assigned still reports progress, so an
    /// idle partition does not hold back the finalizer.
    async fn open_idle_partitions(&mut self) {
        let idle: Vec<(Tp, u64)> = self
            .context()
            .owned()
            .into_iter()
            .filter(|(tp, a)| {
                a.since.elapsed() >= self.cfg.roll.idle_after
                    && !self.partitions.contains_key(tp)
                    && !self.held_off.contains_key(tp)
            })
            .map(|(tp, a)| (tp, a.epoch))
            .collect();
        for (tp, epoch) in idle {
            let committed = match self.committed(&tp, epoch) {
                Ok(Some(o)) => o,
                Ok(None) => {
                    tokio::task::block_in_place(|| self.consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(10)))
                        .map(|(low, _)| low)
                        .unwrap_or(0)
                }
                Err(e) => {
                    // Not "nothing committed": opened at the low offset it would re-read (and
                    // count) what is already written. Tried again at the next idle check.
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %e, "cannot fetch the committed offset of an idle partition; trying later");
                    metrics::counter!("tron_sink_offset_fetch_errors_total").increment(1);
                    continue;
                }
            };
            // Reading starts where the objects end, whatever position librdkafka kept from an
            // earlier assignment (see `handle`): a position past `committed` would let the
            // heartbeat report the partition caught up with records never staged.
            // An unknown position (nothing fetched yet) is left alone: a seek then leaves a stale
            // position behind that made the heartbeat report unread records as read (a premature
            // `_SUCCESS` in test_finalizer). A held-off partition was already re-positioned in
            // `release_held_off`.
            if let Some(position) = self.position(&tp).filter(|p| *p != committed) {
                tracing::info!(topic = %tp.0, partition = tp.1, committed, position, "idle partition's read position is not its committed offset; re-reading from the committed offset");
                metrics::counter!("tron_sink_rewinds_total", "topic" => tp.0.clone()).increment(1);
                self.seek(&tp, committed);
            }
            match Partition::open(&self.out, &tp.0, tp.1, committed, epoch).await {
                Ok(p) => {
                    self.catch_up_group_offset(&tp, committed, &p);
                    self.partitions.insert(tp, p);
                }
                Err(e) => {
                    tracing::warn!(topic = %tp.0, partition = tp.1, error = %format!("{e:#}"), "cannot open an idle partition; trying later");
                    self.hold_off(&tp, epoch, committed);
                }
            }
        }
    }

    /// Progress for the finalizer. "At the end" compares the consumer's position with the
    /// partition's end as the broker reports it.
    async fn heartbeat(&mut self, tp: &Tp) {
        let Some(p) = self.partitions.get(tp) else { return };
        if !p.heartbeat_due(self.cfg.finalize.interval) {
            return;
        }
        let position = if p.position_trusted() { self.position(tp) } else { None };
        let read_to = position.unwrap_or(0).max(p.next_offset());
        // The broker is asked only when the answer can matter: each request waits behind the
        // consumer's fetch on the same connection (up to fetch.wait.max.ms, 500 ms), and this loop
        // reads no message meanwhile; asked on every heartbeat of every partition, that slowed a
        // replay to a message a second.
        let at_end = p.quiet(&self.cfg.roll) && {
            let end =
                tokio::task::block_in_place(|| self.consumer.fetch_watermarks(&tp.0, tp.1, Duration::from_secs(5)));
            matches!(end, Ok((_, high)) if read_to >= high)
        };
        let Some(p) = self.partitions.get_mut(tp) else { return };
        if let Err(e) = p.heartbeat(&self.out, &self.cfg.roll, at_end).await {
            if e.downcast_ref::<Fenced>().is_some() {
                tracing::warn!(topic = %tp.0, partition = tp.1, "fenced while reporting progress; giving the partition up");
                metrics::counter!("tron_sink_fenced_total").increment(1);
                let p = self.partitions.remove(tp).expect("present");
                self.discard_and_hold_off(tp, p);
            } else {
                tracing::warn!(topic = %tp.0, partition = tp.1, error = %format!("{e:#}"), "progress not written; will retry");
            }
        }
    }
}

/// Drives `work` to completion while polling the consumer: rebalance callbacks run, and messages
/// are held (with their assignment epoch) for after the cut. Past `HELD_BYTES_LIMIT` every owned
/// partition is paused, which stops fetching.
async fn poll_while<T>(
    consumer: &GroupConsumer,
    held: &mut VecDeque<(OwnedMessage, u64)>,
    held_bytes: &mut usize,
    paused: &mut bool,
    work: impl std::future::Future<Output = T>,
) -> T {
    tokio::pin!(work);
    loop {
        tokio::select! {
            biased;
            result = &mut work => return result,
            msg = consumer.recv() => match msg {
                Ok(m) => {
                    let tp = (m.topic().to_string(), m.partition());
                    let Some(epoch) = consumer.context().epoch_of(&tp) else { continue };
                    *held_bytes += m.payload().map_or(0, <[u8]>::len);
                    held.push_back((m.detach(), epoch));
                    if *held_bytes >= HELD_BYTES_LIMIT {
                        let mut tpl = TopicPartitionList::new();
                        for (tp, _) in consumer.context().owned() {
                            tpl.add_partition(&tp.0, tp.1);
                        }
                        if let Err(e) = consumer.pause(&tpl) {
                            tracing::warn!(error = %e, "pausing partitions during a slow cut");
                        }
                        *paused = true;
                    }
                }
                Err(e) => tracing::warn!(error = %e, "consume error during a cut"),
            },
        }
    }
}

fn incoming<M: Message>(m: &M) -> Incoming<'_> {
    let mut incoming = Incoming {
        offset: m.offset(),
        event_time_ns: None,
        kafka_time_ms: m.timestamp().to_millis().filter(|ms| *ms >= 0),
        tag: "",
        raw: m.payload().unwrap_or_default(),
        position: None,
        is_watermark: false,
    };
    // A record with an origin says its meta in its key and has no header (tron_service::headers).
    // Its headers are not even asked for: librdkafka answers that there are none only after
    // allocating a buffer to read their count (4 % of the CSV sink's CPU).
    if let Some(meta) = m.key().and_then(RecordMeta::decode_key) {
        incoming.event_time_ns = Some(meta.event_time_ns);
        incoming.tag = meta.tag;
        incoming.position = meta.origin;
        return incoming;
    }
    let Some(headers) = m.headers() else { return incoming };
    // Records of older relays carry four headers instead of the one (tron_service::headers).
    let (mut source, mut range) = (None, None);
    for i in 0..headers.count() {
        let h = headers.get(i);
        match (h.key, h.value) {
            (headers::RECORD, Some(v)) => {
                if let Some(meta) = RecordMeta::decode(v) {
                    incoming.event_time_ns = Some(meta.event_time_ns);
                    incoming.tag = meta.tag;
                    incoming.position = meta.origin;
                }
            }
            (headers::WATERMARKS, _) => incoming.is_watermark = true,
            (headers::TAG, Some(v)) => incoming.tag = std::str::from_utf8(v).unwrap_or(""),
            (headers::EVENT_TIME_NS, Some(v)) => {
                incoming.event_time_ns = std::str::from_utf8(v).ok().and_then(|s| s.parse().ok());
            }
            (headers::SOURCE, v) => source = v,
            (headers::RANGE, v) => range = v,
            _ => {}
        }
    }
    if source.is_some() {
        incoming.position = Origin::from_old_headers(source, range);
    }
    incoming
}

/// Names this process in the state objects it claims: host and pid.
fn instance_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    format!("{}:{}", host.trim(), std::process::id())
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

/// The group's committed offset: `Ok(None)` when the group has none for the partition, `Err`
/// when the broker could not be asked (an OffsetFetch that failed is not "nothing committed":
/// read that way, the partition would start wherever librdkafka's fetch happens to be).
fn committed_offset(consumer: &GroupConsumer, topic: &str, partition: i32) -> Result<Option<i64>, String> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition(topic, partition);
    let committed = tokio::task::block_in_place(|| consumer.committed_offsets(tpl, Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let entry = committed.find_partition(topic, partition).ok_or("the broker's answer names no such partition")?;
    if let Err(e) = entry.error() {
        return Err(e.to_string());
    }
    Ok(match entry.offset() {
        Offset::Offset(o) => Some(o),
        _ => None,
    })
}

/// The owner of a topic's partition 0 finalizes that topic's hours, so one instance does it. A
/// pass is bounded by `output.request_timeout`, so a store that does not answer cannot hang the
/// loop (and is reported like a failing upload).
async fn finalize(l: &mut Loop<'_>, finalizer: &mut Finalizer) {
    let (consumer, cfg) = (l.consumer, l.cfg);
    for topic in &cfg.kafka.topics {
        if consumer.context().epoch_of(&(topic.clone(), 0)).is_none() {
            continue;
        }
        let Some(count) = l.partition_counts.get(consumer, topic) else {
            continue;
        };
        let started = Instant::now();
        let pass = finalizer.run_once(l.out.store, l.out.prefix, l.out.layout, topic, count, &cfg.finalize);
        let result = match l.beat.while_waiting(tokio::time::timeout(cfg.output.request_timeout, pass)).await {
            Ok(result) => result,
            Err(_) => {
                Err(anyhow::anyhow!("no answer within {:?} (output.request_timeout)", cfg.output.request_timeout))
            }
        };
        if let Err(e) = result {
            l.store_health.failed(&l.health, started, &format!("finalizer pass for {topic}"), &e);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::Timestamp;

    fn message(headers: OwnedHeaders) -> OwnedMessage {
        let payload = br#"{"m":1}"#.to_vec();
        OwnedMessage::new(Some(payload), None, "t".into(), Timestamp::CreateTime(1_000), 0, 7, Some(headers))
    }

    fn keyed(key: &[u8]) -> OwnedMessage {
        let payload = br#"{"m":1}"#.to_vec();
        OwnedMessage::new(Some(payload), Some(key.to_vec()), "t".into(), Timestamp::CreateTime(1_000), 0, 7, None)
    }

    #[test]
    fn a_record_reads_the_same_from_its_key_its_one_header_and_an_older_relays_four() {
        let mut value = Vec::new();
        let origin = Some(Origin { source: "web-1/8a7c", start: 10, end: 225 });
        let meta = RecordMeta { event_time_ns: 1_733_300_000_123_456_789, tag: "app.log", origin };
        meta.encode(&mut value);
        let new = message(OwnedHeaders::new().insert(Header { key: headers::RECORD, value: Some(&value) }));
        let mut key = Vec::new();
        meta.encode_key(&mut key);
        let in_key = keyed(&key);
        let old = message(
            OwnedHeaders::new()
                .insert(Header { key: headers::TAG, value: Some("app.log") })
                .insert(Header { key: headers::EVENT_TIME_NS, value: Some("1733300000123456789") })
                .insert(Header { key: headers::SOURCE, value: Some("web-1/8a7c") })
                .insert(Header { key: headers::RANGE, value: Some("10-225") }),
        );
        for m in [&in_key, &new, &old] {
            let i = incoming(m);
            assert_eq!(i.event_time_ns, Some(1_733_300_000_123_456_789));
            assert_eq!(i.tag, "app.log");
            assert_eq!(i.position, origin);
            assert_eq!((i.offset, i.kafka_time_ms, i.raw, i.is_watermark), (7, Some(1_000), &br#"{"m":1}"#[..], false));
        }
    }

    #[test]
    fn a_malformed_record_header_or_a_key_not_ours_leaves_the_record_without_time_tag_or_origin() {
        let m = message(OwnedHeaders::new().insert(Header { key: headers::RECORD, value: Some("12 9:short") }));
        let i = incoming(&m);
        assert_eq!((i.event_time_ns, i.tag, i.position), (None, "", None));
        // A key that is not a record's meta (`kafka.key_field`, another producer's) says nothing.
        for key in [&b"user-42"[..], b"tron:12 9:short", b"1733300000123456789 7:app.log"] {
            let m = keyed(key);
            let i = incoming(&m);
            assert_eq!((i.event_time_ns, i.tag, i.position), (None, "", None));
        }
        let watermark = message(OwnedHeaders::new().insert(Header { key: headers::WATERMARKS, value: Some("1") }));
        assert!(incoming(&watermark).is_watermark);
    }
}

//! Delivers a chunk's records to Kafka and answers only when every one of them is acknowledged.
//!
//! Delivery reports are counted per chunk: every record of a chunk carries the same
//! `Arc<ChunkDelivery>`, and the chunk's task wakes once when the last report arrives (no future,
//! channel or allocation per record).

use crate::config::KafkaConfig;
use forward::Records;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Partitioner, Producer, ProducerContext, ThreadedProducer};
use rdkafka::ClientContext;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use tron_service::headers::{self, Origin, RecordMeta};

type KafkaProducer = ThreadedProducer<DeliveryContext, SourcePartitioner>;

/// Reports of one chunk's records.
#[derive(Default)]
struct ChunkDelivery {
    /// Records not reported yet, plus one held until every record is produced.
    pending: AtomicUsize,
    done: tokio::sync::Notify,
    /// The first failure that fails the chunk.
    error: Mutex<Option<KafkaError>>,
    /// Records the broker refused as too large: (payload, event time in ns, error).
    too_large: Mutex<Vec<(Vec<u8>, i64, KafkaError)>>,
}

impl ChunkDelivery {
    fn reported(&self) {
        if self.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.done.notify_one();
        }
    }

    /// Releases the one held while producing and waits for every report.
    async fn all_reported(&self) {
        let done = self.done.notified();
        self.reported();
        done.await;
    }
}

/// Queues one record of `chunk`, waiting while librdkafka's queue is full. An error means it was
/// never queued (no report will come for it).
async fn enqueue<K: rdkafka::message::ToBytes + ?Sized>(
    producer: &KafkaProducer,
    mut rec: BaseRecord<'_, K, [u8], Arc<ChunkDelivery>>,
    chunk: &ChunkDelivery,
) -> Result<(), KafkaError> {
    chunk.pending.fetch_add(1, Ordering::AcqRel);
    loop {
        match producer.send(rec) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((error, _)) => {
                chunk.reported();
                return Err(error);
            }
        }
    }
}

/// The event time a record carries in its key or header (its Kafka timestamp is when the relay
/// got it).
fn event_time_ns(message: &rdkafka::message::BorrowedMessage<'_>) -> Option<i64> {
    use rdkafka::message::Headers;
    if let Some(meta) = message.key().and_then(RecordMeta::decode_key) {
        return Some(meta.event_time_ns);
    }
    let headers = message.headers()?;
    let header = headers.iter().find(|h| h.key == headers::RECORD)?;
    Some(RecordMeta::decode(header.value?)?.event_time_ns)
}

struct DeliveryContext {
    /// Set when records carry their [`RecordMeta`] in the key (see [`Kafka::meta_in_key`]).
    partitioner: Option<SourcePartitioner>,
}

impl ClientContext for DeliveryContext {}

/// Picks a record's partition from [`headers::partition_key`] the way librdkafka's default
/// partitioner (`consistent_random`) picks it from a key: the key's CRC-32 modulo the partitions,
/// a random one for none. A record whose key is its [`RecordMeta`] thus goes where it went when
/// its source was the key, and a file's records stay in one partition across the change (the
/// sink's dedupe keeps each source's ranges per partition, docs/exactly-once.md).
struct SourcePartitioner;

impl Partitioner for SourcePartitioner {
    fn partition(&self, _topic: &str, key: Option<&[u8]>, partitions: i32, available: impl Fn(i32) -> bool) -> i32 {
        partition_of(key, partitions, available)
    }
}

fn partition_of(key: Option<&[u8]>, partitions: i32, available: impl Fn(i32) -> bool) -> i32 {
    match headers::partition_key(key) {
        Some(key) if !key.is_empty() => (crc32fast::hash(key) % partitions as u32) as i32,
        // As librdkafka's random partitioner: a second draw when the first has no leader.
        _ => {
            let p = rand::random_range(0..partitions);
            if available(p) {
                p
            } else {
                rand::random_range(0..partitions)
            }
        }
    }
}

impl ProducerContext<SourcePartitioner> for DeliveryContext {
    type DeliveryOpaque = Arc<ChunkDelivery>;

    fn get_custom_partitioner(&self) -> Option<&SourcePartitioner> {
        self.partitioner.as_ref()
    }

    fn delivery(&self, result: &DeliveryResult<'_>, chunk: Arc<ChunkDelivery>) {
        if let Err((error, message)) = result {
            if is_refused_for_good(error) {
                let payload = message.payload().unwrap_or_default().to_vec();
                let time_ns = event_time_ns(message).unwrap_or(0);
                chunk.too_large.lock().expect("too_large lock").push((payload, time_ns, error.clone()));
            } else {
                chunk.error.lock().expect("error lock").get_or_insert_with(|| error.clone());
            }
        }
        chunk.reported();
    }
}

/// What Kafka refused as too large, for the dead-letter file: the record's JSON, its event time
/// (ns) and why.
pub struct Refused {
    pub json: Vec<u8>,
    pub time_ns: i64,
    pub error: DeliveryError,
}

/// What a connection needs from Kafka: a chunk's records delivered, answered once every one of
/// them is acknowledged (records Kafka refuses as too large come back). A trait so the
/// connection's ack rule can be tested without a broker. The records are queued for Kafka only
/// in the chunk's `turn`, so a connection's records reach each partition in the order it sent them.
pub trait Deliver: Send + Sync + 'static {
    fn deliver(
        &self,
        topic: &str,
        tag: &str,
        records: &Records,
        turn: Turn,
    ) -> impl std::future::Future<Output = Result<Vec<Refused>, DeliveryError>> + Send;
}

/// A chunk's place in its connection's line for the producer queue. A connection delivers its
/// chunks concurrently (each waits for its acknowledgements in its own task), and tasks start in
/// any order: without a line, a record sent later could enter a partition before one sent
/// earlier. The sink relies on the order (a partition whose committed event time is past an hour
/// holds no more of it, docs/completeness.md); under CPU load 72 of 400 records of an hour came
/// after the next hour's records and the hour got `_SUCCESS` without them. Only the queueing
/// waits in line; the acknowledgements are still awaited together.
pub struct Turn {
    previous: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Dropped once this chunk's records are all queued (or it gave up): the next chunk's turn.
    _done: tokio::sync::oneshot::Sender<()>,
}

impl Turn {
    /// Waits until every earlier chunk of the connection has queued its records (or gave up).
    pub async fn wait(&mut self) {
        if let Some(previous) = self.previous.take() {
            let _ = previous.await; // a closed channel is the signal
        }
    }
}

/// Hands out one connection's turns, in the order its chunks were read.
#[derive(Default)]
pub struct Line {
    last: Option<tokio::sync::oneshot::Receiver<()>>,
}

impl Line {
    pub fn next_turn(&mut self) -> Turn {
        let (done, next) = tokio::sync::oneshot::channel();
        Turn { previous: self.last.replace(next), _done: done }
    }
}

impl Deliver for Kafka {
    async fn deliver(
        &self,
        topic: &str,
        tag: &str,
        records: &Records,
        turn: Turn,
    ) -> Result<Vec<Refused>, DeliveryError> {
        let producer = self.producer();
        let result = self.produce_all(&producer, topic, tag, records, turn).await;
        if let Err(DeliveryError::Kafka { error, .. }) = &result {
            self.recover(&producer, error);
        }
        result
    }
}

pub struct Kafka {
    /// Replaced after a fatal error: librdkafka's idempotent producer refuses every later message
    /// once it has one (e.g. a broker that lost its producer-id state across a restart).
    producer: RwLock<Arc<KafkaProducer>>,
    client: ClientConfig,
    key_field: Option<String>,
    /// A record with an origin carries its [`RecordMeta`] in its key, not in a header: unless the
    /// key is a field's (`kafka.key_field`) or the operator chose librdkafka's partitioner
    /// (`kafka.properties.partitioner`), which [`SourcePartitioner`] would override.
    meta_in_key: bool,
}

/// Why a chunk was not delivered; the label goes into `tron_relay_delivery_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("topic {topic}: record too large for Kafka: {error}")]
    TooLarge { topic: String, error: KafkaError },
    /// The broker refuses this record for good (its timestamp outside the broker's bounds, a
    /// record a topic policy rejects): re-sending cannot help, so it is dead-lettered like a
    /// record too large, and the rest of its chunk is acknowledged.
    #[error("topic {topic}: record refused by the broker: {error}")]
    Refused { topic: String, error: KafkaError },
    #[error("topic {topic}: {error}")]
    Kafka { topic: String, error: KafkaError },
}

impl DeliveryError {
    pub fn reason(&self) -> &'static str {
        match self {
            DeliveryError::TooLarge { .. } => "too_large",
            DeliveryError::Refused { error, .. } => match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::InvalidTimestamp) => "invalid_timestamp",
                _ => "invalid_record",
            },
            DeliveryError::Kafka { error, .. } => match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
                    "unknown_topic"
                }
                _ => "kafka_error",
            },
        }
    }
}

/// The producer's librdkafka configuration: our settings, then `kafka.properties` over them.
pub fn client_config(cfg: &KafkaConfig, max_inflight_bytes: usize) -> ClientConfig {
    let mut client = ClientConfig::new();
    client
        .set("bootstrap.servers", &cfg.brokers)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", cfg.linger.as_millis().to_string())
        .set("batch.size", cfg.batch_bytes.to_string())
        .set("compression.type", &cfg.compression)
        .set("message.timeout.ms", cfg.delivery_timeout.as_millis().to_string())
        // Tied to the relay's budget: what the budget admits fits in librdkafka's queue (a
        // full queue makes the producing chunk wait, it is never refused).
        .set("queue.buffering.max.messages", "2000000")
        .set("queue.buffering.max.kbytes", (max_inflight_bytes / 1024).clamp(1024, 2_097_151).to_string());
    for (k, v) in &cfg.properties {
        client.set(k, v);
    }
    client
}

/// Our keys behind the librdkafka properties [`client_config`] sets, for errors.
pub const TYPED_KEYS: tron_service::kafka::TypedKeys = &[
    ("bootstrap.servers", "kafka.brokers"),
    ("linger.ms", "kafka.linger"),
    ("batch.size", "kafka.batch_bytes"),
    ("compression.type", "kafka.compression"),
    ("message.timeout.ms", "kafka.delivery_timeout"),
    ("queue.buffering.max.kbytes", "limits.max_inflight_bytes"),
];

impl Kafka {
    /// `max_inflight_bytes`: the relay's budget; librdkafka's queue is capped to the same bytes,
    /// so records waiting for Kafka are held once, within the bound, not twice.
    pub fn new(cfg: &KafkaConfig, max_inflight_bytes: usize) -> anyhow::Result<Self> {
        let client = client_config(cfg, max_inflight_bytes);
        let meta_in_key = cfg.key_field.is_none() && !cfg.properties.contains_key("partitioner");
        let producer: KafkaProducer = client.create_with_context(delivery_context(meta_in_key))?;
        Ok(Kafka { producer: RwLock::new(Arc::new(producer)), client, key_field: cfg.key_field.clone(), meta_in_key })
    }

    fn producer(&self) -> Arc<KafkaProducer> {
        self.producer.read().expect("producer lock").clone()
    }

    /// After a delivery failure: if `used` is in a fatal state, or the broker no longer accepts
    /// its producer id (a broker that lost idempotence state across a restart answers every
    /// later message with `ProducerFenced` without librdkafka calling it fatal), swap in a fresh
    /// producer, once however many chunks saw the failure. Failed chunks were not acked; clients
    /// re-send them.
    fn recover(&self, used: &Arc<KafkaProducer>, error: &KafkaError) {
        let identity_lost = matches!(
            error.rdkafka_error_code(),
            Some(
                RDKafkaErrorCode::ProducerFenced
                    | RDKafkaErrorCode::InvalidProducerEpoch
                    | RDKafkaErrorCode::UnknownProducerId
                    | RDKafkaErrorCode::OutOfOrderSequenceNumber
                    | RDKafkaErrorCode::InvalidProducerIdMapping
            )
        );
        let Some((code, reason)) = used.client().fatal_error().or_else(|| {
            identity_lost.then(|| (error.rdkafka_error_code().unwrap_or(RDKafkaErrorCode::Fatal), error.to_string()))
        }) else {
            return;
        };
        let mut current = self.producer.write().expect("producer lock");
        if !Arc::ptr_eq(&current, used) {
            return;
        }
        match self.client.create_with_context::<_, KafkaProducer>(delivery_context(self.meta_in_key)) {
            Ok(fresh) => {
                tracing::error!(?code, %reason, "Kafka producer unusable (fatal error, or its producer id is no longer accepted); replaced it with a new one");
                metrics::counter!("tron_relay_producer_restarts_total").increment(1);
                *current = Arc::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "Kafka producer is in a fatal state and a new one cannot be created"),
        }
    }

    /// Produces every record and waits for all acknowledgements. Records Kafka refuses as too
    /// large come back: no retry can deliver them. Any other failure fails the whole chunk.
    async fn produce_all(
        &self,
        producer: &KafkaProducer,
        topic: &str,
        tag: &str,
        records: &Records,
        mut turn: Turn,
    ) -> Result<Vec<Refused>, DeliveryError> {
        let chunk = Arc::new(ChunkDelivery { pending: AtomicUsize::new(1), ..Default::default() });
        let mut refused = Vec::new();
        let mut meta = Vec::new();
        let mut sync_error = None;
        turn.wait().await;
        // Kafka's timestamp is when the relay received the record, not its event time (which the
        // record carries in a header): the sink's quarantine compares the two, time-based
        // retention keeps back-filled records as long as any, and brokers that bound timestamps
        // (log.message.timestamp.{before,after}.max.ms) never refuse an old or future line.
        let received_ms = tron_service::clock::now_ms();
        for (index, entry) in records.records.iter().enumerate() {
            let payload = records.get(index);
            let key = self.key_field.as_ref().and_then(|f| key_of(payload, f));
            // One key or one header says everything beside the payload (tron_service::headers).
            // The source decides the partition (unless `kafka.key_field`), so one file's records
            // stay in one partition, where the sink keeps the ranges it wrote and drops a record
            // re-sent after a crash (docs/exactly-once.md).
            let origin = records.origin.as_ref().map(|o| {
                let (start, end) = o.range(index);
                Origin { source: &o.source, start, end }
            });
            let record_meta = RecordMeta { event_time_ns: entry.time.unix_nanos(), tag, origin };
            let rec = BaseRecord::with_opaque_to(topic, chunk.clone()).payload(payload).timestamp(received_ms);
            let rec = if self.meta_in_key && origin.is_some() {
                // The meta is the key, and the partitioner reads the source from it.
                record_meta.encode_key(&mut meta);
                rec.key(&meta[..])
            } else {
                record_meta.encode(&mut meta);
                let headers =
                    OwnedHeaders::new_with_capacity(1).insert(Header { key: headers::RECORD, value: Some(&meta) });
                // The field's value, or else the source, decides the partition.
                match key.as_deref().or(origin.map(|o| o.source)) {
                    Some(key) => rec.headers(headers).key(key.as_bytes()),
                    None => rec.headers(headers),
                }
            };
            if let Err(error) = enqueue(producer, rec, &chunk).await {
                match classify(topic, error) {
                    error @ (DeliveryError::TooLarge { .. } | DeliveryError::Refused { .. }) => {
                        refused.push(Refused { json: payload.to_vec(), time_ns: entry.time.unix_nanos(), error })
                    }
                    e => {
                        sync_error = Some(e);
                        break;
                    }
                }
            }
        }
        // All queued: the connection's next chunk may queue its records.
        drop(turn);
        // Every report must be in before the chunk is answered (and before `records` may go).
        chunk.all_reported().await;
        if let Some(e) = sync_error {
            return Err(e);
        }
        if let Some(error) = chunk.error.lock().expect("error lock").take() {
            return Err(classify(topic, error));
        }
        for (json, time_ns, error) in std::mem::take(&mut *chunk.too_large.lock().expect("too_large lock")) {
            refused.push(Refused { json, time_ns, error: classify(topic, error) });
        }
        Ok(refused)
    }

    /// Writes `payload` to every partition of `topic` (a watermark message); returns how many.
    pub async fn produce_to_every_partition(&self, topic: &str, payload: &[u8]) -> Result<usize, DeliveryError> {
        let producer = self.producer();
        let partitions = tokio::task::block_in_place(|| {
            producer
                .client()
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .map(|m| m.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len()))
        })
        .map_err(|error| DeliveryError::Kafka { topic: topic.to_string(), error })?;
        let chunk = Arc::new(ChunkDelivery { pending: AtomicUsize::new(1), ..Default::default() });
        for partition in 0..partitions as i32 {
            let headers =
                OwnedHeaders::new_with_capacity(1).insert(Header { key: headers::WATERMARKS, value: Some("1") });
            let rec = BaseRecord::<(), [u8], _>::with_opaque_to(topic, chunk.clone())
                .partition(partition)
                .payload(payload)
                .headers(headers);
            if let Err(error) = enqueue(&producer, rec, &chunk).await {
                chunk.error.lock().expect("error lock").get_or_insert(error);
            }
        }
        chunk.all_reported().await;
        if let Some(error) = chunk.error.lock().expect("error lock").take() {
            return Err(classify(topic, error));
        }
        Ok(partitions)
    }

    /// Waits for everything queued to be acknowledged, up to `timeout`.
    pub fn flush(&self, timeout: Duration) -> anyhow::Result<()> {
        self.producer().flush(timeout)?;
        Ok(())
    }

    /// Whether the cluster answers a metadata request, for `/health`.
    pub fn reachable(&self, timeout: Duration) -> Result<(), String> {
        self.producer().client().fetch_metadata(None, timeout).map(|_| ()).map_err(|e| e.to_string())
    }
}

fn delivery_context(meta_in_key: bool) -> DeliveryContext {
    DeliveryContext { partitioner: meta_in_key.then_some(SourcePartitioner) }
}

/// The Kafka key from a record's field (`kafka.key_field`): a string as is, anything else as its
/// JSON text. Parses the record again, which only a relay configured with a key field pays.
fn key_of(json: &[u8], field: &str) -> Option<String> {
    let mut record: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(json).ok()?;
    match record.remove(field)? {
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    }
}

fn is_too_large(error: &KafkaError) -> bool {
    matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize)
    )
}

/// Errors about one record that no retry can change (KIP-937 timestamp bounds, record
/// validation); everything else (time-outs, leadership, authorization) fails the chunk, which
/// the client re-sends.
fn is_refused_for_good(error: &KafkaError) -> bool {
    is_too_large(error)
        || matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::InvalidTimestamp) | Some(RDKafkaErrorCode::InvalidRecord)
        )
}

fn classify(topic: &str, error: KafkaError) -> DeliveryError {
    let topic = topic.to_string();
    if is_too_large(&error) {
        DeliveryError::TooLarge { topic, error }
    } else if is_refused_for_good(&error) {
        DeliveryError::Refused { topic, error }
    } else {
        DeliveryError::Kafka { topic, error }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn delivery(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    /// What librdkafka's default partitioner does with a key (`consistent_random`: its
    /// `consistent` half for a key, which reads nothing but the key).
    fn librdkafka_partition(key: &[u8], partitions: i32) -> i32 {
        // SAFETY: for a key, this partitioner hashes `key[..len]` and touches no other argument.
        unsafe {
            rdkafka::bindings::rd_kafka_msg_partitioner_consistent(
                std::ptr::null(),
                key.as_ptr().cast(),
                key.len(),
                partitions,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
            )
        }
    }

    #[test]
    fn a_record_whose_key_is_its_meta_goes_to_the_partition_its_source_as_the_key_went_to() {
        let mut key = Vec::new();
        for n in 0..500u64 {
            let source = format!("web-{n}/{:016x}", n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let origin = Origin { source: &source, start: n * 215, end: n * 215 + 215 };
            RecordMeta { event_time_ns: 1_733_300_000_000_000_000 + n as i64, tag: "app.log", origin: Some(origin) }
                .encode_key(&mut key);
            for partitions in [1, 2, 3, 7, 12, 64] {
                let expected = librdkafka_partition(source.as_bytes(), partitions);
                assert_eq!(partition_of(Some(&key), partitions, |_| true), expected, "{source} over {partitions}");
                // A `kafka.key_field` key is partitioned as librdkafka would partition it.
                assert_eq!(partition_of(Some(source.as_bytes()), partitions, |_| true), expected);
            }
        }
        // No source: any partition, as for a record without a key.
        RecordMeta { event_time_ns: 1, tag: "docker.web", origin: None }.encode_key(&mut key);
        for _ in 0..100 {
            assert!((0..3).contains(&partition_of(Some(&key), 3, |_| true)));
            assert!((0..3).contains(&partition_of(None, 3, |_| true)));
        }
    }

    #[test]
    fn records_the_broker_refuses_for_good_are_dead_lettered_and_transient_errors_fail_the_chunk() {
        let reason = |code| classify("logs", delivery(code)).reason();
        assert_eq!(reason(RDKafkaErrorCode::MessageSizeTooLarge), "too_large");
        assert_eq!(reason(RDKafkaErrorCode::InvalidTimestamp), "invalid_timestamp");
        assert_eq!(reason(RDKafkaErrorCode::InvalidRecord), "invalid_record");
        assert_eq!(reason(RDKafkaErrorCode::MessageTimedOut), "timed_out");
        for code in [RDKafkaErrorCode::InvalidTimestamp, RDKafkaErrorCode::InvalidRecord] {
            assert!(matches!(classify("logs", delivery(code)), DeliveryError::Refused { .. }));
        }
        assert!(matches!(
            classify("logs", delivery(RDKafkaErrorCode::NotLeaderForPartition)),
            DeliveryError::Kafka { .. }
        ));
    }
}

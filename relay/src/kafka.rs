//! Delivers a chunk's records to Kafka and answers only when every one of them is acknowledged.

use crate::config::KafkaConfig;
use forward::{json, Entry};
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use std::sync::{Arc, RwLock};
use std::time::Duration;

pub struct Kafka {
    /// Replaced after a fatal error: librdkafka's idempotent producer refuses every later message
    /// once it has one (e.g. a broker that lost its producer-id state across a restart).
    producer: RwLock<Arc<FutureProducer>>,
    client: ClientConfig,
    key_field: Option<String>,
}

/// Why a chunk was not delivered; the label goes into `tron_relay_delivery_failures_total`.
#[derive(Debug, thiserror::Error)]
pub enum DeliveryError {
    #[error("topic {topic}: record too large for Kafka: {error}")]
    TooLarge { topic: String, error: KafkaError },
    #[error("topic {topic}: {error}")]
    Kafka { topic: String, error: KafkaError },
    #[error("producer shut down before delivery was confirmed")]
    Canceled,
}

impl DeliveryError {
    pub fn reason(&self) -> &'static str {
        match self {
            DeliveryError::TooLarge { .. } => "too_large",
            DeliveryError::Kafka { error, .. } => match error.rdkafka_error_code() {
                Some(RDKafkaErrorCode::MessageTimedOut) => "timed_out",
                Some(RDKafkaErrorCode::UnknownTopicOrPartition) | Some(RDKafkaErrorCode::UnknownTopic) => {
                    "unknown_topic"
                }
                _ => "kafka_error",
            },
            DeliveryError::Canceled => "canceled",
        }
    }
}

impl Kafka {
    pub fn new(cfg: &KafkaConfig) -> anyhow::Result<Self> {
        let mut client = ClientConfig::new();
        client
            .set("bootstrap.servers", &cfg.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", cfg.linger.as_millis().to_string())
            .set("batch.size", cfg.batch_bytes.to_string())
            .set("compression.type", &cfg.compression)
            .set("message.timeout.ms", cfg.delivery_timeout.as_millis().to_string())
            // The relay's own in-flight bound is the real limit; librdkafka's queue must never
            // be the one that refuses, so it is sized above it.
            .set("queue.buffering.max.messages", "2000000")
            .set("queue.buffering.max.kbytes", "2097151");
        for (k, v) in &cfg.properties {
            client.set(k, v);
        }
        let producer: FutureProducer = client.create()?;
        Ok(Kafka { producer: RwLock::new(Arc::new(producer)), client, key_field: cfg.key_field.clone() })
    }

    fn producer(&self) -> Arc<FutureProducer> {
        self.producer.read().expect("producer lock").clone()
    }

    /// After a delivery failure: if `used` is in a fatal state, or the broker no longer accepts
    /// its producer id (a broker that lost idempotence state across a restart answers every
    /// later message with `ProducerFenced` without librdkafka calling it fatal), swap in a fresh
    /// producer, once however many chunks saw the failure. Failed chunks were not acked; clients
    /// re-send them.
    fn recover(&self, used: &Arc<FutureProducer>, error: &KafkaError) {
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
        match self.client.create::<FutureProducer>() {
            Ok(fresh) => {
                tracing::error!(?code, %reason, "Kafka producer unusable (fatal error, or its producer id is no longer accepted); replaced it with a new one");
                metrics::counter!("tron_relay_producer_restarts_total").increment(1);
                *current = Arc::new(fresh);
            }
            Err(e) => tracing::error!(error = %e, "Kafka producer is in a fatal state and a new one cannot be created"),
        }
    }

    /// Produces every entry and waits for all acknowledgements. Records Kafka refuses as too
    /// large come back as `(index, error)`: no retry can deliver them. Any other failure fails the
    /// whole chunk.
    pub async fn deliver(
        &self,
        topic: &str,
        tag: &str,
        entries: &[Entry],
    ) -> Result<Vec<(usize, DeliveryError)>, DeliveryError> {
        let producer = self.producer();
        let result = self.produce_all(&producer, topic, tag, entries).await;
        if let Err(DeliveryError::Kafka { error, .. }) = &result {
            self.recover(&producer, error);
        }
        result
    }

    async fn produce_all(
        &self,
        producer: &FutureProducer,
        topic: &str,
        tag: &str,
        entries: &[Entry],
    ) -> Result<Vec<(usize, DeliveryError)>, DeliveryError> {
        let mut pending = Vec::with_capacity(entries.len());
        let mut refused = Vec::new();
        for (index, entry) in entries.iter().enumerate() {
            let record = match &entry.record {
                rmpv::Value::Map(pairs) => json::to_json_map(pairs),
                _ => serde_json::Map::new(),
            };
            let key = self.key_field.as_ref().and_then(|f| record.get(f)).map(|v| match v {
                serde_json::Value::String(s) => s.clone(),
                other => other.to_string(),
            });
            let payload = serde_json::to_vec(&record).expect("JSON maps always serialize");
            let time_ns = entry.time.unix_nanos().to_string();
            let headers = OwnedHeaders::new()
                .insert(Header { key: "tag", value: Some(tag) })
                .insert(Header { key: "event_time_ns", value: Some(&time_ns) });
            let mut rec =
                FutureRecord::to(topic).payload(&payload).timestamp(entry.time.unix_millis()).headers(headers);
            if let Some(k) = &key {
                rec = rec.key(k.as_str());
            }
            loop {
                match producer.send_result(rec) {
                    Ok(fut) => {
                        pending.push((index, fut));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        rec = back;
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    Err((error, _)) => match classify(topic, error) {
                        e @ DeliveryError::TooLarge { .. } => {
                            refused.push((index, e));
                            break;
                        }
                        e => return Err(e),
                    },
                }
            }
        }
        let mut first_error = None;
        for (index, fut) in pending {
            let outcome = match fut.await {
                Ok(Ok(_)) => continue,
                Ok(Err((error, _))) => classify(topic, error),
                Err(_) => DeliveryError::Canceled,
            };
            match outcome {
                e @ DeliveryError::TooLarge { .. } => refused.push((index, e)),
                e => {
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(refused), Err)
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

fn classify(topic: &str, error: KafkaError) -> DeliveryError {
    let too_large = matches!(
        error.rdkafka_error_code(),
        Some(RDKafkaErrorCode::MessageSizeTooLarge) | Some(RDKafkaErrorCode::InvalidMessageSize)
    );
    if too_large {
        DeliveryError::TooLarge { topic: topic.to_string(), error }
    } else {
        DeliveryError::Kafka { topic: topic.to_string(), error }
    }
}

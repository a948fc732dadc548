use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tron_service::config::duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where Forward clients connect.
    pub listen: SocketAddr,
    /// `/metrics` and `/health`.
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Name sent in the handshake's PONG.
    #[serde(default = "default_hostname")]
    pub hostname: String,
    /// TLS material. Required unless `plaintext = true`.
    pub tls: Option<TlsConfig>,
    /// Accept unencrypted TCP. Only for a trusted network.
    #[serde(default)]
    pub plaintext: bool,
    pub security: Option<SecurityConfig>,
    #[serde(default)]
    pub limits: LimitsConfig,
    pub kafka: KafkaConfig,
    #[serde(default)]
    pub dead_letter: DeadLetterConfig,
}

/// Records Kafka can never take (larger than the broker accepts) are appended here with the
/// reason, and their chunk is acked, so a client does not re-send them forever.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLetterConfig {
    pub path: PathBuf,
    /// Past this size nothing more is written and such chunks are not acked (the client keeps
    /// them) until an operator moves the file away.
    pub max_bytes: u64,
}

impl Default for DeadLetterConfig {
    fn default() -> Self {
        DeadLetterConfig { path: PathBuf::from("/var/lib/tron-relay/dead-letter.ndjson"), max_bytes: 1 << 30 }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    pub cert: PathBuf,
    pub key: PathBuf,
    /// When set, clients must present a certificate signed by this CA (mutual TLS).
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: a client's watermark reports are accepted only for host names its
    /// certificate carries (subjectAltName DNS names), so one agent cannot hold back, or release,
    /// hours for another. Off by default: a certificate shared by a fleet names no host.
    #[serde(default)]
    pub reports_only_for_certificate_names: bool,
}

/// The Forward handshake: fluentd `<security>` / fluent-bit `Shared_Key`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecurityConfig {
    pub shared_key: String,
    /// When non-empty, clients must also send one of these user names and its password.
    #[serde(default)]
    pub users: Vec<UserConfig>,
    /// A client's watermark reports are accepted only for the host its user name names (one user
    /// per agent host): a client cannot hold back or release the hours of another host.
    #[serde(default)]
    pub reports_only_for_usernames: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    pub max_frame_bytes: usize,
    pub max_decompressed_bytes: usize,
    pub max_entries_per_chunk: usize,
    /// MessagePack elements (values, keys, items) one chunk may hold: decoding work and memory
    /// grow with these, not with the bytes on the wire.
    pub max_elements_per_chunk: usize,
    /// JSON one chunk's records may make.
    pub max_decoded_bytes: usize,
    /// Decoded records waiting for Kafka, across all connections. Past it, sockets are not read.
    pub max_inflight_bytes: usize,
    /// Of that budget, what one connection may hold unacked (overshot by one chunk at most).
    /// Unset: a quarter of `max_inflight_bytes` (64 MiB at the defaults), so lowering the
    /// budget alone keeps the share in proportion.
    pub max_inflight_bytes_per_connection: Option<usize>,
    /// Frames being received, or complete and waiting to be decoded, across all connections
    /// (beyond 16 KiB per connection). A connection that cannot get room for its frame within
    /// `handshake_timeout` is closed and its client re-sends.
    pub max_receiving_bytes: usize,
    pub max_connections: usize,
    /// Connections from one source address. At either cap the oldest connection that has not
    /// sent a complete frame yet is closed to admit a new one.
    pub max_connections_per_address: usize,
    /// The TLS handshake, the shared-key handshake and a connection's first frame must each
    /// complete within this; a connection that says nothing does not keep its slot for long.
    #[serde(with = "duration")]
    pub handshake_timeout: Duration,
    /// A frame, once its first byte has arrived, must arrive whole within this, so peers that
    /// trickle large frames cannot hold `max_receiving_bytes` (a 16 MiB frame needs 2.3 Mbit/s).
    #[serde(with = "duration")]
    pub frame_timeout: Duration,
    #[serde(with = "duration")]
    pub idle_timeout: Duration,
}

impl LimitsConfig {
    /// What one connection may hold unacked: as set, or a quarter of the budget.
    pub fn inflight_bytes_per_connection(&self) -> usize {
        self.max_inflight_bytes_per_connection.unwrap_or(self.max_inflight_bytes / 4)
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: 16 << 20,
            max_decompressed_bytes: 32 << 20,
            max_entries_per_chunk: 1_000_000,
            max_elements_per_chunk: 4_000_000,
            max_decoded_bytes: 32 << 20,
            max_inflight_bytes: 256 << 20,
            max_inflight_bytes_per_connection: None,
            max_receiving_bytes: 64 << 20,
            max_connections: 1024,
            max_connections_per_address: 256,
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(60),
            idle_timeout: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub default_topic: String,
    /// Ordered; the first pattern that matches the tag picks the topic.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// Record field whose value becomes the message key (none: no key, round-robin).
    pub key_field: Option<String>,
    #[serde(default = "default_linger", with = "duration")]
    pub linger: Duration,
    #[serde(default = "default_batch_bytes")]
    pub batch_bytes: usize,
    #[serde(default = "default_compression")]
    pub compression: String,
    /// How long one record may wait for Kafka before its chunk is failed (the client re-sends).
    #[serde(default = "default_delivery_timeout", with = "duration")]
    pub delivery_timeout: Duration,
    /// How often agents' watermarks are written to every partition of their topics
    /// (docs/completeness.md); "0s": never.
    #[serde(default = "default_watermark_interval", with = "duration")]
    pub watermark_interval: Duration,
    /// Passed to librdkafka as they are; they win over the settings above.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

fn default_watermark_interval() -> Duration {
    Duration::from_secs(5)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Fluentd-style tag pattern: `*` is one tag part, `**` any number of parts.
    pub pattern: String,
    pub topic: String,
}

fn default_metrics_listen() -> SocketAddr {
    "127.0.0.1:9465".parse().expect("valid")
}
fn default_hostname() -> String {
    std::env::var("HOSTNAME").unwrap_or_else(|_| "tron-relay".into())
}
fn default_linger() -> Duration {
    Duration::from_millis(20)
}
fn default_batch_bytes() -> usize {
    1 << 20
}
fn default_compression() -> String {
    "lz4".into()
}
/// Below the agents' 30 s `ack_timeout`: when Kafka is slow the relay gives a chunk up (and
/// closes the connection, so the agent re-sends at once) before the agent would give the relay
/// up and send the same chunk elsewhere while this copy is still being retried.
fn default_delivery_timeout() -> Duration {
    Duration::from_secs(25)
}

impl RelayConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |k: &str, m: &str| Err((k.to_string(), m.to_string()));
        if self.tls.is_none() && !self.plaintext {
            return bad("tls", "missing: set [tls] cert and key, or plaintext = true for a trusted network");
        }
        if self.tls.is_some() && self.plaintext {
            return bad("plaintext", "cannot be true when [tls] is set");
        }
        if self.tls.as_ref().is_some_and(|t| t.reports_only_for_certificate_names && t.client_ca.is_none()) {
            return bad(
                "tls.reports_only_for_certificate_names",
                "needs tls.client_ca: without client certificates there are no names to check",
            );
        }
        if self.security.as_ref().is_some_and(|s| s.reports_only_for_usernames && s.users.is_empty()) {
            return bad(
                "security.reports_only_for_usernames",
                "needs security.users: without user names there are no names to check",
            );
        }
        if !["none", "gzip", "snappy", "lz4", "zstd"].contains(&self.kafka.compression.as_str()) {
            return bad("kafka.compression", "must be one of none, gzip, snappy, lz4, zstd");
        }
        if self.limits.max_inflight_bytes < self.limits.max_decompressed_bytes.min(self.limits.max_frame_bytes) {
            return bad(
                "limits.max_inflight_bytes",
                "must be at least the frame limit, or a single chunk could never pass",
            );
        }
        if self.limits.max_receiving_bytes < self.limits.max_frame_bytes
            || self.limits.max_receiving_bytes > u32::MAX as usize
        {
            return bad(
                "limits.max_receiving_bytes",
                "must be at least limits.max_frame_bytes (or a frame of that size could never arrive) and below 4 GiB",
            );
        }
        let share = self.limits.inflight_bytes_per_connection();
        if share > self.limits.max_inflight_bytes || share == 0 {
            return bad(
                "limits.max_inflight_bytes_per_connection",
                "must be more than 0 and at most limits.max_inflight_bytes",
            );
        }
        if self.kafka.default_topic.is_empty() {
            return bad("kafka.default_topic", "must not be empty");
        }
        for (i, r) in self.kafka.routes.iter().enumerate() {
            if r.topic.is_empty() {
                return Err((format!("kafka.routes[{i}].topic"), "must not be empty".into()));
            }
        }
        let client = crate::kafka::client_config(&self.kafka, self.limits.max_inflight_bytes);
        tron_service::kafka::check::<rdkafka::producer::BaseProducer>(
            &client,
            "kafka",
            &self.kafka.properties,
            crate::kafka::TYPED_KEYS,
        )
    }
}

use serde::Deserialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tron_service::config::duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    /// Local directory where objects are written before upload; cleared at start.
    pub staging_dir: PathBuf,
    pub kafka: KafkaConfig,
    pub output: OutputConfig,
    #[serde(default)]
    pub roll: RollConfig,
    #[serde(default)]
    pub finalize: FinalizeConfig,
    #[serde(default)]
    pub quarantine: QuarantineConfig,
    #[serde(default)]
    pub dedupe: DedupeConfig,
    pub bigquery: Option<BigQueryConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    pub brokers: String,
    pub group_id: String,
    pub topics: Vec<String>,
    /// Passed to librdkafka as they are.
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutputConfig {
    /// `gs://bucket/prefix` or `file:///directory`.
    pub url: String,
    /// GCS JSON API endpoint override (an emulator, a private endpoint). Authentication still
    /// applies unless `anonymous = true`.
    pub endpoint: Option<String>,
    /// A service-account key or workload identity federation (`external_account`) JSON file.
    /// Unset: Application Default Credentials (GOOGLE_APPLICATION_CREDENTIALS, gcloud's ADC
    /// file, then the metadata server).
    pub credentials_file: Option<PathBuf>,
    /// Unauthenticated requests, for an emulator (fake-gcs-server) only.
    #[serde(default)]
    pub anonymous: bool,
    #[serde(default)]
    pub format: Format,
    /// CSV/TSV columns, in order. Default: time, tag, record.
    #[serde(default = "default_columns")]
    pub columns: Vec<Column>,
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    /// Directory of an hour under the URL's prefix: `{topic}` and strftime fields of the hour (UTC).
    #[serde(default = "default_path")]
    pub path: String,
    /// Per-topic templates, overriding `path`.
    #[serde(default)]
    pub topic_paths: std::collections::BTreeMap<String, String>,
    /// One store request (an upload, a state write) may take this long before it counts as failed.
    #[serde(default = "default_request_timeout", with = "duration")]
    pub request_timeout: Duration,
    /// Uploads failing for this long turn `/health` 503 (at once for a permanent error: 401, 403,
    /// a missing bucket).
    #[serde(default = "default_unhealthy_after", with = "duration")]
    pub unhealthy_after: Duration,
}

fn default_request_timeout() -> Duration {
    Duration::from_secs(120)
}
fn default_unhealthy_after() -> Duration {
    Duration::from_secs(60)
}

fn default_path() -> String {
    crate::layout::DEFAULT_TEMPLATE.to_string()
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    #[default]
    Csv,
    Tsv,
    Ndjson,
}

impl Format {
    pub fn ext(&self) -> &'static str {
        match self {
            Format::Csv => "csv",
            Format::Tsv => "tsv",
            Format::Ndjson => "ndjson",
        }
    }
}

/// Where a column's cells come from, decided once at load rather than by name on every row.
#[derive(Debug, Deserialize, Clone, PartialEq, Eq)]
#[serde(from = "String")]
pub enum ColumnSource {
    Time,
    Tag,
    Topic,
    Partition,
    Offset,
    Record,
    /// A record field: the key as written, or else a dotted path into nested objects.
    Field(String),
}

impl From<String> for ColumnSource {
    fn from(s: String) -> Self {
        match s.as_str() {
            "@time" => ColumnSource::Time,
            "@tag" => ColumnSource::Tag,
            "@topic" => ColumnSource::Topic,
            "@partition" => ColumnSource::Partition,
            "@offset" => ColumnSource::Offset,
            "@record" => ColumnSource::Record,
            _ => ColumnSource::Field(s),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct Column {
    pub name: String,
    /// A record field (`a.b` for nested), or `@time`, `@tag`, `@topic`, `@partition`, `@offset`,
    /// `@record` (the whole record as JSON).
    pub source: ColumnSource,
    /// BigQuery type: STRING, INTEGER, FLOAT, BOOLEAN, TIMESTAMP, JSON.
    #[serde(rename = "type", default = "default_type")]
    pub kind: String,
}

/// Dropping records tron-agent re-sent (docs/exactly-once.md).
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct DedupeConfig {
    /// A source (one file of one host) with no record for this long (by Kafka timestamps) is
    /// forgotten: a copy of its records arriving later would be written again. Longer costs
    /// state: about 100 bytes per source per partition.
    #[serde(with = "duration")]
    pub forget_after: Duration,
}

impl Default for DedupeConfig {
    fn default() -> Self {
        DedupeConfig { forget_after: Duration::from_secs(24 * 3600) }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct RollConfig {
    pub max_records: u64,
    /// Uncompressed row bytes staged per partition before a cut.
    pub max_bytes: u64,
    /// A partition's staged rows are uploaded at the latest this long after the first arrived.
    #[serde(with = "duration")]
    pub max_age: Duration,
    /// No message for this long means the partition is caught up (for the finalizer).
    #[serde(with = "duration")]
    pub idle_after: Duration,
    /// A cut because a staged hour has passed waits until this long after the partition's last
    /// cut, so records of an old hour interleaved with current ones do not cut at every switch.
    /// Size, age and idleness cuts do not wait.
    #[serde(with = "duration")]
    pub min_interval: Duration,
}

impl Default for RollConfig {
    fn default() -> Self {
        RollConfig {
            max_records: 1_000_000,
            max_bytes: 256 << 20,
            max_age: Duration::from_secs(60),
            idle_after: Duration::from_secs(10),
            min_interval: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct FinalizeConfig {
    /// How long after an hour ends its records are still expected.
    #[serde(with = "duration")]
    pub lateness: Duration,
    #[serde(with = "duration")]
    pub interval: Duration,
    /// An agent whose watermark reports stopped this long ago no longer holds hours back; the
    /// manifest lists it as stale (docs/completeness.md).
    #[serde(with = "duration")]
    pub host_timeout: Duration,
}

impl Default for FinalizeConfig {
    fn default() -> Self {
        FinalizeConfig {
            lateness: Duration::from_secs(300),
            interval: Duration::from_secs(10),
            host_timeout: Duration::from_secs(600),
        }
    }
}

/// Event times outside a sane window around the record's Kafka timestamp (when it was produced)
/// would land in directories no loader reads and move the hour watermark for good; such records
/// go to `_tron/quarantine/` instead. The window is taken around the Kafka timestamp, not the
/// wall clock, so a replay after a crash decides exactly as the first attempt did.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct QuarantineConfig {
    #[serde(with = "duration")]
    pub max_past: Duration,
    #[serde(with = "duration")]
    pub max_future: Duration,
}

impl Default for QuarantineConfig {
    fn default() -> Self {
        QuarantineConfig { max_past: Duration::from_secs(7 * 86_400), max_future: Duration::from_secs(3600) }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct BigQueryConfig {
    pub dataset: String,
    /// Table per topic; default: the topic name with `.`/`-` as `_`.
    #[serde(default)]
    pub tables: BTreeMap<String, String>,
    /// `bq load --max_bad_records`: 0, since every row is written from the same typed columns.
    #[serde(default)]
    pub max_bad_records: u32,
}

fn default_metrics_listen() -> SocketAddr {
    "127.0.0.1:9466".parse().expect("valid")
}
fn default_gzip_level() -> u32 {
    6
}
fn default_type() -> String {
    "STRING".into()
}
fn default_columns() -> Vec<Column> {
    vec![
        Column { name: "time".into(), source: ColumnSource::Time, kind: "TIMESTAMP".into() },
        Column { name: "tag".into(), source: ColumnSource::Tag, kind: "STRING".into() },
        Column { name: "record".into(), source: ColumnSource::Record, kind: "JSON".into() },
    ]
}

impl SinkConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: String, m: &str| Err((k, m.to_string()));
        if self.kafka.topics.is_empty() {
            return err("kafka.topics".into(), "at least one topic is required");
        }
        if !(self.output.url.starts_with("gs://") || self.output.url.starts_with("file://")) {
            return err("output.url".into(), "must start with gs:// or file://");
        }
        if self.output.anonymous && self.output.credentials_file.is_some() {
            return err("output.anonymous".into(), "cannot be true when output.credentials_file is set");
        }
        if let Some(file) = &self.output.credentials_file {
            if let Err(e) = std::fs::metadata(file) {
                return Err(("output.credentials_file".into(), format!("{}: {e}", file.display())));
            }
        }
        for (i, c) in self.output.columns.iter().enumerate() {
            if !["STRING", "INTEGER", "FLOAT", "BOOLEAN", "TIMESTAMP", "JSON"].contains(&c.kind.as_str()) {
                return err(
                    format!("output.columns[{i}].type"),
                    "must be STRING, INTEGER, FLOAT, BOOLEAN, TIMESTAMP or JSON",
                );
            }
            if c.name.is_empty() || !c.name.chars().all(|ch| ch.is_ascii_alphanumeric() || ch == '_') {
                return err(
                    format!("output.columns[{i}].name"),
                    "must be letters, digits and underscores (a BigQuery column name)",
                );
            }
        }
        if self.roll.max_records == 0 {
            return err("roll.max_records".into(), "must be at least 1");
        }
        crate::layout::check_template(&self.output.path).map_err(|m| ("output.path".to_string(), m))?;
        for (topic, template) in &self.output.topic_paths {
            let key = format!("output.topic_paths.{topic}");
            if !self.kafka.topics.contains(topic) {
                return Err((key, format!("{topic:?} is not one of kafka.topics")));
            }
            crate::layout::check_template(template).map_err(|m| (key, m))?;
        }
        crate::layout::check_distinct(&self.layout(), &self.kafka.topics)
            .map_err(|m| ("output.path".to_string(), m))?;
        let client = crate::consumer::client_config(&self.kafka);
        tron_service::kafka::check::<rdkafka::consumer::BaseConsumer>(
            &client,
            "kafka",
            &self.kafka.properties,
            crate::consumer::TYPED_KEYS,
        )
    }

    pub fn layout(&self) -> crate::layout::Layout {
        let (_, prefix) = self.split_url();
        crate::layout::Layout::new(&prefix, &self.output.path, &self.output.topic_paths)
    }

    /// Bucket URL (`gs://b` / `file:///d`) and the key prefix inside it.
    pub fn split_url(&self) -> (String, String) {
        let url = &self.output.url;
        let (scheme, rest) = url.split_once("://").expect("validated");
        if scheme == "file" {
            return (url.clone(), String::new());
        }
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        (format!("gs://{bucket}"), prefix.trim_matches('/').to_string())
    }
}

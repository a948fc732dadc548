pub use crate::parse::TimeFormat;
use serde::{Deserialize, Deserializer};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tron_service::config::duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Checkpoints live here (`StateDirectory=` under systemd).
    pub state_dir: PathBuf,
    /// This machine's name in records and object keys. Default: the system host name.
    pub host: Option<String>,
    #[serde(default = "default_metrics_listen")]
    pub metrics_listen: SocketAddr,
    pub sources: Vec<SourceConfig>,
    #[serde(default)]
    pub fields: FieldsConfig,
    #[serde(default)]
    pub files: FilesConfig,
    pub destinations: DestinationsConfig,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    pub name: String,
    pub include: Vec<Glob>,
    #[serde(default)]
    pub exclude: Vec<Glob>,
    pub tag: String,
    /// For files already present at start that have no checkpoint. Files that appear later are
    /// always read from the beginning.
    #[serde(default)]
    pub read_from: ReadFrom,
    #[serde(default)]
    pub parser: Parser,
    /// Longer lines are split into parts of this size (counted, never dropped).
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// JSON field holding the event time; without it (or when absent/unparsable) the read time is used.
    pub time_field: Option<String>,
    /// `rfc3339`, `unix`, `unix_ms`, `unix_us`, `unix_ns`, or a strftime pattern.
    #[serde(default)]
    pub time_format: TimeFormat,
    /// Records that span lines (stack traces): a line matching `start` begins a record, others
    /// continue the previous one.
    pub multiline: Option<MultilineConfig>,
    /// logrotate's `olddir`: where rotated files of this source are moved. Looked in for files
    /// rotated before a scan saw them and, after a restart, for the unread rest of a followed file.
    pub olddir: Option<PathBuf>,
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct MultilineConfig {
    /// Regular expression a record's first line matches.
    pub start: StartPattern,
    /// A record whose file has not grown for this long is complete even without a next start.
    #[serde(default = "default_multiline_flush", with = "duration")]
    pub flush_timeout: Duration,
}

fn default_multiline_flush() -> Duration {
    Duration::from_secs(2)
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ReadFrom {
    #[default]
    Beginning,
    End,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum Parser {
    #[default]
    Raw,
    Json,
}

/// Names of the fields the agent adds; an empty string switches one off.
#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct FieldsConfig {
    pub host: String,
    pub file: String,
    pub id: String,
}

impl Default for FieldsConfig {
    fn default() -> Self {
        FieldsConfig { host: "host".into(), file: "file".into(), id: "_id".into() }
    }
}

#[derive(Debug, Deserialize, Clone)]
#[serde(deny_unknown_fields, default)]
pub struct FilesConfig {
    /// Safety-net rescan of the globs; inotify wakes the agent sooner.
    #[serde(with = "duration")]
    pub scan_interval: Duration,
    /// How many of a file's first bytes are compared to tell it from another file on the same
    /// inode (reused, truncated and rewritten) and to find its copy (`fingerprint_bytes` before).
    #[serde(alias = "fingerprint_bytes")]
    pub head_bytes: usize,
    /// A rotated file that stopped growing is closed this long after every destination has it.
    #[serde(with = "duration")]
    pub rotate_wait: Duration,
    /// A rotated file is given up (logged, counted) after this long even if a destination lags.
    #[serde(with = "duration")]
    pub max_rotated_keep: Duration,
    /// Bytes of rotated-away files a lagging destination may keep open (disk `du` does not
    /// show); past it the oldest is given up for that destination (logged, counted).
    pub max_rotated_bytes: u64,
    #[serde(with = "duration")]
    pub checkpoint_interval: Duration,
}

impl Default for FilesConfig {
    fn default() -> Self {
        FilesConfig {
            scan_interval: Duration::from_secs(1),
            head_bytes: 4096,
            rotate_wait: Duration::from_secs(5),
            max_rotated_keep: Duration::from_secs(24 * 3600),
            max_rotated_bytes: 1 << 30,
            checkpoint_interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DestinationsConfig {
    pub s3: Option<S3Config>,
    pub relay: Option<RelayConfig>,
}

/// How a destination batches. Each destination has its own defaults ([`s3_batch`],
/// [`relay_batch`]); a `[destinations.*.batch]` table that sets some keys keeps that
/// destination's defaults for the others (`BatchTable`).
#[derive(Debug, Clone, PartialEq)]
pub struct BatchConfig {
    /// Uncompressed record bytes in one object or chunk.
    pub max_bytes: usize,
    /// A non-full batch is sent this long after its first record (0: as soon as the file has no
    /// more lines for now).
    pub max_age: Duration,
    /// Batches being sent or retried at once.
    pub max_inflight: usize,
    /// Bytes of records this destination may hold in memory (open, in flight and retrying).
    pub max_buffer_bytes: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// `s3://bucket/prefix` or `file:///directory` (a local stand-in).
    pub url: String,
    /// For S3-compatible stores and tests; path-style addressing is used when set.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    #[serde(default = "default_gzip_level")]
    pub gzip_level: u32,
    #[serde(default = "s3_batch", deserialize_with = "s3_batch_table")]
    pub batch: BatchConfig,
    /// Objects larger than this are sent as a multipart upload of `multipart_part_bytes` parts,
    /// so a large batch is not one long request that restarts from zero on a failure.
    #[serde(default = "default_multipart_threshold")]
    pub multipart_threshold_bytes: usize,
    #[serde(default = "default_multipart_part")]
    pub multipart_part_bytes: usize,
    /// Server-side encryption of every object: `AES256` (SSE-S3) or `aws:kms` (SSE-KMS, with
    /// `sse_kms_key_id`, or the bucket's default KMS key). Unset: the bucket's default.
    pub sse: Option<Sse>,
    pub sse_kms_key_id: Option<String>,
    /// `STANDARD`, `STANDARD_IA`, `INTELLIGENT_TIERING`, `GLACIER_IR`, … Unset: STANDARD.
    pub storage_class: Option<String>,
    /// A profile of ~/.aws/config and ~/.aws/credentials (unreadable under the unit's
    /// ProtectHome=yes: point AWS_CONFIG_FILE / AWS_SHARED_CREDENTIALS_FILE elsewhere).
    pub profile: Option<String>,
    /// A role to assume (STS AssumeRole) with the credentials found otherwise.
    pub role_arn: Option<String>,
    #[serde(default = "default_role_session_name")]
    pub role_session_name: String,
    /// `when_supported` (the SDK's default: a CRC checksum on every upload) or `when_required`,
    /// for S3-compatible stores that reject the SDK's default checksums.
    #[serde(default)]
    pub checksums: Checksums,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LinkCompression {
    #[default]
    Gzip,
    Zstd,
    None,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
pub enum Sse {
    #[serde(rename = "AES256")]
    Aes256,
    #[serde(rename = "aws:kms")]
    Kms,
}

#[derive(Debug, Deserialize, Clone, Copy, Default, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Checksums {
    #[default]
    WhenSupported,
    WhenRequired,
}

fn default_role_session_name() -> String {
    "tron-agent".into()
}

fn default_multipart_threshold() -> usize {
    16 << 20
}

fn default_multipart_part() -> usize {
    8 << 20
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Tried in order; on failure the next one is used.
    pub addresses: Vec<String>,
    /// CA that signed the relay's certificate. Required unless `plaintext = true`.
    pub tls_ca: Option<PathBuf>,
    /// Name to verify in the relay's certificate (default: the address's host).
    pub tls_server_name: Option<String>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    #[serde(default)]
    pub plaintext: bool,
    pub shared_key: Option<String>,
    pub username: Option<String>,
    pub password: Option<String>,
    #[serde(default = "default_ack_timeout", with = "duration")]
    pub ack_timeout: Duration,
    /// `gzip` (CompressedPackedForward), `zstd` (the same with `"compressed": "zstd"`: half
    /// gzip 1's CPU and 39 % fewer bytes on log lines, read by tron-relay, Fluent Bit and recent
    /// Fluentd, not by older Fluentd) or `none` (PackedForward: no CPU spent on compression, for
    /// links where bandwidth is cheap).
    #[serde(default)]
    pub compression: LinkCompression,
    #[serde(default = "default_relay_gzip_level")]
    pub gzip_level: u32,
    /// With `compression = "zstd"`: 1-19.
    #[serde(default = "default_relay_zstd_level")]
    pub zstd_level: i32,
    /// How often the agent tells the relay its low watermark (docs/completeness.md); "0s": never.
    #[serde(default = "default_watermark_interval", with = "duration")]
    pub watermark_interval: Duration,
    #[serde(default = "relay_batch", deserialize_with = "relay_batch_table")]
    pub batch: BatchConfig,
}

/// A batch table as written: the keys it leaves out come from the destination's defaults.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BatchTable {
    max_bytes: Option<usize>,
    #[serde(default, deserialize_with = "optional_duration")]
    max_age: Option<Duration>,
    max_inflight: Option<usize>,
    max_buffer_bytes: Option<usize>,
}

impl BatchTable {
    fn over(self, defaults: BatchConfig) -> BatchConfig {
        BatchConfig {
            max_bytes: self.max_bytes.unwrap_or(defaults.max_bytes),
            max_age: self.max_age.unwrap_or(defaults.max_age),
            max_inflight: self.max_inflight.unwrap_or(defaults.max_inflight),
            max_buffer_bytes: self.max_buffer_bytes.unwrap_or(defaults.max_buffer_bytes),
        }
    }
}

fn optional_duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    duration::deserialize(d).map(Some)
}
fn s3_batch_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BatchConfig, D::Error> {
    Ok(BatchTable::deserialize(d)?.over(s3_batch()))
}
fn relay_batch_table<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BatchConfig, D::Error> {
    Ok(BatchTable::deserialize(d)?.over(relay_batch()))
}

fn relay_batch() -> BatchConfig {
    BatchConfig { max_bytes: 1 << 20, max_age: Duration::ZERO, max_inflight: 8, max_buffer_bytes: 64 << 20 }
}
fn s3_batch() -> BatchConfig {
    BatchConfig { max_bytes: 32 << 20, max_age: Duration::from_secs(60), max_inflight: 4, max_buffer_bytes: 256 << 20 }
}
fn default_watermark_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_metrics_listen() -> SocketAddr {
    "127.0.0.1:9464".parse().expect("valid")
}
fn default_max_line_bytes() -> usize {
    1 << 20
}
/// The archive is kept for months and paid for by the byte: zlib's default trade-off.
fn default_gzip_level() -> u32 {
    6
}
/// The relay link is paid for in CPU on every app server: the fastest level.
fn default_relay_gzip_level() -> u32 {
    1
}
fn default_relay_zstd_level() -> i32 {
    1
}
fn default_ack_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A glob, checked as the configuration is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Glob(glob::Pattern);

impl Glob {
    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }

    pub fn matches_path(&self, path: &std::path::Path) -> bool {
        self.0.matches_path(path)
    }
}

impl<'de> Deserialize<'de> for Glob {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        glob::Pattern::new(&text).map(Glob).map_err(|e| serde::de::Error::custom(format!("invalid glob {text:?}: {e}")))
    }
}

/// A multiline start pattern, compiled as the configuration is read.
#[derive(Debug, Clone)]
pub struct StartPattern(pub regex::bytes::Regex);

impl<'de> Deserialize<'de> for StartPattern {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        regex::bytes::Regex::new(&text).map(StartPattern).map_err(|e| {
            // The regex crate's message spans lines (pattern, caret, error): keep the error.
            let first = e.to_string().lines().last().unwrap_or_default().trim().to_string();
            serde::de::Error::custom(format!("invalid regex {text:?}: {first}"))
        })
    }
}

impl AgentConfig {
    pub fn validate(&self) -> Result<(), (String, String)> {
        let err = |k: String, m: &str| Err((k, m.to_string()));
        if self.sources.is_empty() {
            return err("sources".into(), "at least one [[sources]] is required");
        }
        for (i, s) in self.sources.iter().enumerate() {
            if s.include.is_empty() {
                return err(format!("sources[{i}].include"), "at least one glob is required");
            }
            if s.max_line_bytes < 64 {
                return err(format!("sources[{i}].max_line_bytes"), "must be at least 64");
            }
        }
        if !(64..=1 << 20).contains(&self.files.head_bytes) {
            return err("files.head_bytes".into(), "must be between 64 and 1048576");
        }
        if self.destinations.s3.is_none() && self.destinations.relay.is_none() {
            return err("destinations".into(), "configure [destinations.s3], [destinations.relay], or both");
        }
        if let Some(s3) = &self.destinations.s3 {
            if !(s3.url.starts_with("s3://") || s3.url.starts_with("file://")) {
                return err("destinations.s3.url".into(), "must start with s3:// or file://");
            }
            check_batch("destinations.s3.batch", &s3.batch)?;
            check_gzip_level("destinations.s3.gzip_level", s3.gzip_level)?;
            if s3.multipart_part_bytes < 5 << 20 {
                return err("destinations.s3.multipart_part_bytes".into(), "S3 parts must be at least 5 MiB (5242880)");
            }
            if s3.sse_kms_key_id.is_some() && s3.sse != Some(Sse::Kms) {
                return err("destinations.s3.sse_kms_key_id".into(), "needs sse = \"aws:kms\"");
            }
            if let Some(class) = &s3.storage_class {
                let known = aws_sdk_s3::types::StorageClass::values();
                if !known.contains(&class.as_str()) {
                    return Err((
                        "destinations.s3.storage_class".into(),
                        format!("{class:?} is not one of {}", known.join(", ")),
                    ));
                }
            }
        }
        if let Some(r) = &self.destinations.relay {
            if r.addresses.is_empty() {
                return err("destinations.relay.addresses".into(), "at least one host:port is required");
            }
            if r.tls_ca.is_none() && !r.plaintext {
                return err("destinations.relay.tls_ca".into(), "missing: set the relay's CA, or plaintext = true");
            }
            if r.client_cert.is_some() != r.client_key.is_some() {
                return err("destinations.relay.client_cert".into(), "client_cert and client_key go together");
            }
            check_batch("destinations.relay.batch", &r.batch)?;
            check_gzip_level("destinations.relay.gzip_level", r.gzip_level)?;
            if !forward::zstd::LEVELS.contains(&r.zstd_level) {
                let (low, high) = (forward::zstd::LEVELS.start(), forward::zstd::LEVELS.end());
                return err(
                    "destinations.relay.zstd_level".into(),
                    &format!("{} is not a zstd level ({low}-{high})", r.zstd_level),
                );
            }
        }
        Ok(())
    }
}

/// Every setting a SIGHUP reload cannot apply, by key, as text: a reload whose file changes one
/// is refused with that key named (the relay's TLS files and the sources are applied).
pub fn fixed_settings(cfg: &AgentConfig) -> Vec<(String, String)> {
    let mut fixed: Vec<(String, String)> = vec![
        ("state_dir".into(), format!("{:?}", cfg.state_dir)),
        ("host".into(), format!("{:?}", cfg.host)),
        ("metrics_listen".into(), format!("{:?}", cfg.metrics_listen)),
        ("fields".into(), format!("{:?}", cfg.fields)),
        ("files".into(), format!("{:?}", cfg.files)),
        ("destinations.s3".into(), format!("{:?}", cfg.destinations.s3)),
        ("destinations.relay".into(), format!("{:?}", cfg.destinations.relay.is_some())),
    ];
    if let Some(r) = &cfg.destinations.relay {
        let key = |k: &str| format!("destinations.relay.{k}");
        fixed.extend([
            (key("addresses"), format!("{:?}", r.addresses)),
            (key("tls_server_name"), format!("{:?}", r.tls_server_name)),
            (key("plaintext"), format!("{:?}", r.plaintext)),
            (key("shared_key"), format!("{:?}", r.shared_key)),
            (key("username"), format!("{:?}", r.username)),
            (key("password"), format!("{:?}", r.password)),
            (key("ack_timeout"), format!("{:?}", r.ack_timeout)),
            (key("compression"), format!("{:?}", r.compression)),
            (key("gzip_level"), format!("{:?}", r.gzip_level)),
            (key("zstd_level"), format!("{:?}", r.zstd_level)),
            (key("watermark_interval"), format!("{:?}", r.watermark_interval)),
            (key("batch"), format!("{:?}", r.batch)),
        ]);
    }
    fixed
}

fn check_gzip_level(key: &str, level: u32) -> Result<(), (String, String)> {
    if level > 9 {
        return Err((key.into(), format!("{level} is not a gzip level (0-9)")));
    }
    Ok(())
}

fn check_batch(key: &str, b: &BatchConfig) -> Result<(), (String, String)> {
    if b.max_inflight == 0 {
        return Err((format!("{key}.max_inflight"), "must be at least 1".into()));
    }
    if b.max_buffer_bytes < b.max_bytes {
        return Err((format!("{key}.max_buffer_bytes"), "must be at least max_bytes".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(batches: &str) -> AgentConfig {
        let text = format!(
            "state_dir = \"/tmp/x\"\nhost = \"h\"\n[[sources]]\nname = \"a\"\ninclude = [\"/tmp/*.log\"]\ntag = \"t\"\n\
             [destinations.s3]\nurl = \"file:///tmp/s3\"\n[destinations.relay]\naddresses = [\"127.0.0.1:1\"]\nplaintext = true\n{batches}"
        );
        tron_service::config::parse(&text, std::path::Path::new("agent.toml"), |_: &AgentConfig| Ok(())).unwrap()
    }

    #[test]
    fn a_partial_batch_table_keeps_its_destinations_defaults() {
        let none = parse("");
        let d = none.destinations;
        assert_eq!((d.s3.unwrap().batch, d.relay.unwrap().batch), (s3_batch(), relay_batch()));
        // Only max_age for S3: 32 MiB objects still, not the relay's 1 MiB chunks.
        let cfg = parse("[destinations.s3.batch]\nmax_age = \"5s\"\n[destinations.relay.batch]\nmax_inflight = 2\n");
        let (s3, relay) = (cfg.destinations.s3.unwrap().batch, cfg.destinations.relay.unwrap().batch);
        assert_eq!(s3, BatchConfig { max_age: Duration::from_secs(5), ..s3_batch() });
        assert_eq!(relay, BatchConfig { max_inflight: 2, ..relay_batch() });
    }

    #[test]
    fn the_relay_link_takes_zstd_at_its_levels_only() {
        let cfg = parse("compression = \"zstd\"\n");
        let relay = cfg.destinations.relay.as_ref().unwrap();
        assert_eq!((relay.compression, relay.zstd_level), (LinkCompression::Zstd, 1));
        assert!(cfg.validate().is_ok());
        for (level, ok) in [(0, false), (1, true), (19, true), (20, false), (-1, false)] {
            let cfg = parse(&format!("compression = \"zstd\"\nzstd_level = {level}\n"));
            match cfg.validate() {
                Ok(()) => assert!(ok, "level {level} accepted"),
                Err((key, message)) => {
                    assert!(!ok, "level {level} refused: {message}");
                    assert_eq!(key, "destinations.relay.zstd_level");
                    assert_eq!(message, format!("{level} is not a zstd level (1-19)"));
                }
            }
        }
    }
}

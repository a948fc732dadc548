//! A line becomes a record: raw text or a JSON object, an event time, and the added fields.

use crate::config::{FieldsConfig, Parser, SourceConfig};
use forward::EventTime;
use serde_json::{Map, Value};

#[derive(Debug, Clone)]
pub enum TimeFormat {
    Rfc3339,
    /// Epoch in units of 10^-scale seconds: 0 = s, 3 = ms, 6 = µs, 9 = ns.
    Epoch(u32),
    Strftime(String),
}

impl TimeFormat {
    pub fn parse(s: &str) -> Result<Self, String> {
        Ok(match s {
            "rfc3339" => TimeFormat::Rfc3339,
            "unix" => TimeFormat::Epoch(0),
            "unix_ms" => TimeFormat::Epoch(3),
            "unix_us" => TimeFormat::Epoch(6),
            "unix_ns" => TimeFormat::Epoch(9),
            p if p.contains('%') => TimeFormat::Strftime(p.to_string()),
            other => {
                return Err(format!(
                    "unknown time format {other:?}: use rfc3339, unix, unix_ms, unix_us, unix_ns or a strftime pattern"
                ))
            }
        })
    }

    /// Nanoseconds since the epoch, or None when the value does not fit the format.
    pub fn to_nanos(&self, v: &Value) -> Option<i64> {
        match (self, v) {
            (TimeFormat::Rfc3339, Value::String(s)) => {
                chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_nanos_opt()
            }
            (TimeFormat::Epoch(scale), Value::Number(n)) => {
                let factor = 10i64.pow(9 - scale);
                match n.as_i64() {
                    Some(i) => i.checked_mul(factor),
                    None => n.as_f64().map(|f| (f * factor as f64) as i64),
                }
            }
            (TimeFormat::Epoch(_), Value::String(s)) => self.to_nanos(&serde_json::from_str(s).ok()?),
            (TimeFormat::Strftime(p), Value::String(s)) => {
                if let Ok(t) = chrono::DateTime::parse_from_str(s, p) {
                    return t.timestamp_nanos_opt();
                }
                chrono::NaiveDateTime::parse_from_str(s, p).ok()?.and_utc().timestamp_nanos_opt()
            }
            _ => None,
        }
    }
}

/// Per-source settings prepared once.
#[derive(Debug)]
pub struct SourceSettings {
    pub name: String,
    pub tag: String,
    pub parser: Parser,
    pub max_line_bytes: usize,
    pub time_field: Option<String>,
    pub time_format: TimeFormat,
    /// Start-of-record pattern and flush time-out.
    pub multiline: Option<(regex::bytes::Regex, std::time::Duration)>,
}

impl SourceSettings {
    pub fn new(cfg: &SourceConfig) -> Self {
        SourceSettings {
            name: cfg.name.clone(),
            tag: cfg.tag.clone(),
            parser: cfg.parser,
            max_line_bytes: cfg.max_line_bytes,
            time_field: cfg.time_field.clone(),
            time_format: TimeFormat::parse(&cfg.time_format).expect("validated at load"),
            multiline: cfg
                .multiline
                .as_ref()
                .map(|m| (regex::bytes::Regex::new(&m.start).expect("validated at load"), m.flush_timeout)),
        }
    }
}

/// What the added fields need to know about the file a line came from.
pub struct Origin<'a> {
    pub host: &'a str,
    pub path: &'a str,
    pub fingerprint: u64,
}

pub struct Record {
    pub time: EventTime,
    pub fields: Map<String, Value>,
}

pub fn parse_line(
    line: &[u8],
    offset: u64,
    src: &SourceSettings,
    fields: &FieldsConfig,
    origin: &Origin,
    now_ns: i64,
) -> Record {
    let text = text_of(line);
    let mut map = match src.parser {
        Parser::Json => match serde_json::from_str::<Value>(&text) {
            Ok(Value::Object(m)) => m,
            _ => {
                metrics::counter!("tron_agent_json_parse_errors_total", "source" => src.name.clone()).increment(1);
                message_only(text)
            }
        },
        Parser::Raw => message_only(text),
    };
    let time_ns = src
        .time_field
        .as_ref()
        .and_then(|f| map.get(f))
        .and_then(|v| {
            let parsed = src.time_format.to_nanos(v);
            if parsed.is_none() {
                metrics::counter!("tron_agent_time_parse_errors_total", "source" => src.name.clone()).increment(1);
            }
            parsed
        })
        .unwrap_or(now_ns);
    if !fields.host.is_empty() {
        map.insert(fields.host.clone(), Value::String(origin.host.to_string()));
    }
    if !fields.file.is_empty() {
        map.insert(fields.file.clone(), Value::String(origin.path.to_string()));
    }
    if !fields.id.is_empty() {
        map.insert(fields.id.clone(), Value::String(record_id(origin.host, origin.fingerprint, offset)));
    }
    Record { time: EventTime::from_unix_nanos(time_ns), fields: map }
}

fn message_only(text: String) -> Map<String, Value> {
    let mut m = Map::with_capacity(4);
    m.insert("message".into(), Value::String(text));
    m
}

/// Deterministic 128-bit id of (host, file identity, byte offset): the same line re-sent after a
/// crash carries the same id, so downstream can recognise it.
pub fn record_id(host: &str, fingerprint: u64, offset: u64) -> String {
    let mut key = Vec::with_capacity(host.len() + 17);
    key.extend_from_slice(host.as_bytes());
    key.push(0);
    key.extend_from_slice(&fingerprint.to_be_bytes());
    key.extend_from_slice(&offset.to_be_bytes());
    format!("{:032x}", xxhash_rust::xxh3::xxh3_128(&key))
}

/// Lines are text; bytes that are not UTF-8 are kept as `\xNN` escapes (and counted) rather
/// than replaced, so the original can be recovered.
fn text_of(line: &[u8]) -> String {
    if let Ok(s) = std::str::from_utf8(line) {
        return s.to_string();
    }
    metrics::counter!("tron_agent_invalid_utf8_lines_total").increment(1);
    let mut out = String::with_capacity(line.len() + 16);
    for chunk in line.utf8_chunks() {
        out.push_str(chunk.valid());
        for b in chunk.invalid() {
            out.push_str(&format!("\\x{b:02x}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(parser: Parser, time_field: Option<&str>, fmt: &str) -> SourceSettings {
        SourceSettings {
            name: "s".into(),
            tag: "t".into(),
            parser,
            max_line_bytes: 1024,
            time_field: time_field.map(str::to_owned),
            time_format: TimeFormat::parse(fmt).unwrap(),
            multiline: None,
        }
    }

    fn origin() -> Origin<'static> {
        Origin { host: "h1", path: "/var/log/a.log", fingerprint: 42 }
    }

    #[test]
    fn json_line_with_rfc3339_time() {
        let r = parse_line(
            br#"{"time":"2026-11-22T03:04:05.123456789Z","msg":"x"}"#,
            100,
            &src(Parser::Json, Some("time"), "rfc3339"),
            &FieldsConfig::default(),
            &origin(),
            7,
        );
        assert_eq!(r.time, EventTime::new(1795316645, 123456789));
        assert_eq!(r.fields["msg"], "x");
        assert_eq!(r.fields["host"], "h1");
        assert_eq!(r.fields["file"], "/var/log/a.log");
        assert_eq!(r.fields["_id"], record_id("h1", 42, 100));
    }

    #[test]
    fn unparsable_json_is_kept_as_message_with_read_time() {
        let r = parse_line(
            b"not json",
            0,
            &src(Parser::Json, Some("time"), "rfc3339"),
            &FieldsConfig::default(),
            &origin(),
            5_000_000_000,
        );
        assert_eq!(r.fields["message"], "not json");
        assert_eq!(r.time, EventTime::new(5, 0));
    }

    #[test]
    fn epoch_and_strftime_formats() {
        let ms = TimeFormat::parse("unix_ms").unwrap();
        assert_eq!(ms.to_nanos(&serde_json::json!(1500)), Some(1_500_000_000));
        assert_eq!(TimeFormat::parse("unix").unwrap().to_nanos(&serde_json::json!(1.25)), Some(1_250_000_000));
        let f = TimeFormat::parse("%d/%b/%Y:%H:%M:%S %z").unwrap();
        assert_eq!(f.to_nanos(&serde_json::json!("10/Oct/2000:13:55:36 -0700")), Some(971211336 * 1_000_000_000));
        assert!(TimeFormat::parse("weird").is_err());
    }

    #[test]
    fn invalid_utf8_is_escaped_not_lost() {
        let r = parse_line(
            b"ok \xff\xfe end",
            0,
            &src(Parser::Raw, None, "rfc3339"),
            &FieldsConfig::default(),
            &origin(),
            0,
        );
        assert_eq!(r.fields["message"], "ok \\xff\\xfe end");
    }

    #[test]
    fn added_fields_can_be_renamed_or_switched_off() {
        let fields = FieldsConfig { host: "".into(), file: "path".into(), id: "".into() };
        let r = parse_line(b"x", 0, &src(Parser::Raw, None, "rfc3339"), &fields, &origin(), 0);
        assert_eq!(r.fields.keys().collect::<Vec<_>>(), ["message", "path"]);
    }

    #[test]
    fn ids_are_deterministic_and_distinct() {
        assert_eq!(record_id("h", 1, 2), record_id("h", 1, 2));
        assert_ne!(record_id("h", 1, 2), record_id("h", 1, 3));
        assert_ne!(record_id("h", 1, 2), record_id("g", 1, 2));
        assert_eq!(record_id("h", 1, 2).len(), 32);
    }
}

//! Rows: a Kafka record becomes one CSV/TSV line (configured columns, RFC 4180 quoting) or one
//! NDJSON line, written straight into a gzip staging file.

use crate::config::{Column, Format};
use flate2::write::GzEncoder;
use serde_json::Value;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// What a row can draw on besides the record's own fields.
pub struct RowSource<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    pub tag: &'a str,
    pub time_ns: i64,
    /// The record as sent (JSON text).
    pub raw: &'a [u8],
    /// The parsed record; `Value::Null` when the payload was not JSON.
    pub record: &'a Value,
}

type Gz = GzEncoder<BufWriter<File>>;

pub enum RowSink {
    Delimited(Box<csv::Writer<Gz>>),
    Lines(Gz),
}

impl RowSink {
    pub fn create(path: &Path, format: Format, level: u32) -> std::io::Result<Self> {
        let gz =
            GzEncoder::new(BufWriter::with_capacity(256 * 1024, File::create(path)?), flate2::Compression::new(level));
        Ok(match format {
            Format::Ndjson => RowSink::Lines(gz),
            Format::Csv | Format::Tsv => RowSink::Delimited(Box::new(
                csv::WriterBuilder::new()
                    .delimiter(if format == Format::Tsv { b'\t' } else { b',' })
                    .quote_style(csv::QuoteStyle::Necessary)
                    .terminator(csv::Terminator::Any(b'\n'))
                    .has_headers(false)
                    .from_writer(gz),
            )),
        })
    }

    /// Writes one row; returns its uncompressed size.
    pub fn write(&mut self, columns: &[Column], src: &RowSource) -> std::io::Result<usize> {
        match self {
            RowSink::Lines(gz) => {
                gz.write_all(src.raw)?;
                gz.write_all(b"\n")?;
                Ok(src.raw.len() + 1)
            }
            RowSink::Delimited(w) => {
                let cells: Vec<String> = columns.iter().map(|c| cell(c, src)).collect();
                let size = cells.iter().map(|c| c.len() + 1).sum();
                w.write_record(&cells).map_err(std::io::Error::other)?;
                Ok(size)
            }
        }
    }

    pub fn finish(self) -> std::io::Result<()> {
        let gz = match self {
            RowSink::Lines(gz) => gz,
            RowSink::Delimited(w) => w.into_inner().map_err(|e| std::io::Error::other(e.to_string()))?,
        };
        let mut buf = gz.finish()?;
        buf.flush()?;
        buf.get_ref().sync_all()
    }
}

/// RFC 3339, UTC, microseconds: what BigQuery's TIMESTAMP and DuckDB read without options.
pub fn rfc3339_micros(time_ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(time_ns).to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

fn cell(column: &Column, src: &RowSource) -> String {
    match column.source.as_str() {
        "@time" => rfc3339_micros(src.time_ns),
        "@tag" => src.tag.to_string(),
        "@topic" => src.topic.to_string(),
        "@partition" => src.partition.to_string(),
        "@offset" => src.offset.to_string(),
        "@record" => String::from_utf8_lossy(src.raw).into_owned(),
        path => match lookup(src.record, path) {
            None | Some(Value::Null) => String::new(),
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
        },
    }
}

fn lookup<'a>(record: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = record.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(record, |v, part| v.get(part))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn col(name: &str, source: &str) -> Column {
        Column { name: name.into(), source: source.into(), kind: "STRING".into() }
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_nests_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv.gz");
        let mut sink = RowSink::create(&path, Format::Csv, 6).unwrap();
        let record = serde_json::json!({"msg": "a,\"b\"\nc", "n": 5, "o": {"k": [1]}, "u": "é\tx"});
        let raw = serde_json::to_vec(&record).unwrap();
        let src = RowSource {
            topic: "t",
            partition: 3,
            offset: 9,
            tag: "app",
            time_ns: 1_500_000_000_123_456_789,
            raw: &raw,
            record: &record,
        };
        let cols = [
            col("time", "@time"),
            col("msg", "msg"),
            col("n", "n"),
            col("o", "o"),
            col("missing", "nope"),
            col("u", "u"),
            col("k", "o.k"),
        ];
        sink.write(&cols, &src).unwrap();
        sink.finish().unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        assert_eq!(text, "2017-07-14T02:40:00.123456Z,\"a,\"\"b\"\"\nc\",5,\"{\"\"k\"\":[1]}\",,é\tx,[1]\n");
    }
}

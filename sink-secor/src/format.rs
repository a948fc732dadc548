//! Rows: a Kafka record becomes one CSV/TSV line (configured columns, RFC 4180 quoting) or one
//! NDJSON line, written straight into a gzip staging file.

use crate::config::{Column, ColumnSource, Format};
use crate::delimited::DelimitedRows;
use flate2::write::GzEncoder;
use serde::de::{DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde_json::value::RawValue;
use serde_json::Value;
use std::borrow::Cow;
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
}

type Gz = GzEncoder<BufWriter<File>>;

/// Rows are gathered this much at a time before the gzip encoder sees them: each write to it is
/// one deflate call and one CRC update, and two per NDJSON row (the line, then its newline) cost
/// about a tenth of that sink's CPU in per-call overhead.
const ROWS_BUFFER: usize = 64 * 1024;

pub struct RowSink {
    out: Out,
    columns: Vec<Column>,
    wanted: WantedKeys,
    /// Some column shows the record or reads a field of it, so rows check its UTF-8.
    reads_record: bool,
    times: TimeText,
    /// The wanted keys' values, kept from row to row so a row allocates nothing: `None`s between
    /// rows (their text is borrowed from one record only; `recycle` turns the lifetime over).
    spare_values: Vec<Option<FieldText<'static>>>,
}

enum Out {
    Delimited(Box<DelimitedRows<Gz>>),
    Lines(Box<BufWriter<Gz>>),
}

/// The `@time` cell of the last row: rows of the same second only get new microseconds, so
/// chrono's formatting (2 % of the sink's CPU once per row) runs once per second of event time,
/// and the microseconds are written over the last ones in place.
#[derive(Default)]
struct TimeText {
    second: Option<i64>,
    text: Vec<u8>,
}

impl TimeText {
    fn format(&mut self, time_ns: i64) -> &[u8] {
        let second = time_ns.div_euclid(1_000_000_000);
        if self.second != Some(second) {
            self.second = Some(second);
            self.text = rfc3339_micros(time_ns).into_bytes();
        }
        // The text ends in ".ffffffZ" whatever the year's width.
        let mut micros = time_ns.rem_euclid(1_000_000_000) / 1000;
        let end = self.text.len() - 1;
        for d in self.text[end - 6..end].iter_mut().rev() {
            *d = b'0' + (micros % 10) as u8;
            micros /= 10;
        }
        &self.text
    }
}

/// The same vector, emptied of values, with another lifetime for the next ones: an in-place
/// collect (same layout), so no allocation.
fn recycle<'b>(values: Vec<Option<FieldText<'_>>>) -> Vec<Option<FieldText<'b>>> {
    values.into_iter().map(|_| None).collect()
}

impl RowSink {
    pub fn create(path: &Path, format: Format, level: u32, columns: &[Column]) -> std::io::Result<Self> {
        let gz =
            GzEncoder::new(BufWriter::with_capacity(256 * 1024, File::create(path)?), flate2::Compression::new(level));
        let delimiter = if format == Format::Tsv { b'\t' } else { b',' };
        let out = match format {
            Format::Ndjson => Out::Lines(Box::new(BufWriter::with_capacity(ROWS_BUFFER, gz))),
            Format::Csv | Format::Tsv => Out::Delimited(Box::new(DelimitedRows::new(gz, delimiter, ROWS_BUFFER))),
        };
        let wanted = WantedKeys::of(columns);
        let reads_record = columns.iter().any(|c| matches!(c.source, ColumnSource::Record | ColumnSource::Field(_)));
        let spare_values = vec![None; wanted.0.len()];
        Ok(RowSink { out, columns: columns.to_vec(), wanted, reads_record, times: TimeText::default(), spare_values })
    }

    /// Writes one row; returns its uncompressed size.
    pub fn write(&mut self, src: &RowSource) -> std::io::Result<usize> {
        let RowSink { out, columns, wanted, reads_record, times, spare_values } = self;
        match out {
            Out::Lines(rows) => {
                rows.write_all(src.raw)?;
                rows.write_all(b"\n")?;
                Ok(src.raw.len() + 1)
            }
            Out::Delimited(w) => {
                // The record's top level is parsed only when a column reads a field, and then
                // only the keys the columns read, as slices of its text: no tree of values per row.
                // One UTF-8 check of the record serves the `@record` cell and the field scan,
                // which then checks none of its strings again.
                let text = if *reads_record { std::str::from_utf8(src.raw).ok() } else { None };
                let mut values = recycle(std::mem::take(spare_values));
                let fields = TopLevel::parse(src.raw, text, wanted, &mut values);
                let mut size = 0;
                for column in columns.iter() {
                    size += match column.source {
                        ColumnSource::Time => w.cell(times.format(src.time_ns)),
                        ref source => w.cell(cell(source, src, text, wanted, &fields).as_bytes()),
                    };
                }
                *spare_values = recycle(values);
                Ok(size + w.end_row()?)
            }
        }
    }

    pub fn finish(self) -> std::io::Result<()> {
        let gz = match self.out {
            Out::Lines(rows) => rows.into_inner().map_err(|e| e.into_error())?,
            Out::Delimited(w) => w.into_inner()?,
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

/// `text`: the record, when it is UTF-8.
fn cell<'a>(
    source: &ColumnSource,
    src: &RowSource<'a>,
    text: Option<&'a str>,
    wanted: &WantedKeys,
    fields: &TopLevel<'_, 'a>,
) -> Cow<'a, str> {
    match source {
        ColumnSource::Time => rfc3339_micros(src.time_ns).into(),
        ColumnSource::Tag => src.tag.into(),
        ColumnSource::Topic => src.topic.into(),
        ColumnSource::Partition => src.partition.to_string().into(),
        ColumnSource::Offset => src.offset.to_string().into(),
        // Valid UTF-8 (every record the relay writes) takes the fast check; the lossy one
        // walks the text in chunks and was 2-3 % of the sink's CPU.
        ColumnSource::Record => match text {
            Some(text) => text.into(),
            None => String::from_utf8_lossy(src.raw),
        },
        ColumnSource::Field(path) => fields.cell(wanted, path),
    }
}

/// The top-level keys the field columns read, found once per staging file: each column's key as
/// written and, for a dotted path, its first step.
#[derive(Default)]
struct WantedKeys(Vec<String>);

impl WantedKeys {
    fn of(columns: &[Column]) -> Self {
        let mut keys: Vec<String> = Vec::new();
        for column in columns {
            if let ColumnSource::Field(path) = &column.source {
                let first = path.split('.').next().unwrap_or(path);
                for key in [path.as_str(), first] {
                    if !keys.iter().any(|k| k == key) {
                        keys.push(key.to_string());
                    }
                }
            }
        }
        WantedKeys(keys)
    }

    /// Compared byte by byte: keys are a few bytes long, where a call to memcmp per key of
    /// every record cost more than the comparison.
    fn index(&self, key: &str) -> Option<usize> {
        let key = key.as_bytes();
        self.0.iter().position(|k| k.len() == key.len() && k.bytes().zip(key).all(|(a, &b)| a == b))
    }
}

/// The values of a record's wanted top-level keys (`WantedKeys`, same order) as slices of its
/// JSON text; all empty when it is not a JSON object.
struct TopLevel<'v, 'a>(&'v [Option<FieldText<'a>>]);

impl<'v, 'a> TopLevel<'v, 'a> {
    /// `text`: `raw`, when it is UTF-8. `values`: one `None` per wanted key, filled here.
    fn parse(
        raw: &'a [u8],
        text: Option<&'a str>,
        wanted: &WantedKeys,
        values: &'v mut [Option<FieldText<'a>>],
    ) -> Self {
        if wanted.0.is_empty() {
            return TopLevel(values);
        }
        let found = match text {
            // The fast pass, and serde_json where it is unsure.
            Some(text) => {
                Self::fast(text, wanted, values)
                    || Self::scan(serde_json::Deserializer::from_str(text), wanted, values).is_ok()
            }
            // Not UTF-8 somewhere: read as bytes, where only the strings kept are checked, so a
            // bad value no column reads leaves the other cells filled.
            None => Self::scan(serde_json::Deserializer::from_slice(raw), wanted, values).is_ok(),
        };
        if !found {
            values.fill(None);
        }
        TopLevel(values)
    }

    /// Whether the fast pass answered; values it filled before it gave up are the caller's to
    /// forget.
    fn fast(text: &'a str, wanted: &WantedKeys, values: &mut [Option<FieldText<'a>>]) -> bool {
        tron_service::json_scan::top_level(text, |key, json, escaped| {
            if let Some(i) = wanted.index(key) {
                values[i] = Some(FieldText { json, escaped });
            }
        })
        .is_some()
    }

    fn scan<R: serde_json::de::Read<'a>>(
        mut de: serde_json::Deserializer<R>,
        wanted: &WantedKeys,
        values: &mut [Option<FieldText<'a>>],
    ) -> serde_json::Result<()> {
        let found = WantedValues(wanted).deserialize(&mut de)?;
        de.end()?;
        for (value, raw) in values.iter_mut().zip(found) {
            *value = raw.map(|raw| FieldText::searched(raw.get()));
        }
        Ok(())
    }

    /// The last value under `key`, as a tree would keep it.
    fn get(&self, wanted: &WantedKeys, key: &str) -> Option<FieldText<'a>> {
        wanted.index(key).and_then(|i| self.0.get(i).copied().flatten())
    }

    /// A cell: strings as their text, null or missing as empty, anything else as compact JSON.
    fn cell(&self, wanted: &WantedKeys, path: &str) -> Cow<'a, str> {
        if let Some(field) = self.get(wanted, path) {
            return field.text();
        }
        // A dotted path into nested objects (rare): those values are parsed.
        let mut parts = path.split('.');
        let Some(first) = parts.next().and_then(|p| self.get(wanted, p)) else { return Cow::Borrowed("") };
        let Ok(mut value) = serde_json::from_str::<Value>(first.json) else { return Cow::Borrowed("") };
        for part in parts {
            match value.get_mut(part).map(Value::take) {
                Some(v) => value = v,
                None => return Cow::Borrowed(""),
            }
        }
        match value {
            Value::Null => Cow::Borrowed(""),
            Value::String(s) => s.into(),
            other => other.to_string().into(),
        }
    }
}

/// A wanted key's value as its JSON text, checked by the scan that found it, and whether it is a
/// string with an escape: the scan knows, so the row does not search the text again.
#[derive(Clone, Copy)]
struct FieldText<'a> {
    json: &'a str,
    escaped: bool,
}

impl<'a> FieldText<'a> {
    /// From serde_json, which does not say: the text is searched for a backslash.
    fn searched(json: &'a str) -> Self {
        FieldText { json, escaped: json.contains('\\') }
    }

    /// The cell's text.
    fn text(self) -> Cow<'a, str> {
        let FieldText { json: text, escaped } = self;
        match text.as_bytes().first() {
            // The scan checked the string: without an escape its text is its value.
            Some(b'"') if !escaped => Cow::Borrowed(&text[1..text.len() - 1]),
            // Escapes: decoded into a new string.
            Some(b'"') => serde_json::from_str::<String>(text).map(Cow::Owned).unwrap_or_default(),
            Some(b'n') => Cow::Borrowed(""),
            // A plain integer prints as written (JSON allows no leading zero or plus sign); "-0"
            // and integers too long for i64 go through the parse, which prints them as floats.
            _ if is_short_integer(text) => Cow::Borrowed(text),
            Some(b't') | Some(b'f') => Cow::Borrowed(text),
            // Numbers, booleans, objects, arrays: as a parsed value prints them, so the cell does
            // not depend on how the record's JSON was spaced.
            _ => serde_json::from_str::<Value>(text).map(|v| v.to_string()).unwrap_or_default().into(),
        }
    }
}

/// Digits, optionally after a minus sign, at most 18 of them, and not "-0".
fn is_short_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    (1..=18).contains(&digits.len())
        && digits.bytes().all(|b| b.is_ascii_digit())
        && !(digits == "0" && text.len() == 2)
}

/// Deserializes an object, keeping the last value of each wanted key as its text; the values
/// of other keys are skipped (`IgnoredAny`). The reference, and the path for records the fast
/// pass (`json_scan`) is unsure of or that are not UTF-8.
struct WantedValues<'w>(&'w WantedKeys);

impl<'de> DeserializeSeed<'de> for WantedValues<'_> {
    type Value = Vec<Option<&'de RawValue>>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for WantedValues<'_> {
    type Value = Vec<Option<&'de RawValue>>;
    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("a JSON object")
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let WantedValues(wanted) = self;
        let mut values = vec![None; wanted.0.len()];
        while let Some(key) = map.next_key::<tron_service::json_key::JsonKey<'de>>()? {
            match wanted.index(&key.0) {
                Some(i) => values[i] = Some(map.next_value::<&'de RawValue>()?),
                None => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(values)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn col(name: &str, source: &str) -> Column {
        Column { name: name.into(), source: source.to_string().into(), kind: "STRING".into() }
    }

    #[test]
    fn the_time_cell_of_rows_in_one_second_is_what_chrono_writes() {
        let mut times = TimeText::default();
        for ns in [
            1_500_000_000_123_456_789,
            1_500_000_000_000_000_999,
            1_500_000_000_999_999_000,
            1_500_000_001_000_001_000,
            -1_000,
            0,
            4_102_444_800_000_000_000,
        ] {
            assert_eq!(times.format(ns), rfc3339_micros(ns).as_bytes(), "{ns}");
        }
    }

    #[test]
    fn csv_quotes_what_needs_quoting_and_nests_as_json() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv.gz");
        let raw = br#"{"msg": "a,\"b\"\nc", "n": 5.0e0, "o": {"k": [ 1 ]}, "u": "\u00e9\tx", "nul": null, "n": 7}"#;
        let src =
            RowSource { topic: "t", partition: 3, offset: 9, tag: "app", time_ns: 1_500_000_000_123_456_789, raw };
        let cols = [
            col("time", "@time"),
            col("msg", "msg"),
            col("n", "n"),
            col("o", "o"),
            col("missing", "nope"),
            col("u", "u"),
            col("k", "o.k"),
            col("nul", "nul"),
            col("deep", "o.k.z"),
        ];
        let mut sink = RowSink::create(&path, Format::Csv, 6, &cols).unwrap();
        sink.write(&src).unwrap();
        sink.finish().unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        // A key given twice counts as its last value, as in a parsed object.
        assert_eq!(text, "2017-07-14T02:40:00.123456Z,\"a,\"\"b\"\"\nc\",7,\"{\"\"k\"\":[1]}\",,é\tx,[1],,\n");
    }

    fn rows(cols: &[Column], records: &[&[u8]]) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.csv.gz");
        let mut sink = RowSink::create(&path, Format::Csv, 6, cols).unwrap();
        for raw in records {
            sink.write(&RowSource { topic: "t", partition: 0, offset: 0, tag: "app", time_ns: 0, raw }).unwrap();
        }
        sink.finish().unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        text
    }

    #[test]
    fn ndjson_rows_gathered_before_compression_all_arrive_in_order() {
        // More rows than one buffer holds, and one row larger than the buffer.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.ndjson.gz");
        let mut sink = RowSink::create(&path, Format::Ndjson, 6, &[]).unwrap();
        let mut records: Vec<String> =
            (0..5000).map(|i| format!(r#"{{"seq":{i},"pad":"{}"}}"#, "x".repeat(i % 50))).collect();
        records.insert(2500, format!(r#"{{"big":"{}"}}"#, "y".repeat(3 * ROWS_BUFFER)));
        for raw in &records {
            let src = RowSource { topic: "t", partition: 0, offset: 0, tag: "app", time_ns: 0, raw: raw.as_bytes() };
            assert_eq!(sink.write(&src).unwrap(), raw.len() + 1);
        }
        sink.finish().unwrap();
        let mut text = String::new();
        flate2::read::GzDecoder::new(File::open(&path).unwrap()).read_to_string(&mut text).unwrap();
        assert_eq!(text, records.iter().map(|r| format!("{r}\n")).collect::<String>());
    }

    #[test]
    fn strings_the_fast_scan_saw_escaped_are_decoded_and_the_others_taken_as_written() {
        // Simple escapes only, so the fast scan answers (a `\u` would send it to serde_json).
        let record = br#"{"esc":"a\"b\\c\/d\te","plain":"x y","esc2":"\n"}"#;
        assert!(tron_service::json_scan::top_level(std::str::from_utf8(record).unwrap(), |_, _, _| ()).is_some());
        let cols = [col("esc", "esc"), col("plain", "plain"), col("esc2", "esc2")];
        assert_eq!(rows(&cols, &[record]), "\"a\"\"b\\c/d\te\",x y,\"\n\"\n");
    }

    #[test]
    fn a_key_written_with_a_dot_wins_over_the_nested_path() {
        let cols = [col("k", "o.k"), col("o", "o")];
        assert_eq!(
            rows(&cols, &[br#"{"o": {"k": 1}, "o.k": "flat"}"#, br#"{"o": {"k": 2}}"#]),
            "flat,\"{\"\"k\"\":1}\"\n2,\"{\"\"k\"\":2}\"\n"
        );
    }

    #[test]
    fn fields_of_records_that_are_not_one_json_object_are_empty() {
        let cols = [col("a", "a"), col("record", "@record")];
        let records: [&[u8]; 4] = [br#"[1, 2]"#, br#"{"a": 1} x"#, br#"{"a": 1"#, b"\"a\""];
        // Field cells empty, the record as it came (quoted for its commas and quotes).
        assert_eq!(
            rows(&cols, &records),
            r#","[1, 2]"
,"{""a"": 1} x"
,"{""a"": 1"
,"""a"""
"#
        );
    }

    #[test]
    fn no_value_of_one_row_is_left_in_the_next() {
        // The values are kept from row to row: a row without a key, a record the fast pass
        // filled part of before it found the text invalid, and one only serde_json reads (an
        // escape in a key) each show their own values and nothing of the row before.
        let cols = [col("a", "a"), col("b", "b")];
        let records: [&[u8]; 6] = [
            br#"{"a": 1, "b": 2}"#,
            br#"{"b": 3}"#,
            br#"{"a": 4, "b": 5} trailing"#,
            br#"{"a": 6, "b": 7}"#,
            br#"{"\u0061": 8}"#,
            br#"{}"#,
        ];
        assert_eq!(rows(&cols, &records), "1,2\n,3\n,\n6,7\n8,\n,\n");
    }

    #[test]
    fn a_row_of_one_empty_cell_is_written_as_two_quotes() {
        // Not an empty line, which loaders skip.
        assert_eq!(rows(&[col("a", "a")], &[br#"{"b": 1}"#]), "\"\"\n");
    }

    #[test]
    fn scalar_cells_taken_as_written_are_what_the_parsed_value_prints() {
        let values = [
            "0",
            "7",
            "-1",
            "200",
            "123456789012345678",
            "-123456789012345678",
            "1234567890123456789",
            "18446744073709551616",
            "-0",
            "5.0e0",
            "1e5",
            "-0.5",
            "true",
            "false",
            "null",
            r#""plain""#,
            r#""a\"b""#,
            r#""\u00e9\t""#,
            r#""é""#,
            r#""""#,
        ];
        for text in values {
            let raw: Box<RawValue> = serde_json::from_str(text).unwrap();
            let parsed: Value = serde_json::from_str(text).unwrap();
            let expected = match parsed {
                Value::Null => String::new(),
                Value::String(s) => s,
                other => other.to_string(),
            };
            assert_eq!(FieldText::searched(raw.get()).text(), expected, "{text}");
        }
    }

    #[test]
    fn a_value_no_column_reads_is_skipped_even_when_it_is_not_utf8() {
        // The record column shows the bad bytes as U+FFFD; the field columns still read theirs.
        let cols = [col("a", "a"), col("b", "b")];
        let raw: &[u8] = b"{\"a\": \"x\", \"junk\": \"\xff\xfe\", \"b\": 2}";
        assert_eq!(rows(&cols, &[raw]), "x,2\n");
    }
}

//! Reading one hour from each side: the agents' archive (gzip NDJSON objects under
//! `{prefix}/{tag}/dt=…/hr=…/`, in S3 or a local directory) and the sink's GCS objects (rows in
//! the configured format). Objects are fetched a few at a time and decompressed as a stream; only
//! the ids and times go into the tally.

use super::tally::{Side, Tally};
use crate::config::{Column, ColumnSource, Format, OutputConfig};
use crate::store::Store;
use anyhow::Context as _;
use futures::StreamExt as _;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;

/// Objects fetched at once: enough to hide a store's latency, few enough to bound memory.
const FETCH_AHEAD: usize = 8;

pub enum Archive {
    S3 { client: Box<aws_sdk_s3::Client>, bucket: String, prefix: String },
    Dir { root: PathBuf, prefix: String },
}

/// How the archive is reached, from the command line.
pub struct ArchiveAccess<'a> {
    pub url: &'a str,
    pub endpoint: Option<&'a str>,
    pub region: Option<&'a str>,
    pub profile: Option<&'a str>,
}

impl Archive {
    /// `s3://bucket/prefix` (the SDK's default credentials, or `profile`) or `file:///dir` (the
    /// agent's local stand-in).
    pub async fn open(access: &ArchiveAccess<'_>) -> anyhow::Result<Self> {
        let url = access.url;
        if let Some(dir) = url.strip_prefix("file://") {
            return Ok(Archive::Dir { root: dir.into(), prefix: String::new() });
        }
        let rest = url
            .strip_prefix("s3://")
            .ok_or_else(|| anyhow::anyhow!("--archive {url:?}: expected s3://bucket/prefix or file:///dir"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest());
        if let Some(region) = access.region {
            loader = loader.region(aws_config::Region::new(region.to_string()));
        }
        if let Some(profile) = access.profile {
            loader = loader.profile_name(profile);
        }
        let shared = loader.load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&shared);
        if let Some(endpoint) = access.endpoint {
            s3 = s3.endpoint_url(endpoint).force_path_style(true);
        }
        Ok(Archive::S3 {
            client: Box::new(aws_sdk_s3::Client::from_conf(s3.build())),
            bucket: bucket.to_string(),
            prefix: prefix.trim_matches('/').to_string(),
        })
    }

    /// The directory tron-agent writes a tag's hour to (`S3Archive::key` in the agent).
    fn hour_dir(&self, tag: &str, hour: i64) -> String {
        let t = chrono::DateTime::from_timestamp(hour * 3600, 0).unwrap_or_default();
        let dir = format!("{tag}/dt={}/hr={}/", t.format("%Y-%m-%d"), t.format("%H"));
        let prefix = match self {
            Archive::S3 { prefix, .. } | Archive::Dir { prefix, .. } => prefix,
        };
        crate::join_key(prefix, &dir)
    }

    async fn list(&self, dir: &str) -> anyhow::Result<Vec<String>> {
        let mut keys = Vec::new();
        match self {
            Archive::S3 { client, bucket, .. } => {
                let mut pages = client.list_objects_v2().bucket(bucket).prefix(dir).into_paginator().send();
                while let Some(page) = pages.next().await {
                    let page = page.map_err(|e| {
                        anyhow::anyhow!("listing s3://{bucket}/{dir}: {}", aws_sdk_s3::error::DisplayErrorContext(e))
                    })?;
                    keys.extend(page.contents().iter().filter_map(|o| o.key().map(str::to_string)));
                }
            }
            Archive::Dir { root, .. } => match std::fs::read_dir(root.join(dir)) {
                Ok(entries) => {
                    for entry in entries {
                        let entry = entry.with_context(|| format!("listing {}", root.join(dir).display()))?;
                        keys.push(format!("{dir}{}", entry.file_name().to_string_lossy()));
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(anyhow::anyhow!("listing {}: {e}", root.join(dir).display())),
            },
        }
        keys.retain(|k| k.ends_with(".ndjson.gz"));
        keys.sort();
        Ok(keys)
    }

    async fn get(&self, key: &str) -> anyhow::Result<Vec<u8>> {
        match self {
            Archive::S3 { client, bucket, .. } => {
                let object = client.get_object().bucket(bucket).key(key).send().await.map_err(|e| {
                    anyhow::anyhow!("reading s3://{bucket}/{key}: {}", aws_sdk_s3::error::DisplayErrorContext(e))
                })?;
                let body = object.body.collect().await.with_context(|| format!("reading s3://{bucket}/{key}"))?;
                Ok(body.into_bytes().to_vec())
            }
            Archive::Dir { root, .. } => {
                std::fs::read(root.join(key)).with_context(|| format!("reading {}", root.join(key).display()))
            }
        }
    }

    /// Every archived line of the hour, over the tags routed to the topic.
    pub async fn read_hour(&self, tags: &[String], hour: i64, id_field: &str, tally: &mut Tally) -> anyhow::Result<()> {
        for tag in tags {
            let keys = self.list(&self.hour_dir(tag, hour)).await?;
            let mut bodies = futures::stream::iter(keys.iter()).map(|k| self.get(k)).buffered(FETCH_AHEAD);
            let mut index = 0;
            while let Some(body) = bodies.next().await {
                let key = &keys[index];
                index += 1;
                tally.archive_objects += 1;
                for line in gunzip_lines(&body?) {
                    let line = line.with_context(|| format!("archive object {key}"))?;
                    if line.is_empty() {
                        continue;
                    }
                    let v: serde_json::Value = serde_json::from_str(&line)
                        .with_context(|| format!("archive object {key}: a line is not JSON"))?;
                    let event_ms = v.get("_time").and_then(|t| t.as_str()).and_then(rfc3339_ms);
                    tally.row(Side::Archive, v.get(id_field).and_then(|i| i.as_str()), event_ms, None);
                }
            }
        }
        Ok(())
    }
}

/// Where in a GCS row the id and the event time are.
pub struct RowLayout {
    format: Format,
    id_field: String,
    /// CSV/TSV: the column holding the id itself, or else the `@record` column to find it in.
    id_column: Option<usize>,
    record_column: Option<usize>,
    time_column: Option<usize>,
}

impl RowLayout {
    pub fn new(output: &OutputConfig, id_field: &str) -> anyhow::Result<Self> {
        let find = |source: ColumnSource| output.columns.iter().position(|c: &Column| c.source == source);
        let layout = RowLayout {
            format: output.format,
            id_field: id_field.to_string(),
            id_column: find(ColumnSource::Field(id_field.to_string())),
            record_column: find(ColumnSource::Record),
            time_column: find(ColumnSource::Time),
        };
        if layout.format != Format::Ndjson && layout.id_column.is_none() && layout.record_column.is_none() {
            anyhow::bail!(
                "output.columns has no column with source = {id_field:?} or \"@record\": the audit cannot tell rows apart"
            );
        }
        Ok(layout)
    }

    fn id_of_record(&self, json: &str) -> Option<String> {
        let v: serde_json::Value = serde_json::from_str(json).ok()?;
        v.get(&self.id_field)?.as_str().map(str::to_string)
    }

    /// Every row of one object into the tally, stamped with the object's creation time.
    fn read_object(&self, body: &[u8], name: &str, created_ms: Option<i64>, tally: &mut Tally) -> anyhow::Result<()> {
        match self.format {
            Format::Ndjson => {
                for line in gunzip_lines(body) {
                    let line = line.with_context(|| format!("GCS object {name}"))?;
                    if !line.is_empty() {
                        tally.row(Side::Gcs, self.id_of_record(&line).as_deref(), None, created_ms);
                    }
                }
            }
            Format::Csv | Format::Tsv => {
                let mut rows = csv::ReaderBuilder::new()
                    .has_headers(false)
                    .flexible(true)
                    .delimiter(if self.format == Format::Tsv { b'\t' } else { b',' })
                    .from_reader(flate2::read::MultiGzDecoder::new(body));
                for row in rows.records() {
                    let row = row.with_context(|| format!("GCS object {name}"))?;
                    let id = match (self.id_column, self.record_column) {
                        (Some(c), _) => row.get(c).map(str::to_string),
                        (None, Some(c)) => row.get(c).and_then(|json| self.id_of_record(json)),
                        (None, None) => None,
                    };
                    let event_ms = self.time_column.and_then(|c| row.get(c)).and_then(rfc3339_ms);
                    tally.row(Side::Gcs, id.as_deref(), event_ms, created_ms);
                }
            }
        }
        Ok(())
    }

    /// Every row of the topic's hour in GCS; returns whether `_SUCCESS` is there.
    pub async fn read_hour(&self, store: &Store, dir: &str, tally: &mut Tally) -> anyhow::Result<bool> {
        let listed = store.list(dir).await?;
        let success = listed.iter().any(|o| o.name == format!("{dir}_SUCCESS"));
        let suffix = format!(".{}.gz", self.format.ext());
        let objects: Vec<_> = listed
            .into_iter()
            .filter(|o| {
                let file = o.name.rsplit('/').next().unwrap_or("");
                // Only the hour's own objects: not `_SUCCESS`/`_manifest.json`, not a deeper level.
                !file.starts_with('_') && o.name.ends_with(&suffix) && !o.name[dir.len()..].contains('/')
            })
            .collect();
        let mut bodies = futures::stream::iter(objects.iter()).map(|o| store.get(&o.name)).buffered(FETCH_AHEAD);
        let mut index = 0;
        while let Some(body) = bodies.next().await {
            let object = &objects[index];
            index += 1;
            // Deleted between the listing and the read: its rows are not there.
            let Some(body) = body? else { continue };
            tally.gcs_objects += 1;
            self.read_object(&body, &object.name, object.created_ms, tally)?;
        }
        Ok(success)
    }
}

fn gunzip_lines(body: &[u8]) -> impl Iterator<Item = std::io::Result<String>> + '_ {
    BufReader::new(flate2::read::MultiGzDecoder::new(body))
        .lines()
        .map(|l| l.map(|s| s.trim_end_matches('\r').to_string()))
}

fn rfc3339_ms(text: &str) -> Option<i64> {
    chrono::DateTime::parse_from_rfc3339(text).ok().map(|t| t.timestamp_millis())
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn gz(text: &str) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text.as_bytes()).unwrap();
        e.finish().unwrap()
    }

    fn output(format: Format, columns: &[(&str, &str)]) -> OutputConfig {
        let columns: Vec<_> = columns.iter().map(|(n, s)| serde_json::json!({"name": n, "source": s})).collect();
        serde_json::from_value(serde_json::json!({"url": "file:///x", "format": format.ext(), "columns": columns}))
            .unwrap()
    }

    #[test]
    fn csv_rows_give_their_id_from_a_column_or_from_the_record() {
        let by_column = RowLayout::new(&output(Format::Csv, &[("time", "@time"), ("id", "_id")]), "_id").unwrap();
        let mut t = Tally::default();
        let body = gz("2026-05-18T03:00:00.000000Z,0000000000000000000000000000000a\n");
        by_column.read_object(&body, "o", Some(1_779_073_201_500), &mut t).unwrap();
        let by_record = RowLayout::new(&output(Format::Tsv, &[("record", "@record")]), "_id").unwrap();
        let body = gz("{\"_id\":\"0000000000000000000000000000000b\",\"m\":\"a\\tb\"}\n{\"m\":\"no id\"}\n");
        by_record.read_object(&body, "o", None, &mut t).unwrap();
        let r = t.report("t", 0, false, &crate::audit::tally::DeadLetters::default());
        assert_eq!((r.gcs_rows, r.gcs_ids, r.gcs_rows_without_id), (3, 2, 1));
        // The first row had its event time and object time: 1.5 s.
        assert_eq!(r.latency.unwrap().max_ms, 1_500);
    }

    #[test]
    fn a_layout_without_ids_is_refused_by_name() {
        let err = RowLayout::new(&output(Format::Csv, &[("time", "@time")]), "_id").err().unwrap();
        assert!(err.to_string().contains("output.columns"), "{err}");
        assert!(RowLayout::new(&output(Format::Ndjson, &[("time", "@time")]), "_id").is_ok());
    }
}

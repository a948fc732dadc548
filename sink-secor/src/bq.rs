//! What the hourly BigQuery load needs: the table schema and the `bq load` command for one hour.

use crate::config::{Format, SinkConfig};
use serde_json::json;

pub fn schema(cfg: &SinkConfig) -> serde_json::Value {
    json!(cfg
        .output
        .columns
        .iter()
        .map(|c| json!({"name": c.name, "type": c.kind, "mode": "NULLABLE"}))
        .collect::<Vec<_>>())
}

/// `hour` is `YYYY-MM-DDTHH` (UTC).
pub fn load_command(cfg: &SinkConfig, topic: &str, hour: &str) -> anyhow::Result<String> {
    let t = chrono::NaiveDateTime::parse_from_str(&format!("{hour}:00:00"), "%Y-%m-%dT%H:%M:%S")
        .map_err(|e| anyhow::anyhow!("--hour {hour:?}: expected YYYY-MM-DDTHH: {e}"))?;
    let (bucket, prefix) = cfg.split_url();
    let base = crate::join_key(&prefix, topic);
    let dataset = cfg.bigquery.as_ref().map_or("DATASET".to_string(), |b| b.dataset.clone());
    let table = cfg
        .bigquery
        .as_ref()
        .and_then(|b| b.tables.get(topic).cloned())
        .unwrap_or_else(|| topic.replace(['.', '-'], "_"));
    let ext = cfg.output.format.ext();
    let format_flags = match cfg.output.format {
        Format::Csv => "--source_format=CSV --allow_quoted_newlines --field_delimiter=','".to_string(),
        Format::Tsv => "--source_format=CSV --allow_quoted_newlines --field_delimiter='\\t'".to_string(),
        Format::Ndjson => "--source_format=NEWLINE_DELIMITED_JSON".to_string(),
    };
    Ok(format!(
        "bq load {format_flags} --replace --time_partitioning_type=HOUR \
         --hive_partitioning_mode=CUSTOM \
         --hive_partitioning_source_uri_prefix='{bucket}/{base}/{{dt:DATE}}/{{hr:INTEGER}}' \
         '{dataset}.{table}${decorator}' '{bucket}/{base}/dt={dt}/hr={hr}/*.{ext}.gz' schema-{table}.json",
        decorator = t.format("%Y%m%d%H"),
        dt = t.format("%Y-%m-%d"),
        hr = t.format("%H"),
    ))
}

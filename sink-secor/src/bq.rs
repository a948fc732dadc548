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
    let (bucket, _) = cfg.split_url();
    let layout = cfg.layout();
    let hour_index = t.and_utc().timestamp() / 3600;
    let source = format!("{bucket}/{}*.{}.gz", layout.hour_dir(topic, hour_index), cfg.output.format.ext());
    let dataset = cfg.bigquery.as_ref().map_or("DATASET".to_string(), |b| b.dataset.clone());
    let table = cfg
        .bigquery
        .as_ref()
        .and_then(|b| b.tables.get(topic).cloned())
        .unwrap_or_else(|| topic.replace(['.', '-'], "_"));
    let format_flags = match cfg.output.format {
        Format::Csv => "--source_format=CSV --allow_quoted_newlines --field_delimiter=','".to_string(),
        Format::Tsv => "--source_format=CSV --allow_quoted_newlines --field_delimiter='\\t'".to_string(),
        Format::Ndjson => "--source_format=NEWLINE_DELIMITED_JSON".to_string(),
    };
    // Hive partition columns only exist when the path has the `dt=…/hr=…` shape.
    let hive = layout
        .hive_base(topic)
        .map(|base| {
            format!(
                "--hive_partitioning_mode=CUSTOM \
                 --hive_partitioning_source_uri_prefix='{bucket}/{base}/{{dt:DATE}}/{{hr:INTEGER}}' "
            )
        })
        .unwrap_or_default();
    Ok(format!(
        "bq load {format_flags} --replace --time_partitioning_type=HOUR {hive}\
         '{dataset}.{table}${decorator}' '{source}' schema-{table}.json",
        decorator = t.format("%Y%m%d%H"),
    ))
}

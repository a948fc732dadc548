//! What the hourly BigQuery load needs: the table schema and the `bq load` argv for one hour.
//! The argv is built as a list, then printed either shell-quoted (for `eval`) or as JSON (for a
//! scheduler that runs argv lists): a command line assembled by string formatting and expanded
//! by `$(…)` hands its quote characters to `bq` literally.

use crate::config::{Format, SinkConfig};
use serde_json::json;
use std::path::Path;

pub fn schema(cfg: &SinkConfig) -> serde_json::Value {
    json!(cfg
        .output
        .columns
        .iter()
        .map(|c| json!({"name": c.name, "type": c.kind, "mode": "NULLABLE"}))
        .collect::<Vec<_>>())
}

/// The `bq` argv (without `bq` itself) that loads one hour into its partition, replacing what
/// an earlier load of that hour put there. `hour` is `YYYY-MM-DDTHH` (UTC); `schema_file` is where
/// the caller wrote [`schema`].
pub fn load_argv(cfg: &SinkConfig, topic: &str, hour: &str, schema_file: &Path) -> anyhow::Result<Vec<String>> {
    let hour_index = crate::layout::parse_hour("--hour", hour)?;
    if !cfg.kafka.topics.iter().any(|known| known == topic) {
        anyhow::bail!("--topic {topic:?} is not one of kafka.topics {:?}", cfg.kafka.topics);
    }
    let (bucket, _) = cfg.split_url();
    let layout = cfg.layout();
    let source = format!("{bucket}/{}*.{}.gz", layout.hour_dir(topic, hour_index), cfg.output.format.ext());
    let bigquery = cfg.bigquery.as_ref();
    let dataset = bigquery.map_or("DATASET".to_string(), |b| b.dataset.clone());
    let table = bigquery.and_then(|b| b.tables.get(topic).cloned()).unwrap_or_else(|| topic.replace(['.', '-'], "_"));
    let mut argv: Vec<String> = vec!["load".into()];
    match cfg.output.format {
        Format::Csv | Format::Tsv => {
            argv.push("--source_format=CSV".into());
            argv.push("--allow_quoted_newlines".into());
            let delimiter = if cfg.output.format == Format::Csv { "," } else { "\t" };
            argv.push(format!("--field_delimiter={delimiter}"));
        }
        Format::Ndjson => argv.push("--source_format=NEWLINE_DELIMITED_JSON".into()),
    }
    // Every row is written from the same typed columns, so a bad record is a bug to stop on.
    argv.push(format!("--max_bad_records={}", bigquery.map_or(0, |b| b.max_bad_records)));
    argv.push("--replace".into());
    argv.push("--time_partitioning_type=HOUR".into());
    // Partitioned by the event time column when there is one (the hour's rows all fall in the
    // decorated partition); otherwise by load time, where the decorator alone picks the hour.
    if let Some(time_column) = cfg.output.columns.iter().find(|c| c.source == crate::config::ColumnSource::Time) {
        argv.push(format!("--time_partitioning_field={}", time_column.name));
    }
    // Hive partition columns only exist when the path has the `dt=…/hr=…` shape.
    if let Some(base) = layout.hive_base(topic) {
        argv.push("--hive_partitioning_mode=CUSTOM".into());
        argv.push(format!("--hive_partitioning_source_uri_prefix={bucket}/{base}/{{dt:DATE}}/{{hr:INTEGER}}"));
    }
    argv.push(format!("{dataset}.{table}${}", crate::layout::format_hour(hour_index).replace(['-', 'T'], "")));
    argv.push(source);
    argv.push(schema_file.display().to_string());
    Ok(argv)
}

/// `bq` and its arguments as one line a POSIX shell reads back as exactly that argv.
pub fn shell_line(argv: &[String]) -> String {
    std::iter::once("bq")
        .chain(argv.iter().map(String::as_str))
        .map(|arg| shlex::try_quote(arg).expect("no NUL in an argument").into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_shell_line_reads_back_as_the_argv() {
        let argv: Vec<String> =
            ["load", "--field_delimiter=\t", "logs.app$2026112203", "gs://b/p/hr=03/*.csv.gz", "it's"]
                .iter()
                .map(|s| s.to_string())
                .collect();
        let line = shell_line(&argv);
        let back = shlex::split(&line).expect("parses");
        assert_eq!(back[0], "bq");
        assert_eq!(&back[1..], &argv[..]);
    }
}

//! tron-sink-secor: a Kafka consumer group that writes hourly-partitioned gzip CSV/TSV/NDJSON
//! objects to GCS, every record in exactly one object, and marks hours complete.

mod audit;
mod bq;
mod config;
mod consumer;
mod dedupe;
mod delimited;
mod finalize;
mod format;
mod layout;
mod partition;
mod state;
mod store;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use config::SinkConfig;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use tron_service::daemon::{self, Daemon};

#[derive(Parser)]
#[command(version, about = "Writes Kafka topics to hourly-partitioned gzip objects in GCS, exactly once per record")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/tron/sink-secor.toml", global = true)]
    config: PathBuf,
    /// Validate the configuration and exit (0 valid, 1 invalid).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    log: tron_service::telemetry::LogArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Print the BigQuery table schema (JSON) for the configured columns.
    BqSchema {
        #[arg(long)]
        topic: String,
    },
    /// Write the table schema to --schema-file and print the `bq load` command that (re)loads
    /// one hour, idempotently: shell-quoted (run it with `eval`), or with --json as an argv list.
    #[command(name = "bq-load-command")]
    BqLoad {
        #[arg(long)]
        topic: String,
        /// UTC hour as YYYY-MM-DDTHH.
        #[arg(long)]
        hour: String,
        /// Where to write the schema the command names; on the machine that runs `bq`.
        #[arg(long)]
        schema_file: PathBuf,
        /// Print a JSON array: ["bq", "load", …].
        #[arg(long)]
        json: bool,
    },
    /// Compare the agents' S3 archive with the GCS objects, hour by hour: rows, ids missing on
    /// either side, duplicates, event → object latency. Exit 1 when anything is missing or
    /// doubled, 2 when the stores cannot be read. --watch exports the results as metrics.
    Audit(Box<audit::AuditArgs>),
    /// List every recent hour of a topic: finalized or not, rows, how it was decided, and which
    /// hosts hold it back with their last watermark and report (docs/completeness.md).
    Hours {
        #[arg(long)]
        topic: String,
        /// One JSON object per hour instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn print_hours(cfg: &SinkConfig, topic: &str, json: bool) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    runtime.block_on(async {
        tron_service::tls::install_default_provider();
        let (bucket, prefix) = cfg.split_url();
        let store = store::Store::open(&bucket, &cfg.output).await?;
        let hours = finalize::hours(&store, &prefix, &cfg.layout(), topic, &cfg.finalize).await?;
        if !json {
            let columns = ("hour", "objects", "rows", "final", "rule");
            println!(
                "{:<14} {:>8} {:>10} {:<6} {:<24} holding (host: last watermark, last report)",
                columns.0, columns.1, columns.2, columns.3, columns.4
            );
        }
        for h in hours {
            if json {
                println!("{}", serde_json::to_string(&h).expect("json"));
                continue;
            }
            let holding: Vec<String> = h.holding.iter().map(|(host, w, r)| format!("{host}: {w}, {r}")).collect();
            let rule = h.decision["rule"].as_str().unwrap_or("?").to_string()
                + if h.decision["all_hosts_silent"] == true { " (all silent)" } else { "" };
            println!(
                "{:<14} {:>8} {:>10} {:<6} {:<24} {}",
                h.hour,
                h.objects,
                h.rows.map_or("-".to_string(), |r| r.to_string()),
                if h.finalized { "yes" } else { "no" },
                rule,
                holding.join("; ")
            );
        }
        anyhow::Ok(())
    })
}

fn print_load_command(cfg: &SinkConfig, topic: &str, hour: &str, schema_file: &Path, json: bool) -> anyhow::Result<()> {
    let argv = bq::load_argv(cfg, topic, hour, schema_file)?;
    let schema = serde_json::to_vec_pretty(&bq::schema(cfg)).expect("json");
    std::fs::write(schema_file, schema).map_err(|e| anyhow::anyhow!("--schema-file {}: {e}", schema_file.display()))?;
    if json {
        let full: Vec<&str> = std::iter::once("bq").chain(argv.iter().map(String::as_str)).collect();
        println!("{}", serde_json::to_string(&full).expect("json"));
    } else {
        println!("{}", bq::shell_line(&argv));
    }
    Ok(())
}

/// Joins a key prefix and a name with exactly one `/`.
pub fn join_key(prefix: &str, name: &str) -> String {
    if prefix.is_empty() {
        name.to_string()
    } else {
        format!("{}/{name}", prefix.trim_end_matches('/'))
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg =
        match daemon::load_config("tron-sink-secor", &args.config, args.check_config, args.log, SinkConfig::validate) {
            Ok(cfg) => cfg,
            Err(code) => return code,
        };
    match args.command {
        Some(Command::BqSchema { topic }) => {
            // Every topic is written with the same columns today; the topic is still checked, so
            // a typo in a load script fails here instead of loading the wrong table later.
            if !cfg.kafka.topics.contains(&topic) {
                eprintln!("tron-sink-secor: --topic {topic:?} is not one of kafka.topics {:?}", cfg.kafka.topics);
                return ExitCode::FAILURE;
            }
            println!("{}", serde_json::to_string_pretty(&bq::schema(&cfg)).expect("json"));
            return ExitCode::SUCCESS;
        }
        Some(Command::BqLoad { topic, hour, schema_file, json }) => {
            return match print_load_command(&cfg, &topic, &hour, &schema_file, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tron-sink-secor: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Command::Audit(args)) => return audit::main(cfg, *args),
        Some(Command::Hours { topic, json }) => {
            return match print_hours(&cfg, &topic, json) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("tron-sink-secor hours: {e:#}");
                    ExitCode::from(2)
                }
            };
        }
        None => {}
    }
    daemon::run(daemon::LargeAllocations::ShortLived, |d| run(cfg, d))
}

async fn run(cfg: SinkConfig, daemon: Daemon) -> anyhow::Result<()> {
    // Staging holds only uncommitted data, which Kafka still has: start from a clean slate.
    let _ = std::fs::remove_dir_all(&cfg.staging_dir);
    std::fs::create_dir_all(&cfg.staging_dir).with_context(|| format!("staging_dir {}", cfg.staging_dir.display()))?;
    let (bucket, _) = cfg.split_url();
    let store = store::Store::open(&bucket, &cfg.output).await?;
    // /health names GCS from the start: a missing bucket or refused credentials show at once.
    let (_, prefix) = cfg.split_url();
    let state_prefix = join_key(&prefix, "_tron/state/");
    let probe = tokio::time::timeout(cfg.output.request_timeout, store.list(&state_prefix));
    match probe.await.unwrap_or_else(|_| Err(anyhow::anyhow!("no answer within {:?}", cfg.output.request_timeout))) {
        Ok(_) => daemon.health.up("gcs"),
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "object store not usable at start");
            daemon.health.down("gcs", format!("{e:#}"));
        }
    }
    let consumer = consumer::create(&cfg).context("creating the Kafka consumer")?;
    daemon.health.up("kafka");
    export_zero_counters(&cfg.kafka.topics);
    daemon.ready("tron-sink-secor", cfg.metrics_listen).await?;
    tracing::info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, output = %cfg.output.url, "consuming");
    let beat = daemon.liveness.register("consume loop");
    consumer::run(&cfg, consumer, store, daemon.health.clone(), daemon.shutdown.clone(), beat).await
}

/// Counters an alert or a dashboard reads, at 0 from the start: `increase()` of a counter that
/// appears only at its first event misses that event, and a panel over it shows no data.
fn export_zero_counters(topics: &[String]) {
    metrics::counter!("tron_sink_fenced_total").absolute(0);
    metrics::counter!("tron_sink_offset_fetch_errors_total").absolute(0);
    for topic in topics {
        for reason in [partition::Reason::TooOld, partition::Reason::TooNew, partition::Reason::NoTime] {
            metrics::counter!("tron_sink_records_quarantined_total", "topic" => topic.clone(), "reason" => reason.as_str())
                .absolute(0);
        }
        for name in
            ["tron_sink_duplicates_dropped_total", "tron_sink_hours_finalized_total", "tron_sink_late_objects_total"]
        {
            metrics::counter!(name, "topic" => topic.clone()).absolute(0);
        }
    }
}

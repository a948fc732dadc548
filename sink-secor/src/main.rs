//! tron-sink-secor: a Kafka consumer group that writes hourly-partitioned gzip CSV/TSV/NDJSON
//! objects to GCS, every record in exactly one object, and marks hours complete.

mod bq;
mod config;
mod consumer;
mod finalize;
mod format;
mod partition;
mod state;
mod store;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use config::SinkConfig;
use std::path::PathBuf;
use std::process::ExitCode;
use tron_service::{config as cfgload, http, systemd, telemetry, tls, Health, Shutdown};

#[derive(Parser)]
#[command(version, about = "Writes Kafka topics to hourly-partitioned gzip objects in GCS, exactly once per record")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/tron/sink-secor.toml", global = true)]
    config: PathBuf,
    /// Validate the configuration and exit (0 valid, 1 invalid).
    #[arg(long)]
    check_config: bool,
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
    /// Print the `bq load` command that (re)loads one hour, idempotently.
    BqLoadCommand {
        #[arg(long)]
        topic: String,
        /// UTC hour as YYYY-MM-DDTHH.
        #[arg(long)]
        hour: String,
    },
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
    telemetry::init_logging();
    let cfg = match cfgload::load(&args.config, SinkConfig::validate) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("tron-sink-secor: invalid configuration: {e}");
            return ExitCode::FAILURE;
        }
    };
    if args.check_config {
        println!("{}: configuration is valid", args.config.display());
        return ExitCode::SUCCESS;
    }
    match args.command {
        Some(Command::BqSchema { topic: _ }) => {
            println!("{}", serde_json::to_string_pretty(&bq::schema(&cfg)).expect("json"));
            return ExitCode::SUCCESS;
        }
        Some(Command::BqLoadCommand { topic, hour }) => {
            return match bq::load_command(&cfg, &topic, &hour) {
                Ok(cmd) => {
                    println!("{cmd}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("tron-sink-secor: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => {}
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    match runtime.block_on(run(cfg)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cfg: SinkConfig) -> anyhow::Result<()> {
    tls::install_default_provider();
    let metrics = telemetry::init_metrics()?;
    let health = Health::new();
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    // Staging holds only uncommitted data, which Kafka still has: start from a clean slate.
    let _ = std::fs::remove_dir_all(&cfg.staging_dir);
    std::fs::create_dir_all(&cfg.staging_dir).with_context(|| format!("staging_dir {}", cfg.staging_dir.display()))?;
    let (bucket, _) = cfg.split_url();
    let store = store::Store::open(&bucket, cfg.output.endpoint.as_deref()).await?;
    let consumer = consumer::create(&cfg).context("creating the Kafka consumer")?;
    let metrics_addr = http::serve(cfg.metrics_listen, metrics, health.clone(), shutdown.clone())
        .await
        .with_context(|| format!("binding metrics_listen = {}", cfg.metrics_listen))?;
    health.up("kafka");
    tracing::info!(topics = ?cfg.kafka.topics, group = %cfg.kafka.group_id, output = %cfg.output.url, metrics = %metrics_addr, "tron-sink-secor ready");
    systemd::ready();
    systemd::spawn_watchdog(|| true);
    consumer::run(&cfg, consumer, store, health, shutdown).await?;
    tracing::info!("drained; bye");
    Ok(())
}

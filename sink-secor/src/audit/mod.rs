//! `tron-sink-secor audit`: for a topic and a range of hours, compares the agents' S3 archive
//! with the sink's GCS objects, id by id, and reports per hour what each side holds, what is
//! missing from either, what GCS has twice, and how long lines took from event to object.
//! An hour is read and reported before the next one is read, so memory is bounded by one hour's
//! distinct ids (see `tally`). docs/audit.md explains the report.

mod read;
mod tally;

use crate::config::SinkConfig;
use crate::store::Store;
use read::{Archive, ArchiveAccess, RowLayout};
use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;
use tally::{DeadLetters, HourReport, Tally};
use tron_service::daemon::{self, Daemon};

#[derive(clap::Args)]
pub struct AuditArgs {
    /// The Kafka topic whose GCS hours are audited (one of kafka.topics).
    #[arg(long)]
    topic: String,
    /// First hour (UTC), YYYY-MM-DDTHH.
    #[arg(long, required_unless_present = "watch")]
    from: Option<String>,
    /// Last hour (UTC), YYYY-MM-DDTHH; default: --from.
    #[arg(long)]
    to: Option<String>,
    /// The agents' archive: s3://bucket/prefix (their destinations.s3) or file:///dir.
    #[arg(long)]
    archive: String,
    /// Agent tags that the relay routes to this topic (the archive's first level under the
    /// prefix); repeat for several. Default: the topic name.
    #[arg(long = "tag")]
    tags: Vec<String>,
    /// S3 endpoint (an S3-compatible store); credentials come from the SDK's default chain.
    #[arg(long)]
    s3_endpoint: Option<String>,
    #[arg(long)]
    s3_region: Option<String>,
    /// A profile of ~/.aws/config to take credentials from.
    #[arg(long)]
    s3_profile: Option<String>,
    /// The record field holding tron-agent's line id (the agent's fields.id).
    #[arg(long, default_value = "_id")]
    id_field: String,
    /// A relay's dead-letter file (its `dead_letter.path`, copied here); repeat for several.
    /// Archived lines missing in GCS that a relay dead-lettered are reported with its reason.
    #[arg(long = "dead-letters")]
    dead_letters: Vec<std::path::PathBuf>,
    /// One JSON object per hour instead of a table.
    #[arg(long)]
    json: bool,
    /// Keep auditing the last --hours finished hours every --interval and export the results as
    /// Prometheus gauges on --metrics-listen.
    #[arg(long)]
    watch: bool,
    #[arg(long, default_value = "5m", value_parser = tron_service::config::parse_duration)]
    interval: Duration,
    #[arg(long, default_value_t = 3)]
    hours: u32,
    #[arg(long, default_value = "127.0.0.1:9467")]
    metrics_listen: SocketAddr,
}

/// Exit codes: 0 every hour matches, 1 something is missing or doubled, 2 the audit could not run.
pub fn main(cfg: SinkConfig, args: AuditArgs) -> ExitCode {
    if args.watch {
        return daemon::run(daemon::LargeAllocations::ShortLived, |d| watch(cfg, args, d));
    }
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        tron_service::tls::install_default_provider();
        let auditor = Auditor::new(&cfg, &args).await?;
        let (from, to) = auditor.hours_of(&args)?;
        let mut failed = false;
        if !args.json {
            println!("{}", table_header());
        }
        for hour in from..=to {
            let report = auditor.audit_hour(hour).await?;
            failed |= report.failed();
            if args.json {
                println!("{}", serde_json::to_string(&report).expect("json"));
            } else {
                println!("{}", table_row(&report));
            }
        }
        anyhow::Ok(failed)
    });
    match result {
        Ok(false) => ExitCode::SUCCESS,
        Ok(true) => ExitCode::from(1),
        Err(e) => {
            eprintln!("tron-sink-secor audit: {e:#}");
            ExitCode::from(2)
        }
    }
}

struct Auditor<'a> {
    cfg: &'a SinkConfig,
    topic: String,
    tags: Vec<String>,
    id_field: String,
    archive: Archive,
    store: Store,
    rows: RowLayout,
    dead_letters: DeadLetters,
}

impl<'a> Auditor<'a> {
    async fn new(cfg: &'a SinkConfig, args: &AuditArgs) -> anyhow::Result<Self> {
        if !cfg.kafka.topics.contains(&args.topic) {
            anyhow::bail!("--topic {:?} is not one of kafka.topics {:?}", args.topic, cfg.kafka.topics);
        }
        let access = ArchiveAccess {
            url: &args.archive,
            endpoint: args.s3_endpoint.as_deref(),
            region: args.s3_region.as_deref(),
            profile: args.s3_profile.as_deref(),
        };
        let (bucket, _) = cfg.split_url();
        Ok(Auditor {
            cfg,
            topic: args.topic.clone(),
            tags: if args.tags.is_empty() { vec![args.topic.clone()] } else { args.tags.clone() },
            id_field: args.id_field.clone(),
            archive: Archive::open(&access).await?,
            store: Store::open(&bucket, &cfg.output).await?,
            rows: RowLayout::new(&cfg.output, &args.id_field)?,
            dead_letters: DeadLetters::read(&args.dead_letters, &args.id_field)?,
        })
    }

    fn hours_of(&self, args: &AuditArgs) -> anyhow::Result<(i64, i64)> {
        let from = crate::layout::parse_hour("--from", args.from.as_deref().unwrap_or_default())?;
        let to = match &args.to {
            Some(to) => crate::layout::parse_hour("--to", to)?,
            None => from,
        };
        if to < from {
            anyhow::bail!(
                "--to {} is before --from {}",
                crate::layout::format_hour(to),
                crate::layout::format_hour(from)
            );
        }
        Ok((from, to))
    }

    async fn audit_hour(&self, hour: i64) -> anyhow::Result<HourReport> {
        let mut tally = Tally::default();
        // GCS first: a line the sink uploads while the archive is being read is then at worst
        // reported missing from the archive, never the other way round.
        let dir = self.cfg.layout().hour_dir(&self.topic, hour);
        let success = self.rows.read_hour(&self.store, &dir, &mut tally).await?;
        self.archive.read_hour(&self.tags, hour, &self.id_field, &mut tally).await?;
        Ok(tally.report(&self.topic, hour, success, &self.dead_letters))
    }
}

fn table_header() -> String {
    format!(
        "{:<16} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8}",
        "hour",
        "arch_rows",
        "gcs_rows",
        "miss_gcs",
        "dead_let",
        "miss_arch",
        "gcs_dup",
        "arch_dup",
        "no_id",
        "p50_s",
        "p99_s",
        "max_s",
        "_SUCCESS"
    )
}

fn table_row(r: &HourReport) -> String {
    let secs = |f: fn(&tally::Latency) -> i64| {
        r.latency.as_ref().map_or("-".to_string(), |l| format!("{:.1}", f(l) as f64 / 1e3))
    };
    format!(
        "{:<16} {:>10} {:>10} {:>10} {:>9} {:>10} {:>9} {:>9} {:>8} {:>9} {:>9} {:>9} {:>8}",
        r.hour,
        r.archive_rows,
        r.gcs_rows,
        r.missing_in_gcs,
        r.missing_in_gcs_dead_lettered.values().sum::<u64>(),
        r.missing_in_archive,
        r.gcs_duplicate_rows,
        r.archive_duplicate_rows,
        r.gcs_rows_without_id,
        secs(|l| l.p50_ms),
        secs(|l| l.p99_ms),
        secs(|l| l.max_ms),
        if r.success { "yes" } else { "no" }
    )
}

/// The audit as a service: every `interval`, the last `hours` hours that are past the sink's
/// lateness, exported as gauges; `/health` turns 503 while a store cannot be read.
async fn watch(cfg: SinkConfig, args: AuditArgs, daemon: Daemon) -> anyhow::Result<()> {
    let auditor = Auditor::new(&cfg, &args).await?;
    daemon.ready("tron-sink-secor audit", args.metrics_listen).await?;
    let beat = daemon.liveness.register("audit loop");
    loop {
        beat.beat();
        let now_ms = tron_service::clock::now_ms();
        let last = (now_ms - cfg.finalize.lateness.as_millis() as i64) / 3_600_000 - 1;
        let mut result = Ok(());
        for hour in (last + 1 - i64::from(args.hours.max(1)))..=last {
            match auditor.audit_hour(hour).await {
                Ok(report) => export(&report),
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            beat.beat();
        }
        match result {
            Ok(()) => {
                daemon.health.up("audit");
                metrics::counter!("tron_audit_runs_total", "result" => "ok").increment(1);
                metrics::gauge!("tron_audit_last_success_timestamp_seconds").set(now_ms as f64 / 1e3);
            }
            Err(e) => {
                tracing::error!(error = %format!("{e:#}"), "audit run failed");
                daemon.health.down("audit", format!("{e:#}"));
                metrics::counter!("tron_audit_runs_total", "result" => "error").increment(1);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(args.interval) => {}
            _ = daemon.shutdown.wait() => return Ok(()),
        }
    }
}

fn export(r: &HourReport) {
    let labels = |extra: (&'static str, &'static str)| {
        vec![("topic", r.topic.clone()), ("hour", r.hour.clone()), (extra.0, extra.1.to_string())]
    };
    let gauge = |name: &'static str, extra: (&'static str, &'static str), value: f64| {
        metrics::gauge!(name, &labels(extra)).set(value);
    };
    gauge("tron_audit_missing_records", ("side", "gcs"), r.missing_in_gcs as f64);
    gauge("tron_audit_missing_records", ("side", "archive"), r.missing_in_archive as f64);
    gauge("tron_audit_duplicate_rows", ("side", "gcs"), r.gcs_duplicate_rows as f64);
    gauge("tron_audit_duplicate_rows", ("side", "archive"), r.archive_duplicate_rows as f64);
    gauge("tron_audit_rows", ("side", "gcs"), r.gcs_rows as f64);
    gauge("tron_audit_rows", ("side", "archive"), r.archive_rows as f64);
    gauge("tron_audit_hour_complete", ("side", "gcs"), if r.success { 1.0 } else { 0.0 });
    if let Some(l) = &r.latency {
        gauge("tron_audit_latency_seconds", ("quantile", "0.5"), l.p50_ms as f64 / 1e3);
        gauge("tron_audit_latency_seconds", ("quantile", "0.99"), l.p99_ms as f64 / 1e3);
        gauge("tron_audit_latency_seconds", ("quantile", "1"), l.max_ms as f64 / 1e3);
    }
    tracing::info!(topic = %r.topic, hour = %r.hour, missing_in_gcs = r.missing_in_gcs, missing_in_archive = r.missing_in_archive, gcs_duplicates = r.gcs_duplicate_rows, "audited");
}

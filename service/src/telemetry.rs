use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// How log lines are written: `text` (`key=value`, for people and journald) or `json` (one
/// object per line with every field a warning carries — file, host, topic, partition — as its
/// own key, for log stores that index fields).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The logging flag every daemon takes (flattened into each binary's arguments).
#[derive(Clone, Copy, Debug, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format on stderr: `text` or `json` (one JSON object per line).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
}

static COMPONENT: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The binary's name (`tron-agent`, …), the `component` label of metrics every daemon exports
/// (`tron_health_up`), so one alert rule covers all three without knowing scrape job names.
pub fn component() -> &'static str {
    COMPONENT.get().copied().unwrap_or("unknown")
}

/// Logs to stderr (journald picks it up), filtered by `RUST_LOG`, `info` by default. Colours
/// only on a terminal, so journald and log files get plain `key=value` text.
pub fn init_logging(component: &'static str, format: LogFormat) {
    let _ = COMPONENT.set(component);
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // stderr: stdout belongs to what a subcommand prints (a bq command, a schema), and a log
    // line there (librdkafka reporting an unreachable broker) would corrupt it.
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_target(false).with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.with_ansi(std::io::stderr().is_terminal()).try_init(),
        // Fields at the top level of each object (`{"level":"WARN","fields":…}` would make every
        // query say `fields.path`), and the span list off: our spans carry nothing searchable.
        LogFormat::Json => builder.json().flatten_event(true).with_current_span(false).with_span_list(false).try_init(),
    };
}

/// Installs the process-wide Prometheus recorder. Metrics whose names end in `_seconds` are
/// histograms with buckets spanning 1 ms to about 2 hours, wide enough for event-time latency.
pub fn init_metrics() -> anyhow::Result<PrometheusHandle> {
    const LATENCY: &[f64] =
        &[0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 7200.0];
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY)?
        .install_recorder()?;
    Ok(handle)
}

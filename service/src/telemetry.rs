use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Logs to stderr (journald picks it up), filtered by `RUST_LOG`, `info` by default. Colours
/// only on a terminal, so journald and log files get plain `key=value` text.
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        // stderr: stdout belongs to what a subcommand prints (a bq command, a schema), and a
        // log line there (librdkafka reporting an unreachable broker) would corrupt it.
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
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

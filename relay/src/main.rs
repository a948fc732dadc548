//! tron-relay: Forward protocol in (TLS), Kafka out; a chunk is acked only once Kafka has all of it.

mod config;
mod connection;
mod dead_letter;
mod kafka;
mod peer_names;
mod receive;
mod route;
mod server;
mod slots;
mod watermarks;

/// Chunks decoded at once: one per core of the 2-core VM the relay is sized for. Each may hold up
/// to `max_decompressed_bytes` + `max_decoded_bytes` while it decodes.
const DECODE_SLOTS: usize = 2;

use anyhow::Context as _;
use clap::Parser;
use config::RelayConfig;
use connection::{Context, Security};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;
use tron_service::daemon::{self, Daemon};
use tron_service::{tls, Health, Shutdown};

#[derive(Parser)]
#[command(version, about = "Accepts Fluentd Forward protocol over TLS and acks each chunk only after Kafka has it")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/tron/relay.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 valid, 1 invalid).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    log: tron_service::telemetry::LogArgs,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match daemon::load_config("tron-relay", &args.config, args.check_config, args.log, RelayConfig::validate)
    {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    daemon::run(daemon::LargeAllocations::ShortLived, |d| run(cfg, args.config, d))
}

fn acceptor(cfg: &RelayConfig) -> anyhow::Result<Option<tokio_rustls::TlsAcceptor>> {
    Ok(match &cfg.tls {
        Some(t) => {
            let server = tls::server_config(&t.cert, &t.key, t.client_ca.as_deref())?;
            Some(tokio_rustls::TlsAcceptor::from(Arc::new(server)))
        }
        None => None,
    })
}

async fn run(cfg: RelayConfig, config_path: PathBuf, daemon: Daemon) -> anyhow::Result<()> {
    let Daemon { health, shutdown, .. } = &daemon;
    let tls: server::SharedAcceptor = Arc::new(std::sync::RwLock::new(acceptor(&cfg)?));
    tokio::spawn(reload_tls_on_hangup(config_path, tls.clone(), shutdown.clone()));
    if let Some(dir) = cfg.dead_letter.path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("dead_letter.path: creating {}", dir.display()))?;
    }
    let ctx = Arc::new(Context {
        kafka: kafka::Kafka::new(&cfg.kafka, cfg.limits.max_inflight_bytes).context("creating the Kafka producer")?,
        watermarks: Default::default(),
        dead_letter: dead_letter::DeadLetter::new(cfg.dead_letter.path.clone(), cfg.dead_letter.max_bytes),
        router: route::Router::new(
            cfg.kafka.routes.iter().map(|r| (r.pattern.clone(), r.topic.clone())),
            cfg.kafka.default_topic.clone(),
        ),
        limits: forward::Limits {
            max_frame_bytes: cfg.limits.max_frame_bytes,
            max_decompressed_bytes: cfg.limits.max_decompressed_bytes,
            max_entries_per_chunk: cfg.limits.max_entries_per_chunk,
            max_elements_per_chunk: cfg.limits.max_elements_per_chunk,
            max_decoded_bytes: cfg.limits.max_decoded_bytes,
        },
        decode_slots: tokio::sync::Semaphore::new(DECODE_SLOTS),
        budget: Arc::new(tokio::sync::Semaphore::new(cfg.limits.max_inflight_bytes)),
        receive_pool: receive::ReceivePool::new(cfg.limits.max_receiving_bytes),
        max_inflight_bytes: cfg.limits.max_inflight_bytes,
        max_inflight_bytes_per_connection: cfg.limits.inflight_bytes_per_connection(),
        handshake_timeout: cfg.limits.handshake_timeout,
        frame_timeout: cfg.limits.frame_timeout,
        idle_timeout: cfg.limits.idle_timeout,
        reports_only_for_certificate_names: cfg.tls.as_ref().is_some_and(|t| t.reports_only_for_certificate_names),
        security: cfg.security.as_ref().map(|s| Security {
            hostname: cfg.hostname.clone(),
            shared_key: s.shared_key.clone(),
            users: s.users.iter().map(|u| (u.username.clone(), u.password.clone())).collect(),
            reports_only_for_usernames: s.reports_only_for_usernames,
        }),
    });

    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding listen = {}", cfg.listen))?;
    spawn_kafka_health(ctx.clone(), health.clone(), shutdown.clone());
    if !cfg.kafka.watermark_interval.is_zero() {
        let (ctx, shutdown, every) = (ctx.clone(), shutdown.clone(), cfg.kafka.watermark_interval);
        tokio::spawn(async move { ctx.watermarks.run(&ctx.kafka, every, shutdown).await });
    }
    export_limits(&cfg.limits);
    export_zero_counters();
    daemon.ready("tron-relay", cfg.metrics_listen).await?;
    tracing::info!(listen = %cfg.listen, tls = cfg.tls.is_some(), "accepting Forward connections");

    let beat = daemon.liveness.register("accept loop");
    let slots = slots::Slots::new(cfg.limits.max_connections, cfg.limits.max_connections_per_address);
    server::run(listener, ctx.clone(), tls, slots, shutdown.clone(), beat).await;
    let kafka_ctx = ctx.clone();
    tokio::task::spawn_blocking(move || kafka_ctx.kafka.flush(Duration::from_secs(30))).await??;
    Ok(())
}

/// SIGHUP re-reads the certificate, key and client CA named in the configuration file, so a
/// renewed certificate needs no restart; open connections keep the session they have. Other
/// settings need a restart, and a file that fails to load changes nothing.
async fn reload_tls_on_hangup(path: PathBuf, tls: server::SharedAcceptor, shutdown: Shutdown) {
    let Ok(mut hangups) = Shutdown::hangups() else {
        return tracing::warn!("cannot listen for SIGHUP; certificate reload needs a restart");
    };
    loop {
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = hangups.recv() => {}
        }
        tron_service::systemd::reloading();
        let reloaded =
            tron_service::config::load(&path, RelayConfig::validate).map_err(anyhow::Error::from).and_then(|cfg| {
                let was_tls = tls.read().expect("tls lock").is_some();
                anyhow::ensure!(was_tls == cfg.tls.is_some(), "turning TLS on or off needs a restart");
                acceptor(&cfg)
            });
        match reloaded {
            Ok(fresh) => {
                *tls.write().expect("tls lock") = fresh;
                metrics::counter!("tron_relay_reloads_total", "result" => "ok").increment(1);
                tracing::info!(path = %path.display(), "TLS certificate and key reloaded");
            }
            Err(e) => {
                metrics::counter!("tron_relay_reloads_total", "result" => "refused").increment(1);
                tracing::error!(config = %path.display(), error = %format!("{e:#}"), "reload refused; the running certificate stays");
            }
        }
        tron_service::systemd::ready();
    }
}

fn spawn_kafka_health(ctx: Arc<Context>, health: Health, shutdown: Shutdown) {
    tokio::spawn(async move {
        while !shutdown.is_triggered() {
            let c = ctx.clone();
            let result = tokio::task::spawn_blocking(move || c.kafka.reachable(Duration::from_secs(5))).await;
            match result {
                Ok(Ok(())) => health.up("kafka"),
                Ok(Err(e)) => health.down("kafka", format!("brokers unreachable: {e}")),
                Err(e) => health.down("kafka", e.to_string()),
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
        }
    });
}

/// The bounds beside the gauges they bound, so alerts and dashboards read "how near the limit"
/// from the running config instead of copying numbers that a config change would make wrong.
fn export_limits(limits: &config::LimitsConfig) {
    metrics::gauge!("tron_relay_limit", "kind" => "inflight_bytes").set(limits.max_inflight_bytes as f64);
    metrics::gauge!("tron_relay_limit", "kind" => "receiving_bytes").set(limits.max_receiving_bytes as f64);
    metrics::gauge!("tron_relay_limit", "kind" => "connections").set(limits.max_connections as f64);
}

/// Counters an alert or a dashboard reads, at 0 from the start: `increase()` of a counter that
/// appears only at its first event misses that event, and a panel over it shows no data.
fn export_zero_counters() {
    metrics::counter!("tron_relay_watermark_reports_refused_total").absolute(0);
    for reason in ["timed_out", "unknown_topic", "too_large", "kafka_error", "canceled"] {
        metrics::counter!("tron_relay_delivery_failures_total", "reason" => reason).absolute(0);
    }
    for reason in ["too_large", "invalid_timestamp", "invalid_record"] {
        metrics::counter!("tron_relay_records_dead_lettered_total", "reason" => reason).absolute(0);
    }
    for reason in ["connection_limit", "address_limit", "tls", "handshake"] {
        metrics::counter!("tron_relay_connections_refused_total", "reason" => reason).absolute(0);
    }
}

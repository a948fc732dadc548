//! tron-agent: tails log files and ships every line to each configured destination (S3 archive,
//! relay), each with its own checkpoint; the files on disk are the buffer.

mod checkpoint;
mod config;
mod cursor;
mod destination;
mod discover;
mod file_table;
mod identity;
mod json_msgpack;
mod multiline;
mod parse;
mod reader;
mod relay;
mod rfc3339;
mod s3;
mod shared_reads;
mod ship;

use anyhow::Context as _;
use clap::Parser;
use config::AgentConfig;
use destination::Destination;
use discover::Registry;
use notify::Watcher;
use ship::Shipper;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tron_service::daemon::{self, Daemon};
use tron_service::systemd::{self, Heartbeat};
use tron_service::Shutdown;

#[derive(Parser)]
#[command(version, about = "Tails log files and ships every line to S3 and to tron-relay")]
struct Args {
    /// Configuration file.
    #[arg(short, long, default_value = "/etc/tron/agent.toml")]
    config: PathBuf,
    /// Validate the configuration and exit (0 valid, 1 invalid).
    #[arg(long)]
    check_config: bool,
    #[command(flatten)]
    log: tron_service::telemetry::LogArgs,
}

/// Why bytes of a file can be lost, each a `reason` of `tron_agent_lost_bytes_total` (exported at
/// 0 from the start, so an alert on its increase works before the first loss).
pub const LOST_REASONS: &[&str] = &["truncated", "gone_while_stopped", "rotated_given_up", "rotated_over_limit"];

/// How long SIGTERM waits for outstanding batches before exiting (systemd's stop time-out is
/// longer, so the process exits on its own).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> ExitCode {
    let args = Args::parse();
    let cfg = match daemon::load_config("tron-agent", &args.config, args.check_config, args.log, AgentConfig::validate)
    {
        Ok(cfg) => cfg,
        Err(code) => return code,
    };
    daemon::run(daemon::LargeAllocations::LongLived, |d| run(cfg, args.config, d))
}

async fn run(cfg: AgentConfig, config_path: PathBuf, daemon: Daemon) -> anyhow::Result<()> {
    let Daemon { health, shutdown, .. } = &daemon;
    let host = cfg.host.clone().unwrap_or_else(system_hostname);
    std::fs::create_dir_all(&cfg.state_dir).with_context(|| format!("state_dir {}", cfg.state_dir.display()))?;

    let destinations: Vec<&'static str> =
        [("s3", cfg.destinations.s3.is_some()), ("relay", cfg.destinations.relay.is_some())]
            .into_iter()
            .filter_map(|(name, on)| on.then_some(name))
            .collect();
    for (destination, reason) in
        destinations.iter().flat_map(|d| destination::SendError::REASONS.iter().map(move |r| (*d, *r)))
    {
        metrics::counter!("tron_agent_send_retries_total", "destination" => destination, "reason" => reason)
            .absolute(0);
    }
    let table = file_table::FileTable::open(&cfg.state_dir)?;
    let mut previous = discover::PreviousRun { legacy: !table.existed, ..Default::default() };
    for name in ["s3", "relay"] {
        for (id, position) in checkpoint::Checkpointer::open(&cfg.state_dir, name)?.positions() {
            previous.offsets.entry(id).or_default().push((name, position.offset));
            previous.paths.insert(id, position.path.clone());
        }
    }
    let previous_run = checkpoint::previous_run(&cfg.state_dir);
    let registry =
        Registry::new(&cfg.sources, cfg.files.clone(), &cfg.state_dir, destinations, table, previous, previous_run);
    {
        let r = registry.clone();
        tokio::task::spawn_blocking(move || r.scan()).await?;
    }
    checkpoint::mark_started(&cfg.state_dir)?;
    let scan_requested = Arc::new(AtomicBool::new(false));
    let watcher = watch_dirs(&registry, scan_requested.clone());
    let beat = daemon.liveness.register("scanner");
    spawn_scanner(registry.clone(), scan_requested, cfg.files.scan_interval, shutdown.clone(), beat);

    let mut shippers = Vec::new();
    let destinations = usize::from(cfg.destinations.s3.is_some()) + usize::from(cfg.destinations.relay.is_some());
    let shared = shared_reads::SharedReads::for_destinations(destinations);
    let ctx = ShipperContext { cfg: &cfg, registry: &registry, host: &host, daemon: &daemon, shared: &shared };
    if let Some(s3cfg) = &cfg.destinations.s3 {
        let dest = Arc::new(s3::S3Archive::new(s3cfg, &host).await?);
        shippers.push(ctx.spawn(dest)?);
        health.up("s3");
    }
    let mut relay = None;
    if let Some(relay_cfg) = &cfg.destinations.relay {
        let dest = Arc::new(relay::RelayForwarder::new(relay_cfg, &host, source_tags(&cfg), health.clone())?);
        relay = Some(dest.clone());
        shippers.push(ctx.spawn(dest)?);
    }
    let reloader =
        Reloader { path: config_path, registry: registry.clone(), relay, watcher, fixed: config::fixed_settings(&cfg) };
    tokio::spawn(reloader.run(shutdown.clone()));
    daemon.ready("tron-agent", cfg.metrics_listen).await?;
    tracing::info!(%host, files = registry.snapshot().len(), destinations = shippers.len(), "following files");
    for s in shippers {
        s.await?;
    }
    Ok(())
}

struct ShipperContext<'a> {
    cfg: &'a AgentConfig,
    registry: &'a Arc<Registry>,
    host: &'a str,
    daemon: &'a Daemon,
    shared: &'a Option<Arc<shared_reads::SharedReads>>,
}

impl ShipperContext<'_> {
    /// Starts the loop for one destination, with its own checkpoint file.
    fn spawn<D: Destination>(&self, dest: Arc<D>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
        let index = self.registry.destination_index(dest.name());
        let checkpoints = checkpoint::Checkpointer::open(&self.cfg.state_dir, dest.name())?;
        let beat = self.daemon.liveness.register(&format!("{} shipper", dest.name()));
        let shipper = Shipper::new(
            dest,
            index,
            self.registry.clone(),
            checkpoints,
            self.cfg.fields.clone(),
            self.host.to_string(),
            self.daemon.health.clone(),
            self.cfg.files.checkpoint_interval,
            self.shared.clone(),
        );
        Ok(tokio::spawn(shipper.run(self.daemon.shutdown.clone(), DRAIN_TIMEOUT, beat)))
    }
}

/// SIGHUP re-reads the configuration file and applies what can change without losing position:
/// the sources (new globs are followed, dropped ones finish their files, the watermark reports
/// speak for the new set of tags) and the relay's TLS material. A file that fails validation, or
/// that changes a setting only a restart applies, changes nothing; the error names the key.
struct Reloader {
    path: PathBuf,
    registry: Arc<Registry>,
    relay: Option<Arc<relay::RelayForwarder>>,
    watcher: Option<notify::RecommendedWatcher>,
    /// The settings a reload cannot change, as running (`config::fixed_settings`).
    fixed: Vec<(String, String)>,
}

impl Reloader {
    async fn run(mut self, shutdown: Shutdown) {
        let mut hangups = match Shutdown::hangups() {
            Ok(h) => h,
            Err(e) => return tracing::warn!(error = %e, "cannot listen for SIGHUP; reload needs a restart"),
        };
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = hangups.recv() => {}
            }
            systemd::reloading();
            let outcome = self.reload().await;
            let result = if outcome.is_ok() { "ok" } else { "refused" };
            metrics::counter!("tron_agent_reloads_total", "result" => result).increment(1);
            match outcome {
                Ok(files) => tracing::info!(path = %self.path.display(), files, "configuration reloaded"),
                Err(e) => {
                    tracing::error!(config = %self.path.display(), error = %format!("{e:#}"), "reload refused; the running configuration stays")
                }
            }
            systemd::ready();
        }
    }

    async fn reload(&mut self) -> anyhow::Result<usize> {
        let cfg: AgentConfig = tron_service::config::load(&self.path, AgentConfig::validate)?;
        let fixed = config::fixed_settings(&cfg);
        if let Some((key, _)) = fixed.iter().zip(&self.fixed).find(|(new, old)| new != old).map(|(new, _)| new) {
            anyhow::bail!("{key} changed, which a reload cannot apply: restart the agent to change it");
        }
        if let (Some(relay), Some(relay_cfg)) = (&self.relay, &cfg.destinations.relay) {
            relay.reload_tls(relay_cfg).context("reloading the relay TLS material")?;
            relay.set_tags(source_tags(&cfg));
        }
        self.registry.set_sources(&cfg.sources);
        if let Some(w) = &mut self.watcher {
            for dir in self.registry.watch_dirs() {
                let _ = w.watch(&dir, notify::RecursiveMode::NonRecursive);
            }
        }
        let r = self.registry.clone();
        tokio::task::spawn_blocking(move || r.scan()).await?;
        Ok(self.registry.snapshot().len())
    }
}

/// inotify on the directories the globs live in: a change wakes the shippers at once and asks
/// for a rescan; the periodic scan stays as the safety net.
fn watch_dirs(registry: &Arc<Registry>, scan_requested: Arc<AtomicBool>) -> Option<notify::RecommendedWatcher> {
    let r = registry.clone();
    let mut watcher = match notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if let Ok(event) = event {
            if !matches!(event.kind, notify::EventKind::Modify(notify::event::ModifyKind::Data(_))) {
                scan_requested.store(true, Ordering::SeqCst);
            }
            r.poke();
        }
    }) {
        Ok(w) => w,
        Err(e) => {
            tracing::warn!(error = %e, "inotify unavailable; relying on the periodic scan");
            return None;
        }
    };
    for dir in registry.watch_dirs() {
        if let Err(e) = watcher.watch(&dir, notify::RecursiveMode::NonRecursive) {
            tracing::warn!(dir = %dir.display(), error = %e, "cannot watch directory; relying on the periodic scan");
        }
    }
    Some(watcher)
}

fn spawn_scanner(
    registry: Arc<Registry>,
    requested: Arc<AtomicBool>,
    every: Duration,
    shutdown: Shutdown,
    beat: Heartbeat,
) {
    tokio::spawn(async move {
        let mut last = Instant::now();
        while !shutdown.is_triggered() {
            beat.beat();
            tokio::time::sleep(Duration::from_millis(100)).await;
            if requested.swap(false, Ordering::SeqCst) || last.elapsed() >= every {
                let r = registry.clone();
                let _ = tokio::task::spawn_blocking(move || r.scan()).await;
                last = Instant::now();
            }
        }
    });
}

fn system_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// Every tag the sources send with, once each.
fn source_tags(cfg: &AgentConfig) -> Vec<String> {
    let mut tags: Vec<String> = cfg.sources.iter().map(|s| s.tag.clone()).collect();
    tags.sort();
    tags.dedup();
    tags
}

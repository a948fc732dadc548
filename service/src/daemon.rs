//! The start-up and exit every tron binary shares: load and validate the config (or only check
//! it), then run on a tokio runtime with metrics, health, signals and systemd readiness.

use crate::{config, http, systemd, telemetry, tls, Health, Shutdown};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::de::DeserializeOwned;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::process::ExitCode;

/// Loads `path`. `Err` carries the exit code to return at once: 1 after printing
/// `name: invalid configuration: …`, or 0 when `check_only` and the file is valid.
pub fn load_config<C: DeserializeOwned>(
    name: &'static str,
    path: &Path,
    check_only: bool,
    log: telemetry::LogArgs,
    validate: fn(&C) -> Result<(), (String, String)>,
) -> Result<C, ExitCode> {
    telemetry::init_logging(name, log.log_format);
    match config::load(path, validate) {
        Err(e) => {
            eprintln!("{name}: invalid configuration: {e}");
            Err(ExitCode::FAILURE)
        }
        Ok(_) if check_only => {
            println!("{}: configuration is valid", path.display());
            Err(ExitCode::SUCCESS)
        }
        Ok(cfg) => Ok(cfg),
    }
}

/// What a running daemon shares with its stages.
pub struct Daemon {
    pub health: Health,
    pub shutdown: Shutdown,
    /// Main loops register here; the systemd watchdog is fed only while all of them turn.
    pub liveness: systemd::Liveness,
    metrics: PrometheusHandle,
}

impl Daemon {
    /// Serves `/metrics` and `/health`, then tells systemd we are ready.
    pub async fn ready(&self, name: &str, metrics_listen: SocketAddr) -> anyhow::Result<SocketAddr> {
        let addr = http::serve(metrics_listen, self.metrics.clone(), self.health.clone(), self.shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!("binding metrics_listen = {metrics_listen}: {e}"))?;
        // Which build is running, in every scrape: dashboards can tell versions apart in a rollout.
        metrics::gauge!("tron_build_info", "version" => env!("CARGO_PKG_VERSION"), "commit" => env!("TRON_COMMIT"))
            .set(1.0);
        tracing::info!(metrics = %addr, version = env!("CARGO_PKG_VERSION"), commit = env!("TRON_COMMIT"), "{name} ready");
        systemd::ready();
        systemd::spawn_watchdog(self.liveness.clone());
        Ok(addr)
    }
}

/// How a daemon's large allocations live, which decides glibc's settings for it ([`tune_malloc`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LargeAllocations {
    /// Many buffers of 64 KiB and more that live long and are freed in any order (the agent's
    /// encoders, one per busy file): each gets its own mapping, so a freed one leaves no hole that
    /// stays resident.
    LongLived,
    /// A stream of buffers up to a few MiB, each freed soon after (decompressed chunks,
    /// librdkafka's batches and fetch buffers): they come from the heap, which keeps what they
    /// freed for the next, instead of a fresh mapping whose pages are faulted in every time.
    ShortLived,
}

/// Runs `main` on a multi-threaded runtime; an error is logged and exits 1.
pub fn run<F, Fut>(large: LargeAllocations, main: F) -> ExitCode
where
    F: FnOnce(Daemon) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    tune_malloc(large);
    let runtime = tokio::runtime::Runtime::new().expect("tokio runtime");
    let result = runtime.block_on(async {
        tls::install_default_provider();
        let metrics = telemetry::init_metrics()?;
        let shutdown = Shutdown::new();
        shutdown.on_signals()?;
        main(Daemon { health: Health::new(), shutdown, liveness: Default::default(), metrics }).await
    });
    match result {
        Ok(()) => {
            tracing::info!("drained; bye");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!(error = %format!("{e:#}"), "stopped by an error");
            exit_without_teardown()
        }
    }
}

/// Ends the process after a fatal error without dropping the runtime. Dropping it cancels tasks
/// that other worker threads may be polling at that moment, and those panic on their timers ("A
/// Tokio 1.x context was found, but it is being shutdown"): a backtrace after the real error, seen
/// when an agent's metrics port was taken. `_exit` also skips `atexit` handlers (OpenSSL's
/// cleanup) that would run while librdkafka's threads still use them. Nothing is lost: every
/// daemon is built to survive `kill -9` (checkpoints after acks, Kafka offsets after uploads).
fn exit_without_teardown() -> ! {
    use std::io::Write;
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().flush();
    // SAFETY: `_exit` only ends the process; no Rust state is observed afterwards.
    unsafe { libc::_exit(1) }
}

/// glibc's defaults let a daemon's RSS drift far past the memory its budgets allow:
/// - each thread that allocates gets its own arena (up to 8 per core), and memory freed in one is
///   not reused by the others; tokio's worker and blocking threads take turns at compressing;
/// - after the first large block is freed the mmap threshold rises to its size, so the agent's
///   gzip encoders (160 KiB hash tables) come from the heap and leave holes that stay resident.
///
/// Measured with the agent (`tests/e2e/test_agent_memory.py`, `bench/bench.py files`): 1,200
/// files with a 24 MiB budget peaked at 178 MiB, 65 MiB with two arenas; 4,000 files with 288 MiB
/// of budgets at 496 MiB with two arenas, 249 MiB with this function's settings (jemalloc: 98 MiB
/// in the first case, so not taken).
///
/// The relay and the sink free what they allocate within a chunk or a fetch. With the agent's
/// 64 KiB threshold every decompressed chunk and librdkafka buffer was a fresh mapping, and the
/// heap was trimmed back after each burst: 114,000-138,000 page faults for the relay's bench
/// (1,000,000 records), 66,000-83,000 for the sink's. A 4 MiB threshold and 16 MiB of free heap
/// kept before trimming: 12,000-15,000 for the relay, and its CPU 2.31 -> 2.05 CPU-s per million
/// records (medians of six alternating pairs), at the same peak RSS (bench/RESULTS.md). Larger
/// blocks (a frame near `max_frame_bytes`) are still mapped and returned whole.
///
/// Must run before any thread starts; the `MALLOC_*` environment variables still decide when set.
fn tune_malloc(large: LargeAllocations) {
    let (mmap_threshold, trim_threshold) = match large {
        LargeAllocations::LongLived => (64 << 10, None),
        LargeAllocations::ShortLived => (4 << 20, Some(16 << 20)),
    };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    for (env, param, value) in [
        ("MALLOC_ARENA_MAX", libc::M_ARENA_MAX, Some(2)),
        ("MALLOC_MMAP_THRESHOLD_", libc::M_MMAP_THRESHOLD, Some(mmap_threshold)),
        ("MALLOC_TRIM_THRESHOLD_", libc::M_TRIM_THRESHOLD, trim_threshold),
    ] {
        let Some(value) = value else { continue };
        if std::env::var_os(env).is_none() {
            // SAFETY: mallopt only sets an allocator parameter; no other thread exists yet.
            unsafe {
                libc::mallopt(param, value);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (mmap_threshold, trim_threshold);
}

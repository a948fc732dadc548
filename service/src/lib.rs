//! What every tron daemon shares: strict config loading, tracing, the metrics and health
//! endpoint, systemd readiness and watchdog, shutdown signals, and TLS material.

pub mod backoff;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod fs;
pub mod headers;
pub mod http;
pub mod json_key;
pub mod json_scan;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod net;
pub mod shutdown;
#[cfg(target_arch = "x86_64")]
pub mod sse2;
pub mod swar;
pub mod systemd;
pub mod telemetry;
pub mod tls;

pub use http::Health;
pub use shutdown::Shutdown;

//! systemd `Type=notify`: READY once serving, STOPPING on drain, RELOADING around a reload, and a
//! watchdog fed only while every main loop of the process proves it is still turning.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub fn ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

pub fn reloading() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Reloading]);
}

/// Half the configured watchdog period, if systemd set one. As libsystemd's
/// `sd_watchdog_enabled`: `WATCHDOG_PID`, when set, must name this process (a child that
/// inherited the variables must not ping for its parent); when unset the period applies.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok().filter(|u| *u > 0)?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID") {
        if pid.parse::<u32>().ok() != Some(std::process::id()) {
            return None;
        }
    }
    Some(Duration::from_micros(usec / 2))
}

pub fn watchdog_ping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
}

/// The main loops of a process, each beating as it turns. A loop that stops beating (a deadlock,
/// a blocking call that never returns) stops the watchdog pings, and systemd restarts the
/// service; a timer in a separate task alone would keep pinging a wedged process.
#[derive(Clone)]
pub struct Liveness {
    started: Instant,
    loops: Arc<Mutex<BTreeMap<String, Arc<AtomicU64>>>>,
}

/// One loop's beat; cheap to call on every turn.
#[derive(Clone)]
pub struct Heartbeat {
    started: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Heartbeat {
    pub fn beat(&self) {
        self.last_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Awaits `f`, beating every second meanwhile. Only for a wait that is bounded elsewhere (a
    /// store call under its request time-out): a dependency that is slow, or stalls for longer
    /// than the watchdog period, is not a loop that stopped turning, and a restart would not
    /// help (it would start into the same stall). A loop blocked anywhere else still stops
    /// beating.
    pub async fn while_waiting<T>(&self, f: impl std::future::Future<Output = T>) -> T {
        tokio::pin!(f);
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                out = &mut f => return out,
                _ = tick.tick() => self.beat(),
            }
        }
    }
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness { started: Instant::now(), loops: Arc::default() }
    }
}

impl Liveness {
    /// Registers a loop; it counts as alive from now until it fails to beat for `stale`.
    pub fn register(&self, name: &str) -> Heartbeat {
        let last_ms = Arc::new(AtomicU64::new(self.started.elapsed().as_millis() as u64));
        self.loops.lock().expect("liveness lock").insert(name.to_string(), last_ms.clone());
        Heartbeat { started: self.started, last_ms }
    }

    /// The loops that have not beaten within `stale`.
    pub fn stuck(&self, stale: Duration) -> Vec<String> {
        let now = self.started.elapsed().as_millis() as u64;
        let loops = self.loops.lock().expect("liveness lock");
        loops
            .iter()
            .filter(|(_, last)| now.saturating_sub(last.load(Ordering::Relaxed)) > stale.as_millis() as u64)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

/// Pings the watchdog every half period while every loop of `liveness` beat within the period.
pub fn spawn_watchdog(liveness: Liveness) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            let stuck = liveness.stuck(every * 2);
            if stuck.is_empty() {
                watchdog_ping();
            } else {
                tracing::error!(loops = ?stuck, "main loop stopped turning; withholding the watchdog ping");
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_that_stops_beating_is_reported() {
        let liveness = Liveness::default();
        let a = liveness.register("a");
        let _b = liveness.register("b");
        std::thread::sleep(Duration::from_millis(30));
        a.beat();
        assert_eq!(liveness.stuck(Duration::from_millis(20)), vec!["b".to_string()]);
        assert!(liveness.stuck(Duration::from_secs(5)).is_empty());
    }
}

//! systemd `Type=notify`: READY once serving, STOPPING on drain, and a watchdog fed only while
//! the caller's main loop proves it is alive.

use std::time::Duration;

pub fn ready() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
}

pub fn stopping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
}

pub fn status(text: &str) {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Status(text)]);
}

/// Half the configured watchdog period, if systemd set one.
pub fn watchdog_interval() -> Option<Duration> {
    let mut usec = 0u64;
    sd_notify::watchdog_enabled(false, &mut usec).then(|| Duration::from_micros(usec / 2))
}

pub fn watchdog_ping() {
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
}

/// Pings the watchdog every half period while `alive()` holds, so a wedged process is restarted.
pub fn spawn_watchdog(alive: impl Fn() -> bool + Send + 'static) {
    let Some(every) = watchdog_interval() else {
        return;
    };
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tick.tick().await;
            if alive() {
                watchdog_ping();
            }
        }
    });
}

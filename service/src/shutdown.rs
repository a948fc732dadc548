use tokio_util::sync::CancellationToken;

/// Fires on SIGTERM or SIGINT; every stage holds a clone and drains when it fires.
#[derive(Clone, Default)]
pub struct Shutdown(CancellationToken);

impl Shutdown {
    pub fn new() -> Self {
        Shutdown(CancellationToken::new())
    }

    /// Starts listening for signals. A second signal while draining exits at once.
    pub fn on_signals(&self) -> std::io::Result<()> {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let token = self.0.clone();
        tokio::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::info!("shutdown requested; draining");
            crate::systemd::stopping();
            token.cancel();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            tracing::warn!("second signal; exiting without draining");
            std::process::exit(130);
        });
        Ok(())
    }

    /// SIGHUP, the operator's (and `systemctl reload`'s) request to re-read configuration.
    pub fn hangups() -> std::io::Result<tokio::signal::unix::Signal> {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
    }

    pub fn is_triggered(&self) -> bool {
        self.0.is_cancelled()
    }

    pub async fn wait(&self) {
        self.0.cancelled().await
    }

    pub fn token(&self) -> CancellationToken {
        self.0.clone()
    }
}

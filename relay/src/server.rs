//! Accepts connections (TLS unless configured otherwise), gives each a slot (see `slots`), and
//! drains them on shutdown.

use crate::connection::{self, Context};
use crate::peer_names::ReportHosts;
use crate::slots::Slots;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::task::TaskTracker;
use tron_service::systemd::Heartbeat;
use tron_service::Shutdown;

/// The TLS acceptor, replaced on SIGHUP so renewed certificates apply to new connections.
pub type SharedAcceptor = Arc<std::sync::RwLock<Option<TlsAcceptor>>>;

pub async fn run(
    listener: TcpListener,
    ctx: Arc<Context>,
    tls: SharedAcceptor,
    slots: Arc<Slots>,
    shutdown: Shutdown,
    beat: Heartbeat,
) {
    let tracker = TaskTracker::new();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        beat.beat();
        let (tcp, peer) = tokio::select! {
            _ = shutdown.wait() => break,
            _ = tick.tick() => continue,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let slot = match slots.admit(peer.ip()) {
            Ok((slot, evicted)) => {
                if evicted {
                    metrics::counter!("tron_relay_connections_closed_total", "reason" => "evicted_silent").increment(1);
                }
                slot
            }
            Err(refused) => {
                tracing::warn!(%peer, open = slots.open(), reason = refused.reason(), "connection refused: every slot is held by a connection that has sent frames");
                metrics::counter!("tron_relay_connections_refused_total", "reason" => refused.reason()).increment(1);
                continue;
            }
        };
        let _ = tcp.set_nodelay(true);
        // An agent that vanished without a reset (its VM gone) frees its slot in about a minute.
        let _ = tron_service::net::detect_dead_peers(&tcp, Duration::from_secs(30), Duration::from_secs(60));
        let ctx = ctx.clone();
        let tls = tls.read().expect("tls lock").clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            metrics::gauge!("tron_relay_connections").increment(1.0);
            match tls {
                Some(acceptor) => {
                    let handshake = tokio::select! {
                        result = tokio::time::timeout(ctx.handshake_timeout, acceptor.accept(tcp)) => result,
                        _ = slot.evicted.cancelled() => return metrics::gauge!("tron_relay_connections").decrement(1.0),
                    };
                    match handshake {
                        Ok(Ok(stream)) => {
                            let hosts = if ctx.reports_only_for_certificate_names {
                                let certs = stream.get_ref().1.peer_certificates();
                                ReportHosts::of_certificate(certs.and_then(|c| c.first()))
                            } else {
                                ReportHosts::Any
                            };
                            connection::serve(stream, peer, ctx, &slot, shutdown, hosts).await
                        }
                        Ok(Err(e)) => {
                            tracing::warn!(%peer, error = %e, "TLS handshake failed");
                            metrics::counter!("tron_relay_connections_refused_total", "reason" => "tls").increment(1);
                        }
                        Err(_) => {
                            tracing::warn!(%peer, "TLS handshake timed out");
                            metrics::counter!("tron_relay_connections_refused_total", "reason" => "tls_timeout")
                                .increment(1);
                        }
                    }
                }
                None => connection::serve(tcp, peer, ctx, &slot, shutdown, ReportHosts::Any).await,
            }
            // The slot is free before the gauge says so, so a reader of the gauge never sees a slot
            // still held by a connection it counts as gone.
            drop(slot);
            metrics::gauge!("tron_relay_connections").decrement(1.0);
        });
    }
    tracker.close();
    tracing::info!(open = tracker.len(), "listener closed; waiting for open connections to finish their chunks");
    tracker.wait().await;
}

//! `/metrics` (Prometheus text) and `/health` (200 or 503 with a JSON reason).

use bytes::Bytes;
use http_body_util::Full;
use hyper::{body::Incoming, Request, Response, StatusCode};
use metrics_exporter_prometheus::PrometheusHandle;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

/// Liveness of each part of a component; `/health` is 200 only when every part is up.
#[derive(Clone, Default)]
pub struct Health(Arc<Mutex<BTreeMap<String, Option<String>>>>);

impl Health {
    pub fn new() -> Self {
        Self::default()
    }

    /// Cheap when the part is already up (a lock and a lookup): callers mark a part up on every
    /// success, and the sink does so per Kafka message; the string and metric lookups it used to
    /// make every time were a few percent of its CPU.
    pub fn up(&self, part: &str) {
        let mut parts = self.0.lock().expect("health lock");
        if let Some(None) = parts.get(part) {
            return;
        }
        parts.insert(part.to_string(), None);
        drop(parts);
        Self::export(part, true);
    }

    pub fn down(&self, part: &str, reason: impl Into<String>) {
        self.0.lock().expect("health lock").insert(part.to_string(), Some(reason.into()));
        Self::export(part, false);
    }

    /// `/health` as a metric, so Prometheus (which scrapes `/metrics`, not `/health`) can alert on
    /// the same verdict a load balancer or systemd sees.
    fn export(part: &str, up: bool) {
        let component = crate::telemetry::component();
        metrics::gauge!("tron_health_up", "component" => component, "part" => part.to_string()).set(if up {
            1.0
        } else {
            0.0
        });
    }

    pub fn report(&self) -> (bool, serde_json::Value) {
        let parts = self.0.lock().expect("health lock");
        let down: BTreeMap<_, _> =
            parts.iter().filter_map(|(k, v)| v.as_ref().map(|r| (k.clone(), r.clone()))).collect();
        let ok = down.is_empty();
        let body = if ok {
            serde_json::json!({"status": "ok", "parts": parts.keys().collect::<Vec<_>>()})
        } else {
            serde_json::json!({"status": "unhealthy", "reasons": down})
        };
        (ok, body)
    }
}

/// Binds and serves until `shutdown` fires. Returns the bound address (port 0 picks one).
pub async fn serve(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    health: Health,
    shutdown: crate::Shutdown,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let upkeep = metrics.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            upkeep.run_upkeep();
        }
    });
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                _ = shutdown.wait() => return,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => { tracing::warn!(error = %e, "metrics listener accept failed"); continue; }
                },
            };
            let metrics = metrics.clone();
            let health = health.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let resp = respond(req.uri().path(), &metrics, &health);
                    async move { Ok::<_, std::convert::Infallible>(resp) }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
            });
        }
    });
    Ok(bound)
}

fn respond(path: &str, metrics: &PrometheusHandle, health: &Health) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match path {
        "/metrics" => (StatusCode::OK, "text/plain; version=0.0.4", metrics.render()),
        "/health" => {
            let (ok, body) = health.report();
            let status = if ok { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
            (status, "application/json", body.to_string())
        }
        _ => (StatusCode::NOT_FOUND, "text/plain", "not found: try /metrics or /health\n".to_string()),
    };
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))
        .expect("static response parts are valid")
}

//! The relay connections an agent keeps (one per relay address) and the choice of one for each
//! chunk: the connected relay with the fewest chunks waiting for an ack.
//!
//! Fewest-waiting is what spreads load by speed (a relay that acks twice as fast drains its queue
//! twice as often and gets twice the chunks) and what leaves a hung relay at once (its waiting
//! count only grows, so new chunks go elsewhere before its first ack time-out). Ties are broken
//! at random, so agents that start together do not all pick the first relay.

use super::{connection_task, Connector, Request};
use crate::destination::SendError;
use std::net::ToSocketAddrs;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tron_service::Health;

#[derive(Clone, Debug, PartialEq)]
pub enum Status {
    /// Connecting, or waiting to connect again after losing the connection.
    Connecting,
    Connected,
    /// The last connection attempt failed; the task waits with back-off before the next.
    Down(String),
}

#[derive(Debug)]
pub struct LinkState {
    status: Mutex<Status>,
    /// Chunks handed to this link and not answered yet.
    waiting: AtomicUsize,
    /// Counts connections made, so a give-up meant for a connection already dropped does not
    /// drop the next one.
    connection: AtomicU64,
    give_up_connection: AtomicU64,
    give_up: Notify,
}

impl LinkState {
    fn new() -> Self {
        LinkState {
            status: Mutex::new(Status::Connecting),
            waiting: AtomicUsize::new(0),
            connection: AtomicU64::new(0),
            give_up_connection: AtomicU64::new(0),
            give_up: Notify::new(),
        }
    }

    fn status(&self) -> Status {
        self.status.lock().expect("link status lock").clone()
    }

    pub fn set(&self, status: Status, links: &Links) {
        if status == Status::Connected {
            self.connection.fetch_add(1, Ordering::AcqRel);
        }
        *self.status.lock().expect("link status lock") = status;
        links.changed();
    }

    /// Counts a chunk as waiting on this link until the guard is dropped.
    pub fn outstanding(self: &Arc<Self>) -> Waiting {
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Waiting(self.clone())
    }

    /// A chunk sent on the current connection got no ack within `ack_timeout`: drop it.
    pub fn give_up(&self, address: &str, ack_timeout: Duration) {
        let current = self.connection.load(Ordering::Acquire);
        if self.give_up_connection.swap(current, Ordering::AcqRel) != current {
            tracing::warn!(relay = %address, ack_timeout = ?ack_timeout, "no ack within ack_timeout; leaving this relay, its chunks go to the others");
            self.give_up.notify_waiters();
        }
    }

    /// Resolves once a sender gave the current connection up.
    pub async fn given_up(&self) -> String {
        loop {
            let notified = self.give_up.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.give_up_connection.load(Ordering::Acquire) == self.connection.load(Ordering::Acquire) {
                return "no ack within ack_timeout".into();
            }
            notified.await;
        }
    }
}

pub struct Waiting(Arc<LinkState>);

impl Drop for Waiting {
    fn drop(&mut self) {
        self.0.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

pub struct Link {
    pub address: String,
    /// The name the operator wrote (`host` of `host:port`): the TLS server name when
    /// `tls_server_name` is unset, also for the addresses a name resolved to.
    pub name: String,
    pub requests: mpsc::Sender<Request>,
    pub state: Arc<LinkState>,
}

pub struct Links {
    links: Vec<Link>,
    changed: Notify,
    health: Health,
}

impl Links {
    /// One link per address, a name resolving to several addresses giving one link each (so one
    /// DNS name can stand for the whole fleet); a connection task for each.
    pub fn start(addresses: &[String], connector: Arc<Connector>, queue: usize, health: Health) -> Arc<Links> {
        let mut links = Vec::new();
        let mut receivers = Vec::new();
        for (address, name) in expand(addresses) {
            let (tx, rx) = mpsc::channel(queue);
            links.push(Link { address, name, requests: tx, state: Arc::new(LinkState::new()) });
            receivers.push(rx);
        }
        let pool = Arc::new(Links { links, changed: Notify::new(), health });
        for (link, rx) in pool.links.iter().zip(receivers) {
            let task = connection_task(
                connector.clone(),
                link.address.clone(),
                link.name.clone(),
                rx,
                link.state.clone(),
                pool.clone(),
            );
            tokio::spawn(task);
        }
        pool
    }

    fn changed(&self) {
        let statuses: Vec<Status> = self.links.iter().map(|l| l.state.status()).collect();
        let connected = statuses.iter().filter(|s| **s == Status::Connected).count();
        metrics::gauge!("tron_agent_relays_connected").set(connected as f64);
        if connected > 0 {
            self.health.up("relay");
        } else if let Some(Status::Down(why)) = statuses.iter().find(|s| matches!(s, Status::Down(_))) {
            self.health.down("relay", why.clone());
        }
        self.changed.notify_waiters();
    }

    /// The connected link with the fewest chunks waiting. With none connected: waits (at most
    /// `wait`) while some link is still connecting, and fails at once when every link's last
    /// attempt failed, so the shipper backs off as it would with one relay.
    pub async fn pick(&self, wait: Duration) -> Result<&Link, SendError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (mut best, mut connecting, mut down) = (None::<&Link>, false, None);
            let start =
                if self.links.len() > 1 { (rand::random::<u64>() % self.links.len() as u64) as usize } else { 0 };
            for i in 0..self.links.len() {
                let link = &self.links[(start + i) % self.links.len()];
                match link.state.status() {
                    Status::Connected => {
                        let load = link.state.waiting.load(Ordering::Acquire);
                        if best.is_none_or(|b| load < b.state.waiting.load(Ordering::Acquire)) {
                            best = Some(link);
                        }
                    }
                    Status::Connecting => connecting = true,
                    Status::Down(why) => down = Some(why),
                }
            }
            if let Some(link) = best {
                return Ok(link);
            }
            if !connecting {
                return Err(SendError::Unreachable(down.unwrap_or_else(|| "no relay address".into())));
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return Err(SendError::Unreachable(format!("no relay connected within {wait:?}")));
            }
        }
    }
}

/// `host:port` entries, each name replaced by every address it resolves to (deduplicated, in
/// order), with the host as written beside each. A name that does not resolve now, or resolves
/// to one address, stays as written (logs and metrics show it; it is resolved at each connection).
fn expand(addresses: &[String]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for address in addresses {
        let name = address.rsplit_once(':').map_or(address.as_str(), |(h, _)| h).trim_matches(['[', ']']).to_string();
        let resolved: Vec<String> = match address.to_socket_addrs() {
            Ok(found) => found.map(|a| a.to_string()).collect(),
            Err(_) => Vec::new(),
        };
        let entries = if resolved.len() > 1 { resolved } else { vec![address.clone()] };
        for e in entries {
            if !out.iter().any(|(a, _)| *a == e) {
                out.push((e, name.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_keeps_its_host_for_tls() {
        let expanded = expand(&["localhost:24224".to_string()]);
        assert!(!expanded.is_empty() && expanded.iter().all(|(_, name)| name == "localhost"), "{expanded:?}");
    }

    #[test]
    fn literal_addresses_stay_as_written() {
        let a = vec!["127.0.0.1:24224".to_string(), "127.0.0.2:24224".to_string(), "127.0.0.1:24224".to_string()];
        let expanded: Vec<String> = expand(&a).into_iter().map(|(address, _)| address).collect();
        assert_eq!(expanded, vec!["127.0.0.1:24224", "127.0.0.2:24224"]);
    }
}

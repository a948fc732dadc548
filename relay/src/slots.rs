//! Connection slots that one peer cannot take. There is a cap on all connections and a cap per
//! source address; at either cap the oldest connection that has not yet proven itself (completed
//! a frame, or the shared-key handshake) is closed to admit the new one. Together with the
//! deadline for a connection's first frame, a flood of silent connections cannot lock out a
//! client that talks.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

pub struct Slots {
    max_total: usize,
    max_per_address: usize,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    next_id: u64,
    /// By admission order: the first unproven entry is the oldest silent connection.
    open: BTreeMap<u64, Open>,
    per_address: HashMap<IpAddr, usize>,
}

struct Open {
    address: IpAddr,
    proven: Arc<AtomicBool>,
    evict: CancellationToken,
}

/// A connection's place; freed when dropped.
pub struct Slot {
    slots: Arc<Slots>,
    id: u64,
    proven: Arc<AtomicBool>,
    /// Cancelled when a newer connection needs this slot and this one has not proven itself.
    pub evicted: CancellationToken,
}

impl Slot {
    /// The connection completed a frame (or the handshake): it is never evicted for a newcomer.
    pub fn prove(&self) {
        self.proven.store(true, Ordering::Relaxed);
    }

    pub fn is_proven(&self) -> bool {
        self.proven.load(Ordering::Relaxed)
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut inner = self.slots.inner.lock().expect("slots lock");
        inner.remove(self.id);
    }
}

/// Why a connection was not admitted (a metrics label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    ConnectionLimit,
    AddressLimit,
}

impl Refused {
    pub fn reason(self) -> &'static str {
        match self {
            Refused::ConnectionLimit => "connection_limit",
            Refused::AddressLimit => "address_limit",
        }
    }
}

impl Inner {
    fn remove(&mut self, id: u64) -> Option<Open> {
        let open = self.open.remove(&id)?;
        if let Some(n) = self.per_address.get_mut(&open.address) {
            *n -= 1;
            if *n == 0 {
                self.per_address.remove(&open.address);
            }
        }
        Some(open)
    }

    /// Closes the oldest unproven connection (of `address`, if given). Returns whether one was.
    fn evict_oldest_silent(&mut self, address: Option<IpAddr>) -> bool {
        let victim = self
            .open
            .iter()
            .find(|(_, o)| !o.proven.load(Ordering::Relaxed) && address.is_none_or(|a| a == o.address))
            .map(|(id, _)| *id);
        match victim.and_then(|id| self.remove(id)) {
            Some(open) => {
                open.evict.cancel();
                true
            }
            None => false,
        }
    }
}

impl Slots {
    pub fn new(max_total: usize, max_per_address: usize) -> Arc<Self> {
        Arc::new(Slots { max_total, max_per_address, inner: Mutex::new(Inner::default()) })
    }

    /// Admits a connection from `address`, evicting an older silent one if a cap is reached.
    /// Returns the slot and whether a connection was evicted for it.
    pub fn admit(self: &Arc<Self>, address: IpAddr) -> Result<(Slot, bool), Refused> {
        let mut inner = self.inner.lock().expect("slots lock");
        let mut evicted = false;
        if inner.per_address.get(&address).copied().unwrap_or(0) >= self.max_per_address {
            if !inner.evict_oldest_silent(Some(address)) {
                return Err(Refused::AddressLimit);
            }
            evicted = true;
        }
        if inner.open.len() >= self.max_total {
            if !inner.evict_oldest_silent(None) {
                return Err(Refused::ConnectionLimit);
            }
            evicted = true;
        }
        let id = inner.next_id;
        inner.next_id += 1;
        let proven = Arc::new(AtomicBool::new(false));
        let evict = CancellationToken::new();
        inner.open.insert(id, Open { address, proven: proven.clone(), evict: evict.clone() });
        *inner.per_address.entry(address).or_default() += 1;
        Ok((Slot { slots: self.clone(), id, proven, evicted: evict }, evicted))
    }

    pub fn open(&self) -> usize {
        self.inner.lock().expect("slots lock").open.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([10, 0, 0, last])
    }

    #[test]
    fn at_the_cap_the_oldest_silent_connection_makes_room() {
        let slots = Slots::new(3, 3);
        let (a, _) = slots.admit(ip(1)).unwrap();
        let (b, _) = slots.admit(ip(2)).unwrap();
        let (c, _) = slots.admit(ip(3)).unwrap();
        a.prove();
        let (_d, evicted) = slots.admit(ip(4)).unwrap();
        assert!(evicted);
        assert!(!a.evicted.is_cancelled(), "a proven connection is never evicted");
        assert!(b.evicted.is_cancelled(), "the oldest silent one goes");
        assert!(!c.evicted.is_cancelled());
        assert_eq!(slots.open(), 3);
        drop(b); // the evicted connection's task ends later: its slot is not freed twice
        assert_eq!(slots.open(), 3);
    }

    #[test]
    fn when_every_connection_talks_the_newcomer_is_refused() {
        let slots = Slots::new(2, 2);
        let (a, _) = slots.admit(ip(1)).unwrap();
        let (b, _) = slots.admit(ip(2)).unwrap();
        a.prove();
        b.prove();
        assert_eq!(slots.admit(ip(3)).err(), Some(Refused::ConnectionLimit));
        drop(a);
        assert!(slots.admit(ip(3)).is_ok());
    }

    #[test]
    fn one_address_cannot_take_more_than_its_share() {
        let slots = Slots::new(100, 2);
        let (a, _) = slots.admit(ip(1)).unwrap();
        let (b, _) = slots.admit(ip(1)).unwrap();
        a.prove();
        b.prove();
        assert_eq!(slots.admit(ip(1)).err(), Some(Refused::AddressLimit));
        assert!(slots.admit(ip(2)).is_ok(), "another address is not affected");
        // A silent connection of the same address is evicted, not one of another address.
        let (c, _) = slots.admit(ip(3)).unwrap();
        drop(a);
        let (d, _) = slots.admit(ip(1)).unwrap();
        let (_e, evicted) = slots.admit(ip(1)).unwrap();
        assert!(evicted && d.evicted.is_cancelled() && !c.evicted.is_cancelled());
    }
}

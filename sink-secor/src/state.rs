//! Per-partition progress, stored beside the data so every instance (and the finalizer) can read
//! it: the committed offset, the event-time watermark, whether the partition is caught up, which
//! hours received objects, the owner, and, while a cut is being uploaded, the cut itself.
//!
//! The pending cut is what makes replays exact: it is written before any object of the cut is
//! uploaded, so an instance that takes over after a crash cuts at the same offset and rewrites
//! the same objects instead of writing differently-cut ones beside them.
//!
//! The owner claim is the fence (docs/architecture.md, "Fencing"): an instance that is assigned a
//! partition first writes the state with a new owner epoch, conditional on the generation it read.
//! Every later write of that instance is conditional on the generation of its own previous write,
//! so once another instance has claimed the partition, the old owner's writes fail with
//! [`Fenced`](crate::store::Fenced) and it gives the partition up before uploading anything.

use crate::store::{Expect, Fenced, Store};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartitionState {
    pub committed: i64,
    pub pending: Option<PendingCut>,
    /// Max event time (ms) among records below `committed` (quarantined records excluded).
    pub watermark_ms: i64,
    /// The consumer had read to the partition's end and nothing was staged when this was written.
    pub caught_up: bool,
    /// Wall clock (ms) when this was written.
    pub as_of_ms: i64,
    /// Hour (hours since epoch) → objects uploaded for it by this partition.
    pub hours: BTreeMap<i64, u64>,
    /// Who owns the partition; the epoch grows with every claim.
    #[serde(default)]
    pub owner: Owner,
    /// Source ranges written below `committed`, to drop records re-sent by agents.
    #[serde(default)]
    pub written: crate::dedupe::Written,
    /// Agents' low watermarks from watermark messages below `committed`: every record of that
    /// host with an event time before `watermark_ms` is below `committed`, so in an object.
    #[serde(default)]
    pub hosts: BTreeMap<String, HostMark>,
    /// Wall clock (ms) of the last cut that committed records with / without source positions
    /// (tron-agent / any other client): which completeness rule applies (docs/completeness.md).
    #[serde(default)]
    pub tracked_seen_ms: i64,
    #[serde(default)]
    pub untracked_seen_ms: i64,
    /// Newest Kafka timestamp (ms; the relay's receive time) among records below `committed`:
    /// how long hour counts are kept is measured from it, not from event times or the wall clock.
    #[serde(default)]
    pub newest_kafka_ms: i64,
    /// Hosts whose records (with source positions) are below `committed` but who have no report
    /// in `hosts` yet, with the Kafka time (relay clock) of the first such record: a host that
    /// just started holds hours until its first report comes (docs/completeness.md).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub hosts_unreported: BTreeMap<String, i64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct HostMark {
    pub watermark_ms: i64,
    /// When the relay last heard from the host (relay clock): the freshest report wins, and a
    /// host silent for `finalize.host_timeout` no longer holds hours back.
    pub reported_ms: i64,
    /// The host's last report said it stopped cleanly with everything delivered: once silent
    /// for `finalize.host_timeout` it holds no hour back, even when every host is silent.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub drained: bool,
}

impl HostMark {
    /// Keeps the fresher of two reports of a host.
    pub fn merge(into: &mut BTreeMap<String, HostMark>, host: &str, mark: HostMark) {
        match into.get_mut(host) {
            Some(m) if m.reported_ms >= mark.reported_ms => {}
            Some(m) => *m = mark,
            None => {
                into.insert(host.to_string(), mark);
            }
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Owner {
    pub instance: String,
    pub epoch: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingCut {
    pub from: i64,
    pub cut: i64,
}

pub fn key(prefix: &str, topic: &str, partition: i32) -> String {
    crate::join_key(prefix, &format!("_tron/state/{topic}/{partition}.json"))
}

/// For readers that do not write (the finalizer).
pub async fn read(store: &Store, prefix: &str, topic: &str, partition: i32) -> anyhow::Result<Option<PartitionState>> {
    let k = key(prefix, topic, partition);
    match store.get(&k).await? {
        Some(bytes) => Ok(Some(parse(store, &k, &bytes)?)),
        None => Ok(None),
    }
}

fn parse(store: &Store, key: &str, bytes: &[u8]) -> anyhow::Result<PartitionState> {
    serde_json::from_slice(bytes).map_err(|e| anyhow::anyhow!("{}: corrupt state: {e}", store.describe(key)))
}

/// The right to write one partition's state, held by its current owner.
#[derive(Debug)]
pub struct Claim {
    key: String,
    /// The generation of this owner's last write: the next write must find it unchanged.
    generation: i64,
}

impl Claim {
    /// Takes the partition over: reads its state and writes it back with a new owner epoch,
    /// conditional on what was read. A concurrent write (a previous owner's last heartbeat) makes
    /// the claim read again; the previous owner's next write is then refused.
    pub async fn take(
        store: &Store,
        prefix: &str,
        topic: &str,
        partition: i32,
        instance: &str,
        adjust: impl Fn(PartitionState) -> PartitionState,
    ) -> anyhow::Result<(PartitionState, Claim)> {
        let key = key(prefix, topic, partition);
        let mut last_error = None;
        for _ in 0..5 {
            let (previous, expect) = match store.get_versioned(&key).await? {
                Some((bytes, generation)) => (parse(store, &key, &bytes)?, Expect::Generation(generation)),
                None => (PartitionState::default(), Expect::Absent),
            };
            let epoch = previous.owner.epoch + 1;
            let state = PartitionState { owner: Owner { instance: instance.to_string(), epoch }, ..adjust(previous) };
            let body = serde_json::to_vec_pretty(&state).expect("state serializes");
            match store.put_if(&key, body, "application/json", expect).await {
                Ok(generation) => {
                    tracing::info!(topic, partition, epoch, "partition claimed");
                    return Ok((state, Claim { key, generation }));
                }
                Err(e) if e.downcast_ref::<Fenced>().is_some() => last_error = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last_error.expect("five attempts").context("claiming the partition: its state kept changing"))
    }

    /// Writes the state if this instance still owns it; [`Fenced`] if another instance claimed it.
    pub async fn write(&mut self, store: &Store, state: &PartitionState) -> anyhow::Result<()> {
        let body = serde_json::to_vec_pretty(state).expect("state serializes");
        self.generation =
            store.put_if(&self.key, body, "application/json", Expect::Generation(self.generation)).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_second_claim_fences_the_first_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::Dir(dir.path().to_path_buf());
        let keep = |s: PartitionState| s;
        let (mut a_state, mut a) = Claim::take(&store, "", "t", 0, "a", keep).await.unwrap();
        assert_eq!(a_state.owner.epoch, 1);
        a_state.committed = 10;
        a.write(&store, &a_state).await.unwrap();
        let (b_state, mut b) = Claim::take(&store, "", "t", 0, "b", keep).await.unwrap();
        assert_eq!((b_state.owner.epoch, b_state.committed), (2, 10));
        a_state.committed = 20;
        let err = a.write(&store, &a_state).await.unwrap_err();
        assert!(err.downcast_ref::<Fenced>().is_some(), "{err:#}");
        b.write(&store, &b_state).await.unwrap();
        let stored = read(&store, "", "t", 0).await.unwrap().unwrap();
        assert_eq!((stored.owner.instance.as_str(), stored.committed), ("b", 10));
    }
}

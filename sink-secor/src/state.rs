//! Per-partition progress, stored beside the data so every instance (and the finalizer) can read
//! it: the committed offset, the event-time watermark, whether the partition is caught up, which
//! hours received objects, and, while a cut is being uploaded, the cut itself.
//!
//! The pending cut is what makes replays exact: it is written before any object of the cut is
//! uploaded, so an instance that takes over after a crash cuts at the same offset and rewrites
//! the same objects instead of writing differently-cut ones beside them.

use crate::store::Store;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct PartitionState {
    pub committed: i64,
    pub pending: Option<PendingCut>,
    /// Max event time (ms) among records below `committed`.
    pub watermark_ms: i64,
    /// No records were waiting when this was written.
    pub caught_up: bool,
    /// Wall clock (ms) when this was written.
    pub as_of_ms: i64,
    /// Hour (hours since epoch) → objects uploaded for it by this partition.
    pub hours: BTreeMap<i64, u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PendingCut {
    pub from: i64,
    pub cut: i64,
}

pub fn key(prefix: &str, topic: &str, partition: i32) -> String {
    crate::join_key(prefix, &format!("_tron/state/{topic}/{partition}.json"))
}

pub async fn read(store: &Store, prefix: &str, topic: &str, partition: i32) -> anyhow::Result<Option<PartitionState>> {
    let k = key(prefix, topic, partition);
    match store.get(&k).await? {
        Some(bytes) => Ok(Some(
            serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: corrupt state: {e}", store.describe(&k)))?,
        )),
        None => Ok(None),
    }
}

pub async fn write(
    store: &Store,
    prefix: &str,
    topic: &str,
    partition: i32,
    state: &PartitionState,
) -> anyhow::Result<()> {
    let body = serde_json::to_vec_pretty(state).expect("state serializes");
    store.put(&key(prefix, topic, partition), body, "application/json", Default::default()).await
}

//! The dead-letter file: records Kafka can never accept, one JSON line each with the reason, the
//! tag, the peer and the record, so they are answered (acked) yet kept for an operator.

use crate::kafka::Refused;
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct DeadLetter {
    path: PathBuf,
    max_bytes: u64,
    lock: Mutex<()>,
}

impl DeadLetter {
    pub fn new(path: PathBuf, max_bytes: u64) -> Self {
        DeadLetter { path, max_bytes, lock: Mutex::new(()) }
    }

    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Appends and fsyncs the records; only then may their chunk be acked.
    pub fn write(&self, peer: SocketAddr, tag: &str, topic: &str, refused: &[Refused]) -> Result<(), String> {
        let mut text = Vec::new();
        for r in refused {
            // Rare (records Kafka can never take): parsing the JSON back costs nothing that matters.
            let record: serde_json::Value =
                serde_json::from_slice(&r.json).map_err(|e| format!("refused record: {e}"))?;
            let line = serde_json::json!({
                "reason": r.error.to_string(),
                "tag": tag,
                "topic": topic,
                "peer": peer.to_string(),
                "event_time_ns": r.time_ns,
                "record": record,
            });
            serde_json::to_writer(&mut text, &line).expect("JSON values always serialize");
            text.push(b'\n');
        }
        let _serial = self.lock.lock().expect("dead-letter lock");
        let size = std::fs::metadata(&self.path).map(|m| m.len()).unwrap_or(0);
        if size + text.len() as u64 > self.max_bytes {
            return Err(format!(
                "dead-letter file {} would pass dead_letter.max_bytes = {}; move it away",
                self.path.display(),
                self.max_bytes
            ));
        }
        let write = || -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
            file.write_all(&text)?;
            file.sync_data()
        };
        write().map_err(|e| format!("dead-letter file {}: {e}", self.path.display()))
    }
}

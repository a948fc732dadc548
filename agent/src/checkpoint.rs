//! Per-destination checkpoints: for each file identity, the byte offset up to which this
//! destination has confirmed delivery. Written atomically (temp file, fsync, rename, fsync dir),
//! so a crash leaves either the old or the new checkpoint, never a torn one.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, Default, Clone, Serialize, Deserialize, PartialEq)]
pub struct Checkpoint {
    pub version: u32,
    /// Fingerprint (hex) → position.
    pub files: BTreeMap<String, Position>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Position {
    pub offset: u64,
    /// Last path seen, for operators reading the file.
    pub path: String,
}

pub struct Checkpointer {
    path: PathBuf,
    state: Checkpoint,
    dirty: bool,
}

pub fn key(file_id: u64) -> String {
    format!("{file_id:016x}")
}

impl Checkpointer {
    pub fn open(state_dir: &Path, destination: &str) -> anyhow::Result<Self> {
        let dir = state_dir.join("checkpoints");
        std::fs::create_dir_all(&dir).map_err(|e| anyhow::anyhow!("{}: cannot create: {e}", dir.display()))?;
        let path = dir.join(format!("{destination}.json"));
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| anyhow::anyhow!("{}: corrupt checkpoint: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint { version: 1, ..Default::default() },
            Err(e) => anyhow::bail!("{}: cannot read checkpoint: {e}", path.display()),
        };
        Ok(Checkpointer { path, state, dirty: false })
    }

    /// Every file id with its saved position.
    pub fn positions(&self) -> impl Iterator<Item = (u64, &Position)> + '_ {
        self.state.files.iter().filter_map(|(k, p)| u64::from_str_radix(k, 16).ok().map(|id| (id, p)))
    }

    /// Forgets every file id `keep` says no.
    pub fn retain(&mut self, mut keep: impl FnMut(u64) -> bool) {
        let before = self.state.files.len();
        self.state.files.retain(|k, _| u64::from_str_radix(k, 16).is_ok_and(&mut keep));
        self.dirty |= self.state.files.len() != before;
    }

    pub fn get(&self, file_id: u64) -> Option<u64> {
        self.state.files.get(&key(file_id)).map(|p| p.offset)
    }

    pub fn set(&mut self, file_id: u64, offset: u64, path: &str) {
        let position = Position { offset, path: path.into() };
        if self.state.files.get(&key(file_id)) != Some(&position) {
            self.state.files.insert(key(file_id), position);
            self.dirty = true;
        }
    }

    pub fn remove(&mut self, file_id: u64) {
        self.dirty |= self.state.files.remove(&key(file_id)).is_some();
    }

    pub fn save_if_dirty(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let body = serde_json::to_vec_pretty(&self.state).expect("checkpoint serializes");
        tron_service::fs::write_atomically(&self.path, &body)?;
        self.dirty = false;
        Ok(())
    }
}

/// Written after the first scan of the agent's first start: from then on `read_from = "end"` no
/// longer applies, even if no checkpoint was ever saved (no files yet, or a crash before the save).
const STARTED_MARKER: &str = "started";

/// When the agent last ran, as the newest write of its state (checkpoints are saved at stop, the
/// marker at the first start); None for an empty state directory. Ten seconds earlier, so a file
/// rotated just before an unsaved stop still counts as rotated during the downtime.
pub fn previous_run(state_dir: &Path) -> Option<std::time::SystemTime> {
    let checkpoints = std::fs::read_dir(state_dir.join("checkpoints")).into_iter().flatten().flatten();
    let files = checkpoints.map(|e| e.path()).chain([state_dir.join(STARTED_MARKER)]);
    let newest = files.filter_map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok()).max()?;
    Some(newest - std::time::Duration::from_secs(10))
}

pub fn mark_started(state_dir: &Path) -> anyhow::Result<()> {
    let marker = state_dir.join(STARTED_MARKER);
    if !marker.exists() {
        tron_service::fs::write_atomically(&marker, b"first scan done\n")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Checkpointer::open(dir.path(), "s3").unwrap();
        c.set(7, 100, "/a.log");
        c.save_if_dirty().unwrap();
        let c2 = Checkpointer::open(dir.path(), "s3").unwrap();
        assert_eq!(c2.get(7), Some(100));
        assert_eq!(Checkpointer::open(dir.path(), "relay").unwrap().get(7), None);
    }

    #[test]
    fn a_first_start_is_an_empty_state_dir_and_only_that() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(previous_run(dir.path()), None);
        mark_started(dir.path()).unwrap();
        assert!(previous_run(dir.path()).is_some());
        let upgraded = tempfile::tempdir().unwrap(); // checkpoints from before the marker existed
        let mut c = Checkpointer::open(upgraded.path(), "relay").unwrap();
        c.set(7, 1, "/a.log");
        c.save_if_dirty().unwrap();
        assert!(previous_run(upgraded.path()).is_some());
    }

    #[test]
    fn corrupt_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("checkpoints")).unwrap();
        std::fs::write(dir.path().join("checkpoints/s3.json"), b"{not json").unwrap();
        let err = Checkpointer::open(dir.path(), "s3").err().unwrap().to_string();
        assert!(err.contains("checkpoints/s3.json: corrupt checkpoint"), "{err}");
    }
}

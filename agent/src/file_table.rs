//! The files the agent knows, by id, in `state_dir/files.json`: where each was last seen (device,
//! inode, path), the head seen of it, and whether it was shipped to its end and closed.
//!
//! An id is written here (atomically, fsynced) before any destination reads the file under it,
//! so a crash never leaves bytes shipped under an id the next start cannot find again. Closed
//! files stay listed for a day so a rotated copy of them found after a restart is recognised and
//! not shipped again under a new id.

use crate::identity::Head;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

const FILE_NAME: &str = "files.json";
const VERSION: u32 = 2;
/// How long a closed file is remembered.
pub const DONE_KEEP_SECS: u64 = 24 * 3600;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Entry {
    pub dev: u64,
    pub ino: u64,
    pub head_len: u32,
    pub head_hash: u64,
    /// Last path seen, for operators and for finding rotated siblings after a restart.
    pub path: String,
    /// Size when last seen: what is counted as lost if the file is gone unread after a restart.
    #[serde(default)]
    pub size: u64,
    /// Unix seconds when the file was shipped to its end and closed; None while it is followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub done_at: Option<u64>,
}

impl Entry {
    pub fn head(&self) -> Head {
        Head { len: self.head_len, hash: self.head_hash }
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Stored {
    version: u32,
    /// Id (16 hex digits) → entry.
    files: BTreeMap<String, Entry>,
}

pub struct FileTable {
    path: PathBuf,
    entries: BTreeMap<u64, Entry>,
    /// Whether the table was found on disk (false for an empty state directory or an agent
    /// upgraded from the first-line identity, whose checkpoints are then taken over).
    pub existed: bool,
    dirty: bool,
}

impl FileTable {
    pub fn open(state_dir: &Path) -> anyhow::Result<Self> {
        let path = state_dir.join(FILE_NAME);
        let (stored, existed) = match std::fs::read(&path) {
            Ok(bytes) => (
                serde_json::from_slice::<Stored>(&bytes)
                    .map_err(|e| anyhow::anyhow!("{}: corrupt file table: {e}", path.display()))?,
                true,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (Stored::default(), false),
            Err(e) => anyhow::bail!("{}: cannot read file table: {e}", path.display()),
        };
        let mut entries = BTreeMap::new();
        for (key, entry) in stored.files {
            let id = u64::from_str_radix(&key, 16)
                .map_err(|_| anyhow::anyhow!("{}: file id {key:?} is not 16 hex digits", path.display()))?;
            entries.insert(id, entry);
        }
        Ok(FileTable { path, entries, existed, dirty: false })
    }

    pub fn entries(&self) -> impl Iterator<Item = (u64, &Entry)> {
        self.entries.iter().map(|(id, e)| (*id, e))
    }

    #[cfg(test)]
    pub fn get(&self, id: u64) -> Option<&Entry> {
        self.entries.get(&id)
    }

    pub fn set(&mut self, id: u64, entry: Entry) {
        if self.entries.get(&id) != Some(&entry) {
            self.entries.insert(id, entry);
            self.dirty = true;
        }
    }

    /// Changes an entry in place (nothing when `id` is unknown).
    pub fn update(&mut self, id: u64, change: impl FnOnce(&mut Entry)) {
        if let Some(entry) = self.entries.get_mut(&id) {
            let before = entry.clone();
            change(entry);
            self.dirty |= *entry != before;
        }
    }

    /// Notes a file's size without making the table dirty: written with the next real change,
    /// so a growing file does not rewrite the table every scan. After a crash it is a lower bound.
    pub fn note_size(&mut self, id: u64, size: u64) {
        if let Some(entry) = self.entries.get_mut(&id) {
            entry.size = size;
        }
    }

    pub fn remove(&mut self, id: u64) {
        self.dirty |= self.entries.remove(&id).is_some();
    }

    /// Forgets closed files after [`DONE_KEEP_SECS`].
    pub fn prune(&mut self, now_secs: u64) {
        let before = self.entries.len();
        self.entries.retain(|_, e| e.done_at.is_none_or(|at| now_secs.saturating_sub(at) < DONE_KEEP_SECS));
        self.dirty |= self.entries.len() != before;
    }

    pub fn save_if_dirty(&mut self) -> std::io::Result<()> {
        if !self.dirty {
            return Ok(());
        }
        let stored = Stored {
            version: VERSION,
            files: self.entries.iter().map(|(id, e)| (crate::identity::hex(*id), e.clone())).collect(),
        };
        let body = serde_json::to_vec_pretty(&stored).expect("file table serializes");
        tron_service::fs::write_atomically(&self.path, &body)?;
        self.dirty = false;
        Ok(())
    }
}

pub fn unix_now_secs() -> u64 {
    (tron_service::clock::now_ms() / 1000).max(0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ino: u64) -> Entry {
        Entry { dev: 1, ino, head_len: 10, head_hash: 99, path: "/var/log/a.log".into(), size: 10, done_at: None }
    }

    #[test]
    fn survives_reopen_and_forgets_closed_files_after_a_day() {
        let dir = tempfile::tempdir().unwrap();
        let mut t = FileTable::open(dir.path()).unwrap();
        assert!(!t.existed);
        t.set(7, entry(1));
        t.set(8, Entry { done_at: Some(1000), ..entry(2) });
        t.save_if_dirty().unwrap();
        let mut t = FileTable::open(dir.path()).unwrap();
        assert!(t.existed);
        assert_eq!(t.get(7), Some(&entry(1)));
        t.prune(1000 + DONE_KEEP_SECS - 1);
        assert!(t.get(8).is_some());
        t.prune(1000 + DONE_KEEP_SECS);
        assert!(t.get(8).is_none() && t.get(7).is_some());
    }

    #[test]
    fn a_corrupt_table_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(FILE_NAME), b"{").unwrap();
        let err = FileTable::open(dir.path()).err().unwrap().to_string();
        assert!(err.contains("files.json: corrupt file table"), "{err}");
    }
}

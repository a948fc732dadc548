//! A followed file: its identity, the descriptor kept open so it can be read to its end after a
//! rotation or deletion, and the state the registry and the shippers share about it.

use crate::identity::Head;
use crate::parse::SourceSettings;
use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

pub struct TrackedFile {
    /// Its identity (`identity.rs`), in the file table before anything is read under it.
    pub id: u64,
    pub source: Arc<SourceSettings>,
    /// Where a destination with no checkpoint for this file starts.
    pub start_offset: u64,
    /// Per destination: offset confirmed delivered.
    acked: Vec<AtomicU64>,
    /// Rotated away and idle: a trailing line without newline is complete.
    finished: AtomicBool,
    /// The content behind this identity is gone (truncated with no copy found).
    gone: AtomicBool,
    /// Per destination: given up (rotated bytes held past `max_rotated_bytes`); not read further.
    given_up: Vec<AtomicBool>,
    /// Written to the file table: only then may a destination read it (`Registry::snapshot`).
    pub(super) published: AtomicBool,
    /// How far the head grows (`files.head_bytes`).
    head_max: usize,
    pub(super) handle: RwLock<Arc<File>>,
    pub(super) inner: Mutex<Lifecycle>,
}

pub(super) struct Lifecycle {
    pub(super) path: String,
    pub(super) dev_ino: (u64, u64),
    /// What the file began with when last checked; grows with the file up to `head_bytes`, as
    /// scans see it and as destinations read it (see [`TrackedFile::confirm_read`]).
    pub(super) head: Head,
    pub(super) at_path: bool,
    pub(super) rotated_since: Option<Instant>,
    pub(super) size: u64,
    pub(super) last_growth: Instant,
}

impl TrackedFile {
    pub fn handle(&self) -> Arc<File> {
        self.handle.read().expect("handle lock").clone()
    }

    pub fn path(&self) -> String {
        self.inner.lock().expect("lifecycle lock").path.clone()
    }

    pub fn size(&self) -> u64 {
        self.handle().metadata().map(|m| m.len()).unwrap_or(0)
    }

    /// Its content is gone (truncated with no copy found): nothing more can be read.
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::SeqCst)
    }

    pub(super) fn mark_gone(&self) {
        self.gone.store(true, Ordering::SeqCst);
    }

    /// Rotated away and idle: a trailing line without newline is complete.
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    pub(super) fn set_finished(&self, finished: bool) {
        self.finished.store(finished, Ordering::SeqCst);
    }

    /// How long since the file last grew (as the scans see it).
    pub fn quiet_for(&self) -> std::time::Duration {
        self.inner.lock().expect("lifecycle lock").last_growth.elapsed()
    }

    /// Whether destination `index` gave this (rotated) file up: it reads no more of it.
    pub fn is_given_up(&self, index: usize) -> bool {
        self.given_up[index].load(Ordering::SeqCst)
    }

    pub(super) fn give_up(&self, index: usize) {
        self.given_up[index].store(true, Ordering::SeqCst);
    }

    /// Whether `handle` still begins with what this file began with. Readers check before a
    /// read, so as not to parse what a copytruncate has already replaced.
    pub fn is_intact(&self, handle: &File) -> bool {
        let head = self.inner.lock().expect("lifecycle lock").head;
        head.matches(handle)
    }

    /// After a read of `read` at offset `from` of `handle`: whether the file still begins with
    /// its head and, within the head's reach (`files.head_bytes`), still holds the bytes read.
    /// The head then grows over them, so it is always what the destinations read there.
    ///
    /// Why the head must grow with the reads and not only with the scans: a file followed while
    /// still empty has an empty head. If a destination reads its first lines, and logrotate
    /// copies and truncates it, and the writer refills it past that size, all before the next
    /// scan, that scan would find the new content beginning with the (empty) head and no shorter
    /// than before: the file would pass for intact, and the lines written after the truncate up
    /// to the offset already read would be skipped by every destination.
    pub fn confirm_read(&self, handle: &File, from: u64, read: &[u8]) -> bool {
        let mut life = self.inner.lock().expect("lifecycle lock");
        let reach = (from.saturating_add(read.len() as u64)).min(self.head_max as u64) as usize;
        let recorded = life.head.len as usize;
        if from as usize >= reach && recorded >= reach {
            let head = life.head;
            drop(life); // the usual case: no read of the file under the lock
            return head.matches(handle); // a read past the head: the head alone tells
        }
        let mut live = Vec::new();
        let want = reach.max(recorded);
        if Head::read(handle, want, &mut live).is_err() || live.len() < want || !life.head.is_prefix_of(&live) {
            return false;
        }
        let from = from as usize;
        if from < reach && live[from..reach] != read[..reach - from] {
            return false; // rewritten since the read: what was read is not what the head will say
        }
        if reach > recorded {
            life.head = Head::of(&live[..reach]);
        }
        true
    }

    /// Records that destination `index` has everything before `offset`.
    pub fn set_acked(&self, index: usize, offset: u64) {
        self.acked[index].store(offset, Ordering::SeqCst);
    }

    /// What each destination has, in the registry's destination order (u64::MAX: given up).
    pub(super) fn acked(&self) -> impl Iterator<Item = u64> + '_ {
        self.acked.iter().zip(&self.given_up).map(|(a, g)| {
            if g.load(Ordering::SeqCst) {
                u64::MAX
            } else {
                a.load(Ordering::SeqCst)
            }
        })
    }
}

impl TrackedFile {
    pub(super) fn new(
        id: u64,
        source: Arc<SourceSettings>,
        start_offset: u64,
        destinations: usize,
        handle: File,
        life: Lifecycle,
        head_max: usize,
    ) -> Self {
        TrackedFile {
            id,
            source,
            start_offset,
            acked: (0..destinations).map(|_| AtomicU64::new(0)).collect(),
            finished: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            given_up: (0..destinations).map(|_| AtomicBool::new(false)).collect(),
            published: AtomicBool::new(false),
            head_max,
            handle: RwLock::new(Arc::new(handle)),
            inner: Mutex::new(life),
        }
    }
}

/// Where an open file is now (`… (deleted)` once unlinked), from the descriptor we hold, so logs
/// and checkpoints name a rotated file by its new name rather than the path a new file now has.
pub(super) fn current_path(file: &File) -> Option<String> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok().map(|p| p.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_file_is_found_under_its_new_name_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("app.log"), dir.path().join("app.log.1"));
        std::fs::write(&old, b"x\n").unwrap();
        let file = File::open(&old).unwrap();
        std::fs::rename(&old, &new).unwrap();
        assert_eq!(current_path(&file).as_deref(), Some(new.to_str().unwrap()));
    }
}

//! The first scan after a restart: each file the previous run had not finished is found again,
//! wherever rotation put it while the agent was down, or its unread rest is counted as lost.
//!
//! In order: the same device + inode still beginning with the head seen of it (rename rotation,
//! or nothing happened); a copy that begins with that head and holds at least what was
//! shipped (copytruncate while stopped); a compressed rotation whose content begins with it
//! (`compress` without `delaycompress`), decompressed to follow it. A state directory written
//! before the file table existed is taken over by the first-line fingerprints it is keyed by.

use super::found::Found;
use super::{gunzip, Registry};
use crate::file_table::Entry;
use crate::identity::{self, Head};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

/// What the previous run left: each destination's checkpoint per file id.
#[derive(Default)]
pub struct PreviousRun {
    /// Id → (destination, offset confirmed), for every destination with a checkpoint for it.
    pub offsets: HashMap<u64, Vec<(&'static str, u64)>>,
    /// Id → path the checkpoint names (the only way to place a legacy checkpoint).
    pub paths: BTreeMap<u64, String>,
    /// No file table was found: ids are first-line fingerprints of an older agent.
    pub legacy: bool,
}

impl PreviousRun {
    /// What every destination has of `id`: where a copy must reach at least to be it.
    fn shipped(&self, id: u64) -> u64 {
        self.offsets.get(&id).and_then(|o| o.iter().map(|(_, off)| *off).max()).unwrap_or(0)
    }

    /// Where the least advanced destination stands.
    fn resume_at(&self, id: u64) -> u64 {
        self.offsets.get(&id).and_then(|o| o.iter().map(|(_, off)| *off).min()).unwrap_or(0)
    }
}

impl Registry {
    pub(super) fn recover(&self, previous: PreviousRun, found: &mut Vec<Found>, seen: &mut HashSet<u64>) {
        if previous.legacy {
            return self.take_over_legacy(&previous, found, seen);
        }
        let open: Vec<(u64, Entry)> = {
            let table = self.table.lock().expect("table lock");
            table.entries().filter(|(_, e)| e.done_at.is_none()).map(|(id, e)| (id, e.clone())).collect()
        };
        let mut unmatched = Vec::new();
        for (id, entry) in open {
            let head = entry.head();
            let at = found.iter_mut().position(|f| !f.claimed && f.dev_ino == (entry.dev, entry.ino));
            let same = at.filter(|&i| {
                let f = &mut found[i];
                f.size >= previous.shipped(id)
                    && f.head_bytes(self.cfg.head_bytes).is_some_and(|b| head.is_prefix_of(b))
            });
            match same {
                Some(i) => self.resume(id, i, found, head, seen),
                None => unmatched.push((id, entry)),
            }
        }
        let sources = self.sources.read().expect("sources lock").clone();
        for (_, entry) in &unmatched {
            super::found::add_near(Path::new(&entry.path), &sources, found);
        }
        for (id, entry) in unmatched {
            let head = entry.head();
            let shipped = previous.shipped(id);
            if head.len > 0 {
                if let Some(i) = self.find_by_content(head, shipped, found) {
                    tracing::info!(id = %identity::hex(id), was = %entry.path, now = %found[i].path.display(), "found under another inode (copied while the agent was down)");
                    self.resume(id, i, found, head, seen);
                    continue;
                }
                if self.follow_compressed(id, &entry, previous.resume_at(id), found) {
                    continue;
                }
            }
            for (destination, offset) in previous.offsets.get(&id).into_iter().flatten() {
                self.count_lost_range(
                    destination,
                    &entry.path,
                    *offset,
                    entry.size,
                    "gone_while_stopped",
                    "file removed while the agent was stopped before this destination read it (at least this range)",
                );
            }
            tracing::info!(id = %identity::hex(id), path = %entry.path, "a file of the previous run is gone; forgotten");
            self.table.lock().expect("table lock").remove(id);
        }
    }

    /// Follows `found[i]` again under `id`, from where each destination's checkpoint says.
    fn resume(&self, id: u64, i: usize, found: &mut [Found], head: Head, seen: &mut HashSet<u64>) {
        let f = &mut found[i];
        let Some(file) = f.take_file() else { return };
        f.claimed = true;
        if f.at_path {
            seen.insert(id);
        }
        let (source, path, dev_ino, size, at_path) =
            (f.source.clone(), f.path.to_string_lossy().into_owned(), f.dev_ino, f.size, f.at_path);
        self.follow(id, &source, 0, file, path, dev_ino, head, size, at_path);
    }

    /// An unclaimed, uncompressed file that begins with `head` and holds at least `min_size`
    /// bytes; the oldest if several do (a copy is older than files written after it).
    fn find_by_content(&self, head: Head, min_size: u64, found: &mut [Found]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..found.len() {
            let f = &mut found[i];
            if f.claimed || f.is_compressed() || f.size < min_size {
                continue;
            }
            if f.head_bytes(self.cfg.head_bytes).is_some_and(|b| head.is_prefix_of(b))
                && best.is_none_or(|b| found[b].modified > found[i].modified)
            {
                best = Some(i);
            }
        }
        best
    }

    /// The rest of a file inside a gzip rotation (`app.log.1.gz`), decompressed into the state
    /// directory from the least advanced destination's position.
    fn follow_compressed(&self, id: u64, entry: &Entry, from: u64, found: &mut [Found]) -> bool {
        for f in found.iter_mut() {
            if f.claimed || !f.path.to_string_lossy().ends_with(".gz") {
                continue;
            }
            match gunzip::open_rest(&f.path, entry.head(), from, &self.state_dir) {
                Ok(Some((file, size))) => {
                    let path = f.path.to_string_lossy().into_owned();
                    tracing::info!(id = %identity::hex(id), was = %entry.path, now = %path, from, size, "found compressed by rotation; following its decompressed content");
                    f.claimed = true;
                    let source = f.source.clone();
                    self.follow(id, &source, 0, file, path, f.dev_ino, entry.head(), size, false);
                    return true;
                }
                Ok(None) => {}
                Err(e) => self.complain(&f.path, &format!("cannot decompress: {e}")),
            }
        }
        false
    }

    /// An agent upgraded from the first-line identity: each checkpoint goes to the file at the
    /// path it names if that file still has that first line, else to another with that first
    /// line and at least the bytes shipped. The old value stays the file's id, so object names,
    /// `_id`s and the sink's duplicate filter go on where they were.
    fn take_over_legacy(&self, previous: &PreviousRun, found: &mut [Found], seen: &mut HashSet<u64>) {
        let want = self.cfg.head_bytes.max(identity::LEGACY_FINGERPRINT_BYTES);
        let mut fingerprints: Vec<Option<u64>> = Vec::with_capacity(found.len());
        for f in found.iter_mut() {
            let fp = if f.is_compressed() { None } else { f.head_bytes(want).and_then(identity::legacy_fingerprint) };
            fingerprints.push(fp);
        }
        for (&id, path) in &previous.paths {
            let shipped = previous.shipped(id);
            let fits = |i: usize, f: &Found| !f.claimed && fingerprints[i] == Some(id) && f.size >= shipped;
            let at = found
                .iter()
                .enumerate()
                .position(|(i, f)| fits(i, f) && f.path.to_string_lossy() == path.as_str())
                .or_else(|| found.iter().enumerate().position(|(i, f)| fits(i, f)));
            match at {
                Some(i) => {
                    let head = Head::of(found[i].head_bytes(want).unwrap_or_default());
                    tracing::info!(id = %identity::hex(id), path = %found[i].path.display(), "checkpoint of an older agent taken over");
                    self.resume(id, i, found, head, seen);
                }
                None => {
                    tracing::warn!(id = %identity::hex(id), path, "checkpoint of an older agent names a file that is gone; its unread rest (unknown size) cannot be shipped")
                }
            }
        }
    }
}

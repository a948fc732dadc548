//! Rotation of followed files: copytruncate (and any truncation in place) detected and the copy
//! followed, files that left every matched path marked rotated, rotated files closed once every
//! destination has them, and the disk rotated files hold kept under `max_rotated_bytes`.

use super::found::Found;
use super::tracked::{current_path, TrackedFile};
use super::Registry;
use crate::identity::Head;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Instant;

impl Registry {
    /// A followed file at a matched path: still the same content (its head intact, not shorter
    /// than we saw), or truncated in place. Returns whether the file still lives at this path.
    /// While intact, the head is extended as the file grows, up to `head_bytes`.
    pub(super) fn check_truncation(&self, tf: &Arc<TrackedFile>, at: usize, found: &mut [Found]) -> bool {
        let handle = tf.handle();
        let size = found[at].size;
        let mut bytes = Vec::new();
        let read = Head::read(&handle, self.cfg.head_bytes, &mut bytes);
        let mut life = tf.inner.lock().expect("lifecycle lock");
        if read.is_err() {
            return true; // unreadable for now: decide nothing
        }
        // Destinations have read up to their acked offsets: the file held at least that much.
        let delivered = tf.acked().filter(|a| *a != u64::MAX).max().unwrap_or(0);
        if size >= life.size.max(delivered) && life.head.is_prefix_of(&bytes) {
            if size > life.size {
                life.size = size;
                life.last_growth = Instant::now();
            }
            if bytes.len() > life.head.len as usize {
                life.head = Head::of(&bytes);
            }
            // Also what the destinations' reads made of it (`TrackedFile::confirm_read`).
            let head = life.head;
            let mut table = self.table.lock().expect("table lock");
            table.update(tf.id, |e| (e.head_len, e.head_hash) = (head.len, head.hash));
            table.note_size(tf.id, size);
            return true;
        }
        let (old_size, old_head, path) = (life.size.max(delivered), life.head, found[at].path.clone());
        drop(life);
        self.by_inode.lock().expect("by_inode lock").remove(&found[at].dev_ino);
        // The rotation tool copied the file next to it first: follow the copy, so lines written
        // before the copy are not lost for a destination that had not read them yet. The copy
        // exists before the truncate, but may have been made after this scan listed the
        // directory: then the directory is listed again.
        let mut fresh: Vec<Found>;
        let copy = match self.find_copy(old_head, old_size, found) {
            Some(i) => Some(&mut found[i]),
            None => {
                let (source, first) = (found[at].source.clone(), found[at].first);
                fresh = super::found::rotated_siblings(&mut Default::default(), &path, &source, first);
                fresh.retain(|f| !found.iter().any(|known| known.path == f.path));
                self.find_copy(old_head, old_size, &mut fresh).map(|i| &mut fresh[i])
            }
        };
        if let Some(c) = copy {
            c.claimed = true;
            let copy_path = c.path.to_string_lossy().into_owned();
            if let Some(file) = c.take_file() {
                tracing::info!(path = %path.display(), copy = %copy_path, "truncated in place; following the copy for the unread rest");
                *tf.handle.write().expect("handle lock") = Arc::new(file);
                let mut life = tf.inner.lock().expect("lifecycle lock");
                life.path = copy_path.clone();
                life.dev_ino = c.dev_ino;
                life.at_path = false;
                life.rotated_since.get_or_insert_with(Instant::now);
                self.by_inode.lock().expect("by_inode lock").insert(c.dev_ino, tf.id);
                let (dev, ino) = c.dev_ino;
                self.table.lock().expect("table lock").update(tf.id, |e| {
                    (e.dev, e.ino, e.path) = (dev, ino, copy_path);
                });
                return false;
            }
        }
        tf.mark_gone();
        self.count_lost(
            tf,
            &path.display().to_string(),
            old_size,
            "truncated",
            "file truncated before this destination read it and no copy was found",
        );
        self.files.write().expect("files lock").remove(&tf.id);
        self.table.lock().expect("table lock").remove(tf.id);
        false
    }

    /// The copy of a truncated file among the rotated siblings nobody follows: it begins with the
    /// file's head and holds at least the bytes we had seen; the newest if several do.
    fn find_copy(&self, head: Head, min_size: u64, found: &mut [Found]) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..found.len() {
            let f = &mut found[i];
            if f.claimed || f.at_path || f.is_compressed() || f.size < min_size {
                continue;
            }
            if self.by_inode.lock().expect("by_inode lock").contains_key(&f.dev_ino) {
                continue;
            }
            if !f.head_bytes(self.cfg.head_bytes).is_some_and(|b| head.is_prefix_of(b)) {
                continue;
            }
            if best.is_none_or(|b| found[b].modified < found[i].modified) {
                best = Some(i);
            }
        }
        best
    }

    /// Marks files that left every matched path as rotated; closes rotated files once every
    /// destination has them (or gives up after `max_rotated_keep`, or past `max_rotated_bytes`).
    pub(super) fn retire(&self, seen: &HashSet<u64>) {
        let now = Instant::now();
        let mut drop_list = Vec::new();
        for tf in self.all_files() {
            let size = tf.size();
            let mut life = tf.inner.lock().expect("lifecycle lock");
            // A file seen at its path had its size taken in step 1, with its head checked: taken
            // again here, unchecked, it could be a truncated file's new content, too long for
            // the copy of the old one to be recognised in the next scan.
            if size > life.size && !seen.contains(&tf.id) {
                life.size = size;
                life.last_growth = now;
            }
            if seen.contains(&tf.id) {
                life.at_path = true;
                life.rotated_since = None;
                tf.set_finished(false);
                continue;
            }
            if life.at_path {
                life.at_path = false;
                life.rotated_since = Some(now);
                let moved_to = current_path(&tf.handle()).unwrap_or_else(|| life.path.clone());
                tracing::info!(path = %life.path, now = %moved_to, "file rotated or removed; reading it to the end");
                life.path = moved_to;
                let path = life.path.clone();
                self.table.lock().expect("table lock").update(tf.id, |e| e.path = path);
            }
            let rotated_for = now.duration_since(life.rotated_since.unwrap_or(now));
            let idle_for = now.duration_since(life.last_growth);
            let settled = rotated_for >= self.cfg.rotate_wait && idle_for >= self.cfg.rotate_wait;
            tf.set_finished(settled);
            let all_done = tf.acked().all(|a| a >= size);
            if settled && all_done {
                tracing::info!(path = %life.path, "rotated file fully shipped; closing");
                drop_list.push(tf.clone());
            } else if rotated_for >= self.cfg.max_rotated_keep {
                self.count_lost(
                    &tf,
                    &life.path,
                    size,
                    "rotated_given_up",
                    "giving up on rotated file after max_rotated_keep; bytes this destination had not confirmed",
                );
                drop_list.push(tf.clone());
            }
        }
        self.bound_rotated_bytes();
        if !drop_list.is_empty() {
            let mut files = self.files.write().expect("files lock");
            let mut by_inode = self.by_inode.lock().expect("by_inode lock");
            let mut table = self.table.lock().expect("table lock");
            let done_at = crate::file_table::unix_now_secs();
            for tf in drop_list {
                files.remove(&tf.id);
                by_inode.retain(|_, id| *id != tf.id);
                table.update(tf.id, |e| e.done_at = Some(done_at));
            }
        }
    }

    /// Per destination, the bytes of rotated-away files it has not finished (each holds its whole
    /// file open, on disk but out of `du`'s sight): past `max_rotated_bytes`, the oldest rotated
    /// files are given up for that destination, logged and counted.
    fn bound_rotated_bytes(&self) {
        let mut rotated: Vec<(Instant, Arc<TrackedFile>, u64, String)> = self
            .all_files()
            .into_iter()
            .filter_map(|tf| {
                let life = tf.inner.lock().expect("lifecycle lock");
                let since = life.rotated_since.filter(|_| !life.at_path)?;
                let path = life.path.clone();
                drop(life);
                let size = tf.size();
                Some((since, tf, size, path))
            })
            .collect();
        rotated.sort_by_key(|(since, ..)| *since);
        for (index, destination) in self.destinations.iter().enumerate() {
            let unfinished = |tf: &TrackedFile, size: u64| !tf.is_given_up(index) && tf.acked().nth(index) < Some(size);
            let mut held: u64 = rotated.iter().filter(|(_, tf, size, _)| unfinished(tf, *size)).map(|r| r.2).sum();
            for (_, tf, size, path) in &rotated {
                if held <= self.cfg.max_rotated_bytes {
                    break;
                }
                if !unfinished(tf, *size) {
                    continue;
                }
                let acked = tf.acked().nth(index).unwrap_or(0);
                tf.give_up(index);
                held -= size;
                self.count_lost_range(
                    destination,
                    path,
                    acked,
                    *size,
                    "rotated_over_limit",
                    "rotated files held open past files.max_rotated_bytes: giving up the oldest for this destination",
                );
            }
            metrics::gauge!("tron_agent_rotated_bytes_held", "destination" => *destination).set(held as f64);
        }
    }
}

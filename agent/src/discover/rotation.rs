//! Rotation: copytruncate detected and its copy found, files rotated away before a scan saw them
//! adopted, rotated files closed once every destination has them.

use super::scan_view::ScanView;
use super::tracked::{current_path, TrackedFile};
use super::{Registry, Source};
use crate::fingerprint;
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

impl Registry {
    /// Copytruncate shows as the same inode whose content now starts differently (or is shorter
    /// than we saw). Returns whether the identity still lives at this path.
    pub(super) fn check_truncation(&self, tf: &Arc<TrackedFile>, path: &Path) -> bool {
        let handle = tf.handle();
        let size = handle.metadata().map(|m| m.len()).unwrap_or(0);
        let head = fingerprint::of_file(&handle, self.cfg.fingerprint_bytes).ok().flatten();
        let mut life = tf.inner.lock().expect("lifecycle lock");
        if size >= life.size && head == Some(tf.fingerprint) {
            if size > life.size {
                life.size = size;
                life.last_growth = Instant::now();
            }
            return true;
        }
        let old_size = life.size;
        drop(life);
        self.by_path.lock().expect("by_path lock").remove(path);
        // The rotation tool usually copied the file next to it first: follow the copy, so lines
        // written before the copy are not lost for a destination that had not read them yet.
        if let Some((copy, copy_path, dev_ino)) = self.find_copy(path, tf.fingerprint, old_size) {
            tracing::info!(path = %path.display(), copy = %copy_path.display(), "truncated in place; following the copy for the unread rest");
            *tf.handle.write().expect("handle lock") = Arc::new(copy);
            let mut life = tf.inner.lock().expect("lifecycle lock");
            life.path = copy_path.to_string_lossy().into_owned();
            life.dev_ino = dev_ino;
            life.at_path = false;
            life.rotated_since.get_or_insert_with(Instant::now);
            return false;
        }
        tf.mark_gone();
        self.count_lost(
            tf,
            &path.display().to_string(),
            old_size,
            "truncated",
            "file truncated before this destination read it and no copy was found",
        );
        self.files.write().expect("files lock").remove(&tf.fingerprint);
        false
    }

    /// A sibling (`app.log.1`, `app.log-20261122`, …) with the same identity and at least the
    /// bytes we had seen.
    pub(super) fn find_copy(&self, path: &Path, fp: u64, min_size: u64) -> Option<(File, PathBuf, (u64, u64))> {
        let dir = path.parent()?;
        let name = path.file_name()?.to_string_lossy().into_owned();
        for entry in std::fs::read_dir(dir).ok()?.flatten() {
            let candidate = entry.path();
            let cname = entry.file_name().to_string_lossy().into_owned();
            if candidate == path || !cname.starts_with(&name) {
                continue;
            }
            let Ok(meta) = entry.metadata() else { continue };
            if !meta.is_file() || meta.len() < min_size {
                continue;
            }
            let Ok(file) = File::open(&candidate) else {
                continue;
            };
            if fingerprint::of_file(&file, self.cfg.fingerprint_bytes).ok().flatten() == Some(fp) {
                return Some((file, candidate, (meta.dev(), meta.ino())));
            }
        }
        None
    }

    /// A file rotated away before any scan saw it (`app.log` → `app.log.1` within one scan
    /// interval) would otherwise be lost. Siblings named `{name}.…`/`{name}-…` whose identity is
    /// unknown are followed to their end if they changed since the agent started, or if a
    /// checkpoint says a destination had not finished them.
    pub(super) fn adopt_rotated_siblings(
        &self,
        path: &Path,
        source: &Source,
        first: bool,
        matched: &HashSet<PathBuf>,
        view: &mut ScanView,
    ) {
        let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return };
        let name = name.to_string_lossy();
        let candidates: Vec<PathBuf> = view.names_starting_with(dir, &name).map(|(_, p)| p.clone()).collect();
        for candidate in candidates {
            let cname = candidate.file_name().unwrap_or_default().to_string_lossy().into_owned();
            let rest = &cname[name.len()..];
            if !(rest.starts_with('.') || rest.starts_with('-'))
                || [".gz", ".bz2", ".xz", ".zst", ".zip"].iter().any(|ext| cname.ends_with(ext))
                || matched.contains(&candidate)
                || source.exclude.iter().any(|p| p.matches_path(&candidate))
            {
                continue;
            }
            // Not following links, as a directory listing reports them.
            let Ok(meta) = std::fs::symlink_metadata(&candidate) else { continue };
            let dev_ino = (meta.dev(), meta.ino());
            if !meta.is_file() || view.tracked(self).contains(&dev_ino) {
                continue;
            }
            // Rotated since we last looked: since this process started, or, in the first scan,
            // since the previous run (a file written and rotated while the agent was down).
            let since = if first { self.previous_run } else { Some(self.started) };
            let recent = since.is_some_and(|t| meta.modified().is_ok_and(|m| m >= t));
            let Ok(file) = File::open(&candidate) else { continue };
            let Ok(Some(fp)) = fingerprint::of_file(&file, self.cfg.fingerprint_bytes) else { continue };
            if !(recent || self.resume.contains(&fp))
                || self.contains(fp)
                || self.finished_ids.lock().expect("finished lock").contains_key(&fp)
            {
                continue;
            }
            let path_str = candidate.to_string_lossy().into_owned();
            tracing::info!(path = %path_str, fingerprint = %format!("{fp:016x}"), "following a file rotated before it was seen");
            let tf = self.track(fp, source, 0, file, path_str, dev_ino, meta.len(), false);
            self.files.write().expect("files lock").entry(fp).or_insert(tf);
            view.tracked(self).insert(dev_ino);
        }
    }

    /// Marks files that left every matched path as rotated; closes rotated files once every
    /// destination has them (or gives up after `max_rotated_keep`).
    pub(super) fn retire(&self, seen: &HashSet<u64>) {
        let now = Instant::now();
        let mut drop_list = Vec::new();
        for tf in self.snapshot() {
            let size = tf.size();
            let mut life = tf.inner.lock().expect("lifecycle lock");
            if size > life.size {
                life.size = size;
                life.last_growth = now;
            }
            if seen.contains(&tf.fingerprint) {
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
            }
            let rotated_for = now.duration_since(life.rotated_since.unwrap_or(now));
            let idle_for = now.duration_since(life.last_growth);
            let settled = rotated_for >= self.cfg.rotate_wait && idle_for >= self.cfg.rotate_wait;
            tf.set_finished(settled);
            let all_done = tf.acked().all(|a| a >= size);
            if settled && all_done {
                tracing::info!(path = %life.path, "rotated file fully shipped; closing");
                drop_list.push(tf.fingerprint);
            } else if rotated_for >= self.cfg.max_rotated_keep {
                self.count_lost(
                    &tf,
                    &life.path,
                    size,
                    "rotated_given_up",
                    "giving up on rotated file after max_rotated_keep; bytes this destination had not confirmed",
                );
                drop_list.push(tf.fingerprint);
            }
        }
        if !drop_list.is_empty() {
            let mut files = self.files.write().expect("files lock");
            let mut finished = self.finished_ids.lock().expect("finished lock");
            finished.retain(|_, at| at.elapsed() < std::time::Duration::from_secs(24 * 3600));
            for fp in drop_list {
                files.remove(&fp);
                finished.insert(fp, Instant::now());
            }
            self.by_path.lock().expect("by_path lock").retain(|_, fp| files.contains_key(fp));
        }
    }
}

/// `app.log.1`, `app.log-20261122`, `app.log.2.gz` next to `app.log`.
pub(super) fn is_rotated_name(path: &Path, original: &Path) -> bool {
    let (Some(name), Some(base)) = (path.file_name(), original.file_name()) else {
        return false;
    };
    let (name, base) = (name.to_string_lossy(), base.to_string_lossy());
    path.parent() == original.parent()
        && name.len() > base.len()
        && name.starts_with(base.as_ref())
        && matches!(name.as_bytes()[base.len()], b'.' | b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotated_names_are_siblings_with_a_suffix() {
        let original = Path::new("/var/log/app.log");
        assert!(is_rotated_name(Path::new("/var/log/app.log.1"), original));
        assert!(is_rotated_name(Path::new("/var/log/app.log-20261122"), original));
        assert!(!is_rotated_name(Path::new("/var/log/app.logger"), original));
        assert!(!is_rotated_name(Path::new("/var/log/other.log"), original));
        assert!(!is_rotated_name(Path::new("/srv/log/app.log.1"), original));
    }
}

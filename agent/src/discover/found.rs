//! What one scan finds on disk: every path a source's globs match, and next to each the files
//! rotation leaves (`app.log.1`, `app.log-20261203`, in the same directory or the source's
//! `olddir`). All are listed and stat'ed before any is matched to a known file, so matching by
//! inode comes first and content is only used for what no inode explains.

use super::scan_view::ScanView;
use super::Source;
use crate::identity::Head;
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

/// Endings of rotated files compressed by logrotate; followed only for a known file's unread rest.
pub(super) const COMPRESSED: [&str; 5] = [".gz", ".bz2", ".xz", ".zst", ".zip"];

pub(super) struct Found {
    pub path: PathBuf,
    pub source: Arc<Source>,
    /// The source's first scan (`read_from` applies, rotated siblings since the previous run count).
    pub first: bool,
    /// At a path the globs match (false: a rotated sibling).
    pub at_path: bool,
    pub dev_ino: (u64, u64),
    pub size: u64,
    pub modified: Option<SystemTime>,
    /// Taken by a known or new file in this scan.
    pub claimed: bool,
    opened: Option<Option<(File, Vec<u8>)>>,
}

impl Found {
    /// The file opened and its first `max` bytes, read once per scan; None when it cannot be
    /// opened or the path now holds another inode (replaced since the listing).
    pub fn head_bytes(&mut self, max: usize) -> Option<&[u8]> {
        if self.opened.is_none() {
            self.opened = Some(self.open(max));
        }
        self.opened.as_ref().and_then(|o| o.as_ref()).map(|(_, bytes)| bytes.as_slice())
    }

    fn open(&self, max: usize) -> Option<(File, Vec<u8>)> {
        let file = File::open(&self.path).ok()?;
        let meta = file.metadata().ok()?;
        if (meta.dev(), meta.ino()) != self.dev_ino {
            return None;
        }
        let mut bytes = Vec::new();
        Head::read(&file, max, &mut bytes).ok()?;
        Some((file, bytes))
    }

    /// The opened file, to follow it (after [`Found::head_bytes`]).
    pub fn take_file(&mut self) -> Option<File> {
        self.opened.take().flatten().map(|(f, _)| f)
    }

    pub fn is_compressed(&self) -> bool {
        let name = self.path.to_string_lossy();
        COMPRESSED.iter().any(|ext| name.ends_with(ext))
    }

    /// Whether `self` was modified at or after `since`.
    pub fn modified_since(&self, since: Option<SystemTime>) -> bool {
        since.is_some_and(|t| self.modified.is_some_and(|m| m >= t))
    }
}

/// Everything the sources' globs match, then the rotated siblings of each match. `complain`
/// reports a matched path that is not a regular file.
pub(super) fn gather(sources: &[Arc<Source>], complain: impl Fn(&Path, &str)) -> Vec<Found> {
    let mut found: Vec<Found> = Vec::new();
    let mut paths = std::collections::HashSet::new();
    for source in sources {
        let first = !source.scanned.swap(true, std::sync::atomic::Ordering::SeqCst);
        for path in source.expand() {
            if !paths.insert(path.clone()) {
                continue;
            }
            match std::fs::metadata(&path) {
                Ok(meta) if meta.is_file() => found.push(Found::new(path, source, first, true, &meta)),
                Ok(_) => complain(&path, "not a regular file (a directory where a file was expected?); skipped"),
                Err(_) => {} // vanished between glob and stat; the next scan settles it
            }
        }
    }
    let mut view = ScanView::default();
    let matched: Vec<(PathBuf, Arc<Source>, bool)> =
        found.iter().map(|f| (f.path.clone(), f.source.clone(), f.first)).collect();
    for (path, source, first) in matched {
        for sibling in rotated_siblings(&mut view, &path, &source, first) {
            if paths.insert(sibling.path.clone()) {
                found.push(sibling);
            }
        }
    }
    found
}

/// The files rotation left next to `path`: `path.*` and `path-*`, in its directory and the
/// source's `olddir`, regular files only (links are not followed, as a listing reports them).
pub(super) fn rotated_siblings(view: &mut ScanView, path: &Path, source: &Arc<Source>, first: bool) -> Vec<Found> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name()) else { return Vec::new() };
    let name = name.to_string_lossy().into_owned();
    let dirs = std::iter::once(dir.to_path_buf()).chain(source.cfg.olddir.clone());
    let mut out = Vec::new();
    for dir in dirs {
        let siblings: Vec<PathBuf> = view
            .names_starting_with(&dir, &name)
            .filter(|(n, _)| matches!(n.as_bytes().get(name.len()), Some(b'.' | b'-')))
            .map(|(_, p)| p.clone())
            .collect();
        for sibling in siblings {
            if source.exclude.iter().any(|p| p.matches_path(&sibling)) {
                continue;
            }
            let Ok(meta) = std::fs::symlink_metadata(&sibling) else { continue };
            if meta.is_file() {
                out.push(Found::new(sibling, source, first, false, &meta));
            }
        }
    }
    out
}

/// After a restart, the files near where a file of the previous run was last seen (`dir/app.log`
/// → `dir/app*`, and the sources' `olddir`s) that the globs and their siblings did not bring:
/// the file may have been rotated, compressed or both while the agent was down, with no new
/// file at its path. Only content decides whether one of them is it.
pub(super) fn add_near(last_path: &Path, sources: &[Arc<Source>], found: &mut Vec<Found>) {
    let (Some(dir), Some(name)) = (last_path.parent(), last_path.file_name()) else { return };
    let name = name.to_string_lossy();
    let stem = name.split('.').next().unwrap_or(&name).to_string();
    let dirs = std::iter::once(dir.to_path_buf()).chain(sources.iter().filter_map(|s| s.cfg.olddir.clone()));
    let mut view = ScanView::default();
    for dir in dirs {
        let source = sources
            .iter()
            .find(|s| {
                s.cfg.olddir.as_deref() == Some(dir.as_path())
                    || s.cfg.include.iter().any(|g| Path::new(g.as_str()).parent() == Some(dir.as_path()))
            })
            .or(sources.first());
        let Some(source) = source else { return };
        let near: Vec<PathBuf> = view.names_starting_with(&dir, &stem).map(|(_, p)| p.clone()).collect();
        for path in near {
            if found.iter().any(|f| f.path == path) {
                continue;
            }
            if let Ok(meta) = std::fs::symlink_metadata(&path) {
                if meta.is_file() {
                    found.push(Found::new(path, source, false, false, &meta));
                }
            }
        }
    }
}

impl Found {
    fn new(path: PathBuf, source: &Arc<Source>, first: bool, at_path: bool, meta: &std::fs::Metadata) -> Found {
        Found {
            path,
            source: source.clone(),
            first,
            at_path,
            dev_ino: (meta.dev(), meta.ino()),
            size: meta.len(),
            modified: meta.modified().ok(),
            claimed: false,
            opened: None,
        }
    }
}

//! The set of files being tailed, keyed by content identity (fingerprint), kept open so that a
//! renamed or deleted file can still be read to its end by every destination.
//!
//! A scan (every `scan_interval`, sooner when inotify reports a change) expands the globs and
//! notices: new files, files renamed away (rotation), files whose content was replaced under the
//! same inode (copytruncate), and rotated files that every destination has finished.

use crate::config::{FilesConfig, ReadFrom, SourceConfig};
use crate::fingerprint;
use crate::parse::SourceSettings;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::watch;

pub struct TrackedFile {
    pub fingerprint: u64,
    pub source: Arc<SourceSettings>,
    /// Where a destination with no checkpoint for this file starts.
    pub start_offset: u64,
    /// Per destination: offset confirmed delivered.
    pub acked: Vec<AtomicU64>,
    /// Rotated away and idle: a trailing line without newline is complete.
    pub finished: AtomicBool,
    /// The content behind this identity is gone (truncated with no copy found).
    pub gone: AtomicBool,
    handle: RwLock<Arc<File>>,
    inner: Mutex<Lifecycle>,
}

struct Lifecycle {
    path: String,
    dev_ino: (u64, u64),
    at_path: bool,
    rotated_since: Option<Instant>,
    size: u64,
    last_growth: Instant,
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
}

struct Source {
    cfg: SourceConfig,
    settings: Arc<SourceSettings>,
    exclude: Vec<glob::Pattern>,
    /// `read_from` applies to the files a source finds in its first scan only.
    scanned: AtomicBool,
}

impl Source {
    /// A source keeps its scan state across a reload while its globs stay the same, so files
    /// that appear during the reload are read from their start like any other new file.
    fn build(cfgs: &[SourceConfig], previous: &[Arc<Source>]) -> Vec<Arc<Source>> {
        cfgs.iter()
            .map(|s| {
                let seen_before =
                    previous.iter().any(|p| p.cfg.include == s.include && p.scanned.load(Ordering::SeqCst));
                Arc::new(Source {
                    settings: Arc::new(SourceSettings::new(s)),
                    exclude: s.exclude.iter().map(|g| glob::Pattern::new(g).expect("validated")).collect(),
                    cfg: s.clone(),
                    scanned: AtomicBool::new(seen_before),
                })
            })
            .collect()
    }
}

pub struct Registry {
    sources: RwLock<Arc<Vec<Arc<Source>>>>,
    cfg: FilesConfig,
    /// Destination names, indexed like `TrackedFile::acked`.
    destinations: Vec<&'static str>,
    files: RwLock<HashMap<u64, Arc<TrackedFile>>>,
    by_path: Mutex<HashMap<PathBuf, u64>>,
    /// Paths already reported as unreadable, so the log says it once, not every scan.
    complained: Mutex<HashSet<PathBuf>>,
    generation: watch::Sender<u64>,
    started: std::time::SystemTime,
    /// When the agent last ran (None: first start, empty state). `read_from = "end"` applies only
    /// on a first start; otherwise a file found in the first scan appeared while the agent was
    /// down and is read from its beginning.
    previous_run: Option<std::time::SystemTime>,
    /// Identities some destination had not finished when the agent last stopped.
    resume: HashSet<u64>,
    /// Identities shipped and closed, so a rotated copy of them is not adopted again.
    finished_ids: Mutex<HashMap<u64, Instant>>,
}

impl Registry {
    /// `resume`: fingerprints with a checkpoint, so rotated files still being read when the agent
    /// stopped are found again under their new names.
    pub fn new(
        sources: &[SourceConfig],
        cfg: FilesConfig,
        destinations: Vec<&'static str>,
        resume: HashSet<u64>,
        previous_run: Option<std::time::SystemTime>,
    ) -> Arc<Self> {
        Arc::new(Registry {
            sources: RwLock::new(Arc::new(Source::build(sources, &[]))),
            cfg,
            destinations,
            files: RwLock::new(HashMap::new()),
            by_path: Mutex::new(HashMap::new()),
            complained: Mutex::new(HashSet::new()),
            generation: watch::channel(0).0,
            started: std::time::SystemTime::now(),
            previous_run,
            resume,
            finished_ids: Mutex::new(HashMap::new()),
        })
    }

    /// Replaces the sources (SIGHUP). Files already followed keep their settings and are read to
    /// their end; a file no glob matches any more is treated like a rotated one: finished, then
    /// closed.
    pub fn set_sources(&self, cfgs: &[SourceConfig]) {
        let mut sources = self.sources.write().expect("sources lock");
        *sources = Arc::new(Source::build(cfgs, &sources));
    }

    /// Where `name`'s position lives in `TrackedFile::acked`.
    pub fn destination_index(&self, name: &str) -> usize {
        self.destinations.iter().position(|d| *d == name).expect("destination registered at start")
    }

    /// Changes whenever files may have new data or the set of files changed.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    pub fn poke(&self) {
        self.generation.send_modify(|g| *g += 1);
    }

    pub fn snapshot(&self) -> Vec<Arc<TrackedFile>> {
        self.files.read().expect("files lock").values().cloned().collect()
    }

    /// Whether `handle` still starts with the tracked file's first line. Readers check before and
    /// after a read, so a copytruncate that lands mid-read never passes new content off as old.
    pub fn is_intact(&self, tf: &TrackedFile, handle: &File) -> bool {
        fingerprint::of_file(handle, self.cfg.fingerprint_bytes).ok().flatten() == Some(tf.fingerprint)
    }

    pub fn contains(&self, fingerprint: u64) -> bool {
        self.files.read().expect("files lock").contains_key(&fingerprint)
    }

    /// Directories to watch with inotify: the fixed prefix of every include glob.
    pub fn watch_dirs(&self) -> Vec<PathBuf> {
        let sources = self.sources.read().expect("sources lock").clone();
        let mut dirs: Vec<PathBuf> = sources
            .iter()
            .flat_map(|s| s.cfg.include.iter())
            .map(|g| {
                let fixed: PathBuf = Path::new(g)
                    .components()
                    .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
                    .collect();
                if fixed.as_os_str() == g.as_str() {
                    fixed.parent().map(Path::to_path_buf).unwrap_or(fixed)
                } else {
                    fixed
                }
            })
            .collect();
        dirs.sort();
        dirs.dedup();
        dirs
    }

    pub fn scan(&self) {
        let mut seen: HashSet<u64> = HashSet::new();
        let mut seen_paths: HashSet<PathBuf> = HashSet::new();
        let mut view = ScanView::default();
        let sources = self.sources.read().expect("sources lock").clone();
        for source in sources.iter() {
            let first = !source.scanned.swap(true, Ordering::SeqCst);
            for path in self.expand(source) {
                if seen_paths.insert(path.clone()) {
                    if let Some(fp) = self.examine(&path, source, first) {
                        seen.insert(fp);
                    }
                    self.adopt_rotated_siblings(&path, source, first, &seen_paths, &mut view);
                }
            }
        }
        self.retire(&seen);
        metrics::gauge!("tron_agent_files_tracked").set(self.files.read().expect("files lock").len() as f64);
        self.poke();
    }

    fn expand(&self, source: &Source) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for pattern in &source.cfg.include {
            let Ok(paths) = glob::glob(pattern) else {
                continue;
            };
            for path in paths.flatten() {
                if !source.exclude.iter().any(|p| p.matches_path(&path)) {
                    out.push(path);
                }
            }
        }
        out
    }

    /// Looks at one path; returns the identity it holds, if it is (now) tracked.
    fn examine(&self, path: &Path, source: &Source, first: bool) -> Option<u64> {
        let meta = match std::fs::metadata(path) {
            Ok(m) => m,
            Err(_) => return None, // vanished between glob and stat; the next scan settles it
        };
        if !meta.is_file() {
            self.complain(path, "not a regular file (a directory where a file was expected?); skipped");
            return None;
        }
        let dev_ino = (meta.dev(), meta.ino());
        let known = self.by_path.lock().expect("by_path lock").get(path).copied();
        if let Some(fp) = known {
            let tracked = self.files.read().expect("files lock").get(&fp).cloned();
            if let Some(tf) = tracked {
                if tf.inner.lock().expect("lifecycle lock").dev_ino == dev_ino {
                    return self.check_truncation(&tf, path).then_some(fp);
                }
            }
        }
        let file = match File::open(path) {
            Ok(f) => f,
            Err(e) => {
                self.complain(path, &format!("cannot open: {e}"));
                return None;
            }
        };
        self.complained.lock().expect("complained lock").remove(path);
        let fp = match fingerprint::of_file(&file, self.cfg.fingerprint_bytes) {
            Ok(Some(fp)) => fp,
            Ok(None) => return None, // no complete first line yet: wait for it
            Err(e) => {
                self.complain(path, &format!("cannot read: {e}"));
                return None;
            }
        };
        let path_str = path.to_string_lossy().into_owned();
        let mut files = self.files.write().expect("files lock");
        if let Some(tf) = files.get(&fp) {
            let mut life = tf.inner.lock().expect("lifecycle lock");
            if life.dev_ino == dev_ino {
                // The same file under a new name (rename rotation into another matched path).
                life.path = path_str;
                drop(life);
                self.by_path.lock().expect("by_path lock").insert(path.to_path_buf(), fp);
                return Some(fp);
            }
            // Another inode with the same first line: a copy of content we already follow. Named
            // like a rotated sibling it is one; elsewhere the files merely start alike, which a
            // first-line identity cannot tell apart, so say so instead of skipping it silently.
            let original = PathBuf::from(&life.path);
            drop(life);
            if !is_rotated_name(path, &original) {
                self.complain(
                    path,
                    &format!(
                        "first line identical to that of {}, which is followed: treated as a copy and not read \
                         (file identity is the first line; give the files distinct first lines)",
                        original.display()
                    ),
                );
            }
            return None;
        }
        let start_offset =
            if first && self.previous_run.is_none() && source.cfg.read_from == ReadFrom::End { meta.len() } else { 0 };
        if start_offset > 0 {
            // Logged and counted: nothing the agent decides not to ship goes unnoticed.
            tracing::info!(path = %path_str, bytes = start_offset, "read_from = \"end\" on first start: existing content not shipped");
            metrics::counter!("tron_agent_bytes_skipped_total", "reason" => "read_from_end").increment(start_offset);
        }
        tracing::info!(path = %path_str, fingerprint = %format!("{fp:016x}"), start_offset, "following file");
        let tf = self.track(fp, source, start_offset, file, path_str, dev_ino, meta.len(), true);
        files.insert(fp, tf);
        self.by_path.lock().expect("by_path lock").insert(path.to_path_buf(), fp);
        Some(fp)
    }

    /// Copytruncate shows as the same inode whose content now starts differently (or is shorter
    /// than we saw). Returns whether the identity still lives at this path.
    fn check_truncation(&self, tf: &Arc<TrackedFile>, path: &Path) -> bool {
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
        tf.gone.store(true, Ordering::SeqCst);
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
    fn find_copy(&self, path: &Path, fp: u64, min_size: u64) -> Option<(File, PathBuf, (u64, u64))> {
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

    /// A newly followed file; `at_path: false` means it is already rotated away.
    #[allow(clippy::too_many_arguments)]
    fn track(
        &self,
        fingerprint: u64,
        source: &Source,
        start_offset: u64,
        file: File,
        path: String,
        dev_ino: (u64, u64),
        size: u64,
        at_path: bool,
    ) -> Arc<TrackedFile> {
        let now = Instant::now();
        Arc::new(TrackedFile {
            fingerprint,
            source: source.settings.clone(),
            start_offset,
            acked: self.destinations.iter().map(|_| AtomicU64::new(0)).collect(),
            finished: AtomicBool::new(false),
            gone: AtomicBool::new(false),
            handle: RwLock::new(Arc::new(file)),
            inner: Mutex::new(Lifecycle {
                path,
                dev_ino,
                at_path,
                rotated_since: (!at_path).then_some(now),
                size,
                last_growth: now,
            }),
        })
    }

    /// A file rotated away before any scan saw it (`app.log` → `app.log.1` within one scan
    /// interval) would otherwise be lost. Siblings named `{name}.…`/`{name}-…` whose identity is
    /// unknown are followed to their end if they changed since the agent started, or if a
    /// checkpoint says a destination had not finished them.
    fn adopt_rotated_siblings(
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
    fn retire(&self, seen: &HashSet<u64>) {
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
                tf.finished.store(false, Ordering::SeqCst);
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
            tf.finished.store(settled, Ordering::SeqCst);
            let all_done = tf.acked.iter().all(|a| a.load(Ordering::SeqCst) >= size);
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

    /// Logs and counts, per destination, the bytes of a file it will never deliver.
    fn count_lost(&self, tf: &TrackedFile, path: &str, size: u64, reason: &'static str, what: &str) {
        for (destination, acked) in self.destinations.iter().zip(&tf.acked) {
            let lost = size.saturating_sub(acked.load(Ordering::SeqCst));
            if lost > 0 {
                tracing::warn!(path, destination, lost_bytes = lost, "{what}");
                metrics::counter!("tron_agent_lost_bytes_total", "reason" => reason, "destination" => *destination)
                    .increment(lost);
            }
        }
    }

    fn complain(&self, path: &Path, what: &str) {
        if self.complained.lock().expect("complained lock").insert(path.to_path_buf()) {
            tracing::warn!(path = %path.display(), "{what}");
            metrics::counter!("tron_agent_file_errors_total").increment(1);
        }
    }
}

/// What one scan has read of the directories and the tracked set, each read once: listing a
/// directory per file would make a scan of thousands of files in one directory quadratic.
#[derive(Default)]
struct ScanView {
    /// Per directory: (name, path), sorted by name, so siblings sharing a prefix are one range.
    listings: HashMap<PathBuf, Vec<(String, PathBuf)>>,
    tracked: Option<HashSet<(u64, u64)>>,
}

impl ScanView {
    fn names_starting_with<'a>(
        &'a mut self,
        dir: &Path,
        prefix: &'a str,
    ) -> impl Iterator<Item = &'a (String, PathBuf)> + 'a {
        let listing = self.listings.entry(dir.to_path_buf()).or_insert_with(|| {
            let mut names: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
                .map(|entries| {
                    entries.flatten().map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())).collect()
                })
                .unwrap_or_default();
            names.sort();
            names
        });
        let from = listing.partition_point(|(n, _)| n.as_str() < prefix);
        listing[from..].iter().take_while(move |(n, _)| n.starts_with(prefix))
    }

    /// (device, inode) of every tracked file, including those adopted during this scan.
    fn tracked(&mut self, registry: &Registry) -> &mut HashSet<(u64, u64)> {
        self.tracked.get_or_insert_with(|| {
            registry.snapshot().iter().map(|tf| tf.inner.lock().expect("lifecycle lock").dev_ino).collect()
        })
    }
}

/// Where an open file is now (`… (deleted)` once unlinked), from the descriptor we hold, so logs
/// and checkpoints name a rotated file by its new name rather than the path a new file now has.
fn current_path(file: &File) -> Option<String> {
    use std::os::fd::AsRawFd;
    std::fs::read_link(format!("/proc/self/fd/{}", file.as_raw_fd())).ok().map(|p| p.to_string_lossy().into_owned())
}

/// `app.log.1`, `app.log-20261122`, `app.log.2.gz` next to `app.log`.
fn is_rotated_name(path: &Path, original: &Path) -> bool {
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
    fn scan_view_lists_a_directory_once_and_finds_names_by_prefix() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["app.log", "app.log.1", "app.log-2026", "app.logger", "apple.log", "b.log"] {
            std::fs::write(dir.path().join(name), b"x\n").unwrap();
        }
        let mut view = ScanView::default();
        let names: Vec<String> = view.names_starting_with(dir.path(), "app.log").map(|(n, _)| n.clone()).collect();
        assert_eq!(names, ["app.log", "app.log-2026", "app.log.1", "app.logger"]);
        std::fs::write(dir.path().join("app.log.2"), b"x\n").unwrap();
        assert_eq!(view.names_starting_with(dir.path(), "app.log.").count(), 1, "one listing per scan");
    }

    #[test]
    fn an_open_file_is_found_under_its_new_name_after_a_rename() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (dir.path().join("app.log"), dir.path().join("app.log.1"));
        std::fs::write(&old, b"x\n").unwrap();
        let file = File::open(&old).unwrap();
        std::fs::rename(&old, &new).unwrap();
        assert_eq!(current_path(&file).as_deref(), Some(new.to_str().unwrap()));
    }

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

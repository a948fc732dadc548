//! The set of files being tailed, keyed by content identity (fingerprint), kept open so that a
//! renamed or deleted file can still be read to its end by every destination.
//!
//! A scan (every `scan_interval`, sooner when inotify reports a change) expands the globs and
//! notices: new files, files renamed away (rotation), files whose content was replaced under the
//! same inode (copytruncate), and rotated files that every destination has finished.

mod rotation;
mod scan_view;
mod tracked;

use crate::config::{FilesConfig, ReadFrom, SourceConfig};
use crate::fingerprint;
use crate::parse::SourceSettings;
use rotation::is_rotated_name;
use scan_view::ScanView;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;
use tokio::sync::watch;
use tracked::Lifecycle;
pub use tracked::TrackedFile;

pub(super) struct Source {
    cfg: SourceConfig,
    settings: Arc<SourceSettings>,
    exclude: Vec<crate::config::Glob>,
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
                    exclude: s.exclude.clone(),
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
            .map(|g| g.as_str())
            .map(|g| {
                let fixed: PathBuf = Path::new(g)
                    .components()
                    .take_while(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '[']))
                    .collect();
                if fixed.as_os_str() == g {
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
            let Ok(paths) = glob::glob(pattern.as_str()) else {
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

    /// A newly followed file; `at_path: false` means it is already rotated away.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn track(
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
        let life =
            Lifecycle { path, dev_ino, at_path, rotated_since: (!at_path).then_some(now), size, last_growth: now };
        Arc::new(TrackedFile::new(
            fingerprint,
            source.settings.clone(),
            start_offset,
            self.destinations.len(),
            file,
            life,
        ))
    }

    /// Logs and counts, per destination, the bytes of a file it will never deliver.
    pub(super) fn count_lost(&self, tf: &TrackedFile, path: &str, size: u64, reason: &'static str, what: &str) {
        for (destination, acked) in self.destinations.iter().zip(tf.acked()) {
            let lost = size.saturating_sub(acked);
            if lost > 0 {
                tracing::warn!(path, destination, lost_bytes = lost, "{what}");
                metrics::counter!("tron_agent_lost_bytes_total", "reason" => reason, "destination" => *destination)
                    .increment(lost);
            }
        }
    }

    pub(super) fn complain(&self, path: &Path, what: &str) {
        if self.complained.lock().expect("complained lock").insert(path.to_path_buf()) {
            tracing::warn!(path = %path.display(), "{what}");
            metrics::counter!("tron_agent_file_errors_total").increment(1);
        }
    }
}

//! The set of files being tailed, by identity (`identity.rs`), kept open so that a renamed or
//! deleted file can still be read to its end by every destination.
//!
//! A scan (every `scan_interval`, sooner when inotify reports a change) lists what the globs
//! match and the rotated files next to them, then decides for each what it is:
//! 1. a file already followed (same device + inode): still intact, or truncated in place
//!    (copytruncate: its copy is followed for the unread rest);
//! 2. after a restart, a file of the previous run (`recover.rs`): by inode and head, by content
//!    for a copy made while the agent was down, or inside a compressed rotation;
//! 3. a new file: a new id, written to the file table before any destination reads it.
//!
//! Then files that left every matched path are marked rotated, and rotated files every
//! destination has finished are closed (`rotation.rs`).

mod found;
mod gunzip;
mod recover;
mod rotation;
mod scan_view;
mod tracked;

use crate::config::{FilesConfig, ReadFrom, SourceConfig};
use crate::file_table::{Entry, FileTable};
use crate::identity::{self, Head};
use crate::parse::SourceSettings;
use found::Found;
pub use recover::PreviousRun;
use std::collections::{HashMap, HashSet};
use std::fs::File;
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

    fn expand(&self) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for pattern in &self.cfg.include {
            let Ok(paths) = glob::glob(pattern.as_str()) else {
                continue;
            };
            for path in paths.flatten() {
                if !self.exclude.iter().any(|p| p.matches_path(&path)) {
                    out.push(path);
                }
            }
        }
        out
    }
}

pub struct Registry {
    sources: RwLock<Arc<Vec<Arc<Source>>>>,
    cfg: FilesConfig,
    state_dir: PathBuf,
    /// Destination names, indexed like `TrackedFile::acked`.
    destinations: Vec<&'static str>,
    files: RwLock<HashMap<u64, Arc<TrackedFile>>>,
    /// Device + inode of every followed file → its id. An inode held open cannot be reused.
    by_inode: Mutex<HashMap<(u64, u64), u64>>,
    table: Mutex<FileTable>,
    /// Paths already reported as unreadable, so the log says it once, not every scan.
    complained: Mutex<HashSet<PathBuf>>,
    generation: watch::Sender<u64>,
    started: std::time::SystemTime,
    /// When the agent last ran (None: first start, empty state). `read_from = "end"` applies only
    /// on a first start; otherwise a file found in the first scan appeared while the agent was
    /// down and is read from its beginning.
    previous_run: Option<std::time::SystemTime>,
    /// What the previous run left unfinished, taken by the first scan.
    previous: Mutex<Option<PreviousRun>>,
}

impl Registry {
    pub fn new(
        sources: &[SourceConfig],
        cfg: FilesConfig,
        state_dir: &Path,
        destinations: Vec<&'static str>,
        table: FileTable,
        previous: PreviousRun,
        previous_run: Option<std::time::SystemTime>,
    ) -> Arc<Self> {
        for destination in &destinations {
            for reason in crate::LOST_REASONS {
                metrics::counter!("tron_agent_lost_bytes_total", "reason" => *reason, "destination" => *destination)
                    .absolute(0);
            }
            metrics::gauge!("tron_agent_rotated_bytes_held", "destination" => *destination).set(0.0);
        }
        Arc::new(Registry {
            sources: RwLock::new(Arc::new(Source::build(sources, &[]))),
            cfg,
            state_dir: state_dir.to_path_buf(),
            destinations,
            files: RwLock::new(HashMap::new()),
            by_inode: Mutex::new(HashMap::new()),
            table: Mutex::new(table),
            complained: Mutex::new(HashSet::new()),
            generation: watch::channel(0).0,
            started: std::time::SystemTime::now(),
            previous_run,
            previous: Mutex::new(Some(previous)),
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

    /// The followed files whose id is in the file table (only those may be read).
    pub fn snapshot(&self) -> Vec<Arc<TrackedFile>> {
        let files = self.files.read().expect("files lock");
        files.values().filter(|tf| tf.published.load(Ordering::SeqCst)).cloned().collect()
    }

    /// Every followed file, published or not.
    fn all_files(&self) -> Vec<Arc<TrackedFile>> {
        self.files.read().expect("files lock").values().cloned().collect()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.files.read().expect("files lock").get(&id).is_some_and(|tf| tf.published.load(Ordering::SeqCst))
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
        let sources = self.sources.read().expect("sources lock").clone();
        let mut found = found::gather(&sources, |path, what| self.complain(path, what));
        let mut seen: HashSet<u64> = HashSet::new();
        self.match_followed(&mut found, &mut seen);
        let previous = self.previous.lock().expect("previous lock").take();
        if let Some(previous) = previous {
            self.recover(previous, &mut found, &mut seen);
        }
        self.follow_new(&mut found, &mut seen);
        self.retire(&seen);
        self.publish();
        metrics::gauge!("tron_agent_files_tracked").set(self.files.read().expect("files lock").len() as f64);
        self.poke();
    }

    /// Step 1: paths that hold a followed file (same device + inode).
    fn match_followed(&self, found: &mut [Found], seen: &mut HashSet<u64>) {
        for i in 0..found.len() {
            let id = self.by_inode.lock().expect("by_inode lock").get(&found[i].dev_ino).copied();
            let Some(id) = id else { continue };
            let Some(tf) = self.files.read().expect("files lock").get(&id).cloned() else { continue };
            found[i].claimed = true;
            if !found[i].at_path {
                continue; // a followed file under its rotated name
            }
            if self.check_truncation(&tf, i, found) {
                seen.insert(id);
            } else {
                // The inode holds other content now: a new file in step 3.
                found[i].claimed = false;
            }
        }
    }

    /// Step 3: what is left at matched paths is new; rotated siblings left are files rotated
    /// away before a scan saw them (changed since this process started, or since the previous
    /// run in the first scan), unless they are a copy of a followed file or one already shipped.
    fn follow_new(&self, found: &mut [Found], seen: &mut HashSet<u64>) {
        for f in found.iter_mut() {
            if f.claimed || f.is_compressed() {
                continue;
            }
            if !f.at_path {
                let since = if f.first { self.previous_run } else { Some(self.started) };
                if !f.modified_since(since) {
                    continue;
                }
            }
            let Some(bytes) = f.head_bytes(self.cfg.head_bytes).map(<[u8]>::to_vec) else {
                if f.at_path {
                    self.complain(&f.path, "cannot open or read; will retry");
                }
                continue;
            };
            self.complained.lock().expect("complained lock").remove(&f.path);
            if self.is_shipped_before(f.dev_ino, &bytes) {
                f.claimed = true;
                continue;
            }
            if !f.at_path && self.is_copy_of_followed(&f.path, &bytes, f.size) {
                continue; // a copytruncate's copy before the truncate: claimed when it happens
            }
            let start_offset =
                if f.at_path && f.first && self.previous_run.is_none() && f.source.cfg.read_from == ReadFrom::End {
                    f.size
                } else {
                    0
                };
            let path_str = f.path.to_string_lossy().into_owned();
            if start_offset > 0 {
                // Logged and counted: nothing the agent decides not to ship goes unnoticed.
                tracing::info!(path = %path_str, bytes = start_offset, "read_from = \"end\" on first start: existing content not shipped");
                metrics::counter!("tron_agent_bytes_skipped_total", "reason" => "read_from_end")
                    .increment(start_offset);
            }
            let Some(file) = f.take_file() else { continue };
            f.claimed = true;
            let id = identity::new_id();
            if f.at_path {
                tracing::info!(path = %path_str, id = %identity::hex(id), start_offset, "following file");
                seen.insert(id);
            } else {
                tracing::info!(path = %path_str, id = %identity::hex(id), "following a file rotated before it was seen");
            }
            let (source, at_path, dev_ino, size) = (f.source.clone(), f.at_path, f.dev_ino, f.size);
            self.follow(id, &source, start_offset, file, path_str, dev_ino, Head::of(&bytes), size, at_path);
        }
    }

    /// A closed file (in the table as done) still on disk under a rotated name.
    fn is_shipped_before(&self, dev_ino: (u64, u64), head: &[u8]) -> bool {
        let table = self.table.lock().expect("table lock");
        let shipped = table
            .entries()
            .any(|(_, e)| e.done_at.is_some() && (e.dev, e.ino) == dev_ino && e.head().is_prefix_of(head));
        shipped
    }

    /// Whether a rotated sibling holds the beginning of a followed file of the same directory
    /// (copytruncate copies before it truncates): its head bytes equal that file's first bytes.
    /// Also when that file was truncated since step 1 found it intact and the sibling begins
    /// with its head: the next scan sees the truncate and follows the copy under the file's id
    /// (followed as a new file now, its lines would ship twice and the file's rest count as lost).
    fn is_copy_of_followed(&self, path: &Path, head: &[u8], size: u64) -> bool {
        let dir = path.parent();
        self.all_files().iter().any(|tf| {
            let life = tf.inner.lock().expect("lifecycle lock");
            if !life.at_path || Path::new(&life.path).parent() != dir {
                return false;
            }
            let (recorded, seen_size) = (life.head, life.size);
            drop(life);
            let mut theirs = Vec::new();
            if Head::read(&tf.handle(), head.len(), &mut theirs).is_err() {
                return false;
            }
            let before_the_truncate = seen_size >= size && theirs == head;
            let truncated_since = !recorded.is_prefix_of(&theirs) && recorded.is_prefix_of(head);
            before_the_truncate || truncated_since
        })
    }

    /// Starts following a file under `id`: in the table (saved by [`Registry::publish`] before any
    /// destination sees it) and in the followed set.
    #[allow(clippy::too_many_arguments)]
    fn follow(
        &self,
        id: u64,
        source: &Source,
        start_offset: u64,
        file: File,
        path: String,
        dev_ino: (u64, u64),
        head: Head,
        size: u64,
        at_path: bool,
    ) -> Arc<TrackedFile> {
        let entry = Entry {
            dev: dev_ino.0,
            ino: dev_ino.1,
            head_len: head.len,
            head_hash: head.hash,
            path: path.clone(),
            size,
            done_at: None,
        };
        self.table.lock().expect("table lock").set(id, entry);
        let now = Instant::now();
        let life = Lifecycle {
            path,
            dev_ino,
            head,
            at_path,
            rotated_since: (!at_path).then_some(now),
            size,
            last_growth: now,
        };
        let tf = Arc::new(TrackedFile::new(
            id,
            source.settings.clone(),
            start_offset,
            self.destinations.len(),
            file,
            life,
            self.cfg.head_bytes,
        ));
        self.by_inode.lock().expect("by_inode lock").insert(dev_ino, id);
        self.files.write().expect("files lock").insert(id, tf.clone());
        tf
    }

    /// Writes the file table, then lets the destinations read the files it now holds: an id is
    /// never shipped under before it is on disk. A table that cannot be written holds new files
    /// back (logged) until it can.
    fn publish(&self) {
        let mut table = self.table.lock().expect("table lock");
        table.prune(crate::file_table::unix_now_secs());
        if let Err(e) = table.save_if_dirty() {
            tracing::error!(state_dir = %self.state_dir.display(), error = %e, "cannot write the file table; new files wait");
            metrics::counter!("tron_agent_checkpoint_errors_total").increment(1);
            return;
        }
        drop(table);
        for tf in self.all_files() {
            tf.published.store(true, Ordering::SeqCst);
        }
    }

    /// Logs and counts, per destination, the bytes of a file it will never deliver.
    pub(super) fn count_lost(&self, tf: &TrackedFile, path: &str, size: u64, reason: &'static str, what: &str) {
        for (destination, acked) in self.destinations.iter().zip(tf.acked()) {
            self.count_lost_range(destination, path, acked, size, reason, what);
        }
    }

    /// Logs and counts bytes `from..to` of a file that `destination` will never deliver.
    pub(super) fn count_lost_range(
        &self,
        destination: &str,
        path: &str,
        from: u64,
        to: u64,
        reason: &'static str,
        what: &str,
    ) {
        if to > from {
            tracing::warn!(path, destination, from, to, lost_bytes = to - from, reason, "{what}");
            metrics::counter!("tron_agent_lost_bytes_total", "reason" => reason, "destination" => destination.to_string())
                .increment(to - from);
        }
    }

    pub(super) fn complain(&self, path: &Path, what: &str) {
        if self.complained.lock().expect("complained lock").insert(path.to_path_buf()) {
            tracing::warn!(path = %path.display(), "{what}");
            metrics::counter!("tron_agent_file_errors_total").increment(1);
        }
    }
}

#[cfg(test)]
mod tests;

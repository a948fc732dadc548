//! The identity rules on real files in a temporary directory: files that begin alike are never
//! one file, rotation keeps a file's id, a restart finds files again wherever rotation put them.

use super::*;
use std::io::Write;

const HEADER: &str = "time,level,msg\n";

struct Setup {
    logs: tempfile::TempDir,
    state: tempfile::TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup { logs: tempfile::tempdir().unwrap(), state: tempfile::tempdir().unwrap() }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.logs.path().join(name)
    }

    fn append(&self, name: &str, lines: std::ops::Range<u32>) {
        let mut f = std::fs::OpenOptions::new().create(true).append(true).open(self.path(name)).unwrap();
        if f.metadata().unwrap().len() == 0 {
            f.write_all(HEADER.as_bytes()).unwrap();
        }
        for i in lines {
            writeln!(f, "2026-12-03T10:00:00Z,INFO,{name} line {i}").unwrap();
        }
    }

    fn registry(&self, previous: PreviousRun, previous_run: Option<std::time::SystemTime>) -> Arc<Registry> {
        self.registry_with(FilesConfig::default(), previous, previous_run)
    }

    fn registry_with(
        &self,
        files: FilesConfig,
        previous: PreviousRun,
        previous_run: Option<std::time::SystemTime>,
    ) -> Arc<Registry> {
        let source: SourceConfig = serde_json::from_value(serde_json::json!({
            "name": "app", "tag": "app", "include": [format!("{}/*.log", self.logs.path().display())]
        }))
        .unwrap();
        let table = FileTable::open(self.state.path()).unwrap();
        let previous = PreviousRun { legacy: !table.existed, ..previous };
        Registry::new(&[source], files, self.state.path(), vec!["s3"], table, previous, previous_run)
    }
}

/// Id → path of every followed file.
fn followed(r: &Registry) -> HashMap<u64, String> {
    r.snapshot().iter().map(|tf| (tf.id, tf.path())).collect()
}

fn id_at(r: &Registry, path: &Path) -> u64 {
    let path = path.to_string_lossy();
    let ids: Vec<u64> = followed(r).into_iter().filter(|(_, p)| *p == path).map(|(id, _)| id).collect();
    assert_eq!(ids.len(), 1, "one file at {path}: {:?}", followed(r));
    ids[0]
}

#[test]
fn files_that_begin_with_the_same_line_are_different_files() {
    let s = Setup::new();
    for name in ["a.log", "b.log", "c.log"] {
        s.append(name, 0..3);
    }
    std::fs::write(s.path("empty.log"), b"").unwrap();
    std::fs::write(s.path("header-only.log"), HEADER).unwrap();
    let r = s.registry(PreviousRun::default(), None);
    r.scan();
    let ids = followed(&r);
    assert_eq!(ids.len(), 5, "{ids:?}");
    r.scan();
    assert_eq!(followed(&r), ids, "a second scan changes nothing");
}

#[test]
fn rename_rotation_keeps_the_id_and_the_new_file_with_the_same_header_gets_its_own() {
    let s = Setup::new();
    s.append("app.log", 0..10);
    let r = s.registry(PreviousRun::default(), None);
    r.scan();
    let old = id_at(&r, &s.path("app.log"));
    std::fs::rename(s.path("app.log"), s.path("app.log.1")).unwrap();
    s.append("app.log", 10..20);
    r.scan();
    assert_eq!(id_at(&r, &s.path("app.log.1")), old);
    assert_ne!(id_at(&r, &s.path("app.log")), old);
}

#[test]
fn copytruncate_follows_the_copy_even_when_the_file_starts_again_with_the_same_header() {
    let (s, r, old) = followed_app_log();
    std::fs::copy(s.path("app.log"), s.path("app.log.1")).unwrap();
    r.scan(); // a scan between the copy and the truncate: the copy is not a new file
    assert_eq!(followed(&r).len(), 1, "{:?}", followed(&r));
    truncate(&s, "app.log");
    s.append("app.log", 100..120); // longer than before: only the head tells
    r.scan();
    assert_the_copy_has_the_id(&s, &r, old);
}

/// `app.log` with ten lines, followed: the setup, the registry and the file's id.
fn followed_app_log() -> (Setup, Arc<Registry>, u64) {
    let s = Setup::new();
    s.append("app.log", 0..10);
    let r = s.registry(PreviousRun::default(), None);
    r.scan();
    let id = id_at(&r, &s.path("app.log"));
    (s, r, id)
}

/// After a copytruncate: the copy `app.log.1` holds the file's id, `app.log` is a new file.
fn assert_the_copy_has_the_id(s: &Setup, r: &Registry, id: u64) {
    assert_eq!(id_at(r, &s.path("app.log.1")), id, "the copy holds what was read: the file's id follows it");
    assert_ne!(id_at(r, &s.path("app.log")), id, "the refilled file is a new file, read from its start");
    assert_eq!(followed(r).len(), 2);
}

/// The file emptied in place (its inode kept, as a writer with O_APPEND goes on writing it).
fn truncate(s: &Setup, name: &str) {
    std::fs::OpenOptions::new().write(true).open(s.path(name)).unwrap().set_len(0).unwrap();
}

/// logrotate's copy and truncate: the copy beside the file, then the file emptied in place.
fn copy_and_truncate(s: &Setup, name: &str, copy: &str) {
    std::fs::copy(s.path(name), s.path(copy)).unwrap();
    truncate(s, name);
}

/// One scan by hand, with `between` run after step 1 (followed files checked) and before step 3
/// (new files and copies decided); `before` runs after the directories were listed.
fn scan_with(r: &Registry, before: impl FnOnce(), between: impl FnOnce()) {
    let sources = r.sources.read().unwrap().clone();
    let mut found = found::gather(&sources, |_, _| {});
    before();
    let mut seen = HashSet::new();
    r.match_followed(&mut found, &mut seen);
    between();
    r.follow_new(&mut found, &mut seen);
    r.retire(&seen);
    r.publish();
}

#[test]
fn a_file_read_while_empty_to_the_scans_then_truncated_and_refilled_before_the_next_scan_follows_its_copy() {
    let s = Setup::new();
    std::fs::write(s.path("app.log"), b"").unwrap();
    let r = s.registry(PreviousRun::default(), None);
    r.scan(); // followed empty: its head is empty
    let old = id_at(&r, &s.path("app.log"));
    s.append("app.log", 0..300);
    // A destination reads the lines before any scan sees them.
    let tf = r.snapshot().into_iter().find(|tf| tf.id == old).unwrap();
    let read = std::fs::read(s.path("app.log")).unwrap();
    assert!(tf.confirm_read(&tf.handle(), 0, &read));
    copy_and_truncate(&s, "app.log", "app.log.1");
    s.append("app.log", 1000..1700); // the same header, longer than what was read
    assert!(!tf.confirm_read(&tf.handle(), 0, &read), "what was read is no longer there");
    r.scan();
    assert_the_copy_has_the_id(&s, &r, old);
}

#[test]
fn a_truncate_between_the_steps_of_a_scan_still_follows_the_copy_under_the_files_id() {
    let (s, r, old) = followed_app_log();
    std::fs::copy(s.path("app.log"), s.path("app.log.1")).unwrap();
    let truncate_and_write = || {
        truncate(&s, "app.log");
        s.append("app.log", 100..120);
    };
    scan_with(&r, || {}, truncate_and_write); // step 1 saw the file intact, step 3 its copy
    assert_eq!(followed(&r).len(), 1, "the copy is not a new file: {:?}", followed(&r));
    r.scan();
    assert_the_copy_has_the_id(&s, &r, old);
}

#[test]
fn a_copy_made_after_the_scan_listed_the_directory_is_still_found_when_the_truncate_is_seen() {
    let (s, r, old) = followed_app_log();
    let rotate = || {
        copy_and_truncate(&s, "app.log", "app.log.1");
        s.append("app.log", 100..120);
    };
    scan_with(&r, rotate, || {});
    assert_the_copy_has_the_id(&s, &r, old);
}

#[test]
fn a_restart_finds_files_again_by_inode_by_content_and_inside_gzip() {
    let s = Setup::new();
    for name in ["kept.log", "renamed.log", "copied.log", "zipped.log", "deleted.log"] {
        s.append(name, 0..200);
    }
    let r = s.registry(PreviousRun::default(), None);
    r.scan();
    let before: HashMap<String, u64> = ["kept", "renamed", "copied", "zipped", "deleted"]
        .iter()
        .map(|n| (n.to_string(), id_at(&r, &s.path(&format!("{n}.log")))))
        .collect();
    drop(r);
    // While stopped: every destination has 100 bytes of each; then rotation of each kind.
    let mut previous = PreviousRun::default();
    for id in before.values() {
        previous.offsets.insert(*id, vec![("s3", 100)]);
    }
    std::fs::rename(s.path("renamed.log"), s.path("renamed.log.1")).unwrap();
    s.append("renamed.log", 0..5);
    std::fs::copy(s.path("copied.log"), s.path("copied.log.1")).unwrap();
    std::fs::write(s.path("copied.log"), b"").unwrap();
    s.append("copied.log", 0..5);
    let zipped = std::fs::read(s.path("zipped.log")).unwrap();
    let mut enc = flate2::write::GzEncoder::new(
        std::fs::File::create(s.path("zipped.log.1.gz")).unwrap(),
        flate2::Compression::default(),
    );
    enc.write_all(&zipped).unwrap();
    enc.finish().unwrap();
    std::fs::remove_file(s.path("zipped.log")).unwrap();
    std::fs::remove_file(s.path("deleted.log")).unwrap();
    let r = s.registry(previous, Some(std::time::SystemTime::now() - std::time::Duration::from_secs(60)));
    r.scan();
    assert_eq!(id_at(&r, &s.path("kept.log")), before["kept"]);
    assert_eq!(id_at(&r, &s.path("renamed.log.1")), before["renamed"]);
    assert_ne!(id_at(&r, &s.path("renamed.log")), before["renamed"]);
    assert_eq!(id_at(&r, &s.path("copied.log.1")), before["copied"]);
    assert_ne!(id_at(&r, &s.path("copied.log")), before["copied"]);
    assert_eq!(id_at(&r, &s.path("zipped.log.1.gz")), before["zipped"]);
    let tf = r.snapshot().into_iter().find(|tf| tf.id == before["zipped"]).unwrap();
    assert_eq!(tf.size(), zipped.len() as u64, "the decompressed content at its offsets");
    assert!(!followed(&r).contains_key(&before["deleted"]));
    assert_eq!(followed(&r).len(), 6);
}

#[test]
fn an_older_agents_checkpoints_are_taken_over_by_path_and_first_line() {
    let s = Setup::new();
    s.append("a.log", 0..10);
    s.append("b.log", 0..10); // same first line: the old agent followed only one of them
    let fp = identity::legacy_fingerprint(HEADER.as_bytes()).unwrap();
    let mut previous = PreviousRun::default();
    previous.offsets.insert(fp, vec![("s3", 50)]);
    previous.paths.insert(fp, s.path("b.log").to_string_lossy().into_owned());
    let r = s.registry(previous, Some(std::time::SystemTime::now()));
    r.scan();
    assert_eq!(id_at(&r, &s.path("b.log")), fp, "the checkpoint's own file keeps the old id");
    assert_ne!(id_at(&r, &s.path("a.log")), fp);
    assert!(s.state.path().join("files.json").exists(), "ids are on disk before anything is shipped");
}

#[test]
fn rotated_files_a_lagging_destination_holds_are_bounded_in_bytes_oldest_given_up_first() {
    let s = Setup::new();
    s.append("app.log", 0..1000);
    let size = std::fs::metadata(s.path("app.log")).unwrap().len();
    let files = FilesConfig { max_rotated_bytes: size + size / 2, ..FilesConfig::default() };
    let r = s.registry_with(files, PreviousRun::default(), None);
    r.scan();
    let first = id_at(&r, &s.path("app.log"));
    std::fs::rename(s.path("app.log"), s.path("app.log.1")).unwrap();
    s.append("app.log", 1000..2000);
    r.scan();
    let second = id_at(&r, &s.path("app.log"));
    std::fs::rename(s.path("app.log"), s.path("app.log.2")).unwrap();
    s.append("app.log", 2000..2010);
    r.scan(); // two rotated files, nothing delivered: 2 x size held, over the bound
    let by_id: HashMap<u64, Arc<TrackedFile>> = r.snapshot().into_iter().map(|tf| (tf.id, tf)).collect();
    assert!(by_id[&first].is_given_up(0), "the oldest rotated file is given up");
    assert!(!by_id[&second].is_given_up(0), "the newer one is kept: under the bound again");
}

//! What one scan has read of the directories.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// What one scan has read of the directories, each read once: listing a directory per file
/// would make a scan of thousands of files in one directory quadratic.
#[derive(Default)]
pub(super) struct ScanView {
    /// Per directory: (name, path), sorted by name, so siblings sharing a prefix are one range.
    listings: HashMap<PathBuf, Vec<(String, PathBuf)>>,
}

impl ScanView {
    pub(super) fn names_starting_with<'a>(
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
}

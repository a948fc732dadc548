//! Files that must never be seen half-written.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Writes `body` to `path` so that a reader (or a crash) sees either the old file or the whole new
/// one: a temporary file beside it, fsync, rename, then fsync of the directory so the rename
/// itself survives a power cut. Missing parent directories are created. Errors name the path.
pub fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let parent = path.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(parent) = parent {
        std::fs::create_dir_all(parent).map_err(named)?;
    }
    let mut tmp = PathBuf::from(path);
    tmp.as_mut_os_string().push(".tmp");
    {
        let mut f = std::fs::File::create(&tmp).map_err(named)?;
        f.write_all(body).map_err(named)?;
        f.sync_all().map_err(named)?;
    }
    std::fs::rename(&tmp, path).map_err(named)?;
    if let Some(parent) = parent {
        std::fs::File::open(parent).and_then(|d| d.sync_all()).map_err(named)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replaces_whole_files_and_creates_parents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/state.json");
        write_atomically(&path, b"one").unwrap();
        write_atomically(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
        assert_eq!(left.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn errors_name_the_path() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("file"), b"x").unwrap();
        let err = write_atomically(&dir.path().join("file/under-a-file"), b"x").unwrap_err();
        assert!(err.to_string().contains("under-a-file"), "{err}");
    }
}

//! What makes two sightings of a file "the same file".
//!
//! A file's identity is an id drawn at random when the agent first sees the file and written to
//! the state directory (`file_table`) before anything is shipped under it. The id keys the
//! checkpoints, the S3 object names, the records' `_id` and the sink's duplicate filter, so it
//! must be unique per file: content is not (log files of one kind begin with the same header
//! line), and neither is an inode number once its file is gone.
//!
//! A sighting is matched to a known file by device + inode (what rename rotation keeps), checked
//! against the [`Head`] seen of it so far (what an inode reused by a new file, copytruncate or a
//! truncate-and-rewrite change). Content alone is used only to find where a known file's bytes
//! went when its inode no longer holds them (the copy of a copytruncate, a compressed rotation).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// The signature of a file's first bytes: a hash of its first `len` bytes (up to `head_bytes`,
/// 4 KiB by default). It grows with the file until it reaches the limit, so two files that
/// begin alike (a CSV header, a W3C `#Software:` line, a start banner) differ as soon as their
/// first records do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Head {
    pub len: u32,
    pub hash: u64,
}

impl Head {
    /// The head of `bytes`, the first bytes of a file.
    pub fn of(bytes: &[u8]) -> Head {
        Head { len: bytes.len() as u32, hash: xxhash_rust::xxh3::xxh3_64(bytes) }
    }

    /// Reads up to `max` bytes from the start of `file`: the head they make, and the bytes.
    pub fn read(file: &File, max: usize, buf: &mut Vec<u8>) -> std::io::Result<Head> {
        buf.resize(max, 0);
        let filled = read_prefix(file, buf)?;
        buf.truncate(filled);
        Ok(Head::of(buf))
    }

    /// Whether `bytes` (a file's first bytes) begin with this head.
    pub fn is_prefix_of(&self, bytes: &[u8]) -> bool {
        let len = self.len as usize;
        len == 0 || (bytes.len() >= len && xxhash_rust::xxh3::xxh3_64(&bytes[..len]) == self.hash)
    }

    /// Whether `file` still begins with this head (reads `len` bytes).
    pub fn matches(&self, file: &File) -> bool {
        if self.len == 0 {
            return true;
        }
        let mut buf = vec![0u8; self.len as usize];
        read_prefix(file, &mut buf).is_ok_and(|n| n == buf.len()) && xxhash_rust::xxh3::xxh3_64(&buf) == self.hash
    }
}

fn read_prefix(file: &File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// A new file id: random, never 0 (0 means "none" in places).
pub fn new_id() -> u64 {
    rand::random::<u64>().max(1)
}

/// The identity agents before the file table used: a hash of the first line (or of its first
/// 256 bytes). Only read to take over the checkpoints such an agent left (`migrating.md`).
pub const LEGACY_FINGERPRINT_BYTES: usize = 256;

pub fn legacy_fingerprint(head: &[u8]) -> Option<u64> {
    let end = match memchr::memchr(b'\n', head) {
        Some(nl) if nl < LEGACY_FINGERPRINT_BYTES => nl + 1,
        _ if head.len() >= LEGACY_FINGERPRINT_BYTES => LEGACY_FINGERPRINT_BYTES,
        _ => return None,
    };
    Some(xxhash_rust::xxh3::xxh3_64(&head[..end]).max(1))
}

/// `id` as written in checkpoints, object names and chunk sources.
pub fn hex(id: u64) -> String {
    format!("{id:016x}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_is_a_prefix_check_that_tells_files_with_the_same_header_apart() {
        let a = b"time,level,msg\n2026-12-03T10:00:00Z,INFO,started\n";
        let b = b"time,level,msg\n2026-12-03T10:00:01Z,INFO,started\n";
        let head = Head::of(a);
        assert!(head.is_prefix_of(a));
        assert!(head.is_prefix_of(&[&a[..], b"more\n"].concat()));
        assert!(!head.is_prefix_of(b), "same header, different first record");
        assert!(!head.is_prefix_of(&a[..10]), "a shorter file does not hold the head");
        assert!(Head::default().is_prefix_of(b"anything"), "an empty head says nothing");
    }

    #[test]
    fn ids_are_distinct_and_legacy_fingerprints_are_what_old_agents_wrote() {
        assert_ne!(new_id(), new_id());
        // The value agents up to 0a55d3d computed (fingerprint.rs: xxh3 of the first line).
        assert_eq!(legacy_fingerprint(b"line one\nmore"), Some(xxhash_rust::xxh3::xxh3_64(b"line one\n").max(1)));
        assert_eq!(legacy_fingerprint(b"abc"), None);
        assert_eq!(legacy_fingerprint(&[b'x'; 300]), legacy_fingerprint(&[b'x'; 256]));
    }
}

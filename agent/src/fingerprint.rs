//! A file's identity: a hash of its first line (or of its first `max_bytes` bytes when that line
//! is longer). Paths and inode numbers are reused by rotation; content is not.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// `None` while the file does not yet hold a complete first line (or `max_bytes` bytes): such a
/// file is waited for, not read, so it cannot be mistaken for another short file.
pub fn of_file(file: &File, max_bytes: usize) -> std::io::Result<Option<u64>> {
    let mut head = vec![0u8; max_bytes];
    let mut filled = 0;
    while filled < head.len() {
        let n = file.read_at(&mut head[filled..], filled as u64)?;
        if n == 0 {
            break;
        }
        filled += n;
    }
    Ok(of_head(&head[..filled], max_bytes))
}

pub fn of_head(head: &[u8], max_bytes: usize) -> Option<u64> {
    let end = match head.iter().position(|&b| b == b'\n') {
        Some(nl) => nl + 1,
        None if head.len() >= max_bytes => max_bytes,
        None => return None,
    };
    // Never 0, so 0 can mean "no identity" elsewhere.
    Some(xxhash_rust::xxh3::xxh3_64(&head[..end]).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_line_defines_identity() {
        assert_eq!(of_head(b"abc", 256), None);
        let a = of_head(b"line one\nmore", 256).unwrap();
        assert_eq!(of_head(b"line one\nother tail", 256), Some(a));
        assert_ne!(of_head(b"line two\n", 256), Some(a));
        assert_eq!(of_head(&[b'x'; 300], 256), of_head(&[b'x'; 256], 256));
    }
}

//! A followed file that rotation compressed while the agent was down (`mv app.log app.log.1 &&
//! gzip app.log.1`) still holds its unread rest, inside the `.gz`. It is decompressed into an
//! unlinked file in the state directory at the offsets it had, so the readers, checkpoints and
//! ids work on it as on the original: the head is written (readers check it), the bytes every
//! destination already has are skipped (a hole, no disk), the rest is written in place.

use crate::identity::Head;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// The decompressed content of `gz` from `from` on, and its size, if it begins with `head`.
pub(super) fn open_rest(gz: &Path, head: Head, from: u64, state_dir: &Path) -> std::io::Result<Option<(File, u64)>> {
    let mut decoder = flate2::read::MultiGzDecoder::new(std::io::BufReader::new(File::open(gz)?));
    let mut first = vec![0u8; head.len as usize];
    let mut filled = 0;
    while filled < first.len() {
        match decoder.read(&mut first[filled..]) {
            Ok(0) => return Ok(None),
            Ok(n) => filled += n,
            Err(e) if filled == 0 && e.kind() == std::io::ErrorKind::InvalidInput => return Ok(None), // not gzip
            Err(e) => return Err(e),
        }
    }
    if !head.is_prefix_of(&first) {
        return Ok(None);
    }
    let temp = state_dir.join(format!("gunzip-{:016x}.tmp", rand::random::<u64>()));
    let out = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&temp)?;
    // Unlinked at once: the descriptor is the only reference, so nothing is left behind by a
    // crash, and the space is freed when the file is closed.
    std::fs::remove_file(&temp)?;
    out.write_all_at(&first, 0)?;
    let mut pos = first.len() as u64;
    let mut buf = vec![0u8; 256 << 10];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let end = pos + n as u64;
        if end > from {
            let start = pos.max(from);
            out.write_all_at(&buf[(start - pos) as usize..n], start)?;
        }
        pos = end;
    }
    out.set_len(pos)?;
    Ok(Some((out, pos)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn the_rest_is_at_its_offsets_and_the_shipped_part_is_a_hole() {
        let dir = tempfile::tempdir().unwrap();
        let text: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        let gz = dir.path().join("app.log.1.gz");
        let mut enc = flate2::write::GzEncoder::new(File::create(&gz).unwrap(), flate2::Compression::fast());
        enc.write_all(text.as_bytes()).unwrap();
        enc.finish().unwrap();
        let head = Head::of(&text.as_bytes()[..4096]);
        let (file, size) = open_rest(&gz, head, 100_000, dir.path()).unwrap().unwrap();
        assert_eq!(size, text.len() as u64);
        let mut rest = vec![0u8; text.len() - 100_000];
        file.read_exact_at(&mut rest, 100_000).unwrap();
        assert_eq!(rest, &text.as_bytes()[100_000..]);
        assert!(head.matches(&file), "readers' head check passes");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "the temporary file is unlinked");
        let other = Head::of(b"something else entirely\n");
        assert!(open_rest(&gz, other, 0, dir.path()).unwrap().is_none());
    }
}

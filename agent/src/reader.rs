//! Reads complete lines from a file at an offset with positioned reads, so every destination can
//! read the same open file at its own pace without sharing a seek position.

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Bytes read past the budget to finish the line that crosses it (longer lines are finished by
/// the next read).
const CROSSING_LINE: usize = 16 * 1024;

pub struct ReadOutcome {
    /// Offset just past the last byte consumed (a full line, or a split part).
    pub next_offset: u64,
    pub bytes_read: usize,
    /// Lines longer than `max_line` that were cut into parts.
    pub splits: u64,
}

/// Calls `on_line(offset, line, end_offset)` for each complete line from `offset`, stopping once
/// `budget` bytes were consumed. A line longer than `max_line` is cut into `max_line`-byte parts
/// (counted in `splits`). With `eof_ends_line`, a trailing line without newline is complete
/// too (the file is finished: rotated away and idle).
pub fn read_lines(
    file: &File,
    offset: u64,
    budget: usize,
    max_line: usize,
    eof_ends_line: bool,
    buf: &mut Vec<u8>,
    mut on_line: impl FnMut(u64, &[u8], u64),
) -> std::io::Result<ReadOutcome> {
    let mut splits = 0;
    // At most 1 MiB a call: the lines read become records held until they are encoded, so the
    // window, not the batch size (32 MiB for the archive), bounds that memory; the caller loops.
    // Plus room for the line that crosses the budget, so that it is usually whole in the buffer
    // and the read ends past it (where every destination's shared reads end), instead of a second
    // read of 64 KiB for that one line.
    let mut want = budget.clamp(64 * 1024, 1 << 20) + CROSSING_LINE;
    loop {
        buf.resize(want, 0);
        let filled = read_full(file, offset, buf)?;
        let at_eof = filled < want;
        let data = &buf[..filled];
        let mut pos = 0usize;
        while pos < data.len() && pos < budget {
            let rest = &data[pos..];
            match memchr::memchr(b'\n', rest) {
                Some(nl) if nl <= max_line => {
                    let line = rest[..nl].strip_suffix(b"\r").unwrap_or(&rest[..nl]);
                    on_line(offset + pos as u64, line, offset + (pos + nl + 1) as u64);
                    pos += nl + 1;
                }
                _ if rest.len() >= max_line => {
                    splits += 1;
                    on_line(offset + pos as u64, &rest[..max_line], offset + (pos + max_line) as u64);
                    pos += max_line;
                }
                None if at_eof && eof_ends_line => {
                    let line = rest.strip_suffix(b"\r").unwrap_or(rest);
                    on_line(offset + pos as u64, line, offset + data.len() as u64);
                    pos = data.len();
                }
                _ => break,
            }
        }
        // Nothing consumed although the buffer was full: the first line is longer than what we
        // read but within max_line. Read enough to hold it.
        if pos == 0 && !at_eof && want < max_line + 1 {
            want = max_line + 1;
            continue;
        }
        return Ok(ReadOutcome { next_offset: offset + pos as u64, bytes_read: pos, splits });
    }
}

fn read_full(file: &File, offset: u64, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match file.read_at(&mut buf[filled..], offset + filled as u64) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn collect(
        content: &[u8],
        offset: u64,
        budget: usize,
        max_line: usize,
        eof: bool,
    ) -> (Vec<(u64, String, u64)>, u64, usize) {
        let mut f = tempfile::tempfile().unwrap();
        f.write_all(content).unwrap();
        let mut lines = Vec::new();
        let out = read_lines(&f, offset, budget, max_line, eof, &mut Vec::new(), |o, l, e| {
            lines.push((o, String::from_utf8_lossy(l).into_owned(), e))
        })
        .unwrap();
        (lines, out.next_offset, out.splits as usize)
    }

    #[test]
    fn complete_lines_only_and_partial_tail_waits() {
        let (lines, next, _) = collect(b"a\nbb\r\nccc", 0, 1 << 20, 100, false);
        assert_eq!(lines, vec![(0, "a".into(), 2), (2, "bb".into(), 6)]);
        assert_eq!(next, 6);
        let (lines, next, _) = collect(b"a\nbb\r\nccc", 6, 1 << 20, 100, true);
        assert_eq!(lines, vec![(6, "ccc".into(), 9)]);
        assert_eq!(next, 9);
    }

    #[test]
    fn long_lines_are_split_not_dropped() {
        let mut content = vec![b'x'; 250];
        content.push(b'\n');
        let (lines, next, splits) = collect(&content, 0, 1 << 20, 100, false);
        assert_eq!(splits, 2);
        assert_eq!(lines.iter().map(|l| l.1.len()).collect::<Vec<_>>(), vec![100, 100, 50]);
        assert_eq!(next, 251);
    }

    #[test]
    fn line_longer_than_first_read_is_still_read_whole() {
        let mut content = vec![b'y'; 200_000];
        content.push(b'\n');
        let (lines, next, splits) = collect(&content, 0, 10, 1 << 20, false);
        assert_eq!((lines.len(), lines[0].1.len(), next, splits), (1, 200_000, 200_001, 0));
    }

    #[test]
    fn budget_stops_reading_at_a_line_boundary() {
        let (lines, next, _) = collect(b"aaaa\nbbbb\ncccc\n", 0, 6, 100, false);
        assert_eq!(lines.len(), 2);
        assert_eq!(next, 10);
    }

    /// A shared read's budget ends on the 1 MiB grid, mid-line: the read ends at that line's end,
    /// where a read from any other offset before the grid ends too.
    #[test]
    fn a_read_ends_past_the_line_that_crosses_a_megabyte_budget() {
        let line = [b"x".repeat(214), b"\n".to_vec()].concat();
        let content: Vec<u8> = line.iter().copied().cycle().take(line.len() * 10_000).collect();
        let (lines, next, _) = collect(&content, 0, 1 << 20, 1 << 20, false);
        let crossing_end = ((1u64 << 20) / 215 + 1) * 215;
        assert_eq!((lines.len() as u64, next), (crossing_end / 215, crossing_end));
    }
}

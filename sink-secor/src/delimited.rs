//! CSV/TSV rows as RFC 4180 writes them, gathered in one buffer that goes to the compressor a
//! block at a time.
//!
//! Written here rather than by the csv crate's writer (which the audit still reads with): a JSON
//! cell doubles two quotes for every key and string, and the crate's loop searched for the next
//! quote with one call per quote, then copied the cell a second time into its own buffer. That was
//! about a tenth of the CSV sink's CPU; this finds quotes sixteen bytes at a time (eight where
//! there is no SSE2) and writes each cell once.

use std::io::Write;
#[cfg(target_arch = "x86_64")]
use tron_service::sse2;
use tron_service::swar;

pub struct DelimitedRows<W: Write> {
    out: W,
    rows: Vec<u8>,
    /// Gathered rows go to `out` once they pass this size.
    block: usize,
    delimiter: u8,
    /// Where the current row starts in `rows` (a row that added nothing is one empty cell).
    row_start: usize,
    /// Whether the current row has a cell yet, so the next one follows a delimiter.
    row_has_cell: bool,
}

impl<W: Write> DelimitedRows<W> {
    pub fn new(out: W, delimiter: u8, block: usize) -> Self {
        DelimitedRows {
            out,
            rows: Vec::with_capacity(block + 4096),
            block,
            delimiter,
            row_start: 0,
            row_has_cell: false,
        }
    }

    /// Appends a cell to the current row, in quotes (each quote doubled) when it holds the
    /// delimiter, a quote or a line break; returns the bytes it took, delimiter included.
    pub fn cell(&mut self, cell: &[u8]) -> usize {
        let before = self.rows.len();
        if self.row_has_cell {
            self.rows.push(self.delimiter);
        }
        self.row_has_cell = true;
        if needs_quotes(cell, self.delimiter) {
            quote_into(cell, &mut self.rows);
        } else {
            self.rows.extend_from_slice(cell);
        }
        self.rows.len() - before
    }

    /// Ends the row; hands the gathered rows to `out` when they fill a block.
    pub fn end_row(&mut self) -> std::io::Result<usize> {
        let mut size = 1;
        // A row of one empty cell would be an empty line, which loaders skip: it is written `""`.
        if self.rows.len() == self.row_start {
            self.rows.extend_from_slice(b"\"\"");
            size += 2;
        }
        self.rows.push(b'\n');
        self.row_has_cell = false;
        if self.rows.len() >= self.block {
            self.out.write_all(&self.rows)?;
            self.rows.clear();
        }
        self.row_start = self.rows.len();
        Ok(size)
    }

    /// The writer, with every row ended so far written to it.
    pub fn into_inner(mut self) -> std::io::Result<W> {
        self.out.write_all(&self.rows)?;
        Ok(self.out)
    }
}

/// Whether the cell holds the delimiter, a quote or a line break: a block at a time, in one
/// pass (two memchr calls per cell, for four bytes, cost more on cells of a few dozen bytes).
fn needs_quotes(cell: &[u8], delimiter: u8) -> bool {
    let mut at = 0;
    while let Some((width, special)) = special_in_block(cell, at, delimiter) {
        if special {
            return true;
        }
        at += width;
    }
    cell[at..].iter().any(|&b| b == delimiter || b == b'"' || b == b'\n' || b == b'\r')
}

/// Whether the block at `at` holds the delimiter, a quote or a line break, and its width:
/// sixteen bytes with SSE2 (every x86-64), else eight; `None` when fewer than eight are left.
#[inline]
fn special_in_block(cell: &[u8], at: usize, delimiter: u8) -> Option<(usize, bool)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(block) = sse2::Block::at(cell, at) {
        let special = block.equal(delimiter).or(block.equal(b'"')).or(block.equal(b'\n')).or(block.equal(b'\r'));
        return Some((16, special.bits() != 0));
    }
    let word = swar::word_at(cell, at)?;
    let special =
        swar::equal(word, delimiter) | swar::equal(word, b'"') | swar::equal(word, b'\n') | swar::equal(word, b'\r');
    Some((8, special != 0))
}

/// The index of the first quote in the block at `from`, and the block's width: sixteen bytes
/// with SSE2 (every x86-64), else eight; `None` when fewer than eight are left.
#[inline]
fn quote_in_block(cell: &[u8], from: usize) -> Option<(usize, Option<usize>)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(block) = sse2::Block::at(cell, from) {
        let quotes = block.equal(b'"').bits();
        return Some((16, (quotes != 0).then(|| quotes.trailing_zeros() as usize)));
    }
    let word = swar::word_at(cell, from)?;
    Some((8, swar::first(swar::equal(word, b'"'))))
}

/// The blocks of `cell` from `from` that have another sixteen bytes after them, quoted into
/// `room` from `to`; returns where the next block starts in each.
///
/// A block is copied whole, then, for each of its quotes in turn, the sixteen bytes after that
/// quote are written again one byte further on, behind the doubled quote. The quotes are taken
/// from one mask of the block: a JSON cell has a quote every few bytes, and finding each one
/// with a fresh load and compare (what [`quote_in_block`] does) made every quote wait for the
/// one before it. A write may reach past the block, into bytes the next block overwrites;
/// `room` holds them: the farthest is `to + 48`, within the `2 * cell.len() + 2` it has, since
/// `to <= 2 * from + 1` and `from + 32 <= cell.len()`.
#[cfg(target_arch = "x86_64")]
#[inline]
fn quote_blocks_followed_by_a_block(cell: &[u8], room: &mut [u8], mut from: usize, mut to: usize) -> (usize, usize) {
    while from + 32 <= cell.len() {
        let Some(block) = sse2::Block::at(cell, from) else { break };
        let mut quotes = block.equal(b'"').bits();
        room[to..to + 16].copy_from_slice(&cell[from..from + 16]);
        let mut doubled = 0;
        while quotes != 0 {
            let at = quotes.trailing_zeros() as usize;
            quotes &= quotes - 1;
            // The quote is at `to + at + doubled`: its double follows, then the rest, shifted.
            room[to + at + doubled + 1] = b'"';
            doubled += 1;
            room[to + at + doubled + 1..][..16].copy_from_slice(&cell[from + at + 1..][..16]);
        }
        from += 16;
        to += 16 + doubled;
    }
    (from, to)
}

/// `"cell"` with every quote in it doubled, appended to `out`.
fn quote_into(cell: &[u8], out: &mut Vec<u8>) {
    let start = out.len();
    // The most the quoted cell can take. A block copied whole fits too: its end in `room` is at
    // most twice its end in `cell`, less its width, plus one.
    out.resize(start + 2 * cell.len() + 2, 0);
    let room = &mut out[start..];
    room[0] = b'"';
    let (mut from, mut to) = (0, 1);
    #[cfg(target_arch = "x86_64")]
    {
        (from, to) = quote_blocks_followed_by_a_block(cell, room, from, to);
    }
    // A block at a time: copied whole, then, if it holds a quote, written again from just after
    // its first quote, one byte further on.
    while let Some((width, quote)) = quote_in_block(cell, from) {
        room[to..to + width].copy_from_slice(&cell[from..from + width]);
        match quote {
            None => {
                from += width;
                to += width;
            }
            Some(at) => {
                room[to + at + 1] = b'"';
                from += at + 1;
                to += at + 2;
            }
        }
    }
    for &b in &cell[from..] {
        room[to] = b;
        room[to + 1] = b'"';
        to += 1 + usize::from(b == b'"');
    }
    room[to] = b'"';
    out.truncate(start + to + 1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The csv crate's row for the same cells: the reference.
    fn csv_crate_row(cells: &[&[u8]], delimiter: u8) -> Vec<u8> {
        let mut w = csv::WriterBuilder::new()
            .delimiter(delimiter)
            .quote_style(csv::QuoteStyle::Necessary)
            .terminator(csv::Terminator::Any(b'\n'))
            .has_headers(false)
            .from_writer(Vec::new());
        w.write_record(cells).unwrap();
        w.into_inner().unwrap()
    }

    fn our_row(cells: &[&[u8]], delimiter: u8) -> Vec<u8> {
        let mut rows = DelimitedRows::new(Vec::new(), delimiter, 1 << 20);
        let mut size = 0;
        for cell in cells {
            size += rows.cell(cell);
        }
        size += rows.end_row().unwrap();
        let out = rows.into_inner().unwrap();
        assert_eq!(size, out.len(), "sizes count every byte");
        out
    }

    #[test]
    fn rows_are_what_the_csv_crate_writes() {
        let cells: [&[u8]; 13] = [
            b"",
            b"plain",
            b"a,b",
            b"a\tb",
            b"\"",
            b"\"\"",
            br#"{"k":"v","n":[1,2],"s":"a \"quoted\" word"}"#,
            b"line\nbreak",
            b"cr\rhere",
            b"end\"",
            b"\"start",
            b"\xff\xfe bytes, too",
            b"exactly8",
        ];
        for delimiter in [b',', b'\t'] {
            for a in cells {
                for b in cells {
                    assert_eq!(our_row(&[a, b], delimiter), csv_crate_row(&[a, b], delimiter), "{a:?} {b:?}");
                }
                assert_eq!(our_row(&[a], delimiter), csv_crate_row(&[a], delimiter), "{a:?}");
            }
        }
    }

    #[test]
    fn quotes_anywhere_in_cells_of_every_length_are_doubled() {
        // Every length from 0 to 150 (nine blocks) with quotes at pseudo-random places, and runs
        // of quotes.
        let mut seed = 0x9e37_79b9_u32;
        for len in 0..150 {
            for _ in 0..50 {
                let cell: Vec<u8> = (0..len)
                    .map(|_| {
                        seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                        match seed >> 29 {
                            0 | 1 => b'"',
                            2 => (seed >> 8) as u8,
                            _ => b'a' + (seed >> 24) as u8 % 26,
                        }
                    })
                    .collect();
                assert_eq!(our_row(&[&cell], b','), csv_crate_row(&[&cell], b','), "{cell:?}");
            }
            // Nothing but quotes: every block doubles all sixteen, the farthest writes there are.
            let quotes = vec![b'"'; len];
            assert_eq!(our_row(&[&quotes], b','), csv_crate_row(&[&quotes], b','), "{len} quotes");
        }
    }

    #[test]
    fn a_special_byte_anywhere_in_cells_of_every_length_needs_quotes() {
        // Every length past three sixteen-byte blocks, the special byte at every place, the
        // other bytes everything but the four special ones (high bytes included).
        for delimiter in [b',', b'\t'] {
            for len in 0..52 {
                let other_delimiter = if delimiter == b',' { b'\t' } else { b',' };
                let plain: Vec<u8> = (0..len).map(|i| [b'a', 0xff, 0x80, b' ', other_delimiter][i % 5]).collect();
                assert!(!needs_quotes(&plain, delimiter), "{plain:?}");
                for at in 0..len {
                    for special in [delimiter, b'"', b'\n', b'\r'] {
                        let mut cell = plain.clone();
                        cell[at] = special;
                        assert!(needs_quotes(&cell, delimiter), "{cell:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn rows_reach_the_writer_a_block_at_a_time_and_all_at_the_end() {
        let mut rows = DelimitedRows::new(Vec::new(), b',', 64);
        let mut expected = Vec::new();
        for i in 0..100 {
            let cell = format!("row {i}, \"quoted\"");
            rows.cell(cell.as_bytes());
            rows.end_row().unwrap();
            expected.extend_from_slice(&csv_crate_row(&[cell.as_bytes()], b','));
            assert!(rows.rows.len() < 64, "a full block is handed on");
        }
        assert_eq!(rows.into_inner().unwrap(), expected);
    }
}

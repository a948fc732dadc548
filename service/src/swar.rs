//! Eight bytes at a time: which bytes of a word match, for the scans over record text
//! (`json_scan`, `delimited`) that would otherwise test one byte per step.
//!
//! Each function sets the high bit of every matching byte of the word (little-endian: the first
//! byte in memory is the lowest). The classic zero-byte test can also flag a byte *after* a real
//! match (a borrow carries into it), never one before, so the lowest flag is always a real
//! match: `first(flags)` is exact, and flags of several tests can be or-ed before it.

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// The word at `at`, if eight bytes are left.
#[inline]
pub fn word_at(b: &[u8], at: usize) -> Option<u64> {
    b.get(at..at + 8).map(|w| u64::from_le_bytes(w.try_into().expect("eight bytes")))
}

/// Flags the bytes equal to `byte`.
#[inline]
pub fn equal(word: u64, byte: u8) -> u64 {
    let zero_where_equal = word ^ (ONES * u64::from(byte));
    zero_where_equal.wrapping_sub(ONES) & !zero_where_equal & HIGHS
}

/// Flags the bytes below `limit` (at most 0x80).
#[inline]
pub fn below(word: u64, limit: u8) -> u64 {
    word.wrapping_sub(ONES * u64::from(limit)) & !word & HIGHS
}

/// Flags the bytes of 0x80 and above: the bytes of UTF-8 that are not ASCII.
#[inline]
pub fn non_ascii(word: u64) -> u64 {
    word & HIGHS
}

/// Keeps the flags of the bytes before index `at` (0-8).
#[inline]
pub fn before(flags: u64, at: usize) -> u64 {
    if at == 0 {
        0
    } else {
        flags & (u64::MAX >> (64 - 8 * at))
    }
}

/// The index of the first flagged byte.
#[inline]
pub fn first(flags: u64) -> Option<usize> {
    (flags != 0).then(|| (flags.trailing_zeros() / 8) as usize)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_match_is_found_whatever_follows_it() {
        for at in 0..8 {
            for after in 0..=255u8 {
                let mut word = *b"abcdefgh";
                word[at] = b'"';
                for byte in word.iter_mut().skip(at + 1) {
                    *byte = after;
                }
                let w = u64::from_le_bytes(word);
                assert_eq!(first(equal(w, b'"')), Some(at), "{word:?}");
                word[at] = 0x1f;
                let w = u64::from_le_bytes(word);
                assert_eq!(first(below(w, 0x20)), Some(at), "{word:?}");
            }
        }
        let word = u64::from_le_bytes([0x61, 0xc3, 0xa9, 0x22, 0xff, 0x80, 0x7f, 0x00]);
        assert_eq!(first(non_ascii(word)), Some(1));
        assert_eq!(before(non_ascii(word), 1), 0);
        assert_eq!(first(before(non_ascii(word), 2)), Some(1));
        assert_eq!(before(non_ascii(word), 8), non_ascii(word));
        let none = u64::from_le_bytes([0x21, 0x23, 0xa2, 0x20, 0xff, 0x80, 0x7f, 0x5d]);
        assert_eq!(first(equal(none, b'"') | below(none, 0x20)), None);
    }
}

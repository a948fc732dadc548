//! Sixteen bytes at a time on x86-64, where SSE2 is always present: which bytes of a block
//! match, for the scans over record text (`json_scan`, the sink's `delimited`) that SWAR
//! ([`crate::swar`]) does eight at a time elsewhere and for the last few bytes.
//!
//! The intrinsics are wrapped here, once, so the scans need no `unsafe`: SSE2 is part of every
//! x86-64 target, and the one load checks its bounds.

use std::arch::x86_64::{
    __m128i, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_min_epu8, _mm_movemask_epi8, _mm_or_si128, _mm_set1_epi8,
};

/// Sixteen bytes of a slice.
#[derive(Clone, Copy)]
pub struct Block(__m128i);

/// Bytes of a [`Block`] that passed a test (all ones where they did).
#[derive(Clone, Copy)]
pub struct Matches(__m128i);

impl Block {
    /// The sixteen bytes at `at`, if sixteen are left.
    #[inline]
    pub fn at(b: &[u8], at: usize) -> Option<Block> {
        let bytes = b.get(at..at.checked_add(16)?)?;
        // SAFETY: `bytes` is sixteen bytes long; the load has no alignment requirement, and SSE2
        // is in every x86-64 target.
        Some(Block(unsafe { _mm_loadu_si128(bytes.as_ptr().cast::<__m128i>()) }))
    }

    /// The bytes equal to `byte`.
    #[inline]
    pub fn equal(self, byte: u8) -> Matches {
        // SAFETY: SSE2 is in every x86-64 target.
        Matches(unsafe { _mm_cmpeq_epi8(self.0, _mm_set1_epi8(byte as i8)) })
    }

    /// The bytes of `limit` and below, compared unsigned (a signed compare would take 0x80 and
    /// up for small).
    #[inline]
    pub fn at_most(self, limit: u8) -> Matches {
        // SAFETY: SSE2 is in every x86-64 target.
        Matches(unsafe { _mm_cmpeq_epi8(_mm_min_epu8(self.0, _mm_set1_epi8(limit as i8)), self.0) })
    }

    /// Bit `i` set when byte `i` is 0x80 or above: the bytes of UTF-8 that are not ASCII.
    #[inline]
    pub fn non_ascii(self) -> u32 {
        // SAFETY: SSE2 is in every x86-64 target.
        unsafe { _mm_movemask_epi8(self.0) as u32 }
    }
}

impl Matches {
    #[inline]
    pub fn or(self, other: Matches) -> Matches {
        // SAFETY: SSE2 is in every x86-64 target.
        Matches(unsafe { _mm_or_si128(self.0, other.0) })
    }

    /// Bit `i` set when byte `i` matched.
    #[inline]
    pub fn bits(self) -> u32 {
        // SAFETY: SSE2 is in every x86-64 target.
        unsafe { _mm_movemask_epi8(self.0) as u32 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_byte_value_matches_where_it_should_at_every_place() {
        for at in 0..16 {
            for byte in 0..=255u8 {
                let mut b = [b'a'; 17];
                b[at] = byte;
                let block = Block::at(&b, 0).expect("sixteen bytes");
                let one = 1u32 << at;
                assert!(block.equal(byte).bits() & one != 0);
                assert_eq!(block.equal(b'"').bits(), if byte == b'"' { one } else { 0 });
                assert_eq!(block.at_most(0x1f).bits(), if byte <= 0x1f { one } else { 0 }, "{byte:#x}");
                assert_eq!(block.non_ascii(), if byte >= 0x80 { one } else { 0 });
                assert_eq!(
                    block.equal(b'"').or(block.at_most(0x1f)).bits(),
                    if byte == b'"' || byte <= 0x1f { one } else { 0 }
                );
            }
        }
        assert!(Block::at(&[0; 15], 0).is_none());
        assert!(Block::at(&[0; 16], 1).is_none());
        assert!(Block::at(&[0; 16], usize::MAX).is_none());
    }
}

//! Gzip level 1 by ISA-L's igzip: the relay link's default compression. On the MessagePack
//! entries the link sends (access-log lines with `host`, `file` and a random `_id`), igzip's
//! level 1 took 1.72 CPU-s per GB where zlib-rs's level 1 took 3.87, and stored 24 % fewer bytes
//! (ratio 3.64 against 2.76; bench/RESULTS.md). Its output is ordinary gzip, which every Forward
//! receiver reads: the default could change its compressor without changing its format.
//!
//! A chunk's entries are compressed whole when it is sealed (one stateless call: igzip's fastest
//! path, and one gzip member, which every receiver reads), with a deflater taken from a small
//! pool: its level buffer (276 KiB) and output buffer stay mapped for the next chunk.

use crate::pool::Idle;
use isal_sys::igzip_lib as isal;

/// Idle deflaters kept for reuse (a 276 KiB level buffer, a 100 KiB stream and an output buffer
/// of about one chunk each); beyond this they are freed.
const POOLED_DEFLATERS: usize = 4;

/// An output buffer above this is not kept in the pool (one huge chunk's worth is not held).
const KEPT_OUTPUT: usize = 2 << 20;

static IDLE: Idle<Deflater> = Idle::keeping(POOLED_DEFLATERS);

struct Deflater {
    stream: Box<isal::isal_zstream>,
    /// igzip level 1's hash table and token buffer, set into `stream` for each call.
    level_buf: Box<[u8]>,
    out: Vec<u8>,
}

// SAFETY: the stream's pointers point into this deflater's own heap buffers (set before each
// call, not used between calls) or to ISA-L's static Huffman tables; a deflater is used by one
// owner at a time, and moving it between threads moves nothing those pointers refer to.
unsafe impl Send for Deflater {}

impl Deflater {
    fn new() -> Self {
        // All zeroes is a valid stream (null pointers, zero counts); `compress` initialises it.
        let stream = unsafe { Box::<isal::isal_zstream>::new_zeroed().assume_init() };
        let level_buf = vec![0u8; isal::ISAL_DEF_LVL1_DEFAULT as usize].into_boxed_slice();
        Deflater { stream, level_buf, out: Vec::new() }
    }

    /// `input` as one gzip member, in `self.out`.
    fn compress(&mut self, input: &[u8]) -> &[u8] {
        assert!(input.len() <= (u32::MAX / 2) as usize, "a chunk of {} bytes", input.len());
        self.out.clear();
        self.out.reserve(stored_bound(input.len()));
        let s = &mut *self.stream;
        // SAFETY: `s` is a valid stream; init only resets its fields.
        unsafe { isal::isal_deflate_stateless_init(s) };
        s.level = 1;
        s.level_buf = self.level_buf.as_mut_ptr();
        s.level_buf_size = self.level_buf.len() as u32;
        s.gzip_flag = isal::IGZIP_GZIP as u16;
        s.flush = isal::NO_FLUSH as u16;
        s.end_of_stream = 1;
        s.next_in = input.as_ptr().cast_mut(); // read only: igzip never writes its input
        s.avail_in = input.len() as u32;
        s.next_out = self.out.as_mut_ptr();
        s.avail_out = self.out.capacity().min(u32::MAX as usize) as u32;
        // SAFETY: input and output lie in live buffers of the lengths given, and so does the
        // level buffer; igzip writes at most `avail_out` bytes.
        let rc = unsafe { isal::isal_deflate_stateless(s) };
        // The output holds the input as stored blocks, which igzip falls back to when it
        // cannot do better: no other outcome is possible with the stream set as above.
        assert_eq!(rc, isal::COMP_OK as i32, "igzip failed ({rc}) on {} bytes", input.len());
        // SAFETY: igzip wrote `total_out` bytes from the start of the reserved capacity.
        unsafe { self.out.set_len(s.total_out as usize) };
        &self.out
    }
}

/// The most one stateless call writes for `len` bytes: the input as stored blocks (5 bytes of
/// header per 65,535 bytes, one block for none) with the gzip header and trailer.
fn stored_bound(len: usize) -> usize {
    len + 5 * len.div_ceil(65_535).max(1) + 10 + 8
}

/// Compresses `input` as one gzip member at igzip's level 1 and hands it to `use_member`. The
/// member lies in a pooled buffer: the caller copies it where it belongs, once.
pub fn with_gzip_member<R>(input: &[u8], use_member: impl FnOnce(&[u8]) -> R) -> R {
    let mut deflater = IDLE.take(1).unwrap_or_else(Deflater::new);
    let result = use_member(deflater.compress(input));
    if deflater.out.capacity() > KEPT_OUTPUT {
        deflater.out = Vec::new();
    }
    IDLE.give_back(1, deflater);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut decoder = flate2::read::GzDecoder::new(bytes);
        decoder.read_to_end(&mut out).unwrap();
        out
    }

    fn lines(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| {
                format!("{{\"n\":{i},\"path\":\"/api/v1/items/{}\",\"status\":200}}\n", i * 7919 % 100_000).into_bytes()
            })
            .collect()
    }

    /// Bytes that do not compress (xorshift), so igzip falls back to stored blocks.
    fn noise(n: usize) -> Vec<u8> {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    #[test]
    fn a_member_is_one_gzip_file_of_its_input_whatever_its_size() {
        for input in [Vec::new(), b"x".to_vec(), lines(1), lines(20_000), lines(60_000), noise(65_535), noise(1 << 20)]
        {
            let member = with_gzip_member(&input, <[u8]>::to_vec);
            assert_eq!(&member[..3], &[0x1f, 0x8b, 8], "a gzip header");
            assert_eq!(gunzip(&member), input, "{} bytes", input.len());
            assert!(member.len() <= stored_bound(input.len()));
        }
    }

    #[test]
    fn log_lines_compress_at_least_as_well_as_zlib_level_1() {
        let input = lines(30_000);
        let member = with_gzip_member(&input, <[u8]>::to_vec);
        let mut zlib = crate::gzip::GzipVec::new(1);
        std::io::Write::write_all(&mut zlib, &input).unwrap();
        let zlib = zlib.finish();
        assert!(member.len() <= zlib.len(), "igzip {} bytes, zlib-rs level 1 {}", member.len(), zlib.len());
    }

    #[test]
    fn a_reused_deflater_gives_the_same_member_as_a_new_one() {
        let (a, b) = (lines(5_000), noise(100_000));
        let first = with_gzip_member(&a, <[u8]>::to_vec);
        let _ = with_gzip_member(&b, <[u8]>::to_vec); // the pool's deflater has seen other input
        assert_eq!(with_gzip_member(&a, <[u8]>::to_vec), first);
        assert_eq!(Deflater::new().compress(&a), &first[..]);
    }

    #[test]
    fn deflaters_work_on_several_threads_at_once() {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                std::thread::spawn(move || {
                    for round in 0..20 {
                        let input = lines(1_000 + t * 100 + round);
                        assert_eq!(gunzip(&with_gzip_member(&input, <[u8]>::to_vec)), input);
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
    }
}

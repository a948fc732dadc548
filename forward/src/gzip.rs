//! Gzip into memory, two ways: [`GzipVec`], one zlib-rs stream (the archive at level 1, and relay
//! chunks at levels other than the default 1, which [`crate::igzip`] compresses), and
//! [`GzipMembers`], members compressed whole by libdeflate (the archive from level 2). Both reuse
//! their compressors. Creating a deflate state zeroes about 400 KiB (zlib-rs:
//! window, hash chains, buffers); with many small batches (100 files, each cut into a batch every
//! pass) that was 40 % of the agent's CPU. A finished writer gives its state back to a small
//! process-wide pool, and the next writer at the same level resets it instead.

use crate::pool::Idle;
use flate2::write::DeflateEncoder;
use flate2::{Compression, Crc};
use std::io::Write;

/// Idle deflate states kept for reuse (about 400 KiB each); beyond this they are freed.
pub const POOLED_STATES: usize = 4;

static IDLE: Idle<DeflateEncoder<Vec<u8>>> = Idle::keeping(POOLED_STATES);

/// The gzip member header: deflate, no name or comment, mtime 0, OS unknown.
const HEADER: [u8; 10] = [0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];

/// Bytes written are gathered up to this much before the deflate state sees them. Each write
/// to the encoder is one deflate call and one CRC update, and callers write one record (about
/// 200 bytes) at a time: per record, the calls' own overhead was about 5 % of the compression
/// (and a tenth of the sink's CPU, where rows were written the same way).
pub const GATHER: usize = 16 * 1024;

/// One gzip member written into a `Vec<u8>`; [`GzipVec::finish`] returns it.
pub struct GzipVec {
    deflate: DeflateEncoder<Vec<u8>>,
    level: u32,
    crc: Crc,
    gathered: Gathered,
}

impl GzipVec {
    pub fn new(level: u32) -> Self {
        let mut deflate =
            IDLE.take(level as i32).unwrap_or_else(|| DeflateEncoder::new(Vec::new(), Compression::new(level)));
        // A fresh or reset encoder has written nothing yet: the header goes first.
        deflate.get_mut().extend_from_slice(&HEADER);
        GzipVec { deflate, level, crc: Crc::new(), gathered: Gathered::up_to(GATHER) }
    }

    /// The gzip bytes; the deflate state goes back to the pool.
    pub fn finish(mut self) -> Vec<u8> {
        self.gathered.flush(|buf| compress(&mut self.deflate, &mut self.crc, buf));
        let mut out = self.deflate.reset(Vec::new()).expect("writing to a Vec cannot fail");
        out.extend_from_slice(&self.crc.sum().to_le_bytes());
        out.extend_from_slice(&self.crc.amount().to_le_bytes());
        IDLE.give_back(self.level as i32, self.deflate);
        out
    }
}

fn compress(deflate: &mut DeflateEncoder<Vec<u8>>, crc: &mut Crc, buf: &[u8]) {
    if !buf.is_empty() {
        deflate.write_all(buf).expect("writing to a Vec cannot fail");
        crc.update(buf);
    }
}

impl Write for GzipVec {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gathered.write(buf, |buf| compress(&mut self.deflate, &mut self.crc, buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.gathered.flush(|buf| compress(&mut self.deflate, &mut self.crc, buf));
        self.deflate.flush()
    }
}

/// Input gathered before a compressor sees it, in one buffer allocated once per writer.
struct Gathered {
    /// Written, not yet compressed: less than `limit` bytes.
    bytes: Vec<u8>,
    limit: usize,
}

impl Gathered {
    fn up_to(limit: usize) -> Self {
        Gathered { bytes: Vec::new(), limit }
    }

    /// Takes `buf`, handing `compress` what is due, in order: what was gathered, once `buf`
    /// would take it to the limit; and `buf` itself, whole, when it alone reaches the limit.
    fn write(&mut self, buf: &[u8], mut compress: impl FnMut(&[u8])) {
        if self.bytes.len() + buf.len() >= self.limit {
            self.flush(&mut compress);
        }
        if buf.len() >= self.limit {
            compress(buf);
        } else {
            if self.bytes.capacity() == 0 {
                self.bytes.reserve_exact(self.limit);
            }
            self.bytes.extend_from_slice(buf);
        }
    }

    /// Hands `compress` what was gathered, if anything; the buffer stays allocated.
    fn flush(&mut self, compress: impl FnOnce(&[u8])) {
        if !self.bytes.is_empty() {
            compress(&self.bytes);
            self.bytes.clear();
        }
    }
}

/// Input of [`GzipMembers`] compressed as one gzip member. Each member starts with an empty
/// window, which costs little past the first 32 KiB: on realistic archived lines 256 KiB members
/// store 0.9 % more than 1 MiB ones, and 5 % less than zlib-rs's one stream at the same level.
pub const MEMBER: usize = 256 << 10;

/// Idle libdeflate compressors (0.2–0.4 MiB each, by level), each with the buffer it compresses
/// into (a member's compress bound, about [`MEMBER`]), kept for the next member; beyond this
/// they are freed. A compressor holds nothing between calls, so open writers share them.
const POOLED_COMPRESSORS: usize = 4;

struct Compressor {
    libdeflate: libdeflater::Compressor,
    /// What the last member was compressed into: the member is copied out, so that an open
    /// writer's output does not keep a whole compress bound of spare room.
    scratch: Vec<u8>,
}

static IDLE_COMPRESSORS: Idle<Compressor> = Idle::keeping(POOLED_COMPRESSORS);

/// Gzip into memory as a series of members, each [`MEMBER`] of input compressed whole by
/// libdeflate: the archive's writer. At level 6 libdeflate takes a third less CPU than zlib-rs
/// (which streams) on realistic log lines and stores 5 % less (bench/RESULTS.md); it cannot
/// stream, hence the members. Concatenated members are one gzip file (RFC 1952, 2.2): gzip,
/// zcat, Python, Java, Go and the Hadoop codecs behind Athena and Spark read them whole.
///
/// An open writer holds at most [`MEMBER`] of input beside its output (a zlib-rs state is
/// 404 KiB per open writer); the compressors are shared.
pub struct GzipMembers {
    level: u32,
    out: Vec<u8>,
    gathered: Gathered,
}

impl GzipMembers {
    /// `level`: 0–9, as gzip's.
    pub fn new(level: u32) -> Self {
        GzipMembers { level: level.min(9), out: Vec::new(), gathered: Gathered::up_to(MEMBER) }
    }

    /// The gzip bytes: one member at least, so that no input is still a gzip file.
    pub fn finish(mut self) -> Vec<u8> {
        self.gathered.flush(|buf| compress_member(self.level, buf, &mut self.out));
        if self.out.is_empty() {
            compress_member(self.level, &[], &mut self.out);
        }
        self.out
    }
}

impl Write for GzipMembers {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.gathered.write(buf, |buf| compress_member(self.level, buf, &mut self.out));
        Ok(buf.len())
    }

    /// Members are whole or not written: nothing to flush before [`GzipMembers::finish`].
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Appends `input` to `out` as one gzip member, with a pooled compressor.
fn compress_member(level: u32, input: &[u8], out: &mut Vec<u8>) {
    let mut c = IDLE_COMPRESSORS.take(level as i32).unwrap_or_else(|| Compressor {
        libdeflate: libdeflater::Compressor::new(
            libdeflater::CompressionLvl::new(level as i32).expect("levels 0-9 exist"),
        ),
        scratch: Vec::new(),
    });
    c.scratch.resize(c.libdeflate.gzip_compress_bound(input.len()), 0);
    let written = c.libdeflate.gzip_compress(input, &mut c.scratch).expect("the scratch holds the compress bound");
    out.extend_from_slice(&c.scratch[..written]);
    if c.scratch.capacity() > 2 * MEMBER {
        c.scratch = Vec::new(); // one huge line's bound is not kept
    }
    IDLE_COMPRESSORS.give_back(level as i32, c);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    fn multi_gunzip(bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(bytes).read_to_end(&mut out).unwrap();
        out
    }

    #[test]
    fn members_concatenate_to_the_input_whatever_the_sizes_of_the_writes() {
        // Writes around the member size, huge ones, empty ones; every level.
        let sizes = [1, 215, MEMBER - 1, 1, MEMBER, 3, 2 * MEMBER + 7, 215, 0, MEMBER / 2, MEMBER / 2 + 1, 9];
        for level in [0, 1, 3, 6, 9] {
            let mut gz = GzipMembers::new(level);
            let mut expected = Vec::new();
            for (i, size) in sizes.iter().enumerate() {
                let piece: Vec<u8> = (0..*size).map(|j| b'a' + ((i * 7 + j * 13 + j / 100) % 26) as u8).collect();
                gz.write_all(&piece).unwrap();
                expected.extend_from_slice(&piece);
                assert!(
                    gz.gathered.bytes.len() < MEMBER && gz.gathered.bytes.capacity() <= MEMBER,
                    "at most a member is gathered"
                );
            }
            let bytes = gz.finish();
            assert_eq!(multi_gunzip(&bytes), expected, "level {level}");
        }
    }

    #[test]
    fn an_open_writer_holds_its_gathered_input_and_its_output_only() {
        let mut gz = GzipMembers::new(6);
        let line = b"{\"path\":\"/api/v1/items\",\"status\":200}\n";
        while gz.out.len() < 3 * 1024 {
            gz.write_all(line).unwrap(); // several members of lines that compress 100:1
        }
        // No compress bound of spare room (about a member) stays behind in the output.
        assert!(gz.out.capacity() < MEMBER / 4, "output capacity {}", gz.out.capacity());
        assert!(gz.gathered.bytes.capacity() <= MEMBER);
    }

    #[test]
    fn no_input_is_still_a_gzip_file() {
        for level in [1, 6] {
            let bytes = GzipMembers::new(level).finish();
            assert!(!bytes.is_empty());
            assert!(multi_gunzip(&bytes).is_empty());
        }
    }

    #[test]
    fn members_compress_log_lines_at_least_as_well_as_the_stream() {
        let text: String = (0..20_000)
            .map(|i| {
                format!(
                    "{{\"time\":\"2026-12-07T01:{:02}:{:02}Z\",\"path\":\"/api/v1/items/{}\",\"status\":{}}}\n",
                    i / 3600 % 60,
                    i / 60 % 60,
                    i * 7919 % 100_000,
                    [200, 404, 500][i % 3]
                )
            })
            .collect();
        let mut members = GzipMembers::new(6);
        let mut stream = GzipVec::new(6);
        for line in text.lines() {
            members.write_all(line.as_bytes()).unwrap();
            members.write_all(b"\n").unwrap();
            stream.write_all(line.as_bytes()).unwrap();
            stream.write_all(b"\n").unwrap();
        }
        let (members, stream) = (members.finish(), stream.finish());
        assert_eq!(multi_gunzip(&members), text.as_bytes());
        assert!(members.len() <= stream.len(), "{} bytes in members, {} in one stream", members.len(), stream.len());
    }

    #[test]
    fn members_are_valid_gzip_whether_their_state_is_new_or_reused() {
        for round in 0..3 {
            for level in [1, 6] {
                let text = format!("round {round} level {level} ").repeat(1000);
                let mut gz = GzipVec::new(level);
                gz.write_all(text.as_bytes()).unwrap();
                let bytes = gz.finish();
                assert!(bytes.len() < text.len() / 10);
                assert_eq!(gunzip(&bytes), text.as_bytes());
            }
        }
        let empty = GzipVec::new(1).finish();
        assert!(gunzip(&empty).is_empty());
    }

    #[test]
    fn writes_of_every_size_around_the_gathering_come_out_in_order() {
        let sizes = [1, 200, GATHER - 1, 1, GATHER, 3, 2 * GATHER + 7, 215, 215, GATHER / 2, GATHER / 2 + 1, 0, 9];
        let mut gz = GzipVec::new(6);
        let mut expected = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let piece: Vec<u8> = (0..*size).map(|j| b'a' + ((i * 7 + j * 13) % 26) as u8).collect();
            gz.write_all(&piece).unwrap();
            expected.extend_from_slice(&piece);
            if i == 5 {
                gz.flush().unwrap(); // a flush in the middle compresses what was gathered
            }
        }
        assert_eq!(gunzip(&gz.finish()), expected);
    }
}

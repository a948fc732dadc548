//! Zstandard for CompressedPackedForward (`"compressed": "zstd"`): Fluentd's `in_forward` reads
//! it (fluentd#4657), and so does Fluent Bit's (5.1.1, tests/e2e/test_zstd_link.py). At level 1
//! it takes about half the CPU of zlib-rs's gzip level 1 on log lines, and its output is 39 %
//! smaller (bench/RESULTS.md): on the agent's relay link, gzip was more of the CPU than the parse.

use crate::error::DecodeError;
use crate::pool::Idle;

/// The levels offered: zstd's own from the fastest to the last that needs no more than an
/// 8 MiB window (the negative, "fast" levels store little better than no compression).
pub const LEVELS: std::ops::RangeInclusive<i32> = 1..=19;

/// Idle compression contexts (a few hundred KiB to a few MiB each, by level), each with the
/// buffer it compresses into.
const POOLED_CONTEXTS: usize = 4;

struct Compressor {
    zstd: ::zstd::bulk::Compressor<'static>,
    /// What the last frame was compressed into; the frame is copied out, so a chunk holds only
    /// its compressed size, not a compress bound of spare room.
    scratch: Vec<u8>,
}

static IDLE: Idle<Compressor> = Idle::keeping(POOLED_CONTEXTS);

/// Input compressed as one frame. Fluent Bit's `in_forward` decodes each frame whole into a
/// buffer of its `Buffer_Chunk_Size` (1,024,000 bytes by default), and a frame that decodes to
/// more fails there and is acknowledged without its records (seen with 1 MiB chunks as one
/// frame, tests/e2e/test_zstd_link.py); frames of this size fit any buffer a sender meets.
pub const FRAME: usize = 256 << 10;

/// Appends `input` to `out` as zstd frames of at most [`FRAME`] each (with their content sizes,
/// as one-shot compressors write them), with a pooled context. Concatenated frames decode to
/// the concatenated input (RFC 8878, 3.1); an empty input is one empty frame.
pub fn compress_frames(level: i32, input: &[u8], out: &mut Vec<u8>) {
    let level = level.clamp(*LEVELS.start(), *LEVELS.end());
    let mut c = IDLE.take(level).unwrap_or_else(|| Compressor {
        zstd: ::zstd::bulk::Compressor::new(level).expect("a zstd context at a valid level"),
        scratch: Vec::with_capacity(::zstd::zstd_safe::compress_bound(FRAME)),
    });
    for frame in input.chunks(FRAME).chain(input.is_empty().then_some(&[][..])) {
        c.scratch.clear();
        c.scratch.reserve(::zstd::zstd_safe::compress_bound(frame.len()));
        let written = c.zstd.compress_to_buffer(frame, &mut c.scratch).expect("the scratch holds the compress bound");
        out.extend_from_slice(&c.scratch[..written]);
    }
    IDLE.give_back(level, c);
}

/// Decompresses every frame of `data` (a sender may concatenate several), refusing to go past
/// `limit` bytes. The frames are decoded in one pass straight into the output, which is also
/// their window: no window buffer is allocated beside it, whatever window a frame declares, so a
/// bomb costs at most `limit`. The output is reserved at the frames' declared sizes when every
/// frame declares one (one-shot compressors, ours, Fluent Bit's and Fluentd's do), at `limit`
/// otherwise (touched only as far as it decodes).
pub fn decompress(data: &[u8], limit: usize) -> Result<Vec<u8>, DecodeError> {
    let reserve = match declared_size(data) {
        // Refused before anything is reserved or decoded.
        Some(size) if size > limit as u64 => {
            return Err(DecodeError::DecompressedTooLarge { size: size.min(usize::MAX as u64) as usize, limit })
        }
        Some(size) => size as usize,
        None => limit,
    };
    let mut out = Vec::with_capacity(reserve);
    match ::zstd::zstd_safe::decompress(&mut out, data) {
        Ok(_) => Ok(out),
        // Past the reservation: past the limit, or past what the frames declared (a lie).
        Err(code) if ::zstd::zstd_safe::get_error_name(code) == DST_TOO_SMALL && reserve == limit => {
            Err(DecodeError::DecompressedTooLarge { size: limit + 1, limit })
        }
        Err(code) => Err(DecodeError::Zstd(::zstd::zstd_safe::get_error_name(code))),
    }
}

/// The sum of the frames' declared content sizes, or None when a frame does not declare one
/// (or the frames cannot be walked: the decode then says what is wrong).
fn declared_size(mut data: &[u8]) -> Option<u64> {
    let mut total = 0u64;
    while !data.is_empty() {
        let size = ::zstd::zstd_safe::get_frame_content_size(data).ok()??;
        let length = ::zstd::zstd_safe::find_frame_compressed_size(data).ok().filter(|l| *l > 0)?;
        total = total.saturating_add(size);
        data = &data[length.min(data.len())..];
    }
    Some(total)
}

/// zstd's name for `ZSTD_error_dstSize_tooSmall`: the frames hold more than the limit.
const DST_TOO_SMALL: &str = "Destination buffer is too small";

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(n: usize) -> Vec<u8> {
        (0..n)
            .flat_map(|i| format!("{{\"n\":{i},\"msg\":\"GET /item/{} 200\"}}\n", i * 7919 % 1000).into_bytes())
            .collect()
    }

    #[test]
    fn frames_decompress_back_at_every_level() {
        let input = lines(20_000);
        for level in [1, 3, 9, 19] {
            let mut out = b"prefix".to_vec();
            compress_frames(level, &input, &mut out);
            assert_eq!(&out[..6], b"prefix", "appended, not overwritten");
            assert!(out.len() - 6 < input.len() / 4, "level {level}: {} bytes", out.len());
            assert_eq!(decompress(&out[6..], input.len()).unwrap(), input, "level {level}");
        }
        let mut empty = Vec::new();
        compress_frames(1, &[], &mut empty);
        assert_eq!(decompress(&empty, 10).unwrap(), b"");
    }

    #[test]
    fn no_frame_decodes_to_more_than_a_frame() {
        let input = lines(60_000); // about 2.4 MB: ten frames
        let mut out = Vec::new();
        compress_frames(1, &input, &mut out);
        let (mut rest, mut frames, mut sizes) = (&out[..], 0, 0);
        while !rest.is_empty() {
            let size = ::zstd::zstd_safe::get_frame_content_size(rest).unwrap().expect("every frame says its size");
            assert!(size as usize <= FRAME, "a frame of {size} bytes");
            let length = ::zstd::zstd_safe::find_frame_compressed_size(rest).unwrap();
            (rest, frames, sizes) = (&rest[length..], frames + 1, sizes + size as usize);
        }
        assert_eq!((frames, sizes), (input.len().div_ceil(FRAME), input.len()));
    }

    #[test]
    fn concatenated_frames_are_one_stream() {
        let (a, b) = (lines(100), lines(300));
        let mut both = Vec::new();
        compress_frames(1, &a, &mut both);
        compress_frames(5, &b, &mut both);
        assert_eq!(decompress(&both, 1 << 20).unwrap(), [a, b].concat());
    }

    #[test]
    fn a_bomb_stops_at_the_limit() {
        // 64 MiB of zeros compresses to a few KiB; with its content size, and as a streamed
        // frame that does not say it (the decoder must stop on its own).
        let zeros = vec![0u8; 64 << 20];
        let framed = ::zstd::bulk::compress(&zeros, 1).unwrap();
        assert!(framed.len() < 64 << 10);
        let streamed = ::zstd::stream::encode_all(&zeros[..], 1).unwrap();
        assert_eq!(::zstd::zstd_safe::get_frame_content_size(&streamed).unwrap(), None);
        for bomb in [&framed, &streamed] {
            match decompress(bomb, 1 << 20) {
                Err(DecodeError::DecompressedTooLarge { limit, .. }) => assert_eq!(limit, 1 << 20),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(decompress(&streamed, 64 << 20).unwrap().len(), 64 << 20);
    }

    #[test]
    fn the_output_is_reserved_at_the_declared_sizes() {
        let input = lines(30_000);
        let mut framed = Vec::new();
        compress_frames(1, &input, &mut framed);
        assert_eq!(declared_size(&framed), Some(input.len() as u64));
        let out = decompress(&framed, 64 << 20).unwrap();
        assert_eq!(out, input);
        assert_eq!(out.capacity(), input.len(), "reserved at the declared size, not the 64 MiB limit");
        let streamed = ::zstd::stream::encode_all(&input[..], 1).unwrap();
        assert_eq!(declared_size(&streamed), None);
        assert_eq!(decompress(&streamed, 64 << 20).unwrap(), input);
    }

    #[test]
    fn a_frame_that_understates_its_size_is_an_error() {
        let input = lines(1000);
        let mut frame = ::zstd::bulk::compress(&input, 1).unwrap();
        // The frame header (RFC 8878, 3.1.1.1): a 2-byte content size holds the size - 256; set
        // it to say 256 bytes.
        let descriptor = frame[4];
        assert_eq!((descriptor >> 6, descriptor & 3), (1, 0), "a 2-byte content size, no dictionary");
        let at = 5 + usize::from(descriptor & 0x20 == 0); // after the window byte, if there is one
        frame[at..at + 2].copy_from_slice(&0u16.to_le_bytes());
        assert_eq!(declared_size(&frame), Some(256));
        let err = decompress(&frame, 1 << 20).unwrap_err();
        assert!(matches!(err, DecodeError::Zstd(_)), "{err:?}");
    }

    #[test]
    fn garbage_is_an_error_naming_zstd() {
        let err = decompress(b"not zstd at all", 1 << 20).unwrap_err();
        assert!(matches!(err, DecodeError::Zstd(_)), "{err:?}");
        assert!(err.to_string().starts_with("zstd: "), "{err}");
        let mut frame = Vec::new();
        compress_frames(1, &lines(1000), &mut frame);
        let cut = &frame[..frame.len() / 2];
        assert!(decompress(cut, 1 << 20).is_err());
    }
}

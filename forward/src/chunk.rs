use crate::gzip::GzipVec;
use crate::msgpack::write_json_map;
use crate::origin::{PositionWriter, POSITIONS_OPTION, SOURCE_OPTION};
use crate::time::{EventTime, EVENT_TIME_EXT};
use std::io::Write;

/// Packs entries into one CompressedPackedForward frame:
/// `[tag, bin(gzip(entries…)), {"size": n, "chunk": id, "compressed": "gzip"}]`, or, built with
/// [`ChunkBuilder::uncompressed`], one PackedForward frame without the `compressed` option, or,
/// built with [`ChunkBuilder::zstd`], one with `"compressed": "zstd"`.
/// Gzip entries of [`ChunkBuilder::new`] are compressed as they are added, 16 KiB at a time, so a
/// chunk costs its compressed size in memory, plus up to 16 KiB gathered and a deflate state
/// (taken from and given back to the pool in [`crate::gzip`]). The entries of
/// [`ChunkBuilder::igzip`] (gzip level 1) and [`ChunkBuilder::zstd`] are gathered whole and
/// compressed when the chunk is finished: one igzip member, or zstd frames of
/// [`crate::zstd::FRAME`] (a one-shot compressor is faster, and a fraction of a streaming one's
/// memory).
/// Entries added with [`ChunkBuilder::push_at`] and a chunk closed with
/// [`ChunkBuilder::finish_from`] also carry their source positions ([`crate::origin`]).
pub struct ChunkBuilder {
    body: Body,
    scratch: Vec<u8>,
    entries: u64,
    positions: PositionWriter,
}

enum Body {
    Gzip(Box<GzipVec>),
    Plain(Vec<u8>),
    Zstd { entries: Vec<u8>, level: i32 },
    Igzip(Vec<u8>),
}

impl ChunkBuilder {
    /// A CompressedPackedForward chunk, gzip at `level` (0-9).
    pub fn new(level: u32) -> Self {
        Self::with_body(Body::Gzip(Box::new(GzipVec::new(level))))
    }

    /// A PackedForward chunk: for links where bandwidth is cheaper than the CPU gzip costs.
    pub fn uncompressed() -> Self {
        Self::with_body(Body::Plain(Vec::new()))
    }

    /// [`ChunkBuilder::uncompressed`] built in `buffer` (cleared first): the frame of an
    /// acknowledged chunk, given back so the next chunk is written in pages already mapped.
    pub fn uncompressed_in(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        Self::with_body(Body::Plain(buffer))
    }

    /// A CompressedPackedForward chunk compressed by zstd at `level` ([`crate::zstd::LEVELS`]),
    /// gathered in `buffer` (cleared first; see [`ChunkBuilder::uncompressed_in`]).
    pub fn zstd(level: i32, mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        Self::with_body(Body::Zstd { entries: buffer, level })
    }

    /// A CompressedPackedForward chunk, gzip level 1 compressed by ISA-L's igzip
    /// ([`crate::igzip`]: half zlib-rs's CPU, fewer bytes), gathered in `buffer` (cleared first;
    /// see [`ChunkBuilder::uncompressed_in`]).
    pub fn igzip(mut buffer: Vec<u8>) -> Self {
        buffer.clear();
        Self::with_body(Body::Igzip(buffer))
    }

    fn with_body(body: Body) -> Self {
        ChunkBuilder { body, scratch: Vec::with_capacity(512), entries: 0, positions: PositionWriter::default() }
    }

    /// Adds an entry that starts at byte `position` of its source (not below the previous one).
    pub fn push_at(&mut self, position: u64, time: EventTime, record: &serde_json::Map<String, serde_json::Value>) {
        self.positions.push(position);
        self.push(time, record);
    }

    pub fn push(&mut self, time: EventTime, record: &serde_json::Map<String, serde_json::Value>) {
        self.push_encoded(time, |out| write_json_map(out, record));
    }

    /// Adds an entry whose record `write_record` writes as one MessagePack map, starting at byte
    /// `position` of its source (see [`ChunkBuilder::push_at`]).
    pub fn push_encoded_at(&mut self, position: u64, time: EventTime, write_record: impl FnOnce(&mut Vec<u8>)) {
        self.positions.push(position);
        self.push_encoded(time, write_record);
    }

    fn push_encoded(&mut self, time: EventTime, write_record: impl FnOnce(&mut Vec<u8>)) {
        // Uncompressed entries go straight into the body; compressed ones through one scratch
        // buffer, so the encoder sees one write per entry (and gathers them, `gzip::GATHER`).
        let out = match &mut self.body {
            Body::Plain(body) | Body::Zstd { entries: body, .. } | Body::Igzip(body) => body,
            Body::Gzip(_) => {
                self.scratch.clear();
                &mut self.scratch
            }
        };
        out.push(0x92);
        write_event_time(out, time);
        write_record(out);
        if let Body::Gzip(gz) = &mut self.body {
            gz.write_all(&self.scratch).expect("writing to a Vec cannot fail");
        }
        self.entries += 1;
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    pub fn finish(self, tag: &str, chunk_id: &str) -> Vec<u8> {
        self.finish_with(tag, chunk_id, None)
    }

    /// Closes a chunk whose entries were all added with [`ChunkBuilder::push_at`]: `source` names
    /// where they came from and `end` is where the last one ends.
    pub fn finish_from(self, tag: &str, chunk_id: &str, source: &str, end: u64) -> Vec<u8> {
        self.finish_with(tag, chunk_id, Some((source, end)))
    }

    /// Like [`ChunkBuilder::finish_from`], and gives back the buffer a zstd or igzip chunk's
    /// entries were gathered in (compressed, they are not in the frame), for the next chunk.
    pub fn finish_from_keeping(self, tag: &str, chunk_id: &str, source: &str, end: u64) -> (Vec<u8>, Option<Vec<u8>>) {
        self.finish_keeping(tag, chunk_id, Some((source, end)))
    }

    fn finish_with(self, tag: &str, chunk_id: &str, origin: Option<(&str, u64)>) -> Vec<u8> {
        self.finish_keeping(tag, chunk_id, origin).0
    }

    fn finish_keeping(mut self, tag: &str, chunk_id: &str, origin: Option<(&str, u64)>) -> (Vec<u8>, Option<Vec<u8>>) {
        if let Some((_, end)) = origin {
            assert!(
                !self.positions.is_empty() || self.entries == 0,
                "finish_from needs every entry pushed with push_at"
            );
            self.positions.push(end);
        }
        let options_bytes = chunk_id.len() + 64 + self.positions.bytes.len() + origin.map_or(0, |(s, _)| s.len());
        let mut kept = None;
        let (mut out, compressed) = match self.body {
            Body::Gzip(gz) => (frame_around(tag, &gz.finish(), options_bytes), Some("gzip")),
            Body::Zstd { entries, level } => {
                let mut packed = Vec::new();
                crate::zstd::compress_frames(level, &entries, &mut packed);
                kept = Some(entries);
                (frame_around(tag, &packed, options_bytes), Some("zstd"))
            }
            Body::Igzip(entries) => {
                let frame = crate::igzip::with_gzip_member(&entries, |member| frame_around(tag, member, options_bytes));
                kept = Some(entries);
                (frame, Some("gzip"))
            }
            Body::Plain(mut body) => {
                // The frame is built around the entries where they are: shifting them along
                // their own pages costs far less than copying a megabyte into fresh ones.
                let mut head = Vec::with_capacity(tag.len() + 16);
                head.push(0x93);
                rmp::encode::write_str(&mut head, tag).expect("vec");
                rmp::encode::write_bin_len(&mut head, body.len() as u32).expect("vec");
                body.reserve_exact(head.len() + options_bytes);
                body.splice(0..0, head);
                (body, None)
            }
        };
        let options = 2 + u32::from(origin.is_some()) * 2 + u32::from(compressed.is_some());
        rmp::encode::write_map_len(&mut out, options).expect("vec");
        if let Some((source, _)) = origin {
            rmp::encode::write_str(&mut out, SOURCE_OPTION).expect("vec");
            rmp::encode::write_str(&mut out, source).expect("vec");
            rmp::encode::write_str(&mut out, POSITIONS_OPTION).expect("vec");
            rmp::encode::write_bin(&mut out, &self.positions.bytes).expect("vec");
        }
        rmp::encode::write_str(&mut out, "size").expect("vec");
        rmp::encode::write_uint(&mut out, self.entries).expect("vec");
        rmp::encode::write_str(&mut out, "chunk").expect("vec");
        rmp::encode::write_str(&mut out, chunk_id).expect("vec");
        if let Some(compression) = compressed {
            rmp::encode::write_str(&mut out, "compressed").expect("vec");
            rmp::encode::write_str(&mut out, compression).expect("vec");
        }
        (out, kept)
    }
}

/// `[tag, bin(packed), ` of a compressed chunk, with room for its options.
fn frame_around(tag: &str, packed: &[u8], options_bytes: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(packed.len() + tag.len() + 16 + options_bytes);
    out.push(0x93);
    rmp::encode::write_str(&mut out, tag).expect("vec");
    rmp::encode::write_bin(&mut out, packed).expect("vec");
    out
}

/// EventTime as fixext8, type 0.
pub(crate) fn write_event_time(out: &mut Vec<u8>, t: EventTime) {
    out.push(0xd7);
    out.push(EVENT_TIME_EXT as u8);
    out.extend_from_slice(&t.to_ext_payload());
}

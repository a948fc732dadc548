use crate::msgpack::write_json_map;
use crate::time::{EventTime, EVENT_TIME_EXT};
use flate2::write::GzEncoder;
use flate2::Compression;
use std::io::Write;

/// Packs entries into one CompressedPackedForward frame:
/// `[tag, bin(gzip(entries…)), {"size": n, "chunk": id, "compressed": "gzip"}]`.
/// Entries are compressed as they are added, so a chunk costs its compressed size in memory.
pub struct ChunkBuilder {
    gz: GzEncoder<Vec<u8>>,
    scratch: Vec<u8>,
    entries: u64,
    raw_bytes: usize,
}

impl ChunkBuilder {
    pub fn new(level: u32) -> Self {
        ChunkBuilder {
            gz: GzEncoder::new(Vec::new(), Compression::new(level)),
            scratch: Vec::with_capacity(512),
            entries: 0,
            raw_bytes: 0,
        }
    }

    pub fn push(&mut self, time: EventTime, record: &serde_json::Map<String, serde_json::Value>) {
        self.scratch.clear();
        self.scratch.push(0x92);
        write_event_time(&mut self.scratch, time);
        write_json_map(&mut self.scratch, record);
        self.gz.write_all(&self.scratch).expect("writing to a Vec cannot fail");
        self.entries += 1;
        self.raw_bytes += self.scratch.len();
    }

    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Uncompressed size of the entries so far.
    pub fn raw_bytes(&self) -> usize {
        self.raw_bytes
    }

    pub fn finish(self, tag: &str, chunk_id: &str) -> Vec<u8> {
        let packed = self.gz.finish().expect("writing to a Vec cannot fail");
        let mut out = Vec::with_capacity(packed.len() + tag.len() + chunk_id.len() + 48);
        out.push(0x93);
        rmp::encode::write_str(&mut out, tag).expect("vec");
        rmp::encode::write_bin(&mut out, &packed).expect("vec");
        rmp::encode::write_map_len(&mut out, 3).expect("vec");
        rmp::encode::write_str(&mut out, "size").expect("vec");
        rmp::encode::write_uint(&mut out, self.entries).expect("vec");
        rmp::encode::write_str(&mut out, "chunk").expect("vec");
        rmp::encode::write_str(&mut out, chunk_id).expect("vec");
        rmp::encode::write_str(&mut out, "compressed").expect("vec");
        rmp::encode::write_str(&mut out, "gzip").expect("vec");
        out
    }
}

/// EventTime as fixext8, type 0.
pub(crate) fn write_event_time(out: &mut Vec<u8>, t: EventTime) {
    out.push(0xd7);
    out.push(EVENT_TIME_EXT as u8);
    out.extend_from_slice(&t.to_ext_payload());
}

//! Feeds arbitrary bytes to the server-side decoder, split at a position the input chooses, with
//! small limits so the limit paths are reached too. Any panic is a bug; the decoder must return
//! frames or a `DecodeError` for every input.
#![no_main]

use bytes::BytesMut;
use forward::{Limits, ServerCodec};
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let Some((&split, body)) = data.split_first() else {
        return;
    };
    let limits = Limits {
        max_frame_bytes: 1 << 16,
        max_decompressed_bytes: 1 << 18,
        max_entries_per_chunk: 1000,
        max_elements_per_chunk: 100_000,
        max_decoded_bytes: 1 << 20,
    };
    let mut codec = ServerCodec::new(limits);
    let mut buf = BytesMut::new();
    let step = (split as usize).max(1);
    for piece in body.chunks(step) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(frame)) => {
                    if let forward::Frame::Events(batch) = &frame {
                        let _ = batch.ack();
                        if let Ok(records) = batch.decode(&limits) {
                            for i in 0..records.records.len() {
                                assert!(serde_json::from_slice::<serde_json::Value>(records.get(i)).is_ok());
                            }
                        }
                    }
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});

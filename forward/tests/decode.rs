//! The decoder against byte vectors written by tools nobody here wrote (tests/vectors), plus
//! round trips, limits and garbage.

use bytes::BytesMut;
use forward::{json, ChunkBuilder, DecodeError, EventTime, Frame, Limits, ServerCodec};
use serde_json::{json, Value};
use std::path::Path;
use tokio_util::codec::Decoder;

fn decode_all(bytes: &[u8], limits: Limits, step: usize) -> Result<Vec<Frame>, DecodeError> {
    let mut codec = ServerCodec::new(limits);
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        while let Some(f) = codec.decode(&mut buf)? {
            if let Frame::Events(b) = &f {
                b.decode(&limits)?; // what the relay does next; its errors count here too
            }
            frames.push(f);
        }
    }
    assert!(buf.is_empty(), "{} bytes left undecoded", buf.len());
    Ok(frames)
}

/// A batch's records as (event time in ns, record), decoded the way the relay decodes them.
fn records(b: &forward::EventBatch) -> Vec<(i64, Value)> {
    let r = b.decode(&Limits::default()).unwrap();
    (0..r.records.len()).map(|i| (r.records[i].time.unix_nanos(), serde_json::from_slice(r.get(i)).unwrap())).collect()
}

fn describe(frame: &Frame) -> Value {
    match frame {
        Frame::Heartbeat => json!({"heartbeat": true}),
        Frame::Ping(_) => json!({"ping": true}),
        Frame::Events(b) => {
            let mut v = json!({
                "tag": b.tag,
                "mode": format!("{:?}", b.mode),
                "entries": records(b).into_iter().map(|(time_ns, record)| {
                    json!({"time_ns": time_ns, "record": record})
                }).collect::<Vec<_>>(),
            });
            if let Some(chunk) = &b.options.chunk {
                let chunk = rmpv::decode::read_value(&mut &chunk[..]).unwrap();
                v["chunk"] = json::to_json(&chunk);
            }
            v
        }
    }
}

#[test]
fn third_party_vectors_decode_to_the_expected_events() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors");
    let mut seen = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("msgpack") {
            continue;
        }
        let wire = std::fs::read(&path).unwrap();
        let expected: Value = serde_json::from_slice(&std::fs::read(path.with_extension("json")).unwrap()).unwrap();
        for step in [1, 3, wire.len()] {
            let frames =
                decode_all(&wire, Limits::default(), step).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(frames.len(), 1, "{}", path.display());
            assert_eq!(describe(&frames[0]), expected, "{} fed {step} bytes at a time", path.display());
        }
        seen += 1;
    }
    assert!(seen >= 10, "only {seen} vectors found in {}", dir.display());
}

#[test]
fn ack_echoes_the_chunk_id_exactly() {
    let wire =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vectors/forward_mixed_times.msgpack")).unwrap();
    let frames = decode_all(&wire, Limits::default(), wire.len()).unwrap();
    let Frame::Events(batch) = &frames[0] else { panic!("not events") };
    // {"ack": "fwd-1"} as the PyPI msgpack packer writes it.
    let expected = [0x81, 0xa3, b'a', b'c', b'k', 0xa5, b'f', b'w', b'd', b'-', b'1'];
    assert_eq!(batch.ack().unwrap(), expected);
}

#[test]
fn chunk_builder_round_trips_through_the_decoder() {
    let mut b = ChunkBuilder::new(6);
    for i in 0..1000u32 {
        let rec = json!({"message": format!("line {i}"), "i": i, "nested": {"a": [1, 2]}});
        b.push(EventTime::new(1_700_000_000 + i, i), rec.as_object().unwrap());
    }
    assert_eq!(b.entries(), 1000);
    let wire = b.finish("app.log", "chunk-7");
    let frames = decode_all(&wire, Limits::default(), 4096).unwrap();
    let Frame::Events(batch) = &frames[0] else { panic!("not events") };
    assert_eq!(batch.mode, forward::Mode::CompressedPackedForward);
    assert_eq!(batch.options.size, Some(1000));
    let decoded = batch.decode(&Limits::default()).unwrap();
    assert_eq!(decoded.records.len(), 1000);
    assert_eq!(decoded.records[999].time, EventTime::new(1_700_000_999, 999));
    let fifth: Value = serde_json::from_slice(decoded.get(5)).unwrap();
    assert_eq!(fifth, json!({"message": "line 5", "i": 5, "nested": {"a": [1, 2]}}));
}

#[test]
fn an_uncompressed_chunk_is_packed_forward_with_its_positions() {
    let mut b = ChunkBuilder::uncompressed();
    for i in 0..100u64 {
        b.push_encoded_at(10 * i, EventTime::new(1, 0), |out| {
            forward::msgpack::write_json_object_text(out, format!("{{\"i\":{i}}}").as_bytes(), 0).unwrap()
        });
    }
    let wire = b.finish_from("app", "c-9", "web-1/00000000000000aa", 1_000);
    let frames = decode_all(&wire, Limits::default(), 4096).unwrap();
    let Frame::Events(batch) = &frames[0] else { panic!("not events") };
    assert_eq!(batch.mode, forward::Mode::PackedForward);
    assert_eq!((batch.options.size, batch.options.compressed.as_deref()), (Some(100), None));
    let decoded = batch.decode(&Limits::default()).unwrap();
    let last: Value = serde_json::from_slice(decoded.get(99)).unwrap();
    assert_eq!(last, json!({"i": 99}));
    assert_eq!(decoded.origin.expect("origin").range(99), (990, 1_000));
}

#[test]
fn a_chunk_built_in_a_reused_frame_is_the_chunk_built_fresh() {
    let build = |mut b: ChunkBuilder, n: u64| {
        for i in 0..n {
            b.push_encoded_at(10 * i, EventTime::new(1, 0), |out| {
                forward::msgpack::write_json_object_text(out, format!("{{\"i\":{i}}}").as_bytes(), 0).unwrap()
            });
        }
        b.finish_from("app", "c-9", "web-1/00000000000000aa", 10 * n)
    };
    // The previous frame was longer: nothing of it may survive into the next one.
    let used = build(ChunkBuilder::uncompressed(), 500);
    assert_eq!(build(ChunkBuilder::uncompressed_in(used), 100), build(ChunkBuilder::uncompressed(), 100));
}

#[test]
fn gzip_bomb_is_refused_at_the_decompressed_limit() {
    let mut b = ChunkBuilder::new(9);
    let big = "x".repeat(100_000);
    for _ in 0..100 {
        b.push(EventTime::default(), json!({"m": big}).as_object().unwrap());
    }
    let wire = b.finish("bomb", "c");
    assert!(wire.len() < 100_000, "compressed to {}", wire.len());
    let limits = Limits { max_decompressed_bytes: 1_000_000, ..Limits::default() };
    let err = decode_all(&wire, limits, wire.len()).unwrap_err();
    assert!(matches!(err, DecodeError::DecompressedTooLarge { limit: 1_000_000, .. }), "{err}");
    assert!(err.to_string().contains("max_decompressed_bytes=1000000"), "{err}");
}

#[test]
fn entries_limit_names_the_limit_and_the_excess() {
    let mut b = ChunkBuilder::new(1);
    for _ in 0..12 {
        b.push(EventTime::default(), json!({"m": 1}).as_object().unwrap());
    }
    let wire = b.finish("t", "c");
    let limits = Limits { max_entries_per_chunk: 10, ..Limits::default() };
    let err = decode_all(&wire, limits, wire.len()).unwrap_err();
    assert_eq!(err.to_string(), "chunk carries 11 entries, more than max_entries_per_chunk=10 by 1");
}

#[test]
fn oversized_frame_reports_size_and_limit() {
    let wire = rmp_frame(&"y".repeat(5000));
    let limits = Limits { max_frame_bytes: 1000, ..Limits::default() };
    let err = decode_all(&wire, limits, 10).unwrap_err();
    assert!(err.to_string().starts_with("frame of at least"), "{err}");
    assert!(err.to_string().contains("max_frame_bytes=1000 by"), "{err}");
}

fn rmp_frame(msg: &str) -> Vec<u8> {
    let v =
        rmpv::Value::Array(vec!["t".into(), rmpv::Value::from(1u32), rmpv::Value::Map(vec![("m".into(), msg.into())])]);
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, &v).unwrap();
    out
}

#[test]
fn malformed_frames_fail_with_a_reason() {
    let cases: &[(&[u8], &str)] = &[
        (&[0x01], "a frame must be an array or nil"),
        (&[0x91, 0xa1, b't'], "an event frame has 2 to 4 elements"),
        (&[0x93, 0x01, 0x01, 0x80], "tag must be a string"),
        (&[0x93, 0xa1, b't', 0x01, 0x01], "a record must be a map"),
        (&[0x92, 0xa1, b't', 0xc4, 0x02, 0x92, 0x01], "invalid MessagePack: value cut short"),
        (&[0x94, 0xa1, b't', 0x01, 0x80, 0x05], "options must be a map"),
        (&[0xc1], "reserved byte 0xc1"),
    ];
    for (bytes, want) in cases {
        let err = decode_all(bytes, Limits::default(), bytes.len()).map(|_| ()).unwrap_err();
        assert!(err.to_string().contains(want), "{bytes:?}: got {err}, want {want}");
    }
}

#[test]
fn garbage_never_panics() {
    // A deterministic xorshift stream: mutate valid frames and throw random bytes at the decoder.
    let mut seed = 0x9e3779b97f4a7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut b = ChunkBuilder::new(1);
    b.push(EventTime::new(1, 2), json!({"m": "hello"}).as_object().unwrap());
    let valid = [b.finish("t", "c"), rmp_frame("abc")];
    let limits = Limits {
        max_frame_bytes: 4096,
        max_decompressed_bytes: 65536,
        max_entries_per_chunk: 100,
        ..Limits::default()
    };
    for round in 0..20_000 {
        let mut bytes = valid[round % 2].clone();
        for _ in 0..(next() % 4 + 1) {
            let i = (next() as usize) % bytes.len();
            bytes[i] = next() as u8;
        }
        if round % 5 == 0 {
            bytes = (0..(next() % 64)).map(|_| next() as u8).collect();
        }
        let mut codec = ServerCodec::new(limits);
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = codec.decode(&mut buf) {}
    }
}

#[test]
fn before_the_handshake_an_event_frame_fails_on_its_first_bytes() {
    let mut b = ChunkBuilder::new(9);
    b.push(EventTime::default(), json!({"m": "x".repeat(1000)}).as_object().unwrap());
    let wire = b.finish("tag", "c");
    // Only the first byte has arrived: already refused, nothing buffered is decoded.
    let mut codec = ServerCodec::awaiting_ping(Limits::default());
    let err = codec.decode(&mut BytesMut::from(&wire[..1])).unwrap_err();
    assert!(matches!(err, DecodeError::BeforeHandshake), "{err}");
    assert_eq!(err.reason(), "before_handshake");
    // A frame that starts like a PING but is not one fails as soon as it differs.
    let mut codec = ServerCodec::awaiting_ping(Limits::default());
    let err = codec.decode(&mut BytesMut::from(&b"\x96\xa4PONx"[..])).unwrap_err();
    assert!(matches!(err, DecodeError::BeforeHandshake), "{err}");
    // A PING claiming a huge hostname is refused from its header.
    let mut codec = ServerCodec::awaiting_ping(Limits::default());
    let err = codec.decode(&mut BytesMut::from(&b"\x96\xa4PING\xdb\x01\x00\x00\x00"[..])).unwrap_err();
    assert!(matches!(err, DecodeError::FrameTooLarge { .. }), "{err}");
}

#[test]
fn a_ping_and_a_heartbeat_pass_before_the_handshake_and_events_after() {
    let helo = forward::handshake::Helo { nonce: b"n".to_vec(), auth_salt: Vec::new(), keepalive: true };
    let ping = forward::handshake::Ping::answer(&helo, "client", b"salt", "key", None).encode();
    let mut codec = ServerCodec::awaiting_ping(Limits::default());
    let mut buf = BytesMut::from(&[0xc0][..]);
    buf.extend_from_slice(&ping);
    assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Frame::Heartbeat)));
    assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Frame::Ping(_))));
    codec.authenticated();
    let mut b = ChunkBuilder::new(1);
    b.push(EventTime::default(), json!({"m": 1}).as_object().unwrap());
    let mut buf = BytesMut::from(&b.finish("tag", "c")[..]);
    assert!(matches!(codec.decode(&mut buf).unwrap(), Some(Frame::Events(_))));
}

#[test]
fn source_positions_travel_in_the_options_and_must_fit_the_records() {
    let record = json!({"msg": "x"}).as_object().unwrap().clone();
    let mut b = ChunkBuilder::new(1);
    // 5,000 one-byte lines: positions larger than any small option value, taken as bytes.
    for i in 0..5000u64 {
        b.push_at(1_000 + 2 * i, EventTime::new(1, 0), &record);
    }
    let frame = b.finish_from("app", "c-1", "web-1/00000000000000aa", 11_000);
    let frames = decode_all(&frame, Limits::default(), 4096).unwrap();
    let Frame::Events(batch) = &frames[0] else { panic!("{frames:?}") };
    let origin = batch.decode(&Limits::default()).unwrap().origin.expect("origin");
    assert_eq!(origin.source, "web-1/00000000000000aa");
    assert_eq!(origin.positions.len(), 5001);
    assert_eq!((origin.range(0), origin.range(4999)), ((1_000, 1_002), (10_998, 11_000)));

    // A chunk without the options (any other client) has no origin.
    let mut plain = ChunkBuilder::new(1);
    plain.push(EventTime::new(1, 0), &record);
    let frames = decode_all(&plain.finish("app", "c-2"), Limits::default(), 4096).unwrap();
    let Frame::Events(batch) = &frames[0] else { panic!() };
    assert_eq!(batch.decode(&Limits::default()).unwrap().origin, None);

    // Positions that do not fit the records are a malformed chunk, named.
    let mut short = ChunkBuilder::new(1);
    short.push_at(0, EventTime::new(1, 0), &record);
    short.push(EventTime::new(1, 0), &record);
    let err = decode_all(&short.finish_from("app", "c-3", "s", 9), Limits::default(), 4096).unwrap_err();
    assert!(err.to_string().contains("tron_positions holds 2 positions for 2 records (expected 3)"), "{err}");
}

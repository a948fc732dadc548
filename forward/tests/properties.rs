//! Properties of the decoder over generated input, run in CI (`cargo test`): records of any shape
//! survive every Forward mode encoded by an independent encoder (rmpv), the result never depends
//! on how the bytes are split across reads, and mutated frames fail cleanly instead of panicking.
//! `forward/fuzz` explores the same decoder with libFuzzer for longer.

use bytes::BytesMut;
use forward::{ChunkBuilder, EventTime, Frame, Limits, ServerCodec};
use proptest::prelude::*;
use rmpv::Value as Mp;
use serde_json::{Map, Value};
use tokio_util::codec::Decoder;

/// Frames decoded until the input runs out or the first error (its reason), and what was left.
fn decode(bytes: &[u8], step: usize) -> (Vec<Value>, Option<&'static str>) {
    let mut codec = ServerCodec::new(Limits {
        max_frame_bytes: 1 << 16,
        max_decompressed_bytes: 1 << 18,
        max_entries_per_chunk: 1000,
        ..Limits::default()
    });
    let mut buf = BytesMut::new();
    let mut frames = Vec::new();
    for piece in bytes.chunks(step.max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(f)) => match describe(&f) {
                    Ok(v) => frames.push(v),
                    Err(e) => return (frames, Some(e.reason())),
                },
                Ok(None) => break,
                Err(e) => return (frames, Some(e.reason())),
            }
        }
    }
    (frames, None)
}

fn describe(frame: &Frame) -> Result<Value, forward::DecodeError> {
    Ok(match frame {
        Frame::Heartbeat => Value::String("heartbeat".into()),
        Frame::Ping(_) => Value::String("ping".into()),
        Frame::Events(b) => {
            let r = b.decode(&Limits {
                max_decompressed_bytes: 1 << 18,
                max_entries_per_chunk: 1000,
                ..Limits::default()
            })?;
            let entries: Vec<Value> = (0..r.records.len())
                .map(|i| {
                    serde_json::json!([r.records[i].time.unix_nanos(), String::from_utf8(r.get(i).to_vec()).unwrap()])
                })
                .collect();
            serde_json::json!({"tag": b.tag, "entries": entries, "ack": b.ack()})
        }
    })
}

fn scalar() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        // Finite floats only: JSON has no NaN.
        (-1e300f64..1e300).prop_map(Value::from),
        ".{0,40}".prop_map(Value::String),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    scalar().prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn record() -> impl Strategy<Value = Map<String, Value>> {
    prop::collection::btree_map(".{1,12}", value(), 0..6).prop_map(|m| m.into_iter().collect())
}

fn entries() -> impl Strategy<Value = Vec<(u32, u32, Map<String, Value>)>> {
    prop::collection::vec((any::<u32>(), 0u32..1_000_000_000, record()), 1..8)
}

fn to_mp(v: &Value) -> Mp {
    match v {
        Value::Null => Mp::Nil,
        Value::Bool(b) => Mp::Boolean(*b),
        Value::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Mp::from(i),
            (_, Some(u)) => Mp::from(u),
            _ => Mp::F64(n.as_f64().expect("finite")),
        },
        Value::String(s) => Mp::from(s.as_str()),
        Value::Array(a) => Mp::Array(a.iter().map(to_mp).collect()),
        Value::Object(o) => Mp::Map(o.iter().map(|(k, v)| (Mp::from(k.as_str()), to_mp(v))).collect()),
    }
}

fn event_time(secs: u32, nanos: u32) -> Mp {
    let mut data = secs.to_be_bytes().to_vec();
    data.extend_from_slice(&nanos.to_be_bytes());
    Mp::Ext(0, data)
}

fn pack(v: &Mp) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).expect("vec");
    out
}

fn expected(tag: &str, entries: &[(u32, u32, Map<String, Value>)], ack: Option<&str>) -> Value {
    serde_json::json!({
        "tag": tag,
        // Records compare as JSON text: parsing floats back is not exact (serde_json without
        // float_roundtrip), and the text is what Kafka carries.
        "entries": entries.iter().map(|(s, n, r)| serde_json::json!([EventTime::new(*s, *n).unix_nanos(), Value::Object(r.clone()).to_string()])).collect::<Vec<_>>(),
        "ack": ack.map(|a| pack(&Mp::Map(vec![(Mp::from("ack"), Mp::from(a))]))),
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn every_mode_round_trips_any_record(tag in "[a-z]{1,8}(\\.[a-z]{1,8}){0,3}", entries in entries(), step in 1usize..64) {
        let mp_entries: Vec<Mp> =
            entries.iter().map(|(s, n, r)| Mp::Array(vec![event_time(*s, *n), to_mp(&Value::Object(r.clone()))])).collect();
        let options = Mp::Map(vec![(Mp::from("chunk"), Mp::from("c-1"))]);
        // Forward mode: [tag, [entries], options].
        let forward = pack(&Mp::Array(vec![Mp::from(tag.as_str()), Mp::Array(mp_entries.clone()), options.clone()]));
        // PackedForward: [tag, bin(concatenated entries), options].
        let packed: Vec<u8> = mp_entries.iter().flat_map(pack).collect();
        let packed_forward = pack(&Mp::Array(vec![Mp::from(tag.as_str()), Mp::Binary(packed), options]));
        // Message mode, one frame per entry.
        let mut messages = Vec::new();
        for (s, n, r) in &entries {
            messages.extend(pack(&Mp::Array(vec![Mp::from(tag.as_str()), event_time(*s, *n), to_mp(&Value::Object(r.clone()))])));
        }
        // CompressedPackedForward from our own builder.
        let mut builder = ChunkBuilder::new(1);
        for (s, n, r) in &entries {
            builder.push(EventTime::new(*s, *n), r);
        }
        let compressed = builder.finish(&tag, "c-1");
        // And compressed by zstd.
        let mut builder = ChunkBuilder::zstd(1, Vec::new());
        for (s, n, r) in &entries {
            builder.push(EventTime::new(*s, *n), r);
        }
        let zstd = builder.finish(&tag, "c-1");
        // And gzip level 1 by igzip, the agent's default.
        let mut builder = ChunkBuilder::igzip(Vec::new());
        for (s, n, r) in &entries {
            builder.push(EventTime::new(*s, *n), r);
        }
        let igzip = builder.finish(&tag, "c-1");

        let want = expected(&tag, &entries, Some("c-1"));
        for wire in [&forward, &packed_forward, &compressed, &zstd, &igzip] {
            let (frames, error) = decode(wire, step);
            prop_assert_eq!(error, None);
            prop_assert_eq!(frames, vec![want.clone()]);
        }
        let (frames, error) = decode(&messages, step);
        prop_assert_eq!(error, None);
        let one_by_one: Vec<Value> =
            entries.iter().map(|e| expected(&tag, std::slice::from_ref(e), None)).collect();
        prop_assert_eq!(frames, one_by_one);
    }

    #[test]
    fn mutated_frames_decode_the_same_however_they_are_split(
        entries in entries(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        cut in any::<prop::sample::Index>(),
        step in 1usize..17,
        compression in 0..3u8,
    ) {
        let mut builder = match compression {
            0 => ChunkBuilder::new(1),
            1 => ChunkBuilder::zstd(1, Vec::new()),
            _ => ChunkBuilder::igzip(Vec::new()),
        };
        for (s, n, r) in &entries {
            builder.push(EventTime::new(*s, *n), r);
        }
        let mut wire = builder.finish("t", "c");
        wire.extend(pack(&Mp::Array(vec![Mp::from("m"), Mp::from(7), Mp::Map(vec![])])));
        for (at, byte) in &flips {
            let i = at.index(wire.len());
            wire[i] = *byte;
        }
        wire.truncate(cut.index(wire.len() + 1).max(1));
        // Never panics, and a byte-at-a-time reader sees exactly what a whole-buffer reader sees.
        prop_assert_eq!(decode(&wire, step), decode(&wire, wire.len()));
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512), step in 1usize..9) {
        let _ = decode(&bytes, step);
    }
}

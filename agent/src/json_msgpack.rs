//! A JSON object line straight to the MessagePack of its pairs, in one pass that builds nothing:
//! the fast path in front of [`forward::msgpack::write_json_object_pairs`] (serde_json), which
//! stays the reference.
//!
//! [`object_pairs`] answers only when it is sure to write the very bytes serde_json's path
//! writes, and `None` means "ask serde_json", never "invalid". It is unsure of keys with escapes
//! (they would need decoding to be compared), `\u` escapes, control characters, numbers with an
//! exponent or beyond the range it reproduces exactly, a watched value that is an array or an
//! object, and nesting deeper than [`MAX_DEPTH`]. serde_json's visitor calls per token, and its
//! byte-at-a-time string reads, were most of the relay destination's parse, 45 % of its CPU;
//! here a string is searched sixteen bytes at a time and copied whole. The same search notes bytes
//! of 0x80 and above, so UTF-8 is checked only in the strings that hold one (the only place a
//! valid line can): a check of every whole line was 5 % of the relay destination's CPU.

use forward::msgpack::{close_container, is_name, open_container, ObjectPairs, WatchedValue};
use std::borrow::Cow;
use tron_service::json_scan::{skip_ws, string_end, unescaped, JsonString};

/// Deeper nesting goes to serde_json (its own limit is 128).
const MAX_DEPTH: usize = 64;

/// Powers of ten that are exact in an f64: a decimal with at most 22 digits after the point and
/// a significand below 2^53 is one exact division, the same one serde_json makes.
const POW10: [f64; 23] = [
    1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16, 1e17, 1e18, 1e19, 1e20,
    1e21, 1e22,
];

/// Writes the pairs of the JSON object `line` to `out` as MessagePack (no map header), keys in
/// their order, and reports what it saw: exactly what `write_json_object_pairs` writes and
/// reports for the same line. On `None` `out` may hold partial pairs, which the caller drops.
pub fn object_pairs<'t>(
    b: &'t [u8],
    out: &mut Vec<u8>,
    watch: Option<&str>,
    reserved: impl Fn(&str) -> bool,
) -> Option<ObjectPairs<'t>> {
    let mut seen = ObjectPairs { pairs: 0, watched: None, names_reserved: false };
    let mut i = skip_ws(b, 0);
    if b.get(i) != Some(&b'{') {
        return None;
    }
    i = skip_ws(b, i + 1);
    if b.get(i) == Some(&b'}') {
        i += 1;
    } else {
        loop {
            let JsonString { end: key_end, escapes, non_ascii } = string_end(b, i)?;
            if escapes > 0 {
                return None;
            }
            let key = text(&b[i + 1..key_end - 1], non_ascii)?;
            write_str_header(out, key.len());
            out.extend_from_slice(key.as_bytes());
            seen.pairs += 1;
            seen.names_reserved |= reserved(key);
            i = skip_ws(b, key_end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            let start = skip_ws(b, i + 1);
            i = value(b, start, 1, out)?;
            if watch.is_some_and(|watch| is_name(key, watch)) {
                // An array or an object is left to serde_json's path, which writes it from a tree.
                if matches!(b[start], b'[' | b'{') {
                    return None;
                }
                seen.watched = Some(watched_value(std::str::from_utf8(&b[start..i]).ok()?)?);
            }
            i = skip_ws(b, i);
            match *b.get(i)? {
                b',' => i = skip_ws(b, i + 1),
                b'}' => {
                    i += 1;
                    break;
                }
                _ => return None,
            }
        }
    }
    (skip_ws(b, i) == b.len()).then_some(seen)
}

/// A watched key's value from its JSON text, as serde_json's path keeps it: a string borrowed
/// from the line when it has no escape, anything else read by serde_json (rare: event times are
/// mostly strings). `None` when serde_json refuses it.
pub fn watched_value(text: &str) -> Option<WatchedValue<'_>> {
    match text.as_bytes()[0] {
        b'"' if !text.contains('\\') => Some(WatchedValue::Str(Cow::Borrowed(&text[1..text.len() - 1]))),
        _ => serde_json::from_str(text).ok(),
    }
}

/// Transcodes the value at `i`; its end.
fn value(b: &[u8], i: usize, depth: usize, out: &mut Vec<u8>) -> Option<usize> {
    match *b.get(i)? {
        b'"' => string(b, i, out),
        b'{' => container(b, i, depth, true, out),
        b'[' => container(b, i, depth, false, out),
        b't' => literal(b, i, b"true", 0xc3, out),
        b'f' => literal(b, i, b"false", 0xc2, out),
        b'n' => literal(b, i, b"null", 0xc0, out),
        b'-' | b'0'..=b'9' => number(b, i, out),
        _ => None,
    }
}

fn literal(b: &[u8], i: usize, text: &[u8], marker: u8, out: &mut Vec<u8>) -> Option<usize> {
    b[i..].starts_with(text).then(|| {
        out.push(marker);
        i + text.len()
    })
}

/// An object or an array: its header patched once its length is known, as serde_json's path does.
fn container(b: &[u8], i: usize, depth: usize, object: bool, out: &mut Vec<u8>) -> Option<usize> {
    if depth >= MAX_DEPTH {
        return None;
    }
    let (close, marker32, fix_marker) = if object { (b'}', 0xdf, 0x80) } else { (b']', 0xdd, 0x90) };
    let at = open_container(out, marker32);
    let mut n = 0u32;
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&close) {
        close_container(out, at, 0, fix_marker);
        return Some(i + 1);
    }
    loop {
        if object {
            // A nested key is only written, never compared: an escaped one is decoded like any
            // string.
            i = string(b, i, out)?;
            i = skip_ws(b, i);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
        }
        i = value(b, i, depth + 1, out)?;
        n += 1;
        i = skip_ws(b, i);
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            c if c == close => {
                close_container(out, at, n, fix_marker);
                return Some(i + 1);
            }
            _ => return None,
        }
    }
}

/// A string's bytes as text: checked to be UTF-8 only when the search saw a byte of 0x80 or
/// above.
fn text(raw: &[u8], non_ascii: bool) -> Option<&str> {
    if non_ascii {
        return std::str::from_utf8(raw).ok();
    }
    // SAFETY: the search found no byte of 0x80 or above, and ASCII is UTF-8.
    Some(unsafe { std::str::from_utf8_unchecked(raw) })
}

/// Writes the string at `i` (decoded) as a MessagePack str; its end.
fn string(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    let JsonString { end, escapes, non_ascii } = string_end(b, i)?;
    let raw = &b[i + 1..end - 1];
    text(raw, non_ascii)?; // escapes are ASCII: the raw bytes are UTF-8 if the decoded ones are
    write_str_header(out, raw.len() - escapes);
    if escapes == 0 {
        out.extend_from_slice(raw);
        return Some(end);
    }
    let mut from = 0;
    while let Some(at) = memchr::memchr(b'\\', &raw[from..]) {
        out.extend_from_slice(&raw[from..from + at]);
        out.push(unescaped(raw[from + at + 1]).expect("checked by string_end"));
        from += at + 2;
    }
    out.extend_from_slice(&raw[from..]);
    Some(end)
}

/// The header `rmp::encode::write_str_len` writes, without its `Write` calls and their errors
/// (4 % of the relay destination's CPU through them).
#[inline]
fn write_str_header(out: &mut Vec<u8>, len: usize) {
    match len {
        0..32 => out.push(0xa0 | len as u8),
        32..256 => out.extend_from_slice(&[0xd9, len as u8]),
        256..65536 => {
            out.push(0xda);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(0xdb);
            out.extend_from_slice(&(len as u32).to_be_bytes());
        }
    }
}

/// A number, written as serde_json's path writes it: an integer as the smallest uint (or sint
/// when negative), `-0` and a decimal as f64. Exponents, integers beyond 64 bits and decimals
/// that serde_json would not compute in one exact step are left to it.
fn number(b: &[u8], i: usize, out: &mut Vec<u8>) -> Option<usize> {
    let negative = b[i] == b'-';
    let mut at = i + usize::from(negative);
    let mut significand: u64 = match *b.get(at)? {
        b'0' => {
            at += 1;
            0
        }
        c @ b'1'..=b'9' => {
            at += 1;
            u64::from(c - b'0')
        }
        _ => return None,
    };
    // A leading zero followed by a digit ends the number at the zero; the digit then fails the
    // caller's check for `,` or a closing bracket, as serde_json fails it.
    if significand != 0 {
        while let Some(&c @ b'0'..=b'9') = b.get(at) {
            significand = significand.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            at += 1;
        }
    }
    let mut fraction_digits = 0usize;
    if b.get(at) == Some(&b'.') {
        at += 1;
        while let Some(&c @ b'0'..=b'9') = b.get(at) {
            significand = significand.checked_mul(10)?.checked_add(u64::from(c - b'0'))?;
            fraction_digits += 1;
            at += 1;
        }
        if fraction_digits == 0 {
            return None;
        }
    }
    if let Some(b'e' | b'E') = b.get(at) {
        return None;
    }
    if fraction_digits > 0 {
        if significand >= 1 << 53 || fraction_digits >= POW10.len() {
            return None;
        }
        let f = significand as f64 / POW10[fraction_digits];
        rmp::encode::write_f64(out, if negative { -f } else { f }).expect("vec");
    } else if !negative {
        rmp::encode::write_uint(out, significand).expect("vec");
    } else {
        // serde_json: `-0` and integers below i64's range are floats.
        let negated = (significand as i64).wrapping_neg();
        if negated >= 0 {
            rmp::encode::write_f64(out, -(significand as f64)).expect("vec");
        } else {
            rmp::encode::write_sint(out, negated).expect("vec");
        }
    }
    Some(at)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use proptest::strategy::ValueTree;
    use tron_service::json_scan::corpus;

    /// serde_json's answer, from the reference path.
    type Answer = (Vec<u8>, u32, Option<WatchedValue<'static>>, bool);

    fn reference(line: &[u8], watch: Option<&str>) -> Option<Answer> {
        let mut out = Vec::new();
        let seen = forward::msgpack::write_json_object_pairs(&mut out, line, watch, |k| k == "host").ok()?;
        Some((out, seen.pairs, seen.watched.map(owned), seen.names_reserved))
    }

    fn fast(line: impl AsRef<[u8]>, watch: Option<&str>) -> Option<Answer> {
        let mut out = Vec::new();
        let seen = object_pairs(line.as_ref(), &mut out, watch, |k| k == "host")?;
        Some((out, seen.pairs, seen.watched.map(owned), seen.names_reserved))
    }

    fn owned(v: WatchedValue) -> WatchedValue<'static> {
        match v {
            WatchedValue::Str(s) => WatchedValue::Str(Cow::Owned(s.into_owned())),
            WatchedValue::Other(v) => WatchedValue::Other(v),
        }
    }

    /// When the fast path answers, serde_json's path gives the same bytes and the same report.
    fn agrees(line: impl AsRef<[u8]>, watch: Option<&str>) -> bool {
        let line = line.as_ref();
        match fast(line, watch) {
            Some(answer) => {
                assert_eq!(Some(&answer), reference(line, watch).as_ref(), "{:?}", String::from_utf8_lossy(line));
                true
            }
            None => false,
        }
    }

    #[test]
    fn usual_records_are_answered_as_serde_json_answers_them() {
        for text in [
            r#"{"time":"2026-12-05T07:00:00.000Z","seq":1,"method":"GET","path":"/a","status":200,"pad":"xxxxxxxxxxxxxxxx"}"#,
            r#" { "a" : 1 , "b" : [ 1 , 2.5 , -0 , -0.0, true , false , null , { } , [ ] ] , "c" : { "d" : "e\"f\\g\/h\n\b\f\r\t" } } "#,
            r#"{}"#,
            r#"{"a":"","b":"é ü 日本","a":2,"host":"x","ключ":"значение","é":"\"é\""}"#,
            r#"{"n":-12.75,"m":0.5,"o":100000,"p":-9223372036854775808,"q":-9223372036854775809,"r":18446744073709551615}"#,
            r#"{"t":1700000000,"x":1}"#,
            r#"{"t":"a\"b","x":1}"#,
            r#"{"t":-1.25}"#,
            r#"{"t":null}"#,
            r#"{"d":{"k\"ey":"v","n":{"m":[[[]]]}}}"#,
        ] {
            assert!(agrees(text, Some("t")), "{text}");
        }
        let huge = format!(r#"{{"a":"{}","b":"é{}","t":"x"}}"#, "y".repeat(70_000), "z".repeat(300));
        assert!(agrees(&huge, Some("t")));
        let long: String = (0..40).map(|i| format!("\"k{i}\":\"{}\",", "v".repeat(i * 9))).collect();
        assert!(agrees(
            format!("{{{long}\"arr\":[{}]}}", (0..70).map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
            None
        ));
    }

    #[test]
    fn unsure_or_invalid_texts_go_to_serde_json() {
        // Besides the scan's list: what this transcoder writes differently from serde_json's
        // path unless serde_json computes it (numbers), and a watched value built as a tree.
        let own = [
            r#"{"a": -01}"#,
            r#"{"a": -}"#,
            r#"{"a": 1e5}"#,
            r#"{"a": 18446744073709551616}"#,
            r#"{"a": 0.12345678901234567890123}"#,
            r#"{"a": 9007199254740993.5}"#,
            r#"{"t": [1]}"#,
            r#"{"t": {"x": 1}}"#,
        ];
        for text in corpus::UNSURE_OR_INVALID.iter().chain(&own) {
            assert!(fast(text, Some("t")).is_none(), "{text}");
        }
        for line in [
            &b"{\"a\":\"\xff\"}"[..],
            b"{\"\xc3\":1}",
            b"{\"a\":\"\xc3\"}",
            b"{\"a\":1,\xc3\xa9:2}",
            b"{\"a\":\"\xed\xa0\x80\"}",
        ] {
            assert!(fast(line, Some("t")).is_none(), "{line:?}");
            assert!(reference(line, Some("t")).is_none(), "{line:?}");
        }
        let deep = format!(r#"{{"a": {}1{}}}"#, "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(fast(&deep, None).is_none());
        let nested = format!(r#"{{"a": {}1{}}}"#, "[".repeat(MAX_DEPTH - 2), "]".repeat(MAX_DEPTH - 2));
        assert!(agrees(&nested, None));
    }

    #[test]
    fn every_mutation_of_a_record_is_answered_as_serde_json_would_or_not_at_all() {
        // Each record with every character replaced by each of a set of JSON-significant ones,
        // deleted, or doubled: wherever the fast path answers, serde_json's path agrees.
        let records = [
            r#"{"time":"2026-12-05T07:00:00Z","seq":12,"ok":true,"n":null,"a":[1,{"b":"c\"d"}],"f":-1.5,"host":"h"}"#,
            r#"{ "x" : { "y" : [ "z" , 0 , 10.25 ] } , "w" : "é\\" , "time" : 1700000000 }"#,
        ];
        let (mut answered, mut total) = (0, 0);
        for record in records {
            for v in corpus::single_edits(record) {
                total += 1;
                answered += usize::from(agrees(&v, Some("time")));
            }
        }
        assert!(answered > total / 10, "the fast path answers a fair share: {answered} of {total}");
    }

    /// JSON text of arbitrary values, with white space and escapes where JSON allows them.
    fn json_value() -> impl Strategy<Value = String> {
        let string = proptest::collection::vec(
            prop_oneof![
                8 => "[a-zA-Z0-9 _.:/-]{0,12}",
                1 => Just("\\\"".to_string()),
                1 => Just("\\\\".to_string()),
                1 => Just("\\/".to_string()),
                1 => Just("\\n\\t\\r\\b\\f".to_string()),
                1 => Just("é日本".to_string()),
                // Unsure: serde_json answers.
                1 => Just("\\u00e9".to_string()),
            ],
            0..4,
        )
        .prop_map(|parts| format!("\"{}\"", parts.concat()));
        let number = prop_oneof![
            4 => any::<u64>().prop_map(|n| n.to_string()),
            4 => any::<i64>().prop_map(|n| n.to_string()),
            4 => (any::<i32>(), 0u32..10_000_000, 1usize..8).prop_map(|(i, f, w)| format!("{i}.{f:0w$}")),
            1 => Just("-0".to_string()),
            // Mostly unsure (too many digits, an exponent): serde_json answers.
            1 => any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(|f| f.to_string()),
            1 => Just("1e3".to_string()),
        ];
        let leaf = prop_oneof![
            string.clone(),
            number,
            Just("true".to_string()),
            Just("false".to_string()),
            Just("null".to_string())
        ];
        let ws = prop_oneof![Just(""), Just(""), Just(" "), Just("\n\t ")];
        leaf.prop_recursive(4, 32, 6, move |inner| {
            prop_oneof![
                (proptest::collection::vec(inner.clone(), 0..6), ws.clone())
                    .prop_map(|(items, ws)| format!("[{ws}{}{ws}]", items.join(&format!("{ws},{ws}")))),
                (proptest::collection::vec((string.clone(), inner), 0..6), ws.clone()).prop_map(|(pairs, ws)| {
                    let pairs: Vec<String> = pairs.into_iter().map(|(k, v)| format!("{k}{ws}:{ws}{v}")).collect();
                    format!("{{{ws}{}{ws}}}", pairs.join(","))
                }),
            ]
        })
    }

    fn json_object() -> impl Strategy<Value = String> {
        let key = prop_oneof![
            12 => "[a-z]{1,6}",
            2 => Just("t".to_string()),
            1 => Just("host".to_string()),
            1 => Just("k\\\"q".to_string()) // unsure at the top level
        ];
        proptest::collection::vec((key, json_value()), 0..10).prop_map(|pairs| {
            let pairs: Vec<String> = pairs.into_iter().map(|(k, v)| format!("\"{k}\":{v}")).collect();
            format!("{{{}}}", pairs.join(","))
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn arbitrary_objects_are_answered_as_serde_json_answers_them(text in json_object()) {
            agrees(&text, Some("t"));
        }

        #[test]
        fn arbitrary_objects_with_one_byte_changed_are_answered_as_serde_json_would_or_not_at_all(
            text in json_object(), at in any::<prop::sample::Index>(), byte in any::<u8>()
        ) {
            // Not UTF-8 either, often: serde_json's path refuses it, so the fast one must not answer.
            let mut bytes = text.into_bytes();
            if !bytes.is_empty() {
                let at = at.index(bytes.len());
                bytes[at] = byte;
            }
            agrees(&bytes, Some("t"));
        }
    }

    #[test]
    fn most_generated_objects_take_the_fast_path() {
        // The property above must not pass by declining everything.
        let mut runner = proptest::test_runner::TestRunner::deterministic();
        let (mut answered, total) = (0, 500);
        for _ in 0..total {
            let text = json_object().new_tree(&mut runner).unwrap().current();
            answered += usize::from(agrees(&text, Some("t")));
        }
        assert!(answered > total / 4, "{answered} of {total}");
    }
}

//! The values of a JSON object's top-level keys, as slices of its text, found by one pass that
//! checks the whole text is one valid object (as serde_json would) and builds nothing.
//!
//! A fast path in front of serde_json, which stays the reference: `top_level` answers only when
//! it is sure, and `None` means "ask serde_json", never "invalid". It is unsure of keys with
//! escapes (they would need decoding to be compared), `\u` escapes anywhere, control characters,
//! and nesting deeper than [`MAX_DEPTH`]. serde_json's visitor machinery per token was about a
//! tenth of the CSV sink's CPU; here a string is skipped sixteen bytes at a time
//! (eight where there is no SSE2).

use crate::swar;

// The scan's functions are `#[inline]`: `top_level` is generic, so it is compiled in the crate
// that calls it (the sink, the agent), and without the attribute every string and value of every
// record would be a call across crates into code that cannot be inlined there.
use std::ops::Range;

/// Deeper nesting goes to serde_json (its own limit is 128).
const MAX_DEPTH: usize = 64;

/// Calls `keep(key, value, escaped)` for every top-level pair, in order, values as their JSON
/// text; `escaped` says whether a string value has an escape (false for other values), so its
/// reader need not search it again. On `None` the calls made so far are to be forgotten.
pub fn top_level<'a>(text: &'a str, mut keep: impl FnMut(&'a str, &'a str, bool)) -> Option<()> {
    let b = text.as_bytes();
    let start = skip_ws(b, 0);
    if b.get(start) != Some(&b'{') {
        return None;
    }
    let end = container_end(b, start, 0, b'}', true, &mut |key: Range<usize>, key_escaped, value, value_escaped| {
        // An escaped key would need decoding to be compared; the string scan already said
        // whether it has an escape, so the key is not searched again.
        if key_escaped {
            return None;
        }
        keep(&text[key.start + 1..key.end - 1], &text[value], value_escaped);
        Some(())
    })?;
    (skip_ws(b, end) == b.len()).then_some(())
}

#[inline]
pub fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while let Some(b' ' | b'\t' | b'\n' | b'\r') = b.get(i) {
        i += 1;
    }
    i
}

/// The end of the value starting at `i`, and whether it is a string with an escape.
#[inline]
fn value_end(b: &[u8], i: usize, depth: usize) -> Option<(usize, bool)> {
    let end = match *b.get(i)? {
        b'"' => return string_end(b, i).map(|s| (s.end, s.escapes > 0)),
        b'{' => container_end(b, i, depth, b'}', true, &mut |_, _, _, _| Some(())),
        b'[' => container_end(b, i, depth, b']', false, &mut |_, _, _, _| Some(())),
        b't' => literal_end(b, i, b"true"),
        b'f' => literal_end(b, i, b"false"),
        b'n' => literal_end(b, i, b"null"),
        b'-' | b'0'..=b'9' => number_end(b, i),
        _ => None,
    };
    end.map(|end| (end, false))
}

/// The end past the `close` of the object or array at `i`. Each member of an object goes to
/// `member` as the range of its key (quotes included), whether the key has an escape, the
/// range of its value and whether the value is a string with an escape; `None` from it makes
/// the scan unsure. Generic rather than `dyn`, so the
/// top level's member call is inlined into the loop that runs once per key of every record.
fn container_end<M: FnMut(Range<usize>, bool, Range<usize>, bool) -> Option<()>>(
    b: &[u8],
    i: usize,
    depth: usize,
    close: u8,
    object: bool,
    member: &mut M,
) -> Option<usize> {
    if depth >= MAX_DEPTH {
        return None;
    }
    let mut i = skip_ws(b, i + 1);
    if b.get(i) == Some(&close) {
        return Some(i + 1);
    }
    loop {
        let mut key = i..i;
        let mut key_escaped = false;
        if object {
            let key_string = string_end(b, i)?;
            (key.end, key_escaped) = (key_string.end, key_string.escapes > 0);
            i = skip_ws(b, key.end);
            if b.get(i) != Some(&b':') {
                return None;
            }
            i = skip_ws(b, i + 1);
        }
        let (end, value_escaped) = value_end(b, i, depth + 1)?;
        let value = i..end;
        i = skip_ws(b, value.end);
        if object {
            member(key, key_escaped, value, value_escaped)?;
        }
        match *b.get(i)? {
            b',' => i = skip_ws(b, i + 1),
            c if c == close => return Some(i + 1),
            _ => return None,
        }
    }
}

#[inline]
fn literal_end(b: &[u8], i: usize, literal: &[u8]) -> Option<usize> {
    b[i..].starts_with(literal).then_some(i + literal.len())
}

/// `-?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)?`
#[inline]
fn number_end(b: &[u8], mut i: usize) -> Option<usize> {
    if b.get(i) == Some(&b'-') {
        i += 1;
    }
    match *b.get(i)? {
        b'0' => i += 1,
        b'1'..=b'9' => i = digits_end(b, i),
        _ => return None,
    }
    if b.get(i) == Some(&b'.') {
        let end = digits_end(b, i + 1);
        if end == i + 1 {
            return None;
        }
        i = end;
    }
    if let Some(b'e' | b'E') = b.get(i) {
        i += 1;
        if let Some(b'+' | b'-') = b.get(i) {
            i += 1;
        }
        let end = digits_end(b, i);
        if end == i {
            return None;
        }
        i = end;
    }
    Some(i)
}

#[inline]
fn digits_end(b: &[u8], mut i: usize) -> usize {
    while b.get(i).is_some_and(u8::is_ascii_digit) {
        i += 1;
    }
    i
}

/// What the search of one string found.
pub struct JsonString {
    /// Past its closing quote.
    pub end: usize,
    /// Simple escapes in it (each decodes to one byte: [`unescaped`]).
    pub escapes: usize,
    /// Whether it holds a byte of 0x80 or above, so its UTF-8 needs checking in text that is not
    /// known to be UTF-8 already.
    pub non_ascii: bool,
}

/// The string starting at `i`. Simple escapes are checked and passed; `\u` escapes and control
/// characters make it unsure.
#[inline]
pub fn string_end(b: &[u8], i: usize) -> Option<JsonString> {
    if b.get(i) != Some(&b'"') {
        return None;
    }
    let mut at = i + 1;
    let mut escapes = 0;
    let mut non_ascii = false;
    loop {
        at = next_special(b, at, &mut non_ascii);
        match *b.get(at)? {
            b'"' => return Some(JsonString { end: at + 1, escapes, non_ascii }),
            b'\\' => {
                unescaped(*b.get(at + 1)?)?;
                escapes += 1;
                at += 2;
            }
            _ => return None,
        }
    }
}

/// The byte a simple escape (`\` and this) stands for.
#[inline]
pub fn unescaped(c: u8) -> Option<u8> {
    Some(match c {
        b'"' => b'"',
        b'\\' => b'\\',
        b'/' => b'/',
        b'b' => 0x08,
        b'f' => 0x0c,
        b'n' => b'\n',
        b'r' => b'\r',
        b't' => b'\t',
        _ => return None,
    })
}

/// The first `"`, `\` or control character at or after `i` (or the end); `non_ascii` is set
/// when a byte of 0x80 or above comes before it. A block at a time ([`special_in_block`]), then
/// a byte at a time.
#[inline]
pub fn next_special(b: &[u8], mut i: usize, non_ascii: &mut bool) -> usize {
    while let Some((width, special, high)) = special_in_block(b, i) {
        *non_ascii |= high;
        match special {
            Some(at) => return i + at,
            None => i += width,
        }
    }
    while let Some(&c) = b.get(i) {
        if c == b'"' || c == b'\\' || c < 0x20 {
            break;
        }
        *non_ascii |= c >= 0x80;
        i += 1;
    }
    i
}

/// The block at `i` searched whole: its width, the index of its first special byte, and whether
/// a byte of 0x80 or above comes before that (or anywhere in it, when it has none). Sixteen
/// bytes with SSE2 (every x86-64): half the steps of SWAR's eight on long strings, and one
/// compare per kind of byte instead of SWAR's arithmetic on short ones; the string search was
/// the largest share of the agent's relay destination (bench/RESULTS.md). `None` when fewer
/// than eight bytes are left. Always inlined: left to the compiler, the scan took 3-5 % longer.
#[inline(always)]
fn special_in_block(b: &[u8], i: usize) -> Option<(usize, Option<usize>, bool)> {
    #[cfg(target_arch = "x86_64")]
    if let Some(block) = crate::sse2::Block::at(b, i) {
        let special = block.equal(b'"').or(block.equal(b'\\')).or(block.at_most(0x1f)).bits();
        let high = block.non_ascii();
        return Some(match special {
            0 => (16, None, high != 0),
            _ => {
                let at = special.trailing_zeros();
                (16, Some(at as usize), high & ((1 << at) - 1) != 0)
            }
        });
    }
    let word = swar::word_at(b, i)?;
    let flags = swar::equal(word, b'"') | swar::equal(word, b'\\') | swar::below(word, 0x20);
    Some(match swar::first(flags) {
        Some(at) => (8, Some(at), swar::before(swar::non_ascii(word), at) != 0),
        None => (8, None, swar::non_ascii(word) != 0),
    })
}

/// Texts for the tests of every JSON fast path in front of serde_json (this scan, the agent's
/// transcoder): what each must leave to serde_json, and the one-character edits of a record
/// that each must answer as serde_json would or not at all.
#[doc(hidden)]
pub mod corpus {
    /// Not one JSON object, or one with what a fast path is unsure of (a `\u` escape, an escaped
    /// key, a control character in a string).
    pub const UNSURE_OR_INVALID: &[&str] = &[
        r#"[1, 2]"#,
        r#"{"a": 1} x"#,
        r#"{"a": 1"#,
        r#""a""#,
        r#"{"a": 01}"#,
        r#"{"a": 1.}"#,
        r#"{"a": .5}"#,
        r#"{"a": 1e}"#,
        r#"{"a": tru}"#,
        r#"{"a": truex}"#,
        r#"{"a": "\u0041"}"#,
        r#"{"\u0061": 1}"#,
        r#"{"a\"b": 1}"#,
        "{\"a\": \"tab\tinside\"}",
        r#"{"a": "\x"}"#,
        r#"{"a": 1,}"#,
        r#"{"a" 1}"#,
        r#"{"a": [1,]}"#,
        r#"{"a": {"b"}}"#,
        r#"{a: 1}"#,
        "",
    ];

    /// JSON-significant characters that [`single_edits`] puts in place of each character.
    pub const ALPHABET: &[&str] =
        &["{", "}", "[", "]", "\"", "\\", ":", ",", " ", "0", "9", "-", ".", "e", "t", "\t", "x", "é", "n"];

    /// `record` with each character deleted, doubled, or replaced by each of `ALPHABET`.
    pub fn single_edits(record: &str) -> impl Iterator<Item = String> + '_ {
        record.char_indices().flat_map(move |(at, c)| {
            let (head, rest) = (&record[..at], &record[at + c.len_utf8()..]);
            [format!("{head}{rest}"), format!("{head}{c}{c}{rest}")]
                .into_iter()
                .chain(ALPHABET.iter().map(move |s| format!("{head}{s}{rest}")))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::de::{MapAccess, Visitor};
    use serde::Deserializer as _;
    use serde_json::value::RawValue;

    /// serde_json's answer: every top-level pair with its value's text, or None when the text is
    /// not one JSON object.
    fn reference(text: &str) -> Option<Vec<(String, String)>> {
        struct Pairs;
        impl<'de> Visitor<'de> for Pairs {
            type Value = Vec<(String, String)>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: &RawValue = map.next_value()?;
                    pairs.push((key, value.get().to_string()));
                }
                Ok(pairs)
            }
        }
        let mut de = serde_json::Deserializer::from_str(text);
        let pairs = (&mut de).deserialize_map(Pairs).ok()?;
        de.end().ok()?;
        Some(pairs)
    }

    fn fast(text: &str) -> Option<Vec<(String, String)>> {
        let mut pairs = Vec::new();
        top_level(text, |k, v, escaped| {
            assert_eq!(escaped, v.starts_with('"') && v.contains('\\'), "{v:?} in {text:?}");
            pairs.push((k.to_string(), v.to_string()))
        })?;
        Some(pairs)
    }

    /// When the fast path answers, serde_json agrees.
    fn agrees(text: &str) -> bool {
        match fast(text) {
            Some(pairs) => {
                assert_eq!(Some(&pairs), reference(text).as_ref(), "{text:?}");
                true
            }
            None => false,
        }
    }

    #[test]
    fn usual_records_are_answered_and_match_serde_json() {
        for text in [
            r#"{"time":"2026-12-05T07:00:00.000Z","seq":1,"method":"GET","path":"/a","status":200,"pad":"xxxxxxxxxxxxxxxx"}"#,
            r#" { "a" : 1 , "b" : [ 1 , 2.5e-3 , -0 , true , false , null , { } , [ ] ] , "c" : { "d" : "e\"f\\g\/h\n" } } "#,
            r#"{}"#,
            r#"{"a":"","b":"é ü 日本","a":2}"#,
            r#"{"n":-12.75E+10,"m":0.5,"o":1e5}"#,
        ] {
            assert!(agrees(text), "{text}");
        }
    }

    #[test]
    fn unsure_or_invalid_texts_go_to_serde_json() {
        for text in corpus::UNSURE_OR_INVALID {
            assert!(fast(text).is_none(), "{text}");
        }
        let deep = format!(r#"{{"a": {}1{}}}"#, "[".repeat(MAX_DEPTH), "]".repeat(MAX_DEPTH));
        assert!(fast(&deep).is_none());
        assert!(agrees(&format!(r#"{{"a": {}1{}}}"#, "[".repeat(MAX_DEPTH - 2), "]".repeat(MAX_DEPTH - 2))));
    }

    #[test]
    fn every_mutation_of_a_record_is_answered_as_serde_json_would_or_not_at_all() {
        // Each record with every byte position replaced by each of a set of JSON-significant
        // characters, deleted, or doubled: wherever the fast path answers, serde_json agrees.
        let records = [
            r#"{"time":"2026-12-05T07:00:00Z","seq":12,"ok":true,"n":null,"a":[1,{"b":"c\"d"}],"f":-1.5e3}"#,
            r#"{ "x" : { "y" : [ "z" , 0 ] } , "w" : "é\\" }"#,
        ];
        let (mut answered, mut total) = (0, 0);
        for record in records {
            for v in corpus::single_edits(record) {
                total += 1;
                answered += usize::from(agrees(&v));
            }
        }
        eprintln!("answered {answered} of {total} mutations");
        assert!(answered > total / 10, "the fast path answers a fair share: {answered} of {total}");
    }

    #[test]
    fn the_first_special_byte_and_any_high_byte_before_it_are_found_from_any_start() {
        // Lengths past three 16-byte steps, a high byte (or none) and a special byte (or none)
        // anywhere, searched from every start: each width's path and every hand-over between them.
        for len in 0..52 {
            for high in (0..=len).step_by(3) {
                for special_at in 0..=len {
                    let mut b = vec![b'a'; len];
                    if high < len {
                        b[high] = 0xe9;
                    }
                    if special_at < len {
                        b[special_at] = [b'"', b'\\', 0x00, 0x1f][special_at % 4];
                    }
                    for start in 0..=len.min(17) {
                        let expected = b[start..]
                            .iter()
                            .position(|&c| c == b'"' || c == b'\\' || c < 0x20)
                            .map_or(len, |p| start + p);
                        let mut non_ascii = false;
                        assert_eq!(next_special(&b, start, &mut non_ascii), expected, "{b:?} from {start}");
                        assert_eq!(non_ascii, b[start..expected].iter().any(|&c| c >= 0x80), "{b:?} from {start}");
                    }
                }
            }
        }
    }

    #[test]
    fn the_first_special_byte_is_found_wherever_it_is() {
        for len in 0..40 {
            for at in 0..=len {
                for special in [b'"', b'\\', 0x00, 0x1f] {
                    let mut b = vec![b'a'; len];
                    b.extend_from_slice(&[0xc3, 0xa9, 0x7f, 0x20]);
                    if at < len {
                        b[at] = special;
                        for (k, byte) in b.iter_mut().enumerate().skip(at + 1) {
                            *byte = [b'"', 0x01, 0xff, b'\\'][k % 4];
                        }
                    }
                    let expected = b.iter().position(|&c| c == b'"' || c == b'\\' || c < 0x20).unwrap_or(b.len());
                    let mut non_ascii = false;
                    assert_eq!(next_special(&b, 0, &mut non_ascii), expected, "{b:?}");
                    assert_eq!(non_ascii, b[..expected].iter().any(|&c| c >= 0x80), "{b:?}");
                }
            }
        }
    }
}

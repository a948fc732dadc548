//! Writes JSON as MessagePack without an intermediate tree, for the agent's hot path: from a
//! `serde_json::Value` (records the agent had to build) or straight from JSON text (records read
//! as JSON lines, transcoded as they are parsed).

use serde::de::{DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde_json::Value;
use std::fmt;

pub fn write_json(out: &mut Vec<u8>, v: &Value) {
    // Writing into a Vec cannot fail, so the rmp results are infallible here.
    match v {
        Value::Null => rmp::encode::write_nil(out).expect("vec"),
        Value::Bool(b) => rmp::encode::write_bool(out, *b).expect("vec"),
        Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                rmp::encode::write_uint(out, u).expect("vec");
            } else if let Some(i) = n.as_i64() {
                rmp::encode::write_sint(out, i).expect("vec");
            } else {
                rmp::encode::write_f64(out, n.as_f64().unwrap_or(0.0)).expect("vec");
            }
        }
        Value::String(s) => rmp::encode::write_str(out, s).expect("vec"),
        Value::Array(items) => {
            rmp::encode::write_array_len(out, items.len() as u32).expect("vec");
            for item in items {
                write_json(out, item);
            }
        }
        Value::Object(map) => write_json_map(out, map),
    }
}

pub fn write_json_map(out: &mut Vec<u8>, map: &serde_json::Map<String, Value>) {
    rmp::encode::write_map_len(out, map.len() as u32).expect("vec");
    for (k, v) in map {
        rmp::encode::write_str(out, k).expect("vec");
        write_json(out, v);
    }
}

/// Transcodes a JSON object's text to a MessagePack map, keys in their order, numbers and
/// strings as [`write_json`] writes them. The map's header counts `extra` more pairs, which the
/// caller appends. On error (the text is not one JSON object) `out` may hold a partial value.
pub fn write_json_object_text(out: &mut Vec<u8>, json: &[u8], extra: u32) -> Result<(), serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, Transcode { out, extra, header: Header::Patched })?;
    de.end()
}

/// As [`write_json_object_text`], for an object whose number of pairs the caller already knows
/// (it scanned the text): the map header is written first instead of patched in afterwards.
pub fn write_json_object_text_of_len(
    out: &mut Vec<u8>,
    json: &[u8],
    pairs: u32,
    extra: u32,
) -> Result<(), serde_json::Error> {
    rmp::encode::write_map_len(out, pairs + extra).expect("vec");
    let mut de = serde_json::Deserializer::from_slice(json);
    serde::Deserializer::deserialize_map(&mut de, Transcode { out, extra, header: Header::Written(pairs) })?;
    de.end()
}

/// What [`write_json_object_pairs`] learned about the object on its way through.
#[derive(Debug)]
pub struct ObjectPairs<'t> {
    /// Pairs written (a repeated key counts each time, as MessagePack keeps both).
    pub pairs: u32,
    /// The value of the watched key (the last one, if it is repeated).
    pub watched: Option<WatchedValue<'t>>,
    /// Whether any key is one the caller reserves.
    pub names_reserved: bool,
}

/// The value of a key read out of a line on its way through (an event time): a string is
/// borrowed from the text unless it has escapes, since this happens once per line and event
/// times are mostly strings; any other value is built.
#[derive(Debug, PartialEq)]
pub enum WatchedValue<'t> {
    Str(std::borrow::Cow<'t, str>),
    Other(Value),
}

impl<'de> serde::Deserialize<'de> for WatchedValue<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(WatchedVisitor)
    }
}

struct WatchedVisitor;

impl<'de> Visitor<'de> for WatchedVisitor {
    type Value = WatchedValue<'de>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        Ok(WatchedValue::Str(std::borrow::Cow::Borrowed(s)))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        Ok(WatchedValue::Str(std::borrow::Cow::Owned(s.to_owned())))
    }
    fn visit_string<E>(self, s: String) -> Result<Self::Value, E> {
        Ok(WatchedValue::Str(std::borrow::Cow::Owned(s)))
    }
    fn visit_bool<E>(self, b: bool) -> Result<Self::Value, E> {
        Ok(WatchedValue::Other(Value::Bool(b)))
    }
    fn visit_i64<E>(self, n: i64) -> Result<Self::Value, E> {
        Ok(WatchedValue::Other(Value::from(n)))
    }
    fn visit_u64<E>(self, n: u64) -> Result<Self::Value, E> {
        Ok(WatchedValue::Other(Value::from(n)))
    }
    fn visit_f64<E>(self, n: f64) -> Result<Self::Value, E> {
        Ok(WatchedValue::Other(Value::from(n)))
    }
    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(WatchedValue::Other(Value::Null))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(WatchedValue::Other)
    }
    fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
        serde::Deserialize::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(WatchedValue::Other)
    }
}

/// One pass over a JSON object's text: its pairs are written as MessagePack (keys in their
/// order, values as [`write_json`] writes them) with no map header, so the caller writes the
/// header for these pairs plus its own; the watched key's value is kept and reserved keys are
/// noticed on the way. The text is checked to be UTF-8 as a whole first, so a line that passes
/// needs no other check. On error (the text is not one JSON object) `out` may hold partial pairs.
pub fn write_json_object_pairs<'t>(
    out: &mut Vec<u8>,
    json: &'t [u8],
    watch: Option<&str>,
    reserved: impl Fn(&str) -> bool,
) -> Result<ObjectPairs<'t>, serde_json::Error> {
    // One check of the whole line is cheaper than serde_json's check of each string it reads
    // from bytes (a call per string, 3.5 % of the agent's profile); read from a `str`, it checks
    // none again.
    let text = std::str::from_utf8(json).map_err(|e| serde::de::Error::custom(format_args!("not UTF-8: {e}")))?;
    let mut de = serde_json::Deserializer::from_str(text);
    let pairs = serde::Deserializer::deserialize_map(&mut de, Pairs { out, watch, reserved })?;
    de.end()?;
    Ok(pairs)
}

/// Whether a key of a line is `name`. Asked for every key of every line (is it the time field,
/// is it a field the agent adds): comparing the length and the first byte first keeps nearly
/// every key away from a `memcmp` call, which was 2 % of the agent's CPU.
#[inline]
pub fn is_name(key: &str, name: &str) -> bool {
    key.len() == name.len() && key.as_bytes().first() == name.as_bytes().first() && key == name
}

/// The outermost object of [`write_json_object_pairs`].
struct Pairs<'o, F> {
    out: &'o mut Vec<u8>,
    watch: Option<&'o str>,
    reserved: F,
}

impl<'de, F: Fn(&str) -> bool> Visitor<'de> for Pairs<'_, F> {
    type Value = ObjectPairs<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<ObjectPairs<'de>, A::Error> {
        let mut seen = ObjectPairs { pairs: 0, watched: None, names_reserved: false };
        while let Some(key) = map.next_key_seed(Key(&mut *self.out))? {
            seen.pairs += 1;
            seen.names_reserved |= (self.reserved)(&key);
            if self.watch.is_some_and(|watch| is_name(&key, watch)) {
                let value: WatchedValue = map.next_value()?;
                match &value {
                    WatchedValue::Str(s) => rmp::encode::write_str(self.out, s).expect("vec"),
                    WatchedValue::Other(v) => write_json(self.out, v),
                }
                seen.watched = Some(value);
            } else {
                map.next_value_seed(Transcode::inner(&mut *self.out))?;
            }
        }
        Ok(seen)
    }
}

/// A key: written out, and handed back (borrowed from the text unless it has escapes).
struct Key<'o>(&'o mut Vec<u8>);

impl<'de> DeserializeSeed<'de> for Key<'_> {
    type Value = std::borrow::Cow<'de, str>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key<'_> {
    type Value = std::borrow::Cow<'de, str>;
    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a string")
    }
    fn visit_borrowed_str<E>(self, s: &'de str) -> Result<Self::Value, E> {
        rmp::encode::write_str(self.0, s).expect("vec");
        Ok(std::borrow::Cow::Borrowed(s))
    }
    fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
        rmp::encode::write_str(self.0, s).expect("vec");
        Ok(std::borrow::Cow::Owned(s.to_owned()))
    }
}

/// Writes each value it is handed; `extra` is added to the count of the outermost map only.
struct Transcode<'a> {
    out: &'a mut Vec<u8>,
    extra: u32,
    header: Header,
}

/// How the outermost map's header is written.
#[derive(Clone, Copy)]
enum Header {
    /// A 32-bit placeholder, filled in (and shrunk) once the pairs are counted.
    Patched,
    /// Already written for this many pairs, which must be what the text holds.
    Written(u32),
}

impl<'a> Transcode<'a> {
    fn inner(out: &'a mut Vec<u8>) -> Self {
        Transcode { out, extra: 0, header: Header::Patched }
    }
}

impl<'de> DeserializeSeed<'de> for Transcode<'_> {
    type Value = ();
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

/// Containers get a 32-bit length header, patched once the length is known and shrunk to the
/// one-byte form when it fits (the common case), so the output matches [`write_json`]'s.
pub fn open_container(out: &mut Vec<u8>, marker32: u8) -> usize {
    let at = out.len();
    out.extend_from_slice(&[marker32, 0, 0, 0, 0]);
    at
}

pub fn close_container(out: &mut Vec<u8>, at: usize, n: u32, fix_marker: u8) {
    if n < 16 {
        out[at] = fix_marker | n as u8;
        out.copy_within(at + 5.., at + 1);
        out.truncate(out.len() - 4);
    } else {
        out[at + 1..at + 5].copy_from_slice(&n.to_be_bytes());
    }
}

impl<'de> Visitor<'de> for Transcode<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E>(self) -> Result<(), E> {
        rmp::encode::write_nil(self.out).expect("vec");
        Ok(())
    }
    fn visit_bool<E>(self, b: bool) -> Result<(), E> {
        rmp::encode::write_bool(self.out, b).expect("vec");
        Ok(())
    }
    fn visit_u64<E>(self, u: u64) -> Result<(), E> {
        rmp::encode::write_uint(self.out, u).expect("vec");
        Ok(())
    }
    fn visit_i64<E>(self, i: i64) -> Result<(), E> {
        if i >= 0 {
            rmp::encode::write_uint(self.out, i as u64).expect("vec");
        } else {
            rmp::encode::write_sint(self.out, i).expect("vec");
        }
        Ok(())
    }
    fn visit_f64<E>(self, f: f64) -> Result<(), E> {
        rmp::encode::write_f64(self.out, f).expect("vec");
        Ok(())
    }
    fn visit_str<E>(self, s: &str) -> Result<(), E> {
        rmp::encode::write_str(self.out, s).expect("vec");
        Ok(())
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        let at = open_container(self.out, 0xdd);
        let mut n = 0u32;
        while seq.next_element_seed(Transcode::inner(&mut *self.out))?.is_some() {
            n += 1;
        }
        close_container(self.out, at, n, 0x90);
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        let at = match self.header {
            Header::Patched => Some(open_container(self.out, 0xdf)),
            Header::Written(_) => None,
        };
        let mut n = 0u32;
        while map.next_key_seed(Transcode::inner(&mut *self.out))?.is_some() {
            map.next_value_seed(Transcode::inner(&mut *self.out))?;
            n += 1;
        }
        match (at, self.header) {
            (Some(at), _) => close_container(self.out, at, n + self.extra, 0x80),
            (None, Header::Written(pairs)) if pairs != n => {
                return Err(serde::de::Error::custom(format!("the object holds {n} pairs, not the {pairs} announced")))
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn is_name_is_string_equality() {
        for (key, name) in [
            ("time", "time"),
            ("time", "host"),
            ("tim", "time"),
            ("timE", "time"),
            ("", ""),
            ("", "a"),
            ("é", "é"),
            ("é", "è"),
            ("_id", "_id"),
            ("_ix", "_id"),
        ] {
            assert_eq!(is_name(key, name), key == name, "{key:?} {name:?}");
        }
    }

    fn via_tree(json: &str) -> Vec<u8> {
        let mut out = Vec::new();
        write_json(&mut out, &serde_json::from_str(json).unwrap());
        out
    }

    fn decoded(bytes: &[u8]) -> Value {
        crate::json::to_json(&rmpv::decode::read_value(&mut &bytes[..]).unwrap())
    }

    #[test]
    fn text_and_tree_give_the_same_record() {
        let long: String = (0..20).map(|i| format!("\"k{i}\":{i},")).collect();
        for json in [
            r#"{"a":1,"b":-2,"c":1.5,"d":"x\"y\u00e9","e":null,"f":true,"g":[1,[2,{}],[]],"h":{"i":{"j":"k"}}}"#,
            r#"{}"#,
            r#" { "big" : 18446744073709551615 , "neg" : -9223372036854775808, "e": 1e400 } "#,
            &format!("{{{long}\"arr\":[{}]}}", (0..40).map(|i| i.to_string()).collect::<Vec<_>>().join(",")),
        ] {
            if json.contains("1e400") {
                // Out of f64 range: an error both ways, not a silent value.
                assert!(write_json_object_text(&mut Vec::new(), json.as_bytes(), 0).is_err());
                continue;
            }
            let mut out = Vec::new();
            write_json_object_text(&mut out, json.as_bytes(), 0).unwrap();
            assert_eq!(decoded(&out), decoded(&via_tree(json)), "{json}");
        }
    }

    #[test]
    fn small_containers_use_the_one_byte_header() {
        let mut out = Vec::new();
        write_json_object_text(&mut out, br#"{"a":[1,2]}"#, 0).unwrap();
        assert_eq!(out, via_tree(r#"{"a":[1,2]}"#));
    }

    #[test]
    fn extra_pairs_are_counted_in_the_outer_map_only() {
        let mut out = Vec::new();
        write_json_object_text(&mut out, br#"{"a":{"b":1}}"#, 1).unwrap();
        rmp::encode::write_str(&mut out, "host").unwrap();
        rmp::encode::write_str(&mut out, "h").unwrap();
        assert_eq!(decoded(&out), serde_json::json!({"a": {"b": 1}, "host": "h"}));
    }

    #[test]
    fn a_known_length_gives_the_same_bytes() {
        let json = br#"{"a":1,"b":{"c":[true,null]},"d":"e"}"#;
        let (mut patched, mut counted) = (Vec::new(), Vec::new());
        write_json_object_text(&mut patched, json, 1).unwrap();
        write_json_object_text_of_len(&mut counted, json, 3, 1).unwrap();
        assert_eq!(patched, counted);
        assert!(write_json_object_text_of_len(&mut Vec::new(), json, 2, 0).is_err());
    }

    #[test]
    fn pairs_in_one_pass_match_the_tree_and_report_what_they_saw() {
        let json = br#" {"a":1,"t\u0069me":"x","b":{"c":[true,null,{"d":-1.5}]},"host":"h","time":"y"} "#;
        let mut out = Vec::new();
        rmp::encode::write_map_len(&mut out, 5).unwrap();
        let seen = write_json_object_pairs(&mut out, json, Some("time"), |k| k == "host").unwrap();
        assert_eq!(seen.pairs, 5);
        assert_eq!(seen.watched, Some(WatchedValue::Str("y".into())));
        assert!(seen.names_reserved);
        let mut tree = Vec::new();
        write_json_object_text(&mut tree, json, 0).unwrap();
        assert_eq!(out, tree);
        let seen = write_json_object_pairs(&mut Vec::new(), br#"{"a":1}"#, None, |_| false).unwrap();
        assert_eq!((seen.pairs, seen.watched, seen.names_reserved), (1, None, false));
        for bad in [&b"[1]"[..], b"\"s\"", b"{\"a\":1} x", b"{\"a\":", b"{\"a\":\"\xff\"}", b"{\"\xff\":1}"] {
            assert!(write_json_object_pairs(&mut Vec::new(), bad, None, |_| false).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_watched_value_of_every_kind_is_kept_and_written_as_the_tree_writes_it() {
        for (value, expected) in [
            (r#""2026-12-04T20:00:00Z""#, WatchedValue::Str("2026-12-04T20:00:00Z".into())),
            (r#""a\nb""#, WatchedValue::Str("a\nb".into())),
            ("1700000000", WatchedValue::Other(Value::from(1_700_000_000u64))),
            ("-2", WatchedValue::Other(Value::from(-2))),
            ("1.5", WatchedValue::Other(Value::from(1.5))),
            ("true", WatchedValue::Other(Value::Bool(true))),
            ("null", WatchedValue::Other(Value::Null)),
            (r#"[1,"a"]"#, WatchedValue::Other(serde_json::json!([1, "a"]))),
            (r#"{"x":{"y":1}}"#, WatchedValue::Other(serde_json::json!({"x": {"y": 1}}))),
        ] {
            let json = format!(r#"{{"a":1,"t":{value},"b":2}}"#);
            let mut out = Vec::new();
            let seen = write_json_object_pairs(&mut out, json.as_bytes(), Some("t"), |_| false).unwrap();
            assert_eq!(seen.watched, Some(expected), "{json}");
            let mut tree = Vec::new();
            write_json_object_text(&mut tree, json.as_bytes(), 0).unwrap();
            assert_eq!(&tree[1..], &out[..], "{json}");
        }
        // Borrowed from the line when it can be: no allocation per line for its event time.
        let seen = write_json_object_pairs(&mut Vec::new(), br#"{"t":"x"}"#, Some("t"), |_| false).unwrap();
        assert!(matches!(seen.watched, Some(WatchedValue::Str(std::borrow::Cow::Borrowed("x")))));
    }

    #[test]
    fn what_is_not_one_object_is_an_error() {
        for bad in [&b"[1]"[..], b"\"s\"", b"{\"a\":1} x", b"{\"a\":", b"{\"a\":\"\xff\"}"] {
            assert!(write_json_object_text(&mut Vec::new(), bad, 0).is_err(), "{bad:?}");
        }
    }
}

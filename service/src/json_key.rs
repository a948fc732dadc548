//! An object key read with serde_json, borrowed from the text unless it has escapes: for the
//! passes that look at a record's keys without building a tree of it (agent and sink).

use std::borrow::Cow;

pub struct JsonKey<'a>(pub Cow<'a, str>);

impl<'de> serde::Deserialize<'de> for JsonKey<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = JsonKey<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E>(self, s: &'de str) -> Result<JsonKey<'de>, E> {
                Ok(JsonKey(Cow::Borrowed(s)))
            }
            fn visit_str<E>(self, s: &str) -> Result<JsonKey<'de>, E> {
                Ok(JsonKey(Cow::Owned(s.to_owned())))
            }
        }
        d.deserialize_str(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn borrowed_without_escapes_owned_with() {
        let plain: JsonKey = serde_json::from_str(r#""time""#).unwrap();
        assert!(matches!(plain.0, Cow::Borrowed("time")));
        let escaped: JsonKey = serde_json::from_str(r#""\u0074ime""#).unwrap();
        assert!(matches!(escaped.0, Cow::Owned(ref s) if s == "time"));
    }
}

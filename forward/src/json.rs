//! MessagePack records as JSON, the form Kafka carries.

use base64::Engine as _;
use rmpv::Value;
use serde_json::{Map, Number, Value as Json};

/// Converts a decoded record to JSON. Strings that are not UTF-8 and binaries become text with
/// invalid bytes replaced (log lines are text; a lossy character beats a dropped record);
/// ext values become `{"ext": type, "base64": data}` so nothing is silently discarded.
pub fn to_json(v: &Value) -> Json {
    match v {
        Value::Nil => Json::Null,
        Value::Boolean(b) => Json::Bool(*b),
        Value::Integer(i) => match (i.as_u64(), i.as_i64()) {
            (Some(u), _) => Json::Number(u.into()),
            (_, Some(s)) => Json::Number(s.into()),
            _ => Json::Null,
        },
        Value::F32(f) => Number::from_f64(*f as f64).map_or(Json::Null, Json::Number),
        Value::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        Value::String(s) => Json::String(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        Value::Binary(b) => Json::String(String::from_utf8_lossy(b).into_owned()),
        Value::Array(items) => Json::Array(items.iter().map(to_json).collect()),
        Value::Map(pairs) => Json::Object(to_json_map(pairs)),
        Value::Ext(t, data) => {
            let mut m = Map::new();
            m.insert("ext".into(), Json::Number((*t).into()));
            m.insert("base64".into(), Json::String(base64::engine::general_purpose::STANDARD.encode(data)));
            Json::Object(m)
        }
    }
}

pub fn to_json_map(pairs: &[(Value, Value)]) -> Map<String, Json> {
    pairs
        .iter()
        .map(|(k, v)| {
            let key = match k {
                Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
                Value::Binary(b) => String::from_utf8_lossy(b).into_owned(),
                other => other.to_string(),
            };
            (key, to_json(v))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn converts_nested_records() {
        let v = Value::Map(vec![
            ("msg".into(), "hi".into()),
            ("n".into(), Value::from(-3)),
            ("raw".into(), Value::Binary(b"bytes".to_vec())),
            ("list".into(), Value::Array(vec![Value::Nil, Value::F64(1.5)])),
        ]);
        assert_eq!(to_json(&v), serde_json::json!({"msg": "hi", "n": -3, "raw": "bytes", "list": [null, 1.5]}));
    }
}

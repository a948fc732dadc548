//! Writes JSON values as MessagePack without an intermediate tree, for the agent's hot path.

use serde_json::Value;

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

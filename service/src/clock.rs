//! The wall clock as integers since the Unix epoch, the unit event times and Kafka timestamps use.

use std::time::{SystemTime, UNIX_EPOCH};

pub fn now_ns() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_nanos() as i64
}

pub fn now_ms() -> i64 {
    now_ns().div_euclid(1_000_000)
}

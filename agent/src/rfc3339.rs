//! Event times in the shape log lines write them, `2026-12-04T20:00:00.123Z` or with `+01:00`,
//! read without chrono's general parser: read once per line, that parser's field bookkeeping was
//! 5 % of the agent's CPU. Any other shape goes to chrono, and chrono still decides every
//! calendar question (which days a month has), so both paths give the same answers.

/// Nanoseconds since the epoch of an RFC 3339 time, exactly as
/// `chrono::DateTime::parse_from_rfc3339(s)?.timestamp_nanos_opt()` reads it.
pub fn to_nanos(s: &str) -> Option<i64> {
    common_shape(s.as_bytes()).or_else(|| chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_nanos_opt())
}

/// `YYYY-MM-DDTHH:MM:SS`, 1–9 fraction digits, `Z` or `±HH:MM`; None for anything else,
/// including a leap second and a value out of range (chrono then reads it, or refuses it).
fn common_shape(b: &[u8]) -> Option<i64> {
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let (year, month, day) = (digits(&b[0..4])?, digits(&b[5..7])?, digits(&b[8..10])?);
    let (hour, minute, second) = (digits(&b[11..13])?, digits(&b[14..16])?, digits(&b[17..19])?);
    if second > 59 {
        return None;
    }
    let mut rest = &b[19..];
    let mut nanos = 0;
    if let Some(fraction) = rest.strip_prefix(b".") {
        let n = fraction.iter().take_while(|c| c.is_ascii_digit()).count();
        if n == 0 || n > 9 {
            return None;
        }
        nanos = digits(&fraction[..n])? * 10u32.pow(9 - n as u32);
        rest = &fraction[n..];
    }
    let offset_seconds = match rest {
        b"Z" => 0,
        [sign @ (b'+' | b'-'), h1, h2, b':', m1, m2] => {
            let (hours, minutes) = (digits(&[*h1, *h2])?, digits(&[*m1, *m2])?);
            if hours > 23 || minutes > 59 {
                return None;
            }
            let seconds = i64::from(hours * 3600 + minutes * 60);
            if *sign == b'-' {
                -seconds
            } else {
                seconds
            }
        }
        _ => return None,
    };
    if hour > 23 || minute > 59 {
        return None;
    }
    let seconds = days_since_epoch(year, month, day)? * 86_400 + i64::from(hour * 3600 + minute * 60 + second);
    // As chrono's `timestamp_nanos_opt` does, so the range ends where chrono's do.
    let (seconds, nanos) =
        if seconds < 0 { (seconds + 1, i64::from(nanos) - 1_000_000_000) } else { (seconds, i64::from(nanos)) };
    let local = seconds.checked_mul(1_000_000_000)?.checked_add(nanos)?;
    local.checked_sub(offset_seconds * 1_000_000_000)
}

/// Days from 1970-01-01 to a date chrono accepts; None for a date it refuses. Lines in a row are
/// mostly of the same day, so chrono's answer for the last date is kept (its calendar arithmetic
/// for each line was 2 % of the agent's CPU).
fn days_since_epoch(year: u32, month: u32, day: u32) -> Option<i64> {
    type Date = (u32, u32, u32);
    thread_local!(static LAST_DATE: std::cell::Cell<Option<(Date, i64)>> = const { std::cell::Cell::new(None) });
    if let Some((date, days)) = LAST_DATE.get() {
        if date == (year, month, day) {
            return Some(days);
        }
    }
    let days =
        chrono::NaiveDate::from_ymd_opt(year as i32, month, day)?.and_hms_opt(0, 0, 0)?.and_utc().timestamp() / 86_400;
    LAST_DATE.set(Some(((year, month, day), days)));
    Some(days)
}

/// The number an all-digit field spells; None when any byte is not a digit.
fn digits(field: &[u8]) -> Option<u32> {
    field.iter().try_fold(0u32, |n, &c| c.is_ascii_digit().then(|| n * 10 + u32::from(c - b'0')))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chrono_reads(s: &str) -> Option<i64> {
        chrono::DateTime::parse_from_rfc3339(s).ok()?.timestamp_nanos_opt()
    }

    #[test]
    fn the_common_shape_is_read_without_chrono_and_as_chrono_reads_it() {
        for s in [
            "2026-12-04T20:00:00Z",
            "2026-12-04T20:00:00.1Z",
            "2026-12-04T20:00:00.123456789Z",
            "2026-12-04T20:00:00.000000001+01:00",
            "2026-12-04T20:00:00-23:59",
            "2024-02-29T23:59:59.999+05:30",
            "1970-01-01T00:00:00Z",
            "1969-12-31T23:59:59.5Z",
            "2262-04-11T23:47:16.854775807Z",
            "0001-01-01T00:00:00+00:00",
        ] {
            let fast = common_shape(s.as_bytes());
            assert!(fast.is_some() || chrono_reads(s).is_none(), "{s} should take the fast path");
            assert_eq!(fast, chrono_reads(s), "{s}");
            assert_eq!(to_nanos(s), chrono_reads(s), "{s}");
        }
    }

    #[test]
    fn every_other_shape_and_every_bad_value_gets_chrono_s_answer() {
        for s in [
            "2026-12-04t20:00:00z",
            "2026-12-04 20:00:00Z",
            "2026-12-04T20:00:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-12-04T20:00:00.1234567891Z",
            "2026-12-04T20:00:00.Z",
            "2026-12-04T20:00:00+0100",
            "2026-12-04T20:00:00+24:00",
            "2026-12-04T20:00:00+01:60",
            "2026-12-04T20:00:00",
            "2026-12-04T20:00:00Z ",
            "2026-13-04T20:00:00Z",
            "2026-00-04T20:00:00Z",
            "2025-02-29T20:00:00Z",
            "2026-04-31T20:00:00Z",
            "2026-12-04T24:00:00Z",
            "2026-12-04T20:60:00Z",
            "+2026-12-04T20:00:00Z",
            "2026-12-4T20:00:00Z",
            "2262-04-11T23:47:16.854775808Z",
            "1677-09-21T00:12:43.145224191Z",
            "9999-12-31T23:59:59.999999999-23:59",
            "２026-12-04T20:00:00Z",
            "",
        ] {
            assert_eq!(to_nanos(s), chrono_reads(s), "{s}");
        }
    }

    #[test]
    fn generated_times_agree_with_chrono() {
        // A fixed sequence of mostly valid, sometimes broken fields, so a failure repeats.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        for _ in 0..20_000 {
            let fraction = match next(4) {
                0 => String::new(),
                k => format!(".{:0width$}", next(1_000_000_000), width = [1, 3, 9][k as usize - 1]),
            };
            let offset = match next(3) {
                0 => "Z".to_string(),
                _ => format!("{}{:02}:{:02}", ["+", "-"][next(2) as usize], next(26), next(62)),
            };
            let s = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}{fraction}{offset}",
                1600 + next(800),
                next(14),
                next(33),
                next(25),
                next(61),
                next(62)
            );
            assert_eq!(to_nanos(&s), chrono_reads(&s), "{s}");
        }
    }
}

//! Joins the lines of one record (a stack trace, say) into one: a line matching the start
//! pattern begins a record, any other line continues the one before. The last record read is
//! open, since its next line may still be written; the caller keeps it unread until a start line
//! follows, the file is finished, or the flush time-out passes.

use regex::bytes::Regex;
use std::time::{Duration, Instant};

/// A line, or a joined record: its bytes and the offsets it spans in the file.
pub struct Span {
    pub offset: u64,
    pub text: Vec<u8>,
    pub end: u64,
}

/// Groups `lines` (in file order) into records of at most `max_bytes`; returns the complete
/// ones and the open last one.
pub fn group(lines: Vec<Span>, start: &Regex, max_bytes: usize) -> (Vec<Span>, Option<Span>) {
    let mut records: Vec<Span> = Vec::new();
    for line in lines {
        match records.last_mut() {
            Some(open) if !start.is_match(&line.text) && open.text.len() + 1 + line.text.len() <= max_bytes => {
                open.text.push(b'\n');
                open.text.extend_from_slice(&line.text);
                open.end = line.end;
            }
            _ => records.push(line),
        }
    }
    let open = records.pop();
    (records, open)
}

/// When an open record was first held back, so a flush time-out can end it.
#[derive(Clone, Copy, PartialEq, Debug)]
pub struct Held {
    pub offset: u64,
    pub end: u64,
    pub since: Instant,
}

/// What becomes of a read's open last record.
pub enum Decision {
    Complete(Span),
    /// Not read yet: the cursor stays at its offset until a later read settles it.
    Hold(Held),
}

/// The open record is complete when nothing more can follow (`finished`), when it alone fills the
/// read window (`fills_window`: waiting cannot make it longer), or when it has been held,
/// unchanged, for `flush`. `held`: what the previous read held back.
pub fn settle(open: Span, held: Option<Held>, finished: bool, fills_window: bool, flush: Duration) -> Decision {
    let held = match held {
        Some(h) if h.offset == open.offset && h.end == open.end => h,
        _ => Held { offset: open.offset, end: open.end, since: Instant::now() },
    };
    if finished || fills_window || held.since.elapsed() >= flush {
        Decision::Complete(open)
    } else {
        Decision::Hold(held)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_open_record_is_held_until_it_stops_growing_for_the_flush_time() {
        let span = |end| Span { offset: 10, text: b"x".to_vec(), end };
        let flush = Duration::from_secs(3600);
        let Decision::Hold(first) = settle(span(20), None, false, false, flush) else { panic!("held") };
        // Grown since: held anew, its clock restarted.
        let long_ago = Held { since: Instant::now() - Duration::from_secs(7200), ..first };
        assert!(
            matches!(settle(span(30), Some(long_ago), false, false, flush), Decision::Hold(h) if h.end == 30 && h.since > long_ago.since)
        );
        // Unchanged for the flush time: complete.
        assert!(matches!(settle(span(20), Some(long_ago), false, false, flush), Decision::Complete(_)));
        // The file is finished, or the record fills the window: complete at once.
        assert!(matches!(settle(span(20), None, true, false, flush), Decision::Complete(_)));
        assert!(matches!(settle(span(20), None, false, true, flush), Decision::Complete(_)));
    }

    fn spans(text: &str) -> Vec<Span> {
        let mut offset = 0;
        text.lines()
            .map(|l| {
                let s = Span { offset, text: l.as_bytes().to_vec(), end: offset + l.len() as u64 + 1 };
                offset = s.end;
                s
            })
            .collect()
    }

    #[test]
    fn continuation_lines_join_the_record_before() {
        let start = Regex::new(r"^\d{4}-").unwrap();
        let text = "2026-11-22 boom\n  at a()\n  at b()\n2026-11-22 ok\n2026-11-22 next\n  at c()\n";
        let (done, open) = group(spans(text), &start, 1 << 20);
        let texts: Vec<_> = done.iter().map(|s| String::from_utf8_lossy(&s.text).into_owned()).collect();
        assert_eq!(texts, vec!["2026-11-22 boom\n  at a()\n  at b()", "2026-11-22 ok"]);
        assert_eq!((done[0].offset, done[0].end, done[1].offset), (0, 34, 34));
        let open = open.unwrap();
        assert_eq!(open.text, b"2026-11-22 next\n  at c()");
        assert_eq!(open.end, text.len() as u64);
    }

    #[test]
    fn records_are_capped_at_max_bytes() {
        let start = Regex::new("^S").unwrap();
        let (done, open) = group(spans("S1\nxx\nxx\nxx\nS2\n"), &start, 8);
        let texts: Vec<_> = done.iter().map(|s| String::from_utf8_lossy(&s.text).into_owned()).collect();
        assert_eq!(texts, vec!["S1\nxx\nxx", "xx"]);
        assert_eq!(open.unwrap().text, b"S2");
    }
}

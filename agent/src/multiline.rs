//! Joins the lines of one record (a stack trace, say) into one: a line matching the start
//! pattern begins a record, any other line continues the one before. The last record read is
//! open, since its next line may still be written; the caller keeps it unread until a start line
//! follows, the file is finished, or the flush time-out passes.

use regex::bytes::Regex;

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
    pub since: std::time::Instant,
}

#[cfg(test)]
mod tests {
    use super::*;

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

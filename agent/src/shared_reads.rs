//! One read and one parse of each line for every destination, without tying their progress
//! together.
//!
//! Each destination keeps its own position in each file and reads from it. The first to read
//! a range of a file offers the parsed lines here, keyed by (file identity, start offset); the
//! others, arriving at that same offset, take them instead of reading and parsing the range
//! again. A destination that is behind (down, slow, or just started elsewhere) finds nothing
//! at its offset and reads the file itself, as it always did: the file stays every destination's
//! buffer, and this cache only ever saves work. It holds at most [`MAX_BYTES`] of lines, and a
//! block nobody took within [`MAX_AGE`] is dropped.
//!
//! A (file identity, offset) pair always names the same bytes: a file's content is appended to,
//! never rewritten under the same identity (a truncated file gets a new one), so a block taken
//! later is still what the file held there.

use crate::parse::Record;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A parsed line: the record (None for an empty line, which only moves the offset), the offset
/// after it, and its length in the file.
pub type Line = (Option<Record>, u64, usize);

/// Lines read ahead by one destination for the others: two passes 50 ms apart at 80 MB/s are
/// 4 MB apart. Parsed, they take 2-3 times this in memory.
const MAX_BYTES: usize = 4 << 20;
/// Reads end at the first line end past a multiple of this (see [`SharedReads::read_budget`]).
const BLOCK_GRID: u64 = 1 << 20;
/// How long a destination waits for another that is reading the range it wants: a 1 MiB read
/// and parse takes a few milliseconds.
const WAIT_FOR_READER: Duration = Duration::from_millis(50);
/// A block not taken by then is not going to be: its taker is behind and reads for itself.
const MAX_AGE: Duration = Duration::from_secs(10);

/// A range of a file as read and parsed by one destination (cloned cheaply: the lines are shared).
#[derive(Clone)]
pub struct Block {
    pub lines: Arc<Vec<Line>>,
    /// Where the range ends: the next read of this file starts there.
    pub end: u64,
    /// Bytes of the file the range covers.
    pub bytes_read: usize,
}

struct Stored {
    block: Block,
    takers_left: usize,
    stored_at: Instant,
}

pub struct SharedReads {
    destinations: usize,
    inner: Mutex<Inner>,
    /// Signalled when a read in progress ends (offered or not).
    offered: Condvar,
}

#[derive(Default)]
struct Inner {
    blocks: HashMap<(u64, u64), Stored>,
    /// Ranges a destination is reading now: another arriving there waits for the block.
    reading: HashSet<(u64, u64)>,
    /// Keys in the order they were stored, for dropping stale blocks without a scan.
    order: VecDeque<(Instant, (u64, u64))>,
    bytes: usize,
}

/// What a destination does at an offset: take another's block, or read the range itself.
pub enum Claim {
    Take(Block),
    /// Read it (and [`SharedReads::offer`] what was read, or None, whatever happens).
    Read,
}

impl SharedReads {
    /// None for a single destination: nobody to share with.
    pub fn for_destinations(destinations: usize) -> Option<Arc<Self>> {
        (destinations > 1).then(|| {
            Arc::new(SharedReads { destinations, inner: Mutex::new(Inner::default()), offered: Condvar::new() })
        })
    }

    /// Where a read from `offset` stops: at the first line end at or past the next multiple of
    /// [`BLOCK_GRID`]. Every destination's reads end there whatever offset it started from, so
    /// two that fell out of step (both read the same offset at once, one found the cache full)
    /// fall back in step within a block.
    pub fn read_budget(offset: u64) -> usize {
        (BLOCK_GRID - offset % BLOCK_GRID) as usize
    }

    /// At `start` of `file_id`: the block another destination read there, or the go-ahead to
    /// read it. When another destination is reading that very range right now, waits for it
    /// (at most [`WAIT_FOR_READER`]: a reader that is stuck is not waited for again).
    pub fn claim(&self, file_id: u64, start: u64) -> Claim {
        let key = (file_id, start);
        let deadline = Instant::now() + WAIT_FOR_READER;
        let mut inner = self.inner.lock().expect("shared reads lock");
        loop {
            if let Some(block) = inner.take(key) {
                metrics::counter!("tron_agent_shared_reads_total", "result" => "taken").increment(1);
                return Claim::Take(block);
            }
            let now = Instant::now();
            if inner.reading.insert(key) || now >= deadline {
                return Claim::Read;
            }
            inner = self.offered.wait_timeout(inner, deadline - now).expect("shared reads lock").0;
        }
    }

    /// Whether a block read now could be kept for the others. When it could not (they are far
    /// behind, or not taking), lines are parsed for this destination alone, which costs less.
    pub fn has_room(&self) -> bool {
        let inner = self.inner.lock().expect("shared reads lock");
        inner.bytes + BLOCK_GRID as usize <= MAX_BYTES
    }

    /// What this destination read from `start` of `file_id` after [`Claim::Read`] (None: it
    /// found nothing to take), for the others. Not kept when the cache is full: the others then
    /// read for themselves.
    pub fn offer(&self, file_id: u64, start: u64, block: Option<Block>) {
        let key = (file_id, start);
        let mut inner = self.inner.lock().expect("shared reads lock");
        inner.reading.remove(&key);
        inner.evict_stale();
        if let Some(block) = block {
            if inner.bytes + block.bytes_read > MAX_BYTES {
                metrics::counter!("tron_agent_shared_reads_total", "result" => "cache_full").increment(1);
            } else {
                inner.bytes += block.bytes_read;
                let now = Instant::now();
                inner.order.push_back((now, key));
                let stored = Stored { block, takers_left: self.destinations - 1, stored_at: now };
                if let Some(old) = inner.blocks.insert(key, stored) {
                    // Two destinations read the same range at once; either copy is the same lines.
                    inner.bytes -= old.block.bytes_read;
                }
            }
        }
        drop(inner);
        self.offered.notify_all();
    }
}

impl Inner {
    fn take(&mut self, key: (u64, u64)) -> Option<Block> {
        match self.blocks.get_mut(&key) {
            Some(stored) if stored.takers_left > 1 => {
                stored.takers_left -= 1;
                Some(stored.block.clone())
            }
            Some(_) => {
                let stored = self.blocks.remove(&key).expect("present");
                self.bytes -= stored.block.bytes_read;
                Some(stored.block)
            }
            None => None,
        }
    }

    fn evict_stale(&mut self) {
        let now = Instant::now();
        while let Some(&(stored_at, key)) = self.order.front() {
            if now.duration_since(stored_at) < MAX_AGE {
                break;
            }
            self.order.pop_front();
            // Taken since, or stored again under the same key later: then it is not this one.
            if self.blocks.get(&key).is_some_and(|s| s.stored_at == stored_at) {
                let stored = self.blocks.remove(&key).expect("present");
                self.bytes -= stored.block.bytes_read;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn block(end: u64, bytes: usize) -> Block {
        Block { lines: Arc::new(vec![(None, end, 0)]), end, bytes_read: bytes }
    }

    fn take(shared: &SharedReads, file_id: u64, start: u64) -> Option<u64> {
        match shared.claim(file_id, start) {
            Claim::Take(b) => Some(b.end),
            Claim::Read => {
                shared.offer(file_id, start, None);
                None
            }
        }
    }

    #[test]
    fn one_destination_has_nobody_to_share_with() {
        assert!(SharedReads::for_destinations(1).is_none());
    }

    #[test]
    fn a_block_is_taken_once_by_each_other_destination_then_gone() {
        let shared = SharedReads::for_destinations(3).unwrap();
        assert!(matches!(shared.claim(7, 100), Claim::Read));
        shared.offer(7, 100, Some(block(200, 100)));
        assert_eq!(take(&shared, 7, 100), Some(200));
        assert_eq!(take(&shared, 7, 100), Some(200));
        assert_eq!(take(&shared, 7, 100), None);
        assert_eq!(shared.inner.lock().unwrap().bytes, 0);
    }

    #[test]
    fn only_the_exact_offset_of_the_same_file_matches() {
        let shared = SharedReads::for_destinations(2).unwrap();
        shared.offer(7, 100, Some(block(200, 100)));
        assert_eq!(take(&shared, 8, 100), None);
        assert_eq!(take(&shared, 7, 50), None);
        assert_eq!(take(&shared, 7, 100), Some(200));
    }

    #[test]
    fn a_destination_arriving_while_another_reads_the_range_waits_for_its_block() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert!(matches!(shared.claim(7, 0), Claim::Read));
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                shared.offer(7, 0, Some(block(300, 300)));
            })
        };
        assert_eq!(take(&shared, 7, 0), Some(300));
        reader.join().unwrap();
    }

    #[test]
    fn a_reader_that_never_offers_is_waited_for_only_so_long() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert!(matches!(shared.claim(7, 0), Claim::Read));
        let started = Instant::now();
        assert!(matches!(shared.claim(7, 0), Claim::Read));
        assert!(started.elapsed() >= WAIT_FOR_READER);
    }

    #[test]
    fn reads_from_any_offset_end_on_the_same_grid() {
        assert_eq!(SharedReads::read_budget(0), 1 << 20);
        assert_eq!(SharedReads::read_budget(100) as u64 + 100, 1 << 20);
        assert_eq!(SharedReads::read_budget((1 << 20) + 5) as u64 + (1 << 20) + 5, 2 << 20);
    }

    #[test]
    fn a_block_nobody_takes_in_time_is_dropped() {
        let shared = SharedReads::for_destinations(2).unwrap();
        shared.offer(7, 100, Some(block(200, 100)));
        shared.inner.lock().unwrap().order[0].0 -= MAX_AGE;
        shared.inner.lock().unwrap().blocks.get_mut(&(7, 100)).unwrap().stored_at -= MAX_AGE;
        shared.offer(9, 0, Some(block(10, 10)));
        assert_eq!(take(&shared, 7, 100), None);
        assert_eq!(shared.inner.lock().unwrap().bytes, 10);
    }

    #[test]
    fn a_full_cache_keeps_nothing_more_and_the_others_read_for_themselves() {
        let shared = SharedReads::for_destinations(2).unwrap();
        shared.offer(1, 0, Some(block(MAX_BYTES as u64, MAX_BYTES)));
        shared.offer(2, 0, Some(block(10, 10)));
        assert_eq!(take(&shared, 2, 0), None);
        assert!(take(&shared, 1, 0).is_some());
        shared.offer(2, 0, Some(block(10, 10)));
        assert!(take(&shared, 2, 0).is_some());
    }
}

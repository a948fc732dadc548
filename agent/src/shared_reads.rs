//! One read and one parse of each line for every destination, without tying their progress
//! together.
//!
//! Each destination keeps its own position in each file and reads from it. The first to read
//! a range of a file parses it for the others too, when one of them is due there soon, and
//! leaves it here keyed by (file identity, start offset); the others, arriving at that same
//! offset, take it instead of reading and parsing the range again. A destination that is behind
//! (down, slow, or just started elsewhere) reads the file itself, as it always did: the file
//! stays every destination's buffer, and this cache only ever saves work. It holds at most
//! [`MAX_BYTES`] of lines; a block is dropped once every destination it was kept for has taken
//! it or moved past it, or after [`MAX_AGE`].
//!
//! Whether another destination is due is decided from where each destination last read each
//! file: a block kept for a destination that is already past it, or too far behind to reach it
//! before the cache fills, would only fill the cache and stop the sharing of the ranges that
//! both are about to read (in a backlog, that ended the sharing after the first hiccup).
//!
//! A (file identity, offset) pair always names the same bytes: a file's content is appended to,
//! never rewritten under the same identity (a truncated file gets a new one), so a block taken
//! later is still what the file held there.

use crate::parse::Record;
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// A parsed line: the record (None for an empty line, which only moves the offset), the offset
/// after it, and its length in the file.
pub type Line = (Option<Record>, u64, usize);

/// The lines of one read, and the buffer their records' bytes lie in (see [`crate::parse::Fields`]).
///
/// Both vectors come from a few kept from earlier reads and go back there when the lines are
/// dropped: a read's megabyte or two is mapped fresh by the allocator otherwise, and faulting
/// its pages in cost more than the allocation per line the shared buffer replaced.
pub struct Lines {
    pub lines: Vec<Line>,
    pub bytes: Vec<u8>,
}

/// Vectors kept for the next reads: as many as are in use at once in a steady pass (a block in
/// the cache per destination, one pending per destination).
const SPARE_READS: usize = 8;
/// A vector grown past this by one huge read is freed, not kept.
const MAX_SPARE_BYTES: usize = 8 << 20;
static SPARE: Mutex<Vec<(Vec<Line>, Vec<u8>)>> = Mutex::new(Vec::new());

impl Lines {
    /// Empty, with the vectors of an earlier read when one is spare.
    pub fn new() -> Self {
        let (lines, bytes) = SPARE.lock().expect("spare reads lock").pop().unwrap_or_default();
        Lines { lines, bytes }
    }
}

impl Default for Lines {
    fn default() -> Self {
        Lines::new()
    }
}

impl Drop for Lines {
    fn drop(&mut self) {
        let (mut lines, mut bytes) = (std::mem::take(&mut self.lines), std::mem::take(&mut self.bytes));
        let size = lines.capacity() * std::mem::size_of::<Line>() + bytes.capacity();
        if size == 0 || size > MAX_SPARE_BYTES {
            return;
        }
        lines.clear(); // drops the records (and what the rare ones own) here, outside the lock
        bytes.clear();
        let mut spare = SPARE.lock().expect("spare reads lock");
        if spare.len() < SPARE_READS {
            spare.push((lines, bytes));
        }
    }
}

/// Lines read ahead by one destination for the others: two passes 50 ms apart at 80 MB/s are
/// 4 MB apart. Parsed, they take 2-3 times this in memory.
const MAX_BYTES: usize = 4 << 20;
/// Reads end at the first line end past a multiple of this (see [`SharedReads::read_budget`]).
const BLOCK_GRID: u64 = 1 << 20;
/// How long a destination waits for another that is reading the range it wants: a 1 MiB read
/// and parse takes a few milliseconds.
const WAIT_FOR_READER: Duration = Duration::from_millis(50);
/// A block not taken by then is not going to be: its taker is behind and reads for itself. A
/// file nobody read for this long has no known positions any more (see [`Inner::due`]).
const MAX_AGE: Duration = Duration::from_secs(10);

/// A range of a file as read and parsed by one destination (cloned cheaply: the lines are shared).
#[derive(Clone)]
pub struct Block {
    pub lines: Arc<Lines>,
    /// Where the range ends: the next read of this file starts there.
    pub end: u64,
    /// Bytes of the file the range covers.
    pub bytes_read: usize,
}

struct Stored {
    block: Block,
    /// The destinations it is kept for (bit per destination index) that have not taken it yet.
    takers: u64,
    stored_at: Instant,
}

/// Where each destination began its last read of one file.
struct Positions {
    at: Vec<Option<u64>>,
    touched: Instant,
}

pub struct SharedReads {
    destinations: usize,
    inner: Mutex<Inner>,
    /// Signalled when a read in progress ends (offered or not).
    offered: Condvar,
}

struct Inner {
    blocks: HashMap<(u64, u64), Stored>,
    /// Ranges a destination is reading for the others now, and who they are: another arriving
    /// there waits for the block.
    reading: HashMap<(u64, u64), u64>,
    /// Keys in the order they were stored, for dropping stale blocks without a scan.
    order: VecDeque<(Instant, (u64, u64))>,
    bytes: usize,
    positions: HashMap<u64, Positions>,
    positions_pruned: Instant,
}

/// What a destination does at an offset.
pub enum Claim {
    /// Another destination's read of the range.
    Take(Block),
    /// Read it and parse it for every destination, then [`SharedReads::offer`] what was read
    /// (or None), whatever happens: another destination is due at this range soon.
    ReadForAll,
    /// Read it for this destination alone: nobody else is due here soon, or the cache is full.
    ReadAlone,
}

impl SharedReads {
    /// None for a single destination: nobody to share with.
    pub fn for_destinations(destinations: usize) -> Option<Arc<Self>> {
        assert!(destinations <= 64, "one bit per destination");
        (destinations > 1).then(|| {
            Arc::new(SharedReads {
                destinations,
                inner: Mutex::new(Inner {
                    blocks: HashMap::new(),
                    reading: HashMap::new(),
                    order: VecDeque::new(),
                    bytes: 0,
                    positions: HashMap::new(),
                    positions_pruned: Instant::now(),
                }),
                offered: Condvar::new(),
            })
        })
    }

    /// Where a read from `offset` stops: at the first line end at or past the next multiple of
    /// [`BLOCK_GRID`]. Every destination's reads end there whatever offset it started from, so
    /// two that fell out of step (both read the same offset at once, one found the cache full)
    /// fall back in step within a block.
    pub fn read_budget(offset: u64) -> usize {
        (BLOCK_GRID - offset % BLOCK_GRID) as usize
    }

    /// Destination `dest` at `start` of `file_id`: the block another destination read there, or
    /// how to read it. When another destination is reading that very range for it right now,
    /// waits for it (at most [`WAIT_FOR_READER`]: a reader that is stuck is not waited for again).
    pub fn claim(&self, dest: usize, file_id: u64, start: u64) -> Claim {
        let key = (file_id, start);
        let deadline = Instant::now() + WAIT_FOR_READER;
        let mut inner = self.inner.lock().expect("shared reads lock");
        inner.moved_to(self.destinations, dest, file_id, start);
        loop {
            if let Some(block) = inner.take(dest, key) {
                metrics::counter!("tron_agent_shared_reads_total", "result" => "taken").increment(1);
                return Claim::Take(block);
            }
            let now = Instant::now();
            let read_for_me = inner.reading.get(&key).is_some_and(|takers| takers & (1 << dest) != 0);
            if !read_for_me || now >= deadline {
                break;
            }
            inner = self.offered.wait_timeout(inner, deadline - now).expect("shared reads lock").0;
        }
        if inner.reading.contains_key(&key) {
            return Claim::ReadAlone; // another is reading it, not for us (or too slowly): no second copy
        }
        let takers = inner.due(dest, file_id, start);
        if takers == 0 {
            metrics::counter!("tron_agent_shared_reads_total", "result" => "not_due").increment(1);
            return Claim::ReadAlone;
        }
        if inner.bytes + BLOCK_GRID as usize > MAX_BYTES {
            metrics::counter!("tron_agent_shared_reads_total", "result" => "cache_full").increment(1);
            return Claim::ReadAlone;
        }
        inner.reading.insert(key, takers);
        Claim::ReadForAll
    }

    /// What this destination read from `start` of `file_id` after [`Claim::ReadForAll`] (None:
    /// it found nothing to take), for the destinations it was read for.
    pub fn offer(&self, file_id: u64, start: u64, block: Option<Block>) {
        let key = (file_id, start);
        let mut inner = self.inner.lock().expect("shared reads lock");
        let takers = inner.reading.remove(&key).unwrap_or(0);
        inner.evict_stale();
        if let Some(block) = block.filter(|_| takers != 0) {
            inner.bytes += block.bytes_read;
            let now = Instant::now();
            inner.order.push_back((now, key));
            if let Some(old) = inner.blocks.insert(key, Stored { block, takers, stored_at: now }) {
                // Two destinations read the same range at once; either copy is the same lines.
                inner.bytes -= old.block.bytes_read;
            }
        }
        drop(inner);
        self.offered.notify_all();
    }
}

impl Inner {
    /// Notes where `dest` reads `file_id` now, and lets go of the blocks of that file it has
    /// moved past: it will never take them.
    fn moved_to(&mut self, destinations: usize, dest: usize, file_id: u64, start: u64) {
        let now = Instant::now();
        let positions =
            self.positions.entry(file_id).or_insert_with(|| Positions { at: vec![None; destinations], touched: now });
        positions.at[dest] = Some(start);
        positions.touched = now;
        let passed: Vec<(u64, u64)> = self
            .blocks
            .iter()
            .filter(|((file, offset), stored)| *file == file_id && *offset < start && stored.takers & (1 << dest) != 0)
            .map(|(key, _)| *key)
            .collect();
        for key in passed {
            self.let_go(dest, key);
        }
        if now.duration_since(self.positions_pruned) >= MAX_AGE {
            self.positions.retain(|_, p| now.duration_since(p.touched) < MAX_AGE);
            self.positions_pruned = now;
        }
    }

    /// The destinations other than `dest` that will read `start` of `file_id` before the cache
    /// could fill: at or behind it by less than the cache holds, or not reading the file yet.
    fn due(&self, dest: usize, file_id: u64, start: u64) -> u64 {
        let Some(positions) = self.positions.get(&file_id) else { return 0 };
        let mut takers = 0;
        for (other, at) in positions.at.iter().enumerate() {
            let due = match at {
                None => true,
                Some(at) => *at <= start && start - at <= MAX_BYTES as u64,
            };
            if other != dest && due {
                takers |= 1 << other;
            }
        }
        takers
    }

    fn take(&mut self, dest: usize, key: (u64, u64)) -> Option<Block> {
        let stored = self.blocks.get(&key).filter(|s| s.takers & (1 << dest) != 0)?;
        let block = stored.block.clone();
        self.let_go(dest, key);
        Some(block)
    }

    /// `dest` no longer needs the block at `key`; the last one to let go frees it.
    fn let_go(&mut self, dest: usize, key: (u64, u64)) {
        let stored = self.blocks.get_mut(&key).expect("present");
        stored.takers &= !(1 << dest);
        if stored.takers == 0 {
            let stored = self.blocks.remove(&key).expect("present");
            self.bytes -= stored.block.bytes_read;
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

    const MIB: u64 = 1 << 20;

    #[test]
    fn a_read_starts_empty_even_in_the_vectors_of_an_earlier_one() {
        for _ in 0..3 {
            let mut read = Lines::new();
            read.lines.push((None, 10, 9));
            read.bytes.extend_from_slice(b"the bytes of an earlier read");
            drop(read);
        }
        // Every spare (and then a fresh one): other tests may take or give spares meanwhile.
        let taken: Vec<Lines> = (0..=SPARE_READS).map(|_| Lines::new()).collect();
        assert!(taken.iter().all(|read| read.lines.is_empty() && read.bytes.is_empty()));
        // One huge read's vectors are not kept.
        let mut huge = Lines::new();
        huge.bytes.reserve(MAX_SPARE_BYTES + 1);
        drop(huge);
        let after: Vec<Lines> = (0..=SPARE_READS).map(|_| Lines::new()).collect();
        assert!(after.iter().all(|read| read.bytes.capacity() <= MAX_SPARE_BYTES));
    }

    fn block(end: u64, bytes: usize) -> Block {
        let mut lines = Lines::new();
        lines.lines.push((None, end, 0));
        Block { lines: Arc::new(lines), end, bytes_read: bytes }
    }

    /// What `dest` gets at `start` of `file_id`: Some(end of the block taken), or None after
    /// reading (for all, offering nothing, or alone).
    fn take(shared: &SharedReads, dest: usize, file_id: u64, start: u64) -> Option<u64> {
        match shared.claim(dest, file_id, start) {
            Claim::Take(b) => Some(b.end),
            Claim::ReadForAll => {
                shared.offer(file_id, start, None);
                None
            }
            Claim::ReadAlone => None,
        }
    }

    fn read_for_all(shared: &SharedReads, dest: usize, file_id: u64, start: u64, b: Block) {
        assert!(matches!(shared.claim(dest, file_id, start), Claim::ReadForAll), "{dest} reads {start} for all");
        shared.offer(file_id, start, Some(b));
    }

    fn bytes(shared: &SharedReads) -> usize {
        shared.inner.lock().unwrap().bytes
    }

    #[test]
    fn one_destination_has_nobody_to_share_with() {
        assert!(SharedReads::for_destinations(1).is_none());
    }

    #[test]
    fn a_block_is_taken_once_by_each_other_destination_then_gone() {
        let shared = SharedReads::for_destinations(3).unwrap();
        read_for_all(&shared, 0, 7, 100, block(200, 100));
        assert_eq!(take(&shared, 1, 7, 100), Some(200));
        assert_eq!(take(&shared, 2, 7, 100), Some(200));
        assert_eq!(bytes(&shared), 0);
        assert_eq!(take(&shared, 1, 7, 100), None, "taken once");
    }

    #[test]
    fn only_the_exact_offset_of_the_same_file_matches() {
        let shared = SharedReads::for_destinations(2).unwrap();
        read_for_all(&shared, 0, 7, 100, block(200, 100));
        assert_eq!(take(&shared, 1, 8, 100), None);
        assert_eq!(take(&shared, 1, 7, 50), None);
        assert_eq!(take(&shared, 1, 7, 100), Some(200));
    }

    #[test]
    fn the_reader_does_not_take_its_own_block() {
        let shared = SharedReads::for_destinations(2).unwrap();
        read_for_all(&shared, 0, 7, 0, block(100, 100));
        assert_eq!(take(&shared, 0, 7, 0), None);
        assert_eq!(take(&shared, 1, 7, 0), Some(100));
    }

    #[test]
    fn a_destination_arriving_while_another_reads_the_range_for_it_waits_for_its_block() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert!(matches!(shared.claim(0, 7, 0), Claim::ReadForAll));
        let reader = {
            let shared = shared.clone();
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(10));
                shared.offer(7, 0, Some(block(300, 300)));
            })
        };
        assert_eq!(take(&shared, 1, 7, 0), Some(300));
        reader.join().unwrap();
    }

    #[test]
    fn a_reader_that_never_offers_is_waited_for_only_so_long_and_the_range_is_then_read_alone() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert!(matches!(shared.claim(0, 7, 0), Claim::ReadForAll));
        let started = Instant::now();
        assert!(matches!(shared.claim(1, 7, 0), Claim::ReadAlone));
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
        read_for_all(&shared, 0, 7, 100, block(200, 100));
        shared.inner.lock().unwrap().order[0].0 -= MAX_AGE;
        shared.inner.lock().unwrap().blocks.get_mut(&(7, 100)).unwrap().stored_at -= MAX_AGE;
        read_for_all(&shared, 0, 9, 0, block(10, 10));
        assert_eq!(take(&shared, 1, 7, 100), None);
        assert_eq!(bytes(&shared), 10);
    }

    #[test]
    fn a_full_cache_keeps_nothing_more_and_the_others_read_for_themselves() {
        let shared = SharedReads::for_destinations(2).unwrap();
        read_for_all(&shared, 0, 1, 0, block(MAX_BYTES as u64, MAX_BYTES));
        assert!(matches!(shared.claim(0, 2, 0), Claim::ReadAlone));
        assert_eq!(take(&shared, 1, 2, 0), None);
        assert!(take(&shared, 1, 1, 0).is_some());
        read_for_all(&shared, 0, 2, 100, block(110, 10));
        assert!(take(&shared, 1, 2, 100).is_some());
    }

    /// The failure this replaced: a destination behind the other kept its reads for it although
    /// the other had passed them; they filled the cache, and nothing was shared until they aged out.
    #[test]
    fn a_range_the_other_destination_has_passed_is_read_alone() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert_eq!(take(&shared, 0, 7, 9 * MIB), None, "0 is ahead");
        for start in 0..8 {
            assert!(matches!(shared.claim(1, 7, start * MIB), Claim::ReadAlone), "1 at {start} MiB, behind 0");
        }
        assert_eq!(bytes(&shared), 0);
    }

    #[test]
    fn a_range_is_kept_only_for_a_destination_close_enough_behind_to_reach_it() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert_eq!(take(&shared, 1, 7, 10 * MIB), None);
        assert!(matches!(shared.claim(0, 7, 20 * MIB), Claim::ReadAlone), "1 is 10 MiB behind");
        assert!(matches!(shared.claim(0, 7, 12 * MIB), Claim::ReadForAll), "1 is 2 MiB behind");
        shared.offer(7, 12 * MIB, Some(block(13 * MIB, MIB as usize)));
        assert_eq!(take(&shared, 1, 7, 12 * MIB), Some(13 * MIB));
    }

    #[test]
    fn a_block_is_let_go_when_the_destination_it_was_kept_for_moves_past_it() {
        let shared = SharedReads::for_destinations(2).unwrap();
        read_for_all(&shared, 1, 7, 0, block(MIB, MIB as usize));
        assert_eq!(bytes(&shared), MIB as usize);
        assert_eq!(take(&shared, 0, 7, 3 * MIB), None, "0 starts past it (its checkpoint was there)");
        assert_eq!(bytes(&shared), 0);
    }

    #[test]
    fn positions_of_files_nobody_reads_any_more_are_forgotten() {
        let shared = SharedReads::for_destinations(2).unwrap();
        assert_eq!(take(&shared, 0, 7, 0), None);
        {
            let mut inner = shared.inner.lock().unwrap();
            inner.positions.get_mut(&7).unwrap().touched -= MAX_AGE;
            inner.positions_pruned -= MAX_AGE;
        }
        assert_eq!(take(&shared, 0, 8, 0), None);
        let inner = shared.inner.lock().unwrap();
        assert!(!inner.positions.contains_key(&7) && inner.positions.contains_key(&8));
    }
}

//! Compressors kept between uses. Creating one zeroes or allocates its tables (a zlib-rs state
//! is about 400 KiB, a libdeflate or zstd context a few hundred KiB); with many small batches
//! that cost more than compressing. A finished writer gives its compressor back here, and the
//! next writer at the same level takes it instead of making one.

use std::sync::Mutex;

/// Idle compressors by level, for the next writer at that level; beyond `keep` they are freed.
pub(crate) struct Idle<T> {
    by_level: Mutex<Vec<(i32, T)>>,
    keep: usize,
}

impl<T> Idle<T> {
    pub(crate) const fn keeping(keep: usize) -> Self {
        Idle { by_level: Mutex::new(Vec::new()), keep }
    }

    pub(crate) fn take(&self, level: i32) -> Option<T> {
        let mut idle = self.by_level.lock().expect("compressor pool lock");
        idle.iter().position(|(l, _)| *l == level).map(|i| idle.swap_remove(i).1)
    }

    pub(crate) fn give_back(&self, level: i32, compressor: T) {
        let mut idle = self.by_level.lock().expect("compressor pool lock");
        if idle.len() < self.keep {
            idle.push((level, compressor));
        }
    }
}

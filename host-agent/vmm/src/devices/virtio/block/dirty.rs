//! [`DirtyBlocks`]: which 4 KiB blocks of a writable disk the guest wrote since the last look.
//!
//! The device thread marks a write's blocks once the write has reached the file (so a reader
//! that clears the log and then reads the file either sees the write or finds it marked
//! again); a live migration reads and clears the log each round and copies what it names
//! ([`crate::migration`]). The log is always on: a mark is a few atomic ORs per write, and a
//! migration begins by clearing it.

use std::sync::atomic::{AtomicU64, Ordering};

/// The log's unit: a guest page, so that a disk's blocks and memory's pages count alike.
pub const BLOCK: u64 = 4096;

/// One bit per [`BLOCK`] of a disk, set by writes, read and cleared by [`DirtyBlocks::take`].
#[derive(Debug)]
pub struct DirtyBlocks {
    bytes: u64,
    words: Vec<AtomicU64>,
}

impl DirtyBlocks {
    /// A clean log for a disk of `bytes`.
    pub fn new(bytes: u64) -> Self {
        let blocks = bytes.div_ceil(BLOCK);
        let words = usize::try_from(blocks.div_ceil(64)).unwrap_or(usize::MAX);
        Self {
            bytes,
            words: (0..words).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The disk's size in bytes.
    pub fn disk_bytes(&self) -> u64 {
        self.bytes
    }

    /// Marks the blocks that `len` bytes at `offset` touch (nothing past the disk's end).
    pub fn mark(&self, offset: u64, len: u64) {
        if len == 0 || offset >= self.bytes {
            return;
        }
        let end = offset.saturating_add(len).min(self.bytes);
        let (first, last) = (offset / BLOCK, (end - 1) / BLOCK);
        let mut block = first;
        while block <= last {
            let word = (block / 64) as usize;
            let bit = block % 64;
            // Whole words at once where the run covers them.
            let span = (64 - bit).min(last - block + 1);
            let mask = if span == 64 {
                u64::MAX
            } else {
                ((1u64 << span) - 1) << bit
            };
            if let Some(w) = self.words.get(word) {
                w.fetch_or(mask, Ordering::Release);
            }
            block += span;
        }
    }

    /// Reads and clears the log: the blocks written since the last call, in order.
    pub fn take(&self) -> BlockSet {
        BlockSet {
            bytes: self.bytes,
            words: self
                .words
                .iter()
                .map(|w| w.swap(0, Ordering::AcqRel))
                .collect(),
        }
    }
}

/// A set of a disk's blocks, as [`DirtyBlocks::take`] read it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSet {
    bytes: u64,
    words: Vec<u64>,
}

impl BlockSet {
    /// How many blocks it names.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Its blocks as byte ranges `(offset, len)` of at most `max` bytes (a multiple of
    /// [`BLOCK`]) each, in disk order; the last block of a disk whose size is not a multiple of
    /// [`BLOCK`] is cut at the disk's end.
    pub fn runs(&self, max: u64) -> Vec<(u64, u64)> {
        let max_blocks = (max / BLOCK).max(1);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut open: Option<(u64, u64)> = None;
        for (w, &word) in self.words.iter().enumerate() {
            if word == 0 {
                if let Some(run) = open.take() {
                    runs.push(run);
                }
                continue;
            }
            for bit in 0..64 {
                let block = w as u64 * 64 + bit;
                if word & (1 << bit) == 0 {
                    if let Some(run) = open.take() {
                        runs.push(run);
                    }
                    continue;
                }
                open = match open {
                    Some((first, n)) if n < max_blocks => Some((first, n + 1)),
                    Some(run) => {
                        runs.push(run);
                        Some((block, 1))
                    }
                    None => Some((block, 1)),
                };
            }
        }
        runs.extend(open);
        runs.into_iter()
            .filter_map(|(first, n)| {
                let offset = first * BLOCK;
                (offset < self.bytes).then(|| (offset, (n * BLOCK).min(self.bytes - offset)))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_mark_the_blocks_they_touch_and_take_clears_them() {
        // 10 blocks and a half: the last block is 2 KiB.
        let log = DirtyBlocks::new(10 * BLOCK + 2048);
        assert_eq!(log.take().count(), 0);
        log.mark(0, 1); // block 0
        log.mark(BLOCK - 1, 2); // blocks 0 and 1
        log.mark(5 * BLOCK, 3 * BLOCK); // 5, 6, 7
        log.mark(10 * BLOCK + 512, 512); // 10, the short one
        log.mark(11 * BLOCK, 4096); // past the end: nothing
        log.mark(3 * BLOCK, 0); // empty: nothing
        let set = log.take();
        assert_eq!(set.count(), 6);
        assert_eq!(
            set.runs(1 << 20),
            vec![(0, 2 * BLOCK), (5 * BLOCK, 3 * BLOCK), (10 * BLOCK, 2048)]
        );
        // Runs are cut at the size asked for.
        assert_eq!(
            set.runs(2 * BLOCK),
            vec![
                (0, 2 * BLOCK),
                (5 * BLOCK, 2 * BLOCK),
                (7 * BLOCK, BLOCK),
                (10 * BLOCK, 2048)
            ]
        );
        assert_eq!(log.take().count(), 0, "taken means cleared");
    }

    #[test]
    fn long_writes_set_whole_words_and_runs_cross_them() {
        let log = DirtyBlocks::new(300 * BLOCK);
        log.mark(10 * BLOCK, 200 * BLOCK);
        let set = log.take();
        assert_eq!(set.count(), 200);
        assert_eq!(set.runs(u64::MAX), vec![(10 * BLOCK, 200 * BLOCK)]);
        log.mark(0, u64::MAX);
        assert_eq!(log.take().count(), 300);
    }
}

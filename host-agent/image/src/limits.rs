//! Size limits of an import, enforced while the bytes stream, so a gzip bomb or a tar of a
//! million empty files stops at the limit instead of filling the disk first.
//!
//! One [`Budget`] is shared by every layer of an image: [`BudgetReader`] charges each
//! decompressed byte to it and fails the read once the total passes the limit. The failure
//! reaches the caller as an `io::Error` from deep inside the tar reader, so the budget also
//! remembers that it was exceeded: callers ask [`Budget::exceeded`] to turn that error back
//! into a typed one.

use std::cell::Cell;
use std::io::{self, Read};

/// Limits of one import.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImportLimits {
    /// Most uncompressed layer bytes (tar headers included), summed over all layers.
    pub max_bytes: u64,
    /// Most tar entries, summed over all layers.
    pub max_entries: u64,
    /// Largest JSON document (index, manifest, config) read into memory.
    pub max_json_bytes: u64,
}

impl Default for ImportLimits {
    fn default() -> Self {
        Self {
            max_bytes: 16 << 30,
            max_entries: 2_000_000,
            max_json_bytes: 4 << 20,
        }
    }
}

/// Bytes left in an import.
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: Cell<u64>,
    exceeded: Cell<bool>,
}

impl Budget {
    /// A budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Cell::new(0),
            exceeded: Cell::new(false),
        }
    }

    /// The limit in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Bytes charged so far.
    pub fn used(&self) -> u64 {
        self.used.get()
    }

    /// Whether a read failed because the limit was passed.
    pub fn exceeded(&self) -> bool {
        self.exceeded.get()
    }

    fn charge(&self, n: usize) -> io::Result<()> {
        let used = self.used.get().saturating_add(n as u64);
        self.used.set(used);
        if used > self.limit {
            self.exceeded.set(true);
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "image size limit exceeded",
            ));
        }
        Ok(())
    }
}

/// A reader that charges every byte to a [`Budget`].
#[derive(Debug)]
pub struct BudgetReader<'a, R> {
    inner: R,
    budget: &'a Budget,
}

impl<'a, R: Read> BudgetReader<'a, R> {
    /// Wraps `inner`.
    pub fn new(inner: R, budget: &'a Budget) -> Self {
        Self { inner, budget }
    }

    /// The inner reader.
    pub fn into_inner(self) -> R {
        self.inner
    }
}

impl<R: Read> Read for BudgetReader<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.budget.exceeded() {
            return Err(io::Error::new(
                io::ErrorKind::FileTooLarge,
                "image size limit exceeded",
            ));
        }
        let n = self.inner.read(buf)?;
        self.budget.charge(n)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stops_past_the_limit_and_remembers() {
        let budget = Budget::new(10);
        let data = [0u8; 64];
        let mut r = BudgetReader::new(&data[..], &budget);
        let err = io::copy(&mut r, &mut io::sink()).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::FileTooLarge);
        assert!(budget.exceeded());
        // A second reader on the same budget fails at once.
        let mut r2 = BudgetReader::new(&data[..], &budget);
        assert!(r2.read(&mut [0u8; 1]).is_err());
    }

    #[test]
    fn shared_across_readers_up_to_the_limit() {
        let budget = Budget::new(10);
        let data = [0u8; 5];
        for _ in 0..2 {
            io::copy(&mut BudgetReader::new(&data[..], &budget), &mut io::sink()).unwrap();
        }
        assert_eq!(budget.used(), 10);
        assert!(!budget.exceeded());
    }
}

//! What the fuzz targets share: the input reader and the hostile descriptor table and
//! available ring a fuzzed guest writes.
//!
//! It lives outside `fuzz_targets/` and each target includes it with
//! `#[path = "../common/rings.rs"] mod rings;`: cargo-fuzz builds every file of that folder
//! named in `Cargo.toml` as its own binary, and a shared module there would look like one.
//! Keeping it a plain file rather than a `fuzzing` feature of the crate keeps fuzz-only code
//! out of `nanoclaw-vmm` itself.

use nanoclaw_vmm::memory::GuestRam;
use vm_memory::{Bytes, GuestAddress};

/// The fuzzer's bytes, read front to back; missing bytes read as zero.
pub struct Input<'a>(pub &'a [u8]);

impl Input<'_> {
    /// Up to `n` bytes (fewer at the end of the input).
    pub fn take(&mut self, n: usize) -> Vec<u8> {
        let n = n.min(self.0.len());
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        head.to_vec()
    }

    /// One byte, or zero at the end of the input.
    pub fn byte(&mut self) -> u8 {
        self.take(1).first().copied().unwrap_or(0)
    }
}

/// `b` as an `N`-byte array, zero-padded or truncated.
pub fn le<const N: usize>(b: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    out[..b.len().min(N)].copy_from_slice(&b[..b.len().min(N)]);
    out
}

/// Where the hostile rings and their data go.
pub struct Rings {
    /// The queue's descriptor table.
    pub desc_table: GuestAddress,
    /// The queue's available ring.
    pub avail: GuestAddress,
    /// The queue size.
    pub qsize: u16,
    /// Start of the data area the descriptors mostly point into.
    pub data_base: u64,
    /// Length of the data area.
    pub data_len: u64,
    /// Whether descriptor lengths with the top bit clear are folded into the data area too
    /// (otherwise every length is used raw).
    pub fold_len: bool,
}

/// Reads the hostile queue from `input` and writes it into `mem`:
/// - 1 byte: number of descriptors (mod `qsize + 1`), then 16 bytes per descriptor (addr u64,
///   len u32, flags u16, next u16, little endian). Addresses with the top bit clear are folded
///   into the data area; with it set they are used raw. Lengths likewise if `fold_len`.
/// - 1 byte: number of available-ring entries (mod 33), then 1 byte per entry (the head
///   index; values beyond the queue size are kept).
/// - up to `data_len` bytes: copied to `data_base`.
///
/// Returns the number of available-ring entries and the head in each available-ring slot
/// (zero where none was written).
pub fn write_hostile_queue(mem: &GuestRam, input: &mut Input<'_>, r: &Rings) -> (u8, Vec<u16>) {
    let n_desc = usize::from(input.byte() % (r.qsize as u8 + 1));
    for i in 0..n_desc {
        let raw = le::<16>(&input.take(16));
        let mut addr = u64::from_le_bytes(le::<8>(&raw[..8]));
        if addr >> 63 == 0 {
            addr = r.data_base + addr % r.data_len;
        }
        let mut len = u32::from_le_bytes(le::<4>(&raw[8..12]));
        if r.fold_len && len >> 31 == 0 {
            len %= r.data_len as u32;
        }
        let mut d = raw;
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        mem.write_slice(&d, GuestAddress(r.desc_table.0 + 16 * i as u64))
            .unwrap();
    }
    let n_avail = input.byte() % 33;
    let mut heads = vec![0u16; usize::from(r.qsize)];
    for i in 0..usize::from(n_avail) {
        let head = u16::from(input.byte());
        heads[i % usize::from(r.qsize)] = head;
        mem.write_obj(
            head,
            GuestAddress(r.avail.0 + 4 + 2 * (i as u64 % u64::from(r.qsize))),
        )
        .unwrap();
    }
    mem.write_obj(u16::from(n_avail), GuestAddress(r.avail.0 + 2))
        .unwrap();
    let rest = input.take(r.data_len as usize);
    mem.write_slice(&rest, GuestAddress(r.data_base)).unwrap();
    (n_avail, heads)
}

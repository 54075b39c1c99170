//! Which guest pages changed since the last look: KVM's log of the guest's writes and
//! vm-memory's bitmap of the devices' writes, read, cleared and merged.

use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::mmap::MmapRegion;
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::memory::{GuestRam, MemoryError, dirty_log};
use crate::snapshot::memory::PAGE;

/// The changed pages of each region of guest RAM: one bit per page, in 64-bit words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyPages {
    regions: Vec<Region>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Region {
    start: u64,
    pages: usize,
    bits: Vec<u64>,
}

/// The vm-memory bitmap of one region.
fn device_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    let mapping: &MmapRegion<AtomicBitmap> = region;
    mapping.bitmap()
}

impl DirtyPages {
    /// Clears both logs without reading them: what a migration does just after it turns KVM's
    /// logging on, so its first full copy starts from a clean slate.
    pub fn clear_device_log(mem: &GuestRam) {
        for region in mem.iter() {
            device_bitmap(region).reset();
        }
    }

    /// Reads and clears the pages written since the last call: by the guest (KVM's log of slot
    /// `i` for region `i`, which must log dirty pages) and by the VMM's devices.
    pub fn collect(vm: &VmFd, mem: &GuestRam) -> Result<Self, MemoryError> {
        let mut regions = Vec::with_capacity(mem.num_regions());
        for (slot, region) in (0u32..).zip(mem.iter()) {
            let len = region.len() as usize;
            let pages = len.div_ceil(PAGE);
            let mut bits = dirty_log(vm, slot, len)?;
            bits.resize(pages.div_ceil(64), 0);
            for (word, device) in bits.iter_mut().zip(device_bitmap(region).get_and_reset()) {
                *word |= device;
            }
            regions.push(Region {
                start: region.start_addr().raw_value(),
                pages,
                bits,
            });
        }
        Ok(Self { regions })
    }

    /// How many pages changed.
    pub fn count(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The changed pages as runs `(guest address, pages)` of at most `max` pages each, in
    /// address order.
    pub fn runs(&self, max: usize) -> Vec<(u64, usize)> {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for r in &self.regions {
            let mut open: Option<(u64, usize)> = None;
            for page in 0..r.pages {
                let set = r
                    .bits
                    .get(page / 64)
                    .is_some_and(|w| w & (1 << (page % 64)) != 0);
                if !set {
                    runs.extend(open.take());
                    continue;
                }
                match &mut open {
                    Some((_, n)) if *n < max => *n += 1,
                    _ => {
                        runs.extend(open.take());
                        open = Some((r.start + (page * PAGE) as u64, 1));
                    }
                }
            }
            runs.extend(open);
        }
        runs
    }

    /// Marks every page of `mem` changed (tests, and a full copy described as runs).
    #[cfg(test)]
    pub fn all(mem: &GuestRam) -> Self {
        let regions = mem
            .iter()
            .map(|region| {
                let pages = (region.len() as usize).div_ceil(PAGE);
                let mut bits = vec![u64::MAX; pages.div_ceil(64)];
                if !pages.is_multiple_of(64) {
                    *bits.last_mut().unwrap_or(&mut 0) = (1 << (pages % 64)) - 1;
                }
                Region {
                    start: region.start_addr().raw_value(),
                    pages,
                    bits,
                }
            })
            .collect();
        Self { regions }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pages(start: u64, pages: usize, set: &[usize]) -> DirtyPages {
        let mut bits = vec![0u64; pages.div_ceil(64)];
        for &p in set {
            bits[p / 64] |= 1 << (p % 64);
        }
        DirtyPages {
            regions: vec![Region { start, pages, bits }],
        }
    }

    #[test]
    fn runs_join_neighbours_and_split_at_the_limit() {
        let d = pages(0x10_0000, 200, &[0, 1, 2, 5, 63, 64, 65, 199]);
        assert_eq!(d.count(), 8);
        assert_eq!(
            d.runs(2),
            vec![
                (0x10_0000, 2),
                (0x10_0000 + 2 * 4096, 1),
                (0x10_0000 + 5 * 4096, 1),
                (0x10_0000 + 63 * 4096, 2),
                (0x10_0000 + 65 * 4096, 1),
                (0x10_0000 + 199 * 4096, 1),
            ]
        );
        assert_eq!(d.runs(256)[2], (0x10_0000 + 63 * 4096, 3));
    }

    #[test]
    fn nothing_changed_gives_no_runs() {
        let d = pages(0, 100, &[]);
        assert_eq!(d.count(), 0);
        assert!(d.runs(256).is_empty());
    }

    #[test]
    fn every_page_of_memory() {
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        let d = DirtyPages::all(&mem);
        assert_eq!(d.count(), 256);
        assert_eq!(d.runs(256), vec![(0, 256)]);
    }

    #[test]
    fn a_device_write_is_seen_once() {
        use vm_memory::Bytes;
        let mem = crate::memory::create_guest_memory(1 << 20).unwrap();
        DirtyPages::clear_device_log(&mem);
        mem.write_obj(7u32, vm_memory::GuestAddress(0x3004))
            .unwrap();
        let bits: Vec<u64> = device_bitmap(mem.iter().next().unwrap()).get_and_reset();
        assert_eq!(bits[0], 1 << 3);
        assert!(device_bitmap(mem.iter().next().unwrap()).get_and_reset()[0] == 0);
    }
}

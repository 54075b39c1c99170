//! The memory file: guest RAM, region after region, as a sparse file.
//!
//! Each region of guest RAM takes `len` bytes of the file, in the order of the regions, with
//! no gaps and no header (the regions and the file's length are in the state file). Writing
//! copies guest memory out in chunks of 1 MiB and writes only the runs of pages that
//! hold a non-zero byte, at their offset; a zero page is never written, so on a file system that
//! supports holes it takes no disk block, and the file's length is set at the end so trailing
//! zero pages cost nothing either.
//!
//! Reading is the mirror: only the file's data segments are read (`lseek` with `SEEK_DATA` and
//! `SEEK_HOLE`; a file system without them is read whole), in chunks, straight into fresh
//! (zero-filled, untouched) anonymous guest memory with `pread`, so the restored VM's resident
//! memory and the time a restore takes grow with what the guest had touched, not with its
//! size. The data segments are the runs of non-zero pages the writer wrote (on a file system
//! whose blocks are larger than a page, a segment may also hold a few zero pages, which are
//! then read in too). No bounce buffer and no scan: a restore reads each byte once.

use crate::memory::GuestRam;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryRegion,
    GuestRegionMmap,
};

use super::SnapshotError;

/// The unit of sparseness: a guest page.
pub const PAGE: usize = 4096;
/// How much guest memory is copied at a time.
const CHUNK: usize = 1 << 20;

/// One region of guest RAM, as the state file records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionState {
    /// Guest physical address of its first byte.
    pub guest_addr: u64,
    /// Its length in bytes (a multiple of [`PAGE`]).
    pub len: u64,
}

/// Where guest RAM is and how long the memory file is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemoryState {
    /// The regions, in file order.
    pub regions: Vec<RegionState>,
    /// The memory file's length: the sum of the regions' lengths.
    pub file_len: u64,
}

impl MemoryState {
    /// The layout of `mem`.
    pub fn of(mem: &GuestRam) -> Self {
        let regions: Vec<RegionState> = mem
            .iter()
            .map(|r| RegionState {
                guest_addr: r.start_addr().raw_value(),
                len: r.len(),
            })
            .collect();
        let file_len = regions.iter().map(|r| r.len).sum();
        Self { regions, file_len }
    }

    /// Guest RAM in bytes.
    pub fn total(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Checks that `mem` has exactly this layout and that the file length adds up.
    pub fn check_matches(&self, mem: &GuestRam) -> Result<(), SnapshotError> {
        self.check_layout(&Self::of(mem))
    }

    /// Checks that `ours` (a VM's layout) is exactly this one and that the file length adds up.
    pub fn check_layout(&self, ours: &Self) -> Result<(), SnapshotError> {
        if self.file_len != self.total() {
            return Err(SnapshotError::MemoryLayout(format!(
                "the state says the memory file holds {} bytes but its regions add up to {}",
                self.file_len,
                self.total()
            )));
        }
        if ours.total() != self.total() {
            return Err(SnapshotError::MemorySizeMismatch {
                snapshot: self.total(),
                vm: ours.total(),
            });
        }
        if ours.regions != self.regions {
            return Err(SnapshotError::MemoryLayout(format!(
                "snapshot regions {:?} differ from the VM's {:?}",
                self.regions, ours.regions
            )));
        }
        Ok(())
    }
}

/// Byte runs `[start, end)` of `chunk`, in whole pages, whose pages hold a non-zero byte.
pub(crate) fn nonzero_runs(chunk: &[u8]) -> Vec<(usize, usize)> {
    let mut runs: Vec<(usize, usize)> = Vec::new();
    for (i, page) in chunk.chunks(PAGE).enumerate() {
        if page.iter().all(|&b| b == 0) {
            continue;
        }
        let start = i * PAGE;
        let end = start + page.len();
        match runs.last_mut() {
            Some(last) if last.1 == start => last.1 = end,
            _ => runs.push((start, end)),
        }
    }
    runs
}

/// What [`write_memory`] wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemoryWritten {
    /// The file's length (guest RAM size).
    pub file_len: u64,
    /// Bytes actually written (the non-zero pages).
    pub data_bytes: u64,
}

/// Writes guest memory `mem` to a new file at `path` (mode 0600), sparse, and syncs it.
pub fn write_memory(path: &Path, mem: &GuestRam) -> Result<MemoryWritten, SnapshotError> {
    let io = |source| SnapshotError::io("write the memory file", path, source);
    let file = super::create_private(path).map_err(io)?;
    let mut buf = vec![0u8; CHUNK];
    let mut file_off = 0u64;
    let mut data_bytes = 0u64;
    for region in mem.iter() {
        let base = region.start_addr();
        let len = region.len();
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            let chunk = &mut buf[..n];
            mem.read_slice(chunk, base.unchecked_add(done))
                .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
            for (start, end) in nonzero_runs(chunk) {
                file.write_all_at(&chunk[start..end], file_off + done + start as u64)
                    .map_err(io)?;
                data_bytes += (end - start) as u64;
            }
            done += n as u64;
        }
        file_off += len;
    }
    file.set_len(file_off).map_err(io)?;
    file.sync_all().map_err(io)?;
    Ok(MemoryWritten {
        file_len: file_off,
        data_bytes,
    })
}

/// Reads the memory file at `path` into `mem`, which must be fresh (all zero) and laid out as
/// `state` says. The file must be exactly `state.file_len` bytes long.
pub fn read_memory(path: &Path, state: &MemoryState, mem: &GuestRam) -> Result<(), SnapshotError> {
    state.check_matches(mem)?;
    let file = &File::open(path)
        .map_err(|source| SnapshotError::io("read the memory file", path, source))?;
    check_file_len(file, path, state)?;
    let io = |source| SnapshotError::io("read the memory file", path, source);
    let found = state.file_len;
    let mut file_off = 0u64;
    for region in &state.regions {
        let base = GuestAddress(region.guest_addr);
        let region_end = file_off + region.len;
        let mut pos = file_off;
        while pos < region_end {
            let Some((data_start, data_end)) = data_segment(file, pos, found).map_err(io)? else {
                break;
            };
            let start = data_start.max(pos);
            let end = data_end.min(region_end);
            if start >= end {
                break;
            }
            let mut off = start;
            while off < end {
                let n = (end - off).min(CHUNK as u64) as usize;
                let guest_off = off - file_off;
                let slice = mem
                    .get_slice(base.unchecked_add(guest_off), n)
                    .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
                let guard = slice.ptr_guard_mut();
                // SAFETY: `get_slice` checked that these `n` bytes are guest memory this process
                // maps, inside one region. The VM is being built: no vCPU has run and no device
                // thread has its queues yet, so nothing else reads or writes these bytes while
                // `chunk` lives (it ends with this loop step).
                let chunk = unsafe { std::slice::from_raw_parts_mut(guard.as_ptr(), n) };
                file.read_exact_at(chunk, off).map_err(|e| {
                    if e.kind() == std::io::ErrorKind::UnexpectedEof {
                        // The file shrank after its length was checked.
                        SnapshotError::MemoryFileTruncated {
                            expected: state.file_len,
                            found: off,
                        }
                    } else {
                        io(e)
                    }
                })?;
                off += n as u64;
            }
            pos = end;
        }
        file_off = region_end;
    }
    Ok(())
}

/// Checks that the memory file open as `file` (`path` names it in errors) is exactly as long
/// as `state` says.
fn check_file_len(file: &File, path: &Path, state: &MemoryState) -> Result<(), SnapshotError> {
    let found = file
        .metadata()
        .map_err(|source| SnapshotError::io("read the memory file", path, source))?
        .len();
    if found < state.file_len {
        return Err(SnapshotError::MemoryFileTruncated {
            expected: state.file_len,
            found,
        });
    }
    if found > state.file_len {
        return Err(SnapshotError::MemoryFileOversized {
            expected: state.file_len,
            found,
        });
    }
    Ok(())
}

/// Guest RAM of the layout `ranges` (a VM's, from [`crate::layout::ram_regions`]) mapped from
/// the memory file open as `file` (`path` names it in errors), copy-on-write: each region is a
/// `MAP_PRIVATE` mapping of its part of the file, so nothing is read now. A page comes from
/// the page cache when the guest (or a device) first touches it, a hole reads as zeros, and a
/// write makes the page the VM's own; the file is never written. This is how a restore gets
/// ready in milliseconds whatever the guest had touched.
///
/// The file must stay as long as it is while the VM runs (a page past a shortened end would
/// fault the VMM): the daemon's store never changes a stored file, and an unlinked file lives
/// on while it is mapped. The layout and the file's length are checked first.
pub fn map_memory_file(
    file: &File,
    path: &Path,
    state: &MemoryState,
    ranges: &[(GuestAddress, usize)],
) -> Result<GuestRam, SnapshotError> {
    let regions: Vec<RegionState> = ranges
        .iter()
        .map(|&(addr, len)| RegionState {
            guest_addr: addr.raw_value(),
            len: len as u64,
        })
        .collect();
    let file_len = regions.iter().map(|r| r.len).sum();
    state.check_layout(&MemoryState { regions, file_len })?;
    check_file_len(file, path, state)?;
    let io = |source| SnapshotError::io("map the memory file", path, source);
    let mut mapped = Vec::with_capacity(ranges.len());
    let mut file_off = 0u64;
    for &(addr, len) in ranges {
        let region = vm_memory::mmap::MmapRegionBuilder::new_with_bitmap(
            len,
            <vm_memory::bitmap::AtomicBitmap as vm_memory::bitmap::NewBitmap>::with_len(len),
        )
        .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
        .with_mmap_flags(libc::MAP_NORESERVE | libc::MAP_PRIVATE)
        .with_file_offset(FileOffset::new(file.try_clone().map_err(io)?, file_off))
        .build()
        .map_err(|e| SnapshotError::GuestMemory(e.to_string()))?;
        mapped.push(
            GuestRegionMmap::new(region, addr)
                .ok_or_else(|| SnapshotError::GuestMemory(format!("region at {addr:?}")))?,
        );
        file_off += len as u64;
    }
    GuestRam::from_regions(mapped).map_err(|e| SnapshotError::GuestMemory(e.to_string()))
}

/// The data segment `[start, end)` of `file` (of length `len`) at or after `pos`, `None` when
/// only a hole follows. A file system that does not know `SEEK_DATA` has one segment, the
/// whole file.
fn data_segment(file: &File, pos: u64, len: u64) -> std::io::Result<Option<(u64, u64)>> {
    use nix::errno::Errno;
    use nix::unistd::{Whence, lseek};
    let to_off = |v: u64| i64::try_from(v).map_err(|_| std::io::Error::from(Errno::EOVERFLOW));
    let start = match lseek(file, to_off(pos)?, Whence::SeekData) {
        Ok(start) => start as u64,
        // No data at or after `pos`.
        Err(Errno::ENXIO) => return Ok(None),
        Err(Errno::EINVAL) => return Ok((pos < len).then_some((pos, len))),
        Err(e) => return Err(e.into()),
    };
    let end = match lseek(file, to_off(start)?, Whence::SeekHole) {
        Ok(end) => end as u64,
        // The file shrank under us: read to its recorded end and let the read report it.
        Err(Errno::ENXIO) => len,
        Err(e) => return Err(e.into()),
    };
    Ok(Some((start, end.min(len))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn guest(mib: u64) -> GuestRam {
        crate::memory::create_guest_memory(mib << 20).unwrap()
    }

    #[test]
    fn runs_cover_exactly_the_nonzero_pages() {
        let mut chunk = vec![0u8; 6 * PAGE + 100];
        assert!(nonzero_runs(&chunk).is_empty());
        chunk[PAGE + 5] = 1;
        chunk[2 * PAGE] = 1;
        chunk[4 * PAGE + PAGE - 1] = 9;
        chunk[6 * PAGE + 99] = 3;
        assert_eq!(
            nonzero_runs(&chunk),
            [
                (PAGE, 3 * PAGE),
                (4 * PAGE, 5 * PAGE),
                (6 * PAGE, 6 * PAGE + 100)
            ]
        );
    }

    /// A 64 MiB guest that touched 1 MiB and a few scattered pages: the file is 64 MiB long but
    /// takes about what was touched on disk, and reads back byte for byte.
    #[test]
    fn a_mostly_zero_memory_is_small_on_disk_and_reads_back() {
        let mem = guest(64);
        let touched: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 | 1).collect();
        mem.write_slice(&touched, GuestAddress(0x10_0000)).unwrap();
        for addr in [0x0u64, 0x7000, 0x200_0000, (64 << 20) - 8] {
            mem.write_obj(0xdead_beef_u64, GuestAddress(addr)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let written = write_memory(&path, &mem).unwrap();
        assert_eq!(written.file_len, 64 << 20);
        assert_eq!(written.data_bytes, (1 << 20) + 4 * PAGE as u64);
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 64 << 20);
        assert_eq!(meta.mode() & 0o777, 0o600);
        let on_disk = meta.blocks() * 512;
        // File systems allocate in blocks and may add some metadata, but nothing near 64 MiB.
        assert!(
            on_disk <= 2 << 20,
            "a 64 MiB memory file with 1 MiB of data takes {on_disk} bytes on disk"
        );

        let state = MemoryState::of(&mem);
        let fresh = guest(64);
        read_memory(&path, &state, &fresh).unwrap();
        let mut back = vec![0u8; touched.len()];
        fresh
            .read_slice(&mut back, GuestAddress(0x10_0000))
            .unwrap();
        assert_eq!(back, touched);
        for addr in [0x0u64, 0x7000, 0x200_0000, (64 << 20) - 8] {
            assert_eq!(
                fresh.read_obj::<u64>(GuestAddress(addr)).unwrap(),
                0xdead_beef
            );
        }
        assert_eq!(fresh.read_obj::<u64>(GuestAddress(0x300_0000)).unwrap(), 0);

        // The restore read only the data segments, and touched only the pages with data: the
        // rest of the fresh memory reads as zero.
        let segments: Vec<_> = std::iter::successors(
            data_segment(&File::open(&path).unwrap(), 0, 64 << 20).unwrap(),
            |&(_, end)| data_segment(&File::open(&path).unwrap(), end, 64 << 20).unwrap(),
        )
        .collect();
        assert!(
            segments.len() >= 3 && segments.iter().map(|(a, b)| b - a).sum::<u64>() < 2 << 20,
            "{segments:x?}"
        );
    }

    /// Without holes (as on a file system that has no SEEK_DATA) the whole file is one data
    /// segment and reads back all the same.
    #[test]
    fn a_mapped_memory_file_is_the_guests_ram_copy_on_write_and_the_file_never_changes() {
        let mem = guest(64);
        let touched: Vec<u8> = (0..256u32 << 10).map(|i| (i % 253) as u8 | 1).collect();
        mem.write_slice(&touched, GuestAddress(0x40_0000)).unwrap();
        mem.write_obj(0x1234_5678_u64, GuestAddress((64 << 20) - 8))
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        write_memory(&path, &mem).unwrap();
        let before = std::fs::read(&path).unwrap();
        let state = MemoryState::of(&mem);
        let file = File::open(&path).unwrap();
        let ranges = crate::layout::ram_regions(64 << 20);

        let mapped = map_memory_file(&file, &path, &state, &ranges).unwrap();
        let mut back = vec![0u8; touched.len()];
        mapped
            .read_slice(&mut back, GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(back, touched);
        assert_eq!(
            mapped
                .read_obj::<u64>(GuestAddress((64 << 20) - 8))
                .unwrap(),
            0x1234_5678
        );
        assert_eq!(mapped.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
        // Writes, over data and over a hole, are the mapping's own.
        mapped.write_obj(7u64, GuestAddress(0x40_0000)).unwrap();
        mapped.write_obj(9u64, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(mapped.read_obj::<u64>(GuestAddress(0x40_0000)).unwrap(), 7);
        // A second mapping of the same file (another copy) sees the file, not the first's
        // writes, and the file is as it was written.
        let other = map_memory_file(&file, &path, &state, &ranges).unwrap();
        assert_eq!(other.read_obj::<u64>(GuestAddress(0x10_0000)).unwrap(), 0);
        other
            .read_slice(&mut back, GuestAddress(0x40_0000))
            .unwrap();
        assert_eq!(back, touched);
        drop((mapped, other));
        assert!(std::fs::read(&path).unwrap() == before, "the file changed");

        // A file of the wrong length, or a VM of another size, is refused before any mapping.
        let short = dir.path().join("short.bin");
        std::fs::write(&short, &before[..1 << 20]).unwrap();
        assert!(matches!(
            map_memory_file(&File::open(&short).unwrap(), &short, &state, &ranges),
            Err(SnapshotError::MemoryFileTruncated { .. })
        ));
        assert!(matches!(
            map_memory_file(&file, &path, &state, &crate::layout::ram_regions(128 << 20)),
            Err(SnapshotError::MemorySizeMismatch { .. })
        ));
    }

    #[test]
    fn a_file_without_holes_reads_back_too() {
        let mem = guest(64);
        mem.write_obj(7u64, GuestAddress(0x5000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let mut bytes = vec![0u8; 64 << 20];
        bytes[0x5000] = 7;
        std::fs::write(&path, &bytes).unwrap();
        assert_eq!(
            data_segment(&File::open(&path).unwrap(), 0, 64 << 20).unwrap(),
            Some((0, 64 << 20))
        );
        let fresh = guest(64);
        read_memory(&path, &MemoryState::of(&mem), &fresh).unwrap();
        assert_eq!(fresh.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 7);
    }

    /// The yardstick: a 256 MiB guest that touched about 30 MiB gives a snapshot of at
    /// most 40 MiB on disk.
    #[test]
    fn a_256_mib_guest_that_touched_30_mib_takes_at_most_40_mib() {
        let mem = guest(256);
        // 30 MiB in scattered runs of 64 KiB, as a kernel's allocations would be.
        let run = vec![0x5au8; 64 << 10];
        for i in 0..480u64 {
            mem.write_slice(&run, GuestAddress(i * (512 << 10)))
                .unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        let written = write_memory(&path, &mem).unwrap();
        assert_eq!(written.data_bytes, 30 << 20);
        let on_disk = std::fs::metadata(&path).unwrap().blocks() * 512;
        assert!(on_disk <= 40 << 20, "{on_disk} bytes on disk");
    }

    #[test]
    fn a_memory_file_of_the_wrong_length_or_a_vm_of_another_size_is_refused() {
        let mem = guest(64);
        mem.write_obj(1u64, GuestAddress(0x1000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("memory.bin");
        write_memory(&path, &mem).unwrap();
        let state = MemoryState::of(&mem);

        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len((64 << 20) - PAGE as u64).unwrap();
        let err = read_memory(&path, &state, &guest(64)).unwrap_err();
        assert!(
            matches!(err, SnapshotError::MemoryFileTruncated { expected, found }
                if expected == 64 << 20 && found == (64 << 20) - PAGE as u64),
            "{err}"
        );
        file.set_len((64 << 20) + 1).unwrap();
        assert!(matches!(
            read_memory(&path, &state, &guest(64)),
            Err(SnapshotError::MemoryFileOversized { .. })
        ));
        file.set_len(64 << 20).unwrap();
        let err = read_memory(&path, &state, &guest(128)).unwrap_err();
        assert!(
            matches!(err, SnapshotError::MemorySizeMismatch { snapshot, vm }
                if snapshot == 64 << 20 && vm == 128 << 20),
            "{err}"
        );
        let mut lying = state.clone();
        lying.file_len += 1;
        assert!(matches!(
            read_memory(&path, &lying, &guest(64)),
            Err(SnapshotError::MemoryLayout(_))
        ));
        read_memory(&path, &state, &guest(64)).unwrap();
    }
}

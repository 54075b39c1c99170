//! A VM's writable disks in a live migration: copied in rounds beside its memory.
//!
//! The read-only image disk is the same file on both hosts (the daemons check the image's
//! digest), so only writable disks move. Each has its own log of written blocks
//! ([`DirtyBlocks`], kept by the device thread). The source sends every non-zero block in
//! round 0, then in each round the blocks its log names, and with the VM stopped (the device
//! thread paused, so nothing is in flight) the last ones. The target starts from an all-zero
//! file of the same size, so a zero block needs no bytes, and it syncs the file before it
//! answers, so that what the guest had flushed on the source is durable on the target too.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;

use crate::devices::virtio::block::{BlockSet, DirtyBlocks};
use crate::snapshot::memory::PAGE;

use super::stream::{self, StreamError};
use super::{MigrationError, check_cancel};

/// A writable disk the source sends: its file (a second descriptor of the device's) and its
/// log of written blocks.
#[derive(Debug, Clone)]
pub struct SourceDisk {
    /// The disk's file.
    pub file: Arc<File>,
    /// The device's log of written blocks.
    pub dirty: Arc<DirtyBlocks>,
}

impl SourceDisk {
    /// The disk's size in bytes.
    pub fn bytes(&self) -> u64 {
        self.dirty.disk_bytes()
    }
}

/// A writable disk the target fills: its file, all zero at first, and its size.
#[derive(Debug)]
pub struct TargetDisk {
    /// The disk's file, open for writing.
    pub file: File,
    /// Its size in bytes.
    pub bytes: u64,
}

fn disk_io(what: &'static str) -> impl FnOnce(std::io::Error) -> MigrationError {
    move |source| MigrationError::Disk { what, source }
}

/// Sends every block of `disk` that holds a non-zero byte, skipping the file's holes; returns
/// how many blocks.
pub(super) fn send_nonzero(
    link: &mut impl Write,
    index: usize,
    disk: &SourceDisk,
    buf: &mut [u8],
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    let size = disk.bytes();
    let mut sent = 0u64;
    let mut at = 0u64;
    while at < size {
        check_cancel(cancel)?;
        let Some((data_start, data_end)) = next_data(&disk.file, at, size)? else {
            break;
        };
        let mut pos = data_start;
        while pos < data_end {
            check_cancel(cancel)?;
            let n = (data_end - pos).min(buf.len() as u64) as usize;
            disk.file
                .read_exact_at(&mut buf[..n], pos)
                .map_err(disk_io("read the disk"))?;
            for (start, end) in crate::snapshot::memory::nonzero_runs(&buf[..n]) {
                stream::write_blocks(link, index, pos + start as u64, &buf[start..end])?;
                sent += ((end - start) as u64).div_ceil(PAGE as u64);
            }
            pos += n as u64;
        }
        at = data_end;
    }
    Ok(sent)
}

/// The next extent of the file that may hold data, from `at`, as block-aligned offsets within
/// `size`: `lseek(SEEK_DATA)` and `lseek(SEEK_HOLE)`, or the rest of the file where the file
/// system cannot tell.
fn next_data(file: &File, at: u64, size: u64) -> Result<Option<(u64, u64)>, MigrationError> {
    use std::os::fd::AsRawFd;
    let seek = |offset: u64, whence| -> std::io::Result<Option<u64>> {
        // SAFETY: lseek on a descriptor this function borrows; it touches no memory.
        let r = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
        if r >= 0 {
            return Ok(Some(r as u64));
        }
        match std::io::Error::last_os_error() {
            // No data at or after `offset`.
            e if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
            e => Err(e),
        }
    };
    let start = match seek(at, libc::SEEK_DATA) {
        Ok(None) => return Ok(None),
        Ok(Some(start)) => start,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => at,
        Err(e) => return Err(disk_io("find the disk's data")(e)),
    };
    if start >= size {
        return Ok(None);
    }
    let end = match seek(start, libc::SEEK_HOLE) {
        Ok(Some(end)) => end,
        Ok(None) => size,
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => size,
        Err(e) => return Err(disk_io("find the disk's holes")(e)),
    };
    let block = PAGE as u64;
    let start = start / block * block;
    let end = end.div_ceil(block).saturating_mul(block).min(size);
    Ok((start < end).then_some((start, end)))
}

/// Sends the blocks `set` names, as they are now in the file; returns how many.
pub(super) fn send_dirty(
    link: &mut impl Write,
    index: usize,
    disk: &SourceDisk,
    set: &BlockSet,
    buf: &mut [u8],
    cancel: &AtomicBool,
) -> Result<u64, MigrationError> {
    let mut sent = 0u64;
    for (offset, len) in set.runs(buf.len() as u64) {
        check_cancel(cancel)?;
        let data = &mut buf[..len as usize];
        disk.file
            .read_exact_at(data, offset)
            .map_err(disk_io("read the disk"))?;
        stream::write_blocks(link, index, offset, data)?;
        sent += len.div_ceil(PAGE as u64);
    }
    Ok(sent)
}

/// Checks the source's disks (their sizes, in order) against the target's.
pub(super) fn check_sizes(source: &[u64], target: &[TargetDisk]) -> Result<(), MigrationError> {
    let ours: Vec<u64> = target.iter().map(|d| d.bytes).collect();
    if source != ours.as_slice() {
        return Err(MigrationError::DiskLayout {
            source_sizes: source.to_vec(),
            target_sizes: ours,
        });
    }
    Ok(())
}

/// Writes a block record's bytes into the target's disk `index`, within its size.
pub(super) fn write_blocks(
    disks: &[TargetDisk],
    index: usize,
    offset: u64,
    data: &[u8],
) -> Result<(), MigrationError> {
    let outside = || StreamError::OutsideDisk {
        disk: index,
        offset,
        len: data.len(),
    };
    let disk = disks.get(index).ok_or_else(outside)?;
    let end = offset.checked_add(data.len() as u64).ok_or_else(outside)?;
    if end > disk.bytes {
        return Err(outside().into());
    }
    disk.file
        .write_all_at(data, offset)
        .map_err(disk_io("write the disk"))
}

/// Makes the target's disks durable before its copy runs.
pub(super) fn sync(disks: &[TargetDisk]) -> Result<(), MigrationError> {
    for disk in disks {
        disk.file.sync_data().map_err(disk_io("sync the disk"))?;
    }
    Ok(())
}

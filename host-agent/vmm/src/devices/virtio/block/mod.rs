//! virtio-blk (virtio spec 1.2 §5.2) backed by a host file.
//!
//! One request queue; requests are served one at a time on the device thread with positional
//! I/O on the backing file, through a bounded bounce buffer. Supported: `IN` (read), `OUT`
//! (write), `FLUSH` (`fdatasync`) and `GET_ID`. `DISCARD`, `WRITE_ZEROES` and every other type
//! are answered `VIRTIO_BLK_S_UNSUPP`. A read-only disk is opened `O_RDONLY`, offered with
//! `VIRTIO_BLK_F_RO`, and answers writes with `VIRTIO_BLK_S_IOERR` without touching the file.
//!
//! # Layout
//! - [`request`]: turns one descriptor chain into a request and executes it against a
//!   [`DiskBackend`] ([`request::process_chain`]). Every bound a guest could break is checked
//!   here.
//! - [`device`]: the virtio device: walks the queue, completes each chain in the used ring and
//!   interrupts the guest. Generic over the backend and the [`Interrupt`](super::mmio::Interrupt),
//!   so tests and the fuzzer drive it on a mock queue.
//! - [`disk_file`]: [`DiskFile`], the backend on a host file.
//! - [`dirty`]: [`DirtyBlocks`], a writable disk's log of written blocks, for live migration.
//! - [`event_handler`]: the device thread's epoll loop and the transport-facing front end.
//!
//! The guest is hostile: a malformed request is answered with an error status (or, with no
//! usable status byte, returned with used length 0) and counted in [`BlockMetrics`]; log lines
//! it can trigger are rate-limited.

pub mod device;
pub mod dirty;
pub mod disk_file;
pub mod event_handler;
pub mod request;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

use std::path::PathBuf;

pub use device::BlockDevice;
pub use dirty::{BlockSet, DirtyBlocks};
pub use disk_file::DiskFile;
pub use event_handler::{BlockFrontend, BlockWorker};

/// Spec numbers (virtio spec 1.2 §5.2) and our own limits.
mod defs {
    /// Virtio device type of a block device.
    pub const DEVICE_TYPE: u32 = 2;
    /// One request queue, and its maximum size.
    pub const NUM_QUEUES: usize = 1;
    pub const QUEUE_SIZE: u16 = 256;

    /// Feature bits.
    pub const VIRTIO_BLK_F_SIZE_MAX: u64 = 1 << 1;
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

    /// Request types.
    pub const VIRTIO_BLK_T_IN: u32 = 0;
    pub const VIRTIO_BLK_T_OUT: u32 = 1;
    pub const VIRTIO_BLK_T_FLUSH: u32 = 4;
    pub const VIRTIO_BLK_T_GET_ID: u32 = 8;
    /// Not offered and answered `UNSUPP`, like every other type; named for the tests.
    #[cfg(test)]
    pub const VIRTIO_BLK_T_DISCARD: u32 = 11;
    #[cfg(test)]
    pub const VIRTIO_BLK_T_WRITE_ZEROES: u32 = 13;

    /// Request status values.
    pub const VIRTIO_BLK_S_OK: u8 = 0;
    pub const VIRTIO_BLK_S_IOERR: u8 = 1;
    pub const VIRTIO_BLK_S_UNSUPP: u8 = 2;

    /// Sector size: capacities and request offsets count 512-byte sectors.
    pub const SECTOR_SHIFT: u32 = 9;
    pub const SECTOR_SIZE: u64 = 1 << SECTOR_SHIFT;
    /// Size of `struct virtio_blk_outhdr` (type, reserved, sector).
    pub const REQUEST_HEADER_SIZE: u32 = 16;
    /// `GET_ID` answers at most this many bytes.
    pub const ID_BYTES: usize = crate::MAX_DISK_ID_LEN;

    /// Most data descriptors in one request (`seg_max`). Linux adds a header and a status
    /// descriptor, so a request fits a queue of `SEG_MAX + 2` descriptors.
    pub const SEG_MAX: u32 = 128;
    /// Largest data descriptor the driver should send (`size_max`).
    pub const SIZE_MAX: u32 = 64 * 1024;
    /// Most data bytes in one request: what a driver honouring `seg_max` and `size_max` can
    /// send (8 MiB). Larger requests are answered `IOERR`.
    pub const MAX_REQUEST_BYTES: u64 = SEG_MAX as u64 * SIZE_MAX as u64;
    /// Most descriptors the device reads from one chain: header, `SEG_MAX` data, status.
    /// `virtio-queue` already stops a chain after the queue size (or, through an indirect
    /// table, after that table's size, up to 65535): this bounds the work per chain further.
    pub const MAX_CHAIN_DESCRIPTORS: usize = SEG_MAX as usize + 2;
    /// Bounce buffer between the file and guest memory; I/O is done in chunks of this size.
    pub const BOUNCE_BUFFER_LEN: usize = 128 * 1024;
    /// Most chains completed in one pass over the queue before the device thread checks its
    /// other events again.
    pub const MAX_CHAINS_PER_PASS: usize = QUEUE_SIZE as usize;

    /// Config space: `capacity` (le64), `size_max` (le32), `seg_max` (le32). Later fields
    /// (geometry, blk_size, topology, ...) are not offered and read as zero.
    pub const CONFIG_LEN: usize = 16;
}

/// Errors of setting up a block device and of its thread.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// Opening the backing file failed.
    #[error("cannot open disk {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds a conflicting lock on the backing file.
    #[error("cannot lock disk {path} (is it attached to another VM?)")]
    Lock {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// Reading the backing file's metadata failed.
    #[error("cannot stat disk {path}")]
    Metadata {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A second descriptor of the backing file (for a live migration) could not be made.
    #[error("cannot duplicate the descriptor of disk {path}")]
    Duplicate {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The backing file is not a regular file.
    #[error("disk {0} is not a regular file")]
    NotRegularFile(PathBuf),
    /// The backing file is empty.
    #[error("disk {0} is empty")]
    Empty(PathBuf),
    /// The backing file's size is not a whole number of sectors.
    #[error("disk {path} is {len} bytes, not a multiple of 512")]
    UnalignedSize {
        /// The file.
        path: PathBuf,
        /// Its size.
        len: u64,
    },
    /// The device id is not 1 to 20 bytes of ASCII letters, digits, `-_.`.
    #[error("invalid disk id {0:?}")]
    Id(String),
    /// Creating the device thread's epoll instance failed.
    #[error("cannot create block epoll")]
    Epoll(#[source] std::io::Error),
    /// Registering a file descriptor with epoll failed.
    #[error("cannot register fd with block epoll")]
    EpollCtl(#[source] std::io::Error),
    /// Waiting on the device thread's epoll failed.
    #[error("block epoll wait failed")]
    EpollWait(#[source] std::io::Error),
    /// Creating an eventfd failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// Spawning the device thread failed.
    #[error("cannot spawn block thread")]
    Spawn(#[source] std::io::Error),
}

/// What the guest learns about the disk, fixed at setup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskInfo {
    /// Capacity in 512-byte sectors.
    pub sectors: u64,
    /// Writes are refused and `VIRTIO_BLK_F_RO` is offered.
    pub read_only: bool,
    /// The `GET_ID` answer (at most 20 bytes).
    pub id: Vec<u8>,
}

impl DiskInfo {
    /// Capacity in bytes (cannot overflow: it came from a file size).
    pub fn capacity_bytes(&self) -> u64 {
        self.sectors << defs::SECTOR_SHIFT
    }
}

/// The host side of a disk: positional I/O on its contents. Offsets are checked against the
/// capacity before any call.
pub trait DiskBackend: Send {
    /// Fills `buf` from `offset`; a short read is an error.
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()>;
    /// Makes every completed write durable (`fdatasync`).
    fn sync_data(&self) -> std::io::Result<()>;
}

crate::devices::virtio::metrics::device_metrics! {
    /// Counters for one block device. Every failure a guest can cause is counted here rather than
    /// logged each time.
    pub struct BlockMetrics => BlockMetricsSnapshot {
        /// Descriptor chains taken from the queue, valid or not.
        requests,
        /// `IN` requests completed with `OK`.
        reads,
        /// `OUT` requests completed with `OK`.
        writes,
        /// Bytes read from the disk into guest memory.
        read_bytes,
        /// Bytes written from guest memory to the disk.
        write_bytes,
        /// `FLUSH` requests completed with `OK`.
        flushes,
        /// `GET_ID` requests completed with `OK`.
        get_ids,
        /// Requests answered `UNSUPP` (discard, write-zeroes, unknown types).
        unsupported,
        /// Requests answered `IOERR` for a bad layout: header, data direction, alignment, size,
        /// memory.
        malformed,
        /// Requests answered `IOERR` for reaching past the end of the disk.
        out_of_range,
        /// Writes to a read-only disk, answered `IOERR`.
        read_only_writes,
        /// Host I/O failures (short file, `ENOSPC`, `EIO`, ...), answered `IOERR`.
        io_errors,
        /// Chains with no usable status byte (or too long, or cut short): returned with used
        /// length 0 and no status.
        dropped_chains,
        /// Times the queue itself was unusable: an available index too far ahead (nothing is
        /// taken), or a chain whose head index is outside the queue (taken and counted in
        /// `requests`, but it cannot go into the used ring).
        queue_errors,
    }
}

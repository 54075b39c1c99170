//! Test helpers: a block device on a mock virtqueue, driven by a fake guest driver, over an
//! in-memory disk that counts its calls and fails on demand (or over a real [`DiskFile`]).
//!
//! [`DiskFile`]: super::DiskFile

use crate::memory::GuestRam;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::defs;
use super::{BlockDevice, BlockMetrics, DiskBackend, DiskInfo};
use crate::devices::virtio::mmio::VIRTIO_F_VERSION_1;
use crate::devices::virtio::vsock::test_utils::CountingIrq;

/// Guest memory size (16 MiB).
pub const MEM_SIZE: u64 = 0x100_0000;
/// Default queue size.
pub const QSIZE: u16 = 256;
/// Offset of the used ring from the queue base, clear of the descriptor table and the
/// available ring (see the vsock helpers on the mock's used-ring placement).
const USED_OFFSET: u64 = 0x8000;
/// Where request buffers start.
pub const BUF_BASE: u64 = 0x1_0000;
/// The id test disks report.
pub const TEST_ID: &[u8] = b"test-disk";

/// `VRING_DESC_F_WRITE`: the device writes this descriptor.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_NEXT`.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// A disk in memory that counts its calls and fails with an errno on demand.
#[derive(Debug, Clone, Default)]
pub struct MemDisk(Arc<MemDiskState>);

#[derive(Debug, Default)]
pub struct MemDiskState {
    pub data: Mutex<Vec<u8>>,
    pub fail_reads: Mutex<Option<i32>>,
    pub fail_writes: Mutex<Option<i32>>,
    pub fail_sync: Mutex<Option<i32>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub syncs: AtomicU64,
}

impl MemDisk {
    /// A disk of `sectors` sectors, byte `i` holding `i % 251`.
    pub fn new(sectors: u64) -> Self {
        let len = (sectors * defs::SECTOR_SIZE) as usize;
        let disk = Self::default();
        *disk.0.data.lock().unwrap() = (0..len).map(|i| (i % 251) as u8).collect();
        disk
    }

    pub fn state(&self) -> &MemDiskState {
        &self.0
    }

    pub fn contents(&self) -> Vec<u8> {
        self.0.data.lock().unwrap().clone()
    }

    fn fail(errno: &Mutex<Option<i32>>) -> std::io::Result<()> {
        match *errno.lock().unwrap() {
            Some(e) => Err(std::io::Error::from_raw_os_error(e)),
            None => Ok(()),
        }
    }

    fn range(&self, offset: u64, len: usize) -> std::io::Result<std::ops::Range<usize>> {
        let start = usize::try_from(offset).map_err(|_| std::io::ErrorKind::InvalidInput)?;
        let end = start + len;
        if end > self.0.data.lock().unwrap().len() {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        Ok(start..end)
    }
}

impl DiskBackend for MemDisk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.reads.fetch_add(1, Ordering::SeqCst);
        Self::fail(&self.0.fail_reads)?;
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.0.writes.fetch_add(1, Ordering::SeqCst);
        Self::fail(&self.0.fail_writes)?;
        let r = self.range(offset, buf.len())?;
        self.0.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        self.0.syncs.fetch_add(1, Ordering::SeqCst);
        Self::fail(&self.0.fail_sync)
    }
}

/// A disk description with [`TEST_ID`].
pub fn info(sectors: u64, read_only: bool) -> DiskInfo {
    DiskInfo {
        sectors,
        read_only,
        id: TEST_ID.to_vec(),
    }
}

/// A request the fake driver posted.
#[derive(Debug, Clone)]
pub struct Posted {
    pub head: u16,
    /// Data descriptors: (address, length).
    pub data: Vec<(u64, u32)>,
    /// Address of the status byte (pre-filled with 0xff).
    pub status: u64,
}

/// A fake guest driver: owns one queue's rings and the buffers it posts.
pub struct BlockDriver {
    pub mem: GuestRam,
    qsize: u16,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    used_seen: u16,
    buf_next: u64,
}

impl BlockDriver {
    /// Lays out a queue of `qsize` at guest address 0; returns the driver and the queue.
    pub fn new(mem: GuestRam, qsize: u16) -> (Self, Queue) {
        let mock = MockSplitQueue::create(&mem, GuestAddress(0), qsize);
        let used = GuestAddress(USED_OFFSET);
        mem.write_slice(&[0u8; 4], used).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        let drv = Self {
            desc: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used,
            mem,
            qsize,
            next_desc: 0,
            used_seen: 0,
            buf_next: BUF_BASE,
        };
        (drv, q)
    }

    /// (descriptor table, available ring, used ring) addresses.
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (self.desc.0, self.avail.0, self.used.0)
    }

    /// Room for `len` bytes in the buffer area (reused from the start when it runs out).
    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.buf_next + len > MEM_SIZE {
            self.buf_next = BUF_BASE;
        }
        let a = self.buf_next;
        self.buf_next += len.next_multiple_of(64);
        a
    }

    /// Publishes a chain of `descs` (`(addr, len, flags)`; `NEXT` and `next` are filled in);
    /// returns the head index.
    pub fn add_chain(&mut self, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.next_desc;
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let idx = (first + i as u16) % self.qsize;
                let flags = if i as u16 + 1 == n {
                    flags
                } else {
                    flags | NEXT
                };
                RawDescriptor::from(SplitDescriptor::new(
                    addr,
                    len,
                    flags,
                    (idx + 1) % self.qsize,
                ))
            })
            .collect();
        self.add_raw(first, &raw);
        self.next_desc = (first + n) % self.qsize;
        first
    }

    /// Writes raw descriptors at table index `at` and publishes `at` as one chain head.
    pub fn add_raw(&mut self, at: u16, raw: &[RawDescriptor]) {
        for (i, d) in raw.iter().enumerate() {
            let slot = u64::from((at + i as u16) % self.qsize);
            self.mem
                .write_obj(*d, self.desc.unchecked_add(16 * slot))
                .unwrap();
        }
        let idx = self.avail_idx();
        self.mem
            .write_obj(
                at,
                self.avail
                    .unchecked_add(4 + 2 * u64::from(idx % self.qsize)),
            )
            .unwrap();
        self.set_avail_idx(idx.wrapping_add(1));
    }

    pub fn avail_idx(&self) -> u16 {
        self.mem.read_obj(self.avail.unchecked_add(2)).unwrap()
    }

    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, self.avail.unchecked_add(2))
            .unwrap();
    }

    /// New used entries: (head index, used length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % self.qsize);
            let at = self.used.unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// Writes a request header; returns its address.
    pub fn header(&mut self, request_type: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..16].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).unwrap();
        a
    }

    /// A status byte pre-filled with 0xff; returns its address.
    pub fn status_byte(&mut self) -> u64 {
        let a = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(a)).unwrap();
        a
    }

    pub fn read_status(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }

    /// Posts a well-formed request: header, one data descriptor per `(len, device_writes)`
    /// (zero-filled), status.
    pub fn post(&mut self, request_type: u32, sector: u64, data: &[(u32, bool)]) -> Posted {
        let h = self.header(request_type, sector);
        let mut descs = vec![(h, 16, 0)];
        let mut bufs = Vec::new();
        for &(len, device_writes) in data {
            let a = self.alloc(u64::from(len));
            self.mem
                .write_slice(&vec![0u8; len as usize], GuestAddress(a))
                .unwrap();
            descs.push((a, len, if device_writes { W } else { 0 }));
            bufs.push((a, len));
        }
        let status = self.status_byte();
        descs.push((status, 1, W));
        let head = self.add_chain(&descs);
        Posted {
            head,
            data: bufs,
            status,
        }
    }

    /// Posts a read of `len` bytes at `sector` into one buffer.
    pub fn post_read(&mut self, sector: u64, len: u32) -> Posted {
        self.post(defs::VIRTIO_BLK_T_IN, sector, &[(len, true)])
    }

    /// Posts a write of `bytes` at `sector`, split into descriptors of `split` bytes.
    pub fn post_write(&mut self, sector: u64, bytes: &[u8], split: usize) -> Posted {
        let lens: Vec<(u32, bool)> = bytes
            .chunks(split)
            .map(|c| (c.len() as u32, false))
            .collect();
        let p = self.post(defs::VIRTIO_BLK_T_OUT, sector, &lens);
        for (&(a, _), c) in p.data.iter().zip(bytes.chunks(split)) {
            self.mem.write_slice(c, GuestAddress(a)).unwrap();
        }
        p
    }

    /// The bytes in a posted request's data descriptors, concatenated.
    pub fn data(&self, p: &Posted) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, len) in &p.data {
            let mut b = vec![0u8; len as usize];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        out
    }
}

/// The device plus a fake guest driver.
pub struct Harness<D> {
    pub drv: BlockDriver,
    pub dev: BlockDevice<D, CountingIrq>,
    pub metrics: Arc<BlockMetrics>,
    /// Interrupts raised so far.
    pub irqs: Arc<AtomicU32>,
}

impl<D: DiskBackend> Harness<D> {
    /// A device on a queue of [`QSIZE`], the driver having acked `VIRTIO_BLK_F_FLUSH`.
    pub fn new(disk: D, info: DiskInfo) -> Self {
        Self::with(
            disk,
            info,
            QSIZE,
            VIRTIO_F_VERSION_1 | defs::VIRTIO_BLK_F_FLUSH,
        )
    }

    pub fn with(disk: D, info: DiskInfo, qsize: u16, acked_features: u64) -> Self {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let metrics = Arc::new(BlockMetrics::default());
        let irqs = Arc::new(AtomicU32::new(0));
        let mut dev = BlockDevice::new(disk, info, CountingIrq(irqs.clone()), metrics.clone());
        let (drv, queue) = BlockDriver::new(mem.clone(), qsize);
        dev.activate(mem, acked_features, vec![queue]).unwrap();
        Self {
            drv,
            dev,
            metrics,
            irqs,
        }
    }

    /// Runs the device until the queue is empty; returns the new used entries.
    pub fn run(&mut self) -> Vec<(u16, u32)> {
        while self.dev.process_queue() {}
        self.drv.take_used()
    }

    /// Runs the device for one posted request: (status byte, used length).
    pub fn submit(&mut self, p: &Posted) -> (u8, u32) {
        let used = self.run();
        assert_eq!(used.len(), 1, "one request, one used entry: {used:?}");
        assert_eq!(used[0].0, p.head);
        (self.drv.read_status(p.status), used[0].1)
    }

    /// Reads a counter.
    pub fn get(&self, counter: fn(&BlockMetrics) -> &AtomicU64) -> u64 {
        BlockMetrics::get(counter(&self.metrics))
    }
}

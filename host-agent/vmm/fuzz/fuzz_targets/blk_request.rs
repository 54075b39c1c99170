//! Fuzzes the block device's request path: a hostile guest controls the descriptor table, the
//! available ring and the bytes the descriptors point at (request headers and data). The device
//! must never panic or hang, must return every chain it takes to the used ring, must never
//! write to a read-only disk, and must never report more bytes than a request can carry.
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte of switches: bit 0 read-only disk, bit 1 the driver acked `VIRTIO_BLK_F_FLUSH`,
//!   bit 2 host writes fail (`ENOSPC`), bit 3 host reads fail (`EIO`).
//! - 1 byte: number of descriptors (mod 17), then 16 bytes per descriptor
//!   (addr u64, len u32, flags u16, next u16, little endian). Addresses and lengths with the
//!   top bit clear are folded into the data area so most of them land in guest memory; with it
//!   set they are used raw (usually outside memory).
//! - 1 byte: number of available-ring entries (mod 33), then 1 byte per entry (the head index;
//!   values beyond the queue size are kept).
//! - the rest: copied into guest memory at `DATA_BASE` (headers, data, indirect tables).

#![no_main]

use nanoclaw_vmm::memory::GuestRam;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::block::{BlockDevice, BlockMetrics, DiskBackend, DiskInfo};
use nanoclaw_vmm::devices::virtio::mmio::Interrupt;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

// The input reader and the hostile-queue writer, shared with the other fuzz target.
#[path = "../common/rings.rs"]
mod rings;

use rings::{Input, Rings, write_hostile_queue};

const MEM_SIZE: usize = 0x4_0000;
const QSIZE: u16 = 16;
const QUEUE_BASE: u64 = 0x0;
const USED_OFFSET: u64 = 0x800;
const DATA_BASE: u64 = 0x1_0000;
const DATA_LEN: u64 = 0x2_0000;
const DISK_SECTORS: u64 = 64;
/// `VIRTIO_BLK_F_FLUSH`.
const FLUSH: u64 = 1 << 9;
/// `VIRTIO_F_VERSION_1`.
const VERSION_1: u64 = 1 << 32;
/// The device's per-request data cap plus the status byte.
const MAX_USED_LEN: u32 = (8 << 20) + 1;
const EIO: i32 = 5;
const ENOSPC: i32 = 28;

struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self, _kind: u32) {}
}

/// A disk in memory that counts writes and fails on demand.
struct MemDisk {
    data: Mutex<Vec<u8>>,
    writes: Arc<AtomicU64>,
    fail_reads: bool,
    fail_writes: bool,
}

impl DiskBackend for MemDisk {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if self.fail_reads {
            return Err(std::io::Error::from_raw_os_error(EIO));
        }
        let data = self.data.lock().unwrap();
        let start = usize::try_from(offset).unwrap();
        // The device checked the range against the capacity: a short disk here is a bug.
        buf.copy_from_slice(&data[start..start + buf.len()]);
        Ok(())
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.fail_writes {
            return Err(std::io::Error::from_raw_os_error(ENOSPC));
        }
        let mut data = self.data.lock().unwrap();
        let start = usize::try_from(offset).unwrap();
        data[start..start + buf.len()].copy_from_slice(buf);
        Ok(())
    }

    fn sync_data(&self) -> std::io::Result<()> {
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mock = MockSplitQueue::create(&mem, GuestAddress(QUEUE_BASE), QSIZE);
    let (desc_table, avail) = (mock.desc_table_addr(), mock.avail_addr());
    // The mock's used ring overlaps the upper half of its available ring (virtio-queue 0.18
    // sizes the ring in elements, not bytes); move it clear.
    let mut queue: Queue = mock.create_queue().unwrap();
    let used = QUEUE_BASE + USED_OFFSET;
    queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));

    let mut input = Input(data);
    let switches = input.byte();
    let read_only = switches & 1 != 0;
    let acked = VERSION_1 | if switches & 2 != 0 { FLUSH } else { 0 };

    let rings = Rings {
        desc_table,
        avail,
        qsize: QSIZE,
        data_base: DATA_BASE,
        data_len: DATA_LEN,
        fold_len: true,
    };
    let (n_avail, heads) = write_hostile_queue(&mem, &mut input, &rings);

    // A filled vector rather than a pattern: a per-byte loop would dominate the run time under
    // the fuzzer's instrumentation.
    let disk_bytes = vec![0xa5u8; (DISK_SECTORS * 512) as usize];
    let writes = Arc::new(AtomicU64::new(0));
    let disk = MemDisk {
        data: Mutex::new(disk_bytes.clone()),
        writes: writes.clone(),
        fail_reads: switches & 8 != 0,
        fail_writes: switches & 4 != 0,
    };
    let info = DiskInfo {
        sectors: DISK_SECTORS,
        read_only,
        id: b"fuzz-disk".to_vec(),
    };
    let metrics = Arc::new(BlockMetrics::default());
    let mut dev = BlockDevice::new(disk, info, NoIrq, metrics.clone());
    dev.activate(mem.clone(), acked, vec![queue]).unwrap();
    // At most QSIZE chains are available, so one pass serves them all; a second finds none.
    assert!(!dev.process_queue());
    assert!(!dev.process_queue());

    // Every chain taken is in the used ring, with a plausible length, except those whose head
    // index is outside the queue: they name no descriptor to give back.
    let used_idx: u16 = mem.read_obj(GuestAddress(used + 2)).unwrap();
    let requests = BlockMetrics::get(&metrics.requests);
    assert!(requests <= u64::from(n_avail));
    let bad_heads = heads[..requests as usize]
        .iter()
        .filter(|&&h| h >= QSIZE)
        .count() as u64;
    assert_eq!(u64::from(used_idx) + bad_heads, requests);
    for i in 0..u64::from(used_idx.min(QSIZE)) {
        let len: u32 = mem.read_obj(GuestAddress(used + 8 + 8 * i)).unwrap();
        assert!(len <= MAX_USED_LEN, "used length {len}");
    }
    if read_only {
        assert_eq!(writes.load(Ordering::SeqCst), 0);
        assert_eq!(*dev.disk().data.lock().unwrap(), disk_bytes);
    }
});

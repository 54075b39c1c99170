//! Test helpers: a vsock device on mock virtqueues, played by a fake guest driver, with the
//! hybrid backend on real Unix sockets in a temporary directory.

use crate::memory::GuestRam;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::Address;
use vm_memory::{Bytes, GuestAddress};

use super::defs::{self, RXQ, TXQ};
use super::unix::FirstConnectHook;
use super::{VsockDevice, VsockHeader, VsockMetrics, VsockMuxer};
use crate::devices::virtio::mmio::Interrupt;

/// Guest CID used by the tests.
pub const GUEST_CID: u64 = 3;
/// Guest memory size.
pub const MEM_SIZE: u64 = 0x100_0000;
/// Queue size used by the tests.
pub const QSIZE: u16 = 256;
const QUEUE_BASE: [u64; 3] = [0x0, 0x1_0000, 0x2_0000];
/// Offset of each queue's used ring from its base, clear of the descriptor table and the
/// available ring.
const USED_OFFSET: u64 = 0x8000;
const BUF_BASE: u64 = 0x10_0000;
const RX_DATA_LEN: u32 = 4096;

/// Counts interrupts instead of raising them.
#[derive(Debug, Default, Clone)]
pub struct CountingIrq(pub Arc<AtomicU32>);

impl Interrupt for CountingIrq {
    fn trigger(&self, _kind: u32) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
}

/// A packet the fake guest received.
#[derive(Debug, Clone)]
pub struct RxPkt {
    pub hdr: VsockHeader,
    pub data: Vec<u8>,
}

/// A fake guest driver: owns the rings of the three queues and the buffers it posts.
pub struct GuestDriver {
    pub mem: GuestRam,
    /// (descriptor table, available ring, used ring) of each queue.
    rings: [(GuestAddress, GuestAddress, GuestAddress); 3],
    next_desc: [u16; 3],
    used_seen: [u16; 3],
    buf_next: u64,
    /// rx chain head index -> (header address, data address).
    rx_bufs: HashMap<u16, (u64, u64)>,
}

/// The device plus a fake guest driver.
pub struct Harness {
    pub drv: GuestDriver,
    pub dev: VsockDevice<VsockMuxer, CountingIrq>,
    pub metrics: Arc<VsockMetrics>,
    /// Interrupts raised so far.
    pub irqs: Arc<AtomicU32>,
    pub dir: tempfile::TempDir,
}

impl std::ops::Deref for Harness {
    type Target = GuestDriver;
    fn deref(&self) -> &GuestDriver {
        &self.drv
    }
}

impl std::ops::DerefMut for Harness {
    fn deref_mut(&mut self) -> &mut GuestDriver {
        &mut self.drv
    }
}

impl GuestDriver {
    /// Lays out the three queues' rings in `mem`; returns the driver and the matching queues.
    pub fn new(mem: GuestRam) -> (Self, Vec<Queue>) {
        // The mock zeroes its rings when created, so build each once and keep the addresses.
        // Its used ring is placed `QSIZE` bytes (not `2 * QSIZE`) after the available ring's
        // entries, overlapping their upper half (virtio-queue 0.18 `SplitQueueRing::end`
        // ignores the element size), so the used ring goes at `USED_OFFSET` instead.
        let mut rings = [(GuestAddress(0), GuestAddress(0), GuestAddress(0)); 3];
        let mut queues: Vec<Queue> = Vec::new();
        for (i, &b) in QUEUE_BASE.iter().enumerate() {
            let mock = MockSplitQueue::create(&mem, GuestAddress(b), QSIZE);
            let used = GuestAddress(b + USED_OFFSET);
            mem.write_slice(&[0u8; 4], used).unwrap();
            rings[i] = (mock.desc_table_addr(), mock.avail_addr(), used);
            let mut q: Queue = mock.create_queue().unwrap();
            q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
            queues.push(q);
        }
        let drv = Self {
            mem,
            rings,
            next_desc: [0; 3],
            used_seen: [0; 3],
            buf_next: BUF_BASE,
            rx_bufs: HashMap::new(),
        };
        (drv, queues)
    }

    /// (descriptor table, available ring, used ring) of queue `q`.
    pub fn ring_addrs(&self, q: usize) -> (u64, u64, u64) {
        let (d, a, u) = self.rings[q];
        (d.0, a.0, u.0)
    }

    /// Rx buffers posted and not yet used.
    pub fn outstanding_rx(&self) -> usize {
        self.rx_bufs.len()
    }

    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.buf_next + len > MEM_SIZE {
            self.buf_next = BUF_BASE;
        }
        let a = self.buf_next;
        self.buf_next += len.next_multiple_of(64);
        a
    }

    /// Publishes a chain of `descs` (their `next` fields are filled in) on queue `q`; returns
    /// the head index.
    pub fn add_chain(&mut self, q: usize, descs: &[(u64, u32, u16)]) -> u16 {
        let first = self.next_desc[q];
        let n = descs.len() as u16;
        let raw: Vec<RawDescriptor> = descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let idx = (first + i as u16) % QSIZE;
                let last = i as u16 + 1 == n;
                let flags = if last {
                    flags
                } else {
                    flags | VRING_DESC_F_NEXT as u16
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (idx + 1) % QSIZE))
            })
            .collect();
        self.add_raw(q, first, &raw);
        self.next_desc[q] = (first + n) % QSIZE;
        first
    }

    /// Writes raw descriptors at table index `at` and publishes `at` as one chain head.
    pub fn add_raw(&mut self, q: usize, at: u16, raw: &[RawDescriptor]) {
        let (desc, avail, _) = self.rings[q];
        for (i, d) in raw.iter().enumerate() {
            let slot = u64::from((at + i as u16) % QSIZE);
            self.mem
                .write_obj(*d, desc.unchecked_add(16 * slot))
                .unwrap();
        }
        let idx: u16 = self.mem.read_obj(avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(at, avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), avail.unchecked_add(2))
            .unwrap();
    }

    /// Offers `n` rx buffers (44-byte header descriptor plus a 4 KiB data descriptor).
    pub fn add_rx_buffers(&mut self, n: usize) {
        let w = VRING_DESC_F_WRITE as u16;
        for _ in 0..n {
            let h = self.alloc(VsockHeader::SIZE as u64);
            let d = self.alloc(u64::from(RX_DATA_LEN));
            let head = self.add_chain(
                RXQ,
                &[(h, VsockHeader::SIZE as u32, w), (d, RX_DATA_LEN, w)],
            );
            self.rx_bufs.insert(head, (h, d));
        }
    }

    /// Offers rx buffers until `n` are outstanding.
    pub fn top_up_rx(&mut self, n: usize) {
        let have = self.rx_bufs.len();
        self.add_rx_buffers(n.saturating_sub(have));
    }

    /// New used entries of queue `q`: (head index, used length).
    pub fn take_used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let (_, _, used) = self.rings[q];
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let slot = u64::from(self.used_seen[q] % QSIZE);
            let id: u32 = self.mem.read_obj(used.unchecked_add(4 + 8 * slot)).unwrap();
            let len: u32 = self.mem.read_obj(used.unchecked_add(8 + 8 * slot)).unwrap();
            out.push((id as u16, len));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// Packets the guest received since the last call.
    pub fn recv(&mut self) -> Vec<RxPkt> {
        self.take_used(RXQ)
            .into_iter()
            .map(|(head, len)| {
                let (h, d) = self.rx_bufs.remove(&head).expect("unknown rx head");
                let mut raw = [0u8; VsockHeader::SIZE];
                self.mem.read_slice(&mut raw, GuestAddress(h)).unwrap();
                let hdr = VsockHeader::from_bytes(&raw);
                assert_eq!(
                    len as usize,
                    VsockHeader::SIZE + hdr.len as usize,
                    "rx head {head} at {h:#x}/{d:#x}"
                );
                let mut data = vec![0u8; hdr.len as usize];
                self.mem.read_slice(&mut data, GuestAddress(d)).unwrap();
                RxPkt { hdr, data }
            })
            .collect()
    }

    /// Puts a guest packet on the tx queue (header and payload in separate descriptors).
    pub fn put_tx(&mut self, hdr: VsockHeader, payload: &[u8]) {
        let h = self.alloc(VsockHeader::SIZE as u64);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(h))
            .unwrap();
        if payload.is_empty() {
            self.add_chain(TXQ, &[(h, VsockHeader::SIZE as u32, 0)]);
        } else {
            let d = self.alloc(payload.len() as u64);
            self.mem.write_slice(payload, GuestAddress(d)).unwrap();
            self.add_chain(
                TXQ,
                &[
                    (h, VsockHeader::SIZE as u32, 0),
                    (d, payload.len() as u32, 0),
                ],
            );
        }
    }
}

impl Harness {
    pub fn new() -> Self {
        Self::with_hook(None)
    }

    pub fn with_hook(hook: Option<FirstConnectHook>) -> Self {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let metrics = Arc::new(VsockMetrics::default());
        let muxer = VsockMuxer::new(
            GUEST_CID,
            dir.path().join("vsock.sock"),
            metrics.clone(),
            hook,
        )
        .unwrap();
        let irqs = Arc::new(AtomicU32::new(0));
        let mut dev =
            VsockDevice::new(GUEST_CID, muxer, CountingIrq(irqs.clone()), metrics.clone());
        let (drv, queues) = GuestDriver::new(mem.clone());
        dev.activate(mem, queues).unwrap();
        Self {
            drv,
            dev,
            metrics,
            irqs,
            dir,
        }
    }

    /// The host listener path.
    pub fn uds_path(&self) -> PathBuf {
        self.dir.path().join("vsock.sock")
    }

    /// Where guest connections to `port` go.
    pub fn port_path(&self, port: u32) -> PathBuf {
        super::unix::port_listener_path(&self.uds_path(), port)
    }

    /// Puts a guest packet on the tx queue and runs the device.
    pub fn send(&mut self, hdr: VsockHeader, payload: &[u8]) {
        self.drv.put_tx(hdr, payload);
        self.run();
    }

    /// A guest packet header from guest port `src` to host port `dst`.
    pub fn guest_hdr(src: u32, dst: u32, op: u16) -> VsockHeader {
        VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: defs::HOST_CID,
            src_port: src,
            dst_port: dst,
            type_: defs::TYPE_STREAM,
            op,
            buf_alloc: 64 * 1024,
            ..VsockHeader::default()
        }
    }

    /// Sends a guest RW packet.
    pub fn send_data(&mut self, src: u32, dst: u32, payload: &[u8]) {
        let mut h = Self::guest_hdr(src, dst, defs::OP_RW);
        h.len = payload.len() as u32;
        self.send(h, payload);
    }

    /// Runs the device: host events, then tx, then rx.
    pub fn run(&mut self) {
        use super::VsockBackend;
        self.dev.backend_mut().process_events();
        self.dev.process_tx();
        self.dev.process_rx();
    }

    /// Runs the device, offering one rx buffer at a time, until the guest has received `n`
    /// packets or 100 rounds passed; returns what arrived. When it returns `n` packets, no rx
    /// buffer is left outstanding.
    pub fn recv_n(&mut self, n: usize) -> Vec<RxPkt> {
        let mut got = Vec::new();
        for _ in 0..100 {
            if self.drv.rx_bufs.is_empty() {
                self.add_rx_buffers(1);
            }
            self.run();
            let new = self.recv();
            let idle = new.is_empty();
            got.extend(new);
            if got.len() >= n {
                break;
            }
            if idle {
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
        }
        got
    }
}

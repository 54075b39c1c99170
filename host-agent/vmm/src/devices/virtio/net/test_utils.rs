//! Test helpers: a network device on two mock virtqueues, driven by a fake guest driver, over an
//! in-memory backend that records what it was sent and fails on demand.

use crate::memory::GuestRam;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{NetBackend, NetDevice, NetMetrics, VNET_HDR_LEN};
use crate::devices::virtio::mmio::VIRTIO_F_VERSION_1;
use crate::devices::virtio::vsock::test_utils::CountingIrq;

/// Guest memory size (16 MiB).
pub const MEM_SIZE: u64 = 0x100_0000;
/// Queue size.
pub const QSIZE: u16 = 256;
/// Where each queue's rings start: receive, transmit.
const QUEUE_BASE: [u64; 2] = [0x0, 0x2_0000];
/// Offset of the used ring from its queue's base, clear of the descriptor table and the
/// available ring (the mock's own used ring overlaps the available ring; see the vsock
/// helpers).
const USED_OFFSET: u64 = 0x8000;
/// Where buffers start.
pub const BUF_BASE: u64 = 0x10_0000;

/// `VRING_DESC_F_WRITE`: the device writes this descriptor.
pub const W: u16 = VRING_DESC_F_WRITE as u16;
/// `VRING_DESC_F_NEXT`.
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// What the in-memory backend holds; shared with the test through [`MemBackend::state`].
#[derive(Debug, Default)]
pub struct MemBackendState {
    /// Packets (header and frame) the host side has for the guest, oldest first.
    pub incoming: Mutex<VecDeque<Vec<u8>>>,
    /// Frames the guest sent, in order, without their header.
    pub sent: Mutex<Vec<Vec<u8>>>,
    /// The headers the device handed on with them.
    pub sent_headers: Mutex<Vec<[u8; VNET_HDR_LEN]>>,
    /// Calls to `recv_frame`.
    pub recv_calls: AtomicU64,
    /// Sends fail with this errno while set.
    pub fail_sends: Mutex<Option<i32>>,
}

/// A backend in memory: frames queued by the test, frames sent recorded.
#[derive(Debug, Clone, Default)]
pub struct MemBackend(Arc<MemBackendState>);

impl MemBackend {
    pub fn state(&self) -> &MemBackendState {
        &self.0
    }

    /// Queues a frame for the guest, with an all-zero header.
    pub fn push(&self, frame: Vec<u8>) {
        self.push_with_header([0; VNET_HDR_LEN], &frame);
    }

    /// Queues a frame for the guest, with `header`.
    pub fn push_with_header(&self, header: [u8; VNET_HDR_LEN], frame: &[u8]) {
        let packet = [&header[..], frame].concat();
        self.0.incoming.lock().unwrap().push_back(packet);
    }

    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.0.sent.lock().unwrap().clone()
    }

    pub fn sent_headers(&self) -> Vec<[u8; VNET_HDR_LEN]> {
        self.0.sent_headers.lock().unwrap().clone()
    }

    pub fn waiting(&self) -> usize {
        self.0.incoming.lock().unwrap().len()
    }

    pub fn recv_calls(&self) -> u64 {
        self.0.recv_calls.load(Ordering::SeqCst)
    }
}

impl NetBackend for MemBackend {
    fn recv_packet(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.0.recv_calls.fetch_add(1, Ordering::SeqCst);
        let Some(packet) = self.0.incoming.lock().unwrap().pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        // Like a TAP: a packet longer than the buffer is cut to it.
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        Ok(n)
    }

    fn send_packet(&mut self, packet: &[u8]) -> std::io::Result<()> {
        if let Some(errno) = *self.0.fail_sends.lock().unwrap() {
            return Err(std::io::Error::from_raw_os_error(errno));
        }
        let (header, frame) = packet
            .split_first_chunk::<VNET_HDR_LEN>()
            .expect("the device sends a header");
        self.0.sent_headers.lock().unwrap().push(*header);
        self.0.sent.lock().unwrap().push(frame.to_vec());
        Ok(())
    }
}

/// A test frame of `len` bytes: a broadcast Ethernet header with ethertype 0x88b5 (local
/// experimental) and a pattern seeded by `seed`.
pub fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let head = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 2, 0, 0, 0, 0, 9, 0x88, 0xb5,
    ];
    let n = head.len().min(len);
    f[..n].copy_from_slice(&head[..n]);
    f
}

/// A fake guest driver for one queue: owns its rings.
pub struct QueueDriver {
    mem: GuestRam,
    desc: GuestAddress,
    avail: GuestAddress,
    used: GuestAddress,
    next_desc: u16,
    used_seen: u16,
}

impl QueueDriver {
    /// Lays out a queue of [`QSIZE`] at `base`; returns the driver and the queue.
    fn new(mem: GuestRam, base: u64) -> (Self, Queue) {
        let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
        let used = GuestAddress(base + USED_OFFSET);
        mem.write_slice(&[0u8; 4], used).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        let drv = Self {
            desc: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used,
            mem,
            next_desc: 0,
            used_seen: 0,
        };
        (drv, q)
    }

    /// (descriptor table, available ring, used ring) addresses.
    pub fn ring_addrs(&self) -> (u64, u64, u64) {
        (self.desc.0, self.avail.0, self.used.0)
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
                let idx = (first + i as u16) % QSIZE;
                let flags = if i as u16 + 1 == n {
                    flags
                } else {
                    flags | NEXT
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, (idx + 1) % QSIZE))
            })
            .collect();
        self.add_raw(first, &raw);
        self.next_desc = (first + n) % QSIZE;
        first
    }

    /// Writes raw descriptors at table index `at` and publishes `at` as one chain head.
    pub fn add_raw(&mut self, at: u16, raw: &[RawDescriptor]) {
        for (i, d) in raw.iter().enumerate() {
            let slot = u64::from((at + i as u16) % QSIZE);
            self.mem
                .write_obj(*d, self.desc.unchecked_add(16 * slot))
                .unwrap();
        }
        let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
        self.mem
            .write_obj(at, self.avail.unchecked_add(4 + 2 * u64::from(idx % QSIZE)))
            .unwrap();
        self.mem
            .write_obj(idx.wrapping_add(1), self.avail.unchecked_add(2))
            .unwrap();
    }

    /// With `EVENT_IDX`: the driver asks for an interrupt once the used index passes `at`.
    pub fn set_used_event(&self, at: u16) {
        let addr = self.avail.unchecked_add(4 + 2 * u64::from(QSIZE));
        self.mem.write_obj(at, addr).unwrap();
    }

    /// With `EVENT_IDX`: the available index at which the device asked to be notified next.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used.unchecked_add(4 + 8 * u64::from(QSIZE));
        self.mem.read_obj(addr).unwrap()
    }

    /// New used entries: (head index, used length).
    pub fn take_used(&mut self) -> Vec<(u16, u32)> {
        let idx: u16 = self.mem.read_obj(self.used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.used_seen != idx {
            let slot = u64::from(self.used_seen % QSIZE);
            let at = self.used.unchecked_add(4 + 8 * slot);
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            out.push((id as u16, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }
}

/// A fake guest: both queues and a bump allocator for buffers.
pub struct NetDriver {
    pub mem: GuestRam,
    pub rx: QueueDriver,
    pub tx: QueueDriver,
    buf_next: u64,
}

impl NetDriver {
    /// The driver and its two queues, receive first.
    pub fn new(mem: GuestRam) -> (Self, Vec<Queue>) {
        let (rx, rxq) = QueueDriver::new(mem.clone(), QUEUE_BASE[0]);
        let (tx, txq) = QueueDriver::new(mem.clone(), QUEUE_BASE[1]);
        let drv = Self {
            mem,
            rx,
            tx,
            buf_next: BUF_BASE,
        };
        (drv, vec![rxq, txq])
    }

    /// Room for `len` bytes (reused from the start when it runs out).
    pub fn alloc(&mut self, len: u64) -> u64 {
        if self.buf_next + len > MEM_SIZE {
            self.buf_next = BUF_BASE;
        }
        let a = self.buf_next;
        self.buf_next += len.next_multiple_of(64);
        a
    }

    /// Writes `bytes` into a fresh buffer; returns its address.
    pub fn put(&mut self, bytes: &[u8]) -> u64 {
        let a = self.alloc(bytes.len() as u64);
        self.mem.write_slice(bytes, GuestAddress(a)).unwrap();
        a
    }

    /// Queues `frame` for transmission behind a zero header, split into descriptors of the
    /// given sizes (their sum must be `12 + frame.len()`); returns the head.
    pub fn send_split(&mut self, frame: &[u8], sizes: &[usize]) -> u16 {
        self.send_split_with_header([0; VNET_HDR_LEN], frame, sizes)
    }

    /// Queues `frame` for transmission behind `header`, in one descriptor; returns the head.
    pub fn send_with_header(&mut self, header: [u8; VNET_HDR_LEN], frame: &[u8]) -> u16 {
        self.send_split_with_header(header, frame, &[VNET_HDR_LEN + frame.len()])
    }

    fn send_split_with_header(
        &mut self,
        header: [u8; VNET_HDR_LEN],
        frame: &[u8],
        sizes: &[usize],
    ) -> u16 {
        let mut bytes = header.to_vec();
        bytes.extend_from_slice(frame);
        assert_eq!(sizes.iter().sum::<usize>(), bytes.len());
        let mut descs = Vec::new();
        let mut at = 0;
        for &n in sizes {
            let a = self.put(&bytes[at..at + n]);
            descs.push((a, n as u32, 0));
            at += n;
        }
        self.tx.add_chain(&descs)
    }

    /// Queues `frame` for transmission in one descriptor with its header.
    pub fn send(&mut self, frame: &[u8]) -> u16 {
        self.send_split(frame, &[VNET_HDR_LEN + frame.len()])
    }

    /// Posts a receive buffer of descriptors of the given sizes (pre-filled with 0xee); returns
    /// the head and the descriptors.
    pub fn post_rx(&mut self, sizes: &[u32]) -> (u16, Vec<(u64, u32)>) {
        let mut descs = Vec::new();
        for &n in sizes {
            let a = self.put(&vec![0xee; n as usize]);
            descs.push((a, n));
        }
        let flagged: Vec<_> = descs.iter().map(|&(a, n)| (a, n, W)).collect();
        (self.rx.add_chain(&flagged), descs)
    }

    /// The first `len` bytes of a receive buffer's descriptors, concatenated.
    pub fn read_rx(&self, descs: &[(u64, u32)], len: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for &(a, n) in descs {
            let mut b = vec![0u8; n as usize];
            self.mem.read_slice(&mut b, GuestAddress(a)).unwrap();
            out.extend(b);
        }
        out.truncate(len);
        out
    }
}

/// The device plus a fake guest driver.
pub struct Harness {
    pub drv: NetDriver,
    pub dev: NetDevice<MemBackend, CountingIrq>,
    pub backend: MemBackend,
    pub metrics: Arc<NetMetrics>,
    /// Interrupts raised so far.
    pub irqs: Arc<AtomicU32>,
}

impl Harness {
    /// An activated device on fresh queues.
    pub fn new() -> Self {
        Self::with_features(VIRTIO_F_VERSION_1)
    }

    /// An activated device on fresh queues, with `features` negotiated.
    pub fn with_features(features: u64) -> Self {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let metrics = Arc::new(NetMetrics::default());
        let irqs = Arc::new(AtomicU32::new(0));
        let backend = MemBackend::default();
        let mut dev = NetDevice::new(backend.clone(), CountingIrq(irqs.clone()), metrics.clone());
        let (drv, queues) = NetDriver::new(mem.clone());
        dev.activate(mem, features, queues).unwrap();
        Self {
            drv,
            dev,
            backend,
            metrics,
            irqs,
        }
    }

    /// Runs the transmit side until its queue is empty; returns the new used entries.
    pub fn run_tx(&mut self) -> Vec<(u16, u32)> {
        while self.dev.process_tx() {}
        self.drv.tx.take_used()
    }

    /// Reads a counter.
    pub fn get(&self, counter: fn(&NetMetrics) -> &AtomicU64) -> u64 {
        NetMetrics::get(counter(&self.metrics))
    }
}

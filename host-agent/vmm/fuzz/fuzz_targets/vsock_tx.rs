//! Fuzzes the vsock device's TX path: a hostile guest controls the descriptor table, the
//! available ring and the bytes the descriptors point at. The device must never panic or hang,
//! whatever it finds there.
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte: number of descriptors (mod 17), then 16 bytes per descriptor
//!   (addr u64, len u32, flags u16, next u16, little endian). Addresses with the top bit clear
//!   are folded into the data area so most of them land in guest memory; with it set they are
//!   used raw (usually outside memory).
//! - 1 byte: number of available-ring entries (mod 33), then 1 byte per entry (the head index;
//!   values beyond the queue size are kept).
//! - the rest: copied into guest memory at `DATA_BASE` (packet headers and payloads).

#![no_main]

use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::mmio::Interrupt;
use nanoclaw_vmm::devices::virtio::vsock::unix::port_listener_path;
use nanoclaw_vmm::devices::virtio::vsock::{
    VsockBackend, VsockDevice, VsockHeader, VsockMetrics, VsockMuxer,
};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// The input reader and the hostile-queue writer, shared with the other fuzz target.
#[path = "../common/rings.rs"]
mod rings;

use rings::{Input, Rings, write_hostile_queue};

const MEM_SIZE: usize = 0x4_0000;
const QSIZE: u16 = 16;
const TX_BASE: u64 = 0x0;
const RX_BASE: u64 = 0x1000;
const EV_BASE: u64 = 0x2000;
const USED_OFFSET: u64 = 0x800;
const RX_BUFS: u64 = 0x3000;
const DATA_BASE: u64 = 0x1_0000;
const DATA_LEN: u64 = 0x2_0000;
const GUEST_CID: u64 = 3;

struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self, _kind: u32) {}
}

/// A per-process directory for the backend's listener, plus a host listener for guest port 0
/// (the port a zeroed header names) so the fuzzer reaches the connected states; any other
/// port is refused.
fn sock_path() -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vsock-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        let uds_path = dir.join("vsock.sock");
        let listener = UnixListener::bind(port_listener_path(&uds_path, 0)).expect("fuzz listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        (uds_path, listener)
    })
}

fuzz_target!(|data: &[u8]| {
    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut queues: Vec<Queue> = Vec::new();
    let mut tx_rings = (GuestAddress(0), GuestAddress(0));
    let mut rx_rings = (GuestAddress(0), GuestAddress(0));
    for base in [RX_BASE, TX_BASE, EV_BASE] {
        let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
        if base == TX_BASE {
            tx_rings = (mock.desc_table_addr(), mock.avail_addr());
        } else if base == RX_BASE {
            rx_rings = (mock.desc_table_addr(), mock.avail_addr());
        }
        // The mock's used ring overlaps the upper half of its available ring (virtio-queue
        // 0.18 sizes the ring in elements, not bytes); move it clear.
        let mut q: Queue = mock.create_queue().unwrap();
        let used = base + USED_OFFSET;
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queues.push(q);
    }

    let mut input = Input(data);
    let (desc_table, avail) = tx_rings;
    let rings = Rings {
        desc_table,
        avail,
        qsize: QSIZE,
        data_base: DATA_BASE,
        data_len: DATA_LEN,
        fold_len: false,
    };
    write_hostile_queue(&mem, &mut input, &rings);

    // Well-formed rx buffers so replies (resets, responses) get written.
    let (rx_desc, rx_avail) = rx_rings;
    for i in 0..4u64 {
        let hdr = RX_BUFS + i * 0x400;
        let write = 2u16; // VRING_DESC_F_WRITE
        let next = 1u16; // VRING_DESC_F_NEXT
        let descs = [
            (
                hdr,
                VsockHeader::SIZE as u32,
                write | next,
                (2 * i + 1) as u16,
            ),
            (hdr + 0x40, 0x3c0, write, 0),
        ];
        for (j, (a, l, f, n)) in descs.into_iter().enumerate() {
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&a.to_le_bytes());
            d[8..12].copy_from_slice(&l.to_le_bytes());
            d[12..14].copy_from_slice(&f.to_le_bytes());
            d[14..16].copy_from_slice(&n.to_le_bytes());
            mem.write_slice(&d, GuestAddress(rx_desc.0 + 16 * (2 * i + j as u64)))
                .unwrap();
        }
        mem.write_obj((2 * i) as u16, GuestAddress(rx_avail.0 + 4 + 2 * i))
            .unwrap();
    }
    mem.write_obj(4u16, GuestAddress(rx_avail.0 + 2)).unwrap();

    let (path, listener) = sock_path();
    let metrics = Arc::new(VsockMetrics::default());
    let muxer =
        VsockMuxer::new(GUEST_CID, path.clone(), metrics.clone(), None).expect("vsock backend");
    let mut dev = VsockDevice::new(GUEST_CID, muxer, NoIrq, metrics);
    dev.activate(mem.clone(), queues).unwrap();
    dev.process_tx();
    dev.process_rx();
    dev.backend_mut().process_events();
    dev.backend_mut().tick(std::time::Instant::now());
    dev.process_rx();
    // Whatever connected, the host side accepts and drops, so the backlog never fills.
    drop(dev);
    while listener.accept().is_ok() {}
});

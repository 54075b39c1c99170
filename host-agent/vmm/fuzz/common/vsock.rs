//! What the vsock fuzz targets share: guest memory with the device's three queues (the mock's
//! used rings moved clear of its available rings), a per-process socket directory with one host
//! listener, and the device on the real backend.
//!
//! Included like `rings.rs` (`#[path = "../common/vsock.rs"] mod vsock;`; see there why).

use nanoclaw_vmm::memory::GuestRam;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use nanoclaw_vmm::devices::virtio::mmio::Interrupt;
use nanoclaw_vmm::devices::virtio::vsock::unix::port_listener_path;
use nanoclaw_vmm::devices::virtio::vsock::{VsockDevice, VsockMetrics, VsockMuxer};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

pub const MEM_SIZE: usize = 0x4_0000;
pub const QSIZE: u16 = 16;
pub const TX_BASE: u64 = 0x0;
pub const RX_BASE: u64 = 0x1000;
pub const EV_BASE: u64 = 0x2000;
pub const USED_OFFSET: u64 = 0x800;
pub const DATA_BASE: u64 = 0x1_0000;
pub const DATA_LEN: u64 = 0x2_0000;
pub const GUEST_CID: u64 = 3;

/// Interrupts go nowhere.
pub struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self, _kind: u32) {}
}

/// Guest memory and the device's queues (rx, tx, event), with where the tx and rx queues'
/// descriptor tables and available rings are.
pub struct Machine {
    pub mem: GuestRam,
    pub queues: Vec<Queue>,
    /// (descriptor table, available ring) of the tx queue.
    pub tx: (GuestAddress, GuestAddress),
    /// (descriptor table, available ring) of the rx queue.
    pub rx: (GuestAddress, GuestAddress),
}

pub fn machine() -> Machine {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut queues: Vec<Queue> = Vec::new();
    let mut tx = (GuestAddress(0), GuestAddress(0));
    let mut rx = (GuestAddress(0), GuestAddress(0));
    for base in [RX_BASE, TX_BASE, EV_BASE] {
        let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
        if base == TX_BASE {
            tx = (mock.desc_table_addr(), mock.avail_addr());
        } else if base == RX_BASE {
            rx = (mock.desc_table_addr(), mock.avail_addr());
        }
        // The mock's used ring overlaps the upper half of its available ring (virtio-queue
        // 0.18 sizes the ring in elements, not bytes); move it clear.
        let mut q: Queue = mock.create_queue().unwrap();
        let used = base + USED_OFFSET;
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        queues.push(q);
    }
    Machine {
        mem,
        queues,
        tx,
        rx,
    }
}

/// A per-process directory (`<tmp>/<name>-<pid>`) for the backend's listener, and a
/// non-blocking host listener for `host_port`; made once per process.
pub fn sock_path(name: &str, host_port: u32) -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        let uds_path = dir.join("vsock.sock");
        let listener =
            UnixListener::bind(port_listener_path(&uds_path, host_port)).expect("fuzz listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        (uds_path, listener)
    })
}

/// The device on the real backend (listening under `uds_path`), activated on `mem` and
/// `queues`.
pub fn device(
    mem: &GuestRam,
    queues: Vec<Queue>,
    uds_path: &Path,
) -> VsockDevice<VsockMuxer, NoIrq> {
    let metrics = Arc::new(VsockMetrics::default());
    let muxer = VsockMuxer::new(GUEST_CID, uds_path.to_path_buf(), metrics.clone(), None)
        .expect("vsock backend");
    let mut dev = VsockDevice::new(GUEST_CID, muxer, NoIrq, metrics);
    dev.activate(mem.clone(), queues).unwrap();
    dev
}

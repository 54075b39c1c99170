//! Fuzzes the vsock device's RX path (host to guest): the host side has packets waiting for
//! the guest (connection requests, responses, data, shutdowns, resets) while a hostile guest
//! controls the rx queue's descriptor table, available ring and buffers: zero-length and
//! read-only buffers, chains that loop or run off the table, addresses outside guest memory,
//! available indices beyond the queue. The device must never panic or hang, whatever it finds.
//!
//! The pending host-side work is set up through the real backend on real Unix sockets: the
//! guest's own packets go in through a well-formed tx queue, and the host end is played by
//! streams this target connects and accepts. Everything an input opens is closed before the
//! next one (the backend removes its listener socket when dropped, the host streams are
//! dropped, and the host listener's backlog is drained).
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte: the scenario
//!   - bits 0-1: guest-initiated connections to the host listener (0-3), each sent host data;
//!   - bits 2-3: host-initiated connections (`CONNECT <port>\n`, then host data) (0-3);
//!   - bits 4-5: guest packets the backend answers with a reset (0-3);
//!   - bit 6: the host closes its end of the guest-initiated connections after writing;
//!   - bit 7: the guest accepts the host-initiated connections (guessing their local ports).
//! - 1 byte: host data per connection, in 64-byte units.
//! - the rx queue, as `common/rings.rs` writes it (descriptor lengths with the top bit clear
//!   are folded into the data area, so zero and short lengths are common).

#![no_main]

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::mmio::Interrupt;
use nanoclaw_vmm::devices::virtio::vsock::unix::port_listener_path;
use nanoclaw_vmm::devices::virtio::vsock::{
    VsockBackend, VsockDevice, VsockHeader, VsockMetrics, VsockMuxer,
};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

// The input reader and the hostile-queue writer, shared with the other fuzz targets.
#[path = "../common/rings.rs"]
mod rings;

use rings::{Input, Rings, write_hostile_queue};

const MEM_SIZE: usize = 0x4_0000;
const QSIZE: u16 = 16;
const TX_BASE: u64 = 0x0;
const RX_BASE: u64 = 0x1000;
const EV_BASE: u64 = 0x2000;
const USED_OFFSET: u64 = 0x800;
/// Where the well-formed tx packet headers go, one 0x40 slot per descriptor.
const TX_HDRS: u64 = 0x3000;
const DATA_BASE: u64 = 0x1_0000;
const DATA_LEN: u64 = 0x2_0000;
const GUEST_CID: u64 = 3;
const HOST_CID: u64 = 2;
/// The host port with a listener (guest-initiated connections go there).
const HOST_PORT: u32 = 5000;
/// A host port with no listener: a request for it is refused with a reset.
const REFUSED_PORT: u32 = 9;
/// The backend's first local port for host-initiated connections (`defs::FIRST_LOCAL_PORT`).
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// virtio-vsock constants (virtio spec 1.2, 5.10.6).
const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RW: u16 = 5;
const BUF_ALLOC: u32 = 256 * 1024;

struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self, _kind: u32) {}
}

/// A per-process directory for the backend's listener, and the host listener for
/// [`HOST_PORT`].
fn sock_path() -> &'static (PathBuf, UnixListener) {
    static DIR: OnceLock<(PathBuf, UnixListener)> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("vsock-rx-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz temp dir");
        let uds_path = dir.join("vsock.sock");
        let listener =
            UnixListener::bind(port_listener_path(&uds_path, HOST_PORT)).expect("fuzz listener");
        listener
            .set_nonblocking(true)
            .expect("nonblocking listener");
        (uds_path, listener)
    })
}

/// The guest's side of the tx queue: well-formed single-descriptor chains.
struct TxQueue {
    desc_table: GuestAddress,
    avail: GuestAddress,
    next: u16,
}

impl TxQueue {
    /// Posts a header-only packet from the guest to the host.
    fn post(&mut self, mem: &GuestMemoryMmap<()>, src_port: u32, dst_port: u32, op: u16) {
        let i = self.next;
        assert!(
            i < QSIZE,
            "the setup posts fewer packets than the queue holds"
        );
        let hdr = VsockHeader {
            src_cid: GUEST_CID,
            dst_cid: HOST_CID,
            src_port,
            dst_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: 0,
        };
        let at = TX_HDRS + 0x40 * u64::from(i);
        mem.write_slice(&hdr.to_bytes(), GuestAddress(at)).unwrap();
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&at.to_le_bytes());
        d[8..12].copy_from_slice(&(VsockHeader::SIZE as u32).to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.desc_table.0 + 16 * u64::from(i)))
            .unwrap();
        mem.write_obj(i, GuestAddress(self.avail.0 + 4 + 2 * u64::from(i)))
            .unwrap();
        self.next += 1;
        mem.write_obj(self.next, GuestAddress(self.avail.0 + 2))
            .unwrap();
    }
}

/// `n` bytes of host data.
fn host_data(n: usize) -> Vec<u8> {
    (0..n).map(|i| i as u8).collect()
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
    let scenario = input.byte();
    let guest_conns = scenario & 3;
    let host_conns = (scenario >> 2) & 3;
    let resets = (scenario >> 4) & 3;
    let host_closes = scenario & 0x40 != 0;
    let guest_accepts = scenario & 0x80 != 0;
    let data_len = usize::from(input.byte()) * 64;

    let (desc_table, avail) = rx_rings;
    let rings = Rings {
        desc_table,
        avail,
        qsize: QSIZE,
        data_base: DATA_BASE,
        data_len: DATA_LEN,
        fold_len: true,
    };
    write_hostile_queue(&mem, &mut input, &rings);
    let mut tx = TxQueue {
        desc_table: tx_rings.0,
        avail: tx_rings.1,
        next: 0,
    };

    let (path, listener) = sock_path();
    let metrics = Arc::new(VsockMetrics::default());
    let muxer =
        VsockMuxer::new(GUEST_CID, path.clone(), metrics.clone(), None).expect("vsock backend");
    let mut dev = VsockDevice::new(GUEST_CID, muxer, NoIrq, metrics);
    dev.activate(mem.clone(), queues).unwrap();

    // The guest's requests: to the host listener (answered with a response, then data), and
    // ones the backend answers with a reset (a refused port, data on no connection).
    for i in 0..u32::from(guest_conns) {
        tx.post(&mem, 1000 + i, HOST_PORT, OP_REQUEST);
    }
    for i in 0..u32::from(resets) {
        let op = if i % 2 == 0 { OP_REQUEST } else { OP_RW };
        tx.post(&mem, 2000 + i, REFUSED_PORT, op);
    }
    dev.process_tx();

    // The host ends: data on every accepted stream, and host-initiated connections.
    let payload = host_data(data_len);
    let mut host_streams: Vec<UnixStream> = Vec::new();
    while let Ok((mut s, _)) = listener.accept() {
        let _ = s.set_nonblocking(true);
        let _ = s.write_all(&payload);
        if host_closes {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
        host_streams.push(s);
    }
    for i in 0..u32::from(host_conns) {
        let Ok(mut s) = UnixStream::connect(path) else {
            continue;
        };
        let _ = s.set_nonblocking(true);
        let _ = s.write_all(format!("CONNECT {}\n", 3000 + i).as_bytes());
        let _ = s.write_all(&payload);
        host_streams.push(s);
    }
    dev.backend_mut().process_events();
    if guest_accepts {
        for i in 0..u32::from(host_conns) {
            tx.post(&mem, 3000 + i, FIRST_LOCAL_PORT + i, OP_RESPONSE);
        }
        dev.process_tx();
        dev.backend_mut().process_events();
    }

    // The hostile rx queue meets the pending packets, over a few rounds of host events, then
    // once more after every deadline has passed (the backend's timeouts queue resets).
    for _ in 0..3 {
        dev.process_rx();
        dev.backend_mut().process_events();
        dev.process_rx();
    }
    dev.backend_mut()
        .tick(Instant::now() + Duration::from_secs(60));
    dev.process_rx();

    drop(dev);
    drop(host_streams);
    while listener.accept().is_ok() {}
});

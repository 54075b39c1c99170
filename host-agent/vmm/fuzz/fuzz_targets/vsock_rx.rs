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

use nanoclaw_vmm::memory::GuestRam;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::vsock::{VsockBackend, VsockHeader};
use vm_memory::{Bytes, GuestAddress};

// The input reader and the hostile-queue writer, and the vsock setup, shared with the other
// fuzz targets.
#[path = "../common/rings.rs"]
mod rings;
#[path = "../common/vsock.rs"]
mod vsock;

use rings::{Input, Rings, write_hostile_queue};
use vsock::{DATA_BASE, DATA_LEN, GUEST_CID, QSIZE};

/// Where the well-formed tx packet headers go, one 0x40 slot per descriptor.
const TX_HDRS: u64 = 0x3000;
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

/// The guest's side of the tx queue: well-formed single-descriptor chains.
struct TxQueue {
    desc_table: GuestAddress,
    avail: GuestAddress,
    next: u16,
}

impl TxQueue {
    /// Posts a header-only packet from the guest to the host.
    fn post(&mut self, mem: &GuestRam, src_port: u32, dst_port: u32, op: u16) {
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
    let vsock::Machine {
        mem,
        queues,
        tx: tx_rings,
        rx: rx_rings,
    } = vsock::machine();

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

    let (path, listener) = vsock::sock_path("vsock-rx-fuzz", HOST_PORT);
    let mut dev = vsock::device(&mem, queues, path);

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

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
use vsock::{DATA_BASE, DATA_LEN, QSIZE};

const RX_BUFS: u64 = 0x3000;

fuzz_target!(|data: &[u8]| {
    // A host listener on guest port 0 (the port a zeroed header names) lets the fuzzer reach
    // the connected states; any other port is refused.
    let vsock::Machine {
        mem,
        queues,
        tx: tx_rings,
        rx: rx_rings,
    } = vsock::machine();

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

    let (path, listener) = vsock::sock_path("vsock-fuzz", 0);
    let mut dev = vsock::device(&mem, queues, path);
    dev.process_tx();
    dev.process_rx();
    dev.backend_mut().process_events();
    dev.backend_mut().tick(std::time::Instant::now());
    dev.process_rx();
    // Whatever connected, the host side accepts and drops, so the backlog never fills.
    drop(dev);
    while listener.accept().is_ok() {}
});

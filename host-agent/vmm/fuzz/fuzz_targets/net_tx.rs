//! Fuzzes the network device's transmit path: a hostile guest controls the transmit queue's
//! descriptor table, its available ring and the bytes the descriptors point at. The device must
//! never panic or hang, must return every chain it takes to the used ring with length 0, and
//! must hand the backend only frames of 14 to 65550 bytes.
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte of switches: bit 0 the backend refuses every frame; bit 1 negotiates `EVENT_IDX`;
//!   bit 2 negotiates the transmit offloads (`CSUM`, `HOST_TSO4`, `HOST_TSO6`), so that the
//!   guest's headers are checked against them.
//! - 1 byte: number of descriptors (mod 17), then 16 bytes per descriptor
//!   (addr u64, len u32, flags u16, next u16, little endian). Addresses and lengths with the
//!   top bit clear are folded into the data area so most of them land in guest memory; with it
//!   set they are used raw (usually outside memory).
//! - 1 byte: number of available-ring entries (mod 33), then 1 byte per entry (the head index;
//!   values beyond the queue size are kept).
//! - the rest: copied into guest memory at `DATA_BASE` (headers and frames).

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::net::{NetDevice, NetMetrics};

// The input reader and the hostile-queue writer, and the network device's setup, shared with
// the other fuzz targets.
#[path = "../common/net.rs"]
mod net;
#[path = "../common/rings.rs"]
mod rings;

use net::{DATA_BASE, DATA_LEN, MemBackend, NoIrq, QSIZE};
use rings::{Input, Rings, write_hostile_queue};

/// `VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC`.
const FEATURES: u64 = (1 << 32) | (1 << 5);
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_NET_F_CSUM | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6`.
const HOST_OFFLOADS: u64 = (1 << 0) | (1 << 11) | (1 << 12);

fuzz_target!(|data: &[u8]| {
    let (mem, queues, [_, tx]) = net::machine();
    let mut input = Input(data);
    let switches = input.byte();
    let rings = Rings {
        desc_table: tx.desc_table,
        avail: tx.avail,
        qsize: QSIZE,
        data_base: DATA_BASE,
        data_len: DATA_LEN,
        fold_len: true,
    };
    let (n_avail, heads) = write_hostile_queue(&mem, &mut input, &rings);

    let backend = MemBackend {
        fail_sends: switches & 1 != 0,
        ..MemBackend::default()
    };
    let metrics = Arc::new(NetMetrics::default());
    let mut dev = NetDevice::new(backend, NoIrq, metrics.clone());
    let features = FEATURES
        | if switches & 2 != 0 { EVENT_IDX } else { 0 }
        | if switches & 4 != 0 { HOST_OFFLOADS } else { 0 };
    dev.activate(mem.clone(), features, queues).unwrap();
    // At most QSIZE chains are available, so one pass serves them all; a second finds none.
    assert!(!dev.process_tx());
    assert!(!dev.process_tx());

    // Every chain taken is in the used ring with length 0, except those whose head index is
    // outside the queue: they name no descriptor to give back.
    let get = |c: &std::sync::atomic::AtomicU64| NetMetrics::get(c);
    let taken = get(&metrics.tx_frames)
        + get(&metrics.tx_malformed)
        + get(&metrics.tx_oversized)
        + get(&metrics.tx_bad_header)
        + get(&metrics.tx_backend_errors);
    assert!(taken <= u64::from(n_avail));
    let bad_heads = heads[..taken.min(u64::from(QSIZE)) as usize]
        .iter()
        .filter(|&&h| h >= QSIZE)
        .count() as u64;
    let (used_idx, entries) = net::used_entries(&mem, tx.used);
    assert_eq!(u64::from(used_idx) + bad_heads, taken);
    assert!(entries.iter().all(|&(_, len)| len == 0), "{entries:?}");
    let sent = &dev.backend().sent;
    assert_eq!(sent.len() as u64, get(&metrics.tx_frames));
    assert_eq!(
        sent.iter().map(|&n| n as u64).sum::<u64>(),
        get(&metrics.tx_bytes)
    );
    // Nothing was received.
    assert_eq!(get(&metrics.rx_frames), 0);
});

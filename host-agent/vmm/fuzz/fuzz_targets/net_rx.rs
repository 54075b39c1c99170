//! Fuzzes the network device's receive path: a hostile guest controls the receive queue's
//! descriptor table and available ring, and the host side sends packets of any length and
//! header. The device must never panic or hang, must write no more than the header and the
//! frame into the chains, must keep at most one packet of its own, and must return every chain
//! it takes.
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte of switches: bit 0 negotiates mergeable receive buffers, bit 1 the receive offloads
//!   (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`), bit 2 `EVENT_IDX`.
//! - 1 byte: number of host packets (mod 9), then 5 bytes per packet: the frame's length (3
//!   bytes, little endian, mod 70000, so some are over the 65550-byte limit), then the header's
//!   `flags` and `gso_type`.
//! - 1 byte: number of descriptors (mod 17), then 16 bytes per descriptor
//!   (addr u64, len u32, flags u16, next u16, little endian); addresses and lengths as in
//!   `net_tx`.
//! - 1 byte: number of available-ring entries (mod 33), then 1 byte per entry.
//! - the rest: copied into guest memory at `DATA_BASE`.

#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use nanoclaw_vmm::devices::virtio::net::device::RxState;
use nanoclaw_vmm::devices::virtio::net::{MAX_FRAME_LEN, NetDevice, NetMetrics, VNET_HDR_LEN};

#[path = "../common/net.rs"]
mod net;
#[path = "../common/rings.rs"]
mod rings;

use net::{DATA_BASE, DATA_LEN, MemBackend, NoIrq, QSIZE};
use rings::{Input, Rings, le, write_hostile_queue};

/// `VIRTIO_F_VERSION_1 | VIRTIO_NET_F_MAC`.
const FEATURES: u64 = (1 << 32) | (1 << 5);
/// `VIRTIO_NET_F_MRG_RXBUF`.
const MRG_RXBUF: u64 = 1 << 15;
/// `VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6`.
const GUEST_OFFLOADS: u64 = (1 << 1) | (1 << 7) | (1 << 8);
/// `VIRTIO_RING_F_EVENT_IDX`.
const EVENT_IDX: u64 = 1 << 29;

fuzz_target!(|data: &[u8]| {
    let (mem, queues, [rx, _]) = net::machine();
    let mut input = Input(data);
    let switches = input.byte();
    let mergeable = switches & 1 != 0;
    let features = FEATURES
        | if mergeable { MRG_RXBUF } else { 0 }
        | if switches & 2 != 0 { GUEST_OFFLOADS } else { 0 }
        | if switches & 4 != 0 { EVENT_IDX } else { 0 };
    let mut backend = MemBackend::default();
    let n_frames = input.byte() % 9;
    for i in 0..n_frames {
        let len = u32::from_le_bytes(le::<4>(&input.take(3))) % 70_000;
        let head = input.take(2);
        let mut packet = vec![i; VNET_HDR_LEN + len as usize];
        packet[..VNET_HDR_LEN].fill(0);
        packet[0] = head.first().copied().unwrap_or(0);
        packet[1] = head.get(1).copied().unwrap_or(0);
        backend.incoming.push_back(packet);
    }
    let rings = Rings {
        desc_table: rx.desc_table,
        avail: rx.avail,
        qsize: QSIZE,
        data_base: DATA_BASE,
        data_len: DATA_LEN,
        fold_len: true,
    };
    let (n_avail, heads) = write_hostile_queue(&mem, &mut input, &rings);

    let metrics = Arc::new(NetMetrics::default());
    let mut dev = NetDevice::new(backend, NoIrq, metrics.clone());
    dev.activate(mem.clone(), features, queues).unwrap();
    // At most QSIZE chains and 8 frames: one pass ends the work, and a second takes no frame
    // from the backend when one waits for buffers.
    let first = dev.process_rx();
    assert_ne!(first, RxState::More);
    let calls = dev.backend().recv_calls;
    let second = dev.process_rx();
    assert_ne!(second, RxState::More);
    if first == RxState::WaitingForBuffers {
        assert_eq!(second, RxState::WaitingForBuffers);
        assert_eq!(dev.backend().recv_calls, calls);
        assert!(dev.rx_pending().is_some());
    }

    let get = |c: &std::sync::atomic::AtomicU64| NetMetrics::get(c);
    let (used_idx, entries) = net::used_entries(&mem, rx.used);
    assert!(u64::from(used_idx) <= u64::from(n_avail));
    if !mergeable {
        // One chain per packet, or per refused chain.
        let taken = get(&metrics.rx_frames) + get(&metrics.rx_no_room) + get(&metrics.rx_malformed);
        assert!(taken <= u64::from(n_avail));
        let bad_heads = heads[..taken.min(u64::from(QSIZE)) as usize]
            .iter()
            .filter(|&&h| h >= QSIZE)
            .count() as u64;
        assert_eq!(u64::from(used_idx) + bad_heads, taken);
    }
    for &(_, len) in &entries {
        if mergeable {
            assert!(
                len as usize <= VNET_HDR_LEN + MAX_FRAME_LEN,
                "used length {len}"
            );
        } else {
            assert!(
                len == 0
                    || (len as usize > VNET_HDR_LEN
                        && len as usize <= VNET_HDR_LEN + MAX_FRAME_LEN),
                "used length {len}"
            );
        }
    }
    // Packets delivered, dropped, or waiting: never more than the host sent.
    let handled = get(&metrics.rx_frames)
        + get(&metrics.rx_no_room)
        + get(&metrics.rx_oversized)
        + get(&metrics.rx_bad_header)
        + u64::from(dev.rx_pending().is_some());
    assert!(handled <= u64::from(n_frames));
});

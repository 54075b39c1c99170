//! Fuzzes the network device's receive path: a hostile guest controls the receive queue's
//! descriptor table and available ring, and the host side sends frames of any length. The
//! device must never panic or hang, must write no more than the header and the frame into a
//! chain, must keep at most one frame of its own, and must return every chain it takes.
//!
//! Input layout (everything optional; missing bytes read as zero):
//! - 1 byte: number of host frames (mod 9), then 3 bytes per frame: its length (little endian,
//!   mod 70000, so some are over the 65550-byte limit).
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

fuzz_target!(|data: &[u8]| {
    let (mem, queues, [rx, _]) = net::machine();
    let mut input = Input(data);
    let mut backend = MemBackend::default();
    let n_frames = input.byte() % 9;
    for i in 0..n_frames {
        let len = u32::from_le_bytes(le::<4>(&input.take(3))) % 70_000;
        backend.incoming.push_back(vec![i; len as usize]);
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
    dev.activate(mem.clone(), FEATURES, queues).unwrap();
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
    let taken = get(&metrics.rx_frames) + get(&metrics.rx_no_room) + get(&metrics.rx_malformed);
    assert!(taken <= u64::from(n_avail));
    let bad_heads = heads[..taken.min(u64::from(QSIZE)) as usize]
        .iter()
        .filter(|&&h| h >= QSIZE)
        .count() as u64;
    let (used_idx, entries) = net::used_entries(&mem, rx.used);
    assert_eq!(u64::from(used_idx) + bad_heads, taken);
    for &(_, len) in &entries {
        assert!(
            len == 0
                || (len as usize > VNET_HDR_LEN && len as usize <= VNET_HDR_LEN + MAX_FRAME_LEN),
            "used length {len}"
        );
    }
    // Frames delivered, dropped, or waiting: never more than the host sent.
    let handled = get(&metrics.rx_frames)
        + get(&metrics.rx_no_room)
        + get(&metrics.rx_oversized)
        + u64::from(dev.rx_pending().is_some());
    assert!(handled <= u64::from(n_frames));
});

//! Pausing device threads, and saving and restoring virtio transports, on real device threads
//! driven through the MMIO registers by a fake guest driver.

use crate::memory::GuestRam;
use std::sync::Arc;
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use vm_memory::{Bytes, GuestAddress};

use super::block::test_utils::{BlockDriver, QSIZE as BLK_QSIZE};
use super::mmio::{INT_VRING, status};
use super::state::{TransportState, VirtioDeviceState, VirtioStateError};
use super::vsock::test_utils::{GUEST_CID, GuestDriver, Harness, MEM_SIZE, QSIZE};
use super::*;
use crate::devices::bus::BusDevice;

const TXQ: usize = 1;
const EVQ: usize = 2;
/// How long a paused thread is given to (wrongly) touch guest memory.
const QUIET: Duration = Duration::from_millis(150);

fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn memory() -> GuestRam {
    GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap()
}

fn vsock(mem: &GuestRam, dir: &std::path::Path) -> (MmioTransport, VsockHandle) {
    let slot = MmioSlot {
        base: 0xd000_0000,
        len: 0x1000,
        gsi: 5,
    };
    let cfg = VsockConfig {
        guest_cid: GUEST_CID,
        uds_path: dir.join("vsock.sock"),
    };
    spawn_vsock(mem.clone(), slot, cfg, VsockHooks::default()).unwrap()
}

/// Brings the vsock device up through its registers, the rings where `drv` has them.
fn drive_vsock_up(t: &mut MmioTransport, drv: &GuestDriver) {
    let s = status::ACKNOWLEDGE | status::DRIVER;
    w(t, regs::STATUS, status::ACKNOWLEDGE);
    w(t, regs::STATUS, s);
    w(t, regs::DRIVER_FEATURES_SEL, 1);
    w(t, regs::DRIVER_FEATURES, 1);
    w(t, regs::STATUS, s | status::FEATURES_OK);
    for q in 0..3 {
        let (d, a, u) = drv.ring_addrs(q);
        w(t, regs::QUEUE_SEL, q as u32);
        w(t, regs::QUEUE_NUM, u32::from(QSIZE));
        w(t, regs::QUEUE_DESC_LOW, d as u32);
        w(t, regs::QUEUE_AVAIL_LOW, a as u32);
        w(t, regs::QUEUE_USED_LOW, u as u32);
        w(t, regs::QUEUE_READY, 1);
    }
    w(t, regs::STATUS, s | status::FEATURES_OK | status::DRIVER_OK);
    assert!(t.is_activated());
}

/// Waits for new used entries on queue `q`.
fn wait_used(drv: &mut GuestDriver, q: usize) -> Vec<(u16, u32)> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let used = drv.take_used(q);
        if !used.is_empty() {
            return used;
        }
        assert!(Instant::now() < deadline, "nothing used on queue {q}");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A tx packet the device uses at once (a request to a port nobody listens on).
fn put_request(drv: &mut GuestDriver, t: &mut MmioTransport, port: u32) {
    drv.put_tx(
        Harness::guest_hdr(1000 + port, port, 1 /* OP_REQUEST */),
        &[],
    );
    w(t, regs::QUEUE_NOTIFY, TXQ as u32);
}

#[test]
fn a_paused_vsock_thread_leaves_the_rings_alone_until_resumed() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, handle) = vsock(&mem, dir.path());
    let (mut drv, _) = GuestDriver::new(mem.clone());
    drive_vsock_up(&mut t, &drv);
    put_request(&mut drv, &mut t, 7000);
    assert_eq!(wait_used(&mut drv, TXQ).len(), 1);

    t.pause().unwrap();
    // Pausing twice is harmless.
    t.pause().unwrap();
    let irq_before = t.interrupt().status();
    t.interrupt().irq_evt().read().ok();
    put_request(&mut drv, &mut t, 7001);
    std::thread::sleep(QUIET);
    assert!(
        drv.take_used(TXQ).is_empty(),
        "a paused device used a chain"
    );
    assert_eq!(t.interrupt().status(), irq_before);
    assert!(t.interrupt().irq_evt().read().is_err(), "no interrupt");

    // The notification sent while paused is not lost.
    t.resume().unwrap();
    assert_eq!(wait_used(&mut drv, TXQ).len(), 1);
    assert_ne!(t.interrupt().status() & INT_VRING, 0);
    handle.stop();
}

#[test]
fn a_paused_block_thread_leaves_the_rings_alone_until_resumed() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, handle, mut drv) = block_up(&mem, dir.path());
    t.pause().unwrap();
    let p = drv.post_read(0, 512);
    w(&mut t, regs::QUEUE_NOTIFY, 0);
    std::thread::sleep(QUIET);
    assert!(drv.take_used().is_empty(), "a paused device used a chain");
    t.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        let used = drv.take_used();
        if !used.is_empty() {
            break used;
        }
        assert!(Instant::now() < deadline, "nothing used after the resume");
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, vec![(p.head, 513)]);
    handle.stop();
}

fn block_up(mem: &GuestRam, dir: &std::path::Path) -> (MmioTransport, BlockHandle, BlockDriver) {
    let path = dir.join("disk.img");
    if !path.exists() {
        std::fs::write(&path, vec![7u8; 8 * 512]).unwrap();
    }
    let slot = MmioSlot {
        base: 0xd000_1000,
        len: 0x1000,
        gsi: 6,
    };
    let cfg = BlockConfig {
        path,
        read_only: false,
        id: "d0".into(),
    };
    let (mut t, handle) = spawn_block(mem.clone(), slot, cfg, "blk-test".into()).unwrap();
    let (drv, _) = BlockDriver::new(mem.clone(), BLK_QSIZE);
    let s = status::ACKNOWLEDGE | status::DRIVER;
    w(&mut t, regs::STATUS, status::ACKNOWLEDGE);
    w(&mut t, regs::STATUS, s);
    w(&mut t, regs::DRIVER_FEATURES_SEL, 1);
    w(&mut t, regs::DRIVER_FEATURES, 1);
    w(&mut t, regs::STATUS, s | status::FEATURES_OK);
    let (d, a, u) = drv.ring_addrs();
    w(&mut t, regs::QUEUE_SEL, 0);
    w(&mut t, regs::QUEUE_NUM, u32::from(BLK_QSIZE));
    w(&mut t, regs::QUEUE_DESC_LOW, d as u32);
    w(&mut t, regs::QUEUE_AVAIL_LOW, a as u32);
    w(&mut t, regs::QUEUE_USED_LOW, u as u32);
    w(&mut t, regs::QUEUE_READY, 1);
    w(
        &mut t,
        regs::STATUS,
        s | status::FEATURES_OK | status::DRIVER_OK,
    );
    assert!(t.is_activated());
    (t, handle, drv)
}

/// Saves a live vsock device (one chain used on tx), restores it into a fresh device, paused:
/// the restored state saves back the same, the restored device sends the transport-reset event
/// only once resumed, and then serves tx from where the old one stopped.
#[test]
fn a_vsock_transport_round_trips_and_the_restored_device_resets_the_transport() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, handle) = vsock(&mem, dir.path());
    let (mut drv, _) = GuestDriver::new(mem.clone());
    drive_vsock_up(&mut t, &drv);
    put_request(&mut drv, &mut t, 7000);
    assert_eq!(wait_used(&mut drv, TXQ).len(), 1);
    // The refusal (OP_RST) for the request waits for an rx buffer.
    t.pause().unwrap();
    let saved = t.save_state().unwrap();
    assert!(saved.activated);
    assert_eq!(saved.queues.len(), 3);
    assert_eq!(
        (saved.queues[TXQ].next_avail, saved.queues[TXQ].next_used),
        (1, 1)
    );
    assert_eq!(
        (saved.queues[EVQ].next_avail, saved.queues[EVQ].next_used),
        (0, 0)
    );
    assert_eq!(saved.queues[TXQ].size, QSIZE);
    assert_eq!(saved.queues[TXQ].desc, drv.ring_addrs(TXQ).0);
    assert_ne!(saved.interrupt_status & INT_VRING, 0);
    assert_eq!(&saved.config[..8], &GUEST_CID.to_le_bytes());
    // Through the state file's encoding.
    let mut bytes = Vec::new();
    ciborium::into_writer(&saved, &mut bytes).unwrap();
    let decoded: TransportState = ciborium::from_reader(&bytes[..]).unwrap();
    assert_eq!(decoded, saved);
    handle.stop();

    // A fresh process's device: paused, then restored.
    let dir2 = tempfile::tempdir().unwrap();
    let (mut t2, handle2) = vsock(&mem, dir2.path());
    t2.pause().unwrap();
    t2.restore_state(&decoded).unwrap();
    assert!(t2.is_activated());
    assert_eq!(t2.device_status(), saved.status);
    // The pending interrupt is raised again.
    assert_ne!(t2.interrupt().status() & INT_VRING, 0);
    assert!(t2.interrupt().irq_evt().read().unwrap() >= 1);
    assert_eq!(t2.save_state().unwrap(), saved);

    // An event buffer, offered while paused, stays unused.
    let ev = drv.alloc(8);
    mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
    let head = drv.add_chain(EVQ, &[(ev, 8, VRING_DESC_F_WRITE as u16)]);
    w(&mut t2, regs::QUEUE_NOTIFY, EVQ as u32);
    std::thread::sleep(QUIET);
    assert!(drv.take_used(EVQ).is_empty());

    t2.resume().unwrap();
    assert_eq!(wait_used(&mut drv, EVQ), vec![(head, 4)]);
    let event: u32 = mem.read_obj(GuestAddress(ev)).unwrap();
    assert_eq!(event, 0, "VIRTIO_VSOCK_EVENT_TRANSPORT_RESET");
    // Only once.
    let ev2 = drv.alloc(8);
    drv.add_chain(EVQ, &[(ev2, 8, VRING_DESC_F_WRITE as u16)]);
    w(&mut t2, regs::QUEUE_NOTIFY, EVQ as u32);
    std::thread::sleep(QUIET);
    assert!(drv.take_used(EVQ).is_empty());

    // tx goes on from the saved position: the next chain is used into used-ring slot 1.
    put_request(&mut drv, &mut t2, 7001);
    assert_eq!(wait_used(&mut drv, TXQ).len(), 1);
    let after = {
        t2.pause().unwrap();
        t2.save_state().unwrap()
    };
    assert_eq!(
        (after.queues[TXQ].next_avail, after.queues[TXQ].next_used),
        (2, 2)
    );
    assert_eq!(after.queues[EVQ].next_used, 1);
    handle2.stop();
}

#[test]
fn a_block_transport_round_trips_and_serves_on() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, handle, mut drv) = block_up(&mem, dir.path());
    drv.post_read(0, 512);
    w(&mut t, regs::QUEUE_NOTIFY, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    while drv.take_used().is_empty() {
        assert!(Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(2));
    }
    t.pause().unwrap();
    let saved = t.save_state().unwrap();
    assert_eq!(
        (saved.queues[0].next_avail, saved.queues[0].next_used),
        (1, 1)
    );
    handle.stop();

    let (mut t2, handle2) = {
        let slot = MmioSlot {
            base: 0xd000_1000,
            len: 0x1000,
            gsi: 6,
        };
        let cfg = BlockConfig {
            path: dir.path().join("disk.img"),
            read_only: false,
            id: "d0".into(),
        };
        spawn_block(mem.clone(), slot, cfg, "blk-test2".into()).unwrap()
    };
    t2.restore_state(&saved).unwrap();
    assert_eq!(t2.save_state().unwrap(), saved);
    let p = drv.post_read(1, 512);
    w(&mut t2, regs::QUEUE_NOTIFY, 0);
    let deadline = Instant::now() + Duration::from_secs(5);
    let used = loop {
        let used = drv.take_used();
        if !used.is_empty() {
            break used;
        }
        assert!(
            Instant::now() < deadline,
            "the restored disk does not serve"
        );
        std::thread::sleep(Duration::from_millis(2));
    };
    assert_eq!(used, vec![(p.head, 513)]);
    handle2.stop();

    // A disk of another size is another device.
    let other = dir.path().join("other.img");
    std::fs::write(&other, vec![0u8; 16 * 512]).unwrap();
    let slot = MmioSlot {
        base: 0xd000_1000,
        len: 0x1000,
        gsi: 6,
    };
    let cfg = BlockConfig {
        path: other,
        read_only: false,
        id: "d0".into(),
    };
    let (mut t3, handle3) = spawn_block(mem.clone(), slot, cfg, "blk-test3".into()).unwrap();
    assert!(matches!(
        t3.restore_state(&saved),
        Err(VirtioStateError::Config)
    ));
    assert!(!t3.is_activated());
    handle3.stop();
}

/// Every kind of bad state is a typed error, and leaves the fresh device as it was.
#[test]
fn bad_saved_state_is_refused_with_a_typed_error() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (mut t, handle) = vsock(&mem, dir.path());
    let (drv, _) = GuestDriver::new(mem.clone());
    drive_vsock_up(&mut t, &drv);
    t.pause().unwrap();
    let good = t.save_state().unwrap();
    handle.stop();

    let dir2 = tempfile::tempdir().unwrap();
    let (mut fresh, handle2) = vsock(&mem, dir2.path());
    type Edit = fn(&mut TransportState);
    type Expect = fn(&VirtioStateError) -> bool;
    let cases: [(&str, Edit, Expect); 10] = [
        (
            "size not a power of two",
            |s| s.queues[0].size = 12,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 0, .. }),
        ),
        (
            "ready with size 0",
            |s| s.queues[1].size = 0,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 1, .. }),
        ),
        (
            "larger than the maximum",
            |s| s.queues[1].size = 512,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 1, .. }),
        ),
        (
            "ring outside guest memory",
            |s| s.queues[2].used = MEM_SIZE - 8,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 2, .. }),
        ),
        (
            "misaligned ring",
            |s| s.queues[0].desc += 8,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 0, .. }),
        ),
        (
            "activated with a queue not ready",
            |s| s.queues[2].ready = false,
            |e| matches!(e, VirtioStateError::BadQueue { queue: 2, .. }),
        ),
        (
            "another device type",
            |s| s.device_type = 2,
            |e| matches!(e, VirtioStateError::DeviceType { saved: 2, vm: 19 }),
        ),
        (
            "another CID",
            |s| s.config[0] ^= 1,
            |e| matches!(e, VirtioStateError::Config),
        ),
        (
            "features not offered",
            |s| s.acked_features |= 1 << 5,
            |e| matches!(e, VirtioStateError::BadRegister { .. }),
        ),
        (
            "another queue count",
            |s| {
                s.queues.pop();
            },
            |e| matches!(e, VirtioStateError::Queues { .. }),
        ),
    ];
    for (what, edit, expected) in cases {
        let mut bad = good.clone();
        edit(&mut bad);
        let err = fresh.restore_state(&bad).unwrap_err();
        assert!(expected(&err), "{what}: {err}");
        assert!(!fresh.is_activated(), "{what}");
        assert_eq!(fresh.device_status(), 0, "{what}");
    }
    // Unknown status and interrupt bits.
    let mut bad = good.clone();
    bad.status |= 0x100;
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(VirtioStateError::BadRegister {
            register: "Status",
            ..
        })
    ));
    let mut bad = good.clone();
    bad.interrupt_status = 4;
    assert!(matches!(
        fresh.restore_state(&bad),
        Err(VirtioStateError::BadRegister { .. })
    ));
    // And the good one still restores.
    fresh.restore_state(&good).unwrap();
    assert!(fresh.is_activated());
    handle2.stop();
}

#[test]
fn a_restore_needs_the_same_device_slots() {
    let mem = memory();
    let dir = tempfile::tempdir().unwrap();
    let (t, handle) = vsock(&mem, dir.path());
    let saved = t.save_state().unwrap();
    assert!(!saved.activated);
    let mut devices = VirtioDevices::default();
    devices.add(0, Arc::new(std::sync::Mutex::new(t)));
    let state = |slot| VirtioDeviceState {
        slot,
        transport: saved.clone(),
    };
    let slot_err = |r: Result<(), (u32, VirtioStateError)>| match r {
        Err((slot, VirtioStateError::Slot { .. })) => slot,
        other => panic!("{other:?}"),
    };
    assert_eq!(slot_err(devices.restore(&[])), 0);
    assert_eq!(slot_err(devices.restore(&[state(0), state(1)])), 1);
    assert_eq!(slot_err(devices.restore(&[state(0), state(0)])), 0);
    devices.restore(&[state(0)]).unwrap();
    // Pausing, saving and resuming the set.
    devices.pause().unwrap();
    assert_eq!(devices.save().unwrap(), vec![state(0)]);
    devices.resume();
    handle.stop();
}

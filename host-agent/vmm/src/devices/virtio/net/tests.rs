//! Device tests: a fake guest on two mock virtqueues over an in-memory backend, the device
//! thread through the transport over a datagram socket pair, and (as root) a real TAP in a
//! network namespace of its own.

use crate::memory::GuestRam;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;

use super::device::RxState;
use super::test_utils::{Harness, MEM_SIZE, NEXT, W, frame};
use super::{
    MAX_CHAIN_DESCRIPTORS, MAX_CHAINS_PER_PASS, MAX_FRAME_LEN, NetFrontend, VNET_HDR_LEN, defs,
};
use crate::devices::virtio::RateLimitedLog;
use crate::devices::virtio::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice};

#[test]
fn spec_numbers_match_virtio_bindings() {
    use virtio_bindings::virtio_net as n;
    assert_eq!(defs::VIRTIO_NET_F_MAC, 1 << n::VIRTIO_NET_F_MAC);
    assert_eq!(
        defs::DEVICE_TYPE,
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    );
    assert_eq!(VNET_HDR_LEN, std::mem::size_of::<n::virtio_net_hdr_v1>());
    assert_eq!(
        defs::NUM_BUFFERS_OFFSET,
        std::mem::offset_of!(n::virtio_net_hdr_v1, num_buffers)
    );
}

#[test]
fn the_front_end_offers_version_1_the_mac_the_tcp_offloads_and_mergeable_buffers() {
    let (tx, _rx) = std::sync::mpsc::channel();
    let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let mut f = NetFrontend::new([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee], tx, wake);
    assert_eq!(f.device_type(), 1);
    assert_eq!(f.queue_max_sizes(), &[256, 256]);
    // EVENT_IDX (29), CSUM (0), GUEST_CSUM (1), GUEST_TSO4/6 (7, 8), HOST_TSO4/6 (11, 12),
    // MRG_RXBUF (15); no ECN or UFO (9, 10, 13, 14), STATUS (16), CTRL_VQ (17), MQ (22), MTU
    // (3), INDIRECT_DESC (28).
    assert_eq!(
        f.device_features(),
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | (1 << 5)
            | (1 << 0)
            | (1 << 1)
            | (1 << 7)
            | (1 << 8)
            | (1 << 11)
            | (1 << 12)
            | (1 << 15)
    );
    use virtio_bindings::virtio_net as n;
    for (ours, theirs) in [
        (defs::VIRTIO_NET_F_CSUM, n::VIRTIO_NET_F_CSUM),
        (defs::VIRTIO_NET_F_GUEST_CSUM, n::VIRTIO_NET_F_GUEST_CSUM),
        (defs::VIRTIO_NET_F_GUEST_TSO4, n::VIRTIO_NET_F_GUEST_TSO4),
        (defs::VIRTIO_NET_F_GUEST_TSO6, n::VIRTIO_NET_F_GUEST_TSO6),
        (defs::VIRTIO_NET_F_HOST_TSO4, n::VIRTIO_NET_F_HOST_TSO4),
        (defs::VIRTIO_NET_F_HOST_TSO6, n::VIRTIO_NET_F_HOST_TSO6),
        (defs::VIRTIO_NET_F_MRG_RXBUF, n::VIRTIO_NET_F_MRG_RXBUF),
    ] {
        assert_eq!(ours, 1 << theirs);
    }
    assert_eq!(
        VIRTIO_RING_F_EVENT_IDX,
        1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX
    );
    let mut cfg = [0x55u8; 10];
    f.read_config(0, &mut cfg);
    assert_eq!(cfg, [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0, 0, 0, 0]);
    let mut tail = [0x55u8; 4];
    f.read_config(4, &mut tail);
    assert_eq!(tail, [0xdd, 0xee, 0, 0]);
    f.read_config(u64::MAX, &mut tail);
    assert_eq!(tail, [0; 4]);
    // The MAC is read-only.
    f.write_config(0, &[1, 2, 3]);
    f.read_config(0, &mut cfg[..6]);
    assert_eq!(cfg[..6], [2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
}

#[test]
fn a_tx_frame_reaches_the_backend_intact_however_it_is_split() {
    let mut h = Harness::new();
    let layouts: [&[usize]; 5] = [
        &[12 + 1500],
        &[12, 1500],
        &[5, 7, 100, 1400],
        &[13, 1499],
        &[12, 0, 1500],
    ];
    let mut heads = Vec::new();
    for (i, sizes) in layouts.iter().enumerate() {
        heads.push(h.drv.send_split(&frame(1500, i as u8), sizes));
    }
    let used = h.run_tx();
    assert_eq!(used, heads.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
    let sent = h.backend.sent();
    assert_eq!(sent.len(), layouts.len());
    for (i, f) in sent.iter().enumerate() {
        assert_eq!(*f, frame(1500, i as u8), "layout {i}");
    }
    assert_eq!(h.get(|m| &m.tx_frames), 5);
    assert_eq!(h.get(|m| &m.tx_bytes), 5 * 1500);
    assert!(h.irqs.load(Ordering::SeqCst) >= 1);

    // The smallest and the largest frame go too.
    let heads = [
        h.drv.send(&frame(14, 1)),
        h.drv.send(&frame(MAX_FRAME_LEN, 2)),
    ];
    assert_eq!(h.run_tx(), vec![(heads[0], 0), (heads[1], 0)]);
    let sent = h.backend.sent();
    assert_eq!(sent[5], frame(14, 1));
    assert_eq!(sent[6], frame(MAX_FRAME_LEN, 2));
}

#[test]
fn an_oversized_tx_frame_is_dropped_and_the_used_ring_still_advances() {
    let mut h = Harness::new();
    let big = h.drv.send(&frame(MAX_FRAME_LEN + 1, 0));
    // Split so no descriptor alone is over the limit.
    let split = h
        .drv
        .send_split(&frame(MAX_FRAME_LEN + 100, 0), &[40_000, 25_662]);
    let ok = h.drv.send(&frame(60, 3));
    assert_eq!(h.run_tx(), vec![(big, 0), (split, 0), (ok, 0)]);
    assert_eq!(h.backend.sent(), vec![frame(60, 3)]);
    assert_eq!(h.get(|m| &m.tx_oversized), 2);
    assert_eq!(h.get(|m| &m.tx_frames), 1);

    // A chain whose lengths add up past 4 GiB is refused, not wrapped, and nothing is read.
    let a = h.drv.alloc(16);
    let head = h.drv.tx.add_chain(&[(a, u32::MAX, 0), (a, u32::MAX, 0)]);
    assert_eq!(h.run_tx(), vec![(head, 0)]);
    assert_eq!(h.backend.sent().len(), 1);
}

/// Runs one bad transmit chain followed by a good frame: the bad one comes back with length 0,
/// the good one is sent.
fn bad_tx_chain_is_skipped(h: &mut Harness, add_bad: impl FnOnce(&mut Harness) -> u16) {
    let before = h.backend.sent().len();
    let malformed = h.get(|m| &m.tx_malformed);
    let bad = add_bad(h);
    let good = h.drv.send(&frame(100, 9));
    let used = h.run_tx();
    assert_eq!(used, vec![(bad, 0), (good, 0)]);
    let sent = h.backend.sent();
    assert_eq!(sent.len(), before + 1);
    assert_eq!(sent[before], frame(100, 9));
    assert_eq!(h.get(|m| &m.tx_malformed), malformed + 1);
}

#[test]
fn bad_tx_chains_are_skipped() {
    let mut h = Harness::new();
    // A device-writable descriptor where the device reads.
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 12 + 60]);
        h.drv.tx.add_chain(&[(a, 12, 0), (a + 12, 60, W)])
    });
    // Outside guest memory, and straddling its end.
    bad_tx_chain_is_skipped(&mut h, |h| {
        h.drv.tx.add_chain(&[(MEM_SIZE + 0x1000, 100, 0)])
    });
    bad_tx_chain_is_skipped(&mut h, |h| h.drv.tx.add_chain(&[(MEM_SIZE - 50, 100, 0)]));
    bad_tx_chain_is_skipped(&mut h, |h| h.drv.tx.add_chain(&[(u64::MAX - 10, 100, 0)]));
    // Too short for the header, and a header with less than an Ethernet header behind it.
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 11]);
        h.drv.tx.add_chain(&[(a, 11, 0)])
    });
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 12 + 13]);
        h.drv.tx.add_chain(&[(a, 12 + 13, 0)])
    });
    // A descriptor that points back at itself.
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 100]);
        let at = 200;
        h.drv.tx.add_raw(
            at,
            &[RawDescriptor::from(SplitDescriptor::new(a, 100, NEXT, at))],
        );
        at
    });
    // A `next` index outside the table.
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 100]);
        let at = 210;
        h.drv.tx.add_raw(
            at,
            &[RawDescriptor::from(SplitDescriptor::new(a, 100, NEXT, 999))],
        );
        at
    });
    // Longer than the device reads.
    bad_tx_chain_is_skipped(&mut h, |h| {
        let a = h.drv.put(&[0; 16]);
        let descs = vec![(a, 2, 0); MAX_CHAIN_DESCRIPTORS + 1];
        h.drv.tx.add_chain(&descs)
    });
    // The log stayed within its burst.
    assert!(h.dev.log_lines_passed() <= RateLimitedLog::BURST);
}

#[test]
fn a_flood_of_bad_chains_is_counted_and_logged_at_a_bounded_rate() {
    let mut h = Harness::new();
    for _ in 0..2000 {
        h.drv.tx.add_chain(&[(MEM_SIZE + 1, 100, 0)]);
        assert_eq!(h.run_tx().len(), 1);
    }
    assert_eq!(h.get(|m| &m.tx_malformed), 2000);
    // The burst, then one in a thousand.
    assert_eq!(h.dev.log_lines_passed(), RateLimitedLog::BURST + 1);
}

#[test]
fn one_pass_serves_a_bounded_number_of_chains() {
    let mut h = Harness::new();
    // The queue holds 256 chains; fill it twice over in two rounds.
    for _ in 0..2 {
        for i in 0..MAX_CHAINS_PER_PASS {
            h.drv.send(&frame(20, i as u8));
        }
        assert!(h.dev.process_tx(), "the pass stops at the bound");
        assert!(!h.dev.process_tx(), "nothing left");
        assert_eq!(h.drv.tx.take_used().len(), MAX_CHAINS_PER_PASS);
    }
    assert_eq!(h.backend.sent().len(), 2 * MAX_CHAINS_PER_PASS);
}

#[test]
fn a_backend_send_error_drops_the_frame_and_completes_the_chain() {
    let mut h = Harness::new();
    *h.backend.state().fail_sends.lock().unwrap() = Some(libc::EAGAIN);
    let head = h.drv.send(&frame(60, 1));
    assert_eq!(h.run_tx(), vec![(head, 0)]);
    assert_eq!(h.get(|m| &m.tx_backend_errors), 1);
    *h.backend.state().fail_sends.lock().unwrap() = None;
    let head = h.drv.send(&frame(60, 2));
    assert_eq!(h.run_tx(), vec![(head, 0)]);
    assert_eq!(h.backend.sent(), vec![frame(60, 2)]);
}

#[test]
fn an_rx_frame_lands_in_guest_buffers_behind_the_header() {
    let mut h = Harness::new();
    let f = frame(1514, 4);
    h.backend.push(f.clone());
    let (head, descs) = h.drv.post_rx(&[1526]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used(), vec![(head, 1526)]);
    let got = h.drv.read_rx(&descs, 1526);
    // All zero but num_buffers = 1.
    assert_eq!(got[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(got[12..], f[..]);
    assert_eq!(h.get(|m| &m.rx_frames), 1);
    assert_eq!(h.get(|m| &m.rx_bytes), 1514);
    assert!(h.irqs.load(Ordering::SeqCst) >= 1);

    // Header and frame across several descriptors, with room to spare.
    let f = frame(100, 5);
    h.backend.push(f.clone());
    let (head, descs) = h.drv.post_rx(&[10, 3, 50, 4096]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used(), vec![(head, 112)]);
    let got = h.drv.read_rx(&descs, 4159);
    assert_eq!(got[..12], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]);
    assert_eq!(got[12..112], f[..]);
    assert!(
        got[112..].iter().all(|&b| b == 0xee),
        "nothing past the frame"
    );

    // The largest frame.
    let f = frame(MAX_FRAME_LEN, 6);
    h.backend.push(f.clone());
    let (head, descs) = h.drv.post_rx(&[(12 + MAX_FRAME_LEN) as u32]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(
        h.drv.rx.take_used(),
        vec![(head, (12 + MAX_FRAME_LEN) as u32)]
    );
    assert_eq!(h.drv.read_rx(&descs, 12 + MAX_FRAME_LEN)[12..], f[..]);
}

#[test]
fn rx_without_buffers_keeps_one_frame_pending_and_reads_no_more() {
    let mut h = Harness::new();
    for i in 0..3 {
        h.backend.push(frame(200, i));
    }
    // No receive buffer: one frame is taken from the backend and waits.
    assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    // The pending packet: the header and the frame.
    assert_eq!(h.dev.rx_pending(), Some(212));
    assert_eq!(h.backend.waiting(), 2);
    let calls = h.backend.recv_calls();
    // Asked again (a spurious wake-up), it reads nothing more and still waits.
    for _ in 0..100 {
        assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    }
    assert_eq!(h.backend.recv_calls(), calls);
    assert_eq!(h.backend.waiting(), 2);
    assert!(h.drv.rx.take_used().is_empty());

    // One buffer: the pending frame goes first, the next one waits.
    let (head, descs) = h.drv.post_rx(&[2048]);
    assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    assert_eq!(h.drv.rx.take_used(), vec![(head, 212)]);
    assert_eq!(h.drv.read_rx(&descs, 212)[12..], frame(200, 0)[..]);
    assert_eq!(h.backend.waiting(), 1);

    // Enough buffers: everything arrives in order and the device goes idle.
    let posted: Vec<_> = (0..3).map(|_| h.drv.post_rx(&[2048])).collect();
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(
        h.drv.rx.take_used(),
        vec![(posted[0].0, 212), (posted[1].0, 212)]
    );
    assert_eq!(h.drv.read_rx(&posted[1].1, 212)[12..], frame(200, 2)[..]);
    assert_eq!(h.dev.rx_pending(), None);
    assert_eq!(h.get(|m| &m.rx_frames), 3);
}

#[test]
fn bad_rx_chains_are_skipped_and_the_frame_waits_for_a_good_one() {
    let mut h = Harness::new();
    let f = frame(300, 7);
    h.backend.push(f.clone());
    // Device-readable, outside memory, a loop, too long: each returned with length 0.
    let a = h.drv.alloc(2048);
    let readable = h.drv.rx.add_chain(&[(a, 2048, 0)]);
    let outside = h.drv.rx.add_chain(&[(MEM_SIZE - 16, 2048, W)]);
    let looped = 100;
    h.drv.rx.add_raw(
        looped,
        &[RawDescriptor::from(SplitDescriptor::new(
            a,
            2048,
            W | NEXT,
            looped,
        ))],
    );
    let long = h
        .drv
        .rx
        .add_chain(&vec![(a, 64, W); MAX_CHAIN_DESCRIPTORS + 1]);
    assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    assert_eq!(
        h.drv.rx.take_used(),
        vec![(readable, 0), (outside, 0), (looped, 0), (long, 0)]
    );
    assert_eq!(h.get(|m| &m.rx_malformed), 4);
    assert_eq!(h.dev.rx_pending(), Some(312));

    let (head, descs) = h.drv.post_rx(&[1024]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used(), vec![(head, 312)]);
    assert_eq!(h.drv.read_rx(&descs, 312)[12..], f[..]);
}

#[test]
fn an_rx_frame_too_big_for_the_guest_buffer_is_dropped() {
    let mut h = Harness::new();
    h.backend.push(frame(1514, 1));
    h.backend.push(frame(60, 2));
    let (small, descs) = h.drv.post_rx(&[1000, 100]);
    let (next, next_descs) = h.drv.post_rx(&[1000]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used(), vec![(small, 0), (next, 72)]);
    assert!(h.drv.read_rx(&descs, 1100).iter().all(|&b| b == 0xee));
    assert_eq!(h.drv.read_rx(&next_descs, 72)[12..], frame(60, 2)[..]);
    assert_eq!(h.get(|m| &m.rx_no_room), 1);
    assert_eq!(h.get(|m| &m.rx_frames), 1);
}

#[test]
fn an_oversized_or_empty_host_frame_is_dropped() {
    let mut h = Harness::new();
    h.backend.push(frame(MAX_FRAME_LEN + 1, 1));
    h.backend.push(frame(MAX_FRAME_LEN + 5000, 2));
    h.backend.push(Vec::new());
    h.backend.push(frame(64, 3));
    let (head, descs) = h.drv.post_rx(&[(12 + MAX_FRAME_LEN) as u32]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used(), vec![(head, 76)]);
    assert_eq!(h.drv.read_rx(&descs, 76)[12..], frame(64, 3)[..]);
    assert_eq!(h.get(|m| &m.rx_oversized), 3);
}

#[test]
fn reset_drops_the_queues_and_the_pending_frame() {
    let mut h = Harness::new();
    h.backend.push(frame(100, 1));
    assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    h.dev.reset();
    assert!(!h.dev.is_active());
    assert_eq!(h.dev.rx_pending(), None);
    // Inactive, the device touches neither queue nor backend.
    h.backend.push(frame(100, 2));
    h.drv.send(&frame(100, 3));
    let calls = h.backend.recv_calls();
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert!(!h.dev.process_tx());
    assert_eq!(h.backend.recv_calls(), calls);
    assert!(h.backend.sent().is_empty());
}

#[test]
fn activation_needs_exactly_two_queues() {
    let mut h = Harness::new();
    let mem = h.drv.mem.clone();
    let err = h
        .dev
        .activate(mem, VIRTIO_F_VERSION_1, Vec::new())
        .unwrap_err();
    assert!(
        err.to_string().contains("expected 2 queues, got 0"),
        "{err}"
    );
}

/// The device thread through the virtio-mmio transport, over a datagram socket pair (one
/// datagram, one frame, as with a TAP).
mod thread {
    use std::os::fd::{AsRawFd, RawFd};
    use std::os::unix::net::UnixDatagram;
    use std::time::{Duration, Instant};

    use vm_memory::GuestAddress;

    use super::super::NetBackend;
    use super::super::test_utils::{NetDriver, QSIZE};
    use super::*;
    use crate::devices::bus::BusDevice;
    use crate::devices::virtio::mmio::{INT_VRING, MmioTransport, regs, status};
    use crate::devices::virtio::{MmioSlot, NetMetrics, VirtioError, spawn_net};

    /// One end of a datagram socket pair used as a `File`, so that it makes the calls the TAP
    /// backend makes (`read` and `write`), one frame per datagram.
    struct DgramBackend(std::fs::File);

    impl DgramBackend {
        fn new(end: UnixDatagram) -> Self {
            Self(std::fs::File::from(std::os::fd::OwnedFd::from(end)))
        }
    }

    impl NetBackend for DgramBackend {
        fn recv_packet(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            std::io::Read::read(&mut self.0, buf)
        }
        fn send_packet(&mut self, packet: &[u8]) -> std::io::Result<()> {
            std::io::Write::write(&mut self.0, packet).map(drop)
        }
    }

    impl AsRawFd for DgramBackend {
        fn as_raw_fd(&self) -> RawFd {
            self.0.as_raw_fd()
        }
    }

    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            if let Some(v) = f() {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn the_device_thread_moves_frames_both_ways_through_the_transport() {
        drive_the_device_thread();
    }

    /// Set in the child process of the seccomp test: the VM folder for its `exit.json`.
    const SECCOMP_CHILD_ENV: &str = "NANOCLAW_NET_SECCOMP_TEST_CHILD";

    /// The child's side of [`the_net_filter_allows_what_the_device_thread_does`]: prepares the
    /// real seccomp filters, so the device thread installs the `net` one, then drives it. Does
    /// nothing in a normal test run.
    #[test]
    fn net_seccomp_child_process() {
        let Some(dir) = std::env::var_os(SECCOMP_CHILD_ENV) else {
            return;
        };
        crate::seccomp::prepare(std::path::Path::new(&dir)).unwrap();
        drive_the_device_thread();
        eprintln!("NET THREAD DONE UNDER ITS FILTER");
    }

    /// The device thread under its real seccomp filter: a call outside the `net` list would end
    /// the child with exit code 14 and name the call in `exit.json`.
    #[test]
    fn the_net_filter_allows_what_the_device_thread_does() {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "devices::virtio::net::tests::thread::net_seccomp_child_process",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(SECCOMP_CHILD_ENV, dir.path())
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let record =
            std::fs::read_to_string(dir.path().join(crate::EXIT_RECORD_NAME)).unwrap_or_default();
        assert_eq!(out.status.code(), Some(0), "{stderr}\nexit.json: {record}");
        assert!(
            stderr.contains("NET THREAD DONE UNDER ITS FILTER"),
            "{stderr}"
        );
        assert!(record.is_empty(), "exit.json: {record}");
    }

    fn drive_the_device_thread() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let (ours, host) = UnixDatagram::pair().unwrap();
        ours.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let slot = MmioSlot {
            base: 0xd000_9000,
            len: 0x1000,
            gsi: 14,
        };
        let mac = [2, 0, 0, 0, 0, 0x42];
        let (mut t, handle) = spawn_net(mem.clone(), slot, mac, DgramBackend::new(ours)).unwrap();
        assert_eq!(handle.cmdline_arg(), "virtio_mmio.device=4K@0xd0009000:14");
        assert_eq!(handle.mac(), mac);
        let mut word = [0u8; 4];
        t.read(regs::DEVICE_ID, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1);
        let mut cfg = [0u8; 6];
        t.read(regs::CONFIG, &mut cfg);
        assert_eq!(cfg, mac);

        // A frame from the host before the driver is up waits in the socket (each datagram a
        // packet: a virtio-net header, then the frame, as the TAP gives them).
        host.send(&[&[0u8; VNET_HDR_LEN][..], &frame(80, 1)].concat())
            .unwrap();

        // Driver initialisation: VERSION_1 and MAC.
        let (mut drv, _) = NetDriver::new(mem.clone());
        let s = status::ACKNOWLEDGE | status::DRIVER;
        w(&mut t, regs::STATUS, status::ACKNOWLEDGE);
        w(&mut t, regs::STATUS, s);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 0);
        w(&mut t, regs::DRIVER_FEATURES, 1 << 5);
        w(&mut t, regs::DRIVER_FEATURES_SEL, 1);
        w(&mut t, regs::DRIVER_FEATURES, 1);
        w(&mut t, regs::STATUS, s | status::FEATURES_OK);
        assert_ne!(t.device_status() & status::FEATURES_OK, 0);
        for (q, rings) in [drv.rx.ring_addrs(), drv.tx.ring_addrs()]
            .iter()
            .enumerate()
        {
            w(&mut t, regs::QUEUE_SEL, q as u32);
            w(&mut t, regs::QUEUE_NUM, u32::from(QSIZE));
            w(&mut t, regs::QUEUE_DESC_LOW, rings.0 as u32);
            w(&mut t, regs::QUEUE_AVAIL_LOW, rings.1 as u32);
            w(&mut t, regs::QUEUE_USED_LOW, rings.2 as u32);
            w(&mut t, regs::QUEUE_READY, 1);
        }
        w(
            &mut t,
            regs::STATUS,
            s | status::FEATURES_OK | status::DRIVER_OK,
        );
        assert!(t.is_activated());

        // Guest to host.
        let f = frame(1200, 2);
        drv.send(&f);
        w(&mut t, regs::QUEUE_NOTIFY, 1);
        let mut buf = vec![0u8; 4096];
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(buf[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(buf[VNET_HDR_LEN..n], f[..]);
        wait_for("the transmit chain back", || {
            let used = drv.tx.take_used();
            (!used.is_empty()).then_some(used)
        });

        // Host to guest: the early frame waits for a buffer, then arrives.
        std::thread::sleep(Duration::from_millis(20));
        assert!(drv.rx.take_used().is_empty());
        let (head, descs) = drv.post_rx(&[2048]);
        w(&mut t, regs::QUEUE_NOTIFY, 0);
        let used = wait_for("the early frame", || {
            let used = drv.rx.take_used();
            (!used.is_empty()).then_some(used)
        });
        assert_eq!(used, vec![(head, 92)]);
        assert_eq!(drv.read_rx(&descs, 92)[12..], frame(80, 1)[..]);
        assert_ne!(t.interrupt().status() & INT_VRING, 0);
        assert!(t.interrupt().irq_evt().read().unwrap() >= 1);

        // A frame sent while a buffer is posted arrives without a notify.
        let (head, descs) = drv.post_rx(&[2048]);
        host.send(&[&[0u8; VNET_HDR_LEN][..], &frame(500, 3)].concat())
            .unwrap();
        let used = wait_for("a live frame", || {
            let used = drv.rx.take_used();
            (!used.is_empty()).then_some(used)
        });
        assert_eq!(used, vec![(head, 512)]);
        assert_eq!(drv.read_rx(&descs, 512)[12..], frame(500, 3)[..]);

        // Paused (as for a snapshot), the thread walks no queue and reads no frame: a transmit
        // chain and a frame from the host both wait for the resume, and the saved queue
        // positions are where the guest left them.
        t.pause().unwrap();
        let f = frame(300, 5);
        drv.send(&f);
        w(&mut t, regs::QUEUE_NOTIFY, 1);
        let (head, descs) = drv.post_rx(&[2048]);
        host.send(&[&[0u8; VNET_HDR_LEN][..], &frame(200, 6)].concat())
            .unwrap();
        w(&mut t, regs::QUEUE_NOTIFY, 0);
        std::thread::sleep(Duration::from_millis(150));
        assert!(
            drv.tx.take_used().is_empty(),
            "a paused device sent a frame"
        );
        assert!(
            drv.rx.take_used().is_empty(),
            "a paused device took a frame"
        );
        let saved = t.save_state().unwrap();
        let positions: Vec<_> = saved
            .queues
            .iter()
            .map(|q| (q.next_avail, q.next_used))
            .collect();
        assert_eq!(positions, vec![(2, 2), (1, 1)]);
        host.set_nonblocking(true).unwrap();
        assert!(host.recv(&mut buf).is_err(), "a paused device sent a frame");
        host.set_nonblocking(false).unwrap();
        t.resume().unwrap();
        let n = host.recv(&mut buf).unwrap();
        assert_eq!(buf[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        assert_eq!(buf[VNET_HDR_LEN..n], f[..]);
        wait_for("the transmit chain after the resume", || {
            let used = drv.tx.take_used();
            (!used.is_empty()).then_some(used)
        });
        let used = wait_for("the frame sent during the pause", || {
            let used = drv.rx.take_used();
            (!used.is_empty()).then_some(used)
        });
        assert_eq!(used, vec![(head, 212)]);
        assert_eq!(drv.read_rx(&descs, 212)[12..], frame(200, 6)[..]);

        // A reset is acknowledged by the thread before the status reads back 0.
        w(&mut t, regs::STATUS, 0);
        t.read(regs::STATUS, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0);

        let metrics = handle.metrics();
        handle.stop();
        assert_eq!(NetMetrics::get(&metrics.tx_frames), 2);
        assert_eq!(NetMetrics::get(&metrics.rx_frames), 3);
        // The thread dropped its end: the host's sends now fail.
        assert!(
            host.send(&[&[0u8; VNET_HDR_LEN][..], &frame(60, 4)].concat())
                .is_err()
        );
    }

    #[test]
    fn setup_refuses_a_bad_slot_or_mac() {
        let mem = GuestRam::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let slot = MmioSlot {
            base: 0xd000_9000,
            len: 0x1000,
            gsi: 14,
        };
        let backend = || DgramBackend::new(UnixDatagram::pair().unwrap().0);
        let err = spawn_net(mem.clone(), slot, [1, 0, 0, 0, 0, 1], backend()).unwrap_err();
        assert!(matches!(err, VirtioError::Net(super::super::NetError::Mac)));
        let err = spawn_net(
            mem,
            MmioSlot {
                len: 0x2000,
                ..slot
            },
            [2, 0, 0, 0, 0, 1],
            backend(),
        )
        .unwrap_err();
        assert!(matches!(err, VirtioError::SlotLen(0x2000)));
    }
}

/// The TAP backend for real: a TAP in a fresh network namespace, a frame each way. Needs root
/// (and `ip` from iproute2); skipped, and says so, otherwise.
mod tap {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    use super::super::{NetBackend, NetError, Tap, VNET_HDR_LEN};
    use super::frame;

    const TAP_NAME: &str = "nc-test-tap0";
    const ETHERTYPE: u16 = 0x88b5;

    fn skip_reason() -> Option<&'static str> {
        if !nix::unistd::geteuid().is_root() {
            return Some("not root");
        }
        if !std::path::Path::new("/dev/net/tun").exists() {
            return Some("no /dev/net/tun");
        }
        if std::process::Command::new("ip").arg("-V").output().is_err() {
            return Some("no ip command");
        }
        None
    }

    fn ip(args: &[&str]) {
        let out = std::process::Command::new("ip")
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ip {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An `AF_PACKET` socket bound to `ifindex`, seeing every frame on it.
    fn packet_socket(ifindex: u32) -> OwnedFd {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the result is checked.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
        assert!(fd >= 0, "{}", std::io::Error::last_os_error());
        // SAFETY: `fd` is a fresh descriptor nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; it is filled in below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_protocol = proto;
        addr.sll_ifindex = ifindex as i32;
        // SAFETY: `addr` is a valid sockaddr_ll of the size given.
        let rc = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_ll).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
        let tv = libc::timeval {
            tv_sec: 5,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO reads one timeval, which `tv` is.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        assert_eq!(rc, 0);
        fd
    }

    fn is_ours(f: &[u8]) -> bool {
        f.len() >= 14 && u16::from_be_bytes([f[12], f[13]]) == ETHERTYPE
    }

    /// The test body, on a thread of its own that has entered a new network namespace (a
    /// thread's namespace is its own; the process's other threads keep theirs).
    fn in_fresh_netns() {
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        // Not there yet: refused, and not created by the attempt.
        match Tap::open(TAP_NAME) {
            Err(NetError::TapMissing(name)) => assert_eq!(name, TAP_NAME),
            other => panic!("expected TapMissing, got {other:?}"),
        }
        assert!(matches!(Tap::open("lo"), Err(NetError::Attach { .. })));
        assert!(matches!(Tap::open("a/b"), Err(NetError::TapName(_))));
        // `ip` runs as a child of this thread, so in its namespace.
        ip(&["tuntap", "add", "dev", TAP_NAME, "mode", "tap"]);
        ip(&["link", "set", "dev", TAP_NAME, "up"]);
        let mut tap = Tap::open(TAP_NAME).unwrap();
        assert_eq!(tap.name(), TAP_NAME);
        // Attached once only.
        assert!(matches!(Tap::open(TAP_NAME), Err(NetError::Attach { .. })));
        let c_name = std::ffi::CString::new(TAP_NAME).unwrap();
        // SAFETY: a valid NUL-terminated name.
        let ifindex = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
        assert_ne!(ifindex, 0);
        let sock = packet_socket(ifindex);

        // Guest to host: what the device writes to the TAP comes out of the interface.
        let out = frame(600, 1);
        tap.send_packet(&[&[0u8; VNET_HDR_LEN][..], &out].concat())
            .unwrap();
        let mut buf = vec![0u8; 70_000];
        let got = loop {
            // SAFETY: `buf` is writable for its length.
            let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
            assert!(
                n >= 0,
                "no frame on the interface: {}",
                std::io::Error::last_os_error()
            );
            if is_ours(&buf[..n as usize]) {
                break buf[..n as usize].to_vec();
            }
        };
        assert_eq!(got, out);

        // Host to guest: a frame sent on the interface is read from the TAP, whole.
        let inbound = frame(900, 2);
        // SAFETY: `inbound` is readable for its length.
        let n = unsafe { libc::send(sock.as_raw_fd(), inbound.as_ptr().cast(), inbound.len(), 0) };
        assert_eq!(
            n,
            inbound.len() as isize,
            "{}",
            std::io::Error::last_os_error()
        );
        let deadline = Instant::now() + Duration::from_secs(5);
        let got = loop {
            match tap.recv_packet(&mut buf) {
                // Each packet is a virtio-net header, then the frame.
                Ok(n) if n > VNET_HDR_LEN && is_ours(&buf[VNET_HDR_LEN..n]) => {
                    break buf[VNET_HDR_LEN..n].to_vec();
                }
                // Router solicitations and the like.
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "no frame from the TAP");
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(e) => panic!("TAP read: {e}"),
            }
        };
        assert_eq!(got, inbound);
        // The TAP is non-blocking: with nothing left it says so instead of waiting.
        loop {
            match tap.recv_packet(&mut buf) {
                Ok(_) => continue,
                Err(e) => {
                    assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock);
                    break;
                }
            }
        }
        // The namespace, and the TAP with it, go when this thread ends.
        drop(tap);
        ip(&["link", "del", TAP_NAME]);
    }

    #[test]
    fn a_real_tap_in_its_own_namespace_moves_a_frame_each_way() {
        if let Some(why) = skip_reason() {
            eprintln!("SKIPPED a_real_tap_in_its_own_namespace_moves_a_frame_each_way: {why}");
            return;
        }
        std::thread::spawn(in_fresh_netns).join().unwrap();
    }
}

#[test]
fn with_event_idx_the_device_asks_for_the_next_kick_where_it_stopped() {
    let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    for seed in 0..3 {
        h.drv.send(&frame(60, seed));
    }
    assert_eq!(h.run_tx().len(), 3);
    // The guest kicks again only for the buffer after the third.
    assert_eq!(h.drv.tx.avail_event(), 3);

    // Receive: with no buffer posted, a frame waits and the device asks for the next buffer's
    // kick at the index where it stopped.
    h.backend.push(frame(60, 9));
    assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
    assert_eq!(h.drv.rx.avail_event(), 0);
    let (_, descs) = h.drv.post_rx(&[2048]);
    assert_eq!(h.dev.process_rx(), RxState::Idle);
    assert_eq!(h.drv.rx.take_used().len(), 1);
    assert_eq!(
        h.drv.read_rx(&descs, VNET_HDR_LEN + 60)[VNET_HDR_LEN..],
        frame(60, 9)
    );
}

#[test]
fn without_event_idx_the_rings_event_fields_are_left_alone() {
    let mut h = Harness::new();
    h.drv.send(&frame(60, 1));
    assert_eq!(h.run_tx().len(), 1);
    assert_eq!(h.drv.tx.avail_event(), 0);
    assert_eq!(h.irqs.load(Ordering::SeqCst), 1, "one interrupt per pass");
}

#[test]
fn with_event_idx_interrupts_wait_for_the_drivers_used_event() {
    let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    // The driver wants an interrupt once the fourth buffer (used index 3 passed) is used.
    h.drv.tx.set_used_event(3);
    for round in 0..3u8 {
        h.drv.send(&frame(60, round));
        assert_eq!(h.run_tx().len(), 1);
    }
    assert_eq!(
        h.irqs.load(Ordering::SeqCst),
        0,
        "no interrupt before the used event"
    );
    h.drv.send(&frame(60, 3));
    assert_eq!(h.run_tx().len(), 1);
    assert_eq!(h.irqs.load(Ordering::SeqCst), 1);
    assert_eq!(h.backend.sent().len(), 4);
}

#[test]
fn a_bogus_available_index_with_event_idx_does_not_keep_the_device_busy() {
    use vm_memory::{Bytes, GuestAddress};
    let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX);
    let (_, avail, _) = h.drv.tx.ring_addrs();
    // An available index far past the queue size.
    h.drv
        .mem
        .write_obj(1000u16, GuestAddress(avail + 2))
        .unwrap();
    assert!(!h.dev.process_tx(), "an unusable ring ends the pass");
    assert!(h.get(|m| &m.queue_errors) >= 1);
}

#[test]
fn a_restore_may_bring_another_mac_but_nothing_else_may_differ() {
    let (tx, _rx) = std::sync::mpsc::channel();
    let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
    let f = NetFrontend::new([2, 0, 0, 0, 0, 7], tx, wake);
    let mut current = [0u8; 16];
    f.read_config(0, &mut current);
    let mut saved = current;
    saved[..6].copy_from_slice(&[2, 0, 0, 0, 0, 9]);
    assert!(f.config_matches(&saved, &current));
    saved[8] = 1;
    assert!(!f.config_matches(&saved, &current));
    assert!(!f.config_matches(&saved[..15], &current));
}

/// Offloads and mergeable receive buffers.
mod offloads {
    use std::num::Wrapping;

    use super::super::defs;
    use super::super::device::{RxState, rx_needs_interrupt};
    use super::super::header::{
        F_DATA_VALID, F_NEEDS_CSUM, GSO_TCPV4, GSO_TCPV6, test_header as hdr,
    };
    use super::super::test_utils::{Harness, frame};
    use super::super::{QUEUE_SIZE, VNET_HDR_LEN};
    use crate::devices::virtio::mmio::{VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX};

    const HOST: u64 =
        defs::VIRTIO_NET_F_CSUM | defs::VIRTIO_NET_F_HOST_TSO4 | defs::VIRTIO_NET_F_HOST_TSO6;
    const GUEST: u64 = defs::VIRTIO_NET_F_GUEST_CSUM
        | defs::VIRTIO_NET_F_GUEST_TSO4
        | defs::VIRTIO_NET_F_GUEST_TSO6;
    const MRG: u64 = defs::VIRTIO_NET_F_MRG_RXBUF;

    fn num_buffers(packet: &[u8]) -> u16 {
        u16::from_le_bytes([packet[10], packet[11]])
    }

    #[test]
    fn a_tso_packet_reaches_the_backend_with_its_checked_header_only_when_negotiated() {
        let tso = hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        let big = frame(60_000, 1);
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | HOST);
        // num_buffers written by a guest is not handed on.
        let mut with_junk = tso;
        with_junk[10] = 0x77;
        let a = h.drv.send_with_header(with_junk, &big);
        assert_eq!(h.run_tx(), vec![(a, 0)]);
        assert_eq!(h.backend.sent(), vec![big.clone()]);
        assert_eq!(h.backend.sent_headers(), vec![tso]);

        // Without the features the same packet is dropped, counted, and its chain comes back.
        let mut h = Harness::new();
        let a = h.drv.send_with_header(tso, &big);
        let b = h
            .drv
            .send_with_header(hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16), &frame(100, 2));
        let c = h.drv.send(&frame(100, 3));
        assert_eq!(h.run_tx(), vec![(a, 0), (b, 0), (c, 0)]);
        assert_eq!(h.backend.sent(), vec![frame(100, 3)]);
        assert_eq!(h.get(|m| &m.tx_bad_header), 2);
        assert_eq!(h.get(|m| &m.tx_frames), 1);
    }

    #[test]
    fn hostile_transmit_headers_are_dropped_and_counted_and_the_queue_goes_on() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | HOST);
        let f = frame(200, 4);
        let bad = [
            hdr(F_DATA_VALID, 0, 0, 0, 0, 0),
            hdr(F_NEEDS_CSUM, 0, 0, 0, 199, 0),
            hdr(F_NEEDS_CSUM, 3, 54, 1448, 34, 6),
            hdr(F_NEEDS_CSUM, GSO_TCPV4 | 0x80, 54, 1448, 34, 16),
            hdr(F_NEEDS_CSUM, GSO_TCPV6, 54, 0, 34, 16),
            hdr(0, GSO_TCPV4, 54, 1448, 0, 0),
            hdr(F_NEEDS_CSUM, GSO_TCPV4, 201, 1448, 34, 16),
            [0xff; 12],
        ];
        for b in bad {
            h.drv.send_with_header(b, &f);
        }
        h.drv.send(&f);
        assert_eq!(h.run_tx().len(), bad.len() + 1);
        assert_eq!(h.get(|m| &m.tx_bad_header), bad.len() as u64);
        assert_eq!(h.backend.sent(), vec![f]);
        assert!(h.dev.log_lines_passed() <= 10);
    }

    #[test]
    fn a_received_packet_spreads_over_mergeable_buffers_and_appears_at_once() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | GUEST | MRG);
        let f = frame(5000, 5);
        let gso = hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        h.backend.push_with_header(gso, &f);
        let posted: Vec<_> = (0..5).map(|_| h.drv.post_rx(&[1536])).collect();
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        // 5012 bytes: three full buffers and 404 bytes of a fourth; the fifth is left.
        let used = h.drv.rx.take_used();
        let want: Vec<_> = posted[..4]
            .iter()
            .zip([1536, 1536, 1536, 404])
            .map(|((head, _), len)| (*head, len))
            .collect();
        assert_eq!(used, want);
        let mut got = Vec::new();
        for ((_, descs), (_, len)) in posted.iter().zip(&used) {
            got.extend(h.drv.read_rx(descs, *len as usize));
        }
        assert_eq!(num_buffers(&got), 4);
        let mut expect_hdr = gso;
        expect_hdr[10..].copy_from_slice(&4u16.to_le_bytes());
        assert_eq!(got[..VNET_HDR_LEN], expect_hdr);
        assert_eq!(got[VNET_HDR_LEN..], f[..]);
        assert_eq!(h.get(|m| &m.rx_frames), 1);
        assert_eq!(h.dev.rx_pending(), None);
    }

    #[test]
    fn too_few_mergeable_buffers_are_given_back_and_the_packet_waits() {
        let mut h =
            Harness::with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | GUEST | MRG);
        let f = frame(4000, 6);
        h.backend.push(f.clone());
        let first: Vec<_> = (0..2).map(|_| h.drv.post_rx(&[1536])).collect();
        assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
        // Nothing is published, and the device asks for the kick after the two it saw.
        assert!(h.drv.rx.take_used().is_empty());
        assert_eq!(h.drv.rx.avail_event(), 2);
        assert_eq!(h.dev.rx_pending(), Some(VNET_HDR_LEN + 4000));
        let third = h.drv.post_rx(&[1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        let used = h.drv.rx.take_used();
        assert_eq!(
            used,
            vec![(first[0].0, 1536), (first[1].0, 1536), (third.0, 940)]
        );
        let mut got = Vec::new();
        for (descs, len) in [(&first[0].1, 1536), (&first[1].1, 1536), (&third.1, 940)] {
            got.extend(h.drv.read_rx(descs, len));
        }
        assert_eq!(num_buffers(&got), 3);
        assert_eq!(got[VNET_HDR_LEN..], f[..]);
    }

    #[test]
    fn a_packet_larger_than_every_buffer_together_is_dropped_not_waited_for() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | GUEST | MRG);
        h.backend.push(frame(20_000, 7));
        h.backend.push(frame(60, 8));
        // The whole ring, in buffers of 64 bytes: 16 KiB.
        let posted: Vec<_> = (0..QUEUE_SIZE).map(|_| h.drv.post_rx(&[64])).collect();
        // The drop used a whole pass's worth of chains: the next pass finds no buffer.
        assert_eq!(h.dev.process_rx(), RxState::More);
        assert_eq!(h.dev.process_rx(), RxState::WaitingForBuffers);
        let used = h.drv.rx.take_used();
        assert_eq!(used.len(), usize::from(QUEUE_SIZE));
        assert!(used.iter().all(|&(_, len)| len == 0));
        assert_eq!(used[0].0, posted[0].0);
        assert_eq!(h.get(|m| &m.rx_no_room), 1);
        // The next packet waits for buffers the guest gets back.
        assert_eq!(h.dev.rx_pending(), Some(VNET_HDR_LEN + 60));
        let (head, descs) = h.drv.post_rx(&[1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used(), vec![(head, 72)]);
        assert_eq!(h.drv.read_rx(&descs, 72)[VNET_HDR_LEN..], frame(60, 8)[..]);
    }

    #[test]
    fn a_first_mergeable_buffer_too_small_for_the_header_comes_back_unused() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | GUEST | MRG);
        h.backend.push(frame(100, 9));
        let small = h.drv.post_rx(&[8]);
        let good = h.drv.post_rx(&[1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used(), vec![(small.0, 0), (good.0, 112)]);
        assert_eq!(h.get(|m| &m.rx_malformed), 1);
        let got = h.drv.read_rx(&good.1, 112);
        assert_eq!(num_buffers(&got), 1);
        assert_eq!(got[VNET_HDR_LEN..], frame(100, 9)[..]);
    }

    #[test]
    fn a_bad_chain_in_the_middle_of_a_merged_packet_drops_it_and_gives_back_what_it_took() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | GUEST | MRG);
        h.backend.push(frame(2000, 1));
        h.backend.push(frame(100, 2));
        let a = h.drv.post_rx(&[1536]);
        // A head outside the queue: it names no descriptor, and nothing is given back for it.
        h.drv.rx.add_raw(300, &[]);
        let c = h.drv.post_rx(&[1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used(), vec![(a.0, 0), (c.0, 112)]);
        assert_eq!(h.get(|m| &m.rx_malformed), 1);
        assert_eq!(h.get(|m| &m.queue_errors), 1);
        assert_eq!(h.get(|m| &m.rx_frames), 1);
        assert_eq!(h.drv.read_rx(&c.1, 112)[VNET_HDR_LEN..], frame(100, 2)[..]);
    }

    #[test]
    fn received_offloads_the_guest_did_not_take_are_refused_or_cleared() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | MRG);
        h.backend.push_with_header(
            hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16),
            &frame(3000, 1),
        );
        h.backend
            .push_with_header(hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16), &frame(100, 2));
        h.backend
            .push_with_header(hdr(F_DATA_VALID, 0, 0, 0, 0, 0), &frame(100, 3));
        let (head, descs) = h.drv.post_rx(&[1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used(), vec![(head, 112)]);
        let got = h.drv.read_rx(&descs, 112);
        // DATA_VALID cleared: the guest checks the sum itself.
        assert_eq!(got[0], 0);
        assert_eq!(got[VNET_HDR_LEN..], frame(100, 3)[..]);
        assert_eq!(h.get(|m| &m.rx_bad_header), 2);
    }

    #[test]
    fn without_mergeable_buffers_a_packet_needs_one_chain_that_holds_it() {
        let mut h = Harness::with_features(VIRTIO_F_VERSION_1 | GUEST);
        h.backend.push(frame(3000, 1));
        h.backend.push(frame(1000, 2));
        let small = h.drv.post_rx(&[1536]);
        let big = h.drv.post_rx(&[1536, 1536, 1536]);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used(), vec![(small.0, 0), (big.0, 1012)]);
        assert_eq!(h.get(|m| &m.rx_no_room), 1);
        let got = h.drv.read_rx(&big.1, 1012);
        assert_eq!(num_buffers(&got), 1);
    }

    #[test]
    fn the_receive_interrupt_follows_used_event_across_a_merged_packet() {
        let mut h =
            Harness::with_features(VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | GUEST | MRG);
        // The driver wants an interrupt once entry 1 is used: inside the first packet's three.
        h.drv.rx.set_used_event(1);
        for _ in 0..6 {
            h.drv.post_rx(&[1536]);
        }
        h.backend.push(frame(4000, 1));
        let irqs = h.irqs.load(std::sync::atomic::Ordering::SeqCst);
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used().len(), 3);
        assert_eq!(h.irqs.load(std::sync::atomic::Ordering::SeqCst), irqs + 1);
        // It has not moved used_event: the next packet raises none.
        h.backend.push(frame(100, 2));
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.drv.rx.take_used().len(), 1);
        assert_eq!(h.irqs.load(std::sync::atomic::Ordering::SeqCst), irqs + 1);
        // Now it asks for the next one.
        h.drv.rx.set_used_event(4);
        h.backend.push(frame(100, 3));
        assert_eq!(h.dev.process_rx(), RxState::Idle);
        assert_eq!(h.irqs.load(std::sync::atomic::Ordering::SeqCst), irqs + 2);
    }

    #[test]
    fn need_event_is_the_specs_rule_across_the_wrap() {
        let w = Wrapping;
        // Entries old..new = 5..8 are new: used_event 5, 6, 7 ask for one; 8 and 4 do not.
        for (event, want) in [(5, true), (6, true), (7, true), (8, false), (4, false)] {
            assert_eq!(rx_needs_interrupt(w(event), w(8), w(5)), want, "{event}");
        }
        // Across the u16 wrap.
        assert!(rx_needs_interrupt(w(u16::MAX), w(2), w(65534)));
        assert!(rx_needs_interrupt(w(1), w(2), w(65534)));
        assert!(!rx_needs_interrupt(w(2), w(2), w(65534)));
    }
}

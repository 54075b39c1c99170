//! Device and backend tests: a fake guest on mock virtqueues, real Unix sockets on the host.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_NEXT;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;

use super::defs::{self, RXQ, TXQ};
use super::test_utils::{GUEST_CID, Harness, MEM_SIZE, RxPkt};
use super::{VsockBackend, VsockHeader, VsockMetrics};

fn get(c: &std::sync::atomic::AtomicU64) -> u64 {
    VsockMetrics::get(c)
}

fn host_connect(h: &Harness, port: u32) -> UnixStream {
    let mut s = UnixStream::connect(h.uds_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes()).unwrap();
    s
}

fn read_exact_timeout(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    s.read_exact(&mut buf).unwrap();
    buf
}

fn ops(pkts: &[RxPkt]) -> Vec<u16> {
    pkts.iter().map(|p| p.hdr.op).collect()
}

/// Establishes a guest-initiated connection from guest port `gport` to host port `hport`;
/// returns the host side of the stream.
fn guest_connect(h: &mut Harness, listener: &UnixListener, gport: u32, hport: u32) -> UnixStream {
    h.send(Harness::guest_hdr(gport, hport, defs::OP_REQUEST), &[]);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RESPONSE]);
    let r = &pkts[0].hdr;
    assert_eq!((r.src_cid, r.dst_cid), (defs::HOST_CID, GUEST_CID));
    assert_eq!((r.src_port, r.dst_port), (hport, gport));
    assert_eq!(r.buf_alloc, defs::CONN_BUF_ALLOC);
    let (s, _) = listener.accept().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

#[test]
fn host_initiated_connection_relays_both_ways() {
    let mut h = Harness::new();
    let mut host = host_connect(&h, 1234);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_REQUEST]);
    let req = pkts[0].hdr;
    assert_eq!(req.dst_port, 1234);
    assert_eq!(req.dst_cid, GUEST_CID);
    assert!(req.src_port >= defs::FIRST_LOCAL_PORT);
    let local = req.src_port;

    // The guest accepts.
    h.send(Harness::guest_hdr(1234, local, defs::OP_RESPONSE), &[]);
    let line = format!("OK {local}\n");
    assert_eq!(read_exact_timeout(&mut host, line.len()), line.as_bytes());
    assert_eq!(get(&h.metrics.conns_opened), 1);

    // Host to guest.
    host.write_all(b"hello guest").unwrap();
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RW]);
    assert_eq!(pkts[0].data, b"hello guest");
    assert_eq!(pkts[0].hdr.src_port, local);

    // Guest to host.
    h.send_data(1234, local, b"hello host");
    assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");
    assert_eq!(get(&h.metrics.tx_bytes), 10);

    // The guest resets: the host stream closes.
    h.send(Harness::guest_hdr(1234, local, defs::OP_RST), &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(h.dev.backend().connection_count(), 0);
}

#[test]
fn guest_initiated_connection_relays_and_closes_gracefully() {
    let fired = Arc::new(AtomicU32::new(0));
    let calls = Arc::new(AtomicU32::new(0));
    let (f, c) = (fired.clone(), calls.clone());
    let mut h = Harness::with_hook(Some(Box::new(move |port| {
        f.store(port, Ordering::SeqCst);
        c.fetch_add(1, Ordering::SeqCst);
    })));
    let listener = UnixListener::bind(h.port_path(5000)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 777, 5000);
    assert_eq!(fired.load(Ordering::SeqCst), 5000);

    h.send_data(777, 5000, b"ping");
    assert_eq!(read_exact_timeout(&mut host, 4), b"ping");
    host.write_all(b"pong").unwrap();
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RW]);
    assert_eq!(pkts[0].data, b"pong");
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (5000, 777));

    // A second connection does not fire the hook again.
    let _host2 = guest_connect(&mut h, &listener, 778, 5000);
    assert_eq!(calls.load(Ordering::SeqCst), 1);

    // Guest closes: full shutdown. The host sees EOF and the guest gets the closing RST.
    let mut sd = Harness::guest_hdr(777, 5000, defs::OP_SHUTDOWN);
    sd.flags = defs::SHUTDOWN_F_RECV | defs::SHUTDOWN_F_SEND;
    h.send(sd, &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RST]);
    assert_eq!(pkts[0].hdr.dst_port, 777);
    assert_eq!(h.dev.backend().connection_count(), 1);
    assert_eq!(get(&h.metrics.conns_reset), 0);
}

#[test]
fn half_close_in_both_directions() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(5001)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 900, 5001);

    // Guest stops sending: the host reads EOF but can still write.
    let mut sd = Harness::guest_hdr(900, 5001, defs::OP_SHUTDOWN);
    sd.flags = defs::SHUTDOWN_F_SEND;
    h.send(sd, &[]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    host.write_all(b"late reply").unwrap();
    let pkts = h.recv_n(1);
    assert_eq!(pkts[0].data, b"late reply");

    // Host closes: the guest hears SHUTDOWN (send and receive), then everything is torn down
    // when the guest answers with RST.
    // Both sides are done sending, so the device may close right away with RST; a guest RST
    // crossing it is harmless.
    drop(host);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_SHUTDOWN]);
    assert_ne!(pkts[0].hdr.flags & defs::SHUTDOWN_F_SEND, 0);
    h.send(Harness::guest_hdr(900, 5001, defs::OP_RST), &[]);
    assert_eq!(h.dev.backend().connection_count(), 0);
    assert!(ops(&h.recv_n(1)).iter().all(|&op| op == defs::OP_RST));
}

#[test]
fn refused_guest_connection_gets_rst() {
    let mut h = Harness::new();
    h.send(Harness::guest_hdr(40, 6000, defs::OP_REQUEST), &[]);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RST]);
    assert_eq!((pkts[0].hdr.src_port, pkts[0].hdr.dst_port), (6000, 40));
    assert_eq!(get(&h.metrics.conns_refused), 1);
    assert_eq!(h.dev.backend().connection_count(), 0);
    assert!(
        h.irqs.load(Ordering::SeqCst) >= 2,
        "tx and rx completions interrupt"
    );

    // Data for a connection that does not exist is reset too.
    h.send_data(41, 6000, b"x");
    assert_eq!(ops(&h.recv_n(1)), vec![defs::OP_RST]);
}

#[test]
fn credit_violation_resets_the_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(5002)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 901, 5002);

    // The guest may send exactly the credit we advertised...
    let chunk = vec![7u8; defs::MAX_PKT_PAYLOAD as usize];
    for _ in 0..(defs::CONN_BUF_ALLOC / defs::MAX_PKT_PAYLOAD) {
        h.send_data(901, 5002, &chunk);
    }
    assert_eq!(get(&h.metrics.credit_violations), 0);
    // The host is not reading: what its socket does not take is held, within the credit.
    let held = h.dev.backend().held_guest_bytes();
    assert!(held <= defs::CONN_BUF_ALLOC as usize, "held {held}");
    // ...and one byte more is a violation (no credit update was delivered in between).
    h.send_data(901, 5002, b"!");
    assert_eq!(get(&h.metrics.credit_violations), 1);
    assert_eq!(h.dev.backend().connection_count(), 0);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RST]);
    // The host stream is closed once its buffered bytes are read.
    let mut rest = Vec::new();
    host.read_to_end(&mut rest).unwrap();
    assert!(rest.len() <= defs::CONN_BUF_ALLOC as usize);
}

#[test]
fn credit_update_lets_the_guest_keep_sending() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(5003)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 902, 5003);
    let chunk = vec![1u8; defs::MAX_PKT_PAYLOAD as usize];
    let mut received = 0usize;
    let mut fwd = 0u32;
    // Send 4x the credit, honouring the fwd_cnt we hear back; the host drains as we go.
    let mut sent = 0u32;
    while sent < 4 * defs::CONN_BUF_ALLOC {
        if sent + defs::MAX_PKT_PAYLOAD - fwd > defs::CONN_BUF_ALLOC {
            let mut req = Harness::guest_hdr(902, 5003, defs::OP_CREDIT_REQUEST);
            req.fwd_cnt = 0;
            h.send(req, &[]);
            let pkts = h.recv_n(1);
            fwd = pkts.iter().map(|p| p.hdr.fwd_cnt).max().unwrap();
            continue;
        }
        h.send_data(902, 5003, &chunk);
        sent += defs::MAX_PKT_PAYLOAD;
        let mut buf = vec![0u8; defs::MAX_PKT_PAYLOAD as usize];
        host.read_exact(&mut buf).unwrap();
        received += buf.len();
        h.run(); // flush anything that waited for EPOLLOUT
    }
    assert_eq!(received, 4 * defs::CONN_BUF_ALLOC as usize);
    assert_eq!(get(&h.metrics.credit_violations), 0);
}

#[test]
fn guest_that_never_reads_stops_the_host_reads() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(5004)).unwrap();
    // The guest grants only 8 KiB.
    let mut req = Harness::guest_hdr(903, 5004, defs::OP_REQUEST);
    req.buf_alloc = 8 * 1024;
    h.send(req, &[]);
    assert_eq!(ops(&h.recv_n(1)), vec![defs::OP_RESPONSE]);
    let (mut host, _) = listener.accept().unwrap();
    host.set_nonblocking(true).unwrap();

    // The host writes until its socket is full.
    let block = vec![9u8; 64 * 1024];
    let mut written = 0usize;
    let mut rx = 0usize;
    for _ in 0..200 {
        match host.write(&block) {
            Ok(n) => written += n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) => panic!("{e}"),
        }
        h.top_up_rx(4);
        h.run();
        rx += h.recv().iter().map(|p| p.data.len()).sum::<usize>();
    }
    assert_eq!(
        rx,
        8 * 1024,
        "the device must not exceed the guest's credit"
    );
    assert!(
        written < 200 * block.len(),
        "the host writer must eventually block"
    );
    assert_eq!(get(&h.metrics.rx_bytes), 8 * 1024);
    // Host-to-guest bytes are never buffered by the device: they wait in the host's socket.
    assert_eq!(h.dev.backend().held_guest_bytes(), 0);

    // Once the guest reports it consumed the data, 8 KiB more flow.
    let mut upd = Harness::guest_hdr(903, 5004, defs::OP_CREDIT_UPDATE);
    upd.buf_alloc = 8 * 1024;
    upd.fwd_cnt = 8 * 1024;
    h.send(upd, &[]);
    let mut more = 0;
    for _ in 0..20 {
        h.top_up_rx(4);
        h.run();
        more += h.recv().iter().map(|p| p.data.len()).sum::<usize>();
    }
    assert_eq!(more, 8 * 1024);
}

#[test]
fn descriptor_outside_guest_memory_is_dropped() {
    let mut h = Harness::new();
    // Header beyond the end of memory.
    h.add_chain(TXQ, &[(MEM_SIZE + 0x1000, VsockHeader::SIZE as u32, 0)]);
    // Header straddling the end of memory.
    h.add_chain(TXQ, &[(MEM_SIZE - 8, VsockHeader::SIZE as u32, 0)]);
    // Valid header, data descriptor far outside memory.
    let mut hdr = Harness::guest_hdr(1, 5000, defs::OP_RW);
    hdr.len = 100;
    h.mem
        .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(0x20_0000))
        .unwrap();
    use vm_memory::Bytes;
    h.add_chain(
        TXQ,
        &[
            (0x20_0000, VsockHeader::SIZE as u32, 0),
            (u64::MAX - 10, 100, 0),
        ],
    );
    h.run();
    assert_eq!(get(&h.metrics.tx_malformed), 3);
    // Every chain went back to the guest.
    assert_eq!(h.take_used(TXQ).len(), 3);

    // An rx buffer outside memory is returned unused rather than written.
    h.send(Harness::guest_hdr(2, 6001, defs::OP_REQUEST), &[]); // refused: RST pending
    let w = virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    h.add_chain(
        RXQ,
        &[
            (MEM_SIZE, VsockHeader::SIZE as u32, w),
            (0x30_0000, 4096, w),
        ],
    );
    h.run();
    assert_eq!(get(&h.metrics.rx_malformed), 1);
    assert_eq!(h.take_used(RXQ), vec![(0, 0)]);
}

#[test]
fn descriptor_loops_terminate() {
    let mut h = Harness::new();
    let mut hdr = Harness::guest_hdr(1, 5000, defs::OP_RW);
    hdr.len = 1000;
    use vm_memory::Bytes;
    h.mem
        .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(0x20_0000))
        .unwrap();
    let next = VRING_DESC_F_NEXT as u16;
    // Descriptor 10 points at itself.
    h.add_raw(
        TXQ,
        10,
        &[RawDescriptor::from(SplitDescriptor::new(
            0x20_0000, 44, next, 10,
        ))],
    );
    // Descriptors 20 -> 21 -> 20.
    h.add_raw(
        TXQ,
        20,
        &[
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 44, next, 21)),
            RawDescriptor::from(SplitDescriptor::new(0x20_0000, 44, next, 20)),
        ],
    );
    // A `next` index beyond the queue.
    h.add_raw(
        TXQ,
        30,
        &[RawDescriptor::from(SplitDescriptor::new(
            0x20_0000, 44, next, 999,
        ))],
    );
    h.run();
    assert_eq!(get(&h.metrics.tx_malformed), 3);
    assert_eq!(get(&h.metrics.tx_packets), 3);
}

#[test]
fn oversized_lengths_are_rejected() {
    let mut h = Harness::new();
    use vm_memory::Bytes;
    // len above the 64 KiB maximum.
    let mut hdr = Harness::guest_hdr(1, 5000, defs::OP_RW);
    hdr.len = defs::MAX_PKT_PAYLOAD + 1;
    h.mem
        .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(0x20_0000))
        .unwrap();
    h.add_chain(
        TXQ,
        &[
            (0x20_0000, 44, 0),
            (0x30_0000, defs::MAX_PKT_PAYLOAD + 1, 0),
        ],
    );
    // len larger than the data buffer.
    hdr.len = 4096;
    h.mem
        .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(0x20_1000))
        .unwrap();
    h.add_chain(TXQ, &[(0x20_1000, 44, 0), (0x30_0000, 100, 0)]);
    // len = u32::MAX.
    hdr.len = u32::MAX;
    h.mem
        .write_slice(&hdr.to_bytes(), vm_memory::GuestAddress(0x20_2000))
        .unwrap();
    h.add_chain(TXQ, &[(0x20_2000, 44, 0), (0x30_0000, u32::MAX, 0)]);
    // Header descriptor shorter than a header.
    h.add_chain(TXQ, &[(0x20_0000, 20, 0)]);
    h.run();
    assert_eq!(get(&h.metrics.tx_malformed), 4);
    assert_eq!(get(&h.metrics.tx_bytes), 0);
    assert!(h.recv_n(1).is_empty());
}

#[test]
fn unknown_ops_types_and_cids() {
    let mut h = Harness::new();
    // Unknown op, no connection: RST, counted.
    h.send(Harness::guest_hdr(1, 5000, 99), &[]);
    // Seqpacket type: RST, counted.
    let mut sp = Harness::guest_hdr(2, 5000, defs::OP_REQUEST);
    sp.type_ = 2;
    h.send(sp, &[]);
    // Wrong source CID and wrong destination CID: dropped silently.
    let mut bad = Harness::guest_hdr(3, 5000, defs::OP_REQUEST);
    bad.src_cid = 99;
    h.send(bad, &[]);
    bad.src_cid = GUEST_CID;
    bad.dst_cid = 7;
    h.send(bad, &[]);
    let pkts = h.recv_n(2);
    assert_eq!(ops(&pkts), vec![defs::OP_RST, defs::OP_RST]);
    assert_eq!(get(&h.metrics.tx_unsupported), 2);
    assert_eq!(get(&h.metrics.tx_bad_cid), 2);

    // An unknown op on a live connection resets it.
    let listener = UnixListener::bind(h.port_path(5005)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 904, 5005);
    h.send(Harness::guest_hdr(904, 5005, 42), &[]);
    assert_eq!(ops(&h.recv_n(1)), vec![defs::OP_RST]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(get(&h.metrics.conns_reset), 1);
}

#[test]
fn connection_flood_beyond_the_cap_is_reset() {
    let mut h = Harness::new();
    h.dev.backend_mut().set_max_connections(16);
    let listener = UnixListener::bind(h.port_path(7000)).unwrap();
    for port in 0..20 {
        h.send(Harness::guest_hdr(100 + port, 7000, defs::OP_REQUEST), &[]);
    }
    let pkts = h.recv_n(20);
    let responses = pkts
        .iter()
        .filter(|p| p.hdr.op == defs::OP_RESPONSE)
        .count();
    let resets = pkts.iter().filter(|p| p.hdr.op == defs::OP_RST).count();
    assert_eq!((responses, resets), (16, 4));
    assert_eq!(get(&h.metrics.conn_limit_hits), 4);
    assert_eq!(h.dev.backend().connection_count(), 16);
    drop(listener);
}

#[test]
fn request_flood_without_rx_buffers_stays_bounded() {
    let mut h = Harness::new();
    // 1000 refused requests while the guest offers no rx buffer.
    for port in 0..1000 {
        h.send(Harness::guest_hdr(port, 6002, defs::OP_REQUEST), &[]);
    }
    assert_eq!(
        h.dev.backend().pending_reset_count(),
        defs::MAX_PENDING_RESETS
    );
    assert_eq!(
        get(&h.metrics.rst_queue_overflows),
        1000 - defs::MAX_PENDING_RESETS as u64
    );
}

#[test]
fn bad_or_missing_connect_lines_close_the_stream() {
    let mut h = Harness::new();
    let mut bad: Vec<UnixStream> = [
        b"HELLO 5\n".to_vec(),
        b"CONNECT\n".to_vec(),
        b"CONNECT 99999999999\n".to_vec(),
        b"CONNECT -1\n".to_vec(),
        vec![b'A'; 100],
    ]
    .into_iter()
    .map(|line| {
        let mut s = UnixStream::connect(h.uds_path()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        s.write_all(&line).unwrap();
        s
    })
    .collect();
    // Plus one that never sends anything.
    let mut silent = UnixStream::connect(h.uds_path()).unwrap();
    silent
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    h.run();
    h.run();
    for s in &mut bad {
        // Closed: EOF, or a reset when the device closed with our bytes still unread.
        let mut rest = Vec::new();
        match s.read_to_end(&mut rest) {
            Ok(n) => assert_eq!(n, 0),
            Err(e) => assert_eq!(e.kind(), ErrorKind::ConnectionReset),
        }
    }
    assert_eq!(get(&h.metrics.handshake_failures), 5);
    assert_eq!(h.dev.backend().handshake_count(), 1);
    h.dev
        .backend_mut()
        .tick(Instant::now() + defs::HANDSHAKE_TIMEOUT + Duration::from_millis(10));
    let mut rest = Vec::new();
    assert_eq!(silent.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(get(&h.metrics.handshake_failures), 6);
    assert!(h.recv_n(1).is_empty(), "the guest never heard of them");
}

#[test]
fn unanswered_host_connect_times_out_with_rst() {
    let mut h = Harness::new();
    let mut host = host_connect(&h, 1235);
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_REQUEST]);
    h.dev
        .backend_mut()
        .tick(Instant::now() + defs::GUEST_RESPONSE_TIMEOUT + Duration::from_millis(10));
    assert_eq!(ops(&h.recv_n(1)), vec![defs::OP_RST]);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    assert_eq!(get(&h.metrics.conns_refused), 1);
}

#[test]
fn device_reset_drops_every_connection() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(5006)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 905, 5006);
    h.dev.reset();
    assert!(!h.dev.is_active());
    assert_eq!(h.dev.backend().connection_count(), 0);
    let mut rest = Vec::new();
    assert_eq!(host.read_to_end(&mut rest).unwrap(), 0);
    // Without queues the device does nothing.
    assert!(!h.dev.process_tx());
    assert!(!h.dev.process_rx());
}

#[test]
fn many_concurrent_connections_up_to_the_default_cap() {
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(7001)).unwrap();
    let acceptor = std::thread::spawn(move || {
        (0..defs::MAX_CONNECTIONS)
            .map(|_| listener.accept().unwrap().0)
            .collect::<Vec<_>>()
    });
    let n = defs::MAX_CONNECTIONS as u32 + 1;
    let mut pkts = Vec::new();
    for port in 0..n {
        h.send(
            Harness::guest_hdr(10_000 + port, 7001, defs::OP_REQUEST),
            &[],
        );
        h.top_up_rx(32);
        h.run();
        pkts.extend(h.recv());
    }
    for _ in 0..100 {
        if pkts.len() == n as usize {
            break;
        }
        h.top_up_rx(32);
        h.run();
        pkts.extend(h.recv());
    }
    let responses = pkts
        .iter()
        .filter(|p| p.hdr.op == defs::OP_RESPONSE)
        .count();
    assert_eq!(responses, defs::MAX_CONNECTIONS);
    let rst: Vec<&RxPkt> = pkts.iter().filter(|p| p.hdr.op == defs::OP_RST).collect();
    assert_eq!(rst.len(), 1);
    assert_eq!(rst[0].hdr.dst_port, 10_000 + n - 1);
    assert_eq!(get(&h.metrics.conn_limit_hits), 1);

    // Each guest port is relayed to its own host stream (accepted in connect order).
    let mut hosts = acceptor.join().unwrap();
    for i in [0usize, 1, 500, defs::MAX_CONNECTIONS - 1] {
        let msg = format!("conn {i}");
        h.send_data(10_000 + i as u32, 7001, msg.as_bytes());
        hosts[i]
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        assert_eq!(read_exact_timeout(&mut hosts[i], msg.len()), msg.as_bytes());
    }
}

/// Review finding M1: an rx buffer with no room for data (a zero-length data descriptor), offered while a connection has host
/// bytes pending, must not spin the device thread. The buffer goes back to the guest unused
/// and counted; the bytes wait for a real buffer and then arrive whole.
#[test]
fn an_rx_buffer_with_no_data_room_is_returned_and_does_not_spin() {
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    // Before the fix the device looped forever here; a watchdog turns that into a failure.
    let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        if done_rx.recv_timeout(Duration::from_secs(20)).is_err() {
            eprintln!("the device thread spun on an rx buffer with no data room");
            std::process::exit(101);
        }
    });
    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(7100)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 5100, 7100);
    host.write_all(b"pending host bytes").unwrap();
    // Let the muxer see the stream readable, with no rx buffer yet.
    for _ in 0..50 {
        h.run();
        if h.dev.backend().has_pending_rx() {
            break;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    assert!(h.dev.backend().has_pending_rx());
    // An rx buffer whose data descriptor has length zero.
    let w = VRING_DESC_F_WRITE as u16;
    let at = h.drv.alloc(VsockHeader::SIZE as u64);
    let data = h.drv.alloc(64);
    let head = h
        .drv
        .add_chain(RXQ, &[(at, VsockHeader::SIZE as u32, w), (data, 0, w)]);
    h.run();
    let used = h.drv.take_used(RXQ);
    assert_eq!(used, vec![(head, 0)], "returned unused");
    assert_eq!(get(&h.metrics.rx_malformed), 1);
    // The backend asked directly for a packet with no room: it visits the connection once and
    // answers nothing, instead of going round its ready list forever.
    assert!(h.dev.backend_mut().recv_pkt(&mut []).is_none());
    assert!(h.dev.backend().has_pending_rx(), "the bytes still wait");
    // A real buffer then carries the bytes.
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RW]);
    assert_eq!(pkts[0].data, b"pending host bytes");
    done_tx.send(()).unwrap();
}

/// A restore drops every connection (no guest port stays mapped to a host stream), the guest
/// gets exactly one `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue, a packet for an
/// old connection is answered with `OP_RST`, and new connections work.
#[test]
fn a_restored_device_drops_its_connections_and_resets_the_transport() {
    use crate::devices::virtio::state::QueueSnapshot;
    use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
    use virtio_queue::QueueT;
    use vm_memory::{Bytes, GuestAddress};

    let mut h = Harness::new();
    let listener = UnixListener::bind(h.port_path(6000)).unwrap();
    let mut host = guest_connect(&mut h, &listener, 1000, 6000);
    assert_eq!(h.dev.backend().connection_count(), 1);

    // The queues as a restore builds them: from their saved state, positions included.
    let mem = h.drv.mem.clone();
    let queues: Vec<_> = (0..defs::NUM_QUEUES)
        .map(|i| {
            let saved = QueueSnapshot::of(&h.dev.queues().unwrap()[i]);
            saved.to_queue(i, &mem).unwrap()
        })
        .collect();
    assert_eq!(h.dev.queues().unwrap()[TXQ].next_avail(), 1);
    assert_eq!(queues[TXQ].next_avail(), 1);
    h.dev.activate_restored(mem.clone(), queues).unwrap();
    assert_eq!(h.dev.backend().connection_count(), 0);
    assert!(h.dev.reset_event_pending());
    let mut byte = [0u8; 1];
    assert_eq!(
        host.read(&mut byte).unwrap(),
        0,
        "the host stream is closed"
    );

    // No event buffer yet: the event waits.
    assert!(!h.dev.process_event_queue());
    assert!(h.dev.reset_event_pending());
    // A buffer too small for an event goes back unused; the next one gets it.
    let small = h.drv.alloc(2);
    let small_head = h
        .drv
        .add_chain(defs::EVQ, &[(small, 2, VRING_DESC_F_WRITE as u16)]);
    let ev = h.drv.alloc(8);
    mem.write_obj(0xffff_ffffu32, GuestAddress(ev)).unwrap();
    let head = h
        .drv
        .add_chain(defs::EVQ, &[(ev, 8, VRING_DESC_F_WRITE as u16)]);
    let irqs = h.irqs.load(Ordering::SeqCst);
    assert!(h.dev.process_event_queue());
    assert_eq!(h.drv.take_used(defs::EVQ), vec![(small_head, 0), (head, 4)]);
    let event: u32 = mem.read_obj(GuestAddress(ev)).unwrap();
    assert_eq!(event, defs::EVENT_TRANSPORT_RESET);
    assert!(!h.dev.reset_event_pending());
    assert!(h.irqs.load(Ordering::SeqCst) > irqs);
    // Exactly once.
    let ev2 = h.drv.alloc(8);
    h.drv
        .add_chain(defs::EVQ, &[(ev2, 8, VRING_DESC_F_WRITE as u16)]);
    assert!(!h.dev.process_event_queue());
    assert!(h.drv.take_used(defs::EVQ).is_empty());

    // Data on the old connection finds no mapping: the guest gets a reset.
    h.send_data(1000, 6000, b"stale");
    let pkts = h.recv_n(1);
    assert_eq!(ops(&pkts), vec![defs::OP_RST]);
    assert_eq!((pkts[0].hdr.dst_port, pkts[0].hdr.src_port), (1000, 6000));
    // And the guest connects again.
    let _host = guest_connect(&mut h, &listener, 1001, 6000);
    assert_eq!(h.dev.backend().connection_count(), 1);
}

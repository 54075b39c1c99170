//! Device tests: a fake guest on a mock virtqueue, an in-memory disk or a real file.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use virtio_queue::desc::RawDescriptor;
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use vm_memory::{Bytes, GuestAddress};

use super::defs::{self, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP};
use super::test_utils::{Harness, MEM_SIZE, MemDisk, NEXT, Posted, QSIZE, TEST_ID, W, info};
use super::{BlockFrontend, BlockMetrics, DiskFile, DiskInfo};
use crate::devices::virtio::RateLimitedLog;
use crate::devices::virtio::mmio::{VIRTIO_F_VERSION_1, VirtioDevice};

const SECTORS: u64 = 64;

fn mem_harness(read_only: bool) -> (Harness<MemDisk>, MemDisk) {
    let disk = MemDisk::new(SECTORS);
    (Harness::new(disk.clone(), info(SECTORS, read_only)), disk)
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

/// Sends `p` and checks that it failed with `status` and touched nothing but the status byte.
fn expect_status(h: &mut Harness<MemDisk>, p: &Posted, status: u8) {
    let (got, used) = h.submit(p);
    assert_eq!(got, status, "status of {p:?}");
    assert_eq!(used, 1, "used length of {p:?}");
}

#[test]
fn spec_numbers_match_virtio_bindings() {
    use virtio_bindings::virtio_blk as b;
    assert_eq!(defs::VIRTIO_BLK_F_SIZE_MAX, 1 << b::VIRTIO_BLK_F_SIZE_MAX);
    assert_eq!(defs::VIRTIO_BLK_F_SEG_MAX, 1 << b::VIRTIO_BLK_F_SEG_MAX);
    assert_eq!(defs::VIRTIO_BLK_F_RO, 1 << b::VIRTIO_BLK_F_RO);
    assert_eq!(defs::VIRTIO_BLK_F_FLUSH, 1 << b::VIRTIO_BLK_F_FLUSH);
    assert_eq!(defs::VIRTIO_BLK_T_IN, b::VIRTIO_BLK_T_IN);
    assert_eq!(defs::VIRTIO_BLK_T_OUT, b::VIRTIO_BLK_T_OUT);
    assert_eq!(defs::VIRTIO_BLK_T_FLUSH, b::VIRTIO_BLK_T_FLUSH);
    assert_eq!(defs::VIRTIO_BLK_T_GET_ID, b::VIRTIO_BLK_T_GET_ID);
    assert_eq!(defs::VIRTIO_BLK_T_DISCARD, b::VIRTIO_BLK_T_DISCARD);
    assert_eq!(
        defs::VIRTIO_BLK_T_WRITE_ZEROES,
        b::VIRTIO_BLK_T_WRITE_ZEROES
    );
    assert_eq!(u32::from(defs::VIRTIO_BLK_S_OK), b::VIRTIO_BLK_S_OK);
    assert_eq!(u32::from(defs::VIRTIO_BLK_S_IOERR), b::VIRTIO_BLK_S_IOERR);
    assert_eq!(u32::from(defs::VIRTIO_BLK_S_UNSUPP), b::VIRTIO_BLK_S_UNSUPP);
    assert_eq!(defs::ID_BYTES as u32, b::VIRTIO_BLK_ID_BYTES);
    // A request of SEG_MAX segments fits the queue without indirect descriptors.
    assert!(defs::MAX_CHAIN_DESCRIPTORS <= usize::from(defs::QUEUE_SIZE));
}

fn frontend(info: &DiskInfo) -> BlockFrontend {
    let (tx, _rx) = std::sync::mpsc::channel();
    let wake = Arc::new(vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap());
    BlockFrontend::new(info, tx, wake)
}

fn config_bytes(f: &BlockFrontend, offset: u64, len: usize) -> Vec<u8> {
    let mut b = vec![0xaa; len];
    f.read_config(offset, &mut b);
    b
}

#[test]
fn config_space_and_features_describe_the_disk() {
    let rw = frontend(&info(0x1_2345_6789, false));
    assert_eq!(rw.device_type(), 2);
    assert_eq!(rw.queue_max_sizes(), &[256]);
    let f = rw.device_features();
    assert_ne!(f & VIRTIO_F_VERSION_1, 0);
    assert_ne!(f & defs::VIRTIO_BLK_F_FLUSH, 0);
    assert_ne!(f & defs::VIRTIO_BLK_F_SEG_MAX, 0);
    assert_ne!(f & defs::VIRTIO_BLK_F_SIZE_MAX, 0);
    assert_eq!(f & defs::VIRTIO_BLK_F_RO, 0);
    // Nothing else is offered: no discard (13), write-zeroes (14), indirect (28), event idx (29).
    let known = VIRTIO_F_VERSION_1
        | defs::VIRTIO_BLK_F_FLUSH
        | defs::VIRTIO_BLK_F_SEG_MAX
        | defs::VIRTIO_BLK_F_SIZE_MAX;
    assert_eq!(f & !known, 0);

    // capacity (le64), size_max (le32), seg_max (le32), then zeros.
    let cfg = config_bytes(&rw, 0, 24);
    assert_eq!(
        u64::from_le_bytes(cfg[0..8].try_into().unwrap()),
        0x1_2345_6789
    );
    assert_eq!(
        u32::from_le_bytes(cfg[8..12].try_into().unwrap()),
        64 * 1024
    );
    assert_eq!(u32::from_le_bytes(cfg[12..16].try_into().unwrap()), 128);
    assert_eq!(&cfg[16..], &[0; 8]);
    // Drivers read the capacity as two 32-bit halves.
    assert_eq!(config_bytes(&rw, 4, 4), vec![1, 0, 0, 0]);
    assert_eq!(config_bytes(&rw, u64::MAX, 2), vec![0, 0]);

    let ro = frontend(&info(8, true));
    assert_ne!(ro.device_features() & defs::VIRTIO_BLK_F_RO, 0);
    assert_eq!(config_bytes(&ro, 0, 8), 8u64.to_le_bytes());
}

#[test]
fn read_and_write_round_trip_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scratch.img");
    std::fs::write(&path, vec![0u8; 64 * 512]).unwrap();
    let disk = DiskFile::open(&path, false).unwrap();
    let mut h = Harness::new(disk, info(64, false));

    // Two sectors at sector 3, in descriptors that are not whole sectors each.
    let data = pattern(1024, 7);
    let p = h.drv.post_write(3, &data, 700);
    assert_eq!(p.data.len(), 2);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 1));
    let file = std::fs::read(&path).unwrap();
    assert_eq!(&file[3 * 512..5 * 512], &data[..]);
    assert!(file[..3 * 512].iter().all(|&b| b == 0));
    assert!(file[5 * 512..].iter().all(|&b| b == 0));

    // Read them back, one sector before and after included.
    let p = h
        .drv
        .post(defs::VIRTIO_BLK_T_IN, 2, &[(512, true), (1536, true)]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 2048 + 1));
    let back = h.drv.data(&p);
    assert_eq!(&back[512..1536], &data[..]);
    assert!(back[..512].iter().all(|&b| b == 0));

    assert_eq!(h.get(|m| &m.writes), 1);
    assert_eq!(h.get(|m| &m.write_bytes), 1024);
    assert_eq!(h.get(|m| &m.reads), 1);
    assert_eq!(h.get(|m| &m.read_bytes), 2048);
    assert_eq!(h.get(|m| &m.requests), 2);
    assert!(h.irqs.load(Ordering::SeqCst) >= 2);
}

#[test]
fn requests_larger_than_the_bounce_buffer_are_done_in_chunks() {
    let sectors = 4096; // 2 MiB
    let disk = MemDisk::new(sectors);
    let mut h = Harness::new(disk.clone(), info(sectors, false));
    let len = 5 * defs::BOUNCE_BUFFER_LEN + 3 * 512;
    let data = pattern(len, 1);
    let p = h.drv.post_write(8, &data, 64 * 1024);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(&disk.contents()[8 * 512..8 * 512 + len], &data[..]);
    assert!(disk.state().writes.load(Ordering::SeqCst) > 5);

    let p = h.drv.post_read(8, len as u32);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, len as u32 + 1));
    assert_eq!(h.drv.data(&p), data);
}

#[test]
fn a_write_to_a_read_only_disk_fails_and_leaves_the_file_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("image.ext4");
    let before = pattern(16 * 512, 3);
    std::fs::write(&path, &before).unwrap();
    let disk = DiskFile::open(&path, true).unwrap();
    let mut h = Harness::new(disk, info(16, true));

    let p = h.drv.post_write(0, &[0xee; 512], 512);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_IOERR, 1));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(h.get(|m| &m.read_only_writes), 1);
    assert_eq!(h.get(|m| &m.writes), 0);

    // Reads still work, and a flush is simply OK.
    let p = h.drv.post_read(1, 512);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 513));
    assert_eq!(h.drv.data(&p), before[512..1024]);
    let p = h.drv.post(defs::VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 1));

    // The backend is never asked to write, whatever the request looks like.
    let (mut h, disk) = mem_harness(true);
    for sector in [0, SECTORS - 1, SECTORS, u64::MAX] {
        let p = h.drv.post_write(sector, &[1; 512], 512);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 0);
}

#[test]
fn out_of_range_sectors_are_refused() {
    let (mut h, disk) = mem_harness(false);
    // The last sector is fine.
    let p = h.drv.post_read(SECTORS - 1, 512);
    assert_eq!(h.submit(&p).0, VIRTIO_BLK_S_OK);
    // One past it, or running over the end, is not.
    for (sector, len) in [(SECTORS, 512), (SECTORS - 1, 1024), (SECTORS * 2, 512)] {
        let p = h.drv.post_read(sector, len);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
        assert!(h.drv.data(&p).iter().all(|&b| b == 0));
        let p = h.drv.post_write(sector, &vec![9; len as usize], 512);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(h.get(|m| &m.out_of_range), 6);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
    // A zero-length read at the end is in range; past the end it is not.
    let p = h.drv.post(defs::VIRTIO_BLK_T_IN, SECTORS, &[]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 1));
    let p = h.drv.post(defs::VIRTIO_BLK_T_IN, SECTORS + 1, &[]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
}

#[test]
fn sector_arithmetic_that_overflows_is_refused() {
    let (mut h, disk) = mem_harness(false);
    let max_fitting = u64::MAX >> defs::SECTOR_SHIFT; // sector * 512 fits, + 1024 does not
    for sector in [u64::MAX, (u64::MAX >> defs::SECTOR_SHIFT) + 1, max_fitting] {
        let p = h.drv.post_read(sector, 1024);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
        let p = h.drv.post_write(sector, &[0; 1024], 1024);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(h.get(|m| &m.out_of_range), 6);
    assert_eq!(disk.state().reads.load(Ordering::SeqCst), 0);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
}

#[test]
fn huge_lengths_are_refused_without_touching_the_disk() {
    let (mut h, disk) = mem_harness(false);
    // Three overlapping 4 MiB buffers: all in guest memory, 12 MiB in all, over the 8 MiB cap.
    let buf = 0x10_0000;
    let four_mib = 4 << 20;
    for (request_type, flags) in [(defs::VIRTIO_BLK_T_IN, W), (defs::VIRTIO_BLK_T_OUT, 0)] {
        let hdr = h.drv.header(request_type, 0);
        let status = h.drv.status_byte();
        let head = h.drv.add_chain(&[
            (hdr, 16, 0),
            (buf, four_mib, flags),
            (buf, four_mib, flags),
            (buf, four_mib, flags),
            (status, 1, W),
        ]);
        let p = Posted {
            head,
            data: vec![],
            status,
        };
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    }
    // A buffer running past the end of guest memory.
    let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
    let status = h.drv.status_byte();
    let head = h
        .drv
        .add_chain(&[(hdr, 16, 0), (MEM_SIZE - 512, 1024, W), (status, 1, W)]);
    let p = Posted {
        head,
        data: vec![],
        status,
    };
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.get(|m| &m.malformed), 3);
    // A chain of 4 GiB or more in total: virtio-queue stops yielding descriptors at the one
    // that crosses 4 GiB, so the chain is cut short and dropped.
    let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
    let status = h.drv.status_byte();
    let head = h
        .drv
        .add_chain(&[(hdr, 16, 0), (buf, u32::MAX, W), (status, 1, W)]);
    assert_eq!(h.run(), vec![(head, 0)]);
    assert_eq!(h.drv.read_status(status), 0xff);
    assert_eq!(h.get(|m| &m.dropped_chains), 1);
    assert_eq!(disk.state().reads.load(Ordering::SeqCst), 0);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
    // 8 MiB exactly is accepted: the cap is inclusive.
    let sectors = (8 << 20) / 512;
    let mut h = Harness::new(MemDisk::new(sectors), info(sectors, false));
    let p = h.drv.post_read(0, 8 << 20);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, (8 << 20) + 1));
}

#[test]
fn data_lengths_that_are_not_whole_sectors_are_refused() {
    let (mut h, disk) = mem_harness(false);
    for len in [1, 511, 513, 1000] {
        let p = h.drv.post_read(0, len);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
        let p = h.drv.post_write(0, &vec![5; len as usize], 4096);
        expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    }
    assert_eq!(h.get(|m| &m.malformed), 8);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
}

#[test]
fn data_of_the_wrong_direction_is_refused() {
    let (mut h, disk) = mem_harness(false);
    let p = h.drv.post(defs::VIRTIO_BLK_T_IN, 0, &[(512, false)]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    let p = h.drv.post(defs::VIRTIO_BLK_T_OUT, 0, &[(512, true)]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    let p = h
        .drv
        .post(defs::VIRTIO_BLK_T_OUT, 0, &[(512, false), (512, true)]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    let p = h.drv.post(defs::VIRTIO_BLK_T_GET_ID, 0, &[(20, false)]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.get(|m| &m.malformed), 4);
    assert_eq!(disk.state().reads.load(Ordering::SeqCst), 0);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
}

#[test]
fn flush_syncs_a_writable_disk() {
    let (mut h, disk) = mem_harness(false);
    let p = h.drv.post(defs::VIRTIO_BLK_T_FLUSH, 0, &[]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 1));
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 1);
    assert_eq!(h.get(|m| &m.flushes), 1);
    // The driver acked FLUSH, so writes alone do not sync.
    let p = h.drv.post_write(0, &[1; 512], 512);
    assert_eq!(h.submit(&p).0, VIRTIO_BLK_S_OK);
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 1);
    // A flush with data is malformed.
    let p = h.drv.post(defs::VIRTIO_BLK_T_FLUSH, 0, &[(512, true)]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 1);
    // A failing fdatasync is an I/O error.
    *disk.state().fail_sync.lock().unwrap() = Some(libc::EIO);
    let p = h.drv.post(defs::VIRTIO_BLK_T_FLUSH, 0, &[]);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.get(|m| &m.io_errors), 1);
}

#[test]
fn without_the_flush_feature_every_write_is_synced() {
    let disk = MemDisk::new(SECTORS);
    let mut h = Harness::with(
        disk.clone(),
        info(SECTORS, false),
        QSIZE,
        VIRTIO_F_VERSION_1,
    );
    for sector in 0..3 {
        let p = h.drv.post_write(sector, &[2; 512], 512);
        assert_eq!(h.submit(&p).0, VIRTIO_BLK_S_OK);
    }
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 3);
    let p = h.drv.post_read(0, 512);
    assert_eq!(h.submit(&p).0, VIRTIO_BLK_S_OK);
    assert_eq!(disk.state().syncs.load(Ordering::SeqCst), 3);
}

#[test]
fn get_id_returns_the_id_zero_padded_to_the_buffer() {
    let (mut h, _) = mem_harness(false);
    let p = h.drv.post(defs::VIRTIO_BLK_T_GET_ID, 0, &[(20, true)]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 21));
    let mut want = TEST_ID.to_vec();
    want.resize(20, 0);
    assert_eq!(h.drv.data(&p), want);
    // A short buffer gets what fits; a long one gets 20 bytes, and the rest is left alone.
    let p = h.drv.post(defs::VIRTIO_BLK_T_GET_ID, 0, &[(4, true)]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 5));
    assert_eq!(h.drv.data(&p), &TEST_ID[..4]);
    let p = h
        .drv
        .post(defs::VIRTIO_BLK_T_GET_ID, 0, &[(3, true), (64, true)]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(&h.drv.data(&p)[..20], &want[..]);
    assert_eq!(h.get(|m| &m.get_ids), 3);

    // A 20-byte id fills the buffer with no terminator.
    let id = b"abcdefghijklmnopqrst".to_vec();
    let mut h = Harness::new(
        MemDisk::new(1),
        DiskInfo {
            sectors: 1,
            read_only: true,
            id: id.clone(),
        },
    );
    let p = h.drv.post(defs::VIRTIO_BLK_T_GET_ID, 0, &[(20, true)]);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 21));
    assert_eq!(h.drv.data(&p), id);
}

#[test]
fn discard_write_zeroes_and_unknown_types_are_unsupported() {
    let (mut h, disk) = mem_harness(false);
    for t in [
        defs::VIRTIO_BLK_T_DISCARD,
        defs::VIRTIO_BLK_T_WRITE_ZEROES,
        2,
        99,
        u32::MAX,
    ] {
        // Discard and write-zeroes carry a device-readable range descriptor.
        let p = h.drv.post(t, 0, &[(16, false)]);
        expect_status(&mut h, &p, VIRTIO_BLK_S_UNSUPP);
    }
    assert_eq!(h.get(|m| &m.unsupported), 5);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
}

/// Posts `descs` (addr, len, flags) and expects the chain to be dropped: used length 0 and
/// the given status byte untouched.
fn expect_dropped(h: &mut Harness<MemDisk>, descs: &[(u64, u32, u16)], status: u64) {
    let head = h.drv.add_chain(descs);
    let used = h.run();
    assert_eq!(used, vec![(head, 0)], "{descs:?}");
    assert_eq!(h.drv.read_status(status), 0xff);
}

#[test]
fn a_chain_without_a_usable_status_byte_is_dropped_and_the_queue_keeps_working() {
    let (mut h, _) = mem_harness(false);
    let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
    let data = h.drv.alloc(512);
    let st = h.drv.status_byte();
    // The status descriptor is device-readable.
    expect_dropped(&mut h, &[(hdr, 16, 0), (data, 512, W), (st, 1, 0)], st);
    // It is empty.
    expect_dropped(&mut h, &[(hdr, 16, 0), (data, 512, W), (st, 0, W)], st);
    // It is outside guest memory.
    expect_dropped(
        &mut h,
        &[(hdr, 16, 0), (data, 512, W), (MEM_SIZE, 1, W)],
        st,
    );
    // There is only a header.
    expect_dropped(&mut h, &[(hdr, 16, 0)], st);
    assert_eq!(h.get(|m| &m.dropped_chains), 4);
    assert_eq!(h.get(|m| &m.reads), 0);

    // A lone writable descriptor is a status byte with no header: IOERR.
    let head = h.drv.add_chain(&[(st, 1, W)]);
    assert_eq!(h.run(), vec![(head, 1)]);
    assert_eq!(h.drv.read_status(st), VIRTIO_BLK_S_IOERR);

    // The next good request is served.
    let p = h.drv.post_read(0, 512);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 513));
}

#[test]
fn a_bad_header_is_refused() {
    let (mut h, disk) = mem_harness(false);
    let st = h.drv.status_byte();
    let data = h.drv.alloc(512);
    let hdr = h.drv.header(defs::VIRTIO_BLK_T_OUT, 0);
    // In a device-writable descriptor; shorter or longer than 16 bytes; outside memory.
    for header in [
        (hdr, 16, W),
        (hdr, 8, 0),
        (hdr, 32, 0),
        (MEM_SIZE - 8, 16, 0),
    ] {
        h.drv.mem.write_obj(0xffu8, GuestAddress(st)).unwrap();
        let head = h.drv.add_chain(&[header, (data, 512, 0), (st, 1, W)]);
        assert_eq!(h.run(), vec![(head, 1)], "{header:?}");
        assert_eq!(h.drv.read_status(st), VIRTIO_BLK_S_IOERR, "{header:?}");
    }
    assert_eq!(h.get(|m| &m.malformed), 4);
    assert_eq!(disk.state().writes.load(Ordering::SeqCst), 0);
}

#[test]
fn a_descriptor_loop_is_dropped_and_the_queue_keeps_working() {
    // A queue smaller than the device's own chain cap: virtio-queue's bound (a chain never
    // yields more descriptors than the queue size) cuts the loop.
    let disk = MemDisk::new(SECTORS);
    let acked = VIRTIO_F_VERSION_1 | defs::VIRTIO_BLK_F_FLUSH;
    let mut h = Harness::with(disk, info(SECTORS, false), 16, acked);
    let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
    let data = h.drv.alloc(512);
    let looped = [
        RawDescriptor::from(SplitDescriptor::new(hdr, 16, NEXT, 1)),
        RawDescriptor::from(SplitDescriptor::new(data, 512, W | NEXT, 0)),
    ];
    h.drv.add_raw(0, &looped);
    assert_eq!(h.run(), vec![(0, 0)]);
    assert_eq!(h.get(|m| &m.dropped_chains), 1);
    // A next index outside the table ends the chain the same way.
    let bad_next = [RawDescriptor::from(SplitDescriptor::new(hdr, 16, NEXT, 16))];
    h.drv.add_raw(2, &bad_next);
    assert_eq!(h.run(), vec![(2, 0)]);
    assert_eq!(h.get(|m| &m.dropped_chains), 2);

    // A full-size queue: the device's cap cuts a loop first.
    let (mut h, _) = mem_harness(false);
    h.drv.add_raw(0, &looped);
    assert_eq!(h.run(), vec![(0, 0)]);
    assert_eq!(h.get(|m| &m.dropped_chains), 1);

    // Either way the queue goes on.
    let p = h.drv.post_read(0, 512);
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_OK, 513));
}

#[test]
fn chains_longer_than_seg_max_plus_two_are_dropped() {
    let sectors = u64::from(defs::SEG_MAX) + 1;
    let mut h = Harness::new(MemDisk::new(sectors), info(sectors, false));
    let seg = |h: &mut Harness<MemDisk>, n: usize| {
        let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
        let st = h.drv.status_byte();
        let buf = h.drv.alloc(512);
        let mut descs = vec![(hdr, 16, 0)];
        descs.extend(std::iter::repeat_n((buf, 512, W), n));
        descs.push((st, 1, W));
        (h.drv.add_chain(&descs), st)
    };
    // SEG_MAX data descriptors: served.
    let (head, st) = seg(&mut h, defs::SEG_MAX as usize);
    assert_eq!(h.run(), vec![(head, defs::SEG_MAX * 512 + 1)]);
    assert_eq!(h.drv.read_status(st), VIRTIO_BLK_S_OK);
    // One more: dropped.
    let (head, st) = seg(&mut h, defs::SEG_MAX as usize + 1);
    assert_eq!(h.run(), vec![(head, 0)]);
    assert_eq!(h.drv.read_status(st), 0xff);
    assert_eq!(h.get(|m| &m.dropped_chains), 1);
}

#[test]
fn host_io_errors_answer_ioerr() {
    let (mut h, disk) = mem_harness(false);
    *disk.state().fail_writes.lock().unwrap() = Some(libc::ENOSPC);
    let p = h.drv.post_write(0, &[3; 1024], 512);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    *disk.state().fail_reads.lock().unwrap() = Some(libc::EIO);
    let p = h.drv.post_read(0, 512);
    expect_status(&mut h, &p, VIRTIO_BLK_S_IOERR);
    assert_eq!(h.get(|m| &m.io_errors), 2);
    assert_eq!((h.get(|m| &m.reads), h.get(|m| &m.writes)), (0, 0));

    // The host file shrank under the device: reading past its new end fails, no hang.
    *disk.state().fail_reads.lock().unwrap() = None;
    disk.state().data.lock().unwrap().truncate(512);
    let p = h
        .drv
        .post(defs::VIRTIO_BLK_T_IN, 0, &[(512, true), (512, true)]);
    // The first sector was delivered before the failure, and is counted in the used length.
    assert_eq!(h.submit(&p), (VIRTIO_BLK_S_IOERR, 513));
    assert_eq!(h.get(|m| &m.io_errors), 3);
}

#[test]
fn a_bogus_available_index_is_counted_and_the_pass_ends() {
    let (mut h, _) = mem_harness(false);
    h.drv.set_avail_idx(QSIZE + 1);
    assert!(!h.dev.process_queue());
    assert_eq!(h.drv.take_used(), vec![]);
    assert_eq!(h.get(|m| &m.queue_errors), 1);
}

#[test]
fn a_head_index_outside_the_queue_is_skipped_and_the_next_chain_served() {
    let (mut h, _) = mem_harness(false);
    h.drv.add_raw(QSIZE + 3, &[]);
    let p = h.drv.post_read(0, 512);
    assert_eq!(h.run(), vec![(p.head, 513)]);
    assert_eq!(h.get(|m| &m.requests), 2);
    assert_eq!(h.get(|m| &m.queue_errors), 1);
    assert_eq!(h.get(|m| &m.dropped_chains), 1);
}

#[test]
fn one_pass_serves_a_bounded_number_of_chains() {
    let (mut h, _) = mem_harness(false);
    for _ in 0..defs::MAX_CHAINS_PER_PASS {
        h.drv.post(defs::VIRTIO_BLK_T_FLUSH, 0, &[]);
    }
    assert!(h.dev.process_queue(), "a full pass asks to be called again");
    assert_eq!(h.drv.take_used().len(), defs::MAX_CHAINS_PER_PASS);
    assert!(!h.dev.process_queue());
    assert_eq!(h.get(|m| &m.flushes), defs::MAX_CHAINS_PER_PASS as u64);
}

#[test]
fn an_inactive_or_reset_device_does_nothing() {
    let (mut h, _) = mem_harness(false);
    h.drv.post_read(0, 512);
    h.dev.reset();
    assert!(!h.dev.is_active());
    assert!(!h.dev.process_queue());
    assert_eq!(h.drv.take_used(), vec![]);
    assert_eq!(h.get(|m| &m.requests), 0);
}

/// Counts the events at WARN or above that reach the subscriber.
#[derive(Clone, Default)]
struct CountWarnings(Arc<Mutex<u64>>);

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for CountWarnings {
    fn on_event(
        &self,
        event: &tracing::Event<'_>,
        _ctx: tracing_subscriber::layer::Context<'_, S>,
    ) {
        if *event.metadata().level() <= tracing::Level::WARN {
            *self.0.lock().unwrap() += 1;
        }
    }
}

/// How many of `n` occurrences a [`RateLimitedLog`] lets through.
fn passed_by_limiter(n: u64) -> u64 {
    let l = RateLimitedLog::new();
    (0..n).filter(|_| l.allow()).count() as u64
}

#[test]
fn a_flood_of_bad_requests_logs_a_bounded_number_of_lines() {
    use tracing_subscriber::layer::SubscriberExt;
    let count = CountWarnings::default();
    let subscriber = tracing_subscriber::registry().with(count.clone());
    let (mut h, _) = mem_harness(false);
    // Each round fills the queue: 64 pairs of two-descriptor chains.
    let rounds = 80;
    let per_round = 64;
    tracing::subscriber::with_default(subscriber, || {
        for _ in 0..rounds {
            for _ in 0..per_round {
                // A header in a device-writable descriptor, and a chain with no status.
                let hdr = h.drv.header(defs::VIRTIO_BLK_T_IN, 0);
                let st = h.drv.status_byte();
                h.drv.add_chain(&[(hdr, 16, W), (st, 1, W)]);
                h.drv.add_chain(&[(hdr, 16, 0), (st, 1, 0)]);
            }
            assert_eq!(h.run().len(), 2 * per_round);
        }
    });
    let n = (rounds * per_round) as u64;
    assert_eq!(h.get(|m| &m.malformed), n);
    assert_eq!(h.get(|m| &m.dropped_chains), n);
    // Two limited kinds of line, each passing 10, then one in 1000 of 5120: 15 each.
    assert_eq!(h.dev.log_lines_passed(), 2 * passed_by_limiter(n));
    assert_eq!(h.dev.log_lines_passed(), 30);
    // What reached the subscriber is within that bound. (Not equal to it: a test on another
    // thread can be first to register one of these callsites, in a race with this test's
    // scoped subscriber that leaves the callsite disabled for it.)
    let lines = *count.0.lock().unwrap();
    assert!(lines <= 30, "{lines} lines logged");
    assert_eq!(BlockMetrics::get(&h.metrics.requests), 2 * n);
}

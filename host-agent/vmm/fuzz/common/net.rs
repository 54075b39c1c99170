//! What the network device's fuzz targets share: guest memory with a receive and a transmit
//! queue, a backend in memory, and an interrupt line that does nothing.

use nanoclaw_vmm::memory::GuestRam;
use std::collections::VecDeque;

use nanoclaw_vmm::devices::virtio::mmio::Interrupt;
use nanoclaw_vmm::devices::virtio::net::header::{F_NEEDS_CSUM, GSO_NONE, GSO_TCPV4, GSO_TCPV6};
use nanoclaw_vmm::devices::virtio::net::{MAX_FRAME_LEN, MIN_FRAME_LEN, NetBackend, VNET_HDR_LEN};
use virtio_queue::Queue;
use virtio_queue::QueueT;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

/// Guest memory: the two queues' rings, then the data area.
pub const MEM_SIZE: usize = 0x4_0000;
/// The queue size.
pub const QSIZE: u16 = 16;
/// Each queue's base: receive, transmit.
const QUEUE_BASE: [u64; 2] = [0x0, 0x1000];
/// The used ring's offset from its queue's base, clear of the mock's available ring (whose used
/// ring overlaps it; see the block target).
const USED_OFFSET: u64 = 0x800;
/// Where the hostile descriptors mostly point.
pub const DATA_BASE: u64 = 0x1_0000;
/// Length of the data area: twice the largest frame, so chains reach past it.
pub const DATA_LEN: u64 = 0x2_0000;

/// Counts nothing: the targets check the rings, not the interrupts.
pub struct NoIrq;

impl Interrupt for NoIrq {
    fn trigger(&self, _kind: u32) {}
}

/// A backend in memory: packets (header and frame) for the guest, and the lengths of the frames
/// it sent (each checked against the device's bounds, and its header against what the device
/// lets through, as it arrives).
#[derive(Default)]
pub struct MemBackend {
    pub incoming: VecDeque<Vec<u8>>,
    pub sent: Vec<usize>,
    pub recv_calls: u64,
    pub fail_sends: bool,
}

impl NetBackend for MemBackend {
    fn recv_packet(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.recv_calls += 1;
        let Some(packet) = self.incoming.pop_front() else {
            return Err(std::io::ErrorKind::WouldBlock.into());
        };
        let n = packet.len().min(buf.len());
        buf[..n].copy_from_slice(&packet[..n]);
        Ok(n)
    }

    fn send_packet(&mut self, packet: &[u8]) -> std::io::Result<()> {
        let (header, frame) = packet
            .split_first_chunk::<VNET_HDR_LEN>()
            .expect("a packet starts with its header");
        assert!(
            (MIN_FRAME_LEN..=MAX_FRAME_LEN).contains(&frame.len()),
            "frame of {} bytes reached the backend",
            frame.len()
        );
        // Only what header::check_tx lets through: NEEDS_CSUM at most, TCP segmentation at
        // most, the checksum inside the frame, num_buffers zero.
        assert_eq!(header[0] & !F_NEEDS_CSUM, 0, "flags {:#x}", header[0]);
        assert!([GSO_NONE, GSO_TCPV4, GSO_TCPV6].contains(&header[1]));
        let at = |i: usize| usize::from(u16::from_le_bytes([header[i], header[i + 1]]));
        if header[0] & F_NEEDS_CSUM != 0 {
            assert!(at(6) + at(8) + 2 <= frame.len());
        }
        assert_eq!(at(10), 0);
        if self.fail_sends {
            return Err(std::io::ErrorKind::WouldBlock.into());
        }
        self.sent.push(frame.len());
        Ok(())
    }
}

/// One queue's rings: descriptor table, available ring, used ring.
pub struct QueueRings {
    pub desc_table: GuestAddress,
    pub avail: GuestAddress,
    pub used: GuestAddress,
}

/// Fresh guest memory, the receive and transmit queues (in that order) and their rings.
pub fn machine() -> (GuestRam, Vec<Queue>, [QueueRings; 2]) {
    let mem = GuestRam::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap();
    let mut queues = Vec::new();
    let rings = QUEUE_BASE.map(|base| {
        let mock = MockSplitQueue::create(&mem, GuestAddress(base), QSIZE);
        let used = GuestAddress(base + USED_OFFSET);
        mem.write_slice(&[0u8; 4], used).unwrap();
        let mut q: Queue = mock.create_queue().unwrap();
        q.set_used_ring_address(Some(used.0 as u32), Some((used.0 >> 32) as u32));
        queues.push(q);
        QueueRings {
            desc_table: mock.desc_table_addr(),
            avail: mock.avail_addr(),
            used,
        }
    });
    (mem, queues, rings)
}

/// The used ring's entries so far: (index, length) of each, and the used index.
pub fn used_entries(mem: &GuestRam, used: GuestAddress) -> (u16, Vec<(u32, u32)>) {
    let idx: u16 = mem.read_obj(GuestAddress(used.0 + 2)).unwrap();
    let entries = (0..u64::from(idx.min(QSIZE)))
        .map(|i| {
            let at = used.0 + 4 + 8 * i;
            let id: u32 = mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = mem.read_obj(GuestAddress(at + 4)).unwrap();
            (id, len)
        })
        .collect();
    (idx, entries)
}

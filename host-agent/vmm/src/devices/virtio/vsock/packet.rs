//! The packet header as plain data.
//!
//! Parsing a descriptor chain is `virtio_vsock::packet::VsockPacket`'s job; the device copies the
//! header out of guest memory into a [`VsockHeader`] once, so the backend never touches guest
//! memory and a guest cannot change a field after it was checked.

use virtio_vsock::packet::VsockPacket;
use vm_memory::bitmap::BitmapSlice;

use super::defs;

/// A vsock packet header (virtio spec 1.2 §5.10.6), host-endian.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type.
    pub type_: u16,
    /// Operation.
    pub op: u16,
    /// Operation flags.
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer.
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Size of the header on the wire.
    pub const SIZE: usize = virtio_vsock::packet::PKT_HEADER_SIZE;

    /// The header's wire form (little endian, [`VsockHeader::SIZE`] bytes).
    pub fn to_bytes(&self) -> [u8; Self::SIZE] {
        let mut b = [0u8; Self::SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }

    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; Self::SIZE]) -> Self {
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| u64::from(u32_at(o)) | (u64::from(u32_at(o + 4)) << 32);
        Self {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Copies the header out of a parsed packet.
    pub fn from_packet<B: BitmapSlice>(pkt: &VsockPacket<'_, B>) -> Self {
        Self {
            src_cid: pkt.src_cid(),
            dst_cid: pkt.dst_cid(),
            src_port: pkt.src_port(),
            dst_port: pkt.dst_port(),
            len: pkt.len(),
            type_: pkt.type_(),
            op: pkt.op(),
            flags: pkt.flags(),
            buf_alloc: pkt.buf_alloc(),
            fwd_cnt: pkt.fwd_cnt(),
        }
    }

    /// Writes every field into the packet's header in guest memory.
    pub fn write_to<B: BitmapSlice>(&self, pkt: &mut VsockPacket<'_, B>) {
        pkt.set_src_cid(self.src_cid)
            .set_dst_cid(self.dst_cid)
            .set_src_port(self.src_port)
            .set_dst_port(self.dst_port)
            .set_len(self.len)
            .set_type(self.type_)
            .set_op(self.op)
            .set_flags(self.flags)
            .set_buf_alloc(self.buf_alloc)
            .set_fwd_cnt(self.fwd_cnt);
    }

    /// A host-to-guest stream packet from host port `src_port` to guest port `dst_port`.
    /// The caller fills in the CIDs' guest side, credit and length.
    pub fn host_to_guest(guest_cid: u64, src_port: u32, dst_port: u32, op: u16) -> Self {
        Self {
            src_cid: defs::HOST_CID,
            dst_cid: guest_cid,
            src_port,
            dst_port,
            type_: defs::TYPE_STREAM,
            op,
            ..Self::default()
        }
    }

    /// The reset answering `self` (a guest packet): ports swapped, no credit.
    pub fn reset_reply(&self) -> Self {
        Self {
            src_cid: self.dst_cid,
            dst_cid: self.src_cid,
            src_port: self.dst_port,
            dst_port: self.src_port,
            type_: defs::TYPE_STREAM,
            op: defs::OP_RST,
            ..Self::default()
        }
    }
}

//! One descriptor chain read as a transmit frame ([`read_tx_frame`]) or filled with a received
//! frame ([`write_rx_frame`]).
//!
//! A transmit chain is a stream of device-readable bytes: the 12-byte virtio-net header, then
//! the frame, split across descriptors in any way (`VERSION_1` implies `ANY_LAYOUT`). A receive
//! chain is a stream of device-writable bytes the header and frame are written into. Every
//! descriptor is checked for its direction and against guest memory before a byte moves, the
//! lengths are summed in 64 bits, and nothing is allocated: the frame goes through the caller's
//! fixed buffer.

use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::defs::NUM_BUFFERS_OFFSET;
use super::{MAX_CHAIN_DESCRIPTORS, MAX_FRAME_LEN, MIN_FRAME_LEN, VNET_HDR_LEN};

/// Why a chain was refused. Every one of them returns the chain with used length 0.
#[derive(Debug, thiserror::Error)]
pub enum ChainError {
    /// The chain yielded no descriptor (its head is outside the table or unreadable).
    #[error("empty descriptor chain")]
    Empty,
    /// The chain has more descriptors than the device reads.
    #[error("descriptor chain longer than {MAX_CHAIN_DESCRIPTORS} descriptors")]
    TooLong,
    /// The chain stops at a descriptor that still has `NEXT` set: a loop, a `next` index
    /// outside the table, or an unreadable descriptor.
    #[error("descriptor chain cut short (loop or bad next index)")]
    Truncated,
    /// A descriptor has the wrong direction: device-writable in a transmit chain, or
    /// device-readable in a receive chain.
    #[error("descriptor of the wrong direction")]
    Direction,
    /// A descriptor reaches outside guest memory.
    #[error("descriptor outside guest memory")]
    OutsideMemory,
    /// A transmit chain shorter than the header and a minimal Ethernet frame.
    #[error("transmit chain of {0} bytes is too short for the header and a frame")]
    TooShort(u64),
    /// A transmit frame over [`MAX_FRAME_LEN`].
    #[error("frame of {0} bytes is over the {MAX_FRAME_LEN}-byte limit")]
    Oversized(u64),
    /// A receive chain too small for the header and the frame.
    #[error("receive buffer of {have} bytes is too small for {need}")]
    NoRoom {
        /// Bytes needed: header and frame.
        need: u64,
        /// Bytes the chain holds.
        have: u64,
    },
    /// A guest memory access failed after the range was checked.
    #[error("guest memory access failed")]
    Memory(#[source] vm_memory::GuestMemoryError),
}

/// Reads at most [`MAX_CHAIN_DESCRIPTORS`] descriptors of `chain` into `descs`, checks that
/// each one has the direction `device_writes` and lies in guest memory, and returns the total
/// length.
fn collect<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap<()>,
    descs: &mut Vec<Descriptor>,
    device_writes: bool,
) -> Result<u64, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    descs.clear();
    descs.extend(chain.take(MAX_CHAIN_DESCRIPTORS + 1));
    if descs.len() > MAX_CHAIN_DESCRIPTORS {
        return Err(ChainError::TooLong);
    }
    let Some(last) = descs.last() else {
        return Err(ChainError::Empty);
    };
    if last.has_next() {
        return Err(ChainError::Truncated);
    }
    let access = if device_writes {
        Permissions::Write
    } else {
        Permissions::Read
    };
    let mut total = 0u64;
    for d in descs.iter() {
        if d.is_write_only() != device_writes {
            return Err(ChainError::Direction);
        }
        if !mem.check_range(d.addr(), d.len() as usize, access) {
            return Err(ChainError::OutsideMemory);
        }
        // At most MAX_CHAIN_DESCRIPTORS descriptors of at most u32::MAX bytes each.
        total += u64::from(d.len());
    }
    Ok(total)
}

/// Reads the frame of a transmit chain, without its virtio-net header, into `buf` (at least
/// [`MAX_FRAME_LEN`] bytes) and returns its length. `descs` is scratch space.
pub fn read_tx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap<()>,
    descs: &mut Vec<Descriptor>,
    buf: &mut [u8],
) -> Result<usize, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let total = collect(chain, mem, descs, false)?;
    let hdr = VNET_HDR_LEN as u64;
    if total < hdr + MIN_FRAME_LEN as u64 {
        return Err(ChainError::TooShort(total));
    }
    let frame_len = total - hdr;
    if frame_len > MAX_FRAME_LEN as u64 || frame_len > buf.len() as u64 {
        return Err(ChainError::Oversized(frame_len));
    }
    // Both bounded by MAX_FRAME_LEN + 12 now.
    let mut skip = VNET_HDR_LEN;
    let mut at = 0usize;
    for d in descs.iter() {
        let len = d.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = len - skip;
        let addr = GuestAddress(d.addr().0 + skip as u64);
        mem.read_slice(&mut buf[at..at + n], addr)
            .map_err(ChainError::Memory)?;
        at += n;
        skip = 0;
    }
    Ok(at)
}

/// Writes a virtio-net header (all zero but `num_buffers` = 1) and `frame` into a receive
/// chain; returns the used length (header and frame). `descs` is scratch space.
pub fn write_rx_frame<M>(
    chain: DescriptorChain<M>,
    mem: &GuestMemoryMmap<()>,
    descs: &mut Vec<Descriptor>,
    frame: &[u8],
) -> Result<u32, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let have = collect(chain, mem, descs, true)?;
    let need = (VNET_HDR_LEN + frame.len()) as u64;
    if have < need {
        return Err(ChainError::NoRoom { need, have });
    }
    let mut header = [0u8; VNET_HDR_LEN];
    header[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&1u16.to_le_bytes());
    let mut parts = [&header[..], frame];
    let mut part = 0;
    for d in descs.iter() {
        let mut room = d.len() as usize;
        let mut addr = d.addr();
        while room > 0 && part < parts.len() {
            let src = parts[part];
            let n = src.len().min(room);
            mem.write_slice(&src[..n], addr)
                .map_err(ChainError::Memory)?;
            parts[part] = &src[n..];
            if parts[part].is_empty() {
                part += 1;
            }
            room -= n;
            addr = GuestAddress(addr.0 + n as u64);
        }
        if part == parts.len() {
            break;
        }
    }
    // need <= 12 + MAX_FRAME_LEN + 1.
    Ok(need as u32)
}

//! One descriptor chain read as a transmit packet ([`read_tx_packet`]), or filled with a received
//! packet ([`write_rx_packet`]) or with its next part, for a packet spread over several chains
//! ([`write_rx_part`]).
//!
//! A transmit chain is a stream of device-readable bytes: the 12-byte virtio-net header, then
//! the frame, split across descriptors in any way (`VERSION_1` implies `ANY_LAYOUT`). A receive
//! chain is a stream of device-writable bytes the header and frame (or a part of them) are
//! written into. Every descriptor is checked for its direction and against guest memory before
//! a byte moves, the lengths are summed in 64 bits, and nothing is allocated: the frame goes
//! through the caller's fixed buffer.

use crate::memory::GuestRam;
use std::ops::Deref;

use virtio_queue::DescriptorChain;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory, Permissions};

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
    mem: &GuestRam,
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

/// Copies a transmit chain (the 12-byte virtio-net header, then the frame) into `buf` (at least
/// [`VNET_HDR_LEN`] + [`MAX_FRAME_LEN`] bytes) and returns its length, header included. The
/// header is not read here: the caller checks it ([`super::header::check_tx`]). `descs` is
/// scratch space.
pub fn read_tx_packet<M>(
    chain: DescriptorChain<M>,
    mem: &GuestRam,
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
    if frame_len > MAX_FRAME_LEN as u64 || total > buf.len() as u64 {
        return Err(ChainError::Oversized(frame_len));
    }
    // Bounded by MAX_FRAME_LEN + 12 now.
    let mut at = 0usize;
    for d in descs.iter() {
        let n = d.len() as usize;
        mem.read_slice(&mut buf[at..at + n], d.addr())
            .map_err(ChainError::Memory)?;
        at += n;
    }
    Ok(at)
}

/// Writes `packet` (a virtio-net header the caller built, then the frame) into a receive chain
/// that must hold all of it; returns the used length. `descs` is scratch space.
pub fn write_rx_packet<M>(
    chain: DescriptorChain<M>,
    mem: &GuestRam,
    descs: &mut Vec<Descriptor>,
    packet: &[u8],
) -> Result<u32, ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let have = collect(chain, mem, descs, true)?;
    let need = packet.len() as u64;
    if have < need {
        return Err(ChainError::NoRoom { need, have });
    }
    write_into(descs, mem, packet)?;
    // need <= 12 + MAX_FRAME_LEN.
    Ok(need as u32)
}

/// Where a merged packet's `num_buffers` field lies in guest memory: its two bytes, which may
/// fall in two descriptors.
pub type NumBuffersAt = [GuestAddress; 2];

/// Writes as much of `bytes` as a receive chain holds, for a packet spread over several chains
/// (mergeable receive buffers); returns the bytes written. The first chain of a packet
/// (`first`) must hold the whole virtio-net header, and then the place of its `num_buffers`
/// field is returned too, to be set once the packet's chain count is known. `descs` is scratch
/// space.
pub fn write_rx_part<M>(
    chain: DescriptorChain<M>,
    mem: &GuestRam,
    descs: &mut Vec<Descriptor>,
    bytes: &[u8],
    first: bool,
) -> Result<(u32, Option<NumBuffersAt>), ChainError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let have = collect(chain, mem, descs, true)?;
    if first && have < VNET_HDR_LEN as u64 {
        return Err(ChainError::NoRoom {
            need: VNET_HDR_LEN as u64,
            have,
        });
    }
    let n = bytes.len().min(usize::try_from(have).unwrap_or(usize::MAX));
    write_into(descs, mem, &bytes[..n])?;
    let at = if first {
        match (
            stream_addr(descs, NUM_BUFFERS_OFFSET),
            stream_addr(descs, NUM_BUFFERS_OFFSET + 1),
        ) {
            (Some(lo), Some(hi)) => Some([lo, hi]),
            _ => None,
        }
    } else {
        None
    };
    // n <= bytes.len() <= 12 + MAX_FRAME_LEN.
    Ok((n as u32, at))
}

/// Sets a merged packet's `num_buffers` at the place [`write_rx_part`] returned.
pub fn set_num_buffers(
    mem: &GuestRam,
    at: NumBuffersAt,
    num_buffers: u16,
) -> Result<(), ChainError> {
    let [lo, hi] = num_buffers.to_le_bytes();
    mem.write_slice(&[lo], at[0]).map_err(ChainError::Memory)?;
    mem.write_slice(&[hi], at[1]).map_err(ChainError::Memory)
}

/// The guest address of byte `offset` of the chain's byte stream.
fn stream_addr(descs: &[Descriptor], mut offset: usize) -> Option<GuestAddress> {
    for d in descs {
        let len = d.len() as usize;
        if offset < len {
            return Some(GuestAddress(d.addr().0 + offset as u64));
        }
        offset -= len;
    }
    None
}

/// Writes `bytes` into the checked descriptors `descs`, in order, as far as they hold.
fn write_into(descs: &[Descriptor], mem: &GuestRam, mut bytes: &[u8]) -> Result<(), ChainError> {
    for d in descs {
        if bytes.is_empty() {
            break;
        }
        let n = bytes.len().min(d.len() as usize);
        mem.write_slice(&bytes[..n], d.addr())
            .map_err(ChainError::Memory)?;
        bytes = &bytes[n..];
    }
    Ok(())
}

//! The virtio-net header (virtio spec 1.2 §5.1.6) that precedes every packet, and the checks the
//! device makes on it before the packet moves on.
//!
//! The header says how the packet's checksum and segmentation were left to the other side:
//! `flags` (`NEEDS_CSUM`: the checksum at `csum_start + csum_offset` is still to be computed
//! from `csum_start` on; `DATA_VALID`: the checksum was verified), `gso_type` and `gso_size`
//! (the packet is a TCP super-packet, to be cut into segments of `gso_size` bytes of payload)
//! and `hdr_len` (the length of its headers, a hint). Both sides may rely on them only as far
//! as the features negotiated allow ([`Offloads`]).
//!
//! - **Transmit** ([`check_tx`]): the guest wrote the header, so it is hostile. It is rebuilt
//!   from the fields checked here, never passed on as written: only `NEEDS_CSUM` among the flags,
//!   and only with `VIRTIO_NET_F_CSUM`; the checksum's place (two bytes) inside the frame; only
//!   TCPv4 or TCPv6 segmentation, and each only with its `HOST_TSO` feature, with `NEEDS_CSUM`,
//!   a non-zero `gso_size` and `hdr_len` inside the frame. Everything else (ECN, UDP, unknown
//!   types, unknown flags) is refused, and the packet dropped. The host kernel checks the same
//!   header again when the TAP takes it (`virtio_net_hdr_to_skb`), so a header the kernel would
//!   refuse is refused twice; these checks make the device's own answer not depend on it.
//! - **Receive** ([`check_rx`]): the host kernel wrote the header (through the TAP), but the
//!   guest may have negotiated less than the TAP was told to deliver. A packet whose checksum or
//!   segmentation the guest did not agree to handle is refused (dropped and counted); a
//!   `DATA_VALID` flag the guest did not negotiate is cleared (the guest then checks the sum
//!   itself).

use super::VNET_HDR_LEN;
use super::defs::NUM_BUFFERS_OFFSET;

/// `VIRTIO_NET_HDR_F_NEEDS_CSUM`.
pub const F_NEEDS_CSUM: u8 = 1;
/// `VIRTIO_NET_HDR_F_DATA_VALID`.
pub const F_DATA_VALID: u8 = 2;
/// `VIRTIO_NET_HDR_GSO_NONE`.
pub const GSO_NONE: u8 = 0;
/// `VIRTIO_NET_HDR_GSO_TCPV4`.
pub const GSO_TCPV4: u8 = 1;
/// `VIRTIO_NET_HDR_GSO_TCPV6`.
pub const GSO_TCPV6: u8 = 4;

/// Which offloads one direction may use, from the features the driver acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Offloads {
    /// Partial checksums (`NEEDS_CSUM`), and on receive `DATA_VALID`.
    pub csum: bool,
    /// TCPv4 segmentation.
    pub tso4: bool,
    /// TCPv6 segmentation.
    pub tso6: bool,
}

impl Offloads {
    /// What the guest may leave to the device on transmit (`CSUM`, `HOST_TSO4`, `HOST_TSO6`).
    /// Segmentation without the checksum feature it depends on counts for nothing.
    pub fn host(acked: u64) -> Self {
        use super::defs::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6};
        let csum = acked & VIRTIO_NET_F_CSUM != 0;
        Self {
            csum,
            tso4: csum && acked & VIRTIO_NET_F_HOST_TSO4 != 0,
            tso6: csum && acked & VIRTIO_NET_F_HOST_TSO6 != 0,
        }
    }

    /// What the guest agreed to take on receive (`GUEST_CSUM`, `GUEST_TSO4`, `GUEST_TSO6`).
    pub fn guest(acked: u64) -> Self {
        use super::defs::{
            VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
        };
        let csum = acked & VIRTIO_NET_F_GUEST_CSUM != 0;
        Self {
            csum,
            tso4: csum && acked & VIRTIO_NET_F_GUEST_TSO4 != 0,
            tso6: csum && acked & VIRTIO_NET_F_GUEST_TSO6 != 0,
        }
    }
}

/// Why a header was refused. The packet is dropped and counted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Flags the device does not accept in this direction.
    #[error("virtio-net header flags {0:#x} not accepted")]
    Flags(u8),
    /// A partial checksum without the checksum feature.
    #[error("partial checksum without the checksum offload negotiated")]
    ChecksumNotNegotiated,
    /// The checksum's two bytes lie outside the frame.
    #[error("checksum at {start}+{offset} is outside the {frame_len}-byte frame")]
    ChecksumOutside {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// The frame's length.
        frame_len: usize,
    },
    /// A segmentation type that is unknown, or not negotiated for this direction.
    #[error("segmentation type {0:#x} not negotiated")]
    Gso(u8),
    /// Segmentation without a partial checksum.
    #[error("segmentation without a partial checksum")]
    GsoWithoutChecksum,
    /// Segmentation with a segment size of zero.
    #[error("segmentation with a segment size of 0")]
    GsoSizeZero,
    /// `hdr_len` past the end of the frame.
    #[error("header length {hdr_len} is past the end of the {frame_len}-byte frame")]
    HdrLenOutside {
        /// `hdr_len`.
        hdr_len: u16,
        /// The frame's length.
        frame_len: usize,
    },
}

/// The fields of a `virtio_net_hdr_v1`, read from its little-endian bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHeader {
    /// `flags`.
    pub flags: u8,
    /// `gso_type`.
    pub gso_type: u8,
    /// `hdr_len`.
    pub hdr_len: u16,
    /// `gso_size`.
    pub gso_size: u16,
    /// `csum_start`.
    pub csum_start: u16,
    /// `csum_offset`.
    pub csum_offset: u16,
}

impl VnetHeader {
    /// Reads the fields (not `num_buffers`) from `bytes`.
    pub fn parse(bytes: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        Self {
            flags: bytes[0],
            gso_type: bytes[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
        }
    }

    /// The header's bytes, with `num_buffers` as given.
    pub fn to_bytes(self, num_buffers: u16) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[NUM_BUFFERS_OFFSET..NUM_BUFFERS_OFFSET + 2].copy_from_slice(&num_buffers.to_le_bytes());
        b
    }

    fn check_checksum(&self, frame_len: usize) -> Result<(), HeaderError> {
        let end = usize::from(self.csum_start) + usize::from(self.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::ChecksumOutside {
                start: self.csum_start,
                offset: self.csum_offset,
                frame_len,
            });
        }
        Ok(())
    }

    fn gso_allowed(&self, offloads: Offloads) -> bool {
        match self.gso_type {
            GSO_TCPV4 => offloads.tso4,
            GSO_TCPV6 => offloads.tso6,
            _ => false,
        }
    }
}

/// Checks the header a guest wrote before a frame of `frame_len` bytes, against what it may
/// leave to the host (`offloads`); returns the header to hand the TAP, rebuilt from the checked
/// fields only (`num_buffers` zero).
pub fn check_tx(
    bytes: &[u8; VNET_HDR_LEN],
    frame_len: usize,
    offloads: Offloads,
) -> Result<[u8; VNET_HDR_LEN], HeaderError> {
    let h = VnetHeader::parse(bytes);
    if h.flags & !F_NEEDS_CSUM != 0 {
        return Err(HeaderError::Flags(h.flags));
    }
    let mut out = VnetHeader::default();
    if h.flags & F_NEEDS_CSUM != 0 {
        if !offloads.csum {
            return Err(HeaderError::ChecksumNotNegotiated);
        }
        h.check_checksum(frame_len)?;
        out.flags = F_NEEDS_CSUM;
        out.csum_start = h.csum_start;
        out.csum_offset = h.csum_offset;
    }
    if h.gso_type != GSO_NONE {
        if !h.gso_allowed(offloads) {
            return Err(HeaderError::Gso(h.gso_type));
        }
        if h.flags & F_NEEDS_CSUM == 0 {
            return Err(HeaderError::GsoWithoutChecksum);
        }
        if h.gso_size == 0 {
            return Err(HeaderError::GsoSizeZero);
        }
        if usize::from(h.hdr_len) > frame_len {
            return Err(HeaderError::HdrLenOutside {
                hdr_len: h.hdr_len,
                frame_len,
            });
        }
        out.gso_type = h.gso_type;
        out.gso_size = h.gso_size;
        out.hdr_len = h.hdr_len;
    }
    Ok(out.to_bytes(0))
}

/// Checks the header the TAP wrote before a frame of `frame_len` bytes, against what the guest
/// agreed to take (`offloads`), and rewrites it in place for the guest: a `DATA_VALID` the guest
/// did not negotiate cleared, `num_buffers` set to `num_buffers`.
pub fn check_rx(
    bytes: &mut [u8; VNET_HDR_LEN],
    frame_len: usize,
    offloads: Offloads,
    num_buffers: u16,
) -> Result<(), HeaderError> {
    let mut h = VnetHeader::parse(bytes);
    if h.flags & !(F_NEEDS_CSUM | F_DATA_VALID) != 0 {
        return Err(HeaderError::Flags(h.flags));
    }
    if h.flags & F_NEEDS_CSUM != 0 {
        if !offloads.csum {
            return Err(HeaderError::ChecksumNotNegotiated);
        }
        h.check_checksum(frame_len)?;
    }
    if !offloads.csum {
        h.flags &= !F_DATA_VALID;
    }
    if h.gso_type != GSO_NONE && !h.gso_allowed(offloads) {
        return Err(HeaderError::Gso(h.gso_type));
    }
    *bytes = h.to_bytes(num_buffers);
    Ok(())
}

/// A header's bytes from its fields, `num_buffers` zero (for tests).
#[cfg(test)]
pub(crate) fn test_header(
    flags: u8,
    gso_type: u8,
    hdr_len: u16,
    gso_size: u16,
    csum_start: u16,
    csum_offset: u16,
) -> [u8; VNET_HDR_LEN] {
    VnetHeader {
        flags,
        gso_type,
        hdr_len,
        gso_size,
        csum_start,
        csum_offset,
    }
    .to_bytes(0)
}

#[cfg(test)]
mod tests {
    use super::test_header as hdr;
    use super::*;
    use crate::devices::virtio::net::defs;

    const ALL: Offloads = Offloads {
        csum: true,
        tso4: true,
        tso6: true,
    };

    #[test]
    fn offloads_follow_the_acked_features_and_their_dependencies() {
        let host = defs::VIRTIO_NET_F_HOST_TSO4 | defs::VIRTIO_NET_F_HOST_TSO6;
        assert_eq!(Offloads::host(host), Offloads::default());
        assert_eq!(Offloads::host(host | defs::VIRTIO_NET_F_CSUM), ALL);
        let guest = defs::VIRTIO_NET_F_GUEST_TSO4;
        assert_eq!(Offloads::guest(guest), Offloads::default());
        assert_eq!(
            Offloads::guest(guest | defs::VIRTIO_NET_F_GUEST_CSUM),
            Offloads {
                csum: true,
                tso4: true,
                tso6: false
            }
        );
        // The two directions do not mix.
        assert_eq!(
            Offloads::host(defs::VIRTIO_NET_F_GUEST_CSUM),
            Offloads::default()
        );
    }

    #[test]
    fn a_plain_transmit_header_is_rebuilt_all_zero() {
        // Stray hdr_len, gso_size and csum fields without the flag or a GSO type are dropped.
        let out = check_tx(&hdr(0, 0, 54, 1448, 34, 16), 100, Offloads::default()).unwrap();
        assert_eq!(out, [0; 12]);
    }

    #[test]
    fn a_tso_transmit_header_passes_only_when_negotiated_and_sound() {
        let tso = hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        let out = check_tx(&tso, 65000, ALL).unwrap();
        let mut want = tso;
        want[10..].copy_from_slice(&[0, 0]);
        assert_eq!(out, want);
        let no_tso = Offloads {
            csum: true,
            ..Offloads::default()
        };
        assert_eq!(
            check_tx(&tso, 65000, no_tso),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
        let six = hdr(F_NEEDS_CSUM, GSO_TCPV6, 74, 1428, 54, 16);
        assert!(check_tx(&six, 65000, ALL).is_ok());
        for bad_type in [2u8, 3, 5, GSO_TCPV4 | 0x80, 0xff] {
            let h = hdr(F_NEEDS_CSUM, bad_type, 54, 1448, 34, 16);
            assert_eq!(check_tx(&h, 65000, ALL), Err(HeaderError::Gso(bad_type)));
        }
        assert_eq!(
            check_tx(&hdr(0, GSO_TCPV4, 54, 1448, 0, 0), 65000, ALL),
            Err(HeaderError::GsoWithoutChecksum)
        );
        assert_eq!(
            check_tx(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 0, 34, 16), 65000, ALL),
            Err(HeaderError::GsoSizeZero)
        );
        assert_eq!(
            check_tx(&hdr(F_NEEDS_CSUM, GSO_TCPV4, 200, 1448, 34, 16), 100, ALL),
            Err(HeaderError::HdrLenOutside {
                hdr_len: 200,
                frame_len: 100
            })
        );
    }

    #[test]
    fn a_transmit_checksum_must_lie_inside_the_frame() {
        assert!(check_tx(&hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16), 52, ALL).is_ok());
        assert_eq!(
            check_tx(&hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16), 51, ALL),
            Err(HeaderError::ChecksumOutside {
                start: 34,
                offset: 16,
                frame_len: 51
            })
        );
        assert_eq!(
            check_tx(&hdr(F_NEEDS_CSUM, 0, 0, 0, u16::MAX, u16::MAX), 65550, ALL),
            Err(HeaderError::ChecksumOutside {
                start: u16::MAX,
                offset: u16::MAX,
                frame_len: 65550
            })
        );
        assert_eq!(
            check_tx(
                &hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16),
                100,
                Offloads::default()
            ),
            Err(HeaderError::ChecksumNotNegotiated)
        );
    }

    #[test]
    fn a_transmit_header_with_other_flags_is_refused() {
        for flags in [F_DATA_VALID, 4, 0x80, F_NEEDS_CSUM | F_DATA_VALID] {
            assert_eq!(
                check_tx(&hdr(flags, 0, 0, 0, 0, 0), 100, ALL),
                Err(HeaderError::Flags(flags))
            );
        }
    }

    #[test]
    fn a_receive_header_is_held_to_what_the_guest_took() {
        let mut b = hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        check_rx(&mut b, 65000, ALL, 3).unwrap();
        assert_eq!(VnetHeader::parse(&b).gso_type, GSO_TCPV4);
        assert_eq!(&b[10..], &3u16.to_le_bytes());
        let csum_only = Offloads {
            csum: true,
            ..Offloads::default()
        };
        let mut b = hdr(F_NEEDS_CSUM, GSO_TCPV4, 54, 1448, 34, 16);
        assert_eq!(
            check_rx(&mut b, 65000, csum_only, 1),
            Err(HeaderError::Gso(GSO_TCPV4))
        );
        let mut b = hdr(F_NEEDS_CSUM, 0, 0, 0, 34, 16);
        assert_eq!(
            check_rx(&mut b, 100, Offloads::default(), 1),
            Err(HeaderError::ChecksumNotNegotiated)
        );
        // DATA_VALID without GUEST_CSUM is cleared, not refused.
        let mut b = hdr(F_DATA_VALID, 0, 0, 0, 0, 0);
        check_rx(&mut b, 100, Offloads::default(), 1).unwrap();
        assert_eq!(b[0], 0);
        let mut b = hdr(F_DATA_VALID, 0, 0, 0, 0, 0);
        check_rx(&mut b, 100, csum_only, 1).unwrap();
        assert_eq!(b[0], F_DATA_VALID);
        let mut b = hdr(4, 0, 0, 0, 0, 0);
        assert_eq!(check_rx(&mut b, 100, ALL, 1), Err(HeaderError::Flags(4)));
    }
}

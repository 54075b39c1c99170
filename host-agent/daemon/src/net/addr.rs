//! The addresses of each networked VM, out of the overlay prefix (`--overlay-prefix`, default
//! `10.200.0.0/16`).
//!
//! Each VM gets a block of 8 addresses (a /29), slot `i` starting at `B = prefix + 8 i`:
//!
//! | address | where |
//! | --- | --- |
//! | `B+1` | the gateway, on `tap0` in the VM's network namespace (`B/30` on that link); the guest's resolver listens there |
//! | `B+2` | the guest, on its virtio-net device (`/30`, default route via `B+1`) |
//! | `B+5` | the host's end of the VM's veth (`nc-<id>`, `B+4/30`) |
//! | `B+6` | the namespace's end of that veth (`up0`); the namespace's default route goes via `B+5` |
//!
//! `B`, `B+3`, `B+4` and `B+7` are the two /30s' network and broadcast addresses, unused. The
//! host routes `B/30` via `B+6`; its masquerade rule rewrites the guest's address on the way
//! out. With a /16 there are 8192 slots.
//!
//! A slot is taken when the VM is created ([`allocate`], under the daemon's VM lock, against the
//! addresses of every VM it still lists), recorded in the VM's record ([`VmLink`]) so a
//! restarted daemon counts it again, and freed when the VM is removed. The guest's MAC address
//! is derived from its address ([`VmLink::mac`]), so it is unique while the address is.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The addresses in one VM's block.
const SLOT_SIZE: u32 = 8;

/// Why an overlay prefix or an address could not be had.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// The prefix is not `A.B.C.D/LEN`.
    #[error("overlay prefix `{0}` must be an IPv4 prefix A.B.C.D/LEN")]
    Syntax(String),
    /// The prefix is longer than /29: no room for one VM.
    #[error("overlay prefix `{0}` is longer than /29: no VM's block fits")]
    TooSmall(String),
    /// The address has bits set past the prefix length.
    #[error("overlay prefix `{0}` has host bits set")]
    HostBits(String),
    /// Every slot is in use.
    #[error("no free address in the overlay prefix {0}: {1} VMs hold one")]
    Exhausted(OverlayPrefix, usize),
}

/// The IPv4 prefix VMs' addresses come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverlayPrefix {
    base: Ipv4Addr,
    len: u8,
}

impl OverlayPrefix {
    /// The default, `10.200.0.0/16`.
    pub const DEFAULT: &str = "10.200.0.0/16";

    /// The first address.
    pub fn base(&self) -> Ipv4Addr {
        self.base
    }

    /// The prefix length.
    pub fn prefix_len(&self) -> u8 {
        self.len
    }

    /// Whether `addr` is inside the prefix.
    pub fn contains(&self, addr: Ipv4Addr) -> bool {
        let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
        u32::from(addr) & mask == u32::from(self.base)
    }

    /// How many VMs' blocks it holds.
    pub fn slots(&self) -> u32 {
        1u32 << (32 - u32::from(self.len) - SLOT_SIZE.trailing_zeros())
    }

    /// Whether `link` is exactly one of this prefix's slots: a migrated VM's addresses are
    /// checked so before this host uses them.
    pub fn has_link(&self, link: &VmLink) -> bool {
        if !self.contains(link.guest) {
            return false;
        }
        let offset = u32::from(link.guest) - u32::from(self.base);
        offset % SLOT_SIZE == 2 && self.link(offset / SLOT_SIZE) == *link
    }

    /// The addresses of slot `slot` (below [`Self::slots`]).
    fn link(&self, slot: u32) -> VmLink {
        let b = u32::from(self.base) + slot * SLOT_SIZE;
        VmLink {
            gateway: Ipv4Addr::from(b + 1),
            guest: Ipv4Addr::from(b + 2),
            host_end: Ipv4Addr::from(b + 5),
            netns_end: Ipv4Addr::from(b + 6),
        }
    }
}

impl std::fmt::Display for OverlayPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.len)
    }
}

impl FromStr for OverlayPrefix {
    type Err = AddrError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || AddrError::Syntax(s.escape_debug().to_string());
        let (addr, len) = s.split_once('/').ok_or_else(syntax)?;
        let base: Ipv4Addr = addr.parse().map_err(|_| syntax())?;
        if len.is_empty() || !len.bytes().all(|b| b.is_ascii_digit()) {
            return Err(syntax());
        }
        let len: u8 = len.parse().map_err(|_| syntax())?;
        if len > 32 {
            return Err(syntax());
        }
        if len > 29 {
            return Err(AddrError::TooSmall(s.to_owned()));
        }
        let prefix = Self { base, len };
        let mask = u32::MAX.checked_shl(32 - u32::from(len)).unwrap_or(0);
        if u32::from(base) & !mask != 0 {
            return Err(AddrError::HostBits(s.to_owned()));
        }
        Ok(prefix)
    }
}

/// One VM's point-to-point links (see the module doc), as its record keeps them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VmLink {
    /// The gateway, on `tap0`: the guest's default route and resolver.
    pub gateway: Ipv4Addr,
    /// The guest's address.
    pub guest: Ipv4Addr,
    /// The host's end of the veth.
    pub host_end: Ipv4Addr,
    /// The namespace's end of the veth.
    pub netns_end: Ipv4Addr,
}

impl VmLink {
    /// The prefix length of each of the two links (`tap0` and the veth).
    pub const LINK_PREFIX_LEN: u8 = 30;

    /// The guest's MAC address: locally administered and unicast (`02:00`), then the four
    /// bytes of its address, so two VMs with different addresses never share one.
    pub fn mac(&self) -> [u8; 6] {
        let [a, b, c, d] = self.guest.octets();
        [0x02, 0x00, a, b, c, d]
    }

    /// [`Self::mac`] as `02:00:0a:c8:00:02`.
    pub fn mac_string(&self) -> String {
        self.mac()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    }

    /// The gateway's MAC address (`tap0`'s): `02:01`, then the four bytes of the gateway's
    /// address. Derived, not random, so that a VM that migrates finds its gateway at the MAC
    /// its guest has cached.
    pub fn gateway_mac_string(&self) -> String {
        let [a, b, c, d] = self.gateway.octets();
        format!("02:01:{a:02x}:{b:02x}:{c:02x}:{d:02x}")
    }

    /// The first address of the guest's /30 (`tap0`'s link), which the host routes to the
    /// namespace.
    pub fn guest_net(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & !3)
    }
}

/// Picks the lowest free slot of `prefix`: one whose guest address is not in `in_use` (the
/// guest addresses of every VM the daemon still lists, ended or not, until it is removed).
pub fn allocate(prefix: &OverlayPrefix, in_use: &HashSet<Ipv4Addr>) -> Result<VmLink, AddrError> {
    (0..prefix.slots())
        .map(|slot| prefix.link(slot))
        .find(|link| !in_use.contains(&link.guest))
        .ok_or(AddrError::Exhausted(*prefix, in_use.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_parse_and_bad_ones_get_their_error() {
        let p: OverlayPrefix = OverlayPrefix::DEFAULT.parse().unwrap();
        assert_eq!(
            (p.base(), p.prefix_len(), p.slots()),
            ("10.200.0.0".parse().unwrap(), 16, 8192)
        );
        assert_eq!(p.to_string(), "10.200.0.0/16");
        assert!(p.contains("10.200.255.255".parse().unwrap()));
        assert!(!p.contains("10.201.0.0".parse().unwrap()));
        assert_eq!("10.0.0.0/29".parse::<OverlayPrefix>().unwrap().slots(), 1);
        assert_eq!(
            "0.0.0.0/0".parse::<OverlayPrefix>().unwrap().slots(),
            1 << 29
        );
        for bad in [
            "10.200.0.0",
            "10.200.0.0/",
            "10.200.0.0/33",
            "x/16",
            "10.200.0.0/+16",
        ] {
            assert!(
                matches!(bad.parse::<OverlayPrefix>(), Err(AddrError::Syntax(_))),
                "{bad}"
            );
        }
        assert!(matches!(
            "10.0.0.0/30".parse::<OverlayPrefix>(),
            Err(AddrError::TooSmall(_))
        ));
        assert!(matches!(
            "10.200.0.1/16".parse::<OverlayPrefix>(),
            Err(AddrError::HostBits(_))
        ));
    }

    #[test]
    fn slots_follow_the_documented_layout() {
        let p: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let link = allocate(&p, &HashSet::new()).unwrap();
        assert_eq!(link.gateway, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(link.guest, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(link.host_end, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(link.netns_end, Ipv4Addr::new(10, 200, 0, 6));
        assert_eq!(link.guest_net(), Ipv4Addr::new(10, 200, 0, 0));
        let last = p.link(p.slots() - 1);
        assert_eq!(last.netns_end, Ipv4Addr::new(10, 200, 255, 254));
        assert!(p.contains(last.netns_end));
    }

    #[test]
    fn no_address_is_handed_out_twice_while_held_and_exhaustion_is_an_error() {
        let p: OverlayPrefix = "10.9.0.0/27".parse().unwrap();
        let mut held = HashSet::new();
        for _ in 0..p.slots() {
            let link = allocate(&p, &held).unwrap();
            assert!(held.insert(link.guest), "{link:?} handed out twice");
        }
        assert_eq!(held.len(), 4);
        assert!(matches!(
            allocate(&p, &held),
            Err(AddrError::Exhausted(_, 4))
        ));
        // A removed VM's slot is free again.
        let freed = Ipv4Addr::new(10, 9, 0, 10);
        assert!(held.remove(&freed));
        assert_eq!(allocate(&p, &held).unwrap().guest, freed);
    }

    #[test]
    fn only_a_whole_slot_of_the_prefix_is_its_link() {
        let p: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        assert!(p.has_link(&p.link(0)) && p.has_link(&p.link(8191)));
        let other: OverlayPrefix = "10.201.0.0/16".parse().unwrap();
        assert!(!p.has_link(&other.link(3)));
        let mut shifted = p.link(3);
        shifted.gateway = Ipv4Addr::new(10, 200, 0, 1);
        assert!(!p.has_link(&shifted));
        let mut odd = p.link(3);
        odd.guest = Ipv4Addr::from(u32::from(odd.guest) + 1);
        assert!(!p.has_link(&odd));
    }

    #[test]
    fn links_survive_the_record_round_trip() {
        let p: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let link = p.link(300);
        let text = serde_json::to_string(&link).unwrap();
        let back: VmLink = serde_json::from_str(&text).unwrap();
        assert_eq!(back, link);
        // What a restarted daemon rebuilds from its records keeps the slot taken.
        let held: HashSet<_> = [back.guest].into();
        assert_ne!(allocate(&p, &held).unwrap(), link);
        assert_eq!(allocate(&p, &HashSet::new()).unwrap(), p.link(0));
    }

    #[test]
    fn macs_are_local_unicast_and_follow_the_address() {
        let gw = allocate(&"10.200.0.0/16".parse().unwrap(), &HashSet::new()).unwrap();
        assert_eq!(gw.gateway_mac_string(), "02:01:0a:c8:00:01");
        assert_ne!(gw.gateway_mac_string(), gw.mac_string());
        let p: OverlayPrefix = "10.200.0.0/16".parse().unwrap();
        let a = p.link(0);
        assert_eq!(a.mac(), [0x02, 0x00, 10, 200, 0, 2]);
        assert_eq!(a.mac_string(), "02:00:0a:c8:00:02");
        let b = p.link(1);
        assert_ne!(a.mac(), b.mac());
        for link in [a, b] {
            let first = link.mac()[0];
            assert_eq!(first & 0x01, 0, "unicast");
            assert_eq!(first & 0x02, 0x02, "locally administered");
        }
    }
}

//! The underlay: the network the hosts share (`host-agent serve --underlay IFACE`), where
//! clients reach agents' overlay addresses and where a migrated VM's address moves to its new
//! host.
//!
//! **How a client reaches a VM.** The client routes the overlay prefix straight onto the
//! underlay (`ip route add 10.200.0.0/16 dev IFACE`), so it asks by ARP who holds a guest's
//! address. The host that runs the VM answers for it: the daemon adds a proxy neighbour entry
//! for the guest's address on the underlay interface ([`Underlay::publish`]), and the kernel
//! answers with the interface's own MAC, then forwards what arrives to the VM's namespace by
//! the route [`super::netns::setup`] made. Only the guest's /32 is published, nothing else of
//! the overlay, and what may then pass is the firewall's say
//! ([`super::firewall::Ingress`]).
//!
//! **How the address follows a migration.** The target publishes the address only once its
//! copy of the VM runs, and then announces it ([`Underlay::announce`]): a gratuitous ARP, a
//! broadcast request for the address from the address itself, which makes every neighbour on
//! the underlay (the client among them) replace the MAC it had cached. The source withdraws its
//! entry when its copy ends ([`Underlay::withdraw`]). The address never changes, so the
//! guest's TCP connections go on where they were.
//!
//! The entries are made with `ip neigh` (as the rest of [`super`] uses `ip`). The gratuitous
//! ARP is sent by hand on a raw packet socket: `arping` is not installed everywhere, and the
//! frame is 42 fixed bytes ([`garp_frame`]).

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;

use super::ToolError;

/// Why the underlay cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum UnderlayError {
    /// The interface name cannot be an interface's.
    #[error("--underlay {0:?} is not an interface name")]
    BadName(String),
    /// `ip` failed.
    #[error("the underlay interface")]
    Ip(#[source] ToolError),
    /// `ip -j` printed what does not parse.
    #[error("cannot read `ip -j addr show dev {0}`")]
    Parse(String),
    /// The interface has no IPv4 address or no MAC address.
    #[error("underlay interface {0} has no IPv4 address or no MAC address")]
    NoAddress(String),
    /// A sysctl or the raw socket failed.
    #[error("{what} on underlay interface {iface}")]
    Io {
        /// The step.
        what: &'static str,
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The underlay interface, as read when the daemon starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Underlay {
    iface: String,
    ifindex: i32,
    mac: [u8; 6],
    /// The networks of its IPv4 addresses, `A.B.C.D/LEN`, sorted, read once at open.
    networks: Vec<String>,
}

/// One interface of `ip -j addr show`.
#[derive(serde::Deserialize)]
struct IpLink {
    ifindex: i32,
    #[serde(default)]
    address: Option<String>,
    #[serde(default)]
    addr_info: Vec<IpAddr>,
}

/// One address of an [`IpLink`].
#[derive(serde::Deserialize)]
struct IpAddr {
    family: String,
    local: String,
    prefixlen: u8,
}

/// The networks of `addrs` (addresses and prefix lengths), `A.B.C.D/LEN`, sorted, each once.
fn networks_of(addrs: &[(Ipv4Addr, u8)]) -> Vec<String> {
    let mut nets: Vec<String> = addrs
        .iter()
        .map(|(addr, len)| {
            let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
            format!("{}/{len}", Ipv4Addr::from(u32::from(*addr) & mask))
        })
        .collect();
    nets.sort();
    nets.dedup();
    nets
}

impl Underlay {
    /// Reads interface `iface` (its index, MAC and IPv4 networks) and makes it answer ARP for
    /// published addresses at once (`proxy_delay` 0; the kernel's default waits up to 0.8 s at
    /// random before each proxy answer).
    pub fn open(iface: &str) -> Result<Self, UnderlayError> {
        let valid = !iface.is_empty()
            && iface.len() < 16
            && iface != "."
            && iface != ".."
            && iface
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
        if !valid {
            return Err(UnderlayError::BadName(iface.to_owned()));
        }
        let mut cmd = Command::new("ip");
        cmd.args(["-j", "addr", "show", "dev", iface]);
        let out = super::run_tool(cmd, None).map_err(UnderlayError::Ip)?;
        let underlay = Self::parse(iface, &out)?;
        let path = format!("/proc/sys/net/ipv4/neigh/{iface}/proxy_delay");
        std::fs::write(&path, "0").map_err(|source| UnderlayError::Io {
            what: "set proxy_delay",
            iface: iface.to_owned(),
            source,
        })?;
        Ok(underlay)
    }

    /// Reads `ip -j addr show dev IFACE`'s output.
    fn parse(iface: &str, json: &[u8]) -> Result<Self, UnderlayError> {
        let links: Vec<IpLink> =
            serde_json::from_slice(json).map_err(|_| UnderlayError::Parse(iface.to_owned()))?;
        let link = links
            .into_iter()
            .next()
            .ok_or_else(|| UnderlayError::Parse(iface.to_owned()))?;
        let mac = link
            .address
            .as_deref()
            .and_then(parse_mac)
            .ok_or_else(|| UnderlayError::NoAddress(iface.to_owned()))?;
        let addrs: Vec<(Ipv4Addr, u8)> = link
            .addr_info
            .iter()
            .filter(|a| a.family == "inet" && a.prefixlen <= 32)
            .filter_map(|a| Some((a.local.parse().ok()?, a.prefixlen)))
            .collect();
        if addrs.is_empty() {
            return Err(UnderlayError::NoAddress(iface.to_owned()));
        }
        Ok(Self {
            iface: iface.to_owned(),
            ifindex: link.ifindex,
            mac,
            networks: networks_of(&addrs),
        })
    }

    /// The interface's name.
    pub fn iface(&self) -> &str {
        &self.iface
    }

    /// The networks on the interface, `A.B.C.D/LEN`: where clients may connect from.
    pub fn networks(&self) -> &[String] {
        &self.networks
    }

    /// Answers ARP for `addr` on the underlay from now on.
    pub fn publish(&self, addr: Ipv4Addr) -> Result<(), UnderlayError> {
        self.neigh("replace", addr).map(drop)
    }

    /// Stops answering for `addr`; an address not published is no error.
    pub fn withdraw(&self, addr: Ipv4Addr) -> Result<(), UnderlayError> {
        match self.neigh("del", addr) {
            Err(UnderlayError::Ip(e))
                if e.stderr()
                    .is_some_and(|s| s.contains("No such file or directory")) =>
            {
                Ok(())
            }
            other => other.map(drop),
        }
    }

    /// `ip neigh VERB proxy ADDR dev IFACE`.
    fn neigh(&self, verb: &str, addr: Ipv4Addr) -> Result<Vec<u8>, UnderlayError> {
        let mut cmd = Command::new("ip");
        cmd.args([
            "neigh",
            verb,
            "proxy",
            &addr.to_string(),
            "dev",
            &self.iface,
        ]);
        super::run_tool(cmd, None).map_err(UnderlayError::Ip)
    }

    /// Sends one gratuitous ARP for `addr` from this interface's MAC.
    pub fn announce(&self, addr: Ipv4Addr) -> Result<(), UnderlayError> {
        let io = |what| {
            let iface = self.iface.clone();
            move |source| UnderlayError::Io {
                what,
                iface,
                source,
            }
        };
        let proto = (libc::ETH_P_ARP as u16).to_be();
        // SAFETY: socket(2) with constant arguments; the result is checked before use.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                i32::from(proto),
            )
        };
        if fd < 0 {
            return Err(io("open a packet socket")(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by socket(2) and nothing else owns it.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value to fill in.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = proto;
        to.sll_ifindex = self.ifindex;
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&[0xff; 6]);
        let frame = garp_frame(self.mac, addr);
        // SAFETY: `frame` and `to` are live for the call and their lengths are the ones given.
        let sent = unsafe {
            libc::sendto(
                fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const to).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if sent < 0 {
            return Err(io("send a gratuitous ARP")(std::io::Error::last_os_error()));
        }
        Ok(())
    }
}

/// `aa:bb:cc:dd:ee:ff`.
fn parse_mac(text: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = text.split(':');
    for b in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *b = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

/// A gratuitous ARP: an Ethernet broadcast carrying an ARP request for `addr` from `addr`
/// itself at `mac` (RFC 5227's announcement: the target hardware address zero, the sender's
/// and target's protocol addresses both `addr`).
pub fn garp_frame(mac: [u8; 6], addr: Ipv4Addr) -> [u8; 42] {
    let mut f = [0u8; 42];
    f[0..6].copy_from_slice(&[0xff; 6]);
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&(libc::ETH_P_ARP as u16).to_be_bytes());
    f[14..16].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
    f[16..18].copy_from_slice(&(libc::ETH_P_IP as u16).to_be_bytes());
    f[18] = 6;
    f[19] = 4;
    f[20..22].copy_from_slice(&1u16.to_be_bytes()); // request
    f[22..28].copy_from_slice(&mac);
    f[28..32].copy_from_slice(&addr.octets());
    // 32..38: the target's hardware address, zero.
    f[38..42].copy_from_slice(&addr.octets());
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    const IP_J: &str = r#"[{"ifindex":7,"ifname":"ul0","flags":["UP"],"mtu":1500,
        "address":"02:aa:00:00:00:01","broadcast":"ff:ff:ff:ff:ff:ff",
        "addr_info":[{"family":"inet","local":"192.0.2.17","prefixlen":24},
                     {"family":"inet6","local":"fe80::1","prefixlen":64},
                     {"family":"inet","local":"198.51.100.9","prefixlen":30}]}]"#;

    #[test]
    fn the_interface_reads_into_its_networks_and_bad_ones_are_refused() {
        let u = Underlay::parse("ul0", IP_J.as_bytes()).unwrap();
        assert_eq!((u.ifindex, u.mac), (7, [2, 0xaa, 0, 0, 0, 1]));
        assert_eq!(u.networks(), ["192.0.2.0/24", "198.51.100.8/30"]);
        let no_v4 = IP_J.replace("\"inet\"", "\"inet6\"");
        assert!(matches!(
            Underlay::parse("ul0", no_v4.as_bytes()),
            Err(UnderlayError::NoAddress(_))
        ));
        for bad in ["", "[]", "{}", "not json"] {
            assert!(
                matches!(
                    Underlay::parse("ul0", bad.as_bytes()),
                    Err(UnderlayError::Parse(_))
                ),
                "{bad}"
            );
        }
        for name in ["", "a b", "../x", "a;b", "sixteen-chars-xx", ".."] {
            assert!(
                matches!(Underlay::open(name), Err(UnderlayError::BadName(_))),
                "{name}"
            );
        }
        assert_eq!(parse_mac("02:00:0a:c8:00:02"), Some([2, 0, 10, 200, 0, 2]));
        for bad in [
            "02:00:0a:c8:00",
            "02:00:0a:c8:00:02:03",
            "2:00:0a:c8:00:02",
            "zz:00:0a:c8:00:02",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_gratuitous_arp_asks_for_the_address_from_the_address() {
        let mac = [2, 0xaa, 0, 0, 0, 1];
        let f = garp_frame(mac, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(&f[..6], &[0xff; 6], "broadcast");
        assert_eq!(&f[6..12], &mac);
        assert_eq!(&f[12..14], &[0x08, 0x06], "ARP");
        assert_eq!(
            &f[14..22],
            &[0, 1, 0x08, 0, 6, 4, 0, 1],
            "Ethernet/IPv4 request"
        );
        assert_eq!(&f[22..28], &mac, "from this MAC");
        assert_eq!(&f[28..32], &[10, 200, 0, 2]);
        assert_eq!(&f[32..38], &[0; 6]);
        assert_eq!(&f[38..42], &[10, 200, 0, 2], "for the same address");
    }
}

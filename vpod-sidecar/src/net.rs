//! The guest's end of its network, for an agent whose profile allows egress: before the agent
//! starts, the interface whose MAC the host named gets the guest's address, comes up, and
//! carries the default route via the host's gateway; the agent's `/etc/resolv.conf` names the
//! gateway, where the host's resolver answers (see `rootfs::write_resolv_conf`).
//!
//! The configuration is made with the classic ioctls (`SIOCSIFADDR`, `SIOCSIFNETMASK`,
//! `SIOCSIFFLAGS`, `SIOCADDRT`): a few fixed-size structs, nothing to parse, and no netlink code
//! in a static binary. None of it is a boundary: the host's firewall, in the VM's own network
//! namespace, decides what leaves whatever the guest configures.

use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::libc;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use shared_proto::message::GuestNetwork;

/// Where the kernel lists network interfaces.
pub const SYS_CLASS_NET: &str = "/sys/class/net";

/// Why the guest's network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface has the MAC address the host named.
    #[error("no network interface has MAC address {0}")]
    NoInterface(String),
    /// The interfaces could not be listed.
    #[error("cannot list the network interfaces")]
    List(#[source] std::io::Error),
    /// The prefix length is over 32.
    #[error("prefix length {0} is over 32")]
    BadPrefix(u8),
    /// The socket the ioctls go through could not be opened.
    #[error("cannot open a socket to configure the network")]
    Socket(#[source] Errno),
    /// An ioctl failed.
    #[error("cannot {what} of {iface}")]
    Ioctl {
        /// What it was for.
        what: &'static str,
        /// The interface.
        iface: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// The sidecar's own `/etc/resolv.conf` could not be written.
    #[error("cannot write /etc/resolv.conf")]
    ResolvConf(#[source] std::io::Error),
}

/// `aa:bb:cc:dd:ee:ff`, as `/sys/class/net/*/address` shows it.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// The interface under `sys_class_net` whose address is `mac`.
pub fn find_interface(sys_class_net: &Path, mac: &[u8; 6]) -> Result<String, NetError> {
    let want = mac_text(mac);
    let mut names: Vec<String> = std::fs::read_dir(sys_class_net)
        .map_err(NetError::List)?
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    names.sort();
    names
        .into_iter()
        .find(|name| {
            std::fs::read_to_string(Path::new(sys_class_net).join(name).join("address"))
                .is_ok_and(|a| a.trim().eq_ignore_ascii_case(&want))
        })
        .ok_or(NetError::NoInterface(want))
}

/// The netmask of a prefix length.
pub fn netmask(prefix_len: u8) -> Result<Ipv4Addr, NetError> {
    if prefix_len > 32 {
        return Err(NetError::BadPrefix(prefix_len));
    }
    Ok(Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    ))
}

/// A `sockaddr_in` for `addr`, as the generic `sockaddr` the ioctls take.
fn sockaddr(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr are both 16-byte plain C structs; the kernel reads the
    // family and then the sockaddr_in fields, which is how these ioctls are defined.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

/// The kernel's `struct rtentry` (`<linux/route.h>`), for `SIOCADDRT`.
#[repr(C)]
struct RtEntry {
    rt_pad1: libc::c_ulong,
    rt_dst: libc::sockaddr,
    rt_gateway: libc::sockaddr,
    rt_genmask: libc::sockaddr,
    rt_flags: libc::c_ushort,
    rt_pad2: libc::c_short,
    rt_pad3: libc::c_ulong,
    rt_pad4: *mut libc::c_void,
    rt_metric: libc::c_short,
    rt_dev: *mut libc::c_char,
    rt_mtu: libc::c_ulong,
    rt_window: libc::c_ulong,
    rt_irtt: libc::c_ushort,
}

/// An `ifreq` naming `iface` (at most 15 bytes, checked by the caller).
fn ifreq(iface: &str) -> libc::ifreq {
    // SAFETY: ifreq is a plain C struct (a name array and a union of integers and sockaddrs)
    // for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    req
}

/// Configures the interface with `net.mac`: address, netmask, up, default route via the
/// gateway. Returns its name.
pub fn configure(net: &GuestNetwork) -> Result<String, NetError> {
    let iface = find_interface(Path::new(SYS_CLASS_NET), &net.mac)?;
    configure_interface(&iface, net, false)?;
    remember(&iface);
    Ok(iface)
}

/// The interface [`configure`] set up at boot, for [`reconfigure`].
static CONFIGURED: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

fn remember(iface: &str) {
    *CONFIGURED.lock().unwrap_or_else(|p| p.into_inner()) = Some(iface.to_owned());
}

/// Moves a clone's network to `net` (see `HostToGuest::Reidentify`): the interface configured
/// at boot (it still has the snapshot's MAC; found by `net.mac` when none was) is taken down,
/// which drops its routes and its neighbours, is given `net.mac`, then configured as at boot.
/// Connections the agent had keep the old address and fail; new ones use the new one.
pub fn reconfigure(net: &GuestNetwork) -> Result<String, NetError> {
    let known = CONFIGURED.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let iface = match known {
        Some(iface) => iface,
        None => find_interface(Path::new(SYS_CLASS_NET), &net.mac)?,
    };
    configure_interface(&iface, net, true)?;
    remember(&iface);
    Ok(iface)
}

/// Reads `iface`'s flags and writes back `change(flags)`. On failure, what failed: reading
/// the flags, or `set_what`.
fn change_flags(
    fd: std::os::fd::RawFd,
    iface: &str,
    set_what: &'static str,
    change: impl FnOnce(libc::c_short) -> libc::c_short,
) -> Result<(), (&'static str, Errno)> {
    let mut req = ifreq(iface);
    // SAFETY: `fd` is an open socket; `req` is a valid, NUL-terminated ifreq that
    // SIOCGIFFLAGS fills in; it outlives the call.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) })
        .map_err(|e| ("read the flags", e))?;
    // SAFETY: SIOCGIFFLAGS just filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = change(flags);
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCSIFFLAGS, &req) })
        .map_err(|e| (set_what, e))?;
    Ok(())
}

/// Gives `iface` the address, netmask and default route of `net` and brings it up. With
/// `restart`, takes it down first (the kernel then drops its routes) and sets its MAC.
fn configure_interface(iface: &str, net: &GuestNetwork, restart: bool) -> Result<(), NetError> {
    let iface = iface.to_owned();
    let mask = netmask(net.prefix_len)?;
    let sock: OwnedFd = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(NetError::Socket)?;
    let fd = sock.as_raw_fd();
    let fail = |what: &'static str| {
        let iface = iface.clone();
        move |source| NetError::Ioctl {
            what,
            iface,
            source,
        }
    };
    if restart {
        change_flags(fd, &iface, "take down", |f| {
            f & !(libc::IFF_UP as libc::c_short)
        })
        .map_err(|(what, e)| fail(what)(e))?;
        let mut req = ifreq(&iface);
        let mut hw = libc::sockaddr {
            sa_family: libc::ARPHRD_ETHER,
            sa_data: [0; 14],
        };
        for (d, b) in hw.sa_data.iter_mut().zip(net.mac) {
            *d = b as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        // SAFETY: as above, with the hardware-address member that SIOCSIFHWADDR reads.
        Errno::result(unsafe { libc::ioctl(fd, libc::SIOCSIFHWADDR, &req) })
            .map_err(fail("set the MAC address"))?;
    }
    let mut req = ifreq(&iface);
    req.ifr_ifru.ifru_addr = sockaddr(net.address);
    // SAFETY: `fd` is an open socket; `req` is a valid, NUL-terminated ifreq whose address
    // member is set, which is what SIOCSIFADDR reads; it outlives the call.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCSIFADDR, &req) })
        .map_err(fail("set the address"))?;
    let mut req = ifreq(&iface);
    req.ifr_ifru.ifru_netmask = sockaddr(mask);
    // SAFETY: as above, with the netmask member that SIOCSIFNETMASK reads.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCSIFNETMASK, &req) })
        .map_err(fail("set the netmask"))?;
    change_flags(fd, &iface, "bring up", |f| {
        f | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short
    })
    .map_err(|(what, e)| fail(what)(e))?;
    let mut dev: Vec<libc::c_char> = iface.bytes().map(|b| b as libc::c_char).collect();
    dev.push(0);
    let mut route = RtEntry {
        rt_pad1: 0,
        rt_dst: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_gateway: sockaddr(net.gateway),
        rt_genmask: sockaddr(Ipv4Addr::UNSPECIFIED),
        rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
        rt_pad2: 0,
        rt_pad3: 0,
        rt_pad4: std::ptr::null_mut(),
        rt_metric: 0,
        rt_dev: dev.as_mut_ptr(),
        rt_mtu: 0,
        rt_window: 0,
        rt_irtt: 0,
    };
    // SAFETY: `route` is a fully initialised `struct rtentry` whose `rt_dev` points to a
    // NUL-terminated name in `dev`, which outlives the call; SIOCADDRT only reads them.
    Errno::result(unsafe { libc::ioctl(fd, libc::SIOCADDRT, &mut route) })
        .map_err(fail("add the default route"))?;
    tracing::info!(%iface, address = %net.address, gateway = %net.gateway, "network configured");
    Ok(())
}

/// Writes the sidecar's own `/etc/resolv.conf` (for an agent that runs in the initramfs).
pub fn write_own_resolv_conf(dns: Ipv4Addr) -> Result<(), NetError> {
    std::fs::create_dir_all("/etc").map_err(NetError::ResolvConf)?;
    std::fs::write("/etc/resolv.conf", crate::rootfs::resolv_conf(dns))
        .map_err(NetError::ResolvConf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_interface_is_found_by_its_mac() {
        let dir = tempfile::tempdir().unwrap();
        for (name, mac) in [
            ("eth0", "02:00:0a:c8:00:02\n"),
            ("lo", "00:00:00:00:00:00\n"),
        ] {
            std::fs::create_dir(dir.path().join(name)).unwrap();
            std::fs::write(dir.path().join(name).join("address"), mac).unwrap();
        }
        assert_eq!(
            find_interface(dir.path(), &[2, 0, 10, 200, 0, 2]).unwrap(),
            "eth0"
        );
        assert!(matches!(
            find_interface(dir.path(), &[2, 0, 10, 200, 0, 3]),
            Err(NetError::NoInterface(m)) if m == "02:00:0a:c8:00:03"
        ));
        assert!(matches!(
            find_interface(&dir.path().join("missing"), &[0; 6]),
            Err(NetError::List(_))
        ));
    }

    #[test]
    fn netmasks_follow_the_prefix_length() {
        assert_eq!(netmask(30).unwrap(), Ipv4Addr::new(255, 255, 255, 252));
        assert_eq!(netmask(0).unwrap(), Ipv4Addr::UNSPECIFIED);
        assert_eq!(netmask(32).unwrap(), Ipv4Addr::BROADCAST);
        assert!(matches!(netmask(33), Err(NetError::BadPrefix(33))));
    }

    #[test]
    fn sockaddrs_carry_the_address_in_network_order() {
        let sa = sockaddr(Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(i32::from(sa.sa_family), libc::AF_INET);
        // sin_port (2 bytes) then sin_addr.
        assert_eq!(
            &sa.sa_data[2..6],
            &[10, 200, 0, 1].map(|b: u8| b as libc::c_char)
        );
    }

    #[test]
    fn the_route_struct_has_the_kernels_size() {
        // struct rtentry is 120 bytes on 64-bit Linux.
        assert_eq!(std::mem::size_of::<RtEntry>(), 120);
    }
}

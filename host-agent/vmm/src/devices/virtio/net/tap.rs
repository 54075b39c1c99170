//! [`Tap`]: the network device's backend on a host TAP interface.
//!
//! The daemon creates the TAP (in the VM's own network namespace, owned by the VM's uid) and
//! starts the VMM in that namespace; the VMM attaches to it by name with [`Tap::open`] before it
//! enters its jail, while it still sees `/dev/net/tun` and the namespace. The jail then moves the
//! VMM into an empty network namespace of its own and leaves no `/dev/net/tun` in its root: the
//! open descriptor is all the VMM keeps, and it stays bound to the TAP's namespace. (The jail's
//! supervisor, forked after the open, holds a copy it never uses until it exits with the VMM.)
//!
//! The descriptor is opened `O_NONBLOCK`, with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, a header
//! size of 12 bytes (`TUNSETVNETHDRSZ`, the size of `virtio_net_hdr_v1`) and the offloads
//! `TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6` (`TUNSETOFFLOAD`): each `read` is one packet, a
//! virtio-net header and a frame of up to 64 KiB whose checksum or segmentation the header may
//! leave to the guest, and each `write` sends one such packet. The offloads are set here, before
//! the jail, because the device thread may make no `ioctl`; a guest that did not negotiate them
//! gets no packet that needs them (the device drops those: see [`super::header`]). The device
//! checks and rebuilds every header a guest writes before this descriptor sees it.
//! [`Tap::open`] refuses a name with no interface behind it instead of
//! letting `TUNSETIFF` create one; a name that is some other kind of interface, or a TAP that is
//! already attached or not ours to attach to, is refused by the kernel.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::{NetBackend, NetError, VNET_HDR_LEN};

/// The TUN/TAP control device.
pub const TUN_DEVICE: &str = "/dev/net/tun";

/// An attached TAP interface.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing TAP interface `name` in the calling thread's network namespace.
    pub fn open(name: &str) -> Result<Self, NetError> {
        if !crate::NetConfig::is_valid_tap_name(name) {
            return Err(NetError::TapName(name.to_owned()));
        }
        let c_name = CString::new(name).map_err(|_| NetError::TapName(name.to_owned()))?;
        // SAFETY: `c_name` is a valid NUL-terminated string that outlives the call.
        if unsafe { libc::if_nametoindex(c_name.as_ptr()) } == 0 {
            return Err(NetError::TapMissing(name.to_owned()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(TUN_DEVICE)
            .map_err(NetError::OpenTun)?;
        // SAFETY: an all-zero `ifreq` is a valid value (an empty name and a zero union).
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        // The name was checked: at most 15 ASCII bytes, so the last byte stays NUL.
        for (dst, &src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags =
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
        // SAFETY: TUNSETIFF reads (and may update) one `ifreq`, which `req` is; `file` is an
        // open /dev/net/tun descriptor.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, &mut req) };
        if rc != 0 {
            return Err(NetError::Attach {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one `int`, which `hdr_len` is, and `file` is the TAP.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) };
        if rc != 0 {
            return Err(NetError::Offloads {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        let offloads = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;
        // SAFETY: TUNSETOFFLOAD takes its flags by value and touches no memory of ours.
        let rc = unsafe {
            libc::ioctl(
                file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(offloads),
            )
        };
        if rc != 0 {
            return Err(NetError::Offloads {
                name: name.to_owned(),
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(Self {
            file,
            name: name.to_owned(),
        })
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl NetBackend for Tap {
    fn recv_packet(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    fn send_packet(&mut self, packet: &[u8]) -> std::io::Result<()> {
        let n = self.file.write(packet)?;
        if n != packet.len() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                format!("TAP took {n} of {} bytes", packet.len()),
            ));
        }
        Ok(())
    }
}

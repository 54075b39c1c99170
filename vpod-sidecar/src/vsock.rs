//! AF_VSOCK stream sockets on raw file descriptors.
//!
//! The standard library has no vsock types, and tokio-vsock would bring an async runtime, so
//! this module wraps the few calls the sidecar needs: connect, bind + listen, accept, read,
//! write and a half close.

use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use nix::sys::socket::{self, AddressFamily, Backlog, Shutdown, SockFlag, SockType, VsockAddr};

use crate::HalfClose;

/// The CID that binds a listener to every local CID (`VMADDR_CID_ANY`).
const CID_ANY: u32 = nix::libc::VMADDR_CID_ANY;

/// The listen backlog.
const BACKLOG: i32 = 16;

/// Errors of vsock calls.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// `socket(AF_VSOCK)` failed (no vsock device or driver).
    #[error("cannot create vsock socket")]
    Socket(#[source] nix::Error),
    /// `connect` failed.
    #[error("cannot connect to vsock {cid}:{port}")]
    Connect {
        /// The peer CID.
        cid: u32,
        /// The peer port.
        port: u32,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// `bind` failed.
    #[error("cannot bind vsock port {port}")]
    Bind {
        /// The local port.
        port: u32,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// `listen` failed.
    #[error("cannot listen on vsock")]
    Listen(#[source] nix::Error),
    /// `accept` failed.
    #[error("cannot accept a vsock connection")]
    Accept(#[source] nix::Error),
}

/// How long a connect waits for the host's answer. The kernel's default is 2 s, which a guest
/// under nested emulation on a loaded host can exceed: the connect then times out after the host
/// already accepted it, and the host sees a connection that closes before its first byte.
pub const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(15);

/// `SO_VM_SOCKETS_CONNECT_TIMEOUT` (`<linux/vm_sockets.h>`; the `_OLD` value, which is the one
/// on 64-bit targets, takes a `struct timeval`). The `libc` crate does not define it.
const SO_VM_SOCKETS_CONNECT_TIMEOUT: libc::c_int = 6;

fn set_connect_timeout(fd: &OwnedFd, timeout: std::time::Duration) -> io::Result<()> {
    let tv = libc::timeval {
        tv_sec: libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros()),
    };
    // SAFETY: `fd` is an open AF_VSOCK socket owned by the caller for the duration of the
    // call; the option value points at a live, initialised `timeval` whose exact size is
    // passed as the option length, and the kernel only reads it.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::AF_VSOCK,
            SO_VM_SOCKETS_CONNECT_TIMEOUT,
            (&raw const tv).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn new_socket() -> Result<OwnedFd, VsockError> {
    socket::socket(
        AddressFamily::Vsock,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(VsockError::Socket)
}

/// A connected vsock stream.
#[derive(Debug)]
pub struct VsockStream(OwnedFd);

impl VsockStream {
    /// Connects to `(cid, port)`, waiting at most [`CONNECT_TIMEOUT`] for the host's answer.
    pub fn connect(cid: u32, port: u32) -> Result<Self, VsockError> {
        let fd = new_socket()?;
        // Best effort: without it the kernel's 2 s default applies and the caller retries.
        if let Err(e) = set_connect_timeout(&fd, CONNECT_TIMEOUT) {
            tracing::debug!(error = %e, "vsock: cannot set the connect timeout");
        }
        socket::connect(fd.as_raw_fd(), &VsockAddr::new(cid, port))
            .map_err(|source| VsockError::Connect { cid, port, source })?;
        Ok(Self(fd))
    }
}

impl VsockStream {
    /// Makes a read or write that waits longer than `timeout` fail (`SO_RCVTIMEO`,
    /// `SO_SNDTIMEO`).
    pub fn set_timeouts(&self, timeout: std::time::Duration) -> Result<(), nix::Error> {
        let tv = nix::sys::time::TimeVal::new(
            libc::time_t::try_from(timeout.as_secs()).unwrap_or(libc::time_t::MAX),
            libc::suseconds_t::from(timeout.subsec_micros()),
        );
        socket::setsockopt(&self.0, socket::sockopt::ReceiveTimeout, &tv)?;
        socket::setsockopt(&self.0, socket::sockopt::SendTimeout, &tv)
    }
}

impl std::os::fd::AsFd for VsockStream {
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.0.as_fd()
    }
}

impl Read for VsockStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        nix::unistd::read(&self.0, buf).map_err(io::Error::from)
    }
}

impl Write for VsockStream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        nix::unistd::write(&self.0, buf).map_err(io::Error::from)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl HalfClose for VsockStream {
    fn shutdown_write(&self) -> io::Result<()> {
        socket::shutdown(self.0.as_raw_fd(), Shutdown::Write).map_err(io::Error::from)
    }
}

impl crate::ControlStream for VsockStream {
    fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    fn shutdown_both(&self) -> io::Result<()> {
        socket::shutdown(self.0.as_raw_fd(), Shutdown::Both).map_err(io::Error::from)
    }
}

/// A listening vsock socket.
#[derive(Debug)]
pub struct VsockListener(OwnedFd);

impl VsockListener {
    /// Listens on `port` for connections to any local CID.
    pub fn bind(port: u32) -> Result<Self, VsockError> {
        let fd = new_socket()?;
        socket::bind(fd.as_raw_fd(), &VsockAddr::new(CID_ANY, port))
            .map_err(|source| VsockError::Bind { port, source })?;
        // BACKLOG is a small positive constant, within what Backlog::new accepts.
        let backlog = Backlog::new(BACKLOG).map_err(VsockError::Listen)?;
        socket::listen(&fd, backlog).map_err(VsockError::Listen)?;
        Ok(Self(fd))
    }

    /// Waits for the next connection.
    pub fn accept(&self) -> Result<VsockStream, VsockError> {
        let raw = socket::accept4(self.0.as_raw_fd(), SockFlag::SOCK_CLOEXEC)
            .map_err(VsockError::Accept)?;
        // SAFETY: `raw` was just returned by a successful accept4, so it is an open file
        // descriptor that nothing else in this process owns; the OwnedFd takes sole ownership
        // and closes it exactly once.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        Ok(VsockStream(fd))
    }
}

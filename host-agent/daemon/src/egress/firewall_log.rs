//! The firewall's refusals, read as they happen: an NFLOG socket in the VM's namespace, bound
//! to [`firewall::LOG_GROUP`], whose messages ([`super::nflog`]) become `egress_denied` audit
//! records with `by = "firewall"`.
//!
//! Every refusal rule of the VM's ruleset is preceded by a log rule with the same match that
//! sends the packet's first [`COPY_RANGE`] bytes to that group, its counter name as the prefix,
//! within one rate limit for the whole VM ([`firewall::LOG_RATE`]); the counters count every
//! refusal whatever the log does. NFLOG groups belong to a network namespace, so each VM's
//! reader sees its own VM's refusals only.
//!
//! A kernel without `nfnetlink_log`, or a group another socket holds, leaves the VM with its
//! counters only: [`FirewallLog::open`] fails, and the caller logs that once.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

use nix::sys::socket::{
    self, AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, sockopt,
};
use nix::sys::time::TimeVal;
use tokio::io::unix::AsyncFd;

use super::nflog::{self, FirewallDenial, NflogError, NflogMessage};
use crate::net::firewall;
use crate::net::netns::{NetnsError, VmNetns};

/// Bytes of each refused packet the kernel copies: enough for an IPv6 header with a few
/// extension headers and the transport ports.
pub const COPY_RANGE: u32 = 128;
/// The socket's receive buffer: the kernel drops what does not fit (and says so with
/// `ENOBUFS`), so a flood costs the daemon no more than this.
const RECV_BUFFER: usize = 256 * 1024;
/// How long the kernel has to acknowledge the bind.
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why the firewall's log could not be opened or read.
#[derive(Debug, thiserror::Error)]
pub enum FirewallLogError {
    /// The VM's namespace could not be entered.
    #[error("the VM's network namespace")]
    Netns(#[source] NetnsError),
    /// A socket call failed.
    #[error("the NFLOG socket: cannot {0}")]
    Socket(&'static str, #[source] nix::Error),
    /// The kernel refused the bind or answered what does not parse.
    #[error("binding NFLOG group {0}")]
    Bind(u16, #[source] NflogError),
    /// The kernel did not acknowledge the bind in time.
    #[error("binding NFLOG group {0}: no answer")]
    NoAck(u16),
    /// The socket could not be registered with, or waited on by, the runtime.
    #[error("the NFLOG socket on the runtime")]
    Runtime(#[source] std::io::Error),
}

/// A VM's NFLOG socket, on the daemon's runtime.
#[derive(Debug)]
pub struct FirewallLog {
    fd: AsyncFd<OwnedFd>,
}

impl FirewallLog {
    /// Opens the socket inside `ns`, binds it to [`firewall::LOG_GROUP`] and waits for the
    /// kernel's acknowledgement. Must run inside the Tokio runtime.
    pub fn open(ns: &VmNetns) -> Result<Self, FirewallLogError> {
        let fd = ns
            .run_in(|| bind(firewall::LOG_GROUP))
            .map_err(FirewallLogError::Netns)??;
        // SAFETY: `fd` is an open socket the AsyncFd takes ownership of: nothing else holds
        // it, so it stays open and the same socket until the AsyncFd is dropped, and
        // `OwnedFd::as_raw_fd` always answers that one descriptor.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| FirewallLogError::Runtime(e.into()))?;
        Ok(Self { fd })
    }

    /// Waits for the next datagram and parses it. `ENOBUFS` (the kernel dropped messages that
    /// did not fit) is [`Received::Overrun`], not an error.
    pub async fn next(&self, buf: &mut [u8]) -> Result<Received, FirewallLogError> {
        loop {
            let mut ready = self
                .fd
                .readable()
                .await
                .map_err(FirewallLogError::Runtime)?;
            match socket::recv(self.fd.get_ref().as_raw_fd(), buf, MsgFlags::MSG_DONTWAIT) {
                Ok(n) => return Ok(Received::Messages(nflog::parse_datagram(&buf[..n]))),
                Err(nix::Error::EAGAIN) => ready.clear_ready(),
                Err(nix::Error::EINTR) => {}
                Err(nix::Error::ENOBUFS) => return Ok(Received::Overrun),
                Err(e) => return Err(FirewallLogError::Socket("receive", e)),
            }
        }
    }
}

/// What one receive brought.
#[derive(Debug)]
pub enum Received {
    /// A datagram's messages.
    Messages(Vec<Result<NflogMessage, NflogError>>),
    /// The kernel dropped messages for want of room.
    Overrun,
}

/// The denials among `messages`, and how many messages did not parse.
pub fn denials(messages: Vec<Result<NflogMessage, NflogError>>) -> (Vec<FirewallDenial>, u64) {
    let mut out = Vec::new();
    let mut bad = 0;
    for m in messages {
        match m {
            Ok(NflogMessage::Denial(d)) => out.push(d),
            Ok(_) => {}
            Err(_) => bad += 1,
        }
    }
    (out, bad)
}

/// Makes, binds and configures the socket (on a thread inside the VM's namespace); answers it
/// non-blocking.
fn bind(group: u16) -> Result<OwnedFd, FirewallLogError> {
    let err = |what| move |e| FirewallLogError::Socket(what, e);
    let fd = socket::socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    )
    .map_err(err("create"))?;
    socket::setsockopt(&fd, sockopt::RcvBuf, &RECV_BUFFER).map_err(err("size"))?;
    socket::bind(fd.as_raw_fd(), &NetlinkAddr::new(0, 0)).map_err(err("bind"))?;
    let timeout = TimeVal::new(ACK_TIMEOUT.as_secs() as _, ACK_TIMEOUT.subsec_micros() as _);
    socket::setsockopt(&fd, sockopt::ReceiveTimeout, &timeout).map_err(err("set a timeout"))?;
    let seq = 1;
    let req = nflog::bind_request(group, COPY_RANGE, seq);
    socket::send(fd.as_raw_fd(), &req, MsgFlags::empty()).map_err(err("send"))?;
    let mut buf = [0u8; 4096];
    // The acknowledgement (packets logged meanwhile may come first).
    loop {
        let n = match socket::recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty()) {
            Ok(n) => n,
            Err(nix::Error::EAGAIN) => return Err(FirewallLogError::NoAck(group)),
            Err(nix::Error::EINTR) => continue,
            Err(e) => return Err(FirewallLogError::Socket("receive", e)),
        };
        for m in nflog::parse_datagram(&buf[..n]) {
            match m {
                Ok(NflogMessage::Ack) => {
                    let nonblocking = nix::fcntl::OFlag::O_NONBLOCK;
                    nix::fcntl::fcntl(&fd, nix::fcntl::FcntlArg::F_SETFL(nonblocking))
                        .map_err(err("make non-blocking"))?;
                    return Ok(fd);
                }
                Err(e @ NflogError::Refused(_)) => return Err(FirewallLogError::Bind(group, e)),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::nflog::build::{ipv4, packet_message};
    use std::net::Ipv4Addr;

    #[test]
    fn denials_are_picked_out_and_bad_messages_counted() {
        let guest = Ipv4Addr::new(10, 200, 0, 2);
        let mut dgram = packet_message("deny_host", &ipv4(guest, guest, 6, 22));
        dgram.extend(packet_message("deny_other", &ipv4(guest, guest, 17, 53)));
        dgram.extend_from_slice(&[1, 2, 3]);
        let (found, bad) = denials(nflog::parse_datagram(&dgram));
        let rules: Vec<_> = found.iter().map(|d| d.rule.as_str()).collect();
        assert_eq!(rules, ["deny_host", "deny_other"]);
        assert_eq!(bad, 1);
    }
}

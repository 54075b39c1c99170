//! Egress enforcement for one VM: the resolver the guest must use and the TLS SNI check on its
//! port-443 connections.
//!
//! # Trust model
//!
//! The guest is hostile. It controls every byte it sends: DNS queries, TLS ClientHellos, the
//! addresses it connects to, and how fast it does all of that. A profile's `[network] egress`
//! list (`pypi.org:443`, `*.githubusercontent.com:443`) says which *names* it may reach, but the
//! kernel filters *addresses*. Three pieces close the gap, and each covers what the others
//! cannot:
//!
//! 1. **The resolver** ([`dns`]) is the only DNS server the guest can reach (the VM's nftables
//!    default-deny drops all other DNS). It answers only for allowed names and only `A` queries
//!    (IPv6 is denied, other types refused with an RFC 8914 Extended DNS Error saying why), and
//!    reports each address it hands out as an [`EgressEvent::Granted`]. It never hands out a
//!    non-public address (loopback, private, link-local, ...): an allowed name that resolves to
//!    one, by mistake or by DNS rebinding, must not open the host's own networks to the guest.
//! 2. **nftables sets** (filled by [`service`] before each answer leaves) let the guest open
//!    connections only to addresses the resolver handed out, on the rule's ports, until the
//!    grant expires. This stops connections to addresses the guest made up or learnt some other
//!    way.
//! 3. **The SNI check** ([`sni`]) is needed because an address is not a name: one CDN address
//!    serves thousands of names. A guest allowed `pypi.org` gets a Fastly address and could ask
//!    that address for any other site behind Fastly (domain fronting). Port-443 connections are
//!    redirected to the [`SniGate`], which reads the ClientHello and lets the connection through
//!    only if its SNI is allowed on that port *and* the resolver gave out the original
//!    destination address for that very name. A ClientHello with no SNI, or with an encrypted
//!    inner hello (ECH), is refused, since either hides the name the server will serve.
//!
//! What this does not stop: a server that routes on something other than SNI (the HTTP `Host`
//! header after the handshake, for instance) can still be fronted by a guest that puts an
//! allowed name in the SNI. Plain-text protocols on other allowed ports get the address check
//! only.
//!
//! Everything the guest controls is bounded: message sizes, queries in flight, TCP sessions,
//! the address table, the bytes and time spent reading a ClientHello, and the log lines a
//! guest can cause (one [`LogBudget`](shared_proto::ratelimit::LogBudget) per resolver and per
//! gate).
//!
//! # Layout
//! - [`rules`]: the `egress` entries parsed into an [`EgressPolicy`].
//! - [`dns`]: the [`Resolver`] and its [`ResolverCounters`].
//! - [`table`]: the [`GrantTable`] of addresses handed out, `addr -> names` with expiry.
//! - [`saved`]: the table's copy in the VM's state folder, read back after a daemon restart.
//! - [`client_hello`]: a strict TLS ClientHello parser that finds the SNI.
//! - [`sni`]: the [`SniGate`] and its [`SniCounters`].
//! - [`nflog`]: the kernel's NFLOG messages read into firewall refusals (no I/O).
//! - [`firewall_log`]: the NFLOG socket in the VM's namespace that [`service`] reads.
//! - [`service`]: the running pair for one VM ([`VmEgress`]): its sockets in the VM's
//!   namespace, the grants applied to its firewall, and its denials in the audit log.

pub mod client_hello;
pub mod dns;
pub mod firewall_log;
pub mod nflog;
pub mod rules;
pub mod saved;
pub mod service;
pub mod sni;
pub mod table;

#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;
use std::time::Duration;

pub use dns::{Resolver, ResolverCounters};
pub use rules::{EgressPolicy, EgressRule, HostPattern, RuleError};
pub use service::{EgressCounters, VmEgress};
pub use sni::{OriginalDst, SniCounters, SniGate, SoOriginalDst};
pub use table::GrantTable;

/// What the resolver and the SNI check report to the daemon: grants for its nftables sets and
/// refusals for the audit log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EgressEvent {
    /// The resolver gave `addr` out for `name`: allow it on `ports` for `ttl`.
    Granted {
        /// The name the guest asked for (lower case, no trailing dot).
        name: String,
        /// The address in the answer.
        addr: Ipv4Addr,
        /// The ports the rules allow for `name`, sorted.
        ports: Vec<u16>,
        /// How long the grant lasts: the answer's TTL clamped to
        /// [`table::MIN_TTL`]..=[`table::MAX_TTL`].
        ttl: Duration,
    },
    /// The resolver refused a query.
    Refused {
        /// The name asked for (lower case, no trailing dot).
        name: String,
        /// Why: the rule that decided, or that none allows the name.
        rule: String,
    },
    /// The SNI check let a connection through.
    Connected {
        /// The ClientHello's server name.
        sni: String,
        /// The original destination.
        addr: Ipv4Addr,
        /// Its port.
        port: u16,
    },
    /// The SNI check reset a connection.
    ConnectionRefused {
        /// The ClientHello's server name, or `no SNI`.
        sni: String,
        /// The original destination, when it was known.
        addr: Option<Ipv4Addr>,
        /// Its port (0 when unknown).
        port: u16,
        /// Why.
        reason: String,
    },
}

/// The sender events go to. Grants are sent with back-pressure (the answer waits for room, up
/// to [`dns::EVENT_TIMEOUT`], and leaves out an address whose grant could not be queued), so
/// the daemon hears of an address before the guest does; other events are dropped when the
/// channel is full, and counted.
pub type EventSender = tokio::sync::mpsc::Sender<EgressEvent>;

/// Runs `line` (a log line a guest can trigger) within `budget`, with the count of the lines
/// the budget left out before it. Shared with the daemon's other guest-facing network parts
/// (`crate::net::forward`).
pub(crate) fn guest_log(
    budget: &std::sync::Mutex<shared_proto::ratelimit::LogBudget>,
    line: impl FnOnce(u64),
) {
    let admitted = budget
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .admit(std::time::Instant::now());
    if let Some(suppressed) = admitted {
        line(suppressed);
    }
}

/// The next connection accepted from `listener`. A [`transient`] failure is logged (within
/// `budget`, naming `part`) and retried after a short pause; any other is the answer.
async fn accept(
    listener: &tokio::net::TcpListener,
    budget: &std::sync::Mutex<shared_proto::ratelimit::LogBudget>,
    part: &'static str,
) -> std::io::Result<tokio::net::TcpStream> {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => return Ok(stream),
            Err(e) if transient(&e) => {
                guest_log(budget, |s| {
                    tracing::warn!(suppressed = s, error = %e, part, "egress: accept failed");
                });
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// Errors after which a server loop carries on: an ICMP error from an earlier UDP reply, a
/// connection that went away before it was accepted, or a lack of descriptors or memory.
fn transient(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::ConnectionAborted
            | ErrorKind::Interrupted
            | ErrorKind::WouldBlock
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM)
    )
}

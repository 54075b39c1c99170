//! The SNI check: the guest's port-443 connections, redirected here by nftables, go on to
//! their original destination only if the ClientHello names a host the rules allow on that
//! port and the resolver gave that destination address out for that very name.
//!
//! For each accepted connection the gate
//! 1. asks for the original destination ([`OriginalDst`]; in production `SO_ORIGINAL_DST`,
//!    [`SoOriginalDst`]);
//! 2. reads the ClientHello, at most [`MAX_HELLO_BYTES`] within [`HELLO_TIMEOUT`], and parses
//!    it strictly ([`client_hello`]);
//! 3. checks the name against the [`EgressPolicy`] for the destination's port and against the
//!    [`GrantTable`] for the destination's address;
//! 4. connects to the destination (within [`CONNECT_TIMEOUT`]), replays the bytes read and
//!    splices both ways.
//!
//! Any failure resets the guest's connection (`SO_LINGER` 0, then close) and is reported as
//! [`EgressEvent::ConnectionRefused`]. At most [`MAX_CONNECTIONS`] connections are handled at
//! once; more are reset at once.
//!
//! The outbound connection is opened in the network namespace of the thread running the gate's
//! future, which the caller arranges to be one where it is not redirected back here.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shared_proto::ratelimit::LogBudget;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::timeout;

use super::client_hello::{self, HelloError, MAX_HELLO_BYTES};
use super::rules::EgressPolicy;
use super::table::GrantTable;
use super::{EgressEvent, EventSender};

/// How long the guest has to send its whole ClientHello. Not 2 s: a real client can take that
/// long between its connect and its hello when its machine is loaded (pip, in a slow guest,
/// loads its CA bundle in between; at 2 s the gate reset its first connection to an allowed
/// index, and only pip's retry saved the install). A silent connection holds one of this VM's
/// own [`MAX_CONNECTIONS`] slots meanwhile, nothing of another VM's.
pub const HELLO_TIMEOUT: Duration = Duration::from_secs(10);
/// How long connecting to the original destination may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections handled at once.
pub const MAX_CONNECTIONS: usize = 256;

/// Why a connection was refused.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    /// The original destination could not be read.
    #[error("reading the original destination")]
    OriginalDst(#[source] io::Error),
    /// The original destination is the gate itself: the connection was not redirected.
    #[error("connection was not redirected (destination is the gate itself)")]
    NotRedirected,
    /// Reading the ClientHello failed.
    #[error("reading the ClientHello")]
    Read(#[source] io::Error),
    /// The guest closed before the ClientHello was complete.
    #[error("connection closed before the ClientHello was complete")]
    Closed,
    /// The ClientHello did not arrive in time.
    #[error("no complete ClientHello within {0:?}")]
    HelloTimeout(Duration),
    /// The ClientHello is not acceptable.
    #[error("bad ClientHello")]
    Hello(#[source] HelloError),
    /// The ClientHello has no server name.
    #[error("ClientHello has no server name")]
    NoSni,
    /// No rule allows the name on this port.
    #[error("{sni} is not in the egress allowlist for port {port}")]
    NotAllowed {
        /// The name.
        sni: String,
        /// The port.
        port: u16,
    },
    /// The resolver did not give this address out for this name (or the grant expired).
    #[error("{addr} was not resolved for {sni}")]
    NotResolved {
        /// The name.
        sni: String,
        /// The address.
        addr: Ipv4Addr,
    },
    /// Connecting to the destination failed.
    #[error("connecting to {0}")]
    Connect(SocketAddrV4, #[source] io::Error),
    /// Connecting to the destination took too long.
    #[error("connecting to {0} took longer than {CONNECT_TIMEOUT:?}")]
    ConnectTimeout(SocketAddrV4),
    /// Replaying the ClientHello to the destination failed.
    #[error("replaying the ClientHello to {0}")]
    Replay(SocketAddrV4, #[source] io::Error),
}

/// Why serving stopped.
#[derive(Debug, thiserror::Error)]
pub enum SniError {
    /// Accepting on the listener failed.
    #[error("accepting a redirected TLS connection")]
    Accept(#[source] io::Error),
}

/// How the gate learns where a redirected connection was going.
pub trait OriginalDst: Send + Sync + 'static {
    /// The destination the guest connected to before nftables redirected it.
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4>;
}

impl<F> OriginalDst for F
where
    F: Fn(&TcpStream) -> io::Result<SocketAddrV4> + Send + Sync + 'static,
{
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        self(stream)
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`: what netfilter's redirect recorded.
#[derive(Debug, Clone, Copy, Default)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddrV4> {
        let raw = nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::OriginalDst)
            .map_err(io::Error::from)?;
        if i32::from(raw.sin_family) != libc::AF_INET {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "original destination is not IPv4",
            ));
        }
        Ok(SocketAddrV4::new(
            Ipv4Addr::from(u32::from_be(raw.sin_addr.s_addr)),
            u16::from_be(raw.sin_port),
        ))
    }
}

/// The gate's figures so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SniCounters {
    /// Connections accepted.
    pub connections: u64,
    /// Connections spliced to their destination.
    pub allowed: u64,
    /// Connections reset.
    pub refused: u64,
    /// Events dropped because the event channel was full.
    pub events_dropped: u64,
}

#[derive(Debug, Default)]
struct Counts {
    connections: AtomicU64,
    allowed: AtomicU64,
    refused: AtomicU64,
    events_dropped: AtomicU64,
}

struct Inner {
    policy: Arc<EgressPolicy>,
    table: GrantTable,
    events: EventSender,
    lookup: Box<dyn OriginalDst>,
    counts: Counts,
    slots: Arc<Semaphore>,
    log: Mutex<LogBudget>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SniGate")
            .field("policy", &self.policy)
            .field("counts", &self.counts)
            .finish_non_exhaustive()
    }
}

/// One VM's SNI check; clones share everything.
#[derive(Debug, Clone)]
pub struct SniGate {
    inner: Arc<Inner>,
}

/// What the check decided, before the connection is spliced or reset.
struct Checked {
    sni: String,
    dst: SocketAddrV4,
    hello: Vec<u8>,
}

impl SniGate {
    /// A gate for `policy` that trusts the addresses in `table` (the resolver's), reports to
    /// `events` and reads the original destination with `SO_ORIGINAL_DST`.
    pub fn new(policy: Arc<EgressPolicy>, table: GrantTable, events: EventSender) -> Self {
        Self::with_original_dst(policy, table, events, SoOriginalDst)
    }

    /// [`new`](Self::new) with another way to learn the original destination (tests, or a
    /// caller that keeps its own record).
    pub fn with_original_dst(
        policy: Arc<EgressPolicy>,
        table: GrantTable,
        events: EventSender,
        lookup: impl OriginalDst,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                policy,
                table,
                events,
                lookup: Box::new(lookup),
                counts: Counts::default(),
                slots: Arc::new(Semaphore::new(MAX_CONNECTIONS)),
                log: Mutex::new(LogBudget::new()),
            }),
        }
    }

    /// The figures so far.
    pub fn counters(&self) -> SniCounters {
        let c = &self.inner.counts;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        SniCounters {
            connections: get(&c.connections),
            allowed: get(&c.allowed),
            refused: get(&c.refused),
            events_dropped: get(&c.events_dropped),
        }
    }

    /// Handles connections accepted from `listener` until accepting fails for a reason other
    /// than a connection that went away or a lack of descriptors or memory.
    pub async fn serve(&self, listener: TcpListener) -> Result<(), SniError> {
        loop {
            let stream = super::accept(&listener, &self.inner.log, "sni")
                .await
                .map_err(SniError::Accept)?;
            self.inner
                .counts
                .connections
                .fetch_add(1, Ordering::Relaxed);
            let Ok(permit) = self.inner.slots.clone().try_acquire_owned() else {
                self.refuse(stream, None, None, "too many connections".to_owned());
                continue;
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.handle(stream).await;
            });
        }
    }

    async fn handle(&self, mut guest: TcpStream) {
        let dst = match self.inner.lookup.original_dst(&guest) {
            Ok(dst) => dst,
            Err(e) => {
                let reason = crate::error_chain(&GateError::OriginalDst(e));
                return self.refuse(guest, None, None, reason);
            }
        };
        let checked = match self.check(&mut guest, dst).await {
            Ok(c) => c,
            Err((sni, e)) => {
                return self.refuse(guest, sni, Some(dst), crate::error_chain(&e));
            }
        };
        let upstream = match timeout(CONNECT_TIMEOUT, TcpStream::connect(checked.dst)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                let reason = crate::error_chain(&GateError::Connect(dst, e));
                return self.refuse(guest, Some(checked.sni), Some(dst), reason);
            }
            Err(_) => {
                let reason = crate::error_chain(&GateError::ConnectTimeout(dst));
                return self.refuse(guest, Some(checked.sni), Some(dst), reason);
            }
        };
        let mut upstream = upstream;
        if let Err(e) = upstream.write_all(&checked.hello).await {
            let reason = crate::error_chain(&GateError::Replay(dst, e));
            return self.refuse(guest, Some(checked.sni), Some(dst), reason);
        }
        self.inner.counts.allowed.fetch_add(1, Ordering::Relaxed);
        self.send(EgressEvent::Connected {
            sni: checked.sni,
            addr: *dst.ip(),
            port: dst.port(),
        });
        // Either side closing or failing ends the splice; there is nothing to report then.
        let _ = tokio::io::copy_bidirectional(&mut guest, &mut upstream).await;
    }

    /// Reads and checks the ClientHello. On refusal, the name when one was read.
    async fn check(
        &self,
        guest: &mut TcpStream,
        dst: SocketAddrV4,
    ) -> Result<Checked, (Option<String>, GateError)> {
        if guest
            .local_addr()
            .is_ok_and(|local| local == SocketAddr::V4(dst))
        {
            return Err((None, GateError::NotRedirected));
        }
        let mut buf = Vec::with_capacity(2048);
        let hello = timeout(HELLO_TIMEOUT, read_hello(guest, &mut buf))
            .await
            .map_err(|_| (None, GateError::HelloTimeout(HELLO_TIMEOUT)))?
            .map_err(|e| (None, e))?;
        let sni = hello.sni.ok_or((None, GateError::NoSni))?;
        if !self.inner.policy.allows(&sni, dst.port()) {
            let port = dst.port();
            return Err((Some(sni.clone()), GateError::NotAllowed { sni, port }));
        }
        if !self.inner.table.is_granted(*dst.ip(), &sni) {
            let addr = *dst.ip();
            return Err((Some(sni.clone()), GateError::NotResolved { sni, addr }));
        }
        Ok(Checked {
            sni,
            dst,
            hello: buf,
        })
    }

    fn refuse(
        &self,
        guest: TcpStream,
        sni: Option<String>,
        dst: Option<SocketAddrV4>,
        reason: String,
    ) {
        // A reset, not a close: the guest's client fails at once instead of waiting for a
        // handshake reply that never comes.
        let _ = guest.set_zero_linger();
        drop(guest);
        self.inner.counts.refused.fetch_add(1, Ordering::Relaxed);
        let sni = sni.unwrap_or_else(|| "no SNI".to_owned());
        self.guest_log(|s| {
            tracing::info!(suppressed = s, sni = %sni, dst = ?dst, reason = %reason, "egress sni: connection refused")
        });
        self.send(EgressEvent::ConnectionRefused {
            sni,
            addr: dst.map(|d| *d.ip()),
            port: dst.map_or(0, |d| d.port()),
            reason,
        });
    }

    fn send(&self, event: EgressEvent) {
        if self.inner.events.try_send(event).is_err() {
            self.inner
                .counts
                .events_dropped
                .fetch_add(1, Ordering::Relaxed);
        }
    }

    fn guest_log(&self, line: impl FnOnce(u64)) {
        super::guest_log(&self.inner.log, line);
    }
}

/// Reads from `guest` into `buf` until it holds a complete ClientHello.
async fn read_hello(
    guest: &mut TcpStream,
    buf: &mut Vec<u8>,
) -> Result<client_hello::ClientHello, GateError> {
    let mut chunk = [0u8; 4096];
    loop {
        match client_hello::parse(buf) {
            Ok(hello) => return Ok(hello),
            Err(HelloError::Incomplete) => {}
            Err(e) => return Err(GateError::Hello(e)),
        }
        let room = MAX_HELLO_BYTES.saturating_sub(buf.len()).min(chunk.len());
        if room == 0 {
            return Err(GateError::Hello(HelloError::TooLong));
        }
        let n = guest
            .read(&mut chunk[..room])
            .await
            .map_err(GateError::Read)?;
        if n == 0 {
            return Err(GateError::Closed);
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

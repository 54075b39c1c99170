//! The sessions to the device that the proxy keeps open between requests: a small pool, so
//! that one Noise handshake serves many calls.
//!
//! # Why a pool and not a multiplexed session
//!
//! A session carries one exchange at a time (see `shared_proto::credential`). Requests that
//! run at once each take their own session: an idle one from the pool, or a new one (a relay
//! connection and a handshake) when none is idle. When an exchange ends in step, its session
//! goes back to the pool; at most [`MAX_IDLE_SESSIONS`] wait there, the rest are closed. So
//! the sessions open at once never exceed the requests in flight (at most
//! `super::MAX_CONNECTIONS`, within the relay's per-VM bound) plus the few idle ones, and there
//! are no streams within a session to bound or to starve one another.
//!
//! # What does not change
//!
//! Every session is made exactly as before: the relay greeting, Noise IK with the boot key,
//! the prologue binding the VM id and boot id. Only the handshake is shared; the device checks
//! and audits every request on its own. The pool lives in the sidecar's memory with the boot
//! key and dies with it, so no session outlives the boot.
//!
//! # Retiring sessions
//!
//! A session leaves the pool (is closed) when:
//! - the sidecar took a new identity (a clone of a snapshot, see `crate::identity`): a
//!   session made with the old boot key is never used again;
//! - its exchange did not end in step (a relay or device failure, an answer cut, anything
//!   unexpected): it is dropped, and the request that was in flight answers 502 if nothing had
//!   reached the agent yet;
//! - it has waited idle longer than [`POOL_IDLE`] (well under the relay's own idle cut);
//! - it has lived [`MAX_SESSION_AGE`], or carried `MAX_SESSION_EXCHANGES` exchanges: the next
//!   request gets a fresh handshake with fresh ephemeral keys, which is the rekeying, and keeps
//!   a session's nonces far from their limit;
//! - its relay stream is readable while idle: the relay or the device closed it (the device
//!   sends nothing between exchanges). This is checked with a zero-wait `poll` when the session
//!   is taken from the pool, so a relay that broke while the session was idle costs the next
//!   request nothing but a new handshake.

use std::io::{Read, Write};
use std::os::fd::AsFd;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout};

use super::channel::DeviceSession;
use super::{ProxyError, ProxyIdentity};
use crate::identity::IdentityCell;

/// The most idle sessions kept.
pub const MAX_IDLE_SESSIONS: usize = 4;
/// How long an idle session is kept.
pub const POOL_IDLE: Duration = Duration::from_secs(60);
/// How long a session is used at most.
pub const MAX_SESSION_AGE: Duration = Duration::from_secs(10 * 60);

/// A byte stream to the relay: vsock in the guest, a Unix socket in tests. Its file
/// descriptor lets the pool see whether an idle session was closed.
pub trait RelayStream: Read + Write + AsFd + Send {}

impl<T: Read + Write + AsFd + Send> RelayStream for T {}

/// The pool of idle sessions, and how to make a new one.
pub struct SessionPool<S, F> {
    identity: Arc<IdentityCell>,
    connect: Arc<F>,
    idle: Mutex<Vec<PooledSession<S>>>,
}

/// A session and the identity it was made with.
pub struct PooledSession<S> {
    session: DeviceSession<S>,
    identity: Arc<ProxyIdentity>,
}

impl<S> std::fmt::Debug for PooledSession<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledSession")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl<S> PooledSession<S> {
    /// The boot identity the session was made with (its key opens the session's envelopes).
    pub fn identity(&self) -> &Arc<ProxyIdentity> {
        &self.identity
    }
}

impl<S> std::ops::Deref for PooledSession<S> {
    type Target = DeviceSession<S>;
    fn deref(&self) -> &DeviceSession<S> {
        &self.session
    }
}

impl<S> std::ops::DerefMut for PooledSession<S> {
    fn deref_mut(&mut self) -> &mut DeviceSession<S> {
        &mut self.session
    }
}

impl<S, F> std::fmt::Debug for SessionPool<S, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SessionPool").finish_non_exhaustive()
    }
}

/// Whether nothing (no byte, no hang-up, no error) waits on an idle session's stream.
fn quiet<S: AsFd>(stream: &S) -> bool {
    let mut fds = [PollFd::new(stream.as_fd(), PollFlags::POLLIN)];
    matches!(nix::poll::poll(&mut fds, PollTimeout::ZERO), Ok(0))
}

impl<S, F> SessionPool<S, F>
where
    S: RelayStream,
    F: Fn() -> std::io::Result<S>,
{
    /// An empty pool that opens sessions for the current identity in `identity` over streams
    /// from `connect`.
    pub fn new(identity: Arc<IdentityCell>, connect: Arc<F>) -> Self {
        Self {
            identity,
            connect,
            idle: Mutex::new(Vec::new()),
        }
    }

    /// A session for one exchange, already begun: an idle one still fit for use, or a new one,
    /// always of the current identity.
    pub fn take(&self) -> Result<PooledSession<S>, ProxyError> {
        let identity = self.identity.current();
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some(mut session) = next else { break };
            if Arc::ptr_eq(&session.identity, &identity)
                && session.idle_since.elapsed() < POOL_IDLE
                && session.age() < MAX_SESSION_AGE
                && quiet(session.stream())
                && session.begin_exchange()
            {
                return Ok(session);
            }
        }
        let stream = (self.connect)().map_err(ProxyError::Relay)?;
        let session = DeviceSession::open(stream, &identity.boot_secret, &identity.boot_id)?;
        let mut session = PooledSession { session, identity };
        session.begin_exchange();
        Ok(session)
    }

    /// Hands back a session whose exchange has ended: kept when it ended in step and there is
    /// room, closed otherwise.
    pub fn give_back(&self, mut session: PooledSession<S>) {
        if !session.exchange_complete()
            || session.age() >= MAX_SESSION_AGE
            || !Arc::ptr_eq(&session.identity, &self.identity.current())
        {
            return;
        }
        session.idle_since = std::time::Instant::now();
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        // Drop the ones that have waited too long while we hold the lock anyway.
        idle.retain(|s| s.idle_since.elapsed() < POOL_IDLE);
        if idle.len() < MAX_IDLE_SESSIONS {
            idle.push(session);
        }
    }
}

//! vpod-sidecar: PID 1 inside every Nanoclaw microVM.
//!
//! It mounts the basics, reaps zombies, serves the vsock echo diagnostic and keeps a control
//! connection to the host. A later stage grows it into the agent runner (credential proxy, MCP
//! endpoint, starting the agent); the modules below are the places those parts slot into.
//!
//! # Boot sequence
//!
//! 1. [`init::mount_basics`]: `/proc` (proc), `/sys` (sysfs), `/dev` (devtmpfs), `/tmp` and
//!    `/run` (tmpfs), each skipped when already mounted. Failures are logged, not fatal.
//! 2. Logs go to `/dev/console` (the guest's serial port), one short line per event, through
//!    [`console::ConsoleLog`].
//! 3. [`init::spawn_reaper`] reaps every exited child.
//! 4. A boot id (16 random bytes) and an X25519 key pair are drawn from `getrandom`. The secret
//!    stays in this process's memory; the public key goes into `Hello`.
//! 5. [`echo::serve`] listens on vsock port [`shared_proto::ports::ECHO_PORT`] (any CID) on its
//!    own thread and echoes every byte of every accepted connection (up to
//!    [`echo::MAX_CONNECTIONS`] at once, one thread each) until EOF, then shuts down its write
//!    side.
//! 6. [`control::run`] connects to `(HOST_CID, CONTROL_PORT)`, retrying with capped exponential
//!    backoff ([`control::Backoff`], 50 ms doubling to 2 s), and runs a session:
//!    - send `GuestToHost::Hello { protocol_version, sidecar_version, boot_id,
//!      ephemeral_public_key }`;
//!    - read `HostToGuest` frames. The first must be `HelloAck` with our version (then the
//!      session is up) or `HelloReject` (log the reason, reset the VM). A version mismatch in
//!      either is a reject.
//!    - `EchoConnect { port }`: connect to `(HOST_CID, port)`; on success echo on a new thread
//!      until EOF, on failure answer `GuestToHost::Error`;
//!    - `RunAgent`, `AgentStdin`, `Signal`: answered with `GuestToHost::Error` (not in this
//!      stage);
//!    - `Shutdown`: sync the file systems and reset the VM with `reboot(RB_AUTOBOOT)`; the VMM
//!      sees the reset and exits 0.
//!
//!    A dropped connection, an I/O error, a malformed frame or a message out of order ends the
//!    session; it is logged and the sidecar reconnects with backoff.
//!
//! # The host's end-to-end check, step by step
//!
//! 1. The host accepts the sidecar on `<vmdir>/vsock.sock_1024` ([`CONTROL_PORT`]) and decodes
//!    `Hello`.
//! 2. It sends `HelloAck { protocol_version: PROTOCOL_VERSION }`.
//! 3. It listens on `<vmdir>/vsock.sock_<P>`, sends `EchoConnect { port: P }`, accepts the
//!    sidecar's connection and pushes 1 MiB through it while reading the echo concurrently
//!    (the sidecar reads and writes back in 64 KiB steps, so a host that only writes would
//!    stall once the socket buffers fill). It closes its write side and reads to EOF.
//! 4. It opens `<vmdir>/vsock.sock`, writes `CONNECT 1028\n` ([`ECHO_PORT`]), reads `OK <n>\n`,
//!    then pushes and reads back 1 MiB the same way.
//! 5. It sends `Shutdown`; the sidecar syncs and resets, and the VMM exits 0.
//!
//! # Design choices
//!
//! Plain std threads and blocking sockets, no async runtime: the sidecar handles a handful of
//! connections, and skipping tokio keeps the static binary small and its behaviour easy to
//! follow. The control and echo logic is generic over `Read + Write` streams so that the unit
//! tests run it over Unix sockets (AF_VSOCK loopback is not available on the build hosts); only
//! [`vsock`] touches AF_VSOCK.
//!
//! # Layout
//!
//! - [`init`]: PID 1 duties: mounts, the console, reaping, the VM reset.
//! - [`console`]: the `tracing` subscriber that writes short lines to the console.
//! - [`vsock`]: AF_VSOCK streams and listeners over raw sockets.
//! - [`control`]: the host connection: backoff, handshake, message dispatch.
//! - [`echo`]: the echo diagnostic.
//!
//! [`CONTROL_PORT`]: shared_proto::ports::CONTROL_PORT
//! [`ECHO_PORT`]: shared_proto::ports::ECHO_PORT

pub mod console;
pub mod control;
pub mod echo;
pub mod init;
pub mod vsock;

/// A stream whose write side can be closed while its read side stays open.
pub trait HalfClose {
    /// Shuts down the write side (the peer reads EOF).
    fn shutdown_write(&self) -> std::io::Result<()>;
}

impl HalfClose for std::os::unix::net::UnixStream {
    fn shutdown_write(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Write)
    }
}

/// Displays an error with its whole `source()` chain on one line.
#[derive(Debug)]
pub struct ErrorChain<'a>(pub &'a (dyn std::error::Error + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut cause = self.0.source();
        while let Some(c) = cause {
            write!(f, ": {c}")?;
            cause = c.source();
        }
        Ok(())
    }
}

//! vpod-sidecar: PID 1 inside every Nanoclaw microVM.
//!
//! It mounts the basics, reaps zombies, serves the vsock echo diagnostic, keeps a control
//! connection to the host and runs the agent: it starts it as an unprivileged user, streams its
//! output, feeds its stdin, forwards signals, and resets the VM once the agent's exit reached
//! the host. Later stages add the credential proxy and the MCP endpoint.
//!
//! # Boot sequence
//!
//! 1. `main` blocks SIGTERM in its thread before any other thread starts, so every thread
//!    inherits the mask (the agent does not: it clears its mask before `exec`).
//! 2. [`init::mount_basics`]: `/proc` (proc), `/sys` (sysfs), `/dev` (devtmpfs), `/tmp` and
//!    `/run` (tmpfs), each skipped when already mounted. Failures are logged, not fatal.
//! 3. Logs go to `/dev/console` (the guest's serial port), one short line per event, through
//!    [`console::ConsoleLog`].
//! 4. [`init::bring_up_loopback`] sets `IFF_UP` on `lo` (a warning if the kernel has no INET).
//! 5. [`init::crng_ready`] checks the CSPRNG with `getrandom(GRND_NONBLOCK)`. Nothing is
//!    credited when it is not ready (there is no secret seed in the image); the blocking
//!    `getrandom` below then waits for the kernel's jitter entropy.
//! 6. [`init::Reaper::start`] starts the reaper: it collects every exited child and hands the
//!    agent's status to the runner over a channel.
//! 7. A boot id (16 random bytes) and an X25519 key pair are drawn from `getrandom`. The secret
//!    stays in this process's memory; the public key goes into `Hello`.
//! 8. [`echo::serve`] listens on vsock port [`shared_proto::ports::ECHO_PORT`] (any CID) on its
//!    own thread and echoes every byte of every accepted connection (up to
//!    [`echo::MAX_CONNECTIONS`] at once, one thread each) until EOF, then shuts down its write
//!    side.
//! 9. [`files::serve`] listens on vsock port [`shared_proto::ports::FILES_PORT`] (any CID) on
//!    its own thread and serves the host's file copies into and out of the agent's image root,
//!    one connection at a time; before that root exists every request is answered `NotReady`.
//! 10. A `sigterm` thread waits for SIGTERM (the VMM or host asking the guest to stop): with an
//!     agent running it forwards SIGTERM to the agent's process group (the agent's exit then
//!     ends the VM as below); with none, it syncs and resets the VM.
//! 11. [`control::run`] connects to `(HOST_CID, CONTROL_PORT)`, retrying with capped
//!     exponential backoff ([`control::Backoff`], 50 ms doubling to 2 s), and runs a session:
//!     - send `GuestToHost::Hello { protocol_version, sidecar_version, boot_id,
//!       ephemeral_public_key }` (the same boot id on every reconnect);
//!     - read `HostToGuest` frames. The first must be `HelloAck` with our version (then the
//!       session is up and a writer thread starts sending the [`outbox::Outbox`]) or
//!       `HelloReject` (log the reason, reset the VM). A version mismatch in either is a
//!       reject.
//!     - `EchoConnect { port }`: connect to `(HOST_CID, port)`; on success echo on a new thread
//!       until EOF, on failure answer `GuestToHost::Error`;
//!     - `RunAgent`, `AgentStdin`, `Signal`: handled by [`agent::AgentRunner`] (see [`agent`]
//!       for the uid policy, the image root, the stdin EOF convention and signal checks);
//!     - `Shutdown`: sync the file systems and reset the VM with `reboot(RB_AUTOBOOT)`; the VMM
//!       sees the reset and exits 0.
//!
//!     A dropped connection, an I/O error, a malformed frame or a message out of order ends the
//!     session; it is logged and the sidecar reconnects with backoff. The agent keeps running
//!     meanwhile; its frames wait in the outbox (output under backpressure, see [`outbox`]) and
//!     go out, in order, on the next connection.
//! 12. **The agent's end.** When the agent exits, the runner kills what is left of its process
//!     group, drains both pipes to EOF and queues `AgentExited`. The writer sends it, half-closes
//!     the connection (`shutdown(SHUT_WR)`) and waits until the host closes its side (at most
//!     [`control::FLUSH_TIMEOUT`], 5 s), so the frame has reached the host; then the session
//!     ends with [`control::SessionEnd::AgentDone`] and the sidecar syncs and resets the VM
//!     (the VMM exits 0). If the connection was down when the agent ended, this happens after
//!     the reconnect.
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
//! # Known limits
//!
//! - Protocol v1 has no acknowledgements: a frame counts as sent once the socket accepted all
//!   of it. If the connection drops after that but before the host read it (the daemon dies
//!   with bytes in flight), the frame is lost; frames not yet written go out on the next
//!   connection. The final `AgentExited` is safer: the sidecar waits for the host to close.
//! - `AgentStdin` that the agent does not read fills a 64-message queue, then blocks the
//!   control reader (backpressure to the host); a `Signal` sent behind it waits too.
//! - A descendant that left the agent's process group (its own `setsid`) and keeps the
//!   output pipes open delays `AgentExited` until it exits or the host stops the VM.
//!
//! # Layout
//!
//! - [`init`]: PID 1 duties: mounts, the console, `lo`, the entropy check, the reaper, the VM
//!   reset.
//! - [`console`]: the `tracing` subscriber that writes short lines to the console.
//! - [`vsock`]: AF_VSOCK streams and listeners over raw sockets.
//! - [`control`]: the host connection: backoff, handshake, message dispatch, the writer.
//! - [`outbox`]: the frames waiting for the host, kept across reconnects, with backpressure.
//! - [`agent`]: the agent runner.
//! - [`rootfs`]: the agent's image root (image and scratch disks joined by overlayfs, with
//!   `/proc`, `/sys`, a small `/dev` and `/tmp` inside) and who the agent runs as in it.
//! - [`echo`]: the echo diagnostic.
//! - [`files`]: the file copy server (tar streams in and out of the agent's image root).
//! - [`proxy`]: the agent's local credential proxy on `127.0.0.1` and the sidecar's end of the
//!   end-to-end Noise session with the user's device.
//! - [`mcp`]: the agent's local MCP endpoint (streamable HTTP on 127.0.0.1, and the
//!   `mcp-stdio` shim), forwarding to the host's gateway with an early filter.
//!
//! [`CONTROL_PORT`]: shared_proto::ports::CONTROL_PORT
//! [`ECHO_PORT`]: shared_proto::ports::ECHO_PORT

pub mod agent;
pub mod console;
pub mod control;
pub mod echo;
pub mod files;
pub mod identity;
pub mod init;
pub mod mcp;
pub mod net;
pub mod outbox;
pub mod proxy;
pub mod rootfs;
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

/// A control connection: a stream that a reader and a writer thread share.
pub trait ControlStream:
    std::io::Read + std::io::Write + HalfClose + Send + Sized + 'static
{
    /// Another handle to the same connection (for the writer thread).
    fn try_clone(&self) -> std::io::Result<Self>;
    /// Shuts down both directions, waking any thread blocked on the connection.
    fn shutdown_both(&self) -> std::io::Result<()>;
}

impl ControlStream for std::os::unix::net::UnixStream {
    fn try_clone(&self) -> std::io::Result<Self> {
        std::os::unix::net::UnixStream::try_clone(self)
    }

    fn shutdown_both(&self) -> std::io::Result<()> {
        self.shutdown(std::net::Shutdown::Both)
    }
}

pub use shared_proto::ErrorChain;

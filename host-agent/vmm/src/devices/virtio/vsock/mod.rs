//! virtio-vsock (virtio spec 1.2 §5.10) with a Firecracker-compatible hybrid backend: guest
//! streams are relayed to Unix sockets on the host.
//!
//! - Host-initiated: a host process connects to `<uds_path>`, writes `CONNECT <port>\n` and,
//!   once the guest accepts, reads `OK <hostport>\n`; then bytes flow both ways.
//! - Guest-initiated: a guest connection to host port P is relayed to the listener at
//!   `<uds_path>_<P>`; if nothing listens there the guest gets `OP_RST`.
//!
//! # Layout
//! - [`device`]: the virtio device: walks the rx/tx/event queues, validates every guest packet,
//!   and is generic over its backend and over how it interrupts the guest, so tests and fuzzers
//!   drive it with a mock queue.
//! - [`packet`]: the plain packet header the device and backend exchange.
//! - [`unix`]: the hybrid backend ([`VsockMuxer`]) and its per-connection state machine.
//! - [`event_handler`]: the device thread's epoll loop and the transport-facing front end.
//!
//! The guest is hostile: every malformed packet is dropped or answered with `OP_RST` and counted
//! in [`VsockMetrics`]; log lines it can trigger are rate-limited.

pub mod device;
pub mod event_handler;
pub mod packet;
pub mod unix;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

pub use device::VsockDevice;
pub use event_handler::{VsockFrontend, VsockWorker};
pub use packet::VsockHeader;
pub use unix::VsockMuxer;

/// Spec numbers (virtio spec 1.2 §5.10) and our own limits.
mod defs {
    use std::time::Duration;

    /// Virtio device type of vsock.
    pub const DEVICE_TYPE: u32 = 19;
    /// Queue indexes.
    pub const RXQ: usize = 0;
    pub const TXQ: usize = 1;
    pub const EVQ: usize = 2;
    /// Number of queues and their maximum size.
    pub const NUM_QUEUES: usize = 3;
    pub const QUEUE_SIZE: u16 = 256;
    /// The host's CID.
    pub const HOST_CID: u64 = 2;
    /// Largest payload one packet may carry, both ways.
    pub const MAX_PKT_PAYLOAD: u32 = 64 * 1024;
    /// Event id on the event queue: the transport was reset (after a restore).
    pub const EVENT_TRANSPORT_RESET: u32 = 0;
    /// Socket type: stream (the only one we support).
    pub const TYPE_STREAM: u16 = 1;
    /// Operations.
    pub const OP_REQUEST: u16 = 1;
    pub const OP_RESPONSE: u16 = 2;
    pub const OP_RST: u16 = 3;
    pub const OP_SHUTDOWN: u16 = 4;
    pub const OP_RW: u16 = 5;
    pub const OP_CREDIT_UPDATE: u16 = 6;
    pub const OP_CREDIT_REQUEST: u16 = 7;
    /// `OP_SHUTDOWN` flags: the sender will receive / send no more.
    pub const SHUTDOWN_F_RECV: u32 = 1;
    pub const SHUTDOWN_F_SEND: u32 = 2;
    /// Receive buffer we advertise per connection (guest to host bytes we hold at most).
    pub const CONN_BUF_ALLOC: u32 = 256 * 1024;
    /// Send a credit update once this many forwarded bytes went unreported.
    pub const CREDIT_UPDATE_THRESHOLD: u32 = CONN_BUF_ALLOC / 4;
    /// Cap on live connections.
    pub const MAX_CONNECTIONS: usize = 1024;
    /// Cap on accepted host streams that have not yet sent their `CONNECT` line.
    pub const MAX_PENDING_HANDSHAKES: usize = 64;
    /// Cap on queued resets for packets that match no connection.
    pub const MAX_PENDING_RESETS: usize = 256;
    /// Longest accepted `CONNECT <port>\n` line.
    pub const MAX_CONNECT_LINE: usize = 32;
    /// A host stream must send its `CONNECT` line within this time.
    pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);
    /// The guest must answer our `OP_REQUEST` within this time.
    pub const GUEST_RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);
    /// After a shutdown, pending data must drain within this time before we reset.
    pub const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);
    /// First local (host) port handed to host-initiated connections.
    pub const FIRST_LOCAL_PORT: u32 = 1 << 30;
}

/// Errors of the vsock device and its backend.
#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    /// Binding the host-side Unix listener failed.
    #[error("cannot bind vsock listener {path}")]
    Bind {
        /// The socket path.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Creating the backend's epoll instance failed.
    #[error("cannot create vsock epoll")]
    Epoll(#[source] std::io::Error),
    /// Registering a file descriptor with epoll failed.
    #[error("cannot register fd with vsock epoll")]
    EpollCtl(#[source] std::io::Error),
    /// Creating an eventfd failed.
    #[error("cannot create eventfd")]
    EventFd(#[source] std::io::Error),
    /// Waiting on the device's epoll failed.
    #[error("vsock epoll wait failed")]
    EpollWait(#[source] std::io::Error),
    /// Spawning the device thread failed.
    #[error("cannot spawn vsock thread")]
    Spawn(#[source] std::io::Error),
}

crate::devices::virtio::metrics::device_metrics! {
    /// Counters for the vsock device. Every failure a guest can cause is counted here rather than
    /// logged each time.
    pub struct VsockMetrics => VsockMetricsSnapshot {
        /// Packets delivered to the guest (rx queue).
        rx_packets,
        /// Payload bytes delivered to the guest.
        rx_bytes,
        /// Packets taken from the guest (tx queue), valid or not.
        tx_packets,
        /// Payload bytes accepted from the guest.
        tx_bytes,
        /// Tx descriptor chains that did not parse (bad addresses, lengths, flags, loops).
        tx_malformed,
        /// Packets with a wrong source or destination CID.
        tx_bad_cid,
        /// Packets with an unknown socket type or operation.
        tx_unsupported,
        /// Rx descriptor chains that did not parse; the buffer is returned unused.
        rx_malformed,
        /// Connections established (guest-initiated: when we connected to the host listener;
        /// host-initiated: when the guest accepted).
        conns_opened,
        /// Connections ended by a reset (ours or the guest's).
        conns_reset,
        /// Guest connection requests with no host listener.
        conns_refused,
        /// Connection requests refused because of the connection cap.
        conn_limit_hits,
        /// Guest packets that exceeded the credit we advertised.
        credit_violations,
        /// Host streams closed for a bad, late or oversized `CONNECT` line.
        handshake_failures,
        /// Resets for unknown connections dropped because their queue was full.
        rst_queue_overflows,
    }
}

/// The host side of the device: where guest streams go. The device hands it validated guest
/// packets and asks it for packets to deliver.
pub trait VsockBackend: Send {
    /// Handles a validated guest packet. `payload` is the packet's data (empty unless `OP_RW`).
    fn send_pkt(&mut self, hdr: &VsockHeader, payload: &[u8]);
    /// Produces the next packet for the guest, writing its payload into `buf` (`hdr.len` bytes).
    /// `None` when nothing is pending.
    fn recv_pkt(&mut self, buf: &mut [u8]) -> Option<VsockHeader>;
    /// Whether [`VsockBackend::recv_pkt`] would produce a packet.
    fn has_pending_rx(&self) -> bool;
    /// A file descriptor that becomes readable when the backend has host-side work.
    fn as_raw_fd(&self) -> std::os::fd::RawFd;
    /// Does the host-side work signalled by [`VsockBackend::as_raw_fd`] without blocking.
    fn process_events(&mut self);
    /// Expires timers (handshakes, unanswered requests, lingering closes).
    fn tick(&mut self, now: std::time::Instant);
    /// Drops every connection: the driver reset the device.
    fn reset(&mut self);
}

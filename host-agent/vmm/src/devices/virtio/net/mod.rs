//! virtio-net (virtio spec 1.2 §5.1) backed by a host TAP device.
//!
//! One receive queue (index 0) and one transmit queue (index 1), no control queue. The device
//! offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC`, `VIRTIO_RING_F_EVENT_IDX`, the checksum and
//! TCP segmentation offloads in both directions (`CSUM`, `GUEST_CSUM`, `HOST_TSO4`, `HOST_TSO6`,
//! `GUEST_TSO4`, `GUEST_TSO6`) and mergeable receive buffers (`MRG_RXBUF`), and nothing else:
//! no ECN or UDP offloads, no indirect descriptors, no link status, no MTU, no control queue (so
//! the negotiated offloads hold for the device's life). The config space holds the VM's MAC
//! address (six bytes, read-only); every later field reads as zero.
//!
//! # Why the offloads
//! Without them a guest sends and receives frames of at most 1514 bytes, and every one costs
//! the device a pass and, in batches, the guest an interrupt: each a VM exit through two
//! hypervisors in our nested machines. With them a TCP stream moves in packets of up to 64 KiB
//! whose checksums and segments the host kernel (or the guest, on receive) computes, so a
//! stream of 16 MiB takes a few hundred packets instead of over ten thousand frames.
//! Mergeable receive buffers let a guest post small buffers (Linux posts about 1.5 to 4 KiB
//! each) and still receive 64 KiB packets, spread over several of them
//! ([`device`] explains how they reach the guest at once); without them a guest that takes
//! `GUEST_TSO` must post 64 KiB for every buffer.
//!
//! # Notifications
//! With `EVENT_IDX` (which Linux always takes) the guest kicks a queue only when it publishes
//! the buffer the device asked about, and the device interrupts only when the used index passes
//! the guest's `used_event`. So a stream of frames costs a kick and an interrupt per batch, not
//! per frame: under nested virtualization each is a VM exit through two hypervisors. The device
//! asks for the next kick (writes `avail_event`) whenever a queue runs dry, then looks once
//! more, so a buffer published in between is not left waiting for a kick that will not come. A
//! queue that is unusable (a bogus available index) ends the pass without asking: the device
//! never spins on a ring it cannot read.
//!
//! # The virtio-net header
//! With `VERSION_1` every packet in either queue is a 12-byte `virtio_net_hdr_v1` (flags,
//! gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers) and then the frame. The
//! TAP is opened with `IFF_VNET_HDR` and the same 12-byte header ([`tap`]), so a packet crosses
//! the device whole, but no header passes unchecked ([`header`]):
//! - on transmit, the guest's header is checked against the offloads the guest negotiated and
//!   rebuilt from the checked fields (flags, a checksum place inside the frame, TCP
//!   segmentation with a non-zero segment size); a packet whose header fails is dropped and
//!   counted (`tx_bad_header`). The host kernel then checks the header once more as the TAP
//!   takes the packet;
//! - on receive, the TAP's header is checked against what the guest negotiated (a packet that
//!   needs an offload the guest did not take is dropped and counted, `rx_bad_header`), and
//!   `num_buffers` is set to the number of receive buffers the packet took.
//!
//! # Bounds
//! - A frame (without the header) is 14 to [`MAX_FRAME_LEN`] (65550) bytes, which holds a TCP
//!   super-packet of 64 KiB. A larger transmit chain is dropped: returned to the used ring with
//!   length 0, counted, and logged at a bounded rate; nothing reaches the TAP. A larger frame read from the TAP is dropped the same
//!   way. Packets move through two buffers of fixed size allocated once, so no guest-chosen
//!   length is ever allocated.
//! - A chain is read up to [`MAX_CHAIN_DESCRIPTORS`] descriptors; a longer one, a loop, a `next`
//!   index outside the table, a descriptor of the wrong direction (device-writable where the
//!   device reads, or the other way round) or one reaching outside guest memory drops the chain
//!   (used length 0) and the device goes on with the next.
//! - Without mergeable buffers, a receive chain too small for the header and the frame: the
//!   frame is dropped and the chain returned with used length 0 (Linux counts an
//!   `rx_length_error` and refills). With them, a packet takes as many chains as it needs, and
//!   one that would need more than the whole queue holds is dropped (`rx_no_room`), its chains
//!   returned with used length 0. Without `VIRTIO_NET_F_MTU` a Linux guest uses an MTU of
//!   1500, so the host side keeps the TAP's MTU at 1500 (larger packets reach the guest only as
//!   TCP super-packets, which it negotiated).
//! - The device holds at most **one** received packet of its own. When the guest has too few
//!   receive buffers, that packet waits and the device stops reading the TAP; further frames wait in the
//!   TAP's kernel queue, which the host kernel bounds (`txqueuelen`) and drops beyond. The device
//!   goes back to the TAP when the guest notifies the receive queue, so a guest that posts no
//!   buffers costs no CPU.
//! - One pass serves at most [`MAX_CHAINS_PER_PASS`] chains per queue, so neither direction (nor
//!   a guest that keeps a queue full) starves the other or the thread's stop and reset commands.
//!
//! # What the guest can and cannot do
//! The guest can send any Ethernet frame of a legal size from any source address (the MAC in
//! the config space is what it is told, not a filter), and receives whatever the host side of
//! the TAP delivers. Where those frames go is the host's business: the TAP lives in a network
//! namespace the daemon makes for the VM, and the policy on that side decides what leaves it.
//! The guest cannot make the device allocate, block, spin or panic, cannot hand the host kernel
//! a virtio-net header the device did not check and rebuild, cannot reach the TAP's control ioctls (the thread's seccomp
//! filter allows `read`, `write`, `epoll_wait` and `close`, no `ioctl`), and cannot flood the log:
//! every failure it can cause is counted in [`NetMetrics`] and logged at a bounded rate.
//!
//! # Layout
//! - [`chain`]: one descriptor chain read as a transmit packet, or filled with a received one
//!   or a part of it. Every bound a guest could break is checked there.
//! - [`header`]: the virtio-net header, and its checks in each direction.
//! - [`device`]: the virtio device: both queues, the pending received packet, mergeable
//!   buffers, the used ring and interrupts. Generic over the [`NetBackend`] and the [`Interrupt`](super::mmio::Interrupt),
//!   so tests and the fuzzer drive it on mock queues with no TAP and no threads.
//! - [`tap`]: [`Tap`], the backend on a host TAP device.
//! - [`event_handler`]: the device thread's epoll loop and the transport-facing front end.

pub mod chain;
pub mod device;
pub mod event_handler;
pub mod header;
pub mod tap;

#[cfg(test)]
pub(crate) mod test_utils;
#[cfg(test)]
mod tests;

pub use device::NetDevice;
pub use event_handler::{NetFrontend, NetWorker};
pub use tap::Tap;

/// Size of `struct virtio_net_hdr_v1`, which precedes every frame with `VIRTIO_F_VERSION_1`.
pub const VNET_HDR_LEN: usize = 12;
/// Largest Ethernet frame (without the virtio-net header) the device moves either way.
pub const MAX_FRAME_LEN: usize = 65550;
/// Smallest Ethernet frame the device sends: the Ethernet header (the TAP refuses less).
pub const MIN_FRAME_LEN: usize = 14;
/// Most descriptors the device reads from one chain. Linux uses one or two per frame without
/// scatter-gather offloads; `virtio-queue` already stops a chain after the queue size (or an
/// indirect table's size, up to 65535), and this bounds the work per chain further.
pub const MAX_CHAIN_DESCRIPTORS: usize = 64;
/// Most chains served per queue in one pass before the device thread checks its other events.
pub const MAX_CHAINS_PER_PASS: usize = QUEUE_SIZE as usize;
/// The size of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Receive queue index.
pub const RX_QUEUE: usize = 0;
/// Transmit queue index.
pub const TX_QUEUE: usize = 1;
/// Number of queues: one receive, one transmit.
pub const NUM_QUEUES: usize = 2;

/// Spec numbers (virtio spec 1.2 §5.1).
pub(crate) mod defs {
    /// Virtio device type of a network device.
    pub const DEVICE_TYPE: u32 = 1;
    /// The device takes packets with a partial checksum (`NEEDS_CSUM`).
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// The driver takes packets with a partial checksum, or one marked verified.
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in its config space.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    /// The driver takes TCPv4 super-packets.
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// The driver takes TCPv6 super-packets.
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// The device takes TCPv4 super-packets.
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    /// The device takes TCPv6 super-packets.
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    /// The device may spread a received packet over several receive buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
    /// Every offload the device offers.
    pub const OFFLOADS: u64 = VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6;
    /// Config space: `mac` (6 bytes). `status`, `max_virtqueue_pairs`, `mtu` and the rest need
    /// features that are not offered, and read as zero.
    pub const CONFIG_LEN: usize = 6;
    /// Offset of `num_buffers` in `virtio_net_hdr_v1`.
    pub const NUM_BUFFERS_OFFSET: usize = 10;
}

/// Errors of setting up a network device and of its thread.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The TAP name is not acceptable.
    #[error("invalid TAP name {0:?}")]
    TapName(String),
    /// No interface of that name exists in the VMM's network namespace.
    #[error("no network interface {0:?} in this network namespace (the TAP must exist first)")]
    TapMissing(String),
    /// Opening `/dev/net/tun` failed.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// Attaching to the TAP failed (not a TAP, busy, or not ours to attach to).
    #[error("cannot attach to TAP {name:?}")]
    Attach {
        /// The TAP's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Setting the TAP's virtio-net header size or offloads failed.
    #[error("cannot set the virtio-net header and offloads of TAP {name:?}")]
    Offloads {
        /// The TAP's name.
        name: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The MAC address is multicast or all zero.
    #[error("MAC address must be unicast and not all zero")]
    Mac,
    /// Creating the device thread's epoll instance failed.
    #[error("cannot create net epoll")]
    Epoll(#[source] std::io::Error),
    /// Registering a file descriptor with epoll failed.
    #[error("cannot register fd with net epoll")]
    EpollCtl(#[source] std::io::Error),
    /// Waiting on the device thread's epoll failed.
    #[error("net epoll wait failed")]
    EpollWait(#[source] std::io::Error),
    /// Spawning the device thread failed.
    #[error("cannot spawn net thread")]
    Spawn(#[source] std::io::Error),
}

/// The host side of the network device: a source and sink of packets, each a 12-byte
/// virtio-net header ([`VNET_HDR_LEN`]) and then an Ethernet frame.
pub trait NetBackend: Send {
    /// Reads one packet into `buf` and returns its length, header included. A packet longer
    /// than `buf` may be cut to `buf.len()` (the device passes a buffer one byte longer than
    /// the header and [`MAX_FRAME_LEN`], so a full buffer means an oversized frame).
    /// `ErrorKind::WouldBlock` when no packet is waiting.
    fn recv_packet(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one packet, header included (a header the device checked and rebuilt).
    /// `ErrorKind::WouldBlock` when the host cannot take it now (the device then drops it, as a
    /// congested link would).
    fn send_packet(&mut self, packet: &[u8]) -> std::io::Result<()>;
}

crate::devices::virtio::metrics::device_metrics! {
    /// Counters for the network device. Every failure a guest can cause is counted here rather
    /// than logged each time.
    pub struct NetMetrics => NetMetricsSnapshot {
        /// Frames taken from the transmit queue and written to the backend.
        tx_frames,
        /// Bytes of those frames (without the virtio-net header).
        tx_bytes,
        /// Transmit chains dropped for their layout: wrong direction, outside guest memory,
        /// too long, cut short, too short for the header or a minimal frame.
        tx_malformed,
        /// Transmit chains dropped because their frame is over `MAX_FRAME_LEN`.
        tx_oversized,
        /// Transmit packets dropped for their virtio-net header: a flag, checksum place or
        /// segmentation the device does not take (see `header::check_tx`).
        tx_bad_header,
        /// Frames the backend refused (full, down, or an error).
        tx_backend_errors,
        /// Frames delivered to the guest.
        rx_frames,
        /// Bytes of those frames (without the virtio-net header).
        rx_bytes,
        /// Frames from the backend dropped for being over `MAX_FRAME_LEN` (or empty).
        rx_oversized,
        /// Receive chains returned unused for their layout (wrong direction, outside guest
        /// memory, too long, cut short).
        rx_malformed,
        /// Frames dropped because the guest's buffers were too small for them.
        rx_no_room,
        /// Packets from the backend dropped because the guest did not negotiate the offload
        /// their header asks of it (see `header::check_rx`).
        rx_bad_header,
        /// Backend read errors other than "no frame waiting".
        rx_backend_errors,
        /// Times a queue itself was unusable: an available index too far ahead, or a chain
        /// head outside the queue.
        queue_errors,
    }
}

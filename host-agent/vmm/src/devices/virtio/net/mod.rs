//! virtio-net (virtio spec 1.2 §5.1) backed by a host TAP device.
//!
//! One receive queue (index 0) and one transmit queue (index 1), no control queue. The device
//! offers `VIRTIO_F_VERSION_1`, `VIRTIO_NET_F_MAC` and `VIRTIO_RING_F_EVENT_IDX` and nothing
//! else: no checksum or segmentation offloads, no mergeable receive buffers, no indirect
//! descriptors, no link status, no MTU. The config space holds the VM's MAC address (six bytes,
//! read-only); every later field reads as zero.
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
//! With `VERSION_1` every frame in either queue is preceded by a 12-byte `virtio_net_hdr_v1`
//! (flags, gso_type, hdr_len, gso_size, csum_start, csum_offset, num_buffers). The TAP is opened
//! **without** `IFF_VNET_HDR`, so the host kernel never parses a header the guest wrote:
//! - on transmit the device skips the guest's 12 header bytes without reading their meaning
//!   (no offload was negotiated, so a conforming guest leaves them zero; a guest that sets
//!   checksum or GSO fields only sends its own frame as it is) and writes the bare Ethernet
//!   frame to the TAP;
//! - on receive the device writes a header of its own (all zero but `num_buffers` = 1) before
//!   the frame.
//!
//! # Bounds
//! - A frame (without the header) is 14 to [`MAX_FRAME_LEN`] (65550) bytes. A larger transmit
//!   chain is dropped: returned to the used ring with length 0, counted, and logged at a
//!   bounded rate; nothing reaches the TAP. A larger frame read from the TAP is dropped the same
//!   way. Frames move through two buffers of fixed size allocated once, so no guest-chosen
//!   length is ever allocated.
//! - A chain is read up to [`MAX_CHAIN_DESCRIPTORS`] descriptors; a longer one, a loop, a `next`
//!   index outside the table, a descriptor of the wrong direction (device-writable where the
//!   device reads, or the other way round) or one reaching outside guest memory drops the chain
//!   (used length 0) and the device goes on with the next.
//! - A receive chain too small for the header and the frame: the frame is dropped and the
//!   chain returned with used length 0 (Linux counts an `rx_length_error` and refills).
//!   Without `VIRTIO_NET_F_MTU` or mergeable buffers a Linux guest uses an MTU of 1500 and
//!   posts buffers for frames of up to 1518 bytes, so the host side should keep the TAP's MTU
//!   at 1500; larger frames from it are dropped this way and counted in `rx_no_room`.
//! - The device holds at most **one** received frame of its own. When the guest has no receive
//!   buffer, that frame waits and the device stops reading the TAP; further frames wait in the
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
//! The guest cannot make the device allocate, block, spin or panic, cannot make the host kernel
//! parse a virtio-net header, cannot reach the TAP's control ioctls (the thread's seccomp
//! filter allows `read`, `write`, `epoll_wait` and `close`, no `ioctl`), and cannot flood the log:
//! every failure it can cause is counted in [`NetMetrics`] and logged at a bounded rate.
//!
//! # Layout
//! - [`chain`]: one descriptor chain read as a transmit frame, or filled with a received one.
//!   Every bound a guest could break is checked there.
//! - [`device`]: the virtio device: both queues, the pending received frame, the used ring and
//!   interrupts. Generic over the [`NetBackend`] and the [`Interrupt`](super::mmio::Interrupt),
//!   so tests and the fuzzer drive it on mock queues with no TAP and no threads.
//! - [`tap`]: [`Tap`], the backend on a host TAP device.
//! - [`event_handler`]: the device thread's epoll loop and the transport-facing front end.

pub mod chain;
pub mod device;
pub mod event_handler;
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
    /// The device has a MAC address in its config space.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
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

/// The host side of the network device: a source and sink of whole Ethernet frames, without
/// any virtio-net header.
pub trait NetBackend: Send {
    /// Reads one frame into `buf` and returns its length. A frame longer than `buf` may be cut
    /// to `buf.len()` (the device passes a buffer one byte longer than [`MAX_FRAME_LEN`], so a
    /// full buffer means an oversized frame). `ErrorKind::WouldBlock` when no frame is waiting.
    fn recv_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize>;
    /// Sends one frame. `ErrorKind::WouldBlock` when the host cannot take it now (the device
    /// then drops it, as a congested link would).
    fn send_frame(&mut self, frame: &[u8]) -> std::io::Result<()>;
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
        /// Frames dropped because the guest's buffer was too small for them.
        rx_no_room,
        /// Backend read errors other than "no frame waiting".
        rx_backend_errors,
        /// Times a queue itself was unusable: an available index too far ahead, or a chain
        /// head outside the queue.
        queue_errors,
    }
}

//! The virtio-net device: moves frames between the two queues and a [`NetBackend`].
//!
//! [`NetDevice::process_tx`] takes transmit chains, has [`chain::read_tx_packet`] copy each
//! packet into a fixed buffer, checks and rebuilds its header ([`header::check_tx`]), hands it to
//! the backend and completes the chain (used length 0: the device writes nothing into a transmit
//! buffer). [`NetDevice::process_rx`] reads packets from the backend into a second fixed buffer,
//! checks their header against what the guest negotiated ([`header::check_rx`]) and writes each
//! into the next receive chain, or, with mergeable receive buffers, over as many chains as it
//! takes. A packet read while the guest has too few receive buffers stays in that buffer (the
//! *pending* packet) and the device reads nothing more from the backend until the guest adds
//! buffers: at most one packet is held, and a guest that posts none makes the thread sleep, not
//! spin.
//!
//! # A packet over several chains (`VIRTIO_NET_F_MRG_RXBUF`)
//! The chains of one packet must reach the guest's used ring at once: a driver that found the
//! first (whose header says how many follow) before the rest would drop the packet. So the
//! device writes the packet into the chains first, then every used element, and publishes the
//! used index once, after them (`virtio-queue`'s `add_used` publishes the index with each
//! element, so the elements but the last are written here and the last through `add_used`).
//! For the same reason the receive queue's interrupts are decided here ([`rx_needs_interrupt`],
//! the `EVENT_IDX` rule of the spec) rather than by `virtio-queue`, which counts only the
//! elements it added itself. When the guest runs out of buffers in the middle of a packet, the
//! chains taken for it are given back (the available index steps back) and the packet waits.
//! A packet that would need more chains than the queue holds can never fit and is dropped.
//!
//! The queues are walked with `QueueOwnedT::iter` rather than `pop_descriptor_chain`, which logs
//! through the `log` crate each time the guest publishes a bogus available index; here that is
//! counted and logged at a bounded rate.
//!
//! Generic over the backend and the [`Interrupt`], so tests and the fuzzer run it on mock queues
//! with no threads, no KVM and no TAP.

use crate::memory::GuestRam;
use std::num::Wrapping;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::chain::{self, ChainError, NumBuffersAt};
use super::header::{self, Offloads};
use super::{
    MAX_CHAIN_DESCRIPTORS, MAX_CHAINS_PER_PASS, MAX_FRAME_LEN, NUM_QUEUES, NetBackend, NetMetrics,
    QUEUE_SIZE, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN, defs,
};
use crate::devices::virtio::RateLimitedLog;
use crate::devices::virtio::mmio::{ActivateError, INT_VRING, Interrupt, VIRTIO_RING_F_EVENT_IDX};

/// Limits for the log lines a guest can trigger, one per kind, per device (so tests can count
/// what got through).
#[derive(Debug, Default)]
struct LogLimits {
    tx_dropped: RateLimitedLog,
    rx_dropped: RateLimitedLog,
    backend: RateLimitedLog,
    queue: RateLimitedLog,
}

struct Active {
    mem: GuestRam,
    /// Receive, then transmit ([`RX_QUEUE`], [`TX_QUEUE`]).
    queues: [Queue; NUM_QUEUES],
    /// What the guest may leave to the device on transmit.
    tx_offloads: Offloads,
    /// What the guest takes on receive.
    rx_offloads: Offloads,
    /// Whether a received packet may span several chains (`VIRTIO_NET_F_MRG_RXBUF`).
    mergeable: bool,
    /// The receive queue's used index when its interrupt was last decided.
    rx_signalled: Wrapping<u16>,
}

/// What one receive pass ended on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RxState {
    /// The backend has no frame waiting (or the device is not active).
    Idle,
    /// A frame is pending and the guest has no receive buffer: wait for a receive-queue notify.
    WaitingForBuffers,
    /// The pass stopped at [`MAX_CHAINS_PER_PASS`]; more frames may be waiting. Call again.
    More,
}

/// A virtio-net device over a [`NetBackend`].
pub struct NetDevice<B, I> {
    backend: B,
    interrupt: I,
    metrics: Arc<NetMetrics>,
    active: Option<Active>,
    /// The transmit packet (header and frame) being copied out of guest memory.
    tx_buf: Vec<u8>,
    /// The received packet; its first `rx_pending` bytes are a packet (header and frame)
    /// waiting for guest buffers, its header already checked.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    descs: Vec<Descriptor>,
    /// The chains (head, used length) a merged packet took so far.
    merged: Vec<(u16, u32)>,
    logs: LogLimits,
}

impl<B, I> std::fmt::Debug for NetDevice<B, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetDevice")
            .field("active", &self.active.is_some())
            .field("rx_pending", &self.rx_pending)
            .finish()
    }
}

impl<B: NetBackend, I: Interrupt> NetDevice<B, I> {
    /// A device over `backend`, not yet activated.
    pub fn new(backend: B, interrupt: I, metrics: Arc<NetMetrics>) -> Self {
        Self {
            backend,
            interrupt,
            metrics,
            active: None,
            tx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN],
            // One byte more than the largest packet: a read that fills it was oversized.
            rx_buf: vec![0; VNET_HDR_LEN + MAX_FRAME_LEN + 1],
            rx_pending: None,
            descs: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS + 1),
            merged: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            logs: LogLimits::default(),
        }
    }

    /// Takes the receive and transmit queues the driver set up.
    pub fn activate(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok::<[Queue; NUM_QUEUES], _>([rx, tx]) = queues.try_into() else {
            return Err(ActivateError::QueueCount {
                expected: NUM_QUEUES,
                got,
            });
        };
        const { assert!(RX_QUEUE == 0 && TX_QUEUE == 1) };
        let mut queues = [rx, tx];
        if acked_features & VIRTIO_RING_F_EVENT_IDX != 0 {
            for q in &mut queues {
                q.set_event_idx(true);
            }
        }
        let rx_signalled = Wrapping(queues[RX_QUEUE].next_used());
        self.active = Some(Active {
            mem,
            queues,
            tx_offloads: Offloads::host(acked_features),
            rx_offloads: Offloads::guest(acked_features),
            mergeable: acked_features & defs::VIRTIO_NET_F_MRG_RXBUF != 0,
            rx_signalled,
        });
        Ok(())
    }

    /// The receive and transmit queues, in that order, once activated (their positions, for a
    /// snapshot).
    pub fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    /// Drops the queues and any pending frame (the driver reset the device).
    pub fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The length of the received packet (header and frame) waiting for guest buffers, if any.
    pub fn rx_pending(&self) -> Option<usize> {
        self.rx_pending
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably.
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Log lines the device's rate limits let through so far.
    #[cfg(test)]
    pub(crate) fn log_lines_passed(&self) -> u64 {
        let l = &self.logs;
        [&l.tx_dropped, &l.rx_dropped, &l.backend, &l.queue]
            .iter()
            .map(|l| l.passed())
            .sum()
    }

    /// Sends the frames the guest queued, at most [`MAX_CHAINS_PER_PASS`] of them. Returns
    /// whether the pass stopped at that bound (more may be waiting; call again).
    pub fn process_tx(&mut self) -> bool {
        let Self {
            backend,
            interrupt,
            metrics,
            active,
            tx_buf,
            descs,
            logs,
            ..
        } = self;
        let Some(Active {
            mem,
            queues: [_, tx],
            tx_offloads,
            ..
        }) = active.as_mut()
        else {
            return false;
        };
        let mut used_any = false;
        let mut served = 0;
        let more = loop {
            if served == MAX_CHAINS_PER_PASS {
                break true;
            }
            let chain = match next_chain(tx, mem, metrics, &logs.queue) {
                Next::Chain(chain) => chain,
                // Drained: ask for the next kick; a chain that came meanwhile is served in the
                // next pass.
                Next::Empty => break rearm(tx, mem, metrics, &logs.queue),
                Next::Unusable => break false,
            };
            served += 1;
            let head = chain.head_index();
            match chain::read_tx_packet(chain, mem, descs, tx_buf) {
                Ok(len) => {
                    let frame_len = len - VNET_HDR_LEN;
                    let (hdr, _) = tx_buf
                        .split_first_chunk_mut::<VNET_HDR_LEN>()
                        .expect("read_tx_packet returns at least the header and a minimal frame");
                    match header::check_tx(hdr, frame_len, *tx_offloads) {
                        Ok(checked) => {
                            *hdr = checked;
                            match backend.send_packet(&tx_buf[..len]) {
                                Ok(()) => {
                                    NetMetrics::inc(&metrics.tx_frames);
                                    NetMetrics::add(&metrics.tx_bytes, frame_len as u64);
                                }
                                Err(e) => {
                                    NetMetrics::inc(&metrics.tx_backend_errors);
                                    if logs.backend.allow() {
                                        tracing::warn!(error = %e, len = frame_len, "net: backend refused a frame; dropped");
                                    }
                                }
                            }
                        }
                        Err(e) => {
                            NetMetrics::inc(&metrics.tx_bad_header);
                            if logs.tx_dropped.allow() {
                                tracing::warn!(error = %e, "net: dropping a transmit packet for its header");
                            }
                        }
                    }
                }
                Err(e) => {
                    let counter = match e {
                        ChainError::Oversized(_) => &metrics.tx_oversized,
                        _ => &metrics.tx_malformed,
                    };
                    NetMetrics::inc(counter);
                    if logs.tx_dropped.allow() {
                        tracing::warn!(error = %e, "net: dropping a transmit chain");
                    }
                }
            }
            used_any |= complete(tx, mem, head, 0, metrics, &logs.queue);
        };
        if used_any {
            notify(tx, mem, interrupt, &logs.queue);
        }
        more
    }

    /// Moves packets from the backend into the guest's receive buffers, at most
    /// [`MAX_CHAINS_PER_PASS`] chains' worth. See [`RxState`] for what the result asks of the
    /// caller.
    pub fn process_rx(&mut self) -> RxState {
        let Self {
            backend,
            interrupt,
            metrics,
            active,
            rx_buf,
            rx_pending,
            descs,
            merged,
            logs,
            ..
        } = self;
        let Some(Active {
            mem,
            queues: [rx, _],
            rx_offloads,
            mergeable,
            rx_signalled,
            ..
        }) = active.as_mut()
        else {
            return RxState::Idle;
        };
        let mut used_any = false;
        let mut served = 0;
        let state = loop {
            if served >= MAX_CHAINS_PER_PASS {
                break RxState::More;
            }
            let len = match *rx_pending {
                Some(len) => len,
                None => match backend.recv_packet(rx_buf) {
                    Ok(len) if len <= VNET_HDR_LEN || len > VNET_HDR_LEN + MAX_FRAME_LEN => {
                        served += 1;
                        NetMetrics::inc(&metrics.rx_oversized);
                        if logs.rx_dropped.allow() {
                            tracing::warn!(len, "net: dropping an empty or oversized host packet");
                        }
                        continue;
                    }
                    Ok(len) => {
                        served += 1;
                        let (hdr, _) = rx_buf
                            .split_first_chunk_mut::<VNET_HDR_LEN>()
                            .expect("the packet is longer than its header");
                        if let Err(e) = header::check_rx(hdr, len - VNET_HDR_LEN, *rx_offloads, 1) {
                            NetMetrics::inc(&metrics.rx_bad_header);
                            if logs.rx_dropped.allow() {
                                tracing::warn!(error = %e, "net: dropping a host packet the guest did not negotiate");
                            }
                            continue;
                        }
                        *rx_pending = Some(len);
                        len
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break RxState::Idle,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {
                        served += 1;
                        continue;
                    }
                    Err(e) => {
                        // Wait for the next readiness event rather than retry a failing read.
                        NetMetrics::inc(&metrics.rx_backend_errors);
                        if logs.backend.allow() {
                            tracing::warn!(error = %e, "net: backend read failed");
                        }
                        break RxState::Idle;
                    }
                },
            };
            let packet = &rx_buf[..len];
            let outcome = if *mergeable {
                receive_merged(rx, mem, descs, merged, packet, metrics, logs)
            } else {
                receive_single(rx, mem, descs, packet, metrics, logs)
            };
            match outcome {
                Received::Done { chains } => {
                    served += chains;
                    used_any = true;
                    *rx_pending = None;
                }
                Received::Dropped { chains } => {
                    served += chains;
                    used_any |= chains > 0;
                    *rx_pending = None;
                }
                Received::Refused => {
                    // A malformed chain came back unused; the packet waits for the next one.
                    served += 1;
                    used_any = true;
                }
                Received::NoBuffers { more } if more => continue,
                Received::NoBuffers { .. } => break RxState::WaitingForBuffers,
            }
        };
        if used_any {
            rx_notify(rx, mem, rx_signalled, interrupt, &logs.queue);
        }
        state
    }
}

/// How one received packet went.
enum Received {
    /// Delivered, over `chains` chains.
    Done { chains: usize },
    /// Dropped for want of room (counted); `chains` chains came back unused.
    Dropped { chains: usize },
    /// A malformed chain came back unused (counted); the packet is still to be delivered.
    Refused,
    /// Too few buffers: the chains taken were given back. `more`: buffers came meanwhile, so
    /// try again now rather than wait for a kick.
    NoBuffers { more: bool },
}

/// One packet into one chain (no mergeable buffers): a chain too small drops the packet.
fn receive_single(
    rx: &mut Queue,
    mem: &GuestRam,
    descs: &mut Vec<Descriptor>,
    packet: &[u8],
    metrics: &NetMetrics,
    logs: &LogLimits,
) -> Received {
    let chain = match next_chain(rx, mem, metrics, &logs.queue) {
        Next::Chain(chain) => chain,
        Next::Empty => {
            return Received::NoBuffers {
                more: rearm(rx, mem, metrics, &logs.queue),
            };
        }
        Next::Unusable => return Received::NoBuffers { more: false },
    };
    let head = chain.head_index();
    let (used, outcome) = match chain::write_rx_packet(chain, mem, descs, packet) {
        Ok(used) => {
            NetMetrics::inc(&metrics.rx_frames);
            NetMetrics::add(&metrics.rx_bytes, (packet.len() - VNET_HDR_LEN) as u64);
            (used, Received::Done { chains: 1 })
        }
        Err(e) => {
            let outcome = if let ChainError::NoRoom { .. } = e {
                // The buffer is sound but too small: the packet goes.
                NetMetrics::inc(&metrics.rx_no_room);
                Received::Dropped { chains: 1 }
            } else {
                NetMetrics::inc(&metrics.rx_malformed);
                Received::Refused
            };
            if logs.rx_dropped.allow() {
                tracing::warn!(error = %e, "net: receive chain refused");
            }
            (0, outcome)
        }
    };
    complete(rx, mem, head, used, metrics, &logs.queue);
    outcome
}

/// One packet over as many chains as it takes (mergeable buffers); see the module doc.
fn receive_merged(
    rx: &mut Queue,
    mem: &GuestRam,
    descs: &mut Vec<Descriptor>,
    merged: &mut Vec<(u16, u32)>,
    packet: &[u8],
    metrics: &NetMetrics,
    logs: &LogLimits,
) -> Received {
    merged.clear();
    let mut rest = packet;
    let mut num_buffers_at: Option<NumBuffersAt> = None;
    while !rest.is_empty() {
        if merged.len() == usize::from(rx.size()) {
            // Every buffer the queue can hold, and the packet still does not fit.
            NetMetrics::inc(&metrics.rx_no_room);
            if logs.rx_dropped.allow() {
                tracing::warn!(
                    len = packet.len(),
                    "net: a packet larger than every receive buffer together; dropped"
                );
            }
            return drop_taken(rx, mem, merged, metrics, logs);
        }
        let chain = match next_chain(rx, mem, metrics, &logs.queue) {
            Next::Chain(chain) => chain,
            // Out of buffers: ask to be kicked past the chains taken (unless the ring is
            // unusable), then give them back.
            next @ (Next::Empty | Next::Unusable) => {
                if matches!(next, Next::Empty) && rearm(rx, mem, metrics, &logs.queue) {
                    continue;
                }
                for _ in 0..merged.len() {
                    rx.go_to_previous_position();
                }
                return Received::NoBuffers { more: false };
            }
        };
        let head = chain.head_index();
        let first = merged.is_empty();
        match chain::write_rx_part(chain, mem, descs, rest, first) {
            Ok((n, at)) => {
                if first {
                    num_buffers_at = at;
                }
                merged.push((head, n));
                rest = &rest[n as usize..];
            }
            Err(e) => {
                merged.push((head, 0));
                NetMetrics::inc(&metrics.rx_malformed);
                if logs.rx_dropped.allow() {
                    tracing::warn!(error = %e, "net: receive chain refused");
                }
                if first {
                    // Nothing of the packet was written: return the chain, keep the packet.
                    publish(rx, mem, merged, metrics, &logs.queue);
                    return Received::Refused;
                }
                // The packet is cut: every chain it took comes back unused.
                return drop_taken(rx, mem, merged, metrics, logs);
            }
        }
    }
    let count = merged.len();
    let Some(at) = num_buffers_at else {
        // A first chain of at least the header's size always has the field's place.
        NetMetrics::inc(&metrics.rx_malformed);
        return drop_taken(rx, mem, merged, metrics, logs);
    };
    // count <= queue size <= 32768.
    if let Err(e) = chain::set_num_buffers(mem, at, count as u16) {
        NetMetrics::inc(&metrics.rx_malformed);
        if logs.rx_dropped.allow() {
            tracing::warn!(error = %e, "net: cannot set num_buffers");
        }
        return drop_taken(rx, mem, merged, metrics, logs);
    }
    publish(rx, mem, merged, metrics, &logs.queue);
    NetMetrics::inc(&metrics.rx_frames);
    NetMetrics::add(&metrics.rx_bytes, (packet.len() - VNET_HDR_LEN) as u64);
    Received::Done { chains: count }
}

/// Returns every chain a dropped packet took, unused.
fn drop_taken(
    rx: &mut Queue,
    mem: &GuestRam,
    merged: &mut [(u16, u32)],
    metrics: &NetMetrics,
    logs: &LogLimits,
) -> Received {
    for (_, len) in merged.iter_mut() {
        *len = 0;
    }
    publish(rx, mem, merged, metrics, &logs.queue);
    Received::Dropped {
        chains: merged.len(),
    }
}

/// Puts `elems` (head, used length) on the used ring and publishes the used index once, after
/// all of them (see the module doc). A head outside the queue names no descriptor to give
/// back: it is left out (and counted), as `add_used` would refuse it.
fn publish(
    queue: &mut Queue,
    mem: &GuestRam,
    elems: &[(u16, u32)],
    metrics: &NetMetrics,
    log: &RateLimitedLog,
) {
    let size = queue.size();
    let valid = |e: &&(u16, u32)| e.0 < size;
    let count = elems.iter().filter(valid).count();
    if count < elems.len() {
        NetMetrics::add(&metrics.queue_errors, (elems.len() - count) as u64);
        if log.allow() {
            tracing::warn!("net: receive chain head outside the queue");
        }
    }
    let Some(&(last_head, last_len)) = elems.iter().rev().find(valid) else {
        return;
    };
    let start = queue.next_used();
    let mut next = Wrapping(start);
    for &(head, len) in elems.iter().filter(valid).take(count - 1) {
        // The used ring's element `i` is at 4 + 8 * i (after `flags` and `idx`).
        let at = queue.used_ring() + 4 + 8 * u64::from(next.0 % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        if let Err(e) = mem.write_slice(&elem, GuestAddress(at)) {
            NetMetrics::inc(&metrics.queue_errors);
            if log.allow() {
                tracing::warn!(error = %e, "net: cannot write a used element");
            }
            // Publish nothing of this packet: the guest sees the index where it was.
            queue.set_next_used(start);
            return;
        }
        next += 1;
    }
    queue.set_next_used(next.0);
    // Writes the last element and then, with release ordering, the index past all of them.
    if !complete(queue, mem, last_head, last_len, metrics, log) {
        queue.set_next_used(start);
    }
}

/// Interrupts the guest for the receive queue's new used entries unless it asked not to be
/// (with `EVENT_IDX`: unless its `used_event` lies before them), and remembers where it decided.
fn rx_notify(
    queue: &mut Queue,
    mem: &GuestRam,
    signalled: &mut Wrapping<u16>,
    interrupt: &impl Interrupt,
    log: &RateLimitedLog,
) {
    let new = Wrapping(queue.next_used());
    let old = std::mem::replace(signalled, new);
    // The used elements and index are written before `used_event` is read.
    std::sync::atomic::fence(Ordering::SeqCst);
    let fire = if queue.event_idx_enabled() {
        // `used_event` follows the available ring: flags, idx, then one u16 per entry.
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        match mem.load::<u16>(GuestAddress(at), Ordering::Acquire) {
            Ok(used_event) => rx_needs_interrupt(Wrapping(u16::from_le(used_event)), new, old),
            Err(e) => {
                if log.allow() {
                    tracing::warn!(error = %e, "net: cannot read used_event");
                }
                true
            }
        }
    } else {
        true
    };
    if fire {
        interrupt.trigger(INT_VRING);
    }
}

/// The spec's `vring_need_event`: whether the driver's `used_event` lies in the used entries
/// added since `old` (up to `new`).
pub fn rx_needs_interrupt(
    used_event: Wrapping<u16>,
    new: Wrapping<u16>,
    old: Wrapping<u16>,
) -> bool {
    new - used_event - Wrapping(1) < new - old
}

/// What the available ring holds next.
enum Next<'m> {
    Chain(virtio_queue::DescriptorChain<&'m GuestRam>),
    /// The guest has published nothing more.
    Empty,
    /// The ring is unusable (a bogus available index): counted and logged at a bounded rate.
    Unusable,
}

fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestRam,
    metrics: &NetMetrics,
    log: &RateLimitedLog,
) -> Next<'m> {
    match queue.iter(mem) {
        Ok(mut avail) => avail.next().map_or(Next::Empty, Next::Chain),
        Err(e) => {
            NetMetrics::inc(&metrics.queue_errors);
            if log.allow() {
                tracing::warn!(error = %e, "net: unusable queue");
            }
            Next::Unusable
        }
    }
}

/// After a queue ran dry: with `EVENT_IDX`, tells the guest to notify at the next buffer it
/// publishes (the available-event index is where the device stopped); without it, there is
/// nothing to re-enable. Returns whether a buffer came in the meantime, so the caller looks
/// again instead of waiting for a kick that will not come. An unwritable ring counts as
/// nothing new (the next kick or frame tries again).
fn rearm(queue: &mut Queue, mem: &GuestRam, metrics: &NetMetrics, log: &RateLimitedLog) -> bool {
    if !queue.event_idx_enabled() {
        return false;
    }
    match queue.enable_notification(mem) {
        Ok(more) => more,
        Err(e) => {
            NetMetrics::inc(&metrics.queue_errors);
            if log.allow() {
                tracing::warn!(error = %e, "net: cannot re-enable notifications");
            }
            false
        }
    }
}

fn complete(
    queue: &mut Queue,
    mem: &GuestRam,
    head: u16,
    len: u32,
    metrics: &NetMetrics,
    log: &RateLimitedLog,
) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            NetMetrics::inc(&metrics.queue_errors);
            if log.allow() {
                tracing::warn!(error = %e, head, "net: add_used failed");
            }
            false
        }
    }
}

/// Interrupts the guest for new used entries unless it asked not to be.
fn notify(queue: &mut Queue, mem: &GuestRam, interrupt: &impl Interrupt, log: &RateLimitedLog) {
    match queue.needs_notification(mem) {
        Ok(true) => interrupt.trigger(INT_VRING),
        Ok(false) => {}
        Err(e) => {
            if log.allow() {
                tracing::warn!(error = %e, "net: needs_notification failed");
            }
            interrupt.trigger(INT_VRING);
        }
    }
}

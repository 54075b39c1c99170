//! The virtio-net device: moves frames between the two queues and a [`NetBackend`].
//!
//! [`NetDevice::process_tx`] takes transmit chains, has [`chain::read_tx_frame`] copy each frame
//! into a fixed buffer, hands it to the backend and completes the chain (used length 0: the
//! device writes nothing into a transmit buffer). [`NetDevice::process_rx`] reads frames from
//! the backend into a second fixed buffer and writes each into the next receive chain. A frame
//! read while the guest has no receive buffer stays in that buffer (the *pending* frame) and the
//! device reads nothing more from the backend until the guest adds buffers: at most one frame is
//! held, and a guest that posts none makes the thread sleep, not spin.
//!
//! The queues are walked with `QueueOwnedT::iter` rather than `pop_descriptor_chain`, which logs
//! through the `log` crate each time the guest publishes a bogus available index; here that is
//! counted and logged at a bounded rate.
//!
//! Generic over the backend and the [`Interrupt`], so tests and the fuzzer run it on mock queues
//! with no threads, no KVM and no TAP.

use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::chain::{self, ChainError};
use super::{
    MAX_CHAIN_DESCRIPTORS, MAX_CHAINS_PER_PASS, MAX_FRAME_LEN, NUM_QUEUES, NetBackend, NetMetrics,
    RX_QUEUE, TX_QUEUE,
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
    mem: GuestMemoryMmap<()>,
    /// Receive, then transmit ([`RX_QUEUE`], [`TX_QUEUE`]).
    queues: [Queue; NUM_QUEUES],
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
    /// The transmit frame being copied out of guest memory.
    tx_buf: Vec<u8>,
    /// The received frame; its first `rx_pending` bytes are a frame waiting for a guest buffer.
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    descs: Vec<Descriptor>,
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
            tx_buf: vec![0; MAX_FRAME_LEN],
            // One byte more than the largest frame: a read that fills it was oversized.
            rx_buf: vec![0; MAX_FRAME_LEN + 1],
            rx_pending: None,
            descs: Vec::with_capacity(MAX_CHAIN_DESCRIPTORS + 1),
            logs: LogLimits::default(),
        }
    }

    /// Takes the receive and transmit queues the driver set up.
    pub fn activate(
        &mut self,
        mem: GuestMemoryMmap<()>,
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
        self.active = Some(Active { mem, queues });
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

    /// The length of the received frame waiting for a guest buffer, if any.
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
            match chain::read_tx_frame(chain, mem, descs, tx_buf) {
                Ok(len) => match backend.send_frame(&tx_buf[..len]) {
                    Ok(()) => {
                        NetMetrics::inc(&metrics.tx_frames);
                        NetMetrics::add(&metrics.tx_bytes, len as u64);
                    }
                    Err(e) => {
                        NetMetrics::inc(&metrics.tx_backend_errors);
                        if logs.backend.allow() {
                            tracing::warn!(error = %e, len, "net: backend refused a frame; dropped");
                        }
                    }
                },
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

    /// Moves frames from the backend into the guest's receive buffers, at most
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
            logs,
            ..
        } = self;
        let Some(Active {
            mem,
            queues: [rx, _],
        }) = active.as_mut()
        else {
            return RxState::Idle;
        };
        let mut used_any = false;
        let mut served = 0;
        let state = loop {
            if served == MAX_CHAINS_PER_PASS {
                break RxState::More;
            }
            let len = match *rx_pending {
                Some(len) => len,
                None => match backend.recv_frame(rx_buf) {
                    Ok(len) if len == 0 || len > MAX_FRAME_LEN => {
                        served += 1;
                        NetMetrics::inc(&metrics.rx_oversized);
                        if logs.rx_dropped.allow() {
                            tracing::warn!(len, "net: dropping an empty or oversized host frame");
                        }
                        continue;
                    }
                    Ok(len) => {
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
            let chain = match next_chain(rx, mem, metrics, &logs.queue) {
                Next::Chain(chain) => chain,
                // No buffer: ask for the kick that brings one, and look again in the next pass
                // if one came meanwhile.
                Next::Empty if rearm(rx, mem, metrics, &logs.queue) => break RxState::More,
                Next::Empty | Next::Unusable => break RxState::WaitingForBuffers,
            };
            served += 1;
            let head = chain.head_index();
            let used_len = match chain::write_rx_frame(chain, mem, descs, &rx_buf[..len]) {
                Ok(used) => {
                    *rx_pending = None;
                    NetMetrics::inc(&metrics.rx_frames);
                    NetMetrics::add(&metrics.rx_bytes, len as u64);
                    used
                }
                Err(e) => {
                    if let ChainError::NoRoom { .. } = e {
                        // The buffer is sound but too small: the frame goes.
                        *rx_pending = None;
                        NetMetrics::inc(&metrics.rx_no_room);
                    } else {
                        // The chain is unusable: the frame waits for the next one.
                        NetMetrics::inc(&metrics.rx_malformed);
                    }
                    if logs.rx_dropped.allow() {
                        tracing::warn!(error = %e, "net: receive chain refused");
                    }
                    0
                }
            };
            used_any |= complete(rx, mem, head, used_len, metrics, &logs.queue);
        };
        if used_any {
            notify(rx, mem, interrupt, &logs.queue);
        }
        state
    }
}

/// What the available ring holds next.
enum Next<'m> {
    Chain(virtio_queue::DescriptorChain<&'m GuestMemoryMmap<()>>),
    /// The guest has published nothing more.
    Empty,
    /// The ring is unusable (a bogus available index): counted and logged at a bounded rate.
    Unusable,
}

fn next_chain<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap<()>,
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
fn rearm(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    metrics: &NetMetrics,
    log: &RateLimitedLog,
) -> bool {
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
    mem: &GuestMemoryMmap<()>,
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
fn notify(
    queue: &mut Queue,
    mem: &GuestMemoryMmap<()>,
    interrupt: &impl Interrupt,
    log: &RateLimitedLog,
) {
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

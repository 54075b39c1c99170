//! The virtio-vsock device: moves packets between the virtqueues and a [`VsockBackend`].
//!
//! This is the code that touches guest-controlled descriptors. It parses every chain with
//! `virtio_vsock::packet::VsockPacket` (which bounds-checks addresses against guest memory and
//! the payload length against 64 KiB (`MAX_PKT_PAYLOAD`)), copies the
//! header and payload out once, checks the CIDs, and only then calls the backend. Descriptor
//! loops are cut by `virtio-queue`'s chain iterator, and a bogus available index ends the walk.
//!
//! It is generic over the backend and over the [`Interrupt`], so tests and the fuzzer run it
//! against a mock queue with no threads and no KVM.

use crate::memory::GuestRam;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};
use virtio_vsock::packet::{PKT_HEADER_SIZE, VsockPacket};
use vm_memory::Bytes;

use super::defs::{self, EVQ, MAX_PKT_PAYLOAD, RXQ, TXQ};
use super::{VsockBackend, VsockHeader, VsockMetrics};
use crate::devices::virtio::RateLimitedLog;
use crate::devices::virtio::mmio::{ActivateError, INT_VRING, Interrupt};

static TX_MALFORMED_LOG: RateLimitedLog = RateLimitedLog::new();
static RX_MALFORMED_LOG: RateLimitedLog = RateLimitedLog::new();
static BAD_CID_LOG: RateLimitedLog = RateLimitedLog::new();
static QUEUE_ERROR_LOG: RateLimitedLog = RateLimitedLog::new();

struct Active {
    mem: GuestRam,
    queues: Vec<Queue>,
}

/// The vsock device once its queues are live.
pub struct VsockDevice<B, I> {
    guest_cid: u64,
    backend: B,
    interrupt: I,
    metrics: Arc<VsockMetrics>,
    active: Option<Active>,
    scratch: Vec<u8>,
    /// A `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` waits for an event-queue buffer.
    reset_event_pending: bool,
}

impl<B, I> std::fmt::Debug for VsockDevice<B, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockDevice")
            .field("guest_cid", &self.guest_cid)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl<B: VsockBackend, I: Interrupt> VsockDevice<B, I> {
    /// A device for the guest with `guest_cid`, not yet activated.
    pub fn new(guest_cid: u64, backend: B, interrupt: I, metrics: Arc<VsockMetrics>) -> Self {
        Self {
            guest_cid,
            backend,
            interrupt,
            metrics,
            active: None,
            scratch: vec![0; MAX_PKT_PAYLOAD as usize],
            reset_event_pending: false,
        }
    }

    /// Takes the queues (rx, tx, event, in that order) the driver set up.
    pub fn activate(&mut self, mem: GuestRam, queues: Vec<Queue>) -> Result<(), ActivateError> {
        if queues.len() != defs::NUM_QUEUES {
            return Err(ActivateError::QueueCount {
                expected: defs::NUM_QUEUES,
                got: queues.len(),
            });
        }
        self.active = Some(Active { mem, queues });
        Ok(())
    }

    /// Takes queues restored from a snapshot. No connection survives a restore (virtio spec
    /// 1.2 §5.10.6.6): the backend drops whatever it holds, and the guest is sent
    /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET` on the event queue (by
    /// [`VsockDevice::process_event_queue`], as soon as the guest has a buffer there), so its
    /// driver resets its sockets and reads the guest CID again.
    pub fn activate_restored(
        &mut self,
        mem: GuestRam,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.activate(mem, queues)?;
        self.backend.reset();
        self.reset_event_pending = true;
        Ok(())
    }

    /// Drops the queues and every connection.
    pub fn reset(&mut self) {
        self.active = None;
        self.reset_event_pending = false;
        self.backend.reset();
    }

    /// The live queues (rx, tx, event), when activated.
    pub fn queues(&self) -> Option<&[Queue]> {
        self.active.as_ref().map(|a| a.queues.as_slice())
    }

    /// Whether a transport-reset event still waits for an event-queue buffer.
    pub fn reset_event_pending(&self) -> bool {
        self.reset_event_pending
    }

    /// Delivers a pending transport-reset event: the first event-queue buffer with room for
    /// `struct virtio_vsock_event` (a le32 id) gets `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`;
    /// a buffer without room goes back unused. Returns whether a buffer was used.
    pub fn process_event_queue(&mut self) -> bool {
        if !self.reset_event_pending {
            return false;
        }
        let Some(Active { mem, queues }) = self.active.as_mut() else {
            return false;
        };
        let queue = &mut queues[EVQ];
        let mut used_any = false;
        while self.reset_event_pending {
            let Some(chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let event = defs::EVENT_TRANSPORT_RESET.to_le_bytes();
            let mut written = 0u32;
            for desc in chain.writable() {
                if desc.len() as usize >= event.len()
                    && mem.write_slice(&event, desc.addr()).is_ok()
                {
                    written = event.len() as u32;
                    break;
                }
            }
            if written == 0 {
                VsockMetrics::inc(&self.metrics.rx_malformed);
                if RX_MALFORMED_LOG.allow() {
                    tracing::warn!("vsock: event buffer without room for an event");
                }
            }
            if let Err(e) = queue.add_used(&*mem, head, written) {
                if QUEUE_ERROR_LOG.allow() {
                    tracing::warn!(error = %e, "vsock: event add_used failed");
                }
                break;
            }
            used_any = true;
            self.reset_event_pending = written == 0;
        }
        if used_any {
            Self::notify(queue, mem, &self.interrupt);
        }
        used_any
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// The backend, mutably (the event loop feeds it host-side events).
    pub fn backend_mut(&mut self) -> &mut B {
        &mut self.backend
    }

    /// Walks the tx queue: every available chain is parsed, checked and handed to the backend,
    /// then returned to the guest. Returns whether any chain was used.
    pub fn process_tx(&mut self) -> bool {
        let Some(Active { mem, queues }) = self.active.as_mut() else {
            return false;
        };
        let queue = &mut queues[TXQ];
        let mut used_any = false;
        while let Some(mut chain) = queue.pop_descriptor_chain(&*mem) {
            let head = chain.head_index();
            VsockMetrics::inc(&self.metrics.tx_packets);
            let parsed = match VsockPacket::from_tx_virtq_chain(&*mem, &mut chain, MAX_PKT_PAYLOAD)
            {
                Ok(pkt) => {
                    let hdr = VsockHeader::from_packet(&pkt);
                    let mut n = 0;
                    if hdr.op == defs::OP_RW
                        && let Some(data) = pkt.data_slice()
                    {
                        n = (hdr.len as usize).min(self.scratch.len());
                        n = data.copy_to(&mut self.scratch[..n]);
                    }
                    Some((hdr, n))
                }
                Err(e) => {
                    VsockMetrics::inc(&self.metrics.tx_malformed);
                    if TX_MALFORMED_LOG.allow() {
                        tracing::warn!(error = %e, "vsock: dropping malformed tx packet");
                    }
                    None
                }
            };
            if let Err(e) = queue.add_used(&*mem, head, 0) {
                if QUEUE_ERROR_LOG.allow() {
                    tracing::warn!(error = %e, "vsock: tx add_used failed");
                }
                break;
            }
            used_any = true;
            let Some((hdr, n)) = parsed else { continue };
            if hdr.src_cid != self.guest_cid || hdr.dst_cid != defs::HOST_CID {
                VsockMetrics::inc(&self.metrics.tx_bad_cid);
                if BAD_CID_LOG.allow() {
                    tracing::warn!(
                        src_cid = hdr.src_cid,
                        dst_cid = hdr.dst_cid,
                        "vsock: dropping packet with a wrong CID"
                    );
                }
                continue;
            }
            if hdr.op == defs::OP_RW && n as u32 != hdr.len {
                VsockMetrics::inc(&self.metrics.tx_malformed);
                continue;
            }
            VsockMetrics::add(&self.metrics.tx_bytes, n as u64);
            self.backend.send_pkt(&hdr, &self.scratch[..n]);
        }
        if used_any {
            Self::notify(queue, mem, &self.interrupt);
        }
        used_any
    }

    /// Fills guest rx buffers with packets from the backend until either runs out. Returns
    /// whether any buffer was used.
    pub fn process_rx(&mut self) -> bool {
        let Some(Active { mem, queues }) = self.active.as_mut() else {
            return false;
        };
        let queue = &mut queues[RXQ];
        let mut used_any = false;
        while self.backend.has_pending_rx() {
            let Some(mut chain) = queue.pop_descriptor_chain(&*mem) else {
                break;
            };
            let head = chain.head_index();
            let used_len =
                match VsockPacket::from_rx_virtq_chain(&*mem, &mut chain, MAX_PKT_PAYLOAD) {
                    // A buffer with no room for data is unusable: it goes back empty. (Linux
                    // never offers one; serving control packets in it while data waits would
                    // leave the data behind it forever.)
                    Ok(pkt) if pkt.data_slice().is_none_or(|d| d.is_empty()) => {
                        VsockMetrics::inc(&self.metrics.rx_malformed);
                        if RX_MALFORMED_LOG.allow() {
                            tracing::warn!("vsock: rx buffer with no data room");
                        }
                        0
                    }
                    Ok(mut pkt) => {
                        let cap = pkt
                            .data_slice()
                            .map_or(0, |d| d.len())
                            .min(self.scratch.len());
                        let Some(mut hdr) = self.backend.recv_pkt(&mut self.scratch[..cap]) else {
                            // Nothing to send after all: give the buffer back untouched.
                            queue.go_to_previous_position();
                            break;
                        };
                        let len = (hdr.len as usize).min(cap);
                        hdr.len = len as u32;
                        if let Some(data) = pkt.data_slice() {
                            data.copy_from(&self.scratch[..len]);
                        }
                        hdr.write_to(&mut pkt);
                        VsockMetrics::inc(&self.metrics.rx_packets);
                        VsockMetrics::add(&self.metrics.rx_bytes, len as u64);
                        (PKT_HEADER_SIZE + len) as u32
                    }
                    Err(e) => {
                        VsockMetrics::inc(&self.metrics.rx_malformed);
                        if RX_MALFORMED_LOG.allow() {
                            tracing::warn!(error = %e, "vsock: unusable rx buffer");
                        }
                        0
                    }
                };
            if let Err(e) = queue.add_used(&*mem, head, used_len) {
                if QUEUE_ERROR_LOG.allow() {
                    tracing::warn!(error = %e, "vsock: rx add_used failed");
                }
                break;
            }
            used_any = true;
        }
        if used_any {
            Self::notify(queue, mem, &self.interrupt);
        }
        used_any
    }

    /// The event queue only carries transport-reset events, which this device sends only after
    /// a restore; its buffers stay with the device until then. Reports whether it is usable.
    pub fn event_queue_ready(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.queues[EVQ].ready())
    }

    fn notify(queue: &mut Queue, mem: &GuestRam, interrupt: &I) {
        match queue.needs_notification(mem) {
            Ok(true) => interrupt.trigger(INT_VRING),
            Ok(false) => {}
            Err(e) => {
                if QUEUE_ERROR_LOG.allow() {
                    tracing::warn!(error = %e, "vsock: needs_notification failed");
                }
                interrupt.trigger(INT_VRING);
            }
        }
    }
}

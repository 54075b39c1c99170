//! The virtio-blk device: takes chains off the request queue, has the `request` module
//! serve each one, completes it in the used ring and interrupts the guest.
//!
//! Requests run one after another, synchronously, on the device thread. A pass over the queue
//! completes at most `MAX_CHAINS_PER_PASS` (256) chains, so a guest that keeps the queue full
//! cannot keep the thread from its stop and reset commands.
//! The queue is walked with `QueueOwnedT::iter` rather than `pop_descriptor_chain`, which logs
//! an error through the `log` crate each time the guest publishes a bogus available index; here
//! that is counted and logged at a bounded rate.
//!
//! Generic over the [`DiskBackend`] and the [`Interrupt`], so tests and the fuzzer run it on a
//! mock queue with no threads, no KVM and no file.

use crate::memory::GuestRam;
use std::sync::Arc;

use virtio_queue::{Queue, QueueOwnedT, QueueT};

use super::defs::{self, MAX_CHAINS_PER_PASS};
use super::request::{self, Completion, RequestBuffers, RequestError, RequestType};
use super::{BlockMetrics, DiskBackend, DiskInfo};
use crate::devices::virtio::RateLimitedLog;
use crate::devices::virtio::mmio::{ActivateError, INT_VRING, Interrupt};

/// Limits for the log lines a guest can trigger, one per kind. Each device has its own, so a
/// flood on one disk does not silence another's, and tests can count what got through.
#[derive(Debug, Default)]
struct LogLimits {
    dropped: RateLimitedLog,
    refused: RateLimitedLog,
    io_error: RateLimitedLog,
    queue: RateLimitedLog,
}

struct Active {
    mem: GuestRam,
    queue: Queue,
    write_through: bool,
}

/// A virtio-blk device over a [`DiskBackend`].
pub struct BlockDevice<D, I> {
    disk: D,
    info: DiskInfo,
    interrupt: I,
    metrics: Arc<BlockMetrics>,
    active: Option<Active>,
    buffers: RequestBuffers,
    logs: LogLimits,
}

impl<D, I> std::fmt::Debug for BlockDevice<D, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockDevice")
            .field("info", &self.info)
            .field("active", &self.active.is_some())
            .finish()
    }
}

impl<D: DiskBackend, I: Interrupt> BlockDevice<D, I> {
    /// A device serving `disk`, described to the guest by `info`, not yet activated.
    pub fn new(disk: D, info: DiskInfo, interrupt: I, metrics: Arc<BlockMetrics>) -> Self {
        Self {
            disk,
            info,
            interrupt,
            metrics,
            active: None,
            buffers: RequestBuffers::new(),
            logs: LogLimits::default(),
        }
    }

    /// Takes the request queue the driver set up. Without `VIRTIO_BLK_F_FLUSH` in
    /// `acked_features` the driver will never flush, so every write is made durable before it
    /// completes.
    pub fn activate(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        let got = queues.len();
        let Ok([queue]) = <[Queue; defs::NUM_QUEUES]>::try_from(queues) else {
            return Err(ActivateError::QueueCount {
                expected: defs::NUM_QUEUES,
                got,
            });
        };
        self.active = Some(Active {
            mem,
            queue,
            write_through: acked_features & defs::VIRTIO_BLK_F_FLUSH == 0,
        });
        Ok(())
    }

    /// Drops the queue (the driver reset the device).
    pub fn reset(&mut self) {
        self.active = None;
    }

    /// The live request queue, when activated.
    pub fn queue(&self) -> Option<&Queue> {
        self.active.as_ref().map(|a| &a.queue)
    }

    /// Whether the driver activated the device.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// What the guest is told about the disk.
    pub fn info(&self) -> &DiskInfo {
        &self.info
    }

    /// The backend.
    pub fn disk(&self) -> &D {
        &self.disk
    }

    /// Log lines the device's rate limits let through so far.
    #[cfg(test)]
    pub(crate) fn log_lines_passed(&self) -> u64 {
        let l = &self.logs;
        [&l.dropped, &l.refused, &l.io_error, &l.queue]
            .iter()
            .map(|l| l.passed())
            .sum()
    }

    /// Serves the chains the guest made available, at most `MAX_CHAINS_PER_PASS` of them.
    /// Returns whether the pass stopped at that bound (more may be waiting; call again).
    pub fn process_queue(&mut self) -> bool {
        let Self {
            disk,
            info,
            interrupt,
            metrics,
            active,
            buffers,
            logs,
        } = self;
        let Some(Active {
            mem,
            queue,
            write_through,
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
            let chain = match queue.iter(&*mem) {
                Ok(mut avail) => avail.next(),
                Err(e) => {
                    BlockMetrics::inc(&metrics.queue_errors);
                    if logs.queue.allow() {
                        tracing::warn!(error = %e, "block: unusable request queue");
                    }
                    break false;
                }
            };
            let Some(chain) = chain else {
                break false;
            };
            served += 1;
            let head = chain.head_index();
            BlockMetrics::inc(&metrics.requests);
            let done = request::process_chain(chain, &*mem, disk, info, buffers, *write_through);
            account(metrics, logs, &done);
            // Fails only for a head index outside the queue (the transport checked the used
            // ring): there is no descriptor to give back, so go on with the next chain.
            if let Err(e) = queue.add_used(&*mem, head, done.used_len) {
                BlockMetrics::inc(&metrics.queue_errors);
                if logs.queue.allow() {
                    tracing::warn!(error = %e, head, "block: add_used failed");
                }
                continue;
            }
            used_any = true;
        };
        if used_any {
            match queue.needs_notification(&*mem) {
                Ok(true) => interrupt.trigger(INT_VRING),
                Ok(false) => {}
                Err(e) => {
                    if logs.queue.allow() {
                        tracing::warn!(error = %e, "block: needs_notification failed");
                    }
                    interrupt.trigger(INT_VRING);
                }
            }
        }
        more
    }
}

/// Counts a completed chain and logs a failure (at a bounded rate).
fn account(metrics: &BlockMetrics, logs: &LogLimits, done: &Completion) {
    use BlockMetrics as M;
    if done.request_type == Some(RequestType::In) {
        M::add(&metrics.read_bytes, done.data_bytes);
    }
    let e = match (&done.result, done.request_type) {
        (Ok(()), Some(RequestType::In)) => return M::inc(&metrics.reads),
        (Ok(()), Some(RequestType::Out)) => {
            M::inc(&metrics.writes);
            return M::add(&metrics.write_bytes, done.data_bytes);
        }
        (Ok(()), Some(RequestType::Flush)) => return M::inc(&metrics.flushes),
        (Ok(()), Some(RequestType::GetId)) => return M::inc(&metrics.get_ids),
        (Ok(()), _) => return,
        (Err(e), _) => e,
    };
    let (counter, limit) = match e {
        RequestError::EmptyChain
        | RequestError::ChainTooLong
        | RequestError::ChainTruncated
        | RequestError::BadStatusDescriptor => (&metrics.dropped_chains, &logs.dropped),
        RequestError::Unsupported(_) => (&metrics.unsupported, &logs.refused),
        RequestError::OutOfRange { .. } => (&metrics.out_of_range, &logs.refused),
        RequestError::ReadOnly => (&metrics.read_only_writes, &logs.refused),
        RequestError::Io(_) => (&metrics.io_errors, &logs.io_error),
        _ => (&metrics.malformed, &logs.refused),
    };
    M::inc(counter);
    if !limit.allow() {
        return;
    }
    match (e, done.request_type) {
        (RequestError::Io(source), kind) => {
            tracing::warn!(error = %source, request = ?kind, "block: host I/O error")
        }
        (RequestError::Unsupported(t), _) => {
            tracing::debug!(request_type = t, "block: unsupported request")
        }
        (e, _) if e.status().is_none() => {
            tracing::warn!(error = %e, "block: dropping descriptor chain")
        }
        (e, kind) => tracing::warn!(error = %e, request = ?kind, "block: refusing request"),
    }
}

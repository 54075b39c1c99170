//! Thin epoll glue: the block device thread, and the front end the transport talks to.
//!
//! The transport (on a vCPU thread) owns a [`BlockFrontend`]; on `DRIVER_OK` or reset it sends a
//! command to the [`BlockWorker`] thread and wakes it. The worker owns the [`BlockDevice`] and
//! the backing file outright, so the two threads share no lock. The worker waits on the
//! queue-notify eventfd, the command eventfd and a stop eventfd. While paused
//! ([`WorkerControl::Pause`]) it drains its eventfds but walks no queue; every request is
//! finished within a pass, so a paused worker has no I/O in flight.

use crate::memory::GuestRam;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::defs;
use super::{BlockDevice, BlockError, DiskBackend, DiskInfo};
use crate::devices::virtio::mmio::{ActivateError, IrqTrigger, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::virtio::worker_link::{
    ControlLink, Quiesce, WorkerControl, WorkerLink, read_config_bytes,
};

/// A command from the transport to the device thread.
#[derive(Debug)]
pub enum BlockCommand {
    /// The driver set `DRIVER_OK`: here are the validated queue and the negotiated features.
    Activate {
        /// Guest memory.
        mem: GuestRam,
        /// The features the driver acknowledged.
        acked_features: u64,
        /// The request queue.
        queues: Vec<Queue>,
    },
    /// The driver reset the device; the worker answers on `done` once it let go of the queue.
    Reset {
        /// Acknowledgement channel.
        done: Sender<()>,
    },
    /// Pause, resume, save the queue.
    Control(WorkerControl),
}

impl From<WorkerControl> for BlockCommand {
    fn from(c: WorkerControl) -> Self {
        Self::Control(c)
    }
}

/// The transport-facing half of the block device: identity, features and config space.
#[derive(Debug)]
pub struct BlockFrontend {
    features: u64,
    config: [u8; defs::CONFIG_LEN],
    link: WorkerLink<BlockCommand>,
}

impl BlockFrontend {
    /// A front end for the disk described by `info`, sending commands on `commands` and waking
    /// the worker through `wake`.
    pub fn new(info: &DiskInfo, commands: Sender<BlockCommand>, wake: Arc<EventFd>) -> Self {
        let mut features = VIRTIO_F_VERSION_1
            | defs::VIRTIO_BLK_F_FLUSH
            | defs::VIRTIO_BLK_F_SEG_MAX
            | defs::VIRTIO_BLK_F_SIZE_MAX;
        if info.read_only {
            features |= defs::VIRTIO_BLK_F_RO;
        }
        // struct virtio_blk_config { le64 capacity; le32 size_max; le32 seg_max; ... }
        let mut config = [0u8; defs::CONFIG_LEN];
        config[0..8].copy_from_slice(&info.sectors.to_le_bytes());
        config[8..12].copy_from_slice(&defs::SIZE_MAX.to_le_bytes());
        config[12..16].copy_from_slice(&defs::SEG_MAX.to_le_bytes());
        Self {
            features,
            config,
            link: WorkerLink::new(commands, wake),
        }
    }
}

impl VirtioDevice for BlockFrontend {
    fn device_type(&self) -> u32 {
        defs::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[defs::QUEUE_SIZE; defs::NUM_QUEUES]
    }

    fn device_features(&self) -> u64 {
        self.features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Only the `writeback` field is writable, and only with VIRTIO_BLK_F_CONFIG_WCE,
        // which is not offered.
    }

    fn activate(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.link.send(BlockCommand::Activate {
            mem,
            acked_features,
            queues,
        })
    }

    fn reset(&mut self) {
        // Waits (briefly) until the worker has dropped the queue.
        self.link
            .reset("block", |done| BlockCommand::Reset { done });
    }

    fn control(&self) -> Option<&dyn ControlLink> {
        Some(&self.link)
    }
}

const TOKEN_QUEUE: u64 = 0;
const TOKEN_STOP: u64 = 10;
const TOKEN_COMMAND: u64 = 11;

/// The device thread's state.
pub struct BlockWorker<D> {
    device: BlockDevice<D, IrqTrigger>,
    queue_evt: Arc<EventFd>,
    commands: Receiver<BlockCommand>,
    command_evt: Arc<EventFd>,
    stop_evt: Arc<EventFd>,
    epoll: Epoll,
    quiesce: Quiesce,
}

impl<D> std::fmt::Debug for BlockWorker<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockWorker")
            .field("device", &self.device)
            .finish()
    }
}

impl<D: DiskBackend> BlockWorker<D> {
    /// Builds the worker and registers every fd with its epoll.
    pub fn new(
        device: BlockDevice<D, IrqTrigger>,
        queue_evt: Arc<EventFd>,
        commands: Receiver<BlockCommand>,
        command_evt: Arc<EventFd>,
        stop_evt: Arc<EventFd>,
    ) -> Result<Self, BlockError> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new().map_err(BlockError::Epoll)?;
        for (fd, token) in [
            (queue_evt.as_raw_fd(), TOKEN_QUEUE),
            (stop_evt.as_raw_fd(), TOKEN_STOP),
            (command_evt.as_raw_fd(), TOKEN_COMMAND),
        ] {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(BlockError::EpollCtl)?;
        }
        Ok(Self {
            device,
            queue_evt,
            commands,
            command_evt,
            stop_evt,
            epoll,
            quiesce: Quiesce::default(),
        })
    }

    /// Runs until the stop eventfd fires (or the transport is dropped).
    pub fn run(mut self) -> Result<(), BlockError> {
        let mut events = [EpollEvent::default(); 4];
        let mut more = false;
        loop {
            // With chains left over from a bounded pass, only peek at the other events.
            let timeout = if more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(BlockError::EpollWait(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    TOKEN_STOP => return Ok(()),
                    TOKEN_COMMAND => {
                        let _ = self.command_evt.read();
                        if !self.drain_commands() {
                            return Ok(());
                        }
                    }
                    _ => {
                        let _ = self.queue_evt.read();
                    }
                }
            }
            // Paused: no guest memory is touched; the first pass after the resume catches up.
            if self.quiesce.paused() {
                more = false;
                continue;
            }
            more = self.device.process_queue();
        }
    }

    /// Applies queued commands. Returns `false` once the transport is gone.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(BlockCommand::Activate {
                    mem,
                    acked_features,
                    queues,
                }) => {
                    if let Err(e) = self.device.activate(mem, acked_features, queues) {
                        tracing::error!(error = %e, "block: activation failed");
                    }
                }
                Ok(BlockCommand::Control(c)) => {
                    let queue = self.device.queue().map(std::slice::from_ref);
                    // After a resume the loop walks the queue before it waits again.
                    self.quiesce.apply(c, queue);
                }
                Ok(BlockCommand::Reset { done }) => {
                    self.device.reset();
                    let _ = done.send(());
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }

    /// The stop eventfd this worker watches.
    pub fn stop_evt(&self) -> &Arc<EventFd> {
        &self.stop_evt
    }
}

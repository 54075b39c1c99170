//! Thin epoll glue: the network device thread, and the front end the transport talks to.
//!
//! The transport (on a vCPU thread) owns a [`NetFrontend`]; on `DRIVER_OK` or reset it sends a
//! command to the [`NetWorker`] thread and wakes it. The worker owns the [`NetDevice`] and the
//! TAP outright, so the two threads share no lock. The worker waits on the two queue-notify
//! eventfds, the TAP (edge-triggered: a new frame is a new edge), the command eventfd and a stop
//! eventfd. With a frame pending and no receive buffer it does not read the TAP again until the
//! guest notifies the receive queue, so it sleeps instead of spinning. While paused
//! ([`WorkerControl::Pause`]) it drains its eventfds but walks no queue and reads no frame; the
//! first pass after the resume reads what the TAP queued meanwhile. A frame the device held for
//! want of a receive buffer is not part of a snapshot: a restored VM has lost it, as a network
//! may lose any frame.

use crate::memory::GuestRam;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::device::RxState;
use super::{NUM_QUEUES, NetBackend, NetDevice, NetError, QUEUE_SIZE, RX_QUEUE, TX_QUEUE, defs};
use crate::devices::virtio::mmio::{
    ActivateError, IrqTrigger, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VirtioDevice,
};
use crate::devices::virtio::worker_link::{
    ControlLink, Quiesce, WorkerControl, WorkerLink, read_config_bytes,
};

/// A command from the transport to the device thread.
#[derive(Debug)]
pub enum NetCommand {
    /// The driver set `DRIVER_OK`: here are the validated queues and the negotiated features.
    Activate {
        /// Guest memory.
        mem: GuestRam,
        /// The features the driver acknowledged.
        acked_features: u64,
        /// The receive and transmit queues.
        queues: Vec<Queue>,
    },
    /// The driver reset the device; the worker answers on `done` once it let go of the queues.
    Reset {
        /// Acknowledgement channel.
        done: Sender<()>,
    },
    /// Pause, resume, save the queues.
    Control(WorkerControl),
}

impl From<WorkerControl> for NetCommand {
    fn from(c: WorkerControl) -> Self {
        Self::Control(c)
    }
}

/// The transport-facing half of the network device: identity, features and config space.
#[derive(Debug)]
pub struct NetFrontend {
    config: [u8; defs::CONFIG_LEN],
    link: WorkerLink<NetCommand>,
}

impl NetFrontend {
    /// A front end for a device with `mac`, sending commands on `commands` and waking the
    /// worker through `wake`.
    pub fn new(mac: [u8; 6], commands: Sender<NetCommand>, wake: Arc<EventFd>) -> Self {
        Self {
            config: mac,
            link: WorkerLink::new(commands, wake),
        }
    }
}

impl VirtioDevice for NetFrontend {
    fn device_type(&self) -> u32 {
        defs::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; NUM_QUEUES]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | defs::VIRTIO_NET_F_MAC
            | defs::VIRTIO_NET_F_MRG_RXBUF
            | defs::OFFLOADS
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    /// The MAC may differ: a restored copy has a link of its own, whose MAC the daemon gives
    /// this device, and tells the guest to take (`Reidentify`). Everything after it must match.
    fn config_matches(&self, saved: &[u8], current: &[u8]) -> bool {
        saved.len() == current.len() && saved.get(6..) == current.get(6..)
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is writable only by legacy drivers (without VERSION_1), which are refused.
    }

    fn activate(
        &mut self,
        mem: GuestRam,
        acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.link.send(NetCommand::Activate {
            mem,
            acked_features,
            queues,
        })
    }

    fn reset(&mut self) {
        // Waits (briefly) until the worker has dropped the queues.
        self.link.reset("net", |done| NetCommand::Reset { done });
    }

    fn control(&self) -> Option<&dyn ControlLink> {
        Some(&self.link)
    }
}

const TOKEN_RX_QUEUE: u64 = RX_QUEUE as u64;
const TOKEN_TX_QUEUE: u64 = TX_QUEUE as u64;
const TOKEN_BACKEND: u64 = 2;
const TOKEN_STOP: u64 = 10;
const TOKEN_COMMAND: u64 = 11;

/// The device thread's state.
pub struct NetWorker<B> {
    device: NetDevice<B, IrqTrigger>,
    queue_evts: [Arc<EventFd>; NUM_QUEUES],
    commands: Receiver<NetCommand>,
    command_evt: Arc<EventFd>,
    /// Registered with `epoll`; kept so the worker holds what it waits on.
    _stop_evt: Arc<EventFd>,
    epoll: Epoll,
    quiesce: Quiesce,
}

impl<B> std::fmt::Debug for NetWorker<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetWorker")
            .field("device", &self.device)
            .finish()
    }
}

impl<B: NetBackend + AsRawFd> NetWorker<B> {
    /// Builds the worker and registers every fd with its epoll (the backend's edge-triggered).
    pub fn new(
        device: NetDevice<B, IrqTrigger>,
        queue_evts: [Arc<EventFd>; NUM_QUEUES],
        commands: Receiver<NetCommand>,
        command_evt: Arc<EventFd>,
        stop_evt: Arc<EventFd>,
    ) -> Result<Self, NetError> {
        let epoll = Epoll::new().map_err(NetError::Epoll)?;
        for (fd, token, events) in [
            (
                queue_evts[RX_QUEUE].as_raw_fd(),
                TOKEN_RX_QUEUE,
                EventSet::IN,
            ),
            (
                queue_evts[TX_QUEUE].as_raw_fd(),
                TOKEN_TX_QUEUE,
                EventSet::IN,
            ),
            (
                device.backend().as_raw_fd(),
                TOKEN_BACKEND,
                EventSet::IN | EventSet::EDGE_TRIGGERED,
            ),
            (stop_evt.as_raw_fd(), TOKEN_STOP, EventSet::IN),
            (command_evt.as_raw_fd(), TOKEN_COMMAND, EventSet::IN),
        ] {
            epoll
                .ctl(ControlOperation::Add, fd, EpollEvent::new(events, token))
                .map_err(NetError::EpollCtl)?;
        }
        Ok(Self {
            device,
            queue_evts,
            commands,
            command_evt,
            _stop_evt: stop_evt,
            epoll,
            quiesce: Quiesce::default(),
        })
    }

    /// Runs until the stop eventfd fires (or the transport is dropped).
    pub fn run(mut self) -> Result<(), NetError> {
        let mut events = [EpollEvent::default(); 8];
        let mut more = false;
        loop {
            // With work left over from a bounded pass, only peek at the other events.
            let timeout = if more { 0 } else { -1 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(NetError::EpollWait(e)),
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
                    TOKEN_RX_QUEUE | TOKEN_TX_QUEUE => {
                        let _ = self.queue_evts[ev.data() as usize].read();
                    }
                    // The backend is readable: process_rx below reads it.
                    _ => {}
                }
            }
            // Paused: no guest memory is touched and no frame read; the first pass after the
            // resume catches up (the TAP's edge may have come during the pause, so that pass
            // reads it whatever woke the worker).
            if self.quiesce.paused() {
                more = false;
                continue;
            }
            // Every wake-up tries both directions: receiving costs one failed read when the
            // backend is empty, and nothing when a frame is already waiting for buffers.
            let tx_more = self.device.process_tx();
            let rx_more = self.device.process_rx() == RxState::More;
            more = tx_more || rx_more;
        }
    }

    /// Applies queued commands. Returns `false` once the transport is gone.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(NetCommand::Activate {
                    mem,
                    acked_features,
                    queues,
                }) => {
                    if let Err(e) = self.device.activate(mem, acked_features, queues) {
                        tracing::error!(error = %e, "net: activation failed");
                    }
                }
                Ok(NetCommand::Reset { done }) => {
                    self.device.reset();
                    let _ = done.send(());
                }
                Ok(NetCommand::Control(c)) => {
                    // After a resume the loop walks both queues before it waits again.
                    self.quiesce.apply(c, self.device.queues());
                }
                Err(TryRecvError::Empty) => return true,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
    }
}

//! Thin epoll glue: the vsock device thread, and the front end the transport talks to.
//!
//! The transport (on a vCPU thread) owns a [`VsockFrontend`]; on `DRIVER_OK` or reset it sends a
//! command to the [`VsockWorker`] thread and wakes it. The worker owns the [`VsockDevice`] and
//! its backend outright, so the two threads share no lock. The worker waits on: the three
//! queue-notify eventfds, the backend's fd, the command eventfd, and a stop eventfd.
//!
//! While paused ([`WorkerControl::Pause`]) the worker still drains its eventfds and serves the
//! backend's host sockets and timers, which touch no guest memory, but walks no queue; the
//! first pass after the resume serves whatever was notified meanwhile. Each pass delivers a
//! pending transport-reset event (after a restore) before it walks tx and rx.

use crate::memory::GuestRam;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

use virtio_queue::Queue;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::defs;
use super::{VsockBackend, VsockDevice, VsockError};
use crate::devices::virtio::mmio::{ActivateError, IrqTrigger, VIRTIO_F_VERSION_1, VirtioDevice};
use crate::devices::virtio::worker_link::{
    ControlLink, Quiesce, WorkerControl, WorkerLink, read_config_bytes,
};

/// A command from the transport to the device thread.
#[derive(Debug)]
pub enum WorkerCommand {
    /// The driver set `DRIVER_OK`: here are the validated queues.
    Activate {
        /// Guest memory.
        mem: GuestRam,
        /// rx, tx and event queues.
        queues: Vec<Queue>,
        /// The queues come from a snapshot: the connections are gone, so the guest gets
        /// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
        restored: bool,
    },
    /// The driver reset the device; the worker answers on `done` once it let go of the
    /// queues.
    Reset {
        /// Acknowledgement channel.
        done: Sender<()>,
    },
    /// Pause, resume, save the queues.
    Control(WorkerControl),
}

impl From<WorkerControl> for WorkerCommand {
    fn from(c: WorkerControl) -> Self {
        Self::Control(c)
    }
}

/// The transport-facing half of the vsock device: identity, features and config space.
#[derive(Debug)]
pub struct VsockFrontend {
    guest_cid: u64,
    link: WorkerLink<WorkerCommand>,
}

impl VsockFrontend {
    /// A front end sending commands on `commands` and waking the worker through `wake`.
    pub fn new(guest_cid: u64, commands: Sender<WorkerCommand>, wake: Arc<EventFd>) -> Self {
        Self {
            guest_cid,
            link: WorkerLink::new(commands, wake),
        }
    }
}

impl VirtioDevice for VsockFrontend {
    fn device_type(&self) -> u32 {
        defs::DEVICE_TYPE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[defs::QUEUE_SIZE; defs::NUM_QUEUES]
    }

    fn device_features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // struct virtio_vsock_config { le64 guest_cid; }
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The vsock config space is read-only.
    }

    fn activate(
        &mut self,
        mem: GuestRam,
        _acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.link.send(WorkerCommand::Activate {
            mem,
            queues,
            restored: false,
        })
    }

    fn activate_restored(
        &mut self,
        mem: GuestRam,
        _acked_features: u64,
        queues: Vec<Queue>,
    ) -> Result<(), ActivateError> {
        self.link.send(WorkerCommand::Activate {
            mem,
            queues,
            restored: true,
        })
    }

    fn control(&self) -> Option<&dyn ControlLink> {
        Some(&self.link)
    }

    fn reset(&mut self) {
        // Waits (briefly) until the worker has dropped the queues.
        self.link
            .reset("vsock", |done| WorkerCommand::Reset { done });
    }
}

const TOKEN_STOP: u64 = 10;
const TOKEN_COMMAND: u64 = 11;
const TOKEN_BACKEND: u64 = 12;

/// The device thread's state.
pub struct VsockWorker<B> {
    device: VsockDevice<B, IrqTrigger>,
    queue_evts: Vec<Arc<EventFd>>,
    commands: Receiver<WorkerCommand>,
    command_evt: Arc<EventFd>,
    stop_evt: Arc<EventFd>,
    epoll: Epoll,
    quiesce: Quiesce,
}

impl<B> std::fmt::Debug for VsockWorker<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VsockWorker")
            .field("device", &self.device)
            .finish()
    }
}

impl<B: VsockBackend> VsockWorker<B> {
    /// Builds the worker and registers every fd with its epoll.
    pub fn new(
        device: VsockDevice<B, IrqTrigger>,
        queue_evts: Vec<Arc<EventFd>>,
        commands: Receiver<WorkerCommand>,
        command_evt: Arc<EventFd>,
        stop_evt: Arc<EventFd>,
    ) -> Result<Self, VsockError> {
        use std::os::fd::AsRawFd;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        let mut fds: Vec<(i32, u64)> = queue_evts
            .iter()
            .enumerate()
            .map(|(i, e)| (e.as_raw_fd(), i as u64))
            .collect();
        fds.push((stop_evt.as_raw_fd(), TOKEN_STOP));
        fds.push((command_evt.as_raw_fd(), TOKEN_COMMAND));
        fds.push((device.backend().as_raw_fd(), TOKEN_BACKEND));
        for (fd, token) in fds {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(VsockError::EpollCtl)?;
        }
        Ok(Self {
            device,
            queue_evts,
            commands,
            command_evt,
            stop_evt,
            epoll,
            quiesce: Quiesce::default(),
        })
    }

    /// Runs until the stop eventfd fires (or the transport is dropped).
    pub fn run(mut self) -> Result<(), VsockError> {
        let mut events = [EpollEvent::default(); 16];
        let tick = Duration::from_millis(250);
        let mut last_tick = Instant::now();
        loop {
            let n = match self.epoll.wait(tick.as_millis() as i32, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
                Err(e) => return Err(VsockError::EpollWait(e)),
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
                    TOKEN_BACKEND => self.device.backend_mut().process_events(),
                    // A queue notification: rx (new buffers) and tx (new packets) are both
                    // served below; the event queue needs nothing.
                    q => {
                        if let Some(evt) = self.queue_evts.get(q as usize) {
                            let _ = evt.read();
                        }
                    }
                }
            }
            let now = Instant::now();
            if now.duration_since(last_tick) >= tick {
                last_tick = now;
                self.device.backend_mut().tick(now);
            }
            // Paused: no guest memory is touched; the first pass after the resume catches up.
            if self.quiesce.paused() {
                continue;
            }
            // Cheap when idle: each walk stops at the first empty ring.
            self.device.process_event_queue();
            self.device.process_tx();
            self.device.process_rx();
        }
    }

    /// Applies queued commands. Returns `false` once the transport is gone.
    fn drain_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(WorkerCommand::Activate {
                    mem,
                    queues,
                    restored,
                }) => {
                    let result = if restored {
                        self.device.activate_restored(mem, queues)
                    } else {
                        self.device.activate(mem, queues)
                    };
                    if let Err(e) = result {
                        tracing::error!(error = %e, "vsock: activation failed");
                    }
                }
                Ok(WorkerCommand::Control(c)) => {
                    self.quiesce.apply(c, self.device.queues());
                }
                Ok(WorkerCommand::Reset { done }) => {
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

//! The front end's command channel to its device thread, shared by the virtio devices.
//!
//! Each device's transport-facing front end (on a vCPU thread) holds a [`WorkerLink`] to the
//! thread that owns the device: it sends a command (activate, reset) and wakes the worker
//! through an eventfd the worker's epoll watches. The commands themselves are per device, and
//! each device's command type also carries the [`WorkerControl`] commands every device thread
//! takes the same way: pause, resume, and "send me your queues' state".
//!
//! # Pausing
//! While the VM is paused (and while a snapshot copies guest memory) no device thread may
//! touch guest memory. [`ControlLink::pause`] sends [`WorkerControl::Pause`] and waits, at most
//! [`QUIESCE_TIMEOUT`], for the thread to answer; the thread answers only between two passes
//! over its queues, and does no pass until [`WorkerControl::Resume`] ([`Quiesce`] keeps that
//! flag). A paused thread still drains its eventfds and serves its host side (the vsock
//! thread's Unix sockets), which touches no guest memory; queue notifications that arrive in
//! the meantime are not lost, since the first pass after the resume walks every ring.

use std::sync::Arc;
use std::sync::mpsc::{Sender, channel};
use std::time::Duration;

use virtio_queue::Queue;

use vmm_sys_util::eventfd::EventFd;

use super::mmio::ActivateError;
use super::state::{QueueSnapshot, QuiesceError};

/// How long the pausing thread waits for a device thread to pause or to send its queues.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(2);

/// How long a vCPU waits for the device thread to confirm a reset.
const RESET_ACK_TIMEOUT: Duration = Duration::from_secs(1);

/// The sending half of a device thread's command channel, with the eventfd that wakes it.
#[derive(Debug)]
pub struct WorkerLink<C> {
    commands: Sender<C>,
    wake: Arc<EventFd>,
}

impl<C> WorkerLink<C> {
    /// A link sending commands on `commands` and waking the worker through `wake`.
    pub fn new(commands: Sender<C>, wake: Arc<EventFd>) -> Self {
        Self { commands, wake }
    }

    /// Sends `cmd` and wakes the worker; fails if the worker has gone.
    pub fn send(&self, cmd: C) -> Result<(), ActivateError> {
        self.commands
            .send(cmd)
            .map_err(|_| ActivateError::WorkerGone)?;
        self.wake.write(1).map_err(|_| ActivateError::WorkerGone)
    }

    /// Sends the reset command `make(done)` and waits (briefly) for the worker to answer on
    /// `done`. The driver may reuse the rings' memory as soon as it reads back status 0, so the
    /// worker must have dropped its queues first. If the worker is gone the device is dead
    /// anyway; a missing acknowledgement is logged under `device`.
    pub fn reset(&self, device: &str, make: impl FnOnce(Sender<()>) -> C) {
        let (done, ack) = std::sync::mpsc::channel();
        if self.send(make(done)).is_ok() && ack.recv_timeout(RESET_ACK_TIMEOUT).is_err() {
            tracing::error!("{device}: device thread did not acknowledge the reset");
        }
    }
}

/// Commands every device thread takes, besides its own.
#[derive(Debug)]
pub enum WorkerControl {
    /// Stop walking the queues (and touching guest memory); answer on `done` once stopped.
    Pause {
        /// Acknowledgement channel.
        done: Sender<()>,
    },
    /// Walk the queues again.
    Resume,
    /// Send back the state of the live queues (none when the device is not activated).
    SaveQueues {
        /// Where the states go.
        reply: Sender<Vec<QueueSnapshot>>,
    },
}

/// The pause flag of a device thread, and how it answers [`WorkerControl`].
#[derive(Debug, Default)]
pub struct Quiesce {
    paused: bool,
}

impl Quiesce {
    /// Whether the thread must leave its queues (and guest memory) alone.
    pub fn paused(&self) -> bool {
        self.paused
    }

    /// Applies `command`; `queues` are the device's live queues, if it has any. The worker
    /// calls it between two passes over its queues, so a pause is acknowledged only once no
    /// pass is under way.
    pub fn apply(&mut self, command: WorkerControl, queues: Option<&[Queue]>) {
        match command {
            WorkerControl::Pause { done } => {
                self.paused = true;
                let _ = done.send(());
            }
            WorkerControl::Resume => self.paused = false,
            WorkerControl::SaveQueues { reply } => {
                let states = queues
                    .unwrap_or_default()
                    .iter()
                    .map(QueueSnapshot::of)
                    .collect();
                let _ = reply.send(states);
            }
        }
    }
}

/// Pausing, resuming and asking a device thread for its queues, whatever its command type:
/// what the transport needs of a device's link (see [`super::mmio::VirtioDevice::control`]).
/// `device` names the device in errors.
pub trait ControlLink: Send {
    /// Pauses the thread and waits for it (see the module doc).
    fn pause(&self, device: &'static str) -> Result<(), QuiesceError>;
    /// Lets the thread walk its queues again.
    fn resume(&self, device: &'static str) -> Result<(), QuiesceError>;
    /// The state of the thread's live queues (empty when not activated). Only consistent
    /// while the thread is paused.
    fn save_queues(&self, device: &'static str) -> Result<Vec<QueueSnapshot>, QuiesceError>;
}

impl<C: From<WorkerControl> + Send> ControlLink for WorkerLink<C> {
    fn pause(&self, device: &'static str) -> Result<(), QuiesceError> {
        let (done, ack) = channel();
        self.ask(device, WorkerControl::Pause { done }, "pause", ack)
    }

    fn resume(&self, device: &'static str) -> Result<(), QuiesceError> {
        self.send(WorkerControl::Resume.into())
            .map_err(|_| QuiesceError::Gone { device })
    }

    fn save_queues(&self, device: &'static str) -> Result<Vec<QueueSnapshot>, QuiesceError> {
        let (reply, answer) = channel();
        self.ask(
            device,
            WorkerControl::SaveQueues { reply },
            "send its queues",
            answer,
        )
    }
}

impl<C: From<WorkerControl>> WorkerLink<C> {
    /// Sends `command` and waits at most [`QUIESCE_TIMEOUT`] for its answer on `answer`.
    fn ask<T>(
        &self,
        device: &'static str,
        command: WorkerControl,
        what: &'static str,
        answer: std::sync::mpsc::Receiver<T>,
    ) -> Result<T, QuiesceError> {
        use std::sync::mpsc::RecvTimeoutError;
        self.send(command.into())
            .map_err(|_| QuiesceError::Gone { device })?;
        answer.recv_timeout(QUIESCE_TIMEOUT).map_err(|e| match e {
            RecvTimeoutError::Timeout => QuiesceError::Timeout {
                device,
                what,
                timeout: QUIESCE_TIMEOUT,
            },
            RecvTimeoutError::Disconnected => QuiesceError::Gone { device },
        })
    }
}

/// Copies the bytes of the config space `config` at `offset` into `data`; bytes past its end
/// read as zero.
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| config.get(o))
            .copied()
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::QueueT;

    #[derive(Debug)]
    enum Cmd {
        Control(WorkerControl),
    }

    impl From<WorkerControl> for Cmd {
        fn from(c: WorkerControl) -> Self {
            Self::Control(c)
        }
    }

    fn link() -> (
        WorkerLink<Cmd>,
        std::sync::mpsc::Receiver<Cmd>,
        Arc<EventFd>,
    ) {
        let (tx, rx) = channel();
        let wake = Arc::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        (WorkerLink::new(tx, wake.clone()), rx, wake)
    }

    /// A thread that answers pauses and queue requests with [`Quiesce`], as a device worker.
    #[test]
    fn a_worker_pauses_resumes_and_reports_its_queues() {
        let (link, rx, wake) = link();
        let worker = std::thread::spawn(move || {
            let mut quiesce = Quiesce::default();
            let queue = Queue::new(16).unwrap();
            let mut seen = Vec::new();
            while let Ok(Cmd::Control(c)) = rx.recv() {
                quiesce.apply(c, Some(std::slice::from_ref(&queue)));
                seen.push(quiesce.paused());
            }
            seen
        });
        link.pause("vsock").unwrap();
        assert!(wake.read().unwrap() >= 1, "the worker is woken");
        let queues = link.save_queues("vsock").unwrap();
        assert_eq!(queues.len(), 1);
        assert_eq!((queues[0].max_size, queues[0].next_avail), (16, 0));
        link.resume("vsock").unwrap();
        drop(link);
        assert_eq!(worker.join().unwrap(), vec![true, true, false]);
    }

    /// A worker that never answers times out; one that is gone says so.
    #[test]
    fn a_worker_that_does_not_answer_is_a_typed_error() {
        let (link, rx, _wake) = link();
        let started = std::time::Instant::now();
        assert_eq!(
            link.pause("block"),
            Err(QuiesceError::Timeout {
                device: "block",
                what: "pause",
                timeout: QUIESCE_TIMEOUT,
            })
        );
        assert!(started.elapsed() >= QUIESCE_TIMEOUT);
        drop(rx);
        assert_eq!(
            link.save_queues("block"),
            Err(QuiesceError::Gone { device: "block" })
        );
        assert_eq!(
            link.resume("block"),
            Err(QuiesceError::Gone { device: "block" })
        );
    }
}

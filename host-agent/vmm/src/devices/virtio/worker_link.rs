//! The front end's command channel to its device thread, shared by the virtio devices.
//!
//! Each device's transport-facing front end (on a vCPU thread) holds a [`WorkerLink`] to the
//! thread that owns the device: it sends a command (activate, reset) and wakes the worker
//! through an eventfd the worker's epoll watches. The commands themselves are per device.

use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::mmio::ActivateError;

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

//! Telling the device that a VM moves to another host (live migration), so that its
//! credential sessions follow it there.
//!
//! The source daemon calls [`Relay::tell_moving`] once the target has accepted the VM and
//! before the copy starts: it sends `HostToDevice::Moving` (the VM's id here, its sidecar's
//! boot key, the target's link key and the VM's id there) and waits, at most
//! [`MOVE_NOTICE_WAIT`], for the device's `MoveNoted`. The device decides: it follows the VM
//! only to a host it has paired itself, and only for sessions that prove that boot key. The
//! host's part is only to say where the VM goes; it cannot give the VM's grants to a host the
//! user never paired.
//!
//! The notice does not hold the migration back: a device that is not linked, or that refuses,
//! leaves the VM moving without its credential link, and the migration's progress says so.

use std::time::Duration;

use shared_proto::credential::{DeviceToHost, HostToDevice};
use tokio::sync::oneshot;

use super::Relay;

/// How long the source waits for the device's answer to a move notice.
pub const MOVE_NOTICE_WAIT: Duration = Duration::from_secs(10);
/// Move notices waiting for the device's answer at once; more are refused at once.
const MAX_PENDING_MOVES: usize = 16;

/// Why the device was not told, or would not follow the VM.
#[derive(Debug, thiserror::Error)]
pub enum MoveNoticeFailure {
    /// No device is linked.
    #[error("no device is linked to this host")]
    NotLinked,
    /// The link went down before the answer.
    #[error("the device link went down before the device answered")]
    LinkDown,
    /// The device did not answer in time.
    #[error("the device did not answer within {} s", MOVE_NOTICE_WAIT.as_secs())]
    Timeout,
    /// A notice for the same VM is already waiting, or too many are.
    #[error("another move notice for this VM is waiting")]
    Busy,
    /// The device refused to follow the VM.
    #[error("the device refused: {0}")]
    Refused(String),
}

/// The notices waiting for the device's answer, by the VM's id here.
pub(super) type PendingMoves = std::collections::HashMap<String, oneshot::Sender<Option<String>>>;

impl Relay {
    fn pending_moves(&self) -> std::sync::MutexGuard<'_, PendingMoves> {
        self.moves.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the linked device that `vm_id`, whose sidecar's boot key is `boot_key`, moves to
    /// the host whose link key is `to_host`, as `to_vm`; `Ok` once the device has said it will
    /// serve the VM there.
    pub async fn tell_moving(
        &self,
        vm_id: &str,
        boot_key: [u8; 32],
        to_host: [u8; 32],
        to_vm: &str,
    ) -> Result<(), MoveNoticeFailure> {
        let tx = self.link_sender().ok_or(MoveNoticeFailure::NotLinked)?;
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut pending = self.pending_moves();
            pending.retain(|_, w| !w.is_closed());
            if pending.len() >= MAX_PENDING_MOVES || pending.contains_key(vm_id) {
                return Err(MoveNoticeFailure::Busy);
            }
            pending.insert(vm_id.to_owned(), answer_tx);
        }
        let sent = tx
            .send(HostToDevice::Moving {
                vm_id: vm_id.to_owned(),
                boot_key,
                to_host,
                to_vm: to_vm.to_owned(),
            })
            .await;
        let answer = match sent {
            Err(_) => Err(MoveNoticeFailure::LinkDown),
            Ok(()) => match tokio::time::timeout(MOVE_NOTICE_WAIT, answer_rx).await {
                Err(_) => Err(MoveNoticeFailure::Timeout),
                Ok(Err(_)) => Err(MoveNoticeFailure::LinkDown),
                Ok(Ok(None)) => Ok(()),
                Ok(Ok(Some(reason))) => Err(MoveNoticeFailure::Refused(reason)),
            },
        };
        self.pending_moves().remove(vm_id);
        answer
    }

    /// Hands the device's `MoveNoted` to the notice waiting for it (the link's reader calls
    /// this); an answer nobody waits for is dropped (the device can send these at will).
    pub(super) fn move_noted(&self, msg: DeviceToHost) {
        let DeviceToHost::MoveNoted { vm_id, refused } = msg else {
            return;
        };
        match self.pending_moves().remove(&vm_id) {
            Some(waiter) => {
                let _ = waiter.send(refused);
            }
            None => tracing::debug!(vm = %vm_id, "a move answer for no waiting notice"),
        }
    }

    /// Fails every notice waiting (the link they went out on is down).
    pub(super) fn drop_move_waiters(&self) {
        self.pending_moves().clear();
    }
}

//! Approvals: the device's approval asks go to the daemon's approver, and its answer (with the
//! evidence the device checks) goes back; a request that waits on the device's own approval
//! page only becomes a notification.

use std::sync::Arc;

use shared_proto::credential::{self, ApprovalAnswer, HostToDevice};
use tokio::sync::{OwnedSemaphorePermit, mpsc};

use super::{CREDENTIAL_RULE, MAX_PENDING_APPROVALS, Relay};
use crate::approval::{ApprovalAction, ApprovalOutcome, ApprovalSubject, Approver};
use crate::notify::{Notice, Notifier};

impl Relay {
    /// Sets the approver the device's approval asks go to (default
    /// [`DenyAll`](crate::approval::DenyAll)).
    pub fn set_approver(&self, approver: Arc<dyn Approver>) {
        *self.approver.lock().unwrap_or_else(|p| p.into_inner()) = approver;
    }

    fn approver(&self) -> Arc<dyn Approver> {
        Arc::clone(&self.approver.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Sets who is told that a credential request waits on the device's own approval page
    /// (default: nobody).
    pub fn set_notifiers(&self, notifiers: Vec<Arc<dyn Notifier>>) {
        *self.notifiers.lock().unwrap_or_else(|p| p.into_inner()) = notifiers;
    }

    /// The device shows the request `request` on its own approval page: tells the user so,
    /// and nothing else. No approval is created here, so nothing here can produce evidence,
    /// and the device expects no answer. The notice names the credential, the target and the
    /// VM, never a value; its URL is empty (the page is on the user's device, which the host
    /// does not know how to reach).
    fn notify_device_ask(
        &self,
        request: [u8; 16],
        vm_id: &str,
        credential: &str,
        target_host: &str,
    ) {
        // The device bounds its pending asks, and the guest can make it ask: debug only.
        tracing::debug!(%vm_id, %credential, %target_host, "a request waits on the device");
        let notice = Notice {
            approval_id: hex::encode(request),
            summary: one_line(&format!(
                "a credential request waits on your device: {credential} for {target_host} \
                 (VM {vm_id}); approve or deny it on the device's approval page"
            )),
            url: String::new(),
        };
        let notifiers = self
            .notifiers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        for n in notifiers {
            n.notify(notice.clone());
        }
    }

    /// One `ApprovalNeeded` from the device: a notice only when the request waits on the
    /// device's own page (`on_device`), else a request to the approver whose answer goes back
    /// on `to_device`.
    pub(super) fn device_asks(
        &self,
        to_device: mpsc::Sender<HostToDevice>,
        request: [u8; 16],
        vm_id: String,
        credential: String,
        target_host: String,
        on_device: bool,
    ) {
        if on_device {
            self.notify_device_ask(request, &vm_id, &credential, &target_host);
        } else {
            tracing::debug!(%vm_id, %credential, %target_host, "device asks for approval");
            self.ask_user(to_device, request, vm_id, credential, target_host);
        }
    }

    /// Asks the user to approve releasing `credential` to `target_host` for `vm_id`, in a task,
    /// and sends the device the answer on `to_device`.
    pub(super) fn ask_user(
        &self,
        to_device: mpsc::Sender<HostToDevice>,
        request: [u8; 16],
        vm_id: String,
        credential: String,
        target_host: String,
    ) {
        let Ok(slot) = Arc::clone(&self.approval_slots).try_acquire_owned() else {
            let _ = to_device.try_send(HostToDevice::Approval {
                request,
                answer: ApprovalAnswer::Refused {
                    reason: format!("too many pending approvals (limit {MAX_PENDING_APPROVALS})"),
                },
            });
            return;
        };
        let approver = self.approver();
        tokio::spawn(ask_user(
            approver,
            slot,
            to_device,
            request,
            vm_id,
            credential,
            target_host,
        ));
    }
}

/// The task behind [`Relay::ask_user`].
async fn ask_user(
    approver: Arc<dyn Approver>,
    slot: OwnedSemaphorePermit,
    to_device: mpsc::Sender<HostToDevice>,
    request: [u8; 16],
    vm_id: String,
    credential: String,
    target_host: String,
) {
    let subject = ApprovalSubject {
        agent: format!("the agent in {vm_id}"),
        vm_id: vm_id.clone(),
        profile: "-".into(),
        action: ApprovalAction::Credential {
            name: credential.clone(),
            target_host: target_host.clone(),
        },
        arguments: serde_json::json!({
            "credential": credential,
            "target_host": target_host,
            credential::APPROVAL_REQUEST_ARG: hex::encode(request),
        }),
        rule: CREDENTIAL_RULE.into(),
        reason: format!(
            "the device holds no live grant to send {credential} to {target_host} for {vm_id}"
        ),
    };
    let outcome = approver.request(subject).await;
    let answer = match outcome {
        ApprovalOutcome::Approved { approval_id } => match approver.take_evidence(&approval_id) {
            Some(evidence) => ApprovalAnswer::Approved {
                canonical_request: evidence.request,
                assertion: evidence.assertion,
            },
            None => ApprovalAnswer::Refused {
                reason: "approved, but the approver kept no evidence the device can check".into(),
            },
        },
        ApprovalOutcome::Denied { reason } => ApprovalAnswer::Refused {
            reason: one_line(&reason),
        },
        ApprovalOutcome::Expired => ApprovalAnswer::Refused {
            reason: "the approval request expired".into(),
        },
    };
    let _ = to_device
        .send(HostToDevice::Approval { request, answer })
        .await;
    drop(slot);
}

/// `text` as one bounded line (it goes into a header-like wire field).
fn one_line(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(512)
        .collect()
}

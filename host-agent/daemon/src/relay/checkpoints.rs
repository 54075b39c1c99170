//! Audit checkpoints: while the device is linked, the relay asks it to sign the head of the
//! daemon's audit chain, and records what it signed in the chain (finding L7; the format and
//! its verifiers are in `nanoclaw_audit::checkpoint`).
//!
//! [`Relay::spawn_checkpoints`] asks every [`CheckpointPolicy::every`] or once
//! [`CheckpointPolicy::every_records`] records were appended since the last checkpoint,
//! whichever comes first, and only when something was appended since (its own checkpoint
//! record aside); the daemon also asks once at shutdown. One ask is in flight at a time; the
//! device has [`CHECKPOINT_WAIT`] to answer. The answer must echo what was asked and its
//! signature must verify under the key it names before it is recorded (a record of kind
//! `audit_checkpoint`); the key itself is only trusted by whoever verifies with the key the
//! device shows them (`vault-device audit key`).

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nanoclaw_audit::{AuditLog, CHECKPOINT_KIND, Checkpoint, DeviceKey, SignedCheckpoint};
use shared_proto::credential::{DeviceToHost, HostToDevice};
use tokio::sync::oneshot;

use super::Relay;

/// How long the device has to answer a checkpoint.
pub const CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// When the relay asks for checkpoints (`host-agent serve --audit-checkpoint-*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointPolicy {
    /// At least this often while linked.
    pub every: Duration,
    /// Or as soon as this many records were appended since the last checkpoint.
    pub every_records: u64,
}

/// Why a checkpoint was not recorded.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointFailure {
    /// No device is linked.
    #[error("no device is linked")]
    NotLinked,
    /// The link went down before the answer.
    #[error("the link went down before the device answered")]
    LinkDown,
    /// The device did not answer in time.
    #[error("the device did not answer within {} s", CHECKPOINT_WAIT.as_secs())]
    Timeout,
    /// The device refused.
    #[error("the device refused: {0}")]
    Refused(String),
    /// The answer does not echo what was asked.
    #[error("the device's answer does not match the checkpoint asked")]
    Mismatch,
    /// The signature does not verify under the key the answer names.
    #[error("the device's signature does not verify")]
    BadSignature(#[source] nanoclaw_audit::CheckpointError),
    /// Recording the signed checkpoint failed.
    #[error("audit")]
    Audit(#[source] nanoclaw_audit::AuditError),
}

/// What the device answered.
#[derive(Debug)]
pub(super) enum CheckpointAnswer {
    Signed(SignedCheckpoint),
    Refused(String),
}

/// The relay's checkpoint state.
#[derive(Debug, Default)]
pub(super) struct Checkpoints {
    /// The ask in flight: its seq and its waiter.
    pub(super) waiter: Option<(u64, oneshot::Sender<CheckpointAnswer>)>,
    /// The seq of the last checkpoint the device signed (or refused: it will not sign it
    /// again), and the seq of the record that holds it.
    last: Option<(u64, Option<u64>)>,
}

impl Relay {
    /// The label this relay's checkpoints name: its host key's first 8 bytes, hex, and the
    /// log, so that one device can anchor several hosts.
    pub fn checkpoint_label(&self) -> String {
        format!("host-{}/audit", hex::encode(&self.public[..8]))
    }

    fn checkpoints(&self) -> std::sync::MutexGuard<'_, Checkpoints> {
        self.checkpoints.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Records appended since the last checkpoint (or in all, before the first), not counting
    /// the record of the checkpoint itself; `None` when there is nothing new to anchor.
    fn unanchored(&self, audit: &AuditLog) -> Option<u64> {
        let head = audit.head()?;
        match self.checkpoints().last {
            None => Some(head.seq + 1),
            Some((signed, record)) => {
                // The checkpoint's own record comes after the seq it signed.
                let own = u64::from(record.is_some_and(|r| r > signed && r <= head.seq));
                let since = head.seq.saturating_sub(signed).saturating_sub(own);
                (since > 0).then_some(since)
            }
        }
    }

    /// Asks the linked device to sign the audit chain's head and records the signed
    /// checkpoint; `Ok(None)` when nothing was appended since the last checkpoint, else the
    /// seq of the new record.
    pub async fn checkpoint(&self, audit: &AuditLog) -> Result<Option<u64>, CheckpointFailure> {
        // One at a time: a second caller waits for the first and then finds nothing new.
        let _turn = self.checkpoint_turn.lock().await;
        if self.unanchored(audit).is_none() {
            return Ok(None);
        }
        let Some(head) = audit.head() else {
            return Ok(None);
        };
        let tx = self.link_sender().ok_or(CheckpointFailure::NotLinked)?;
        let asked = Checkpoint {
            log: self.checkpoint_label(),
            seq: head.seq,
            head: head.hash,
            unix_time: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let (answer_tx, answer_rx) = oneshot::channel();
        self.checkpoints().waiter = Some((asked.seq, answer_tx));
        let sent = tx
            .send(HostToDevice::Checkpoint {
                log: asked.log.clone(),
                seq: asked.seq,
                head: asked.head,
                unix_time: asked.unix_time,
            })
            .await;
        let answer = match sent {
            Err(_) => Err(CheckpointFailure::LinkDown),
            Ok(()) => match tokio::time::timeout(CHECKPOINT_WAIT, answer_rx).await {
                Err(_) => Err(CheckpointFailure::Timeout),
                Ok(Err(_)) => Err(CheckpointFailure::LinkDown),
                Ok(Ok(answer)) => Ok(answer),
            },
        };
        self.checkpoints().waiter = None;
        let signed = match answer? {
            CheckpointAnswer::Refused(reason) => {
                // It will not sign this seq again: wait for new records.
                self.checkpoints().last = Some((asked.seq, None));
                return Err(CheckpointFailure::Refused(reason));
            }
            CheckpointAnswer::Signed(signed) => signed,
        };
        if signed.checkpoint() != asked {
            return Err(CheckpointFailure::Mismatch);
        }
        DeviceKey::from_bytes(&signed.device_key)
            .and_then(|key| signed.verify(&key))
            .map_err(CheckpointFailure::BadSignature)?;
        self.checkpoints().last = Some((asked.seq, None));
        let record = audit
            .submit(CHECKPOINT_KIND, signed.to_data())
            .await
            .map_err(CheckpointFailure::Audit)?;
        self.checkpoints().last = Some((asked.seq, Some(record)));
        tracing::debug!(
            seq = asked.seq,
            record,
            "audit checkpoint signed by the device"
        );
        Ok(Some(record))
    }

    /// Fails the ask in flight (the link it went out on is down).
    pub(super) fn drop_checkpoint_waiter(&self) {
        self.checkpoints().waiter = None;
    }

    /// Hands the device's answer to the ask in flight (the link's reader calls this).
    pub(super) fn checkpoint_answered(&self, msg: DeviceToHost) {
        let (seq, answer) = match msg {
            DeviceToHost::CheckpointSigned {
                log,
                seq,
                head,
                unix_time,
                device_key,
                signature,
            } => (
                seq,
                CheckpointAnswer::Signed(SignedCheckpoint {
                    log,
                    seq,
                    head,
                    unix_time,
                    device_key,
                    signature,
                }),
            ),
            DeviceToHost::CheckpointRefused { seq, reason } => {
                (seq, CheckpointAnswer::Refused(reason))
            }
            _ => return,
        };
        let mut state = self.checkpoints();
        match state.waiter.take() {
            Some((asked, tx)) if asked == seq => {
                let _ = tx.send(answer);
            }
            other => {
                state.waiter = other;
                // The device can send these at will: not above debug.
                tracing::debug!(seq, "a checkpoint answer for no checkpoint in flight");
            }
        }
    }

    /// Asks for checkpoints under `policy` for as long as the task runs (see the module doc).
    pub fn spawn_checkpoints(
        self: &Arc<Self>,
        audit: Arc<AuditLog>,
        policy: CheckpointPolicy,
    ) -> tokio::task::JoinHandle<()> {
        let relay = Arc::clone(self);
        tokio::spawn(async move {
            let tick = policy
                .every
                .clamp(Duration::from_millis(50), Duration::from_secs(1));
            let mut last_ask: Option<Instant> = None;
            let mut failures = crate::daemon::ratelimit::LogBudget::default();
            loop {
                tokio::time::sleep(tick).await;
                if !relay.is_linked() {
                    continue;
                }
                let Some(new) = relay.unanchored(&audit) else {
                    continue;
                };
                let due = new >= policy.every_records
                    || last_ask.is_none_or(|t| t.elapsed() >= policy.every);
                if !due {
                    continue;
                }
                last_ask = Some(Instant::now());
                if let Err(e) = relay.checkpoint(&audit).await
                    && let Some(suppressed) = failures.admit(Instant::now())
                {
                    tracing::warn!(error = %crate::error_chain(&e), suppressed,
                        "audit checkpoint not recorded");
                }
            }
        })
    }
}

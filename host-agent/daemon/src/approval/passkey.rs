//! [`PasskeyApprover`]: the real [`Approver`]. Each request waits until the user approves it
//! with a verified passkey assertion over its exact canonical encoding, denies it, or it
//! expires.
//!
//! - [`Approver::request`] builds a [`shared_proto::approval::ApprovalRequest`] (the subject,
//!   the arguments as canonical JSON text with sorted keys, the expiry, a random 32-byte nonce
//!   and a random id), records `approval_request` in the audit log (agent, action, rule, a
//!   digest of the arguments, the challenge; never the argument values), notifies, and waits.
//!   If the record cannot be written the request is denied: nothing runs unrecorded.
//! - [`PasskeyApprover::approve`] verifies the assertion with
//!   [`shared_proto::approval::verify_approval`] against the registered passkeys. The pending
//!   entry is taken out under the same lock that checks it, so a request is approved once: a
//!   second assertion finds nothing to approve. A failed assertion leaves the request pending
//!   (the user may retry until it expires) and is recorded as `approval_rejected`.
//! - Registration needs a one-time link ([`PasskeyApprover::registration_link`], valid for
//!   [`REGISTRATION_TTL`]): a page on localhost is reachable by any local process, and an
//!   attacker's passkey must not be able to approve. The token travels in the URL fragment,
//!   which browsers do not send to the server or put in logs.
//! - Passkeys (public keys, credential ids and counters: nothing secret) are kept in a JSON
//!   file, written atomically after each registration and each counter change.
//! - For a credential release the vault-device checks the approval itself: the credential
//!   relay takes the [`ApprovalEvidence`] of an approved request
//!   ([`PasskeyApprover::take_evidence`]: the canonical request bytes and the assertion) and
//!   forwards it; the device decodes the request, checks it names the credential and target it
//!   is asked for, and verifies the assertion with the passkey it stored at pairing.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use serde::Serialize;
use shared_proto::approval::{
    ApprovalError, ApprovalRequest, Assertion, Passkey, Registration, RelyingParty, RequestAction,
    verify_approval, verify_registration,
};
use tokio::sync::oneshot;

use super::{ApprovalOutcome, ApprovalSubject, Approver};
use crate::error_chain;
use crate::notify::{Notice, Notifier};
use nanoclaw_audit::{self as audit, AuditLog};

/// JSON text with object keys sorted at every level: the one rendering of the arguments that
/// the page shows and the passkey signs.
pub use shared_proto::canonical_json;

/// How long a registration link and a registration challenge stay valid.
pub const REGISTRATION_TTL: Duration = Duration::from_secs(600);

/// The longest error text recorded for a refused assertion.
const MAX_ERROR_CHARS: usize = 200;

/// How many approvals' evidence is kept for [`PasskeyApprover::take_evidence`].
pub const MAX_EVIDENCE: usize = 256;

/// The most requests pending at once; more are denied (a flooding agent cannot grow memory).
pub const MAX_PENDING: usize = 256;
/// The most requests one VM's agent may have pending at once; more are denied, so that one
/// agent can neither crowd out the others nor flood the user with notifications (each
/// notification goes out for an admitted request only).
pub const MAX_PENDING_PER_AGENT: usize = 8;

/// Errors of the passkey approver.
#[derive(Debug, thiserror::Error)]
pub enum PasskeyError {
    /// No pending request has this id (never made, already decided, or expired).
    #[error("no pending approval request {0}")]
    NoSuchRequest(String),
    /// The assertion or registration did not verify.
    #[error("passkey check failed")]
    Verify(#[source] ApprovalError),
    /// No passkey is registered, so nothing can be approved.
    #[error("no passkey is registered")]
    NoPasskey,
    /// The registration link is unknown, used or expired.
    #[error("the registration link is not valid (ask for a new one)")]
    BadToken,
    /// The registration challenge is unknown, used or expired.
    #[error("the registration has expired (start again)")]
    NoSuchRegistration,
    /// This passkey is already registered.
    #[error("this passkey is already registered")]
    Duplicate,
    /// Reading or writing the passkey file failed.
    #[error("passkey file {}", .path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The passkey file does not parse.
    #[error("passkey file {} is malformed", .path.display())]
    StoreFormat {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Recording in the audit log failed.
    #[error("cannot record the decision")]
    Audit(#[source] audit::AuditError),
    /// Reading the kernel's random source failed.
    #[error("cannot read random bytes")]
    Random(#[source] std::io::Error),
}

/// How the approver is set up.
#[derive(Debug, Clone)]
pub struct ApprovalConfig {
    /// The rp id and the pages' origin.
    pub rp: RelyingParty,
    /// How long a request waits for the user.
    pub ttl: Duration,
    /// Where passkeys are kept (`None`: in memory only, for tests).
    pub passkeys_file: Option<PathBuf>,
}

/// A pending request, as the CLI and the approval page show it (an API type).
pub use nanoclaw_api::PendingApproval as PendingView;

#[derive(Debug)]
struct Pending {
    request: ApprovalRequest,
    challenge: [u8; 32],
    answer: oneshot::Sender<ApprovalOutcome>,
}

/// What proves an approval to a third party (vault-device): the request exactly as signed,
/// and the user's assertion over its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct ApprovalEvidence {
    /// [`ApprovalRequest::encode`] of the approved request.
    #[serde(with = "shared_proto::approval::b64url")]
    pub request: Vec<u8>,
    /// The verified assertion.
    pub assertion: Assertion,
}

#[derive(Debug, Default)]
struct State {
    passkeys: Vec<Passkey>,
    /// Evidence of recent approvals, oldest first, at most [`MAX_EVIDENCE`].
    evidence: std::collections::VecDeque<(String, ApprovalEvidence)>,
    pending: HashMap<String, Pending>,
    /// Registration link tokens and when they lapse.
    tokens: HashMap<String, Instant>,
    /// Registration challenges (base64url) and when they lapse.
    registrations: HashMap<String, Instant>,
}

/// The passkey approver (see the module doc). Cheap to clone.
#[derive(Debug, Clone)]
pub struct PasskeyApprover {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    config: ApprovalConfig,
    audit: Arc<AuditLog>,
    notifiers: Vec<Arc<dyn Notifier>>,
    state: Mutex<State>,
}

impl PasskeyApprover {
    /// An approver recording in `audit`, loading passkeys from the configured file if it
    /// exists, and notifying each of `notifiers` of every new request.
    pub fn new(
        config: ApprovalConfig,
        audit: Arc<AuditLog>,
        notifiers: Vec<Arc<dyn Notifier>>,
    ) -> Result<Self, PasskeyError> {
        let passkeys = match &config.passkeys_file {
            Some(path) => match std::fs::read(path) {
                Ok(bytes) => {
                    serde_json::from_slice(&bytes).map_err(|source| PasskeyError::StoreFormat {
                        path: path.clone(),
                        source,
                    })?
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
                Err(source) => {
                    return Err(PasskeyError::Store {
                        path: path.clone(),
                        source,
                    });
                }
            },
            None => Vec::new(),
        };
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                audit,
                notifiers,
                state: Mutex::new(State {
                    passkeys,
                    ..State::default()
                }),
            }),
        })
    }

    /// The rp id and origin.
    pub fn relying_party(&self) -> &RelyingParty {
        &self.inner.config.rp
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The registered passkeys (public data).
    pub fn passkeys(&self) -> Vec<Passkey> {
        self.lock().passkeys.clone()
    }

    fn view(&self, p: &Pending) -> PendingView {
        PendingView {
            request: p.request.clone(),
            challenge: B64URL.encode(p.challenge),
            url: self.approval_url(&p.request.id),
        }
    }

    /// The pending requests, oldest first.
    pub fn pending(&self) -> Vec<PendingView> {
        let mut v: Vec<_> = self.lock().pending.values().map(|p| self.view(p)).collect();
        v.sort_by(|a, b| {
            (a.request.created_unix_ms, &a.request.id)
                .cmp(&(b.request.created_unix_ms, &b.request.id))
        });
        v
    }

    /// One pending request.
    pub fn get(&self, id: &str) -> Option<PendingView> {
        self.lock().pending.get(id).map(|p| self.view(p))
    }

    /// The approval page of request `id`.
    pub fn approval_url(&self, id: &str) -> String {
        format!("{}/approve/{id}", self.inner.config.rp.origin)
    }

    /// A new one-time registration link.
    pub fn registration_link(&self) -> Result<String, PasskeyError> {
        let token = B64URL.encode(random_bytes::<24>()?);
        let mut st = self.lock();
        let now = Instant::now();
        st.tokens.retain(|_, until| *until > now);
        st.tokens.insert(token.clone(), now + REGISTRATION_TTL);
        Ok(format!("{}/register#{token}", self.inner.config.rp.origin))
    }

    /// Starts a registration with a link's token (used up here); answers the challenge
    /// (base64url) and the credential ids to exclude.
    pub fn begin_registration(&self, token: &str) -> Result<(String, Vec<String>), PasskeyError> {
        let challenge = B64URL.encode(random_bytes::<32>()?);
        let mut st = self.lock();
        let now = Instant::now();
        match st.tokens.remove(token) {
            Some(until) if until > now => {}
            _ => return Err(PasskeyError::BadToken),
        }
        st.registrations.retain(|_, until| *until > now);
        st.registrations
            .insert(challenge.clone(), now + REGISTRATION_TTL);
        let exclude = st
            .passkeys
            .iter()
            .map(|p| B64URL.encode(&p.credential_id))
            .collect();
        Ok((challenge, exclude))
    }

    /// Finishes a registration made over `challenge` (base64url): verifies it, stores the
    /// passkey and records `passkey_registered`. Answers the credential id (base64url).
    pub fn finish_registration(
        &self,
        challenge: &str,
        registration: &Registration,
    ) -> Result<String, PasskeyError> {
        let mut st = self.lock();
        match st.registrations.remove(challenge) {
            Some(until) if until > Instant::now() => {}
            _ => return Err(PasskeyError::NoSuchRegistration),
        }
        let raw = B64URL
            .decode(challenge)
            .map_err(|_| PasskeyError::NoSuchRegistration)?;
        let passkey = verify_registration(&self.inner.config.rp, &raw, registration)
            .map_err(PasskeyError::Verify)?;
        if st
            .passkeys
            .iter()
            .any(|p| p.credential_id == passkey.credential_id)
        {
            return Err(PasskeyError::Duplicate);
        }
        let id = B64URL.encode(&passkey.credential_id);
        self.inner
            .audit
            .append(
                "passkey_registered",
                serde_json::json!({
                    "credential_id": id,
                    "public_key_digest": audit::digest(&passkey.public_key),
                }),
            )
            .map_err(PasskeyError::Audit)?;
        st.passkeys.push(passkey);
        self.save(&st.passkeys)?;
        tracing::info!(credential_id = %id, "passkey registered");
        Ok(id)
    }

    /// Approves pending request `id` with `assertion`; answers the approval id. See the module
    /// doc: one approval per request; a failed check leaves it pending.
    pub fn approve(&self, id: &str, assertion: &Assertion) -> Result<String, PasskeyError> {
        let mut st = self.lock();
        let pending = st
            .pending
            .get(id)
            .ok_or_else(|| PasskeyError::NoSuchRequest(id.to_owned()))?;
        if st.passkeys.is_empty() {
            return Err(PasskeyError::NoPasskey);
        }
        let checked = verify_approval(
            &self.inner.config.rp,
            &pending.request,
            now_unix_ms(),
            &st.passkeys,
            assertion,
        );
        let verified = match checked {
            Ok(v) => v,
            Err(e) => {
                // The error may quote browser-supplied text (an origin): keep it short.
                let error: String = e.to_string().chars().take(MAX_ERROR_CHARS).collect();
                let _ = self.record(
                    "approval_rejected",
                    serde_json::json!({"approval_id": id, "error": error}),
                );
                tracing::warn!(approval = %id, error = %e, "approval assertion refused");
                return Err(PasskeyError::Verify(e));
            }
        };
        let Some(pending) = st.pending.remove(id) else {
            return Err(PasskeyError::NoSuchRequest(id.to_owned()));
        };
        let passkey = &mut st.passkeys[verified.passkey];
        passkey.counter = verified.counter;
        let credential_id = B64URL.encode(&passkey.credential_id);
        if let Err(e) = self.save(&st.passkeys) {
            // The counter still advanced in memory; only a restart could forget it.
            tracing::error!(error = %error_chain(&e), "cannot save the passkey counter");
        }
        let recorded = self.record(
            "approval",
            serde_json::json!({
                "approval_id": id,
                "credential_id": credential_id,
                "counter": verified.counter,
                "challenge": hex::encode(pending.challenge),
            }),
        );
        match recorded {
            Ok(()) => {
                if let Ok(request) = pending.request.encode() {
                    if st.evidence.len() == MAX_EVIDENCE {
                        st.evidence.pop_front();
                    }
                    st.evidence.push_back((
                        id.to_owned(),
                        ApprovalEvidence {
                            request,
                            assertion: assertion.clone(),
                        },
                    ));
                }
                let _ = pending.answer.send(ApprovalOutcome::Approved {
                    approval_id: id.to_owned(),
                });
                tracing::info!(approval = %id, "approved with a passkey");
                Ok(id.to_owned())
            }
            Err(e) => {
                let _ = pending.answer.send(ApprovalOutcome::Denied {
                    reason: "the approval could not be recorded".into(),
                });
                Err(e)
            }
        }
    }

    /// The evidence of approval `approval_id`, once (it is removed): what the credential relay
    /// forwards to vault-device for its own check.
    pub fn take_evidence(&self, approval_id: &str) -> Option<ApprovalEvidence> {
        let mut st = self.lock();
        let at = st.evidence.iter().position(|(id, _)| id == approval_id)?;
        st.evidence.remove(at).map(|(_, e)| e)
    }

    /// Denies pending request `id` (no passkey needed: refusing is always safe).
    pub fn deny(&self, id: &str) -> Result<(), PasskeyError> {
        let pending = self
            .lock()
            .pending
            .remove(id)
            .ok_or_else(|| PasskeyError::NoSuchRequest(id.to_owned()))?;
        let _ = self.record(
            "denial",
            serde_json::json!({"approval_id": id, "by": "user"}),
        );
        let _ = pending.answer.send(ApprovalOutcome::Denied {
            reason: "denied by the user".into(),
        });
        tracing::info!(approval = %id, "denied by the user");
        Ok(())
    }

    fn record(&self, kind: &str, data: serde_json::Value) -> Result<(), PasskeyError> {
        self.inner
            .audit
            .append(kind, data)
            .map(|_| ())
            .map_err(|e| {
                tracing::error!(error = %error_chain(&e), kind, "cannot write the audit record");
                PasskeyError::Audit(e)
            })
    }

    fn save(&self, passkeys: &[Passkey]) -> Result<(), PasskeyError> {
        let Some(path) = &self.inner.config.passkeys_file else {
            return Ok(());
        };
        let fail = |source| PasskeyError::Store {
            path: path.clone(),
            source,
        };
        let body = serde_json::to_vec_pretty(passkeys).map_err(|e| fail(e.into()))?;
        // The signature counters must survive a crash: a counter that goes back would let an
        // older counter value pass the clone check again.
        shared_proto::fs::replace_file(path, &body, shared_proto::fs::DEFAULT_MODE)
            .map_err(|e| fail(e.into()))
    }

    fn build_request(&self, subject: &ApprovalSubject) -> Result<ApprovalRequest, PasskeyError> {
        let created = now_unix_ms();
        let ttl_ms = u64::try_from(self.inner.config.ttl.as_millis()).unwrap_or(u64::MAX);
        Ok(ApprovalRequest {
            id: hex::encode(random_bytes::<12>()?),
            agent: subject.agent.clone(),
            vm_id: subject.vm_id.clone(),
            profile: subject.profile.clone(),
            action: subject.action.clone(),
            arguments: canonical_json(&subject.arguments),
            rule: subject.rule.clone(),
            reason: subject.reason.clone(),
            created_unix_ms: created,
            expires_unix_ms: created.saturating_add(ttl_ms),
            nonce: random_bytes::<32>()?,
        })
    }

    async fn wait(&self, subject: ApprovalSubject) -> ApprovalOutcome {
        let denied = |reason: String| ApprovalOutcome::Denied { reason };
        let request = match self.build_request(&subject) {
            Ok(r) => r,
            Err(e) => return denied(error_chain(&e)),
        };
        let challenge = match request.challenge() {
            Ok(c) => c,
            Err(e) => return denied(error_chain(&e)),
        };
        let id = request.id.clone();
        let (tx, mut rx) = oneshot::channel();
        {
            let mut st = self.lock();
            if st.pending.len() >= MAX_PENDING {
                return denied(format!("too many pending approvals (limit {MAX_PENDING})"));
            }
            let mine = st
                .pending
                .values()
                .filter(|p| p.request.vm_id == request.vm_id)
                .count();
            if mine >= MAX_PENDING_PER_AGENT {
                return denied(format!(
                    "too many pending approvals for this agent (limit {MAX_PENDING_PER_AGENT})"
                ));
            }
            // Recorded before anyone can approve it.
            let recorded = self.record(
                "approval_request",
                serde_json::json!({
                    "approval_id": id,
                    "agent": request.agent,
                    "vm_id": request.vm_id,
                    "profile": request.profile,
                    "action": request.action,
                    "rule": request.rule,
                    "arguments_digest": audit::digest(request.arguments.as_bytes()),
                    "challenge": hex::encode(challenge),
                    "expires_unix_ms": request.expires_unix_ms,
                }),
            );
            if let Err(e) = recorded {
                return denied(error_chain(&e));
            }
            st.pending.insert(
                id.clone(),
                Pending {
                    request: request.clone(),
                    challenge,
                    answer: tx,
                },
            );
        }
        // If the caller stops waiting, the request goes away with it.
        let _guard = PendingGuard {
            approver: self,
            id: &id,
        };
        let notice = Notice {
            approval_id: id.clone(),
            summary: summary(&request),
            url: self.approval_url(&id),
        };
        for n in &self.inner.notifiers {
            n.notify(notice.clone());
        }
        tracing::info!(approval = %id, url = %notice.url, "approval requested");
        tokio::select! {
            answer = &mut rx => return answer.unwrap_or(ApprovalOutcome::Expired),
            () = tokio::time::sleep(self.inner.config.ttl) => {}
        }
        let expired = self.lock().pending.remove(&id).is_some();
        if !expired {
            // Decided in the same instant: the answer was sent under the lock.
            return rx.await.unwrap_or(ApprovalOutcome::Expired);
        }
        let _ = self.record("expiry", serde_json::json!({"approval_id": id}));
        tracing::info!(approval = %id, "approval request expired");
        ApprovalOutcome::Expired
    }
}

/// Removes an abandoned request (its waiter was dropped) and records it as withdrawn.
struct PendingGuard<'a> {
    approver: &'a PasskeyApprover,
    id: &'a str,
}

impl Drop for PendingGuard<'_> {
    fn drop(&mut self) {
        if self.approver.lock().pending.remove(self.id).is_some() {
            let _ = self
                .approver
                .record("withdrawn", serde_json::json!({"approval_id": self.id}));
        }
    }
}

impl Approver for PasskeyApprover {
    fn request(
        &self,
        subject: ApprovalSubject,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>> {
        Box::pin(async move {
            let outcome = self.wait(subject).await;
            let label = match &outcome {
                ApprovalOutcome::Approved { .. } => "approved",
                ApprovalOutcome::Denied { .. } => "denied",
                ApprovalOutcome::Expired => "expired",
            };
            crate::metrics::global()
                .approvals
                .get_or_create(&crate::metrics::OutcomeLabel { outcome: label })
                .inc();
            outcome
        })
    }

    fn take_evidence(&self, approval_id: &str) -> Option<ApprovalEvidence> {
        PasskeyApprover::take_evidence(self, approval_id)
    }
}

/// A one-line summary for notifications: who wants what, never argument values.
pub fn summary(request: &ApprovalRequest) -> String {
    let what = match &request.action {
        RequestAction::ToolCall { server, tool } => format!("call {server}/{tool}"),
        RequestAction::Spawn { profile } => format!("spawn an agent with profile {profile}"),
        RequestAction::Credential { name, target_host } => {
            format!("use credential {name} for {target_host}")
        }
    };
    format!("{} wants to {what} (rule {})", request.agent, request.rule)
}

fn random_bytes<const N: usize>() -> Result<[u8; N], PasskeyError> {
    let mut b = [0u8; N];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut b))
        .map_err(PasskeyError::Random)?;
    Ok(b)
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use p256::ecdsa::signature::Signer;
    use p256::ecdsa::{Signature, SigningKey};
    use sha2::{Digest, Sha256};

    use super::*;
    use crate::approval::ApprovalAction;

    const ORIGIN: &str = "http://localhost:8443";

    fn approver(dir: &std::path::Path, ttl: Duration) -> PasskeyApprover {
        PasskeyApprover::new(
            ApprovalConfig {
                rp: RelyingParty {
                    rp_id: "localhost".into(),
                    origin: ORIGIN.into(),
                },
                ttl,
                passkeys_file: Some(dir.join("passkeys.json")),
            },
            Arc::new(AuditLog::open(dir.join("audit.ndjson")).unwrap()),
            Vec::new(),
        )
        .unwrap()
    }

    fn subject() -> ApprovalSubject {
        ApprovalSubject {
            agent: "coder".into(),
            vm_id: "vm-1".into(),
            profile: "worker".into(),
            action: ApprovalAction::ToolCall {
                server: "fs".into(),
                tool: "delete".into(),
            },
            arguments: serde_json::json!({"z": 1, "a": {"y": [true, null], "b": "x"}}),
            rule: "destructive".into(),
            reason: "deletes files".into(),
        }
    }

    /// A software passkey whose counter stays 0, like many platform passkeys: replay
    /// protection must then come from the approver's one-approval-per-request rule.
    struct ZeroCounterKey(SigningKey);

    impl ZeroCounterKey {
        fn passkey(&self) -> Passkey {
            Passkey {
                credential_id: b"cred".to_vec(),
                public_key: self
                    .0
                    .verifying_key()
                    .to_encoded_point(false)
                    .as_bytes()
                    .to_vec(),
                counter: 0,
            }
        }

        fn assert(&self, challenge: &str) -> Assertion {
            let mut auth_data = Sha256::digest(b"localhost").to_vec();
            auth_data.extend_from_slice(&[0x05, 0, 0, 0, 0]);
            let client_data_json = format!(
                r#"{{"type":"webauthn.get","challenge":"{challenge}","origin":"{ORIGIN}"}}"#
            )
            .into_bytes();
            let mut msg = auth_data.clone();
            msg.extend_from_slice(&Sha256::digest(&client_data_json));
            let sig: Signature = self.0.sign(&msg);
            Assertion {
                credential_id: b"cred".to_vec(),
                authenticator_data: auth_data,
                client_data_json,
                signature: sig.to_der().as_bytes().to_vec(),
            }
        }
    }

    async fn pending_one(a: &PasskeyApprover) -> PendingView {
        for _ in 0..200 {
            if let Some(p) = a.pending().into_iter().next() {
                return p;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("nothing pending");
    }

    /// Review finding L2: one agent's flood of asks stops at its own cap, and another agent
    /// can still ask.
    #[tokio::test]
    async fn one_agent_cannot_hold_more_than_its_share_of_pending_approvals() {
        let dir = tempfile::tempdir().unwrap();
        let a = approver(dir.path(), Duration::from_secs(30));
        let mut waiters = Vec::new();
        for _ in 0..MAX_PENDING_PER_AGENT {
            let a = a.clone();
            waiters.push(tokio::spawn(async move { a.request(subject()).await }));
        }
        for _ in 0..200 {
            if a.pending().len() == MAX_PENDING_PER_AGENT {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(a.pending().len(), MAX_PENDING_PER_AGENT);
        match a.request(subject()).await {
            ApprovalOutcome::Denied { reason } => {
                assert!(reason.contains("for this agent"), "{reason}")
            }
            other => panic!("over the cap: {other:?}"),
        }
        let other = {
            let a = a.clone();
            let mut s = subject();
            s.vm_id = "vm-2".into();
            tokio::spawn(async move { a.request(s).await })
        };
        for _ in 0..200 {
            if a.pending().len() == MAX_PENDING_PER_AGENT + 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            a.pending().len(),
            MAX_PENDING_PER_AGENT + 1,
            "another agent may ask"
        );
        other.abort();
        for w in waiters {
            w.abort();
        }
    }

    #[tokio::test]
    async fn one_assertion_approves_one_request_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = approver(dir.path(), Duration::from_secs(30));
        let key = ZeroCounterKey(SigningKey::random(&mut rand_core::OsRng));
        a.lock().passkeys.push(key.passkey());
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.request(subject()).await })
        };
        let p = pending_one(&a).await;
        assert_eq!(
            p.request.arguments,
            r#"{"a":{"b":"x","y":[true,null]},"z":1}"#
        );
        assert_eq!(p.url, format!("{ORIGIN}/approve/{}", p.request.id));
        let assertion = key.assert(&p.challenge);
        assert_eq!(a.approve(&p.request.id, &assertion).unwrap(), p.request.id);
        assert_eq!(
            waiter.await.unwrap(),
            ApprovalOutcome::Approved {
                approval_id: p.request.id.clone()
            }
        );
        // The evidence a vault-device would check: the exact request and the assertion.
        let evidence = a.take_evidence(&p.request.id).unwrap();
        let request = ApprovalRequest::decode(&evidence.request).unwrap();
        assert_eq!(request, p.request);
        shared_proto::approval::verify_approval(
            &a.relying_party().clone(),
            &request,
            now_unix_ms(),
            &[key.passkey()],
            &evidence.assertion,
        )
        .unwrap();
        assert!(a.take_evidence(&p.request.id).is_none(), "taken once");
        // The same assertion again: nothing is pending under that id any more.
        assert!(matches!(
            a.approve(&p.request.id, &assertion),
            Err(PasskeyError::NoSuchRequest(_))
        ));
        // Nor does it approve a second, identical-looking request (new nonce, new challenge).
        let waiter = {
            let a = a.clone();
            tokio::spawn(async move { a.request(subject()).await })
        };
        let q = pending_one(&a).await;
        assert_ne!(q.challenge, p.challenge);
        assert!(matches!(
            a.approve(&q.request.id, &assertion),
            Err(PasskeyError::Verify(ApprovalError::ChallengeMismatch))
        ));
        assert!(
            a.get(&q.request.id).is_some(),
            "a failed check leaves it pending"
        );
        a.deny(&q.request.id).unwrap();
        assert!(matches!(
            waiter.await.unwrap(),
            ApprovalOutcome::Denied { .. }
        ));
        let kinds: Vec<String> = nanoclaw_audit::tail(&dir.path().join("audit.ndjson"), 100)
            .unwrap()
            .into_iter()
            .map(|r| r.record.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "approval_request",
                "approval",
                "approval_request",
                "approval_rejected",
                "denial"
            ]
        );
    }

    #[tokio::test]
    async fn no_answer_expires_and_an_abandoned_request_is_withdrawn() {
        let dir = tempfile::tempdir().unwrap();
        let a = approver(dir.path(), Duration::from_millis(50));
        assert_eq!(a.request(subject()).await, ApprovalOutcome::Expired);
        assert!(a.pending().is_empty());
        // Without a registered passkey nothing can be approved.
        let a = approver(dir.path(), Duration::from_secs(30));
        let fut = a.request(subject());
        let a2 = a.clone();
        let check = async move {
            let p = pending_one(&a2).await;
            let key = ZeroCounterKey(SigningKey::random(&mut rand_core::OsRng));
            assert!(matches!(
                a2.approve(&p.request.id, &key.assert(&p.challenge)),
                Err(PasskeyError::NoPasskey)
            ));
        };
        tokio::select! {
            _ = fut => panic!("resolved without an answer"),
            () = check => {}
        }
        // The future was dropped: its request is gone.
        assert!(a.pending().is_empty());
        let kinds: Vec<String> = nanoclaw_audit::tail(&dir.path().join("audit.ndjson"), 100)
            .unwrap()
            .into_iter()
            .map(|r| r.record.kind)
            .collect();
        assert_eq!(
            kinds,
            [
                "approval_request",
                "expiry",
                "approval_request",
                "withdrawn"
            ]
        );
    }

    #[test]
    fn registration_links_work_once() {
        let dir = tempfile::tempdir().unwrap();
        let a = approver(dir.path(), Duration::from_secs(30));
        let link = a.registration_link().unwrap();
        let token = link.strip_prefix(&format!("{ORIGIN}/register#")).unwrap();
        let (challenge, exclude) = a.begin_registration(token).unwrap();
        assert!(exclude.is_empty());
        assert!(matches!(
            a.begin_registration(token),
            Err(PasskeyError::BadToken)
        ));
        assert!(matches!(
            a.begin_registration("guess"),
            Err(PasskeyError::BadToken)
        ));
        let junk = Registration {
            attestation_object: vec![0xa0],
            client_data_json: b"{}".to_vec(),
        };
        assert!(matches!(
            a.finish_registration(&challenge, &junk),
            Err(PasskeyError::Verify(_))
        ));
        // The challenge was used up by that attempt.
        assert!(matches!(
            a.finish_registration(&challenge, &junk),
            Err(PasskeyError::NoSuchRegistration)
        ));
    }
}

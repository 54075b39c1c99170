//! The credential relay: the host's part of the credential channels, which carries ciphertext
//! between sidecars and the user's device and never holds a credential.
//!
//! # Parts
//!
//! - **The device listener** ([`Relay::listen`], TCP). The device dials out to it (phones sit
//!   behind NAT). The first byte of a connection picks pairing or the link
//!   (`shared_proto::credential::LINK_MODE_*`).
//! - **Pairing.** While no device is paired, the relay holds a one-time code
//!   ([`Relay::pairing_code`], also written to `<state>/relay/pairing-code`, mode 0600) that
//!   the user types into `vault-device pair`. The code's PSK keys a Noise NNpsk0 handshake in
//!   which both sides send their static key; the relay pins the device's in
//!   `<state>/relay/device.json`. A code lives [`pairing::CODE_LIFETIME`]; each wrong code
//!   makes the next attempt wait (1 s, doubling to a minute), which rate-limits guessing
//!   without letting a guesser void the user's code.
//! - **The link.** Noise KK with both pinned keys (the host's static key lives in
//!   `<state>/relay/host.key`, 0600). A newer link replaces an older one. Over it the relay
//!   multiplexes one session per sidecar connection.
//! - **Per-VM listeners** ([`Relay::attach_vm`]): `<vm-dir>/vsock.sock_<CREDENTIAL_PROXY_PORT>`.
//!   Each sidecar connection gets a `RelayGreeting` (the VM id and the device key, or
//!   `Unavailable`), then its bytes are copied both ways inside link `Data` messages. The relay
//!   announces the session to the device with the VM id, boot id and boot key it learned from
//!   the sidecar's `Hello`, which the device binds into the end-to-end handshake. A session
//!   lives as long as the sidecar keeps it (it pools a few and carries many requests on each),
//!   so the agent's tokenizer settings and newly issued surrogates go to the device when the
//!   session opens and again before any byte run from the sidecar that follows new issues
//!   (so before the request that could carry them). Dropping the [`VmRelay`] (the VM stopped)
//!   ends the VM's sessions with its listener.
//!
//! - **Approvals** ([`Relay::set_approver`]). When the device holds a credential but no live
//!   grant for the call, it sends `ApprovalNeeded` (credential, target host, VM, its request
//!   id). The relay turns it into an
//!   [`ApprovalAction::Credential`](crate::approval::ApprovalAction::Credential) request to the
//!   daemon's [`Approver`] (the passkey approver when approvals are served, else
//!   [`DenyAll`](crate::approval::DenyAll): refused "requires approval"), with the device's
//!   request id in the signed arguments. On `Approved` it forwards the approver's evidence (the
//!   canonical request bytes and the assertion, [`Approver::take_evidence`]); otherwise it tells
//!   the device no. The device verifies the evidence itself before it creates a grant, so the
//!   relay cannot mint one. At most [`MAX_PENDING_APPROVALS`] asks wait at once; more are
//!   refused at once.
//!
//!   When the device shows requests on its own approval page (passkeys registered on the
//!   device), its `ApprovalNeeded` has `on_device` set: the relay then creates no approval and
//!   sends the device no answer; it only tells the user, through the notifiers
//!   ([`Relay::set_notifiers`]), that a credential request waits on their device. The
//!   device would refuse evidence from the host's pages anyway (another origin).
//! - **Audit checkpoints** ([`Relay::spawn_checkpoints`]). While linked, the relay asks the
//!   device to sign the head of the daemon's audit chain (periodically, after a number of
//!   records, and at shutdown) and appends the signed checkpoint to the chain, so that a later
//!   rewrite of the chain before it fails `nanoclaw audit verify --device-key` and the device's
//!   own `vault-device audit check`.
//!
//! # What the relay sees
//!
//! Records of the end-to-end Noise session, which it neither decrypts nor parses: it has no
//! key for them. It does learn sizes and timing. A hostile guest can open connections and send
//! garbage: each VM has at most [`MAX_SESSIONS_PER_VM`] sessions, bytes are passed on in
//! bounded pieces through bounded queues (backpressure, so nothing is dropped), a sidecar that
//! leaves its bytes unread for 5 s has its session cut so it cannot stall the link for other
//! VMs, and nothing per connection is logged above `debug`.
//!
//! # Layout
//!
//! - `mod.rs`: this overview, the limits, [`RelayError`], the shared state ([`VmIdentity`],
//!   [`PairedDevice`], the link and session tables) and [`Relay`]'s accessors.
//! - `state.rs`: opening and saving the state files under `<state>/relay/` ([`Relay::open`],
//!   the 0600 writes, drawing a new pairing code).
//! - `pairing.rs`: the pending code ([`Relay::pairing_code`]) and the pairing handshake that
//!   pins the device.
//! - `link.rs`: the device listener ([`Relay::listen`]), the Noise KK link and its record
//!   reader and writer.
//! - `sidecar.rs`: the per-VM listeners ([`Relay::attach_vm`], [`VmRelay`],
//!   [`proxy_socket_path`]), the tokenizer hand-off to the device and the copying of a
//!   session's bytes.
//! - `approvals.rs`: the device's approval asks ([`Relay::set_approver`]) and notices of
//!   requests waiting on the device ([`Relay::set_notifiers`]).
//! - `reports.rs`: the device's tokenization reports, to the audit log ([`Relay::set_audit`]).
//! - `checkpoints.rs`: the audit checkpoints the device signs ([`CheckpointPolicy`]).
//! - `moves.rs`: telling the device that a VM moves to another host
//!   ([`Relay::tell_moving`]), so that its credential sessions follow it.
//! - `tests.rs`: the unit tests.

mod approvals;
mod checkpoints;
mod link;
mod moves;
pub mod pairing;
mod reports;
mod sidecar;
mod state;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use serde::{Deserialize, Serialize};
use shared_proto::credential::{self, HostToDevice};
use tokio::sync::{Semaphore, mpsc, watch};
use zeroize::Zeroizing;

use crate::approval::Approver;

pub use checkpoints::{CHECKPOINT_WAIT, CheckpointFailure, CheckpointPolicy};
pub(crate) use link::AcceptBackoff;
pub use moves::{MOVE_NOTICE_WAIT, MoveNoticeFailure};
pub use sidecar::{VmRelay, proxy_socket_path};

/// Concurrent sidecar sessions per VM.
pub const MAX_SESSIONS_PER_VM: usize = 64;
/// Approval asks from the device waiting for the user at once.
pub const MAX_PENDING_APPROVALS: usize = 64;
/// The rule named in the approval requests the relay makes.
pub const CREDENTIAL_RULE: &str = "credential_without_grant";

/// Errors of the relay.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    /// A state file could not be read or written.
    #[error("{op} {}", .path.display())]
    File {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A state file is malformed.
    #[error("{} is malformed", .0.display())]
    BadStateFile(PathBuf),
    /// Binding a listener failed.
    #[error("cannot listen on {what}")]
    Listen {
        /// The address or socket path.
        what: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A stream failed.
    #[error("stream")]
    Io(#[source] std::io::Error),
    /// The peer closed the connection mid-message.
    #[error("the peer closed the connection")]
    Closed,
    /// The device took too long.
    #[error("handshake timed out")]
    Timeout,
    /// A Noise handshake or message failed (wrong key, wrong code, forged bytes).
    #[error("noise")]
    Noise(#[source] snow::Error),
    /// A message did not decode.
    #[error("message")]
    Wire(#[source] credential::CredentialError),
    /// The first byte named no known mode.
    #[error("unknown connection mode {0:#04x}")]
    UnknownMode(u8),
    /// A link was attempted with no paired device, or pairing while one is paired.
    #[error("{0}")]
    Refused(&'static str),
    /// A pairing attempt came too soon after a wrong code.
    #[error("pairing is rate-limited after a wrong code: try again in {0} s")]
    PairingWait(u64),
}

impl From<snow::Error> for RelayError {
    fn from(e: snow::Error) -> Self {
        Self::Noise(e)
    }
}

impl From<credential::CredentialError> for RelayError {
    fn from(e: credential::CredentialError) -> Self {
        Self::Wire(e)
    }
}

/// What the relay knows about a VM's sidecar, from its `Hello`.
#[derive(Debug, Clone)]
pub struct VmIdentity {
    /// The VM id.
    pub vm_id: String,
    /// The sidecar's boot id.
    pub boot_id: [u8; 16],
    /// The sidecar's boot X25519 public key.
    pub sidecar_public_key: [u8; 32],
    /// The agent's tokenizer, whose settings and issued surrogates the device gets before each
    /// session (`None`: the device does not tokenize this VM's calls).
    pub tokens: Option<Arc<crate::agent_tokens::AgentTokens>>,
    /// The uid of the VM's jailed VMM, given the listener socket so that it may connect.
    pub vmm_uid: Option<u32>,
}

/// How far the device has been told a VM's issued surrogates: the link generation and the
/// tokenizer's `seq` to send from.
#[derive(Debug, Default)]
struct TokenCursor {
    generation: Option<u64>,
    seq: u64,
}

/// The pinned device, as stored in `device.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairedDevice {
    /// Its static public key, hex.
    pub public_key: String,
    /// Its name from the offer.
    pub name: String,
}

impl PairedDevice {
    fn key(&self) -> Option<[u8; 32]> {
        let bytes = hex::decode(&self.public_key).ok()?;
        bytes.try_into().ok()
    }
}

struct Link {
    generation: u64,
    tx: mpsc::Sender<HostToDevice>,
    sessions: HashMap<u64, mpsc::Sender<Vec<u8>>>,
}

struct State {
    device: Option<(PairedDevice, [u8; 32])>,
    code: Option<String>,
    gate: pairing::PairingGate,
    link: Option<Link>,
    next_session: u64,
    next_generation: u64,
}

/// The relay.
pub struct Relay {
    dir: PathBuf,
    identity: Zeroizing<[u8; 32]>,
    public: [u8; 32],
    name: String,
    state: Mutex<State>,
    linked: watch::Sender<bool>,
    approver: Mutex<Arc<dyn Approver>>,
    approval_slots: Arc<Semaphore>,
    /// Where the device's tokenization reports go (the daemon's audit log).
    audit: Mutex<Option<Arc<nanoclaw_audit::AuditLog>>>,
    /// Who is told that a request waits on the device's own approval page.
    notifiers: Mutex<Vec<Arc<dyn crate::notify::Notifier>>>,
    /// The audit checkpoint in flight and the last one signed.
    checkpoints: Mutex<checkpoints::Checkpoints>,
    /// Held by the one checkpoint ask in flight.
    checkpoint_turn: tokio::sync::Mutex<()>,
    /// Move notices waiting for the device's answer.
    moves: Mutex<moves::PendingMoves>,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("dir", &self.dir)
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl Relay {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The host's static public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The outgoing queue of the device link, while one is up.
    fn link_sender(&self) -> Option<mpsc::Sender<HostToDevice>> {
        self.lock().link.as_ref().map(|l| l.tx.clone())
    }

    /// The paired device, if any.
    pub fn paired_device(&self) -> Option<PairedDevice> {
        self.lock().device.as_ref().map(|(d, _)| d.clone())
    }
}

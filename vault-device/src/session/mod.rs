//! One end-to-end session with a sidecar: the Noise IK responder, then a sequence of
//! exchanges, each one proxied call (primary path) or one sealed secret (fallback path).
//!
//! # A session carries many exchanges
//!
//! The sidecar keeps a session open across the VM's requests (it pools a few, see
//! `vpod_sidecar::proxy::pool`), so one handshake serves many calls. The handshake, and so the
//! binding to the VM id, boot id and boot key below, happens once per session; everything else
//! happens per exchange, as it did when each call had its own session: the vault is read and
//! the grant looked up (or the user asked) afresh, the call is logged, and the body is
//! tokenized or restored with the VM's current tokenizer. Exchanges run one at a time, in
//! order. One that ends out of step (a request refused before its body was read, an answer
//! cut mid-body) ends the session, which the sidecar sees as the cut; the sidecar closing the
//! session between exchanges is its normal end. A session carries at most [`MAX_EXCHANGES`].
//!
//! # What the device checks
//!
//! - The handshake: the prologue binds the VM id and boot id the host announced in `Open`, and
//!   the sidecar's static key (learned in the handshake) must equal the boot key the host
//!   relayed from the sidecar's `Hello`. Only then is the device told the handshake is done
//!   ([`SessionContext::handshake_done`]), which is what marks a moved VM arrived: the device
//!   resolved the session's origin from that announced key ([`crate::moves`]), and the
//!   sidecar has now proved it holds it.
//! - The target: base-URL mode names a credential and goes to its first allowed host;
//!   `HTTP_PROXY` mode names an authority, and the credential is the first entry that allows it
//!   and has a live grant. The call goes out over HTTPS to exactly that authority, never
//!   following redirects (a redirect could carry the header elsewhere).
//! - A live grant for credential x authority x host x VM ([`crate::grant::find_grant`]) of the
//!   session's origin ([`SessionPeer::origin`]: the VM before it moved here, see
//!   [`crate::moves`]): one from the vault or one a verified approval created. Without one, on the primary path and when
//!   a passkey is stored, the device asks the user through the host and holds the request
//!   ([`SessionContext::request_approval`]: the device checks the host's evidence itself);
//!   if that fails, or on the fallback path, the answer is `Refused` 403 with the reason and
//!   nothing is sent upstream.
//! - The agent's own copy of the credential header, `Host` and hop-by-hop headers are dropped
//!   before the secret is injected.
//!
//! # What the host could still do
//!
//! The host relays every byte and it hands the guest the device's public key and the device the
//! sidecar's boot key. It cannot read or alter a session (Noise IK: the device authenticates
//! with its pinned identity key, the sidecar with its boot key). A host that lies about the
//! sidecar's key can run a session of its own in place of the sidecar: on the primary path that
//! gives it what the agent could get, calls to granted hosts with the secret injected by the
//! device, never the secret itself. On the fallback path it would get the secret sealed to its
//! own key, which is why the fallback needs a grant that says so explicitly; binding the boot
//! key to the VM (attestation) is what would close this.
//!
//! # Layout
//!
//! - this file: [`run`] (the handshake, then each exchange's dispatch by its first message), the
//!   [`SessionContext`] through which a session reaches the device, the encrypted message
//!   channel, and the resolution of a target to a credential under a live grant;
//! - `proxy`: the primary path, step by step (read the body, resolve or ask, build the
//!   upstream request, relay the answer, tokenized or not);
//! - `fallback`: the fallback path (the sealed secret);
//! - `redact`: every copy of the injected secret taken out of the upstream's answer.

mod fallback;
mod proxy;
mod redact;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use shared_proto::credential::{
    self, DeviceToHost, DeviceToSidecar, ProxyTarget, RECORD_PREFIX, RecordDecoder, SidecarToDevice,
};
use tokio::sync::mpsc;
use zeroize::Zeroizing;

use crate::approval::ApprovalCheckError;
use crate::grant::{Grant, Release, find_grant};
use crate::moves::HostVm;
use crate::noise::{self, NoiseError};
use crate::tokenize::Registry;
use crate::vault::{VaultData, VaultError};

/// The largest request body the device forwards.
pub const MAX_REQUEST_BODY: usize = 16 << 20;
/// The most exchanges one session carries; the sidecar opens a new session (a fresh
/// handshake, fresh keys) well before this ([`credential::MAX_SESSION_EXCHANGES`]).
pub const MAX_EXCHANGES: u64 = credential::MAX_SESSION_EXCHANGES;
/// How long a sealed envelope is valid.
pub const SEAL_TTL_SECS: u64 = 60;

/// What the host announced about a sidecar in `Open`, the link it came on, and the VM whose
/// grants it gets.
#[derive(Debug, Clone)]
pub struct SessionPeer {
    /// The link key of the host the session came from: everything the session triggers goes
    /// back on that link.
    pub host: [u8; 32],
    /// The VM id, as that host names it (the tokenizer settings and reports use it).
    pub vm_id: String,
    /// The sidecar's boot id.
    pub boot_id: [u8; 16],
    /// The sidecar's boot public key.
    pub sidecar_public_key: [u8; 32],
    /// The VM whose grants, approvals and limits apply ([`crate::moves::resolve`]): the VM
    /// before it moved here, or `(host, vm_id)` itself.
    pub origin: HostVm,
}

impl SessionPeer {
    /// Whether the session's origin is another VM than the one announced (it moved here).
    pub fn moved_here(&self) -> bool {
        self.origin.host != self.host || self.origin.vm != self.vm_id
    }
}

/// The channel of one session to the link writer: ciphertext records to send to the sidecar.
pub type Outbound = mpsc::Sender<Vec<u8>>;

/// What a session needs from the running device, and nothing more: the running device
/// ([`crate::device::Device`]) implements it, and the unit tests a fake. The device depends on
/// sessions, not the reverse.
pub trait SessionContext: Send + Sync {
    /// The device identity secret, the session's static key.
    fn identity_secret(&self) -> Zeroizing<[u8; 32]>;
    /// The vault's contents, current.
    fn snapshot(&self) -> Result<VaultData, VaultError>;
    /// The live grants that verified approvals created.
    fn approved_grants(&self, now_unix: u64) -> Vec<Grant>;
    /// Whether asking the user for an approval can succeed (a passkey is stored).
    fn can_ask(&self) -> bool;
    /// Asks the user, on the device's page or through the host `peer` came from, to approve
    /// releasing `credential` to `target_host` for `peer`'s origin; answers the grant a
    /// verified approval created.
    fn request_approval(
        &self,
        peer: &SessionPeer,
        credential: &str,
        target_host: &str,
    ) -> impl Future<Output = Result<Grant, ApprovalCheckError>> + Send;
    /// Called once the sidecar has proved its boot key (the handshake is done), before any
    /// exchange: the device marks a move to this VM arrived ([`crate::moves::mark_arrived`]).
    fn handshake_done(&self, peer: &SessionPeer);
    /// The tokenizers of the VMs the host announced.
    fn tokens(&self) -> &Registry;
    /// The HTTPS client for upstream calls.
    fn http(&self) -> &reqwest::Client;
    /// Sends the host whose link key is `host` a report without waiting (dropped when its link
    /// is down or busy).
    fn notify_host(&self, host: &[u8; 32], msg: DeviceToHost);
}

/// Reassembles records from the relayed byte runs.
struct Inbound {
    rx: mpsc::Receiver<Vec<u8>>,
    records: RecordDecoder,
}

impl Inbound {
    async fn next_record(&mut self) -> Result<Vec<u8>, NoiseError> {
        loop {
            if let Some(record) = self.records.decode_next()? {
                return Ok(record);
            }
            match self.rx.recv().await {
                Some(bytes) => self.records.push(&bytes),
                None => return Err(NoiseError::Closed),
            }
        }
    }
}

/// The established session: one encrypted message at a time each way.
///
/// It also tracks where the current exchange stands, so that [`run`] knows whether the session
/// can carry the next one: the sidecar's request must have been read to its `End` and the
/// answer sent to its last message (`End`, `Refused` or `Sealed`). An exchange cut anywhere
/// else ends the session, which is how the sidecar learns that an answer was cut.
struct Session {
    inbound: Inbound,
    out: Outbound,
    transport: snow::TransportState,
    /// The sidecar's request of the current exchange was read whole.
    request_done: bool,
    /// The answer of the current exchange was sent whole.
    answered: bool,
}

impl Session {
    async fn recv(&mut self) -> Result<SidecarToDevice, NoiseError> {
        self.recv_or_end().await?.ok_or(NoiseError::Closed)
    }

    /// The next message, or `None` when the sidecar ended the session between records.
    async fn recv_or_end(&mut self) -> Result<Option<SidecarToDevice>, NoiseError> {
        let record = match self.inbound.next_record().await {
            Ok(r) => r,
            Err(NoiseError::Closed) if self.inbound.records.pending() == 0 => return Ok(None),
            Err(e) => return Err(e),
        };
        let plain = noise::open(&mut self.transport, &record)?;
        let msg: SidecarToDevice = credential::decode_message(&plain)?;
        if matches!(msg, SidecarToDevice::End) {
            self.request_done = true;
        }
        Ok(Some(msg))
    }

    async fn send(&mut self, msg: &DeviceToSidecar) -> Result<(), NoiseError> {
        let plain = credential::encode_message(msg)?;
        let sealed = noise::seal(&mut self.transport, &plain)?;
        send_record(&self.out, &sealed).await?;
        if matches!(
            msg,
            DeviceToSidecar::End | DeviceToSidecar::Refused { .. } | DeviceToSidecar::Sealed { .. }
        ) {
            self.answered = true;
        }
        Ok(())
    }

    /// Sends `bytes` as `Body` messages of at most [`credential::MAX_CHUNK`] each (nothing
    /// when empty), encoded straight from the slice.
    async fn send_body(&mut self, bytes: &[u8]) -> Result<(), NoiseError> {
        let mut plain = Vec::with_capacity(credential::MAX_CHUNK + 16);
        for piece in bytes.chunks(credential::MAX_CHUNK) {
            plain.clear();
            credential::data::encode_body(piece, &mut plain);
            // Sealed straight into the record that goes to the link.
            let mut record =
                Vec::with_capacity(plain.len() + RECORD_PREFIX + credential::NOISE_TAG);
            noise::seal_record(&mut self.transport, &plain, &mut record)?;
            self.out
                .send(record)
                .await
                .map_err(|_| NoiseError::Closed)?;
        }
        Ok(())
    }

    /// Whether the exchange that just ran left the session in step for the next one; resets
    /// the tracking for it.
    fn exchange_complete(&mut self) -> bool {
        let complete = self.request_done && self.answered;
        self.request_done = false;
        self.answered = false;
        complete
    }
}

/// Sends `body` to the sidecar as one record.
async fn send_record(out: &Outbound, body: &[u8]) -> Result<(), NoiseError> {
    let mut record = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut record)?;
    out.send(record).await.map_err(|_| NoiseError::Closed)
}

/// Runs one session to its end: the handshake, then exchanges one after the other until the
/// sidecar ends the session (or an exchange is cut). Errors end the session; the link stays up.
///
/// Every exchange is checked on its own, exactly as if it had its own session: the vault, the
/// grants and approvals, tokenization and redaction are all taken afresh for each request.
pub async fn run<C: SessionContext>(
    ctx: Arc<C>,
    peer: SessionPeer,
    rx: mpsc::Receiver<Vec<u8>>,
    out: Outbound,
) -> Result<(), NoiseError> {
    let mut inbound = Inbound {
        rx,
        records: RecordDecoder::new(),
    };
    let prologue = credential::session_prologue(&peer.vm_id, &peer.boot_id)?;
    let identity = ctx.identity_secret();
    let mut hs = noise::session_responder(&identity, &prologue)?;
    let first = inbound.next_record().await?;
    credential::noise::read_handshake(&mut hs, &first)?;
    if hs.get_remote_static() != Some(&peer.sidecar_public_key[..]) {
        return Err(NoiseError::UnexpectedPeer);
    }
    let answer = credential::noise::write_handshake(&mut hs, &[])?;
    send_record(&out, &answer).await?;
    let transport = hs.into_transport_mode()?;
    ctx.handshake_done(&peer);
    if let Some(suppressed) = proxy::admit_line(proxy::Line::Session) {
        // Which boot key a VM's sessions come from: a restored copy of a VM shows a new one.
        tracing::info!(vm = %peer.vm_id, sidecar = %proxy::key_id(&peer.sidecar_public_key), suppressed, "session");
    }
    let mut session = Session {
        inbound,
        out,
        transport,
        request_done: false,
        answered: false,
    };
    for _ in 0..MAX_EXCHANGES {
        let Some(first) = session.recv_or_end().await? else {
            // The sidecar closed an idle session: the normal end.
            return Ok(());
        };
        match first {
            SidecarToDevice::Request(head) => {
                proxy::proxy(&*ctx, &peer, &mut session, head).await?;
            }
            SidecarToDevice::Seal { target } => {
                // A seal is its whole request.
                session.request_done = true;
                let answer = fallback::seal(&*ctx, &peer, &target);
                session.send(&answer).await?;
            }
            SidecarToDevice::Body(_) | SidecarToDevice::End => {
                session
                    .send(&refused(400, "an exchange opens with a request or a seal"))
                    .await?;
                return Ok(());
            }
        }
        if !session.exchange_complete() {
            // Cut, or refused before its body was read: the session is out of step.
            return Ok(());
        }
    }
    Ok(())
}

fn refused(status: u16, reason: impl Into<String>) -> DeviceToSidecar {
    DeviceToSidecar::Refused {
        status,
        reason: reason.into(),
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Why a request does not resolve.
struct Refusal {
    status: u16,
    reason: String,
    /// The credential and authority an approval could grant, when only the grant is missing.
    ask: Option<(String, String)>,
}

fn refusal(status: u16, reason: String) -> Refusal {
    Refusal {
        status,
        reason,
        ask: None,
    }
}

/// The credential (its index in `data.entries`) and authority a request from a session whose
/// origin is `origin` resolves to, or the refusal.
fn resolve(
    data: &VaultData,
    origin: &HostVm,
    target: &ProxyTarget,
    release: Release,
) -> Result<(usize, String), Refusal> {
    let now = now();
    match target {
        ProxyTarget::Service { name, .. } => {
            let index = data
                .entries
                .iter()
                .position(|e| &e.name == name)
                .ok_or_else(|| refusal(404, format!("no credential named {name:?}")))?;
            let authority = data.entries[index].hosts[0].clone();
            if find_grant(&data.grants, name, &authority, origin, release, now).is_none() {
                return Err(Refusal {
                    status: 403,
                    reason: format!("no live grant for {name} to {authority}"),
                    ask: Some((name.clone(), authority)),
                });
            }
            Ok((index, authority))
        }
        ProxyTarget::Absolute { authority, .. } => {
            let allowed: Vec<usize> = (0..data.entries.len())
                .filter(|&i| data.entries[i].allows(authority))
                .collect();
            let Some(&first) = allowed.first() else {
                return Err(refusal(
                    403,
                    format!("no credential may be sent to {authority}"),
                ));
            };
            allowed
                .into_iter()
                .find(|&i| {
                    let name = &data.entries[i].name;
                    find_grant(&data.grants, name, authority, origin, release, now).is_some()
                })
                .map(|i| (i, authority.clone()))
                .ok_or_else(|| Refusal {
                    status: 403,
                    reason: format!("no live grant for {authority}"),
                    ask: Some((data.entries[first].name.clone(), authority.clone())),
                })
        }
    }
}

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
//!   `<state>/relay/device.json`. A wrong code costs one of [`MAX_PAIRING_FAILURES`] attempts,
//!   after which the code is void and a new one is drawn.
//! - **The link.** Noise KK with both pinned keys (the host's static key lives in
//!   `<state>/relay/host.key`, 0600). A newer link replaces an older one. Over it the relay
//!   multiplexes one session per sidecar connection.
//! - **Per-VM listeners** ([`Relay::attach_vm`]): `<vm-dir>/vsock.sock_<CREDENTIAL_PROXY_PORT>`.
//!   Each sidecar connection gets a `RelayGreeting` (the VM id and the device key, or
//!   `Unavailable`), then its bytes are copied both ways inside link `Data` messages. The relay
//!   announces the session to the device with the VM id, boot id and boot key it learned from
//!   the sidecar's `Hello`, which the device binds into the end-to-end handshake.
//!
//! - **Approvals** ([`Relay::set_approver`]). When the device holds a credential but no live
//!   grant for the call, it sends `ApprovalNeeded` (credential, target host, VM, its request
//!   id). The relay turns it into an [`ApprovalAction::Credential`] request to the daemon's
//!   [`Approver`] (the passkey approver when approvals are served, else [`DenyAll`]: refused
//!   "requires approval"), with the device's request id in the signed arguments. On
//!   `Approved` it forwards the approver's evidence (the canonical request bytes and the
//!   assertion, [`Approver::take_evidence`]); otherwise it tells the device no. The device
//!   verifies the evidence itself before it creates a grant, so the relay cannot mint one. At
//!   most [`MAX_PENDING_APPROVALS`] asks wait at once; more are refused at once.
//!
//! # What the relay sees
//!
//! Records of the end-to-end Noise session, which it neither decrypts nor parses: it has no
//! key for them. It does learn sizes and timing. A hostile guest can open connections and send
//! garbage: each VM has at most [`MAX_SESSIONS_PER_VM`] sessions, bytes are passed on in
//! bounded pieces through bounded queues (backpressure, so nothing is dropped), a sidecar that
//! leaves its bytes unread for 5 s has its session cut so it cannot stall the link for other
//! VMs, and nothing per connection is logged above `debug`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use rand_core::{OsRng, RngCore};
use serde::{Deserialize, Serialize};
use shared_proto::credential::{
    self, ApprovalAnswer, DeviceToHost, HostToDevice, LINK_MODE_LINK, LINK_MODE_PAIR,
    MAX_LINK_DATA, PairingOffer, RECORD_PREFIX, RecordDecoder, RelayGreeting, noise,
};
use shared_proto::ports::CREDENTIAL_PROXY_PORT;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UnixListener, UnixStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio::task::JoinHandle;
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::approval::{ApprovalAction, ApprovalOutcome, ApprovalSubject, Approver, DenyAll};

/// Wrong pairing codes tolerated before the code is replaced.
pub const MAX_PAIRING_FAILURES: u32 = 5;
/// Concurrent sidecar sessions per VM.
pub const MAX_SESSIONS_PER_VM: usize = 64;
/// How long a sidecar may leave relayed bytes unread before its session is cut.
const SLOW_PEER: std::time::Duration = std::time::Duration::from_secs(5);
/// Approval asks from the device waiting for the user at once.
pub const MAX_PENDING_APPROVALS: usize = 64;
/// The rule named in the approval requests the relay makes.
pub const CREDENTIAL_RULE: &str = "credential_without_grant";
/// How much is read from a device connection at once.
const READ_CHUNK: usize = 16 * 1024;
/// How long a device has to finish a handshake.
const HANDSHAKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

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
    failures: u32,
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
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("dir", &self.dir)
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

/// Writes a state file durably, 0600 ([`shared_proto::fs`]).
fn write_private(path: &Path, bytes: &[u8]) -> Result<(), RelayError> {
    shared_proto::fs::replace_file(path, bytes, shared_proto::fs::PRIVATE_MODE).map_err(|e| {
        RelayError::File {
            op: e.step,
            path: e.path,
            source: e.source,
        }
    })
}

/// The path of a VM's credential proxy listener.
pub fn proxy_socket_path(vm_dir: &Path) -> PathBuf {
    shared_proto::ports::host_listener_path(vm_dir, CREDENTIAL_PROXY_PORT)
}

impl Relay {
    /// Opens (or creates) the relay's state under `<state_dir>/relay/`. `name` is shown to the
    /// device at pairing.
    pub fn open(state_dir: &Path, name: &str) -> Result<Arc<Self>, RelayError> {
        let dir = state_dir.join("relay");
        std::fs::create_dir_all(&dir).map_err(|source| RelayError::File {
            op: "create",
            path: dir.clone(),
            source,
        })?;
        let key_path = dir.join("host.key");
        let identity = match std::fs::read(&key_path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let key: [u8; 32] = bytes[..]
                    .try_into()
                    .map_err(|_| RelayError::BadStateFile(key_path.clone()))?;
                Zeroizing::new(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                OsRng.fill_bytes(&mut key[..]);
                write_private(&key_path, &key[..])?;
                key
            }
            Err(source) => {
                return Err(RelayError::File {
                    op: "read",
                    path: key_path,
                    source,
                });
            }
        };
        let public = PublicKey::from(&StaticSecret::from(*identity)).to_bytes();
        let device_path = dir.join("device.json");
        let device = match std::fs::read(&device_path) {
            Ok(bytes) => {
                let d: PairedDevice = serde_json::from_slice(&bytes)
                    .map_err(|_| RelayError::BadStateFile(device_path.clone()))?;
                let key = d
                    .key()
                    .ok_or_else(|| RelayError::BadStateFile(device_path.clone()))?;
                Some((d, key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => {
                return Err(RelayError::File {
                    op: "read",
                    path: device_path,
                    source,
                });
            }
        };
        let relay = Arc::new(Self {
            dir,
            identity,
            public,
            name: name.to_owned(),
            state: Mutex::new(State {
                device,
                code: None,
                failures: 0,
                link: None,
                next_session: 1,
                next_generation: 1,
            }),
            linked: watch::channel(false).0,
            approver: Mutex::new(Arc::new(DenyAll)),
            approval_slots: Arc::new(Semaphore::new(MAX_PENDING_APPROVALS)),
            audit: Mutex::new(None),
        });
        if relay.lock().device.is_none() {
            relay.new_code()?;
        }
        Ok(relay)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn new_code(&self) -> Result<(), RelayError> {
        let mut random = [0u8; 8];
        OsRng.fill_bytes(&mut random);
        let code = credential::pairing_code(random);
        write_private(&self.dir.join("pairing-code"), code.as_bytes())?;
        let mut state = self.lock();
        state.code = Some(code);
        state.failures = 0;
        Ok(())
    }

    /// Sets the audit log the device's tokenization reports go to (default: none, they are
    /// logged at debug only).
    pub fn set_audit(&self, audit: Arc<nanoclaw_audit::AuditLog>) {
        *self.audit.lock().unwrap_or_else(|p| p.into_inner()) = Some(audit);
    }

    /// Records a device's tokenization report (kinds and counts only).
    fn record_tokenized(&self, report: DeviceToHost) {
        let DeviceToHost::Tokenized {
            vm_id,
            target_host,
            part,
            enforce,
            counts,
            unscanned,
        } = report
        else {
            return;
        };
        let audit = self.audit.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let Some(audit) = audit else {
            tracing::debug!(%vm_id, %target_host, ?part, "tokenization report (no audit log)");
            return;
        };
        let part = match part {
            credential::BodyPart::RequestTokenized => "request_tokenized",
            credential::BodyPart::RequestRestored => "request_restored",
            credential::BodyPart::Response => "response",
        };
        let data = serde_json::json!({
            "path": "credential",
            "vm_id": vm_id,
            "target_host": target_host,
            "direction": part,
            "mode": if enforce { "enforce" } else { "monitor" },
            "counts": {
                "cards": counts.cards,
                "ssns": counts.ssns,
                "emails": counts.emails,
                "api_keys": counts.api_keys,
                "skipped": counts.skipped,
            },
            "unscanned": unscanned,
        });
        if let Err(e) = audit.append("tokenize", data) {
            tracing::error!(error = %crate::error_chain(&e), "audit: a device tokenization report");
        }
    }

    /// Sets the approver the device's approval asks go to (default [`DenyAll`]).
    pub fn set_approver(&self, approver: Arc<dyn Approver>) {
        *self.approver.lock().unwrap_or_else(|p| p.into_inner()) = approver;
    }

    fn approver(&self) -> Arc<dyn Approver> {
        Arc::clone(&self.approver.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Asks the user to approve releasing `credential` to `target_host` for `vm_id`, in a task,
    /// and sends the device the answer on `to_device`.
    fn ask_user(
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

    /// The pending pairing code, while no device is paired.
    pub fn pairing_code(&self) -> Option<String> {
        self.lock().code.clone()
    }

    /// The host's static public key.
    pub fn public_key(&self) -> [u8; 32] {
        self.public
    }

    /// The paired device, if any.
    pub fn paired_device(&self) -> Option<PairedDevice> {
        self.lock().device.as_ref().map(|(d, _)| d.clone())
    }

    /// Whether a device link is up.
    pub fn is_linked(&self) -> bool {
        self.lock().link.is_some()
    }

    /// Waits until a device link is up.
    pub async fn wait_linked(&self) {
        let mut rx = self.linked.subscribe();
        let _ = rx.wait_for(|up| *up).await;
    }

    /// Binds the device listener and serves it in a task. Returns the bound address.
    pub async fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
    ) -> Result<(SocketAddr, JoinHandle<()>), RelayError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| RelayError::Listen {
                what: addr.to_string(),
                source,
            })?;
        let local = listener.local_addr().map_err(RelayError::Io)?;
        let relay = Arc::clone(self);
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    continue;
                };
                let relay = Arc::clone(&relay);
                tokio::spawn(async move {
                    if let Err(e) = relay.serve_device(stream).await {
                        tracing::warn!(%peer, error = %crate::error_chain(&e), "device connection");
                    }
                });
            }
        });
        tracing::info!(%local, "device listener");
        Ok((local, task))
    }

    async fn serve_device(self: Arc<Self>, mut stream: TcpStream) -> Result<(), RelayError> {
        let _ = stream.set_nodelay(true);
        let mut mode = [0u8; 1];
        stream
            .read_exact(&mut mode)
            .await
            .map_err(|_| RelayError::Closed)?;
        match mode[0] {
            LINK_MODE_PAIR => self.pair(stream).await,
            LINK_MODE_LINK => self.link(stream).await,
            other => Err(RelayError::UnknownMode(other)),
        }
    }

    async fn pair(&self, mut stream: TcpStream) -> Result<(), RelayError> {
        let Some(code) = self.pairing_code() else {
            return Err(RelayError::Refused("already paired"));
        };
        let psk = Zeroizing::new(credential::pairing_psk(&code)?);
        let mut hs = noise::pair_responder(&psk)?;
        // The device sends nothing more before the answer: no byte is left behind.
        let first = timed(RecordReader::new(&mut stream).next()).await??;
        let payload = match noise::read_handshake(&mut hs, &first) {
            Ok(payload) => payload,
            Err(e) => {
                let void = {
                    let mut state = self.lock();
                    state.failures += 1;
                    state.failures >= MAX_PAIRING_FAILURES
                };
                if void {
                    tracing::warn!("too many wrong pairing codes; drawing a new one");
                    self.new_code()?;
                }
                return Err(RelayError::Noise(e));
            }
        };
        let offer: PairingOffer = credential::decode_message(&payload)?;
        let answer = credential::encode_message(&PairingOffer {
            static_public_key: self.public,
            name: self.name.clone(),
        })?;
        let message = noise::write_handshake(&mut hs, &answer)?;
        write_record(&mut stream, &message).await?;
        let device = PairedDevice {
            public_key: hex::encode(offer.static_public_key),
            name: offer.name,
        };
        let json = serde_json::to_vec_pretty(&device).map_err(|e| RelayError::File {
            op: "encode",
            path: self.dir.join("device.json"),
            source: std::io::Error::other(e),
        })?;
        write_private(&self.dir.join("device.json"), &json)?;
        let _ = std::fs::remove_file(self.dir.join("pairing-code"));
        let mut state = self.lock();
        state.device = Some((device.clone(), offer.static_public_key));
        state.code = None;
        tracing::info!(device = %device.name, key = %device.public_key, "paired");
        Ok(())
    }

    async fn link(self: Arc<Self>, stream: TcpStream) -> Result<(), RelayError> {
        let Some(device_key) = self.lock().device.as_ref().map(|(_, k)| *k) else {
            return Err(RelayError::Refused("no device is paired"));
        };
        let mut hs = noise::link_responder(&self.identity, &device_key)?;
        let (read, mut write) = stream.into_split();
        let mut read = RecordReader::new(read);
        let first = timed(read.next()).await??;
        noise::read_handshake(&mut hs, &first)?;
        let message = noise::write_handshake(&mut hs, &[])?;
        write_record(&mut write, &message).await?;
        let transport = Arc::new(Mutex::new(hs.into_transport_mode()?));

        let (tx, mut outgoing) = mpsc::channel::<HostToDevice>(256);
        let generation = {
            let mut state = self.lock();
            let generation = state.next_generation;
            state.next_generation += 1;
            // Replacing an older link drops its sessions' senders, which ends them.
            state.link = Some(Link {
                generation,
                tx,
                sessions: HashMap::new(),
            });
            generation
        };
        self.linked.send_replace(true);
        tracing::info!(generation, "device link up");
        let writer_transport = Arc::clone(&transport);
        let writer = tokio::spawn(async move {
            while let Some(msg) = outgoing.recv().await {
                let sealed = {
                    let plain = credential::encode_message(&msg)?;
                    let mut t = lock_transport(&writer_transport);
                    noise::seal(&mut t, &plain)?
                };
                write_record(&mut write, &sealed).await?;
            }
            Ok::<(), RelayError>(())
        });
        let result = loop {
            let record = match read.next().await {
                Ok(r) => r,
                Err(RelayError::Closed) => break Ok(()),
                Err(e) => break Err(e),
            };
            let msg = {
                let mut t = lock_transport(&transport);
                noise::open(&mut t, &record)
                    .map_err(RelayError::from)
                    .and_then(|p| Ok(credential::decode_message::<DeviceToHost>(&p)?))
            };
            let msg = match msg {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            let (session, bytes) = match msg {
                DeviceToHost::Data { session, bytes } => (session, Some(bytes)),
                DeviceToHost::Close { session } => (session, None),
                DeviceToHost::ApprovalNeeded {
                    request,
                    vm_id,
                    credential,
                    target_host,
                } => {
                    let tx = self
                        .lock()
                        .link
                        .as_ref()
                        .filter(|l| l.generation == generation)
                        .map(|l| l.tx.clone());
                    let Some(tx) = tx else {
                        break Ok(());
                    };
                    tracing::debug!(%vm_id, %credential, %target_host, "device asks for approval");
                    self.ask_user(tx, request, vm_id, credential, target_host);
                    continue;
                }
                report @ DeviceToHost::Tokenized { .. } => {
                    self.record_tokenized(report);
                    continue;
                }
            };
            let tx = {
                let mut state = self.lock();
                let Some(link) = state.link.as_mut().filter(|l| l.generation == generation) else {
                    break Ok(());
                };
                match bytes {
                    Some(_) => link.sessions.get(&session).cloned(),
                    None => {
                        link.sessions.remove(&session);
                        None
                    }
                }
            };
            if let (Some(tx), Some(bytes)) = (tx, bytes) {
                // Backpressure: wait for a slow sidecar, but not forever, since a sidecar that
                // does not read would stall every session on the link.
                let sent = tokio::time::timeout(SLOW_PEER, tx.send(bytes)).await;
                if !matches!(sent, Ok(Ok(()))) {
                    self.forget(session);
                }
            }
        };
        writer.abort();
        {
            let mut state = self.lock();
            if state
                .link
                .as_ref()
                .is_some_and(|l| l.generation == generation)
            {
                state.link = None;
                self.linked.send_replace(false);
            }
        }
        tracing::info!(generation, "device link down");
        result
    }

    /// Binds `<vm_dir>/vsock.sock_<CREDENTIAL_PROXY_PORT>` for the VM and serves it until the
    /// returned handle is dropped.
    pub fn attach_vm(
        self: &Arc<Self>,
        vm_dir: &Path,
        identity: VmIdentity,
    ) -> Result<VmRelay, RelayError> {
        credential::session_prologue(&identity.vm_id, &identity.boot_id)?;
        let path = proxy_socket_path(vm_dir);
        let _ = std::fs::remove_file(&path);
        let listener = UnixListener::bind(&path).map_err(|source| RelayError::Listen {
            what: path.display().to_string(),
            source,
        })?;
        let relay = Arc::clone(self);
        let identity = Arc::new(identity);
        let slots = Arc::new(Semaphore::new(MAX_SESSIONS_PER_VM));
        let cursor = Arc::new(tokio::sync::Mutex::new(TokenCursor::default()));
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let relay = Arc::clone(&relay);
                let identity = Arc::clone(&identity);
                let cursor = Arc::clone(&cursor);
                tokio::spawn(async move {
                    if let Err(e) = relay.serve_sidecar(stream, &identity, &cursor).await {
                        tracing::debug!(vm = %identity.vm_id, error = %crate::error_chain(&e), "sidecar session");
                    }
                    drop(slot);
                });
            }
        });
        Ok(VmRelay { task, path })
    }

    async fn serve_sidecar(
        &self,
        mut stream: UnixStream,
        identity: &VmIdentity,
        cursor: &tokio::sync::Mutex<TokenCursor>,
    ) -> Result<(), RelayError> {
        let registered = {
            let mut state = self.lock();
            let session = state.next_session;
            state.next_session += 1;
            let device_key = state.device.as_ref().map(|(_, k)| *k);
            match (state.link.as_mut(), device_key) {
                (Some(link), Some(key)) => {
                    let (tx, rx) = mpsc::channel::<Vec<u8>>(64);
                    link.sessions.insert(session, tx);
                    Some((session, key, link.tx.clone(), rx, link.generation))
                }
                _ => None,
            }
        };
        let Some((session, device_key, to_device, mut from_device, generation)) = registered else {
            let frame = shared_proto::encode_frame(&RelayGreeting::Unavailable {
                reason: "no device is linked to this host".into(),
            })
            .map_err(|e| RelayError::Io(std::io::Error::other(e)))?;
            stream.write_all(&frame).await.map_err(RelayError::Io)?;
            return Ok(());
        };
        let frame = shared_proto::encode_frame(&RelayGreeting::Ready {
            vm_id: identity.vm_id.clone(),
            device_public_key: device_key,
        })
        .map_err(|e| RelayError::Io(std::io::Error::other(e)))?;
        stream.write_all(&frame).await.map_err(RelayError::Io)?;
        if let Some(tokens) = &identity.tokens {
            // The device learns the agent's key and the surrogates issued so far before the
            // session opens; the cursor's lock keeps two sessions' messages in order.
            let mut cursor = cursor.lock().await;
            if cursor.generation != Some(generation) {
                *cursor = TokenCursor {
                    generation: Some(generation),
                    seq: 0,
                };
            }
            let (issued, next) = tokens.issued_since(cursor.seq);
            let mut chunks: Vec<Vec<credential::IssuedToken>> = issued
                .chunks(credential::MAX_ISSUED_PER_MESSAGE)
                .map(<[_]>::to_vec)
                .collect();
            if chunks.is_empty() {
                chunks.push(Vec::new());
            }
            for issued in chunks {
                to_device
                    .send(HostToDevice::Tokenize {
                        vm_id: identity.vm_id.clone(),
                        spec: tokens.spec().clone(),
                        issued,
                    })
                    .await
                    .map_err(|_| RelayError::Closed)?;
            }
            cursor.seq = next;
        }
        to_device
            .send(HostToDevice::Open {
                session,
                vm_id: identity.vm_id.clone(),
                boot_id: identity.boot_id,
                sidecar_public_key: identity.sidecar_public_key,
            })
            .await
            .map_err(|_| RelayError::Closed)?;
        let (mut read, mut write) = stream.into_split();
        let up = async {
            let mut buf = vec![0u8; MAX_LINK_DATA];
            loop {
                let n = read.read(&mut buf).await.map_err(RelayError::Io)?;
                if n == 0 {
                    break;
                }
                to_device
                    .send(HostToDevice::Data {
                        session,
                        bytes: buf[..n].to_vec(),
                    })
                    .await
                    .map_err(|_| RelayError::Closed)?;
            }
            let _ = to_device.send(HostToDevice::Close { session }).await;
            Ok::<(), RelayError>(())
        };
        let down = async {
            while let Some(bytes) = from_device.recv().await {
                write.write_all(&bytes).await.map_err(RelayError::Io)?;
            }
            let _ = write.shutdown().await;
            Ok::<(), RelayError>(())
        };
        // The session ends when the device closes it; the sidecar's half-close only ends `up`.
        let (up, down) = tokio::join!(up, down);
        self.forget(session);
        up.and(down)
    }

    fn forget(&self, session: u64) {
        if let Some(link) = self.lock().link.as_mut() {
            link.sessions.remove(&session);
        }
    }
}

/// A VM's credential proxy listener; dropping it stops the listener and removes the socket.
#[derive(Debug)]
pub struct VmRelay {
    task: JoinHandle<()>,
    path: PathBuf,
}

impl Drop for VmRelay {
    fn drop(&mut self) {
        self.task.abort();
        let _ = std::fs::remove_file(&self.path);
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

fn lock_transport(t: &Mutex<snow::TransportState>) -> MutexGuard<'_, snow::TransportState> {
    t.lock().unwrap_or_else(|p| p.into_inner())
}

async fn timed<F: std::future::Future>(f: F) -> Result<F::Output, RelayError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, f)
        .await
        .map_err(|_| RelayError::Timeout)
}

/// The records arriving on one device connection: the shared decoder over an async reader.
struct RecordReader<R> {
    inner: R,
    decoder: RecordDecoder,
    scratch: Vec<u8>,
}

impl<R: AsyncRead + Unpin> RecordReader<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            decoder: RecordDecoder::new(),
            scratch: vec![0u8; READ_CHUNK],
        }
    }

    /// The next record; [`RelayError::Closed`] when the stream ends or fails.
    async fn next(&mut self) -> Result<Vec<u8>, RelayError> {
        loop {
            if let Some(record) = self.decoder.decode_next()? {
                return Ok(record);
            }
            match self.inner.read(&mut self.scratch).await {
                Ok(n) if n > 0 => self.decoder.push(&self.scratch[..n]),
                _ => return Err(RelayError::Closed),
            }
        }
    }
}

async fn write_record<W: AsyncWrite + Unpin>(w: &mut W, body: &[u8]) -> Result<(), RelayError> {
    let mut out = Vec::with_capacity(body.len() + RECORD_PREFIX);
    credential::encode_record(body, &mut out)?;
    w.write_all(&out).await.map_err(RelayError::Io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn state_persists_and_codes_are_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let a = Relay::open(dir.path(), "host-a").unwrap();
        let code = a.pairing_code().unwrap();
        let code_file = dir.path().join("relay/pairing-code");
        assert_eq!(std::fs::read_to_string(&code_file).unwrap(), code);
        for f in ["pairing-code", "host.key"] {
            let mode = std::fs::metadata(dir.path().join("relay").join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{f}");
        }
        let b = Relay::open(dir.path(), "host-a").unwrap();
        assert_eq!(a.public_key(), b.public_key());
        std::fs::write(dir.path().join("relay/device.json"), b"{").unwrap();
        assert!(matches!(
            Relay::open(dir.path(), "host-a"),
            Err(RelayError::BadStateFile(_))
        ));
    }

    #[tokio::test]
    async fn a_sidecar_without_a_device_gets_unavailable() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::open(dir.path(), "h").unwrap();
        let _vm = relay
            .attach_vm(
                dir.path(),
                VmIdentity {
                    vm_id: "vm-1".into(),
                    boot_id: [1; 16],
                    sidecar_public_key: [2; 32],
                    tokens: None,
                },
            )
            .unwrap();
        let mut s = UnixStream::connect(proxy_socket_path(dir.path()))
            .await
            .unwrap();
        let mut buf = Vec::new();
        s.read_to_end(&mut buf).await.unwrap();
        let (greeting, _) = shared_proto::frame::decode_frame::<RelayGreeting>(&buf)
            .unwrap()
            .unwrap();
        assert!(matches!(greeting, RelayGreeting::Unavailable { .. }));
    }

    /// Approves everything at once but keeps no evidence.
    #[derive(Debug)]
    struct NoEvidence;

    impl Approver for NoEvidence {
        fn request(
            &self,
            _subject: ApprovalSubject,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>>
        {
            Box::pin(async {
                ApprovalOutcome::Approved {
                    approval_id: "x".into(),
                }
            })
        }
    }

    /// Never answers.
    #[derive(Debug)]
    struct Silent;

    impl Approver for Silent {
        fn request(
            &self,
            _subject: ApprovalSubject,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = ApprovalOutcome> + Send + '_>>
        {
            Box::pin(std::future::pending())
        }
    }

    async fn answer(rx: &mut mpsc::Receiver<HostToDevice>) -> ([u8; 16], ApprovalAnswer) {
        match tokio::time::timeout(std::time::Duration::from_secs(5), rx.recv()).await {
            Ok(Some(HostToDevice::Approval { request, answer })) => (request, answer),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn approval_asks_without_evidence_or_beyond_the_limit_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::open(dir.path(), "h").unwrap();
        let (tx, mut rx) = mpsc::channel(MAX_PENDING_APPROVALS + 8);
        let ask = |relay: &Relay, n: u8| {
            relay.ask_user(
                tx.clone(),
                [n; 16],
                "vm-1".into(),
                "svc".into(),
                "api.test:443".into(),
            )
        };
        // The default approver is DenyAll.
        ask(&relay, 1);
        let (id, a) = answer(&mut rx).await;
        assert_eq!(id, [1; 16]);
        assert!(
            matches!(&a, ApprovalAnswer::Refused { reason } if reason.starts_with("requires approval")),
            "{a:?}"
        );
        // "Approved" with nothing the device could check is a refusal.
        relay.set_approver(Arc::new(NoEvidence));
        ask(&relay, 2);
        let (_, a) = answer(&mut rx).await;
        assert!(
            matches!(&a, ApprovalAnswer::Refused { reason } if reason.contains("no evidence")),
            "{a:?}"
        );
        // Asks that wait are bounded; one more is refused at once.
        relay.set_approver(Arc::new(Silent));
        for n in 0..MAX_PENDING_APPROVALS {
            ask(&relay, u8::try_from(n % 200).unwrap());
        }
        ask(&relay, 255);
        let (id, a) = answer(&mut rx).await;
        assert_eq!(id, [255; 16]);
        assert!(
            matches!(&a, ApprovalAnswer::Refused { reason } if reason.contains("too many")),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn garbage_on_the_device_listener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let relay = Relay::open(dir.path(), "h").unwrap();
        let (addr, _task) = relay.listen("127.0.0.1:0".parse().unwrap()).await.unwrap();
        for first in [&b"X"[..], b"L\x00\x05hello", b"P\x00\x03abc"] {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(first).await.unwrap();
            let mut buf = Vec::new();
            // The relay hangs up; nothing is answered.
            let _ = s.read_to_end(&mut buf).await;
            assert!(buf.is_empty());
        }
        assert!(!relay.is_linked());
        assert!(relay.paired_device().is_none());
    }
}

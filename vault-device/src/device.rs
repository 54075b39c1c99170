//! The running device: the open vault, the HTTPS client, pairing and the outbound link to the
//! paired host.
//!
//! # The link
//!
//! The device dials the host (so a phone behind NAT works), writes
//! [`LINK_MODE_LINK`] and runs Noise KK as initiator
//! with its identity key and the host key pinned at pairing: a host without that key, or a
//! device the host has not paired, fails the handshake. Then one reader loop decodes
//! `HostToDevice` messages and hands each session's bytes to its task ([`crate::session`]); one
//! writer task encrypts the sessions' `DeviceToHost` messages in order. [`Device::serve`]
//! redials with a capped backoff whenever the link drops.
//!
//! # Pairing
//!
//! [`pair`] dials the host, writes `LINK_MODE_PAIR` and runs NNpsk0 with the PSK derived from
//! the code the host showed; each side sends a `PairingOffer` with its static key inside the
//! handshake, and the device pins the host's key in the vault.
//!
//! # Approvals
//!
//! When a call lacks a grant and a passkey is stored, [`Device::request_approval`] sends the
//! host `ApprovalNeeded` on the current link and waits (at most
//! [`DeviceConfig::approval_wait`]) for the matching `Approval`; the evidence is checked by
//! [`crate::approval::check_evidence`] before a grant is created. Approved grants live in
//! memory (they last minutes) and are recorded in the grant log. Asks still waiting when the
//! link drops fail at once.
//!
//! # Audit checkpoints
//!
//! A `Checkpoint` from the host is checked, signed with the device's audit key and appended to
//! `<vault>.checkpoints.log` by [`crate::checkpoint::CheckpointLog`] before the answer
//! (`CheckpointSigned`, or `CheckpointRefused` with the reason) goes back. A refusal is logged
//! within a [`LogBudget`], since the host can send these at will.
//!
//! # Reloading
//!
//! `vault-device grant` and `add` change the vault file while `serve` runs; [`Device::snapshot`]
//! re-opens it when its modification time changed, so a new grant takes effect at the next
//! request.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rand_core::{OsRng, RngCore};
use shared_proto::credential::{
    self, ApprovalAnswer, DeviceToHost, HostToDevice, LINK_MODE_LINK, LINK_MODE_PAIR,
    MAX_LINK_DATA, PairingOffer,
};
use shared_proto::ratelimit::LogBudget;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use zeroize::Zeroizing;

use crate::approval::{
    ApprovalCheckError, Ask, GrantLog, GrantRecord, PasskeyFile, check_evidence, grant_for,
};
use crate::checkpoint::{CheckpointLog, CheckpointLogError};
use crate::grant::Grant;
use crate::noise::{self, NoiseError};
use crate::session::{self, SessionContext, SessionPeer};
use crate::vault::{Pairing, Vault, VaultData, VaultError};

/// Sessions one link may hold at once; an `Open` beyond it is closed at once.
pub const MAX_SESSIONS: usize = 256;
/// Link messages a session may leave unread (at most [`credential::MAX_LINK_DATA`] bytes each,
/// so about 4.5 MiB): one more and it is dropped at once, so that no session ever holds up the
/// link the others share.
pub const SESSION_BACKLOG: usize = 96;
/// Approval asks waiting at once; more are refused at once.
pub const MAX_PENDING_ASKS: usize = 64;
/// The default of [`DeviceConfig::approval_wait`]: a little over the host's default approval
/// expiry (300 s), so that the host's own expiry answers first.
pub const DEFAULT_APPROVAL_WAIT: Duration = Duration::from_secs(310);
/// The longest pause between redials.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vault failed.
    #[error("vault")]
    Vault(#[from] VaultError),
    /// The device is not paired with a host.
    #[error("not paired with a host; run `vault-device pair` first")]
    NotPaired,
    /// Dialling the host failed.
    #[error("cannot connect to {address}")]
    Connect {
        /// The host's address.
        address: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The Noise layer failed (handshake, forged or malformed message).
    #[error("link")]
    Link(#[from] NoiseError),
    /// A CA file could not be read or parsed.
    #[error("cannot load CA file {}", .path.display())]
    CaFile {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The HTTPS client could not be built.
    #[error("cannot build the HTTPS client")]
    Client(#[source] reqwest::Error),
    /// The audit checkpoint log could not be read.
    #[error("audit checkpoints")]
    Checkpoint(#[from] CheckpointLogError),
}

/// How the device runs.
#[derive(Debug, Clone)]
pub struct DeviceConfig {
    /// The vault file.
    pub vault: PathBuf,
    /// Its passphrase.
    pub passphrase: Zeroizing<Vec<u8>>,
    /// PEM CA files the device trusts for upstream HTTPS (only these: no built-in roots).
    pub ca_files: Vec<PathBuf>,
    /// Fixed name resolutions (`host` to address), for tests and split-horizon setups.
    pub resolve: Vec<(String, SocketAddr)>,
    /// How long a call without a grant waits for the user's approval.
    pub approval_wait: Duration,
}

#[derive(Default)]
struct Approvals {
    /// Asks sent to the host and not yet answered.
    pending: HashMap<[u8; 16], oneshot::Sender<ApprovalAnswer>>,
    /// Grants created by verified approvals.
    grants: Vec<Grant>,
}

struct Cached {
    modified: Option<SystemTime>,
    vault: Vault,
}

/// The running device.
pub struct Device {
    config: DeviceConfig,
    cached: Mutex<Cached>,
    http: reqwest::Client,
    /// The current link's outgoing queue.
    link: Mutex<Option<mpsc::Sender<DeviceToHost>>>,
    approvals: Mutex<Approvals>,
    /// Serializes the read-check-write of the passkey file.
    passkey_file: tokio::sync::Mutex<PathBuf>,
    grant_log: GrantLog,
    /// The tokenizers of the VMs the host said tokenize.
    tokens: crate::tokenize::Registry,
    /// The audit signing key ([`crate::checkpoint::audit_signing_key`]).
    audit_key: ed25519_dalek::SigningKey,
    /// What the device signed, and the last seq per log.
    checkpoints: Mutex<CheckpointLog>,
    /// Refused checkpoints logged (the host can send them at will).
    checkpoint_budget: Mutex<LogBudget>,
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Device")
            .field("vault", &self.config.vault)
            .finish_non_exhaustive()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

impl Device {
    /// Opens the vault and builds the HTTPS client.
    pub fn open(config: DeviceConfig) -> Result<Arc<Self>, DeviceError> {
        let vault = Vault::open(&config.vault, &config.passphrase)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10));
        for path in &config.ca_files {
            let ca_err = |source: Box<dyn std::error::Error + Send + Sync>| DeviceError::CaFile {
                path: path.clone(),
                source,
            };
            let pem = std::fs::read(path).map_err(|e| ca_err(Box::new(e)))?;
            let certs =
                reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ca_err(Box::new(e)))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        for (host, addr) in &config.resolve {
            builder = builder.resolve(host, *addr);
        }
        let http = builder.build().map_err(DeviceError::Client)?;
        let audit_key = crate::checkpoint::audit_signing_key(&vault.identity_secret());
        let checkpoints = CheckpointLog::open(crate::checkpoint::log_path_for(&config.vault))?;
        Ok(Arc::new(Self {
            audit_key,
            checkpoints: Mutex::new(checkpoints),
            checkpoint_budget: Mutex::new(LogBudget::new()),
            cached: Mutex::new(Cached {
                modified: modified(&config.vault),
                vault,
            }),
            link: Mutex::new(None),
            approvals: Mutex::new(Approvals::default()),
            passkey_file: tokio::sync::Mutex::new(PasskeyFile::path_for(&config.vault)),
            grant_log: GrantLog::for_vault(&config.vault),
            tokens: crate::tokenize::Registry::default(),
            config,
            http,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The vault's contents, re-read if the file changed.
    pub fn snapshot(&self) -> Result<VaultData, VaultError> {
        let mut cached = self.lock();
        let now = modified(&self.config.vault);
        if now != cached.modified {
            cached.vault = Vault::open(&self.config.vault, &self.config.passphrase)?;
            cached.modified = now;
        }
        Ok(cached.vault.data.clone())
    }

    fn approvals(&self) -> MutexGuard<'_, Approvals> {
        self.approvals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The live grants that verified approvals created.
    pub fn approved_grants(&self, now_unix: u64) -> Vec<Grant> {
        let mut a = self.approvals();
        a.grants.retain(|g| g.expires_at > now_unix);
        a.grants.clone()
    }

    /// Whether a passkey is stored, so that asking for an approval can succeed.
    pub fn can_ask(&self) -> bool {
        let path = PasskeyFile::path_for(&self.config.vault);
        PasskeyFile::load(&path).is_ok_and(|f| !f.passkeys.is_empty())
    }

    /// Asks the user, through the host, to approve releasing `credential` to `target_host`
    /// for `vm_id`; on a verified approval creates, records and answers the grant (see the
    /// module doc of [`crate::approval`]).
    pub async fn request_approval(
        &self,
        credential: &str,
        target_host: &str,
        vm_id: &str,
    ) -> Result<Grant, ApprovalCheckError> {
        let mut request = [0u8; 16];
        OsRng.fill_bytes(&mut request);
        let ask = Ask {
            request,
            credential: credential.to_owned(),
            target_host: target_host.to_owned(),
            vm_id: vm_id.to_owned(),
        };
        let link = self
            .link
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .ok_or(ApprovalCheckError::LinkDown)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut a = self.approvals();
            if a.pending.len() >= MAX_PENDING_ASKS {
                return Err(ApprovalCheckError::TooMany(MAX_PENDING_ASKS));
            }
            a.pending.insert(request, tx);
        }
        let _guard = AskGuard {
            device: self,
            request,
        };
        link.send(DeviceToHost::ApprovalNeeded {
            request,
            vm_id: ask.vm_id.clone(),
            credential: ask.credential.clone(),
            target_host: ask.target_host.clone(),
        })
        .await
        .map_err(|_| ApprovalCheckError::LinkDown)?;
        tracing::info!(vm = %vm_id, %credential, %target_host, "asked for an approval");
        let wait = self.config.approval_wait;
        let answer = match tokio::time::timeout(wait, rx).await {
            Err(_) => return Err(ApprovalCheckError::Timeout(wait)),
            Ok(Err(_)) => return Err(ApprovalCheckError::LinkDown),
            Ok(Ok(answer)) => answer,
        };
        let (canonical_request, assertion) = match answer {
            ApprovalAnswer::Refused { reason } => return Err(ApprovalCheckError::Refused(reason)),
            ApprovalAnswer::Approved {
                canonical_request,
                assertion,
            } => (canonical_request, assertion),
        };
        let path = self.passkey_file.lock().await;
        let mut store = PasskeyFile::load(&path)?;
        let checked = check_evidence(
            &mut store,
            &ask,
            &canonical_request,
            &assertion,
            now_unix_ms(),
        );
        let approved = match checked {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!(vm = %vm_id, %credential, error = %crate::ErrorChain(&e),
                    "approval evidence refused");
                return Err(e);
            }
        };
        // The counter and the used id are stored before the grant exists.
        store.save(&path)?;
        drop(path);
        let now = now_unix_ms() / 1000;
        let grant = grant_for(&ask, &approved, now);
        self.grant_log.append(&GrantRecord {
            at: now,
            approval_id: approved.id.clone(),
            request: hex::encode(request),
            grant: grant.clone(),
        })?;
        tracing::info!(vm = %vm_id, %credential, %target_host, approval = %approved.id,
            expires_at = grant.expires_at, "grant created by a verified approval");
        self.approvals().grants.push(grant.clone());
        Ok(grant)
    }

    /// The identity secret.
    pub fn identity_secret(&self) -> Zeroizing<[u8; 32]> {
        self.lock().vault.identity_secret()
    }

    /// Checks, signs and records an audit checkpoint the host asked for (see the module doc),
    /// and returns the answer for the host.
    pub fn sign_checkpoint(&self, checkpoint: nanoclaw_audit::Checkpoint) -> DeviceToHost {
        let seq = checkpoint.seq;
        let signed = self
            .checkpoints
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .sign(&self.audit_key, checkpoint, now_unix_ms() / 1000);
        match signed {
            Ok(s) => {
                tracing::debug!(log = %s.log, seq, "signed an audit checkpoint");
                DeviceToHost::CheckpointSigned {
                    log: s.log,
                    seq: s.seq,
                    head: s.head,
                    unix_time: s.unix_time,
                    device_key: s.device_key,
                    signature: s.signature,
                }
            }
            Err(e) => {
                let admitted = self
                    .checkpoint_budget
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .admit(Instant::now());
                if let Some(suppressed) = admitted {
                    tracing::warn!(seq, suppressed, error = %crate::ErrorChain(&e),
                        "refused to sign an audit checkpoint");
                }
                DeviceToHost::CheckpointRefused {
                    seq,
                    reason: crate::checkpoint::refusal_reason(&e),
                }
            }
        }
    }

    /// The HTTPS client.
    pub fn http(&self) -> &reqwest::Client {
        &self.http
    }

    /// The tokenizers of the VMs the host announced ([`crate::tokenize`]).
    pub fn tokens(&self) -> &crate::tokenize::Registry {
        &self.tokens
    }

    /// Sends the host a message on the current link without waiting (a report: dropped, and
    /// logged, when the link is down or its queue is full).
    pub fn notify_host(&self, msg: DeviceToHost) {
        let link = self.link.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let sent = link.is_some_and(|l| l.try_send(msg).is_ok());
        if !sent {
            tracing::warn!("a report to the host was dropped (link down or busy)");
        }
    }

    /// Keeps the link up: dials, serves until it drops, waits, dials again. Returns only when
    /// the device is not paired.
    pub async fn serve(self: Arc<Self>) -> Result<(), DeviceError> {
        let mut backoff = Duration::from_millis(200);
        loop {
            match Arc::clone(&self).run_link().await {
                Err(DeviceError::NotPaired) => return Err(DeviceError::NotPaired),
                Err(e) => tracing::warn!(error = %crate::ErrorChain(&e), "link down"),
                Ok(()) => {
                    tracing::info!("link closed by the host");
                    backoff = Duration::from_millis(200);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Dials the paired host and serves the link until it ends.
    pub async fn run_link(self: Arc<Self>) -> Result<(), DeviceError> {
        let pairing = self.lock().vault.data.pairing.clone();
        let pairing = pairing.ok_or(DeviceError::NotPaired)?;
        let mut stream = TcpStream::connect(&pairing.address)
            .await
            .map_err(|source| DeviceError::Connect {
                address: pairing.address.clone(),
                source,
            })?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&[LINK_MODE_LINK])
            .await
            .map_err(|e| DeviceError::Link(NoiseError::Io(e)))?;
        let identity = self.identity_secret();
        let mut hs =
            noise::link_initiator(&identity, &pairing.host_public_key).map_err(NoiseError::from)?;
        drop(identity);
        let (read, mut write) = stream.into_split();
        let mut read = noise::RecordReader::new(read);
        noise::write_handshake(&mut write, &mut hs, &[]).await?;
        noise::read_handshake(&mut read, &mut hs).await?;
        let transport = Arc::new(Mutex::new(
            hs.into_transport_mode().map_err(NoiseError::from)?,
        ));
        tracing::info!(host = %pairing.address, "link up");

        let (to_host, mut outgoing) = mpsc::channel::<DeviceToHost>(256);
        // First on the link: the host switches to it only after this (see `DeviceToHost::Ready`).
        let _ = to_host.send(DeviceToHost::Ready).await;
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = Some(to_host.clone());
        let writer_transport = Arc::clone(&transport);
        let writer = tokio::spawn(async move {
            while let Some(msg) = outgoing.recv().await {
                let sealed = {
                    let plain = credential::encode_message(&msg)?;
                    let mut t = writer_transport.lock().unwrap_or_else(|p| p.into_inner());
                    noise::seal(&mut t, &plain)?
                };
                noise::write_record(&mut write, &sealed).await?;
            }
            Ok::<(), NoiseError>(())
        });

        let mut sessions: HashMap<u64, mpsc::Sender<Vec<u8>>> = HashMap::new();
        let result = loop {
            let record = match read.next().await {
                Ok(Some(r)) => r,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let plain = {
                let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
                noise::open(&mut t, &record).map_err(NoiseError::from)
            };
            let msg = match plain.and_then(|p| Ok(credential::decode_message::<HostToDevice>(&p)?))
            {
                Ok(m) => m,
                Err(e) => break Err(e),
            };
            sessions.retain(|_, tx| !tx.is_closed());
            match msg {
                HostToDevice::Open {
                    session,
                    vm_id,
                    boot_id,
                    sidecar_public_key,
                } => {
                    if sessions.len() >= MAX_SESSIONS || sessions.contains_key(&session) {
                        let _ = to_host.send(DeviceToHost::Close { session }).await;
                        continue;
                    }
                    let (tx, rx) = mpsc::channel(SESSION_BACKLOG);
                    sessions.insert(session, tx);
                    let peer = SessionPeer {
                        vm_id,
                        boot_id,
                        sidecar_public_key,
                    };
                    tokio::spawn(run_session(
                        Arc::clone(&self),
                        session,
                        peer,
                        rx,
                        to_host.clone(),
                    ));
                }
                HostToDevice::Data { session, bytes } => {
                    if deliver(&mut sessions, session, bytes) == Delivery::Dropped {
                        tracing::debug!(session, "a session left its backlog unread: dropped");
                    }
                }
                HostToDevice::Close { session } => {
                    sessions.remove(&session);
                }
                HostToDevice::Tokenize {
                    vm_id,
                    spec,
                    issued,
                } => match self.tokens.apply(&vm_id, &spec, &issued) {
                    Ok(adopted) => {
                        tracing::debug!(vm = %vm_id, adopted, enforce = spec.enforce, "tokenize settings");
                    }
                    Err(e) => {
                        tracing::warn!(vm = %vm_id, error = %crate::ErrorChain(&e), "tokenize settings");
                    }
                },
                HostToDevice::Checkpoint {
                    log,
                    seq,
                    head,
                    unix_time,
                } => {
                    let answer = self.sign_checkpoint(nanoclaw_audit::Checkpoint {
                        log,
                        seq,
                        head,
                        unix_time,
                    });
                    let _ = to_host.send(answer).await;
                }
                HostToDevice::Approval { request, answer } => {
                    let waiter = self.approvals().pending.remove(&request);
                    match waiter {
                        Some(tx) => {
                            let _ = tx.send(answer);
                        }
                        // The host can send these at will: not above debug.
                        None => tracing::debug!(
                            request = %hex::encode(request),
                            "an approval answer for no pending ask (unknown or already answered)"
                        ),
                    }
                }
            }
        };
        *self.link.lock().unwrap_or_else(|p| p.into_inner()) = None;
        // Asks on this link will get no answer: their waiters fail now.
        self.approvals().pending.clear();
        drop(to_host);
        drop(sessions);
        writer.abort();
        result.map_err(DeviceError::Link)
    }
}

/// What became of one `Data` message for a session.
#[derive(Debug, PartialEq, Eq)]
enum Delivery {
    /// Queued for the session.
    Queued,
    /// No such session (never opened, or already gone): the bytes are dropped.
    NoSession,
    /// The session had [`SESSION_BACKLOG`] messages unread, or had ended: it is dropped (its
    /// task sees its input end, and the host gets its `Close`).
    Dropped,
}

/// Hands `bytes` to `session` without waiting: the link's reader serves every session, so a
/// session that does not keep up is dropped rather than waited for.
fn deliver(
    sessions: &mut HashMap<u64, mpsc::Sender<Vec<u8>>>,
    session: u64,
    bytes: Vec<u8>,
) -> Delivery {
    let Some(tx) = sessions.get(&session) else {
        return Delivery::NoSession;
    };
    match tx.try_send(bytes) {
        Ok(()) => Delivery::Queued,
        Err(_) => {
            sessions.remove(&session);
            Delivery::Dropped
        }
    }
}

/// What a session reaches of the device ([`crate::session`] depends on this view only).
impl SessionContext for Device {
    fn identity_secret(&self) -> Zeroizing<[u8; 32]> {
        Device::identity_secret(self)
    }

    fn snapshot(&self) -> Result<VaultData, VaultError> {
        Device::snapshot(self)
    }

    fn approved_grants(&self, now_unix: u64) -> Vec<Grant> {
        Device::approved_grants(self, now_unix)
    }

    fn can_ask(&self) -> bool {
        Device::can_ask(self)
    }

    fn request_approval(
        &self,
        credential: &str,
        target_host: &str,
        vm_id: &str,
    ) -> impl std::future::Future<Output = Result<Grant, ApprovalCheckError>> + Send {
        Device::request_approval(self, credential, target_host, vm_id)
    }

    fn tokens(&self) -> &crate::tokenize::Registry {
        Device::tokens(self)
    }

    fn http(&self) -> &reqwest::Client {
        Device::http(self)
    }

    fn notify_host(&self, msg: DeviceToHost) {
        Device::notify_host(self, msg)
    }
}

/// Removes an ask whose waiter is gone (answered, timed out or dropped).
struct AskGuard<'a> {
    device: &'a Device,
    request: [u8; 16],
}

impl Drop for AskGuard<'_> {
    fn drop(&mut self) {
        self.device.approvals().pending.remove(&self.request);
    }
}

fn now_unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Runs one session, cutting its output into link `Data` messages, then closes it.
async fn run_session(
    device: Arc<Device>,
    session: u64,
    peer: SessionPeer,
    rx: mpsc::Receiver<Vec<u8>>,
    to_host: mpsc::Sender<DeviceToHost>,
) {
    let (out, mut records) = mpsc::channel::<Vec<u8>>(16);
    let forward_to = to_host.clone();
    let forwarder = tokio::spawn(async move {
        while let Some(record) = records.recv().await {
            for piece in record.chunks(MAX_LINK_DATA) {
                let msg = DeviceToHost::Data {
                    session,
                    bytes: piece.to_vec(),
                };
                if forward_to.send(msg).await.is_err() {
                    return;
                }
            }
        }
    });
    let vm = peer.vm_id.clone();
    if let Err(e) = session::run(device, peer, rx, out).await {
        tracing::info!(%vm, session, error = %crate::ErrorChain(&e), "session ended");
    }
    let _ = forwarder.await;
    let _ = to_host.send(DeviceToHost::Close { session }).await;
}

/// Pairs with the host at `address` using the `code` it shows, and pins its key in `vault`.
pub async fn pair(
    vault: &mut Vault,
    address: &str,
    code: &str,
    name: &str,
) -> Result<Pairing, DeviceError> {
    let psk = Zeroizing::new(credential::pairing_psk(code).map_err(NoiseError::from)?);
    let mut stream = TcpStream::connect(address)
        .await
        .map_err(|source| DeviceError::Connect {
            address: address.to_owned(),
            source,
        })?;
    stream
        .write_all(&[LINK_MODE_PAIR])
        .await
        .map_err(|e| DeviceError::Link(NoiseError::Io(e)))?;
    let mut hs = noise::pair_initiator(&psk).map_err(NoiseError::from)?;
    let offer = PairingOffer {
        static_public_key: vault.identity_public(),
        name: name.to_owned(),
    };
    let payload = credential::encode_message(&offer).map_err(NoiseError::from)?;
    noise::write_handshake(&mut stream, &mut hs, &payload).await?;
    let answer = noise::read_handshake(&mut noise::RecordReader::new(&mut stream), &mut hs).await?;
    let host: PairingOffer = credential::decode_message(&answer).map_err(NoiseError::from)?;
    let pairing = Pairing {
        address: address.to_owned(),
        host_public_key: host.static_public_key,
        host_name: host.name,
    };
    vault.data.pairing = Some(pairing.clone());
    vault.save()?;
    Ok(pairing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_session_that_stops_reading_is_dropped_without_holding_up_the_others() {
        let mut sessions = HashMap::new();
        let (slow_tx, _slow_rx) = mpsc::channel(SESSION_BACKLOG);
        let (fast_tx, mut fast_rx) = mpsc::channel(SESSION_BACKLOG);
        sessions.insert(1, slow_tx);
        sessions.insert(2, fast_tx);
        // The slow session reads nothing: its backlog fills, and the next message drops it.
        for _ in 0..SESSION_BACKLOG {
            assert_eq!(deliver(&mut sessions, 1, vec![0; 16]), Delivery::Queued);
        }
        // `deliver` does not wait: this returns at once, however long the reader sleeps.
        assert_eq!(deliver(&mut sessions, 1, vec![0; 16]), Delivery::Dropped);
        assert!(!sessions.contains_key(&1));
        assert_eq!(deliver(&mut sessions, 1, vec![0; 16]), Delivery::NoSession);
        // The other session is served throughout.
        assert_eq!(
            deliver(&mut sessions, 2, b"hello".to_vec()),
            Delivery::Queued
        );
        assert_eq!(fast_rx.recv().await.as_deref(), Some(&b"hello"[..]));
    }

    #[tokio::test]
    async fn a_session_that_ended_is_dropped_on_its_next_message() {
        let mut sessions = HashMap::new();
        let (tx, rx) = mpsc::channel(SESSION_BACKLOG);
        sessions.insert(7, tx);
        drop(rx);
        assert_eq!(deliver(&mut sessions, 7, vec![1]), Delivery::Dropped);
        assert!(sessions.is_empty());
    }
}

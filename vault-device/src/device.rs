//! The running device: the open vault, the HTTPS client, pairing and the outbound links to the
//! paired hosts.
//!
//! # The links
//!
//! The device keeps one link per paired host. For each it dials the host (so a phone behind
//! NAT works), writes [`LINK_MODE_LINK`] and runs Noise KK as initiator with its identity key
//! and that host's key pinned at pairing: a host without that key, or a device the host has
//! not paired, fails the handshake. Then one reader loop decodes `HostToDevice` messages and
//! hands each session's bytes to its task ([`crate::session`]); one writer task encrypts the
//! sessions' `DeviceToHost` messages in order. [`Device::serve`] redials each link with its own
//! capped backoff whenever it drops, and looks at the vault's pairings every
//! [`PAIRING_POLL`]: a pairing added while it serves (`vault-device pair`) gets its link within
//! that time, and a link whose pairing is gone is not redialled.
//!
//! Links are known by their host's link key ([`Pairing::host_public_key`]). Everything a
//! session triggers goes back on the link it came from: its `Data` and `Close`, its
//! `Tokenized` reports, the `ApprovalNeeded` of its asks; a checkpoint is answered on the link
//! that asked. An `Approval` answer counts only from the link its ask was sent on, and the asks
//! waiting on a link fail when that link drops.
//!
//! # Pairing
//!
//! [`pair`] dials the host, writes `LINK_MODE_PAIR` and runs NNpsk0 with the PSK derived from
//! the code the host showed; each side sends a `PairingOffer` with its static key inside the
//! handshake, and the device adds the host's pinned key to the vault's pairings (in place of
//! a pairing with the same key or address).
//!
//! # Approvals
//!
//! When a call lacks a grant and a passkey is stored, [`Device::request_approval`] asks the
//! user and waits (at most [`DeviceConfig::approval_wait`]):
//!
//! - passkeys registered on the device: it builds the approval request itself and holds it
//!   ([`Device::page_pending`]) for its own approval page ([`crate::approval_page`]), which
//!   approves ([`Device::page_approve`]) or denies ([`Device::page_deny`]) it; the host only
//!   gets a notice (`ApprovalNeeded` with `on_device` set), best effort;
//! - passkeys imported from the host: it sends `ApprovalNeeded` on the link of the session that
//!   asks and waits for the matching `Approval` on that link. Asks still waiting when that
//!   link drops fail at once.
//!
//! The request names the VM as the asking host names it (that host shows it); the grant it
//! leads to, and the limit of asks per VM, are for the session's origin (see Moves).
//!
//! Either way the evidence is checked by [`crate::approval::check_evidence`] before a grant is
//! created. Approved grants live in memory (they last minutes) and are recorded in the grant
//! log.
//!
//! # Audit checkpoints
//!
//! A `Checkpoint` from the host is checked, signed with the device's audit key and appended to
//! `<vault>.checkpoints.log` by [`crate::checkpoint::CheckpointLog`] before the answer
//! (`CheckpointSigned`, or `CheckpointRefused` with the reason) goes back. A refusal is logged
//! within a [`LogBudget`], since the host can send these at will.
//!
//! # Moves
//!
//! A VM that live-migrates keeps its sidecar's boot key and gets a new id on its new host. The
//! source host sends `Moving` on its link before the switch-over; the device records the move
//! in the vault if the target is another paired host, and answers `MoveNoted` (with the reason
//! when it refuses, logged at debug only). A session `Open` then resolves to its origin
//! ([`crate::moves::resolve`]): a session from the target for the new id, whose sidecar proves
//! that boot key, gets the source VM's grants; one for the same id with another key does not.
//! Once such a session has completed its handshake the move is marked arrived (and saved),
//! and the source's sessions for that VM with that key are closed before they are served, so
//! only one copy is served. The tokenizer settings stay those its current host announced.
//!
//! What the device trusts here: only a paired host can be named as the target; the source can
//! hand over only what it could already do for that VM (its grants), bound to that boot key;
//! the target cannot claim a VM unasked. See [`crate::moves`].
//!
//! # Reloading
//!
//! `vault-device grant`, `add` and `pair` change the vault file while `serve` runs;
//! [`Device::snapshot`] re-opens it when its modification time changed, so a new grant takes
//! effect at the next request and a new pairing at the next [`PAIRING_POLL`]. Moves are
//! written by `serve` itself, after re-reading a changed file (a CLI change made during that
//! save, a few tens of milliseconds, can be lost).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use rand_core::{OsRng, RngCore};
use serde::Serialize;
use shared_proto::approval::{ApprovalRequest, Assertion, RelyingParty, RequestAction};
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
use crate::moves::{self, HostVm, Move, Resolution};
use crate::noise::{self, NoiseError};
use crate::session::{self, SessionContext, SessionPeer};
use crate::vault::{Pairing, Vault, VaultData, VaultError, host_label};

/// Sessions one link may hold at once; an `Open` beyond it is closed at once.
pub const MAX_SESSIONS: usize = 256;
/// How long an idle upstream connection is kept for reuse.
pub const UPSTREAM_IDLE: Duration = Duration::from_secs(90);
/// The most idle upstream connections kept per host.
pub const UPSTREAM_IDLE_PER_HOST: usize = 8;
/// Link messages a session may leave unread (at most [`credential::MAX_LINK_DATA`] bytes each,
/// so about 6 MiB): one more and it is dropped at once, so that no session ever holds up the
/// link the others share.
pub const SESSION_BACKLOG: usize = 96;
/// Approval asks waiting at once; more are refused at once.
pub const MAX_PENDING_ASKS: usize = 64;
/// Asks from one VM waiting on the device's own page at once (as the host's approver allows
/// one agent), so that one agent can neither crowd out the others nor flood the user with
/// notices; more are refused at once.
pub const MAX_PAGE_ASKS_PER_VM: usize = 8;
/// The default of [`DeviceConfig::approval_wait`]: a little over the host's default approval
/// expiry (300 s), so that the host's own expiry answers first.
pub const DEFAULT_APPROVAL_WAIT: Duration = Duration::from_secs(310);
/// The rule named in the approval requests the device builds (the host names the same one).
pub const CREDENTIAL_RULE: &str = "credential_without_grant";
/// The longest pause between redials.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often [`Device::serve`] looks for pairings added or removed while it runs.
pub const PAIRING_POLL: Duration = Duration::from_secs(5);

/// Errors of the device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The vault failed.
    #[error("vault")]
    Vault(#[from] VaultError),
    /// The device is not paired with a host (or no longer with the one asked for).
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
    /// Asks sent to a host and not yet answered, by request id.
    pending: HashMap<[u8; 16], HostAsk>,
    /// Asks shown on the device's own page, by approval id.
    on_page: HashMap<String, PageAsk>,
    /// Grants created by verified approvals.
    grants: Vec<Grant>,
}

/// An ask sent to a host: the link it went on (the only one its answer is taken from) and the
/// waiting call.
struct HostAsk {
    link: [u8; 32],
    answer: oneshot::Sender<ApprovalAnswer>,
}

/// What became of an `Approval` answer from a link.
#[derive(Debug, PartialEq, Eq)]
enum Answered {
    /// It answered an ask sent on that link.
    Delivered,
    /// Its ask was sent on another host's link: ignored.
    OtherLink,
    /// No ask waits with that id (unknown, or already answered).
    Unknown,
}

impl Approvals {
    /// Hands `answer`, which came on the link `link`, to the ask `request` if that ask was sent
    /// on that link.
    fn answer(&mut self, link: &[u8; 32], request: [u8; 16], answer: ApprovalAnswer) -> Answered {
        match self.pending.get(&request) {
            None => Answered::Unknown,
            Some(ask) if ask.link != *link => Answered::OtherLink,
            Some(_) => {
                if let Some(ask) = self.pending.remove(&request) {
                    let _ = ask.answer.send(answer);
                }
                Answered::Delivered
            }
        }
    }

    /// Fails the asks sent on `link` (it dropped: they will get no answer).
    fn link_down(&mut self, link: &[u8; 32]) {
        self.pending.retain(|_, ask| ask.link != *link);
    }
}

/// An ask waiting on the device's own approval page: the request the device built, exactly as
/// the passkey must sign it.
struct PageAsk {
    ask: Ask,
    request: ApprovalRequest,
    canonical: Vec<u8>,
    challenge: [u8; 32],
    answer: oneshot::Sender<PageAnswer>,
}

/// How the page answered an ask.
#[derive(Debug)]
enum PageAnswer {
    /// Approved and verified: the grant it created.
    Granted(Grant),
    /// Denied by the user.
    Denied,
}

/// A pending ask as the device's approval page shows it (the same shape as the host's pages
/// use, so that the shared script serves both).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PageView {
    /// The request the device built.
    pub request: ApprovalRequest,
    /// Its SHA-256, base64url: the WebAuthn challenge.
    pub challenge: String,
    /// Its approval page.
    pub url: String,
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
    /// The outgoing queue of each link that is up, by its host's link key.
    link: Mutex<HashMap<[u8; 32], mpsc::Sender<DeviceToHost>>>,
    approvals: Mutex<Approvals>,
    /// The relying party of the device's own approval page, while it is served.
    page: Mutex<Option<RelyingParty>>,
    /// The budget of the log lines of asks (an agent makes the device ask at will).
    ask_log: Mutex<LogBudget>,
    /// Serializes the read-check-write of the passkey file.
    passkey_file: Arc<tokio::sync::Mutex<PathBuf>>,
    grant_log: GrantLog,
    /// The tokenizers of the VMs the host said tokenize.
    tokens: crate::tokenize::Registry,
    /// The audit signing key ([`crate::checkpoint::audit_signing_key`]).
    audit_key: ed25519_dalek::SigningKey,
    /// What the device signed, and the last seq per log.
    checkpoints: Mutex<CheckpointLog>,
    /// Refused checkpoints logged (the host can send them at will).
    checkpoint_budget: Mutex<LogBudget>,
    /// The budget of the log lines of moves (a host sends notices at will).
    move_log: Mutex<LogBudget>,
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
        // The file's time before its contents: a change written after this is seen as one
        // (and read at the next request). Taken after the read, a `grant` that lands between
        // the two would be marked as read and never be.
        let opened = modified(&config.vault);
        let vault = Vault::open(&config.vault, &config.passphrase)?;
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            // Keep-alive upstream: one client for every session, whose pool keeps a few idle
            // connections per host, so a VM's calls to the same service reuse its TLS
            // connection instead of a new handshake each.
            .pool_idle_timeout(UPSTREAM_IDLE)
            .pool_max_idle_per_host(UPSTREAM_IDLE_PER_HOST);
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
                modified: opened,
                vault,
            }),
            link: Mutex::new(HashMap::new()),
            move_log: Mutex::new(LogBudget::new()),
            approvals: Mutex::new(Approvals::default()),
            page: Mutex::new(None),
            ask_log: Mutex::new(LogBudget::new()),
            passkey_file: Arc::new(tokio::sync::Mutex::new(PasskeyFile::path_for(
                &config.vault,
            ))),
            grant_log: GrantLog::for_vault(&config.vault),
            tokens: crate::tokenize::Registry::default(),
            config,
            http,
        }))
    }

    fn lock(&self) -> MutexGuard<'_, Cached> {
        self.cached.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The open vault, re-read first if the file changed.
    fn current(&self) -> Result<MutexGuard<'_, Cached>, VaultError> {
        let mut cached = self.lock();
        let now = modified(&self.config.vault);
        if now != cached.modified {
            cached.vault = Vault::open(&self.config.vault, &self.config.passphrase)?;
            cached.modified = now;
        }
        Ok(cached)
    }

    /// The vault's contents, re-read if the file changed.
    pub fn snapshot(&self) -> Result<VaultData, VaultError> {
        Ok(self.current()?.vault.data.clone())
    }

    /// Applies `change` to the current vault and saves it if `change` says it changed
    /// anything (it must change nothing otherwise); after a failed save the vault is read
    /// again, without the change. Answers whether it saved.
    fn update_vault(
        &self,
        change: impl FnOnce(&mut VaultData) -> bool,
    ) -> Result<bool, VaultError> {
        let mut cached = self.current()?;
        if !change(&mut cached.vault.data) {
            return Ok(false);
        }
        if let Err(e) = cached.vault.save() {
            let before = modified(&self.config.vault);
            if let Ok(vault) = Vault::open(&self.config.vault, &self.config.passphrase) {
                cached.vault = vault;
                cached.modified = before;
            }
            return Err(e);
        }
        // Read back at the next request rather than marked as read: a `vault-device` command
        // that wrote just after this save would otherwise never be seen.
        cached.modified = None;
        Ok(true)
    }

    fn links(&self) -> MutexGuard<'_, HashMap<[u8; 32], mpsc::Sender<DeviceToHost>>> {
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The outgoing queue of the link to the host `host`, if it is up.
    fn link_to(&self, host: &[u8; 32]) -> Option<mpsc::Sender<DeviceToHost>> {
        self.links().get(host).cloned()
    }

    /// Whether a line about a move may be logged now (`Some(n)`: yes, `n` were suppressed).
    fn move_log(&self) -> Option<u64> {
        self.move_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now())
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

    /// The lock that serializes every read-check-write of the passkey file (the approval
    /// page's registrations take it too).
    pub fn passkey_lock(&self) -> Arc<tokio::sync::Mutex<PathBuf>> {
        Arc::clone(&self.passkey_file)
    }

    /// Says that the device's own approval page is served for `rp` (`None`: no longer), so
    /// that asks for device-registered passkeys are shown there.
    pub fn set_approval_page(&self, rp: Option<RelyingParty>) {
        *self.page.lock().unwrap_or_else(|p| p.into_inner()) = rp;
    }

    /// Whether a line about an ask may be logged now (`Some(n)`: yes, `n` were suppressed).
    fn ask_log(&self) -> Option<u64> {
        self.ask_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(std::time::Instant::now())
    }

    fn approval_page(&self) -> Option<RelyingParty> {
        self.page.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Asks the user to approve releasing `credential` to `target_host` for the VM `asker`
    /// (a host's link key and its id for the VM), on the device's own page or through that
    /// host's link (see the module doc); on a verified approval creates, records and answers
    /// the grant, for `origin` (the asker itself, or the VM it was before it moved: see the
    /// module doc of [`crate::approval`] and [`crate::moves`]).
    pub async fn request_approval(
        &self,
        asker: &HostVm,
        origin: &HostVm,
        credential: &str,
        target_host: &str,
    ) -> Result<Grant, ApprovalCheckError> {
        let mut request = [0u8; 16];
        OsRng.fill_bytes(&mut request);
        let ask = Ask {
            request,
            credential: credential.to_owned(),
            target_host: target_host.to_owned(),
            vm_id: asker.vm.clone(),
            origin: origin.clone(),
        };
        let store = {
            let path = self.passkey_file.lock().await;
            PasskeyFile::load(&path)?
        };
        if store.on_device {
            return match self.approval_page() {
                Some(rp) if rp == store.relying_party() => {
                    self.ask_on_page(ask, &rp, &asker.host).await
                }
                _ => Err(ApprovalCheckError::PageNotServed(store.origin)),
            };
        }
        self.ask_host(ask, asker.host).await
    }

    /// The import mode: the host on the link `host` shows the request and sends back
    /// evidence on that link.
    async fn ask_host(&self, ask: Ask, host: [u8; 32]) -> Result<Grant, ApprovalCheckError> {
        let request = ask.request;
        let link = self.link_to(&host).ok_or(ApprovalCheckError::LinkDown)?;
        let (tx, rx) = oneshot::channel();
        {
            let mut a = self.approvals();
            if a.pending.len() + a.on_page.len() >= MAX_PENDING_ASKS {
                return Err(ApprovalCheckError::TooMany(MAX_PENDING_ASKS));
            }
            a.pending.insert(
                request,
                HostAsk {
                    link: host,
                    answer: tx,
                },
            );
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
            on_device: false,
        })
        .await
        .map_err(|_| ApprovalCheckError::LinkDown)?;
        if let Some(suppressed) = self.ask_log() {
            tracing::info!(vm = %ask.vm_id, credential = %ask.credential,
                target_host = %ask.target_host, suppressed, "asked the host for an approval");
        }
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
        self.grant_on_evidence(&ask, &canonical_request, &assertion)
            .await
    }

    /// The device mode: the device builds the request, shows it on its own page and waits for
    /// the page's answer; the host on the link `host` only gets a notice.
    async fn ask_on_page(
        &self,
        ask: Ask,
        rp: &RelyingParty,
        host: &[u8; 32],
    ) -> Result<Grant, ApprovalCheckError> {
        let wait = self.config.approval_wait;
        let request = build_request(&ask, now_unix_ms(), wait);
        let canonical = request.encode().map_err(ApprovalCheckError::Build)?;
        let challenge = request.challenge().map_err(ApprovalCheckError::Build)?;
        let id = request.id.clone();
        let (tx, rx) = oneshot::channel();
        {
            let mut a = self.approvals();
            if a.pending.len() + a.on_page.len() >= MAX_PENDING_ASKS {
                return Err(ApprovalCheckError::TooMany(MAX_PENDING_ASKS));
            }
            let of_vm = a.on_page.values().filter(|p| p.ask.origin == ask.origin);
            if of_vm.count() >= MAX_PAGE_ASKS_PER_VM {
                return Err(ApprovalCheckError::TooMany(MAX_PAGE_ASKS_PER_VM));
            }
            a.on_page.insert(
                id.clone(),
                PageAsk {
                    ask: ask.clone(),
                    request,
                    canonical,
                    challenge,
                    answer: tx,
                },
            );
        }
        let _guard = PageAskGuard {
            device: self,
            id: id.clone(),
        };
        // Best effort: the request waits on the device whether or not the host passes it on.
        let noticed = self.link_to(host).is_some_and(|l| {
            l.try_send(DeviceToHost::ApprovalNeeded {
                request: ask.request,
                vm_id: ask.vm_id.clone(),
                credential: ask.credential.clone(),
                target_host: ask.target_host.clone(),
                on_device: true,
            })
            .is_ok()
        });
        if let Some(suppressed) = self.ask_log() {
            tracing::info!(vm = %ask.vm_id, credential = %ask.credential,
                target_host = %ask.target_host, page = %format!("{}/approve/{id}", rp.origin),
                host_told = noticed, suppressed, "a request waits on the device's approval page");
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(PageAnswer::Granted(grant))) => Ok(grant),
            Ok(Ok(PageAnswer::Denied)) => Err(ApprovalCheckError::Refused(
                "denied on the device's approval page".into(),
            )),
            // The ask expired on the page (its sender dropped) or the wait ran out.
            Ok(Err(_)) | Err(_) => Err(ApprovalCheckError::Timeout(wait)),
        }
    }

    /// Checks `canonical_request` and `assertion` for `ask` against the stored passkeys and
    /// relying party, then creates, records and answers the grant.
    async fn grant_on_evidence(
        &self,
        ask: &Ask,
        canonical_request: &[u8],
        assertion: &Assertion,
    ) -> Result<Grant, ApprovalCheckError> {
        let path = self.passkey_file.lock().await;
        let mut store = PasskeyFile::load(&path)?;
        let checked = check_evidence(&mut store, ask, canonical_request, assertion, now_unix_ms());
        let approved = match checked {
            Ok(r) => r,
            Err(e) => {
                if let Some(suppressed) = self.ask_log() {
                    tracing::warn!(vm = %ask.vm_id, credential = %ask.credential,
                        error = %crate::ErrorChain(&e), suppressed, "approval evidence refused");
                }
                return Err(e);
            }
        };
        // The counter and the used id are stored before the grant exists.
        store.save(&path)?;
        drop(path);
        let now = now_unix_ms() / 1000;
        let grant = grant_for(ask, &approved, now);
        self.grant_log.append(&GrantRecord {
            at: now,
            approval_id: approved.id.clone(),
            request: hex::encode(ask.request),
            grant: grant.clone(),
        })?;
        tracing::info!(vm = %ask.vm_id, credential = %ask.credential,
            target_host = %ask.target_host, approval = %approved.id,
            expires_at = grant.expires_at, "grant created by a verified approval");
        self.approvals().grants.push(grant.clone());
        Ok(grant)
    }

    /// The asks waiting on the device's page at `now_unix_ms`, oldest first; expired ones are
    /// dropped (their calls fail).
    pub fn page_pending(&self, now_unix_ms: u64) -> Vec<PageView> {
        let origin = self.approval_page().map(|rp| rp.origin).unwrap_or_default();
        let mut a = self.approvals();
        a.on_page
            .retain(|_, p| p.request.expires_unix_ms > now_unix_ms);
        let mut v: Vec<PageView> = a
            .on_page
            .values()
            .map(|p| PageView {
                request: p.request.clone(),
                challenge: B64URL.encode(p.challenge),
                url: format!("{origin}/approve/{}", p.request.id),
            })
            .collect();
        v.sort_by(|x, y| {
            (x.request.created_unix_ms, &x.request.id)
                .cmp(&(y.request.created_unix_ms, &y.request.id))
        });
        v
    }

    /// One ask waiting on the device's page.
    pub fn page_get(&self, id: &str, now_unix_ms: u64) -> Option<PageView> {
        self.page_pending(now_unix_ms)
            .into_iter()
            .find(|v| v.request.id == id)
    }

    /// Approves the ask `id` on the device's page with `assertion`: the device checks it
    /// against the request it built and holds (never one it is given) with
    /// [`check_evidence`], then creates the grant and answers the waiting call. A failed check
    /// leaves the ask pending.
    pub async fn page_approve(
        &self,
        id: &str,
        assertion: &Assertion,
    ) -> Result<Grant, ApprovalCheckError> {
        let (ask, canonical) = {
            let a = self.approvals();
            let p = a
                .on_page
                .get(id)
                .ok_or_else(|| ApprovalCheckError::NoSuchAsk(id.to_owned()))?;
            (p.ask.clone(), p.canonical.clone())
        };
        let grant = self.grant_on_evidence(&ask, &canonical, assertion).await?;
        if let Some(p) = self.approvals().on_page.remove(id) {
            let _ = p.answer.send(PageAnswer::Granted(grant.clone()));
        }
        Ok(grant)
    }

    /// Denies the ask `id` on the device's page: its call fails at once.
    pub fn page_deny(&self, id: &str) -> Result<(), ApprovalCheckError> {
        let p = self
            .approvals()
            .on_page
            .remove(id)
            .ok_or_else(|| ApprovalCheckError::NoSuchAsk(id.to_owned()))?;
        let _ = p.answer.send(PageAnswer::Denied);
        tracing::info!(vm = %p.ask.vm_id, credential = %p.ask.credential,
            target_host = %p.ask.target_host, "request denied on the device's approval page");
        Ok(())
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

    /// Whether the link to any paired host is up.
    pub fn is_linked(&self) -> bool {
        !self.links().is_empty()
    }

    /// Whether the link to the host whose link key is `host` is up.
    pub fn is_linked_to(&self, host: &[u8; 32]) -> bool {
        self.links().contains_key(host)
    }

    /// Sends the host whose link key is `host` a message on its link without waiting (a
    /// report: dropped, and logged, when that link is down or its queue is full).
    pub fn notify_host(&self, host: &[u8; 32], msg: DeviceToHost) {
        let sent = self.link_to(host).is_some_and(|l| l.try_send(msg).is_ok());
        if !sent {
            tracing::warn!("a report to the host was dropped (link down or busy)");
        }
    }

    /// Records the move `notice` (from the host of the link it came on), if it names another
    /// paired host, and answers the host ([`crate::moves::note`]).
    pub fn note_move(&self, notice: Move) -> DeviceToHost {
        let vm_id = notice.from_vm.clone();
        let to = notice.to_host;
        let mut refused = None;
        let saved = self.update_vault(|data| {
            let paired = data.paired_hosts();
            match moves::note(&mut data.moves, &paired, notice) {
                Ok(()) => true,
                Err(e) => {
                    refused = Some(e);
                    false
                }
            }
        });
        let refused = match (saved, refused) {
            (_, Some(why)) => {
                // The host can send these at will: not above debug.
                tracing::debug!(vm = %vm_id, reason = %why, "a move notice refused");
                Some(why.to_string())
            }
            (Ok(_), None) => {
                if let Some(suppressed) = self.move_log() {
                    let to = host_label(&self.lock().vault.data.pairings, &to);
                    tracing::info!(vm = %vm_id, suppressed, "a VM moves to {to}: its sessions there will get its grants");
                }
                None
            }
            (Err(e), None) => {
                if let Some(suppressed) = self.move_log() {
                    tracing::warn!(vm = %vm_id, suppressed, error = %crate::ErrorChain(&e),
                        "a move notice could not be recorded");
                }
                Some("the device could not record the move".to_owned())
            }
        };
        DeviceToHost::MoveNoted { vm_id, refused }
    }

    /// What a session `Open` from the host `host` becomes: its peer, with its origin
    /// ([`moves::resolve`]), or `None` when the VM moved from here to another host and arrived
    /// there (or the vault cannot be read), so the session is closed before it is served.
    fn session_peer(
        &self,
        host: [u8; 32],
        vm_id: String,
        boot_id: [u8; 16],
        sidecar_public_key: [u8; 32],
    ) -> Option<SessionPeer> {
        let resolution = match self.current() {
            Ok(cached) => {
                let data = &cached.vault.data;
                match moves::resolve(&data.moves, &host, &vm_id, &sidecar_public_key) {
                    Resolution::Serve(origin) => Ok(origin),
                    Resolution::Moved { to_host } => Err(host_label(&data.pairings, &to_host)),
                }
            }
            Err(e) => {
                tracing::debug!(vm = %vm_id, error = %crate::ErrorChain(&e), "a session closed: the vault is unavailable");
                return None;
            }
        };
        match resolution {
            Ok(origin) => Some(SessionPeer {
                host,
                vm_id,
                boot_id,
                sidecar_public_key,
                origin,
            }),
            Err(to) => {
                // The host opens sessions at will: not above debug.
                tracing::debug!(vm = %vm_id, "a session closed: the VM moved to {to}");
                None
            }
        }
    }

    /// After a session's handshake: marks the moves to its VM and boot key arrived, so that
    /// the source's copy is no longer served.
    fn arrived(&self, peer: &SessionPeer) {
        let (host, vm, key) = (&peer.host, &peer.vm_id, &peer.sidecar_public_key);
        match self.update_vault(|data| moves::mark_arrived(&mut data.moves, host, vm, key)) {
            Ok(false) => {}
            Ok(true) => {
                if let Some(suppressed) = self.move_log() {
                    tracing::info!(vm = %vm, suppressed, "a moved VM arrived: its source's copy is no longer served");
                }
            }
            Err(e) => {
                if let Some(suppressed) = self.move_log() {
                    tracing::warn!(vm = %vm, suppressed, error = %crate::ErrorChain(&e),
                        "a moved VM's arrival could not be recorded");
                }
            }
        }
    }

    /// Keeps a link up to every paired host, each dialling, serving until it drops, waiting
    /// and dialling again on its own ([`Device::keep_linked`]); picks up pairings added to the
    /// vault every [`PAIRING_POLL`]. Returns only when the device is not paired with any host
    /// (or its vault cannot be read when it starts).
    pub async fn serve(self: Arc<Self>) -> Result<(), DeviceError> {
        // Each link's task, by its id, and the host it links to. Dropped with `serve`.
        let mut links = tokio::task::JoinSet::new();
        let mut running: HashMap<tokio::task::Id, [u8; 32]> = HashMap::new();
        loop {
            match self.snapshot() {
                Ok(data) => {
                    for host in data.paired_hosts() {
                        if !running.values().any(|h| *h == host) {
                            let task = links.spawn(Arc::clone(&self).keep_linked(host));
                            running.insert(task.id(), host);
                        }
                    }
                }
                Err(e) if running.is_empty() => return Err(e.into()),
                Err(e) => tracing::warn!(error = %crate::ErrorChain(&e), "vault"),
            }
            if running.is_empty() {
                return Err(DeviceError::NotPaired);
            }
            tokio::select! {
                Some(ended) = links.join_next_with_id() => {
                    // No longer paired (or, unexpectedly, failed): taken up again at the next
                    // look if it is still paired.
                    let id = match ended {
                        Ok((id, _)) => id,
                        Err(e) => e.id(),
                    };
                    running.remove(&id);
                }
                () = tokio::time::sleep(PAIRING_POLL) => {}
            }
        }
    }

    /// Keeps the link to the host `host` up: dials, serves until it drops, waits, dials again.
    /// Returns once that host is no longer paired.
    pub async fn keep_linked(self: Arc<Self>, host: [u8; 32]) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match Arc::clone(&self).run_link(host).await {
                Err(DeviceError::NotPaired) => return,
                Err(e) => {
                    tracing::warn!(host = %hex::encode(host), error = %crate::ErrorChain(&e), "link down")
                }
                Ok(()) => {
                    tracing::info!(host = %hex::encode(host), "link closed by the host");
                    backoff = Duration::from_millis(200);
                }
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// Dials the paired host whose link key is `host` and serves its link until it ends.
    pub async fn run_link(self: Arc<Self>, host: [u8; 32]) -> Result<(), DeviceError> {
        let pairing = self.current()?.vault.data.pairing(&host).cloned();
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
        tracing::info!(host = %pairing.host_name, address = %pairing.address, "link up");

        let (to_host, mut outgoing) = mpsc::channel::<DeviceToHost>(256);
        // First on the link: the host switches to it only after this (see `DeviceToHost::Ready`).
        let _ = to_host.send(DeviceToHost::Ready).await;
        self.links().insert(host, to_host.clone());
        let writer_transport = Arc::clone(&transport);
        let writer = tokio::spawn(async move {
            let (mut plain, mut sealed) = (Vec::new(), Vec::new());
            while let Some(msg) = outgoing.recv().await {
                plain.clear();
                match &msg {
                    // The bulk of the link: encoded straight from the session's record.
                    DeviceToHost::Data { session, bytes } => {
                        credential::data::encode_link_data(*session, bytes, &mut plain);
                    }
                    other => plain = credential::encode_message(other)?,
                }
                sealed.clear();
                {
                    let mut t = writer_transport.lock().unwrap_or_else(|p| p.into_inner());
                    noise::seal_record(&mut t, &plain, &mut sealed)?;
                }
                write.write_all(&sealed).await.map_err(NoiseError::Io)?;
                write.flush().await.map_err(NoiseError::Io)?;
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
                    let Some(peer) = self.session_peer(host, vm_id, boot_id, sidecar_public_key)
                    else {
                        let _ = to_host.send(DeviceToHost::Close { session }).await;
                        continue;
                    };
                    let (tx, rx) = mpsc::channel(SESSION_BACKLOG);
                    sessions.insert(session, tx);
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
                } => match self.tokens.apply(&host, &vm_id, &spec, &issued) {
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
                    // The host can send these at will: not above debug.
                    match self.approvals().answer(&host, request, answer) {
                        Answered::Delivered => {}
                        Answered::OtherLink => tracing::debug!(
                            request = %hex::encode(request),
                            "an approval answer from another host's link than its ask's: ignored"
                        ),
                        Answered::Unknown => tracing::debug!(
                            request = %hex::encode(request),
                            "an approval answer for no pending ask (unknown or already answered)"
                        ),
                    }
                }
                HostToDevice::Moving {
                    vm_id,
                    boot_key,
                    to_host: target,
                    to_vm,
                } => {
                    let notice = Move::noticed(
                        HostVm::new(host, vm_id.clone()),
                        boot_key,
                        HostVm::new(target, to_vm),
                        now_unix_ms() / 1000,
                    );
                    // Saving the vault derives its key: off the runtime's threads.
                    let device = Arc::clone(&self);
                    let answer = tokio::task::spawn_blocking(move || device.note_move(notice))
                        .await
                        .unwrap_or_else(|_| DeviceToHost::MoveNoted {
                            vm_id,
                            refused: Some("the device failed to record the move".into()),
                        });
                    let _ = to_host.send(answer).await;
                }
            }
        };
        self.links().remove(&host);
        // Asks on this link will get no answer: their waiters fail now.
        self.approvals().link_down(&host);
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
        peer: &SessionPeer,
        credential: &str,
        target_host: &str,
    ) -> impl std::future::Future<Output = Result<Grant, ApprovalCheckError>> + Send {
        let asker = HostVm::new(peer.host, peer.vm_id.clone());
        let origin = peer.origin.clone();
        async move { Device::request_approval(self, &asker, &origin, credential, target_host).await }
    }

    fn handshake_done(&self, peer: &SessionPeer) {
        self.arrived(peer);
    }

    fn tokens(&self) -> &crate::tokenize::Registry {
        Device::tokens(self)
    }

    fn http(&self) -> &reqwest::Client {
        Device::http(self)
    }

    fn notify_host(&self, host: &[u8; 32], msg: DeviceToHost) {
        Device::notify_host(self, host, msg)
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

/// Removes an ask from the device's page once its call no longer waits.
struct PageAskGuard<'a> {
    device: &'a Device,
    id: String,
}

impl Drop for PageAskGuard<'_> {
    fn drop(&mut self) {
        self.device.approvals().on_page.remove(&self.id);
    }
}

/// The approval request the device shows for `ask`: a credential release naming the ask's
/// request id in its arguments (as [`check_evidence`] expects), expiring `wait` after
/// `now_unix_ms`, with a fresh id and nonce.
pub fn build_request(ask: &Ask, now_unix_ms: u64, wait: Duration) -> ApprovalRequest {
    let mut id = [0u8; 16];
    OsRng.fill_bytes(&mut id);
    let mut nonce = [0u8; 32];
    OsRng.fill_bytes(&mut nonce);
    // serde_json's maps are sorted, so this text is the one rendering of the arguments.
    let arguments = serde_json::json!({
        "credential": ask.credential,
        "target_host": ask.target_host,
        credential::APPROVAL_REQUEST_ARG: hex::encode(ask.request),
    });
    ApprovalRequest {
        id: format!("dev-{}", hex::encode(id)),
        agent: format!("the agent in {}", ask.vm_id),
        vm_id: ask.vm_id.clone(),
        profile: "-".into(),
        action: RequestAction::Credential {
            name: ask.credential.clone(),
            target_host: ask.target_host.clone(),
        },
        arguments: arguments.to_string(),
        rule: CREDENTIAL_RULE.into(),
        reason: format!(
            "the device holds no live grant to send {} to {} for {}",
            ask.credential, ask.target_host, ask.vm_id
        ),
        created_unix_ms: now_unix_ms,
        expires_unix_ms: now_unix_ms
            .saturating_add(u64::try_from(wait.as_millis()).unwrap_or(u64::MAX)),
        nonce,
    }
}

/// The time now, in Unix milliseconds.
pub fn now_unix_ms() -> u64 {
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
            // A full record fits one message: moved, not copied.
            let pieces = if record.len() <= MAX_LINK_DATA {
                vec![record]
            } else {
                record.chunks(MAX_LINK_DATA).map(<[u8]>::to_vec).collect()
            };
            for bytes in pieces {
                let msg = DeviceToHost::Data { session, bytes };
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

/// Pairs with the host at `address` using the `code` it shows, and pins its key in `vault`:
/// a new pairing, or in place of the one with the same key or address
/// ([`VaultData::add_pairing`]).
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
    vault.data.add_pairing(pairing.clone());
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

    const A: [u8; 32] = [0xa; 32];
    const B: [u8; 32] = [0xb; 32];
    const C: [u8; 32] = [0xc; 32];
    /// Paired with nobody.
    const STRANGER: [u8; 32] = [0xd; 32];
    const K: [u8; 32] = [7; 32];

    fn pairing(name: &str, key: [u8; 32]) -> Pairing {
        Pairing {
            address: format!("{name}.test:7000"),
            host_public_key: key,
            host_name: name.into(),
        }
    }

    /// A device whose vault is paired with hosts A, B and C (no link is dialled).
    fn device() -> (tempfile::TempDir, Arc<Device>) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let mut vault =
            Vault::create(&path, b"pw", crate::vault::KdfParams::FAST_FOR_TESTS).expect("a vault");
        for (name, key) in [("host-a", A), ("host-b", B), ("host-c", C)] {
            vault.data.add_pairing(pairing(name, key));
        }
        vault.save().unwrap();
        let device = Device::open(DeviceConfig {
            vault: path,
            passphrase: Zeroizing::new(b"pw".to_vec()),
            ca_files: Vec::new(),
            resolve: Vec::new(),
            approval_wait: Duration::from_secs(5),
        })
        .unwrap();
        (dir, device)
    }

    fn notice(from_host: [u8; 32], from_vm: &str, to_host: [u8; 32], to_vm: &str) -> Move {
        Move::noticed(
            HostVm::new(from_host, from_vm),
            K,
            HostVm::new(to_host, to_vm),
            1,
        )
    }

    #[track_caller]
    fn noted(answer: DeviceToHost) -> Option<String> {
        match answer {
            DeviceToHost::MoveNoted { vm_id, refused } => {
                assert_eq!(vm_id, "v1");
                refused
            }
            other => panic!("expected MoveNoted, got {other:?}"),
        }
    }

    fn open(device: &Device, host: [u8; 32], vm: &str, key: [u8; 32]) -> Option<SessionPeer> {
        device.session_peer(host, vm.into(), [1; 16], key)
    }

    fn origin(device: &Device, host: [u8; 32], vm: &str, key: [u8; 32]) -> HostVm {
        open(device, host, vm, key).expect("served").origin
    }

    #[test]
    fn a_move_to_an_unpaired_host_or_to_the_sender_is_refused() {
        let (_dir, device) = device();
        let why = noted(device.note_move(notice(A, "v1", STRANGER, "v2"))).unwrap();
        assert!(why.contains("not paired"), "{why}");
        let why = noted(device.note_move(notice(A, "v1", A, "v2"))).unwrap();
        assert!(why.contains("source"), "{why}");
        assert!(device.snapshot().unwrap().moves.is_empty());
        // Nothing resolves through a refused notice.
        assert_eq!(
            origin(&device, STRANGER, "v2", K),
            HostVm::new(STRANGER, "v2")
        );
    }

    #[test]
    fn a_moved_vm_gets_its_grants_on_the_named_host_only_and_is_served_once() {
        let (dir, device) = device();
        assert_eq!(noted(device.note_move(notice(A, "v1", B, "v2"))), None);
        // Recorded in the vault file.
        let saved = Vault::open(&dir.path().join("vault"), b"pw").unwrap();
        assert_eq!(saved.data.moves, [notice(A, "v1", B, "v2")]);
        // The target, with the boot key: the source VM's grants.
        let target = open(&device, B, "v2", K).unwrap();
        assert_eq!(target.origin, HostVm::new(A, "v1"));
        assert!(target.moved_here());
        // Another key for that id, or a third paired host: themselves.
        assert_eq!(origin(&device, B, "v2", [8; 32]), HostVm::new(B, "v2"));
        assert_eq!(origin(&device, C, "v2", K), HostVm::new(C, "v2"));
        // Until the VM arrives the source's copy is still served.
        assert_eq!(origin(&device, A, "v1", K), HostVm::new(A, "v1"));
        device.arrived(&target);
        assert!(
            open(&device, A, "v1", K).is_none(),
            "only one copy is served"
        );
        assert_eq!(origin(&device, A, "v1", [8; 32]), HostVm::new(A, "v1"));
        let saved = Vault::open(&dir.path().join("vault"), b"pw").unwrap();
        assert!(saved.data.moves[0].arrived);
        // It moves on from B to C: C's copy resolves to A's VM through both moves.
        assert!(matches!(
            device.note_move(notice(B, "v2", C, "v3")),
            DeviceToHost::MoveNoted { refused: None, .. }
        ));
        assert_eq!(origin(&device, C, "v3", K), HostVm::new(A, "v1"));
    }

    #[test]
    fn a_grant_written_by_the_cli_while_serving_is_seen_at_once() {
        let (dir, device) = device();
        let path = dir.path().join("vault");
        // Read once, as a serving device does at its first session.
        assert!(device.snapshot().unwrap().grants.is_empty());
        for n in 0..20 {
            let mut cli = Vault::open(&path, b"pw").unwrap();
            cli.data.grants.push(Grant {
                credential: "svc".into(),
                host: "api.test:1".into(),
                vm: format!("vm-{n}"),
                on: Some(A),
                expires_at: u64::MAX,
                fallback: false,
            });
            cli.save().unwrap();
            let seen = device.snapshot().unwrap();
            assert_eq!(seen.grants.len(), n + 1, "write {n} not seen");
        }
    }

    /// Links to A and B as bare queues, as `run_link` registers them.
    fn links(device: &Device) -> [mpsc::Receiver<DeviceToHost>; 2] {
        [A, B].map(|host| {
            let (tx, rx) = mpsc::channel(8);
            device.links().insert(host, tx);
            rx
        })
    }

    #[tokio::test]
    async fn an_ask_goes_on_its_sessions_link_and_only_that_link_answers_it() {
        let (_dir, device) = device();
        let [mut on_a, mut on_b] = links(&device);
        assert!(device.is_linked() && device.is_linked_to(&A) && !device.is_linked_to(&C));
        // A session from B for its `v2`, whose origin is A's `v1`.
        let asker = HostVm::new(B, "v2");
        let ask = {
            let device = Arc::clone(&device);
            tokio::spawn(async move {
                let origin = HostVm::new(A, "v1");
                device
                    .request_approval(&asker, &origin, "svc", "api.test")
                    .await
            })
        };
        let request = match on_b.recv().await.unwrap() {
            DeviceToHost::ApprovalNeeded { request, vm_id, .. } => {
                assert_eq!(vm_id, "v2", "named as the asking host names it");
                request
            }
            other => panic!("expected ApprovalNeeded, got {other:?}"),
        };
        assert!(on_a.try_recv().is_err(), "nothing on the other link");
        let refused = |reason: &str| ApprovalAnswer::Refused {
            reason: reason.into(),
        };
        // An answer from A's link is ignored; the one from B's counts.
        let answer = |link, reason| device.approvals().answer(link, request, refused(reason));
        assert_eq!(answer(&A, "from A"), Answered::OtherLink);
        assert_eq!(answer(&B, "from B"), Answered::Delivered);
        assert_eq!(answer(&B, "again"), Answered::Unknown);
        match ask.await.unwrap() {
            Err(ApprovalCheckError::Refused(reason)) => assert_eq!(reason, "from B"),
            other => panic!("{other:?}"),
        }
        // Reports go on the link named.
        device.notify_host(&A, DeviceToHost::Ready);
        assert!(matches!(on_a.try_recv(), Ok(DeviceToHost::Ready)));
        assert!(on_b.try_recv().is_err());
    }

    #[tokio::test]
    async fn asks_fail_when_their_own_link_drops_only() {
        let (_dir, device) = device();
        let [mut on_a, mut on_b] = links(&device);
        let ask = |host: [u8; 32]| {
            let device = Arc::clone(&device);
            tokio::spawn(async move {
                let vm = HostVm::new(host, "v");
                device.request_approval(&vm, &vm, "svc", "api.test").await
            })
        };
        let from_a = ask(A);
        let from_b = ask(B);
        let (Some(_), Some(needed_b)) = (on_a.recv().await, on_b.recv().await) else {
            panic!("both asks sent");
        };
        device.approvals().link_down(&A);
        assert!(matches!(
            from_a.await.unwrap(),
            Err(ApprovalCheckError::LinkDown)
        ));
        // B's ask still waits, and its answer still counts.
        let DeviceToHost::ApprovalNeeded { request, .. } = needed_b else {
            panic!("expected ApprovalNeeded");
        };
        let answer = ApprovalAnswer::Refused {
            reason: "no".into(),
        };
        assert_eq!(
            device.approvals().answer(&B, request, answer),
            Answered::Delivered
        );
        assert!(matches!(
            from_b.await.unwrap(),
            Err(ApprovalCheckError::Refused(_))
        ));
    }
}

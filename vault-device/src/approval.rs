//! Device-side approvals: the device checks the user's passkey assertion itself before it
//! creates a grant, so a compromised host cannot mint one.
//!
//! When a call needs a credential the device holds but has no live grant for (credential x
//! target host x VM), the device asks the user ([`crate::device::Device::request_approval`],
//! bounded by `DeviceConfig::approval_wait`), in one of two modes chosen by the passkey file:
//!
//! - **On the device** (passkeys registered on the device's own page,
//!   [`PasskeyFile::on_device`]): the device builds the canonical [`ApprovalRequest`] itself,
//!   holds it in memory and shows it on its own approval page ([`crate::approval_page`], on
//!   loopback, origin `http://localhost:PORT`, rp id `localhost`), where the user approves with
//!   a passkey whose challenge is that request's SHA-256, or denies. The host only gets a
//!   notice (`ApprovalNeeded` with `on_device` set) so that it can tell the user a request
//!   waits; it creates no approval of its own, and any evidence it sends is ignored.
//! - **Through the host** (passkeys imported from the host, the older and weaker mode): the
//!   device sends the host `ApprovalNeeded` with a fresh random request id; the host shows the
//!   request on its own pages and, on approval, sends back the canonical request and the
//!   assertion.
//!
//! In both modes [`check_evidence`] then:
//!
//! 1. decodes the request ([`ApprovalRequest::decode`] refuses any non-canonical encoding);
//! 2. checks its action is `Credential` for exactly the credential and target host asked about,
//!    its VM is the VM asked about, and its arguments name the device's request id
//!    ([`shared_proto::credential::APPROVAL_REQUEST_ARG`]);
//! 3. refuses an approval id it has already used (kept in the passkey file);
//! 4. calls [`verify_approval`] with the stored passkeys and relying party (challenge =
//!    SHA-256 of the request, origin, rpIdHash, UP and UV, the ES256 signature, the counter,
//!    the expiry);
//! 5. stores the new signature counter and the used approval id.
//!
//! The grant it leads to lasts until the approval's own expiry, capped at
//! [`MAX_APPROVED_GRANT`], is for the call path only (never the fallback path, which puts the
//! secret in the guest), lives in the device's memory and is recorded in the grant log
//! ([`GrantLog`], `<vault>.grants.log`, JSON lines, 0600).
//!
//! # The passkey file
//!
//! `<vault>.passkeys.json` (0600, written atomically): the relying party (rp id and exact
//! origin of the pages the passkeys sign on), whether they were registered on the device, the
//! passkeys (credential id, public key, counter: nothing secret) and the last
//! [`MAX_USED_APPROVALS`] approval ids used. `vault-device passkey register` fills it through a
//! registration ceremony on the device's own page ([`PasskeyFile::register`]); `vault-device
//! passkey import` fills it from the host's registered passkeys (the host's `passkeys.json`,
//! [`PasskeyFile::import`]).
//!
//! # Why the device shows the request itself
//!
//! The device is the enforcement point for a credential release. When the host shows the
//! request, the user reads it on a page the host serves, and that page signs whatever
//! challenge the host gives it: a compromised host can show one request and have another
//! signed, and the device, checking the signature, cannot tell. On the device's own page the
//! request shown and the challenge signed both come from the device. The browser writes the
//! page's exact origin (scheme, host and port) into the signed clientDataJSON, and the device
//! accepts only its own origin: an assertion made on any other page, the host's included (even
//! one served on another port of `localhost`, which shares the rp id), is refused with
//! [`ApprovalError::OriginMismatch`].
//!
//! # Limit of the import mode: the passkey is trusted on first use
//!
//! In the import mode the device learns the passkey's public key from the host, once, when the
//! user imports it. A host that is already compromised at that moment can hand over a key of
//! its own, and then mint approvals; and since the host shows the request, a compromised host
//! can also have the user sign a request other than the one shown. Registering the passkey on
//! the device itself closes both gaps: the device learns the key from a ceremony on its own
//! page, guarded by a one-time token printed on its terminal. In the import mode, comparing
//! the key's fingerprint on both sides (`vault-device passkey list` prints it) at least closes
//! the first.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shared_proto::approval::{
    ApprovalError, ApprovalRequest, Assertion, Passkey, RelyingParty, RequestAction,
    verify_approval,
};
use shared_proto::credential::APPROVAL_REQUEST_ARG;

use crate::grant::Grant;
use crate::moves::HostVm;
use crate::vault::{VaultError, write_atomically};

/// The longest a grant created by an approval lasts.
pub const MAX_APPROVED_GRANT: Duration = Duration::from_secs(300);
/// How many used approval ids the passkey file remembers (older ones are expired anyway).
pub const MAX_USED_APPROVALS: usize = 4096;

/// Errors of device-side approvals. Each names the check that failed.
#[derive(Debug, thiserror::Error)]
pub enum ApprovalCheckError {
    /// No passkey is stored, so nothing can be approved.
    #[error("no passkey is stored on the device (run `vault-device passkey import`)")]
    NoPasskey,
    /// The passkey file could not be read or written.
    #[error("passkey file {}", .path.display())]
    Store {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The grant log could not be written (nothing is released unrecorded).
    #[error("grant log {}", .path.display())]
    Log {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The request bytes are not a canonical approval request.
    #[error("the approval request does not decode")]
    Decode(#[source] ApprovalError),
    /// The approved action is not a credential release.
    #[error("the approval is not for a credential release")]
    NotCredential,
    /// The approval is for another credential.
    #[error("the approval is for credential {found:?}, not {expected:?}")]
    WrongCredential {
        /// What the device asked about.
        expected: String,
        /// What the approval names.
        found: String,
    },
    /// The approval is for another target host.
    #[error("the approval is for target host {found:?}, not {expected:?}")]
    WrongHost {
        /// What the device asked about.
        expected: String,
        /// What the approval names.
        found: String,
    },
    /// The approval is for another VM.
    #[error("the approval is for VM {found:?}, not {expected:?}")]
    WrongVm {
        /// What the device asked about.
        expected: String,
        /// What the approval names.
        found: String,
    },
    /// The approval does not name this ask's request id (evidence made for another ask).
    #[error("the approval does not answer this request")]
    WrongRequest,
    /// The approval was already used for a grant.
    #[error("approval {0} was already used")]
    AlreadyUsed(String),
    /// The passkey check failed (signature, flags, challenge, origin, counter, expiry).
    #[error("the passkey assertion does not verify")]
    Verify(#[source] ApprovalError),
    /// The host says no (denied, expired, approvals unavailable).
    #[error("not approved: {0}")]
    Refused(String),
    /// No answer in time.
    #[error("no approval within {0:?}")]
    Timeout(Duration),
    /// No link to the host, or it dropped while waiting.
    #[error("the link to the host is down")]
    LinkDown,
    /// Too many asks are waiting.
    #[error("too many approvals pending (limit {0})")]
    TooMany(usize),
    /// The passkeys were registered on the device, but its approval page is not served (or is
    /// served on another origin than they were registered on), so nobody can approve.
    #[error(
        "the passkeys were registered on the device's approval page at {0}, which is not served (run `vault-device serve --approval-listen`)"
    )]
    PageNotServed(String),
    /// No ask with this approval id waits on the device's page (unknown, answered or expired).
    #[error("no pending request {0}")]
    NoSuchAsk(String),
    /// The device could not build the request it shows.
    #[error("cannot build the approval request")]
    Build(#[source] ApprovalError),
    /// The passkey is already registered.
    #[error("this passkey is already registered")]
    Duplicate,
}

/// What the device asked the user to approve.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ask {
    /// The device's request id.
    pub request: [u8; 16],
    /// The credential.
    pub credential: String,
    /// The target authority.
    pub target_host: String,
    /// The VM as the host of the asking session names it: what the request shows and must
    /// name.
    pub vm_id: String,
    /// The session's origin ([`crate::moves`]): the VM (and host) the grant is for.
    pub origin: HostVm,
}

/// The contents of the passkey file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PasskeyFile {
    /// The rp id of the pages the passkeys sign on (the device's own: `localhost`).
    pub rp_id: String,
    /// Their exact origin (the device's own: `http://localhost:PORT`).
    pub origin: String,
    /// Whether the passkeys were registered on the device's own page (approvals are then shown
    /// and signed there only) rather than imported from the host.
    #[serde(default)]
    pub on_device: bool,
    /// The user's passkeys.
    pub passkeys: Vec<Passkey>,
    /// Approval ids already used, oldest first.
    #[serde(default)]
    pub used_approvals: Vec<String>,
}

impl PasskeyFile {
    /// The passkey file of the vault at `vault`: `<vault>.passkeys.json`.
    pub fn path_for(vault: &Path) -> PathBuf {
        sibling(vault, "passkeys.json")
    }

    /// Loads it; a missing file is an empty store.
    pub fn load(path: &Path) -> Result<Self, ApprovalCheckError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| ApprovalCheckError::Store {
            path: path.to_owned(),
            source,
        };
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| err(Box::new(e))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(e) => Err(err(Box::new(e))),
        }
    }

    /// Writes it atomically, mode 0600.
    pub fn save(&self, path: &Path) -> Result<(), ApprovalCheckError> {
        let err = |source: Box<dyn std::error::Error + Send + Sync>| ApprovalCheckError::Store {
            path: path.to_owned(),
            source,
        };
        let body = serde_json::to_vec_pretty(self).map_err(|e| err(Box::new(e)))?;
        write_atomically(path, &body).map_err(|e: VaultError| err(Box::new(e)))
    }

    /// Replaces the passkeys and relying party with the host's (`passkeys_json`: the host's
    /// `passkeys.json`, a JSON array of passkeys), keeping the used approval ids. This is the
    /// trust-on-first-use step of the module doc.
    pub fn import(
        &mut self,
        passkeys_json: &[u8],
        rp: &RelyingParty,
        path: &Path,
    ) -> Result<(), ApprovalCheckError> {
        let passkeys: Vec<Passkey> =
            serde_json::from_slice(passkeys_json).map_err(|e| ApprovalCheckError::Store {
                path: path.to_owned(),
                source: Box::new(e),
            })?;
        if passkeys.is_empty() {
            return Err(ApprovalCheckError::NoPasskey);
        }
        self.rp_id = rp.rp_id.clone();
        self.origin = rp.origin.clone();
        self.on_device = false;
        self.passkeys = passkeys;
        Ok(())
    }

    /// Adds `passkey`, registered on the device's own page at `rp` (its signature already
    /// checked by [`shared_proto::approval::verify_registration`]), keeping the used approval
    /// ids. Passkeys imported from the host, or registered for another origin, are dropped:
    /// from now on only the device's page can approve.
    pub fn register(
        &mut self,
        passkey: Passkey,
        rp: &RelyingParty,
    ) -> Result<(), ApprovalCheckError> {
        if !self.on_device || self.relying_party() != *rp {
            self.passkeys.clear();
        }
        if self
            .passkeys
            .iter()
            .any(|p| p.credential_id == passkey.credential_id)
        {
            return Err(ApprovalCheckError::Duplicate);
        }
        self.rp_id = rp.rp_id.clone();
        self.origin = rp.origin.clone();
        self.on_device = true;
        self.passkeys.push(passkey);
        Ok(())
    }

    /// The relying party the assertions must be for.
    pub fn relying_party(&self) -> RelyingParty {
        RelyingParty {
            rp_id: self.rp_id.clone(),
            origin: self.origin.clone(),
        }
    }
}

/// A short fingerprint of a passkey's public key, for comparing with the host's.
pub fn fingerprint(passkey: &Passkey) -> String {
    hex::encode(&Sha256::digest(&passkey.public_key)[..8])
}

fn sibling(vault: &Path, suffix: &str) -> PathBuf {
    let mut p = vault.as_os_str().to_owned();
    p.push(".");
    p.push(suffix);
    PathBuf::from(p)
}

/// Checks the host's evidence for `ask` at `now_unix_ms` (see the module doc) and, when it
/// holds, records the new counter and the used approval id in `store` (the caller saves it).
/// Answers the verified request.
pub fn check_evidence(
    store: &mut PasskeyFile,
    ask: &Ask,
    canonical_request: &[u8],
    assertion: &Assertion,
    now_unix_ms: u64,
) -> Result<ApprovalRequest, ApprovalCheckError> {
    if store.passkeys.is_empty() {
        return Err(ApprovalCheckError::NoPasskey);
    }
    let request = ApprovalRequest::decode(canonical_request).map_err(ApprovalCheckError::Decode)?;
    let RequestAction::Credential { name, target_host } = &request.action else {
        return Err(ApprovalCheckError::NotCredential);
    };
    if name != &ask.credential {
        return Err(ApprovalCheckError::WrongCredential {
            expected: ask.credential.clone(),
            found: name.clone(),
        });
    }
    if !target_host.eq_ignore_ascii_case(&ask.target_host) {
        return Err(ApprovalCheckError::WrongHost {
            expected: ask.target_host.clone(),
            found: target_host.clone(),
        });
    }
    if request.vm_id != ask.vm_id {
        return Err(ApprovalCheckError::WrongVm {
            expected: ask.vm_id.clone(),
            found: request.vm_id.clone(),
        });
    }
    let named = serde_json::from_str::<serde_json::Value>(&request.arguments)
        .ok()
        .and_then(|v| {
            v.get(APPROVAL_REQUEST_ARG)
                .and_then(|r| r.as_str())
                .map(str::to_owned)
        });
    if named.as_deref() != Some(hex::encode(ask.request).as_str()) {
        return Err(ApprovalCheckError::WrongRequest);
    }
    if store.used_approvals.iter().any(|id| id == &request.id) {
        return Err(ApprovalCheckError::AlreadyUsed(request.id.clone()));
    }
    let verified = verify_approval(
        &store.relying_party(),
        &request,
        now_unix_ms,
        &store.passkeys,
        assertion,
    )
    .map_err(ApprovalCheckError::Verify)?;
    store.passkeys[verified.passkey].counter = verified.counter;
    if store.used_approvals.len() >= MAX_USED_APPROVALS {
        store.used_approvals.remove(0);
    }
    store.used_approvals.push(request.id.clone());
    Ok(request)
}

/// The grant an approved `request` for `ask` leads to: call path only, until the approval's
/// expiry capped at [`MAX_APPROVED_GRANT`] from `now_unix` (seconds), for the ask's origin
/// (its host and VM).
pub fn grant_for(ask: &Ask, request: &ApprovalRequest, now_unix: u64) -> Grant {
    let cap = now_unix.saturating_add(MAX_APPROVED_GRANT.as_secs());
    Grant {
        credential: ask.credential.clone(),
        host: ask.target_host.clone(),
        vm: ask.origin.vm.clone(),
        on: Some(ask.origin.host),
        // Rounded up: a request approved before its expiry gets a grant live now.
        expires_at: request.expires_unix_ms.div_ceil(1000).min(cap),
        fallback: false,
    }
}

/// The device's append-only record of the grants approvals created (JSON lines, 0600).
#[derive(Debug, Clone)]
pub struct GrantLog {
    path: PathBuf,
}

/// One line of the grant log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// When (Unix seconds).
    pub at: u64,
    /// The approval id the user signed.
    pub approval_id: String,
    /// The device's request id (hex).
    pub request: String,
    /// The grant (its `on` names the host of its VM, the ask's origin).
    pub grant: Grant,
}

impl GrantLog {
    /// The grant log of the vault at `vault`: `<vault>.grants.log`.
    pub fn for_vault(vault: &Path) -> Self {
        Self {
            path: sibling(vault, "grants.log"),
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `record` and syncs it.
    pub fn append(&self, record: &GrantRecord) -> Result<(), ApprovalCheckError> {
        let err = |source| ApprovalCheckError::Log {
            path: self.path.clone(),
            source,
        };
        let mut line = serde_json::to_vec(record).map_err(|e| err(e.into()))?;
        line.push(b'\n');
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&self.path)
            .map_err(err)?;
        f.write_all(&line).map_err(err)?;
        f.sync_data().map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn passkey(id: u8) -> Passkey {
        Passkey {
            credential_id: vec![id; 16],
            public_key: vec![4; 65],
            counter: 0,
        }
    }

    fn rp(origin: &str) -> RelyingParty {
        RelyingParty {
            rp_id: "localhost".into(),
            origin: origin.into(),
        }
    }

    #[test]
    fn a_passkey_file_written_before_device_registration_loads_as_imported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.passkeys.json");
        std::fs::write(
            &path,
            br#"{"rp_id":"localhost","origin":"http://localhost:8443","passkeys":[]}"#,
        )
        .unwrap();
        let store = PasskeyFile::load(&path).unwrap();
        assert!(!store.on_device);
        assert_eq!(store.origin, "http://localhost:8443");
    }

    #[test]
    fn registering_on_the_device_replaces_imported_passkeys_and_is_saved() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.passkeys.json");
        let mut store = PasskeyFile::default();
        let host = rp("http://localhost:8443");
        let imported = serde_json::to_vec(&[passkey(1)]).unwrap();
        store.import(&imported, &host, &path).unwrap();
        store.used_approvals.push("old".into());
        let device = rp("http://localhost:9444");
        store.register(passkey(2), &device).unwrap();
        assert!(store.on_device);
        assert_eq!(store.relying_party(), device);
        assert_eq!(store.passkeys, vec![passkey(2)]);
        // The used ids stay: an old approval id is never accepted again.
        assert_eq!(store.used_approvals, vec!["old".to_owned()]);
        // A second passkey for the same page is added; the same one twice is refused.
        store.register(passkey(3), &device).unwrap();
        assert_eq!(store.passkeys.len(), 2);
        assert!(matches!(
            store.register(passkey(3), &device),
            Err(ApprovalCheckError::Duplicate)
        ));
        store.save(&path).unwrap();
        assert_eq!(PasskeyFile::load(&path).unwrap(), store);
        // Registering for another page (another port) starts over: the old origin's passkeys
        // could only be used there.
        store
            .register(passkey(4), &rp("http://localhost:9555"))
            .unwrap();
        assert_eq!(store.passkeys, vec![passkey(4)]);
        // Importing goes back to the host's mode, explicitly.
        store.import(&imported, &host, &path).unwrap();
        assert!(!store.on_device);
        assert_eq!(store.relying_party(), host);
    }
}

//! The messages of the device <-> host link, among them the tokenizer settings and issued
//! surrogates the host hands the device, the device's tokenization reports, and approval asks
//! and answers.

use serde::{Deserialize, Serialize};

use super::checks::{check_authority, check_chunk, check_name, check_value, check_vm_id};
use super::{
    CredentialError, MAX_ISSUED_PER_MESSAGE, MAX_LINK_DATA, MAX_LLM_HOSTS, MAX_SURROGATE_LEN,
    Validate,
};

/// Host -> device, inside the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HostToDevice {
    /// A sidecar connected: a new session, with what the host knows about it from its `Hello`.
    Open {
        /// The host's number for this session.
        session: u64,
        /// The VM the sidecar runs in.
        vm_id: String,
        /// The sidecar's boot id.
        #[serde(with = "serde_bytes")]
        boot_id: [u8; 16],
        /// The sidecar's boot X25519 public key, its static key in the session.
        #[serde(with = "serde_bytes")]
        sidecar_public_key: [u8; 32],
    },
    /// Bytes from the sidecar (records of the end-to-end session, cut anywhere).
    Data {
        /// The session.
        session: u64,
        /// At most [`MAX_LINK_DATA`] bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The sidecar closed its end.
    Close {
        /// The session.
        session: u64,
    },
    /// How the device tokenizes the credential-path traffic of `vm_id`, and surrogates the
    /// host issued for it since the last such message on this link (so the device restores
    /// them too). Sent before an `Open` of a tokenizing VM; several may follow one another when
    /// the surrogates do not fit one message.
    Tokenize {
        /// The VM.
        vm_id: String,
        /// The agent's tokenization settings and key.
        spec: TokenizeSpec,
        /// Surrogates the host issued (at most [`MAX_ISSUED_PER_MESSAGE`]).
        issued: Vec<IssuedToken>,
    },
    /// The answer to the device's [`DeviceToHost::ApprovalNeeded`].
    Approval {
        /// The device's request id, as it sent it.
        #[serde(with = "serde_bytes")]
        request: [u8; 16],
        /// The user's answer.
        answer: ApprovalAnswer,
    },
    /// Sign this audit checkpoint: the head of the host's audit chain (see the audit crate's
    /// `checkpoint` module). The device answers [`DeviceToHost::CheckpointSigned`] or
    /// [`DeviceToHost::CheckpointRefused`].
    Checkpoint {
        /// Names the audit log (at most [`MAX_CHECKPOINT_LABEL`] bytes).
        log: String,
        /// The seq of the chain's last record.
        seq: u64,
        /// That record's hash.
        #[serde(with = "serde_bytes")]
        head: [u8; 32],
        /// The host's clock (Unix seconds).
        unix_time: u64,
    },
    /// The VM `vm_id` of this host, whose sidecar's boot key is `boot_key`, is about to move
    /// to the paired host whose link key is `to_host`, where it will be `to_vm`. Sent by the
    /// source before the switch-over; the device answers [`DeviceToHost::MoveNoted`]. The
    /// device then serves sessions from `to_host` for `to_vm` with that boot key as this VM
    /// (its grants), and once one has opened, no longer serves this host's copy.
    Moving {
        /// The VM's id on this host.
        vm_id: String,
        /// Its sidecar's boot key (memory moves whole, so the key goes with it).
        #[serde(with = "serde_bytes")]
        boot_key: [u8; 32],
        /// The link key of the host it moves to (which the device must have paired).
        #[serde(with = "serde_bytes")]
        to_host: [u8; 32],
        /// Its id there.
        to_vm: String,
    },
}

/// How the device tokenizes one agent's credential-path traffic: the same key and mode as the
/// host's MCP gateway for that agent, so both give the same surrogates. A request to one of
/// `llm_hosts` has its body tokenized (the model sees surrogates); a request to any other host
/// has issued surrogates in its body restored (the service gets the real values). Responses are
/// tokenized on their way to the agent.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizeSpec {
    /// Enforce (replace) or monitor (only count).
    pub enforce: bool,
    /// The agent's tokenization key. Travels only inside the Noise KK link.
    #[serde(with = "serde_bytes")]
    pub key: [u8; 32],
    /// Authorities (`host` or `host:port`) whose request bodies are tokenized.
    pub llm_hosts: Vec<String>,
    /// Authorities whose request bodies have surrogates restored to the real values; a body to
    /// any other authority leaves as the agent wrote it.
    #[serde(default)]
    pub restore_hosts: Vec<String>,
}

impl std::fmt::Debug for TokenizeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizeSpec")
            .field("enforce", &self.enforce)
            .field("key", &"<redacted>")
            .field("llm_hosts", &self.llm_hosts)
            .field("restore_hosts", &self.restore_hosts)
            .finish()
    }
}

/// The kinds of value tokenized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TokenKind {
    /// A payment card number.
    Card,
    /// A US SSN.
    Ssn,
    /// An email address.
    Email,
    /// An API key or token.
    ApiKey,
}

/// A surrogate the host issued, with what decrypting it needs; never the real value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedToken {
    /// The surrogate.
    pub surrogate: String,
    /// Its kind.
    pub kind: TokenKind,
    /// For API keys, the clear prefix's length.
    pub prefix_len: u16,
    /// For API keys, the alphabet's id.
    pub alphabet: u8,
}

impl IssuedToken {
    /// Whether it is one a tokenizer could have issued: not empty, at most
    /// [`MAX_SURROGATE_LEN`] bytes, its clear prefix inside it.
    pub fn is_well_formed(&self) -> bool {
        !self.surrogate.is_empty()
            && self.surrogate.len() <= MAX_SURROGATE_LEN
            && usize::from(self.prefix_len) <= self.surrogate.len()
    }
}

/// Which part of a proxied call a [`DeviceToHost::Tokenized`] report is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BodyPart {
    /// The request body, tokenized (to an LLM host).
    RequestTokenized,
    /// The request body, surrogates restored (to any other host).
    RequestRestored,
    /// The response body, tokenized on its way to the agent.
    Response,
}

/// Counts per kind; never a value.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    /// Card numbers.
    pub cards: u64,
    /// SSNs.
    pub ssns: u64,
    /// Email addresses.
    pub emails: u64,
    /// API keys.
    pub api_keys: u64,
    /// Detected but left unchanged (too short to encrypt).
    pub skipped: u64,
}

/// The host's answer to an approval the device asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApprovalAnswer {
    /// Approved: the evidence, which the device checks itself before creating any grant.
    Approved {
        /// The approval request exactly as signed
        /// ([`crate::approval::ApprovalRequest::encode`]).
        #[serde(with = "serde_bytes")]
        canonical_request: Vec<u8>,
        /// The user's passkey assertion over its SHA-256.
        assertion: crate::approval::Assertion,
    },
    /// Not approved (denied, expired, or approvals are not available), and why.
    Refused {
        /// Why, for the agent's error message.
        reason: String,
    },
}

/// Device -> host, inside the link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceToHost {
    /// The device's first message on a new link, sent as soon as the handshake is done. The
    /// host takes a new link (and drops an older one) only once this arrives: a recorded first
    /// handshake message, replayed, completes no handshake the replayer can speak on, so it
    /// can no longer cut the live link.
    Ready,
    /// Bytes for the sidecar.
    Data {
        /// The session.
        session: u64,
        /// At most [`MAX_LINK_DATA`] bytes.
        #[serde(with = "serde_bytes")]
        bytes: Vec<u8>,
    },
    /// The device ended the session (after its last `Data`).
    Close {
        /// The session.
        session: u64,
    },
    /// The device holds `credential` but no live grant to send it to `target_host` for `vm_id`:
    /// it asks the user to approve. Never carries the secret. With `on_device` clear the host
    /// shows the request and answers with [`HostToDevice::Approval`]; with it set the request
    /// waits on the device's own approval page and the host only tells the user so (a
    /// notification), creating no approval of its own.
    ApprovalNeeded {
        /// The device's random id for this ask; the approved request must name it.
        #[serde(with = "serde_bytes")]
        request: [u8; 16],
        /// The VM whose agent asked.
        vm_id: String,
        /// The credential's name.
        credential: String,
        /// The authority the call would go to.
        target_host: String,
        /// The request waits on the device's own approval page: the host forwards a notice
        /// only. Absent (false) from devices that predate it.
        #[serde(default)]
        on_device: bool,
    },
    /// What the device tokenized (or in monitor mode, would have) in one part of a proxied
    /// call, for the host's audit log: kinds and counts only.
    Tokenized {
        /// The VM whose agent made the call.
        vm_id: String,
        /// The authority called.
        target_host: String,
        /// Which part.
        part: BodyPart,
        /// Whether values were replaced (enforce) or only counted (monitor).
        enforce: bool,
        /// The counts.
        counts: TokenCounts,
        /// Why the part was left as it was, when it was not scanned (a binary or encoded body).
        unscanned: Option<String>,
    },
    /// The device signed the [`HostToDevice::Checkpoint`] it names (echoed) and kept a copy.
    CheckpointSigned {
        /// As asked.
        log: String,
        /// As asked.
        seq: u64,
        /// As asked.
        #[serde(with = "serde_bytes")]
        head: [u8; 32],
        /// As asked.
        unix_time: u64,
        /// The device's Ed25519 audit public key.
        #[serde(with = "serde_bytes")]
        device_key: [u8; 32],
        /// The Ed25519 signature.
        #[serde(with = "serde_bytes")]
        signature: [u8; 64],
    },
    /// The answer to [`HostToDevice::Moving`] of `vm_id`: `refused` is `None` when the device
    /// will serve the VM on its new host, else why not (that host is not paired, ...).
    MoveNoted {
        /// As asked.
        vm_id: String,
        /// Why the device will not follow the VM, if it will not.
        refused: Option<String>,
    },
    /// The device refused to sign the checkpoint of `seq` (its seq went back, its time is far
    /// from the device's clock, ...).
    CheckpointRefused {
        /// As asked.
        seq: u64,
        /// Why.
        reason: String,
    },
}

/// The longest audit log label a [`HostToDevice::Checkpoint`] carries, in bytes.
pub const MAX_CHECKPOINT_LABEL: usize = 128;

fn check_label(log: &str) -> Result<(), CredentialError> {
    if log.is_empty() || log.len() > MAX_CHECKPOINT_LABEL || log.chars().any(char::is_control) {
        return Err(CredentialError::InvalidField { field: "log" });
    }
    Ok(())
}

impl Validate for HostToDevice {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Open { vm_id, .. } => check_vm_id(vm_id),
            Self::Data { bytes, .. } => check_chunk(bytes, MAX_LINK_DATA),
            Self::Close { .. } => Ok(()),
            Self::Tokenize {
                vm_id,
                spec,
                issued,
            } => {
                check_vm_id(vm_id)?;
                if spec.llm_hosts.len() + spec.restore_hosts.len() > MAX_LLM_HOSTS {
                    return Err(CredentialError::InvalidField { field: "llm_hosts" });
                }
                for host in spec.llm_hosts.iter().chain(&spec.restore_hosts) {
                    check_authority(host)?;
                }
                if issued.len() > MAX_ISSUED_PER_MESSAGE
                    || !issued.iter().all(IssuedToken::is_well_formed)
                {
                    return Err(CredentialError::InvalidField { field: "issued" });
                }
                Ok(())
            }
            Self::Approval { answer, .. } => match answer {
                ApprovalAnswer::Approved {
                    canonical_request, ..
                } => check_chunk(canonical_request, crate::approval::MAX_REQUEST_LEN),
                ApprovalAnswer::Refused { reason } => check_value(reason.as_bytes(), "reason"),
            },
            Self::Checkpoint { log, .. } => check_label(log),
            Self::Moving { vm_id, to_vm, .. } => {
                check_vm_id(vm_id)?;
                check_vm_id(to_vm)
            }
        }
    }
}

impl Validate for DeviceToHost {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Data { bytes, .. } => check_chunk(bytes, MAX_LINK_DATA),
            Self::Ready | Self::Close { .. } => Ok(()),
            Self::ApprovalNeeded {
                vm_id,
                credential,
                target_host,
                ..
            } => {
                check_vm_id(vm_id)?;
                check_name(credential, "credential")?;
                check_authority(target_host)
            }
            Self::Tokenized {
                vm_id,
                target_host,
                unscanned,
                ..
            } => {
                check_vm_id(vm_id)?;
                check_authority(target_host)?;
                match unscanned {
                    Some(why) => check_name(why, "unscanned"),
                    None => Ok(()),
                }
            }
            Self::CheckpointSigned { log, .. } => check_label(log),
            Self::CheckpointRefused { reason, .. } => check_name(reason, "reason"),
            Self::MoveNoted { vm_id, refused } => {
                check_vm_id(vm_id)?;
                match refused {
                    Some(why) => check_name(why, "refused"),
                    None => Ok(()),
                }
            }
        }
    }
}

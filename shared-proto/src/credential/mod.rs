//! The wire of the credential channels: device <-> host link, host <-> sidecar relay, and the
//! proxy messages that travel end to end between the sidecar and the device.
//!
//! # The three layers
//!
//! 1. **Records.** Every Noise message on a byte stream is a *record*: a 2-byte big-endian
//!    length, then that many bytes (at most [`MAX_NOISE_MESSAGE`], the Noise limit).
//!    [`RecordDecoder`] reads them from whatever bytes arrive; [`encode_record`] makes one
//!    (`record`). The handshakes of every channel are built in [`noise`].
//! 2. **The link** (device <-> host, TCP, the device dials out). A first byte says what the
//!    connection is for ([`LINK_MODE_PAIR`] or [`LINK_MODE_LINK`]). Pairing runs
//!    [`NOISE_PAIR`] with [`pairing_psk`] of the short code as PSK and exchanges one
//!    [`PairingOffer`] each way; the link runs [`NOISE_LINK`] with the keys pinned at pairing,
//!    then carries one CBOR [`HostToDevice`] / [`DeviceToHost`] per Noise transport message.
//!    The host multiplexes relay sessions over it by a `session` number.
//! 3. **The relay** (sidecar <-> host, vsock [`crate::ports::CREDENTIAL_PROXY_PORT`]). The host
//!    opens each connection with one shared-proto frame ([`crate::frame`]) holding a
//!    [`RelayGreeting`]; after `Ready`, the connection carries raw records of the end-to-end
//!    [`NOISE_SESSION`] between the sidecar and the device, which the host copies into
//!    `Data` link messages without reading them.
//!
//! Inside the end-to-end session, one Noise transport message holds one CBOR
//! [`SidecarToDevice`] or [`DeviceToSidecar`]. A session carries one exchange: a proxied request
//! (`Request`, `Body`*, `End` one way; `Head`, `Body`*, `End` or `Refused` the other) or one
//! fallback seal (`Seal` one way; `Sealed` or `Refused` back).
//!
//! # Channel binding
//!
//! The session's Noise prologue ([`session_prologue`]) is a label, the VM id and the sidecar's
//! boot id. The device builds it from what the host announced in [`HostToDevice::Open`], the
//! sidecar from its own boot id and the VM id in [`RelayGreeting::Ready`]; if the host lies to
//! either side about the VM, the handshake fails.
//!
//! Every decoder here checks sizes and shapes ([`decode_message`], [`RecordDecoder`]) and never
//! panics; the fuzz targets `credential_decode` and `record_decoder` feed them arbitrary bytes.

use hkdf::Hkdf;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::envelope::Envelope;

pub mod noise;
mod record;

pub use record::{RECORD_PREFIX, RecordDecoder, encode_record};

/// The Noise pattern of the device <-> host link: both static keys are pinned at pairing.
pub const NOISE_LINK: &str = "Noise_KK_25519_ChaChaPoly_BLAKE2s";
/// The Noise pattern of pairing: no static keys yet, the short code as PSK.
pub const NOISE_PAIR: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The Noise pattern of the sidecar <-> device session: the sidecar (initiator) knows the
/// device's static key; the device learns the sidecar's and checks it against the key the host
/// announced from the sidecar's `Hello`.
pub const NOISE_SESSION: &str = "Noise_IK_25519_ChaChaPoly_BLAKE2s";

/// The largest Noise message (the protocol's own limit).
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// The Noise AEAD tag added to every transport message.
pub const NOISE_TAG: usize = 16;
/// The largest body chunk in one proxy message, so that the CBOR message plus the Noise tag fits
/// a Noise message with room to spare.
pub const MAX_CHUNK: usize = 32 * 1024;
/// The largest raw byte run in one link `Data` message.
pub const MAX_LINK_DATA: usize = 48 * 1024;
/// The most header lines one proxied request or response may carry.
pub const MAX_HEADERS: usize = 128;
/// Headers that never cross the proxy in either direction, lower case: hop-by-hop headers,
/// proxy credentials, and those the far side sets itself (`host`, framing). The sidecar drops
/// them from the agent's request and the device from the request and the response.
pub const HOP_BY_HOP_HEADERS: &[&str] = &[
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
];
/// The longest name (credential, service, VM id, header name, host) accepted.
pub const MAX_NAME_LEN: usize = 256;
/// The longest URL, path or header value accepted.
pub const MAX_VALUE_LEN: usize = 8 * 1024;

/// The guest-local TCP port (on `127.0.0.1`) of the sidecar's credential proxy for the agent.
/// It is not a vsock port: the agent reaches it over the guest's loopback.
pub const GUEST_PROXY_PORT: u16 = 8377;

/// The first byte of a link connection that starts pairing.
pub const LINK_MODE_PAIR: u8 = b'P';
/// The first byte of a link connection that starts the pinned link.
pub const LINK_MODE_LINK: u8 = b'L';

/// The Noise prologue of the link.
pub const LINK_PROLOGUE: &[u8] = b"nanoclaw-link-v1";
/// The Noise prologue of pairing.
pub const PAIR_PROLOGUE: &[u8] = b"nanoclaw-pair-v1";
/// The label that opens a session prologue.
const SESSION_LABEL: &[u8] = b"nanoclaw-session-v1";
/// The HKDF info of the pairing PSK.
const PAIRING_INFO: &[u8] = b"nanoclaw pairing psk v1";
/// The alphabet of pairing codes (Crockford base32: no I, L, O, U).
const CODE_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";
/// The number of symbols in a pairing code (50 bits).
pub const PAIRING_CODE_SYMBOLS: usize = 10;

/// Errors of the credential wire.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// A record announces or holds more than [`MAX_NOISE_MESSAGE`] bytes.
    #[error("record of {0} bytes is over the Noise limit")]
    RecordTooLarge(usize),
    /// The bytes are not one CBOR value of the expected message type.
    #[error("malformed message")]
    Malformed(#[source] ciborium::de::Error<std::io::Error>),
    /// A valid message was followed by extra bytes.
    #[error("{0} trailing bytes after the message")]
    TrailingBytes(usize),
    /// Encoding a message failed.
    #[error("cannot encode message")]
    Encode(#[source] ciborium::ser::Error<std::io::Error>),
    /// An encoded message would not fit one Noise transport message.
    #[error("encoded message of {0} bytes does not fit a Noise message")]
    MessageTooLarge(usize),
    /// A field is over its size limit or has a forbidden shape.
    #[error("field {field} is invalid")]
    InvalidField {
        /// Which field.
        field: &'static str,
    },
    /// A pairing code is not [`PAIRING_CODE_SYMBOLS`] symbols of the code alphabet.
    #[error("pairing code is not {PAIRING_CODE_SYMBOLS} base32 symbols")]
    BadPairingCode,
}

/// The Noise prologue of the session of VM `vm_id` whose sidecar drew `boot_id`:
/// `label || u16be(len vm_id) || vm_id || boot_id`.
pub fn session_prologue(vm_id: &str, boot_id: &[u8; 16]) -> Result<Vec<u8>, CredentialError> {
    check_name(vm_id, "vm_id")?;
    let mut out = Vec::with_capacity(SESSION_LABEL.len() + 2 + vm_id.len() + 16);
    out.extend_from_slice(SESSION_LABEL);
    // Fits: MAX_NAME_LEN < u16::MAX.
    out.extend_from_slice(&(vm_id.len() as u16).to_be_bytes());
    out.extend_from_slice(vm_id.as_bytes());
    out.extend_from_slice(boot_id);
    Ok(out)
}

/// Formats 50 random bits as a pairing code `XXXXX-XXXXX`.
pub fn pairing_code(random: [u8; 8]) -> String {
    let bits = u64::from_be_bytes(random);
    let mut code = String::with_capacity(PAIRING_CODE_SYMBOLS + 1);
    for i in 0..PAIRING_CODE_SYMBOLS {
        if i == PAIRING_CODE_SYMBOLS / 2 {
            code.push('-');
        }
        let shift = 5 * (PAIRING_CODE_SYMBOLS - 1 - i);
        let symbol = ((bits >> shift) & 0x1f) as usize;
        code.push(char::from(CODE_ALPHABET[symbol]));
    }
    code
}

/// The canonical form of a typed code: upper case, separators and spaces dropped, and the
/// look-alikes `I`/`L` read as `1` and `O` as `0`.
fn normalize_code(code: &str) -> Result<String, CredentialError> {
    let mut out = String::with_capacity(PAIRING_CODE_SYMBOLS);
    for c in code.chars() {
        let c = match c.to_ascii_uppercase() {
            '-' | ' ' => continue,
            'I' | 'L' => '1',
            'O' => '0',
            c => c,
        };
        if !c.is_ascii() || !CODE_ALPHABET.contains(&(c as u8)) {
            return Err(CredentialError::BadPairingCode);
        }
        out.push(c);
        if out.len() > PAIRING_CODE_SYMBOLS {
            return Err(CredentialError::BadPairingCode);
        }
    }
    if out.len() != PAIRING_CODE_SYMBOLS {
        return Err(CredentialError::BadPairingCode);
    }
    Ok(out)
}

/// The 32-byte Noise PSK derived from a pairing code (HKDF-SHA256 of its canonical form).
///
/// Each connection attempt lets an active attacker test one guess, and a passive one none (the
/// ephemeral DH keys the transcript), so 50 bits with single use and a short validity are
/// enough.
pub fn pairing_psk(code: &str) -> Result<[u8; 32], CredentialError> {
    let canonical = normalize_code(code)?;
    let hk = Hkdf::<Sha256>::new(Some(PAIRING_INFO), canonical.as_bytes());
    let mut psk = [0u8; 32];
    // 32 bytes is far below HKDF-SHA256's output limit.
    hk.expand(b"psk", &mut psk)
        .map_err(|_| CredentialError::BadPairingCode)?;
    Ok(psk)
}

/// What each side sends inside the pairing handshake: its static X25519 public key and a name
/// for the user to recognise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairingOffer {
    /// The sender's static public key, pinned by the other side.
    #[serde(with = "serde_bytes")]
    pub static_public_key: [u8; 32],
    /// A human label ("alice-phone", "host-a").
    pub name: String,
}

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
}

/// The most [`IssuedToken`]s one [`HostToDevice::Tokenize`] carries.
pub const MAX_ISSUED_PER_MESSAGE: usize = 256;
/// The longest surrogate carried.
pub const MAX_SURROGATE_LEN: usize = 160;
/// The most LLM hosts a [`TokenizeSpec`] names.
pub const MAX_LLM_HOSTS: usize = 32;

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
}

impl std::fmt::Debug for TokenizeSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenizeSpec")
            .field("enforce", &self.enforce)
            .field("key", &"<redacted>")
            .field("llm_hosts", &self.llm_hosts)
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

/// The key, in the approval request's arguments, of the device's request id (hex): the
/// approval the user signs names the very ask it answers, so the device can refuse evidence
/// made for any other.
pub const APPROVAL_REQUEST_ARG: &str = "device_request";

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
    /// it asks the user, through the host, to approve. Never carries the secret.
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
}

/// Host -> sidecar: the first frame on a credential proxy connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RelayGreeting {
    /// A device is linked; records of the end-to-end session follow.
    Ready {
        /// The VM id the host gave this VM (bound into the session prologue).
        vm_id: String,
        /// The paired device's static public key (the sidecar's session peer).
        #[serde(with = "serde_bytes")]
        device_public_key: [u8; 32],
    },
    /// No device is linked right now; the host closes the connection.
    Unavailable {
        /// Why, for the agent's error message.
        reason: String,
    },
}

/// What a proxied request is addressed to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ProxyTarget {
    /// Base-URL mode: `http://127.0.0.1:PORT/<service>/<path>`; the device maps the service (a
    /// credential name) to its first allowed host.
    Service {
        /// The credential name.
        name: String,
        /// The path and query after the service, starting with `/`.
        path_and_query: String,
    },
    /// `HTTP_PROXY` mode: the absolute URI the agent asked for; the device calls it over HTTPS.
    Absolute {
        /// The authority (`host` or `host:port`).
        authority: String,
        /// The path and query, starting with `/`.
        path_and_query: String,
    },
}

/// A header line: name and raw value.
pub type HeaderLine = (String, serde_bytes::ByteBuf);

/// The head of a proxied request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProxyRequest {
    /// Where it goes.
    pub target: ProxyTarget,
    /// The HTTP method.
    pub method: String,
    /// The agent's headers, minus hop-by-hop ones.
    pub headers: Vec<HeaderLine>,
}

/// Sidecar -> device, inside the end-to-end session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SidecarToDevice {
    /// A request head; its body follows as `Body` messages and `End`.
    Request(ProxyRequest),
    /// Up to [`MAX_CHUNK`] body bytes.
    Body(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the body.
    End,
    /// The fallback path: seal the credential for a call to `target` (its path is not used).
    Seal {
        /// Which credential and host, as for a request.
        target: ProxyTarget,
    },
}

/// Device -> sidecar, inside the end-to-end session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeviceToSidecar {
    /// The upstream response head; its body follows as `Body` messages and `End`.
    Head {
        /// The HTTP status.
        status: u16,
        /// The response headers, minus hop-by-hop ones.
        headers: Vec<HeaderLine>,
    },
    /// Up to [`MAX_CHUNK`] body bytes, sent as they arrive from upstream.
    Body(#[serde(with = "serde_bytes")] Vec<u8>),
    /// The end of the response body.
    End,
    /// The device refused or could not make the call; nothing was sent upstream with the
    /// credential if `status` is 403.
    Refused {
        /// The HTTP status the sidecar answers the agent with (403 refused, 502 upstream).
        status: u16,
        /// A message for the agent.
        reason: String,
    },
    /// The fallback path: the secret sealed to the sidecar's boot key, and how to inject it.
    Sealed {
        /// The authority (`host` or `host:port`) the secret may be sent to.
        authority: String,
        /// The envelope (request id, VM id, expiry bound in).
        envelope: Envelope,
        /// The header to set.
        header: String,
        /// The value format; `{}` is replaced by the secret.
        format: String,
    },
}

/// Checks the fields of a decoded message against the limits.
pub trait Validate {
    /// `Ok` when every field is within its limits.
    fn validate(&self) -> Result<(), CredentialError>;
}

fn check_name(s: &str, field: &'static str) -> Result<(), CredentialError> {
    if s.is_empty() || s.len() > MAX_NAME_LEN || s.chars().any(|c| c.is_control()) {
        return Err(CredentialError::InvalidField { field });
    }
    Ok(())
}

fn check_value(s: &[u8], field: &'static str) -> Result<(), CredentialError> {
    if s.len() > MAX_VALUE_LEN || s.iter().any(|&b| b == b'\r' || b == b'\n' || b == 0) {
        return Err(CredentialError::InvalidField { field });
    }
    Ok(())
}

fn check_path(s: &str) -> Result<(), CredentialError> {
    check_value(s.as_bytes(), "path_and_query")?;
    if !s.starts_with('/') || s.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(CredentialError::InvalidField {
            field: "path_and_query",
        });
    }
    Ok(())
}

/// An authority is `host` or `host:port` of letters, digits, `-`, `.` and one `:port`.
fn check_authority(s: &str) -> Result<(), CredentialError> {
    let bad = CredentialError::InvalidField { field: "authority" };
    check_name(s, "authority")?;
    let (host, port) = match s.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (s, None),
    };
    if host.is_empty()
        || !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    {
        return Err(bad);
    }
    if let Some(p) = port
        && p.parse::<u16>().is_err()
    {
        return Err(bad);
    }
    Ok(())
}

fn check_headers(headers: &[HeaderLine]) -> Result<(), CredentialError> {
    if headers.len() > MAX_HEADERS {
        return Err(CredentialError::InvalidField { field: "headers" });
    }
    for (name, value) in headers {
        check_name(name, "header name")?;
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
        {
            return Err(CredentialError::InvalidField {
                field: "header name",
            });
        }
        check_value(value, "header value")?;
    }
    Ok(())
}

fn check_chunk(bytes: &[u8], max: usize) -> Result<(), CredentialError> {
    if bytes.len() > max {
        return Err(CredentialError::InvalidField { field: "bytes" });
    }
    Ok(())
}

impl Validate for PairingOffer {
    fn validate(&self) -> Result<(), CredentialError> {
        check_name(&self.name, "name")
    }
}

impl Validate for HostToDevice {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Open { vm_id, .. } => check_name(vm_id, "vm_id"),
            Self::Data { bytes, .. } => check_chunk(bytes, MAX_LINK_DATA),
            Self::Close { .. } => Ok(()),
            Self::Tokenize {
                vm_id,
                spec,
                issued,
            } => {
                check_name(vm_id, "vm_id")?;
                if spec.llm_hosts.len() > MAX_LLM_HOSTS {
                    return Err(CredentialError::InvalidField { field: "llm_hosts" });
                }
                for host in &spec.llm_hosts {
                    check_authority(host)?;
                }
                if issued.len() > MAX_ISSUED_PER_MESSAGE
                    || issued.iter().any(|i| {
                        i.surrogate.is_empty()
                            || i.surrogate.len() > MAX_SURROGATE_LEN
                            || usize::from(i.prefix_len) > i.surrogate.len()
                    })
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
        }
    }
}

impl Validate for DeviceToHost {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Data { bytes, .. } => check_chunk(bytes, MAX_LINK_DATA),
            Self::Close { .. } => Ok(()),
            Self::ApprovalNeeded {
                vm_id,
                credential,
                target_host,
                ..
            } => {
                check_name(vm_id, "vm_id")?;
                check_name(credential, "credential")?;
                check_authority(target_host)
            }
            Self::Tokenized {
                vm_id,
                target_host,
                unscanned,
                ..
            } => {
                check_name(vm_id, "vm_id")?;
                check_authority(target_host)?;
                match unscanned {
                    Some(why) => check_name(why, "unscanned"),
                    None => Ok(()),
                }
            }
        }
    }
}

impl Validate for RelayGreeting {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Ready { vm_id, .. } => check_name(vm_id, "vm_id"),
            Self::Unavailable { reason } => check_value(reason.as_bytes(), "reason"),
        }
    }
}

impl Validate for ProxyTarget {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Service {
                name,
                path_and_query,
            } => {
                check_name(name, "name")?;
                check_path(path_and_query)
            }
            Self::Absolute {
                authority,
                path_and_query,
            } => {
                check_authority(authority)?;
                check_path(path_and_query)
            }
        }
    }
}

impl Validate for SidecarToDevice {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Request(r) => {
                r.target.validate()?;
                if r.method.is_empty()
                    || r.method.len() > 16
                    || !r.method.bytes().all(|b| b.is_ascii_uppercase())
                {
                    return Err(CredentialError::InvalidField { field: "method" });
                }
                check_headers(&r.headers)
            }
            Self::Body(b) => check_chunk(b, MAX_CHUNK),
            Self::End => Ok(()),
            Self::Seal { target } => target.validate(),
        }
    }
}

impl Validate for DeviceToSidecar {
    fn validate(&self) -> Result<(), CredentialError> {
        match self {
            Self::Head { status, headers } => {
                if !(100..=999).contains(status) {
                    return Err(CredentialError::InvalidField { field: "status" });
                }
                check_headers(headers)
            }
            Self::Body(b) => check_chunk(b, MAX_CHUNK),
            Self::End => Ok(()),
            Self::Refused { status, reason } => {
                if !(400..=599).contains(status) {
                    return Err(CredentialError::InvalidField { field: "status" });
                }
                check_value(reason.as_bytes(), "reason")
            }
            Self::Sealed {
                authority,
                header,
                format,
                ..
            } => {
                check_authority(authority)?;
                check_name(header, "header")?;
                check_value(format.as_bytes(), "format")
            }
        }
    }
}

/// Encodes one message as the plaintext of a Noise transport message (CBOR), refusing one that
/// would not fit.
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, CredentialError> {
    let mut out = Vec::new();
    ciborium::into_writer(msg, &mut out).map_err(CredentialError::Encode)?;
    if out.len() + NOISE_TAG > MAX_NOISE_MESSAGE {
        return Err(CredentialError::MessageTooLarge(out.len()));
    }
    Ok(out)
}

/// Decodes and validates one message from the plaintext of a Noise transport message.
pub fn decode_message<T: DeserializeOwned + Validate>(bytes: &[u8]) -> Result<T, CredentialError> {
    // Every message is the plaintext of one Noise message: whatever decodes must also encode.
    if bytes.len() + NOISE_TAG > MAX_NOISE_MESSAGE {
        return Err(CredentialError::RecordTooLarge(bytes.len()));
    }
    let mut rest = bytes;
    let msg: T = ciborium::from_reader(&mut rest).map_err(CredentialError::Malformed)?;
    if !rest.is_empty() {
        return Err(CredentialError::TrailingBytes(rest.len()));
    }
    msg.validate()?;
    Ok(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_bytes::ByteBuf;

    fn request() -> SidecarToDevice {
        SidecarToDevice::Request(ProxyRequest {
            target: ProxyTarget::Absolute {
                authority: "api.example.com:8443".into(),
                path_and_query: "/v1/models?x=1".into(),
            },
            method: "POST".into(),
            headers: vec![("content-type".into(), ByteBuf::from(b"text/plain".to_vec()))],
        })
    }

    fn tokenize_message(issued: usize, len: usize) -> HostToDevice {
        HostToDevice::Tokenize {
            vm_id: "v".repeat(MAX_NAME_LEN),
            spec: TokenizeSpec {
                enforce: true,
                key: [0xff; 32],
                llm_hosts: (0..MAX_LLM_HOSTS)
                    .map(|i| format!("{}{i}:65535", "h".repeat(MAX_NAME_LEN - 9)))
                    .collect(),
            },
            issued: (0..issued)
                .map(|_| IssuedToken {
                    surrogate: "x".repeat(len),
                    kind: TokenKind::ApiKey,
                    prefix_len: u16::try_from(len).unwrap_or(u16::MAX),
                    alphabet: 0xff,
                })
                .collect(),
        }
    }

    #[test]
    fn the_largest_tokenize_message_fits_and_a_larger_one_is_refused() {
        let msg = tokenize_message(MAX_ISSUED_PER_MESSAGE, MAX_SURROGATE_LEN);
        let bytes = encode_message(&msg).unwrap();
        assert!(
            bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE,
            "{}",
            bytes.len()
        );
        assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), msg);
        for bad in [
            tokenize_message(MAX_ISSUED_PER_MESSAGE + 1, 8),
            tokenize_message(1, MAX_SURROGATE_LEN + 1),
            tokenize_message(1, 0),
        ] {
            let bytes = encode_message(&bad).unwrap();
            assert!(matches!(
                decode_message::<HostToDevice>(&bytes),
                Err(CredentialError::InvalidField { field: "issued" })
            ));
        }
        // The key never shows in a debug print.
        let HostToDevice::Tokenize { spec, .. } = msg else {
            unreachable!()
        };
        assert!(!format!("{spec:?}").contains("255"));
    }

    #[test]
    fn messages_round_trip() {
        let msg = request();
        let bytes = encode_message(&msg).unwrap();
        assert_eq!(decode_message::<SidecarToDevice>(&bytes).unwrap(), msg);
        let open = HostToDevice::Open {
            session: 7,
            vm_id: "vm-1".into(),
            boot_id: [3; 16],
            sidecar_public_key: [9; 32],
        };
        let bytes = encode_message(&open).unwrap();
        assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), open);
        let ask = DeviceToHost::ApprovalNeeded {
            request: [4; 16],
            vm_id: "vm-1".into(),
            credential: "openai".into(),
            target_host: "api.openai.com:443".into(),
        };
        let bytes = encode_message(&ask).unwrap();
        assert_eq!(decode_message::<DeviceToHost>(&bytes).unwrap(), ask);
        let answer = HostToDevice::Approval {
            request: [4; 16],
            answer: ApprovalAnswer::Approved {
                canonical_request: vec![1, 2, 3],
                assertion: crate::approval::Assertion {
                    credential_id: vec![5; 16],
                    authenticator_data: vec![6; 37],
                    client_data_json: b"{}".to_vec(),
                    signature: vec![7; 70],
                },
            },
        };
        let bytes = encode_message(&answer).unwrap();
        assert_eq!(decode_message::<HostToDevice>(&bytes).unwrap(), answer);
        let bad = encode_message(&DeviceToHost::ApprovalNeeded {
            request: [4; 16],
            vm_id: "vm-1".into(),
            credential: "openai".into(),
            target_host: "evil.com/x".into(),
        })
        .unwrap();
        assert!(matches!(
            decode_message::<DeviceToHost>(&bad),
            Err(CredentialError::InvalidField { field: "authority" })
        ));
    }

    #[test]
    fn whatever_decodes_encodes_again() {
        let approval = |n: usize| HostToDevice::Approval {
            request: [1; 16],
            answer: ApprovalAnswer::Approved {
                canonical_request: vec![0; n],
                assertion: crate::approval::Assertion {
                    credential_id: vec![],
                    authenticator_data: vec![],
                    client_data_json: vec![],
                    signature: vec![],
                },
            },
        };
        let raw = |msg: &HostToDevice| {
            let mut out = Vec::new();
            ciborium::into_writer(msg, &mut out).unwrap();
            out
        };
        let base = raw(&approval(1000)).len();
        let fits = 1000 + (MAX_NOISE_MESSAGE - NOISE_TAG) - base;
        let bytes = raw(&approval(fits));
        assert_eq!(bytes.len(), MAX_NOISE_MESSAGE - NOISE_TAG);
        let msg = decode_message::<HostToDevice>(&bytes).unwrap();
        assert_eq!(encode_message(&msg).unwrap(), bytes);
        let bytes = raw(&approval(fits + 1));
        assert!(matches!(
            decode_message::<HostToDevice>(&bytes),
            Err(CredentialError::RecordTooLarge(_))
        ));
    }

    #[test]
    fn a_full_chunk_fits_a_noise_message() {
        let bytes = encode_message(&DeviceToSidecar::Body(vec![0xff; MAX_CHUNK])).unwrap();
        assert!(bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE);
        let bytes = encode_message(&HostToDevice::Data {
            session: u64::MAX,
            bytes: vec![0xff; MAX_LINK_DATA],
        })
        .unwrap();
        assert!(bytes.len() + NOISE_TAG <= MAX_NOISE_MESSAGE);
    }

    #[test]
    fn oversize_and_bad_fields_are_refused() {
        let big = encode_message(&DeviceToSidecar::Body(vec![0; MAX_CHUNK + 1])).unwrap();
        assert!(matches!(
            decode_message::<DeviceToSidecar>(&big),
            Err(CredentialError::InvalidField { field: "bytes" })
        ));
        let header_injection = SidecarToDevice::Request(ProxyRequest {
            target: ProxyTarget::Service {
                name: "openai".into(),
                path_and_query: "/v1".into(),
            },
            method: "GET".into(),
            headers: vec![("x".into(), ByteBuf::from(b"a\r\nHost: evil".to_vec()))],
        });
        let bytes = encode_message(&header_injection).unwrap();
        assert!(decode_message::<SidecarToDevice>(&bytes).is_err());
        for authority in ["", "a b", "host:99999", "host:", "h/x", "user@host"] {
            let seal = SidecarToDevice::Seal {
                target: ProxyTarget::Absolute {
                    authority: authority.into(),
                    path_and_query: "/".into(),
                },
            };
            let bytes = encode_message(&seal).unwrap();
            assert!(
                decode_message::<SidecarToDevice>(&bytes).is_err(),
                "{authority:?} accepted"
            );
        }
        let relative = SidecarToDevice::Request(ProxyRequest {
            target: ProxyTarget::Service {
                name: "openai".into(),
                path_and_query: "v1".into(),
            },
            method: "GET".into(),
            headers: vec![],
        });
        assert!(decode_message::<SidecarToDevice>(&encode_message(&relative).unwrap()).is_err());
    }

    #[test]
    fn trailing_and_garbage_are_refused() {
        let mut bytes = encode_message(&SidecarToDevice::End).unwrap();
        bytes.push(0);
        assert!(matches!(
            decode_message::<SidecarToDevice>(&bytes),
            Err(CredentialError::TrailingBytes(1))
        ));
        assert!(matches!(
            decode_message::<SidecarToDevice>(&[0xff, 0x00]),
            Err(CredentialError::Malformed(_))
        ));
    }

    #[test]
    fn pairing_codes_normalize_and_derive_the_same_psk() {
        let code = pairing_code([0xde, 0xad, 0xbe, 0xef, 1, 2, 3, 4]);
        assert_eq!(code.len(), PAIRING_CODE_SYMBOLS + 1);
        let typed = code.to_lowercase().replace('-', " ");
        assert_eq!(pairing_psk(&code).unwrap(), pairing_psk(&typed).unwrap());
        assert_ne!(
            pairing_psk(&code).unwrap(),
            pairing_psk(&pairing_code([0; 8])).unwrap()
        );
        for bad in ["", "12345", "12345-123456", "UUUUU-UUUUU", "12345-1234é"] {
            assert!(pairing_psk(bad).is_err(), "{bad:?} accepted");
        }
        // Look-alikes read as digits.
        assert_eq!(
            pairing_psk("0000000001").unwrap(),
            pairing_psk("OOOOO-OOOOI").unwrap()
        );
    }

    #[test]
    fn prologue_binds_vm_and_boot() {
        let a = session_prologue("vm-1", &[1; 16]).unwrap();
        assert_ne!(a, session_prologue("vm-2", &[1; 16]).unwrap());
        assert_ne!(a, session_prologue("vm-1", &[2; 16]).unwrap());
        assert!(session_prologue("", &[1; 16]).is_err());
    }
}

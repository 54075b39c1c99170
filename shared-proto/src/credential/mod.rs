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
//! [`SidecarToDevice`] or [`DeviceToSidecar`]. A session carries a sequence of exchanges, one
//! at a time (at most [`MAX_SESSION_EXCHANGES`]): each a proxied request (`Request`, `Body`*,
//! `End` one way; `Head`, `Body`*, `End` or `Refused` the other) or one fallback seal (`Seal`
//! one way; `Sealed` or `Refused` back). An exchange that cannot end in step (an answer cut
//! mid-body, a request refused before its `End`) ends the session; closing the session
//! between exchanges is its normal end.
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
//!
//! # Layout
//!
//! - `mod.rs`: this overview, the Noise patterns, prologues and limits, [`CredentialError`],
//!   [`session_prologue`], the [`Validate`] trait and [`encode_message`] / [`decode_message`].
//! - `record.rs`: records on a byte stream ([`RecordDecoder`], [`encode_record`]).
//! - `noise.rs`: the handshakes and transport of every channel ([`noise`]).
//! - `data.rs`: the bulk messages (`Body`, link `Data`) encoded and read without a general CBOR
//!   pass, byte for byte as [`encode_message`] writes them ([`data`]).
//! - `pairing.rs`: pairing codes ([`pairing_code`], [`pairing_psk`]) and [`PairingOffer`].
//! - `link.rs`: the link messages ([`HostToDevice`], [`DeviceToHost`]), the tokenizer
//!   hand-off ([`TokenizeSpec`], [`IssuedToken`]), tokenization reports and approval answers.
//! - `proxy.rs`: [`RelayGreeting`] and the end-to-end proxy messages ([`SidecarToDevice`],
//!   [`DeviceToSidecar`]).
//! - `checks.rs`: the field checks the [`Validate`] impls share.
//! - `tests.rs`: the unit tests.

use serde::Serialize;
use serde::de::DeserializeOwned;

mod checks;
pub mod data;
mod link;
pub mod noise;
mod pairing;
mod proxy;
mod record;
#[cfg(test)]
mod tests;

pub use link::{
    ApprovalAnswer, BodyPart, DeviceToHost, HostToDevice, IssuedToken, MAX_CHECKPOINT_LABEL,
    TokenCounts, TokenKind, TokenizeSpec,
};
pub use pairing::{PairingOffer, pairing_code, pairing_psk};
pub use proxy::{
    DeviceToSidecar, HeaderLine, ProxyRequest, ProxyTarget, RelayGreeting, SidecarToDevice,
};
pub use record::{RECORD_PREFIX, RecordDecoder, encode_record};

use checks::check_name;

/// The Noise pattern of the device <-> host link: both static keys are pinned at pairing.
///
/// The link and the session (which travels inside the link, so every proxied byte is sealed
/// twice) use AES-256-GCM: with the AES instructions of current x86 and ARM processors it
/// costs about a third of ChaCha20-Poly1305 per byte, which on the credential path's bulk
/// downloads is most of the difference (measured with `cargo bench -p nanoclaw-tests --bench
/// proxy`). Where a processor lacks them, `ring` falls back to a constant-time implementation:
/// slower, not weaker. Pairing, a handful of small messages, keeps ChaCha20-Poly1305.
pub const NOISE_LINK: &str = "Noise_KK_25519_AESGCM_BLAKE2s";
/// The Noise pattern of pairing: no static keys yet, the short code as PSK.
pub const NOISE_PAIR: &str = "Noise_NNpsk0_25519_ChaChaPoly_BLAKE2s";
/// The Noise pattern of the sidecar <-> device session: the sidecar (initiator) knows the
/// device's static key; the device learns the sidecar's and checks it against the key the host
/// announced from the sidecar's `Hello`.
pub const NOISE_SESSION: &str = "Noise_IK_25519_AESGCM_BLAKE2s";

/// The largest Noise message (the protocol's own limit).
pub const MAX_NOISE_MESSAGE: usize = 65535;
/// The Noise AEAD tag added to every transport message.
pub const NOISE_TAG: usize = 16;
/// The largest body chunk in one proxy message: 63 KiB, so that the CBOR message plus the
/// Noise tag fits a Noise message with room to spare, and its record (prefix included) fits one
/// link `Data` message ([`MAX_LINK_DATA`]). Records this large keep the per-record costs (a
/// seal, an open, a CBOR header, a link message) small against the bytes they carry.
pub const MAX_CHUNK: usize = 63 * 1024;
/// The largest raw byte run in one link `Data` message (with its CBOR envelope and the link's
/// Noise tag it still fits one Noise message); a full proxy record travels in one.
pub const MAX_LINK_DATA: usize = 0xff00;
/// The most exchanges (request and answer) one end-to-end session carries before the sidecar
/// retires it and opens a fresh one (a new handshake, new keys). With at most
/// [`MAX_NOISE_MESSAGE`]-sized messages and a 16 MiB body bound this keeps a session's message
/// count, and so its nonces, far below any limit; the device refuses to go past it.
pub const MAX_SESSION_EXCHANGES: u64 = 10_000;
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

/// The most [`IssuedToken`]s one [`HostToDevice::Tokenize`] carries.
pub const MAX_ISSUED_PER_MESSAGE: usize = 256;
/// The longest surrogate carried.
pub const MAX_SURROGATE_LEN: usize = 160;
/// The most hosts a [`TokenizeSpec`] names, `llm_hosts` and `restore_hosts` together.
pub const MAX_LLM_HOSTS: usize = 32;

/// The key, in the approval request's arguments, of the device's request id (hex): the
/// approval the user signs names the very ask it answers, so the device can refuse evidence
/// made for any other.
pub const APPROVAL_REQUEST_ARG: &str = "device_request";

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

/// Checks the fields of a decoded message against the limits.
pub trait Validate {
    /// `Ok` when every field is within its limits.
    fn validate(&self) -> Result<(), CredentialError>;
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

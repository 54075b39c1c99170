//! The wire between `vpod-sidecar` (guest), `host-agent` (host) and `vault-device` (the user's
//! device).
//!
//! This crate does no I/O: no sockets, no clock, and no files except in [`fs`] (the durable
//! file replacement every process needs, kept apart from the wire; its module doc says why it
//! lives here). Callers feed it bytes and the current time and get typed values or typed errors
//! back. Every decoder here treats its input as hostile (the guest is untrusted) and never
//! panics; `fuzz/` holds the fuzz targets.
//!
//! # Layout
//!
//! - [`ports`]: the vsock CIDs and port numbers, one constant per channel. No port number is
//!   written anywhere else in the workspace.
//! - [`frame`]: length-prefixed CBOR framing (4-byte big-endian length, then a CBOR body), the
//!   size cap, and the incremental [`frame::FrameDecoder`].
//! - [`message`]: one message enum per direction, [`message::HostToGuest`] and
//!   [`message::GuestToHost`], and the types they carry.
//! - [`handshake`]: [`handshake::PROTOCOL_VERSION`], the host's check of a `Hello` and the
//!   guest's check of the answer.
//! - [`envelope`]: the ECDH secret-delivery envelope (X25519, HKDF-SHA256, ChaCha20-Poly1305)
//!   that the device seals and the sidecar opens.
//! - [`approval`]: the canonical approval request (its SHA-256 is the WebAuthn challenge) and
//!   the passkey registration and assertion verifier, shared by host-agent and vault-device.
//! - [`canonical_json`]: JSON text with sorted keys, the one rendering of a value that is signed
//!   (approval arguments) or digested (the MCP gateway's audit records).
//! - [`credential`]: the credential channels: Noise records and their incremental
//!   [`credential::RecordDecoder`], the handshake builders of every end ([`credential::noise`]),
//!   the device <-> host link messages, the relay greeting, and the proxy messages inside the
//!   sidecar <-> device session.
//! - [`ErrorChain`]: an error and its `source()` chain on one line, the one printer every
//!   process uses at its edge.
//! - [`files`]: the file copy channel: tar streams in and out of the agent's root, one message
//!   enum per direction ([`files::FilesRequest`], [`files::FilesReply`]) and their checked
//!   decoder.
//! - [`fs`]: the durable replacement of a small file (temporary file, fsync, rename, fsync of
//!   the folder) for the state files of the daemon and the device.
//! - [`ratelimit`]: the budget for log lines a guest (or an agent's requests) can trigger, used by
//!   the daemon and the device alike.

pub mod approval;
mod canonical_json;
pub mod credential;
pub mod envelope;
mod error_chain;
pub mod files;
pub mod frame;
pub mod fs;
pub mod handshake;
pub mod message;
pub mod ports;
pub mod ratelimit;

pub use canonical_json::canonical_json;
pub use error_chain::{ErrorChain, error_chain};
pub use frame::{FrameDecoder, FrameError, MAX_FRAME_LEN, encode_frame};
pub use handshake::{HandshakeError, PROTOCOL_VERSION};
pub use message::{GuestToHost, HostToGuest};

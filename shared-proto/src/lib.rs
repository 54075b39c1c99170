//! The wire between `vpod-sidecar` (guest), `host-agent` (host) and `vault-device` (the user's
//! device).
//!
//! This crate will hold the length-prefixed CBOR framing, one message enum per direction, the
//! version handshake, the vsock port constants and the crypto envelope types. It does no I/O.

//! `vault-device`: the user's device.
//!
//! This crate will hold the sealed secret vault, the device identity key, pairing with a host,
//! the primary credential path (the device performs the authenticated API call) and the fallback
//! path (sealing a secret to a sidecar's ephemeral X25519 key), and the check of grants and
//! passkey approvals before any credential is released. Credentials never leave this crate's
//! process.

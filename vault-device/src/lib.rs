//! `vault-device`: the user's device.
//!
//! It holds the sealed secret vault and the device identity key, pairs with one or more hosts,
//! keeps an outbound link to each, follows VMs that live-migrate between them, and answers the sidecars' end-to-end sessions: it makes the
//! authenticated HTTPS call itself (the primary path) or seals the secret to the sidecar's boot
//! key (the fallback path), in both cases only under a live grant. Credentials never leave this
//! crate's process except inside the upstream TLS connection or a sealed envelope.
//!
//! # Layout
//!
//! - [`vault`]: the vault file (Argon2id + ChaCha20-Poly1305, 0600, atomic writes, a `.prev`
//!   generation), credential entries and the identity key.
//! - [`approval`]: device-side approvals: the passkey file, the check of the evidence before
//!   any grant, the grant log, and why the device shows requests itself.
//! - [`approval_page`]: the device's own approval page (loopback only): passkey registration
//!   and the approval of the device's pending credential asks, on the device's own origin.
//! - [`grant`]: grants (credential x target authority x paired host x VM x expiry), the rules
//!   of issuing one and the release check.
//! - [`moves`]: VMs that live-migrate between paired hosts: the source's notices, the origin a
//!   session resolves to, and the source's copy refused once the VM arrived.
//! - [`noise`]: the device's Noise layer: records on its async streams, read with the shared
//!   decoder, and the shared builders of its handshakes (`shared_proto::credential`).
//! - [`device`]: the running device: pairing, the outbound link to each paired host and its
//!   session multiplexing, the HTTPS client.
//! - [`session`]: one end-to-end session with a sidecar: the IK responder, the proxied call or
//!   the sealed secret. It reaches the device only through [`session::SessionContext`], which
//!   [`device::Device`] implements.
//! - [`checkpoint`]: audit checkpoints: the device's audit signing key, the checks before it
//!   signs the host's chain head, and its own log of what it signed.
//! - [`tokenize`]: tokenization of the credential path (which only the device sees in clear),
//!   with the agent key and the surrogates the host hands over.

pub mod approval;
pub mod approval_page;
pub mod checkpoint;
pub mod device;
pub mod grant;
pub mod moves;
pub mod noise;
pub mod session;
pub mod tokenize;
pub mod vault;

pub use shared_proto::ErrorChain;

//! `host-agent`: the Nanoclaw host.
//!
//! The host is trusted with isolation and policy, never with a raw credential. It treats every
//! byte from a guest as hostile and re-checks every decision the sidecar makes.
//!
//! Beside it, each in its own crate under `host-agent/`: `nanoclaw-vmm` (`vmm/`, one process per
//! microVM), `nanoclaw-api` (`api/`, the HTTP/JSON API types and default paths),
//! `nanoclaw-audit` (`audit/`, the hash-chained audit log and its verifier) and `nanoclaw-cli`
//! (`cli/`, the `nanoclaw` client).
//!
//! # Layout
//! - [`daemon`]: `host-agent serve`, the daemon that starts one VMM process (`nanoclaw-vmm`,
//!   its own crate under `host-agent/vmm/`) per agent, relays its
//!   control channel, keeps per-VM state on disk across restarts and serves the API.
//! - [`approval`]: sensitive actions wait for the user's passkey: the subject of an approval
//!   and the [`approval::Approver`] the MCP gateway and the credential relay ask.
//! - [`notify`]: notifications of pending approvals (Web Push, webhook): an id and a
//!   summary, never secrets.
//! - [`agent_tokens`]: one agent's tokenizer, shared by the MCP gateway and the credential
//!   relay.
//! - [`mcp`]: the MCP gateway: rmcp clients of the upstream servers a profile names, and the
//!   per-VM endpoint that checks every tool call against the profile, asks for approvals,
//!   tokenizes results, restores arguments and records each decision in the audit log.
//! - [`policy`]: access profiles (TOML the user writes) compiled to Cedar and decided by
//!   `cedar-policy`: visible tools, argument constraints, approval rules, tiers, and the
//!   comparison that keeps a spawned agent within its orchestrator's rights.
//! - [`egress`]: one VM's egress enforcers: the allowlist rules, the resolver that hands out
//!   only allowed names' addresses, and the TLS SNI check on its port-443 connections.
//! - [`metrics`]: `GET /metrics`, the daemon's figures in the Prometheus text format.
//! - [`migration`]: live migration between hosts: so far the authenticated link between two
//!   daemons and the relay of a VMM's migration stream over it.
//! - [`remote`]: the remote API: the same routes over TLS, behind scoped bearer tokens.
//! - [`relay`]: the credential relay: pairing with the user's device, the device's outbound
//!   Noise link, and the per-VM `vsock.sock_<CREDENTIAL_PROXY_PORT>` listeners whose sidecar
//!   sessions it carries to the device as ciphertext.

pub mod agent_tokens;
pub mod approval;
pub mod daemon;
pub mod egress;
pub mod mcp;
pub mod metrics;
pub mod migration;
pub mod net;
pub mod notify;
pub mod policy;
pub mod relay;
pub mod remote;

/// An error and its whole `source()` chain on one line, `outer: cause: root cause`: how the
/// binaries print errors and how the daemon logs them.
pub use shared_proto::error_chain;

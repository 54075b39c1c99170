//! The component tier: tests that span crates, with real peers on loopback and Unix sockets and
//! no KVM. One test binary; each module was one test file of the crate it mostly exercises.
//!
//! Run them with `cargo test -p nanoclaw-tests --test component`. The tests of the daemon and
//! the CLI need the `host-agent` and `nanoclaw` binaries built (`cargo build -p host-agent -p
//! nanoclaw-cli`; `nanoclaw_tests::built_bin` says so when one is missing), the MCP tests the
//! Python venv of `scripts/setup --test`, the browser test Chromium.
//!
//! The tests that also play the daemon and a fake VMM in their own executable are the separate
//! binaries `daemon` and `credentials` (`self_exec/`).
//!
//! - Approvals: [`approval_audit_cli`] (`nanoclaw audit` on a real audit file),
//!   [`approval_browser`] (Chromium approves on the passkey pages), [`approval_daemon`] (the
//!   daemon serves the pages), [`credential_approval`] (the daemon routes the device's asks to
//!   its approver), [`approval_path`] (releases approved with a passkey, re-checked by the
//!   device), [`device_page`] (the device's own approval page: registration and approvals on
//!   the device's origin, over its API and in Chromium).
//! - The credential path: [`primary_path`], [`proxy_keepalive`] (persistent agent connections,
//!   reused sessions, chunked bodies, a broken relay), [`fallback_path`], [`tokenize_path`].
//! - Audit checkpoints: [`audit_checkpoints`] (the device signs, both verifiers check).
//! - The VMM's jail: [`jail`] (entered for real, as root, without booting).
//! - A VM's network: [`vm_network`] (its namespace, links and firewall made for real, as root,
//!   in a network namespace of the test's own).
//! - MCP: [`mcp_gateway`] (the gateway with the Python SDK as upstream and agent),
//!   [`mcp_sidecar`] (the sidecar's endpoint and shim against the gateway).

mod approval_audit_cli;
mod approval_browser;
mod approval_daemon;
mod approval_path;
mod audit_checkpoints;
mod credential_approval;
mod device_follows;
mod device_page;
mod fallback_path;
mod jail;
mod mcp_gateway;
mod mcp_sidecar;
mod primary_path;
mod proxy_keepalive;
mod tokenize_path;
mod vm_network;

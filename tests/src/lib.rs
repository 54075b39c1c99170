//! The test fixtures of every integration test that spans crates: the component tests
//! (`tests/component/`, real peers on loopback and Unix sockets, no KVM), the end-to-end tier
//! (`tests/e2e/`, real microVMs through the nested runner) and the tests of our tooling
//! (`tests/tooling/`).
//!
//! Configuration comes from the environment that `scripts/e2e` sets: `NANOCLAW_GUEST_MANIFEST`
//! (written by `guest-image/build`) and `NANOCLAW_HOST_AGENT` (the binary under test). Outside
//! the e2e tier, binaries of other packages are the ones cargo built ([`built_bin`]).
//!
//! # Layout
//!
//! - [`workspace`]: the workspace root, the binaries under test ([`built_bin`]) and the `nanoclaw`
//!   CLI as a command.
//! - [`process`]: the bounded command runner ([`OutputWithin`]), [`free_port`], [`wait_for`],
//!   processes by command line.
//! - [`daemon`]: the daemon harness ([`Daemon`], [`DaemonOptions`]): the `host-agent` binary
//!   with real guests or none, or the test executable itself with a fake VMM.
//! - [`api`]: the daemon's HTTP API on its Unix socket by hand, streamed answers read line by
//!   line.
//! - [`self_exec`]: test executables without libtest's harness that re-execute themselves as
//!   the daemon, a fake VMM or another process of the test.
//! - [`fake_vmm`]: the fake VMM and sidecar's control connection and exit report.
//! - [`vm`]: one real microVM booted by our VMM ([`TestVm`]), and the guest image.
//! - [`credential`]: the credential path on loopback (vault, paired device, relay, the
//!   sidecar's proxy); [`upstream`]: the HTTPS server that demands the credential, and its CA;
//!   [`http`]: HTTP/1.1 by hand, as an agent speaks to the proxy.
//! - [`authenticator`]: a software WebAuthn authenticator (an ES256 passkey).
//! - [`browser`]: headless Chromium over the DevTools Protocol, with a virtual authenticator.
//! - [`peers`]: the Python MCP peers (`tests/peers/`) and the Python that runs them;
//!   [`profiles`]: access profiles over the Python upstream.
//! - [`dns`]: a small DNS upstream and raw queries, for the egress resolver's tests.
//! - [`netns`]: a client's own network namespace, linked to the host's by a veth pair.
//! - [`oci`]: small OCI image layouts built by the test (layers, whiteouts, a process config).
//! - [`sdk`]: the Python SDK's test suite (`sdk/python/tests`), run against a daemon's remote
//!   API.

pub mod api;
pub mod authenticator;
pub mod browser;
pub mod credential;
pub mod daemon;
pub mod dns;
pub mod fake_vmm;
pub mod http;
pub mod migration;
pub mod netns;
pub mod oci;
pub mod peers;
pub mod process;
pub mod profiles;
pub mod sdk;
pub mod self_exec;
pub mod upstream;
pub mod vm;
pub mod workspace;

pub use daemon::{Daemon, DaemonOptions};
pub use process::{
    CLI_TIMEOUT, OutputWithin, RUN_TIMEOUT, free_port, processes_mentioning, text, wait_for,
};
pub use vm::{
    Control, GuestImage, Kernel, Migration, TestVm, VmExit, VmSpec, echo_round_trip, pattern,
};
pub use workspace::{
    built_bin, host_agent_bin, nanoclaw, nanoclaw_at, nanoclaw_bin, vault_device_bin, vmm_bin,
    workspace_root,
};

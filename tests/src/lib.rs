//! The test fixtures of the integration tests that span crates: the end-to-end tier (`tests/e2e/`,
//! real microVMs through the nested runner) and the tests of our tooling (`tests/tooling/`).
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
//! - [`daemon`]: the daemon harness ([`Daemon`]).
//! - [`vm`]: one real microVM booted by our VMM ([`TestVm`]), and the guest image.
//! - [`browser`]: headless Chromium over the DevTools Protocol, with a virtual authenticator.

pub mod browser;
pub mod daemon;
pub mod process;
pub mod vm;
pub mod workspace;

pub use daemon::Daemon;
pub use process::{
    CLI_TIMEOUT, OutputWithin, RUN_TIMEOUT, free_port, processes_mentioning, text, wait_for,
};
pub use vm::{Control, GuestImage, Kernel, TestVm, VmExit, VmSpec, echo_round_trip, pattern};
pub use workspace::{
    built_bin, host_agent_bin, nanoclaw, nanoclaw_at, nanoclaw_bin, vault_device_bin, vmm_bin,
    workspace_root,
};

//! Where things are: the workspace root and the binaries under test.
//!
//! A test of another package's binary finds it in the profile folder beside the running test
//! executable ([`built_bin`]). Cargo builds a package's binaries only for that package's own
//! tests, so `cargo test` does not build them for ours: build them first (`cargo build
//! --workspace --bins`, or the package the failure message names). The e2e tier names the
//! `host-agent` under test with `NANOCLAW_HOST_AGENT` and takes its siblings from beside it.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// The workspace root (the parent of this crate).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A workspace binary that cargo built into the same profile folder as the running test
/// executable (`<target>/<profile>/deps/TEST` beside `<target>/<profile>/NAME`).
///
/// # Panics
///
/// If it is not there, with the `cargo build` command that makes it.
pub fn built_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test executable's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("a test executable lives in <target>/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.is_file(),
        "{name} is not built ({} does not exist): run `cargo build -p {}` first \
         (cargo test builds only the binaries of the packages whose own tests it runs)",
        path.display(),
        package_of(name)
    );
    path
}

/// The package whose binary `name` is.
fn package_of(name: &str) -> &str {
    match name {
        "nanoclaw" => "nanoclaw-cli",
        "garbage-guest" => "nanoclaw-tests",
        // host-agent, nanoclaw-vmm and vault-device are named after their packages.
        other => other,
    }
}

/// The `host-agent` binary under test: `NANOCLAW_HOST_AGENT`, or the one cargo built.
pub fn host_agent_bin() -> PathBuf {
    std::env::var_os("NANOCLAW_HOST_AGENT")
        .map(PathBuf::from)
        .unwrap_or_else(|| built_bin("host-agent"))
}

/// Binary `name` beside `NANOCLAW_HOST_AGENT` if that is set, else the one cargo built.
fn sibling_bin(name: &str) -> PathBuf {
    match std::env::var_os("NANOCLAW_HOST_AGENT") {
        Some(host_agent) => PathBuf::from(host_agent).with_file_name(name),
        None => built_bin(name),
    }
}

/// The `nanoclaw-vmm` binary beside the `host-agent` binary under test.
pub fn vmm_bin() -> PathBuf {
    sibling_bin("nanoclaw-vmm")
}

/// The `nanoclaw` CLI beside the `host-agent` binary under test.
pub fn nanoclaw_bin() -> PathBuf {
    sibling_bin("nanoclaw")
}

/// The `vault-device` binary beside the `host-agent` binary under test.
pub fn vault_device_bin() -> PathBuf {
    sibling_bin("vault-device")
}

/// `nanoclaw ARGS`, with stdin from /dev/null.
pub fn nanoclaw(args: &[&str]) -> Command {
    let mut cmd = Command::new(nanoclaw_bin());
    cmd.args(args).stdin(Stdio::null());
    cmd
}

/// `nanoclaw --socket SOCKET ARGS`, with stdin from /dev/null: a call to the daemon at `socket`.
pub fn nanoclaw_at(socket: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(nanoclaw_bin());
    cmd.arg("--socket")
        .arg(socket)
        .args(args)
        .stdin(Stdio::null());
    cmd
}

//! Two daemons that live-migrate VMs between them on loopback: each one's migration key made
//! first (`host-agent migration-key`), then both started with `--migration-listen` and
//! `--migration-peer` pinning the other's key. The target has a jail uid range and a cgroup
//! parent of its own, so that two jailed daemons on one machine never share a uid.

use std::path::Path;

use anyhow::{Context, Result, ensure};

use crate::process::{CLI_TIMEOUT, OutputWithin};
use crate::workspace::host_agent_bin;
use crate::{Daemon, DaemonOptions};

/// A key pinned on a target that must not know the source: any 32 bytes will do.
pub const OTHER_KEY: &str = "1111111111111111111111111111111111111111111111111111111111111111";

/// The first jail uid of the target daemon: far from the default range the source uses.
const TARGET_JAIL_UID_BASE: &str = "1100000000";

/// A source and a target daemon, each listening for migrations on its own loopback port.
#[derive(Debug)]
pub struct PinnedHosts {
    /// The daemon VMs move from.
    pub source: Daemon,
    /// The daemon VMs move to.
    pub target: Daemon,
    /// The target's migration address, as the source pins and dials it.
    pub target_addr: String,
    /// The source's migration address.
    pub source_addr: String,
    /// The source's migration key, hex.
    pub source_key: String,
}

impl PinnedHosts {
    /// Starts a source and a target of `options` (called once for each). The source pins the
    /// target's key at its address; the target pins the source's key, or, unless
    /// `target_pins_source`, [`OTHER_KEY`].
    pub fn start(options: impl Fn() -> DaemonOptions, target_pins_source: bool) -> Result<Self> {
        let (source_addr, target_addr) = two_loopback_addresses()?;
        Self::start_at(
            (options(), source_addr),
            (options(), target_addr),
            target_pins_source,
        )
    }

    /// [`start`](Self::start) with each daemon's options and migration address (`ADDR:PORT`,
    /// which it listens on and the other dials).
    pub fn start_at(
        (source, source_addr): (DaemonOptions, String),
        (target, target_addr): (DaemonOptions, String),
        target_pins_source: bool,
    ) -> Result<Self> {
        let mut source = source.prepare().context("prepare the source daemon")?;
        let mut target = target.prepare().context("prepare the target daemon")?;
        let source_key = migration_key(&source.state_dir())?;
        let target_key = migration_key(&target.state_dir())?;
        source.add_args([
            "--migration-listen".to_owned(),
            source_addr.clone(),
            "--migration-peer".to_owned(),
            format!("{target_addr}={target_key}"),
        ]);
        let pinned = if target_pins_source {
            format!("{source_addr}={source_key}")
        } else {
            format!("127.0.0.1:9={OTHER_KEY}")
        };
        target.add_args([
            "--migration-listen".to_owned(),
            target_addr.clone(),
            "--migration-peer".to_owned(),
            pinned,
            "--jail-uid-base".to_owned(),
            TARGET_JAIL_UID_BASE.to_owned(),
            "--cgroup-parent".to_owned(),
            "nanoclaw-target".to_owned(),
        ]);
        source.spawn().context("start the source daemon")?;
        target.spawn().context("start the target daemon")?;
        Ok(Self {
            source,
            target,
            target_addr,
            source_addr,
            source_key,
        })
    }

    /// Both daemons' VMs and logs, for a failure.
    pub fn records(&self) -> String {
        format!(
            "SOURCE:\n{}\nTARGET:\n{}",
            self.source.records(),
            self.target.records()
        )
    }
}

/// `host-agent migration-key --state-dir DIR`: the daemon's migration key, 64 hex digits (made
/// at first use in `DIR/migration/host.key`).
pub fn migration_key(state_dir: &Path) -> Result<String> {
    let out = std::process::Command::new(host_agent_bin())
        .arg("migration-key")
        .arg("--state-dir")
        .arg(state_dir)
        .output_within(CLI_TIMEOUT)
        .context("run host-agent migration-key")?;
    let key = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "host-agent migration-key: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        key.len() == 65
            && key.ends_with('\n')
            && key[..64]
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)),
        "host-agent migration-key printed {key:?}"
    );
    Ok(key.trim_end().to_owned())
}

/// Two distinct free ports on 127.0.0.1 (both bound at once, then released), as addresses.
fn two_loopback_addresses() -> Result<(String, String)> {
    let a = std::net::TcpListener::bind("127.0.0.1:0")?;
    let b = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok((a.local_addr()?.to_string(), b.local_addr()?.to_string()))
}

//! The daemon harness: a `host-agent serve` with its own directory (state, API socket, log).
//! Dropping a [`Daemon`] kills it and every VMM it started (they run in their own sessions, so
//! they would outlive it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::process::{CLI_TIMEOUT, OutputWithin, processes_mentioning};
use crate::workspace::{host_agent_bin, nanoclaw_bin};

/// A `host-agent serve` daemon with its own state directory and API socket. Dropping it kills the
/// daemon and every VMM it started (they run in their own sessions, so they would outlive it).
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    kernel: PathBuf,
    initrd: PathBuf,
    extra_args: Vec<String>,
}

impl Daemon {
    /// Starts a daemon that boots `kernel` with `initrd`, and waits until it answers.
    pub fn start(kernel: &Path, initrd: &Path) -> Result<Self> {
        Self::start_with(kernel, initrd, &[])
    }

    /// Like [`Daemon::start`], with `extra_args` appended to `host-agent serve`'s (e.g.
    /// `--approvals-listen 127.0.0.1:PORT`).
    pub fn start_with(kernel: &Path, initrd: &Path, extra_args: &[&str]) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("ncd-").tempdir()?;
        let mut daemon = Self {
            child: None,
            dir,
            kernel: kernel.to_owned(),
            initrd: initrd.to_owned(),
            extra_args: extra_args.iter().map(|&a| a.to_owned()).collect(),
        };
        daemon.spawn()?;
        Ok(daemon)
    }

    /// The daemon's state directory (holds `audit.ndjson`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// What a failure shows: the daemon's log, then each VM's console and VMM log.
    pub fn records(&self) -> String {
        let mut out = format!("daemon log:\n{}", self.log());
        let mut dirs: Vec<_> = std::fs::read_dir(self.state_dir().join("vms"))
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.path())
            .collect();
        dirs.sort();
        for dir in dirs {
            for file in ["console.log", "vmm.log"] {
                let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
                out += &format!("\n{} {file}:\n{text}", dir.display());
            }
        }
        out
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// The daemon's log (stderr of every daemon process started here, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// Starts (or restarts) the daemon process and waits until `nanoclaw ps` succeeds.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let child = Command::new(host_agent_bin())
            .arg("serve")
            .arg("--state-dir")
            .arg(self.dir.path().join("state"))
            .arg("--socket")
            .arg(self.socket())
            .arg("--kernel")
            .arg(&self.kernel)
            .arg("--initrd")
            .arg(&self.initrd)
            .args(["--stop-grace-secs", "5"])
            .args(&self.extra_args)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawn host-agent serve")?;
        self.child = Some(child);
        // Generous: inside L1 (software emulation) the debug daemon and CLI binaries are read
        // over 9p before they run, which takes tens of seconds on a loaded machine.
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            if self
                .nanoclaw(&["ps"])
                .output_within(CLI_TIMEOUT)?
                .status
                .success()
            {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!("daemon exited ({status}); log:\n{}", self.log());
            }
            ensure!(
                Instant::now() < deadline,
                "daemon not answering; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Kills the daemon process with SIGKILL (its VMs keep running).
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Whether the daemon process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    /// A `nanoclaw` command aimed at this daemon.
    pub fn nanoclaw(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(nanoclaw_bin());
        cmd.arg("--socket").arg(self.socket()).args(args);
        cmd.stdin(Stdio::null());
        cmd
    }

    /// `nanoclaw inspect ID --json`, parsed.
    pub fn inspect(&self, id: &str) -> Result<serde_json::Value> {
        let out = self
            .nanoclaw(&["inspect", id, "--json"])
            .output_within(CLI_TIMEOUT)?;
        ensure!(
            out.status.success(),
            "inspect {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// Polls `inspect` until `done` holds for the VM's JSON, or `timeout` passes.
    pub fn wait_for(
        &self,
        id: &str,
        timeout: Duration,
        what: &str,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> Result<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.inspect(id)?;
            if done(&info) {
                return Ok(info);
            }
            ensure!(
                Instant::now() < deadline,
                "VM {id}: not {what} within {timeout:?}: {info}"
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// The VMM processes of this daemon's VMs (run as `VMM --kernel ... --vm-dir STATE/vms/ID`),
    /// whether or not the daemon is still running.
    pub fn vmm_processes(&self) -> Vec<u32> {
        let needle = self.dir.path().join("state").display().to_string();
        processes_mentioning(&needle)
            .into_iter()
            .filter(|(_, argv)| argv.contains("\0--vm-dir\0"))
            .map(|(pid, _)| pid)
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.kill();
        for pid in self.vmm_processes() {
            // SAFETY: kill(2) with a pid read from /proc and SIGKILL has no memory-safety
            // preconditions; at worst the process is already gone (ESRCH).
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
        }
    }
}

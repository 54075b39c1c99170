//! The daemon harness: a `host-agent serve` with its own directory (state, API socket, log), started
//! as [`DaemonOptions`] say and stopped when dropped.
//!
//! Three kinds of daemon:
//! - [`DaemonOptions::guest`]: the `host-agent` binary under test booting real guests through the
//!   real VMM (the e2e tier; [`Daemon::start`] is the short form);
//! - [`DaemonOptions::without_vms`]: the `host-agent` binary with placeholder kernel files, for
//!   tests of what the daemon serves without a VM;
//! - [`DaemonOptions::self_exec`]: the running test executable as the daemon and as its VMM, for
//!   the tests that run under [`crate::self_exec::main`] and play a fake VMM
//!   ([`crate::fake_vmm`]).
//!
//! Dropping a [`Daemon`] kills it and every VMM it started (they run in their own sessions, so
//! they would outlive it).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use nanoclaw_api::VmInfo;

use crate::process::{CLI_TIMEOUT, OutputWithin, processes_mentioning};
use crate::workspace::{host_agent_bin, nanoclaw_at};

/// How to start a [`Daemon`].
#[derive(Debug, Clone)]
pub struct DaemonOptions {
    /// The executable, run as `PROGRAM serve ...`.
    program: PathBuf,
    /// `--vmm-bin` (default: the daemon's own, `nanoclaw-vmm` beside it).
    vmm_bin: Option<PathBuf>,
    /// The kernel and initrd; `None`: placeholder files in the daemon's directory.
    guest: Option<(PathBuf, PathBuf)>,
    /// `--stop-grace-secs`.
    stop_grace_secs: Option<u32>,
    /// Appended to the `serve` arguments.
    args: Vec<String>,
    /// `RUST_LOG` for the daemon (default: inherited).
    rust_log: Option<String>,
    /// When the daemon counts as started.
    ready: Ready,
    /// Run inside this network namespace (`nsenter`'s `--net=...` argument).
    netns: Option<String>,
}

/// When a daemon counts as started.
#[derive(Debug, Clone, Copy)]
enum Ready {
    /// `nanoclaw ps` succeeds, within the duration.
    Cli(Duration),
    /// Its API socket accepts a connection, within the duration.
    Socket(Duration),
}

impl DaemonOptions {
    /// The `host-agent` binary under test, booting `kernel` with `initrd` through the real VMM;
    /// started once `nanoclaw ps` answers. Generous: inside L1 (software emulation) the debug
    /// daemon and CLI binaries are read over 9p before they run, which takes tens of seconds on a
    /// loaded machine.
    pub fn guest(kernel: &Path, initrd: &Path) -> Self {
        Self {
            program: host_agent_bin(),
            vmm_bin: None,
            guest: Some((kernel.to_owned(), initrd.to_owned())),
            stop_grace_secs: Some(5),
            args: Vec::new(),
            rust_log: None,
            netns: None,
            ready: Ready::Cli(Duration::from_secs(120)),
        }
    }

    /// The `host-agent` binary under test with placeholder kernel files (no VM boots); started
    /// once its API socket accepts.
    pub fn without_vms() -> Self {
        Self {
            program: host_agent_bin(),
            vmm_bin: None,
            guest: None,
            stop_grace_secs: None,
            args: Vec::new(),
            rust_log: None,
            netns: None,
            ready: Ready::Socket(Duration::from_secs(20)),
        }
    }

    /// The running test executable as the daemon (role `serve`) and as its VMM (role
    /// `--kernel`), with placeholder kernel files; started once its API socket accepts. The test
    /// runs under [`crate::self_exec::main`] with both roles.
    ///
    /// The fake VMM does not jail itself, so the daemon runs with `--jail off`: it makes no
    /// cgroups on the host for VMs that would never join them.
    pub fn self_exec() -> Self {
        let me = std::env::current_exe().expect("the test executable's path");
        Self {
            program: me.clone(),
            vmm_bin: Some(me),
            guest: None,
            stop_grace_secs: None,
            args: vec!["--jail".into(), "off".into()],
            rust_log: None,
            netns: None,
            ready: Ready::Socket(Duration::from_secs(20)),
        }
    }

    /// Appends `arg` to the `serve` arguments.
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.args.push(arg.into());
        self
    }

    /// Appends `args` to the `serve` arguments.
    pub fn args<S: Into<String>>(mut self, args: impl IntoIterator<Item = S>) -> Self {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Sets `--stop-grace-secs`.
    pub fn stop_grace_secs(mut self, secs: u32) -> Self {
        self.stop_grace_secs = Some(secs);
        self
    }

    /// Runs the daemon inside a network namespace, entered by `nsenter NSENTER_ARG` (see
    /// [`crate::netns::Member::nsenter_arg`]); nsenter execs the daemon, so its pid is the
    /// daemon's.
    pub fn in_netns(mut self, nsenter_arg: String) -> Self {
        self.netns = Some(nsenter_arg);
        self
    }

    /// Sets the daemon's `RUST_LOG`.
    pub fn rust_log(mut self, filter: &str) -> Self {
        self.rust_log = Some(filter.to_owned());
        self
    }

    /// Makes the daemon's directory (with the placeholder kernel files, if any) without starting
    /// it, so that a test can put files in its state directory first; [`Daemon::spawn`] starts it.
    pub fn prepare(self) -> Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("ncd-").tempdir()?;
        if self.guest.is_none() {
            std::fs::write(dir.path().join("kernel"), "k")?;
            std::fs::write(dir.path().join("initrd"), "i")?;
        }
        Ok(Daemon {
            child: None,
            dir,
            options: self,
        })
    }

    /// Starts the daemon and waits until it has started.
    pub fn start(self) -> Result<Daemon> {
        let mut daemon = self.prepare()?;
        daemon.spawn()?;
        Ok(daemon)
    }
}

/// A `host-agent serve` daemon with its own state directory and API socket. Dropping it kills the
/// daemon and every VMM it started.
#[derive(Debug)]
pub struct Daemon {
    child: Option<Child>,
    dir: tempfile::TempDir,
    options: DaemonOptions,
}

impl Daemon {
    /// Starts a daemon that boots `kernel` with `initrd` ([`DaemonOptions::guest`]), and waits
    /// until it answers.
    pub fn start(kernel: &Path, initrd: &Path) -> Result<Self> {
        DaemonOptions::guest(kernel, initrd).start()
    }

    /// Like [`Daemon::start`], with `extra_args` appended to `host-agent serve`'s (e.g.
    /// `--approvals-listen 127.0.0.1:PORT`).
    pub fn start_with(kernel: &Path, initrd: &Path, extra_args: &[&str]) -> Result<Self> {
        DaemonOptions::guest(kernel, initrd)
            .args(extra_args.iter().copied())
            .start()
    }

    /// The daemon's directory: `state/`, `api.sock`, `daemon.log` (and the placeholder kernel
    /// files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The daemon's state directory (holds `audit.ndjson` and `vms/`).
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    /// The API socket.
    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("api.sock")
    }

    /// The daemon's log (stdout and stderr of every daemon process started here, appended).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("daemon.log")).unwrap_or_default()
    }

    /// What a failure shows: each VM's console and VMM log (failed VMs first, see
    /// [`vm_records`]), then the daemon's log.
    pub fn records(&self) -> String {
        format!(
            "{}\ndaemon log:\n{}",
            vm_records(&self.state_dir()),
            self.log()
        )
    }

    /// The daemon process's pid, while this harness holds it.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The daemon's full command line, serving the API on `socket` (a second daemon on the same
    /// state directory takes another socket).
    pub fn serve_command(&self, socket: &Path) -> Command {
        let o = &self.options;
        let (kernel, initrd) = match &o.guest {
            Some((kernel, initrd)) => (kernel.clone(), initrd.clone()),
            None => (
                self.dir.path().join("kernel"),
                self.dir.path().join("initrd"),
            ),
        };
        let mut cmd = match &o.netns {
            Some(net) => {
                let mut cmd = Command::new("nsenter");
                cmd.arg(net).arg("--").arg(&o.program);
                cmd
            }
            None => Command::new(&o.program),
        };
        cmd.arg("serve")
            .arg("--state-dir")
            .arg(self.state_dir())
            .arg("--socket")
            .arg(socket)
            .arg("--kernel")
            .arg(kernel)
            .arg("--initrd")
            .arg(initrd);
        if let Some(vmm) = &o.vmm_bin {
            cmd.arg("--vmm-bin").arg(vmm);
        }
        if let Some(secs) = o.stop_grace_secs {
            cmd.args(["--stop-grace-secs", &secs.to_string()]);
        }
        cmd.args(&o.args).stdin(Stdio::null());
        if let Some(filter) = &o.rust_log {
            cmd.env("RUST_LOG", filter);
        }
        cmd
    }

    /// Appends `args` to the `serve` arguments of the next [`Daemon::spawn`]: for a prepared
    /// daemon whose arguments depend on its state directory (such as the migration keys made
    /// in it, which the other daemon pins).
    pub fn add_args<S: Into<String>>(&mut self, args: impl IntoIterator<Item = S>) {
        self.options.args.extend(args.into_iter().map(Into::into));
    }

    /// Starts (or restarts) the daemon process and waits until it has started.
    pub fn spawn(&mut self) -> Result<()> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("daemon.log"))?;
        let child = self
            .serve_command(&self.socket())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .with_context(|| format!("spawn {} serve", self.options.program.display()))?;
        self.child = Some(child);
        let within = match self.options.ready {
            Ready::Cli(within) | Ready::Socket(within) => within,
        };
        let deadline = Instant::now() + within;
        loop {
            if self.answers()? {
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
                "daemon not answering within {within:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(match self.options.ready {
                Ready::Cli(_) => Duration::from_millis(100),
                Ready::Socket(_) => Duration::from_millis(20),
            });
        }
    }

    /// Whether the daemon has started, as its options define it.
    fn answers(&self) -> Result<bool> {
        Ok(match self.options.ready {
            Ready::Cli(_) => self
                .nanoclaw(&["ps"])
                .output_within(CLI_TIMEOUT)?
                .status
                .success(),
            Ready::Socket(_) => std::os::unix::net::UnixStream::connect(self.socket()).is_ok(),
        })
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
        nanoclaw_at(&self.socket(), args)
    }

    /// `nanoclaw ARGS` aimed at this daemon, run to its end (at most [`CLI_TIMEOUT`]).
    ///
    /// # Panics
    ///
    /// If it cannot be run or does not end in time.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.nanoclaw(args)
            .output_within(CLI_TIMEOUT)
            .unwrap_or_else(|e| panic!("nanoclaw {args:?}: {e:#}\n{}", self.log()))
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

    /// Polls `inspect` until `done` holds for the VM's JSON, or `timeout` passes (the error then
    /// carries the daemon's log and every VM's console and VMM log).
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
                "VM {id}: not {what} within {timeout:?}: {info}\n{}",
                self.records()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// `nanoclaw inspect ID --json` as the API's type.
    ///
    /// # Panics
    ///
    /// If the call fails.
    pub fn vm(&self, id: &str) -> VmInfo {
        let out = self.cli(&["inspect", id, "--json"]);
        assert!(
            out.status.success(),
            "inspect {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).expect("inspect's JSON")
    }

    /// Polls [`Daemon::vm`] every 50 ms until `done` holds.
    ///
    /// # Panics
    ///
    /// If it does not within `timeout`.
    pub fn wait_vm(&self, id: &str, timeout: Duration, done: impl Fn(&VmInfo) -> bool) -> VmInfo {
        let deadline = Instant::now() + timeout;
        loop {
            let info = self.vm(id);
            if done(&info) {
                return info;
            }
            assert!(Instant::now() < deadline, "VM never got there: {info:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The VMM processes of this daemon's VMs (run as `VMM --kernel ... --vm-dir STATE/vms/ID`),
    /// whether or not the daemon is still running.
    ///
    /// A jailed VMM is two processes with the same command line: the supervisor the daemon
    /// started and, as its child, the VMM inside the jail. Only the first counts.
    pub fn vmm_processes(&self) -> Vec<u32> {
        let needle = self.state_dir().display().to_string();
        let all: Vec<u32> = processes_mentioning(&needle)
            .into_iter()
            .filter(|(_, argv)| argv.contains("\0--vm-dir\0"))
            .map(|(pid, _)| pid)
            .collect();
        let parent = |pid: u32| -> Option<u32> {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            // After the command name in parentheses: state, then the parent's pid.
            stat.rsplit_once(')')?
                .1
                .split_whitespace()
                .nth(1)?
                .parse()
                .ok()
        };
        all.iter()
            .copied()
            .filter(|pid| parent(*pid).is_none_or(|p| !all.contains(&p)))
            .collect()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if std::thread::panicking() {
            report_emulated_guest_fault(&self.state_dir());
        }
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

/// What a VMM logs when its guest triple-faults (`nanoclaw_vmm::vcpu`).
const TRIPLE_FAULT: &str = "the guest triple-faulted";
/// What a guest's kernel prints on its console when a fault strikes while it delivers another
/// (a double fault), just before it panics: seen in the emulated L1 on a running guest's first
/// instruction of a system call, which no working machine faults on.
const DOUBLE_FAULT: &str = "PANIC: double fault";
/// A VM's VMM log and its guest's console, under the VM's folder in the daemon's state.
const VMM_LOG: &str = "vmm.log";
const CONSOLE_LOG: &str = "vmm/console.log";

/// In the emulated L1 of `scripts/nested-run` (`NESTED_RUN_L1=1`), guests now and then
/// triple-fault, or panic on a double fault, from faults of the emulation itself
/// (docs/design.md, "Why end-to-end runs nested"). A failing test whose daemon saw one says so
/// on stdout, in a line that `scripts/e2e` reads as a fault of the machine rather than of the
/// test: `e2e-guest-fault: TEST-NAME VM-DIR`. Anywhere else, such a fault is an ordinary
/// failure.
fn report_emulated_guest_fault(state_dir: &Path) {
    if std::env::var_os("NESTED_RUN_L1").is_none_or(|v| v != "1") {
        return;
    }
    let test = std::thread::current()
        .name()
        .unwrap_or("unnamed")
        .to_owned();
    for vm in faulted_vms(state_dir) {
        println!("\ne2e-guest-fault: {test} {}", vm.display());
    }
}

/// The VM folders under `state_dir` whose VMM logged a triple fault or whose guest's console
/// shows a double-fault panic, in name order.
fn faulted_vms(state_dir: &Path) -> Vec<PathBuf> {
    let holds = |file: PathBuf, words: &str| {
        std::fs::read_to_string(file).is_ok_and(|text| text.contains(words))
    };
    let mut vms: Vec<PathBuf> = vm_dirs(state_dir)
        .filter(|vm| {
            holds(vm.join(VMM_LOG), TRIPLE_FAULT) || holds(vm.join(CONSOLE_LOG), DOUBLE_FAULT)
        })
        .collect();
    vms.sort();
    vms
}

/// Every VM's folder under the daemon state folder `state_dir` (none when it has no `vms/`).
fn vm_dirs(state_dir: &Path) -> impl Iterator<Item = PathBuf> {
    std::fs::read_dir(state_dir.join("vms"))
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
}

/// Each VM's console and VMM log under the daemon state folder `state_dir`: what a failing
/// test shows of its guests. VMs whose record says `failed` come first, then the rest in id
/// order, and each file shows only its last lines, so that a CI log that keeps only the head and
/// the tail of a failure still shows why a guest ended.
pub fn vm_records(state_dir: &Path) -> String {
    const CONSOLE_LINES: usize = 60;
    const VMM_LINES: usize = 20;
    let mut vms: Vec<(bool, PathBuf)> = vm_dirs(state_dir)
        .map(|dir| {
            let failed = std::fs::read(dir.join("vm.json"))
                .ok()
                .and_then(|t| serde_json::from_slice::<serde_json::Value>(&t).ok())
                .is_some_and(|r| r["status"] == "failed");
            (!failed, dir)
        })
        .collect();
    vms.sort();
    let mut out = String::new();
    for (not_failed, dir) in vms {
        let mark = if not_failed { "" } else { " (failed)" };
        for (file, keep) in [(CONSOLE_LOG, CONSOLE_LINES), (VMM_LOG, VMM_LINES)] {
            let text = std::fs::read_to_string(dir.join(file)).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let from = lines.len().saturating_sub(keep);
            out += &format!(
                "\n{}{mark} {file} (last {} of {} lines):\n{}\n",
                dir.display(),
                lines.len() - from,
                lines.len(),
                lines[from..].join("\n")
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_vms_whose_guest_triple_faulted_or_double_fault_panicked_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let vms = dir.path().join("vms");
        for (id, log) in [
            (
                "b",
                "INFO VM built\nWARN KVM_EXIT_SHUTDOWN: the guest triple-faulted; ending it\n",
            ),
            (
                "a",
                "WARN KVM_EXIT_SHUTDOWN: the guest triple-faulted; ending it as a reset\n",
            ),
            ("c", "INFO VM ended; stopping reason=\"reset\"\n"),
        ] {
            std::fs::create_dir_all(vms.join(id)).unwrap();
            std::fs::write(vms.join(id).join(VMM_LOG), log).unwrap();
        }
        std::fs::create_dir_all(vms.join("d")).unwrap(); // no log yet
        for (id, console) in [
            (
                "e",
                "agent started\ntraps: PANIC: double fault, error_code: 0x0\nKernel panic\n",
            ),
            ("f", "Kernel panic - not syncing: Attempted to kill init!\n"),
        ] {
            std::fs::create_dir_all(vms.join(id).join("vmm")).unwrap();
            std::fs::write(vms.join(id).join(CONSOLE_LOG), console).unwrap();
        }
        assert_eq!(
            faulted_vms(dir.path()),
            vec![vms.join("a"), vms.join("b"), vms.join("e")]
        );
        assert!(faulted_vms(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn the_triple_fault_words_are_the_vmms_own() {
        let vcpu = crate::workspace_root().join("host-agent/vmm/src/vcpu.rs");
        let source = std::fs::read_to_string(&vcpu).unwrap();
        assert!(
            source.contains(TRIPLE_FAULT),
            "{} no longer logs {TRIPLE_FAULT:?}: scripts/e2e would miss guest faults",
            vcpu.display()
        );
    }
}

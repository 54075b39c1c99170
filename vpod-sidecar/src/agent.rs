//! The agent runner: starts the agent, streams its output, feeds its stdin, signals it and
//! reports how it ended.
//!
//! Everything it tells the host goes through the [`Outbox`], so a dropped control connection
//! loses nothing: the frames wait for the next connection.
//!
//! # Behaviour
//!
//! - **One agent per boot.** A second `RunAgent` is answered with an `Error`.
//! - **Identity.** In production ([`IdPolicy::Switch`]) the child calls `setsid`,
//!   `setgroups([])`, `setgid(gid)`, `setuid(uid)` and `PR_SET_NO_NEW_PRIVS` before `exec`, so
//!   it runs in its own session and process group (its pgid is its pid), with no supplementary
//!   groups and no way to gain privileges through setuid binaries. uid 0 and gid 0 are refused
//!   outright (`Error` plus `AgentExited{Exit(126)}`): the agent is never root. Tests use
//!   [`IdPolicy::Inherit`], which keeps the caller's ids and ignores the spec's.
//! - **Environment.** Exactly the spec's `env` (the sidecar's own is cleared), `argv[0]` is the
//!   command, the working directory is `cwd`.
//! - **Image root.** With `root` in the spec, the root is built first ([`crate::rootfs`]: the
//!   disks mounted and joined, the user resolved, `cwd` made) and published for the file copy
//!   server; the child then `chroot`s into it and `chdir`s to `cwd` before it drops its ids,
//!   so `command` and `PATH` are looked up inside the image. A root that cannot be built is a
//!   start failure (`Error`, then `Exit(126)`). Without `root` nothing of this happens; a
//!   `user` then resolves against the sidecar's own `/etc` (numbers only, in the initramfs).
//!   uid 0 from the user's resolution falls back to the spec's ids, which are never 0.
//! - **Start failures.** A command that cannot be started is reported with an `Error` naming
//!   the cause, then `AgentExited{Exit(127)}` when the program or the directory does not exist
//!   and `Exit(126)` for any other failure (permission, identity switch), as shells do.
//! - **Output.** `AgentStarted{pid}` comes first; stdout and stderr are read on one thread each
//!   and sent as `AgentOutput` chunks of at most [`OUTPUT_CHUNK`] bytes as they arrive. When the
//!   host falls behind, the readers pause (see [`crate::outbox`]) and the agent blocks on its
//!   full pipe; nothing is dropped.
//! - **Stdin.** `AgentStdin{data}` bytes are written to the agent's stdin in order by a
//!   dedicated thread. **Empty `data` means EOF**: the sidecar closes the pipe, and any later
//!   `AgentStdin` is answered with an `Error`. If the agent closed its stdin, one `Error` says
//!   so and further bytes are discarded.
//! - **Signals.** `Signal{signo}` sends a standard signal (1 to 31) to the agent's process
//!   group; 0, real-time and unknown numbers are refused with an `Error`, as is a signal when
//!   no agent runs.
//! - **Exit.** When the reaper reports the agent's status, the rest of its process group is
//!   killed (the VM is about to end anyway, and a leftover child holding the pipes open would
//!   keep them from reaching EOF), both pipes are drained to EOF, and only then is
//!   `AgentExited{Exit(code) | Signal(n)}` queued as the final frame.

use std::ffi::CString;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Gid, Pid, Uid};
use shared_proto::message::{AgentSpec, ExitStatus, GuestToHost, OutputStream};

use crate::init::Reaper;
use crate::outbox::Outbox;
use crate::rootfs::{self, KernelRoot, PreparedRoot, RootDir, RootSetup, RootfsError};

/// The largest `AgentOutput` chunk, in bytes.
pub const OUTPUT_CHUNK: usize = 64 * 1024;

/// How many `AgentStdin` messages may wait for the agent to read them before the control
/// reader blocks (backpressure to the host).
const STDIN_QUEUE: usize = 64;

/// The exit code for a command or directory that does not exist.
const EXIT_NOT_FOUND: i32 = 127;
/// The exit code for a command that exists but cannot be started.
const EXIT_CANNOT_RUN: i32 = 126;

/// Errors of the agent runner, as reported to the host in `GuestToHost::Error`.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// `RunAgent` came while an agent runs or after one ended.
    #[error("an agent was already started in this VM")]
    AlreadyStarted,
    /// The spec asks for root.
    #[error("refusing to run the agent as root (uid {uid}, gid {gid})")]
    Root {
        /// The requested uid.
        uid: u32,
        /// The requested gid.
        gid: u32,
    },
    /// The working directory is missing or not a directory.
    #[error("cannot start {command}: working directory {cwd} does not exist")]
    NoCwd {
        /// The program.
        command: String,
        /// The directory.
        cwd: String,
    },
    /// `fork`/`exec` (or the identity switch before it) failed.
    #[error("cannot start {command}")]
    Spawn {
        /// The program.
        command: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A helper thread could not be started.
    #[error("cannot start the {name} thread")]
    Thread {
        /// Which thread.
        name: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// No agent runs.
    #[error("no agent is running")]
    NotRunning,
    /// The VM's network could not be configured.
    #[error("cannot configure the network")]
    Network(#[source] crate::net::NetError),
    /// `AgentStdin` after the EOF.
    #[error("the agent's stdin is already closed")]
    StdinClosed,
    /// The signal number is not a standard signal.
    #[error("invalid signal number {0}")]
    BadSignal(i32),
    /// `killpg` failed.
    #[error("cannot signal the agent")]
    Kill(#[source] nix::Error),
    /// The agent's image root cannot be built, or its user resolved.
    #[error("cannot prepare the agent's root file system")]
    RootFs(#[source] RootfsError),
    /// A path for the child holds a NUL byte.
    #[error("{0} holds a NUL byte")]
    NulInPath(&'static str),
}

/// Whose ids the agent runs with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdPolicy {
    /// Switch to the spec's uid and gid (refusing 0); the production policy.
    Switch,
    /// Keep the caller's ids and ignore the spec's; for tests on a developer machine.
    Inherit,
}

#[derive(Debug)]
enum State {
    Idle,
    Running {
        pgid: Pid,
        stdin: Option<SyncSender<Vec<u8>>>,
    },
    Exited,
}

/// Starts and controls the agent. Cheap to clone; clones share the agent.
#[derive(Debug, Clone)]
pub struct AgentRunner {
    outbox: Arc<Outbox>,
    reaper: Arc<Reaper>,
    ids: IdPolicy,
    state: Arc<Mutex<State>>,
    rootfs: Arc<dyn RootSetup>,
    published: Arc<OnceLock<PreparedRoot>>,
}

/// How the child is started: where, and as whom.
#[derive(Debug)]
struct Launch {
    /// The image root to chroot into, and `cwd` inside it, ready for the child.
    confine: Option<(CString, CString)>,
    uid: u32,
    gid: u32,
}

impl AgentRunner {
    /// A runner that reports to `outbox`, learns exits from `reaper` and builds image roots
    /// with real mounts ([`KernelRoot`]).
    pub fn new(outbox: Arc<Outbox>, reaper: Arc<Reaper>, ids: IdPolicy) -> Self {
        Self {
            outbox,
            reaper,
            ids,
            state: Arc::new(Mutex::new(State::Idle)),
            rootfs: Arc::new(KernelRoot::default()),
            published: Arc::new(OnceLock::new()),
        }
    }

    /// The same runner, building image roots with `setup` instead.
    pub fn with_root_setup(mut self, setup: Arc<dyn RootSetup>) -> Self {
        self.rootfs = setup;
        self
    }

    /// Where the agent's image root is published once built (for the file copy server).
    pub fn published_root(&self) -> Arc<OnceLock<PreparedRoot>> {
        Arc::clone(&self.published)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn report(&self, e: &AgentError) {
        tracing::warn!(error = %crate::ErrorChain(e), "agent");
        self.outbox.push(&GuestToHost::Error {
            message: crate::ErrorChain(e).to_string(),
        });
    }

    /// Whether an agent was started and has not been reported as ended.
    pub fn is_running(&self) -> bool {
        matches!(*self.lock(), State::Running { .. })
    }

    /// Handles `RunAgent`: starts the agent, or reports why not (and, if no agent ever ran,
    /// a final `AgentExited` with 126 or 127).
    pub fn run(&self, spec: AgentSpec) {
        let mut state = self.lock();
        if !matches!(*state, State::Idle) {
            drop(state);
            return self.report(&AgentError::AlreadyStarted);
        }
        let fail = |e: AgentError, code: i32| {
            self.report(&e);
            self.outbox.push_final(ExitStatus::Exit(code));
        };
        if self.ids == IdPolicy::Switch && (spec.uid == 0 || spec.gid == 0) {
            *state = State::Exited;
            let (uid, gid) = (spec.uid, spec.gid);
            return fail(AgentError::Root { uid, gid }, EXIT_CANNOT_RUN);
        }
        let launch = match self.launch(&spec) {
            Ok(launch) => launch,
            Err(e) => {
                *state = State::Exited;
                return fail(e, EXIT_CANNOT_RUN);
            }
        };
        let in_image = launch.confine.is_some();
        let mut cmd = self.command(&spec, launch);
        let spawned = self.reaper.spawn_watched(|| {
            let child = cmd.spawn()?;
            let pid = child.id();
            Ok::<_, std::io::Error>((child, pid))
        });
        let (mut child, pid, exit) = match spawned {
            Ok(s) => s,
            Err(source) => {
                *state = State::Exited;
                let not_found = source.kind() == ErrorKind::NotFound;
                // In an image root the working directory was just made.
                let e = if not_found && !in_image && !Path::new(&spec.cwd).is_dir() {
                    AgentError::NoCwd {
                        command: spec.command,
                        cwd: spec.cwd,
                    }
                } else {
                    AgentError::Spawn {
                        command: spec.command,
                        source,
                    }
                };
                let code = if not_found {
                    EXIT_NOT_FOUND
                } else {
                    EXIT_CANNOT_RUN
                };
                return fail(e, code);
            }
        };
        tracing::info!(pid, command = %spec.command, "agent started");
        self.outbox.push(&GuestToHost::AgentStarted { pid });
        // Pids fit in i32 (pid_max is at most 2^22).
        let pgid = Pid::from_raw(pid as i32);

        // The std handles are all piped, so all three are present.
        let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
        let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
            *state = State::Exited;
            let _ = killpg(pgid, Signal::SIGKILL);
            return self.report(&AgentError::NotRunning);
        };
        let (stdin_tx, stdin_rx) = mpsc::sync_channel(STDIN_QUEUE);
        *state = State::Running {
            pgid,
            stdin: Some(stdin_tx),
        };
        drop(state);

        let threads = self.spawn_threads(stdin, stdin_rx, stdout, stderr, exit, pgid);
        if let Err(e) = threads {
            // Without its threads the agent cannot be served: end it. The exit thread starts
            // last, so it is not running either; report the end here.
            let _ = killpg(pgid, Signal::SIGKILL);
            self.report(&e);
            *self.lock() = State::Exited;
            self.outbox
                .push_final(ExitStatus::Signal(Signal::SIGKILL as i32));
        }
    }

    /// Builds the image root of `spec` (publishing it) or resolves its user, and checks the
    /// ids it ends up with.
    fn launch(&self, spec: &AgentSpec) -> Result<Launch, AgentError> {
        if let Some(net) = &spec.network {
            crate::net::configure(net).map_err(AgentError::Network)?;
            // An image root gets its own resolv.conf when it is built.
            if spec.root.is_none() {
                crate::net::write_own_resolv_conf(net.dns).map_err(AgentError::Network)?;
            }
        }
        let (confine, uid, gid) = if spec.root.is_some() {
            let prepared = rootfs::build(&*self.rootfs, spec).map_err(AgentError::RootFs)?;
            let root = CString::new(prepared.path.as_os_str().as_bytes())
                .map_err(|_| AgentError::NulInPath("the root"))?;
            let cwd =
                CString::new(spec.cwd.as_bytes()).map_err(|_| AgentError::NulInPath("cwd"))?;
            tracing::info!(
                root = %prepared.path.display(),
                uid = prepared.owner.uid,
                gid = prepared.owner.gid,
                "agent root ready"
            );
            let (uid, gid) = (prepared.owner.uid, prepared.owner.gid);
            // Only one agent per boot, so the cell is empty.
            let _ = self.published.set(prepared);
            (Some((root, cwd)), uid, gid)
        } else if spec.user.is_some() {
            let own = RootDir::open(Path::new("/")).map_err(|source| {
                AgentError::RootFs(RootfsError::OpenRoot {
                    path: PathBuf::from("/"),
                    source,
                })
            })?;
            let id = rootfs::resolve_user(&own, spec).map_err(AgentError::RootFs)?;
            (None, id.uid, id.gid)
        } else {
            (None, spec.uid, spec.gid)
        };
        if self.ids == IdPolicy::Switch && (uid == 0 || gid == 0) {
            return Err(AgentError::Root { uid, gid });
        }
        Ok(Launch { confine, uid, gid })
    }

    fn command(&self, spec: &AgentSpec, launch: Launch) -> Command {
        let mut cmd = Command::new(&spec.command);
        cmd.args(&spec.args)
            .env_clear()
            .envs(spec.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if launch.confine.is_none() {
            cmd.current_dir(&spec.cwd);
        }
        let ids = match self.ids {
            IdPolicy::Switch => Some((Uid::from_raw(launch.uid), Gid::from_raw(launch.gid))),
            IdPolicy::Inherit => None,
        };
        let confine = launch.confine;
        // SAFETY: the closure runs in the forked child before exec. It only makes raw
        // syscalls (sigprocmask, setsid, chroot, chdir, setgroups, setgid, setuid, prctl)
        // through nix, which neither allocate nor take locks (the paths are `CStr`s made
        // before the fork, which nix passes on without copying), so it is async-signal-safe;
        // it touches no memory shared with the parent's other threads beyond the moved
        // `confine` and `ids`.
        unsafe {
            cmd.pre_exec(move || {
                // The sidecar blocks SIGTERM in every thread; the agent starts with none blocked.
                nix::sys::signal::SigSet::empty().thread_set_mask()?;
                nix::unistd::setsid()?;
                // Into the image while still privileged; exec then finds the program in it.
                if let Some((root, cwd)) = &confine {
                    nix::unistd::chroot(root.as_c_str())?;
                    nix::unistd::chdir(cwd.as_c_str())?;
                }
                if let Some((uid, gid)) = ids {
                    nix::unistd::setgroups(&[])?;
                    nix::unistd::setgid(gid)?;
                    nix::unistd::setuid(uid)?;
                }
                nix::sys::prctl::set_no_new_privs()?;
                Ok(())
            });
        }
        cmd
    }

    fn spawn_threads(
        &self,
        stdin: std::process::ChildStdin,
        stdin_rx: Receiver<Vec<u8>>,
        stdout: std::process::ChildStdout,
        stderr: std::process::ChildStderr,
        exit: Receiver<ExitStatus>,
        pgid: Pid,
    ) -> Result<(), AgentError> {
        let thread = |name: &'static str, f: Box<dyn FnOnce() + Send>| {
            std::thread::Builder::new()
                .name(name.into())
                .spawn(f)
                .map_err(|source| AgentError::Thread { name, source })
        };
        let outbox = Arc::clone(&self.outbox);
        thread(
            "agent-stdin",
            Box::new(move || feed_stdin(stdin, &stdin_rx, &outbox)),
        )?;
        let outbox = Arc::clone(&self.outbox);
        let out = thread(
            "agent-stdout",
            Box::new(move || pump(stdout, OutputStream::Stdout, &outbox)),
        )?;
        let outbox = Arc::clone(&self.outbox);
        let err = thread(
            "agent-stderr",
            Box::new(move || pump(stderr, OutputStream::Stderr, &outbox)),
        )?;
        let runner = self.clone();
        thread(
            "agent-exit",
            Box::new(move || {
                // The reaper holds the sender until it reports this pid; a closed channel
                // means it is gone, which leaves nothing better than "killed".
                let status = exit
                    .recv()
                    .unwrap_or(ExitStatus::Signal(Signal::SIGKILL as i32));
                tracing::info!(?status, "agent exited");
                // The leader is gone: end the rest of its group so the pipes reach EOF.
                let _ = killpg(pgid, Signal::SIGKILL);
                let _ = out.join();
                let _ = err.join();
                *runner.lock() = State::Exited;
                runner.outbox.push_final(status);
            }),
        )?;
        Ok(())
    }

    /// Handles `AgentStdin`: queues `data` for the agent's stdin; empty `data` closes it.
    /// Blocks while `STDIN_QUEUE` (64) messages wait for the agent.
    ///
    /// An EOF for an agent whose stdin is closed, that failed to start or that has ended is a
    /// no-op (the host may send EOF right after `RunAgent`); bytes after an EOF, or before any
    /// `RunAgent`, are answered with an `Error`; bytes after the agent ended are discarded.
    pub fn stdin(&self, data: Vec<u8>) {
        let tx = {
            let mut state = self.lock();
            match &mut *state {
                State::Running { stdin, .. } if data.is_empty() => {
                    // Dropping the sender lets the stdin thread finish the queue, then close.
                    *stdin = None;
                    return;
                }
                State::Running {
                    stdin: Some(tx), ..
                } => tx.clone(),
                State::Running { stdin: None, .. } => {
                    drop(state);
                    return self.report(&AgentError::StdinClosed);
                }
                State::Exited => {
                    tracing::debug!(len = data.len(), "stdin after the agent ended");
                    return;
                }
                State::Idle => {
                    drop(state);
                    return self.report(&AgentError::NotRunning);
                }
            }
        };
        // Fails only when the stdin thread is gone (the agent ended); the bytes have no reader.
        let _ = tx.send(data);
    }

    /// Handles `Signal`: sends `signo` to the agent's process group.
    pub fn signal(&self, signo: i32) {
        if let Err(e) = self.try_signal(signo) {
            self.report(&e);
        }
    }

    /// Sends `signo` to the agent's process group, or says why not.
    pub fn try_signal(&self, signo: i32) -> Result<(), AgentError> {
        let signal = Signal::try_from(signo).map_err(|_| AgentError::BadSignal(signo))?;
        let State::Running { pgid, .. } = *self.lock() else {
            return Err(AgentError::NotRunning);
        };
        killpg(pgid, signal).map_err(AgentError::Kill)
    }
}

/// Writes queued stdin bytes to the agent until the queue closes (EOF or the agent's end).
fn feed_stdin(mut pipe: std::process::ChildStdin, rx: &Receiver<Vec<u8>>, outbox: &Outbox) {
    let mut broken = false;
    for data in rx {
        if broken {
            continue;
        }
        if let Err(e) = pipe.write_all(&data) {
            broken = true;
            tracing::info!(error = %e, "agent stdin");
            outbox.push(&GuestToHost::Error {
                message: format!("the agent closed its stdin; stdin bytes are discarded ({e})"),
            });
        }
    }
    // Dropping `pipe` closes it: the agent reads EOF.
}

/// Reads one output pipe to EOF, queueing each chunk for the host as it arrives.
fn pump(mut pipe: impl Read, stream: OutputStream, outbox: &Outbox) {
    let mut buf = vec![0u8; OUTPUT_CHUNK];
    loop {
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => outbox.push_output(stream, buf[..n].to_vec()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, ?stream, "agent output");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{self, Backoff, HostRequests, SessionEnd};
    use shared_proto::PROTOCOL_VERSION;
    use shared_proto::frame::{FrameDecoder, encode_frame};
    use shared_proto::message::HostToGuest;
    use std::os::unix::net::UnixStream;
    use std::thread::JoinHandle;
    use std::time::Duration;

    fn hello() -> GuestToHost {
        GuestToHost::Hello {
            protocol_version: PROTOCOL_VERSION,
            sidecar_version: "test".into(),
            boot_id: [7; 16],
            ephemeral_public_key: [8; 32],
        }
    }

    fn spec(command: &str, args: &[&str]) -> AgentSpec {
        AgentSpec {
            command: command.into(),
            args: args.iter().map(|a| (*a).to_owned()).collect(),
            env: vec![("PATH".into(), "/usr/bin:/bin".into())],
            cwd: "/".into(),
            uid: 1000,
            gid: 1000,
            mcp: None,
            root: None,
            user: None,
            network: None,
        }
    }

    fn sh(script: &str) -> AgentSpec {
        spec("/bin/sh", &["-c", script])
    }

    struct Requests(AgentRunner);

    impl HostRequests for Requests {
        fn echo_connect(&mut self, _port: u32) -> Result<(), String> {
            Err("no echo in this test".into())
        }
        fn run_agent(&mut self, spec: AgentSpec) {
            self.0.run(spec);
        }
        fn agent_stdin(&mut self, data: Vec<u8>) {
            self.0.stdin(data);
        }
        fn signal(&mut self, signo: i32) {
            self.0.signal(signo);
        }
        fn freeze(&mut self) -> Result<(), String> {
            Err("no freeze in this test".into())
        }
        fn thaw(&mut self) {}
        fn reidentify(
            &mut self,
            _entropy: &[u8],
            _network: Option<&shared_proto::message::GuestNetwork>,
        ) -> Result<GuestToHost, String> {
            Err("no new identity in this test".into())
        }
    }

    /// The sidecar's control loop on a thread; each connection attempt takes the next stream
    /// sent on the returned channel (and fails once the channel is closed).
    fn guest(ids: IdPolicy) -> (std::sync::mpsc::Sender<UnixStream>, JoinHandle<SessionEnd>) {
        guest_with(
            ids,
            Arc::new(KernelRoot::default()),
            Arc::new(OnceLock::new()),
        )
    }

    /// [`guest`] with image roots built by `setup`; the runner publishes its root to
    /// `published`.
    fn guest_with(
        ids: IdPolicy,
        setup: Arc<dyn RootSetup>,
        published: Arc<OnceLock<PreparedRoot>>,
    ) -> (std::sync::mpsc::Sender<UnixStream>, JoinHandle<SessionEnd>) {
        let (tx, rx) = std::sync::mpsc::channel::<UnixStream>();
        let handle = std::thread::spawn(move || {
            // As in production, where main blocks SIGTERM for every thread.
            nix::sys::signal::SigSet::from(Signal::SIGTERM)
                .thread_block()
                .unwrap();
            let outbox = Arc::new(Outbox::default());
            let runner = AgentRunner {
                published,
                ..AgentRunner::new(Arc::clone(&outbox), crate::init::test_reaper(), ids)
                    .with_root_setup(setup)
            };
            let connect = || {
                rx.recv()
                    .map_err(|_| std::io::Error::from(ErrorKind::ConnectionRefused))
            };
            let mut backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(20));
            control::run(
                connect,
                &hello(),
                &mut backoff,
                &outbox,
                &mut Requests(runner),
            )
        });
        (tx, handle)
    }

    /// The host's end of one control connection.
    struct Host {
        s: UnixStream,
        d: FrameDecoder<GuestToHost>,
    }

    impl Host {
        /// Connects a new stream to the guest, reads its hello and acknowledges it.
        fn connect(guest: &std::sync::mpsc::Sender<UnixStream>) -> Self {
            let (g, s) = UnixStream::pair().unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            guest.send(g).unwrap();
            let mut host = Self {
                s,
                d: FrameDecoder::new(),
            };
            assert_eq!(host.recv(), Some(hello()));
            host.send(&HostToGuest::HelloAck {
                protocol_version: PROTOCOL_VERSION,
            });
            host
        }

        fn send(&mut self, msg: &HostToGuest) {
            self.s.write_all(&encode_frame(msg).unwrap()).unwrap();
        }

        /// The next message; `None` at EOF.
        fn recv(&mut self) -> Option<GuestToHost> {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                if let Some(m) = self.d.decode_next().unwrap() {
                    return Some(m);
                }
                // The test process reaps children, so a SIGCHLD may interrupt the read.
                let n = match self.s.read(&mut buf) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    read => read.expect("the guest went quiet"),
                };
                if n == 0 {
                    return None;
                }
                self.d.push(&buf[..n]);
            }
        }

        /// Messages up to and including `AgentExited`, then checks that the guest half-closed.
        fn recv_to_exit(&mut self) -> Vec<GuestToHost> {
            let mut got = Vec::new();
            loop {
                let m = self.recv().expect("EOF before agent_exited");
                let done = matches!(m, GuestToHost::AgentExited { .. });
                got.push(m);
                if done {
                    assert_eq!(self.recv(), None, "frames after agent_exited");
                    return got;
                }
            }
        }
    }

    /// Concatenated output of one stream.
    fn output(msgs: &[GuestToHost], which: OutputStream) -> Vec<u8> {
        msgs.iter()
            .filter_map(|m| match m {
                GuestToHost::AgentOutput { stream, data } if *stream == which => Some(&data[..]),
                _ => None,
            })
            .flatten()
            .copied()
            .collect()
    }

    fn errors(msgs: &[GuestToHost]) -> Vec<&str> {
        msgs.iter()
            .filter_map(|m| match m {
                GuestToHost::Error { message } => Some(message.as_str()),
                _ => None,
            })
            .collect()
    }

    fn exit_of(msgs: &[GuestToHost]) -> ExitStatus {
        match msgs.last() {
            Some(GuestToHost::AgentExited { status }) => *status,
            other => panic!("last message is {other:?}"),
        }
    }

    /// Runs `spec` on one connection and returns everything the guest sent after the hello.
    fn run_to_exit(spec: AgentSpec) -> Vec<GuestToHost> {
        let (tx, guest) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(spec));
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
        got
    }

    #[test]
    fn output_then_exit_code_in_order() {
        let got = run_to_exit(sh("echo hi; echo err >&2; exit 3"));
        assert!(matches!(got[0], GuestToHost::AgentStarted { pid } if pid > 1));
        assert_eq!(output(&got, OutputStream::Stdout), b"hi\n");
        assert_eq!(output(&got, OutputStream::Stderr), b"err\n");
        assert_eq!(exit_of(&got), ExitStatus::Exit(3));
        assert!(errors(&got).is_empty(), "{got:?}");
    }

    #[test]
    fn env_and_cwd_are_the_specs() {
        let mut s = sh("echo \"$GREETING\"; pwd; echo \"${HOME:-nohome}\"");
        s.env.push(("GREETING".into(), "hello there".into()));
        s.cwd = "/tmp".into();
        let got = run_to_exit(s);
        assert_eq!(
            output(&got, OutputStream::Stdout),
            b"hello there\n/tmp\nnohome\n"
        );
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
    }

    #[test]
    fn the_agent_leads_its_own_session_without_new_privileges() {
        // After "pid (comm) ", /proc/self/stat holds state, ppid, pgrp, session, ...
        let got = run_to_exit(sh(
            "read -r stat < /proc/self/stat; set -- ${stat##*) }; echo \"$$ $3 $4\"; \
             grep NoNewPrivs /proc/self/status",
        ));
        let out = String::from_utf8(output(&got, OutputStream::Stdout)).unwrap();
        let mut lines = out.lines();
        let ids: Vec<&str> = lines.next().unwrap().split(' ').collect();
        assert_eq!(ids[0], ids[1], "pgid is the pid: {out}");
        assert_eq!(ids[0], ids[2], "sid is the pid: {out}");
        assert_eq!(lines.next().unwrap().split_whitespace().nth(1), Some("1"));
    }

    #[test]
    fn the_agent_starts_with_no_blocked_signals_and_default_sigpipe() {
        let got = run_to_exit(spec("grep", &["-E", "^Sig(Blk|Ign)", "/proc/self/status"]));
        let out = String::from_utf8(output(&got, OutputStream::Stdout)).unwrap();
        let mask = |name: &str| {
            out.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|m| u64::from_str_radix(m.trim(), 16).ok())
                .unwrap_or_else(|| panic!("no {name} in {out}"))
        };
        // Bit n-1 stands for signal n.
        assert_eq!(mask("SigBlk:"), 0, "{out}");
        let sigpipe = 1 << (Signal::SIGPIPE as u32 - 1);
        assert_eq!(mask("SigIgn:") & sigpipe, 0, "{out}");
    }

    #[test]
    fn stdin_round_trip_and_empty_data_is_eof() {
        let (tx, guest) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(spec("cat", &[])));
        host.send(&HostToGuest::AgentStdin {
            data: b"hello\n".to_vec(),
        });
        host.send(&HostToGuest::AgentStdin {
            data: b"world".to_vec(),
        });
        host.send(&HostToGuest::AgentStdin { data: Vec::new() });
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(output(&got, OutputStream::Stdout), b"hello\nworld");
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn a_signal_reaches_the_agent_and_bad_numbers_are_refused() {
        let (tx, guest) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(spec("sleep", &["100"])));
        assert!(matches!(
            host.recv(),
            Some(GuestToHost::AgentStarted { .. })
        ));
        for bad in [0, -1, 64, 99] {
            host.send(&HostToGuest::Signal { signo: bad });
            let m = host.recv();
            assert!(
                matches!(&m, Some(GuestToHost::Error { message }) if message.contains("invalid signal")),
                "{m:?}"
            );
        }
        host.send(&HostToGuest::Signal { signo: 15 });
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(exit_of(&got), ExitStatus::Signal(15));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn a_missing_command_is_127_with_the_reason() {
        let got = run_to_exit(spec("/no/such/agent", &[]));
        assert_eq!(got.len(), 2, "{got:?}");
        let errs = errors(&got);
        assert!(errs[0].contains("/no/such/agent"), "{errs:?}");
        assert_eq!(exit_of(&got), ExitStatus::Exit(127));
    }

    #[test]
    fn the_daemons_immediate_eof_is_quiet_and_bytes_after_eof_are_refused() {
        // A failed spawn followed by the EOF the daemon sends right after RunAgent.
        let (tx, sidecar) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(spec("/no/such/agent", &[])));
        host.send(&HostToGuest::AgentStdin { data: Vec::new() });
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(errors(&got).len(), 1, "{got:?}");
        assert_eq!(sidecar.join().unwrap(), SessionEnd::AgentDone);

        // A running agent: EOF, a second EOF (quiet), then bytes (refused).
        let (tx, sidecar) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(sh(
            "read -r x; echo \"[$x]\"; sleep 0.3",
        )));
        host.send(&HostToGuest::AgentStdin { data: Vec::new() });
        host.send(&HostToGuest::AgentStdin { data: Vec::new() });
        host.send(&HostToGuest::AgentStdin {
            data: b"late\n".to_vec(),
        });
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(output(&got, OutputStream::Stdout), b"[]\n");
        let errs = errors(&got);
        assert_eq!(errs.len(), 1, "{got:?}");
        assert!(errs[0].contains("stdin is already closed"), "{errs:?}");
        assert_eq!(sidecar.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn a_missing_cwd_is_127_naming_the_directory() {
        let mut s = sh("exit 0");
        s.cwd = "/no/such/dir".into();
        let got = run_to_exit(s);
        let errs = errors(&got);
        assert!(
            errs[0].contains("working directory /no/such/dir"),
            "{errs:?}"
        );
        assert_eq!(exit_of(&got), ExitStatus::Exit(127));
    }

    #[test]
    fn a_non_executable_command_is_126() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("script");
        std::fs::write(&path, "#!/bin/sh\necho no\n").unwrap();
        let got = run_to_exit(spec(path.to_str().unwrap(), &[]));
        assert_eq!(exit_of(&got), ExitStatus::Exit(126));
        assert_eq!(errors(&got).len(), 1, "{got:?}");
    }

    #[test]
    fn root_is_refused_under_the_production_policy() {
        let (tx, guest) = guest(IdPolicy::Switch);
        let mut host = Host::connect(&tx);
        let mut s = sh("echo should not run");
        s.uid = 0;
        host.send(&HostToGuest::RunAgent(s));
        let got = host.recv_to_exit();
        drop(host);
        assert!(errors(&got)[0].contains("root"), "{got:?}");
        assert_eq!(exit_of(&got), ExitStatus::Exit(126));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn a_second_run_agent_is_refused() {
        let (tx, guest) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(spec("cat", &[])));
        assert!(matches!(
            host.recv(),
            Some(GuestToHost::AgentStarted { .. })
        ));
        host.send(&HostToGuest::RunAgent(sh("exit 9")));
        let m = host.recv();
        assert!(
            matches!(&m, Some(GuestToHost::Error { message }) if message.contains("already")),
            "{m:?}"
        );
        host.send(&HostToGuest::AgentStdin { data: Vec::new() });
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn output_and_exit_made_while_disconnected_arrive_after_the_reconnect() {
        let (tx, guest) = guest(IdPolicy::Inherit);
        let mut first = Host::connect(&tx);
        first.send(&HostToGuest::RunAgent(sh(
            "echo one; sleep 0.5; echo two; echo three >&2; exit 4",
        )));
        assert!(matches!(
            first.recv(),
            Some(GuestToHost::AgentStarted { .. })
        ));
        let one = first.recv();
        assert_eq!(
            one,
            Some(GuestToHost::AgentOutput {
                stream: OutputStream::Stdout,
                data: b"one\n".to_vec()
            })
        );
        // The host goes away; the agent carries on and ends while nobody listens.
        drop(first);
        std::thread::sleep(Duration::from_secs(1));
        let mut second = Host::connect(&tx);
        let got = second.recv_to_exit();
        drop(second);
        assert_eq!(output(&got, OutputStream::Stdout), b"two\n");
        assert_eq!(output(&got, OutputStream::Stderr), b"three\n");
        assert_eq!(exit_of(&got), ExitStatus::Exit(4));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn five_mebibytes_arrive_complete_in_order_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..5u32 << 20)
            .map(|i| (i % 251) as u8 ^ (i >> 16) as u8)
            .collect();
        std::fs::write(&path, &data).unwrap();
        let got = run_to_exit(spec("cat", &[path.to_str().unwrap()]));
        for m in &got {
            if let GuestToHost::AgentOutput { data, .. } = m {
                assert!(data.len() <= OUTPUT_CHUNK);
            }
        }
        let out = output(&got, OutputStream::Stdout);
        assert_eq!(out.len(), data.len());
        assert!(out == data, "output differs");
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
    }

    #[test]
    fn output_over_the_cap_waits_for_the_next_connection_without_loss() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big");
        let data: Vec<u8> = (0..6u32 << 20).map(|i| (i % 241) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        let (tx, sidecar) = guest(IdPolicy::Inherit);
        let mut first = Host::connect(&tx);
        let script = format!("sleep 0.5; cat {}; exit 6", path.display());
        first.send(&HostToGuest::RunAgent(sh(&script)));
        assert!(matches!(
            first.recv(),
            Some(GuestToHost::AgentStarted { .. })
        ));
        drop(first);
        // 6 MiB with nobody connected: 4 MiB wait in the outbox, the rest in the pipe.
        std::thread::sleep(Duration::from_secs(2));
        let mut second = Host::connect(&tx);
        let got = second.recv_to_exit();
        drop(second);
        let out = output(&got, OutputStream::Stdout);
        assert_eq!(out.len(), data.len());
        assert!(out == data, "output differs");
        assert_eq!(exit_of(&got), ExitStatus::Exit(6));
        assert_eq!(sidecar.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn a_host_that_never_closes_is_given_up_on_after_the_flush_timeout() {
        let (tx, sidecar) = guest(IdPolicy::Inherit);
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(sh("exit 2")));
        let got = host.recv_to_exit();
        assert_eq!(exit_of(&got), ExitStatus::Exit(2));
        // The guest half-closed (recv_to_exit saw EOF); the host keeps its end open.
        let start = std::time::Instant::now();
        assert_eq!(sidecar.join().unwrap(), SessionEnd::AgentDone);
        let waited = start.elapsed();
        assert!(
            waited >= control::FLUSH_TIMEOUT - Duration::from_millis(500),
            "{waited:?}"
        );
        drop(host);
    }

    #[test]
    fn a_background_child_holding_the_pipes_does_not_hold_up_the_exit() {
        let got = run_to_exit(sh("sleep 100 & echo started; exit 5"));
        assert_eq!(output(&got, OutputStream::Stdout), b"started\n");
        assert_eq!(exit_of(&got), ExitStatus::Exit(5));
    }

    /// A root setup that fails like a corrupt image disk.
    #[derive(Debug)]
    struct CorruptImage;

    impl RootSetup for CorruptImage {
        fn mount(&self, root: &shared_proto::message::RootFs) -> Result<PathBuf, RootfsError> {
            Err(RootfsError::Mount {
                fstype: "ext4",
                device: root.image_device.clone(),
                target: PathBuf::from("/run/nanoclaw/image"),
                source: nix::errno::Errno::EUCLEAN,
            })
        }
    }

    fn image_spec(command: &str, args: &[&str]) -> AgentSpec {
        AgentSpec {
            root: Some(shared_proto::message::RootFs {
                image_device: "/dev/vda".into(),
                scratch_device: "/dev/vdb".into(),
            }),
            ..spec(command, args)
        }
    }

    #[test]
    fn a_root_that_cannot_be_mounted_ends_the_run_with_126_and_the_reason() {
        let published = Arc::new(OnceLock::new());
        let (tx, guest) = guest_with(
            IdPolicy::Switch,
            Arc::new(CorruptImage),
            Arc::clone(&published),
        );
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(image_spec("/bin/true", &[])));
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(got.len(), 2, "{got:?}");
        assert_eq!(
            errors(&got),
            [
                "cannot prepare the agent's root file system: cannot mount ext4 /dev/vda on \
              /run/nanoclaw/image: EUCLEAN: Structure needs cleaning"
            ]
        );
        assert_eq!(exit_of(&got), ExitStatus::Exit(126));
        assert!(published.get().is_none());
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    #[test]
    fn an_unknown_image_user_ends_the_run_with_126() {
        let tmp = tempfile::tempdir().unwrap();
        let setup = Arc::new(crate::rootfs::tests::ReadyDir(tmp.path().to_owned()));
        let (tx, guest) = guest_with(IdPolicy::Switch, setup, Arc::new(OnceLock::new()));
        let mut host = Host::connect(&tx);
        let mut s = image_spec("/bin/true", &[]);
        s.user = Some("ghost".into());
        host.send(&HostToGuest::RunAgent(s));
        let got = host.recv_to_exit();
        drop(host);
        assert!(
            errors(&got)[0].contains("\"ghost\" is not in the image's /etc/passwd"),
            "{got:?}"
        );
        assert_eq!(exit_of(&got), ExitStatus::Exit(126));
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }

    /// A root holding only a static busybox (as `/bin/busybox` and `/bin/sh`), a passwd with
    /// `agent` (4242:4343) and `root`, and a marker file.
    fn busybox_root() -> tempfile::TempDir {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir_all(root.join("bin")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::copy("/bin/busybox", root.join("bin/busybox")).expect("busybox-static");
        std::os::unix::fs::symlink("busybox", root.join("bin/sh")).unwrap();
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0::/root:/bin/sh\nagent:x:4242:4343::/home/agent:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(root.join("image-marker"), "from the image\n").unwrap();
        tmp
    }

    /// Runs `script` with busybox's sh in [`busybox_root`] under the production id policy and
    /// answers the messages and the root.
    fn run_in_image(
        user: Option<&str>,
        cwd: &str,
        script: &str,
    ) -> (Vec<GuestToHost>, tempfile::TempDir, Option<PreparedRoot>) {
        let tmp = busybox_root();
        let setup = Arc::new(crate::rootfs::tests::ReadyDir(tmp.path().to_owned()));
        let published = Arc::new(OnceLock::new());
        let (tx, guest) = guest_with(IdPolicy::Switch, setup, Arc::clone(&published));
        let mut host = Host::connect(&tx);
        let mut s = image_spec("sh", &["-c", script]);
        s.env = vec![("PATH".into(), "/bin".into())];
        s.cwd = cwd.into();
        s.user = user.map(str::to_owned);
        host.send(&HostToGuest::RunAgent(s));
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
        (got, tmp, published.get().cloned())
    }

    #[test]
    fn an_image_agent_runs_chrooted_in_its_cwd_as_the_resolved_user() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: chroot and the id switch need root");
            return;
        }
        let (got, tmp, published) = run_in_image(
            Some("agent"),
            "/home/agent/work",
            "pwd; busybox id -u; busybox id -g; busybox id -G; busybox cat /image-marker; \
             busybox ls /; busybox grep NoNewPrivs /proc/self/status || echo no-proc",
        );
        let out = String::from_utf8(output(&got, OutputStream::Stdout)).unwrap();
        assert!(errors(&got).is_empty(), "{got:?}");
        assert_eq!(exit_of(&got), ExitStatus::Exit(0), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], "/home/agent/work");
        assert_eq!(
            lines[1..4],
            ["4242", "4343", "4343"],
            "no supplementary groups"
        );
        assert_eq!(lines[4], "from the image");
        // Only the image's files are visible: the root the agent sees is the temp dir.
        assert_eq!(lines[5..9], ["bin", "etc", "home", "image-marker"]);
        // The test root has no /proc mounted; the guest's has.
        assert_eq!(lines[9], "no-proc");
        let meta = std::fs::metadata(tmp.path().join("home/agent/work")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (4242, 4343));
        let published = published.expect("root published for the file copy server");
        assert_eq!(published.path, tmp.path());
        assert_eq!(
            published.owner,
            crate::rootfs::Owner {
                uid: 4242,
                gid: 4343
            }
        );
    }

    #[test]
    fn an_image_user_that_is_root_runs_as_the_specs_ids() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: chroot and the id switch need root");
            return;
        }
        let (got, _tmp, _) = run_in_image(Some("root"), "/", "busybox id -u; busybox id -g");
        assert_eq!(output(&got, OutputStream::Stdout), b"1000\n1000\n");
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
    }

    #[test]
    fn a_program_missing_from_the_image_is_127() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: chroot and the id switch need root");
            return;
        }
        // `sh` is found through PATH inside the image; /usr/bin/env exists on the build host
        // but not in the image.
        let (got, _tmp, _) = run_in_image(None, "/", "exit 0");
        assert_eq!(exit_of(&got), ExitStatus::Exit(0));
        let tmp = busybox_root();
        let setup = Arc::new(crate::rootfs::tests::ReadyDir(tmp.path().to_owned()));
        let (tx, guest) = guest_with(IdPolicy::Switch, setup, Arc::new(OnceLock::new()));
        let mut host = Host::connect(&tx);
        host.send(&HostToGuest::RunAgent(image_spec("/usr/bin/env", &[])));
        let got = host.recv_to_exit();
        drop(host);
        assert_eq!(exit_of(&got), ExitStatus::Exit(127), "{got:?}");
        assert!(
            errors(&got)[0].contains("cannot start /usr/bin/env"),
            "{got:?}"
        );
        assert_eq!(guest.join().unwrap(), SessionEnd::AgentDone);
    }
}

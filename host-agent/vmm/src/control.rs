//! The VMM's control socket, `<vm-dir>/control.sock`: how the daemon pauses and resumes a
//! running VM.
//!
//! One request per connection, one JSON line each way, at most [`MAX_REQUEST`] bytes in:
//!
//! | request | answer |
//! | --- | --- |
//! | `{"op":"pause"}` | `{"ok":true,"state":"paused"}` once every vCPU is parked |
//! | `{"op":"resume"}` | `{"ok":true,"state":"running"}` |
//! | `{"op":"state"}` | `{"ok":true,"state":"running"\|"paused"}` |
//! | `{"op":"snapshot","dir":"NAME"}` | `{"ok":true,"state":"paused","snapshot":{...}}` once written |
//!
//! A snapshot ([`crate::snapshot`]) needs a paused VM and is refused otherwise; `NAME` is a
//! relative path of plain names (no `..`), made as a new folder (mode 0700) inside the VM's
//! folder, whose parent must exist. The VM stays paused afterwards. The answer says how many
//! vCPUs were saved, how long the memory file is and how many bytes of it hold data.
//!
//! Anything else gets `{"ok":false,"error":"..."}`. Pausing and resuming are idempotent. A
//! paused VM still ends on SIGTERM (a parked vCPU re-checks the stop flag).
//!
//! The socket is made by the VMM inside its jail, so only the VM's uid (and root) can connect;
//! the daemon also checks the peer's uid before it trusts an answer. The thread serving it
//! (`vmm-control`) has its own seccomp list ([`crate::seccomp::ThreadKind::Control`]). Requests
//! are served one at a time, and a client that sends nothing is dropped after
//! [`READ_TIMEOUT`], so a stuck client cannot hold the socket.
//!
//! What pausing does to the vCPUs is in [`crate::vcpu`] ([`RunGate`]). The devices keep
//! running while the vCPUs are parked: the guest sees nothing move, and the host's data waits
//! in the queues.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::seccomp::{self, ThreadKind};
use crate::signals;
use crate::snapshot;
use crate::vcpu::RunGate;

/// Name of the control socket inside the VM directory.
pub const CONTROL_SOCKET_NAME: &str = "control.sock";
/// Longest request line accepted, in bytes.
pub const MAX_REQUEST: u64 = 1024;
/// How long a client may take to send its request.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a pause waits for every vCPU to park.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long each vCPU has to save its state for a snapshot.
pub const SNAPSHOT_VCPU_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between kicks while waiting for the vCPUs to park.
const KICK_INTERVAL: Duration = Duration::from_millis(5);

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Park every vCPU.
    Pause,
    /// Let the vCPUs run again.
    Resume,
    /// Say whether the VM is paused.
    State,
    /// Save the paused VM into a new folder `dir` inside the VM's folder.
    Snapshot {
        /// The folder, relative to the VM's folder (see [`snapshot::folder_name`]).
        dir: String,
    },
}

/// What a snapshot wrote, in its answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotInfo {
    /// The folder, as the request named it.
    pub dir: String,
    /// vCPUs saved.
    pub vcpus: usize,
    /// The memory file's length (guest RAM).
    pub memory_bytes: u64,
    /// Bytes of the memory file that hold data (the rest are holes).
    pub memory_data_bytes: u64,
}

/// What the control thread needs to take snapshots.
#[derive(Debug, Clone)]
pub struct SnapshotContext {
    /// The VM's folder, where snapshot folders are made (`/` inside the jail).
    pub vm_dir: PathBuf,
    /// The VM, its memory and its vCPU threads' command channels.
    pub source: snapshot::SnapshotSource,
}

/// Whether the vCPUs run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// The vCPUs run.
    Running,
    /// Every vCPU is parked.
    Paused,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Answer {
    /// A snapshot was written; the VM's state now.
    Snapshot {
        /// Always true.
        ok: bool,
        /// The state (paused).
        state: RunState,
        /// What was written.
        snapshot: SnapshotInfo,
    },
    /// Done; the VM's state now.
    Ok {
        /// Always true.
        ok: bool,
        /// The state.
        state: RunState,
    },
    /// Refused or failed, and why.
    Err {
        /// Always false.
        ok: bool,
        /// Why.
        error: String,
    },
}

impl Answer {
    fn ok(state: RunState) -> Self {
        Answer::Ok { ok: true, state }
    }

    fn err(error: impl Into<String>) -> Self {
        Answer::Err {
            ok: false,
            error: error.into(),
        }
    }
}

/// The vCPU threads the control thread may kick, until the main thread retires them (before
/// it joins them: a thread's id stays valid until it is joined).
#[derive(Debug, Default)]
pub struct Kicker {
    threads: Mutex<Option<Vec<libc::pthread_t>>>,
}

impl Kicker {
    /// Kicks with the vCPU threads `threads`.
    pub fn new(threads: Vec<libc::pthread_t>) -> Self {
        Self {
            threads: Mutex::new(Some(threads)),
        }
    }

    /// Kicks every vCPU out of `KVM_RUN`; `false` once the threads are retired.
    pub fn kick_all(&self) -> bool {
        let threads = self.threads.lock().unwrap_or_else(|p| p.into_inner());
        let Some(threads) = threads.as_ref() else {
            return false;
        };
        for &t in threads {
            // SAFETY: `t` is a vCPU thread of this process that has not been joined (the main
            // thread retires the list, under this lock, before joining any), so its id is
            // valid; a thread that already returned answers ESRCH, which is ignored.
            let _ = unsafe { libc::pthread_kill(t, signals::kick_signal()) };
        }
        true
    }

    /// Ends kicking: called by the main thread before it joins the vCPU threads.
    pub fn retire(&self) {
        *self.threads.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }

    /// How many vCPU threads there are (0 once retired).
    pub fn count(&self) -> usize {
        self.threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, Vec::len)
    }
}

/// Binds the control socket at `path` (a stale one is removed first by the caller).
pub fn bind(path: &Path) -> std::io::Result<UnixListener> {
    UnixListener::bind(path)
}

/// Starts the `vmm-control` thread serving `listener`.
/// `snapshots` is `None` where snapshots cannot be taken (the request is then refused).
pub fn spawn(
    listener: UnixListener,
    gate: Arc<RunGate>,
    kicker: Arc<Kicker>,
    snapshots: Option<SnapshotContext>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vmm-control".into())
        .spawn(move || {
            seccomp::confine_or_exit(ThreadKind::Control);
            serve(&listener, &gate, &kicker, snapshots.as_ref());
        })
}

/// Serves connections one at a time until the listener fails.
fn serve(
    listener: &UnixListener,
    gate: &RunGate,
    kicker: &Kicker,
    snapshots: Option<&SnapshotContext>,
) {
    let mut failures = 0u32;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                failures = 0;
                serve_one(stream, gate, kicker, snapshots);
            }
            Err(e) => {
                failures += 1;
                if failures <= 3 {
                    tracing::warn!(error = %e, "control socket: accept failed");
                }
                // EMFILE and the like: do not spin.
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve_one(
    stream: UnixStream,
    gate: &RunGate,
    kicker: &Kicker,
    snapshots: Option<&SnapshotContext>,
) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut line = Vec::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST + 1));
    let answer = match reader.read_until(b'\n', &mut line) {
        Ok(_) if line.len() as u64 > MAX_REQUEST => Answer::err("request too long"),
        Ok(_) => match serde_json::from_slice::<Request>(&line) {
            Ok(Request::Snapshot { dir }) => handle_snapshot(
                &dir,
                gate,
                kicker.count(),
                &mut || kicker.kick_all(),
                snapshots,
                SNAPSHOT_VCPU_TIMEOUT,
            ),
            Ok(request) => handle(
                request,
                gate,
                kicker.count(),
                &mut || kicker.kick_all(),
                PAUSE_TIMEOUT,
            ),
            Err(e) => Answer::err(format!("bad request: {e}")),
        },
        Err(e) => Answer::err(format!("reading the request: {e}")),
    };
    let mut out = serde_json::to_vec(&answer).unwrap_or_default();
    out.push(b'\n');
    let _ = (&stream).write_all(&out);
}

/// Carries out one request for a VM of `vcpus` vCPU threads (0 once they are retired);
/// `kick` kicks every vCPU out of `KVM_RUN` and says whether it could; a pause waits at most
/// `timeout` for the vCPUs to park.
pub fn handle(
    request: Request,
    gate: &RunGate,
    vcpus: usize,
    kick: &mut dyn FnMut() -> bool,
    timeout: Duration,
) -> Answer {
    match request {
        Request::State => Answer::ok(if gate.is_closed() {
            RunState::Paused
        } else {
            RunState::Running
        }),
        Request::Resume => {
            gate.open();
            tracing::info!("VM resumed");
            Answer::ok(RunState::Running)
        }
        Request::Snapshot { .. } => Answer::err("snapshots are not available here"),
        Request::Pause => {
            if vcpus == 0 {
                return Answer::err("the VM is stopping");
            }
            gate.close();
            let parked = gate.wait_parked(vcpus, KICK_INTERVAL, Instant::now() + timeout, || {
                kick();
            });
            if !parked {
                gate.open();
                return Answer::err(format!(
                    "the vCPUs did not stop within {timeout:?}; the VM keeps running"
                ));
            }
            tracing::info!("VM paused");
            Answer::ok(RunState::Paused)
        }
    }
}

/// Takes a snapshot into `<vm_dir>/<dir>` for a VM of `vcpus` vCPU threads (0 once they are
/// retired); `kick` kicks every vCPU out of `KVM_RUN`; each vCPU has `timeout` to park (the
/// gate may have closed an instant ago, as in a VM restored paused whose threads are still
/// starting) and then to save its state.
pub fn handle_snapshot(
    dir: &str,
    gate: &RunGate,
    vcpus: usize,
    kick: &mut dyn FnMut() -> bool,
    snapshots: Option<&SnapshotContext>,
    timeout: Duration,
) -> Answer {
    let Some(ctx) = snapshots else {
        return Answer::err("snapshots are not available: this VMM could not probe KVM for them");
    };
    if vcpus == 0 {
        return Answer::err("the VM is stopping");
    }
    let name = match snapshot::folder_name(dir) {
        Ok(name) => name,
        Err(e) => return Answer::err(e.to_string()),
    };
    let path = ctx.vm_dir.join(name);
    let parked = gate.is_closed()
        && gate.wait_parked(vcpus, KICK_INTERVAL, Instant::now() + timeout, || {
            kick();
        });
    let started = Instant::now();
    match snapshot::take(&path, &ctx.source, parked, &|| gate.notify(), timeout) {
        Ok(summary) => {
            tracing::info!(
                dir,
                vcpus = summary.vcpus,
                memory_bytes = summary.memory_bytes,
                memory_data_bytes = summary.memory_data_bytes,
                ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX),
                "snapshot taken"
            );
            Answer::Snapshot {
                ok: true,
                state: RunState::Paused,
                snapshot: SnapshotInfo {
                    dir: dir.to_owned(),
                    vcpus: summary.vcpus,
                    memory_bytes: summary.memory_bytes,
                    memory_data_bytes: summary.memory_data_bytes,
                },
            }
        }
        Err(e) => {
            let error = crate::error_chain(&e);
            tracing::warn!(dir, %error, "snapshot failed");
            Answer::err(format!("snapshot failed: {error}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    #[test]
    fn requests_and_answers_have_one_shape() {
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"pause"}"#).unwrap(),
            Request::Pause
        );
        assert!(serde_json::from_str::<Request>(r#"{"verb":"pause"}"#).is_err());
        assert!(serde_json::from_str::<Request>(r#"{"op":"reboot"}"#).is_err());
        assert_eq!(
            serde_json::from_str::<Request>(r#"{"op":"snapshot","dir":"s1"}"#).unwrap(),
            Request::Snapshot { dir: "s1".into() }
        );
        assert!(serde_json::from_str::<Request>(r#"{"op":"snapshot"}"#).is_err());
        let answer = Answer::Snapshot {
            ok: true,
            state: RunState::Paused,
            snapshot: SnapshotInfo {
                dir: "s1".into(),
                vcpus: 2,
                memory_bytes: 1 << 28,
                memory_data_bytes: 30 << 20,
            },
        };
        let line = serde_json::to_string(&answer).unwrap();
        assert_eq!(
            line,
            r#"{"ok":true,"state":"paused","snapshot":{"dir":"s1","vcpus":2,"memory_bytes":268435456,"memory_data_bytes":31457280}}"#
        );
        assert_eq!(serde_json::from_str::<Answer>(&line).unwrap(), answer);
        assert_eq!(
            serde_json::to_string(&Answer::ok(RunState::Paused)).unwrap(),
            r#"{"ok":true,"state":"paused"}"#
        );
    }

    /// Threads that loop like vCPUs (each pass stands for one `KVM_RUN`) park on a pause,
    /// stop counting, and count again after the resume; a stop ends parked threads.
    #[test]
    fn a_pause_parks_every_runner_until_the_resume() {
        let gate = Arc::new(RunGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let counts: Vec<Arc<AtomicU64>> = (0..3).map(|_| Arc::default()).collect();
        let threads: Vec<_> = counts
            .iter()
            .map(|count| {
                let (gate, stop, count) = (gate.clone(), stop.clone(), count.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Acquire) {
                        if gate.park(&stop) {
                            continue;
                        }
                        count.fetch_add(1, Ordering::Relaxed);
                        std::thread::sleep(Duration::from_micros(200));
                    }
                })
            })
            .collect();
        // The runners check the gate on every pass, so they need no kick.
        let mut kick = || true;
        assert_eq!(
            handle(Request::Pause, &gate, 3, &mut kick, PAUSE_TIMEOUT),
            Answer::ok(RunState::Paused)
        );
        assert_eq!(gate.parked(), 3);
        let frozen: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let later: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(frozen, later, "a paused runner does not run");
        assert_eq!(
            handle(Request::State, &gate, 3, &mut kick, PAUSE_TIMEOUT),
            Answer::ok(RunState::Paused)
        );
        assert_eq!(
            handle(Request::Resume, &gate, 3, &mut kick, PAUSE_TIMEOUT),
            Answer::ok(RunState::Running)
        );
        std::thread::sleep(Duration::from_millis(50));
        for (c, before) in counts.iter().zip(&later) {
            assert!(c.load(Ordering::Relaxed) > *before, "runners count again");
        }
        // Paused again, then stopped: parked runners end without a resume.
        assert_eq!(
            handle(Request::Pause, &gate, 3, &mut kick, PAUSE_TIMEOUT),
            Answer::ok(RunState::Paused)
        );
        stop.store(true, Ordering::Release);
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn a_snapshot_without_the_means_or_on_a_stopping_vm_is_refused() {
        let gate = RunGate::default();
        let answer = handle_snapshot("s", &gate, 1, &mut || true, None, SNAPSHOT_VCPU_TIMEOUT);
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
        let answer = handle(
            Request::Snapshot { dir: "s".into() },
            &gate,
            1,
            &mut || true,
            PAUSE_TIMEOUT,
        );
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
    }

    #[test]
    fn a_pause_that_cannot_park_every_vcpu_fails_and_leaves_the_vm_running() {
        let gate = RunGate::default();
        // Two vCPUs, none ever parks: the pause gives up and opens the gate again.
        let started = Instant::now();
        let timeout = Duration::from_millis(100);
        let answer = handle(Request::Pause, &gate, 2, &mut || true, timeout);
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
        assert!(started.elapsed() >= timeout);
        assert!(!gate.is_closed());
        assert!(matches!(
            handle(Request::Pause, &gate, 0, &mut || false, timeout),
            Answer::Err { .. }
        ));
    }
}

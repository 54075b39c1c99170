//! The VMM's control socket, `<vm-dir>/control.sock`: how the daemon pauses and resumes a
//! running VM.
//!
//! One request per connection, one JSON line each way, at most [`MAX_REQUEST`] bytes in:
//!
//! | request | answer |
//! | --- | --- |
//! | `{"op":"pause"}` | `{"ok":true,"state":"paused"}` once every vCPU is parked and every virtio device thread paused |
//! | `{"op":"resume"}` | `{"ok":true,"state":"running"}` |
//! | `{"op":"state"}` | `{"ok":true,"state":"running"\|"paused"\|"moved"}` (`moved` once a live migration moved the VM away) |
//! | `{"op":"snapshot","dir":"NAME"}` | `{"ok":true,"state":"paused","snapshot":{...}}` once written |
//! | `{"op":"migrate","socket":"NAME","downtime_ms":N,"max_rounds":N}` | progress lines `{"progress":{...}}`, one per round, then `{"ok":true\|false,"state":...,"migration":{"outcome":"moved"\|"kept"\|"unknown",...}}` |
//!
//! A snapshot ([`crate::snapshot`]) needs a paused VM and is refused otherwise; `NAME` is a
//! relative path of plain names (no `..`), made as a new folder (mode 0700) inside the VM's
//! folder, whose parent must exist. The VM stays paused afterwards. The answer says how many
//! vCPUs were saved, how long the memory file is and how many bytes of it hold data.
//!
//! A migration ([`crate::migration`]) connects to the Unix socket `NAME` in the VM's folder,
//! which the daemon listens on and relays to the target host, and sends the VM over it while
//! it runs. `moved`: the target runs the VM, and this VMM refuses every request but `state`
//! from then on (the daemon ends it). `kept`: the VM runs on here (or stays paused if it was).
//! `unknown`: the state went out and no answer came back, so the VM stays paused here until
//! the daemon learns from the target's host which copy runs. Closing the socket cancels a
//! migration that has not sent the state yet.
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
//! What pausing does to the vCPUs is in [`crate::vcpu`] ([`RunGate`]). Once they are parked,
//! the virtio device threads are paused too ([`DeviceQuiesce`], see
//! [`crate::devices::virtio::worker_link`]): none touches guest memory until the resume, which
//! lets the devices run again before the vCPUs. A device thread that does not pause within its
//! timeout fails the pause, and the VM runs on. Host data waits in the host sockets meanwhile.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::devices::virtio::state::QuiesceError;
use crate::migration;
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
    /// Live-migrate the VM to the VMM at the other end of the Unix socket `socket` inside the
    /// VM's folder (see [`crate::migration`]).
    Migrate {
        /// The socket's name, relative to the VM's folder (plain names only).
        socket: String,
        /// The downtime target in milliseconds (default 300).
        #[serde(default)]
        downtime_ms: Option<u64>,
        /// The most rounds after the first (default 30).
        #[serde(default)]
        max_rounds: Option<u32>,
    },
}

/// How a migration ended, for the source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationOutcome {
    /// The target runs the VM; this copy never runs again.
    Moved,
    /// The target does not run it; this copy runs on (or stays paused if it was).
    Kept,
    /// The state was sent and no answer came: the target may run it. This copy stays paused;
    /// ask the target's host before resuming it.
    Unknown,
}

/// One pre-copy round, in a progress line and in the answer.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RoundInfo {
    /// 0 for the full copy.
    pub round: u32,
    /// Pages sent.
    pub pages: u64,
    /// Writable disks' blocks sent (4 KiB each).
    #[serde(default)]
    pub blocks: u64,
    /// How long it took, in milliseconds.
    pub ms: f64,
    /// Its rate, MB/s.
    pub mb_per_s: f64,
    /// Pages written meanwhile.
    pub dirty: u64,
    /// How long sending those would take at this rate, in milliseconds.
    pub expected_downtime_ms: f64,
}

impl From<&migration::Round> for RoundInfo {
    fn from(r: &migration::Round) -> Self {
        Self {
            round: r.round,
            pages: r.pages,
            blocks: r.blocks,
            ms: r.elapsed.as_secs_f64() * 1e3,
            mb_per_s: r.bytes_per_second() / 1e6,
            dirty: r.dirty,
            expected_downtime_ms: r.expected_downtime.as_secs_f64() * 1e3,
        }
    }
}

/// What a migration did, in its answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MigrationInfo {
    /// How it ended.
    pub outcome: MigrationOutcome,
    /// Why it failed, when it did.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The pre-copy rounds (empty when it failed).
    #[serde(default)]
    pub rounds: Vec<RoundInfo>,
    /// Pages sent with the VM stopped.
    #[serde(default)]
    pub final_pages: u64,
    /// Writable disks' blocks sent with the VM stopped.
    #[serde(default)]
    pub final_blocks: u64,
    /// From the stop to the target's answer, in milliseconds.
    #[serde(default)]
    pub downtime_ms: f64,
}

/// A progress line sent on the control connection during a migration, before the answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    /// The round that just ended.
    pub progress: RoundInfo,
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
    /// The VM moved to another host by a live migration: its vCPUs stay parked here for good.
    Moved,
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    /// A migration ended: `ok` when the VM moved.
    Migration {
        /// Whether the VM moved.
        ok: bool,
        /// This copy's state now.
        state: RunState,
        /// What happened.
        migration: MigrationInfo,
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

/// The devices a pause quiesces: the VM's virtio devices
/// ([`crate::devices::virtio::VirtioDevices`]).
pub trait DeviceQuiesce: Send + Sync {
    /// Stops every device touching guest memory; waits for each to acknowledge.
    fn pause(&self) -> Result<(), QuiesceError>;
    /// Lets them run again.
    fn resume(&self);
}

impl DeviceQuiesce for crate::devices::virtio::VirtioDevices {
    fn pause(&self) -> Result<(), QuiesceError> {
        crate::devices::virtio::VirtioDevices::pause(self)
    }

    fn resume(&self) {
        crate::devices::virtio::VirtioDevices::resume(self);
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
    devices: Arc<dyn DeviceQuiesce>,
    snapshots: Option<SnapshotContext>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("vmm-control".into())
        .spawn(move || {
            seccomp::confine_or_exit(ThreadKind::Control);
            serve(&listener, &gate, &kicker, &*devices, snapshots.as_ref());
        })
}

/// Serves connections one at a time until the listener fails.
fn serve(
    listener: &UnixListener,
    gate: &RunGate,
    kicker: &Kicker,
    devices: &dyn DeviceQuiesce,
    snapshots: Option<&SnapshotContext>,
) {
    let mut failures = 0u32;
    let mut moved = false;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                failures = 0;
                serve_one(stream, gate, kicker, devices, snapshots, &mut moved);
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
    devices: &dyn DeviceQuiesce,
    snapshots: Option<&SnapshotContext>,
    moved: &mut bool,
) {
    let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
    let mut line = Vec::new();
    let mut reader = BufReader::new((&stream).take(MAX_REQUEST + 1));
    let answer = match reader.read_until(b'\n', &mut line) {
        Ok(_) if line.len() as u64 > MAX_REQUEST => Answer::err("request too long"),
        Ok(_) => match serde_json::from_slice::<Request>(&line) {
            // A VM that moved to another host stays stopped here, whatever is asked; asked its
            // state, it says so (a daemon that restarts mid-migration learns the outcome).
            Ok(Request::State) if *moved => Answer::ok(RunState::Moved),
            Ok(_) if *moved => Answer::err("the VM has moved to another host"),
            Ok(Request::Snapshot { dir }) => handle_snapshot(
                &dir,
                gate,
                kicker.count(),
                &mut || kicker.kick_all(),
                devices,
                snapshots,
                SNAPSHOT_VCPU_TIMEOUT,
            ),
            Ok(Request::Migrate {
                socket,
                downtime_ms,
                max_rounds,
            }) => {
                let answer = handle_migrate(
                    &MigrateRequest {
                        socket: &socket,
                        downtime_ms,
                        max_rounds,
                    },
                    gate,
                    kicker.count(),
                    &mut || kicker.kick_all(),
                    devices,
                    snapshots,
                    &mut |round| {
                        let line = Progress {
                            progress: round.into(),
                        };
                        let mut out = serde_json::to_vec(&line).unwrap_or_default();
                        out.push(b'\n');
                        // A client that stopped reading loses its progress lines, not the
                        // migration.
                        let _ = (&stream).write_all(&out);
                    },
                    SNAPSHOT_VCPU_TIMEOUT,
                );
                *moved = matches!(answer, Answer::Migration { ok: true, .. });
                answer
            }
            Ok(request) => handle(
                request,
                gate,
                kicker.count(),
                &mut || kicker.kick_all(),
                devices,
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
/// `timeout` for the vCPUs to park, then pauses `devices`.
pub fn handle(
    request: Request,
    gate: &RunGate,
    vcpus: usize,
    kick: &mut dyn FnMut() -> bool,
    devices: &dyn DeviceQuiesce,
    timeout: Duration,
) -> Answer {
    match request {
        Request::State => Answer::ok(if gate.is_closed() {
            RunState::Paused
        } else {
            RunState::Running
        }),
        Request::Resume => {
            // The devices first: a vCPU that runs finds them running.
            devices.resume();
            gate.open();
            tracing::info!("VM resumed");
            Answer::ok(RunState::Running)
        }
        Request::Snapshot { .. } => Answer::err("snapshots are not available here"),
        Request::Migrate { .. } => Answer::err("migration is not available here"),
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
            if let Err(e) = devices.pause() {
                devices.resume();
                gate.open();
                tracing::error!(error = %e, "pause failed: a device did not stop");
                return Answer::err(format!("{e}; the VM keeps running"));
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
    devices: &dyn DeviceQuiesce,
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
    // Paused already by the pause (or by a restore that started paused); pausing again is
    // harmless, and makes sure no device writes guest memory while it is copied.
    if parked && let Err(e) = devices.pause() {
        return Answer::err(format!("snapshot failed: {e}"));
    }
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

/// A `migrate` request's arguments.
#[derive(Debug, Clone, Copy)]
pub struct MigrateRequest<'a> {
    /// The link's socket, a plain name inside the VM's folder.
    pub socket: &'a str,
    /// The downtime target, in milliseconds.
    pub downtime_ms: Option<u64>,
    /// The most rounds after the first.
    pub max_rounds: Option<u32>,
}

/// How long the migration link may stall (a write the target does not take, its answer)
/// before the migration fails.
pub const MIGRATION_LINK_TIMEOUT: Duration = Duration::from_secs(60);
/// The most pre-copy rounds a request may ask for.
pub const MAX_MIGRATION_ROUNDS: u32 = 1000;

/// Live-migrates the VM of `vcpus` vCPU threads to the VMM at the other end of the socket the
/// request names ([`crate::migration::send`]); `progress` hears of each round. The VM is
/// stopped for the switch-over (paused as a `pause` pauses it). When the target does not run
/// it, a VM that was running runs on; when it does, this copy stays stopped for good. When the
/// outcome is unknown (the state was sent and no answer came), it stays paused.
#[allow(clippy::too_many_arguments)]
pub fn handle_migrate(
    request: &MigrateRequest<'_>,
    gate: &RunGate,
    vcpus: usize,
    kick: &mut dyn FnMut() -> bool,
    devices: &dyn DeviceQuiesce,
    snapshots: Option<&SnapshotContext>,
    progress: &mut dyn FnMut(&migration::Round),
    timeout: Duration,
) -> Answer {
    let Some(ctx) = snapshots else {
        return Answer::err("migration is not available: this VMM could not probe KVM for it");
    };
    if vcpus == 0 {
        return Answer::err("the VM is stopping");
    }
    let name = match snapshot::folder_name(request.socket) {
        Ok(name) => name,
        Err(_) => {
            return Answer::err(format!(
                "bad migration socket name {:?}: a plain name inside the VM's folder",
                request.socket
            ));
        }
    };
    let mut link = match UnixStream::connect(ctx.vm_dir.join(name)) {
        Ok(link) => link,
        Err(e) => {
            return Answer::err(format!(
                "connect to the migration socket {}: {e}",
                request.socket
            ));
        }
    };
    let _ = link.set_write_timeout(Some(MIGRATION_LINK_TIMEOUT));
    let _ = link.set_read_timeout(Some(MIGRATION_LINK_TIMEOUT));
    let defaults = migration::SendConfig::default();
    let config = migration::SendConfig {
        downtime: request
            .downtime_ms
            .map_or(defaults.downtime, Duration::from_millis),
        max_rounds: request
            .max_rounds
            .unwrap_or(defaults.max_rounds)
            .min(MAX_MIGRATION_ROUNDS),
    };
    let was_paused = gate.is_closed();
    let mut stop = || -> Result<bool, String> {
        if !gate.is_closed() {
            match handle(Request::Pause, gate, vcpus, &mut *kick, devices, timeout) {
                Answer::Err { error, .. } => return Err(error),
                _ => return Ok(true),
            }
        }
        // Paused already: make sure every vCPU is parked and no device writes guest memory.
        let parked = gate.wait_parked(vcpus, KICK_INTERVAL, Instant::now() + timeout, || {
            kick();
        });
        devices.pause().map_err(|e| e.to_string())?;
        Ok(parked)
    };
    let never = std::sync::atomic::AtomicBool::new(false);
    let started = Instant::now();
    let result = migration::send(
        &mut link,
        &ctx.source,
        &config,
        &mut migration::SendHooks {
            stop: &mut stop,
            wake: &|| gate.notify(),
            cancel: &never,
            progress,
            state_timeout: timeout,
        },
    );
    match result {
        Ok(summary) => {
            tracing::info!(
                rounds = summary.rounds.len(),
                final_pages = summary.final_pages,
                final_blocks = summary.final_blocks,
                downtime_ms = summary.downtime.as_secs_f64() * 1e3,
                total_ms = started.elapsed().as_secs_f64() * 1e3,
                "VM migrated: the target runs it"
            );
            Answer::Migration {
                ok: true,
                state: RunState::Paused,
                migration: MigrationInfo {
                    outcome: MigrationOutcome::Moved,
                    error: None,
                    rounds: summary.rounds.iter().map(RoundInfo::from).collect(),
                    final_pages: summary.final_pages,
                    final_blocks: summary.final_blocks,
                    downtime_ms: summary.downtime.as_secs_f64() * 1e3,
                },
            }
        }
        Err(e) => {
            let error = crate::error_chain(&e);
            let (outcome, state) = if !e.source_may_resume() {
                tracing::error!(%error, "migration outcome unknown: the VM stays paused");
                (MigrationOutcome::Unknown, RunState::Paused)
            } else if was_paused {
                tracing::warn!(%error, "migration failed: the VM stays here, paused");
                (MigrationOutcome::Kept, RunState::Paused)
            } else {
                tracing::warn!(%error, "migration failed: the VM runs on here");
                if gate.is_closed() {
                    devices.resume();
                    gate.open();
                }
                (MigrationOutcome::Kept, RunState::Running)
            };
            Answer::Migration {
                ok: false,
                state,
                migration: MigrationInfo {
                    outcome,
                    error: Some(error),
                    rounds: Vec::new(),
                    final_pages: 0,
                    final_blocks: 0,
                    downtime_ms: 0.0,
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

    /// Devices that pause (or refuse to, with `fail`) and remember whether they are paused.
    #[derive(Default)]
    struct MockDevices {
        paused: AtomicBool,
        fail: bool,
    }

    impl DeviceQuiesce for MockDevices {
        fn pause(&self) -> Result<(), QuiesceError> {
            if self.fail {
                return Err(QuiesceError::Timeout {
                    device: "vsock",
                    what: "pause",
                    timeout: Duration::from_secs(2),
                });
            }
            self.paused.store(true, Ordering::SeqCst);
            Ok(())
        }

        fn resume(&self) {
            self.paused.store(false, Ordering::SeqCst);
        }
    }

    /// A device that does not pause fails the pause: the vCPUs run again and the answer says
    /// which device.
    #[test]
    fn a_device_that_does_not_pause_fails_the_pause() {
        let gate = Arc::new(RunGate::default());
        let stop = Arc::new(AtomicBool::new(false));
        let runner = {
            let (gate, stop) = (gate.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Acquire) {
                    gate.park(&stop);
                    std::thread::sleep(Duration::from_micros(200));
                }
            })
        };
        let devs = MockDevices {
            fail: true,
            ..Default::default()
        };
        let answer = handle(Request::Pause, &gate, 1, &mut || true, &devs, PAUSE_TIMEOUT);
        let Answer::Err { error, .. } = answer else {
            panic!("{answer:?}");
        };
        assert!(
            error.contains("vsock device thread did not pause"),
            "{error}"
        );
        assert!(!gate.is_closed(), "the VM runs on");
        assert!(!devs.paused.load(Ordering::SeqCst));
        stop.store(true, Ordering::Release);
        runner.join().unwrap();
    }

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
        let devs = MockDevices::default();
        assert_eq!(
            handle(Request::Pause, &gate, 3, &mut kick, &devs, PAUSE_TIMEOUT),
            Answer::ok(RunState::Paused)
        );
        assert_eq!(gate.parked(), 3);
        assert!(
            devs.paused.load(Ordering::SeqCst),
            "the devices are paused too"
        );
        let frozen: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        std::thread::sleep(Duration::from_millis(50));
        let later: Vec<u64> = counts.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        assert_eq!(frozen, later, "a paused runner does not run");
        assert_eq!(
            handle(Request::State, &gate, 3, &mut kick, &devs, PAUSE_TIMEOUT),
            Answer::ok(RunState::Paused)
        );
        assert_eq!(
            handle(Request::Resume, &gate, 3, &mut kick, &devs, PAUSE_TIMEOUT),
            Answer::ok(RunState::Running)
        );
        assert!(!devs.paused.load(Ordering::SeqCst), "and resumed");
        std::thread::sleep(Duration::from_millis(50));
        for (c, before) in counts.iter().zip(&later) {
            assert!(c.load(Ordering::Relaxed) > *before, "runners count again");
        }
        // Paused again, then stopped: parked runners end without a resume.
        assert_eq!(
            handle(Request::Pause, &gate, 3, &mut kick, &devs, PAUSE_TIMEOUT),
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
        let answer = handle_snapshot(
            "s",
            &gate,
            1,
            &mut || true,
            &MockDevices::default(),
            None,
            SNAPSHOT_VCPU_TIMEOUT,
        );
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
        let answer = handle(
            Request::Snapshot { dir: "s".into() },
            &gate,
            1,
            &mut || true,
            &MockDevices::default(),
            PAUSE_TIMEOUT,
        );
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
    }

    #[test]
    fn a_pause_that_cannot_park_every_vcpu_fails_and_leaves_the_vm_running() {
        let gate = RunGate::default();
        let devs = MockDevices::default();
        // Two vCPUs, none ever parks: the pause gives up and opens the gate again.
        let started = Instant::now();
        let timeout = Duration::from_millis(100);
        let answer = handle(Request::Pause, &gate, 2, &mut || true, &devs, timeout);
        assert!(matches!(answer, Answer::Err { .. }), "{answer:?}");
        assert!(started.elapsed() >= timeout);
        assert!(!gate.is_closed());
        assert!(matches!(
            handle(Request::Pause, &gate, 0, &mut || false, &devs, timeout),
            Answer::Err { .. }
        ));
    }
}

//! What the daemon keeps on disk about each VM, and the process facts it checks on restart.
//!
//! Each VM owns `<state-dir>/vms/<id>/`:
//! - `vm.json`: its [`VmRecord`] (spec, VMM pid and start time, status, agent exit), written
//!   through a temporary file and a rename so a crash never leaves half a record;
//! - `agent-output.ndjson`: its events, one JSON line each, capped in size (every event the
//!   guest triggers counts against the cap);
//! - `vmm.log`: the VMM's own stdout/stderr, capped in size, and `vmm.pipe`, the FIFO the
//!   daemon copies it from (see [`super::vmm_log`]);
//! - `vmm/`: the VMM's folder, the root of its jail: `exit.json` and `console.log`, written by
//!   the VMM, and `vsock.sock`, `vsock.sock_<port>`, the hybrid vsock sockets.
//!
//! A pid alone does not identify a process across a daemon restart (pids are reused), so the
//! record also keeps the process start time from `/proc/<pid>/stat` and a VMM counts as alive
//! only if both match.

use std::io::Read;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use nanoclaw_api::{AgentExit, CreateVm, VmStatus, VmmExit};

/// The record's file name inside a VM's directory.
pub const RECORD_FILE: &str = "vm.json";
/// The VMM's exit record, written by the VMM.
pub const EXIT_FILE: &str = "exit.json";

/// The VMM's own folder inside a VM's directory: the jail's root (sockets, console log, exit
/// record). See [`super::jail`].
pub const VMM_DIR: &str = "vmm";
/// The agent event log.
pub const OUTPUT_FILE: &str = "agent-output.ndjson";
/// The serial console log, written by the VMM.
pub const CONSOLE_FILE: &str = "console.log";
/// The VMM's own stdout and stderr.
pub const VMM_LOG_FILE: &str = "vmm.log";

/// Errors of the on-disk state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Reading a file failed.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file failed.
    #[error("cannot write {}", .path.display())]
    Write {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A record does not parse.
    #[error("cannot parse {}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// Creating a VM directory failed.
    #[error("cannot create a VM directory under {}", .path.display())]
    CreateDir {
        /// The parent directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// The persistent record of one VM (`vm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    /// The VM id.
    pub id: String,
    /// What it was created with.
    pub spec: CreateVm,
    /// Creation time, ms since the epoch.
    pub created_unix_ms: u64,
    /// Where it stands.
    pub status: VmStatus,
    /// The VMM's host pid.
    pub vmm_pid: Option<u32>,
    /// The VMM's start time in clock ticks since boot (`/proc/<pid>/stat` field 22).
    pub vmm_start_ticks: Option<u64>,
    /// The sidecar's boot id (hex) from its first accepted hello.
    pub boot_id: Option<String>,
    /// Whether `RunAgent` was sent for that boot.
    pub agent_sent: bool,
    /// The agent's pid in the guest.
    pub agent_pid: Option<u32>,
    /// How the agent ended.
    pub agent_exit: Option<AgentExit>,
    /// How the VMM ended.
    pub vmm_exit: Option<VmmExit>,
    /// Whether someone asked to stop the VM.
    pub stop_requested: bool,
    /// Control reconnects accepted for this boot.
    pub control_reconnects: u64,
    /// Guest protocol errors seen.
    pub guest_protocol_errors: u64,
    /// Output bytes dropped from the output log.
    pub output_dropped_bytes: u64,
    /// Other guest-triggered events not written to the output log because it was full.
    #[serde(default)]
    pub events_dropped: u64,
    /// Bytes of the VMM's output not written to `vmm.log` because it reached its cap.
    #[serde(default)]
    pub vmm_log_dropped_bytes: u64,
    /// The image the VM runs, with its disks (absent for initramfs-only VMs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<super::images::VmImage>,
    /// Whether the VMM's files live in `<dir>/vmm/` ([`VMM_DIR`]); records written before that
    /// folder existed have them in `<dir>` itself.
    #[serde(default)]
    pub vmm_subdir: bool,
    /// The uid (and gid) of the VM's jailed VMM, when it is jailed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jail_uid: Option<u32>,
    /// The VM's cgroup folders, removed when it has ended.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub jail_cgroups: Vec<PathBuf>,
    /// The orchestrator VM that spawned this one (`spawn_agent`); `None` for a VM the user
    /// created. A child is stopped when its parent ends, unless [`VmRecord::detached`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
    /// Whether the user detached this VM from its parent: it then outlives the parent and no
    /// longer counts against the parent's children.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub detached: bool,
    /// Whether the VM's vCPUs are paused (`POST /v1/vms/{id}/pause`). A daemon that restarts
    /// finds the VMM still paused: the VMM keeps its own state.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
    /// The snapshot this VM's VMM restores instead of booting, when it was made by a restore.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Restore>,
    /// The VM's addresses, when its profile gives it a network (`[network] egress`): held
    /// until the VM is removed, so a restarted daemon never hands them to another.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net: Option<crate::net::addr::VmLink>,
    /// Set while a restored guest still has its snapshot's identity (see
    /// [`Reidentify`]); cleared once it said hello with a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reidentify: Option<Reidentify>,
    /// Whether this VM is an image's warm template being made: its guest is never sent an
    /// agent (see `super::warm`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub template: bool,
    /// A `Thaw` that found no control connection: sent when the sidecar connects again, so
    /// a guest frozen for a snapshot never stays frozen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub thaw_pending: bool,
    /// How many times this VM's guest took a new identity on the daemon's request.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reidentified: u32,
    /// The local socket this VM's VMM receives a live migration on (`--migrate-from`), when it
    /// was made by one (see `crate::migration`): the VMM boots no kernel.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrate_in: Option<PathBuf>,
    /// Where a live migration took this VM, or may have (outcome `unknown`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_to: Option<nanoclaw_api::MigratedTo>,
    /// Where a live migration brought this VM from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrated_from: Option<nanoclaw_api::MigratedTo>,
    /// A live migration out whose copy began and whose outcome is not yet recorded: where the
    /// VM is going. A daemon that restarts with it set asks the VMM how the migration ended
    /// (see `migrate::settle_interrupted`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrating_to: Option<nanoclaw_api::MigratedTo>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A restored guest that must take a new identity before it is admitted: every restore is
/// treated as a clone, since a snapshot may be restored any number of times. Its first hello
/// (with the snapshot's boot id) is acknowledged and answered with `Reidentify`, nothing else:
/// no agent request and no credential relay. The hello that follows with another boot id is
/// admitted as the VM's boot.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reidentify {
    /// The boot id (hex) the `Reidentify` was sent to; a hello with it again is answered with
    /// another `Reidentify`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sent_to: Option<String>,
}

/// Where a restored VM's VMM finds its snapshot: the snapshot's folder in the store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Restore {
    /// The snapshot's name in the store.
    pub snapshot: String,
    /// The snapshot's folder (`--restore`), which the VMM reads before it enters its jail.
    pub dir: PathBuf,
    /// Whether the vCPUs start paused (`--restore-paused`).
    pub paused: bool,
}

impl VmRecord {
    /// A fresh record for a VM about to start.
    pub fn new(id: String, spec: CreateVm, created_unix_ms: u64) -> Self {
        Self {
            id,
            spec,
            created_unix_ms,
            status: VmStatus::Starting,
            vmm_pid: None,
            vmm_start_ticks: None,
            boot_id: None,
            agent_sent: false,
            agent_pid: None,
            agent_exit: None,
            vmm_exit: None,
            stop_requested: false,
            control_reconnects: 0,
            guest_protocol_errors: 0,
            output_dropped_bytes: 0,
            events_dropped: 0,
            vmm_log_dropped_bytes: 0,
            image: None,
            vmm_subdir: true,
            jail_uid: None,
            jail_cgroups: Vec::new(),
            parent: None,
            detached: false,
            paused: false,
            restore: None,
            net: None,
            reidentify: None,
            template: false,
            thaw_pending: false,
            reidentified: 0,
            migrate_in: None,
            migrated_to: None,
            migrated_from: None,
            migrating_to: None,
        }
    }

    /// Loads `<dir>/vm.json`.
    pub fn load(dir: &Path) -> Result<Self, StateError> {
        let path = dir.join(RECORD_FILE);
        let text = std::fs::read(&path).map_err(|source| StateError::Read {
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&text).map_err(|source| StateError::Parse { path, source })
    }

    /// Replaces `<dir>/vm.json` durably (`shared_proto::fs::replace_file`: a crash leaves the
    /// old record or the new one, never a mix).
    pub fn save(&self, dir: &Path) -> Result<(), StateError> {
        let path = dir.join(RECORD_FILE);
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| StateError::Write {
            path: path.clone(),
            source: std::io::Error::other(e),
        })?;
        text.push(b'\n');
        shared_proto::fs::replace_file(&path, &text, shared_proto::fs::DEFAULT_MODE).map_err(|e| {
            StateError::Write {
                path,
                source: e.into(),
            }
        })
    }
}

/// Reads the VMM's `exit.json` in `dir`, if it wrote one. Tolerates missing fields; a file that
/// is not a JSON object is treated as absent.
pub fn read_vmm_exit(dir: &Path) -> Option<VmmExit> {
    #[derive(Deserialize)]
    struct ExitJson {
        reason: Option<String>,
        exit_code: Option<i32>,
        boot_to_ready_ms: Option<u64>,
        #[serde(default)]
        vsock: std::collections::BTreeMap<String, u64>,
        #[serde(default)]
        disks: Vec<nanoclaw_api::DiskCounters>,
        #[serde(default)]
        syscall: Option<String>,
    }
    let mut text = Vec::new();
    // Written by the VMM in its own folder: a link there is the VMM's, never followed.
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(dir.join(EXIT_FILE))
        .ok()?
        .take(64 * 1024)
        .read_to_end(&mut text)
        .ok()?;
    let e: ExitJson = serde_json::from_slice(&text).ok()?;
    Some(VmmExit {
        reason: e.reason.unwrap_or_else(|| "unknown".to_owned()),
        exit_code: e.exit_code,
        signal: None,
        boot_to_ready_ms: e.boot_to_ready_ms,
        vsock: e.vsock,
        disks: e.disks,
        syscall: e.syscall,
    })
}

/// The start time (clock ticks since boot) of process `pid`, or `None` when it does not exist
/// or is a zombie.
pub fn process_start_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&stat)
}

/// Parses a `/proc/<pid>/stat` line: `None` for a zombie or a malformed line, else field 22.
fn parse_stat(stat: &str) -> Option<u64> {
    // The command name (field 2) may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let mut fields = rest.split_ascii_whitespace();
    // Field 3 is the state.
    let state = fields.next()?;
    if state == "Z" || state == "X" {
        return None;
    }
    // Fields 4..=21 precede the start time (field 22).
    fields.nth(18)?.parse().ok()
}

/// Whether the process recorded as (`pid`, `start_ticks`) still runs.
pub fn process_matches(pid: u32, start_ticks: u64) -> bool {
    process_start_ticks(pid) == Some(start_ticks)
}

/// Creates a fresh VM directory under `vms` with a random 8-hex-digit id.
pub fn create_vm_dir(vms: &Path) -> Result<(String, PathBuf), StateError> {
    let fail = |source| StateError::CreateDir {
        path: vms.to_path_buf(),
        source,
    };
    for _ in 0..16 {
        let id = random_id().map_err(fail)?;
        let dir = vms.join(&id);
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok((id, dir)),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => return Err(fail(e)),
        }
    }
    Err(fail(std::io::Error::other("no free id after 16 tries")))
}

/// Eight lowercase hex digits from the kernel's random source.
pub(crate) fn random_id() -> std::io::Result<String> {
    let mut bytes = [0u8; 4];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Milliseconds since the Unix epoch.
pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_start_time_survives_odd_names() {
        let line = "42 (a b) c)) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(line), Some(987_654));
        let zombie = "42 (x) Z 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 1 0 987654 1000 10";
        assert_eq!(parse_stat(zombie), None);
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn this_process_matches_itself_only() {
        let me = std::process::id();
        let ticks = process_start_ticks(me).unwrap();
        assert!(process_matches(me, ticks));
        assert!(!process_matches(me, ticks + 1));
    }

    #[test]
    fn records_round_trip_and_ids_are_hex() {
        let root = tempfile::tempdir().unwrap();
        let (id, dir) = create_vm_dir(root.path()).unwrap();
        assert_eq!(id.len(), 8);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        assert!(id.chars().all(|c| c.is_ascii_hexdigit()));
        let mut rec = VmRecord::new(id, CreateVm::new("/bin/sh", vec!["-c".into()]), 5);
        rec.save(&dir).unwrap();
        assert_eq!(VmRecord::load(&dir).unwrap(), rec);
        rec.parent = Some("0badc0de".into());
        rec.detached = true;
        rec.net = Some(crate::net::addr::VmLink {
            gateway: "10.200.0.9".parse().unwrap(),
            guest: "10.200.0.10".parse().unwrap(),
            host_end: "10.200.0.13".parse().unwrap(),
            netns_end: "10.200.0.14".parse().unwrap(),
        });
        rec.save(&dir).unwrap();
        assert_eq!(VmRecord::load(&dir).unwrap(), rec);
    }

    #[test]
    fn records_without_a_parent_link_still_load() {
        let dir = tempfile::tempdir().unwrap();
        let rec = VmRecord::new("abcd0123".into(), CreateVm::new("/bin/a", vec![]), 5);
        let mut json = serde_json::to_value(&rec).unwrap();
        let fields = json.as_object_mut().unwrap();
        assert!(!fields.contains_key("parent") && !fields.contains_key("detached"));
        assert!(!fields.contains_key("net"));
        std::fs::write(dir.path().join(RECORD_FILE), json.to_string()).unwrap();
        let loaded = VmRecord::load(dir.path()).unwrap();
        assert_eq!((loaded.parent, loaded.detached), (None, false));
    }

    #[test]
    fn exit_json_is_read_leniently() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read_vmm_exit(dir.path()), None);
        std::fs::write(
            dir.path().join(EXIT_FILE),
            r#"{"reason":"reset","exit_code":0,"boot_to_ready_ms":null}"#,
        )
        .unwrap();
        let e = read_vmm_exit(dir.path()).unwrap();
        assert_eq!((e.reason.as_str(), e.exit_code), ("reset", Some(0)));
        assert_eq!(e.syscall, None);
        std::fs::write(dir.path().join(EXIT_FILE), "[1,2]").unwrap();
        assert_eq!(read_vmm_exit(dir.path()), None);
        // What the VMM's SIGSYS handler writes.
        std::fs::write(
            dir.path().join(EXIT_FILE),
            r#"{"reason":"seccomp","exit_code":14,"syscall":"getppid","syscall_nr":110}"#,
        )
        .unwrap();
        let e = read_vmm_exit(dir.path()).unwrap();
        assert_eq!(e.reason, "seccomp");
        assert_eq!(e.exit_code, Some(14));
        assert_eq!(e.syscall.as_deref(), Some("getppid"));
        // The record the handler pre-creates, still empty: absent.
        std::fs::write(dir.path().join(EXIT_FILE), "").unwrap();
        assert_eq!(read_vmm_exit(dir.path()), None);
        // A hostile VMM's link out of its folder is not followed.
        let elsewhere = dir.path().join("elsewhere.json");
        std::fs::write(&elsewhere, r#"{"reason":"reset","exit_code":0}"#).unwrap();
        std::fs::remove_file(dir.path().join(EXIT_FILE)).unwrap();
        std::os::unix::fs::symlink(&elsewhere, dir.path().join(EXIT_FILE)).unwrap();
        assert_eq!(read_vmm_exit(dir.path()), None);
    }
}

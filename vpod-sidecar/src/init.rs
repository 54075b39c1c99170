//! PID 1 duties: the basic mounts, the console, reaping zombies and resetting the VM.
//!
//! Nothing here is fatal: a PID 1 that exits or panics panics the guest kernel, so failures are
//! returned for logging and the sidecar carries on.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::OpenOptionsExt;
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::reboot::RebootMode;
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::Pid;

/// Errors of the PID 1 duties.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Creating a mount point failed.
    #[error("cannot create {target}")]
    MountPoint {
        /// The directory.
        target: &'static str,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A mount failed.
    #[error("cannot mount {fstype} on {target}")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The mount point.
        target: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Opening the console failed.
    #[error("cannot open /dev/console")]
    Console(#[source] std::io::Error),
    /// Starting the reaper thread failed.
    #[error("cannot start the reaper")]
    Reaper(#[source] std::io::Error),
    /// The reset syscall failed.
    #[error("reboot(RB_AUTOBOOT) failed")]
    Reset(#[source] Errno),
}

/// One mount of [`MOUNTS`].
struct Mount {
    fstype: &'static str,
    target: &'static str,
    flags: MsFlags,
    data: Option<&'static str>,
}

const NOSUID_NODEV_NOEXEC: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The mounts, in order. `/proc` comes first so that `/proc/mounts` can tell which of the
/// others are already there.
const MOUNTS: &[Mount] = &[
    Mount {
        fstype: "proc",
        target: "/proc",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "sysfs",
        target: "/sys",
        flags: NOSUID_NODEV_NOEXEC,
        data: None,
    },
    Mount {
        fstype: "devtmpfs",
        target: "/dev",
        flags: MsFlags::MS_NOSUID,
        data: Some("mode=0755"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/tmp",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=1777"),
    },
    Mount {
        fstype: "tmpfs",
        target: "/run",
        flags: MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV),
        data: Some("mode=0755"),
    },
];

/// Whether `target` is a mount point according to `mounts` (the text of `/proc/mounts`).
fn is_mounted(mounts: &str, target: &str) -> bool {
    mounts
        .lines()
        .filter_map(|line| line.split_whitespace().nth(1))
        .any(|mount_point| mount_point == target)
}

/// Mounts `/proc`, `/sys`, `/dev`, `/tmp` and `/run`, skipping those already mounted, and
/// returns the failures.
pub fn mount_basics() -> Vec<InitError> {
    let mut failures = Vec::new();
    for m in MOUNTS {
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        if is_mounted(&mounts, m.target) {
            continue;
        }
        if let Err(source) = std::fs::create_dir_all(m.target) {
            failures.push(InitError::MountPoint {
                target: m.target,
                source,
            });
            continue;
        }
        match nix::mount::mount(Some(m.fstype), m.target, Some(m.fstype), m.flags, m.data) {
            Ok(()) | Err(Errno::EBUSY) => {}
            Err(source) => failures.push(InitError::Mount {
                fstype: m.fstype,
                target: m.target,
                source,
            }),
        }
    }
    failures
}

/// Opens `/dev/console` for writing logs.
pub fn open_console() -> Result<File, InitError> {
    OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_NOCTTY)
        .open("/dev/console")
        .map_err(InitError::Console)
}

/// The pause when there is no child to wait for.
const NO_CHILD_PAUSE: Duration = Duration::from_secs(1);

/// Starts a thread that reaps every exited child, so none stays a zombie.
///
/// When the agent runner arrives, it will take the agent's status from here (a channel keyed
/// by pid) rather than calling `waitpid` itself, since this thread collects every child.
pub fn spawn_reaper() -> Result<(), InitError> {
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(|| {
            loop {
                match waitpid(Pid::from_raw(-1), None) {
                    Ok(WaitStatus::Exited(pid, code)) => {
                        tracing::debug!(pid = pid.as_raw(), code, "reaped");
                    }
                    Ok(WaitStatus::Signaled(pid, signal, _)) => {
                        tracing::debug!(pid = pid.as_raw(), ?signal, "reaped");
                    }
                    Ok(_) | Err(Errno::EINTR) => {}
                    // No children: wait for some to appear without spinning.
                    Err(_) => std::thread::sleep(NO_CHILD_PAUSE),
                }
            }
        })
        .map(drop)
        .map_err(InitError::Reaper)
}

/// Flushes file systems and resets the VM. Returns only if the reset failed.
pub fn reset_vm() -> InitError {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(RebootMode::RB_AUTOBOOT) {
        Err(e) => InitError::Reset(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_found_in_proc_mounts() {
        let mounts = "proc /proc proc rw,nosuid 0 0\n\
                      devtmpfs /dev devtmpfs rw 0 0\n\
                      tmpfs /run/user tmpfs rw 0 0\n";
        assert!(is_mounted(mounts, "/proc"));
        assert!(is_mounted(mounts, "/dev"));
        assert!(!is_mounted(mounts, "/run"));
        assert!(!is_mounted(mounts, "/sys"));
        assert!(!is_mounted("", "/proc"));
    }

    #[test]
    fn proc_is_mounted_first() {
        assert_eq!(MOUNTS[0].target, "/proc");
        let targets: Vec<_> = MOUNTS.iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/tmp", "/run"]);
    }
}

//! Jailing the VMMs: the daemon's side.
//!
//! With the jail on (the default when the daemon runs as root), every VMM is started with
//! `--jail-uid`/`--jail-gid` and its cgroups, and enters its jail itself before it touches the
//! guest (see the VMM's `jail` module and `docs/security/jail.md`). The daemon:
//! - gives each running VM a uid (and the same gid) of its own from the configured range;
//! - makes the VM's cgroups with cpu, memory and pids limits taken from its config
//!   ([`super::cgroup`]) and removes them when the VM has ended;
//! - hands the VM's writable disk to that uid, and lets it reach the listener sockets the
//!   daemon binds in the VMM's folder ([`open_to_vmm`]).
//!
//! The VMM's folder is `<vm-dir>/vmm/`: the jail's root. It holds the VMM's sockets, console log
//! and exit record, and the mount points of the kernel, initramfs, disks and `/dev/kvm`; the
//! daemon's own files for the VM (its record, the agent's output) stay one level up, out of reach.

use std::path::{Path, PathBuf};

use super::cgroup::{self, Hierarchies, Limits};

/// Whether VMMs are jailed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum JailMode {
    /// Jail when the daemon runs as root; otherwise run unjailed and say so at startup.
    #[default]
    Auto,
    /// Always jail; the daemon refuses to start without root.
    On,
    /// Never jail (development only: a VMM taken over by its guest acts as the daemon's user).
    Off,
}

/// Whether a jailed VMM also enters a user namespace of its own (which maps only its uid and
/// gid onto themselves; see the VMM's `jail` module).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum UserNsMode {
    /// When a child of the daemon may make a user namespace (tried at startup; the sysctl
    /// `user.max_user_namespaces` or a chroot can forbid it); otherwise without one, said at
    /// startup.
    #[default]
    Auto,
    /// Always; the daemon refuses to start when the host allows none.
    On,
    /// Never.
    Off,
}

/// The VMM's memory beside guest RAM, allowed by the memory cgroup: measured at about 20 MiB
/// of resident memory for a running VMM with vsock and two disks (`scripts/bench-jail`), plus
/// room for the page cache of disk writes, which the kernel charges to the cgroup.
pub const MEMORY_OVERHEAD_MIB: u64 = 96;

/// The jail's settings, when the jail is on.
#[derive(Debug, Clone)]
pub struct JailSettings {
    /// The first uid (and gid) given to a VMM.
    pub uid_base: u32,
    /// How many uids there are from `uid_base`: at most this many VMs run at once.
    pub uid_count: u32,
    /// The parent of every VM's cgroup, in each hierarchy.
    pub cgroup_parent: String,
    /// Where the cgroup controllers are.
    pub hierarchies: Hierarchies,
    /// Whether each VMM also enters a user namespace (`--jail-userns`).
    pub user_namespace: bool,
}

/// Errors of setting up the jail.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// `--jail on` without root.
    #[error("--jail on needs the daemon to run as root (it runs as uid {0})")]
    NotRoot(u32),
    /// A bad range of uids.
    #[error("the jail's uid range {base}..+{count} must be above 0 and fit in 32 bits")]
    Range {
        /// The first uid.
        base: u32,
        /// How many.
        count: u32,
    },
    /// A bad cgroup parent name.
    #[error("the cgroup parent {0:?} must be a plain relative path (no `..`, not absolute)")]
    Parent(String),
    /// `--jail-userns on` on a host that allows no user namespace.
    #[error("--jail-userns on, but this host allows no user namespace ({0})")]
    NoUserNamespaces(String),
    /// Every uid of the range is taken by a running VM.
    #[error("all {0} jail uids are in use by running VMs")]
    NoUid(u32),
    /// The VM's cgroups could not be made.
    #[error("cgroups")]
    Cgroup(#[from] cgroup::CgroupError),
    /// The writable disk could not be handed to the VM's uid.
    #[error("cannot hand {} to the VM's uid", .path.display())]
    Chown {
        /// The disk.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

impl JailSettings {
    /// The settings for `mode`, or `None` when VMMs run unjailed.
    pub fn new(
        mode: JailMode,
        uid_base: u32,
        uid_count: u32,
        cgroup_parent: &str,
    ) -> Result<Option<Self>, JailError> {
        let root = nix::unistd::geteuid().is_root();
        match (mode, root) {
            (JailMode::Off, _) => {
                tracing::warn!("VMMs run unjailed (--jail off)");
                return Ok(None);
            }
            (JailMode::Auto, false) => {
                tracing::warn!(
                    "VMMs run unjailed: jailing them needs the daemon to run as root \
                     (--jail on makes this an error)"
                );
                return Ok(None);
            }
            (JailMode::On, false) => {
                return Err(JailError::NotRoot(nix::unistd::geteuid().as_raw()));
            }
            (_, true) => {}
        }
        if uid_base == 0 || uid_count == 0 || uid_base.checked_add(uid_count).is_none() {
            return Err(JailError::Range {
                base: uid_base,
                count: uid_count,
            });
        }
        let parent = Path::new(cgroup_parent);
        if cgroup_parent.is_empty()
            || parent.is_absolute()
            || parent
                .components()
                .any(|c| !matches!(c, std::path::Component::Normal(_)))
        {
            return Err(JailError::Parent(cgroup_parent.to_owned()));
        }
        let hierarchies = Hierarchies::detect();
        tracing::info!(uid_base, uid_count, ?hierarchies, "VMMs are jailed");
        Ok(Some(JailSettings {
            uid_base,
            uid_count,
            cgroup_parent: cgroup_parent.to_owned(),
            hierarchies,
            user_namespace: false,
        }))
    }

    /// Decides, for `mode`, whether VMMs enter a user namespace too.
    pub fn with_user_namespace(mut self, mode: UserNsMode) -> Result<Self, JailError> {
        let allowed = host_allows_user_namespaces();
        self.user_namespace = match (mode, allowed) {
            (UserNsMode::Off, _) => false,
            (_, Ok(())) => true,
            (UserNsMode::Auto, Err(why)) => {
                tracing::warn!(%why, "VMMs are jailed without a user namespace");
                false
            }
            (UserNsMode::On, Err(why)) => return Err(JailError::NoUserNamespaces(why)),
        };
        tracing::info!(user_namespace = self.user_namespace, "VMM jail");
        Ok(self)
    }

    /// The lowest uid of the range that no running VM holds.
    pub fn pick_uid(&self, in_use: &std::collections::HashSet<u32>) -> Result<u32, JailError> {
        (self.uid_base..self.uid_base + self.uid_count)
            .find(|u| !in_use.contains(u))
            .ok_or(JailError::NoUid(self.uid_count))
    }

    /// Prepares VM `id`'s jail for uid `uid`: its cgroups (returned, to be joined by the VMM
    /// and removed when it ends) and the ownership of its writable disk.
    pub fn prepare(
        &self,
        id: &str,
        uid: u32,
        vcpus: u8,
        memory_mib: u64,
        writable: Option<&Path>,
    ) -> Result<Vec<PathBuf>, JailError> {
        if let Some(disk) = writable {
            std::os::unix::fs::chown(disk, Some(uid), Some(uid)).map_err(|source| {
                JailError::Chown {
                    path: disk.to_owned(),
                    source,
                }
            })?;
        }
        let limits = Limits::for_vm(vcpus, memory_mib, MEMORY_OVERHEAD_MIB);
        Ok(self.hierarchies.create(&self.cgroup_parent, id, limits)?)
    }
}

/// Whether this daemon's children may make a user namespace: `Err` says why not. Tried for
/// real, in a forked child: the sysctl alone does not tell, since the kernel also refuses one
/// to a process in a chroot.
fn host_allows_user_namespaces() -> Result<(), String> {
    const LIMIT: &str = "/proc/sys/user/max_user_namespaces";
    let text = std::fs::read_to_string(LIMIT).map_err(|e| format!("{LIMIT}: {e}"))?;
    match text.trim().parse::<u64>() {
        Ok(0) => return Err(format!("{LIMIT} is 0")),
        Ok(_) => {}
        Err(_) => return Err(format!("{LIMIT} holds {:?}", text.trim())),
    }
    // SAFETY: the child makes only async-signal-safe calls (unshare, _exit) before it ends,
    // so forking a multi-threaded process is sound.
    match unsafe { nix::unistd::fork() } {
        Ok(nix::unistd::ForkResult::Child) => {
            let code = match nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWUSER) {
                Ok(()) => 0,
                Err(e) => e as i32,
            };
            // SAFETY: _exit ends the child at once, running nothing of the parent's state.
            unsafe { libc::_exit(code) }
        }
        Ok(nix::unistd::ForkResult::Parent { child }) => loop {
            match nix::sys::wait::waitpid(child, None) {
                Ok(nix::sys::wait::WaitStatus::Exited(_, 0)) => return Ok(()),
                Ok(nix::sys::wait::WaitStatus::Exited(_, errno)) => {
                    return Err(format!(
                        "a child cannot make one: {}",
                        nix::errno::Errno::from_raw(errno).desc()
                    ));
                }
                Err(nix::errno::Errno::EINTR) => continue,
                other => return Err(format!("the probe child ended as {other:?}")),
            }
        },
        Err(e) => Err(format!("cannot fork the probe: {e}")),
    }
}

/// Lets the jailed VMM (uid `owner`; `None` when unjailed) connect to a listener socket the
/// daemon bound in the VMM's folder, by giving the socket to that uid. `lchown` never follows
/// a link: the folder is the VMM's, which could have swapped the socket for a link to a host
/// file after the bind.
pub fn open_to_vmm(socket: &Path, owner: Option<u32>) -> std::io::Result<()> {
    match owner {
        Some(uid) => std::os::unix::fs::lchown(socket, Some(uid), Some(uid)),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(base: u32, count: u32) -> JailSettings {
        JailSettings {
            uid_base: base,
            uid_count: count,
            cgroup_parent: "nanoclaw".to_owned(),
            hierarchies: Hierarchies::default(),
            user_namespace: false,
        }
    }

    #[test]
    fn uids_are_the_lowest_free_and_run_out_with_a_clear_error() {
        let s = settings(1000, 3);
        let mut used = std::collections::HashSet::new();
        assert_eq!(s.pick_uid(&used).unwrap(), 1000);
        used.insert(1000);
        used.insert(1002);
        assert_eq!(s.pick_uid(&used).unwrap(), 1001);
        used.insert(1001);
        let err = s.pick_uid(&used).unwrap_err();
        assert_eq!(err.to_string(), "all 3 jail uids are in use by running VMs");
    }

    #[test]
    fn bad_settings_are_refused() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("skipped: the checks run only where the jail can be on");
            return;
        }
        assert!(matches!(
            JailSettings::new(JailMode::On, 0, 10, "nanoclaw"),
            Err(JailError::Range { .. })
        ));
        assert!(matches!(
            JailSettings::new(JailMode::On, u32::MAX, 10, "nanoclaw"),
            Err(JailError::Range { .. })
        ));
        for parent in ["", "/abs", "../up", "a/../b"] {
            assert!(
                matches!(
                    JailSettings::new(JailMode::On, 1000, 10, parent),
                    Err(JailError::Parent(_))
                ),
                "{parent:?}"
            );
        }
        assert!(
            JailSettings::new(JailMode::Off, 0, 0, "")
                .unwrap()
                .is_none()
        );
    }
}

//! Each networked VM's own network namespace.
//!
//! **Made without `ip netns`**, which keeps its files in `/run/netns` (read-only on some hosts):
//! a short-lived thread of the daemon unshares a new network namespace and bind-mounts its own
//! `/proc/thread-self/ns/net` onto `<vm-dir>/netns`; the mount keeps the namespace alive after
//! the thread ends. [`VmNetns::remove`] unmounts and unlinks that file; the namespace (its TAP,
//! its veth and, with it, the host's end) goes when its last user, the VMM, has gone too.
//!
//! **Configured with the `ip` command** (iproute2), run in the namespace by a child that joins it
//! (`setns`) between fork and exec ([`VmNetns::command`]), rather than with a netlink crate:
//! iproute2 is installed wherever the daemon runs, the steps read as the commands an operator
//! would type to check them, and the daemon links no second netlink stack. Each step is one
//! command; a failure names the command and carries `ip`'s own message.
//!
//! Inside the namespace ([`setup`]):
//! - `tap0`: a persistent TAP (`IFF_TAP | IFF_NO_PI`) owned by the VM's jail uid and gid, so the
//!   jailed VMM can attach to it after joining the namespace (`--jail-netns`), carrying the
//!   gateway address and a MAC derived from it ([`VmLink::gateway_mac_string`]), the same on
//!   every host a VM migrates to;
//! - `up0`: the namespace's end of a veth whose other end, `nc-<id>`, is moved to the host's
//!   namespace; the namespace's default route goes to the host's end;
//! - IPv4 forwarding on, IPv6 off;
//!
//! and in the host's namespace: `nc-<id>` up with its address, a route to the guest's /30 via
//! the namespace, and IPv4 forwarding on. The addresses are [`super::addr`]'s.
//!
//! For the resolver and anything else that must act inside the namespace, [`VmNetns::run_in`]
//! runs a closure on a thread that has joined it (a socket made there stays in the namespace).

use std::fs::File;
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::sched::CloneFlags;

use super::ToolError;
use super::addr::VmLink;

/// The namespace's file in a VM's folder.
pub const NETNS_FILE: &str = "netns";
/// The TAP's name inside the namespace (`--net tap=tap0,...`).
pub const TAP_NAME: &str = "tap0";
/// The namespace's end of the veth.
pub const UPLINK_NAME: &str = "up0";
/// What every host-side veth's name starts with (the host's firewall matches it).
pub const HOST_VETH_PREFIX: &str = "nc-";

/// Why a VM's namespace could not be made, entered, configured or removed.
#[derive(Debug, thiserror::Error)]
pub enum NetnsError {
    /// The namespace's file could not be created or opened.
    #[error("cannot open {}", .path.display())]
    File {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A namespace step (`unshare`, `setns`, `mount`, `umount`) failed.
    #[error("cannot {what} {}", .path.display())]
    Namespace {
        /// The step.
        what: &'static str,
        /// The namespace's file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The thread that enters the namespace could not be started, or panicked.
    #[error("the thread that enters {} did not run", .path.display())]
    Thread {
        /// The namespace's file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A kernel setting could not be written.
    #[error("cannot set {}", .path.display())]
    Sysctl {
        /// The setting's file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// An `ip` command failed.
    #[error("configuring the VM's network")]
    Ip(#[source] ToolError),
    /// The VM id cannot name a network device.
    #[error("VM id `{0}` cannot name a network device")]
    BadId(String),
}

/// A VM's network namespace, kept by a bind mount at [`VmNetns::path`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmNetns {
    path: PathBuf,
}

impl VmNetns {
    /// Makes a new, empty network namespace and keeps it at `path` (which must not exist).
    pub fn create(path: &Path) -> Result<Self, NetnsError> {
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o400)
            .open(path)
            .map_err(|source| NetnsError::File {
                path: path.to_owned(),
                source,
            })?;
        let ns = Self {
            path: path.to_owned(),
        };
        let made = on_thread(path, || {
            let fail = |what| {
                move |source| NetnsError::Namespace {
                    what,
                    path: path.to_owned(),
                    source,
                }
            };
            nix::sched::unshare(CloneFlags::CLONE_NEWNET)
                .map_err(fail("unshare a network namespace for"))?;
            nix::mount::mount(
                Some("/proc/thread-self/ns/net"),
                path,
                None::<&str>,
                nix::mount::MsFlags::MS_BIND,
                None::<&str>,
            )
            .map_err(fail("bind-mount the network namespace on"))
        })
        .and_then(|r| r);
        if let Err(e) = made {
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Ok(ns)
    }

    /// The namespace kept at `path` by an earlier [`VmNetns::create`] (a restarted daemon's).
    pub fn at(path: &Path) -> Self {
        Self {
            path: path.to_owned(),
        }
    }

    /// The bind-mounted file (`--jail-netns`).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether `path` holds a network namespace (a mounted nsfs file), not a plain file.
    pub fn is_mounted(path: &Path) -> bool {
        nix::sys::statfs::statfs(path)
            .is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
    }

    fn open(&self) -> Result<File, NetnsError> {
        File::open(&self.path).map_err(|source| NetnsError::File {
            path: self.path.clone(),
            source,
        })
    }

    /// Runs `f` on a thread that has joined the namespace and returns what it returned. A
    /// socket `f` makes belongs to the namespace for its whole life.
    pub fn run_in<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R, NetnsError> {
        let file = self.open()?;
        on_thread(&self.path, move || {
            nix::sched::setns(&file, CloneFlags::CLONE_NEWNET).map_err(|source| {
                NetnsError::Namespace {
                    what: "join",
                    path: self.path.clone(),
                    source,
                }
            })?;
            Ok(f())
        })?
    }

    /// `program`, set to run inside the namespace: the child joins it before exec. The
    /// returned file keeps the namespace open for the spawn; hold it until then.
    pub fn command(&self, program: &str) -> Result<(Command, File), NetnsError> {
        let file = self.open()?;
        let fd = file.as_raw_fd();
        let mut cmd = Command::new(program);
        // SAFETY: the closure runs in the forked child before exec and calls only setns(2),
        // which is async-signal-safe, on a descriptor the parent keeps open until the spawn
        // returns (the caller holds the returned file); it touches no other shared memory.
        unsafe {
            cmd.pre_exec(move || {
                if nix::libc::setns(fd, nix::libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
        Ok((cmd, file))
    }

    /// Runs `ip ARGS` inside the namespace.
    fn ip(&self, args: &[&str]) -> Result<Vec<u8>, NetnsError> {
        let (mut cmd, _keep) = self.command("ip")?;
        cmd.args(args);
        super::run_tool(cmd, None).map_err(NetnsError::Ip)
    }

    /// Removes the namespace's file: unmounts it (the namespace ends once nothing else holds
    /// it) and unlinks it. A file already gone is no error.
    pub fn remove(path: &Path) -> Result<(), NetnsError> {
        if Self::is_mounted(path) {
            nix::mount::umount2(path, nix::mount::MntFlags::MNT_DETACH).map_err(|source| {
                NetnsError::Namespace {
                    what: "unmount",
                    path: path.to_owned(),
                    source,
                }
            })?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(NetnsError::File {
                path: path.to_owned(),
                source: e,
            }),
            _ => Ok(()),
        }
    }
}

/// Runs `f` on a new thread and waits for it: namespace changes die with that thread.
fn on_thread<R: Send>(
    path: &Path,
    f: impl FnOnce() -> Result<R, NetnsError> + Send,
) -> Result<Result<R, NetnsError>, NetnsError> {
    std::thread::scope(|s| {
        let handle = std::thread::Builder::new()
            .name("netns".into())
            .spawn_scoped(s, f)
            .map_err(|source| NetnsError::Thread {
                path: path.to_owned(),
                source,
            })?;
        handle.join().map_err(|_| NetnsError::Thread {
            path: path.to_owned(),
            source: std::io::Error::other("panicked"),
        })
    })
}

/// The host-side veth's name for VM `id`: `nc-` and the id (at most 12 of its characters,
/// letters and digits only, so the name fits the kernel's 15).
pub fn host_veth_name(id: &str) -> Result<String, NetnsError> {
    let ok = !id.is_empty() && id.len() <= 12 && id.bytes().all(|b| b.is_ascii_alphanumeric());
    if !ok {
        return Err(NetnsError::BadId(id.escape_debug().to_string()));
    }
    Ok(format!("{HOST_VETH_PREFIX}{id}"))
}

/// Writes `value` into the kernel setting `path` (under `/proc/sys`), in the calling thread's
/// network namespace.
fn sysctl(path: &str, value: &str) -> Result<(), NetnsError> {
    std::fs::write(path, value).map_err(|source| NetnsError::Sysctl {
        path: PathBuf::from(path),
        source,
    })
}

/// Runs `ip ARGS` in the daemon's own namespace.
fn host_ip(args: &[&str]) -> Result<Vec<u8>, NetnsError> {
    let mut cmd = Command::new("ip");
    cmd.args(args);
    super::run_tool(cmd, None).map_err(NetnsError::Ip)
}

/// Builds the links of VM `id` (see the module doc) in `ns`, with a TAP owned by `tap_uid`.
/// On an error the caller removes what was made ([`teardown`]).
pub fn setup(ns: &VmNetns, id: &str, link: &VmLink, tap_uid: u32) -> Result<(), NetnsError> {
    let veth = host_veth_name(id)?;
    let cidr = |a: Ipv4Addr| format!("{a}/{}", VmLink::LINK_PREFIX_LEN);
    let uid = tap_uid.to_string();
    ns.ip(&["link", "set", "lo", "up"])?;
    ns.ip(&[
        "tuntap", "add", "dev", TAP_NAME, "mode", "tap", "user", &uid, "group", &uid,
    ])?;
    ns.ip(&[
        "link",
        "set",
        TAP_NAME,
        "address",
        &link.gateway_mac_string(),
    ])?;
    ns.ip(&["addr", "add", &cidr(link.gateway), "dev", TAP_NAME])?;
    ns.ip(&["link", "set", TAP_NAME, "up"])?;
    ns.ip(&[
        "link",
        "add",
        UPLINK_NAME,
        "type",
        "veth",
        "peer",
        "name",
        &veth,
    ])?;
    ns.ip(&["addr", "add", &cidr(link.netns_end), "dev", UPLINK_NAME])?;
    ns.ip(&["link", "set", UPLINK_NAME, "up"])?;
    // The daemon's main thread is in the host's namespace: `netns PID` names that one.
    ns.ip(&[
        "link",
        "set",
        &veth,
        "netns",
        &std::process::id().to_string(),
    ])?;
    ns.ip(&[
        "route",
        "add",
        "default",
        "via",
        &link.host_end.to_string(),
        "dev",
        UPLINK_NAME,
    ])?;
    ns.run_in(|| {
        sysctl("/proc/sys/net/ipv4/ip_forward", "1")?;
        // IPv6 is dropped by the firewall too; a kernel without IPv6 has no such setting.
        for v6 in [
            "/proc/sys/net/ipv6/conf/all/disable_ipv6",
            "/proc/sys/net/ipv6/conf/default/disable_ipv6",
        ] {
            if Path::new(v6).exists() {
                sysctl(v6, "1")?;
            }
        }
        Ok::<_, NetnsError>(())
    })??;
    host_ip(&["addr", "add", &cidr(link.host_end), "dev", &veth])?;
    host_ip(&["link", "set", &veth, "up"])?;
    host_ip(&[
        "route",
        "add",
        &cidr(link.guest_net()),
        "via",
        &link.netns_end.to_string(),
        "dev",
        &veth,
    ])?;
    sysctl("/proc/sys/net/ipv4/ip_forward", "1")
}

/// Removes what [`VmNetns::create`] and [`setup`] made for VM `id`: the host's veth (and so its
/// peer and route) and the namespace's file. Every step runs; the first error is returned.
pub fn teardown(path: &Path, id: &str) -> Result<(), NetnsError> {
    let veth = host_veth_name(id)?;
    let mut first = None;
    match host_ip(&["link", "del", &veth]) {
        // Gone already (with its namespace, or never made).
        Err(NetnsError::Ip(e)) if e.stderr().is_some_and(|s| s.contains("Cannot find device")) => {}
        Err(e) => first = Some(e),
        Ok(_) => {}
    }
    if let Err(e) = VmNetns::remove(path) {
        first.get_or_insert(e);
    }
    first.map_or(Ok(()), Err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_veth_names_fit_and_refuse_odd_ids() {
        assert_eq!(host_veth_name("0badc0de").unwrap(), "nc-0badc0de");
        assert!(host_veth_name("0123456789ab").unwrap().len() <= 15);
        for bad in ["", "0123456789abc", "a/b", "a b", "../x"] {
            assert!(
                matches!(host_veth_name(bad), Err(NetnsError::BadId(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn a_plain_file_is_not_a_namespace_and_removing_it_unlinks_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(NETNS_FILE);
        std::fs::write(&path, "").unwrap();
        assert!(!VmNetns::is_mounted(&path));
        VmNetns::remove(&path).unwrap();
        assert!(!path.exists());
        // Gone already: still fine.
        VmNetns::remove(&path).unwrap();
    }
}

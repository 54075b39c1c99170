//! The VMM's jail: what a guest that escapes into the VMM process finds around it.
//!
//! The daemon starts `nanoclaw-vmm` as root with `--jail-uid`/`--jail-gid` (and `--jail-cgroup`
//! for each cgroup it made for the VM). Before the VMM opens `/dev/kvm`, reads the kernel or
//! accepts any guest input, [`enter`] does, in this order:
//!
//! 1. joins the given cgroups (cpu, memory and pids limits the daemon wrote there);
//! 2. unshares the mount, pid, ipc, uts and network namespaces (the new network namespace has
//!    only a loopback device that is down, so no host TCP port can be reached; a network
//!    device's TAP was attached by `main` before [`enter`], in the namespace the VMM started
//!    in, and stays reachable only through that one descriptor). With `--jail-netns` the
//!    network namespace is instead the one the daemon made for the VM, which `main` joined
//!    ([`join_netns`]) before attaching the TAP: it holds that TAP, a veth to the host and the
//!    host's firewall for the VM (see `docs/security/network.md`), and the VMM never holds
//!    `CAP_NET_ADMIN` there to change them;
//! 3. makes every mount private, bind-mounts the VM's folder onto itself, and inside it:
//!    the kernel, the initramfs and each disk (read-only unless the disk is writable), and a
//!    small tmpfs on `dev/` holding one `kvm` node owned by the jail's uid;
//! 4. forks: the child is pid 1 of the new pid namespace and becomes the VMM; the parent stays
//!    outside as a supervisor that forwards SIGTERM and SIGINT, and ends the way the child ended
//!    (the same exit code, or the same signal), so the daemon's wait status is the VMM's;
//! 5. in the child: `pivot_root` into the VM's folder and detach the old root, so nothing of the
//!    host's tree (no `/etc`, no daemon state, no other VM) is reachable by path;
//! 6. rlimits on open files, file size, locked memory, core dumps and processes;
//! 7. with `--jail-userns`: a user namespace of its own, whose maps (written by the supervisor,
//!    still root outside) hold only the jail's uid and gid, each mapped onto itself;
//! 8. no supplementary groups, the jail's gid and uid (which drops every capability),
//!    `PR_SET_NO_NEW_PRIVS`, and a check that no capability is left; then the parent-death
//!    signal, so the VMM dies with its supervisor.
//!
//! The VMM then runs with its paths rewritten into the jail ([`JailedPaths`]).
//!
//! **Why the VMM jails itself instead of a separate jailer binary.** Firecracker's jailer execs
//! a statically linked VMM inside the new root. Our VMM is linked dynamically: exec'd inside a
//! root that holds only the VM's files, it would find no loader and no libc. Entering the jail
//! at the top of `main`, after the loader has done its work and before the VMM touches anything
//! the guest controls, gives the same confinement without putting host libraries in the jail.
//! The price is that the first milliseconds of the process run as root; they parse the daemon's
//! arguments and nothing else. Seccomp filters are installed later, per thread, by the VMM.
//!
//! **The user namespace** (step 7) changes no file access: the maps are the identity on the
//! jail's ids, so the VMM owns what it owned before and sockets and `SO_PEERCRED` read the same
//! on both sides. What it adds: every namespace of the jail (mounts, pids, network) belongs to
//! the host's user namespace, so any capability the VMM might regain later is a capability
//! over a namespace that owns nothing; and root, unmapped, reads as the overflow uid inside.
//! It comes after `pivot_root`, which needs root in the namespace that owns the mounts. The
//! daemon asks for it where the host allows user namespaces (`--jail-userns`, see
//! `docs/security/jail.md`); asked for and refused, the VMM does not run.

use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use nix::sched::CloneFlags;
use nix::sys::resource::Resource;
use nix::sys::signal::{SigSet, Signal};
use nix::sys::stat::{Mode, SFlag};
use nix::sys::wait::{WaitStatus, waitpid};
use nix::unistd::{ForkResult, Gid, Pid, Uid};

/// The kernel as seen inside the jail.
pub const KERNEL: &str = "/kernel";
/// The initramfs as seen inside the jail.
pub const INITRD: &str = "/initrd";
/// Open files the jailed VMM may hold: every guest vsock connection is one, and there are at
/// most a few thousand of those before the device refuses more.
pub const MAX_OPEN_FILES: u64 = 4096;
/// Processes (threads included) the jail's uid may have: one per vCPU (at most 32), one per
/// disk (at most 8) and a handful more.
pub const MAX_PROCESSES: u64 = 128;
/// Locked memory: the VMM locks none.
pub const MAX_LOCKED_BYTES: u64 = 64 * 1024;
/// The tmpfs on the jail's `/dev` holds one device node.
const DEV_TMPFS_OPTIONS: &str = "size=4k,nr_inodes=16,mode=755";
/// `/dev/kvm`'s device numbers (a misc device: major 10, minor 232).
const KVM_MAJOR: u64 = 10;
const KVM_MINOR: u64 = 232;

/// Who the jailed VMM runs as, and the cgroups it joins.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailConfig {
    /// The VMM's uid: not 0, and unique to this VM among running VMs.
    pub uid: u32,
    /// The VMM's gid: not 0.
    pub gid: u32,
    /// Cgroup folders to join (`cgroup.procs` in each), made and limited by the daemon.
    pub cgroups: Vec<PathBuf>,
    /// Also enter a user namespace of the VMM's own, which maps only its uid and gid.
    pub user_namespace: bool,
    /// A network namespace the daemon made for the VM (a bind-mounted nsfs file): `main`
    /// joins it with [`join_netns`] before it opens the TAP, and [`enter`] then keeps it
    /// instead of unsharing an empty one.
    pub netns: Option<PathBuf>,
}

/// Why the jail could not be entered. The VMM then exits with a setup error: it never runs
/// unjailed when a jail was asked for.
#[derive(Debug, thiserror::Error)]
pub enum JailError {
    /// The jail needs root to set up.
    #[error("the jail needs root to set up (running as uid {0})")]
    NotRoot(u32),
    /// uid or gid 0 would not drop anything.
    #[error("the jail's uid and gid must not be 0")]
    RootIds,
    /// A path given to the VMM cannot be made absolute.
    #[error("cannot make {what} {path:?} an absolute path")]
    Relative {
        /// Which path.
        what: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// Joining a cgroup failed.
    #[error("cannot join the cgroup {}", .path.display())]
    Cgroup {
        /// The cgroup folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A step of the setup failed.
    #[error("cannot {what} {}", .path.display())]
    Step {
        /// The step.
        what: &'static str,
        /// The path it was about.
        path: PathBuf,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// A step of the setup about a file failed.
    #[error("cannot {what} {}", .path.display())]
    File {
        /// The step.
        what: &'static str,
        /// The path it was about.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A process-wide step failed.
    #[error("cannot {what}")]
    Process {
        /// The step.
        what: &'static str,
        /// The cause.
        #[source]
        source: nix::Error,
    },
    /// The user namespace step failed: the VMM then does not run (it never runs with less
    /// confinement than was asked for).
    #[error("cannot set up the user namespace: {0}")]
    UserNamespace(String),
    /// Capabilities were left after the uid drop.
    #[error("capabilities left after dropping to uid {uid}: effective {effective:#x}")]
    CapsLeft {
        /// The uid.
        uid: u32,
        /// The effective set.
        effective: u64,
    },
}

/// The paths a jailed VMM uses, all inside the jail, in the order of the VM config's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailedPaths {
    /// The jail's root on the host (the VM folder), where everything below is mounted.
    pub root: PathBuf,
    /// The kernel: `/kernel`.
    pub kernel: PathBuf,
    /// The initramfs: `/initrd`.
    pub initrd: PathBuf,
    /// Each disk: `/disk0`, `/disk1`, ...
    pub disks: Vec<PathBuf>,
}

impl JailedPaths {
    /// Where each of `config`'s files appears inside the jail; the jail's root is `config`'s
    /// VM folder, which [`enter`] has made absolute by then.
    pub fn of(config: &crate::VmConfig) -> Self {
        JailedPaths {
            root: config.vm_dir.clone(),
            kernel: PathBuf::from(KERNEL),
            initrd: PathBuf::from(INITRD),
            disks: (0..config.disks.len())
                .map(|i| PathBuf::from(format!("/disk{i}")))
                .collect(),
        }
    }

    /// `config` as the VMM sees it inside the jail.
    pub fn apply(&self, config: &mut crate::VmConfig) {
        config.kernel = self.kernel.clone();
        config.initrd = self.initrd.clone();
        // A snapshot's files were opened before the jail (`HostDevices::open`); its folder
        // keeps its host path, which only logs and errors name.
        for (disk, path) in config.disks.iter_mut().zip(&self.disks) {
            disk.path = path.clone();
        }
        if let crate::ConsoleTarget::File(p) = &mut config.console
            && let Ok(inside) = p.strip_prefix(&self.root)
        {
            *p = Path::new("/").join(inside);
        }
        config.vm_dir = PathBuf::from("/");
    }
}

/// Makes every host path of `config` absolute (from the current directory), since the jail
/// binds them by path before it leaves the host's tree.
fn absolutize(config: &mut crate::VmConfig) -> Result<(), JailError> {
    let abs = |what, p: &mut PathBuf| -> Result<(), JailError> {
        *p = std::path::absolute(&*p).map_err(|_| JailError::Relative {
            what,
            path: p.clone(),
        })?;
        Ok(())
    };
    abs("the VM folder", &mut config.vm_dir)?;
    if let Some(restore) = &mut config.restore {
        abs("the snapshot", &mut restore.dir)?;
    } else if let Some(socket) = &mut config.migrate_from {
        abs("the migration socket", socket)?;
    } else {
        abs("the kernel", &mut config.kernel)?;
        abs("the initramfs", &mut config.initrd)?;
    }
    for d in &mut config.disks {
        abs("a disk", &mut d.path)?;
    }
    if let crate::ConsoleTarget::File(p) = &mut config.console {
        abs("the console log", p)?;
    }
    Ok(())
}

/// The file-size limit: the largest file the VMM writes is a disk (written in place), the
/// console log (capped at `console_cap`) or a snapshot's memory file (guest RAM; see
/// [`crate::snapshot`]); `exit.json` is small.
pub fn file_size_limit(config: &crate::VmConfig) -> u64 {
    let disks = config
        .disks
        .iter()
        .filter(|d| !d.read_only)
        .filter_map(|d| std::fs::metadata(&d.path).ok())
        .map(|m| m.len())
        .max()
        .unwrap_or(0);
    disks
        .max(config.console_cap)
        .max(config.memory_bytes())
        .saturating_add(1 << 20)
}

fn step(what: &'static str, path: &Path) -> impl FnOnce(nix::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::Step { what, path, source }
}

fn file(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> JailError {
    let path = path.to_owned();
    move |source| JailError::File { what, path, source }
}

fn process(what: &'static str) -> impl FnOnce(nix::Error) -> JailError {
    move |source| JailError::Process { what, source }
}

/// Creates an empty file at `target` (a mount point) and bind-mounts `source` on it, read-only
/// when `read_only`, never with set-uid or device files.
fn bind_file(source: &Path, target: &Path, read_only: bool) -> Result<(), JailError> {
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(target)
        .map_err(file("create the mount point", target))?;
    nix::mount::mount(
        Some(source),
        target,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step("bind-mount", source))?;
    let mut flags = MsFlags::MS_BIND
        | MsFlags::MS_REMOUNT
        | MsFlags::MS_NOSUID
        | MsFlags::MS_NODEV
        | MsFlags::MS_NOEXEC;
    if read_only {
        flags |= MsFlags::MS_RDONLY;
    }
    nix::mount::mount(None::<&str>, target, None::<&str>, flags, None::<&str>)
        .map_err(step("restrict the bind mount of", target))
}

/// Builds the jail's tree under `paths.root` (in the new mount namespace).
fn build_tree(
    jail: &JailConfig,
    config: &crate::VmConfig,
    paths: &JailedPaths,
) -> Result<(), JailError> {
    let root = &paths.root;
    std::fs::create_dir_all(root).map_err(file("create the jail folder", root))?;
    // The VMM creates its sockets, console log and exit record here.
    nix::unistd::chown(
        root,
        Some(Uid::from_raw(jail.uid)),
        Some(Gid::from_raw(jail.gid)),
    )
    .map_err(step("hand over the jail folder", root))?;
    std::fs::set_permissions(root, std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .map_err(file("restrict the jail folder", root))?;
    nix::mount::mount(
        Some(root.as_path()),
        root.as_path(),
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )
    .map_err(step("bind-mount the jail folder onto itself", root))?;
    nix::mount::mount(
        None::<&str>,
        root.as_path(),
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(step("restrict the jail folder's mount", root))?;
    let inside = |p: &Path| root.join(p.strip_prefix("/").unwrap_or(p));
    // A restored or migrating VM reads no kernel, and its snapshot's files or its migration
    // link are already open.
    if config.restore.is_none() && config.migrate_from.is_none() {
        bind_file(&config.kernel, &inside(&paths.kernel), true)?;
        bind_file(&config.initrd, &inside(&paths.initrd), true)?;
    }
    for (disk, path) in config.disks.iter().zip(&paths.disks) {
        bind_file(&disk.path, &inside(path), disk.read_only)?;
    }
    let dev = root.join("dev");
    std::fs::create_dir_all(&dev).map_err(file("create", &dev))?;
    nix::mount::mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
        Some(DEV_TMPFS_OPTIONS),
    )
    .map_err(step("mount a tmpfs on", &dev))?;
    let kvm = dev.join("kvm");
    nix::sys::stat::mknod(
        &kvm,
        SFlag::S_IFCHR,
        Mode::from_bits_truncate(0o600),
        nix::sys::stat::makedev(KVM_MAJOR, KVM_MINOR),
    )
    .map_err(step("create the device node", &kvm))?;
    nix::unistd::chown(
        &kvm,
        Some(Uid::from_raw(jail.uid)),
        Some(Gid::from_raw(jail.gid)),
    )
    .map_err(step("hand over", &kvm))?;
    nix::mount::mount(
        None::<&str>,
        &dev,
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC | MsFlags::MS_RDONLY,
        Some(DEV_TMPFS_OPTIONS),
    )
    .map_err(step("make read-only", &dev))
}

/// Joins each cgroup by writing our pid to its `cgroup.procs`.
fn join_cgroups(cgroups: &[PathBuf]) -> Result<(), JailError> {
    let pid = std::process::id().to_string();
    for cg in cgroups {
        std::fs::write(cg.join("cgroup.procs"), &pid).map_err(|source| JailError::Cgroup {
            path: cg.clone(),
            source,
        })?;
    }
    Ok(())
}

/// Switches the root to the current directory's mount and detaches the old one.
fn pivot_into(root: &Path) -> Result<(), JailError> {
    nix::unistd::chdir(root).map_err(step("enter", root))?;
    // pivot_root(".", "."): the old root ends up mounted on top of the new one at "/", where
    // a lazy unmount takes it away. No folder for the old root is needed.
    nix::unistd::pivot_root(".", ".").map_err(step("pivot_root into", root))?;
    nix::mount::umount2(".", MntFlags::MNT_DETACH).map_err(step("detach the old root", root))?;
    nix::unistd::chdir("/").map_err(step("enter", Path::new("/")))
}

/// Sets the rlimits (soft and hard).
fn limit(fsize: u64) -> Result<(), JailError> {
    for (resource, value, what) in [
        (Resource::RLIMIT_NOFILE, MAX_OPEN_FILES, "limit open files"),
        (Resource::RLIMIT_FSIZE, fsize, "limit file size"),
        (
            Resource::RLIMIT_MEMLOCK,
            MAX_LOCKED_BYTES,
            "limit locked memory",
        ),
        (Resource::RLIMIT_CORE, 0, "turn off core dumps"),
        (Resource::RLIMIT_NPROC, MAX_PROCESSES, "limit processes"),
    ] {
        nix::sys::resource::setrlimit(resource, value, value).map_err(process(what))?;
    }
    Ok(())
}

/// Drops to `uid`/`gid` with no supplementary groups and no way to gain privileges back.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), JailError> {
    let (uid, gid) = (Uid::from_raw(uid), Gid::from_raw(gid));
    nix::unistd::setgroups(&[]).map_err(process("clear the supplementary groups"))?;
    nix::unistd::setresgid(gid, gid, gid).map_err(process("set the gid"))?;
    nix::unistd::setresuid(uid, uid, uid).map_err(process("set the uid"))?;
    // Leaving root clears the capabilities only when root is mapped in the caller's user
    // namespace; in the jail's own one it is not, so they are cleared here by hand (a no-op
    // outside one).
    clear_caps().map_err(process("clear the capabilities"))?;
    nix::sys::prctl::set_no_new_privs().map_err(process("set no_new_privs"))?;
    let effective = effective_caps();
    if effective != 0 {
        return Err(JailError::CapsLeft {
            uid: uid.as_raw(),
            effective,
        });
    }
    Ok(())
}

/// `capget(2)`/`capset(2)`'s header and data (version 3: two data structs, 64 bits).
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}
#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}
const CAP_VERSION_3: u32 = 0x2008_0522;

/// Empties this thread's effective, permitted, inheritable and ambient capability sets.
fn clear_caps() -> nix::Result<()> {
    // SAFETY: PR_CAP_AMBIENT_CLEAR_ALL takes no pointers.
    let rc = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL,
            0,
            0,
            0,
        )
    };
    nix::errno::Errno::result(rc)?;
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: capset(2) with a v3 header reads two data structs, which `data` holds; both
    // pointers are valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capset,
            &mut header as *mut CapHeader,
            data.as_ptr(),
        )
    };
    nix::errno::Errno::result(rc).map(drop)
}

/// The effective capability set of this thread (`capget(2)`; all bits set if the call fails).
fn effective_caps() -> u64 {
    let mut header = CapHeader {
        version: CAP_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: capget(2) with a v3 header reads two data structs, which `data` holds; both
    // pointers are valid for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return u64::MAX;
    }
    u64::from(data[0].effective) | (u64::from(data[1].effective) << 32)
}

/// Joins the network namespace bind-mounted at `path` (`--jail-netns`). Called by `main` as
/// root, before the TAP is opened and before [`enter`].
pub fn join_netns(path: &Path) -> Result<(), JailError> {
    let file = std::fs::File::open(path).map_err(file("open the network namespace", path))?;
    nix::sched::setns(&file, CloneFlags::CLONE_NEWNET)
        .map_err(step("join the network namespace", path))
}

/// Enters the jail; see the module doc. Returns in the jailed child with `config` rewritten
/// to the jail's paths. The supervising parent never returns: it exits the way the child did.
pub fn enter(jail: &JailConfig, config: &mut crate::VmConfig) -> Result<(), JailError> {
    let euid = nix::unistd::geteuid().as_raw();
    if euid != 0 {
        return Err(JailError::NotRoot(euid));
    }
    if jail.uid == 0 || jail.gid == 0 {
        return Err(JailError::RootIds);
    }
    absolutize(config)?;
    let paths = JailedPaths::of(config);
    let fsize = file_size_limit(config);
    join_cgroups(&jail.cgroups)?;
    let mut namespaces = CloneFlags::CLONE_NEWNS
        | CloneFlags::CLONE_NEWPID
        | CloneFlags::CLONE_NEWIPC
        | CloneFlags::CLONE_NEWUTS;
    if jail.netns.is_none() {
        namespaces |= CloneFlags::CLONE_NEWNET;
    }
    nix::sched::unshare(namespaces).map_err(process("unshare the namespaces"))?;
    nix::mount::mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(step("make private the mounts under", Path::new("/")))?;
    build_tree(jail, config, &paths)?;
    // The supervisor takes SIGTERM, SIGINT and SIGCHLD synchronously; the child gets the
    // mask it had back.
    let mut waited = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        waited.add(s);
    }
    let old_mask = waited
        .thread_swap_mask(nix::sys::signal::SigmaskHow::SIG_BLOCK)
        .map_err(process("block the supervisor's signals"))?;
    let sync = if jail.user_namespace {
        Some(UsernsSync::new()?)
    } else {
        None
    };
    // SAFETY: the process is single-threaded here (enter runs first thing in main, before any
    // thread is spawned), so the child may run any code after fork.
    match unsafe { nix::unistd::fork() }.map_err(process("fork into the pid namespace"))? {
        ForkResult::Parent { child } => {
            if let Some(sync) = sync {
                sync.map_and_pivot(child, jail, &paths.root);
            }
            supervise(child, &waited, jail)
        }
        ForkResult::Child => {
            old_mask
                .thread_set_mask()
                .map_err(process("restore the signal mask"))?;
            match sync {
                // The supervisor pivots: the child, in its user namespace, no longer may.
                Some(sync) => {
                    limit(fsize)?;
                    sync.enter()?;
                    nix::unistd::chdir("/").map_err(step("enter", Path::new("/")))?;
                }
                None => {
                    pivot_into(&paths.root)?;
                    limit(fsize)?;
                }
            }
            drop_privileges(jail.uid, jail.gid)?;
            // After the uid change, which clears it: die with the supervisor.
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
                .map_err(process("set the parent-death signal"))?;
            paths.apply(config);
            Ok(())
        }
    }
}

/// The handshake around the user namespace. The child unshares it and says so. The
/// supervisor, still root outside, writes the child's uid and gid maps, then does the
/// `pivot_root` itself: that needs root in the user namespace that owns the mounts, which the
/// child has left, and it moves every process of the mount namespace whose root was the old
/// root, the child included. `/proc` is gone after it, so the maps are written first. Then the
/// supervisor says so, and only then does the child drop to the jail's ids (the only ones
/// mapped). Each side keeps the pipe ends it uses.
struct UsernsSync {
    /// Child to supervisor: one byte, 1 when the child has unshared, 0 when it could not.
    up: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
    /// Supervisor to child: one byte, 1 when the maps are written and the root pivoted.
    down: (std::os::fd::OwnedFd, std::os::fd::OwnedFd),
}

impl UsernsSync {
    fn new() -> Result<Self, JailError> {
        let pipe = || {
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
                .map_err(process("make the user namespace's pipes"))
        };
        Ok(Self {
            up: pipe()?,
            down: pipe()?,
        })
    }

    /// In the child: unshares the user namespace and waits for the maps and the pivot.
    fn enter(self) -> Result<(), JailError> {
        let Self { up, down } = self;
        drop((up.0, down.1));
        let unshared = nix::sched::unshare(CloneFlags::CLONE_NEWUSER);
        let _ = nix::unistd::write(&up.1, &[u8::from(unshared.is_ok())]);
        unshared.map_err(|e| JailError::UserNamespace(format!("unshare: {e}")))?;
        match read_byte(&down.0) {
            Some(1) => Ok(()),
            _ => Err(JailError::UserNamespace(
                "the supervisor could not map the ids or enter the jail's root".into(),
            )),
        }
    }

    /// In the supervisor (still root): maps the jail's uid and gid, and only those, onto
    /// themselves in the child's new user namespace, and pivots into the jail's root. A
    /// failure is told to the child, which then ends with a setup error that the supervisor
    /// passes on as its own exit.
    fn map_and_pivot(self, child: Pid, jail: &JailConfig, root: &Path) {
        let Self { up, down } = self;
        drop((up.1, down.0));
        let done = read_byte(&up.0) == Some(1) && {
            let write = |file: &str, id: u32| {
                std::fs::write(format!("/proc/{child}/{file}"), format!("{id} {id} 1\n"))
                    .map_err(|e| format!("cannot write the {file}: {e}"))
            };
            let outcome = write("uid_map", jail.uid)
                .and_then(|()| write("gid_map", jail.gid))
                .and_then(|()| pivot_into(root).map_err(|e| e.to_string()));
            match outcome {
                Ok(()) => true,
                Err(e) => {
                    let _ = std::io::Write::write_fmt(
                        &mut std::io::stderr(),
                        format_args!("nanoclaw-vmm: jail supervisor: {e}\n"),
                    );
                    false
                }
            }
        };
        let _ = nix::unistd::write(&down.1, &[u8::from(done)]);
    }
}

/// One byte from `fd`; `None` at its end or on an error.
fn read_byte(fd: &std::os::fd::OwnedFd) -> Option<u8> {
    let mut byte = [0u8; 1];
    loop {
        match nix::unistd::read(fd, &mut byte) {
            Ok(1) => return Some(byte[0]),
            Err(nix::Error::EINTR) => continue,
            _ => return None,
        }
    }
}

/// The supervisor: drops to the jail's ids too, forwards SIGTERM/SIGINT to `child`, and ends
/// the way the child ended.
fn supervise(child: Pid, waited: &SigSet, jail: &JailConfig) -> ! {
    // Same uid as the child, so that it may still signal it; nothing else is needed here.
    if let Err(e) = drop_privileges(jail.uid, jail.gid) {
        // Never a panic when the daemon's end of stderr is gone (see main).
        let _ = std::io::Write::write_fmt(
            &mut std::io::stderr(),
            format_args!("nanoclaw-vmm: jail supervisor: {e}\n"),
        );
        let _ = nix::sys::signal::kill(child, Signal::SIGKILL);
    }
    let _ = nix::sys::resource::setrlimit(Resource::RLIMIT_CORE, 0, 0);
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => loop {
                match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => std::process::exit(code),
                    Ok(WaitStatus::Signaled(_, signal, _)) => end_like(signal),
                    Ok(WaitStatus::StillAlive) => break,
                    Ok(_) => continue,
                    Err(nix::Error::EINTR) => continue,
                    Err(_) => std::process::exit(crate::exit::SETUP_ERROR_EXIT_CODE),
                }
            },
            Ok(signal) => {
                let _ = nix::sys::signal::kill(child, signal);
            }
            Err(_) => {}
        }
    }
}

/// Ends this process by `signal`, as the child ended, so the daemon sees the same status.
fn end_like(signal: Signal) -> ! {
    // SAFETY: resetting a disposition to the default has no memory effects.
    let _ = unsafe { nix::sys::signal::signal(signal, nix::sys::signal::SigHandler::SigDfl) };
    let mut only = SigSet::empty();
    only.add(signal);
    let _ = only.thread_unblock();
    let _ = nix::sys::signal::raise(signal);
    // SIGSTOP-like or ignored signals do not end us: say so with the shell's convention.
    std::process::exit(128 + signal as i32)
}

/// Tries to reach `target` from inside the jail: a path to open for reading, or
/// `tcp:HOST:PORT` to connect to. Returns `ok` or the error. `owner:PATH` answers the uid that
/// owns PATH as the jail sees it (in a user namespace, ids it does not map, root's among them,
/// read as the overflow uid). Used by the VMM's test hook.
pub fn probe(target: &str) -> String {
    if let Some(path) = target.strip_prefix("owner:") {
        use std::os::unix::fs::MetadataExt;
        return match std::fs::metadata(path) {
            Ok(m) => format!("uid {}", m.uid()),
            Err(e) => e.to_string(),
        };
    }
    let outcome = match target.strip_prefix("tcp:") {
        Some(addr) => std::net::TcpStream::connect_timeout(
            &match addr.parse() {
                Ok(a) => a,
                Err(e) => return format!("bad address: {e}"),
            },
            std::time::Duration::from_secs(2),
        )
        .map(drop),
        None => std::fs::File::open(target).map(drop),
    };
    match outcome {
        Ok(()) => "ok".to_owned(),
        Err(e) => e.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(vm_dir: &Path, restore: Option<&Path>) -> crate::VmConfig {
        crate::VmConfig {
            kernel: PathBuf::new(),
            initrd: PathBuf::new(),
            vm_dir: vm_dir.to_path_buf(),
            cmdline_extra: None,
            memory_mib: 256,
            vcpus: 1,
            cid: 3,
            console: crate::ConsoleTarget::Stdout,
            console_cap: 1 << 20,
            disks: Vec::new(),
            net: None,
            restore: restore.map(|dir| crate::snapshot::RestoreConfig {
                dir: dir.to_path_buf(),
                paused: false,
                without_devices: false,
            }),
            migrate_from: None,
        }
    }

    #[test]
    fn a_restored_vm_names_its_snapshot_by_its_host_path() {
        // The files are opened before the jail, so the snapshot may lie anywhere (the
        // daemon's store) and nothing of it is bound into the jail.
        let mut c = config(
            Path::new("/state/vms/a/vmm"),
            Some(Path::new("/state/snapshots/s1")),
        );
        absolutize(&mut c).unwrap();
        JailedPaths::of(&c).apply(&mut c);
        assert_eq!(c.restore.unwrap().dir, PathBuf::from("/state/snapshots/s1"));
        assert_eq!(c.vm_dir, PathBuf::from("/"));
    }

    #[test]
    fn the_file_size_limit_holds_a_snapshot_of_guest_ram() {
        let c = config(Path::new("/state/vms/a/vmm"), None);
        assert_eq!(file_size_limit(&c), (256 << 20) + (1 << 20));
    }
}

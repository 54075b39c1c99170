//! PID 1 duties: the basic mounts, the console, `lo`, the entropy check, reaping zombies (and
//! handing the agent's status over) and resetting the VM.
//!
//! Nothing here is fatal: a PID 1 that exits or panics panics the guest kernel, so failures are
//! returned for logging and the sidecar carries on.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, mpsc};
use std::time::Duration;

use nix::errno::Errno;
use nix::mount::MsFlags;
use nix::sys::reboot::RebootMode;
use nix::sys::socket::{self, AddressFamily, SockFlag, SockType};
use nix::sys::wait::{Id, WaitPidFlag, WaitStatus, waitid, waitpid};
use shared_proto::message::{ExitStatus, REIDENTIFY_ENTROPY_MAX, REIDENTIFY_ENTROPY_MIN};

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
    /// Opening a socket to configure `lo` failed.
    #[error("cannot open a socket to configure lo")]
    LoopbackSocket(#[source] Errno),
    /// Reading or setting `lo`'s flags failed.
    #[error("cannot bring lo up")]
    LoopbackFlags(#[source] Errno),
    /// The reset syscall failed.
    #[error("reboot(RB_AUTOBOOT) failed")]
    Reset(#[source] Errno),
    /// The host's entropy has a length outside the protocol's bounds.
    #[error("{0} entropy bytes (expected {min} to {max})", min = REIDENTIFY_ENTROPY_MIN, max = REIDENTIFY_ENTROPY_MAX)]
    EntropyLength(usize),
    /// Opening `/dev/urandom` to add entropy failed.
    #[error("cannot open /dev/urandom")]
    Urandom(#[source] std::io::Error),
    /// `RNDADDENTROPY` failed.
    #[error("RNDADDENTROPY failed")]
    AddEntropy(#[source] Errno),
    /// `RNDRESEEDCRNG` failed.
    #[error("RNDRESEEDCRNG failed")]
    Reseed(#[source] Errno),
    /// Signalling every other process failed.
    #[error("cannot send {0} to the other processes")]
    SignalAll(&'static str, #[source] Errno),
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

/// The longest pause when there is no child to wait for (a spawn wakes the reaper sooner).
const NO_CHILD_PAUSE: Duration = Duration::from_secs(1);

/// The reaper: one thread collects every exited child with `waitpid(-1)` and hands the status
/// of a watched child (the agent) to whoever watches it, over a channel.
///
/// Children are registered in [`Reaper::spawn_watched`] while its lock is held, so a child that
/// exits at once is still matched: the reaper takes the same lock before it looks a pid up.
/// The statuses of unwatched children (orphans re-parented to PID 1) are dropped.
#[derive(Debug, Default)]
pub struct Reaper {
    watched: Mutex<HashMap<i32, mpsc::Sender<ExitStatus>>>,
    spawned: Condvar,
}

impl Reaper {
    /// Starts the reaper thread.
    pub fn start() -> Result<Arc<Self>, InitError> {
        let reaper = Arc::new(Self::default());
        let r = Arc::clone(&reaper);
        std::thread::Builder::new()
            .name("reaper".into())
            .spawn(move || r.reap_forever())
            .map_err(InitError::Reaper)?;
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, mpsc::Sender<ExitStatus>>> {
        self.watched.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reap_forever(&self) -> ! {
        loop {
            // Peek at an exited child without reaping it (WNOWAIT), then reap it under the
            // lock. A spawn in progress holds the lock, and std's `Command::spawn` itself
            // reaps a child whose exec failed; reaping that child first would make std panic.
            let peeked = waitid(Id::All, WaitPidFlag::WEXITED | WaitPidFlag::WNOWAIT);
            let pid = match peeked {
                Ok(status) => match status.pid() {
                    Some(pid) => pid,
                    None => continue,
                },
                Err(Errno::EINTR) => continue,
                // No children: wait for a spawn (or the pause) without spinning.
                Err(_) => {
                    let guard = self.lock();
                    drop(
                        self.spawned
                            .wait_timeout(guard, NO_CHILD_PAUSE)
                            .unwrap_or_else(|p| p.into_inner()),
                    );
                    continue;
                }
            };
            let mut watched = self.lock();
            let status = match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(_, code)) => ExitStatus::Exit(code),
                Ok(WaitStatus::Signaled(_, signal, _)) => ExitStatus::Signal(signal as i32),
                // Already reaped (by a failed spawn) or not an exit.
                Ok(_) | Err(_) => continue,
            };
            match watched.remove(&pid.as_raw()) {
                Some(tx) => {
                    // The watcher may have gone; then nobody needs the status.
                    let _ = tx.send(status);
                }
                None => tracing::debug!(pid = pid.as_raw(), ?status, "reaped"),
            }
        }
    }

    /// Runs `spawn` (which starts a child and returns it with its pid) and watches the child:
    /// its exit status arrives on the returned channel.
    pub fn spawn_watched<T, E>(
        &self,
        spawn: impl FnOnce() -> Result<(T, u32), E>,
    ) -> Result<(T, u32, mpsc::Receiver<ExitStatus>), E> {
        let mut watched = self.lock();
        let (child, pid) = spawn()?;
        let (tx, rx) = mpsc::channel();
        // Pids fit in i32 (pid_max is at most 2^22).
        watched.insert(pid as i32, tx);
        drop(watched);
        self.spawned.notify_all();
        Ok((child, pid, rx))
    }
}

/// Brings the loopback interface up (`SIOCSIFFLAGS` with `IFF_UP`), so that the agent can
/// reach local servers on 127.0.0.1.
pub fn bring_up_loopback() -> Result<(), InitError> {
    use nix::libc;
    let sock = socket::socket(
        AddressFamily::Inet,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(InitError::LoopbackSocket)?;
    // SAFETY: ifreq is a plain C struct (a name array and a union of integers and sockaddrs)
    // for which all-zero bytes are a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: `sock` is an open socket; `req` is a valid, NUL-terminated ifreq that outlives
    // the call, which is what SIOCGIFFLAGS reads and fills in.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFFLAGS, &mut req) };
    Errno::result(rc).map_err(InitError::LoopbackFlags)?;
    // SAFETY: SIOCGIFFLAGS just filled the `ifru_flags` member of the union.
    let flags = unsafe { req.ifr_ifru.ifru_flags };
    req.ifr_ifru.ifru_flags = flags | (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
    // SAFETY: as above; SIOCSIFFLAGS only reads `req`.
    let rc = unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCSIFFLAGS, &req) };
    Errno::result(rc).map_err(InitError::LoopbackFlags)?;
    Ok(())
}

/// Whether the kernel's CSPRNG is initialised (`getrandom(GRND_NONBLOCK)` succeeds).
///
/// When it is not, nothing is credited: the initramfs holds no secret seed, and crediting a
/// fixed or guessable one would only hide the problem. A blocking `getrandom` then waits for
/// the kernel's own jitter entropy (6.1 generates it within about a second on first use), so
/// the boot id and the X25519 key are never drawn from an unseeded pool.
pub fn crng_ready() -> bool {
    let mut byte = [0u8; 1];
    // SAFETY: the buffer is valid for writes of its length for the whole call.
    let rc = unsafe {
        nix::libc::getrandom(
            byte.as_mut_ptr().cast(),
            byte.len(),
            nix::libc::GRND_NONBLOCK,
        )
    };
    rc == 1
}

/// `struct rand_pool_info` of `<linux/random.h>` with room for the most bytes a
/// `Reidentify` carries (the kernel reads `buf_size` bytes of `buf`).
#[repr(C)]
struct RandPoolInfo {
    entropy_count: nix::libc::c_int,
    buf_size: nix::libc::c_int,
    buf: [u8; REIDENTIFY_ENTROPY_MAX],
}

// `RNDADDENTROPY` is `_IOW('R', 0x03, int[2])`: the size in its number is that of the header,
// not of the whole struct, hence the "bad" form with the number spelled out.
nix::ioctl_write_ptr_bad!(rnd_add_entropy, 0x4008_5203, RandPoolInfo);
nix::ioctl_none!(rnd_reseed_crng, b'R', 0x07);

/// Mixes `bytes` from the host into the kernel's input pool, credited in full, then reseeds
/// the CRNG at once (`RNDADDENTROPY`, then `RNDRESEEDCRNG`; both need `CAP_SYS_ADMIN`, which
/// PID 1 has). A clone of a snapshot calls it before any of its processes runs again, so that
/// what `/dev/urandom` and `getrandom` give from then on differs between clones. A userspace
/// generator seeded before the snapshot keeps its state: that is the agent's to reseed.
pub fn add_host_entropy(bytes: &[u8]) -> Result<(), InitError> {
    if !(REIDENTIFY_ENTROPY_MIN..=REIDENTIFY_ENTROPY_MAX).contains(&bytes.len()) {
        return Err(InitError::EntropyLength(bytes.len()));
    }
    let mut info = RandPoolInfo {
        // Bits credited: the host's bytes come from its own CSPRNG.
        entropy_count: (bytes.len() * 8) as nix::libc::c_int,
        buf_size: bytes.len() as nix::libc::c_int,
        buf: [0; REIDENTIFY_ENTROPY_MAX],
    };
    info.buf[..bytes.len()].copy_from_slice(bytes);
    let urandom = OpenOptions::new()
        .write(true)
        .custom_flags(nix::libc::O_CLOEXEC)
        .open("/dev/urandom")
        .map_err(InitError::Urandom)?;
    // SAFETY: `urandom` is an open random device; `info` is a valid rand_pool_info whose
    // `buf_size` bytes of `buf` are initialised, and it outlives the call, which only reads it.
    let added = unsafe { rnd_add_entropy(urandom.as_raw_fd(), &info) };
    zeroize::Zeroize::zeroize(&mut info.buf);
    added.map_err(InitError::AddEntropy)?;
    // SAFETY: `urandom` is an open random device; RNDRESEEDCRNG takes no argument.
    unsafe { rnd_reseed_crng(urandom.as_raw_fd()) }.map_err(InitError::Reseed)?;
    Ok(())
}

/// Sends `signal` to every process but this one (`kill(-1, …)`; PID 1 is never a target of
/// it, and kernel threads ignore it). No other process is not a failure.
fn signal_all_others(signal: nix::sys::signal::Signal) -> Result<(), InitError> {
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(-1), signal) {
        Ok(()) | Err(Errno::ESRCH) => Ok(()),
        Err(e) => Err(InitError::SignalAll(signal.as_str(), e)),
    }
}

/// Stops every other process of the guest (`SIGSTOP`, which none can catch): the freeze
/// before a snapshot that is to be forked. Only for PID 1, whose `kill(-1)` is the guest's.
pub fn stop_all_others() -> Result<(), InitError> {
    signal_all_others(nix::sys::signal::Signal::SIGSTOP)
}

/// Lets every other process of the guest go on (`SIGCONT`): the end of a freeze.
pub fn continue_all_others() -> Result<(), InitError> {
    signal_all_others(nix::sys::signal::Signal::SIGCONT)
}

/// Flushes file systems and resets the VM. Returns only if the reset failed.
pub fn reset_vm() -> InitError {
    nix::unistd::sync();
    match nix::sys::reboot::reboot(RebootMode::RB_AUTOBOOT) {
        Err(e) => InitError::Reset(e),
    }
}

/// The one reaper of a test process: every test that spawns children shares it, since two
/// `waitpid(-1)` loops would steal each other's children.
#[cfg(test)]
pub(crate) fn test_reaper() -> Arc<Reaper> {
    static REAPER: std::sync::OnceLock<Arc<Reaper>> = std::sync::OnceLock::new();
    Arc::clone(REAPER.get_or_init(|| Reaper::start().expect("reaper thread")))
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
    fn host_entropy_of_a_wrong_length_is_refused_before_any_syscall() {
        for len in [0, REIDENTIFY_ENTROPY_MIN - 1, REIDENTIFY_ENTROPY_MAX + 1] {
            let e = add_host_entropy(&vec![7; len]).unwrap_err();
            assert!(matches!(e, InitError::EntropyLength(n) if n == len), "{e}");
        }
    }

    #[test]
    fn rand_pool_info_has_the_kernels_header() {
        // Two ints, then the bytes: what the kernel copies from the caller.
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
    }

    #[test]
    fn proc_is_mounted_first() {
        assert_eq!(MOUNTS[0].target, "/proc");
        let targets: Vec<_> = MOUNTS.iter().map(|m| m.target).collect();
        assert_eq!(targets, ["/proc", "/sys", "/dev", "/tmp", "/run"]);
    }
}

//! The plan's steps carried out with real syscalls, in the guest.
//!
//! Everything here runs before the agent starts and before the file copy server may touch the
//! root, so nothing but the image (and what the agent left on the scratch disk in an earlier
//! boot) can have shaped the paths: the steps that look inside the agent's root treat those
//! contents as hostile ([`ensure_mount_point`], [`write_if_missing`]), the others only touch
//! the sidecar's own directories and the tmpfs it just mounted.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, SFlag, fchmod, fstatat, makedev, mkdirat, mknod};
use nix::unistd::{Gid, Uid, UnlinkatFlags, unlinkat};

use super::dir::{Owner, RootDir, open_beneath};
use super::plan::{Mount, Step};
use super::{RootfsError, StepRunner};

/// How long a mount waits for its disk's device node to appear.
pub const DEVICE_WAIT: Duration = Duration::from_secs(5);

/// The pause between two looks for a device node.
const DEVICE_POLL: Duration = Duration::from_millis(50);

/// Carries out steps with real mounts; needs root (PID 1 in the guest).
#[derive(Debug, Default)]
pub struct KernelSteps;

impl StepRunner for KernelSteps {
    fn run(&mut self, step: &Step) -> Result<(), RootfsError> {
        match step {
            Step::Dir { path, mode } => own_dir(path, *mode),
            Step::Mount(m) => mount(m),
            Step::MountPoint { root, name } => ensure_mount_point(root, name),
            Step::CharDevice { path, major, minor } => char_device(path, *major, *minor),
            Step::Symlink { target, path } => {
                std::os::unix::fs::symlink(target, path).map_err(|source| RootfsError::Symlink {
                    path: path.clone(),
                    source,
                })
            }
            Step::FileIfMissing {
                root,
                path,
                contents,
            } => {
                // A userland without localhost is worse off, but still runs: not fatal.
                if let Err(e) = write_if_missing(root, path, contents.as_bytes()) {
                    tracing::warn!(error = %crate::ErrorChain(&e), "rootfs");
                }
                Ok(())
            }
        }
    }
}

/// Creates the sidecar's directory `path` if missing and checks that it is a directory, not a
/// symlink to one.
pub fn own_dir(path: &Path, mode: u32) -> Result<(), RootfsError> {
    use std::os::unix::fs::DirBuilderExt;
    let err = |source| RootfsError::Dir {
        path: path.to_owned(),
        source,
    };
    match std::fs::DirBuilder::new().mode(mode).create(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(err(e)),
    }
    let meta = std::fs::symlink_metadata(path).map_err(err)?;
    if !meta.is_dir() {
        return Err(RootfsError::NotADirectory(path.to_owned()));
    }
    Ok(())
}

/// Waits up to [`DEVICE_WAIT`] for `device` to be a block device node.
fn wait_for_block_device(device: &str) -> Result<(), RootfsError> {
    let start = Instant::now();
    loop {
        match nix::sys::stat::stat(device) {
            Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFBLK => {
                return Ok(());
            }
            Ok(_) => {
                return Err(RootfsError::NotABlockDevice(device.to_owned()));
            }
            Err(_) if start.elapsed() < DEVICE_WAIT => std::thread::sleep(DEVICE_POLL),
            Err(source) => {
                return Err(RootfsError::NoDevice {
                    device: device.to_owned(),
                    waited: DEVICE_WAIT,
                    source,
                });
            }
        }
    }
}

fn mount(m: &Mount) -> Result<(), RootfsError> {
    if m.device {
        wait_for_block_device(&m.source)?;
    }
    nix::mount::mount(
        Some(m.source.as_str()),
        &m.target,
        Some(m.fstype),
        m.flags,
        m.data.as_deref(),
    )
    .map_err(|source| RootfsError::Mount {
        fstype: m.fstype,
        device: m.source.clone(),
        target: m.target.clone(),
        source,
    })?;
    tracing::debug!(fstype = m.fstype, target = %m.target.display(), "rootfs: mounted");
    Ok(())
}

/// Makes `name` directly below `root` a real directory: a symlink, file or other node there is
/// removed first (in the overlay this only whites it out), a missing one is created.
pub fn ensure_mount_point(root: &Path, name: &'static str) -> Result<(), RootfsError> {
    let err = |source| RootfsError::MountPoint { name, source };
    let dir = RootDir::open(root).map_err(err)?;
    match fstatat(dir.fd(), name, AtFlags::AT_SYMLINK_NOFOLLOW) {
        Ok(st) if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT == SFlag::S_IFDIR => {
            return Ok(());
        }
        Ok(_) => {
            tracing::warn!(
                name,
                "rootfs: the image's mount point is not a directory; replacing it"
            );
            unlinkat(dir.fd(), name, UnlinkatFlags::NoRemoveDir).map_err(err)?;
        }
        Err(Errno::ENOENT) => {}
        Err(e) => return Err(err(e)),
    }
    mkdirat(dir.fd(), name, Mode::from_bits_truncate(0o755)).map_err(err)
}

fn char_device(path: &Path, major: u64, minor: u64) -> Result<(), RootfsError> {
    let err = |source| RootfsError::Node {
        path: path.to_owned(),
        source,
    };
    let mode = Mode::from_bits_truncate(0o666);
    mknod(path, SFlag::S_IFCHR, mode, makedev(major, minor)).map_err(err)?;
    // mknod applies the umask. The node is in the tmpfs the sidecar just mounted.
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o666))
        .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))
}

/// Writes `contents` to `path` inside `root` (resolved inside the root, parents created owned
/// by the sidecar) unless something is already there: an image's own file, even a dangling
/// symlink, is left alone.
pub fn write_if_missing(
    root: &Path,
    path: &'static str,
    contents: &[u8],
) -> Result<(), RootfsError> {
    let err = |source| RootfsError::File { path, source };
    let (parent, name) = path.rsplit_once('/').ok_or(err(Errno::EINVAL))?;
    let dir = RootDir::open(root).map_err(err)?;
    let sidecar = Owner {
        uid: Uid::effective().as_raw(),
        gid: Gid::effective().as_raw(),
    };
    let parent = dir
        .create_dir_all(parent, sidecar, Mode::from_bits_truncate(0o755))
        .map_err(err)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
    let mode = Mode::from_bits_truncate(0o644);
    let fd = match open_beneath(parent.as_fd(), Path::new(name), flags, mode) {
        Ok(fd) => fd,
        Err(Errno::EEXIST) => return Ok(()),
        Err(e) => return Err(err(e)),
    };
    fchmod(&fd, mode).map_err(err)?;
    let mut file = std::fs::File::from(fd);
    file.write_all(contents)
        .map_err(|e| err(Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn a_symlinked_mount_point_is_replaced_by_a_directory_and_its_target_untouched() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        std::fs::create_dir(tmp.path().join("victim")).unwrap();
        // The image (or an earlier agent) made /tmp point out of the root, /proc a file.
        std::os::unix::fs::symlink(tmp.path().join("victim"), root.join("tmp")).unwrap();
        std::fs::write(root.join("proc"), b"not a dir").unwrap();
        std::fs::create_dir(root.join("sys")).unwrap();
        std::fs::write(root.join("sys/kept"), b"").unwrap();
        for name in ["tmp", "proc", "sys", "dev"] {
            ensure_mount_point(&root, name).unwrap();
            let meta = std::fs::symlink_metadata(root.join(name)).unwrap();
            assert!(meta.is_dir() && !meta.is_symlink(), "{name}");
        }
        assert!(tmp.path().join("victim").is_dir());
        // An existing directory is kept with its contents.
        assert!(root.join("sys/kept").exists());
    }

    #[test]
    fn hosts_is_written_once_and_never_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        // No /etc at all: it is created, then hosts in it.
        write_if_missing(&root, "/etc/hosts", b"first\n").unwrap();
        let hosts = root.join("etc/hosts");
        assert_eq!(std::fs::read(&hosts).unwrap(), b"first\n");
        assert_eq!(std::fs::metadata(&hosts).unwrap().mode() & 0o777, 0o644);
        write_if_missing(&root, "/etc/hosts", b"second\n").unwrap();
        assert_eq!(std::fs::read(&hosts).unwrap(), b"first\n");

        // A dangling link pointing out of the root is left alone and nothing is written out.
        let root2 = tmp.path().join("root2");
        std::fs::create_dir_all(root2.join("etc")).unwrap();
        let outside = tmp.path().join("outside-hosts");
        std::os::unix::fs::symlink(&outside, root2.join("etc/hosts")).unwrap();
        write_if_missing(&root2, "/etc/hosts", b"x\n").unwrap();
        assert!(!outside.exists());
        assert!(
            std::fs::symlink_metadata(root2.join("etc/hosts"))
                .unwrap()
                .is_symlink()
        );

        // /etc itself a link out of the root: it resolves inside the root, where it dangles,
        // so nothing is written anywhere.
        let root3 = tmp.path().join("root3");
        std::fs::create_dir(&root3).unwrap();
        let elsewhere = tmp.path().join("elsewhere");
        std::fs::create_dir(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, root3.join("etc")).unwrap();
        let r = write_if_missing(&root3, "/etc/hosts", b"x\n");
        assert!(r.is_err(), "{r:?}");
        assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn own_dir_refuses_a_symlink() {
        let tmp = tempfile::tempdir().unwrap();
        own_dir(&tmp.path().join("a"), 0o700).unwrap();
        own_dir(&tmp.path().join("a"), 0o700).unwrap();
        assert_eq!(
            std::fs::metadata(tmp.path().join("a")).unwrap().mode() & 0o777,
            0o700
        );
        std::os::unix::fs::symlink(tmp.path().join("a"), tmp.path().join("b")).unwrap();
        assert!(matches!(
            own_dir(&tmp.path().join("b"), 0o700),
            Err(RootfsError::NotADirectory(_))
        ));
    }
}

//! The agent's root as the sidecar reaches into it: a directory descriptor that every lookup
//! stays inside of.
//!
//! The sidecar runs as root outside the agent's chroot, and the files under the agent's root
//! belong to the image and the agent, both untrusted. So no path into the root is ever handed to
//! a plain `open`: [`RootDir`] resolves absolute paths with `openat2` and
//! `RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV` (symlinks resolve as they would
//! for the chrooted agent, `..` stops at the root, `/proc/*/fd`-style links are refused, and no
//! mount point is crossed, so `/proc`, `/sys`, `/dev` and `/tmp` inside the root are out of
//! reach), and single names below an open directory with
//! `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV` ([`open_beneath`]). A symlink swapped
//! in by the agent between two calls makes the second fail with `ELOOP`; it never redirects it.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{OFlag, OpenHow, ResolveFlag, openat2};
use nix::sys::stat::{Mode, fchmod, mkdirat};
use nix::unistd::{Gid, Uid, fchown};

/// How absolute paths resolve inside the root.
const IN_ROOT: ResolveFlag = ResolveFlag::RESOLVE_IN_ROOT
    .union(ResolveFlag::RESOLVE_NO_MAGICLINKS)
    .union(ResolveFlag::RESOLVE_NO_XDEV);

/// How names resolve below an open directory: no symlink, no mount point, nothing above it.
const BENEATH: ResolveFlag = ResolveFlag::RESOLVE_BENEATH
    .union(ResolveFlag::RESOLVE_NO_SYMLINKS)
    .union(ResolveFlag::RESOLVE_NO_XDEV);

/// The flags of a directory opened to be read and to anchor `*at` calls.
const DIR_FLAGS: OFlag = OFlag::O_RDONLY
    .union(OFlag::O_DIRECTORY)
    .union(OFlag::O_CLOEXEC);

/// Who owns what the sidecar creates in the agent's root.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Owner {
    /// The user id.
    pub uid: u32,
    /// The group id.
    pub gid: u32,
}

impl Owner {
    /// Gives `fd` to this owner.
    pub fn chown(&self, fd: impl AsFd) -> Result<(), Errno> {
        fchown(
            fd.as_fd(),
            Some(Uid::from_raw(self.uid)),
            Some(Gid::from_raw(self.gid)),
        )
    }
}

/// An open directory treated as the root of every path looked up through it.
#[derive(Debug)]
pub struct RootDir {
    fd: OwnedFd,
    /// How absolute paths resolve: [`IN_ROOT`], without `RESOLVE_NO_XDEV` for
    /// [`RootDir::open_crossing_mounts`].
    resolve: ResolveFlag,
}

/// Opens `name` below `dir`: no symlink followed, no mount point crossed, nothing outside
/// `dir`. `name` may hold several components; a symlink anywhere, the last one included, is
/// `ELOOP` (`RESOLVE_NO_SYMLINKS`; `O_NOFOLLOW` would turn it into `ENOTDIR` for a
/// directory).
pub fn open_beneath(
    dir: BorrowedFd<'_>,
    name: &Path,
    flags: OFlag,
    mode: Mode,
) -> Result<OwnedFd, Errno> {
    let how = OpenHow::new()
        .flags(flags | OFlag::O_CLOEXEC)
        .mode(mode)
        .resolve(BENEATH);
    openat2(dir, name, how)
}

/// Opens the directory `name` (one component) below `dir`; with `create`, makes it first when
/// it is missing, then gives it to the owner with the mode. Answers whether it was created.
pub fn child_dir(
    dir: BorrowedFd<'_>,
    name: &Path,
    create: Option<(Owner, Mode)>,
) -> Result<(OwnedFd, bool), Errno> {
    let mut created = false;
    if let Some((_, mode)) = create {
        match mkdirat(dir, name, mode) {
            Ok(()) => created = true,
            Err(Errno::EEXIST) => {}
            Err(e) => return Err(e),
        }
    }
    let fd = open_beneath(dir, name, DIR_FLAGS, Mode::empty())?;
    if let (true, Some((owner, mode))) = (created, create) {
        owner.chown(&fd)?;
        fchmod(&fd, mode)?;
    }
    Ok((fd, created))
}

impl RootDir {
    /// Opens `path` (a path of the sidecar's own file system) as a root whose lookups never
    /// leave its file system.
    pub fn open(path: &Path) -> Result<Self, Errno> {
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Self {
            fd,
            resolve: IN_ROOT,
        })
    }

    /// Opens `path` as a root whose absolute lookups may enter the mounts inside it (`/tmp`,
    /// `/dev/shm`); magic links stay refused. For the sidecar's own preparation of paths the
    /// host chose, such as the agent's working directory; what is created is still created
    /// one real directory at a time ([`child_dir`]).
    pub fn open_crossing_mounts(path: &Path) -> Result<Self, Errno> {
        let fd = nix::fcntl::open(path, DIR_FLAGS, Mode::empty())?;
        Ok(Self {
            fd,
            resolve: IN_ROOT.difference(ResolveFlag::RESOLVE_NO_XDEV),
        })
    }

    /// The root's descriptor.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Opens `path` (absolute, as the agent sees it) with `flags`, resolving inside the root.
    pub fn open_in_root(&self, path: &str, flags: OFlag, mode: Mode) -> Result<OwnedFd, Errno> {
        let how = OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .mode(mode)
            .resolve(self.resolve);
        openat2(self.fd(), path, how)
    }

    /// Opens the directory at `path`.
    pub fn open_dir(&self, path: &str) -> Result<OwnedFd, Errno> {
        self.open_in_root(path, DIR_FLAGS, Mode::empty())
    }

    /// Opens the directory at `path`, first creating its missing components (like
    /// `mkdir -p`), each given to `owner` with `mode`. Existing directories are left as they
    /// are. A `.` or `..` component is `EINVAL`; a symlink where a component is to be created
    /// is `ELOOP`, and so is a mount point for a root that does not cross mounts (`EXDEV`).
    pub fn create_dir_all(&self, path: &str, owner: Owner, mode: Mode) -> Result<OwnedFd, Errno> {
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        if parts.iter().any(|c| *c == "." || *c == "..") {
            return Err(Errno::EINVAL);
        }
        match self.open_dir(path) {
            Err(Errno::ENOENT) => {}
            other => return other,
        }
        // The longest prefix that exists (symlinks in it resolve inside the root); the rest is
        // created below it, one real directory at a time.
        let mut existing = parts.len();
        let mut dir = loop {
            let Some(shorter) = existing.checked_sub(1) else {
                // Only reachable when the root itself vanished.
                return Err(Errno::ENOENT);
            };
            existing = shorter;
            match self.open_dir(&format!("/{}", parts[..existing].join("/"))) {
                Ok(fd) => break fd,
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(e),
            }
        };
        for name in &parts[existing..] {
            dir = child_dir(dir.as_fd(), Path::new(name), Some((owner, mode)))?.0;
        }
        Ok(dir)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    /// The owner tests create files for: a made-up user when the tests run as root (so that
    /// ownership is really changed), the caller otherwise.
    pub(crate) fn test_owner() -> Owner {
        if Uid::effective().is_root() {
            Owner {
                uid: 4242,
                gid: 4343,
            }
        } else {
            Owner {
                uid: Uid::effective().as_raw(),
                gid: Gid::effective().as_raw(),
            }
        }
    }

    /// A temp dir holding `root/` (the agent's root) and `outside/secret` beside it.
    pub(crate) fn root_and_outside() -> (tempfile::TempDir, RootDir) {
        let tmp = tempfile::tempdir().unwrap();
        std::fs::create_dir(tmp.path().join("root")).unwrap();
        std::fs::create_dir(tmp.path().join("outside")).unwrap();
        std::fs::write(tmp.path().join("outside/secret"), b"outside the root").unwrap();
        let root = RootDir::open(&tmp.path().join("root")).unwrap();
        (tmp, root)
    }

    #[test]
    fn symlinks_resolve_inside_the_root_never_out_of_it() {
        let (tmp, root) = root_and_outside();
        let outside = tmp.path().join("outside");
        std::os::unix::fs::symlink("../outside", tmp.path().join("root/up")).unwrap();
        std::os::unix::fs::symlink(&outside, tmp.path().join("root/abs")).unwrap();
        for path in ["/up/secret", "/abs/secret", "/../outside/secret"] {
            let got = root.open_in_root(path, OFlag::O_RDONLY, Mode::empty());
            assert_eq!(got.err(), Some(Errno::ENOENT), "{path}");
        }
        // The same absolute link reaches a copy of its target made inside the root, as it
        // would for the chrooted agent.
        let inside = tmp
            .path()
            .join("root")
            .join(outside.strip_prefix("/").unwrap());
        std::fs::create_dir_all(&inside).unwrap();
        std::fs::write(inside.join("secret"), b"inside").unwrap();
        let fd = root
            .open_in_root("/abs/secret", OFlag::O_RDONLY, Mode::empty())
            .unwrap();
        let text = std::io::read_to_string(std::fs::File::from(fd)).unwrap();
        assert_eq!(text, "inside");
    }

    #[test]
    fn mount_points_and_magic_links_are_not_crossed() {
        // With the whole file system as the root, /proc is another mount, and
        // /proc/self/root a magic link behind it.
        let root = RootDir::open(Path::new("/")).unwrap();
        assert!(root.open_dir("/").is_ok());
        for path in ["/proc", "/proc/self/root", "/proc/self/root/etc"] {
            let got = root.open_dir(path).err();
            assert!(
                matches!(got, Some(Errno::EXDEV | Errno::ELOOP)),
                "{path}: {got:?}"
            );
        }
    }

    #[test]
    fn create_dir_all_makes_owned_directories_and_refuses_symlinks_on_the_way() {
        let (tmp, root) = root_and_outside();
        let owner = test_owner();
        root.create_dir_all("/work/a/b", owner, Mode::from_bits_truncate(0o750))
            .unwrap();
        let meta = std::fs::metadata(tmp.path().join("root/work/a/b")).unwrap();
        assert!(meta.is_dir());
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));
        assert_eq!(meta.mode() & 0o7777, 0o750);
        // An existing directory is opened as it is.
        std::fs::create_dir(tmp.path().join("root/existing")).unwrap();
        std::fs::set_permissions(
            tmp.path().join("root/existing"),
            std::os::unix::fs::PermissionsExt::from_mode(0o711),
        )
        .unwrap();
        root.create_dir_all("/existing", owner, Mode::from_bits_truncate(0o755))
            .unwrap();
        let meta = std::fs::metadata(tmp.path().join("root/existing")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o711);

        // A dangling link that points out of the root: nothing is created outside, and the
        // link itself is not replaced.
        std::os::unix::fs::symlink("../outside/new", tmp.path().join("root/out")).unwrap();
        let r = root.create_dir_all("/out/x", owner, Mode::from_bits_truncate(0o755));
        assert_eq!(r.err(), Some(Errno::ELOOP));
        assert!(!tmp.path().join("outside/new").exists());
        assert!(
            std::fs::symlink_metadata(tmp.path().join("root/out"))
                .unwrap()
                .is_symlink()
        );

        for bad in ["/work/../x", "/./x"] {
            let r = root.create_dir_all(bad, owner, Mode::from_bits_truncate(0o755));
            assert_eq!(r.err(), Some(Errno::EINVAL), "{bad}");
        }
    }

    #[test]
    fn a_root_crossing_mounts_still_refuses_magic_links() {
        let root = RootDir::open_crossing_mounts(Path::new("/")).unwrap();
        assert!(root.open_dir("/proc/self").is_ok());
        let got = root.open_dir("/proc/self/root").err();
        assert_eq!(got, Some(Errno::ELOOP));
    }

    #[test]
    fn open_beneath_refuses_symlinks_and_parents() {
        let (tmp, root) = root_and_outside();
        std::fs::create_dir(tmp.path().join("root/d")).unwrap();
        std::os::unix::fs::symlink("d", tmp.path().join("root/link")).unwrap();
        let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
        assert!(open_beneath(root.fd(), Path::new("d"), flags, Mode::empty()).is_ok());
        let link = open_beneath(root.fd(), Path::new("link"), flags, Mode::empty());
        assert_eq!(link.err(), Some(Errno::ELOOP));
        let up = open_beneath(root.fd(), Path::new("../outside"), flags, Mode::empty());
        assert_eq!(up.err(), Some(Errno::EXDEV));
    }
}

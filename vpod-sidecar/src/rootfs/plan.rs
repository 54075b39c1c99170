//! The mount plan: the steps that build the agent's root, as data.
//!
//! [`plan`] turns a [`RootFs`] into an ordered list of [`Step`]s; a [`super::StepRunner`] carries
//! them out ([`super::kernel::KernelSteps`] in the guest, a recorder in the tests). Keeping the
//! plan apart from the syscalls lets the tests check every mount, flag and path without
//! privileges.
//!
//! The root it builds, under `base` (`/run/nanoclaw` in the guest):
//!
//! ```text
//! base/image            ext4, the image disk: ro, nosuid, nodev, noload
//! base/scratch          ext4, the scratch disk: nosuid, nodev
//! base/scratch/upper    the agent's changes
//! base/scratch/work     overlayfs' work directory
//! base/root             overlay of upper on image: nosuid, nodev      <- the agent's /
//! base/root/proc        proc: nosuid, nodev, noexec
//! base/root/sys         sysfs: ro, nosuid, nodev, noexec
//! base/root/dev         tmpfs: nosuid, noexec; null zero full random urandom tty, the
//!                       fd/stdin/stdout/stderr/ptmx links
//! base/root/dev/pts     devpts (its own instance): nosuid, noexec
//! base/root/dev/shm     tmpfs 1777: nosuid, nodev
//! base/root/tmp         tmpfs 1777: nosuid, nodev
//! base/root/etc/hosts   localhost, when the image has none
//! ```
//!
//! `/dev` is a small tmpfs with only the nodes a userland needs, not the guest's devtmpfs: the
//! disks, the console and the kernel log stay out of the agent's sight. The scratch disk is
//! reused across boots of a VM, so directories that already exist are fine.

use std::path::{Path, PathBuf};

use nix::mount::MsFlags;
use shared_proto::message::RootFs;

use super::RootfsError;

/// Where the image disk is mounted, below the base.
pub const IMAGE_DIR: &str = "image";
/// Where the scratch disk is mounted, below the base.
pub const SCRATCH_DIR: &str = "scratch";
/// The agent's root (the overlay), below the base.
pub const ROOT_DIR: &str = "root";
/// The overlay's upper directory, below the scratch mount.
pub const UPPER_DIR: &str = "upper";
/// The overlay's work directory, below the scratch mount.
pub const WORK_DIR: &str = "work";

/// What `/etc/hosts` holds when the image has none.
pub const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";

/// The character devices of the agent's `/dev`: name, major, minor. All mode 0666.
pub const DEVICES: &[(&str, u64, u64)] = &[
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
    ("tty", 5, 0),
];

/// The symlinks of the agent's `/dev`: name, target.
pub const DEV_LINKS: &[(&str, &str)] = &[
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
    ("ptmx", "pts/ptmx"),
];

const NOSUID_NODEV: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NODEV);
const NOSUID_NODEV_NOEXEC: MsFlags = NOSUID_NODEV.union(MsFlags::MS_NOEXEC);
const NOSUID_NOEXEC: MsFlags = MsFlags::MS_NOSUID.union(MsFlags::MS_NOEXEC);

/// One mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The source: a block device, or the file system's name for virtual ones.
    pub source: String,
    /// The mount point.
    pub target: PathBuf,
    /// The file system type.
    pub fstype: &'static str,
    /// The mount flags.
    pub flags: MsFlags,
    /// The file system's options.
    pub data: Option<String>,
    /// Whether `source` is a block device to wait for (its node appears when the driver has
    /// probed the disk).
    pub device: bool,
}

/// One step of building the agent's root.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// A directory of the sidecar's own (outside the agent's root, or inside a tmpfs it just
    /// mounted): created if missing, and it must then be a directory, not a symlink.
    Dir {
        /// The directory.
        path: PathBuf,
        /// Its mode when created.
        mode: u32,
    },
    /// A mount.
    Mount(Mount),
    /// `name`, directly below the agent's root, made a real directory to mount on: a symlink
    /// or file the image (or the agent, in an earlier boot) left there is removed first, so
    /// that a mount never follows a link out of the root.
    MountPoint {
        /// The agent's root.
        root: PathBuf,
        /// One path component.
        name: &'static str,
    },
    /// A character device node, mode 0666, owned by root.
    CharDevice {
        /// The node.
        path: PathBuf,
        /// Its major number.
        major: u64,
        /// Its minor number.
        minor: u64,
    },
    /// A symlink.
    Symlink {
        /// What it points to.
        target: &'static str,
        /// The link.
        path: PathBuf,
    },
    /// A file inside the agent's root, written (mode 0644, owned by root) only if nothing,
    /// not even a dangling symlink, is at `path`. Resolved inside the root.
    FileIfMissing {
        /// The agent's root.
        root: PathBuf,
        /// The file, as the agent sees it.
        path: &'static str,
        /// Its contents.
        contents: &'static str,
    },
}

/// Checks that `device` names a node under `/dev/` with no `.`, `..` or empty component and no
/// character that would need quoting.
fn check_device(field: &'static str, device: &str) -> Result<(), RootfsError> {
    let bad = |reason: &'static str| RootfsError::BadSpec { field, reason };
    let rest = device
        .strip_prefix("/dev/")
        .ok_or_else(|| bad("is not under /dev/"))?;
    let ok_chars = rest
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'/' | b'-' | b'_' | b'.' | b':'));
    if !ok_chars || rest.len() > 255 {
        return Err(bad(
            "holds characters other than letters, digits and / - _ . :",
        ));
    }
    if rest
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(bad("has an empty, . or .. component"));
    }
    Ok(())
}

/// The steps that build the agent's root from `root` under `base`, in order.
pub fn plan(base: &Path, root: &RootFs) -> Result<Vec<Step>, RootfsError> {
    check_device("image_device", &root.image_device)?;
    check_device("scratch_device", &root.scratch_device)?;
    if root.image_device == root.scratch_device {
        return Err(RootfsError::BadSpec {
            field: "scratch_device",
            reason: "is the image device",
        });
    }
    let image = base.join(IMAGE_DIR);
    let scratch = base.join(SCRATCH_DIR);
    let upper = scratch.join(UPPER_DIR);
    let work = scratch.join(WORK_DIR);
    let agent_root = base.join(ROOT_DIR);
    let dev = agent_root.join("dev");
    let dir = |path: PathBuf, mode: u32| Step::Dir { path, mode };
    let mount = |source: &str, target: PathBuf, fstype, flags, data: Option<&str>| {
        Step::Mount(Mount {
            source: source.to_owned(),
            target,
            fstype,
            flags,
            data: data.map(str::to_owned),
            device: false,
        })
    };
    let disk = |source: &str, target: PathBuf, flags, data: Option<&str>| {
        Step::Mount(Mount {
            source: source.to_owned(),
            target,
            fstype: "ext4",
            flags,
            data: data.map(str::to_owned),
            device: true,
        })
    };
    let point = |name| Step::MountPoint {
        root: agent_root.clone(),
        name,
    };
    let overlay = format!(
        "lowerdir={},upperdir={},workdir={}",
        image.display(),
        upper.display(),
        work.display()
    );

    let mut steps = vec![
        dir(base.to_owned(), 0o755),
        dir(image.clone(), 0o700),
        dir(scratch.clone(), 0o700),
        dir(agent_root.clone(), 0o755),
        // `noload`: a read-only disk must not need its journal replayed to mount.
        disk(
            &root.image_device,
            image,
            NOSUID_NODEV | MsFlags::MS_RDONLY,
            Some("noload"),
        ),
        disk(&root.scratch_device, scratch, NOSUID_NODEV, None),
        dir(upper, 0o755),
        dir(work, 0o700),
        mount(
            "overlay",
            agent_root.clone(),
            "overlay",
            NOSUID_NODEV,
            Some(&overlay),
        ),
        point("proc"),
        mount(
            "proc",
            agent_root.join("proc"),
            "proc",
            NOSUID_NODEV_NOEXEC,
            None,
        ),
        point("sys"),
        mount(
            "sysfs",
            agent_root.join("sys"),
            "sysfs",
            NOSUID_NODEV_NOEXEC | MsFlags::MS_RDONLY,
            None,
        ),
        point("dev"),
        mount(
            "tmpfs",
            dev.clone(),
            "tmpfs",
            NOSUID_NOEXEC,
            Some("mode=0755,size=64k"),
        ),
    ];
    steps.extend(
        DEVICES
            .iter()
            .map(|&(name, major, minor)| Step::CharDevice {
                path: dev.join(name),
                major,
                minor,
            }),
    );
    steps.extend([
        dir(dev.join("pts"), 0o755),
        mount(
            "devpts",
            dev.join("pts"),
            "devpts",
            NOSUID_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        ),
        dir(dev.join("shm"), 0o755),
        mount(
            "tmpfs",
            dev.join("shm"),
            "tmpfs",
            NOSUID_NODEV,
            Some("mode=1777"),
        ),
    ]);
    steps.extend(DEV_LINKS.iter().map(|&(name, target)| Step::Symlink {
        target,
        path: dev.join(name),
    }));
    steps.extend([
        point("tmp"),
        mount(
            "tmpfs",
            agent_root.join("tmp"),
            "tmpfs",
            NOSUID_NODEV,
            Some("mode=1777"),
        ),
        Step::FileIfMissing {
            root: agent_root,
            path: "/etc/hosts",
            contents: HOSTS,
        },
    ]);
    Ok(steps)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> RootFs {
        RootFs {
            image_device: "/dev/vda".into(),
            scratch_device: "/dev/vdb".into(),
        }
    }

    fn mounts(steps: &[Step]) -> Vec<&Mount> {
        steps
            .iter()
            .filter_map(|s| match s {
                Step::Mount(m) => Some(m),
                _ => None,
            })
            .collect()
    }

    fn position(steps: &[Step], want: impl Fn(&Step) -> bool) -> usize {
        steps.iter().position(want).expect("step missing")
    }

    #[test]
    fn the_disks_are_mounted_then_joined_by_the_overlay() {
        let steps = plan(Path::new("/run/nanoclaw"), &spec()).unwrap();
        let m = mounts(&steps);
        let targets: Vec<_> = m.iter().map(|m| m.target.to_str().unwrap()).collect();
        assert_eq!(
            targets,
            [
                "/run/nanoclaw/image",
                "/run/nanoclaw/scratch",
                "/run/nanoclaw/root",
                "/run/nanoclaw/root/proc",
                "/run/nanoclaw/root/sys",
                "/run/nanoclaw/root/dev",
                "/run/nanoclaw/root/dev/pts",
                "/run/nanoclaw/root/dev/shm",
                "/run/nanoclaw/root/tmp",
            ]
        );
        let image = m[0];
        assert_eq!((image.source.as_str(), image.fstype), ("/dev/vda", "ext4"));
        assert!(
            image
                .flags
                .contains(MsFlags::MS_RDONLY | MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
        );
        assert_eq!(image.data.as_deref(), Some("noload"));
        assert!(image.device);
        let scratch = m[1];
        assert_eq!(
            (scratch.source.as_str(), scratch.fstype),
            ("/dev/vdb", "ext4")
        );
        assert!(!scratch.flags.contains(MsFlags::MS_RDONLY));
        assert!(scratch.device);
        let overlay = m[2];
        assert_eq!(overlay.fstype, "overlay");
        assert_eq!(
            overlay.data.as_deref(),
            Some(
                "lowerdir=/run/nanoclaw/image,upperdir=/run/nanoclaw/scratch/upper,\
                 workdir=/run/nanoclaw/scratch/work"
            )
        );
        assert!(
            overlay
                .flags
                .contains(MsFlags::MS_NOSUID | MsFlags::MS_NODEV)
        );
        // upper and work are made on the mounted scratch disk, before the overlay.
        let upper = position(
            &steps,
            |s| matches!(s, Step::Dir { path, .. } if path.ends_with("scratch/upper")),
        );
        let work = position(
            &steps,
            |s| matches!(s, Step::Dir { path, .. } if path.ends_with("scratch/work")),
        );
        let scratch_at = position(
            &steps,
            |s| matches!(s, Step::Mount(m) if m.fstype == "ext4" && !m.flags.contains(MsFlags::MS_RDONLY)),
        );
        let overlay_at = position(
            &steps,
            |s| matches!(s, Step::Mount(m) if m.fstype == "overlay"),
        );
        assert!(scratch_at < upper && upper < overlay_at && work < overlay_at);
    }

    #[test]
    fn inside_the_root_nothing_is_suid_and_only_dev_has_devices() {
        let steps = plan(Path::new("/base"), &spec()).unwrap();
        for m in mounts(&steps) {
            assert!(m.flags.contains(MsFlags::MS_NOSUID), "{m:?}");
            let is_dev = m.target == Path::new("/base/root/dev");
            assert_eq!(
                m.flags.contains(MsFlags::MS_NODEV),
                !is_dev && m.fstype != "devpts",
                "{m:?}"
            );
        }
        let sys = mounts(&steps)
            .into_iter()
            .find(|m| m.fstype == "sysfs")
            .unwrap();
        assert!(sys.flags.contains(MsFlags::MS_RDONLY));
        let tmp = mounts(&steps)
            .into_iter()
            .find(|m| m.target == Path::new("/base/root/tmp"))
            .unwrap();
        assert_eq!(tmp.data.as_deref(), Some("mode=1777"));
    }

    #[test]
    fn every_mount_inside_the_root_follows_its_mount_point_check() {
        let steps = plan(Path::new("/base"), &spec()).unwrap();
        for name in ["proc", "sys", "dev", "tmp"] {
            let checked = position(
                &steps,
                |s| matches!(s, Step::MountPoint { name: n, .. } if *n == name),
            );
            let mounted = position(
                &steps,
                |s| matches!(s, Step::Mount(m) if m.target == Path::new("/base/root").join(name)),
            );
            let overlay = position(
                &steps,
                |s| matches!(s, Step::Mount(m) if m.fstype == "overlay"),
            );
            assert!(overlay < checked && checked < mounted, "{name}");
        }
        // Device nodes and links land in the fresh tmpfs, after it is mounted.
        let dev = position(
            &steps,
            |s| matches!(s, Step::Mount(m) if m.target == Path::new("/base/root/dev")),
        );
        let nodes: Vec<_> = steps
            .iter()
            .enumerate()
            .filter_map(|(i, s)| match s {
                Step::CharDevice { path, major, minor } => Some((i, path.clone(), *major, *minor)),
                _ => None,
            })
            .collect();
        assert_eq!(nodes.len(), DEVICES.len());
        assert!(
            nodes
                .iter()
                .all(|(i, path, ..)| *i > dev && path.starts_with("/base/root/dev"))
        );
        assert!(
            nodes
                .iter()
                .any(|(_, p, major, minor)| p.ends_with("null") && (*major, *minor) == (1, 3))
        );
        let hosts = steps.last().unwrap();
        assert_eq!(
            hosts,
            &Step::FileIfMissing {
                root: "/base/root".into(),
                path: "/etc/hosts",
                contents: HOSTS
            }
        );
    }

    #[test]
    fn devices_must_be_distinct_plain_nodes_under_dev() {
        for (image, scratch, field) in [
            ("/dev/vda", "/dev/vda", "scratch_device"),
            ("vda", "/dev/vdb", "image_device"),
            ("/dev/../etc/x", "/dev/vdb", "image_device"),
            ("/dev/vda", "/dev/vdb,upperdir=/", "scratch_device"),
            ("/dev/vda", "/dev/", "scratch_device"),
            ("/dev//vda", "/dev/vdb", "image_device"),
            ("/etc/vda", "/dev/vdb", "image_device"),
        ] {
            let r = plan(
                Path::new("/base"),
                &RootFs {
                    image_device: image.into(),
                    scratch_device: scratch.into(),
                },
            );
            assert!(
                matches!(r, Err(RootfsError::BadSpec { field: f, .. }) if f == field),
                "{image} {scratch}: {r:?}"
            );
        }
        let by_id = RootFs {
            image_device: "/dev/disk/by-id/virtio-image".into(),
            scratch_device: "/dev/vdb".into(),
        };
        assert!(plan(Path::new("/base"), &by_id).is_ok());
    }
}

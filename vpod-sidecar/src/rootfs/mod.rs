//! The agent's root file system: a read-only image disk and a writable scratch disk joined by
//! overlayfs, with `/proc`, `/sys`, a small `/dev` and `/tmp` inside, and who the agent runs as
//! in it.
//!
//! When `RunAgent` carries a [`RootFs`], the runner ([`crate::agent`]) calls [`build`] before it
//! starts the agent:
//!
//! 1. a [`RootSetup`] mounts everything ([`KernelRoot`] in the guest: the steps of
//!    [`plan::plan`] carried out by [`kernel::KernelSteps`]) and answers where the root is;
//! 2. [`finish`] resolves the spec's `user` against the root's `/etc/passwd` and `/etc/group`
//!    ([`identity`]) and makes sure the working directory exists (created owned by the agent).
//!
//! The agent is then started chrooted into the root, in its working directory, as the resolved
//! ids (see [`crate::agent`]). The sidecar itself stays outside: its binary, its `/run/nanoclaw`
//! files, the mount points of the disks and its sockets (vsock, and TCP on the loopback, which
//! the agent shares) are not below the agent's root, and the agent, unprivileged and with
//! `no_new_privs`, cannot leave a chroot. No private mount namespace is needed: the agent
//! cannot mount, and the file copy server ([`crate::files`]) needs the sidecar's own view of
//! the root anyway.
//!
//! A failure (a missing disk, a corrupt image, an unknown user) ends the run like any other
//! start failure: an `Error` naming the step and the cause, then `AgentExited` with 126.
//!
//! # Layout
//!
//! - this file: the error enum, the [`StepRunner`] and [`RootSetup`] traits, [`build`] and
//!   [`finish`].
//! - [`plan`]: the mounts as data.
//! - [`kernel`]: the steps as syscalls.
//! - [`dir`]: [`RootDir`], lookups confined to the root with `openat2`.
//! - [`identity`]: `/etc/passwd` and `/etc/group`, and the user resolution.

pub mod dir;
pub mod identity;
pub mod kernel;
pub mod plan;

use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{Mode, SFlag, fstat};
use shared_proto::message::{AgentSpec, RootFs};

use dir::open_beneath;
pub use dir::{Owner, RootDir};
use identity::{Identity, IdentityError};
pub use plan::Step;

/// Where the sidecar builds the agent's root in the guest.
pub const BASE: &str = "/run/nanoclaw";

/// Errors of building the agent's root.
#[derive(Debug, thiserror::Error)]
pub enum RootfsError {
    /// A field of the spec is unusable.
    #[error("{field} {reason}")]
    BadSpec {
        /// The field.
        field: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// Creating one of the sidecar's directories failed.
    #[error("cannot create {path}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// One of the sidecar's directories is something else (such as a symlink).
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    /// A disk's device node did not appear.
    #[error("disk {device} did not appear within {waited:?}; is it attached?")]
    NoDevice {
        /// The device node.
        device: String,
        /// How long the sidecar waited.
        waited: Duration,
        /// The last `stat` failure.
        #[source]
        source: Errno,
    },
    /// A disk's path is not a block device.
    #[error("{0} is not a block device")]
    NotABlockDevice(String),
    /// A mount failed (for a disk: corrupt, not ext4, or the wrong disk).
    #[error("cannot mount {fstype} {device} on {target}")]
    Mount {
        /// The file system type.
        fstype: &'static str,
        /// The source.
        device: String,
        /// The mount point.
        target: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Making a mount point inside the root failed.
    #[error("cannot make /{name} a directory in the agent's root")]
    MountPoint {
        /// The mount point's name.
        name: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Making a device node failed.
    #[error("cannot make device node {path}")]
    Node {
        /// The node.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Making a symlink failed.
    #[error("cannot make symlink {path}")]
    Symlink {
        /// The link.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// Writing a file into the root failed.
    #[error("cannot write {path} in the agent's root")]
    File {
        /// The file, as the agent sees it.
        path: &'static str,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// Opening the root failed.
    #[error("cannot open the agent's root {path}")]
    OpenRoot {
        /// The root.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// The spec's user cannot be resolved.
    #[error("cannot resolve the agent's user")]
    Identity(#[source] IdentityError),
    /// The working directory cannot be made.
    #[error("cannot make the working directory {cwd} in the agent's root")]
    Cwd {
        /// The directory.
        cwd: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// `/etc/resolv.conf` cannot be written in the agent's root.
    #[error("cannot write /etc/resolv.conf in the agent's root")]
    ResolvConf(#[source] Errno),
}

/// Carries out one step of a plan.
pub trait StepRunner {
    /// Does `step`, or says why not.
    fn run(&mut self, step: &Step) -> Result<(), RootfsError>;
}

/// Carries out `steps` in order, stopping at the first failure.
pub fn carry_out(steps: &[Step], runner: &mut dyn StepRunner) -> Result<(), RootfsError> {
    steps.iter().try_for_each(|step| runner.run(step))
}

/// Mounts an agent's root and answers where it is.
pub trait RootSetup: Send + Sync + std::fmt::Debug {
    /// Builds the root for `root`; the answer is the directory the agent is chrooted into.
    fn mount(&self, root: &RootFs) -> Result<PathBuf, RootfsError>;
}

/// The guest's [`RootSetup`]: real mounts under a base directory ([`BASE`]).
#[derive(Debug, Clone)]
pub struct KernelRoot {
    base: PathBuf,
}

impl Default for KernelRoot {
    fn default() -> Self {
        Self {
            base: PathBuf::from(BASE),
        }
    }
}

impl RootSetup for KernelRoot {
    fn mount(&self, root: &RootFs) -> Result<PathBuf, RootfsError> {
        let steps = plan::plan(&self.base, root)?;
        carry_out(&steps, &mut kernel::KernelSteps)?;
        tracing::info!(
            image = %root.image_device,
            scratch = %root.scratch_device,
            "rootfs: agent root mounted"
        );
        Ok(self.base.join(plan::ROOT_DIR))
    }
}

/// An agent root ready for the agent: where it is and whose it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreparedRoot {
    /// The directory the agent is chrooted into.
    pub path: PathBuf,
    /// The agent's ids; what the file copy server creates in the root is theirs.
    pub owner: Owner,
}

/// Builds the root of `spec` (which must carry one) with `setup`, then [`finish`]es it.
pub fn build(setup: &dyn RootSetup, spec: &AgentSpec) -> Result<PreparedRoot, RootfsError> {
    let Some(root) = &spec.root else {
        return Err(RootfsError::BadSpec {
            field: "root",
            reason: "is absent",
        });
    };
    let path = setup.mount(root)?;
    finish(&path, spec)
}

/// Resolves `spec`'s user against the root at `path` and makes its working directory (missing
/// components owned by the agent, mode 0755). The working directory may be on a mount inside
/// the root (`/tmp`); the user databases are read from the root's own file system.
pub fn finish(path: &Path, spec: &AgentSpec) -> Result<PreparedRoot, RootfsError> {
    if !spec.cwd.starts_with('/') {
        return Err(RootfsError::BadSpec {
            field: "cwd",
            reason: "is not an absolute path",
        });
    }
    let open_err = |source| RootfsError::OpenRoot {
        path: path.to_owned(),
        source,
    };
    let identity = resolve_user(&RootDir::open(path).map_err(open_err)?, spec)?;
    let owner = Owner {
        uid: identity.uid,
        gid: identity.gid,
    };
    RootDir::open_crossing_mounts(path)
        .map_err(open_err)?
        .create_dir_all(&spec.cwd, owner, Mode::from_bits_truncate(0o755))
        .map_err(|source| RootfsError::Cwd {
            cwd: spec.cwd.clone(),
            source,
        })?;
    if let Some(net) = &spec.network {
        let root = RootDir::open(path).map_err(open_err)?;
        write_resolv_conf(&root, net.dns).map_err(RootfsError::ResolvConf)?;
    }
    Ok(PreparedRoot {
        path: path.to_owned(),
        owner,
    })
}

/// The text of `/etc/resolv.conf` naming `dns` alone.
pub fn resolv_conf(dns: std::net::Ipv4Addr) -> String {
    format!(
        "# Written by the Nanoclaw sidecar: the host's resolver for this VM.\nnameserver {dns}\n"
    )
}

/// Replaces `/etc/resolv.conf` of the root `dir` with one naming `dns`. The image's entry may
/// be a symlink (to a systemd-resolved stub, or anywhere): it is unlinked, never followed, and
/// a new file (root's, mode 0644) is created in its place.
pub fn write_resolv_conf(dir: &RootDir, dns: std::net::Ipv4Addr) -> Result<(), Errno> {
    let etc = dir.create_dir_all(
        "/etc",
        Owner { uid: 0, gid: 0 },
        Mode::from_bits_truncate(0o755),
    )?;
    match nix::unistd::unlinkat(&etc, "resolv.conf", nix::unistd::UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => {}
        Err(e) => return Err(e),
    }
    let fd = open_beneath(
        etc.as_fd(),
        Path::new("resolv.conf"),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL,
        Mode::from_bits_truncate(0o644),
    )?;
    let text = resolv_conf(dns);
    let mut file = std::fs::File::from(fd);
    std::io::Write::write_all(&mut file, text.as_bytes())
        .map_err(|e| Errno::from_raw(e.raw_os_error().unwrap_or(nix::libc::EIO)))
}

/// Resolves `spec.user` against the databases of the root `dir` (see [`identity`]); logs the
/// note of a fallback.
pub fn resolve_user(dir: &RootDir, spec: &AgentSpec) -> Result<Identity, RootfsError> {
    let default = (spec.uid, spec.gid);
    let identity = match spec.user.as_deref() {
        None => identity::resolve(None, default, &[], &[]),
        Some(user) => {
            let passwd = read_database(dir, "/etc/passwd")?;
            let group = read_database(dir, "/etc/group")?;
            identity::resolve(
                Some(user),
                default,
                &identity::parse_passwd(&passwd),
                &identity::parse_group(&group),
            )
        }
    }
    .map_err(RootfsError::Identity)?;
    if let Some(note) = &identity.note {
        tracing::warn!(%note, "agent user");
    }
    Ok(identity)
}

/// Reads an image database, capped; a missing one (or one that is not a regular file) is
/// empty.
fn read_database(dir: &RootDir, file: &'static str) -> Result<Vec<u8>, RootfsError> {
    let read_err =
        |source: std::io::Error| RootfsError::Identity(IdentityError::Read { file, source });
    // O_NONBLOCK: a FIFO planted in the image must not hang the sidecar.
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK;
    let fd = match dir.open_in_root(file, flags, Mode::empty()) {
        Ok(fd) => fd,
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        Err(e) => return Err(read_err(e.into())),
    };
    let st = fstat(fd.as_fd()).map_err(|e| read_err(e.into()))?;
    if SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT != SFlag::S_IFREG {
        tracing::warn!(file, "rootfs: not a regular file; read as empty");
        return Ok(Vec::new());
    }
    identity::read_capped(std::fs::File::from(fd)).map_err(read_err)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn resolv_conf_replaces_a_symlink_without_following_it() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("victim");
        std::fs::write(&target, "keep").unwrap();
        std::fs::create_dir(root.path().join("etc")).unwrap();
        std::os::unix::fs::symlink(&target, root.path().join("etc/resolv.conf")).unwrap();
        let dir = RootDir::open(root.path()).unwrap();
        write_resolv_conf(&dir, "10.200.0.1".parse().unwrap()).unwrap();
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep");
        let path = root.path().join("etc/resolv.conf");
        let meta = std::fs::symlink_metadata(&path).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(meta.mode() & 0o777, 0o644);
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().any(|l| l == "nameserver 10.200.0.1"), "{text}");
        assert_eq!(
            text.lines().filter(|l| l.starts_with("nameserver")).count(),
            1
        );
        // A root without /etc gets one; writing again replaces the file.
        let bare = tempfile::tempdir().unwrap();
        let dir = RootDir::open(bare.path()).unwrap();
        write_resolv_conf(&dir, "10.200.0.9".parse().unwrap()).unwrap();
        write_resolv_conf(&dir, "10.200.0.9".parse().unwrap()).unwrap();
        assert!(
            std::fs::read_to_string(bare.path().join("etc/resolv.conf"))
                .unwrap()
                .contains("nameserver 10.200.0.9\n")
        );
    }

    /// A [`RootSetup`] over a directory prepared by the test: no mounts.
    #[derive(Debug)]
    pub(crate) struct ReadyDir(pub PathBuf);

    impl RootSetup for ReadyDir {
        fn mount(&self, _root: &RootFs) -> Result<PathBuf, RootfsError> {
            Ok(self.0.clone())
        }
    }

    pub(crate) fn root_spec(cwd: &str, user: Option<&str>) -> AgentSpec {
        AgentSpec {
            command: "/bin/true".into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: cwd.into(),
            uid: 4000,
            gid: 4001,
            mcp: None,
            root: Some(RootFs {
                image_device: "/dev/vda".into(),
                scratch_device: "/dev/vdb".into(),
            }),
            user: user.map(str::to_owned),
            network: None,
        }
    }

    /// Records the steps and fails the one at `fail_at`.
    struct Recorder {
        seen: Vec<Step>,
        fail_at: usize,
    }

    impl StepRunner for Recorder {
        fn run(&mut self, step: &Step) -> Result<(), RootfsError> {
            if self.seen.len() == self.fail_at {
                let Step::Mount(m) = step else {
                    panic!("expected a mount at {}: {step:?}", self.fail_at)
                };
                return Err(RootfsError::Mount {
                    fstype: m.fstype,
                    device: m.source.clone(),
                    target: m.target.clone(),
                    source: Errno::EINVAL,
                });
            }
            self.seen.push(step.clone());
            Ok(())
        }
    }

    #[test]
    fn a_failed_mount_stops_the_plan_and_names_the_disk() {
        let steps = plan::plan(
            Path::new(BASE),
            &RootFs {
                image_device: "/dev/vda".into(),
                scratch_device: "/dev/vdb".into(),
            },
        )
        .unwrap();
        let image_at = steps
            .iter()
            .position(|s| matches!(s, Step::Mount(m) if m.source == "/dev/vda"))
            .unwrap();
        let mut rec = Recorder {
            seen: Vec::new(),
            fail_at: image_at,
        };
        let err = carry_out(&steps, &mut rec).unwrap_err();
        assert_eq!(rec.seen.len(), image_at);
        let text = crate::ErrorChain(&err).to_string();
        assert_eq!(
            text,
            "cannot mount ext4 /dev/vda on /run/nanoclaw/image: EINVAL: Invalid argument"
        );
    }

    #[test]
    fn finish_resolves_the_user_from_the_image_and_makes_the_cwd_theirs() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        let owner = dir::tests::test_owner();
        std::fs::write(
            root.join("etc/passwd"),
            format!(
                "root:x:0:0::/root:/bin/sh\nagent:x:{}:{}::/home/agent:/bin/sh\n",
                owner.uid, owner.gid
            ),
        )
        .unwrap();
        std::fs::write(root.join("etc/group"), "root:x:0:\n").unwrap();

        let spec = root_spec("/home/agent/work", Some("agent"));
        let prepared = build(&ReadyDir(root.to_owned()), &spec).unwrap();
        assert_eq!(prepared.owner, owner);
        assert_eq!(prepared.path, root);
        let meta = std::fs::metadata(root.join("home/agent/work")).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (owner.uid, owner.gid));

        // Root in the image falls back to the spec's ids.
        let prepared = build(&ReadyDir(root.to_owned()), &root_spec("/", Some("root"))).unwrap();
        assert_eq!(
            prepared.owner,
            Owner {
                uid: 4000,
                gid: 4001
            }
        );

        // An unknown user ends the start with the reason.
        let err = build(&ReadyDir(root.to_owned()), &root_spec("/", Some("ghost"))).unwrap_err();
        assert_eq!(
            crate::ErrorChain(&err).to_string(),
            "cannot resolve the agent's user: user \"ghost\" is not in the image's /etc/passwd"
        );
    }

    #[test]
    fn an_image_without_databases_only_knows_numbers_and_a_fifo_does_not_hang() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let prepared = build(
            &ReadyDir(root.to_owned()),
            &root_spec("/w", Some("1500:1600")),
        );
        assert_eq!(
            prepared.unwrap().owner,
            Owner {
                uid: 1500,
                gid: 1600
            }
        );
        assert!(build(&ReadyDir(root.to_owned()), &root_spec("/w", Some("agent"))).is_err());

        std::fs::create_dir(root.join("etc")).unwrap();
        nix::unistd::mkfifo(&root.join("etc/passwd"), Mode::from_bits_truncate(0o644)).unwrap();
        let r = build(&ReadyDir(root.to_owned()), &root_spec("/w", Some("agent")));
        assert!(matches!(
            r,
            Err(RootfsError::Identity(IdentityError::UnknownUser(_)))
        ));
    }

    #[test]
    fn a_relative_or_escaping_cwd_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let setup = ReadyDir(tmp.path().to_owned());
        assert!(matches!(
            build(&setup, &root_spec("work", None)),
            Err(RootfsError::BadSpec { field: "cwd", .. })
        ));
        assert!(matches!(
            build(&setup, &root_spec("/work/../..", None)),
            Err(RootfsError::Cwd { .. })
        ));
        assert!(matches!(
            build(
                &setup,
                &AgentSpec {
                    root: None,
                    ..root_spec("/", None)
                }
            ),
            Err(RootfsError::BadSpec { field: "root", .. })
        ));
    }
}

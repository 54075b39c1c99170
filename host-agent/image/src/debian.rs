//! Building a Debian image with debootstrap: `debootstrap --variant=minbase` with the recipe's
//! packages, then its pip packages installed in a chroot, an unprivileged `agent` user, a
//! cleanup of what makes two builds differ, and the ext4 root file system.
//!
//! An image built from a recipe is stored under the recipe's hash ([`DebianRecipe::hash`]:
//! suite, mirror, sorted packages, sorted pip packages, epoch and [`BUILDER_VERSION`]), so a
//! second build of the same recipe finds it in the store and only names it.
//!
//! Reproducibility, as far as the tools allow: apt lists and caches, `*-old` files, logs (kept,
//! emptied), `/tmp`, the host's resolv.conf and hostname that debootstrap copies in, and the
//! machine-id's contents are removed; every mtime and atime is clamped to the recipe's epoch,
//! which is also `SOURCE_DATE_EPOCH` for pip (so `.pyc` files use hashes, not times) and
//! mke2fs. What still differs between two builds: package versions if the mirror moved on,
//! inode change times (mke2fs copies them and nothing can set them), and file order within
//! directories.
//!
//! The `agent` user (uid and gid 1000, home `/home/agent`) is added by appending to the
//! passwd, group, shadow and gshadow files rather than by running `useradd` in the chroot: the
//! lines are then fixed (no "last changed" date of today), and no tool from the image runs as
//! root on the host more than pip needs to.
//!
//! Every write into the tree goes through [`tree_path`], which refuses a path whose parents
//! are symlinks, so a package cannot redirect these writes (or the `/proc` and `/dev` mounts) to
//! the host.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::digest::Digest;
use crate::ext4::{Ext4Error, RootfsParams, make_rootfs};
use crate::import::rootfs_label;
use crate::name::{ImageName, NameError};
use crate::store::{ImageInfo, ImageMeta, ImageOrigin, ImageStore, StoreError, now_unix};
use crate::tool::{CHROOT, DEBOOTSTRAP, ToolError};
use crate::tree::{self, TreeError};

/// Bumped whenever the build steps change what an image holds; part of every recipe hash.
pub const BUILDER_VERSION: u32 = 1;
/// The default mirror.
pub const DEFAULT_MIRROR: &str = "http://deb.debian.org/debian";
/// The agent user's name.
pub const AGENT_USER: &str = "agent";
/// The agent user's uid and gid.
pub const AGENT_ID: u32 = 1000;
/// The agent user's home.
pub const AGENT_HOME: &str = "/home/agent";
/// The `PATH` of images built here.
pub const IMAGE_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// The hostname written into images.
const HOSTNAME: &str = "nanoclaw\n";
/// `/etc/hosts` written when the image has none.
const HOSTS: &str = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n";
/// Longest package or pip requirement accepted.
const MAX_SPEC_LEN: usize = 200;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum DebianError {
    /// The image name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// The suite is not `[a-z][a-z0-9-]*`.
    #[error("suite {0:?} is not a Debian suite name")]
    BadSuite(String),
    /// A package name breaks Debian policy's rule.
    #[error("package {0:?} is not a Debian package name")]
    BadPackage(String),
    /// A pip requirement is not a plain `name[extras]<op>version` specifier.
    #[error("pip requirement {0:?} is not a plain requirement specifier")]
    BadPipPackage(String),
    /// The mirror is not an http(s) URL.
    #[error("mirror {0:?} is not an http(s) URL")]
    BadMirror(String),
    /// The epoch is zero (mke2fs would take it as unset).
    #[error("the recipe's epoch must be after 1970-01-01")]
    BadEpoch,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// debootstrap is missing or failed.
    #[error("debootstrap")]
    Debootstrap(#[source] ToolError),
    /// pip in the chroot is missing or failed.
    #[error("pip install in the image")]
    Pip(#[source] ToolError),
    /// A path of the tree goes through a symlink or a non-directory.
    #[error("{path:?} in the image goes through a symlink or a non-directory")]
    UnsafePath { path: PathBuf },
    /// Mounting `/proc` or `/dev` into the chroot failed.
    #[error("mounting {path:?}")]
    Mount {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Unmounting failed; the staging directory is left in place so nothing below a mount is
    /// deleted.
    #[error("unmounting {path:?} (staging directory left at {staging:?})")]
    Unmount {
        path: PathBuf,
        staging: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// The `agent` user or uid/gid 1000 already exists in the image.
    #[error("the image already has user or group {AGENT_USER} or id {AGENT_ID}")]
    AgentTaken,
    /// Reading, writing or removing a file of the tree failed.
    #[error("preparing {path:?} in the image")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Walking the tree or clamping times failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
    /// Making the ext4 disk failed.
    #[error(transparent)]
    Ext4(#[from] Ext4Error),
}

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DebianRecipe {
    /// The suite, such as `bookworm`.
    pub suite: String,
    /// Debian packages besides the minbase set.
    pub packages: Vec<String>,
    /// pip requirements (`name`, `name==1.2`, `name[extra]>=1`), installed system-wide.
    pub pip_packages: Vec<String>,
    /// The mirror.
    pub mirror: String,
    /// The time every file is clamped to, and mke2fs's time (seconds since the epoch).
    pub epoch: u64,
}

impl DebianRecipe {
    /// A recipe for `suite` with no extra packages, the default mirror and epoch.
    pub fn new(suite: &str) -> Self {
        Self {
            suite: suite.to_owned(),
            packages: Vec::new(),
            pip_packages: Vec::new(),
            mirror: DEFAULT_MIRROR.to_owned(),
            epoch: crate::DEFAULT_EPOCH,
        }
    }

    /// Checks every field and returns the canonical form: packages and pip requirements
    /// sorted and deduplicated, `python3-pip` added when there are pip requirements, the
    /// mirror without a trailing `/`.
    pub fn normalized(&self) -> Result<Self, DebianError> {
        let suite_ok = self.suite.len() <= 32
            && self.suite.starts_with(|c: char| c.is_ascii_lowercase())
            && self
                .suite
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
        if !suite_ok {
            return Err(DebianError::BadSuite(self.suite.clone()));
        }
        for p in &self.packages {
            if !is_package_name(p) {
                return Err(DebianError::BadPackage(p.clone()));
            }
        }
        for p in &self.pip_packages {
            if !is_pip_requirement(p) {
                return Err(DebianError::BadPipPackage(p.clone()));
            }
        }
        let mirror = self.mirror.trim_end_matches('/');
        let mirror_ok = (mirror.starts_with("http://") || mirror.starts_with("https://"))
            && mirror.len() <= 512
            && mirror.bytes().all(|b| b.is_ascii_graphic());
        if !mirror_ok {
            return Err(DebianError::BadMirror(self.mirror.clone()));
        }
        if self.epoch == 0 {
            return Err(DebianError::BadEpoch);
        }
        let mut packages = self.packages.clone();
        if !self.pip_packages.is_empty() {
            packages.push("python3-pip".to_owned());
        }
        packages.sort();
        packages.dedup();
        let mut pip_packages = self.pip_packages.clone();
        pip_packages.sort();
        pip_packages.dedup();
        Ok(Self {
            suite: self.suite.clone(),
            packages,
            pip_packages,
            mirror: mirror.to_owned(),
            epoch: self.epoch,
        })
    }

    /// The hash of the normalized recipe and [`BUILDER_VERSION`]: the built image's digest.
    pub fn hash(&self) -> Result<Digest, DebianError> {
        #[derive(Serialize)]
        struct Keyed<'a> {
            builder_version: u32,
            recipe: &'a DebianRecipe,
        }
        let recipe = self.normalized()?;
        let keyed = Keyed {
            builder_version: BUILDER_VERSION,
            recipe: &recipe,
        };
        // Plain strings and numbers: serializing cannot fail.
        Ok(Digest::of(&serde_json::to_vec(&keyed).unwrap_or_default()))
    }
}

/// Debian policy: lowercase alphanumerics, `+`, `-`, `.`, starting alphanumeric, 2+ chars.
fn is_package_name(name: &str) -> bool {
    name.len() >= 2
        && name.len() <= MAX_SPEC_LEN
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'+' | b'-' | b'.')
        })
}

/// A PEP 508 name with optional extras and version clauses; no URLs, paths, spaces or options.
fn is_pip_requirement(spec: &str) -> bool {
    spec.len() <= MAX_SPEC_LEN
        && spec.starts_with(|c: char| c.is_ascii_alphanumeric())
        && spec.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'.' | b'_' | b'-' | b'[' | b']' | b',' | b'=' | b'<' | b'>'
                )
                || matches!(b, b'!' | b'~' | b'*')
        })
}

/// The config of images built here: user `agent`, working directory its home.
pub fn agent_config() -> ImageConfig {
    ImageConfig {
        env: vec![
            format!("PATH={IMAGE_PATH}"),
            format!("HOME={AGENT_HOME}"),
            format!("USER={AGENT_USER}"),
            "LANG=C.UTF-8".to_owned(),
        ],
        working_dir: AGENT_HOME.to_owned(),
        user: format!("{AGENT_ID}:{AGENT_ID}"),
        entrypoint: Vec::new(),
        cmd: vec!["/bin/bash".to_owned()],
    }
}

/// Builds (or finds in the store) the image of `recipe` and names it `name`. Needs root and the
/// network. `progress` gets lines such as `"debootstrap: ..."`, `"pip: ..."`, `"mkfs: ..."`.
pub fn build_debian(
    store: &ImageStore,
    name: &str,
    recipe: &DebianRecipe,
    mut progress: impl FnMut(&str),
) -> Result<ImageInfo, DebianError> {
    let progress: &mut dyn FnMut(&str) = &mut progress;
    let name = ImageName::new(name)?;
    let recipe = recipe.normalized()?;
    let digest = recipe.hash()?;
    if let Some(info) = store.tag_existing(&name, &digest)? {
        progress(&format!("cache: recipe {digest} is already built"));
        return Ok(info);
    }
    // Find the tools before any work.
    DEBOOTSTRAP.find().map_err(DebianError::Debootstrap)?;
    if !recipe.pip_packages.is_empty() {
        CHROOT.find().map_err(DebianError::Pip)?;
    }
    let staging = store.staging()?;
    let root = staging.tree();
    create_dir(&root, 0o755)?;
    tracing::info!(%name, %digest, suite = recipe.suite, "building Debian image");

    let mut cmd = DEBOOTSTRAP.command().map_err(DebianError::Debootstrap)?;
    cmd.arg("--variant=minbase");
    if !recipe.packages.is_empty() {
        cmd.arg(format!("--include={}", recipe.packages.join(",")));
    }
    cmd.arg(&recipe.suite).arg(&root).arg(&recipe.mirror);
    DEBOOTSTRAP
        .run(cmd, "debootstrap", progress)
        .map_err(DebianError::Debootstrap)?;

    if !recipe.pip_packages.is_empty() {
        let mounts = ChrootMounts::mount(&root)?;
        let installed = install_pip(&root, &recipe, progress);
        if let Err(e) = mounts.unmount() {
            let kept = staging.keep();
            let DebianError::Unmount { path, source, .. } = e else {
                return Err(e);
            };
            return Err(DebianError::Unmount {
                path,
                staging: kept,
                source,
            });
        }
        installed?;
    }

    add_agent_user(&root, recipe.epoch)?;
    clean(&root)?;
    tree::clamp_times(&root, recipe.epoch)?;
    let stats = tree::stats(&root)?;
    create_dir(&staging.blob(), 0o755)?;
    let params = RootfsParams {
        digest,
        label: rootfs_label(&digest),
        epoch: recipe.epoch,
    };
    let rootfs_bytes = make_rootfs(&root, &staging.rootfs(), &stats, &params, progress)?;
    let meta = ImageMeta {
        digest,
        origin: ImageOrigin::Debian {
            recipe: recipe.clone(),
        },
        rootfs_bytes,
        created_unix: now_unix(),
    };
    let info = store.commit(&staging, &name, &agent_config(), &meta)?;
    progress(&format!(
        "done: {name} {digest}, {} MiB",
        rootfs_bytes >> 20
    ));
    Ok(info)
}

fn install_pip(
    root: &Path,
    recipe: &DebianRecipe,
    progress: &mut dyn FnMut(&str),
) -> Result<(), DebianError> {
    let resolv = tree_path(root, "etc/resolv.conf")?;
    let host_resolv = fs::read("/etc/resolv.conf").map_err(|source| DebianError::Io {
        path: "/etc/resolv.conf".into(),
        source,
    })?;
    write_new(&resolv, &host_resolv, 0o644)?;
    let mut cmd = CHROOT.command().map_err(DebianError::Pip)?;
    cmd.env("HOME", "/root")
        .env("SOURCE_DATE_EPOCH", recipe.epoch.to_string())
        .arg(root)
        .args([
            "/usr/bin/python3",
            "-m",
            "pip",
            "install",
            "--break-system-packages",
        ])
        .args([
            "--no-cache-dir",
            "--no-input",
            "--disable-pip-version-check",
        ])
        .args(["--root-user-action=ignore", "--progress-bar=off"])
        .args(&recipe.pip_packages);
    let result = CHROOT.run(cmd, "pip", progress).map_err(DebianError::Pip);
    remove_any(&resolv)?;
    result
}

/// `/proc` and the host's `/dev` mounted into a chroot while pip runs.
#[derive(Debug)]
struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    fn mount(root: &Path) -> Result<Self, DebianError> {
        let mut mounts = Self {
            mounted: Vec::new(),
        };
        for (dir, source, fstype, flags) in [
            (
                "proc",
                "proc",
                Some("proc"),
                MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            ),
            ("dev", "/dev", None, MsFlags::MS_BIND | MsFlags::MS_REC),
        ] {
            let target = tree_path(root, dir)?;
            if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                return Err(DebianError::UnsafePath { path: target });
            }
            if let Err(source) =
                nix::mount::mount(Some(source), &target, fstype, flags, None::<&str>)
            {
                // Undo what was mounted; the mount error is the one to report.
                let _ = mounts.unmount();
                return Err(DebianError::Mount {
                    path: target,
                    source,
                });
            }
            mounts.mounted.push(target);
        }
        Ok(mounts)
    }

    /// Detaches every mount, last first. `MNT_DETACH` succeeds even while something in the
    /// chroot still holds a file open, so the tree can be deleted afterwards.
    fn unmount(mut self) -> Result<(), DebianError> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<(), DebianError> {
        while let Some(path) = self.mounted.pop() {
            if let Err(source) = nix::mount::umount2(&path, MntFlags::MNT_DETACH) {
                return Err(DebianError::Unmount {
                    path,
                    staging: PathBuf::new(),
                    source,
                });
            }
        }
        Ok(())
    }
}

impl Drop for ChrootMounts {
    fn drop(&mut self) {
        // Only reached with mounts left on a panic path; `unmount` is the normal way out.
        if let Err(e) = self.unmount_all() {
            tracing::error!(error = %e, "leaving chroot mounts");
        }
    }
}

/// Adds the `agent` user and group and its home.
pub fn add_agent_user(root: &Path, epoch: u64) -> Result<(), DebianError> {
    let id = AGENT_ID.to_string();
    let taken = |file: &str, id_field: usize| -> Result<bool, DebianError> {
        let path = tree_path(root, file)?;
        let text = read_text(&path)?;
        Ok(text.lines().any(|line| {
            let fields: Vec<&str> = line.split(':').collect();
            fields.first() == Some(&AGENT_USER) || fields.get(id_field) == Some(&id.as_str())
        }))
    };
    if taken("etc/passwd", 2)? || taken("etc/group", 2)? {
        return Err(DebianError::AgentTaken);
    }
    let days = epoch / 86_400;
    let lines = [
        (
            "etc/passwd",
            format!("{AGENT_USER}:x:{id}:{id}:Nanoclaw agent:{AGENT_HOME}:/bin/bash\n"),
        ),
        ("etc/group", format!("{AGENT_USER}:x:{id}:\n")),
        (
            "etc/shadow",
            format!("{AGENT_USER}:*:{days}:0:99999:7:::\n"),
        ),
        ("etc/gshadow", format!("{AGENT_USER}:!::\n")),
    ];
    for (file, line) in lines {
        let path = tree_path(root, file)?;
        if file == "etc/gshadow" && !path.exists() {
            continue;
        }
        append(&path, line.as_bytes())?;
    }
    let home = tree_path(root, AGENT_HOME.trim_start_matches('/'))?;
    if !home.exists() {
        create_dir(&home, 0o750)?;
    }
    chown(&home)?;
    let skel = tree_path(root, "etc/skel")?;
    if let Ok(entries) = fs::read_dir(&skel) {
        for entry in entries {
            let entry = entry.map_err(|source| DebianError::Io {
                path: skel.clone(),
                source,
            })?;
            let from = entry.path();
            let is_file = fs::symlink_metadata(&from).is_ok_and(|m| m.is_file());
            let to = home.join(entry.file_name());
            if is_file && !to.exists() {
                let bytes = fs::read(&from).map_err(|source| DebianError::Io {
                    path: from.clone(),
                    source,
                })?;
                write_new(&to, &bytes, 0o644)?;
                chown(&to)?;
            }
        }
    }
    Ok(())
}

/// Removes what differs between two builds of the same recipe and what no image should carry.
pub fn clean(root: &Path) -> Result<(), DebianError> {
    clear_dir(root, "var/lib/apt/lists", &["partial", "lock"])?;
    clear_dir(root, "var/lib/apt/lists/partial", &[])?;
    clear_dir(root, "var/cache/apt/archives", &["partial", "lock"])?;
    clear_dir(root, "var/cache/apt/archives/partial", &[])?;
    for file in ["pkgcache.bin", "srcpkgcache.bin"] {
        remove_any(&tree_path(root, &format!("var/cache/apt/{file}"))?)?;
    }
    for dir in ["var/cache/debconf", "var/lib/dpkg", "etc"] {
        remove_matching(root, dir, |name| {
            name.ends_with("-old") || name.ends_with('~')
        })?;
    }
    empty_files(root, "var/log")?;
    clear_dir(root, "tmp", &[])?;
    clear_dir(root, "var/tmp", &[])?;
    remove_any(&tree_path(root, "root/.cache")?)?;
    remove_any(&tree_path(root, "var/lib/dbus/machine-id")?)?;
    remove_any(&tree_path(root, "etc/resolv.conf")?)?;
    let machine_id = tree_path(root, "etc/machine-id")?;
    if fs::symlink_metadata(&machine_id).is_ok() {
        remove_any(&machine_id)?;
        // Empty, not absent: systemd then makes one at boot instead of treating it as "first boot".
        write_new(&machine_id, b"", 0o444)?;
    }
    let hostname = tree_path(root, "etc/hostname")?;
    remove_any(&hostname)?;
    write_new(&hostname, HOSTNAME.as_bytes(), 0o644)?;
    let hosts = tree_path(root, "etc/hosts")?;
    if fs::symlink_metadata(&hosts).is_err() {
        write_new(&hosts, HOSTS.as_bytes(), 0o644)?;
    }
    Ok(())
}

/// `root/rel`, after checking that no parent of it is a symlink or a non-directory (a missing
/// parent is fine: the caller will find nothing there, or fail to create).
pub fn tree_path(root: &Path, rel: &str) -> Result<PathBuf, DebianError> {
    let mut path = root.to_owned();
    let components: Vec<_> = Path::new(rel).components().collect();
    for (i, c) in components.iter().enumerate() {
        let Component::Normal(part) = c else {
            return Err(DebianError::UnsafePath {
                path: root.join(rel),
            });
        };
        path.push(part);
        if i + 1 < components.len() {
            match fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                _ => return Err(DebianError::UnsafePath { path }),
            }
        }
    }
    Ok(path)
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DebianError + '_ {
    move |source| DebianError::Io {
        path: path.to_owned(),
        source,
    }
}

fn read_text(path: &Path) -> Result<String, DebianError> {
    if fs::symlink_metadata(path).is_ok_and(|m| !m.is_file()) {
        return Err(DebianError::UnsafePath {
            path: path.to_owned(),
        });
    }
    fs::read_to_string(path).map_err(io_err(path))
}

/// Appends to an existing regular file (never through a symlink).
fn append(path: &Path, bytes: &[u8]) -> Result<(), DebianError> {
    let mut file = OpenOptions::new()
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))
}

/// Creates a new file (never through a symlink).
fn write_new(path: &Path, bytes: &[u8], mode: u32) -> Result<(), DebianError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(io_err(path))?;
    file.write_all(bytes).map_err(io_err(path))?;
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io_err(path))
}

fn create_dir(path: &Path, mode: u32) -> Result<(), DebianError> {
    fs::create_dir(path).map_err(io_err(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(io_err(path))
}

fn chown(path: &Path) -> Result<(), DebianError> {
    std::os::unix::fs::lchown(path, Some(AGENT_ID), Some(AGENT_ID)).map_err(io_err(path))
}

fn remove_any(path: &Path) -> Result<(), DebianError> {
    let result = match fs::symlink_metadata(path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => Err(e),
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
    };
    result.map_err(io_err(path))
}

/// Sorted names in `rel`, or none if it is not a directory.
fn children(root: &Path, rel: &str) -> Result<Vec<(String, PathBuf)>, DebianError> {
    let dir = tree_path(root, rel)?;
    if !fs::symlink_metadata(&dir).is_ok_and(|m| m.is_dir()) {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let entry = entry.map_err(io_err(&dir))?;
        out.push((
            entry.file_name().to_string_lossy().into_owned(),
            entry.path(),
        ));
    }
    out.sort();
    Ok(out)
}

fn clear_dir(root: &Path, rel: &str, keep: &[&str]) -> Result<(), DebianError> {
    remove_matching(root, rel, |name| !keep.contains(&name))
}

fn remove_matching(
    root: &Path,
    rel: &str,
    matches: impl Fn(&str) -> bool,
) -> Result<(), DebianError> {
    for (name, path) in children(root, rel)? {
        if matches(&name) {
            remove_any(&path)?;
        }
    }
    Ok(())
}

/// Truncates every regular file below `rel` (log files keep their owner and mode).
fn empty_files(root: &Path, rel: &str) -> Result<(), DebianError> {
    for (name, path) in children(root, rel)? {
        let meta = fs::symlink_metadata(&path).map_err(io_err(&path))?;
        if meta.is_dir() {
            empty_files(root, &format!("{rel}/{name}"))?;
        } else if meta.is_file() && meta.len() > 0 {
            OpenOptions::new()
                .write(true)
                .truncate(true)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&path)
                .map_err(io_err(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(packages: &[&str], pip: &[&str]) -> DebianRecipe {
        DebianRecipe {
            packages: packages.iter().map(|s| s.to_string()).collect(),
            pip_packages: pip.iter().map(|s| s.to_string()).collect(),
            ..DebianRecipe::new("bookworm")
        }
    }

    #[test]
    fn hash_ignores_order_duplicates_and_trailing_slash() {
        let a = recipe(&["python3", "ca-certificates"], &["openai", "mcp==1.2"]);
        let mut b = recipe(
            &["ca-certificates", "python3", "python3"],
            &["mcp==1.2", "openai"],
        );
        b.mirror.push('/');
        assert_eq!(a.hash().unwrap(), b.hash().unwrap());
        assert!(
            a.normalized()
                .unwrap()
                .packages
                .contains(&"python3-pip".to_owned())
        );
    }

    #[test]
    fn hash_changes_with_every_field() {
        let base = recipe(&["python3"], &[]);
        let h = base.hash().unwrap();
        let variants = [
            DebianRecipe {
                suite: "trixie".into(),
                ..base.clone()
            },
            recipe(&["python3", "git"], &[]),
            recipe(&["python3"], &["openai"]),
            DebianRecipe {
                mirror: "http://mirror.example/debian".into(),
                ..base.clone()
            },
            DebianRecipe {
                epoch: base.epoch + 1,
                ..base.clone()
            },
        ];
        for v in variants {
            assert_ne!(v.hash().unwrap(), h, "{v:?}");
        }
    }

    #[test]
    fn refuses_option_injection_and_odd_values() {
        assert!(matches!(
            recipe(&["--foo"], &[]).hash(),
            Err(DebianError::BadPackage(_))
        ));
        assert!(matches!(
            recipe(&["a,b"], &[]).hash(),
            Err(DebianError::BadPackage(_))
        ));
        for bad in [
            "--index-url=http://x",
            "-r/etc/passwd",
            "pkg @ http://x",
            "./local",
            "",
        ] {
            assert!(
                matches!(
                    recipe(&[], &[bad]).hash(),
                    Err(DebianError::BadPipPackage(_))
                ),
                "{bad}"
            );
        }
        let ok = recipe(
            &["g++", "libc6.1"],
            &["openai>=1,<2", "uvicorn[standard]==0.3"],
        );
        assert!(ok.hash().is_ok());
        let bad_suite = DebianRecipe::new("../bookworm");
        assert!(matches!(bad_suite.hash(), Err(DebianError::BadSuite(_))));
        let bad_mirror = DebianRecipe {
            mirror: "file:///etc".into(),
            ..DebianRecipe::new("sid")
        };
        assert!(matches!(bad_mirror.hash(), Err(DebianError::BadMirror(_))));
        let zero = DebianRecipe {
            epoch: 0,
            ..DebianRecipe::new("sid")
        };
        assert!(matches!(zero.hash(), Err(DebianError::BadEpoch)));
    }

    /// A tree that looks enough like debootstrap's output for the steps after it.
    fn fake_debian(root: &Path) {
        for dir in [
            "etc/skel",
            "home",
            "tmp",
            "var/log/apt",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ] {
            fs::create_dir_all(root.join(dir)).unwrap();
        }
        let files: [(&str, &[u8]); 11] = [
            ("etc/passwd", b"root:x:0:0:root:/root:/bin/bash\n"),
            ("etc/group", b"root:x:0:\n"),
            ("etc/shadow", b"root:*:19000:0:99999:7:::\n"),
            ("etc/gshadow", b"root:*::\n"),
            ("etc/skel/.bashrc", b"# bashrc\n"),
            ("etc/hostname", b"build-host\n"),
            ("etc/resolv.conf", b"nameserver 10.0.0.1\n"),
            ("var/log/apt/history.log", b"Start-Date: today\n"),
            (
                "var/lib/apt/lists/deb.debian.org_dists_bookworm_Release",
                b"x",
            ),
            ("var/cache/apt/archives/python3_3.11_amd64.deb", b"x"),
            ("var/lib/dpkg/status-old", b"x"),
        ];
        for (file, bytes) in files {
            fs::write(root.join(file), bytes).unwrap();
        }
    }

    #[test]
    fn agent_user_and_cleanup_on_a_fake_tree() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fake_debian(root);
        add_agent_user(root, 86_400 * 20_000).unwrap();
        let passwd = fs::read_to_string(root.join("etc/passwd")).unwrap();
        assert!(passwd.ends_with("agent:x:1000:1000:Nanoclaw agent:/home/agent:/bin/bash\n"));
        let shadow = fs::read_to_string(root.join("etc/shadow")).unwrap();
        assert!(shadow.contains("agent:*:20000:"));
        assert!(
            fs::read_to_string(root.join("etc/group"))
                .unwrap()
                .contains("agent:x:1000:\n")
        );
        use std::os::unix::fs::MetadataExt;
        let home = fs::metadata(root.join("home/agent")).unwrap();
        assert_eq!((home.uid(), home.gid()), (AGENT_ID, AGENT_ID));
        assert_eq!(
            fs::metadata(root.join("home/agent/.bashrc")).unwrap().uid(),
            AGENT_ID
        );
        // A second time, the user is taken.
        assert!(matches!(
            add_agent_user(root, 1),
            Err(DebianError::AgentTaken)
        ));

        clean(root).unwrap();
        assert_eq!(
            fs::read_to_string(root.join("etc/hostname")).unwrap(),
            HOSTNAME
        );
        assert!(!root.join("etc/resolv.conf").exists());
        assert!(root.join("etc/hosts").exists());
        assert_eq!(
            fs::metadata(root.join("var/log/apt/history.log"))
                .unwrap()
                .len(),
            0
        );
        assert!(root.join("var/lib/apt/lists/partial").is_dir());
        assert_eq!(
            fs::read_dir(root.join("var/lib/apt/lists"))
                .unwrap()
                .count(),
            1
        );
        assert!(
            !root
                .join("var/cache/apt/archives/python3_3.11_amd64.deb")
                .exists()
        );
        assert!(!root.join("var/lib/dpkg/status-old").exists());
    }

    #[test]
    fn writes_never_go_through_symlinks() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        let outside = dir.path().join("outside");
        fs::create_dir_all(root.join("var/log")).unwrap();
        fs::create_dir(&outside).unwrap();
        fs::write(outside.join("secret"), b"keep").unwrap();
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        assert!(matches!(
            tree_path(&root, "etc/passwd"),
            Err(DebianError::UnsafePath { .. })
        ));
        assert!(matches!(
            add_agent_user(&root, 1),
            Err(DebianError::UnsafePath { .. })
        ));
        // A symlinked log file is left alone, not truncated through.
        std::os::unix::fs::symlink(outside.join("secret"), root.join("var/log/x.log")).unwrap();
        empty_files(&root, "var/log").unwrap();
        assert_eq!(fs::read(outside.join("secret")).unwrap(), b"keep");
    }

    #[test]
    fn cached_recipe_is_only_named_again() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let r = recipe(&["python3"], &[]);
        let digest = r.hash().unwrap();
        // Put a built image for the recipe in the store by hand.
        let staging = store.staging().unwrap();
        fs::create_dir(staging.blob()).unwrap();
        fs::write(staging.rootfs(), b"disk").unwrap();
        let meta = ImageMeta {
            digest,
            origin: ImageOrigin::Debian {
                recipe: r.normalized().unwrap(),
            },
            rootfs_bytes: 4,
            created_unix: 1,
        };
        let name = ImageName::new("first").unwrap();
        store
            .commit(&staging, &name, &agent_config(), &meta)
            .unwrap();
        drop(staging);

        let mut lines = Vec::new();
        let started = std::time::Instant::now();
        let info = build_debian(&store, "second", &r, |l| lines.push(l.to_owned())).unwrap();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert_eq!(info.digest, digest);
        assert_eq!(info.config, agent_config());
        assert!(lines.iter().all(|l| l.starts_with("cache: ")), "{lines:?}");
        assert_eq!(store.list().unwrap().len(), 2);
        // A different recipe is not a cache hit: it would need debootstrap (not run here).
        let other = recipe(&["python3", "git"], &[]);
        assert_eq!(
            store.tag_existing(&name, &other.hash().unwrap()).unwrap(),
            None
        );
    }
}

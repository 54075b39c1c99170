//! Snapshots the daemon keeps: `<state-dir>/snapshots/<name>/`.
//!
//! A snapshot is taken by the VM's own VMM (its control socket's `snapshot`, see
//! [`super::vmm_control`]) into a new folder inside the VMM's folder, the root of its jail,
//! where the files belong to the VM's jail uid. The daemon then moves the two files out of the
//! jail into a staging folder of the store (`.partial-<name>`, root's, mode 0700), relative to
//! a descriptor of the VMM's folder opened without following links (`renameat`), checks that
//! each is a plain file with one link (a VMM cannot hand over a link to another file), makes
//! it root's and mode 0600, copies the VM's writable disk beside them (taken while the VM is
//! paused), writes [`META_FILE`] and renames the staging folder to `<name>`. A folder without
//! [`META_FILE`] is not a snapshot, and is not listed.
//!
//! Each folder holds:
//! - `state.bin` and `memory.bin`, the VMM's files (their format is the VMM's `snapshot`
//!   module's); `memory.bin` holds the whole of guest memory, and so any secret the guest had;
//! - `scratch.img`, a copy of the VM's writable disk, for VMs with an image;
//! - [`META_FILE`]: what the snapshot was taken of ([`SnapshotMeta`]).
//!
//! A restore leaves the VMM's two files where they are: the new VM's VMM opens them read-only
//! while it is still root, before it enters its jail (`nanoclaw-vmm --restore DIR`), and maps
//! the memory file copy-on-write as the guest's RAM. The stored files stay root's and 0600, so
//! no VM can change them, and a restore costs no copy of guest memory. A stored file is never
//! changed in place (a VM may map it): deleting a snapshot unlinks it. Only the writable disk is copied (sparse: holes stay holes)
//! into the new VM's own folder, since each VM writes to its own.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use nanoclaw_api::{CreateVm, MAX_SNAPSHOT_NAME, SnapshotInfo};
use serde::{Deserialize, Serialize};

/// The store's folder inside the state folder.
pub const SNAPSHOTS_DIR: &str = "snapshots";
/// The metadata file of a snapshot folder.
pub const META_FILE: &str = "snapshot.json";
/// The VMM's state file.
pub const STATE_FILE: &str = "state.bin";
/// The VMM's memory file.
pub const MEMORY_FILE: &str = "memory.bin";
/// The copy of the VM's writable disk.
pub const DISK_FILE: &str = "scratch.img";
/// The state file's magic (the VMM's `snapshot::format`).
const MAGIC: &[u8; 8] = b"NCLAWSNP";
/// The snapshot format version of the VMM this daemon runs.
pub const FORMAT_VERSION: u32 = 2;
/// The longest metadata file read.
const MAX_META: u64 = 256 << 10;

/// Errors of snapshots.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// A name that is not a plain one.
    #[error("bad snapshot name {0:?}: use 1 to 64 of A-Z a-z 0-9 . _ -, not starting with . or -")]
    BadName(String),
    /// No such snapshot.
    #[error("no snapshot named {0}")]
    NotFound(String),
    /// The name is taken.
    #[error("a snapshot named {0} exists already")]
    Exists(String),
    /// No such VM.
    #[error("no VM with id {0}")]
    NoVm(String),
    /// The VM's VMM does not run.
    #[error("the VM is {0}; only a running VM can be snapshotted")]
    NotRunning(&'static str),
    /// The VMM could not be asked, or refused.
    #[error("the VMM")]
    Vmm(#[source] super::vmm_control::VmmControlError),
    /// The guest did not stop its processes for the snapshot.
    #[error("cannot freeze the guest")]
    Freeze(#[source] super::vm::FreezeError),
    /// The VMM left something else than a plain file.
    #[error("the VMM's {} is not a plain file with one link", .0.display())]
    NotPlain(PathBuf),
    /// A file of the snapshot is missing.
    #[error("snapshot {name} is incomplete: {file} is missing")]
    Missing {
        /// The snapshot.
        name: String,
        /// The file.
        file: &'static str,
    },
    /// The state file is of another format.
    #[error("snapshot {name} is of format version {found}; this daemon's VMM reads {supported}")]
    Format {
        /// The snapshot.
        name: String,
        /// Its version.
        found: u32,
        /// Ours.
        supported: u32,
    },
    /// The state file or the metadata is not one the daemon or the VMM wrote.
    #[error("snapshot {name} is damaged: {why}")]
    Damaged {
        /// The snapshot.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The image the snapshot's VM ran is gone.
    #[error("the image disk {} of snapshot {name} is gone", .path.display())]
    ImageGone {
        /// The snapshot.
        name: String,
        /// The image's root disk.
        path: PathBuf,
    },
    /// A file operation failed.
    #[error("cannot {what} {}", .path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// On which path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError {
    let path = path.to_path_buf();
    move |source| SnapshotError::Io { what, path, source }
}

/// What [`META_FILE`] holds: the API's view, and what a restore needs besides.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    /// The VM taken.
    pub source_vm: String,
    /// What it was created with.
    pub spec: CreateVm,
    /// Its image and disks (the root disk is the image store's, shared; the writable disk is
    /// copied into the snapshot as [`DISK_FILE`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<super::images::VmImage>,
    /// When it was taken.
    pub created_unix_ms: u64,
    /// The state file's format version.
    pub format_version: u32,
    /// The memory file's length.
    pub memory_bytes: u64,
    /// Bytes of it with data.
    pub memory_data_bytes: u64,
    /// The state file's length.
    pub state_bytes: u64,
    /// The disk copy's length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk_bytes: Option<u64>,
    /// The sidecar's boot id when it was taken: a restored guest is that boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_id: Option<String>,
    /// Whether the agent had been asked to run.
    #[serde(default)]
    pub agent_sent: bool,
    /// The agent's pid in the guest, if it had started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_pid: Option<u32>,
    /// Whether the guest's processes were frozen in it (a running VM with its sidecar
    /// connected): then none of them runs in a restored copy before it has a new identity.
    /// A VM snapshotted while paused was not frozen.
    #[serde(default)]
    pub frozen: bool,
    /// The daemon's VMM, guest kernel and initramfs when it was taken
    /// (`VmmLaunch::guest_fingerprint`): a warm template of another machine is not used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<String>,
}

/// Checks a snapshot name: 1 to [`MAX_SNAPSHOT_NAME`] of `A-Z a-z 0-9 . _ -`, not starting
/// with `.` or `-` (so never `.`, `..`, a hidden staging folder or an option).
pub fn validate_name(name: &str) -> Result<(), SnapshotError> {
    let ok = !name.is_empty()
        && name.len() <= MAX_SNAPSHOT_NAME
        && !name.starts_with(['.', '-'])
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(SnapshotError::BadName(name.chars().take(80).collect()))
    }
}

/// A fresh name: `snap-` and eight random hex digits.
pub fn fresh_name() -> Result<String, SnapshotError> {
    super::state::random_id()
        .map(|id| format!("snap-{id}"))
        .map_err(io("draw a name from", Path::new("/dev/urandom")))
}

/// The snapshot store.
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// The store in `state_dir`, made (mode 0700) if missing; leftover staging folders of an
    /// interrupted snapshot are deleted.
    pub fn open(state_dir: &Path) -> Result<Self, SnapshotError> {
        let dir = state_dir.join(SNAPSHOTS_DIR);
        make_dir(&dir)?;
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for entry in entries.flatten() {
                if entry.file_name().to_string_lossy().starts_with(".partial-") {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok(Self { dir })
    }

    /// The folder of snapshot `name` (checked).
    pub fn path(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        validate_name(name)?;
        Ok(self.dir.join(name))
    }

    /// A new staging folder for snapshot `name`, refused if the name is taken.
    pub fn stage(&self, name: &str) -> Result<PathBuf, SnapshotError> {
        if self.path(name)?.exists() {
            return Err(SnapshotError::Exists(name.to_owned()));
        }
        let staging = self.dir.join(format!(".partial-{name}"));
        match std::fs::DirBuilder::new().mode(0o700).create(&staging) {
            Ok(()) => Ok(staging),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(SnapshotError::Exists(name.to_owned()))
            }
            Err(e) => Err(io("create", &staging)(e)),
        }
    }

    /// Writes the metadata into `staging` and makes it snapshot `name`.
    pub fn commit(
        &self,
        staging: &Path,
        name: &str,
        meta: &SnapshotMeta,
    ) -> Result<SnapshotInfo, SnapshotError> {
        let meta_path = staging.join(META_FILE);
        let text = serde_json::to_vec_pretty(meta)
            .map_err(|e| io("write", &meta_path)(std::io::Error::other(e)))?;
        shared_proto::fs::replace_file(&meta_path, &text, 0o600)
            .map_err(|e| io("write", &meta_path)(e.into()))?;
        let target = self.path(name)?;
        // renameat2(RENAME_NOREPLACE) would be exact; the store's lock is the daemon's own.
        if target.exists() {
            return Err(SnapshotError::Exists(name.to_owned()));
        }
        std::fs::rename(staging, &target).map_err(io("rename", staging))?;
        Ok(info(name, &target, meta.clone()))
    }

    /// Every snapshot, oldest first; folders without readable metadata are skipped.
    pub fn list(&self) -> Vec<SnapshotInfo> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut all: Vec<SnapshotInfo> = entries
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| validate_name(name).is_ok())
            .filter_map(|name| self.get(&name).ok())
            .collect();
        all.sort_by(|a, b| (a.created_unix_ms, &a.name).cmp(&(b.created_unix_ms, &b.name)));
        all
    }

    /// Snapshot `name`'s API view.
    pub fn get(&self, name: &str) -> Result<SnapshotInfo, SnapshotError> {
        let dir = self.path(name)?;
        Ok(info(name, &dir, self.meta(name)?))
    }

    /// Snapshot `name`'s metadata.
    pub fn meta(&self, name: &str) -> Result<SnapshotMeta, SnapshotError> {
        let dir = self.path(name)?;
        if !dir.is_dir() {
            return Err(SnapshotError::NotFound(name.to_owned()));
        }
        let path = dir.join(META_FILE);
        let mut text = Vec::new();
        File::open(&path)
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SnapshotError::Missing {
                    name: name.to_owned(),
                    file: META_FILE,
                },
                _ => io("read", &path)(e),
            })?
            .take(MAX_META)
            .read_to_end(&mut text)
            .map_err(io("read", &path))?;
        serde_json::from_slice(&text).map_err(|e| SnapshotError::Damaged {
            name: name.to_owned(),
            why: format!("{META_FILE}: {e}"),
        })
    }

    /// Deletes snapshot `name`.
    pub fn remove(&self, name: &str) -> Result<(), SnapshotError> {
        let dir = self.path(name)?;
        match std::fs::symlink_metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            _ => return Err(SnapshotError::NotFound(name.to_owned())),
        }
        std::fs::remove_dir_all(&dir).map_err(io("delete", &dir))
    }

    /// Checks that snapshot `name` is whole and of this daemon's format, and copies its
    /// [`DISK_FILE`] to `disk_to` when asked (a restored VM writes to its disk, so each has a
    /// copy of its own). Returns the snapshot's folder, which the VMM restores from where it
    /// lies: it opens the two files read-only before it enters its jail, so they are neither
    /// copied nor given to the VM's uid.
    pub fn prepare_restore(
        &self,
        name: &str,
        meta: &SnapshotMeta,
        disk_to: Option<&Path>,
    ) -> Result<PathBuf, SnapshotError> {
        let dir = self.path(name)?;
        let found = format_version(name, &dir.join(STATE_FILE))?;
        if found != FORMAT_VERSION || meta.format_version != FORMAT_VERSION {
            return Err(SnapshotError::Format {
                name: name.to_owned(),
                found,
                supported: FORMAT_VERSION,
            });
        }
        for file in [STATE_FILE, MEMORY_FILE] {
            if !dir.join(file).is_file() {
                return Err(SnapshotError::Missing {
                    name: name.to_owned(),
                    file,
                });
            }
        }
        if let Some(disk_to) = disk_to {
            let disk = dir.join(DISK_FILE);
            if !disk.is_file() {
                return Err(SnapshotError::Missing {
                    name: name.to_owned(),
                    file: DISK_FILE,
                });
            }
            copy_sparse(&disk, disk_to)?;
        }
        Ok(dir)
    }
}

/// The API view of a snapshot in `dir`.
fn info(name: &str, dir: &Path, meta: SnapshotMeta) -> SnapshotInfo {
    SnapshotInfo {
        name: name.to_owned(),
        source_vm: meta.source_vm,
        image: meta.image.map(|i| i.name),
        spec: meta.spec,
        created_unix_ms: meta.created_unix_ms,
        format_version: meta.format_version,
        memory_bytes: meta.memory_bytes,
        memory_data_bytes: meta.memory_data_bytes,
        state_bytes: meta.state_bytes,
        disk_bytes: meta.disk_bytes,
        dir: dir.display().to_string(),
    }
}

/// Makes `dir` (mode 0700) if it is missing.
fn make_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::DirBuilder::new()
        .mode(0o700)
        .recursive(true)
        .create(dir)
        .map_err(io("create", dir))
}

/// The format version in the state file's header (magic, then a little-endian u32).
pub fn format_version(name: &str, path: &Path) -> Result<u32, SnapshotError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(SnapshotError::Missing {
                name: name.to_owned(),
                file: STATE_FILE,
            });
        }
        Err(e) => return Err(io("read", path)(e)),
    };
    let mut header = [0u8; 12];
    file.read_exact(&mut header)
        .map_err(|_| SnapshotError::Damaged {
            name: name.to_owned(),
            why: format!("{STATE_FILE} is shorter than its header"),
        })?;
    if &header[..8] != MAGIC {
        return Err(SnapshotError::Damaged {
            name: name.to_owned(),
            why: format!("{STATE_FILE} is not a snapshot state file"),
        });
    }
    Ok(u32::from_le_bytes([
        header[8], header[9], header[10], header[11],
    ]))
}

/// Opens the folder `path` itself, never through a link in its last component.
fn open_dir(path: &Path) -> Result<File, SnapshotError> {
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_NOFOLLOW)
        .open(path)
        .map_err(|_| SnapshotError::NotPlain(path.to_path_buf()))
}

/// Moves the VMM's file `name` from its folder `from` (in its jail) to the root-only folder
/// `to`, then checks it is a plain file with one link and makes it the daemon's, mode 0600.
/// Answers its length.
///
/// `from` is the VMM's to change: it is opened without following a link, and the file is
/// moved relative to that descriptor (`renameat`), so a VMM that puts a link in place of its
/// folder cannot make the daemon move a file from elsewhere.
pub fn adopt(from: &Path, to: &Path, name: &str) -> Result<u64, SnapshotError> {
    let (from_dir, to_dir) = (open_dir(from)?, open_dir(to)?);
    nix::fcntl::renameat(&from_dir, name, &to_dir, name)
        .map_err(|e| io("move", &from.join(name))(e.into()))?;
    let to = to.join(name);
    // Out of the jail now: the VMM can no longer swap the name; check what it is.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(&to)
        .map_err(|_| SnapshotError::NotPlain(from.join(name)))?;
    let m = file.metadata().map_err(io("inspect", &to))?;
    if !m.file_type().is_file() || m.nlink() != 1 {
        return Err(SnapshotError::NotPlain(from.join(name)));
    }
    let (uid, gid) = (
        nix::unistd::geteuid().as_raw(),
        nix::unistd::getegid().as_raw(),
    );
    std::os::unix::fs::fchown(&file, Some(uid), Some(gid)).map_err(io("chown", &to))?;
    file.set_permissions(std::fs::Permissions::from_mode(0o600))
        .map_err(io("chmod", &to))?;
    Ok(m.len())
}

/// Copies `from` to the new file `to` (mode 0600, never over an existing one), keeping holes:
/// only the data segments (`SEEK_DATA`/`SEEK_HOLE`) are read and written.
pub fn copy_sparse(from: &Path, to: &Path) -> Result<u64, SnapshotError> {
    let mut src = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(from)
        .map_err(io("open", from))?;
    let len = src.metadata().map_err(io("inspect", from))?.len();
    let mut dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(to)
        .map_err(io("create", to))?;
    dst.set_len(len).map_err(io("size", to))?;
    use std::os::fd::AsRawFd;
    let fd = src.as_raw_fd();
    let mut pos: u64 = 0;
    while pos < len {
        // SAFETY: lseek on a descriptor this function owns; no memory is involved.
        let data = unsafe { nix::libc::lseek(fd, pos as i64, nix::libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(nix::libc::ENXIO) {
                break; // only a hole is left
            }
            // No SEEK_DATA here: copy the rest whole.
            src.seek(SeekFrom::Start(pos)).map_err(io("read", from))?;
            dst.seek(SeekFrom::Start(pos)).map_err(io("write", to))?;
            std::io::copy(&mut src, &mut dst).map_err(io("copy", from))?;
            break;
        }
        let data = data as u64;
        // SAFETY: as above.
        let hole = unsafe { nix::libc::lseek(fd, data as i64, nix::libc::SEEK_HOLE) };
        let hole = if hole < 0 {
            len
        } else {
            (hole as u64).min(len)
        };
        src.seek(SeekFrom::Start(data)).map_err(io("read", from))?;
        dst.seek(SeekFrom::Start(data)).map_err(io("write", to))?;
        std::io::copy(&mut (&mut src).take(hole - data), &mut dst).map_err(io("copy", from))?;
        pos = hole;
    }
    dst.sync_all().map_err(io("sync", to))?;
    Ok(len)
}

#[cfg(test)]
mod tests {

    /// The store reads the VMM's header: the same magic and the format it writes (the daemon
    /// does not link the VMM, so its copy of the two constants is checked here).
    #[test]
    fn the_header_constants_are_the_vmms() {
        assert_eq!(MAGIC, &nanoclaw_vmm::snapshot::format::MAGIC);
        assert_eq!(
            FORMAT_VERSION,
            nanoclaw_vmm::snapshot::format::FORMAT_VERSION
        );
    }

    use super::*;

    #[test]
    fn names_are_plain() {
        for good in ["a", "snap-1", "my.snap_2", &"x".repeat(64)] {
            assert!(validate_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "a/b",
            "/abs",
            ".hidden",
            "-rf",
            "a b",
            "a\0b",
            "é",
            &"x".repeat(65),
        ] {
            assert!(
                matches!(validate_name(bad), Err(SnapshotError::BadName(_))),
                "{bad:?}"
            );
        }
        assert!(validate_name(&fresh_name().unwrap()).is_ok());
    }

    #[test]
    fn a_sparse_copy_keeps_data_and_holes_and_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("a"), dir.path().join("b"));
        let mut f = File::create(&from).unwrap();
        f.set_len(8 << 20).unwrap();
        f.seek(SeekFrom::Start(3 << 20)).unwrap();
        std::io::Write::write_all(&mut f, b"data in the middle").unwrap();
        drop(f);
        assert_eq!(copy_sparse(&from, &to).unwrap(), 8 << 20);
        assert_eq!(std::fs::read(&from).unwrap(), std::fs::read(&to).unwrap());
        let m = std::fs::metadata(&to).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
        assert!(
            m.blocks() * 512 < 1 << 20,
            "holes were filled: {}",
            m.blocks()
        );
        assert!(copy_sparse(&from, &to).is_err());
    }

    #[test]
    fn links_are_not_adopted() {
        let root = tempfile::tempdir().unwrap();
        let (jail, store, elsewhere) = (
            root.path().join("jail"),
            root.path().join("store"),
            root.path().join("elsewhere"),
        );
        for d in [&jail, &store, &elsewhere] {
            std::fs::create_dir(d).unwrap();
        }
        let secret = elsewhere.join(STATE_FILE);
        std::fs::write(&secret, b"x").unwrap();
        // A link to the file, a hard link to it, and a link in place of the folder.
        std::os::unix::fs::symlink(&secret, jail.join(STATE_FILE)).unwrap();
        assert!(matches!(
            adopt(&jail, &store, STATE_FILE),
            Err(SnapshotError::NotPlain(_))
        ));
        std::fs::remove_file(store.join(STATE_FILE)).unwrap();
        std::fs::hard_link(&secret, jail.join(MEMORY_FILE)).unwrap();
        assert!(matches!(
            adopt(&jail, &store, MEMORY_FILE),
            Err(SnapshotError::NotPlain(_))
        ));
        let linked = root.path().join("linked");
        std::os::unix::fs::symlink(&elsewhere, &linked).unwrap();
        assert!(matches!(
            adopt(&linked, &store, STATE_FILE),
            Err(SnapshotError::NotPlain(_))
        ));
        assert!(secret.exists(), "the file elsewhere was not moved");
        std::fs::write(jail.join("plain"), b"abc").unwrap();
        assert_eq!(adopt(&jail, &store, "plain").unwrap(), 3);
        let m = std::fs::metadata(store.join("plain")).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o600);
    }

    #[test]
    fn the_format_is_read_from_the_header() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(STATE_FILE);
        let mut header = MAGIC.to_vec();
        header.extend(7u32.to_le_bytes());
        std::fs::write(&p, &header).unwrap();
        assert_eq!(format_version("s", &p).unwrap(), 7);
        std::fs::write(&p, b"NOTASNAPxxxx").unwrap();
        assert!(matches!(
            format_version("s", &p),
            Err(SnapshotError::Damaged { .. })
        ));
        std::fs::write(&p, b"NC").unwrap();
        assert!(matches!(
            format_version("s", &p),
            Err(SnapshotError::Damaged { .. })
        ));
        assert!(matches!(
            format_version("s", &dir.path().join("none")),
            Err(SnapshotError::Missing { .. })
        ));
    }
}

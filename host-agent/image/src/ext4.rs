//! The ext4 disks the VMM attaches: an image's read-only root file system, made with
//! `mkfs.ext4 -d` from a staged tree, and a VM's empty writable scratch disk (the overlay's
//! upper layer).
//!
//! The root file system is made reproducible: its UUID and directory hash seed derive from the
//! image digest, every time mke2fs writes is `E2FSPROGS_FAKE_TIME` / `SOURCE_DATE_EPOCH`, and it
//! has no journal (the guest mounts it read-only) and no reserved blocks. mke2fs copies each
//! file's change time (ctime) from the staged tree, where it is the time of the import and
//! cannot be set, and its access time, which reading the tree moves; so a `debugfs` pass then
//! sets every inode's ctime to the epoch and its atime to its mtime. The same tree
//! then gives the same bytes (with the same e2fsprogs and `mke2fs.conf`). Its size comes from the tree: file blocks plus inode tables, with headroom for
//! ext4's own metadata.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use sha2::{Digest as _, Sha256};

use crate::digest::Digest;
use crate::tool::{DEBUGFS, MKFS_EXT4, ToolError};
use crate::tree::{self, TreeError, TreeStats};

/// Smallest scratch disk (ext4 with a journal needs a few MiB; less is a mistake).
pub const MIN_SCRATCH_BYTES: u64 = 16 << 20;
/// Largest scratch disk (16 TiB, ext4's limit with 4 KiB blocks and no 64bit feature).
pub const MAX_SCRATCH_BYTES: u64 = 16 << 40;
/// ext4 block size used.
const BLOCK: u64 = 4096;
/// ext4 inode size used.
const INODE_SIZE: u64 = 256;
/// Inodes added to the tree's count (lost+found, and room to spare).
const SPARE_INODES: u64 = 1024;
/// Fixed headroom for superblocks, group descriptors, bitmaps and lost+found.
const FIXED_HEADROOM: u64 = 16 << 20;
/// Offset of the ext2/3/4 superblock magic (superblock at 1024, `s_magic` at 0x38).
pub const EXT4_MAGIC_OFFSET: u64 = 1024 + 0x38;
/// The superblock magic, little-endian on disk.
pub const EXT4_MAGIC: [u8; 2] = [0x53, 0xef];

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// A scratch disk size outside the accepted range or not a multiple of 4 KiB.
    #[error(
        "scratch disk size {size} bytes is not a multiple of 4096 in [{MIN_SCRATCH_BYTES}, {MAX_SCRATCH_BYTES}]"
    )]
    BadSize { size: u64 },
    /// Creating the disk file failed.
    #[error("creating disk file {path:?}")]
    Create {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Sizing the disk file failed.
    #[error("sizing disk file {path:?}")]
    SetLen {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `mkfs.ext4` is missing or failed.
    #[error("making the ext4 file system {path:?}")]
    Mkfs {
        path: PathBuf,
        #[source]
        source: ToolError,
    },
    /// Walking the staged tree failed.
    #[error("listing the staged tree")]
    Walk(#[source] TreeError),
    /// Writing the debugfs script failed.
    #[error("writing the debugfs script {path:?}")]
    Script {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// `debugfs` is missing or failed.
    #[error("setting change times in {path:?}")]
    Debugfs {
        path: PathBuf,
        #[source]
        source: ToolError,
    },
    /// `debugfs` ran but some of its commands failed; `output` is what they printed.
    #[error("setting change times in {path:?}: {output}")]
    DebugfsCommands { path: PathBuf, output: String },
    /// Syncing the disk file failed.
    #[error("syncing disk file {path:?}")]
    Sync {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// How to make an image's root file system.
#[derive(Debug, Clone)]
pub struct RootfsParams {
    /// The image digest: seeds the UUID and hash seed.
    pub digest: Digest,
    /// The volume label (at most 16 bytes).
    pub label: String,
    /// The time mke2fs writes everywhere (seconds since the epoch).
    pub epoch: u64,
}

/// The size a root file system for a tree with `stats` gets, in bytes (a multiple of 1 MiB).
pub fn rootfs_size(stats: &TreeStats) -> u64 {
    let inodes = stats.inodes + SPARE_INODES;
    let raw = stats.block_bytes + inodes * INODE_SIZE;
    (raw + raw / 10 + FIXED_HEADROOM).div_ceil(1 << 20) * (1 << 20)
}

/// A UUID (as mke2fs takes it) derived from the digest and a purpose.
pub fn derived_uuid(digest: &Digest, purpose: &str) -> String {
    let mut h = Sha256::new();
    h.update(purpose.as_bytes());
    h.update(digest.bytes());
    let mut b: [u8; 16] = h.finalize()[..16].try_into().unwrap_or([0; 16]);
    // A well-formed version 4 (random) UUID: the bits say so, the rest is the hash.
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let x = hex::encode(b);
    format!(
        "{}-{}-{}-{}-{}",
        &x[..8],
        &x[8..12],
        &x[12..16],
        &x[16..20],
        &x[20..]
    )
}

/// Makes `out` (which must not exist) an ext4 file system holding `tree`; returns its size.
pub fn make_rootfs(
    tree: &Path,
    out: &Path,
    stats: &TreeStats,
    params: &RootfsParams,
    progress: &mut dyn FnMut(&str),
) -> Result<u64, Ext4Error> {
    let size = rootfs_size(stats);
    let inodes = stats.inodes + SPARE_INODES;
    let file = create_sized(out, size)?;
    drop(file);
    let mkfs_err = |source| Ext4Error::Mkfs {
        path: out.to_owned(),
        source,
    };
    let mut cmd = MKFS_EXT4.command().map_err(mkfs_err)?;
    let extended = format!(
        "hash_seed={},root_owner=0:0,nodiscard,lazy_itable_init=0",
        derived_uuid(&params.digest, "hash-seed")
    );
    cmd.env("E2FSPROGS_FAKE_TIME", params.epoch.to_string())
        .env("SOURCE_DATE_EPOCH", params.epoch.to_string())
        .args([
            "-q",
            "-F",
            "-b",
            &BLOCK.to_string(),
            "-I",
            &INODE_SIZE.to_string(),
        ])
        .args(["-N", &inodes.to_string(), "-m", "0", "-O", "^has_journal"])
        .args([
            "-L",
            &params.label,
            "-U",
            &derived_uuid(&params.digest, "uuid"),
        ])
        .args(["-E", &extended, "-d"])
        .arg(tree)
        .arg(out);
    progress(&format!(
        "mkfs: {} MiB, {inodes} inodes, label {}",
        size >> 20,
        params.label
    ));
    MKFS_EXT4.run(cmd, "mkfs", progress).map_err(mkfs_err)?;
    progress("mkfs: setting change times");
    pin_change_times(tree, out, params.epoch)?;
    sync(out)?;
    Ok(size)
}

/// Sets the ctime of every inode of `image` (made from `tree`) to `epoch`, and its atime to its
/// mtime (walking the tree to size and check it read its directories, which moved their
/// atimes), with debugfs `set_inode_field` commands. Paths are double-quoted (a `"` doubled, as debugfs's parser
/// wants); a name with a newline cannot be said in a debugfs script, so it keeps its ctime.
fn pin_change_times(tree: &Path, image: &Path, epoch: u64) -> Result<(), Ext4Error> {
    let mut script = Vec::new();
    tree::walk(tree, &mut |rel, meta| {
        let path = rel.as_os_str().as_bytes();
        if path.contains(&b'\n') {
            tracing::warn!(path = %rel.display(), "name with a newline keeps its ctime");
            return Ok(());
        }
        let mut quoted = b"\"/".to_vec();
        for &b in path {
            if b == b'"' {
                quoted.push(b'"');
            }
            quoted.push(b);
        }
        quoted.push(b'"');
        let mtime = meta.mtime().max(0);
        for (field, time) in [("ctime", epoch), ("atime", mtime.unsigned_abs())] {
            script.extend_from_slice(b"set_inode_field ");
            script.extend_from_slice(&quoted);
            script.extend_from_slice(format!(" {field} @{time}\n").as_bytes());
        }
        Ok(())
    })
    .map_err(Ext4Error::Walk)?;
    let script_path = image.with_extension("debugfs");
    let script_err = |source| Ext4Error::Script {
        path: script_path.clone(),
        source,
    };
    std::fs::write(&script_path, &script).map_err(script_err)?;
    let debugfs_err = |source| Ext4Error::Debugfs {
        path: image.to_owned(),
        source,
    };
    let mut cmd = DEBUGFS.command().map_err(debugfs_err)?;
    cmd.arg("-w").arg("-f").arg(&script_path).arg(image);
    // debugfs echoes each command as "debugfs: ..." and exits 0 even when one fails; any other
    // line is a failure.
    let mut failures = Vec::new();
    let ran = DEBUGFS.run(cmd, "debugfs", &mut |line| {
        let line = line.strip_prefix("debugfs: ").unwrap_or(line);
        if !line.starts_with("debugfs") && failures.len() < 10 {
            failures.push(line.to_owned());
        }
    });
    std::fs::remove_file(&script_path).map_err(script_err)?;
    ran.map_err(debugfs_err)?;
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Ext4Error::DebugfsCommands {
            path: image.to_owned(),
            output: failures.join("\n"),
        })
    }
}

/// Makes an empty, sparse ext4 file system of `size_bytes` at `path` (which must not exist),
/// for a VM's writable layer. The file is removed again if formatting fails.
///
/// It has no journal. The disk lives and dies with one VM, so a journal would buy crash
/// consistency for a file system nobody mounts again. Without one, what the guest synced sits
/// in place on the disk, and reading an ended VM's disk (which never replays a journal) sees
/// it all.
pub fn create_scratch_disk(path: &Path, size_bytes: u64) -> Result<(), Ext4Error> {
    create_scratch_disk_with(path, size_bytes, None)
}

/// Like [`create_scratch_disk`], with the disk holding a copy of the folder `contents` (files
/// copied into a VM before it boots: the guest sees them in the overlay's upper layer).
pub fn create_scratch_disk_with(
    path: &Path,
    size_bytes: u64,
    contents: Option<&Path>,
) -> Result<(), Ext4Error> {
    if !(MIN_SCRATCH_BYTES..=MAX_SCRATCH_BYTES).contains(&size_bytes)
        || !size_bytes.is_multiple_of(BLOCK)
    {
        return Err(Ext4Error::BadSize { size: size_bytes });
    }
    // Find the tool before creating anything.
    let mkfs_err = |source| Ext4Error::Mkfs {
        path: path.to_owned(),
        source,
    };
    let mut cmd = MKFS_EXT4.command().map_err(mkfs_err)?;
    drop(create_sized(path, size_bytes)?);
    cmd.args([
        "-q",
        "-F",
        "-b",
        &BLOCK.to_string(),
        "-m",
        "0",
        "-L",
        "scratch",
        "-O",
        "^has_journal",
    ])
    // The file was just created sparse, so it reads as zeros: mke2fs need not write the inode
    // tables or the journal, and it marks the tables zeroed, so the guest kernel starts no
    // lazy-init thread that would write them during the agent's first seconds.
    .args(["-E", "nodiscard,assume_storage_prezeroed=1"]);
    if let Some(dir) = contents {
        cmd.arg("-d").arg(dir);
    }
    cmd.arg(path);
    let result = MKFS_EXT4
        .run(cmd, "mkfs", &mut |line| {
            tracing::debug!(line, "scratch disk")
        })
        .map_err(mkfs_err)
        .and_then(|()| sync(path));
    if result.is_err() {
        // Best effort: the error that matters is the one returned.
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Creates `path` (refusing an existing file or symlink) as a sparse file of `size` bytes.
fn create_sized(path: &Path, size: u64) -> Result<File, Ext4Error> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(path)
        .map_err(|source| Ext4Error::Create {
            path: path.to_owned(),
            source,
        })?;
    file.set_len(size).map_err(|source| Ext4Error::SetLen {
        path: path.to_owned(),
        source,
    })?;
    Ok(file)
}

fn sync(path: &Path) -> Result<(), Ext4Error> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| Ext4Error::Sync {
            path: path.to_owned(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuids_are_derived_and_differ_by_purpose() {
        let d = Digest::of(b"image");
        let a = derived_uuid(&d, "uuid");
        assert_eq!(a, derived_uuid(&d, "uuid"));
        assert_ne!(a, derived_uuid(&d, "hash-seed"));
        assert_ne!(a, derived_uuid(&Digest::of(b"other"), "uuid"));
        assert_eq!(a.len(), 36);
        assert_eq!(&a[14..15], "4");
    }

    #[test]
    fn size_grows_with_content_and_is_mib_aligned() {
        let small = rootfs_size(&TreeStats {
            inodes: 10,
            block_bytes: 4096,
        });
        let big = rootfs_size(&TreeStats {
            inodes: 10_000,
            block_bytes: 500 << 20,
        });
        assert_eq!(small % (1 << 20), 0);
        assert!(small >= FIXED_HEADROOM);
        assert!(big > (500 << 20) + 10_000 * INODE_SIZE);
    }

    #[test]
    fn scratch_disk_refuses_silly_sizes_and_writes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.ext4");
        for size in [
            0,
            4096,
            MIN_SCRATCH_BYTES + 1,
            MAX_SCRATCH_BYTES + BLOCK,
            u64::MAX,
        ] {
            let err = create_scratch_disk(&path, size).unwrap_err();
            assert!(matches!(err, Ext4Error::BadSize { .. }), "{size}: {err:?}");
        }
        assert!(!path.exists());
    }

    #[test]
    fn scratch_disk_is_sparse_ext4() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scratch.ext4");
        create_scratch_disk(&path, 256 << 20).unwrap();
        let meta = std::fs::metadata(&path).unwrap();
        assert_eq!(meta.len(), 256 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(
            meta.blocks() * 512 < meta.len() / 2,
            "not sparse: {} blocks",
            meta.blocks()
        );
        let bytes = std::fs::read(&path).unwrap();
        let at = EXT4_MAGIC_OFFSET as usize;
        assert_eq!(bytes[at..at + 2], EXT4_MAGIC);
        // No journal, and every group's inode table marked zeroed (no lazy-init in the guest).
        let dump = std::process::Command::new("dumpe2fs")
            .arg(&path)
            .output()
            .expect("dumpe2fs (e2fsprogs) runs");
        let dump = String::from_utf8_lossy(&dump.stdout);
        let features = dump
            .lines()
            .find(|l| l.starts_with("Filesystem features:"))
            .expect("a features line");
        assert!(!features.contains("has_journal"), "{features}");
        let groups = dump
            .lines()
            .filter(|l| l.starts_with("Group ") && l.contains("Blocks"))
            .count();
        let zeroed = dump.matches("ITABLE_ZEROED").count();
        assert!(
            groups > 0 && zeroed == groups,
            "{groups} groups, {zeroed} zeroed"
        );
        // An existing file is never overwritten.
        let err = create_scratch_disk(&path, 256 << 20).unwrap_err();
        assert!(matches!(err, Ext4Error::Create { .. }));
    }
}

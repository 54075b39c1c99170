//! Whole-tree operations on a staged root: walking it without following symlinks, counting
//! what it holds (to size its file system), and setting or clamping its times.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use nix::sys::stat::{UtimensatFlags, utimensat};
use nix::sys::time::TimeSpec;

/// Latest time kept (2106-02-07); later ones are clamped, so a hostile header cannot overflow
/// a time type.
pub const MAX_TIME: u64 = u32::MAX as u64;
/// ext4 block size the counts assume.
const BLOCK: u64 = 4096;
/// Symlink targets shorter than this live in the inode (ext4 "fast symlinks").
const FAST_SYMLINK_MAX: u64 = 59;

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    /// Inspecting or listing a path failed.
    #[error("inspecting {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting a path's times failed.
    #[error("setting the times of {path:?}")]
    Times {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
}

/// Counts of what a tree holds, for sizing its file system.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TreeStats {
    /// Inodes: files, directories, symlinks and others (hardlinks share one).
    pub inodes: u64,
    /// Bytes of regular files, each rounded up to 4 KiB blocks, plus a block per directory and
    /// per long symlink.
    pub block_bytes: u64,
}

/// Calls `visit` with every path below `root` (relative; the root itself as "") and its
/// `symlink_metadata`: parents before children, children in name order.
pub fn walk(
    root: &Path,
    visit: &mut dyn FnMut(&Path, &fs::Metadata) -> Result<(), TreeError>,
) -> Result<(), TreeError> {
    walk_from(root, Path::new(""), visit)
}

fn walk_from(
    root: &Path,
    rel: &Path,
    visit: &mut dyn FnMut(&Path, &fs::Metadata) -> Result<(), TreeError>,
) -> Result<(), TreeError> {
    let host = root.join(rel);
    let inspect = |source| TreeError::Inspect {
        path: host.clone(),
        source,
    };
    let meta = fs::symlink_metadata(&host).map_err(inspect)?;
    visit(rel, &meta)?;
    if meta.is_dir() {
        let mut names: Vec<_> = fs::read_dir(&host)
            .map_err(inspect)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(inspect)?;
        names.sort();
        for name in names {
            walk_from(root, &rel.join(name), visit)?;
        }
    }
    Ok(())
}

/// Counts the inodes and data blocks of the tree at `root`.
pub fn stats(root: &Path) -> Result<TreeStats, TreeError> {
    let mut stats = TreeStats::default();
    let mut linked = HashSet::new();
    walk(root, &mut |_, meta| {
        if !meta.is_dir() && meta.nlink() > 1 && !linked.insert(meta.ino()) {
            return Ok(());
        }
        stats.inodes += 1;
        if meta.is_dir() {
            stats.block_bytes += BLOCK;
        } else if meta.is_file() || (meta.file_type().is_symlink() && meta.len() > FAST_SYMLINK_MAX)
        {
            stats.block_bytes += meta.len().div_ceil(BLOCK) * BLOCK;
        }
        Ok(())
    })?;
    Ok(stats)
}

/// Sets every time later than `epoch` to `epoch` (atime follows mtime), symlinks included.
pub fn clamp_times(root: &Path, epoch: u64) -> Result<(), TreeError> {
    walk(root, &mut |rel, meta| {
        let mtime = u64::try_from(meta.mtime()).unwrap_or(0);
        set_times_nofollow(&root.join(rel), mtime.min(epoch))
    })
}

/// Sets atime and mtime of `path` itself (a symlink's own times, not its target's).
pub fn set_times_nofollow(path: &Path, secs: u64) -> Result<(), TreeError> {
    let secs = i64::try_from(secs.min(MAX_TIME)).unwrap_or(i64::MAX);
    let t = TimeSpec::new(secs, 0);
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &t,
        &t,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(|source| TreeError::Times {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_hardlinks_once_and_clamps_times() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir(root.join("d")).unwrap();
        fs::write(root.join("d/f"), vec![1u8; 5000]).unwrap();
        fs::hard_link(root.join("d/f"), root.join("g")).unwrap();
        std::os::unix::fs::symlink("d/f", root.join("s")).unwrap();
        let s = stats(root).unwrap();
        // root, d, f (= g), s
        assert_eq!(s.inodes, 4);
        assert_eq!(s.block_bytes, 2 * BLOCK + 2 * BLOCK);

        clamp_times(root, 1000).unwrap();
        walk(root, &mut |rel, meta| {
            assert_eq!(meta.mtime(), 1000, "{rel:?}");
            Ok(())
        })
        .unwrap();
        set_times_nofollow(&root.join("s"), 5).unwrap();
        clamp_times(root, 1000).unwrap();
        assert_eq!(fs::symlink_metadata(root.join("s")).unwrap().mtime(), 5);
        assert_eq!(fs::metadata(root.join("s")).unwrap().mtime(), 1000);
    }
}

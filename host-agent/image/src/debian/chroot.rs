//! The mounts pip needs in the chroot (`/proc`, and the host's `/dev` bound), and the guard
//! that no mount is ever left below a staging directory when it is deleted: debootstrap mounts
//! `/proc` and `/sys` (and, in a container, binds `/dev`) inside its target and is trusted to
//! unmount them, but a deletion that crossed into a bound host `/dev` would delete host device
//! nodes, so [`detach_mounts_under`] checks the mount table first.

use std::fs;
use std::path::{Path, PathBuf};

use nix::mount::{MntFlags, MsFlags};

use super::DebianError;
use super::tidy::tree_path;
use crate::mounts::mounts_under;

/// `/proc` and the host's `/dev` mounted into a chroot while pip runs.
#[derive(Debug)]
pub(super) struct ChrootMounts {
    mounted: Vec<PathBuf>,
}

impl ChrootMounts {
    /// Mounts `/proc` and binds `/dev` below `root`, after checking both are real directories
    /// (a mount follows a symlinked target).
    pub(super) fn mount(root: &Path) -> Result<Self, DebianError> {
        let mut mounts = Self {
            mounted: Vec::new(),
        };
        let proc_flags = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
        for (dir, source, fstype, flags) in [
            ("proc", "proc", Some("proc"), proc_flags),
            ("dev", "/dev", None, MsFlags::MS_BIND | MsFlags::MS_REC),
        ] {
            let target = tree_path(root, dir)?;
            if !fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                return Err(DebianError::UnsafePath { path: target });
            }
            if let Err(source) =
                nix::mount::mount(Some(source), &target, fstype, flags, None::<&str>)
            {
                // Undo what was mounted; the mount error is the one to report, and the caller's
                // detach_mounts_under catches anything left.
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
    /// chroot still holds a file open.
    pub(super) fn unmount(mut self) -> Result<(), DebianError> {
        self.unmount_all()
    }

    fn unmount_all(&mut self) -> Result<(), DebianError> {
        while let Some(path) = self.mounted.pop() {
            detach(&path)?;
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

fn detach(path: &Path) -> Result<(), DebianError> {
    nix::mount::umount2(path, MntFlags::MNT_DETACH).map_err(|source| DebianError::Unmount {
        path: path.to_owned(),
        source,
    })
}

/// Detaches every mount at or below `dir`, deepest first.
pub(super) fn detach_mounts_under(dir: &Path) -> Result<(), DebianError> {
    for point in mounts_under(dir).map_err(DebianError::MountInfo)? {
        tracing::warn!(mount = %point.display(), "detaching a mount left below a staging directory");
        detach(&point)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detaches_mounts_left_below_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let inner = dir.path().join("tree/proc");
        fs::create_dir_all(&inner).unwrap();
        let mounted = |p: &Path| mounts_under(p).unwrap().iter().any(|m| m == p);
        nix::mount::mount(
            Some("tmpfs"),
            &inner,
            Some("tmpfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .unwrap();
        assert!(mounted(&inner));
        detach_mounts_under(dir.path()).unwrap();
        assert!(!mounted(&inner));
        // Nothing left to do the second time.
        detach_mounts_under(dir.path()).unwrap();
    }
}

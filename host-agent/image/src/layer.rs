//! Applying image layers (tar streams) to a root directory, the way overlayfs would have stacked
//! them: later layers replace earlier entries, `.wh.NAME` deletes `NAME` from the layers below,
//! and `.wh..wh..opq` hides everything the lower layers had in its directory.
//!
//! The `tar` crate parses the stream; the entries are written here rather than with
//! `tar::Entry::unpack_in`, because an image layer needs what `unpack_in` does not do
//! (whiteouts, opaque directories, numeric owners on everything including symlinks, a refusal of
//! device nodes) and because a hostile layer must never make us write outside the root:
//!
//! - a path with `..` or a leading `/` is refused, never cleaned up;
//! - every parent directory of an entry is checked with `symlink_metadata` and must be a real
//!   directory: an entry `a/passwd` after a symlink `a -> /etc` is refused, and so is a whiteout
//!   below a symlink;
//! - the entry itself is created with `O_CREAT | O_EXCL | O_NOFOLLOW` after whatever was at its
//!   path is removed (removing a symlink removes the link, not its target);
//! - a hardlink's target must already exist inside the root, reached without symlinks.
//!
//! These checks are sound because the root lives in a staging directory (mode 0700 in the
//! store's `tmp/`) that only this process writes: nothing can swap a checked directory for a
//! symlink between the check and the write.
//!
//! Directory times are recorded and set at the end ([`RootTree::finish`]), since writing a
//! directory's children changes its mtime.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fs::{self, FileTimes, OpenOptions, Permissions};
use std::io::{self, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use nix::sys::stat::Mode;
use tar::EntryType;

use crate::tree::{self, MAX_TIME, TreeError, TreeStats};

/// Prefix of a whiteout entry's file name.
const WHITEOUT_PREFIX: &str = ".wh.";
/// File name of an opaque-directory marker.
const OPAQUE_MARKER: &str = ".wh..wh..opq";
/// Mode of directories created because an entry needed a parent the layer did not list.
const IMPLICIT_DIR_MODE: u32 = 0o755;

/// Errors of this module. `path` is the entry's path inside the image.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    /// Reading the next tar header failed.
    #[error("reading the layer's tar stream")]
    ReadArchive(#[source] io::Error),
    /// An entry path is absolute.
    #[error("entry {path:?} is an absolute path")]
    AbsolutePath { path: PathBuf },
    /// An entry path has a `..` component.
    #[error("entry {path:?} has a '..' component")]
    ParentComponent { path: PathBuf },
    /// Creating the entry would go through a symlink.
    #[error("entry {path:?} goes through a symlink")]
    ThroughSymlink { path: PathBuf },
    /// A parent of the entry exists and is not a directory.
    #[error("a parent of entry {path:?} is not a directory")]
    ParentNotDirectory { path: PathBuf },
    /// A whiteout names nothing (`.wh.`, `.wh..`).
    #[error("whiteout {path:?} names no file")]
    BadWhiteout { path: PathBuf },
    /// A hardlink's target is outside the root (absolute, `..`, or through a symlink).
    #[error("hardlink {path:?} points outside the image ({target:?})")]
    HardlinkOutside { path: PathBuf, target: PathBuf },
    /// A hardlink's target does not exist (yet) in the image.
    #[error("hardlink {path:?} points to {target:?}, which does not exist")]
    HardlinkMissing { path: PathBuf, target: PathBuf },
    /// A hardlink's target is a directory.
    #[error("hardlink {path:?} points to directory {target:?}")]
    HardlinkToDirectory { path: PathBuf, target: PathBuf },
    /// A symlink or hardlink entry has no link name.
    #[error("link entry {path:?} has no target")]
    NoLinkName { path: PathBuf },
    /// A character or block device node.
    #[error("entry {path:?} is a device node")]
    DeviceNode { path: PathBuf },
    /// An entry type that has no place in an image.
    #[error("entry {path:?} has unsupported tar type {kind}")]
    UnsupportedEntry { path: PathBuf, kind: u8 },
    /// The uid or gid does not fit 32 bits.
    #[error("entry {path:?} has an out-of-range owner")]
    BadOwner { path: PathBuf },
    /// A header field (path, mode, owner, time) cannot be read.
    #[error("entry {path:?} has a malformed header")]
    BadHeader {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// The image has more entries than the limit.
    #[error("image has more than {limit} entries")]
    TooManyEntries { limit: u64 },
    /// The image is larger than the limit (detected by the budget).
    #[error("image is larger than {limit} bytes uncompressed")]
    TooLarge { limit: u64 },
    /// Inspecting an existing path failed.
    #[error("inspecting {path:?}")]
    Inspect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Removing a path a later entry replaces or a whiteout deletes failed.
    #[error("removing {path:?}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating a directory failed.
    #[error("creating directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating or writing a regular file failed.
    #[error("writing file {path:?}")]
    WriteFile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating a symlink failed.
    #[error("creating symlink {path:?}")]
    Symlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating a hardlink failed.
    #[error("creating hardlink {path:?}")]
    Hardlink {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Creating a FIFO failed.
    #[error("creating fifo {path:?}")]
    Fifo {
        path: PathBuf,
        #[source]
        source: nix::Error,
    },
    /// Setting an owner failed.
    #[error("setting the owner of {path:?}")]
    Chown {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting a mode failed.
    #[error("setting the mode of {path:?}")]
    Chmod {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Setting a regular file's times failed.
    #[error("setting the times of {path:?}")]
    Times {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Walking the tree or setting other times failed.
    #[error(transparent)]
    Tree(#[from] TreeError),
}

/// A root directory that layers are applied to, in order.
#[derive(Debug)]
pub struct RootTree {
    root: PathBuf,
    entries: u64,
    max_entries: u64,
    dir_times: HashMap<PathBuf, u64>,
    default_mtime: u64,
}

/// What the current layer wrote, for its opaque markers.
#[derive(Debug, Default)]
struct LayerState {
    /// Paths the layer wrote, and every ancestor of them.
    kept: HashSet<PathBuf>,
    /// Directories the layer marked opaque.
    opaque: Vec<PathBuf>,
}

impl LayerState {
    fn keep(&mut self, rel: &Path) {
        let mut p = Some(rel);
        while let Some(path) = p.filter(|p| !p.as_os_str().is_empty()) {
            if !self.kept.insert(path.to_owned()) {
                break;
            }
            p = path.parent();
        }
    }
}

impl RootTree {
    /// A tree rooted at `root`, an existing empty directory. At most `max_entries` tar entries
    /// are accepted over all layers; directories that no entry dates get `default_mtime`.
    pub fn new(root: &Path, max_entries: u64, default_mtime: u64) -> Self {
        Self {
            root: root.to_owned(),
            entries: 0,
            max_entries,
            dir_times: HashMap::new(),
            default_mtime: default_mtime.min(MAX_TIME),
        }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Applies one layer read from `reader`, an uncompressed tar stream. Returns the reader so
    /// the caller can read it to its end (tar streams end with padding the parser leaves).
    pub fn apply_layer<R: Read>(&mut self, reader: R) -> Result<R, LayerError> {
        let mut archive = tar::Archive::new(reader);
        let mut layer = LayerState::default();
        for entry in archive.entries().map_err(LayerError::ReadArchive)? {
            let entry = entry.map_err(LayerError::ReadArchive)?;
            self.entries += 1;
            if self.entries > self.max_entries {
                return Err(LayerError::TooManyEntries {
                    limit: self.max_entries,
                });
            }
            self.apply_entry(entry, &mut layer)?;
        }
        for dir in std::mem::take(&mut layer.opaque) {
            self.clear_lower(&dir, &layer)?;
        }
        Ok(archive.into_inner())
    }

    /// Sets every directory's times (recorded ones, else the default), and returns what the
    /// tree holds.
    pub fn finish(self) -> Result<TreeStats, LayerError> {
        let mut dirs = Vec::new();
        tree::walk(&self.root, &mut |rel, meta| {
            if meta.is_dir() {
                dirs.push(rel.to_owned());
            }
            Ok(())
        })?;
        for rel in dirs {
            let mtime = self
                .dir_times
                .get(&rel)
                .copied()
                .unwrap_or(self.default_mtime);
            tree::set_times_nofollow(&self.root.join(&rel), mtime)?;
        }
        Ok(tree::stats(&self.root)?)
    }

    fn apply_entry<R: Read>(
        &mut self,
        mut entry: tar::Entry<'_, R>,
        layer: &mut LayerState,
    ) -> Result<(), LayerError> {
        let raw = entry.path().map_err(|source| LayerError::BadHeader {
            path: PathBuf::from(OsStr::from_bytes(&entry.path_bytes())),
            source,
        })?;
        let rel = clean_path(&raw)?;
        drop(raw);
        let header = entry.header();
        let bad_header = |source| LayerError::BadHeader {
            path: rel.clone(),
            source,
        };
        let kind = header.entry_type();
        let mode = header.mode().map_err(bad_header)? & 0o7777;
        let uid = header.uid().map_err(bad_header)?;
        let gid = header.gid().map_err(bad_header)?;
        let mtime = header.mtime().map_err(bad_header)?.min(MAX_TIME);
        let (Ok(uid), Ok(gid)) = (u32::try_from(uid), u32::try_from(gid)) else {
            return Err(LayerError::BadOwner { path: rel });
        };
        let owner = Owner { uid, gid };

        if rel.as_os_str().is_empty() {
            // The root itself ("./"): keep its mode and time, never replace it.
            if kind == EntryType::Directory {
                self.dir_times.insert(rel, mtime);
            }
            return Ok(());
        }
        let file_name = rel.file_name().unwrap_or_default().as_bytes();
        if file_name == OPAQUE_MARKER.as_bytes() {
            let dir = rel.parent().unwrap_or(Path::new("")).to_owned();
            self.parent_dir(&rel, true, layer)?;
            layer.keep(&dir);
            layer.opaque.push(dir);
            return Ok(());
        }
        if let Some(hidden) = file_name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if hidden.is_empty() || hidden == b"." || hidden == b".." || hidden.contains(&b'/') {
                return Err(LayerError::BadWhiteout { path: rel });
            }
            let Some(parent) = self.parent_dir(&rel, false, layer)? else {
                return Ok(());
            };
            let target = parent.join(OsStr::from_bytes(hidden));
            return remove_any(&target);
        }

        match kind {
            EntryType::Directory => {
                let parent = self.parent_dir_created(&rel, layer)?;
                let path = parent.join(rel.file_name().unwrap_or_default());
                match lstat(&path)? {
                    Some(meta) if meta.is_dir() => {}
                    Some(_) => {
                        remove_any(&path)?;
                        create_dir(&path)?;
                    }
                    None => create_dir(&path)?,
                }
                owner.chown_path(&path)?;
                set_mode(&path, mode)?;
                self.dir_times.insert(rel.clone(), mtime);
            }
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                let path = self.replace_target(&rel, layer)?;
                let write_err = |source| LayerError::WriteFile {
                    path: path.clone(),
                    source,
                };
                let mut file = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(nix::libc::O_NOFOLLOW)
                    .open(&path)
                    .map_err(write_err)?;
                io::copy(&mut entry, &mut file).map_err(write_err)?;
                std::os::unix::fs::fchown(&file, Some(owner.uid), Some(owner.gid)).map_err(
                    |source| LayerError::Chown {
                        path: path.clone(),
                        source,
                    },
                )?;
                file.set_permissions(Permissions::from_mode(mode))
                    .map_err(|source| LayerError::Chmod {
                        path: path.clone(),
                        source,
                    })?;
                let t = to_system_time(mtime);
                file.set_times(FileTimes::new().set_accessed(t).set_modified(t))
                    .map_err(|source| LayerError::Times {
                        path: path.clone(),
                        source,
                    })?;
            }
            EntryType::Symlink => {
                let target = link_name(&entry, &rel)?;
                let path = self.replace_target(&rel, layer)?;
                std::os::unix::fs::symlink(&target, &path).map_err(|source| {
                    LayerError::Symlink {
                        path: path.clone(),
                        source,
                    }
                })?;
                std::os::unix::fs::lchown(&path, Some(owner.uid), Some(owner.gid)).map_err(
                    |source| LayerError::Chown {
                        path: path.clone(),
                        source,
                    },
                )?;
                tree::set_times_nofollow(&path, mtime)?;
            }
            EntryType::Link => {
                let target_raw = link_name(&entry, &rel)?;
                let outside = || LayerError::HardlinkOutside {
                    path: rel.clone(),
                    target: target_raw.clone(),
                };
                let target_rel = clean_path(&target_raw).map_err(|_| outside())?;
                if target_rel == rel {
                    return Ok(());
                }
                let target_parent = match self.parent_dir(&target_rel, false, layer) {
                    Ok(p) => p,
                    Err(LayerError::ThroughSymlink { .. }) => return Err(outside()),
                    Err(e) => return Err(e),
                };
                let missing = || LayerError::HardlinkMissing {
                    path: rel.clone(),
                    target: target_raw.clone(),
                };
                let target_path = target_parent
                    .ok_or_else(missing)?
                    .join(target_rel.file_name().unwrap_or_default());
                match lstat(&target_path)? {
                    None => return Err(missing()),
                    Some(meta) if meta.is_dir() => {
                        return Err(LayerError::HardlinkToDirectory {
                            path: rel,
                            target: target_raw,
                        });
                    }
                    Some(_) => {}
                }
                let path = self.replace_target(&rel, layer)?;
                // std's hard_link uses linkat without AT_SYMLINK_FOLLOW: a link to a symlink
                // links the symlink itself.
                fs::hard_link(&target_path, &path).map_err(|source| LayerError::Hardlink {
                    path: path.clone(),
                    source,
                })?;
            }
            EntryType::Fifo => {
                let path = self.replace_target(&rel, layer)?;
                nix::unistd::mkfifo(&path, Mode::from_bits_truncate(0o600)).map_err(|source| {
                    LayerError::Fifo {
                        path: path.clone(),
                        source,
                    }
                })?;
                owner.chown_path(&path)?;
                set_mode(&path, mode)?;
                tree::set_times_nofollow(&path, mtime)?;
            }
            EntryType::Char | EntryType::Block => {
                return Err(LayerError::DeviceNode { path: rel });
            }
            EntryType::XGlobalHeader => {}
            other => {
                return Err(LayerError::UnsupportedEntry {
                    path: rel,
                    kind: other.as_byte(),
                });
            }
        }
        Ok(())
    }

    /// Makes sure `rel`'s parents are directories (creating missing ones), removes whatever is
    /// at `rel`, and returns the host path to create the new entry at.
    fn replace_target(
        &mut self,
        rel: &Path,
        layer: &mut LayerState,
    ) -> Result<PathBuf, LayerError> {
        let parent = self.parent_dir_created(rel, layer)?;
        let path = parent.join(rel.file_name().unwrap_or_default());
        remove_any(&path)?;
        layer.keep(rel);
        Ok(path)
    }

    fn parent_dir_created(
        &mut self,
        rel: &Path,
        layer: &mut LayerState,
    ) -> Result<PathBuf, LayerError> {
        let parent = self.parent_dir(rel, true, layer)?;
        layer.keep(rel);
        // With `create`, parent_dir creates every missing component, so it always answers.
        Ok(parent.unwrap_or_else(|| self.root.clone()))
    }

    /// Walks `rel`'s parent directories from the root without following symlinks. Missing
    /// ones are created (when `create`) or end the walk with `None`.
    fn parent_dir(
        &mut self,
        rel: &Path,
        create: bool,
        layer: &mut LayerState,
    ) -> Result<Option<PathBuf>, LayerError> {
        let mut host = self.root.clone();
        let mut inner = PathBuf::new();
        let parents = rel.parent().unwrap_or(Path::new(""));
        for component in parents.components() {
            host.push(component);
            inner.push(component);
            match lstat(&host)? {
                Some(meta) if meta.is_dir() => {}
                Some(meta) if meta.file_type().is_symlink() => {
                    return Err(LayerError::ThroughSymlink {
                        path: rel.to_owned(),
                    });
                }
                Some(_) => {
                    return Err(LayerError::ParentNotDirectory {
                        path: rel.to_owned(),
                    });
                }
                None if create => {
                    create_dir(&host)?;
                    set_mode(&host, IMPLICIT_DIR_MODE)?;
                    layer.keep(&inner);
                }
                None => return Ok(None),
            }
        }
        Ok(Some(host))
    }

    /// Removes everything below `dir` that the current layer did not write.
    fn clear_lower(&self, dir: &Path, layer: &LayerState) -> Result<(), LayerError> {
        let host = self.root.join(dir);
        let read_err = |source| LayerError::Inspect {
            path: host.clone(),
            source,
        };
        let mut children: Vec<_> = fs::read_dir(&host)
            .map_err(read_err)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(read_err)?;
        children.sort();
        for name in children {
            let rel = dir.join(&name);
            let path = host.join(&name);
            if !layer.kept.contains(&rel) {
                remove_any(&path)?;
            } else if lstat(&path)?.is_some_and(|m| m.is_dir()) {
                self.clear_lower(&rel, layer)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
}

impl Owner {
    /// Sets the owner of a path whose parents were checked and which is not a symlink.
    fn chown_path(self, path: &Path) -> Result<(), LayerError> {
        std::os::unix::fs::lchown(path, Some(self.uid), Some(self.gid)).map_err(|source| {
            LayerError::Chown {
                path: path.to_owned(),
                source,
            }
        })
    }
}

/// Turns an entry path into a relative path of normal components. `.` components go; a
/// leading `/` or any `..` is refused.
pub fn clean_path(raw: &Path) -> Result<PathBuf, LayerError> {
    let mut out = PathBuf::new();
    for component in raw.components() {
        match component {
            Component::Normal(c) => out.push(c),
            Component::CurDir => {}
            Component::ParentDir => {
                return Err(LayerError::ParentComponent {
                    path: raw.to_owned(),
                });
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(LayerError::AbsolutePath {
                    path: raw.to_owned(),
                });
            }
        }
    }
    Ok(out)
}

fn link_name<R: Read>(entry: &tar::Entry<'_, R>, rel: &Path) -> Result<PathBuf, LayerError> {
    entry
        .link_name()
        .map_err(|source| LayerError::BadHeader {
            path: rel.to_owned(),
            source,
        })?
        .map(|c| c.into_owned())
        .filter(|p| !p.as_os_str().is_empty())
        .ok_or_else(|| LayerError::NoLinkName {
            path: rel.to_owned(),
        })
}

fn lstat(path: &Path) -> Result<Option<fs::Metadata>, LayerError> {
    match fs::symlink_metadata(path) {
        Ok(meta) => Ok(Some(meta)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(LayerError::Inspect {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Removes whatever is at `path` (a directory with its contents); nothing there is fine.
/// Never follows a symlink: `remove_dir_all` does not, and a symlink is removed as a file.
fn remove_any(path: &Path) -> Result<(), LayerError> {
    let result = match lstat(path)? {
        None => return Ok(()),
        Some(meta) if meta.is_dir() => fs::remove_dir_all(path),
        Some(_) => fs::remove_file(path),
    };
    result.map_err(|source| LayerError::Remove {
        path: path.to_owned(),
        source,
    })
}

fn create_dir(path: &Path) -> Result<(), LayerError> {
    fs::create_dir(path).map_err(|source| LayerError::CreateDir {
        path: path.to_owned(),
        source,
    })
}

/// Sets the mode of a path that is not a symlink (its parents were checked).
fn set_mode(path: &Path, mode: u32) -> Result<(), LayerError> {
    fs::set_permissions(path, Permissions::from_mode(mode)).map_err(|source| LayerError::Chmod {
        path: path.to_owned(),
        source,
    })
}

fn to_system_time(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs.min(MAX_TIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clean_path_keeps_normal_components_only() {
        assert_eq!(clean_path(Path::new("./a/./b/")).unwrap(), Path::new("a/b"));
        assert_eq!(clean_path(Path::new("./")).unwrap(), Path::new(""));
        assert!(matches!(
            clean_path(Path::new("a/../../b")),
            Err(LayerError::ParentComponent { .. })
        ));
        assert!(matches!(
            clean_path(Path::new("/etc")),
            Err(LayerError::AbsolutePath { .. })
        ));
    }

    #[test]
    fn layer_state_keeps_ancestors() {
        let mut s = LayerState::default();
        s.keep(Path::new("a/b/c"));
        for p in ["a", "a/b", "a/b/c"] {
            assert!(s.kept.contains(Path::new(p)), "{p}");
        }
        assert!(!s.kept.contains(Path::new("")));
    }
}

//! Durable replacement of a small file: the one "write a temporary file, fsync it, rename it
//! over the target, fsync the folder" in the workspace.
//!
//! # Why it lives in the wire crate
//!
//! This is the only module of `shared-proto` that touches anything outside memory. It is here
//! because `shared-proto` is the one leaf that the daemon (the relay's keys, the passkey store,
//! the push subscriptions), the device (the vault, its passkey file) and any future user reach
//! without new edges in the dependency graph; a crate of its own for one function would be
//! more ceremony than code. It does no network I/O, holds no state, and no decoder here calls
//! it.
//!
//! # What a crash can leave
//!
//! [`replace_file`] creates `.<name>.tmp-<random>` beside the target (exclusive, with the
//! mode asked for), writes and fsyncs it, renames it over the target and fsyncs the folder, so
//! the rename itself is on disk when it returns. A crash at any point leaves the old or the
//! new content under the target's name, never a mix; at worst a stray temporary file (its
//! random name never collides with a later one). On an error the temporary file is removed.
//!
//! [`replace_file_keeping_previous`] also hard-links the current file to a second name just
//! before the rename, so that the generation before the last save survives (the vault's
//! `.prev`).

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand_core::{OsRng, RngCore};

/// The mode `std::fs::File::create` uses (before the umask): for files that are not secret.
pub const DEFAULT_MODE: u32 = 0o666;
/// The mode of files only their owner may read.
pub const PRIVATE_MODE: u32 = 0o600;

/// A step of a replacement failed.
#[derive(Debug, thiserror::Error)]
#[error("{step} {}", .path.display())]
pub struct ReplaceError {
    /// What was being done: `random`, `create`, `write`, `fsync`, `remove`, `link`, `chmod`
    /// or `rename`.
    pub step: &'static str,
    /// The file or folder it was done to.
    pub path: PathBuf,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

impl From<ReplaceError> for std::io::Error {
    /// Keeps the cause's kind, and the step and path in the message chain.
    fn from(e: ReplaceError) -> Self {
        std::io::Error::new(e.source.kind(), e)
    }
}

/// Replaces the file at `path` with `bytes` durably (see the module doc); a new file gets
/// `mode` (before the umask).
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> Result<(), ReplaceError> {
    replace(path, bytes, mode, None)
}

/// [`replace_file`], and the file being replaced (if any) stays reachable as `previous`, with
/// `mode`.
pub fn replace_file_keeping_previous(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    previous: &Path,
) -> Result<(), ReplaceError> {
    replace(path, bytes, mode, Some(previous))
}

fn replace(
    path: &Path,
    bytes: &[u8],
    mode: u32,
    previous: Option<&Path>,
) -> Result<(), ReplaceError> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_owned());
    let fail = |step, p: &Path| {
        let path = p.to_owned();
        move |source| ReplaceError { step, path, source }
    };
    let mut suffix = [0u8; 6];
    OsRng
        .try_fill_bytes(&mut suffix)
        .map_err(|e| fail("random", path)(std::io::Error::other(e)))?;
    let suffix: String = suffix.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = dir.join(format!(".{name}.tmp-{suffix}"));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&tmp)
            .map_err(fail("create", &tmp))?;
        file.write_all(bytes).map_err(fail("write", &tmp))?;
        file.sync_all().map_err(fail("fsync", &tmp))?;
        drop(file);
        if let Some(prev) = previous.filter(|_| path.exists()) {
            match fs::remove_file(prev) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(fail("remove", prev)(e)),
            }
            fs::hard_link(path, prev).map_err(fail("link", prev))?;
            fs::set_permissions(prev, fs::Permissions::from_mode(mode))
                .map_err(fail("chmod", prev))?;
        }
        fs::rename(&tmp, path).map_err(fail("rename", path))?;
        File::open(&dir)
            .and_then(|d| d.sync_all())
            .map_err(fail("fsync", &dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode_of(path: &Path) -> u32 {
        fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn strays(dir: &Path) -> usize {
        fs::read_dir(dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .contains(".tmp-")
            })
            .count()
    }

    #[test]
    fn replaces_with_the_mode_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        replace_file(&path, b"one", PRIVATE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"one");
        assert_eq!(mode_of(&path), 0o600);
        replace_file(&path, b"two", PRIVATE_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"two");
        assert_eq!(strays(dir.path()), 0);
    }

    #[test]
    fn keeps_the_previous_generation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vault");
        let prev = dir.path().join("vault.prev");
        replace_file_keeping_previous(&path, b"a", PRIVATE_MODE, &prev).unwrap();
        assert!(!prev.exists(), "nothing to keep on the first write");
        replace_file_keeping_previous(&path, b"b", PRIVATE_MODE, &prev).unwrap();
        replace_file_keeping_previous(&path, b"c", PRIVATE_MODE, &prev).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"c");
        assert_eq!(fs::read(&prev).unwrap(), b"b");
        assert_eq!(mode_of(&prev), 0o600);
    }

    #[test]
    fn a_failed_rename_leaves_the_target_and_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let blocked = dir.path().join("blocked");
        fs::create_dir(&blocked).unwrap();
        fs::write(blocked.join("x"), b"").unwrap();
        let err = replace_file(&blocked, b"new", DEFAULT_MODE).unwrap_err();
        assert_eq!(err.step, "rename");
        assert_eq!(err.path, blocked);
        assert!(blocked.join("x").exists());
        assert_eq!(strays(dir.path()), 0);
        let io: std::io::Error = err.into();
        assert!(io.to_string().starts_with("rename "), "{io}");
    }

    #[test]
    fn a_missing_folder_fails_at_create() {
        let dir = tempfile::tempdir().unwrap();
        let err = replace_file(&dir.path().join("no/such/file"), b"x", DEFAULT_MODE).unwrap_err();
        assert_eq!(err.step, "create");
    }
}

//! The image store: content-addressed images under a state directory, and the names that
//! point at them.
//!
//! ```text
//! <state>/images/
//!   lock                               flock'd while names or blobs change
//!   names/<name>.json                  {"digest": "sha256:<hex>"}
//!   blobs/sha256/<hex>/rootfs.ext4     the read-only root file system
//!   blobs/sha256/<hex>/config.json     ImageConfig (Env, WorkingDir, User, Entrypoint, Cmd)
//!   blobs/sha256/<hex>/meta.json       ImageMeta (origin, sizes, creation time)
//!   tmp/op-*/                          one private staging directory per operation
//! ```
//!
//! An image's digest is its identity: for an import, the digest of its image config (docker's
//! image ID); for a Debian build, the hash of its recipe. Work happens in a staging directory
//! under `tmp/` (same file system, mode 0700, removed on drop whatever happens); only a finished
//! blob directory is renamed into `blobs/`, and names are written to a temporary file, synced,
//! renamed into `names/` and the directory synced. Those commits, removals and the collection of
//! blobs no name refers to run under an exclusive `flock` on `lock`, so concurrent operations
//! (threads or processes) never see half an image or drop a blob another one is naming; the long
//! work before a commit runs unlocked, each operation in its own staging directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};

use crate::config::ImageConfig;
use crate::debian::DebianRecipe;
use crate::digest::Digest;
use crate::name::{ImageName, NameError};
use crate::source::SourceKind;

/// Prefix of staging directory names.
const STAGING_PREFIX: &str = "op-";
/// Age after which a lock-less staging directory or temporary file counts as abandoned.
const STALE_AFTER: std::time::Duration = std::time::Duration::from_secs(3600);

/// File names inside the store.
mod paths {
    /// The store's directory under the state directory.
    pub const IMAGES: &str = "images";
    /// The store's lock file, and each staging directory's.
    pub const LOCK: &str = "lock";
    /// Name files.
    pub const NAMES: &str = "names";
    /// Blob directories, by algorithm.
    pub const BLOBS: &str = "blobs/sha256";
    /// Staging directories.
    pub const TMP: &str = "tmp";
    /// The root file system in a blob directory.
    pub const ROOTFS: &str = "rootfs.ext4";
    /// The image config in a blob directory.
    pub const CONFIG: &str = "config.json";
    /// The metadata in a blob directory.
    pub const META: &str = "meta.json";
    /// Extension of name files.
    pub const NAME_EXT: &str = "json";
}

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The image name is invalid.
    #[error(transparent)]
    Name(#[from] NameError),
    /// No image has this name.
    #[error("no image named {name}")]
    NotFound { name: ImageName },
    /// A store directory cannot be created.
    #[error("creating store directory {path:?}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Taking the store lock failed.
    #[error("locking the image store")]
    Lock(#[source] nix::Error),
    /// Creating a staging directory failed.
    #[error("creating a staging directory in {path:?}")]
    Staging {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Reading a store file or directory failed.
    #[error("reading {path:?}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A store file does not parse.
    #[error("parsing {path:?}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    /// Writing a store file failed.
    #[error("writing {path:?}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Renaming into place failed.
    #[error("moving {from:?} to {to:?}")]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    /// Removing a name or blob failed.
    #[error("removing {path:?}")]
    Remove {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    /// A name points at a blob that is not there.
    #[error("image {name} points at missing blob {digest}")]
    BlobMissing { name: ImageName, digest: Digest },
}

/// Where an image came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "type")]
pub enum ImageOrigin {
    /// Imported from an OCI or docker source.
    Import {
        /// What the source was.
        kind: SourceKind,
        /// The OCI manifest's digest, for OCI sources.
        manifest_digest: Option<Digest>,
        /// How many layers were applied.
        layers: usize,
    },
    /// Built with debootstrap.
    Debian {
        /// The normalized recipe.
        recipe: DebianRecipe,
    },
}

/// What the store records about an image besides its config (`meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// The image's digest (its identity).
    pub digest: Digest,
    /// Where it came from.
    pub origin: ImageOrigin,
    /// Size of `rootfs.ext4` in bytes (its apparent size; the file is sparse).
    pub rootfs_bytes: u64,
    /// When it was stored, in seconds since the epoch.
    pub created_unix: u64,
}

/// A named image, as the daemon and CLI see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// Its name.
    pub name: ImageName,
    /// Its digest.
    pub digest: Digest,
    /// The read-only root file system disk.
    pub rootfs: PathBuf,
    /// How to start a process in it.
    pub config: ImageConfig,
    /// Origin and sizes.
    pub meta: ImageMeta,
}

#[derive(Debug, Serialize, Deserialize)]
struct NameRecord {
    digest: Digest,
}

/// The image store under a state directory.
#[derive(Debug, Clone)]
pub struct ImageStore {
    root: PathBuf,
}

/// An operation's private staging directory under the store's `tmp/`; removed on drop. Its
/// `lock` file is flock'd while the operation lives, which tells a later [`ImageStore::open`]
/// that a staging directory it finds is not abandoned.
#[derive(Debug)]
pub struct Staging {
    // Declared first, so dropped first: the directory goes while the lock is still held.
    dir: tempfile::TempDir,
    _lock: Flock<File>,
}

impl Staging {
    /// The staging directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Where the image's tree is assembled.
    pub fn tree(&self) -> PathBuf {
        self.dir.path().join("tree")
    }

    /// Where the blob directory (rootfs, config, meta) is assembled.
    pub fn blob(&self) -> PathBuf {
        self.dir.path().join("blob")
    }

    /// The rootfs path inside [`Staging::blob`].
    pub fn rootfs(&self) -> PathBuf {
        self.blob().join(paths::ROOTFS)
    }

    /// Leaves the directory in place (when deleting it could reach below a mount that would
    /// not go away); returns its path. A later [`ImageStore::open`] deletes it once nothing
    /// is mounted below it.
    pub fn keep(self) -> PathBuf {
        self.dir.keep()
    }
}

impl ImageStore {
    /// Opens (creating if needed) the store under `state_dir`, and deletes what crashed
    /// operations left in `tmp/`.
    pub fn open(state_dir: &Path) -> Result<Self, StoreError> {
        let root = state_dir.join(paths::IMAGES);
        for dir in [paths::NAMES, paths::BLOBS, paths::TMP] {
            let path = root.join(dir);
            fs::create_dir_all(&path).map_err(|source| StoreError::CreateDir { path, source })?;
        }
        let store = Self { root };
        store.sweep_tmp();
        Ok(store)
    }

    /// The store's directory (`<state>/images`).
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Every named image, by name.
    pub fn list(&self) -> Result<Vec<ImageInfo>, StoreError> {
        let mut images = Vec::new();
        for name in self.names()? {
            match self.inspect_name(&name) {
                Ok(info) => images.push(info),
                Err(e @ (StoreError::NotFound { .. } | StoreError::BlobMissing { .. })) => {
                    tracing::warn!(%name, error = %e, "skipping broken image entry");
                }
                Err(e) => return Err(e),
            }
        }
        Ok(images)
    }

    /// The image called `name`.
    pub fn inspect(&self, name: &str) -> Result<ImageInfo, StoreError> {
        self.inspect_name(&ImageName::new(name)?)
    }

    /// Removes the name; removes its blob too when no other name refers to it.
    pub fn remove(&self, name: &str) -> Result<(), StoreError> {
        let name = ImageName::new(name)?;
        let _lock = self.lock()?;
        let digest = self.read_name(&name)?;
        let path = self.name_path(&name);
        fs::remove_file(&path).map_err(|source| StoreError::Remove { path, source })?;
        sync_dir(&self.root.join(paths::NAMES))?;
        self.collect(&digest)?;
        tracing::info!(%name, %digest, "image removed");
        Ok(())
    }

    /// A new staging directory for one operation.
    pub fn staging(&self) -> Result<Staging, StoreError> {
        let tmp = self.root.join(paths::TMP);
        let dir = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(&tmp)
            .map_err(|source| StoreError::Staging { path: tmp, source })?;
        let lock_path = dir.path().join(paths::LOCK);
        let staging_err = |source| StoreError::Staging {
            path: lock_path.clone(),
            source,
        };
        let file = File::create(&lock_path).map_err(staging_err)?;
        let lock = Flock::lock(file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| staging_err(errno.into()))?;
        Ok(Staging { dir, _lock: lock })
    }

    /// Deletes staging directories whose operation is gone (their lock is free, or they never
    /// got one and are old) and old temporary files. A directory with a mount below it is left
    /// alone: deleting it would cross into the mount. Failures are logged, not returned: a
    /// leftover costs disk space, not correctness.
    fn sweep_tmp(&self) {
        let tmp = self.root.join(paths::TMP);
        let Ok(entries) = fs::read_dir(&tmp) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let Ok(meta) = fs::symlink_metadata(&path) else {
                continue;
            };
            let old = meta
                .modified()
                .ok()
                .and_then(|m| m.elapsed().ok())
                .is_some_and(|age| age > STALE_AFTER);
            let abandoned = if meta.is_dir() {
                match File::open(path.join(paths::LOCK)) {
                    Ok(file) => Flock::lock(file, FlockArg::LockExclusiveNonblock).is_ok(),
                    Err(_) => old,
                }
            } else {
                old
            };
            if !abandoned {
                continue;
            }
            match crate::mounts::mounts_under(&path) {
                Ok(mounts) if mounts.is_empty() => {}
                Ok(mounts) => {
                    tracing::warn!(path = %path.display(), ?mounts, "abandoned staging directory has mounts below it; left in place");
                    continue;
                }
                Err(error) => {
                    tracing::warn!(%error, "cannot read the mount table; leaving tmp/ alone");
                    return;
                }
            }
            let removed = if meta.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => tracing::info!(path = %path.display(), "removed abandoned staging data"),
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot remove abandoned staging data")
                }
            }
        }
    }

    /// Writes the config and meta into the staging blob directory (whose `rootfs.ext4` is
    /// made), moves it into `blobs/` unless that digest is already stored, and points `name`
    /// at it. The blob a replaced name pointed at is dropped if nothing else names it.
    pub fn commit(
        &self,
        staging: &Staging,
        name: &ImageName,
        config: &ImageConfig,
        meta: &ImageMeta,
    ) -> Result<ImageInfo, StoreError> {
        let blob = staging.blob();
        write_durable(&blob.join(paths::CONFIG), &to_json(config))?;
        write_durable(&blob.join(paths::META), &to_json(meta))?;
        sync_file(&blob.join(paths::ROOTFS))?;
        sync_dir(&blob)?;
        let _lock = self.lock()?;
        let target = self.blob_dir(&meta.digest);
        if !target.join(paths::META).exists() {
            rename(&blob, &target)?;
            sync_dir(&self.root.join(paths::BLOBS))?;
        }
        self.point_name(name, &meta.digest)?;
        tracing::info!(%name, digest = %meta.digest, "image stored");
        self.inspect_name(name)
    }

    /// If the image `digest` is stored, points `name` at it and returns it (a cache hit).
    pub fn tag_existing(
        &self,
        name: &ImageName,
        digest: &Digest,
    ) -> Result<Option<ImageInfo>, StoreError> {
        let _lock = self.lock()?;
        if !self.blob_dir(digest).join(paths::META).exists() {
            return Ok(None);
        }
        self.point_name(name, digest)?;
        self.inspect_name(name).map(Some)
    }

    /// The metadata of a stored image, if the digest is stored.
    pub fn meta(&self, digest: &Digest) -> Result<Option<ImageMeta>, StoreError> {
        let path = self.blob_dir(digest).join(paths::META);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|source| StoreError::Parse { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    /// The read-only root disk of the stored image `digest` (the path [`ImageInfo::rootfs`]
    /// gives), or `None` when no such image is stored, whatever it is named: a VM that
    /// migrates in finds its image here by digest.
    pub fn rootfs_of(&self, digest: &Digest) -> Result<Option<PathBuf>, StoreError> {
        let dir = self.blob_dir(digest);
        // A blob directory is renamed into place whole, its `meta.json` in it: that file says
        // the image is stored, as for `tag_existing`.
        let meta = dir.join(paths::META);
        match fs::metadata(&meta) {
            Ok(_) => Ok(Some(dir.join(paths::ROOTFS))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Read { path: meta, source }),
        }
    }

    fn point_name(&self, name: &ImageName, digest: &Digest) -> Result<(), StoreError> {
        let previous = match self.read_name(name) {
            Ok(d) => Some(d),
            Err(StoreError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let record = to_json(&NameRecord { digest: *digest });
        let tmp = self.root.join(paths::TMP);
        let mut file =
            tempfile::NamedTempFile::new_in(&tmp).map_err(|source| StoreError::Write {
                path: tmp.clone(),
                source,
            })?;
        let path = self.name_path(name);
        let write_err = |source| StoreError::Write {
            path: path.clone(),
            source,
        };
        file.write_all(&record).map_err(write_err)?;
        file.as_file().sync_all().map_err(write_err)?;
        file.persist(&path).map_err(|e| write_err(e.error))?;
        sync_dir(&self.root.join(paths::NAMES))?;
        if let Some(old) = previous.filter(|old| old != digest) {
            self.collect(&old)?;
        }
        Ok(())
    }

    /// Drops the blob `digest` if no name refers to it. Called with the lock held.
    fn collect(&self, digest: &Digest) -> Result<(), StoreError> {
        for name in self.names()? {
            if self.read_name(&name).is_ok_and(|d| d == *digest) {
                return Ok(());
            }
        }
        let dir = self.blob_dir(digest);
        if !dir.exists() {
            return Ok(());
        }
        // Move it out of blobs/ in one step, then delete at leisure.
        let graveyard = self.staging()?;
        let dead = graveyard.path().join("dead");
        rename(&dir, &dead)?;
        sync_dir(&self.root.join(paths::BLOBS))?;
        tracing::info!(%digest, "unreferenced image blob removed");
        Ok(())
    }

    fn inspect_name(&self, name: &ImageName) -> Result<ImageInfo, StoreError> {
        let digest = self.read_name(name)?;
        let dir = self.blob_dir(&digest);
        let meta = self.meta(&digest)?.ok_or_else(|| StoreError::BlobMissing {
            name: name.clone(),
            digest,
        })?;
        let config = read_json(&dir.join(paths::CONFIG))?;
        Ok(ImageInfo {
            name: name.clone(),
            digest,
            rootfs: dir.join(paths::ROOTFS),
            config,
            meta,
        })
    }

    fn read_name(&self, name: &ImageName) -> Result<Digest, StoreError> {
        let path = self.name_path(name);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<NameRecord>(&bytes)
                .map(|r| r.digest)
                .map_err(|source| StoreError::Parse { path, source }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound { name: name.clone() })
            }
            Err(source) => Err(StoreError::Read { path, source }),
        }
    }

    fn names(&self) -> Result<Vec<ImageName>, StoreError> {
        let dir = self.root.join(paths::NAMES);
        let read_err = |source| StoreError::Read {
            path: dir.clone(),
            source,
        };
        let mut names = Vec::new();
        for entry in fs::read_dir(&dir).map_err(read_err)? {
            let path = entry.map_err(read_err)?.path();
            if path.extension().is_some_and(|e| e == paths::NAME_EXT)
                && let Some(name) = path.file_stem().and_then(|s| s.to_str())
                && let Ok(name) = ImageName::new(name)
            {
                names.push(name);
            }
        }
        names.sort();
        Ok(names)
    }

    fn name_path(&self, name: &ImageName) -> PathBuf {
        self.root
            .join(paths::NAMES)
            .join(format!("{name}.{}", paths::NAME_EXT))
    }

    fn blob_dir(&self, digest: &Digest) -> PathBuf {
        self.root.join(paths::BLOBS).join(digest.hex())
    }

    fn lock(&self) -> Result<Flock<File>, StoreError> {
        let path = self.root.join(paths::LOCK);
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| StoreError::Write { path, source })?;
        Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| StoreError::Lock(errno))
    }
}

/// The current time in seconds since the epoch.
pub(crate) fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing these plain structs cannot fail (string keys, no custom errors).
    let mut bytes = serde_json::to_vec_pretty(value).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T, StoreError> {
    let bytes = fs::read(path).map_err(|source| StoreError::Read {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_slice(&bytes).map_err(|source| StoreError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Writes a new file and syncs it.
fn write_durable(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    let write_err = |source| StoreError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)
        .map_err(write_err)?;
    file.write_all(bytes).map_err(write_err)?;
    file.sync_all().map_err(write_err)
}

fn sync_file(path: &Path) -> Result<(), StoreError> {
    File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|source| StoreError::Write {
            path: path.to_owned(),
            source,
        })
}

fn sync_dir(path: &Path) -> Result<(), StoreError> {
    sync_file(path)
}

fn rename(from: &Path, to: &Path) -> Result<(), StoreError> {
    fs::rename(from, to).map_err(|source| StoreError::Rename {
        from: from.to_owned(),
        to: to.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stage(store: &ImageStore, seed: &[u8]) -> (Staging, ImageMeta) {
        let staging = store.staging().unwrap();
        fs::create_dir(staging.blob()).unwrap();
        fs::write(staging.rootfs(), seed).unwrap();
        let meta = ImageMeta {
            digest: Digest::of(seed),
            origin: ImageOrigin::Import {
                kind: SourceKind::OciDir,
                manifest_digest: None,
                layers: 1,
            },
            rootfs_bytes: seed.len() as u64,
            created_unix: 1,
        };
        (staging, meta)
    }

    fn name(s: &str) -> ImageName {
        ImageName::new(s).unwrap()
    }

    #[test]
    fn commit_list_inspect_remove() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let config = ImageConfig {
            cmd: vec!["sh".into()],
            ..Default::default()
        };
        let (staging, meta) = stage(&store, b"one");
        let info = store.commit(&staging, &name("a"), &config, &meta).unwrap();
        assert_eq!(info.digest, meta.digest);
        assert_eq!(fs::read(&info.rootfs).unwrap(), b"one");
        assert_eq!(store.inspect("a").unwrap(), info);
        // A second name for the same digest shares the blob.
        let (staging2, meta2) = stage(&store, b"one");
        store
            .commit(&staging2, &name("b"), &config, &meta2)
            .unwrap();
        let listed: Vec<_> = store.list().unwrap().into_iter().map(|i| i.name).collect();
        assert_eq!(listed, [name("a"), name("b")]);
        store.remove("a").unwrap();
        assert!(info.rootfs.exists(), "blob dropped while b still names it");
        assert!(matches!(
            store.inspect("a"),
            Err(StoreError::NotFound { .. })
        ));
        store.remove("b").unwrap();
        assert!(!info.rootfs.exists(), "unreferenced blob kept");
        assert!(store.list().unwrap().is_empty());
        assert!(matches!(
            store.remove("b"),
            Err(StoreError::NotFound { .. })
        ));
        assert!(matches!(store.inspect("B/.."), Err(StoreError::Name(_))));
        drop((staging, staging2));
        assert_eq!(
            fs::read_dir(store.root().join(paths::TMP)).unwrap().count(),
            0
        );
    }

    #[test]
    fn open_sweeps_abandoned_staging_but_not_live_ones() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let live = store.staging().unwrap();
        let abandoned = store.staging().unwrap().keep();
        fs::write(abandoned.join("partial"), b"x").unwrap();
        let reopened = ImageStore::open(state.path()).unwrap();
        assert!(live.path().exists(), "a live staging directory was swept");
        assert!(
            !abandoned.exists(),
            "an abandoned staging directory was kept"
        );
        drop(live);
        assert_eq!(
            fs::read_dir(reopened.root().join(paths::TMP))
                .unwrap()
                .count(),
            0
        );
    }

    #[test]
    fn rootfs_of_finds_a_stored_digest_under_any_name_and_nothing_else() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let (staging, meta) = stage(&store, b"disk");
        assert_eq!(store.rootfs_of(&meta.digest).unwrap(), None);
        let info = store
            .commit(&staging, &name("a"), &ImageConfig::default(), &meta)
            .unwrap();
        let rootfs = store.rootfs_of(&meta.digest).unwrap();
        assert_eq!(rootfs.as_deref(), Some(info.rootfs.as_path()));
        assert_eq!(fs::read(info.rootfs).unwrap(), b"disk");
        assert_eq!(store.rootfs_of(&Digest::of(b"other")).unwrap(), None);
        // Once no name holds it, the blob is gone and so is the answer.
        store.remove("a").unwrap();
        assert_eq!(store.rootfs_of(&meta.digest).unwrap(), None);
    }

    #[test]
    fn renaming_to_another_digest_drops_the_old_blob() {
        let state = tempfile::tempdir().unwrap();
        let store = ImageStore::open(state.path()).unwrap();
        let config = ImageConfig::default();
        let (s1, m1) = stage(&store, b"v1");
        let old = store.commit(&s1, &name("x"), &config, &m1).unwrap();
        let (s2, m2) = stage(&store, b"v2");
        let new = store.commit(&s2, &name("x"), &config, &m2).unwrap();
        assert!(!old.rootfs.exists());
        assert_eq!(fs::read(new.rootfs).unwrap(), b"v2");
        assert_eq!(store.tag_existing(&name("y"), &m1.digest).unwrap(), None);
        let y = store.tag_existing(&name("y"), &m2.digest).unwrap().unwrap();
        assert_eq!(y.digest, m2.digest);
    }
}

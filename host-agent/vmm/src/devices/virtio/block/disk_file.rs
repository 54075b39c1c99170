//! [`DiskFile`]: a disk backed by a regular host file.
//!
//! A read-only disk is opened `O_RDONLY` and holds a shared `flock`, so any number of VMs can
//! share one image; a writable disk is opened `O_RDWR` and holds an exclusive one, so a scratch
//! disk cannot be attached to two VMs at once (or written while a VM reads it as an image). The
//! capacity is fixed when the file is opened: a file that later shrinks answers reads past its
//! end with `IOERR`. A file system that has no locks at all (`ENOLCK`, `EOPNOTSUPP`), such as
//! some network shares, still serves read-only images: a shared lock only guards against a
//! writer, and such images are never opened writable; writable disks always need their lock.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;

use nix::fcntl::{Flock, FlockArg};

use super::defs::SECTOR_SIZE;
use super::dirty::DirtyBlocks;
use super::{BlockError, DiskBackend};

/// The backing file and its lock.
#[derive(Debug)]
enum Locked {
    /// Holding the `flock`.
    Held(Flock<File>),
    /// A read-only file on a file system without locks.
    Unlockable(File),
}

impl std::ops::Deref for Locked {
    type Target = File;

    fn deref(&self) -> &File {
        match self {
            Self::Held(f) => f,
            Self::Unlockable(f) => f,
        }
    }
}

/// An open, locked backing file.
#[derive(Debug)]
pub struct DiskFile {
    file: Locked,
    sectors: u64,
    read_only: bool,
    /// A writable disk's log of written blocks.
    dirty: Option<Arc<DirtyBlocks>>,
}

impl DiskFile {
    /// Opens and locks `path`. Refuses anything but a non-empty regular file whose size is a
    /// multiple of 512 bytes.
    pub fn open(path: &Path, read_only: bool) -> Result<Self, BlockError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            // A FIFO would block the open; on a regular file the flag changes nothing.
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.to_path_buf(),
                source,
            })?;
        let meta = file.metadata().map_err(|source| BlockError::Metadata {
            path: path.to_path_buf(),
            source,
        })?;
        if !meta.is_file() {
            return Err(BlockError::NotRegularFile(path.to_path_buf()));
        }
        let len = meta.len();
        if len == 0 {
            return Err(BlockError::Empty(path.to_path_buf()));
        }
        if !len.is_multiple_of(SECTOR_SIZE) {
            return Err(BlockError::UnalignedSize {
                path: path.to_path_buf(),
                len,
            });
        }
        let lock = if read_only {
            FlockArg::LockSharedNonblock
        } else {
            FlockArg::LockExclusiveNonblock
        };
        let file = match Flock::lock(file, lock) {
            Ok(held) => Locked::Held(held),
            Err((file, nix::errno::Errno::ENOLCK | nix::errno::Errno::EOPNOTSUPP)) if read_only => {
                tracing::warn!(path = %path.display(), "the image's file system has no locks; serving it unlocked");
                Locked::Unlockable(file)
            }
            Err((_, errno)) => {
                return Err(BlockError::Lock {
                    path: path.to_path_buf(),
                    source: errno,
                });
            }
        };
        Ok(Self {
            file,
            sectors: len / SECTOR_SIZE,
            read_only,
            dirty: (!read_only).then(|| Arc::new(DirtyBlocks::new(len))),
        })
    }

    /// A writable disk's log of the blocks the guest wrote (`None` for a read-only disk).
    pub fn dirty_log(&self) -> Option<Arc<DirtyBlocks>> {
        self.dirty.clone()
    }

    /// A second descriptor of the same open file (sharing its lock), for a migration to read
    /// or write the disk beside the device.
    pub fn try_clone_file(&self) -> std::io::Result<File> {
        self.file.try_clone()
    }

    /// Capacity in 512-byte sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Capacity in bytes.
    pub fn capacity_bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

impl DiskBackend for DiskFile {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let written = self.file.write_all_at(buf, offset);
        // Marked after the write, and even after a failed one (part of it may have landed).
        if let Some(dirty) = &self.dirty {
            dirty.mark(offset, buf.len() as u64);
        }
        written
    }

    fn sync_data(&self) -> std::io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_checks_size_type_and_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.img");

        std::fs::write(&path, vec![7u8; 4096]).unwrap();
        let ro = DiskFile::open(&path, true).unwrap();
        assert_eq!((ro.sectors(), ro.read_only()), (8, true));
        assert_eq!(ro.capacity_bytes(), 4096);
        assert!(ro.dirty_log().is_none(), "a read-only disk keeps no log");
        // Read-only: the descriptor really cannot write.
        assert!(ro.file.write_at(b"x", 0).is_err());
        let mut buf = [0u8; 4];
        ro.read_exact_at(&mut buf, 4092).unwrap();
        assert_eq!(buf, [7; 4]);
        assert!(ro.read_exact_at(&mut buf, 4094).is_err());
        // A second reader shares the lock; a writer is refused while readers hold it.
        let ro2 = DiskFile::open(&path, true).unwrap();
        assert!(matches!(
            DiskFile::open(&path, false),
            Err(BlockError::Lock { .. })
        ));
        drop((ro, ro2));

        let rw = DiskFile::open(&path, false).unwrap();
        let log = rw.dirty_log().expect("a writable disk logs its writes");
        assert_eq!(log.take().count(), 0);
        rw.write_all_at(b"abc", 512).unwrap();
        assert_eq!(log.take().runs(1 << 20), vec![(0, 4096)]);
        rw.sync_data().unwrap();
        assert!(matches!(
            DiskFile::open(&path, true),
            Err(BlockError::Lock { .. })
        ));
        drop(rw);
        assert_eq!(&std::fs::read(&path).unwrap()[512..515], b"abc");

        std::fs::write(&path, vec![0u8; 1000]).unwrap();
        assert!(matches!(
            DiskFile::open(&path, true),
            Err(BlockError::UnalignedSize { len: 1000, .. })
        ));
        std::fs::write(&path, b"").unwrap();
        assert!(matches!(
            DiskFile::open(&path, true),
            Err(BlockError::Empty(_))
        ));
        assert!(matches!(
            DiskFile::open(dir.path(), true),
            Err(BlockError::NotRegularFile(_))
        ));
        assert!(matches!(
            DiskFile::open(&dir.path().join("missing"), true),
            Err(BlockError::Open { .. })
        ));
    }
}

//! `Put`: a tar stream from the host, unpacked under a directory of the agent's root.
//!
//! The stream is read with the `tar` crate in raw mode: the sidecar reads GNU long names and
//! links and PAX headers itself, each at most [`MAX_EXTENSION`] bytes, instead of letting the
//! crate buffer them whole. A PAX `size` (files over 8 GiB, past the byte cap anyway) is
//! refused. Each entry is then checked ([`components`]) and made with descriptor-relative
//! calls below `dest` (see [`super`] for why).

use std::ffi::OsStr;
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::{Mode, fchmod, futimens};
use nix::sys::time::TimeSpec;
use nix::unistd::{Gid, Uid, UnlinkatFlags, fchownat, symlinkat, unlinkat};
use shared_proto::files::{FilesReply, FilesRequest, MAX_FILES_CHUNK};
use tar::{EntryType, Header, PaxExtensions};

use super::{Conn, FilesError, Limits, Transfer, errno_of};
use crate::rootfs::dir::{Owner, child_dir, open_beneath};
use crate::rootfs::{PreparedRoot, RootDir};

/// The largest GNU long name, long link or PAX header accepted, in bytes.
pub const MAX_EXTENSION: u64 = 64 * 1024;

/// The longest symlink target accepted, in bytes.
const MAX_LINK_TARGET: usize = 4095;

/// The mode of parent folders an archive implies without listing them.
const IMPLIED_DIR_MODE: u32 = 0o755;

/// Runs a `Put` of `dest`: opens (or makes) it, answers `Ready`, then unpacks the stream.
/// `receiving` stays set while the host may still be sending.
pub fn put<S: Read + Write>(
    conn: &mut Conn<S>,
    root: &PreparedRoot,
    dest: &str,
    limits: &Limits,
    receiving: &mut bool,
) -> Result<Transfer, FilesError> {
    let path_err = |source| FilesError::Path {
        path: dest.to_owned(),
        source,
    };
    let dir = RootDir::open(&root.path).map_err(path_err)?;
    let dest_fd = dir
        .create_dir_all(dest, root.owner, Mode::from_bits_truncate(IMPLIED_DIR_MODE))
        .map_err(path_err)?;
    conn.send(&FilesReply::Ready)?;
    *receiving = true;
    let mut stream = ChunkStream {
        conn,
        chunk: Vec::new(),
        pos: 0,
        received: 0,
        max: limits.max_bytes,
        ended: false,
        failure: None,
    };
    let unpacked = unpack(&mut stream, dest_fd.as_fd(), root.owner, limits)
        .and_then(|entries| stream.read_to_end_message().map(|()| entries));
    *receiving = !stream.ended;
    // A failure of the stream itself is the cause of whatever tar or the copy reported.
    let entries = match (unpacked, stream.failure.take()) {
        (Err(_), Some(failure)) => return Err(failure),
        (result, _) => result?,
    };
    Ok(Transfer {
        bytes: stream.received,
        entries,
    })
}

/// The tar stream of a `Put`, read from the host's `Chunk`s until `End`.
struct ChunkStream<'a, S> {
    conn: &'a mut Conn<S>,
    chunk: Vec<u8>,
    pos: usize,
    received: u64,
    max: u64,
    ended: bool,
    /// Why the stream failed; its reads then fail with a bare error.
    failure: Option<FilesError>,
}

impl<S: Read + Write> ChunkStream<'_, S> {
    fn fail(&mut self, e: FilesError) -> io::Error {
        self.failure = Some(e);
        io::Error::other("the put's stream failed")
    }

    /// Reads and drops what is left up to `End` (tar's end-of-archive blocks and padding).
    fn read_to_end_message(&mut self) -> Result<(), FilesError> {
        let mut sink = [0u8; 4096];
        loop {
            match self.read(&mut sink) {
                Ok(0) => return Ok(()),
                Ok(_) => {}
                Err(e) => {
                    return Err(self.failure.take().unwrap_or(FilesError::Archive(e)));
                }
            }
        }
    }
}

impl<S: Read + Write> Read for ChunkStream<'_, S> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            if self.ended {
                return Ok(0);
            }
            if self.failure.is_some() {
                return Err(io::Error::other("the put's stream failed"));
            }
            match self.conn.next_request() {
                Ok(Some(FilesRequest::Chunk { data })) => {
                    self.received += data.len() as u64;
                    if self.received > self.max {
                        let max = self.max;
                        return Err(self.fail(FilesError::TooLarge { max }));
                    }
                    self.chunk = data;
                    self.pos = 0;
                }
                Ok(Some(FilesRequest::End)) => {
                    self.ended = true;
                    return Ok(0);
                }
                Ok(Some(FilesRequest::Put { .. } | FilesRequest::Get { .. })) => {
                    return Err(self.fail(FilesError::OutOfOrder {
                        got: "request",
                        during: "in a put's stream",
                    }));
                }
                Ok(None) => {
                    return Err(self.fail(FilesError::Closed("before the end of the put's stream")));
                }
                Err(e) => return Err(self.fail(e)),
            }
        }
        let n = out.len().min(self.chunk.len() - self.pos);
        out[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The extension headers that describe the next entry.
#[derive(Debug, Default)]
struct Extensions {
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    pax: Option<Vec<u8>>,
}

impl Extensions {
    /// The value of `key` in the PAX header, if any.
    fn pax_value(&self, key: &str) -> Result<Option<Vec<u8>>, FilesError> {
        let Some(pax) = &self.pax else {
            return Ok(None);
        };
        for ext in PaxExtensions::new(pax) {
            let ext = ext.map_err(FilesError::Archive)?;
            if ext.key_bytes() == key.as_bytes() {
                return Ok(Some(ext.value_bytes().to_vec()));
            }
        }
        Ok(None)
    }

    /// The entry's path: PAX `path`, else the GNU long name, else the header's.
    fn path(&self, header: &Header) -> Result<Vec<u8>, FilesError> {
        Ok(match (self.pax_value("path")?, &self.long_name) {
            (Some(p), _) => p,
            (None, Some(n)) => n.clone(),
            (None, None) => header.path_bytes().into_owned(),
        })
    }

    /// The entry's link target: PAX `linkpath`, else the GNU long link, else the header's.
    fn link(&self, header: &Header) -> Result<Option<Vec<u8>>, FilesError> {
        Ok(match (self.pax_value("linkpath")?, &self.long_link) {
            (Some(l), _) => Some(l),
            (None, Some(l)) => Some(l.clone()),
            (None, None) => header.link_name_bytes().map(|l| l.into_owned()),
        })
    }
}

/// Reads an extension entry's data, at most [`MAX_EXTENSION`] bytes, without its trailing
/// NULs.
fn read_extension(entry: &mut impl Read, size: u64, path: &[u8]) -> Result<Vec<u8>, FilesError> {
    if size > MAX_EXTENSION {
        return Err(FilesError::Unsupported {
            path: String::from_utf8_lossy(path).into_owned(),
            what: "tar extension header over 64 KiB",
        });
    }
    let mut data = Vec::new();
    entry
        .take(MAX_EXTENSION)
        .read_to_end(&mut data)
        .map_err(FilesError::Archive)?;
    while data.last() == Some(&0) {
        data.pop();
    }
    Ok(data)
}

/// Unpacks every entry of the stream below `dest`; answers how many there were.
fn unpack<R: Read>(
    stream: R,
    dest: BorrowedFd<'_>,
    owner: Owner,
    limits: &Limits,
) -> Result<u64, FilesError> {
    let mut archive = tar::Archive::new(stream);
    let entries = archive.entries().map_err(FilesError::Archive)?.raw(true);
    let mut pending = Extensions::default();
    let mut count = 0u64;
    for entry in entries {
        let mut entry = entry.map_err(FilesError::Archive)?;
        let kind = entry.header().entry_type();
        let size = entry.size();
        let raw_path = entry.header().path_bytes().into_owned();
        match kind {
            EntryType::GNULongName => {
                pending.long_name = Some(read_extension(&mut entry, size, &raw_path)?);
                continue;
            }
            EntryType::GNULongLink => {
                pending.long_link = Some(read_extension(&mut entry, size, &raw_path)?);
                continue;
            }
            EntryType::XHeader => {
                pending.pax = Some(read_extension(&mut entry, size, &raw_path)?);
                continue;
            }
            // Global PAX headers hold defaults (such as a comment) that nothing here uses.
            EntryType::XGlobalHeader => continue,
            _ => {}
        }
        count += 1;
        if count > limits.max_entries {
            return Err(FilesError::TooManyEntries {
                max: limits.max_entries,
            });
        }
        let ext = std::mem::take(&mut pending);
        let path = ext.path(entry.header())?;
        if ext.pax_value("size")?.is_some() {
            return Err(FilesError::Unsupported {
                path: String::from_utf8_lossy(&path).into_owned(),
                what: "file sized by a PAX header",
            });
        }
        let link = ext.link(entry.header())?;
        unpack_entry(&mut entry, kind, &path, link, dest, owner, limits)?;
    }
    Ok(count)
}

/// The components of an entry's path below `dest`: `.` and empty ones dropped; an absolute
/// path, a `..` or a NUL byte refused.
pub fn components(path: &[u8]) -> Result<Vec<&OsStr>, &'static str> {
    if path.first() == Some(&b'/') {
        return Err("is absolute");
    }
    let mut out = Vec::new();
    for c in path.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return Err("has a .. component"),
            c if c.contains(&0) => return Err("holds a NUL byte"),
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Ok(out)
}

/// Makes one entry below `dest`.
fn unpack_entry<R: Read>(
    entry: &mut tar::Entry<'_, R>,
    kind: EntryType,
    path: &[u8],
    link: Option<Vec<u8>>,
    dest: BorrowedFd<'_>,
    owner: Owner,
    limits: &Limits,
) -> Result<(), FilesError> {
    let shown = || String::from_utf8_lossy(path).into_owned();
    let parts = components(path).map_err(|reason| FilesError::EntryPath {
        path: shown(),
        reason,
    })?;
    let Some((name, parents)) = parts.split_last() else {
        // `./`: the destination itself, which is there already.
        if kind == EntryType::Directory {
            return Ok(());
        }
        return Err(FilesError::EntryPath {
            path: shown(),
            reason: "names the destination itself",
        });
    };
    if parts.len() > limits.max_depth {
        return Err(FilesError::TooDeep {
            path: shown(),
            max: limits.max_depth,
        });
    }
    let unsupported = |what| {
        Err(FilesError::Unsupported {
            path: shown(),
            what,
        })
    };
    match kind {
        EntryType::Regular | EntryType::Continuous | EntryType::Directory | EntryType::Symlink => {}
        EntryType::Link => return unsupported("hard link"),
        EntryType::Char | EntryType::Block => return unsupported("device node"),
        EntryType::Fifo => return unsupported("FIFO"),
        EntryType::GNUSparse => return unsupported("sparse file"),
        _ => return unsupported("entry of an unknown type"),
    }
    let entry_err = |source| FilesError::Entry {
        path: shown(),
        source,
    };
    let mode = entry.header().mode().map_err(FilesError::Archive)?;
    let mode = Mode::from_bits_truncate(permission_bits(mode));
    let implied = Some((owner, Mode::from_bits_truncate(IMPLIED_DIR_MODE)));
    let mut held: Option<OwnedFd> = None;
    for part in parents {
        let at = held.as_ref().map_or(dest, |fd| fd.as_fd());
        held = Some(
            child_dir(at, Path::new(part), implied)
                .map_err(entry_err)?
                .0,
        );
    }
    let parent = held.as_ref().map_or(dest, |fd| fd.as_fd());
    let name = Path::new(name);
    match kind {
        EntryType::Directory => {
            child_dir(parent, name, Some((owner, mode))).map_err(entry_err)?;
        }
        EntryType::Symlink => {
            let target = link
                .filter(|t| !t.is_empty())
                .ok_or(FilesError::EntryPath {
                    path: shown(),
                    reason: "is a symlink without a target",
                })?;
            if target.len() > MAX_LINK_TARGET || target.contains(&0) {
                return Err(FilesError::EntryPath {
                    path: shown(),
                    reason: "has an overlong or NUL-holding symlink target",
                });
            }
            remove_existing(parent, name).map_err(entry_err)?;
            symlinkat(OsStr::from_bytes(&target), parent, name).map_err(entry_err)?;
            fchownat(
                parent,
                name,
                Some(Uid::from_raw(owner.uid)),
                Some(Gid::from_raw(owner.gid)),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )
            .map_err(entry_err)?;
        }
        _ => {
            let mtime = entry.header().mtime().map_err(FilesError::Archive)?;
            let file = create_file(parent, name, owner).map_err(entry_err)?;
            copy_into(entry, file, mode, mtime).map_err(|e| match e {
                CopyError::Fs(source) => entry_err(source),
                CopyError::Stream(e) => FilesError::Archive(e),
            })?;
        }
    }
    Ok(())
}

/// The permission bits of a header's mode: no setuid, setgid or sticky bit.
fn permission_bits(mode: u32) -> nix::libc::mode_t {
    mode & 0o777
}

/// Removes what is at `name` unless it is a directory (`EISDIR`), so that a new file or link
/// replaces it instead of writing through it.
fn remove_existing(parent: BorrowedFd<'_>, name: &Path) -> Result<(), Errno> {
    match unlinkat(parent, name, UnlinkatFlags::NoRemoveDir) {
        Ok(()) | Err(Errno::ENOENT) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Creates `name` below `parent` afresh (whatever was there is unlinked first), owned by
/// `owner`, mode 0600 until its data is in.
fn create_file(parent: BorrowedFd<'_>, name: &Path, owner: Owner) -> Result<std::fs::File, Errno> {
    remove_existing(parent, name)?;
    let flags = OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL;
    let fd = open_beneath(parent, name, flags, Mode::from_bits_truncate(0o600))?;
    owner.chown(&fd)?;
    Ok(std::fs::File::from(fd))
}

/// Why copying an entry's data failed.
enum CopyError {
    /// Writing the file (a full disk is `ENOSPC`).
    Fs(Errno),
    /// Reading the stream.
    Stream(io::Error),
}

/// Copies the entry's data into `file`, then sets its mode and modification time.
fn copy_into(
    entry: &mut impl Read,
    mut file: std::fs::File,
    mode: Mode,
    mtime: u64,
) -> Result<(), CopyError> {
    let mut buf = vec![0u8; MAX_FILES_CHUNK];
    loop {
        let n = match entry.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Stream(e)),
        };
        file.write_all(&buf[..n])
            .map_err(|e| CopyError::Fs(errno_of(&e)))?;
    }
    fchmod(&file, mode).map_err(CopyError::Fs)?;
    let mtime = TimeSpec::new(i64::try_from(mtime).unwrap_or(i64::MAX), 0);
    futimens(&file, &TimeSpec::UTIME_OMIT, &mtime).map_err(CopyError::Fs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_paths_stay_below_the_destination() {
        fn ok(p: &[u8]) -> Vec<&OsStr> {
            components(p).unwrap()
        }
        assert_eq!(ok(b"a/b/c"), ["a", "b", "c"]);
        assert_eq!(ok(b"./a//b/./"), ["a", "b"]);
        assert!(ok(b"./").is_empty());
        assert_eq!(ok(b"..a/b.."), ["..a", "b.."]);
        assert_eq!(components(b"/etc/passwd"), Err("is absolute"));
        assert_eq!(components(b"a/../../x"), Err("has a .. component"));
        assert_eq!(components(b".."), Err("has a .. component"));
        assert_eq!(components(b"a\0b"), Err("holds a NUL byte"));
    }

    #[test]
    fn modes_lose_their_special_bits() {
        assert_eq!(permission_bits(0o104755), 0o755);
        assert_eq!(permission_bits(0o7777), 0o777);
        assert_eq!(permission_bits(0o640), 0o640);
    }
}

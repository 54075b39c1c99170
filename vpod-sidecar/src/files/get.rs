//! `Get`: a tar of a file or folder of the agent's root, sent to the host in chunks.
//!
//! The archive's top entry is the last component of `path` (`out` for `/work/out`), as
//! `tar -C /work -c out` would name it; for `/` the entries are the root's children. Folders
//! are walked with descriptors: each child is looked at with
//! `fstatat(AT_SYMLINK_NOFOLLOW)` and opened below its parent's descriptor without following
//! links or crossing mounts; a file is archived with the type and size of the descriptor it was
//! read from, and a file that shrinks while it is read is padded with zeros so that the archive
//! stays well-formed. Symlinks are archived as links; devices, FIFOs and sockets are skipped,
//! and so are mount points below `path`.

use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{AtFlags, OFlag, readlinkat};
use nix::sys::stat::{FileStat, Mode, SFlag, fstat, fstatat};
use shared_proto::files::{FilesReply, MAX_FILES_CHUNK};
use tar::{Builder, EntryType, Header};

use super::{Conn, FilesError, Limits, Transfer, errno_of};
use crate::rootfs::dir::open_beneath;
use crate::rootfs::{PreparedRoot, RootDir};

/// Runs a `Get` of `path`: streams its archive as `Chunk`s; the caller sends `Done`.
pub fn get<S: Read + Write>(
    conn: &mut Conn<S>,
    root: &PreparedRoot,
    path: &str,
    limits: &Limits,
) -> Result<Transfer, FilesError> {
    let path_err = |source| FilesError::Path {
        path: path.to_owned(),
        source,
    };
    let dir = RootDir::open(&root.path).map_err(path_err)?;
    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
    let fd = dir
        .open_in_root(path, flags, Mode::empty())
        .map_err(path_err)?;
    let st = fstat(fd.as_fd()).map_err(path_err)?;
    let top = path.split('/').rfind(|c| !c.is_empty()).map(PathBuf::from);
    let mut sink = ChunkSink {
        conn,
        buf: Vec::with_capacity(MAX_FILES_CHUNK),
        sent: 0,
        max: limits.max_bytes,
        failure: None,
        closed: false,
    };
    let mut builder = Builder::new(&mut sink);
    let mut walk = Walk { entries: 0, limits };
    let archived = match (file_type(&st), top) {
        (SFlag::S_IFREG, Some(name)) => {
            walk.file(&mut builder, &name, std::fs::File::from(fd), &st)
        }
        (SFlag::S_IFDIR, top) => walk.tree(&mut builder, fd, top, &st),
        _ => Err(FilesError::NotCopyable(path.to_owned())),
    };
    if let Err(e) = archived {
        // Dropping the builder would write the end of the archive: nothing more goes out.
        builder.get_mut().close();
        return Err(e);
    }
    if let Err(e) = builder.into_inner() {
        return Err(sink.failure.take().unwrap_or(FilesError::Write(e)));
    }
    sink.flush_rest()?;
    Ok(Transfer {
        bytes: sink.sent,
        entries: walk.entries,
    })
}

fn file_type(st: &FileStat) -> SFlag {
    SFlag::from_bits_truncate(st.st_mode) & SFlag::S_IFMT
}

/// The tar stream's way out: `Chunk`s of [`MAX_FILES_CHUNK`] bytes, capped in total.
struct ChunkSink<'a, S> {
    conn: &'a mut Conn<S>,
    buf: Vec<u8>,
    sent: u64,
    max: u64,
    /// Why writing failed; later writes fail too.
    failure: Option<FilesError>,
    /// Set on failure paths: writes fail, so that nothing follows an error.
    closed: bool,
}

impl<S: Read + Write> ChunkSink<'_, S> {
    fn send(&mut self, data: Vec<u8>) -> Result<(), FilesError> {
        self.conn.send(&FilesReply::Chunk { data })
    }

    /// Sends what is buffered.
    fn flush_rest(&mut self) -> Result<(), FilesError> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let data = std::mem::take(&mut self.buf);
        self.send(data)
    }
}

/// A tar stream's way out that remembers why it failed.
trait Sink: Write {
    /// Why writing failed, if the sink itself failed.
    fn take_failure(&mut self) -> Option<FilesError>;
    /// Makes every later write fail.
    fn close(&mut self);
}

impl<S: Read + Write> Sink for ChunkSink<'_, S> {
    fn take_failure(&mut self) -> Option<FilesError> {
        self.failure.take()
    }

    fn close(&mut self) {
        self.closed = true;
    }
}

impl<T: Sink + ?Sized> Sink for &mut T {
    fn take_failure(&mut self) -> Option<FilesError> {
        (**self).take_failure()
    }

    fn close(&mut self) {
        (**self).close();
    }
}

impl<S: Read + Write> Write for ChunkSink<'_, S> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.closed || self.failure.is_some() {
            return Err(io::Error::other("the get's stream is closed"));
        }
        if self.sent + data.len() as u64 > self.max {
            self.failure = Some(FilesError::TooLarge { max: self.max });
            return Err(io::Error::other("the get's stream is over the cap"));
        }
        self.sent += data.len() as u64;
        self.buf.extend_from_slice(data);
        while self.buf.len() >= MAX_FILES_CHUNK {
            let rest = self.buf.split_off(MAX_FILES_CHUNK);
            let full = std::mem::replace(&mut self.buf, rest);
            if let Err(e) = self.send(full) {
                self.failure = Some(e);
                return Err(io::Error::other("cannot send to the host"));
            }
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Reads exactly `left` bytes: what the file holds, then zeros if it shrank.
struct ExactReader<R> {
    inner: R,
    left: u64,
}

impl<R: Read> Read for ExactReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        if want == 0 {
            return Ok(0);
        }
        let mut n = self.inner.read(&mut buf[..want])?;
        if n == 0 {
            buf[..want].fill(0);
            n = want;
        }
        self.left -= n as u64;
        Ok(n)
    }
}

/// A header for `st` of the given type: mode, owner and time from the file, size 0.
fn header(st: &FileStat, kind: EntryType) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(st.st_mode & 0o7777);
    h.set_uid(u64::from(st.st_uid));
    h.set_gid(u64::from(st.st_gid));
    h.set_mtime(u64::try_from(st.st_mtime).unwrap_or(0));
    h.set_size(0);
    h
}

/// One open folder of the walk and the names in it still to visit.
struct Frame {
    fd: OwnedFd,
    rel: PathBuf,
    names: std::vec::IntoIter<OsString>,
}

/// The walk of a `Get`: counts entries against the cap.
struct Walk<'l> {
    entries: u64,
    limits: &'l Limits,
}

impl Walk<'_> {
    fn count(&mut self) -> Result<(), FilesError> {
        self.entries += 1;
        if self.entries > self.limits.max_entries {
            return Err(FilesError::TooManyEntries {
                max: self.limits.max_entries,
            });
        }
        Ok(())
    }

    /// Appends with `append`, telling a failure of the sink from one of the file (after
    /// which the sink is closed: the archive is cut in the middle of an entry).
    fn append<W: Sink>(
        &mut self,
        b: &mut Builder<W>,
        rel: &Path,
        append: impl FnOnce(&mut Builder<W>) -> io::Result<()>,
    ) -> Result<(), FilesError> {
        self.count()?;
        append(b).map_err(|e| match b.get_mut().take_failure() {
            Some(failure) => failure,
            None => {
                b.get_mut().close();
                FilesError::Entry {
                    path: rel.display().to_string(),
                    source: errno_of(&e),
                }
            }
        })
    }

    fn file<W: Sink>(
        &mut self,
        b: &mut Builder<W>,
        rel: &Path,
        file: std::fs::File,
        st: &FileStat,
    ) -> Result<(), FilesError> {
        let size = u64::try_from(st.st_size).unwrap_or(0);
        let mut h = header(st, EntryType::Regular);
        h.set_size(size);
        let data = ExactReader {
            inner: file,
            left: size,
        };
        self.append(b, rel, |b| b.append_data(&mut h, rel, data))
    }

    fn dir<W: Sink>(
        &mut self,
        b: &mut Builder<W>,
        rel: &Path,
        st: &FileStat,
    ) -> Result<(), FilesError> {
        let mut h = header(st, EntryType::Directory);
        self.append(b, rel, |b| b.append_data(&mut h, rel, io::empty()))
    }

    /// The names in the folder `fd`, sorted; at most the entry cap of them.
    fn list(&self, fd: &OwnedFd, rel: &Path) -> Result<Vec<OsString>, FilesError> {
        let err = |e: io::Error| FilesError::Entry {
            path: rel.display().to_string(),
            source: errno_of(&e),
        };
        // The folder is read through its descriptor, never its path.
        let listing =
            std::fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd())).map_err(err)?;
        let mut names = Vec::new();
        for entry in listing {
            names.push(entry.map_err(err)?.file_name());
            if names.len() as u64 > self.limits.max_entries {
                return Err(FilesError::TooManyEntries {
                    max: self.limits.max_entries,
                });
            }
        }
        names.sort();
        Ok(names)
    }

    /// Archives the folder `fd` (its own entry named `top`, none for the root) and everything
    /// below it.
    fn tree<W: Sink>(
        &mut self,
        b: &mut Builder<W>,
        fd: OwnedFd,
        top: Option<PathBuf>,
        st: &FileStat,
    ) -> Result<(), FilesError> {
        let rel = top.unwrap_or_default();
        if !rel.as_os_str().is_empty() {
            self.dir(b, &rel, st)?;
        }
        let names = self.list(&fd, &rel)?.into_iter();
        let mut stack = vec![Frame { fd, rel, names }];
        while let Some(frame) = stack.last_mut() {
            let Some(name) = frame.names.next() else {
                stack.pop();
                continue;
            };
            let rel = frame.rel.join(&name);
            let entry_err = |source| FilesError::Entry {
                path: rel.display().to_string(),
                source,
            };
            let parent = frame.fd.as_fd();
            let st = match fstatat(parent, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
                Ok(st) => st,
                // Gone since the listing.
                Err(Errno::ENOENT) => continue,
                Err(e) => return Err(entry_err(e)),
            };
            match file_type(&st) {
                SFlag::S_IFDIR => {
                    let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
                    let child = match open_beneath(parent, Path::new(&name), flags, Mode::empty()) {
                        Ok(fd) => fd,
                        // A mount point (EXDEV), or swapped for a link or removed since.
                        Err(Errno::EXDEV | Errno::ELOOP | Errno::ENOENT | Errno::ENOTDIR) => {
                            tracing::debug!(path = %rel.display(), "files: skipped");
                            continue;
                        }
                        Err(e) => return Err(entry_err(e)),
                    };
                    if stack.len() >= self.limits.max_depth {
                        return Err(FilesError::TooDeep {
                            path: rel.display().to_string(),
                            max: self.limits.max_depth,
                        });
                    }
                    let st = fstat(child.as_fd()).map_err(entry_err)?;
                    self.dir(b, &rel, &st)?;
                    let names = self.list(&child, &rel)?.into_iter();
                    stack.push(Frame {
                        fd: child,
                        rel,
                        names,
                    });
                }
                SFlag::S_IFREG => {
                    let flags = OFlag::O_RDONLY | OFlag::O_NONBLOCK | OFlag::O_NOCTTY;
                    let file = match open_beneath(parent, Path::new(&name), flags, Mode::empty()) {
                        Ok(fd) => fd,
                        Err(Errno::ELOOP | Errno::ENOENT | Errno::EXDEV) => continue,
                        Err(e) => return Err(entry_err(e)),
                    };
                    // The type of what was opened, not of what was looked at before.
                    let st = fstat(file.as_fd()).map_err(entry_err)?;
                    if file_type(&st) != SFlag::S_IFREG {
                        continue;
                    }
                    self.file(b, &rel, std::fs::File::from(file), &st)?;
                }
                SFlag::S_IFLNK => {
                    let target = match readlinkat(parent, name.as_os_str()) {
                        Ok(t) => t,
                        Err(Errno::ENOENT | Errno::EINVAL) => continue,
                        Err(e) => return Err(entry_err(e)),
                    };
                    let mut h = header(&st, EntryType::Symlink);
                    self.append(b, &rel, |b| b.append_link(&mut h, &rel, &target))?;
                }
                _ => tracing::debug!(path = %rel.display(), "files: special file skipped"),
            }
        }
        Ok(())
    }
}

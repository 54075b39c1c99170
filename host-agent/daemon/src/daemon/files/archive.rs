//! Tar streams on the host side of a copy: the plumbing between async tasks and the blocking
//! threads that parse and write tar, the header rules of what the daemon sends, and the
//! [`sanitize`] pass over an archive a guest sent.
//!
//! A guest's archive is never passed on as it came. [`sanitize`] parses it entry by entry
//! (`tar` in raw mode: GNU long names and links are read here, capped at [`MAX_NAME`]; PAX
//! headers are refused, the sidecar writes none) and writes a new archive that holds only
//! folders, regular files and symlinks, with relative names of normal components. It refuses
//! what could hurt whoever unpacks it: `..` and absolute names, device nodes, FIFOs, hard
//! links, sparse files, a name given twice, an entry below a symlink or a file of the same
//! archive, and archives over the entry and depth caps. Modes lose their set-id and sticky bits.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use axum::body::Bytes;
use nanoclaw_image::layer::clean_path;
use tar::{Builder, EntryType, Header};
use tokio::sync::mpsc;

/// The longest name or symlink target accepted, in bytes (Linux's `PATH_MAX`).
pub const MAX_NAME: u64 = 4096;
/// The most bytes of names the duplicate check keeps for one archive.
const MAX_NAME_BYTES: usize = 64 << 20;
/// The size of the pieces a [`ChannelWriter`] sends.
const PIECE: usize = 64 * 1024;

/// One piece of a tar stream between a task and a thread; an error ends the stream unfinished.
pub type Piece = Result<Bytes, io::Error>;

/// Errors of [`sanitize`]: the archive a guest sent is malformed or hostile, or the stream
/// broke.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// Reading the guest's archive failed (the guest's error or a malformed stream).
    #[error("reading the guest's archive")]
    Read(#[source] io::Error),
    /// Writing the new archive failed (the client went away).
    #[error("writing the archive")]
    Write(#[source] io::Error),
    /// A header field cannot be read.
    #[error("entry {path:?}: bad header")]
    Header {
        /// The entry's name.
        path: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A name or link target is longer than [`MAX_NAME`].
    #[error("entry {path:?}: a name or link target over {MAX_NAME} bytes")]
    NameTooLong {
        /// The entry's name (cut).
        path: String,
    },
    /// The name is absolute, has `..`, or names the archive's root.
    #[error("entry {path:?}: {reason}")]
    BadName {
        /// The entry's name.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry of a type that is not copied.
    #[error("entry {path:?} is a {what}, which is not copied")]
    Unsupported {
        /// The entry's name.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// The same name twice.
    #[error("entry {path:?} comes twice")]
    Duplicate {
        /// The entry's name.
        path: String,
    },
    /// An entry below a symlink or a file of the archive.
    #[error("entry {path:?} is below a {what} of the archive")]
    Below {
        /// The entry's name.
        path: String,
        /// `symlink` or `file`.
        what: &'static str,
    },
    /// Folders nest deeper than the cap.
    #[error("entry {path:?} nests deeper than {max} folders")]
    TooDeep {
        /// The entry's name.
        path: String,
        /// The cap.
        max: usize,
    },
    /// More entries than the cap.
    #[error("the archive has more than {max} entries")]
    TooManyEntries {
        /// The cap.
        max: u64,
    },
    /// The names add up to more than the duplicate check keeps.
    #[error("the archive's names add up to more than {MAX_NAME_BYTES} bytes")]
    NamesTooLarge,
}

/// The caps of one archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most entries.
    pub max_entries: u64,
    /// The deepest nesting, in components of an entry's name.
    pub max_depth: usize,
}

/// A tar stream read from a channel that an async task fills. A closed channel is the end of
/// the stream; an error item is an error of every later read.
#[derive(Debug)]
pub struct ChannelReader {
    rx: mpsc::Receiver<Piece>,
    current: Bytes,
    failed: Option<io::ErrorKind>,
}

impl ChannelReader {
    /// Reads what `rx` brings. Blocks: use it on a blocking thread.
    pub fn new(rx: mpsc::Receiver<Piece>) -> Self {
        Self {
            rx,
            current: Bytes::new(),
            failed: None,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            if let Some(kind) = self.failed {
                return Err(io::Error::new(kind, "the stream failed"));
            }
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => {
                    self.failed = Some(e.kind());
                    return Err(e);
                }
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

/// A tar stream written into a channel that an async task drains, in pieces of 64 KiB. Once
/// [`ChannelWriter::close`]d, writes fail: a dropped [`Builder`] then cannot end an archive
/// that failed halfway as if it were whole.
#[derive(Debug)]
pub struct ChannelWriter {
    tx: mpsc::Sender<Piece>,
    buf: Vec<u8>,
    written: u64,
    closed: bool,
}

impl ChannelWriter {
    /// Writes into `tx`. Blocks: use it on a blocking thread.
    pub fn new(tx: mpsc::Sender<Piece>) -> Self {
        Self {
            tx,
            buf: Vec::with_capacity(PIECE),
            written: 0,
            closed: false,
        }
    }

    /// The bytes written so far.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Makes every later write fail.
    pub fn close(&mut self) {
        self.closed = true;
        self.buf.clear();
    }

    /// Ends the stream unfinished: the reader sees `e` after what was sent.
    pub fn fail(mut self, e: io::Error) {
        self.close();
        let _ = self.tx.blocking_send(Err(e));
    }

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the reader went away"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream is closed",
            ));
        }
        let n = data.len().min(PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.written += n as u64;
        if self.buf.len() == PIECE {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the stream is closed",
            ));
        }
        self.send_buf()
    }
}

/// What the daemon writes for one entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// The permission bits (set-id and sticky bits are dropped).
    pub mode: u32,
    /// The owner, as the guest has it.
    pub uid: u64,
    /// The group, as the guest has it.
    pub gid: u64,
    /// The modification time, in seconds since the epoch.
    pub mtime: u64,
}

/// A GNU header of `kind` with `meta` and `size`.
pub fn header(kind: EntryType, meta: Meta, size: u64) -> Header {
    let mut h = Header::new_gnu();
    h.set_entry_type(kind);
    h.set_mode(if kind == EntryType::Symlink {
        0o777
    } else {
        meta.mode & 0o777
    });
    h.set_uid(meta.uid);
    h.set_gid(meta.gid);
    h.set_mtime(meta.mtime);
    h.set_size(size);
    h
}

/// The kinds of entry an archive from the daemon holds, for the tree checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    File,
    Symlink,
}

/// The names seen so far in one archive: a name comes once, and nothing comes below a file or
/// a symlink.
#[derive(Debug, Default)]
struct Names {
    seen: HashMap<PathBuf, Kind>,
    bytes: usize,
}

impl Names {
    fn admit(&mut self, rel: &Path, kind: Kind) -> Result<(), ArchiveError> {
        let shown = || rel.display().to_string();
        for ancestor in rel.ancestors().skip(1) {
            match self.seen.get(ancestor) {
                Some(Kind::Symlink) => {
                    return Err(ArchiveError::Below {
                        path: shown(),
                        what: "symlink",
                    });
                }
                Some(Kind::File) => {
                    return Err(ArchiveError::Below {
                        path: shown(),
                        what: "file",
                    });
                }
                Some(Kind::Dir) | None => {}
            }
        }
        self.bytes += rel.as_os_str().len();
        if self.bytes > MAX_NAME_BYTES {
            return Err(ArchiveError::NamesTooLarge);
        }
        if self.seen.insert(rel.to_owned(), kind).is_some() {
            return Err(ArchiveError::Duplicate { path: shown() });
        }
        Ok(())
    }
}

/// A name for messages: lossy, cut to 256 bytes.
fn shown(raw: &[u8]) -> String {
    String::from_utf8_lossy(&raw[..raw.len().min(256)]).into_owned()
}

/// Reads a GNU long name or link entry: at most [`MAX_NAME`] bytes, trailing NULs dropped.
fn read_long(entry: &mut impl Read, size: u64, path: &[u8]) -> Result<Vec<u8>, ArchiveError> {
    if size > MAX_NAME + 1 {
        return Err(ArchiveError::NameTooLong { path: shown(path) });
    }
    let mut data = Vec::new();
    entry
        .take(MAX_NAME + 1)
        .read_to_end(&mut data)
        .map_err(ArchiveError::Read)?;
    while data.last() == Some(&0) {
        data.pop();
    }
    Ok(data)
}

/// Checks a name and makes it a relative path of normal components.
fn relative(raw: &[u8], limits: &Limits) -> Result<PathBuf, ArchiveError> {
    let bad = |reason| ArchiveError::BadName {
        path: shown(raw),
        reason,
    };
    if raw.len() as u64 > MAX_NAME {
        return Err(ArchiveError::NameTooLong { path: shown(raw) });
    }
    let rel = clean_path(Path::new(OsStr::from_bytes(raw)))
        .map_err(|_| bad("is absolute or has a `..` component"))?;
    if rel.as_os_str().is_empty() {
        return Err(bad("names the archive's root"));
    }
    if rel.components().count() > limits.max_depth {
        return Err(ArchiveError::TooDeep {
            path: shown(raw),
            max: limits.max_depth,
        });
    }
    Ok(rel)
}

/// Re-writes the archive read from `input` into `out` (see the module doc), and reads `input`
/// to its end (a guest's error after the archive's last entry is still an error). Answers the
/// number of entries. On an error `out` is [`ChannelWriter::close`]d, so that nothing after
/// the error looks like the end of a whole archive.
pub fn sanitize<R: Read>(
    input: R,
    out: &mut ChannelWriter,
    limits: &Limits,
) -> Result<u64, ArchiveError> {
    let mut builder = Builder::new(&mut *out);
    let result = copy_entries(input, &mut builder, limits);
    match result {
        Ok(entries) => {
            builder.into_inner().map_err(ArchiveError::Write)?;
            out.flush().map_err(ArchiveError::Write)?;
            Ok(entries)
        }
        Err(e) => {
            builder.get_mut().close();
            drop(builder);
            Err(e)
        }
    }
}

fn copy_entries<R: Read, W: Write>(
    input: R,
    builder: &mut Builder<W>,
    limits: &Limits,
) -> Result<u64, ArchiveError> {
    let mut archive = tar::Archive::new(input);
    let mut names = Names::default();
    let mut count = 0u64;
    {
        let entries = archive.entries().map_err(ArchiveError::Read)?.raw(true);
        let (mut long_name, mut long_link) = (None, None);
        for entry in entries {
            let mut entry = entry.map_err(ArchiveError::Read)?;
            let kind = entry.header().entry_type();
            let raw_path = entry.header().path_bytes().into_owned();
            let size = entry.size();
            match kind {
                EntryType::GNULongName => {
                    long_name = Some(read_long(&mut entry, size, &raw_path)?);
                    continue;
                }
                EntryType::GNULongLink => {
                    long_link = Some(read_long(&mut entry, size, &raw_path)?);
                    continue;
                }
                _ => {}
            }
            let raw_path = long_name.take().unwrap_or(raw_path);
            let link = long_link
                .take()
                .or_else(|| entry.header().link_name_bytes().map(|l| l.into_owned()));
            count += 1;
            if count > limits.max_entries {
                return Err(ArchiveError::TooManyEntries {
                    max: limits.max_entries,
                });
            }
            let what = match kind {
                EntryType::Directory => Kind::Dir,
                EntryType::Regular | EntryType::Continuous => Kind::File,
                EntryType::Symlink => Kind::Symlink,
                other => {
                    return Err(ArchiveError::Unsupported {
                        path: shown(&raw_path),
                        what: kind_name(other),
                    });
                }
            };
            let rel = relative(&raw_path, limits)?;
            names.admit(&rel, what)?;
            let h = entry.header();
            let header_err = |source| ArchiveError::Header {
                path: shown(&raw_path),
                source,
            };
            // Owners and times only inform whoever unpacks as root; a field that does not
            // parse is 0.
            let meta = Meta {
                mode: h.mode().map_err(header_err)?,
                uid: h.uid().unwrap_or(0),
                gid: h.gid().unwrap_or(0),
                mtime: h.mtime().unwrap_or(0),
            };
            match what {
                Kind::Dir => {
                    let mut out = header(EntryType::Directory, meta, 0);
                    builder
                        .append_data(&mut out, &rel, io::empty())
                        .map_err(ArchiveError::Write)?;
                }
                Kind::File => {
                    let mut out = header(EntryType::Regular, meta, size);
                    // The entry reads exactly `size` bytes or fails; a short archive is an
                    // error of the input, told apart from one of the output below.
                    let mut data = ExactRead::new(&mut entry, size);
                    let appended = builder.append_data(&mut out, &rel, &mut data);
                    if let Some(e) = data.take_failure() {
                        return Err(ArchiveError::Read(e));
                    }
                    appended.map_err(ArchiveError::Write)?;
                }
                Kind::Symlink => {
                    let target =
                        link.filter(|l| !l.is_empty())
                            .ok_or_else(|| ArchiveError::BadName {
                                path: shown(&raw_path),
                                reason: "is a symlink without a target",
                            })?;
                    if target.len() as u64 >= MAX_NAME {
                        return Err(ArchiveError::NameTooLong {
                            path: shown(&raw_path),
                        });
                    }
                    let mut out = header(EntryType::Symlink, meta, 0);
                    builder
                        .append_link(&mut out, &rel, OsStr::from_bytes(&target))
                        .map_err(ArchiveError::Write)?;
                }
            }
        }
    }
    // The end-of-archive blocks and anything after them, up to the end of the stream.
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(ArchiveError::Read)?;
    Ok(count)
}

/// Reads exactly `size` bytes of a file for an entry: a read error or an early end fails the
/// read and is kept, so that the caller can tell it from an error of the archive's writer.
#[derive(Debug)]
pub struct ExactRead<R> {
    inner: R,
    left: u64,
    failure: Option<io::Error>,
}

impl<R> ExactRead<R> {
    /// Reads `size` bytes of `inner`.
    pub fn new(inner: R, size: u64) -> Self {
        Self {
            inner,
            left: size,
            failure: None,
        }
    }

    /// Why reading failed, if it did.
    pub fn take_failure(&mut self) -> Option<io::Error> {
        self.failure.take()
    }
}

impl<R: Read> Read for ExactRead<R> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = out
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        let result = match self.inner.read(&mut out[..want]) {
            Ok(0) => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the input ends inside a file",
            )),
            other => other,
        };
        match result {
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) => {
                let kind = e.kind();
                self.failure = Some(e);
                Err(io::Error::new(kind, "reading the archive failed"))
            }
        }
    }
}

/// A short name of an entry type that is not copied.
fn kind_name(kind: EntryType) -> &'static str {
    match kind {
        EntryType::Link => "hard link",
        EntryType::Char => "character device",
        EntryType::Block => "block device",
        EntryType::Fifo => "FIFO",
        EntryType::GNUSparse => "sparse file",
        EntryType::XHeader | EntryType::XGlobalHeader => "PAX header",
        _ => "entry of an unknown type",
    }
}

//! The file copy server: tar streams in and out of the agent's image root, on vsock
//! [`FILES_PORT`].
//!
//! The host connects into the guest; each connection carries one transfer of
//! [`shared_proto::files`] (see there for the message flow): `Put` unpacks a tar stream under a
//! directory of the agent's root ([`put`]), `Get` sends a tar of a file or folder of it
//! ([`get`]). Connections are served one at a time, each with an idle timeout
//! ([`IDLE_TIMEOUT`]) so that a silent host cannot hold the channel. Before the agent's root
//! is built (or when the agent has none) every request is answered `NotReady`.
//!
//! # Safety of the paths
//!
//! The sidecar is root and works from outside the agent's chroot, on files the agent can change
//! while the transfer runs. So:
//!
//! - `dest` and `path` resolve inside the root with `openat2(RESOLVE_IN_ROOT |
//!   RESOLVE_NO_MAGICLINKS | RESOLVE_NO_XDEV)` ([`crate::rootfs::RootDir`]): symlinks resolve
//!   as they would for the agent, never out of the root, and never onto another mount, so
//!   `/proc`, `/sys`, `/dev` and `/tmp` of the agent are out of the channel's reach; only the
//!   root file system (the overlay on the disks) is.
//! - Below that, every step is one name opened with `RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS`
//!   from a directory descriptor already held, so a symlink swapped in by the agent fails the
//!   step instead of redirecting it.
//! - `Put` refuses absolute entries and `..`, device nodes, FIFOs, hard links and sparse files;
//!   it replaces an existing file by unlinking it and creating a new one (`O_EXCL`), so a hard
//!   link the agent planted is never written through; what it creates belongs to the agent,
//!   with at most mode 0777. GNU long names and PAX headers are read by the sidecar itself,
//!   each capped at [`put::MAX_EXTENSION`].
//! - `Get` archives regular files, directories and symlinks (as links, not followed); it
//!   skips other nodes and does not descend into mount points.
//! - The tar stream is capped in bytes, entries and depth ([`Limits`]); a full disk is an error
//!   reply (`NoSpace`), as every failure is.
//!
//! Transfers are not atomic: the entries unpacked before a failure stay.
//!
//! [`FILES_PORT`]: shared_proto::ports::FILES_PORT

pub mod get;
pub mod put;

use std::io::{self, ErrorKind, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::OnceLock;
use std::time::Duration;

use nix::errno::Errno;
use shared_proto::files::{
    FilesDecoder, FilesErrorKind, FilesReply, FilesRequest, FilesWireError, MAX_FILES_CHUNK,
    encode_files_message,
};

use crate::rootfs::PreparedRoot;
use crate::vsock::{VsockListener, VsockStream};
use crate::{ErrorChain, HalfClose};

/// How long a connection may stay silent (in either direction) before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// The most bytes of a failed `Put` read and discarded after the error reply, so that a host
/// still sending sees the reply instead of a reset connection.
pub const DRAIN_LIMIT: u64 = 16 << 20;

/// The pause after a failed accept.
const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// The caps of one transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The most bytes of tar stream, received or sent.
    pub max_bytes: u64,
    /// The most archive entries.
    pub max_entries: u64,
    /// The deepest folder nesting below `dest` or `path`.
    pub max_depth: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_bytes: 2 << 30,
            max_entries: 100_000,
            max_depth: 128,
        }
    }
}

/// Errors of a transfer; each is sent to the host as a [`FilesReply::Error`] of its
/// [`FilesError::kind`] when the connection still works.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The host sent bytes that are not a valid message.
    #[error("bad message from the host")]
    Wire(#[source] FilesWireError),
    /// A message came where another was expected.
    #[error("unexpected {got} {during}")]
    OutOfOrder {
        /// What came.
        got: &'static str,
        /// Where in the transfer.
        during: &'static str,
    },
    /// Reading from the host failed.
    #[error("cannot read from the host")]
    Read(#[source] io::Error),
    /// Writing to the host failed.
    #[error("cannot write to the host")]
    Write(#[source] io::Error),
    /// The host stopped sending before the transfer was whole.
    #[error("the host closed the connection {0}")]
    Closed(&'static str),
    /// Encoding a reply failed.
    #[error("cannot encode a reply")]
    Encode(#[source] FilesWireError),
    /// There is no agent root to copy into or out of.
    #[error("no agent root: {0}")]
    NotReady(&'static str),
    /// `dest` or `path` cannot be opened.
    #[error("cannot open {path}")]
    Path {
        /// The path, as the agent sees it.
        path: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// An archive entry cannot be unpacked or archived.
    #[error("entry {path}")]
    Entry {
        /// The entry's path in the archive.
        path: String,
        /// The cause.
        #[source]
        source: Errno,
    },
    /// An entry's path is absolute or has a `..` component.
    #[error("entry {path} {reason}")]
    EntryPath {
        /// The entry's path.
        path: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// An entry of a type the channel does not carry.
    #[error("entry {path} is a {what}, which is not copied")]
    Unsupported {
        /// The entry's path.
        path: String,
        /// What it is.
        what: &'static str,
    },
    /// The path is not a regular file, directory or symlink.
    #[error("{0} is neither a file nor a folder")]
    NotCopyable(String),
    /// Folders nest deeper than [`Limits::max_depth`].
    #[error("entry {path} nests deeper than {max} folders")]
    TooDeep {
        /// The entry's path.
        path: String,
        /// The cap.
        max: usize,
    },
    /// The tar stream is over [`Limits::max_bytes`].
    #[error("the tar stream is over the {max}-byte cap")]
    TooLarge {
        /// The cap.
        max: u64,
    },
    /// The archive has more than [`Limits::max_entries`] entries.
    #[error("the archive has more than {max} entries")]
    TooManyEntries {
        /// The cap.
        max: u64,
    },
    /// The tar stream is malformed.
    #[error("malformed tar stream")]
    Archive(#[source] io::Error),
}

/// The reply kind of a file system error.
fn errno_kind(e: Errno) -> FilesErrorKind {
    match e {
        Errno::ENOENT | Errno::ENOTDIR => FilesErrorKind::NotFound,
        Errno::ELOOP | Errno::EXDEV => FilesErrorKind::Refused,
        Errno::EACCES | Errno::EPERM | Errno::EROFS => FilesErrorKind::PermissionDenied,
        Errno::ENOSPC | Errno::EDQUOT => FilesErrorKind::NoSpace,
        _ => FilesErrorKind::Io,
    }
}

/// The errno of an I/O error, `EIO` when it has none.
pub(crate) fn errno_of(e: &io::Error) -> Errno {
    Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO))
}

impl FilesError {
    /// The kind the host is told.
    pub fn kind(&self) -> FilesErrorKind {
        match self {
            Self::Wire(_) | Self::OutOfOrder { .. } | Self::Archive(_) => {
                FilesErrorKind::BadRequest
            }
            Self::Read(_) | Self::Write(_) | Self::Closed(_) | Self::Encode(_) => {
                FilesErrorKind::Io
            }
            Self::NotReady(_) => FilesErrorKind::NotReady,
            Self::Path { source, .. } | Self::Entry { source, .. } => errno_kind(*source),
            Self::EntryPath { .. } => FilesErrorKind::Refused,
            Self::Unsupported { .. } | Self::NotCopyable(_) | Self::TooDeep { .. } => {
                FilesErrorKind::Unsupported
            }
            Self::TooLarge { .. } => FilesErrorKind::TooLarge,
            Self::TooManyEntries { .. } => FilesErrorKind::TooManyEntries,
        }
    }

    /// Whether the connection can still carry a reply.
    fn can_reply(&self) -> bool {
        !matches!(self, Self::Write(_) | Self::Read(_) | Self::Encode(_))
    }
}

/// One connection: the host's requests in, the sidecar's replies out.
#[derive(Debug)]
pub struct Conn<S> {
    stream: S,
    decoder: FilesDecoder<FilesRequest>,
    buf: Vec<u8>,
}

impl<S: Read + Write> Conn<S> {
    /// A connection over `stream`.
    pub fn new(stream: S) -> Self {
        Self {
            stream,
            decoder: FilesDecoder::new(),
            buf: vec![0; MAX_FILES_CHUNK],
        }
    }

    /// The next request; `None` when the host closed its side.
    pub fn next_request(&mut self) -> Result<Option<FilesRequest>, FilesError> {
        loop {
            if let Some(msg) = self.decoder.decode_next().map_err(FilesError::Wire)? {
                return Ok(Some(msg));
            }
            let n = match self.stream.read(&mut self.buf) {
                Ok(0) => return Ok(None),
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(FilesError::Read(e)),
            };
            self.decoder.push(&self.buf[..n]);
        }
    }

    /// Sends one reply.
    pub fn send(&mut self, reply: &FilesReply) -> Result<(), FilesError> {
        let frame = encode_files_message(reply).map_err(FilesError::Encode)?;
        self.stream.write_all(&frame).map_err(FilesError::Write)?;
        self.stream.flush().map_err(FilesError::Write)
    }

    /// Reads and discards a failed `Put`'s remaining chunks until `End`, EOF, an error or
    /// [`DRAIN_LIMIT`] bytes.
    fn drain(&mut self) {
        let mut drained = 0u64;
        while drained < DRAIN_LIMIT {
            match self.next_request() {
                Ok(Some(FilesRequest::Chunk { data })) => drained += data.len() as u64,
                _ => return,
            }
        }
    }
}

/// What one connection did.
#[derive(Debug, PartialEq, Eq)]
pub struct Transfer {
    /// The tar stream's length.
    pub bytes: u64,
    /// The archive's entries.
    pub entries: u64,
}

/// Serves one connection: one request, its transfer and the final reply, then closes the write
/// side. `root` is the agent's root when it is built.
pub fn handle<S: Read + Write + HalfClose>(
    stream: S,
    root: Option<&PreparedRoot>,
    limits: &Limits,
) -> Result<Transfer, FilesError> {
    let mut conn = Conn::new(stream);
    let mut receiving = false;
    let result = serve_request(&mut conn, root, limits, &mut receiving);
    match &result {
        Ok(t) => {
            let done = FilesReply::Done {
                bytes: t.bytes,
                entries: t.entries,
            };
            if let Err(e) = conn.send(&done) {
                tracing::warn!(error = %ErrorChain(&e), "files");
            }
        }
        Err(e) => {
            tracing::warn!(error = %ErrorChain(e), "files: transfer failed");
            if e.can_reply() {
                let reply = FilesReply::error(e.kind(), ErrorChain(e).to_string());
                let _ = conn.send(&reply);
            }
        }
    }
    let _ = conn.stream.shutdown_write();
    if result.is_err() && receiving {
        conn.drain();
    }
    result
}

/// Reads the request and runs its transfer. `receiving` is set while the host may still be
/// sending a `Put`'s stream.
fn serve_request<S: Read + Write>(
    conn: &mut Conn<S>,
    root: Option<&PreparedRoot>,
    limits: &Limits,
    receiving: &mut bool,
) -> Result<Transfer, FilesError> {
    let request = conn
        .next_request()?
        .ok_or(FilesError::Closed("before its request"))?;
    let during = "as the first message";
    match (request, root) {
        (FilesRequest::Chunk { .. }, _) => Err(FilesError::OutOfOrder {
            got: "chunk",
            during,
        }),
        (FilesRequest::End, _) => Err(FilesError::OutOfOrder { got: "end", during }),
        (_, None) => Err(FilesError::NotReady(
            "the agent has not been started in an image root",
        )),
        (FilesRequest::Put { dest }, Some(root)) => {
            let t = put::put(conn, root, &dest, limits, receiving)?;
            tracing::info!(%dest, bytes = t.bytes, entries = t.entries, "files: put");
            Ok(t)
        }
        (FilesRequest::Get { path }, Some(root)) => {
            let t = get::get(conn, root, &path, limits)?;
            tracing::info!(%path, bytes = t.bytes, entries = t.entries, "files: get");
            Ok(t)
        }
    }
}

/// A stream the file copy server can serve: it can half-close and time out.
pub trait FilesStream: Read + Write + HalfClose {
    /// Makes reads and writes that wait longer than `timeout` fail.
    fn set_idle_timeout(&self, timeout: Duration) -> io::Result<()>;
}

impl FilesStream for UnixStream {
    fn set_idle_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_read_timeout(Some(timeout))?;
        self.set_write_timeout(Some(timeout))
    }
}

impl FilesStream for VsockStream {
    fn set_idle_timeout(&self, timeout: Duration) -> io::Result<()> {
        self.set_timeouts(timeout).map_err(io::Error::from)
    }
}

/// Something that accepts file copy connections: a vsock listener in the guest, a Unix
/// listener in tests.
pub trait FilesListener {
    /// The accepted stream.
    type Stream: FilesStream;
    /// Waits for the next connection.
    fn accept_files(&self) -> io::Result<Self::Stream>;
}

impl FilesListener for VsockListener {
    type Stream = VsockStream;
    fn accept_files(&self) -> io::Result<VsockStream> {
        self.accept().map_err(io::Error::other)
    }
}

impl FilesListener for UnixListener {
    type Stream = UnixStream;
    fn accept_files(&self) -> io::Result<UnixStream> {
        self.accept().map(|(s, _)| s)
    }
}

/// Accepts connections forever and serves them one at a time (the next waits in the listen
/// backlog). `root` is filled in by the agent runner once the agent's root is built.
pub fn serve<L: FilesListener>(listener: &L, root: &OnceLock<PreparedRoot>, limits: &Limits) -> ! {
    loop {
        let stream = match listener.accept_files() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "files accept");
                std::thread::sleep(ACCEPT_RETRY);
                continue;
            }
        };
        if let Err(e) = stream.set_idle_timeout(IDLE_TIMEOUT) {
            tracing::warn!(error = %e, "files: cannot set the idle timeout; closing");
            continue;
        }
        // The outcome is logged and sent to the host by `handle`.
        let _ = handle(stream, root.get(), limits);
    }
}

#[cfg(test)]
mod tests;

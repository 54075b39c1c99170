//! `nanoclaw cp SRC DST`: copies a file or folder into or out of a VM. Exactly one side is
//! `ID:PATH`, `PATH` absolute in the VM; the other is a host path (write `./a:b` for a host
//! name with a colon). The destination is always a folder (made if missing, its parent must
//! exist), and the source lands in it under its own name, as `cp -r SRC DST/` would put it.
//!
//! - **In**: the host file or folder is packed as a tar stream while it is read
//!   ([`crate::copy_in::pack_into`]; symlinks stay links) and sent with
//!   `PUT /v1/vms/{id}/files?path=DST`. The VM must be running; what lands belongs to the agent.
//! - **Out**: `GET /v1/vms/{id}/files?path=SRC`, from a running VM or from an ended VM's
//!   writable disk. The archive is unpacked with the image store's layer rules
//!   ([`nanoclaw_image::layer::RootTree`]: no `..`, no absolute names, no writes through
//!   symlinks, no device nodes, bounded) into a fresh private folder inside `DST`; its entries
//!   become the invoking user's, folders keep their owner's `rwx`, and set-id bits go. Only a
//!   whole archive is kept: each top entry is then renamed into `DST` with `RENAME_NOREPLACE`,
//!   so nothing already in `DST` is overwritten or written through.

use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};

use http_body_util::BodyExt;
use hyper::Method;
use hyper::body::{Bytes, Frame};
use nanoclaw_api::{FilesCopied, VmStatus};
use nanoclaw_image::layer::{LayerError, RootTree};
use tar::{Builder, EntryType, Header};
use tokio::sync::mpsc;

use super::CliError;
use super::client::{Client, ClientError};

/// The most entries a copy out unpacks (the daemon's cap).
const MAX_ENTRIES: u64 = 100_000;
/// The prefix of the private folder a copy out unpacks into, inside the destination.
const STAGING_PREFIX: &str = ".nanoclaw-cp-";
/// Pieces of a stream queued between the HTTP task and the tar threads.
const QUEUE: usize = 8;

/// Errors of `nanoclaw cp`.
#[derive(Debug, thiserror::Error)]
pub enum CpError {
    /// Neither or both sides name a VM.
    #[error("exactly one of SRC and DST must be ID:PATH (a VM's id and an absolute path in it)")]
    Sides,
    /// The path in the VM breaks the rules.
    #[error("{spec:?}: the path in the VM {reason}")]
    GuestPath {
        /// The argument.
        spec: String,
        /// What is wrong.
        reason: &'static str,
    },
    /// The VM runs in the initramfs guest, which has no disk to copy into.
    #[error("VM {0} runs without an image; files can be copied only with an image VM")]
    NoImage(String),
    /// The VM is not running, so nothing can be unpacked in it.
    #[error("VM {id} is {status}; files can be copied into a running VM only")]
    NotRunning {
        /// The VM.
        id: String,
        /// Its status.
        status: &'static str,
    },
    /// The host source has no name to copy it under (`.`, `/`).
    #[error("cannot tell the name of {}: name the file or folder itself", .0.display())]
    NoName(PathBuf),
    /// The host source cannot be read.
    #[error("cannot read {}", .path.display())]
    Source {
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The destination folder cannot be made or opened.
    #[error("cannot use the destination folder {}", .path.display())]
    Dest {
        /// The folder.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The destination exists and is not a folder.
    #[error("{} exists and is not a folder", .0.display())]
    DestNotFolder(PathBuf),
    /// An entry of the copy already exists in the destination.
    #[error("{} already exists; nanoclaw cp does not overwrite (nothing was copied)", .0.display())]
    Exists(PathBuf),
    /// The private folder to unpack into cannot be made.
    #[error("cannot make a private folder in {}", .path.display())]
    Staging {
        /// The destination.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The daemon's archive holds what is not copied.
    #[error("the archive holds {path:?}, a {what}, which is not copied")]
    Unsupported {
        /// The entry.
        path: String,
        /// What it is.
        what: String,
    },
    /// The archive stream failed.
    #[error("the copy was cut short (the daemon's log says why)")]
    Cut(#[source] io::Error),
    /// Re-writing the archive failed.
    #[error("cannot read the archive")]
    Archive(#[source] io::Error),
    /// Unpacking refused an entry or failed.
    #[error("cannot unpack the files")]
    Unpack(#[source] LayerError),
    /// Moving an unpacked entry into the destination failed.
    #[error("cannot move {} into place", .path.display())]
    Move {
        /// Where it was going.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// A task failed.
    #[error("internal error: {0}")]
    Task(String),
    /// The daemon's answer does not parse.
    #[error("unexpected answer from the daemon")]
    Answer(#[source] serde_json::Error),
}

/// `nanoclaw cp`.
#[derive(Debug, clap::Args)]
pub struct CpArgs {
    /// What to copy: a host path, or ID:PATH in a VM.
    pub src: String,
    /// The folder it goes into: a host path, or ID:PATH in a VM.
    pub dst: String,
}

/// One side of a copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Side {
    /// A path on this host.
    Host(PathBuf),
    /// An absolute path in a VM.
    Vm {
        /// The VM.
        id: String,
        /// The path in it.
        path: String,
    },
}

impl Side {
    /// `ID:PATH` when the part before the first colon is a VM id (letters, digits, `-`, `_`),
    /// else a host path. A VM path must be absolute without `.` or `..` components.
    pub fn parse(spec: &str) -> Result<Self, CpError> {
        let Some((id, path)) = spec.split_once(':') else {
            return Ok(Self::Host(PathBuf::from(spec)));
        };
        let is_id = !id.is_empty()
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if !is_id {
            return Ok(Self::Host(PathBuf::from(spec)));
        }
        let bad = |reason| CpError::GuestPath {
            spec: spec.to_owned(),
            reason,
        };
        if !path.starts_with('/') {
            return Err(bad("must be absolute"));
        }
        if path.split('/').any(|c| c == "." || c == "..") {
            return Err(bad("must not have . or .. components"));
        }
        if path.contains('\0') {
            return Err(bad("must not hold a NUL byte"));
        }
        Ok(Self::Vm {
            id: id.to_owned(),
            path: path.to_owned(),
        })
    }
}

/// Runs `nanoclaw cp`.
pub async fn run(client: &Client, args: CpArgs) -> Result<u8, CliError> {
    match (Side::parse(&args.src)?, Side::parse(&args.dst)?) {
        (Side::Host(host), Side::Vm { id, path }) => copy_in(client, &host, &id, &path).await,
        (Side::Vm { id, path }, Side::Host(host)) => copy_out(client, &id, &path, &host).await,
        _ => Err(CpError::Sides.into()),
    }?;
    Ok(0)
}

/// The query string value of `path`: everything but unreserved characters and `/` escaped.
fn query_value(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for b in path.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn files_url(id: &str, path: &str) -> String {
    format!("/v1/vms/{id}/files?path={}", query_value(path))
}

/// A request body fed from a channel.
#[derive(Debug)]
struct ChannelBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|piece| piece.map(|r| r.map(Frame::data)))
    }
}

/// A writer that sends what it is given into a channel, in pieces of 64 KiB.
struct ChannelWriter {
    tx: mpsc::Sender<Result<Bytes, io::Error>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    const PIECE: usize = 64 * 1024;

    fn send_buf(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = std::mem::replace(&mut self.buf, Vec::with_capacity(Self::PIECE));
        self.tx
            .blocking_send(Ok(Bytes::from(piece)))
            .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "the daemon stopped reading"))
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(Self::PIECE - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == Self::PIECE {
            self.send_buf()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send_buf()
    }
}

/// A reader of what a channel brings; an error item fails the read.
struct ChannelReader {
    rx: mpsc::Receiver<Result<Bytes, io::Error>>,
    current: Bytes,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

fn join_error(e: tokio::task::JoinError) -> CliError {
    CpError::Task(e.to_string()).into()
}

/// Packs `host` while it is read and `PUT`s it under `dir` in VM `id`.
async fn copy_in(client: &Client, host: &Path, id: &str, dir: &str) -> Result<(), CliError> {
    let absolute = std::path::absolute(host).map_err(|source| CpError::Source {
        path: host.to_owned(),
        source,
    })?;
    let name = absolute
        .file_name()
        .map(PathBuf::from)
        .ok_or_else(|| CpError::NoName(host.to_owned()))?;
    std::fs::symlink_metadata(host).map_err(|source| CpError::Source {
        path: host.to_owned(),
        source,
    })?;
    // Ask for the VM first. The daemon refuses a copy into an unknown, image-less or stopped
    // VM before it reads the archive, and a refusal that arrives while the archive is still
    // streaming can be lost to the broken pipe it causes. The daemon stays the one that decides.
    can_copy_into(client, id).await?;
    let (tx, rx) = mpsc::channel(QUEUE);
    let packer = tokio::task::spawn_blocking({
        let host = host.to_owned();
        let name = name.clone();
        move || {
            let out = ChannelWriter {
                tx,
                buf: Vec::with_capacity(ChannelWriter::PIECE),
            };
            // The sidecar makes what it unpacks the agent's; these ids are not used.
            let id = nanoclaw_api::DEFAULT_AGENT_ID;
            let packed = crate::copy_in::pack_into(out, &host, &name, id, id);
            match packed {
                Ok(mut out) => out.flush().map_err(|source| {
                    CliError::from(CpError::Source {
                        path: host.clone(),
                        source,
                    })
                }),
                Err(e) => Err(e),
            }
        }
    });
    let sent = client
        .send_body(
            Method::PUT,
            &files_url(id, dir),
            Some("application/x-tar"),
            ChannelBody(rx),
        )
        .await;
    let packed = packer.await.map_err(join_error)?;
    let resp = match (sent, packed) {
        (Ok(resp), Ok(())) => resp,
        // The daemon's refusal says more than our side's broken pipe.
        (Err(e @ ClientError::Api { .. }), _) => return Err(e.into()),
        // The VM may have stopped while the archive streamed: say so if it did.
        (_, Err(e)) => return Err(can_copy_into(client, id).await.err().unwrap_or(e)),
        (Err(e), Ok(())) => {
            return Err(can_copy_into(client, id).await.err().unwrap_or(e.into()));
        }
    };
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(ClientError::Http)?
        .to_bytes();
    let copied: FilesCopied = serde_json::from_slice(&body).map_err(CpError::Answer)?;
    let shown = format!("{}/{}", dir.trim_end_matches('/'), name.display());
    crate::print_out(&format!(
        "copied {} entries ({} bytes of tar) to {id}:{shown}\n",
        copied.entries, copied.bytes
    ))
}

/// Whether VM `id` can take files now: it exists, has an image and runs.
async fn can_copy_into(client: &Client, id: &str) -> Result<(), CliError> {
    let vm: nanoclaw_api::VmInfo = client
        .json(Method::GET, &format!("/v1/vms/{id}"), None::<&()>)
        .await?;
    if vm.spec.image.is_none() {
        return Err(CpError::NoImage(id.to_owned()).into());
    }
    if !matches!(vm.status, VmStatus::Running | VmStatus::Starting) {
        return Err(CpError::NotRunning {
            id: id.to_owned(),
            status: vm.status.as_str(),
        }
        .into());
    }
    Ok(())
}

/// The destination folder on the host, made if missing.
fn dest_folder(dst: &Path) -> Result<(), CpError> {
    match std::fs::metadata(dst) {
        Ok(m) if m.is_dir() => Ok(()),
        Ok(_) => Err(CpError::DestNotFolder(dst.to_owned())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            std::fs::create_dir(dst).map_err(|source| CpError::Dest {
                path: dst.to_owned(),
                source,
            })
        }
        Err(source) => Err(CpError::Dest {
            path: dst.to_owned(),
            source,
        }),
    }
}

/// `GET`s `path` of VM `id` and unpacks it into the folder `dst` (see the module doc).
async fn copy_out(client: &Client, id: &str, path: &str, dst: &Path) -> Result<(), CliError> {
    let resp = client.send(Method::GET, &files_url(id, path), None).await?;
    dest_folder(dst)?;
    let staging = tempfile::Builder::new()
        .prefix(STAGING_PREFIX)
        .tempdir_in(dst)
        .map_err(|source| CpError::Staging {
            path: dst.to_owned(),
            source,
        })?;
    let (tx, rx) = mpsc::channel::<Result<Bytes, io::Error>>(QUEUE);
    let (pipe_r, pipe_w) = io::pipe().map_err(|e| CpError::Task(e.to_string()))?;
    let owner = (
        nix::unistd::getuid().as_raw(),
        nix::unistd::getgid().as_raw(),
    );
    let rewrite = tokio::task::spawn_blocking(move || {
        let input = ChannelReader {
            rx,
            current: Bytes::new(),
        };
        rewrite(input, pipe_w, owner)
    });
    let root = staging.path().to_owned();
    let unpack = tokio::task::spawn_blocking(move || {
        let mut tree = RootTree::new(&root, MAX_ENTRIES, 0);
        let mut rest = tree.apply_layer(pipe_r).map_err(CpError::Unpack)?;
        io::copy(&mut rest, &mut io::sink()).map_err(CpError::Archive)?;
        tree.finish().map_err(CpError::Unpack)
    });
    let mut body = resp.into_body();
    let mut received = 0u64;
    while let Some(frame) = body.frame().await {
        let piece = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(data) => Ok(data),
                Err(_) => continue,
            },
            Err(e) => Err(io::Error::other(e)),
        };
        let failed = piece.is_err();
        received += piece.as_ref().map_or(0, |d| d.len() as u64);
        if tx.send(piece).await.is_err() || failed {
            break;
        }
    }
    drop(tx);
    let rewritten = rewrite.await.map_err(join_error)?;
    let unpacked = unpack.await.map_err(join_error)?;
    let entries = match (rewritten, unpacked) {
        (Ok(entries), Ok(_)) => entries,
        // The stream's or the archive's own fault comes first; a write error of the re-write
        // only means the unpacking stopped reading, and says why.
        (Err(e @ (CpError::Cut(_) | CpError::Unsupported { .. })), _) => return Err(e.into()),
        (_, Err(e)) => return Err(e.into()),
        (Err(e), Ok(_)) => return Err(e.into()),
    };
    let moved = move_into(staging.path(), dst)?;
    let names: Vec<String> = moved
        .iter()
        .map(|n| dst.join(n).display().to_string())
        .collect();
    crate::print_out(&format!(
        "copied {entries} entries ({received} bytes of tar) from {id}:{path} to {}\n",
        names.join(", ")
    ))
}

/// Re-writes the daemon's archive for this host: entries owned by `owner`, folders with their
/// owner's `rwx` (so that their children can be made), permission bits only. Reads `input` to
/// its end, so that a stream cut after the last entry still fails.
fn rewrite<R: Read, W: Write>(input: R, out: W, owner: (u32, u32)) -> Result<u64, CpError> {
    let mut archive = tar::Archive::new(input);
    let mut builder = Builder::new(out);
    let mut count = 0u64;
    let read_err = |e: io::Error| CpError::Cut(e);
    for entry in archive.entries().map_err(read_err)? {
        let mut entry = entry.map_err(read_err)?;
        let kind = entry.header().entry_type();
        let path = entry.path().map_err(CpError::Archive)?.into_owned();
        let mode = entry.header().mode().map_err(CpError::Archive)?;
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_uid(owner.0.into());
        h.set_gid(owner.1.into());
        h.set_mtime(entry.header().mtime().unwrap_or(0));
        let written = match kind {
            EntryType::Directory => {
                h.set_mode((mode & 0o777) | 0o700);
                h.set_size(0);
                builder.append_data(&mut h, &path, io::empty())
            }
            EntryType::Regular => {
                h.set_mode(mode & 0o777);
                h.set_size(entry.size());
                builder.append_data(&mut h, &path, &mut entry)
            }
            EntryType::Symlink => {
                let target = entry
                    .link_name()
                    .map_err(CpError::Archive)?
                    .unwrap_or_default()
                    .into_owned();
                h.set_mode(0o777);
                h.set_size(0);
                builder.append_link(&mut h, &path, target)
            }
            other => {
                return Err(CpError::Unsupported {
                    path: path.display().to_string(),
                    what: format!("{other:?}"),
                });
            }
        };
        written.map_err(CpError::Archive)?;
        count += 1;
    }
    io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(read_err)?;
    builder.into_inner().map_err(CpError::Archive)?;
    Ok(count)
}

/// Moves each top entry of `staging` into `dst` without replacing anything; answers their
/// names. Nothing moves if any of them exists already.
fn move_into(staging: &Path, dst: &Path) -> Result<Vec<std::ffi::OsString>, CpError> {
    let dest_err = |source| CpError::Dest {
        path: dst.to_owned(),
        source,
    };
    let mut names: Vec<_> = std::fs::read_dir(staging)
        .map_err(dest_err)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(dest_err)?;
    names.sort();
    for name in &names {
        let target = dst.join(name);
        if std::fs::symlink_metadata(&target).is_ok() {
            return Err(CpError::Exists(target));
        }
    }
    let from = std::fs::File::open(staging).map_err(dest_err)?;
    let to = std::fs::File::open(dst).map_err(dest_err)?;
    for name in &names {
        nix::fcntl::renameat2(
            from.as_fd(),
            name.as_os_str(),
            to.as_fd(),
            name.as_os_str(),
            nix::fcntl::RenameFlags::RENAME_NOREPLACE,
        )
        .map_err(|e| match e {
            nix::errno::Errno::EEXIST => CpError::Exists(dst.join(name)),
            e => CpError::Move {
                path: dst.join(name),
                source: e.into(),
            },
        })?;
    }
    Ok(names)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sides_parse_and_guest_paths_are_checked() {
        assert_eq!(
            Side::parse("ab12cd34:/work/out").unwrap(),
            Side::Vm {
                id: "ab12cd34".into(),
                path: "/work/out".into()
            }
        );
        assert_eq!(
            Side::parse("./out").unwrap(),
            Side::Host(PathBuf::from("./out"))
        );
        assert_eq!(
            Side::parse("./a:b").unwrap(),
            Side::Host(PathBuf::from("./a:b")),
            "a colon after a slash is part of a host path"
        );
        for bad in [
            "ab12:../x",
            "ab12:work",
            "ab12:/work/../etc",
            "ab12:/a/./b",
            "ab12:",
        ] {
            assert!(
                matches!(Side::parse(bad), Err(CpError::GuestPath { .. })),
                "{bad}"
            );
        }
        assert_eq!(query_value("/work/a b&c=%ü"), "/work/a%20b%26c%3D%25%C3%BC");
    }

    fn archive(build: impl FnOnce(&mut Builder<Vec<u8>>)) -> Vec<u8> {
        let mut tar = Builder::new(Vec::new());
        build(&mut tar);
        tar.into_inner().unwrap()
    }

    fn entry(
        tar: &mut Builder<Vec<u8>>,
        kind: EntryType,
        path: &str,
        data: &[u8],
        mode: u32,
        link: Option<&str>,
    ) {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(1000);
        h.set_gid(1000);
        h.set_size(data.len() as u64);
        match link {
            Some(target) => tar.append_link(&mut h, path, target).unwrap(),
            None => tar.append_data(&mut h, path, data).unwrap(),
        }
    }

    /// Runs the re-write and the unpacking into a fresh folder in `dst`, then the move, like
    /// [`copy_out`] does after its GET.
    fn unpack_into(tar: Vec<u8>, dst: &Path) -> Result<Vec<std::ffi::OsString>, CpError> {
        let staging = tempfile::Builder::new()
            .prefix(STAGING_PREFIX)
            .tempdir_in(dst)
            .unwrap();
        let owner = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let (pipe_r, pipe_w) = io::pipe().unwrap();
        let writer = std::thread::spawn(move || rewrite(tar.as_slice(), pipe_w, owner));
        let mut tree = RootTree::new(staging.path(), MAX_ENTRIES, 0);
        let unpacked = tree.apply_layer(pipe_r).map(drop);
        // As `copy_out` does: when the unpacking stops early, the re-write's write fails with
        // a broken pipe (if it had not written everything yet), and the unpacking says why.
        match (writer.join().unwrap(), unpacked) {
            (Err(e @ (CpError::Cut(_) | CpError::Unsupported { .. })), _) => return Err(e),
            (_, Err(e)) => return Err(CpError::Unpack(e)),
            (Err(e), Ok(())) => return Err(e),
            (Ok(_), Ok(())) => {}
        }
        tree.finish().map_err(CpError::Unpack)?;
        move_into(staging.path(), dst)
    }

    #[test]
    fn an_archive_lands_in_the_destination_as_the_users_without_set_id_bits() {
        let dst = tempfile::tempdir().unwrap();
        let tar = archive(|t| {
            entry(t, EntryType::Directory, "out", b"", 0o500, None);
            entry(
                t,
                EntryType::Regular,
                "out/bin",
                b"\x7fELF\x00\x01",
                0o4755,
                None,
            );
            entry(t, EntryType::Directory, "out/sub", b"", 0o755, None);
            entry(t, EntryType::Regular, "out/sub/f", b"nested", 0o640, None);
            entry(t, EntryType::Symlink, "out/etc", b"", 0o777, Some("/etc"));
        });
        let moved = unpack_into(tar, dst.path()).unwrap();
        assert_eq!(moved, ["out"]);
        let out = dst.path().join("out");
        assert_eq!(std::fs::read(out.join("sub/f")).unwrap(), b"nested");
        use std::os::unix::fs::MetadataExt;
        let bin = std::fs::metadata(out.join("bin")).unwrap();
        assert_eq!(bin.mode() & 0o7777, 0o755);
        assert_eq!(bin.uid(), nix::unistd::getuid().as_raw());
        assert_eq!(std::fs::metadata(&out).unwrap().mode() & 0o777, 0o700);
        assert_eq!(
            std::fs::read_link(out.join("etc")).unwrap(),
            Path::new("/etc")
        );
        let left: Vec<_> = std::fs::read_dir(dst.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the private folder is gone");
    }

    #[test]
    fn nothing_is_written_through_a_symlink_or_over_what_exists() {
        let dst = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // A symlink out of the destination, then a file through it.
        let through = archive(|t| {
            entry(t, EntryType::Directory, "out", b"", 0o755, None);
            let target = outside.path().to_str().unwrap().to_owned();
            entry(t, EntryType::Symlink, "out/etc", b"", 0o777, Some(&target));
            entry(
                t,
                EntryType::Regular,
                "out/etc/passwd",
                b"pwned",
                0o644,
                None,
            );
        });
        let e = unpack_into(through, dst.path()).unwrap_err();
        assert!(
            matches!(e, CpError::Unpack(LayerError::ThroughSymlink { .. })),
            "{e:?}"
        );
        assert!(!outside.path().join("passwd").exists());
        let devices = archive(|t| {
            entry(t, EntryType::Char, "null", b"", 0o666, None);
        });
        assert!(matches!(
            unpack_into(devices, dst.path()),
            Err(CpError::Unsupported { .. })
        ));

        // An entry that exists already is left alone, and so is everything else.
        std::fs::write(dst.path().join("out"), b"mine").unwrap();
        let tar = archive(|t| entry(t, EntryType::Regular, "out", b"theirs", 0o644, None));
        let e = unpack_into(tar, dst.path()).unwrap_err();
        assert!(matches!(e, CpError::Exists(_)), "{e:?}");
        assert_eq!(std::fs::read(dst.path().join("out")).unwrap(), b"mine");

        // A cut stream fails even after whole entries.
        let mut cut = archive(|t| entry(t, EntryType::Regular, "a", &[7; 5000], 0o644, None));
        cut.truncate(2048);
        let other = tempfile::tempdir().unwrap();
        assert!(unpack_into(cut, other.path()).is_err());
        let left: Vec<_> = std::fs::read_dir(other.path()).unwrap().collect();
        assert!(left.is_empty(), "nothing is kept of a cut copy");
    }

    #[test]
    fn a_folder_packs_as_a_stream_under_its_own_name() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        std::fs::create_dir_all(src.join("d")).unwrap();
        std::fs::write(src.join("d/x"), [1u8, 2, 3]).unwrap();
        std::os::unix::fs::symlink("d/x", src.join("l")).unwrap();
        let tar = crate::copy_in::pack_into(Vec::new(), &src, Path::new("src"), 5, 6).unwrap();
        let mut names = Vec::new();
        for e in tar::Archive::new(tar.as_slice()).entries().unwrap() {
            let e = e.unwrap();
            names.push((
                e.path().unwrap().display().to_string(),
                e.header().entry_type(),
            ));
        }
        assert_eq!(
            names,
            [
                ("src".to_owned(), EntryType::Directory),
                ("src/d".to_owned(), EntryType::Directory),
                ("src/d/x".to_owned(), EntryType::Regular),
                ("src/l".to_owned(), EntryType::Symlink),
            ]
        );
    }
}

//! Copying files into and out of a VM (`nanoclaw cp`): the `/v1/vms/{id}/files` routes.
//!
//! - `PUT ?path=DIR` streams the request body, a tar, to the sidecar's file copy server
//!   ([`shared_proto::files`], vsock [`FILES_PORT`]), which unpacks it under the folder `DIR` of
//!   the agent's root. Answers [`nanoclaw_api::FilesCopied`].
//! - `GET ?path=PATH` answers a tar of the file or folder `PATH`: from a running VM through the
//!   same channel, re-written by [`archive::sanitize`] on its way; from an ended VM, read off its
//!   writable disk by [`disk`].
//!
//! Both stream: at most a few 64 KiB pieces are in memory per transfer, and no lock is held
//! while bytes move. Tar streams are capped at [`MAX_TAR_BYTES`] and [`MAX_ENTRIES`] entries,
//! the sidecar's own caps.
//!
//! Whatever the guest sends is hostile. Its replies are checked by the wire decoder, its
//! archives are parsed and re-written before any client sees them, the text of its errors is
//! cut and stripped of control characters before it goes into an answer, and the log lines it
//! can trigger are rate-limited. Once a `GET`'s answer has started, a failure can only cut the
//! response short (the client sees the body fail, never a whole-looking archive); the cause is
//! logged.
//!
//! # Layout
//! - [`guest`]: the hybrid vsock connection and the channel's `Put` and `Get`.
//! - [`archive`]: tar plumbing between tasks and threads, and the re-write of a guest's archive.
//! - [`disk`]: copying out of an ended VM's disk with `debugfs`.
//!
//! [`FILES_PORT`]: shared_proto::ports::FILES_PORT

pub mod archive;
pub mod disk;
pub mod guest;

use std::path::Path as FsPath;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Instant;

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use nanoclaw_api::{FilesCopied, VmStatus};
use serde::Deserialize;
use shared_proto::files::{FilesErrorKind, FilesWireError, check_path};
use tokio::sync::mpsc;

use self::archive::{ArchiveError, ChannelReader, ChannelWriter, Piece};
use self::disk::{DiskError, DiskExport};
use self::guest::GuestFiles;
use super::Daemon;
use super::images::SCRATCH_DISK_FILE;
use super::ratelimit::LogBudget;
use super::routes::Failure;
use super::vm::Vm;
use crate::error_chain;

/// The most bytes of one tar stream, either way (the sidecar's cap).
pub const MAX_TAR_BYTES: u64 = 2 << 30;
/// The most entries of one archive (the sidecar's cap).
pub const MAX_ENTRIES: u64 = 100_000;
/// The deepest nesting of an archive's names.
pub const MAX_DEPTH: usize = 128;
/// The longest text of the guest passed on in an answer or a log line, in bytes.
pub const MAX_GUEST_TEXT: usize = 512;
/// Pieces of a stream queued between a task and a thread.
const QUEUE: usize = 4;

/// Errors of a copy through the guest's channel. [`FilesError::status`] is the answer's status.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    /// The VM is not running.
    #[error("VM {id} is {status}{hint}")]
    NotRunning {
        /// The VM.
        id: String,
        /// Its status.
        status: &'static str,
        /// What can be done instead.
        hint: &'static str,
    },
    /// The VM runs without an image: it has no root to copy into or out of.
    #[error("VM {0} runs without an image; files can be copied only with an image VM")]
    NoImage(String),
    /// The path breaks the channel's rules.
    #[error("the guest path {path:?} is {reason}")]
    BadPath {
        /// The path (cut).
        path: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The VMM's vsock socket is served by another uid than the VM's jailed VMM.
    #[error("the VM's vsock socket is served by uid {peer}, not by its VMM (uid {expected})")]
    NotTheVmm {
        /// The VMM's uid.
        expected: u32,
        /// The peer's.
        peer: u32,
    },
    /// Connecting to the VMM's vsock socket failed.
    #[error("cannot reach the VM's file channel")]
    Connect(#[source] std::io::Error),
    /// The guest does not listen on the file copy port (yet).
    #[error("the VM's file channel is not up yet (the guest does not listen on it)")]
    NotListening,
    /// The VMM answered `CONNECT` with something else than `OK`.
    #[error("the VMM refused the connection: {0:?}")]
    ConnectAnswer(String),
    /// The guest was silent for too long.
    #[error("the guest went silent {0}")]
    Timeout(&'static str),
    /// The guest sent bytes that are not a valid reply.
    #[error("bad reply from the guest")]
    Wire(#[source] FilesWireError),
    /// Encoding a request failed.
    #[error("cannot encode the request")]
    Encode(#[source] FilesWireError),
    /// Reading from the guest failed.
    #[error("cannot read from the guest")]
    Read(#[source] std::io::Error),
    /// Writing to the guest failed.
    #[error("cannot write to the guest")]
    Write(#[source] std::io::Error),
    /// The guest closed the connection early.
    #[error("the guest closed the file channel {0}")]
    Closed(&'static str),
    /// A reply out of order.
    #[error("the guest sent {0}")]
    OutOfOrder(&'static str),
    /// The guest's error reply, its text cut and stripped.
    #[error("the guest refused: {message}")]
    Guest {
        /// What kind of failure.
        kind: FilesErrorKind,
        /// The guest's text.
        message: String,
    },
    /// The tar stream is over the cap.
    #[error("the tar stream is over the {max}-byte cap")]
    TooLarge {
        /// The cap.
        max: u64,
    },
    /// Reading the request body failed.
    #[error("reading the request body")]
    Body(#[source] axum::Error),
    /// The client went away.
    #[error("the client went away")]
    ClientGone,
    /// The guest's archive is malformed or hostile.
    #[error("the guest's archive is refused")]
    Archive(#[source] ArchiveError),
    /// Copying out of an ended VM's disk failed.
    #[error("copying from the stopped VM's disk")]
    Disk(#[source] DiskError),
    /// A blocking task failed.
    #[error("internal error: {0}")]
    Join(String),
}

impl FilesError {
    /// The guest's error reply `kind` with its `message`, cut and stripped.
    pub fn guest(kind: FilesErrorKind, message: &str) -> Self {
        Self::Guest {
            kind,
            message: guest_text(message.as_bytes()),
        }
    }

    /// The HTTP status of this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotRunning { .. } | Self::NoImage(_) | Self::Connect(_) | Self::NotListening => {
                StatusCode::CONFLICT
            }
            Self::BadPath { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Guest { kind, .. } => guest_status(*kind),
            Self::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            Self::Body(_) | Self::ClientGone => StatusCode::BAD_REQUEST,
            Self::Archive(ArchiveError::TooManyEntries { .. } | ArchiveError::NamesTooLarge) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::Archive(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::Disk(e) => e.status(),
            Self::ConnectAnswer(_)
            | Self::NotTheVmm { .. }
            | Self::Wire(_)
            | Self::Read(_)
            | Self::Write(_)
            | Self::Closed(_)
            | Self::OutOfOrder(_) => StatusCode::BAD_GATEWAY,
            Self::Encode(_) | Self::Join(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the guest's behaviour caused this error (its log lines are rate-limited).
    fn guest_caused(&self) -> bool {
        matches!(
            self,
            Self::Guest { .. }
                | Self::Wire(_)
                | Self::Closed(_)
                | Self::OutOfOrder(_)
                | Self::Timeout(_)
                | Self::Archive(_)
                | Self::Disk(_)
        )
    }
}

/// The HTTP status for the guest's error `kind`.
pub fn guest_status(kind: FilesErrorKind) -> StatusCode {
    match kind {
        FilesErrorKind::BadRequest => StatusCode::BAD_REQUEST,
        FilesErrorKind::NotReady => StatusCode::CONFLICT,
        FilesErrorKind::NotFound => StatusCode::NOT_FOUND,
        FilesErrorKind::Refused | FilesErrorKind::Unsupported => StatusCode::UNPROCESSABLE_ENTITY,
        FilesErrorKind::TooLarge | FilesErrorKind::TooManyEntries => StatusCode::PAYLOAD_TOO_LARGE,
        FilesErrorKind::NoSpace => StatusCode::INSUFFICIENT_STORAGE,
        FilesErrorKind::PermissionDenied => StatusCode::FORBIDDEN,
        FilesErrorKind::Io => StatusCode::BAD_GATEWAY,
    }
}

impl From<FilesError> for Failure {
    fn from(e: FilesError) -> Self {
        Failure(e.status(), error_chain(&e))
    }
}

/// Text from the guest made fit for an answer or a log line: invalid UTF-8 replaced, control
/// characters dropped, at most [`MAX_GUEST_TEXT`] bytes.
pub fn guest_text(raw: &[u8]) -> String {
    let mut out = String::new();
    for c in String::from_utf8_lossy(raw).chars() {
        if c.is_control() {
            continue;
        }
        if out.len() + c.len_utf8() > MAX_GUEST_TEXT {
            out.push('…');
            break;
        }
        out.push(c);
    }
    out
}

/// What a transfer moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transfer {
    /// Bytes of tar stream.
    pub bytes: u64,
    /// Archive entries.
    pub entries: u64,
}

/// The log budget of every line a guest can trigger here.
static GUEST_LOG: LazyLock<Mutex<LogBudget>> = LazyLock::new(|| Mutex::new(LogBudget::new()));

/// Logs a failed transfer; within [`GUEST_LOG`]'s budget when the guest caused it.
fn log_failure(vm: &str, what: &str, e: &FilesError) {
    if e.guest_caused() {
        let admitted = GUEST_LOG
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .admit(Instant::now());
        if let Some(suppressed) = admitted {
            tracing::warn!(vm, suppressed, error = %error_chain(e), "files: {what} failed");
        }
    } else {
        tracing::info!(vm, error = %error_chain(e), "files: {what} failed");
    }
}

/// `?path=GUEST_PATH`.
#[derive(Debug, Deserialize)]
pub struct PathQuery {
    /// An absolute path in the guest.
    pub path: String,
}

/// The VM and the checked path of a request.
fn target(
    daemon: &Daemon,
    id: &str,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> Result<(Arc<Vm>, String), Failure> {
    let vm = daemon
        .get(id)
        .ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no VM with id {id}")))?;
    let Query(q) = query.map_err(|e| {
        Failure(
            StatusCode::BAD_REQUEST,
            format!("give the guest path as ?path=PATH ({})", e.body_text()),
        )
    })?;
    if let Err(e) = check_path(&q.path) {
        let reason = match e {
            FilesWireError::BadPath(why) => why.to_owned(),
            other => other.to_string(),
        };
        return Err(FilesError::BadPath {
            path: q.path.chars().take(256).collect(),
            reason,
        }
        .into());
    }
    if vm.info().spec.image.is_none() {
        return Err(FilesError::NoImage(id.to_owned()).into());
    }
    Ok((vm, q.path))
}

/// `PUT /v1/vms/{id}/files?path=DIR`: unpack the body, a tar stream, under `DIR` in the VM.
pub async fn put(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    query: Result<Query<PathQuery>, QueryRejection>,
    body: Body,
) -> Result<Json<FilesCopied>, Failure> {
    let (vm, dest) = target(&daemon, &id, query)?;
    let status = vm.status();
    if status != VmStatus::Running && status != VmStatus::Starting {
        return Err(FilesError::NotRunning {
            id,
            status: status.as_str(),
            hint: "; files can be copied into a running VM only",
        }
        .into());
    }
    let copied = async {
        GuestFiles::connect(&vm.vmm_dir, vm.jail_uid())
            .await?
            .put(&dest, body, MAX_TAR_BYTES)
            .await
    }
    .await;
    match copied {
        Ok(t) => {
            tracing::info!(vm = %id, %dest, bytes = t.bytes, entries = t.entries, "files: put");
            Ok(Json(FilesCopied {
                bytes: t.bytes,
                entries: t.entries,
            }))
        }
        Err(e) => {
            log_failure(&id, "put", &e);
            Err(e.into())
        }
    }
}

/// `GET /v1/vms/{id}/files?path=PATH`: a tar of the file or folder `PATH`, from a running VM or
/// from an ended VM's writable disk.
pub async fn get(
    State(daemon): State<Arc<Daemon>>,
    Path(id): Path<String>,
    query: Result<Query<PathQuery>, QueryRejection>,
) -> Result<Response, Failure> {
    let (vm, path) = target(&daemon, &id, query)?;
    let status = vm.status();
    let rx = match status {
        VmStatus::Running | VmStatus::Starting => {
            get_running(&vm.vmm_dir, vm.jail_uid(), &id, &path).await
        }
        s if s.is_terminal() => get_ended(&vm.dir, &id, &path).await,
        s => Err(FilesError::NotRunning {
            id: id.clone(),
            status: s.as_str(),
            hint: "; copy from it once it has stopped",
        }),
    }
    .inspect_err(|e| log_failure(&id, "get", e))?;
    Ok(tar_response(rx))
}

/// A streamed `application/x-tar` answer; an error item cuts it short.
fn tar_response(rx: mpsc::Receiver<Piece>) -> Response {
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
    });
    (
        [(header::CONTENT_TYPE, "application/x-tar")],
        Body::from_stream(stream),
    )
        .into_response()
}

/// Starts a `Get` from a running VM: once the guest has answered with its first chunk, the
/// relay and the re-write run on their own and the answer's body is returned.
pub async fn get_running(
    vm_dir: &FsPath,
    vmm_uid: Option<u32>,
    id: &str,
    path: &str,
) -> Result<mpsc::Receiver<Piece>, FilesError> {
    let (first, replies) = GuestFiles::connect(vm_dir, vmm_uid)
        .await?
        .get(path)
        .await?;
    let (in_tx, in_rx) = mpsc::channel::<Piece>(QUEUE);
    let (out_tx, out_rx) = mpsc::channel::<Piece>(QUEUE);
    let (id, path) = (id.to_owned(), path.to_owned());
    tokio::spawn({
        let (id, path) = (id.clone(), path.clone());
        async move {
            match guest::relay_get(first, replies, in_tx, MAX_TAR_BYTES).await {
                Ok(t) => {
                    tracing::info!(vm = %id, %path, bytes = t.bytes, entries = t.entries, "files: get")
                }
                // The client's disconnect is not worth a line.
                Err(FilesError::ClientGone) => {}
                Err(e) => log_failure(&id, "get", &e),
            }
        }
    });
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter::new(out_tx);
        let limits = archive::Limits {
            max_entries: MAX_ENTRIES,
            max_depth: MAX_DEPTH,
        };
        match archive::sanitize(ChannelReader::new(in_rx), &mut out, &limits) {
            Ok(_) => {}
            // The client went away: nothing to tell anyone.
            Err(e @ ArchiveError::Write(_)) => {
                out.fail(std::io::Error::other(error_chain(&e)));
            }
            // What the re-write refused, or a stream that is not a tar (the relay logs the
            // guest's error replies too, within the same budget).
            Err(e) => {
                let e = FilesError::Archive(e);
                log_failure(&id, &format!("get of {path}"), &e);
                out.fail(std::io::Error::other(error_chain(&e)));
            }
        }
    });
    Ok(out_rx)
}

/// Starts a `Get` from an ended VM's writable disk: the walk and its checks run first, then
/// the contents stream from a blocking thread.
pub async fn get_ended(
    vm_dir: &FsPath,
    id: &str,
    path: &str,
) -> Result<mpsc::Receiver<Piece>, FilesError> {
    let disk = vm_dir.join(SCRATCH_DISK_FILE);
    let limits = disk::Limits {
        max_entries: MAX_ENTRIES,
        max_bytes: MAX_TAR_BYTES,
        max_depth: MAX_DEPTH,
    };
    let guest_path = path.to_owned();
    let export = tokio::task::spawn_blocking(move || DiskExport::open(&disk, &guest_path, &limits))
        .await
        .map_err(|e| FilesError::Join(e.to_string()))?
        .map_err(FilesError::Disk)?;
    if export.skipped > 0 {
        tracing::debug!(vm = %id, skipped = export.skipped, "files: special files left out");
    }
    let (tx, rx) = mpsc::channel::<Piece>(QUEUE);
    let (id, path) = (id.to_owned(), path.to_owned());
    tokio::task::spawn_blocking(move || {
        let mut out = ChannelWriter::new(tx);
        match export.write_tar(&mut out) {
            Ok(entries) => {
                let bytes = out.written();
                tracing::info!(vm = %id, %path, bytes, entries, "files: get from the stopped VM's disk");
            }
            Err(DiskError::Write(_)) => {}
            Err(e) => {
                let e = FilesError::Disk(e);
                log_failure(&id, "get", &e);
                out.fail(std::io::Error::other(error_chain(&e)));
            }
        }
    });
    Ok(rx)
}

/// The body bytes of a tar answer, for tests.
#[cfg(test)]
async fn collect(mut rx: mpsc::Receiver<Piece>) -> Result<Vec<u8>, std::io::Error> {
    let mut all = Vec::new();
    while let Some(piece) = rx.recv().await {
        let piece: axum::body::Bytes = piece?;
        all.extend_from_slice(&piece);
    }
    Ok(all)
}

#[cfg(test)]
mod tests;

//! The host's end of the file copy channel ([`shared_proto::files`]) to a running VM: a
//! host-initiated hybrid vsock connection to [`FILES_PORT`], then one `Put` or `Get`.
//!
//! Every reply is decoded and checked by [`FilesDecoder`]; each wait for the guest is bounded by
//! [`IDLE_TIMEOUT`].

use std::path::Path;
use std::time::Duration;

use axum::body::{Body, Bytes};
use http_body_util::BodyExt;
use shared_proto::files::{
    FilesDecoder, FilesReply, FilesRequest, MAX_FILES_CHUNK, encode_files_message,
};
use shared_proto::ports::FILES_PORT;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::mpsc;

use super::archive::Piece;
use super::{FilesError, Transfer};

/// The hybrid vsock socket in a VM's directory, where the VMM accepts host-initiated
/// connections.
pub const VSOCK_SOCKET: &str = "vsock.sock";
/// How long connecting, and the VMM's answer to `CONNECT`, may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest answer to `CONNECT` (`OK <port>\n`).
const MAX_CONNECT_ANSWER: usize = 32;
/// How long the guest may stay silent, or refuse to take more bytes, before the transfer fails.
/// Longer than the sidecar's own idle timeout, so that its error reply comes first.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(90);

/// Opens a host-initiated connection to guest `port` through the VMM's hybrid vsock socket
/// `<vm_dir>/vsock.sock`: writes `CONNECT <port>\n` and reads the VMM's `OK <n>\n`.
///
/// A jailed VMM (uid `vmm_uid`) owns its folder and could replace `vsock.sock` with a link to
/// another VM's socket; the peer's uid, which the kernel vouches for, must be its own.
pub async fn connect_vsock(
    vm_dir: &Path,
    port: u32,
    vmm_uid: Option<u32>,
) -> Result<UnixStream, FilesError> {
    let socket = vm_dir.join(VSOCK_SOCKET);
    let handshake = async {
        let mut stream = UnixStream::connect(&socket)
            .await
            .map_err(FilesError::Connect)?;
        if let Some(expected) = vmm_uid {
            let peer = stream.peer_cred().map_err(FilesError::Connect)?.uid();
            if peer != expected {
                return Err(FilesError::NotTheVmm { expected, peer });
            }
        }
        stream
            .write_all(format!("CONNECT {port}\n").as_bytes())
            .await
            .map_err(FilesError::Connect)?;
        // One byte at a time: nothing after the newline belongs to the answer.
        let mut answer = Vec::new();
        loop {
            let mut byte = [0u8; 1];
            let n = stream.read(&mut byte).await.map_err(FilesError::Connect)?;
            if n == 0 {
                return Err(FilesError::NotListening);
            }
            if byte[0] == b'\n' {
                break;
            }
            answer.push(byte[0]);
            if answer.len() >= MAX_CONNECT_ANSWER {
                return Err(FilesError::ConnectAnswer(super::guest_text(&answer)));
            }
        }
        if !answer.starts_with(b"OK ") {
            return Err(FilesError::ConnectAnswer(super::guest_text(&answer)));
        }
        Ok(stream)
    };
    tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| FilesError::Timeout("connecting"))?
}

/// The reading half of a connection: the guest's replies, decoded and checked.
#[derive(Debug)]
pub struct Replies {
    rd: OwnedReadHalf,
    decoder: FilesDecoder<FilesReply>,
    buf: Vec<u8>,
}

impl Replies {
    /// The next reply; `None` when the guest closed the connection.
    pub async fn next(&mut self) -> Result<Option<FilesReply>, FilesError> {
        loop {
            if let Some(msg) = self.decoder.decode_next().map_err(FilesError::Wire)? {
                return Ok(Some(msg));
            }
            let n = tokio::time::timeout(IDLE_TIMEOUT, self.rd.read(&mut self.buf))
                .await
                .map_err(|_| FilesError::Timeout("waiting for the guest"))?
                .map_err(FilesError::Read)?;
            if n == 0 {
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }

    /// The reply that ends a transfer (`Done` or `Error`); anything else first is out of order.
    async fn last(&mut self) -> Result<Transfer, FilesError> {
        match self.next().await? {
            Some(FilesReply::Done { bytes, entries }) => Ok(Transfer { bytes, entries }),
            Some(FilesReply::Error { kind, message }) => Err(FilesError::guest(kind, &message)),
            Some(FilesReply::Ready | FilesReply::Chunk { .. }) => Err(FilesError::OutOfOrder(
                "a ready or chunk reply during a put's stream",
            )),
            None => Err(FilesError::Closed("before its last reply")),
        }
    }
}

/// One connection to a VM's file copy server.
#[derive(Debug)]
pub struct GuestFiles {
    replies: Replies,
    wr: OwnedWriteHalf,
}

impl GuestFiles {
    /// Connects to the file copy server of the VM whose VMM's folder is `vm_dir` (and whose
    /// jailed VMM runs as `vmm_uid`).
    pub async fn connect(vm_dir: &Path, vmm_uid: Option<u32>) -> Result<Self, FilesError> {
        let stream = connect_vsock(vm_dir, FILES_PORT, vmm_uid).await?;
        Ok(Self::over(stream))
    }

    /// A connection over `stream`, whose `CONNECT` handshake is done.
    pub fn over(stream: UnixStream) -> Self {
        let (rd, wr) = stream.into_split();
        Self {
            replies: Replies {
                rd,
                decoder: FilesDecoder::new(),
                buf: vec![0; MAX_FILES_CHUNK],
            },
            wr,
        }
    }

    async fn send(&mut self, msg: &FilesRequest) -> Result<(), FilesError> {
        send(&mut self.wr, msg).await
    }

    /// Runs a `Put` of `body` (a tar stream of at most `max` bytes) under `dest`. Replies are
    /// read while the stream is sent, so an early error of the guest ends the transfer.
    pub async fn put(mut self, dest: &str, body: Body, max: u64) -> Result<Transfer, FilesError> {
        self.send(&FilesRequest::Put { dest: dest.into() }).await?;
        match self.replies.next().await? {
            Some(FilesReply::Ready) => {}
            Some(FilesReply::Error { kind, message }) => {
                return Err(FilesError::guest(kind, &message));
            }
            Some(_) => return Err(FilesError::OutOfOrder("a reply before ready")),
            None => return Err(FilesError::Closed("before answering the put")),
        }
        let Self {
            mut replies,
            mut wr,
        } = self;
        let mut last = tokio::spawn(async move { replies.last().await });
        let mut body = body;
        let mut sent = 0u64;
        let streamed: Result<(), FilesError> = loop {
            tokio::select! {
                biased;
                early = &mut last => {
                    // The guest ended the transfer before the stream did: an error, or a
                    // guest that does not follow the protocol.
                    flatten(early)?;
                    return Err(FilesError::OutOfOrder("done before the end of the stream"));
                }
                frame = body.frame() => match frame {
                    None => break Ok(()),
                    Some(Err(e)) => break Err(FilesError::Body(e)),
                    Some(Ok(frame)) => {
                        let Ok(data) = frame.into_data() else { continue };
                        sent += data.len() as u64;
                        if sent > max {
                            break Err(FilesError::TooLarge { max });
                        }
                        if let Err(e) = send_chunks(&mut wr, &data).await {
                            break Err(e);
                        }
                    }
                },
            }
        };
        match streamed {
            Ok(()) => {
                if let Err(e) = send(&mut wr, &FilesRequest::End).await {
                    return Err(guest_error_first(last, e).await);
                }
                flatten(last.await)
            }
            // A failed write usually means the guest has stopped reading after an error
            // reply: that reply is the better answer.
            Err(e @ (FilesError::Write(_) | FilesError::Timeout(_))) => {
                Err(guest_error_first(last, e).await)
            }
            // Our side failed (the client's body, the cap): dropping the connection tells the
            // guest, which keeps what it unpacked so far.
            Err(e) => {
                last.abort();
                Err(e)
            }
        }
    }

    /// Sends a `Get` of `path` and waits for its first reply. On a chunk, answers it and the
    /// replies that follow; the guest's error comes back as [`FilesError::Guest`].
    pub async fn get(mut self, path: &str) -> Result<(Bytes, Replies), FilesError> {
        self.send(&FilesRequest::Get { path: path.into() }).await?;
        match self.replies.next().await? {
            Some(FilesReply::Chunk { data }) => Ok((Bytes::from(data), self.replies)),
            Some(FilesReply::Error { kind, message }) => Err(FilesError::guest(kind, &message)),
            Some(FilesReply::Done { .. }) => Err(FilesError::OutOfOrder("done before any chunk")),
            Some(FilesReply::Ready) => Err(FilesError::OutOfOrder("ready in a get")),
            None => Err(FilesError::Closed("before answering the get")),
        }
    }
}

/// Relays a `Get`'s chunks into `tx`, `first` first, until `Done`; at most `max` bytes. On an
/// error of the guest (or over the cap) the stream gets that error as its last item, so the
/// reader never takes a cut archive for a whole one. Answers what the guest reported.
pub async fn relay_get(
    first: Bytes,
    mut replies: Replies,
    tx: mpsc::Sender<Piece>,
    max: u64,
) -> Result<Transfer, FilesError> {
    let mut received = first.len() as u64;
    if tx.send(Ok(first)).await.is_err() {
        return Err(FilesError::ClientGone);
    }
    let outcome = loop {
        match replies.next().await {
            Ok(Some(FilesReply::Chunk { data })) => {
                received += data.len() as u64;
                if received > max {
                    break Err(FilesError::TooLarge { max });
                }
                if tx.send(Ok(Bytes::from(data))).await.is_err() {
                    return Err(FilesError::ClientGone);
                }
            }
            Ok(Some(FilesReply::Done { bytes, entries })) => {
                break Ok(Transfer { bytes, entries });
            }
            Ok(Some(FilesReply::Error { kind, message })) => {
                break Err(FilesError::guest(kind, &message));
            }
            Ok(Some(FilesReply::Ready)) => break Err(FilesError::OutOfOrder("ready in a get")),
            Ok(None) => break Err(FilesError::Closed("before the end of the get")),
            Err(e) => break Err(e),
        }
    };
    if let Err(e) = &outcome {
        let _ = tx
            .send(Err(std::io::Error::other(crate::error_chain(e))))
            .await;
    }
    outcome
}

async fn send(wr: &mut OwnedWriteHalf, msg: &FilesRequest) -> Result<(), FilesError> {
    let frame = encode_files_message(msg).map_err(FilesError::Encode)?;
    tokio::time::timeout(IDLE_TIMEOUT, wr.write_all(&frame))
        .await
        .map_err(|_| FilesError::Timeout("sending to the guest"))?
        .map_err(FilesError::Write)
}

async fn send_chunks(wr: &mut OwnedWriteHalf, data: &[u8]) -> Result<(), FilesError> {
    for piece in data.chunks(MAX_FILES_CHUNK) {
        send(
            wr,
            &FilesRequest::Chunk {
                data: piece.to_vec(),
            },
        )
        .await?;
    }
    Ok(())
}

fn flatten(
    joined: Result<Result<Transfer, FilesError>, tokio::task::JoinError>,
) -> Result<Transfer, FilesError> {
    joined.map_err(|_| FilesError::Closed("while its replies were read"))?
}

/// The guest's error reply if one comes soon, else `ours`.
async fn guest_error_first(
    last: tokio::task::JoinHandle<Result<Transfer, FilesError>>,
    ours: FilesError,
) -> FilesError {
    const GRACE: Duration = Duration::from_secs(5);
    match tokio::time::timeout(GRACE, last).await {
        Ok(Ok(Err(e @ FilesError::Guest { .. }))) => e,
        _ => ours,
    }
}

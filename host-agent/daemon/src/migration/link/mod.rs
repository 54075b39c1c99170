//! The link between two hosts' daemons for a live migration: TCP, Noise XX, both static keys
//! pinned.
//!
//! # Keys
//! Each daemon has a migration identity, an X25519 key in `<state>/migration/host.key` (0600,
//! made at first use; [`Identity::open`]), apart from the credential relay's key: one key, one
//! purpose. An operator pins the other hosts' public keys (hex) in the daemon's configuration.
//!
//! # Handshake
//! `Noise_XX_25519_ChaChaPoly_BLAKE2s` with the prologue [`PROLOGUE`]. Both sides learn the
//! other's static key inside the handshake and check it before anything else is read: the
//! initiator wants exactly the key it pinned for the address it dialled ([`LinkError::WrongPeer`]);
//! the responder wants one of its pinned keys ([`LinkError::UnknownPeer`]), and tells a caller
//! it does not know so, as a refusal ([`super::Reply::Refused`]) in place of an answer. XX rather than KK
//! because the responder does not know which host is calling until the handshake tells it. A
//! handshake has [`HANDSHAKE_TIMEOUT`] to finish.
//!
//! # Records
//! Each Noise message travels as a record: a big-endian `u16` length, then the message (at
//! most 65535 bytes, Noise's own limit). A transport message carries a tag byte and data:
//! [`Link::send`] and [`Link::recv`] move whole messages (offers, answers), and [`Link::relay`]
//! carries a byte stream (the VMMs' migration stream) as `DATA` messages closed by one `END`.
//! A record that does not decrypt ends the link: Noise's nonces make a replayed, reordered or
//! altered record fail.

use std::path::Path;
use std::time::Duration;

use rand_core::{OsRng, RngCore};
use snow::{HandshakeState, TransportState};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UnixStream};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

/// The Noise pattern.
pub const PATTERN: &str = "Noise_XX_25519_ChaChaPoly_BLAKE2s";
/// Bound into every handshake: a key made for another purpose cannot be replayed here.
pub const PROLOGUE: &[u8] = b"nanoclaw live migration v1";
/// How long a handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest Noise message.
const MAX_MESSAGE: usize = 65535;
/// Noise's tag.
const TAG_LEN: usize = 16;
/// The most data one transport message carries (a tag byte and Noise's tag besides).
pub const MAX_DATA: usize = MAX_MESSAGE - TAG_LEN - 1;

const KIND_MESSAGE: u8 = 1;
const KIND_DATA: u8 = 2;
const KIND_END: u8 = 3;

/// What went wrong on a link.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Reading or writing the TCP connection or the local socket failed.
    #[error("migration link: {what}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The identity file could not be read or written, or is not a key.
    #[error("migration identity {path}: {detail}")]
    Identity {
        /// The file.
        path: String,
        /// What is wrong.
        detail: String,
    },
    /// The handshake did not finish in time.
    #[error("the migration link's handshake did not finish within {0:?}")]
    HandshakeTimeout(Duration),
    /// Noise refused a message (a bad handshake, a record that does not decrypt).
    #[error("migration link: Noise: {0}")]
    Noise(#[from] snow::Error),
    /// The responder is not the host pinned for the address.
    #[error("the host at the other end has key {found}, not the pinned {expected}")]
    WrongPeer {
        /// The pinned key, hex.
        expected: String,
        /// The key it showed, hex.
        found: String,
    },
    /// The initiator's key is not pinned here.
    #[error("a host with key {0} is not a pinned migration peer")]
    UnknownPeer(String),
    /// The peer closed the link where a record was due.
    #[error("the peer closed the migration link")]
    Closed,
    /// A record of an unknown kind, or an empty one.
    #[error("migration link: a record of unknown kind {0}")]
    BadRecord(u8),
    /// A message where stream data was due, or the other way round.
    #[error("migration link: {found} where {expected} was due")]
    Unexpected {
        /// What came.
        found: &'static str,
        /// What was due.
        expected: &'static str,
    },
    /// A message longer than a record carries.
    #[error("migration link: a message of {0} bytes is longer than a record carries")]
    TooLong(usize),
}

fn io(what: &'static str) -> impl FnOnce(std::io::Error) -> LinkError {
    move |source| LinkError::Io { what, source }
}

/// This daemon's migration identity.
pub struct Identity {
    secret: Zeroizing<[u8; 32]>,
    public: [u8; 32],
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Reads `<state_dir>/migration/host.key`, or makes it (0600) at first use.
    pub fn open(state_dir: &Path) -> Result<Self, LinkError> {
        let dir = state_dir.join("migration");
        let path = dir.join("host.key");
        let fail = |detail: String| LinkError::Identity {
            path: path.display().to_string(),
            detail,
        };
        std::fs::create_dir_all(&dir).map_err(|e| fail(e.to_string()))?;
        let secret = match std::fs::read(&path) {
            Ok(bytes) => {
                let bytes = Zeroizing::new(bytes);
                let key: [u8; 32] = bytes[..]
                    .try_into()
                    .map_err(|_| fail(format!("{} bytes, not a 32-byte key", bytes.len())))?;
                Zeroizing::new(key)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let mut key = Zeroizing::new([0u8; 32]);
                OsRng.fill_bytes(&mut key[..]);
                shared_proto::fs::replace_file(&path, &key[..], shared_proto::fs::PRIVATE_MODE)
                    .map_err(|e| fail(e.to_string()))?;
                key
            }
            Err(e) => return Err(fail(e.to_string())),
        };
        Ok(Self::from_secret(*secret))
    }

    /// An identity of `secret` (tests).
    pub fn from_secret(secret: [u8; 32]) -> Self {
        let public = PublicKey::from(&StaticSecret::from(secret)).to_bytes();
        Self {
            secret: Zeroizing::new(secret),
            public,
        }
    }

    /// The public key, to pin on the other hosts.
    pub fn public(&self) -> [u8; 32] {
        self.public
    }

    fn handshake(&self, initiator: bool) -> Result<HandshakeState, snow::Error> {
        let builder = snow::Builder::new(PATTERN.parse()?)
            .local_private_key(&self.secret[..])?
            .prologue(PROLOGUE)?;
        if initiator {
            builder.build_initiator()
        } else {
            builder.build_responder()
        }
    }
}

/// Parses a pinned key: 64 hex digits.
pub fn parse_key(text: &str) -> Option<[u8; 32]> {
    let bytes = hex::decode(text.trim()).ok()?;
    bytes.try_into().ok()
}

/// An established link.
pub struct Link<S = TcpStream> {
    stream: S,
    noise: TransportState,
    peer: [u8; 32],
}

impl<S> std::fmt::Debug for Link<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Link")
            .field("peer", &hex::encode(self.peer))
            .finish_non_exhaustive()
    }
}

async fn write_record<S: AsyncWrite + Unpin>(s: &mut S, message: &[u8]) -> Result<(), LinkError> {
    let len = u16::try_from(message.len()).map_err(|_| LinkError::TooLong(message.len()))?;
    let mut out = Vec::with_capacity(2 + message.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(message);
    s.write_all(&out).await.map_err(io("send a record"))
}

async fn read_record<S: AsyncRead + Unpin>(s: &mut S) -> Result<Vec<u8>, LinkError> {
    let mut len = [0u8; 2];
    match s.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(LinkError::Closed),
        Err(e) => return Err(io("receive a record")(e)),
    }
    let mut message = vec![0u8; usize::from(u16::from_be_bytes(len))];
    s.read_exact(&mut message).await.map_err(|e| {
        if e.kind() == std::io::ErrorKind::UnexpectedEof {
            LinkError::Closed
        } else {
            io("receive a record")(e)
        }
    })?;
    Ok(message)
}

/// Runs a handshake to its end within [`HANDSHAKE_TIMEOUT`].
async fn within_deadline(
    run: impl Future<Output = Result<(TransportState, [u8; 32]), LinkError>>,
) -> Result<(TransportState, [u8; 32]), LinkError> {
    tokio::time::timeout(HANDSHAKE_TIMEOUT, run)
        .await
        .map_err(|_| LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
}

fn remote_key(hs: &HandshakeState) -> Result<[u8; 32], LinkError> {
    hs.get_remote_static()
        .and_then(|k| k.try_into().ok())
        .ok_or(LinkError::Noise(snow::Error::Input))
}

/// Dials `addr` and runs the handshake as the initiator; the responder must show `pinned`.
pub async fn connect(
    addr: &str,
    identity: &Identity,
    pinned: &[u8; 32],
) -> Result<Link, LinkError> {
    let stream = tokio::time::timeout(HANDSHAKE_TIMEOUT, TcpStream::connect(addr))
        .await
        .map_err(|_| LinkError::HandshakeTimeout(HANDSHAKE_TIMEOUT))?
        .map_err(io("connect"))?;
    let _ = stream.set_nodelay(true);
    initiate(stream, identity, pinned).await
}

/// The initiator's handshake over `stream`.
pub async fn initiate<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    identity: &Identity,
    pinned: &[u8; 32],
) -> Result<Link<S>, LinkError> {
    let run = async {
        let mut hs = identity.handshake(true)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        // -> e
        let n = hs.write_message(&[], &mut buf)?;
        write_record(&mut stream, &buf[..n]).await?;
        // <- e, ee, s, es
        let msg = read_record(&mut stream).await?;
        hs.read_message(&msg, &mut buf)?;
        let peer = remote_key(&hs)?;
        if &peer != pinned {
            return Err(LinkError::WrongPeer {
                expected: hex::encode(pinned),
                found: hex::encode(peer),
            });
        }
        // -> s, se
        let n = hs.write_message(&[], &mut buf)?;
        write_record(&mut stream, &buf[..n]).await?;
        Ok((hs.into_transport_mode()?, peer))
    };
    let (noise, peer) = within_deadline(run).await?;
    Ok(Link {
        stream,
        noise,
        peer,
    })
}

/// The responder's handshake over an accepted `stream`; the initiator must show one of
/// `pinned`.
pub async fn respond<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    identity: &Identity,
    pinned: &[[u8; 32]],
) -> Result<Link<S>, LinkError> {
    let run = async {
        let mut hs = identity.handshake(false)?;
        let mut buf = vec![0u8; MAX_MESSAGE];
        let msg = read_record(&mut stream).await?;
        hs.read_message(&msg, &mut buf)?;
        let n = hs.write_message(&[], &mut buf)?;
        write_record(&mut stream, &buf[..n]).await?;
        let msg = read_record(&mut stream).await?;
        hs.read_message(&msg, &mut buf)?;
        let peer = remote_key(&hs)?;
        let noise = hs.into_transport_mode()?;
        Ok((noise, peer))
    };
    let (noise, peer) = within_deadline(run).await?;
    let mut link = Link {
        stream,
        noise,
        peer,
    };
    if !pinned.contains(&peer) {
        // Tell the caller why, over the session it just made (it learns only that its key is
        // not pinned here), and read its first message so the refusal is not lost to a reset.
        let why = format!(
            "this host has not pinned the key {} (--migration-peer)",
            hex::encode(peer)
        );
        let refusal =
            serde_json::to_vec(&super::Reply::Refused { reason: why }).unwrap_or_default();
        if link.send(&refusal).await.is_ok() {
            let _ = tokio::time::timeout(HANDSHAKE_TIMEOUT, link.recv_kind()).await;
        }
        return Err(LinkError::UnknownPeer(hex::encode(peer)));
    }
    Ok(link)
}

/// What [`Link::relay`] carried.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Relayed {
    /// Bytes from the local socket to the peer.
    pub sent: u64,
    /// Bytes from the peer to the local socket.
    pub received: u64,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Link<S> {
    /// The peer's static key.
    pub fn peer(&self) -> [u8; 32] {
        self.peer
    }

    async fn send_kind(&mut self, kind: u8, data: &[u8]) -> Result<(), LinkError> {
        if data.len() > MAX_DATA {
            return Err(LinkError::TooLong(data.len()));
        }
        let mut plain = Vec::with_capacity(1 + data.len());
        plain.push(kind);
        plain.extend_from_slice(data);
        let mut out = vec![0u8; plain.len() + TAG_LEN];
        let n = self.noise.write_message(&plain, &mut out)?;
        write_record(&mut self.stream, &out[..n]).await
    }

    async fn recv_kind(&mut self) -> Result<(u8, Vec<u8>), LinkError> {
        let record = read_record(&mut self.stream).await?;
        let mut plain = vec![0u8; record.len()];
        let n = self.noise.read_message(&record, &mut plain)?;
        plain.truncate(n);
        match plain.first().copied() {
            Some(kind @ (KIND_MESSAGE | KIND_DATA | KIND_END)) => {
                plain.remove(0);
                Ok((kind, plain))
            }
            Some(other) => Err(LinkError::BadRecord(other)),
            None => Err(LinkError::BadRecord(0)),
        }
    }

    /// Sends one message (at most [`MAX_DATA`] bytes).
    pub async fn send(&mut self, message: &[u8]) -> Result<(), LinkError> {
        self.send_kind(KIND_MESSAGE, message).await
    }

    /// Receives one message.
    pub async fn recv(&mut self) -> Result<Vec<u8>, LinkError> {
        match self.recv_kind().await? {
            (KIND_MESSAGE, m) => Ok(m),
            (KIND_DATA, _) => Err(LinkError::Unexpected {
                found: "stream data",
                expected: "a message",
            }),
            _ => Err(LinkError::Unexpected {
                found: "the end of a stream",
                expected: "a message",
            }),
        }
    }

    /// Carries a byte stream both ways between `local` and the peer until both directions have
    /// ended: what `local` sends goes out as data and its end as `END`; the peer's data goes
    /// into `local`, and the peer's `END` shuts `local`'s writing side. A message in the middle
    /// of the stream, a record that does not decrypt or a broken connection end the relay with
    /// the error. The link is used up either way.
    pub async fn relay(self, local: UnixStream) -> Result<Relayed, LinkError> {
        let (mut local_read, mut local_write) = local.into_split();
        let (mut peer_read, mut peer_write) = tokio::io::split(self.stream);
        // Each direction reads on its own, so no read is ever cut short; they share the Noise
        // state (one nonce each way), locked only around each seal and open.
        let noise = std::sync::Mutex::new(self.noise);
        let seal = |kind: u8, data: &[u8]| -> Result<Vec<u8>, LinkError> {
            let mut plain = Vec::with_capacity(1 + data.len());
            plain.push(kind);
            plain.extend_from_slice(data);
            let mut out = vec![0u8; plain.len() + TAG_LEN];
            let n = noise
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .write_message(&plain, &mut out)?;
            out.truncate(n);
            Ok(out)
        };
        let up = async {
            let mut buf = vec![0u8; MAX_DATA];
            let mut sent = 0u64;
            loop {
                let n = local_read
                    .read(&mut buf)
                    .await
                    .map_err(io("read the local stream"))?;
                if n == 0 {
                    write_record(&mut peer_write, &seal(KIND_END, &[])?).await?;
                    return Ok::<u64, LinkError>(sent);
                }
                write_record(&mut peer_write, &seal(KIND_DATA, &buf[..n])?).await?;
                sent += n as u64;
            }
        };
        let down = async {
            let mut received = 0u64;
            loop {
                let record = read_record(&mut peer_read).await?;
                let mut plain = vec![0u8; record.len()];
                let n = noise
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .read_message(&record, &mut plain)?;
                match plain[..n].split_first() {
                    Some((&KIND_DATA, data)) => {
                        local_write
                            .write_all(data)
                            .await
                            .map_err(io("write the local stream"))?;
                        received += data.len() as u64;
                    }
                    Some((&KIND_END, _)) => {
                        let _ = local_write.shutdown().await;
                        return Ok::<u64, LinkError>(received);
                    }
                    Some((&KIND_MESSAGE, _)) => {
                        return Err(LinkError::Unexpected {
                            found: "a message",
                            expected: "stream data",
                        });
                    }
                    Some((&other, _)) => return Err(LinkError::BadRecord(other)),
                    None => return Err(LinkError::BadRecord(0)),
                }
            }
        };
        let (sent, received) = tokio::try_join!(up, down)?;
        Ok(Relayed { sent, received })
    }
}

#[cfg(test)]
mod tests;
